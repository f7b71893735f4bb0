#!/usr/bin/env python
"""LAVIS 1.0.2 BLIP-2 oracle: run Salesforce's ORIGINAL ``Blip2Qformer`` (stage 1) and
``Blip2OPT`` (stage 2) on tiny, seeded random weights (CPU, fp32, nothing downloaded) and
dump what qformer's parity tests (tests/test_lavis_parity.py) compare against.

    bash tests/oracle/install.sh .venv-lavis          # once: LAVIS 1.0.2 + its pins
    .venv-lavis/bin/python tests/oracle/lavis_oracle.py --out tests/fixtures/lavis-seed1-xattn1 \\
        --seed 1 --cross-attention-freq 1

What runs is LAVIS's code: ``__init__``, ``forward`` and ``generate`` of both models, its
Q-Former (``lavis/models/blip2_models/Qformer.py``), EVA ViT and OPT (``modeling_opt.py``).
Only the three ``Blip2Base`` class methods that would download bert-base-uncased and EVA-g
(``init_tokenizer``, ``init_vision_encoder``, ``init_Qformer``) are overridden, in two thin
subclasses, to build the same modules at a tiny size from local files; the OPT "model name"
handed to ``Blip2OPT`` is a local directory written here. Values are captured from outside
(forward hooks, and spies on ``torch.multinomial`` / ``F.cross_entropy`` that record what
LAVIS passes and gets back) -- no LAVIS line is changed or re-implemented.

Output directory (details: tests/README.md):
  config.json          architecture (LAVIS's constructor arguments), the captions and prompt,
                       non-tensor results (losses as numbers, generated texts, eos id, ...),
                       tied parameter names, runtime and package versions, file sizes
  bert_tokenizer/      the Q-Former's BertTokenizer ([DEC] added as bos, as Blip2Base does)
  opt/                 tiny OPT as a transformers directory (weights in fp16 -- Blip2OPT loads
                       OPT with torch_dtype=float16 -- and the OPT-style GPT2Tokenizer)
  blip2_qformer.pth    {"model": Blip2Qformer.state_dict()} (EVA ViT included), the layout of
                       LAVIS's checkpoints; plain tensors, loadable with weights_only=True
  blip2_opt.pth        {"model": Blip2OPT.state_dict()} without opt_model.* (those are opt/)
  inputs.safetensors   image: the (B, 3, H, W) batch both models see
  stage1.safetensors   Blip2Qformer.forward: inputs/outputs of every step, the ITM negatives
                       LAVIS drew, and grad.<name> of EVERY trainable parameter after
                       loss.backward()
  stage2.safetensors   Blip2OPT.forward: image embeddings, query output, OPT inputs, labels
                       and logits, grad.<name> of every trainable parameter; generate():
                       token ids of beam search and of greedy decoding
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
import types
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# ---------------------------------------------------------------------------- tiny sizes
# LAVIS constructor arguments, scaled down. `vit` is what create_eva_vit_g passes to
# eva_vit.VisionTransformer (patch 14, width 1408, 39 blocks there); `qformer_bert` is the
# BertConfig that init_Qformer reads from bert-base-uncased (vocab_size is set from the
# tokenizer below); `opt` is an OPTConfig.
ARCH = dict(
    image_size=32,
    vit=dict(img_size=32, patch_size=8, use_mean_pooling=False, embed_dim=48, depth=2, num_heads=4,
             mlp_ratio=4.3637, qkv_bias=True, drop_path_rate=0.0, norm_layer="LayerNorm(eps=1e-6)",
             use_checkpoint=False),
    qformer_bert=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                      max_position_embeddings=64, type_vocab_size=2, initializer_range=0.02,
                      layer_norm_eps=1e-12, pad_token_id=0, position_embedding_type="absolute"),
    num_query_token=8,
    embed_dim=32,  # Blip2Qformer: ITC projection width
    max_txt_len=16,  # Blip2Qformer: the longest caption below is truncated
    opt=dict(hidden_size=48, num_hidden_layers=2, ffn_dim=96, num_attention_heads=4, max_position_embeddings=64,
             do_layer_norm_before=True, word_embed_proj_dim=48, dropout=0.1, attention_dropout=0.0,
             activation_function="relu", layerdrop=0.0, init_std=0.02, pad_token_id=1, bos_token_id=2,
             eos_token_id=2),
    opt_prompt="a photo of",  # as LAVIS's caption_coco_opt configs
    opt_max_txt_len=24,
    # Blip2OPT.__init__ calls init_Qformer(num_query_token, width) without a frequency, so its
    # Q-Former always has LAVIS's default: cross-attention every 2nd layer
    opt_qformer_cross_attention_freq=2,
    generate=dict(num_beams=3, max_length=8, min_length=1),  # Blip2OPT.generate kwargs (beam run)
)
CAPTIONS = [
    "a cat sitting on a red sofa",
    "two dogs playing in the snow",
    "a man riding a bicycle down a busy city street next to a bus while it rains heavily",
]
WORDS = sorted(set(
    "a an the of on in at to with and is are it this that two three some man woman men women person people "
    "boy girl child dog dogs cat cats bird horse bus car train truck bicycle bike street road city busy red "
    "blue green white black yellow brown small large big sitting standing riding playing eating walking "
    "running holding looking sofa couch table bed chair kitchen room window door snow grass water beach "
    "field park tree sky plate pizza food next while rains heavily down photo picture image front top "
    "near under over group together".split()
))


# ---------------------------------------------------------------------------- importing LAVIS
def import_lavis() -> types.SimpleNamespace:
    """Import LAVIS's BLIP-2 modules and nothing else.

    ``lavis/__init__.py`` and ``lavis/models/__init__.py`` import every dataset builder,
    task and model (decord, opencv, spacy, webdataset, ...). Registering the two packages as
    bare modules with the right ``__path__`` lets Python import just the submodules asked for.
    """
    _import_torchvision()
    root = Path(importlib.util.find_spec("lavis").origin).parent
    for name, path in (("lavis", root), ("lavis.models", root / "models")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(path)]
        sys.modules.setdefault(name, pkg)
    from lavis.models import base_model

    # lavis.common.registry.register_model() does `from lavis.models import BaseModel`
    sys.modules["lavis.models"].BaseModel = base_model.BaseModel
    from lavis.models import eva_vit
    from lavis.models.blip2_models import Qformer, blip2, blip2_opt, blip2_qformer, modeling_opt

    return types.SimpleNamespace(blip2=blip2, blip2_qformer=blip2_qformer, blip2_opt=blip2_opt,
                                 Qformer=Qformer, modeling_opt=modeling_opt, eva_vit=eva_vit)


def _import_torchvision() -> None:
    """timm 0.4.12 and LAVIS import torchvision (transforms, never its C++ ops). PyPI's
    torchvision binary does not load beside a CPU torch, after which its Python part fails on
    registering fake kernels for ``torchvision::nms``/``qnms``; declaring those two op schemas
    first lets it import. Nothing here calls them."""
    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _import_torchvision.keep = lib  # the definitions live as long as the Library object
    import torchvision  # noqa: F401


def init_process_group(workdir: str) -> None:
    """Blip2Qformer.forward calls dist.get_rank() and all_gather_with_grad() unconditionally.
    A real 1-process gloo group makes LAVIS run exactly as in multi-GPU training (including
    concat_all_gather returning tensors without grad), with no code patched."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="file://" + os.path.join(workdir, "dist_store"),
                                rank=0, world_size=1)


