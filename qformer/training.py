"""Training machinery shared by ``recipes/stage1.py`` and ``recipes/stage2.py``.

The recipes read top to bottom (config, data, model, loop, eval, checkpoint); what they
share lives here:

* :class:`TrainConfig` — the optimisation settings of one stage (adapter cards set them);
* :func:`param_groups` / :func:`build_optimizer` — AdamW with decay / no-decay groups;
* :func:`warmup_cosine` — per-step linear warmup then cosine decay to ``min_lr``;
* :func:`step_seed` — every step's randomness (dropout, ITM negatives) is seeded from
  (seed, step, rank), so a resumed run replays exactly what an uninterrupted run does
  without carrying RNG state around;
* :class:`CheckpointManager` — atomic checkpoints through accelerate's ``save_state`` (only
  trainable weights; frozen towers are rebuilt from the config) and exact resume;
* :class:`MetricLog` — metrics as JSONL plus a loss-curve PNG.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation settings of one training stage (one source of truth: adapter cards and
    the command line override these fields by name)."""

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
    gradient_checkpointing: bool = False
    seed: int = 0
    num_workers: int = 2
    clamp_temperature: bool = False  # BLIP/ALBEF clamp temp to [0.001, 0.5]; LAVIS BLIP-2 does not
    # Stage 1 only: weights of the three losses (BLIP-2 sums them, 1 each).
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    itg_weight: float = 1.0
    loss_ramp_steps: int = 0  # ITM and ITG weights ramp from 0 over this many steps (0: constant)

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------- optimisation
def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as LAVIS builds them: no weight decay for biases, norms and scalars
    (anything with fewer than 2 dimensions); decay for the rest. Frozen parameters are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if not any(g["params"] for g in groups):
        raise ValueError("no trainable parameters")
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


# ---------------------------------------------------------------------------- checkpoints
@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    samples_seen: int = 0
    loader: dict[str, Any] = field(default_factory=dict)  # CaptionLoader.state_dict(): where the data resumes
    best: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        return cls(**json.loads(text))


class CheckpointManager:
    """``<out>/checkpoints/step-XXXXXXXX/`` written atomically: accelerate writes into a
    temporary directory which is renamed only when every process has finished, so a run
    killed mid-save leaves the previous checkpoint intact. Only trainable weights are saved
    (the hook calls ``save_pretrained(include_frozen=False)``); optimizer, scheduler and
    accelerate's RNG states come from ``accelerator.save_state``."""

    STATE = "trainer_state.json"

    def __init__(self, accelerator, output_dir: Path, *, keep: int = 2) -> None:
        self.accelerator = accelerator
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep

    def checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.iterdir() if p.name.startswith("step-") and (p / self.STATE).is_file()]
        return sorted(done, key=lambda p: p.name)

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, state: TrainState) -> Path:
        acc = self.accelerator
        final = self.root / f"step-{state.step:08d}"
        tmp = self.root / f".tmp-step-{state.step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / self.STATE).write_text(state.to_json())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.checkpoints()[: -self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> TrainState:
        if not (path / self.STATE).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {self.STATE})")
        self.accelerator.load_state(str(path))
        return TrainState.from_json((path / self.STATE).read_text())


def register_model_hooks(accelerator, model_getter) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` write and read the model as
    ``model/`` with ``save_pretrained(include_frozen=False)`` / a strict trainable-weight load,
    instead of a full state dict (the frozen ViT and LLM can be gigabytes)."""
    from safetensors.torch import load_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            model_getter().save_pretrained(Path(output_dir) / "model", include_frozen=False)
        weights.clear()  # accelerate must not write its own copy

    def load_hook(models, input_dir):
        model = model_getter()
        sd = load_file(str(Path(input_dir) / "model" / "model.safetensors"))
        own = model.state_dict()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in sd]
        unexpected = sorted(set(sd) - set(own))
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {input_dir} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for k, v in sd.items():
                own[k].copy_(v)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ---------------------------------------------------------------------------- metrics
class MetricLog:
    """Appends metrics to ``metrics.jsonl`` and draws ``loss_curve.png`` (main process only)."""

    def __init__(self, output_dir: Path, *, enabled: bool = True, resume_step: int = 0) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled and self.path.is_file():
            # A resumed run drops what was logged after its checkpoint.
            kept = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= resume_step]
            self.path.write_text("".join(l + "\n" for l in kept))

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(l) for l in self.path.read_text().splitlines() if l.strip()]

    def plot(self, png: Path, *, title: str) -> Path | None:
        if not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.records()
        keys = sorted({k for r in rows for k in r if k.startswith("loss")})
        if not keys:
            return None
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)
        return png


__all__ = [
    "CheckpointManager",
    "MetricLog",
    "TrainConfig",
    "TrainState",
    "build_optimizer",
    "build_scheduler",
    "param_groups",
    "register_model_hooks",
    "step_seed",
    "warmup_cosine",
]
