"""Compare qformer with dumps of the original LAVIS 1.0.2 code.

The dumps live in ``tests/fixtures/lavis-*/`` and are written by ``tests/oracle/lavis_oracle.py``
(see tests/README.md): LAVIS's ``Blip2Qformer`` / ``Blip2OPT`` weights in LAVIS's own layout,
the batch, and what LAVIS computed on it. The functions here load LAVIS's weights through
qformer's public API (``Blip2.from_pretrained(<LAVIS .pth>, config=...)``), replay the batch
and return ``{quantity: max |ours - LAVIS|}`` (exact-equality checks report 0 or inf).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from qformer import Blip2, Blip2Config, QFormerConfig, Stage1Objective, VisionConfig
from qformer.persistence import lavis_eva_vision_config

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ORACLE_SCRIPT = Path(__file__).resolve().parent / "oracle" / "lavis_oracle.py"
EXPECTED_DROPPED = {  # what a LAVIS Blip2Qformer state dict carries redundantly
    "Qformer.bert.embeddings.position_ids",  # a buffer
    "Qformer.cls.predictions.decoder.weight",  # tied to the word embeddings
    "Qformer.cls.predictions.decoder.bias",  # tied to Qformer.cls.predictions.bias
}


def oracle_dumps() -> list[Path]:
    """Every LAVIS dump the repository carries (each a directory with a config.json)."""
    return sorted(p for p in FIXTURES.glob("lavis-*") if (p / "config.json").is_file())


@dataclass
class Dump:
    path: Path
    meta: dict  # config.json
    image: torch.Tensor
    stage1: dict[str, torch.Tensor]
    stage2: dict[str, torch.Tensor]

    @property
    def cfg(self) -> dict:
        return self.meta["cfg"]


def load_dump(path: Path) -> Dump:
    path = Path(path)
    return Dump(
        path=path,
        meta=json.loads((path / "config.json").read_text()),
        image=load_file(str(path / "inputs.safetensors"))["image"],
        stage1=load_file(str(path / "stage1.safetensors")),
        stage2=load_file(str(path / "stage2.safetensors")),
    )


# ---------------------------------------------------------------------------- configs
def lavis_vision_config(vit: dict) -> VisionConfig:
    """The timm ``Eva`` tower equal to LAVIS's EVA ViT built with ``vit`` (its constructor kwargs)."""
    return lavis_eva_vision_config(vit)


def oracle_config(dump_dir: Path) -> Blip2Config:
    """Our config of the dump's LAVIS ``Blip2Qformer``."""
    cfg = json.loads((Path(dump_dir) / "config.json").read_text())["cfg"]
    bert = cfg["qformer_bert"]
    return Blip2Config(
        vision=lavis_vision_config(cfg["vit"]),
        qformer=QFormerConfig(
            vocab_size=cfg["bert_vocab_with_dec"],
            hidden_size=bert["hidden_size"],
            num_layers=bert["num_hidden_layers"],
            num_heads=bert["num_attention_heads"],
            intermediate_size=bert["intermediate_size"],
            hidden_act=bert["hidden_act"],
            hidden_dropout=bert["hidden_dropout_prob"],
            attention_dropout=bert["attention_probs_dropout_prob"],
            max_position_embeddings=bert["max_position_embeddings"],
            layer_norm_eps=bert["layer_norm_eps"],
            pad_token_id=bert["pad_token_id"],
            cross_attention_freq=cfg["cross_attention_freq"],
            encoder_width=cfg["vit"]["embed_dim"],
            num_query_tokens=cfg["num_query_token"],
        ),
        embed_dim=cfg["embed_dim"],
        max_txt_len=cfg["max_txt_len"],
        ln_vision_eps=1e-5,  # LAVIS's ln_vision is a plain nn.LayerNorm
        dec_token_id=cfg["bert_vocab_with_dec"] - 1,
    )


def opt_config(dump_dir: Path) -> Blip2Config:
    """Our config of the dump's LAVIS ``Blip2OPT`` (its frozen OPT is ``<dump>/opt``)."""
    from qformer.config import LLMConfig

    dump_dir = Path(dump_dir)
    base = oracle_config(dump_dir)
    cfg = json.loads((dump_dir / "config.json").read_text())["cfg"]
    qformer = QFormerConfig(**{**base.qformer.to_dict(), "text_input": False,
                               "cross_attention_freq": cfg["opt_qformer_cross_attention_freq"]})
    return Blip2Config(
        vision=base.vision, qformer=qformer, stage1_heads=False, ln_vision_eps=1e-5,
        llm=LLMConfig(path=str(dump_dir / "opt"), dtype="float32", prompt=cfg["opt_prompt"],
                      max_txt_len=cfg["opt_max_txt_len"], end_of_text="\n"),
    )


def load_stage1(dump_dir: Path, **kw):
    """(model, LoadReport) from the dump's LAVIS Blip2Qformer .pth."""
    dump_dir = Path(dump_dir)
    return Blip2.from_pretrained(dump_dir / "blip2_qformer.pth", config=kw.pop("config", oracle_config(dump_dir)),
                                 tokenizer=dump_dir / "bert_tokenizer", return_report=True, **kw)


