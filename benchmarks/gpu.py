#!/usr/bin/env python
"""BLIP-2 at its real sizes on one GPU (H100 / H200), in under 8 minutes: samples/s and peak memory.

What is measured (random weights built directly on the device: no download, no hub)
    Sizes from the adapter cards ``eva-vit-g_opt-2.7b`` and ``eva-vit-g_flant5-xl`` (EVA ViT-g/14,
    39 blocks, 224 px = 257 tokens x 1408; BERT-base Q-Former, 32 queries; OPT-2.7B / FlanT5-XL
    shapes from the cards' ``arch``), batch sizes per GPU from the cards, bf16 autocast with the
    cards' dtypes (frozen tower and LLM held in bf16, trainable parts fp32), AdamW of
    ``qformer.training.build_optimizer``:

    * ``stage1_eager`` / ``stage1_compiled``: one stage-1 step (ITC + ITM + ITG, backward,
      AdamW), eager and with the tower's blocks and the Q-Former's layers ``torch.compile``d
      (regional compilation: one compiled graph serves every identical block);
    * ``stage1_cached``: the same step from cached tower features (a pinned host tensor copied to
      the GPU each step, as a DataLoader over ``qformer.data.FeatureCache`` would deliver them);
    * ``stage2_{opt,t5}``: one stage-2 step, ours (``Stage2Objective``) and transformers'
      ``Blip2ForConditionalGeneration`` holding the same weight tensors
      (``qformer.persistence.to_transformers``), same batch, same trainable set;
    * ``generate_{opt,t5}``: beam-5 captioning (the cards' eval options), ours and transformers';
    * ``vision_ft``: the caption fine-tuning step of ``eva-vit-g_opt-2.7b_caption-ft`` (the tower
      trains, fp32 weights, 364 px, batch 16) with and without the tower's activation
      checkpointing (the Q-Former's is off to isolate it): peak memory (``benchmarks/
      vision_finetune_memory.py`` estimates it from one block on a CPU).

    Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps (reset after warm-up;
    weights, optimizer state and activations); with ``--tiny`` (CPU) the process's peak RSS.

Time and failures
    The parts run in groups (stage1, opt, t5, vision_ft, compiled), each in its own subprocess on
    a GPU (``--isolate``, the default there): a group gets its budget plus what earlier groups left
    unused, and is killed at its deadline; what it measured by then is kept. Each measurement
    times steps until its own budget is spent, and an out-of-memory error (or any other) is
    reported in its row and the run goes on. ``--budget`` (default 460 s) bounds the whole run.

Output: a table (printed), ``results/gpu.json`` (structured: ``data.measurements``) and
``results/gpu.md``. ``--tiny`` runs the same code on the CPU with tiny sizes in seconds and writes
to ``--out`` (default: a temporary directory), never into ``results/``.

    python benchmarks/gpu.py                        # the GPU run
    python benchmarks/gpu.py --only stage1 compiled
    python benchmarks/gpu.py --tiny                 # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

GOAL_SAMPLES_PER_S = 150.0
GOAL = f"stage 1 with EVA ViT-g ≥ {GOAL_SAMPLES_PER_S:.0f} samples/s, compiled"
CARDS = {"opt": "eva-vit-g_opt-2.7b", "t5": "eva-vit-g_flant5-xl", "vision_ft": "eva-vit-g_opt-2.7b_caption-ft"}
# group: (budget s on a GPU, measurements in order)
GROUPS = {
    "stage1": (70, ["stage1_eager", "stage1_cached"]),
    "opt": (95, ["stage2_opt_ours", "stage2_opt_transformers", "generate_opt_ours", "generate_opt_transformers"]),
    "t5": (85, ["stage2_t5_ours", "stage2_t5_transformers", "generate_t5_ours", "generate_t5_transformers"]),
    "vision_ft": (60, ["vision_ft", "vision_ft_checkpointed"]),
    "compiled": (150, ["stage1_compiled"]),
}
GEN = dict(num_beams=5, max_new_tokens=30, min_new_tokens=8)  # the cards' eval options
# --tiny: the cards' structure at toy widths (CPU, seconds)
TINY_VISION = dict(embed_dim=48, depth=3, num_heads=4, mlp_ratio=4.3637)
TINY_QFORMER = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, encoder_width=48)
TINY_LLM = {"opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64),
            "t5": dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2)}


# ============================================================================ setup
class Env:
    """Device, sizes and time rules of a run (GPU or ``--tiny``)."""

    def __init__(self, args) -> None:
        import torch

        self.tiny = bool(args.tiny)
        self.device = torch.device("cpu" if self.tiny else "cuda")
        self.workdir = Path(args.workdir)
        self.compile_backend = args.compile_backend or ("aot_eager" if self.tiny else "inductor")
        self.measure_s = args.measure_s if args.measure_s is not None else (0.5 if self.tiny else 6.0)
        self.warmup = 1 if self.tiny else 3
        self.max_steps = 3 if self.tiny else 30
        self.min_left = 2.0 if self.tiny else 12.0  # a measurement does not start with less time than this left
        self.fail = dict(f.split("=", 1) for f in args.fail)  # tests: measurement=oom|error

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            C.reset_peak_rss()

    def peak(self) -> int:
        import torch

        return torch.cuda.max_memory_allocated() if self.device.type == "cuda" else C.peak_rss_bytes()

    def autocast(self):
        import torch

        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def batch(self, card, stage: int) -> int:
        return 4 if self.tiny else card.train_config(stage).batch_size


def card_config(env: Env, name: str, *, stage: int):
    """(card, Blip2Config) of an adapter card, offline (``meta_config``), shrunk with ``--tiny``."""
    from qformer import Blip2Config
    from qformer.adapters import load_adapter

    card = load_adapter(name)
    d = card.meta_config().to_dict()
    if stage == 1:
        d["llm"] = None  # stage 1 never touches the LLM
    if env.tiny:
        d["vision"]["model_kwargs"] = dict(TINY_VISION)
        d["vision"]["image_size"] = 28 if d["vision"]["image_size"] == 224 else 42
        d["qformer"].update(TINY_QFORMER)
        if d.get("llm"):
            kind = d["llm"]["hf_config"]["model_type"]
            d["llm"]["hf_config"].update(TINY_LLM[kind])
    return card, Blip2Config.from_dict(d)


def build_model(env: Env, name: str, *, stage: int, tag: str):
    """A random ``qformer.Blip2`` of a card, built on the device (tokenizers written locally)."""
    import torch

    import _models as M
    from qformer import Blip2

    card, cfg = card_config(env, name, stage=stage)
    tok = M.write_bert_tokenizer(env.workdir / f"qtok-{tag}", size=cfg.qformer.vocab_size - 1)
    llm_tok = None
    if cfg.llm is not None:
        kind = cfg.llm.hf_config["model_type"]
        llm_tok = (M.write_seq2seq_tokenizer if kind == "t5" else M.write_causal_tokenizer)(env.workdir / f"ltok-{tag}")
    torch.manual_seed(0)
    with torch.device(env.device):
        model = Blip2(cfg, tokenizer=tok, llm_tokenizer=llm_tok)
    return card, model


def timed_steps(env: Env, step, *, budget_s: float) -> dict:
    """Warm-up steps, then timed steps until ``budget_s`` is spent (at least 2, at most max_steps);
    the peak memory of the timed steps."""
    t0 = time.perf_counter()
    for _ in range(env.warmup):
        step()
    env.sync()
    warm = time.perf_counter() - t0
    env.reset_peak()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < env.max_steps and (len(times) < 2 or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        step()
        env.sync()
        times.append(time.perf_counter() - t)
    st = C.Stats(times)
    return {"median_s": st.median, "iqr_s": st.iqr, "steps": st.n, "warmup_s": warm, "peak_memory_bytes": env.peak()}


# ============================================================================ the parts
def stage1_step(env: Env, model, card, *, cached: bool = False):
    """step() of stage 1 on a fixed batch; ``cached``: from tower features on the host."""
    import torch

    import _models as M
    from qformer import Stage1Objective
    from qformer.training import build_optimizer

    b = env.batch(card, 1)
    model.set_stage(1)
    model.train()
    objective = Stage1Objective(model)
    opt = build_optimizer(model, card.train_config(1))
    enc = model.tokenizer(M.captions(b, words=(8, 16), seed=0), padding="longest", truncation=True,
                          max_length=model.config.max_txt_len, return_tensors="pt")
    ids, mask = enc.input_ids.to(env.device), enc.attention_mask.to(env.device)
    size = model.config.vision.image_size
    pixels = M.pixels(b, size, seed=1).to(env.device)
    if cached:
        with torch.no_grad():
            feats = model.vision(pixels).cpu()  # (B, N, C) float32, what the cache stores
        if env.device.type == "cuda":
            feats = feats.pin_memory()

    def step():
        opt.zero_grad(set_to_none=True)
        visual = ({"vision_features": feats.to(env.device, non_blocking=True)} if cached else {"pixel_values": pixels})
        with env.autocast():
            out = objective(**visual, input_ids=ids, attention_mask=mask)
        out.loss.backward()
        opt.step()

    return step, b


def compile_regions(model, backend: str) -> int:
    """``torch.compile`` each tower block and Q-Former layer in place; returns how many. The
    Q-Former's layers are called in several ways per step (queries, text, ITM pairs, ITG; with
    and without cross-attention): each is a graph of its own, so dynamo's recompile limit is raised."""
    import torch._dynamo.config as dynamo_config

    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, key):
            setattr(dynamo_config, key, 64)
    for key in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, key):
            setattr(dynamo_config, key, 1024)
    mods = list(model.vision.blocks) + list(model.qformer.layers)
    for m in mods:
        m.compile(backend=backend)
    return len(mods)


