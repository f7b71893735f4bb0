#!/usr/bin/env python
"""How much of this machine's matmul throughput our stage-1 training step reaches.

What is measured (one process, ``torch.set_num_threads(2)``)
    1. GEMM throughput (GFLOP/s) of the precision a step uses -- fp32 and bf16 -- on 2048^3 and
       on the shapes of the "small" model's own linear layers (``F.linear``: ViT MLP and QKV over
       16 x 197 tokens, Q-Former FFN over the query pass and the 3B ITM pairs, and a
       weight-gradient-shaped product), plus fp32 routed to oneDNN
       (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``, see performance-notes.md) with its
       error against float64. The same 2048^3 GEMM is also run in the LAVIS venv's torch build.
    2. The FLOPs of one real stage-1 step (forward + backward; the optimizer's elementwise work is
       not counted) on the "small" config, with ``torch.utils.flop_counter.FlopCounterMode`` (a
       formula for CPU flash attention, which it does not know, is registered first), split by
       module, and cross-checked with the analytic accounting of performance-notes.md: a trainable
       module costs 3x its forward, the frozen ViT (no gradient) 1x; LAVIS's step is accounted the
       same way (it recomputes the image K/V for the 3B ITM pairs and computes LM logits at every
       text position).
    3. The step's median time (fp32, and bf16 autocast with the frozen ViT in bf16, alternated
       in-process) -> achieved GFLOP/s -> fraction of the measured GEMM peak of its precision.

    python benchmarks/matmul_efficiency.py [--steps 4 --warmup 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

GEMM_CODE = r"""
import json, statistics, sys, time, torch
import torch.nn.functional as F
torch.set_num_threads(2)

def gflops(m, k, n, dtype, reps, onednn=False, wgrad=False):
    prev = None
    if onednn:
        prev = torch.backends.mkldnn.matmul.fp32_precision
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        g = torch.Generator().manual_seed(0)
        if wgrad:  # dW = dY^T X: (n, m) x (m, k), both operands transposed views as autograd makes them
            a = torch.randn(m, n, generator=g).to(dtype).t(); b = torch.randn(m, k, generator=g).to(dtype)
            f = lambda: a @ b
        else:
            x = torch.randn(m, k, generator=g).to(dtype); w = torch.randn(n, k, generator=g).to(dtype)
            f = lambda: F.linear(x, w)
        for _ in range(2):
            f()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
        return 2 * m * k * n / statistics.median(ts) / 1e9
    finally:
        if prev is not None:
            torch.backends.mkldnn.matmul.fp32_precision = prev

def onednn_error():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(512, 512, generator=g); b = torch.randn(512, 512, generator=g)
    exact = a.double() @ b.double()
    prev = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        got = a @ b
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = prev
    plain = a @ b
    rel = lambda x: ((x.double() - exact).abs().max() / exact.abs().max()).item()
    return {"onednn": rel(got), "default": rel(plain), "bf16_inputs": rel(a.bfloat16().float() @ b.bfloat16().float())}

shapes = json.loads(sys.argv[1]); reps = int(sys.argv[2]); full = sys.argv[3] == "1"
out = {"torch": torch.__version__, "rows": []}
for name, (m, k, n, wgrad) in shapes.items():
    row = {"shape": name, "fp32": gflops(m, k, n, torch.float32, reps, wgrad=wgrad),
           "bf16": gflops(m, k, n, torch.bfloat16, reps, wgrad=wgrad)}
    if full and hasattr(torch.backends.mkldnn, "matmul"):
        row["fp32_onednn"] = gflops(m, k, n, torch.float32, reps, onednn=True, wgrad=wgrad)
    out["rows"].append(row)
    if not full:
        break
if full and hasattr(torch.backends.mkldnn, "matmul"):
    out["onednn_error"] = onednn_error()