# ---------------------------------------------------------------------------- tokenizers
def write_bert_tokenizer(directory: Path):
    """A WordPiece vocabulary over WORDS (plus letters and digits, so anything tokenizes),
    saved as Blip2Base.init_tokenizer builds it: BertTokenizer + bos_token "[DEC]"."""
    from transformers import BertTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(".,!?'\"-:;()/&") + list("0123456789")
    tokens += letters + ["##" + c for c in letters] + ["##ing", "##ed", "##er", "##ly"]
    tokens += [w for w in WORDS if w not in letters]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n")
    tok = BertTokenizer(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.save_pretrained(str(directory))
    return tok


def _byte_symbols() -> list[str]:
    """GPT-2's byte -> printable unicode table (the alphabet of byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def write_opt_tokenizer(directory: Path):
    """An OPT-style tokenizer (GPT2Tokenizer: byte-level BPE, "</s>" as bos/eos/unk and
    prepended to every text, "<pad>" = 1, as facebook/opt-*) with a tiny vocabulary:
    4 specials, the 256 byte symbols, and merges learned deterministically on WORDS (with
    and without a leading space) until every such word is one token."""
    from transformers import GPT2Tokenizer

    sym = _byte_symbols()
    words = [tuple(sym[b] for b in form.encode()) for w in WORDS for form in (w, " " + w)]
    merges = []
    while True:  # plain BPE; ties go to the smallest pair, so the result never varies
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        merged = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if w[i:i + 2] == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged.append(tuple(out))
        words = merged
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for s in sym + [a + b for a, b in merges]:
        vocab.setdefault(s, len(vocab))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = GPT2Tokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), errors="replace",
                        bos_token="</s>", eos_token="</s>", unk_token="</s>", pad_token="<pad>",
                        add_prefix_space=False, add_bos_token=True)
    tok.save_pretrained(str(directory))
    return tok


# ---------------------------------------------------------------------------- weights
@torch.no_grad()
def randomize_(module: nn.Module, gen: torch.Generator, skip: tuple[str, ...] = ("temp",)) -> None:
    """Redraw every parameter (tied ones once) from ``gen``. The LAVIS/HF initialisation
    (zero biases, unit LayerNorms, std-0.02 matrices, query FFN = text FFN) would leave
    whole code paths numerically invisible, so: matrices N(0, 1/fan_in), LayerNorm scales
    1 + N(0, 0.1^2), everything else (biases, query_tokens, pos_embed, ...) N(0, 0.1^2).
    ``temp`` keeps LAVIS's 0.07."""
    seen = set()
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if id(p) in seen or leaf in skip:
            continue
        seen.add(id(p))
        noise = torch.randn(p.shape, generator=gen)
        if p.dim() >= 2 and leaf == "weight":
            p.copy_(noise / p[0].numel() ** 0.5)
        elif leaf == "weight":
            p.copy_(1 + 0.1 * noise)
        else:
            p.copy_(0.1 * noise)


def write_opt(L, directory: Path, tok, gen: torch.Generator) -> dict:
    """The OPT checkpoint Blip2OPT.__init__ loads by "name" (a local directory here). Its
    weights are stored in fp16, as LAVIS loads OPT (torch_dtype=float16); the oracle then runs
    it in fp32, so every value qformer reads from this directory is what LAVIS computed with."""
    from transformers import OPTConfig

    cfg = OPTConfig(**ARCH["opt"], vocab_size=(len(tok) + 7) // 8 * 8)  # padded like OPT's 50272
    model = L.modeling_opt.OPTForCausalLM(cfg)
    randomize_(model, gen)
    # lm_head.weight is tied to the input embeddings: stored once (safetensors refuses aliases)
    state = {k: v for k, v in model.half().state_dict().items() if k != "lm_head.weight"}
    model.save_pretrained(str(directory), state_dict=state, safe_serialization=True)
    tok.save_pretrained(str(directory))  # Blip2OPT: AutoTokenizer.from_pretrained(opt_model)
    return cfg.to_diff_dict()


def tiny_lavis_classes(L, bert_dir: Path):
    """Blip2Qformer / Blip2OPT with the three downloading class methods replaced by tiny,
    local equivalents; each builds the very LAVIS module the original builds."""
    from transformers import BertTokenizer

    class Tiny:
        @classmethod
        def init_tokenizer(cls):
            return BertTokenizer.from_pretrained(str(bert_dir))  # saved with "[DEC]" as bos

        @classmethod
        def init_vision_encoder(cls, model_name, img_size, drop_path_rate, use_grad_checkpoint, precision):
            kw = {k: v for k, v in ARCH["vit"].items() if k != "norm_layer"}
            kw.update(img_size=img_size, drop_path_rate=drop_path_rate, use_checkpoint=use_grad_checkpoint)
            vit = L.eva_vit.VisionTransformer(norm_layer=partial(nn.LayerNorm, eps=1e-6), **kw)
            # precision="fp16" would convert the ViT; the oracle asks for fp32
            return vit, L.blip2.LayerNorm(vit.num_features)

        @classmethod
        def init_Qformer(cls, num_query_token, vision_width, cross_attention_freq=2):
            # Blip2Base.init_Qformer with a tiny BertConfig instead of bert-base-uncased's
            # vocab_size: the WordPiece vocabulary without "[DEC]" (bert-base-uncased's 30522);
            # Blip2Qformer.__init__ then resizes the embeddings to len(tokenizer), as in LAVIS
            vocab = BertTokenizer.from_pretrained(str(bert_dir)).vocab_size
            config = L.Qformer.BertConfig(**ARCH["qformer_bert"], vocab_size=vocab)
            config.encoder_width = vision_width
            config.add_cross_attention = True
            config.cross_attention_freq = cross_attention_freq
            config.query_length = num_query_token
            qformer = L.Qformer.BertLMHeadModel(config=config)
            query_tokens = nn.Parameter(torch.zeros(1, num_query_token, config.hidden_size))
            query_tokens.data.normal_(mean=0.0, std=config.initializer_range)
            return qformer, query_tokens

    class TinyBlip2Qformer(Tiny, L.blip2_qformer.Blip2Qformer):
        pass

    class TinyBlip2OPT(Tiny, L.blip2_opt.Blip2OPT):
        pass

    return TinyBlip2Qformer, TinyBlip2OPT


# ---------------------------------------------------------------------------- capturing
@contextlib.contextmanager
def hooks(**modules: nn.Module):
    """Record (args, kwargs, output) of every call of the named modules."""
    calls = {name: [] for name in modules}
    handles = [
        m.register_forward_hook(lambda mod, a, kw, out, n=n: calls[n].append((a, kw, out)), with_kwargs=True)
        for n, m in modules.items()
    ]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def spy(owner, attr: str):
    """Record (args, result) of every call of ``owner.attr`` (a function), unchanged."""
    calls, original, own = [], getattr(owner, attr), attr in vars(owner)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, result))
        return result

    setattr(owner, attr, wrapper)
    try:
        yield calls
    finally:
        if own:
            setattr(owner, attr, original)
        else:  # it was a method found through the class: drop the instance attribute
            delattr(owner, attr)


