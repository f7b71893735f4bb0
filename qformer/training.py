"""The optimisation settings of a training stage and what they build.

* :class:`TrainConfig` -- the settings of one stage (adapter cards and the command line set them);
* :func:`param_groups` / :func:`build_optimizer` -- AdamW with decay / no-decay groups, and
  a trainable vision tower's layer-wise learning rates;
* :func:`warmup_cosine` / :func:`build_scheduler` -- per-step linear warmup then cosine decay;
* :func:`step_seed` -- every step's randomness (dropout, ITM negatives) is seeded from
  (seed, step, rank), so a resumed run replays exactly what an uninterrupted run does
  without carrying RNG state around.

The loop itself is :func:`qformer.loop.fit`; checkpoints :mod:`qformer.checkpoints`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from .config import ConfigError, _from_dict
from .vision import VisionTower


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation settings of one training stage (one source of truth: adapter cards and
    the command line override these fields by name). What a step optimises (loss weights,
    label smoothing) is the objective's config, e.g. :class:`qformer.stage1.Stage1Config`."""

    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 2000
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    max_grad_norm: float | None = None
    batch_size: int = 64  # per process, per micro-step
    grad_accum: int = 1
    max_steps: int = 10000  # optimizer steps
    log_every: int = 10
    eval_every: int = 1000
    save_every: int = 1000
    keep_checkpoints: int = 2
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    # Recompute activations in the backward pass to save memory (the one knob): the Q-Former's,
    # and those of the vision tower's trainable blocks when it trains.
    gradient_checkpointing: bool = False
    # BLIP-2's fine-tuning (captioning, VQA, retrieval) trains the vision tower too: -1 = all of it,
    # N = its last N blocks, 0 = frozen (pre-training; the default). The tower then needs
    # vision.dtype=float32 (bf16 compute comes from mixed_precision=bf16).
    vision_trainable_blocks: int = 0
    # The tower's base learning rate (null: lr) and layer-wise decay (EVA / BEiT / LAVIS fine-tuning,
    # the Q-Former in the head's place): block i of D kept blocks trains at
    # vision_lr * vision_layer_decay ** (D - i) (the last block at vision_lr * decay), the embeddings
    # at vision_lr * vision_layer_decay ** (D + 1); 1.0 = vision_lr for the whole tower.
    vision_lr: float | None = None
    vision_layer_decay: float = 1.0
    # Optimizer steps whose loss or gradient norm is NaN/inf that may be skipped (no update),
    # as mixed-precision loss scalers do; 0 (default) stops at the first with a clear error.
    skip_nonfinite_steps: int = 0
    # Under FSDP (accelerate config, fsdp_version 2): the frozen tower's and LLM's blocks are
    # "shard"ed like the rest (least memory) or "replicate"d whole on every rank (no all-gather).
    fsdp_frozen: str = "shard"
    seed: int = 0
    num_workers: int = 2

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "eval_every", "save_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ConfigError(f"lr must be a number > 0, got {self.lr!r}")
        for name in ("lr", "min_lr", "warmup_lr", "weight_decay", "beta1", "beta2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.vision_lr is not None and (isinstance(self.vision_lr, bool) or not isinstance(self.vision_lr, (int, float))
                                           or not math.isfinite(self.vision_lr) or self.vision_lr <= 0):
            raise ConfigError(f"vision_lr must be null (= lr) or a finite number > 0, got {self.vision_lr!r}")
        decay = self.vision_layer_decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
            raise ConfigError(f"vision_layer_decay must be a number in (0, 1], got {decay!r}")
        if isinstance(self.vision_trainable_blocks, bool) or not isinstance(self.vision_trainable_blocks, int) \
                or self.vision_trainable_blocks < -1:
            raise ConfigError("vision_trainable_blocks must be -1 (the whole tower), 0 (frozen) or N >= 1 (the last N "
                              f"blocks), got {self.vision_trainable_blocks!r}")
        if self.fsdp_frozen not in ("shard", "replicate"):
            raise ConfigError(f"fsdp_frozen must be shard or replicate, got {self.fsdp_frozen!r}")
        if self.warmup_steps < 0 or self.skip_nonfinite_steps < 0 or self.num_workers < 0:
            raise ConfigError("warmup_steps, skip_nonfinite_steps and num_workers must be >= 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, data, "training settings")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


# ---------------------------------------------------------------------------- optimisation
def _is_no_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim < 2 or name.endswith(".bias")


def param_groups(model: nn.Module, weight_decay: float, *, vision_lr: float | None = None,
                 vision_layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups as LAVIS builds them: no weight decay for biases, norms and scalars
    (anything with fewer than 2 dimensions); decay for the rest. Frozen parameters are left out.

    A trainable vision tower's parameters go into groups of their own, one per depth (and
    decay / no decay), each with its learning rate: layer-wise decay as EVA / BEiT / LAVIS's
    BLIP-2 fine-tuning use it, with the Q-Former playing the head. Of a tower with D kept
    blocks, block i (0-based) gets ``vision_lr * vision_layer_decay ** (D - i)`` and everything
    before the blocks (patch / position embeddings, class token) ``vision_lr *
    vision_layer_decay ** (D + 1)``; the groups are named ``vision.layer_{depth}.{decay|no_decay}``
    (depth 0: embeddings, i + 1: block i). The scheduler scales every group by the same factor,
    so the ratios hold throughout. ``vision_lr=None``: the tower has no ``lr`` of its own (the
    optimizer's default, i.e. the stage's lr, is used)."""
    towers = [(prefix, m) for prefix, m in model.named_modules() if isinstance(m, VisionTower)]
    tower_names: dict[str, tuple[VisionTower, str]] = {}
    for prefix, tower in towers:
        for inner, _ in tower.model.named_parameters():
            tower_names[f"{prefix}.model.{inner}" if prefix else f"model.{inner}"] = (tower, inner)
    decay, no_decay = [], []
    vision: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in tower_names:
            tower, inner = tower_names[name]
            depth = tower.layer_id(inner)
            nd = _is_no_decay(name, p)
            group = vision.get((depth, nd))
            if group is None:
                group = {"params": [], "weight_decay": 0.0 if nd else weight_decay,
                         "name": f"vision.layer_{depth}.{'no_decay' if nd else 'decay'}"}
                if vision_lr is not None or vision_layer_decay != 1.0:
                    if vision_lr is None:
                        raise ConfigError("vision_layer_decay needs the tower's base rate: pass vision_lr")
                    group["lr"] = vision_lr * vision_layer_decay ** (tower.num_blocks + 1 - depth)
                vision[(depth, nd)] = group
            group["params"].append(p)
            continue
        (no_decay if _is_no_decay(name, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        *(vision[k] for k in sorted(vision)),
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`; a trainable tower's groups use ``cfg.vision_lr`` (default
    ``cfg.lr``) with ``cfg.vision_layer_decay``."""
    groups = param_groups(model, cfg.weight_decay, vision_lr=cfg.vision_lr if cfg.vision_lr is not None else cfg.lr,
                          vision_layer_decay=cfg.vision_layer_decay)
    if not any(g["params"] for g in groups):
        raise ConfigError("no trainable parameters")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def warmup_cosine(step: int, *, lr: float, min_lr: float, warmup_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The learning rate at optimizer step ``step`` (0-based): linear from ``warmup_lr`` to
    ``lr`` over ``warmup_steps``, then cosine from ``lr`` to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step warmup + cosine (LAVIS steps its cosine per epoch; BLIP-2's paper per step)."""

    def factor(step: int) -> float:
        return warmup_cosine(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr,
                             warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps) / cfg.lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_seed(seed: int, step: int, rank: int, micro_step: int = 0) -> int:
    """A seed for the randomness of one micro-step on one rank (dropout, ITM negatives)."""
    return (seed * 1_000_003 + step * 9_176 + micro_step * 131 + rank * 7_919) % (2**63 - 1)


__all__ = [
    "TrainConfig",
    "build_optimizer",
    "build_scheduler",
    "param_groups",
    "step_seed",
    "train_fields",
    "warmup_cosine",
]