print(json.dumps(out))
"""

B, P, CV, FV = 16, 197, 384, 1536  # batch, image tokens, ViT width, ViT MLP
D, FF, Q, T, V, E, LAYERS, XLAYERS, DEPTH = 384, 1536, 32, 32, 1000, 128, 4, 2, 6
SHAPES = {
    "2048^3": (2048, 2048, 2048, False),
    "ViT MLP fc1 (3152x384 -> 1536)": (B * P, CV, FV, False),
    "ViT QKV (3152x384 -> 1152)": (B * P, CV, 3 * CV, False),
    "Q-Former FFN, query pass (512x384 -> 1536)": (B * Q, D, FF, False),
    "Q-Former FFN, ITM pairs (3072x384 -> 1536)": (3 * B * (Q + T), D, FF, False),
    "Q-Former dense (512x384 -> 384)": (B * Q, D, D, False),
    "weight grad (1536x3072 @ 3072x384)": (3 * B * (Q + T), D, FF, True),
}


def gemm_table(python: str, reps: int, full: bool) -> dict:
    import json

    out = subprocess.run([python, "-c", GEMM_CODE, json.dumps(SHAPES), str(reps), "1" if full else "0"],
                         capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(C.THREADS)))
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- FLOP accounting
def analytic_flops(n_targets: int, *, lavis: bool = False) -> dict[str, float]:
    """Forward FLOPs of each part of one stage-1 step ("small"), and the step total with
    trainable parts x3 and the frozen ViT x1 (matmuls and attention only)."""
    lin = lambda n, i, o: 2.0 * n * i * o  # noqa: E731
    att = lambda b, nq, nk: 4.0 * b * nq * nk * D  # noqa: E731  QK^T + PV over all heads
    vit = lin(B * 196, 3 * 16 * 16, CV) + DEPTH * (lin(B * P, CV, 4 * CV) + lin(B * P, CV, 2 * FV) + 4.0 * B * P * P * CV)
    kv = XLAYERS * lin(B * P, CV, 2 * D)  # image K/V of the cross-attention layers

    def layer_stack(b, n_q, n_t, n_keys_extra=0, cross=True, last_rows=None):
        """``last_rows``: the last layer computes only that many leading rows (every position
        is still a key there): ours for the ITM pass (the queries) and the text pass ([CLS])."""
        n = n_q + n_t
        r = n if last_rows is None else last_rows
        f = (LAYERS - 1) * (lin(b * n, D, 4 * D) + att(b, n, n + n_keys_extra) + lin(b * n, D, 2 * FF))
        f += lin(b * n, D, 2 * D) + lin(b * r, D, 2 * D) + att(b, r, n + n_keys_extra) + lin(b * r, D, 2 * FF)
        if cross and n_q:  # layers 0 and 2 (every 2nd): all query rows (last_rows keeps the queries)
            f += XLAYERS * (lin(b * n_q, D, 2 * D) + att(b, n_q, P))
        return f

    parts = {
        "ViT forward (frozen, x1)": vit,
        "image cross-attention K/V": kv,
        "query pass (ITC image side)": layer_stack(B, Q, 0),
        "text pass (ITC text side)": layer_stack(B, 0, T, cross=False, last_rows=None if lavis else 1),
        "ITM pass over 3B pairs": layer_stack(3 * B, Q, T, last_rows=None if lavis else Q) + (3 * kv if lavis else 0.0),
        # decoder: text rows only (query K/V reused), keys = queries + text
        "ITG decoder": LAYERS * (lin(B * T, D, 4 * D) + 4.0 * B * T * (Q + T) * D + lin(B * T, D, 2 * FF)),
        "ITG LM head": lin(B * T if lavis else n_targets, D, D + V),
        "heads + ITC similarities": lin(B * Q, D, E) + lin(B, D, E) + lin(3 * B * Q, D, 2) + 2 * 2.0 * B * B * Q * E,
    }
    trainable = sum(v for k, v in parts.items() if not k.startswith("ViT"))
    parts["step total (ViT x1 + trainable x3)"] = vit + 3 * trainable
    return parts


def count_flops(forward_backward) -> tuple[float, dict[str, float]]:
    """FlopCounterMode over one forward + backward: (total, per top-level module)."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    cpu_flash = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None and cpu_flash not in fc.flop_registry:
        @fc.register_flop_formula(cpu_flash)
        def _fwd(query, key, value, *args, out_shape=None, **kwargs):
            return fc.sdpa_flop_count(query, key, value)

        @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
        def _bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs):
            return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    mode = fc.FlopCounterMode(display=False, depth=3)
    with mode:
        forward_backward()
    per_module = {k: float(sum(v.values())) for k, v in mode.get_flop_counts().items()}
    return float(mode.get_total_flops()), per_module


