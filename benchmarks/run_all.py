#!/usr/bin/env python
"""Run every benchmark and write ``benchmarks/README.md``.

    python benchmarks/run_all.py                  # the whole suite, ~6 minutes on a quiet 2-core machine
    python benchmarks/run_all.py --quick          # fewer timed steps (~4 minutes), noisier
    python benchmarks/run_all.py --only stage1 generation
    python benchmarks/run_all.py --readme-only    # rebuild the README from benchmarks/results/*.json

Each benchmark runs as its own process (``python benchmarks/<name>.py ...``), writes its
findings to ``benchmarks/results/<name>.json`` and its profiles to ``benchmarks/profiles/``;
this script then assembles the README: the machine, every goal with its measured value, the
hand-written ``analysis.md`` (why a missed goal is missed, with the measurements behind it),
one table per benchmark (ratios and absolute numbers), and pointers to the profiles.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BENCHMARKS = {
    # name: (script, normal args, quick args)
    "stage1": ("stage1_step.py", ["--rounds", "3", "--steps", "2", "--warmup", "3"],
               ["--rounds", "2", "--steps", "2", "--warmup", "2"]),
    "stage2": ("stage2_step.py", ["--rounds", "3", "--steps", "2", "--warmup", "2"],
               ["--rounds", "2", "--steps", "1", "--warmup", "1"]),
    "generation": ("generation.py", ["--rounds", "3", "--steps", "2", "--warmup", "1"],
                   ["--rounds", "2", "--steps", "1", "--warmup", "1"]),
    "retrieval": ("retrieval_scaling.py", ["--repeats", "2"], ["--repeats", "1"]),
    "matmul": ("matmul_efficiency.py", ["--rounds", "2", "--steps", "2", "--warmup", "2"],
               ["--rounds", "2", "--steps", "1", "--warmup", "1"]),
    "vision_finetune": ("vision_finetune_memory.py", [], ["--skip-estimate"]),
    "instruct": ("stage2_step.py", ["--family", "instructblip", "--llms", "opt", "t5", "--precisions", "bf16",
                                    "--rounds", "3", "--steps", "2", "--warmup", "2"],
                 ["--family", "instructblip", "--llms", "opt", "--precisions", "bf16", "--rounds", "2", "--steps", "1",
                  "--warmup", "1"]),
    "feature_cache": ("feature_cache.py", ["--rounds", "3", "--steps", "2", "--warmup", "2"],
                      ["--rounds", "2", "--steps", "1", "--warmup", "1", "--precisions", "bf16"]),
    "search": ("search_index.py", ["--images", "10000", "--queries", "20", "--batch-size", "256"],
               ["--images", "2000", "--queries", "10", "--batch-size", "256"]),
    "capfilt": ("capfilt_throughput.py", ["--images", "64", "--batch-size", "16"],
                ["--images", "16", "--batch-size", "8", "--repeats", "1"]),
}
RESULT_NAMES = {"stage1": "stage1_step", "stage2": "stage2_step", "generation": "generation",
                "retrieval": "retrieval_scaling", "matmul": "matmul_efficiency",
                "vision_finetune": "vision_finetune_memory", "instruct": "instruct_step", "search": "search_index",
                "feature_cache": "feature_cache", "gpu": "gpu",
                "capfilt": "capfilt_throughput"}

GPU_PENDING = """\
## GPU: BLIP-2 sizes on one GPU (`benchmarks/gpu.py`)