def stage2_batch(env: Env, model, card, kind: str):
    """The collated stage-2 batch (our collator, fixed seeds) and pixels, on the device."""
    import _models as M
    from qformer.stage2 import Stage2TextCollator

    b = env.batch(card, 2)
    collate = Stage2TextCollator(model.llm_tokenizer, model.config.llm, encoder_decoder=kind == "t5")
    batch = collate(M.captions(b, words=(8, 16), seed=0), seeds=list(range(b)))
    px = M.pixels(b, model.config.vision.image_size, seed=1)
    return {k: v.to(env.device) for k, v in batch.items()}, px.to(env.device), b


def hf_inputs(kind: str, batch: dict, image_id: int, num_query: int) -> dict:
    """Our collated batch -> transformers 5's inputs: ``num_query`` ``<image>`` placeholders first."""
    import torch

    ids, am = batch["input_ids"], batch["attention_mask"]
    b, dev = ids.shape[0], ids.device
    ids = torch.cat([torch.full((b, num_query), image_id, device=dev), ids], 1)
    am = torch.cat([torch.ones(b, num_query, dtype=am.dtype, device=dev), am], 1)
    if kind == "t5":
        return dict(input_ids=ids, attention_mask=am, labels=batch["labels"],
                    decoder_attention_mask=batch["decoder_attention_mask"])
    labels = torch.cat([torch.full((b, num_query), -100, device=dev), batch["labels"]], 1)
    return dict(input_ids=ids, attention_mask=am, labels=labels)