def _gemm_peak(dtype, reps: int, n: int = 2048) -> float:
    """GFLOP/s of an n^3 ``F.linear`` in this process (median of ``reps``, after one warm-up)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x, w = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    F.linear(x, w)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        F.linear(x, w)
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(ts) / 1e9


# ----------------------------------------------------------------------------- driver
def run(args) -> C.Section:
    import torch

    import stage1_step as S1

    C.worker_setup()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_matmul_"))
    C.log("matmul: GEMM throughput (ours and the LAVIS venv's torch)")
    C.wait_for_quiet(args.quiet_wait)
    gemm = gemm_table(sys.executable, args.reps, full=True)
    lavis_py = C.lavis_python()
    gemm_lavis = gemm_table(str(lavis_py), args.reps, full=False) if lavis_py else None

    C.log("matmul: building the small model (fp32 and bf16) and counting FLOPs")
    sides = {}
    for prec in ("fp32", "bf16"):
        model, step, state, _ = S1.build_ours_fresh("small", prec, workdir / prec)
        sides[prec] = (model, step, state)
    model, step, state = sides["fp32"]
    step()
    total, per_module = count_flops(state["forward_backward"])
    model.zero_grad(set_to_none=True)
    n_targets = state["n_targets"]
    ours = analytic_flops(n_targets)
    lavis = analytic_flops(n_targets, lavis=True)
    analytic_total = ours["step total (ViT x1 + trainable x3)"]

    C.log("matmul: timing the steps")
    for prec in sides:
        C.timed(sides[prec][1], args.warmup)
    timing = {prec: C.Timing() for prec in sides}
    # The peak is re-measured in this process right before every timed block (a one-off
    # measurement taken in a noisy second would skew every fraction): median over blocks.
    peaks: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for r in range(args.rounds):
        for prec in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
            C.wait_for_quiet(args.quiet_wait)
            peaks[prec].append(_gemm_peak(torch.float32 if prec == "fp32" else torch.bfloat16, args.reps))
            timing[prec].blocks.append(C.timed_block(sides[prec][1], args.steps))

    sec = C.Section(
        title="Matmul efficiency: fraction of the measured GEMM peak that a stage-1 step reaches",
        intro=("Our stage-1 step on the \"small\" config (batch 16), FLOPs of forward + backward, "
               f"median of {args.rounds * args.steps} steps per precision; GEMM peak = 2048^3 `F.linear` in the same "
               f"process, {args.reps} products right before each timed block, median over the blocks."),
    )
    rows = []
    for row in gemm["rows"]:
        rows.append([row["shape"], f"{row['fp32']:.0f}", f"{row.get('fp32_onednn', float('nan')):.0f}", f"{row['bf16']:.0f}"])
    if gemm_lavis:
        lr = gemm_lavis["rows"][0]
        rows.append([f"2048^3, LAVIS venv (torch {gemm_lavis['torch']})", f"{lr['fp32']:.0f}", "", f"{lr['bf16']:.0f}"])
    sec.add_table("GEMM throughput, GFLOP/s (2 threads):", ["shape (F.linear: tokens x in -> out)", "fp32 (default)",
                                                          "fp32 via oneDNN", "bf16"], rows)
    err = gemm.get("onednn_error")
    if err:
        sec.notes.append(f"fp32 via oneDNN (`torch.backends.mkldnn.matmul.fp32_precision = \"bf16\"`): max relative "
                         f"error vs float64 {err['onednn']:.1e} (default fp32 {err['default']:.1e}; rounding the inputs "
                         f"to bf16 would give {err['bf16_inputs']:.1e}) -- i.e. it stays fp32-accurate on this CPU.")

    acct_rows = [[k, f"{v / 1e9:.1f}", f"{lavis[k] / 1e9:.1f}"] for k, v in ours.items()]
    acct_rows.append(["FlopCounterMode, one real step (forward + backward)", f"{total / 1e9:.1f}", ""])
    sec.add_table("FLOPs per step, GFLOP (analytic: forward of each part, then the step total):",
                  ["part", "ours", "LAVIS (same accounting)"], acct_rows)
    vision = per_module.get("Stage1Objective.model.vision", float("nan"))
    sec.notes.append(f"FlopCounterMode attributes {vision / 1e9:.1f} GFLOP to the frozen vision tower (analytic "
                     f"{ours['ViT forward (frozen, x1)'] / 1e9:.1f}); the rest is the Q-Former's forward and backward.")

    peak = {prec: statistics.median(v) for prec, v in peaks.items()}
    eff_rows = []
    for prec in ("fp32", "bf16"):
        st = timing[prec].stats
        achieved = total / st.median / 1e9
        frac = achieved / peak[prec]
        eff_rows.append([prec, st.ms(), f"{total / 1e9:.1f}", f"{achieved:.0f}", f"{peak[prec]:.0f}", f"{100 * frac:.0f}%",
                         timing[prec].describe()])
        sec.goal(f"stage-1 step ({prec}) at ≥ 60% of the {prec} GEMM peak", f"{100 * frac:.0f}%", frac >= 0.6)
        sec.data[prec] = dict(median_s=st.median, achieved_gflops=achieved, peak_gflops=peak[prec], fraction=frac,
                              blocks=timing[prec].blocks, peaks=peaks[prec])
    sec.add_table("Efficiency (achieved = FlopCounterMode FLOPs ÷ median step time; peak = 2048^3 GEMM beside the steps):",
                  ["precision", "ms/step (±IQR/2)", "GFLOP/step", "achieved GFLOP/s", "peak GFLOP/s", "fraction",
                   "blocks"], eff_rows)
    sec.notes.append(f"Analytic total {analytic_total / 1e9:.1f} vs FlopCounterMode {total / 1e9:.1f} GFLOP "
                     f"({100 * (total / analytic_total - 1):+.2f}%). LAVIS's step "
                     f"is {lavis['step total (ViT x1 + trainable x3)'] / 1e9:.0f} GFLOP by the same accounting "
                     "(performance-notes.md measured 332).")
    sec.data.update(gemm=gemm, gemm_lavis=gemm_lavis, flops=total, per_module=per_module, analytic=ours,
                    analytic_lavis=lavis, n_targets=n_targets)
    return sec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5, help="GEMM repetitions (median)")
    p.add_argument("--quiet-wait", type=float, default=10.0,
                   help="seconds to wait for other processes to go quiet before each timed block (default %(default)s)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)
    return C.run_and_save(run, args, "matmul_efficiency")


if __name__ == "__main__":
    main()
