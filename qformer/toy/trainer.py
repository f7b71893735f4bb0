"""The one small training loop both toy backbones are pretrained with.

AdamW, linear warm-up then cosine decay (:func:`lr_at`), gradients clipped to norm 1.0, a
loss EMA on a tqdm bar. The caller's ``step_loss`` builds a batch, runs the forward pass
(under :func:`autocast`) and calls ``backward`` itself, so that it can accumulate
micro-batches. The order of operations is part of the cached backbones' identity: the same
seed must keep giving bit-identical weights (see ``TOY_BACKBONES_VERSION``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

__all__ = ["autocast", "lr_at", "torch_threads", "train"]


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first 5 % of steps, then cosine decay to 5 % of the peak."""
    warm = max(1, total // 20)
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def autocast() -> contextlib.AbstractContextManager:
    """bf16 autocast on the CPU: much faster matmuls on CPUs with native bf16 support, and
    accurate enough for these small models. Never fp16 on a CPU (slow)."""
    return torch.autocast("cpu", dtype=torch.bfloat16)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads, restoring the previous count afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train(
    params: Sequence[nn.Parameter],
    step_loss: Callable[[int], torch.Tensor],
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.98),
    max_grad_norm: float = 1.0,
    desc: str,
    progress: bool,
) -> float | None:
    """Train ``params`` for ``steps`` steps; returns the final loss EMA (None if no step ran).

    ``step_loss(step)`` must leave the step's gradients in ``params`` (call ``backward``) and
    return the step's loss as a scalar tensor (used for the EMA only).
    """
    from tqdm.auto import tqdm

    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=0.5)
    loss_ema: float | None = None
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss = step_loss(step).item()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        loss_ema = loss if loss_ema is None else 0.9 * loss_ema + 0.1 * loss
        bar.set_postfix(loss=f"{loss_ema:.3f}", refresh=False)
    return loss_ema