def stage2_steps(env: Env, model, card, kind: str):
    """(ours step, transformers step, transformers model, tokenizer, batch size) on shared weights."""
    import torch

    from qformer.persistence import to_transformers
    from qformer.stage2 import Stage2Objective
    from qformer.training import build_optimizer, param_groups

    batch, px, b = stage2_batch(env, model, card, kind)
    model.set_stage(2)
    model.train()
    objective = Stage2Objective(model)
    train = card.train_config(2)
    opt = build_optimizer(model, train)

    def ours():
        opt.zero_grad(set_to_none=True)
        with env.autocast():
            loss = objective(pixel_values=px, **batch).loss
        loss.backward()
        opt.step()

    hf, tok = to_transformers(model)  # the same weight tensors
    hf.requires_grad_(False)
    for m in (hf.qformer, hf.language_projection, hf.vision_model.post_layernorm):
        m.requires_grad_(True)
    hf.query_tokens.requires_grad_(True)
    hf.train()
    hf.vision_model.eval()
    hf.language_model.eval()
    hf_opt = torch.optim.AdamW(param_groups(hf, train.weight_decay), lr=train.lr, betas=(train.beta1, train.beta2))
    inputs = hf_inputs(kind, batch, hf.config.image_token_index, model.num_query_tokens)

    def theirs():
        hf_opt.zero_grad(set_to_none=True)
        with env.autocast():
            loss = hf(pixel_values=px, **inputs).loss
        loss.backward()
        hf_opt.step()

    return ours, theirs, hf, tok, b