def load_stage2(dump_dir: Path, **kw):
    """(model, LoadReport) from the dump's LAVIS Blip2OPT .pth (+ the OPT directory)."""
    dump_dir = Path(dump_dir)
    return Blip2.from_pretrained(dump_dir / "blip2_opt.pth", config=kw.pop("config", opt_config(dump_dir)),
                                 llm_tokenizer=dump_dir / "opt", return_report=True, **kw)


# ---------------------------------------------------------------------------- gradients
def lavis_grads_by_our_names(dump: Dump, stage: str, model: Blip2) -> dict[str, torch.Tensor]:
    """LAVIS's recorded gradients under our parameter names, zero where LAVIS had none.

    The gradients are written into a copy of LAVIS's state dict (tied names get their
    parameter's gradient, everything else zeros) and loaded like the weights themselves, so
    they go through exactly the name conversion qformer applies to LAVIS checkpoints.
    """
    grads = {k[len("grad."):]: v for k, v in getattr(dump, stage).items() if k.startswith("grad.")}
    ties = dump.meta[stage]["ties"]
    name = {"stage1": "blip2_qformer.pth", "stage2": "blip2_opt.pth"}[stage]
    weights = torch.load(dump.path / name, map_location="cpu", weights_only=True)["model"]
    as_sd = {}
    for key, value in weights.items():
        g = grads.get(ties.get(key, key))
        as_sd[key] = torch.zeros_like(value) if g is None else g
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"model": as_sd}, Path(tmp) / name)
        loaded, report = Blip2.from_pretrained(Path(tmp) / name, config=model.config, return_report=True)
    assert report.ok, str(report)
    return {n: p.detach() for n, p in loaded.named_parameters() if not n.startswith("llm.")}


def _grad_diffs(model: Blip2, theirs: dict[str, torch.Tensor], d) -> None:
    params = dict(model.named_parameters())
    assert set(theirs) == {n for n in params if not n.startswith("llm.")}
    for n, ref in theirs.items():
        p = params[n]
        d("grad." + n, p.grad if p.grad is not None else torch.zeros_like(p), ref)


class Diffs(dict):
    """{quantity: max |ours - LAVIS|}; ``scale[quantity]`` is max |LAVIS| (for float tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale: dict[str, float] = {}


def _differ():
    diffs = Diffs()

    def d(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
        assert ours.shape == theirs.shape, (name, tuple(ours.shape), tuple(theirs.shape))
        if ours.dtype.is_floating_point or theirs.dtype.is_floating_point:
            diffs[name] = (ours.double() - theirs.double()).abs().max().item() if ours.numel() else 0.0
            diffs.scale[name] = theirs.abs().max().item() if theirs.numel() else 0.0
        else:
            diffs[name + " (exact)"] = 0.0 if torch.equal(ours, theirs) else float("inf")

    return diffs, d


# ---------------------------------------------------------------------------- stage 1
def stage1_parity(dump_dir: Path, *, padding: str = "max_length") -> Diffs:
    """Max |ours - LAVIS| for every quantity the dump recorded from ``Blip2Qformer.forward``:
    token ids, losses, image/text features, similarities, ITM and LM logits, and the gradient
    of every trainable parameter after ``loss.backward()``. ``padding``: LAVIS pads captions
    to ``max_txt_len``; ours pads to the longest by default; both must give LAVIS's numbers."""
    from qformer import losses

    dump = load_dump(dump_dir)
    ref, captions = dump.stage1, dump.meta["inputs"]["captions"]
    model, report = load_stage1(dump.path)
    assert report.ok, str(report)
    model.eval()
    tok = model.tokenizer(captions, padding=padding, truncation=True, max_length=model.config.max_txt_len,
                          return_tensors="pt")
    ids, mask = tok["input_ids"], tok["attention_mask"]
    n = ids.shape[1]
    diffs, d = _differ()
    d("text_input_ids", ids, ref["text_input_ids"][:, :n])
    d("text_attention_mask", mask, ref["text_attention_mask"][:, :n])
    dec_ids, labels = losses.decoder_labels(ids, bos_token_id=model.config.dec_token_id, pad_token_id=0)
    d("lm_decoder_input_ids", dec_ids, ref["lm_decoder_input_ids"][:, :n])
    d("lm_labels", labels, ref["lm_labels"][:, :n])

    objective = Stage1Objective(model, gather_with_grad=False)  # LAVIS gathers features without grad
    model.zero_grad()
    out = objective(
        pixel_values=dump.image, input_ids=ids, attention_mask=mask,
        negatives=(ref["neg_image_idx_for_text"], ref["neg_text_idx_for_image"]),  # LAVIS's multinomial draws
        rank=0, world_size=1,
    )
    out.loss.backward()
    f = out.features
    for name, ours in [
        ("loss", out.loss), ("loss_itc", out.loss_itc), ("loss_itm", out.loss_itm), ("loss_lm", out.loss_itg),
        ("image_embeds", f.image.image_embeds), ("query_output_last_hidden_state", f.image.query_output),
        ("image_feats", f.image_feats), ("text_feat", f.text_feats), ("sim_i2t", out.sim_i2t),
        ("sim_t2i", out.sim_t2i), ("itm_logits_all", out.itm_logits),
    ]:
        d(name, ours, ref[name])
    real = mask.bool()
    # The objective's text pass computes only [CLS] in its last layer; the full encoder all rows.
    d("text_output_last_hidden_state[CLS]", f.text_hidden[:, 0], ref["text_output_last_hidden_state"][:, 0])
    with torch.no_grad():
        full = model.encode_text(ids, mask)
        d("text_output_last_hidden_state", full[real], ref["text_output_last_hidden_state"][:, :n][real])
        d("vit_out", model.vision(dump.image), ref["vit_out"])
        # LM logits where a real token is predicted (ours computes only those)
        positions, _ = losses.next_token_targets(labels)
        hidden = model.decode_text(dec_ids, mask, f.image.query_kv)
        d("lm_logits", model.qformer.lm_logits(hidden[:, :-1][positions]), ref["lm_logits"][:, : n - 1][positions])
    _grad_diffs(model, lavis_grads_by_our_names(dump, "stage1", model), d)
    return diffs