def detached(**tensors) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}


def trainable_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """grad.<name> of every trainable parameter (named_parameters() lists tied ones once)."""
    return {"grad." + n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def tied_names(model: nn.Module) -> dict[str, str]:
    """state-dict name -> the name named_parameters() lists it under, for tied parameters."""
    first: dict[int, str] = {}
    ties = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            ties[n] = first[id(p)]
        else:
            first[id(p)] = n
    return ties


# ---------------------------------------------------------------------------- the two runs
def run_stage1(model, image: torch.Tensor, forward_seed: int) -> dict[str, torch.Tensor]:
    """Blip2Qformer.forward (ITC + ITM + LM) and loss.backward(), in eval mode (no dropout)."""
    model.eval()
    model.zero_grad()
    torch.manual_seed(forward_seed)  # ITM hard negatives: torch.multinomial on the global RNG
    with hooks(ln_vision=model.ln_vision, bert=model.Qformer.bert, lm=model.Qformer, vision_proj=model.vision_proj,
               text_proj=model.text_proj) as c, spy(torch, "multinomial") as picks, spy(F, "cross_entropy") as ce:
        out = model({"image": image, "text_input": CAPTIONS})
    out.loss.backward()
    bs = image.shape[0]
    # Qformer.bert runs 4 times: queries alone, text alone, ITM (query + text), and inside
    # the LM pass. F.cross_entropy sees sim_i2t, sim_t2i, the ITM logits, the LM scores.
    (query, text, itm, _), lm = c["bert"], c["lm"][0]
    rec = detached(
        loss=out.loss, loss_itc=out.loss_itc, loss_itm=out.loss_itm, loss_lm=out.loss_lm,
        vit_out=c["ln_vision"][0][0][0],  # visual_encoder(image)
        image_embeds=c["ln_vision"][0][2],  # ln_vision(visual_encoder(image))
        query_output_last_hidden_state=query[2].last_hidden_state,
        text_input_ids=text[0][0], text_attention_mask=text[1]["attention_mask"],
        text_output_last_hidden_state=text[2].last_hidden_state,
        image_feats=F.normalize(c["vision_proj"][0][2], dim=-1),  # as forward computes them
        text_feat=F.normalize(c["text_proj"][0][2], dim=-1),
        sim_i2t=ce[0][0][0], sim_t2i=ce[1][0][0], itc_targets=ce[0][0][1],
        # the first bs draws pick a negative IMAGE for each text, the next bs a negative TEXT per image
        neg_image_idx_for_text=torch.cat([r for _, r in picks[:bs]]),
        neg_text_idx_for_image=torch.cat([r for _, r in picks[bs:]]),
        itm_text_ids_all=itm[0][0], itm_attention_mask_all=itm[1]["attention_mask"],
        itm_last_hidden_state=itm[2].last_hidden_state,
        itm_logits_all=ce[2][0][0], itm_labels=ce[2][0][1],  # (3B, 2): (pos, pos), (txt, neg img), (img, neg txt)
        lm_decoder_input_ids=lm[0][0], lm_attention_mask=lm[1]["attention_mask"], lm_labels=lm[1]["labels"],
        lm_logits=lm[2].logits,
    )
    assert len(picks) == 2 * bs and len(ce) == 4, (len(picks), len(ce))
    rec.update(trainable_grads(model))
    return rec


def run_stage2(model, image: torch.Tensor, opt_captions: list[str]) -> tuple[dict, dict]:
    """Blip2OPT.forward + loss.backward(), then generate() with beam search and greedily."""
    model.eval()
    model.zero_grad()
    embed = model.opt_model.model.decoder.embed_tokens
    with hooks(ln_vision=model.ln_vision, bert=model.Qformer.bert, opt_proj=model.opt_proj, embed=embed,
               opt=model.opt_model) as c:
        out = model({"image": image, "text_input": opt_captions})
    out["loss"].backward()
    assert [len(c[k]) for k in ("ln_vision", "bert", "opt_proj", "embed", "opt")] == [1] * 5
    opt_args = c["opt"][0][1]
    rec = detached(
        loss=out["loss"],
        image_embeds=c["ln_vision"][0][2],
        query_output_last_hidden_state=c["bert"][0][2].last_hidden_state,
        inputs_opt=c["opt_proj"][0][2],
        opt_input_ids=c["embed"][0][0][0],  # the tokenized "<prompt> <caption>\n", right-padded
        opt_inputs_embeds=opt_args["inputs_embeds"],  # [inputs_opt, embed_tokens(ids)]
        opt_attention_mask=opt_args["attention_mask"],
        opt_labels=opt_args["labels"],  # -100 on the queries, the prompt and padding
        opt_logits=c["opt"][0][2].logits,
    )
    rec.update(trainable_grads(model))
    info = dict(prompt_length=int(model.prompt_length), eos_token_id=int(model.eos_token_id),
                generate_kwargs=ARCH["generate"])
    with torch.no_grad(), spy(model.opt_model, "generate") as gen:
        info["generate_beam_text"] = model.generate({"image": image, "prompt": ARCH["opt_prompt"]}, **ARCH["generate"])
        info["generate_greedy_text"] = model.generate({"image": image, "prompt": ARCH["opt_prompt"]},
                                                      **dict(ARCH["generate"], num_beams=1))
    rec["generate_beam_ids"], rec["generate_greedy_ids"] = gen[0][1].clone(), gen[1][1].clone()
    return rec, info


# ---------------------------------------------------------------------------- main
def build_and_run(L, out: Path, seed: int, xattn_freq: int, forward_seed: int) -> dict:
    from safetensors.torch import load_file, save_file

    def rng(k: int) -> torch.Generator:  # independent streams: changing one draw moves no other
        return torch.Generator().manual_seed(1000 * seed + k)

    torch.manual_seed(seed)  # LAVIS's own initialisers draw from the global RNG
    bert_tok = write_bert_tokenizer(out / "bert_tokenizer")
    opt_tok = write_opt_tokenizer(out / "opt")
    opt_cfg = write_opt(L, out / "opt", opt_tok, rng(1))
    Blip2QformerTiny, Blip2OPTTiny = tiny_lavis_classes(L, out / "bert_tokenizer")
    image = torch.randn(len(CAPTIONS), 3, ARCH["image_size"], ARCH["image_size"], generator=rng(2))
    common = dict(vit_model="eva_clip_g", img_size=ARCH["image_size"], drop_path_rate=0, use_grad_checkpoint=False,
                  vit_precision="fp32", freeze_vit=True, num_query_token=ARCH["num_query_token"])

    # stage 1: Blip2Qformer
    m1 = Blip2QformerTiny(**common, cross_attention_freq=xattn_freq, embed_dim=ARCH["embed_dim"],
                          max_txt_len=ARCH["max_txt_len"])
    randomize_(m1, rng(3))
    s1 = run_stage1(m1, image, forward_seed)

    # stage 2: Blip2OPT (its OPT comes from opt/, which it loads in fp16; the oracle computes in fp32)
    m2 = Blip2OPTTiny(**common, opt_model=str(out / "opt"), prompt=ARCH["opt_prompt"],
                      max_txt_len=ARCH["opt_max_txt_len"])
    m2.opt_model.float()
    stored = load_file(str(out / "opt" / "model.safetensors"))  # what qformer will load: LAVIS's weights?
    assert all(torch.equal(v, stored.get(k, stored["model.decoder.embed_tokens.weight"]).float())
               for k, v in m2.opt_model.state_dict().items()), "Blip2OPT's OPT differs from opt/"
    for name, child in m2.named_children():
        if name != "opt_model":
            randomize_(child, rng(4))
    with torch.no_grad():  # randomize_ only walks children, query_tokens is m2's own parameter
        m2.query_tokens.copy_(0.1 * torch.randn(m2.query_tokens.shape, generator=rng(5)))
    opt_captions = [ARCH["opt_prompt"] + " " + c for c in CAPTIONS]  # LAVIS's caption processor adds the prompt
    s2, s2_info = run_stage2(m2, image, opt_captions)

    # ---- write
    def pth(model, name, drop=()):
        sd = {k: v for k, v in model.state_dict().items() if not k.startswith(drop)}
        torch.save({"model": sd}, out / name)  # tied tensors share storage and are stored once

    pth(m1, "blip2_qformer.pth")
    pth(m2, "blip2_opt.pth", drop=("opt_model.",))
    save_file({"image": image}, str(out / "inputs.safetensors"))
    save_file(s1, str(out / "stage1.safetensors"))
    save_file(s2, str(out / "stage2.safetensors"))
    num = {k: s1[k].item() for k in ("loss", "loss_itc", "loss_itm", "loss_lm")}
    return dict(
        cfg=dict(ARCH, seed=seed, cross_attention_freq=xattn_freq, forward_seed=forward_seed,
                 bert_vocab_with_dec=len(bert_tok), opt_tokenizer_len=len(opt_tok), opt_config=opt_cfg),
        inputs=dict(captions=CAPTIONS, prompt=ARCH["opt_prompt"], opt_captions=opt_captions),
        stage1=dict(num, ties=tied_names(m1), neg_image_idx_for_text=s1["neg_image_idx_for_text"].tolist(),
                    neg_text_idx_for_image=s1["neg_text_idx_for_image"].tolist()),
        stage2=dict(s2_info, loss=s2["loss"].item(), ties=tied_names(m2)),
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output directory (created; files are overwritten)")
    ap.add_argument("--seed", type=int, default=0, help="weights and image (default 0)")
    ap.add_argument("--cross-attention-freq", type=int, default=2,
                    help="Blip2Qformer: cross-attention every N Q-Former layers (BLIP-2: 2)")
    ap.add_argument("--forward-seed", type=int, default=1234,
                    help="global RNG seed before Blip2Qformer.forward (its ITM negatives; recorded anyway)")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    L = import_lavis()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        init_process_group(tmp)
        meta = build_and_run(L, args.out, args.seed, args.cross_attention_freq, args.forward_seed)
    meta["runtime"] = dict(
        mode="eval() (no dropout), fp32 on CPU (Blip2Base.maybe_autocast is a no-op there), 1 thread, "
             "torch.use_deterministic_algorithms(True), 1-process gloo group",
        command="lavis_oracle.py --seed %d --cross-attention-freq %d --forward-seed %d"
                % (args.seed, args.cross_attention_freq, args.forward_seed),
        versions={p: importlib.metadata.version(p) for p in ("salesforce-lavis", "torch", "transformers",
                                                           "tokenizers", "timm", "safetensors")},
        python=sys.version.split()[0],
    )
    files = sorted(p for p in args.out.rglob("*") if p.is_file() and p.name != "config.json")
    meta["files"] = {str(p.relative_to(args.out)): dict(bytes=p.stat().st_size,
                                                        sha256=hashlib.sha256(p.read_bytes()).hexdigest()[:16])
                     for p in files}
    (args.out / "config.json").write_text(json.dumps(meta, indent=1, sort_keys=False) + "\n")
    s1, s2 = meta["stage1"], meta["stage2"]
    print(f"{args.out}: Blip2Qformer loss {s1['loss']:.6f} (itc {s1['loss_itc']:.6f} itm {s1['loss_itm']:.6f} "
          f"lm {s1['loss_lm']:.6f}); Blip2OPT loss {s2['loss']:.6f}, beam {s2['generate_beam_text']}, "
          f"greedy {s2['generate_greedy_text']}")


if __name__ == "__main__":
    main()
