#!/usr/bin/env python
"""Stage-2 training step: qformer's ``Stage2Objective`` vs transformers' ``Blip2ForConditionalGeneration``.

What is compared
    One optimisation step of BLIP-2 stage 2 (frozen ViT -> Q-Former -> projection -> frozen LLM,
    next-token cross-entropy on the captions; backward through the frozen LLM into the Q-Former;
    ``torch.optim.AdamW``) with the "small" configs of ``../shared/docs/performance-notes.md``:
    ViT 384 / 6 blocks / 224 px / patch 16, Q-Former 384 / 4 layers / 32 queries, and
    OPT (512 wide, 4 layers, 8 heads, FFN 2048, vocab 50272) or T5 (d_model 512, 4+4 layers,
    vocab 32128); batch 16, prompt "a photo of" + captions, text length <= 24 tokens.

    * transformers: ``Blip2ForConditionalGeneration`` (transformers 5), random weights saved to
      a directory; trainable: Q-Former, query tokens, language projection and the vision
      post-layernorm (= our ``ln_vision``); ViT and LLM frozen and in ``eval()``; ``<image>``
      placeholders in ``input_ids`` as transformers 5 expects. Its loss is computed from the full
      ``(B, Q + L, V)`` logits.
    * ours: the same directory loaded with ``qformer.Blip2.from_pretrained`` (same weights),
      ``set_stage(2)`` (same trainable set), stepped through ``qformer.stage2.Stage2Objective`` on
      the batch of ``Stage2TextCollator``; the same tensors go to transformers. For causal LMs we
      compute vocabulary logits only at labelled positions (a legitimate part of the speedup).

    Equal precision: ``fp32`` vs ``fp32``; ``bf16`` vs ``bf16`` = ``torch.autocast("cpu",
    torch.bfloat16)`` around the forward on both sides. At bf16, transformers keeps its fp32
    weights (what ``accelerate``'s ``mixed_precision="bf16"`` does), while ours holds the frozen ViT
    and LLM in bf16 (our default: ``llm.dtype="bfloat16"``). ``--hf-bf16-weights`` adds a
    transformers row with its frozen ViT and LLM cast to bf16 too, to separate that effect.

    Before timing, both sides compute the loss of the same batch in ``eval()`` mode; the
    difference is printed (same weights, same computation).

How
    Each side in its own subprocess; ``--warmup`` steps, then ``--rounds`` ABBA rounds of
    ``--steps`` steps; median (± half the IQR); peak RSS during the timed steps.

    python benchmarks/stage2_step.py [--llms opt t5] [--rounds 3 --steps 2 --warmup 2]
    python benchmarks/stage2_step.py --family instructblip   # instruction tuning vs InstructBlipForConditionalGeneration

``--family instructblip``: the same step for an instruction-aware model (InstructBLIP): each
row's instruction ("Question: ...? Short answer:") goes to the Q-Former beside the queries and
to the LLM before a short answer; transformers' side is ``InstructBlipForConditionalGeneration``
on the same weights (results in ``results/instruct_step.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BATCH, TEXT_LEN, PROMPT = 16, 24, "a photo of"
LR, WEIGHT_DECAY = 1e-4, 0.05


def _batch(kind: str, tokenizer, llm_config, qformer_tokenizer=None):
    """The collated text batch (our collator) and the pixels, identical on both sides. With a
    Q-Former tokenizer (InstructBLIP): per-row instructions and short answers."""
    import _models as M

    from qformer.stage2 import Stage2TextCollator

    llm_config.prompt = PROMPT
    llm_config.max_txt_len = TEXT_LEN if qformer_tokenizer is None else 2 * TEXT_LEN
    collate = Stage2TextCollator(tokenizer, llm_config, encoder_decoder=kind == "t5",
                                 qformer_tokenizer=qformer_tokenizer, qformer_max_length=32)
    if qformer_tokenizer is None:
        batch = collate(M.captions(BATCH, words=(12, 22), seed=0))
    else:
        questions = [f"Question: {q}? Short answer:" for q in M.captions(BATCH, words=(6, 12), seed=2)]
        batch = collate(M.captions(BATCH, words=(1, 3), seed=0), prompts=questions)
    return batch, M.pixels(BATCH, M.IMAGE_SIZE, seed=1)


def _autocast(precision: str):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if precision.startswith("bf16") else contextlib.nullcontext()


def build_side(side: str, precision: str, kind: str, hf_dir: Path, family: str = "blip2"):
    """(model, step(), eval_loss()) for one side."""
    import torch

    from qformer.training import TrainConfig, build_optimizer, param_groups

    if side == "ours":
        from qformer import Blip2
        from qformer.stage2 import Stage2Objective

        model = Blip2.from_pretrained(hf_dir, llm_dtype="float32" if precision == "fp32" else "bfloat16")
        if precision != "fp32":
            model.vision.model.to(torch.bfloat16)  # frozen ViT in bf16 (VisionConfig.dtype="bfloat16")
        batch, px = _batch(kind, model.llm_tokenizer, model.config.llm,
                           model.tokenizer if family == "instructblip" else None)
        model.set_stage(2)
        objective = Stage2Objective(model)
        opt = build_optimizer(model, TrainConfig(lr=LR, weight_decay=WEIGHT_DECAY))

        def forward():
            return objective(pixel_values=px, **batch).loss
    else:
        import _models as M
        import transformers
        from transformers import AutoTokenizer

        from qformer.config import LLMConfig
        from qformer.tokenizer import load_qformer_tokenizer

        cls = "InstructBlipForConditionalGeneration" if family == "instructblip" else "Blip2ForConditionalGeneration"
        model = getattr(transformers, cls).from_pretrained(str(hf_dir), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
        qtok = load_qformer_tokenizer(hf_dir / "qformer_tokenizer", add_dec=False) if family == "instructblip" else None
        batch, px = _batch(kind, tok, LLMConfig(hf_config={"model_type": kind}), qtok)
        inputs = M.hf_stage2_inputs(kind, batch, model.config.image_token_index)
        model.requires_grad_(False)
        for m in (model.qformer, model.language_projection, model.vision_model.post_layernorm):
            m.requires_grad_(True)
        model.query_tokens.requires_grad_(True)
        if precision == "bf16w":  # frozen towers held in bf16 as well
            post = model.vision_model.post_layernorm
            model.vision_model.to(torch.bfloat16)
            post.float()
            model.language_model.to(torch.bfloat16)
        opt = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR)

        def forward():
            return model(pixel_values=px, **inputs).loss

    def train_mode():
        model.train()
        if side == "hf":  # frozen towers: no dropout (ours does this in Blip2.train)
            model.vision_model.eval()
            model.language_model.eval()

    state = {"loss": None}

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(precision):
            loss = forward()
        loss.backward()
        opt.step()
        state["loss"] = loss.detach()

    def eval_loss():
        model.eval()
        with torch.no_grad(), _autocast(precision):
            loss = forward().item()
        train_mode()
        return loss

    train_mode()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, step, eval_loss, state, n_train


def worker(args) -> None:
    floor = C.worker_setup()
    model, step, eval_loss, state, n_train = build_side(args.side, args.precision, args.llm, Path(args.workdir),
                                                        args.family)
    loss0 = eval_loss()
    C.timed(step, args.warmup)
    baseline = C.rss_bytes()
    C.reset_peak_rss()

    def finish():
        return dict(C.memory_report(baseline, floor), eval_loss=loss0, loss=float(state["loss"]), trainable_params=n_train)

    C.serve({"steps": lambda n: C.timed_block(step, n), "finish": finish,
             "profile": lambda path, title: C.profile_call(step, path, title=title)})


def run(args) -> C.Section:
    import _models as M

    instruct = args.family == "instructblip"
    what = ("16 images, per-row instructions \"Question: ...? Short answer:\" read by the Q-Former and the LLM, "
            "1-3 word answers") if instruct else f"16 images, prompt \"{PROMPT}\" + captions, ≤ {TEXT_LEN} text tokens"
    sec = C.Section(
        title=("Instruction-tuning step: ours vs transformers InstructBlipForConditionalGeneration" if instruct
               else "Stage 2 training step: ours vs transformers Blip2ForConditionalGeneration"),
        intro=(
            "One step = forward (ViT, Q-Former, projection, frozen LLM, caption cross-entropy) + backward + AdamW, "
            f"same weights and batch ({what}), "
            "same trainable set. fp32 vs fp32 and bf16 autocast vs bf16 autocast (transformers keeps fp32 "
            "weights under autocast; ours holds its frozen ViT and LLM in bf16). "
            f"ABBA-alternated subprocesses, {args.warmup} warm-up steps, median of {args.rounds * args.steps} "
            "timed steps per side (± half the IQR)."
        ),
    )
    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_stage2_"))
    rows, mem_rows, loss_rows = [], [], []
    precisions = list(args.precisions)
    for kind in args.llms:
        hf_dir = base / kind
        C.log(f"stage2 {kind}: writing the transformers model")
        (M.small_hf_instructblip if instruct else M.small_hf_blip2)(hf_dir, kind)
        log = hf_dir / "workers.log"
        sides = []
        for prec in precisions:
            sides += [("hf", prec), ("ours", prec)]
            if prec == "bf16" and args.hf_bf16_weights:
                sides.insert(len(sides) - 1, ("hf", "bf16w"))
        workers = []
        try:
            for side, prec in sides:
                name = f"{'transformers' if side == 'hf' else 'ours'} {prec}"
                w = C.Worker(name, [sys.executable, __file__, "--worker", "--side", side, "--precision", prec,
                                    "--llm", kind, "--workdir", hf_dir, "--warmup", args.warmup,
                                    "--family", args.family], log=log)
                workers.append(w)
                w.call("steps", n=0)
            C.log(f"stage2 {kind}: timing {[w.name for w in workers]}")
            times = C.alternate(workers, rounds=args.rounds, steps=args.steps, quiet_wait=args.quiet_wait)
            fin = {w.name: w.call("finish") for w in workers}
            if not args.no_profile:
                for w in workers:
                    if w.name.startswith("ours") or w.name == "transformers fp32":
                        tag = w.name.replace(" ", "_")
                        path = C.PROFILE_DIR / f"{'instruct' if instruct else 'stage2'}_{kind}_{tag}.txt"
                        w.call("profile", path=str(path), title=f"stage-2 step, {kind} small, {w.name}: top ops by self CPU time")
        finally:
            for w in workers:
                w.close()
        for w in workers:
            prec = w.name.split()[-1]
            ref_name = f"transformers {'bf16' if prec == 'bf16w' else prec}"
            st, ref_st = times[w.name].stats, times[ref_name].stats
            f, ref = fin[w.name], fin[ref_name]
            step_mem, ref_mem = f["peak_rss"] - f["baseline_rss"], ref["peak_rss"] - ref["baseline_rss"]
            rows.append([kind.upper(), w.name, st.ms(), f"{1 / st.median:.2f}", C.ratio(ref_st.median, st.median),
                         times[w.name].describe()])
            mem_rows.append([kind.upper(), w.name, C.gib(f["peak_rss"]), C.ratio(f["peak_rss"], ref["peak_rss"]),
                             f"{step_mem / 2**20:.0f} MiB", C.ratio(step_mem, ref_mem)])
            sec.data.setdefault(kind, {})[w.name] = dict(median_s=st.median, iqr_s=st.iqr, n=st.n,
                                                         blocks=times[w.name].blocks, **f)
        for prec in precisions:
            a, b = fin[f"transformers {prec}"]["eval_loss"], fin[f"ours {prec}"]["eval_loss"]
            loss_rows.append([kind.upper(), prec, f"{a:.6f}", f"{b:.6f}", f"{abs(a - b):.1e}"])
    sec.add_table("Speed (vs transformers = ours steps/s ÷ transformers steps/s at the same precision):",
                  ["LLM", "side", "ms/step median (±IQR/2)", "steps/s", "vs transformers", "blocks"], rows)
    sec.add_table("Memory (peak RSS during the timed steps; step memory = peak minus RSS after warm-up):",
                  ["LLM", "side", "peak RSS", "vs transformers", "step memory", "vs transformers"], mem_rows)
    sec.add_table("Same computation: eval-mode loss of the same batch:",
                  ["LLM", "precision", "transformers", "ours", "|diff|"], loss_rows)
    for kind in args.llms:
        d = sec.data[kind]
        for prec in precisions:
            r = d[f"transformers {prec}"]["median_s"] / d[f"ours {prec}"]["median_s"]
            label = "instruction tuning" if instruct else "stage 2"
            sec.goal(f"{label} ({kind.upper()}, {prec}) ≥ 1.5x transformers steps/s", f"{r:.2f}x", r >= 1.5)
            m = d[f"ours {prec}"]["peak_rss"] / d[f"transformers {prec}"]["peak_rss"]
            sec.goal(f"{label} ({kind.upper()}, {prec}) peak RSS ≤ 0.8x transformers", f"{m:.2f}x", m <= 0.8)
    return sec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--side", choices=["hf", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--llm", default="opt", help=argparse.SUPPRESS)
    p.add_argument("--llms", nargs="+", default=["opt", "t5"], choices=["opt", "t5"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--family", default="blip2", choices=["blip2", "instructblip"],
                   help="BLIP-2 stage 2 (default) or InstructBLIP instruction tuning")
    p.add_argument("--hf-bf16-weights", action="store_true",
                   help="also time transformers with its frozen ViT and LLM cast to bf16 (under autocast)")
    C.common_arguments(p, rounds=3, steps=2, warmup=2)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    return C.run_and_save(run, args, "instruct_step" if args.family == "instructblip" else "stage2_step")


if __name__ == "__main__":
    main()