Ready, figures pending a GPU (none is available to this project yet). `python benchmarks/gpu.py` on one
H100/H200 runs, in under 8 minutes, EVA ViT-g/14 + the BERT-base Q-Former with OPT-2.7B and FlanT5-XL
shapes (random weights built on the device, the cards' batch sizes, bf16): samples/s and
`torch.cuda.max_memory_allocated` of stage 1 (eager, `torch.compile`d, from cached features), stage 2
(ours and transformers' `Blip2ForConditionalGeneration` on the same weight tensors), beam-5 generation
(both), and the caption fine-tuning step with and without the tower's activation checkpointing; each
part has a time budget and an out-of-memory part is reported, not fatal. It writes `results/gpu.json`
(then embedded here) and `results/gpu.md`. Goal: stage 1 with EVA ViT-g ≥ 150 samples/s, compiled.
The same code runs on the CPU with tiny sizes (`--tiny`, tested in `tests/test_benchmarks.py`)."""

HOW_TO_RUN = """\
## How to run

```bash
. .venv/bin/activate
python benchmarks/run_all.py            # everything, then rewrites this README (~6 min on a quiet machine)
python benchmarks/run_all.py --quick    # fewer timed steps
python benchmarks/stage1_step.py --configs small --rounds 5 --steps 2   # one benchmark, more samples
python benchmarks/stage2_step.py --llms opt --hf-bf16-weights
python benchmarks/stage2_step.py --family instructblip --precisions bf16   # instruction tuning vs InstructBlip
python benchmarks/generation.py
python benchmarks/retrieval_scaling.py --sizes 100 200 400 800 1600 --k 16
python benchmarks/matmul_efficiency.py
python benchmarks/vision_finetune_memory.py   # fine-tuning with the vision tower unfrozen: memory
python benchmarks/search_index.py --images 10000 --workdir /tmp/search-bench   # keeps the 10,000 PNGs for reruns
python benchmarks/feature_cache.py            # stage 1 from cached tower features vs the live tower (+ ViT-g FLOPs)
python benchmarks/gpu.py                      # on one GPU (H100/H200): BLIP-2 sizes, < 8 min (its section above)
python benchmarks/gpu.py --tiny               # the same code on this CPU with tiny sizes (seconds)
python benchmarks/capfilt_throughput.py --images 64   # CapFilt images/s (BLIP and BLIP-2 modes), CPU model recorded
```

The LAVIS side needs the oracle venv (`.venv-lavis`, or `QFORMER_LAVIS_PYTHON=/path/to/python`) and
`../shared/tools/lavis-oracle/lavis_oracle.py` (`QFORMER_LAVIS_ORACLE_DIR` to move it). Every comparison
runs each side in its own subprocess with `torch.set_num_threads(2)`, the same weights and the same
inputs, warm-up steps first, then timed blocks alternated A B ... B A; tables give the median (± half the
interquartile range). Peak RSS is the kernel's high-water mark of each side's process, reset after
warm-up (`/proc/self/clear_refs`), so it covers model, optimizer state and the steps' activations.

**Shared machine.** Other engineers' jobs may run on the same 2 cores. With 2 OpenMP threads, one foreign
busy thread makes every parallel region wait for a descheduled thread and a step gets 2-10x slower, and
not uniformly: a step made of more, smaller, parallel regions loses more. Each timed block therefore
records the CPU time other processes used meanwhile; the parent waits (a bounded time) for quiet before
each block, and the statistics use the quiet blocks ("blocks: q/n quiet") when at least half are quiet.
Rerun (or raise `--rounds`) when a table says most blocks were contended. `BENCH_OMP_WAIT_POLICY=PASSIVE`
makes idle OpenMP threads sleep at once: steadier under contention, but every parallel region then pays a
thread wake-up, which slows a step of many small ops (ours) more than one of fewer, larger ops (LAVIS):
the tables use libgomp's default, what a user's run gets.
"""


def run_benchmark(name: str, quick: bool, quiet_wait: float, extra: list[str]) -> tuple[int, float]:
    script, normal, fast = BENCHMARKS[name]
    argv = [sys.executable, str(C.BENCH_DIR / script)] + (fast if quick else normal) + extra
    argv += ["--quiet-wait", str(quiet_wait)]
    C.log(f"run_all: {' '.join(argv[1:])}")
    t0 = time.perf_counter()
    rc = subprocess.call(argv, cwd=str(C.REPO))
    return rc, time.perf_counter() - t0


def profile_summary(path: Path, top: int = 6) -> str:
    """The first rows (op, self CPU %) of a profile written by ``_common.write_profile``."""
    lines = path.read_text().splitlines()
    rows = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 7 and parts[1].endswith("%") and not line.startswith("Name"):
            rows.append(f"{parts[0]} {parts[1]}")
        if len(rows) >= top:
            break
    total = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Self CPU time total")), "?")
    return f"total {total}: " + ", ".join(rows)


def write_readme(info: dict, durations: dict[str, float], failures: dict[str, int]) -> Path:
    sections = {}
    for key, name in RESULT_NAMES.items():
        path = C.RESULTS_DIR / f"{name}.json"
        if path.exists():
            sections[key] = C.Section.load(path)
    parts = [
        "# Benchmarks: qformer vs LAVIS 1.0.2 and transformers",
        "",
        "Generated by `python benchmarks/run_all.py` (do not edit by hand: rerun it). Ratios are measured side "
        "by side in one run; absolute numbers depend on this shared machine's load.",
        "",
        "## Machine",
        "",
        *C.machine_lines(info),
    ]
    if durations:
        parts.append("- Wall time of this run: " + ", ".join(f"{k} {v:.0f} s" for k, v in durations.items())
                     + f" (total {sum(durations.values()):.0f} s)")
    if failures:
        parts.append("- **Failed** in this run (tables below may be from an earlier run): "
                     + ", ".join(f"{k} (exit {v})" for k, v in failures.items()))
    parts.append("")
    goals = [(g, m, ok) for s in sections.values() for g, m, ok in s.goals]
    if goals:
        parts += ["## Goals", "",
                  C.md_table(["goal", "measured", "met?"],
                             [(g, m, {True: "**met**", False: "**missed**", None: "n/a"}[ok]) for g, m, ok in goals]),
                  ""]
    analysis = C.BENCH_DIR / "analysis.md"  # hand-written: why each missed goal is missed
    if analysis.exists():
        parts += [analysis.read_text().rstrip(), ""]
    for key in RESULT_NAMES:
        if key in sections:
            parts.append(sections[key].markdown(level=2))
    if "gpu" not in sections:
        parts += [GPU_PENDING, ""]
    profiles = sorted(C.PROFILE_DIR.glob("*.txt"))
    if profiles:
        parts += ["## Profiles", "",
                  "`torch.profiler` (CPU), one step each, top operators by self CPU time, in `benchmarks/profiles/`:", ""]
        for p in profiles:
            parts.append(f"- [`{p.name}`](profiles/{p.name}): {profile_summary(p)}")
        parts.append("")
    parts.append(HOW_TO_RUN)
    readme = C.BENCH_DIR / "README.md"
    readme.write_text("\n".join(parts))
    return readme


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    p.add_argument("--quick", action="store_true", help="fewer timed steps per benchmark")
    p.add_argument("--quiet-wait", type=float, default=10.0,
                   help="seconds to wait for other processes to go quiet before each timed block (default %(default)s)")
    p.add_argument("--readme-only", action="store_true", help="only rebuild README.md from benchmarks/results/")
    args = p.parse_args(argv)
    run_file = C.RESULTS_DIR / "run.json"  # the machine and durations of the last full run
    durations: dict[str, float] = {}
    failures: dict[str, int] = {}
    if args.readme_only and run_file.exists():
        last = json.loads(run_file.read_text())
        info, durations, failures = last["info"], last["durations"], last["failures"]
    else:
        info = C.machine_info()
    if not args.readme_only:
        if run_file.exists() and set(args.only) != set(BENCHMARKS):  # a partial run: keep the others' record
            last = json.loads(run_file.read_text())
            durations = {k: v for k, v in last["durations"].items() if k not in args.only}
            failures = {k: v for k, v in last["failures"].items() if k not in args.only}
        for name in args.only:
            rc, dt = run_benchmark(name, args.quick, args.quiet_wait, [])
            durations[name] = dt
            if rc:
                failures[name] = rc
                C.log(f"run_all: {name} failed with exit code {rc}")
        C.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(dict(info=info, durations=durations, failures=failures), indent=1))
    readme = write_readme(info, durations, failures)
    C.log(f"run_all: wrote {readme} ({sum(durations.values()):.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