def generate_calls(env: Env, model, hf, tok, kind: str):
    """(ours(), theirs(), batch): beam-5 captions of the same images; each returns new token ids."""
    import torch

    import _models as M
    from qformer.llm import end_of_text_ids, is_encoder_decoder

    b = 4 if env.tiny else 32
    opts = dict(GEN, max_new_tokens=6, min_new_tokens=2) if env.tiny else dict(GEN)
    px = M.pixels(b, model.config.vision.image_size, seed=3).to(env.device)
    model.eval()
    hf.eval()
    captured = []
    inner = model.llm.generate

    def recording(*a, **k):
        captured.append(inner(*a, **k))
        return captured[-1]

    model.llm.generate = recording

    def ours():
        captured.clear()
        with env.autocast():
            model.generate(px, "", **opts)
        return captured[-1]

    q = model.num_query_tokens
    text = tok([""] * b, return_tensors="pt").input_ids.to(env.device)  # the empty prompt as ours tokenises it
    ids = torch.cat([torch.full((b, q), hf.config.image_token_index, device=env.device), text], 1)
    eos = end_of_text_ids(model.llm_tokenizer, model.config.llm, encoder_decoder=is_encoder_decoder(model.llm))

    @torch.no_grad()
    def theirs():
        with env.autocast():
            out = hf.generate(pixel_values=px, input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              eos_token_id=eos[0] if len(eos) == 1 else eos, pad_token_id=tok.pad_token_id, **opts)
        return out if is_encoder_decoder(model.llm) else out[:, ids.shape[1]:]

    return ours, theirs, b, opts


def vision_ft_step(env: Env, model, card, *, checkpointing: bool):
    """The caption fine-tuning step (stage 2 objective, the whole tower trains)."""
    from qformer.stage2 import Stage2Objective
    from qformer.training import build_optimizer

    train = card.train_config(2)
    batch, px, b = stage2_batch(env, model, card, "opt")
    model.set_stage(2, vision_trainable_blocks=train.vision_trainable_blocks)
    model.qformer.set_gradient_checkpointing(False)  # the tower's checkpointing alone is measured
    model.vision.set_gradient_checkpointing(checkpointing)
    model.train()
    objective = Stage2Objective(model)
    opt = build_optimizer(model, train)

    def step():
        opt.zero_grad(set_to_none=True)
        with env.autocast():
            loss = objective(pixel_values=px, **batch).loss
        loss.backward()
        opt.step()

    return step, b