# ---------------------------------------------------------------------------- stage 2
def stage2_parity(dump_dir: Path) -> tuple[Diffs, dict[str, tuple]]:
    """Max |ours - LAVIS| for ``Blip2OPT.forward`` (OPT tokens and labels, image embeddings,
    query output, OPT inputs, loss, logits at the labelled positions, gradients of every
    trainable parameter) and, per decoding mode, (ours, LAVIS's) generated texts and token ids."""
    from qformer.stage2 import Stage2Objective, Stage2TextCollator

    dump = load_dump(dump_dir)
    ref, meta = dump.stage2, dump.meta
    model, report = load_stage2(dump.path)
    assert report.ok, str(report)
    model.eval()
    q = dump.cfg["num_query_token"]
    collate = Stage2TextCollator(model.llm_tokenizer, model.config.llm, encoder_decoder=False)
    batch = collate(meta["inputs"]["captions"])  # the collator adds the prompt, as LAVIS's processor does
    diffs, d = _differ()
    d("opt_input_ids", batch["input_ids"], ref["opt_input_ids"])
    d("opt_text_attention_mask", batch["attention_mask"], ref["opt_attention_mask"][:, q:])
    d("opt_labels", batch["labels"], ref["opt_labels"][:, q:])
    model.zero_grad()
    out = Stage2Objective(model)(pixel_values=dump.image, **batch)
    out.loss.backward()
    d("loss", out.loss, ref["loss"])
    labels = ref["opt_labels"]
    d("opt_logits", out.logits, ref["opt_logits"][:, :-1][labels[:, 1:] != -100])
    with torch.no_grad():
        embeds = model.embed_image(dump.image)
        query = model.encode_image(embeds).query_output
        prompts = model.language_projection(query)
        d("image_embeds", embeds, ref["image_embeds"])
        d("query_output", query, ref["query_output_last_hidden_state"])
        d("inputs_opt", prompts, ref["inputs_opt"])
        tokens = model.llm.get_input_embeddings()(batch["input_ids"])
        d("opt_inputs_embeds", torch.cat([prompts, tokens], dim=1), ref["opt_inputs_embeds"])
    _grad_diffs(model, lavis_grads_by_our_names(dump, "stage2", model), d)

    # generation: LAVIS's beam search / greedy with its max_length (= new tokens) and "\n" as eos;
    # LAVIS's min_length=1 counted the prompt, so it never binds: min_new_tokens=0
    gen = meta["stage2"]["generate_kwargs"]
    prompt_len = ref["generate_beam_ids"].shape[1] - gen["max_length"]
    outputs: dict[str, tuple] = {}
    for key, beams in (("beam", gen["num_beams"]), ("greedy", 1)):
        texts, ids = _generate_with_ids(model, dump.image, meta["inputs"]["prompt"], num_beams=beams,
                                        max_new_tokens=gen["max_length"], min_new_tokens=0)
        theirs = ref[f"generate_{key}_ids"][:, prompt_len:]  # LAVIS's OPT returns prompt + new tokens
        outputs[key] = (texts, meta["stage2"][f"generate_{key}_text"], ids[:, -theirs.shape[1]:], theirs)
    return diffs, outputs


def _generate_with_ids(model: Blip2, image: torch.Tensor, prompt: str, **options) -> tuple[list[str], torch.Tensor]:
    """``model.generate`` texts, and the token ids its LLM's ``generate`` returned."""
    calls = []
    original = model.llm.generate

    def recording(*args, **kwargs):
        calls.append(original(*args, **kwargs))
        return calls[-1]

    model.llm.generate = recording
    try:
        texts = model.generate(image, prompt, **options)
    finally:
        del model.llm.generate
    assert len(calls) == 1
    return texts, calls[0]
