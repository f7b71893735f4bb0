#!/usr/bin/env python
"""Does ``torch.compile`` speed up our stage-1 step on this CPU? Eager vs compiled, same process.

What is compared
    The stage-1 step of ``stage1_step.py`` (ITC + ITM + ITG forward under the precision's autocast,
    backward, AdamW; a freshly initialised model of that config, batch and captions fixed) run
    eager, then with ``torch.compile`` applied in place in one of two ways:

    * ``whole``:   ``model.qformer.compile()`` and ``model.vision.compile()`` (one graph per
                   module and call pattern);
    * ``regions``: each tower block and Q-Former layer compiled on its own (``gpu.py``'s
                   ``compile_regions``: one compiled graph serves every identical block).

    Reported per precision and mode: the eager and compiled step times (median of ``--steps``),
    their ratio, the compile cost (the first compiled step's time), and the losses of one
    ``eval()`` pass eager and compiled on the same weights and ITM negatives (their difference
    says whether the compiled step computes the same thing). Not part of ``run_all.py``:
    compiling takes minutes here.

    python benchmarks/compile_step.py [--config small] [--precisions bf16 fp32] [--modes whole regions]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def compile_model(model, mode: str, backend: str) -> int:
    """``torch.compile`` ``model`` in place, ``whole`` (the Q-Former and the tower) or per ``regions``;
    returns how many modules were compiled."""
    from gpu import compile_regions

    if mode == "regions":
        return compile_regions(model, backend)
    model.qformer.compile(backend=backend)
    model.vision.compile(backend=backend)
    return 2


def measure(config: str, precision: str, mode: str, *, backend: str, steps: int, warmup: int) -> dict:
    import torch

    import stage1_step as S

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model, step, _, _ = S.build_ours_fresh(config, precision, Path(tmp))
        C.timed(step, warmup)
        eager = C.timed(step, steps)
        regions = compile_model(model, mode, backend)
        (compile_s,) = C.timed(step, 1)  # the first compiled step pays for the compilation
        C.timed(step, warmup)
        compiled = C.timed(step, steps)
        torch._dynamo.reset()
    return {"config": config, "precision": precision, "mode": mode, "backend": backend, "regions": regions,
            "eager_s": statistics.median(eager), "compiled_s": statistics.median(compiled),
            "speedup": statistics.median(eager) / statistics.median(compiled), "compile_s": compile_s}


def parity(config: str, precision: str, mode: str, *, backend: str) -> float:
    """max |loss_eager - loss_compiled| of one eval pass on the same fresh weights and negatives."""
    import torch

    import stage1_step as S

    with tempfile.TemporaryDirectory() as tmp:
        model, _, _, reference = S.build_ours_fresh(config, precision, Path(tmp))
        torch.manual_seed(0)
        eager = reference(None)
        compile_model(model, mode, backend)
        torch.manual_seed(0)
        compiled = reference(None)
        torch._dynamo.reset()
    return max(abs(eager[k] - compiled[k]) for k in eager)


def main(argv: list[str] | None = None) -> C.Section:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", choices=["tiny", "small"])
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--modes", nargs="+", default=["whole", "regions"], choices=["whole", "regions"])
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: no code generation)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    C.worker_setup()
    rows = []
    for precision in args.precisions:
        for mode in args.modes:
            r = measure(args.config, precision, mode, backend=args.backend, steps=args.steps, warmup=args.warmup)
            r["max_loss_diff"] = parity(args.config, precision, mode, backend=args.backend)
            rows.append(r)
            print(f"{args.config} {precision} {mode:7s}: eager {r['eager_s'] * 1e3:.0f} ms, compiled "
                  f"{r['compiled_s'] * 1e3:.0f} ms ({r['speedup']:.2f}x), compile {r['compile_s']:.0f} s, "
                  f"max |loss diff| {r['max_loss_diff']:.2e}", flush=True)
    data = {"machine": C.cpu_model(), "threads": C.THREADS, "rows": rows}
    C.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (C.RESULTS_DIR / "compile_step.json").write_text(json.dumps(data, indent=2) + "\n")
    return C.Section(title="torch.compile of the stage-1 step", data=data)


if __name__ == "__main__":
    main()