# ============================================================================ a group
class Recorder:
    """Measurements of one group, written to ``path`` after each one (a killed group keeps them)."""

    def __init__(self, env: Env, path: Path, deadline: float) -> None:
        self.env, self.path, self.deadline, self.results = env, path, deadline, {}

    def save(self) -> None:
        self.path.write_text(json.dumps(self.results, indent=1))

    def run(self, name: str, fn, *, samples: int | None = None, **info) -> dict | None:
        """Time ``fn()`` (a step) -> the row; an error (OOM included) becomes the row's status."""
        import torch

        left = self.deadline - time.time()
        if left < self.env.min_left:
            self.results[name] = dict(info, status="skipped", detail=f"time budget ({left:.0f} s left)")
            self.save()
            return None
        row = dict(info, status="ok")
        try:
            injected = self.env.fail.get(name)
            if injected == "oom":
                raise torch.OutOfMemoryError(f"injected for a test: {name}")
            if injected:
                raise RuntimeError(f"injected for a test: {name}")
            row.update(timed_steps(self.env, fn, budget_s=min(self.env.measure_s, max(1.0, left / 3))))
            if samples:
                row["samples_per_s"] = samples / row["median_s"]
        except torch.OutOfMemoryError as e:
            row.update(status="oom", detail=str(e).splitlines()[0][:300])
        except Exception as e:  # reported, not fatal: the other parts still run
            row.update(status="error", detail=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                       traceback=traceback.format_exc()[-2000:])
        self.results[name] = row
        self.save()
        self.env.reset_peak()
        return row


def run_group(env: Env, group: str, path: Path, deadline: float) -> dict:
    """Build the group's models and run its measurements; the rows go to ``path``."""
    import torch

    rec = Recorder(env, path, deadline)
    rec.save()
    # to_transformers warns that transformers' post_layernorm uses the tower's eps (1e-6, ours 1e-5): known, harmless here
    warnings.filterwarnings("ignore", message="transformers uses the vision layer_norm_eps")

    def guarded_build(names: list[str], build):
        try:
            return build()
        except Exception as e:  # an OOM while building: every row of the group says so
            status = "oom" if isinstance(e, torch.OutOfMemoryError) else "error"
            for n in names:
                rec.results[n] = dict(status=status, detail=f"building: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            rec.save()
            return None

    names = GROUPS[group][1]
    if group in ("stage1", "compiled"):
        built = guarded_build(names, lambda: build_model(env, CARDS["opt"], stage=1, tag=group))
        if built is None:
            return rec.results
        card, model = built
        if group == "compiled":
            n = compile_regions(model, env.compile_backend)
            step, b = stage1_step(env, model, card)
            rec.run("stage1_compiled", step, samples=b, batch=b, library="qformer",
                    what=f"stage 1, bf16, {n} regions compiled ({env.compile_backend})")
        else:
            step, b = stage1_step(env, model, card)
            rec.run("stage1_eager", step, samples=b, batch=b, library="qformer", what="stage 1, bf16, eager")
            del step
            step, b = stage1_step(env, model, card, cached=True)
            rec.run("stage1_cached", step, samples=b, batch=b, library="qformer",
                    what="stage 1, bf16, from cached tower features (host -> device each step)")
    elif group in ("opt", "t5"):
        built = guarded_build(names, lambda: build_model(env, CARDS[group], stage=2, tag=group))
        if built is None:
            return rec.results
        card, model = built
        try:
            ours, theirs, hf, tok, b = stage2_steps(env, model, card, group)
        except Exception as e:
            for n in names:
                rec.results[n] = dict(status="error", detail=f"setting up: {type(e).__name__}: {e}"[:300])
            rec.save()
            return rec.results
        rec.run(f"stage2_{group}_ours", ours, samples=b, batch=b, library="qformer", what=f"stage 2 ({group}), bf16")
        rec.run(f"stage2_{group}_transformers", theirs, samples=b, batch=b, library="transformers",
                what=f"stage 2 ({group}), bf16, Blip2ForConditionalGeneration")
        del ours, theirs
        g_ours, g_theirs, gb, opts = generate_calls(env, model, hf, tok, group)
        tokens = {}

        def keep(name, fn):
            def call():
                tokens[name] = fn()
            return call

        what = f"beam {opts['num_beams']}, {opts['min_new_tokens']}-{opts['max_new_tokens']} new tokens, bf16"
        rec.run(f"generate_{group}_ours", keep("ours", g_ours), samples=gb, batch=gb, library="qformer", what=what)
        rec.run(f"generate_{group}_transformers", keep("hf", g_theirs), samples=gb, batch=gb, library="transformers",
                what=what)
        if "ours" in tokens and "hf" in tokens:
            a, b2 = tokens["ours"].tolist(), tokens["hf"].tolist()
            same = sum(x == y for x, y in zip(a, b2))
            rec.results[f"generate_{group}_transformers"]["identical_rows"] = f"{same}/{len(a)}"
            rec.save()
    elif group == "vision_ft":
        built = guarded_build(names, lambda: build_model(env, CARDS["vision_ft"], stage=2, tag=group))
        if built is None:
            return rec.results
        card, model = built
        for name, ckpt in (("vision_ft", False), ("vision_ft_checkpointed", True)):
            step, b = vision_ft_step(env, model, card, checkpointing=ckpt)
            rec.run(name, step, samples=b, batch=b, library="qformer",
                    what=f"caption fine-tune, tower trains, {model.config.vision.image_size} px, tower checkpointing "
                         f"{'on' if ckpt else 'off'}")
            del step
    return rec.results


# ============================================================================ driver
def machine(env: Env) -> dict:
    import torch
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(env.device)}
    if env.device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        out.update(cpu=C.cpu_model())
    return out


