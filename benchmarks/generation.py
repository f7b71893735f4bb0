#!/usr/bin/env python
"""Generation throughput: ``qformer.Blip2.generate`` vs transformers' ``Blip2ForConditionalGeneration.generate``.

What is compared
    Captioning a batch of 8 images with the "small" OPT model of
    ``../shared/docs/performance-notes.md`` (ViT 384 / 6 blocks / 224 px, Q-Former 384 / 4
    layers / 32 queries, OPT 512 wide / 4 layers / vocab 50272), prompt "a photo of", exactly
    20 new tokens (``max_new_tokens = min_new_tokens = 20``), greedy and beam search with 5
    beams, fp32 on both sides, same weights (transformers' directory loaded into ours).

    * transformers: ``generate(pixel_values, input_ids=[<image> x 32, prompt], ...)``;
    * ours: ``Blip2.generate(pixels, "a photo of", ...)`` (vision tower, Q-Former, soft prompts,
      then the LLM's ``generate`` on ``inputs_embeds``; its text is decoded too).

    Each call covers the whole pipeline (vision tower included). The generated token ids of
    both sides are compared and must be identical (asserted, and reported).

How
    Each side in its own subprocess; ``--warmup`` calls, then ``--rounds`` ABBA rounds of
    ``--steps`` calls per mode; median (± half the IQR), images/s, peak RSS.

    python benchmarks/generation.py [--rounds 3 --steps 2 --warmup 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BATCH, NEW_TOKENS, PROMPT = 8, 20, "a photo of"
MODES = {"greedy": 1, "beam5": 5}


def build_side(side: str, hf_dir: Path):
    """-> generate(mode) returning the new token ids (B, 20) as a tensor."""
    import torch

    import _models as M

    px = M.pixels(BATCH, M.IMAGE_SIZE, seed=3)
    if side == "ours":
        from qformer import Blip2

        model = Blip2.from_pretrained(hf_dir, llm_dtype="float32").eval()
        captured = []
        inner = model.llm.generate

        def recording_generate(*a, **k):  # keep the ids that Blip2.generate decodes
            out = inner(*a, **k)
            captured.append(out)
            return out

        model.llm.generate = recording_generate

        def generate(mode):
            captured.clear()
            model.generate(px, PROMPT, num_beams=MODES[mode], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
            return captured[-1]
    else:
        from transformers import AutoTokenizer, Blip2ForConditionalGeneration

        model = Blip2ForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
        ids = tok([PROMPT] * BATCH, return_tensors="pt").input_ids
        ids = torch.cat([torch.full((BATCH, M.NUM_QUERY), model.config.image_token_index), ids], 1)
        eos = tok("\n", add_special_tokens=False).input_ids[0]  # BLIP-2's OPT end of caption, as ours

        @torch.no_grad()
        def generate(mode):
            out = model.generate(pixel_values=px, input_ids=ids, attention_mask=torch.ones_like(ids),
                                 num_beams=MODES[mode], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
            return out[:, ids.shape[1]:]
    return generate


def worker(args) -> None:
    floor = C.worker_setup()
    generate = build_side(args.side, Path(args.workdir))
    tokens = {}
    for mode in MODES:
        tokens[mode] = generate(mode).tolist()
        C.timed(lambda: generate(mode), max(0, args.warmup - 1))
    baseline = C.rss_bytes()
    C.reset_peak_rss()
    C.serve({
        "gen": lambda n, mode: C.timed_block(lambda: generate(mode), n),
        "tokens": lambda: tokens,
        "finish": lambda: C.memory_report(baseline, floor),
        "profile": lambda path, title, mode: C.profile_call(lambda: generate(mode), path, title=title),
    })


def run(args) -> C.Section:
    import _models as M

    sec = C.Section(
        title="Generation: ours vs transformers Blip2ForConditionalGeneration.generate",
        intro=(
            f"Batch of {BATCH} images, OPT small, prompt \"{PROMPT}\", exactly {NEW_TOKENS} new tokens, fp32, "
            "same weights; whole pipeline (vision tower included). "
            f"ABBA-alternated subprocesses, median of {args.rounds * args.steps} calls per side and mode."
        ),
    )
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_gen_"))
    hf_dir = workdir / "opt"
    C.log("generation: writing the transformers model")
    M.small_hf_blip2(hf_dir, "opt")
    log = hf_dir / "workers.log"
    workers = []
    try:
        for side, name in (("hf", "transformers"), ("ours", "ours")):
            w = C.Worker(name, [sys.executable, __file__, "--worker", "--side", side, "--workdir", hf_dir,
                                "--warmup", args.warmup], log=log)
            workers.append(w)
            w.call("finish")  # ready
        tokens = {w.name: w.call("tokens") for w in workers}
        times = {}
        for mode in MODES:
            C.log(f"generation: timing {mode}")
            times[mode] = C.alternate(workers, rounds=args.rounds, steps=args.steps, cmd="gen", mode=mode,
                                       quiet_wait=args.quiet_wait)
        fin = {w.name: w.call("finish") for w in workers}
        if not args.no_profile:
            for w in workers:
                for mode in MODES:
                    path = C.PROFILE_DIR / f"generation_{mode}_{w.name}.txt"
                    w.call("profile", path=str(path), mode=mode,
                           title=f"generate, {mode}, batch {BATCH}, {NEW_TOKENS} tokens, {w.name}: top ops by self CPU time")
    finally:
        for w in workers:
            w.close()
    rows = []
    for mode in MODES:
        same = tokens["ours"][mode] == tokens["transformers"][mode]
        ref = times[mode]["transformers"].stats
        for name in ("transformers", "ours"):
            st = times[mode][name].stats
            rows.append([mode, name, st.ms(), f"{BATCH / st.median:.1f}", C.ratio(ref.median, st.median),
                         "yes" if same else "**NO**", times[mode][name].describe()])
            sec.data.setdefault(mode, {})[name] = dict(median_s=st.median, iqr_s=st.iqr, n=st.n,
                                                       blocks=times[mode][name].blocks)
        sec.data[mode]["identical_tokens"] = same
        r = ref.median / times[mode]["ours"].stats.median
        sec.goal(f"generation ({mode}) ≥ 1.2x transformers with identical tokens",
                 f"{r:.2f}x, tokens {'identical' if same else 'DIFFER'}", bool(r >= 1.2 and same))
    sec.add_table("Speed (vs transformers = its time ÷ ours):",
                  ["mode", "side", "ms per batch (±IQR/2)", "images/s", "vs transformers", "identical tokens", "blocks"],
                  rows)
    ref_peak = fin["transformers"]["peak_rss"]
    sec.add_table("Memory (peak RSS during the timed calls, both modes):", ["side", "peak RSS", "vs transformers"],
                  [[n, C.gib(fin[n]["peak_rss"]), C.ratio(fin[n]["peak_rss"], ref_peak)] for n in ("transformers", "ours")])
    m = fin["ours"]["peak_rss"] / ref_peak
    sec.goal("generation peak RSS ≤ 0.8x transformers", f"{m:.2f}x", m <= 0.8)
    sec.data["memory"] = fin
    return sec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--side", choices=["hf", "ours"], help=argparse.SUPPRESS)
    C.common_arguments(p, rounds=3, steps=2, warmup=1)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    sec = C.run_and_save(run, args, "generation")
    differ = [mode for mode in MODES if not sec.data[mode]["identical_tokens"]]
    if differ:
        raise SystemExit(f"generated tokens differ between ours and transformers: {differ}")
    return sec


if __name__ == "__main__":
    main()
