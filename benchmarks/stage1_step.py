#!/usr/bin/env python
"""Stage-1 training step: qformer's ``Stage1Objective`` vs the original LAVIS 1.0.2 ``Blip2Qformer``.

What is compared
    One optimisation step of BLIP-2 stage 1 -- forward of ITC + ITM (hard negatives) + ITG,
    backward, ``torch.optim.AdamW`` step (lr 1e-4, weight decay 0.05 on matrices) -- on the same
    config, the same weights and the same batch:

    * LAVIS: ``lavis.models.blip2_models.blip2_qformer.Blip2Qformer`` (its own ``forward``,
      unmodified; built with tiny configs and no downloads the way
      ``../shared/tools/lavis-oracle/lavis_oracle.py`` does), running in ``.venv-lavis``'s
      Python (torch 2.13 CPU wheel, transformers 4.26), fp32 (its ``maybe_autocast`` is a no-op
      on CPU). It tokenises the captions inside ``forward``, padded to ``max_txt_len`` (32).
    * ours: ``qformer.Blip2`` loaded from the state dict that the LAVIS process exported
      (``Blip2.from_pretrained(lavis.pt, config=...)``), stepped through
      ``qformer.Stage1Objective`` (``gather_with_grad=False``: LAVIS's gradients) with the
      optimizer of ``qformer.training.build_optimizer``. The captions are tokenised inside the
      timed step too, the way our ``Stage1Collator`` does: padded to the batch's longest
      caption. The "max_length" row pads to 32 like LAVIS instead, which isolates that effect.
      Precisions: ``fp32``, and our default training precision ``bf16`` (``torch.autocast("cpu",
      torch.bfloat16)`` around the forward, frozen ViT weights in bf16, fp32 master weights).
      ``--onednn`` adds a row with fp32 GEMMs routed to oneDNN
      (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``, fp32-accurate on this CPU: see
      matmul_efficiency.py) -- a prototype of a library option, not the library's default.

    Both sides train in ``train()`` mode (dropout 0.1 in the Q-Former, as BLIP-2) on random hard
    negatives. Before timing, each side runs the batch once in ``eval()`` mode with the ITM
    negatives LAVIS drew (recorded in the LAVIS process, pinned on ours) and the losses are
    compared: the check that both sides compute the same thing from the same weights.

Configs
    ``tiny``: the oracle's config (ViT 48 wide / 2 blocks / 32 px / patch 8, Q-Former 64 wide / 2
    layers, 8 queries, batch 8, captions up to 16 tokens): overhead-bound.
    ``small``: performance-notes.md's (ViT 384 / 6 blocks / 6 heads / 224 px / patch 16, Q-Former
    384 / 4 layers / 6 heads / FFN 1536 / 32 queries / cross-attention every 2nd layer / embed
    128, vocab 1000, batch 16, captions of 10-18 tokens (mean ~14) that LAVIS pads to 32).

How
    Each side is its own subprocess (peak RSS per side); after ``--warmup`` steps the sides run
    ``--rounds`` rounds of ``--steps`` timed steps in ABBA order; median and IQR. Ratios: ours
    steps/s over LAVIS steps/s (higher is better), peak RSS ours over LAVIS (lower is better).
    ``--ours-python`` runs our side under another interpreter (e.g. a venv with the same torch
    CPU wheel as LAVIS, to separate the torch build from the library).

    python benchmarks/stage1_step.py [--configs tiny small] [--rounds 3 --steps 2 --warmup 3] [--onednn]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CONFIGS = {
    "tiny": dict(
        batch=8, words=(4, 12),
        vit=dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=4.3637),
        bert=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
        num_query_token=8, embed_dim=32, max_txt_len=16,
    ),
    "small": dict(
        batch=16, words=(8, 16),  # one-token words + [CLS] + [SEP]: 10-18 tokens, mean ~14
        vit=dict(img_size=224, patch_size=16, embed_dim=384, depth=6, num_heads=6, mlp_ratio=4.0),
        bert=dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=6, intermediate_size=1536),
        num_query_token=32, embed_dim=128, max_txt_len=32,
    ),
}
LR, WEIGHT_DECAY = 1e-4, 0.05
TINY_SCALE = 10  # the tiny config times 10x the steps (and warm-up) given on the command line


# ============================================================================ shared
def _load_oracle():
    spec = importlib.util.spec_from_file_location("lavis_oracle", C.ORACLE_DIR / "lavis_oracle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def lavis_cfg(oracle, name: str) -> dict:
    spec = CONFIGS[name]
    cfg = oracle.default_cfg()
    cfg["vit"].update(spec["vit"])
    cfg["image_size"] = spec["vit"]["img_size"]
    cfg["qformer_bert"].update(spec["bert"])
    cfg["num_query_token"] = spec["num_query_token"]
    cfg["embed_dim"] = spec["embed_dim"]
    cfg["max_txt_len"] = spec["max_txt_len"]
    cfg["cross_attention_freq"] = 2
    return cfg


def make_batch(words: list[str], name: str, seed: int = 0):
    import torch

    spec = CONFIGS[name]
    rng = random.Random(seed)
    lo, hi = spec["words"]
    captions = [" ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))) for _ in range(spec["batch"])]
    size = spec["vit"]["img_size"]
    image = torch.randn(spec["batch"], 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return image, captions


def param_groups(named_params):
    """AdamW groups as qformer.training.param_groups / LAVIS: no decay on biases and 1-D tensors."""
    decay, no_decay = [], []
    for n, p in named_params:
        if p.requires_grad:
            (no_decay if p.ndim < 2 or n.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def _serve_steps(step, floor: int, extra_finish) -> None:
    """Common worker tail: reset the peak RSS, then serve steps / finish / profile."""
    baseline = C.rss_bytes()
    C.reset_peak_rss()

    C.serve({
        "steps": lambda n: C.timed_block(step, n),
        "finish": lambda: dict(C.memory_report(baseline, floor), **extra_finish()),
        "profile": lambda path, title: C.profile_call(step, path, title=title),
    })


# ============================================================================ LAVIS side
def lavis_worker(args) -> None:
    import torch

    floor = C.worker_setup()
    oracle = _load_oracle()
    oracle._torchvision_shim()
    L = oracle._import_lavis()
    workdir = Path(args.workdir)
    oracle._init_dist(str(workdir))
    cfg = lavis_cfg(oracle, args.config)
    tok_dir = workdir / "bert_tokenizer"
    tok = oracle.build_bert_tokenizer(str(tok_dir))
    cfg["bert_vocab_with_dec"] = len(tok)
    TinyBlip2Qformer, _ = oracle.make_tiny_classes(L, cfg, str(tok_dir))
    torch.manual_seed(10)
    model = TinyBlip2Qformer(
        vit_model="eva_clip_g", img_size=cfg["image_size"], drop_path_rate=0, use_grad_checkpoint=False,
        vit_precision="fp32", freeze_vit=True, num_query_token=cfg["num_query_token"],
        cross_attention_freq=cfg["cross_attention_freq"], embed_dim=cfg["embed_dim"], max_txt_len=cfg["max_txt_len"],
    )
    oracle.randomize_(model, torch.Generator().manual_seed(11))
    image, captions = make_batch(oracle.WORDS, args.config)
    # export: weights, config, inputs
    torch.save(model.state_dict(), workdir / "lavis_stage1.pt")
    (workdir / "config.json").write_text(json.dumps({"cfg": cfg}, default=str))
    torch.save({"image": image, "captions": captions}, workdir / "inputs.pt")

    # reference losses: eval mode, LAVIS's own negatives recorded
    model.eval()
    picks: list = []
    torch.manual_seed(1234)
    with torch.no_grad(), oracle.record_multinomial(picks):
        out = model({"image": image, "text_input": captions})
    b = image.shape[0]
    ref = {
        "loss": out.loss.item(), "loss_itc": out.loss_itc.item(), "loss_itm": out.loss_itm.item(),
        "loss_lm": out.loss_lm.item(),
        "neg_image_idx": torch.cat(picks[:b]).tolist(), "neg_text_idx": torch.cat(picks[b:]).tolist(),
    }
    (workdir / "lavis_reference.json").write_text(json.dumps(ref))

    model.train()
    opt = torch.optim.AdamW(param_groups(model.named_parameters()), lr=LR)
    samples = {"image": image, "text_input": captions}
    state = {"loss": None}

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(samples).loss
        loss.backward()
        opt.step()
        state["loss"] = loss.detach()

    C.timed(step, args.warmup)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _serve_steps(step, floor, lambda: dict(loss=float(state["loss"]), trainable_params=n_params, reference=ref,
                                          text_len=cfg["max_txt_len"]))


# ============================================================================ our side
def our_config(cfg: dict, *, vision_dtype: str = "float32"):
    """qformer's Blip2Config for LAVIS's hyper-parameters (as tests/lavis_parity.py)."""
    from qformer import Blip2Config, QFormerConfig
    from qformer.persistence import lavis_eva_vision_config

    bert = cfg["qformer_bert"]
    return Blip2Config(
        vision=lavis_eva_vision_config(cfg["vit"], dtype=vision_dtype),
        qformer=QFormerConfig(
            vocab_size=cfg["bert_vocab_with_dec"], hidden_size=bert["hidden_size"],
            num_layers=bert["num_hidden_layers"], num_heads=bert["num_attention_heads"],
            intermediate_size=bert["intermediate_size"], hidden_act=bert["hidden_act"],
            hidden_dropout=bert["hidden_dropout_prob"], attention_dropout=bert["attention_probs_dropout_prob"],
            max_position_embeddings=bert["max_position_embeddings"], layer_norm_eps=bert["layer_norm_eps"],
            pad_token_id=bert["pad_token_id"], cross_attention_freq=cfg["cross_attention_freq"],
            encoder_width=cfg["vit"]["embed_dim"], num_query_tokens=cfg["num_query_token"],
        ),
        embed_dim=cfg["embed_dim"], max_txt_len=cfg["max_txt_len"], ln_vision_eps=1e-5,
        dec_token_id=cfg["bert_vocab_with_dec"] - 1,
    )


def build_ours(workdir: Path, precision: str, padding: str = "longest"):
    """Our stage-1 step on the weights, tokenizer and batch the LAVIS process exported to ``workdir``."""
    import torch

    from qformer import Blip2

    cfg = json.loads((workdir / "config.json").read_text())["cfg"]
    vision_dtype = "bfloat16" if precision == "bf16" else "float32"
    model, report = Blip2.from_pretrained(
        workdir / "lavis_stage1.pt", config=our_config(cfg, vision_dtype=vision_dtype),
        tokenizer=workdir / "bert_tokenizer", return_report=True,
    )
    assert report.ok, str(report)
    inputs = torch.load(workdir / "inputs.pt", weights_only=True)
    return make_step(model, inputs["image"], inputs["captions"], precision, padding)


def build_ours_fresh(name: str, precision: str, workdir: Path, seed: int = 0, padding: str = "longest"):
    """The same step on a randomly initialised model of config ``name`` (no LAVIS needed)."""
    import torch

    import _models as M
    from qformer import Blip2

    oracle = _load_oracle()  # only its config defaults: nothing of LAVIS is imported
    cfg = lavis_cfg(oracle, name)
    tok = M.write_bert_tokenizer(workdir / "bert_tokenizer", size=cfg["qformer_bert"]["vocab_size"])
    cfg["bert_vocab_with_dec"] = len(tok)
    torch.manual_seed(seed)
    model = Blip2(our_config(cfg, vision_dtype="bfloat16" if precision == "bf16" else "float32"), tokenizer=tok)
    M.randomize_(model, seed)
    image, captions = make_batch(M.WORDS, name, seed)
    return make_step(model, image, captions, precision, padding)


def make_step(model, image, captions, precision: str, padding: str = "longest"):
    """(model, step(), state, reference_losses(negatives)) of one stage-1 step as our recipe runs it:
    tokenise (``padding="longest"`` like ``qformer.data.Stage1Collator``), forward under the
    precision's autocast, backward, AdamW."""
    import contextlib

    import torch

    from qformer import Stage1Objective
    from qformer.training import TrainConfig, build_optimizer

    model.set_stage(1)
    model.train()
    objective = Stage1Objective(model, gather_with_grad=False)
    opt = build_optimizer(model, TrainConfig(lr=LR, weight_decay=WEIGHT_DECAY))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def tokenize():
        enc = model.tokenizer(captions, padding=padding, truncation=True, max_length=model.config.max_txt_len,
                              return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    state = {"loss": None, "text_len": tokenize()[0].shape[1]}

    def forward_backward():
        ids, mask = tokenize()
        with autocast():
            out = objective(pixel_values=image, input_ids=ids, attention_mask=mask, rank=0, world_size=1)
        out.loss.backward()
        state["loss"] = out.loss.detach()
        state["n_targets"] = int(mask[:, 1:].sum())

    def step():
        opt.zero_grad(set_to_none=True)
        forward_backward()
        opt.step()

    def reference_losses(negatives):
        ids, mask = tokenize()
        model.eval()
        with torch.no_grad(), autocast():
            out = objective(pixel_values=image, input_ids=ids, attention_mask=mask, rank=0, world_size=1,
                            negatives=negatives)
        model.train()
        return {"loss": out.loss.item(), "loss_itc": out.loss_itc.item(), "loss_itm": out.loss_itm.item(),
                "loss_lm": out.loss_itg.item()}

    state["forward_backward"] = forward_backward
    return model, step, state, reference_losses


def ours_worker(args) -> None:
    import torch

    floor = C.worker_setup()
    if args.onednn:
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"  # fp32 GEMMs through oneDNN (no AMX: stays fp32)
    workdir = Path(args.workdir)
    model, step, state, reference_losses = build_ours(workdir, args.precision, args.padding)
    ref = json.loads((workdir / "lavis_reference.json").read_text())
    negatives = (torch.tensor(ref["neg_image_idx"]), torch.tensor(ref["neg_text_idx"]))
    losses = reference_losses(negatives)
    C.timed(step, args.warmup)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _serve_steps(step, floor, lambda: dict(loss=float(state["loss"]), trainable_params=n_params, losses=losses,
                                          text_len=state["text_len"], torch=torch.__version__))


# ============================================================================ driver
def _variants(args, name: str) -> list[tuple[str, list[str]]]:
    """(row name, worker flags) of our side."""
    out = []
    for prec in args.precisions:
        out.append((f"ours {prec}", ["--precision", prec]))
    if name == "small" and args.max_length_row:
        out.insert(1, ("ours fp32, padded to 32", ["--precision", "fp32", "--padding", "max_length"]))
    if args.onednn:
        out.append(("ours fp32 + oneDNN GEMM", ["--precision", "fp32", "--onednn"]))
    return out


def run(args) -> C.Section:
    lavis_py = C.lavis_python()
    if lavis_py is None:
        raise SystemExit("the LAVIS venv is missing: set QFORMER_LAVIS_PYTHON or create .venv-lavis (see ../shared)")
    ours_py = args.ours_python or sys.executable
    sec = C.Section(
        title="Stage 1 training step: ours vs LAVIS 1.0.2",
        intro=(
            "One step = forward (ITC + ITM with hard negatives + ITG) + backward + AdamW, same weights "
            "(LAVIS's state dict loaded into ours), same images and captions, `train()` mode (dropout on). "
            "LAVIS runs fp32 (its autocast is a no-op on CPU) and pads captions to 32 tokens inside `forward`; ours "
            "tokenises inside the step too, padding to the longest caption of the batch as our collator does "
            "(\"padded to 32\": LAVIS's padding). bf16 = our default training precision (bf16 autocast, frozen "
            f"ViT in bf16). ABBA-alternated subprocesses, {args.warmup} warm-up steps, median of "
            f"{args.rounds * args.steps} timed steps per side (x{TINY_SCALE} for tiny; ± half the IQR)."
        ),
    )
    rows, mem_rows, loss_rows = [], [], []
    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_stage1_"))
    for name in args.configs:
        workdir = base / name
        workdir.mkdir(parents=True, exist_ok=True)
        log = workdir / "workers.log"
        C.log(f"stage1 {name}: building the LAVIS model and exporting its weights")
        scale = TINY_SCALE if name == "tiny" else 1  # tiny steps take ~25 ms: time more of them
        warmup, steps = args.warmup * scale, args.steps * scale
        lavis = C.Worker("LAVIS fp32", [lavis_py, __file__, "--worker", "lavis", "--config", name,
                                        "--workdir", workdir, "--warmup", warmup], log=log)
        workers = [lavis]
        try:
            lavis.call("steps", n=0)  # returns once it has exported its weights and warmed up
            for label, flags in _variants(args, name):
                w = C.Worker(label, [ours_py, __file__, "--worker", "ours", "--config", name, "--workdir", workdir,
                                     "--warmup", warmup] + flags, log=log)
                workers.append(w)
                w.call("steps", n=0)
            C.log(f"stage1 {name}: timing {[w.name for w in workers]}")
            times = C.alternate(workers, rounds=args.rounds, steps=steps, quiet_wait=args.quiet_wait)
            fin = {w.name: w.call("finish") for w in workers}
            if not args.no_profile and name == "small":
                for w in workers:
                    tag = w.name.replace(" ", "_").replace(",", "").replace("+", "")
                    path = C.PROFILE_DIR / f"stage1_small_{tag}.txt"
                    w.call("profile", path=str(path),
                           title=f"stage-1 step, small config, {w.name}: top ops by self CPU time (one step)")
        finally:
            for w in workers:
                w.close()
        ref = fin["LAVIS fp32"]
        ref_t = times["LAVIS fp32"].stats
        for w in workers:
            st, f = times[w.name].stats, fin[w.name]
            rows.append([name, w.name, f.get("text_len", ""), st.ms(), f"{1 / st.median:.2f}",
                         "1.00x" if w is lavis else C.ratio(ref_t.median, st.median), times[w.name].describe()])
            above, ref_above = f["peak_rss"] - f["floor_rss"], ref["peak_rss"] - ref["floor_rss"]
            mem_rows.append([name, w.name, C.gib(f["peak_rss"]), C.ratio(f["peak_rss"], ref["peak_rss"]),
                             f"{f['floor_rss'] / 2**20:.0f} MiB", f"{above / 2**20:.0f} MiB", C.ratio(above, ref_above),
                             C.gib(f["lifetime_peak_rss"])])
            sec.data.setdefault(name, {})[w.name] = dict(median_s=st.median, iqr_s=st.iqr, n=st.n,
                                                         all_median_s=times[w.name].all.median,
                                                         blocks=times[w.name].blocks, **f)
        rl = ref["reference"]
        for w in workers[1:]:
            ours = fin[w.name]["losses"]
            loss_rows.append([name, w.name] + [f"{rl[k]:.6f} / {ours[k]:.6f} ({abs(rl[k] - ours[k]):.1e})"
                                               for k in ("loss", "loss_itc", "loss_itm", "loss_lm")])
    sec.add_table("Speed (vs LAVIS = ours steps/s ÷ LAVIS steps/s; text = padded caption length):",
                  ["config", "side", "text", "ms/step median (±IQR/2)", "steps/s", "vs LAVIS", "blocks"], rows)
    sec.add_table("Memory: peak RSS of each process during the timed steps; \"torch floor\" = its RSS right after "
                  "`import torch` (the CUDA wheel of our venv maps ~0.4 GiB more than LAVIS's CPU wheel); \"above "
                  "floor\" = peak minus floor (model, optimizer, activations, libraries):",
                  ["config", "side", "peak RSS", "vs LAVIS", "torch floor", "above floor", "vs LAVIS", "lifetime peak"],
                  mem_rows)
    sec.add_table("Same computation: eval-mode losses of the same batch with LAVIS's recorded ITM negatives "
                  "(LAVIS / ours (|diff|)):", ["config", "side", "loss", "itc", "itm", "itg (lm)"], loss_rows)
    for name in args.configs:
        d = sec.data[name]
        lav = d["LAVIS fp32"]
        for prec, target in (("fp32", 1.5), ("bf16", 3.0)):
            key = f"ours {prec}"
            if key not in d:
                continue
            r = lav["median_s"] / d[key]["median_s"]
            sec.goal(f"stage 1 ({name}) ours {prec} ≥ {target}x LAVIS fp32 steps/s", f"{r:.2f}x", r >= target)
            m = d[key]["peak_rss"] / lav["peak_rss"]
            m2 = (d[key]["peak_rss"] - d[key]["floor_rss"]) / (lav["peak_rss"] - lav["floor_rss"])
            sec.goal(f"stage 1 ({name}) ours {prec} peak RSS ≤ 0.8x LAVIS", f"{m:.2f}x (above torch floor: {m2:.2f}x)",
                     m <= 0.8)
    return sec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["lavis", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--config", default="small", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--padding", default="longest", help=argparse.SUPPRESS)
    p.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=sorted(CONFIGS))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--no-max-length-row", dest="max_length_row", action="store_false",
                   help="skip the 'ours fp32, padded to 32' row of the small config")
    p.add_argument("--onednn", action="store_true",
                   help="worker: route fp32 GEMMs to oneDNN; driver: add an 'ours fp32 + oneDNN GEMM' row")
    p.add_argument("--ours-python", default=None, help="interpreter for our side (default: this one)")
    C.common_arguments(p, rounds=3, steps=2, warmup=3)
    args = p.parse_args(argv)
    if args.worker == "lavis":
        return lavis_worker(args)
    if args.worker == "ours":
        return ours_worker(args)
    return C.run_and_save(run, args, "stage1_step")


if __name__ == "__main__":
    main()