def section(env: Env, results: dict, info: dict, wall: float, groups: list[str]) -> C.Section:
    sec = C.Section(
        title="GPU: BLIP-2 sizes on one GPU (`benchmarks/gpu.py`)" + (" -- TINY CPU smoke run" if env.tiny else ""),
        intro=(f"{info.get('gpu', info.get('cpu'))}, torch {info['torch']}, transformers {info['transformers']}. "
               "EVA ViT-g/14 + BERT-base Q-Former (32 queries), OPT-2.7B / FlanT5-XL shapes from the adapter cards, "
               "random weights built on the device, bf16 autocast, the cards' batch sizes per GPU. "
               f"Median step time over the timed steps; peak memory = "
               f"{'peak RSS (CPU)' if env.device.type == 'cpu' else 'torch.cuda.max_memory_allocated'} during them. "
               f"Whole run {wall:.0f} s."),
    )
    rows = []
    for g in groups:
        for name in GROUPS[g][1]:
            r = results.get(name, {"status": "not run"})
            ok = r.get("status") == "ok"
            rows.append([name, r.get("library", ""), r.get("what", ""), r.get("batch", ""),
                         f"{r['median_s'] * 1e3:.1f}" if ok else "", f"{r['samples_per_s']:.1f}" if ok else "",
                         C.gib(r["peak_memory_bytes"]) if ok else "",
                         r["status"] + (f": {r['detail']}" if r.get("detail") else "")
                         + (f"; identical rows {r['identical_rows']}" if r.get("identical_rows") else "")])
    sec.add_table("", ["measurement", "library", "what", "batch", "ms/step", "samples/s", "peak memory", "status"], rows)
    comp = results.get("stage1_compiled", {})
    if comp.get("status") == "ok":
        sec.notes.append(f"stage1_compiled: its {env.warmup} warm-up steps, compilation included, took "
                         f"{comp['warmup_s']:.0f} s")
        v = comp["samples_per_s"]
        sec.goal(GOAL, f"{v:.1f} samples/s", None if env.tiny else v >= GOAL_SAMPLES_PER_S)
    else:
        sec.goal(GOAL, f"not measured ({comp.get('status', 'not run')})", None)
    for k in ("opt", "t5"):
        a, b = results.get(f"stage2_{k}_ours", {}), results.get(f"stage2_{k}_transformers", {})
        if a.get("status") == b.get("status") == "ok":
            sec.notes.append(f"stage 2 ({k}): ours {b['median_s'] / a['median_s']:.2f}x transformers' speed, "
                             f"{a['peak_memory_bytes'] / b['peak_memory_bytes']:.2f}x its peak memory")
    e, c = results.get("stage1_eager", {}), results.get("stage1_cached", {})
    if e.get("status") == c.get("status") == "ok":
        sec.notes.append(f"stage 1 from cached features: {e['median_s'] / c['median_s']:.2f}x the eager step's speed")
    sec.data = {"mode": "tiny" if env.tiny else "gpu", "machine": info, "wall_s": wall, "measurements": results,
                "goal": {"text": GOAL, "samples_per_s": comp.get("samples_per_s"),
                         "met": None if env.tiny or comp.get("status") != "ok" else comp["samples_per_s"] >= GOAL_SAMPLES_PER_S}}
    return sec


def main(argv=None) -> C.Section | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the same code on the CPU with tiny sizes (seconds)")
    p.add_argument("--only", nargs="+", choices=list(GROUPS), default=list(GROUPS), help="groups to run")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 460; --tiny 120)")
    p.add_argument("--measure-s", type=float, default=None, help="timed seconds per measurement (default 6; --tiny 0.5)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; --tiny aot_eager)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each group in its own subprocess, killed at its deadline (default: on a GPU yes, --tiny no)")
    p.add_argument("--out", type=Path, default=None, help="where gpu.json / gpu.md go (default results/; --tiny a temp dir)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory (tokenizers)")
    p.add_argument("--fail", nargs="*", default=[], help=argparse.SUPPRESS)  # tests: MEASUREMENT=oom|error
    p.add_argument("--group", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.group:  # a child: one group
        env = Env(args)
        run_group(env, args.group, args.result, args.deadline)
        return None
    import torch

    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU (use --tiny for the CPU smoke run)")
    env = Env(args)
    isolate = (not args.tiny) if args.isolate is None else args.isolate
    budget = args.budget or (120.0 if args.tiny else 460.0)
    start = time.time()
    end = start + budget
    results: dict = {}
    order = [g for g in GROUPS if g in args.only]
    for i, g in enumerate(order):
        later = sum(GROUPS[h][0] for h in order[i + 1:]) * (budget / 460.0)
        deadline = max(time.time() + 1, end - later) if i + 1 < len(order) else end
        path = args.workdir / f"group-{g}.json"
        C.log(f"gpu: group {g} (until +{deadline - start:.0f} s)")
        if isolate:
            argv = [sys.executable, __file__, "--group", g, "--result", str(path), "--deadline", str(deadline),
                    "--workdir", str(args.workdir)] + (["--tiny"] if args.tiny else [])
            argv += ["--compile-backend", env.compile_backend, "--measure-s", str(env.measure_s)]
            argv += (["--fail", *args.fail] if args.fail else [])
            try:
                rc = subprocess.run(argv, timeout=max(1.0, deadline - time.time() + 5)).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            got = json.loads(path.read_text()) if path.exists() else {}
            for name in GROUPS[g][1]:
                if name not in got:
                    got[name] = {"status": "timeout" if rc == "timeout" else "error",
                                 "detail": "group killed at its deadline" if rc == "timeout" else f"group exited {rc}"}
        else:
            got = run_group(env, g, path, deadline)
        results.update(got)
    info = machine(env)
    sec = section(env, results, info, time.time() - start, order)
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu_tiny_")) if args.tiny else C.RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    path = sec.save("gpu", directory=out)
    (out / "gpu.md").write_text(sec.markdown(level=2))
    C.print_section(sec)
    C.log(f"gpu: wrote {path} and {out / 'gpu.md'}")
    return sec


if __name__ == "__main__":
    main()
