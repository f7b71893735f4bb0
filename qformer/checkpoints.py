"""Training checkpoints: written atomically, resumed exactly, trainable weights only.

``<out>/checkpoints/step-XXXXXXXX/`` holds accelerate's ``save_state`` (optimizer, scheduler,
RNG states) plus ``model/`` (the model's trainable weights, through
``save_pretrained(include_frozen=False)``: the frozen ViT and LLM can be gigabytes and are
rebuilt from the config), ``trainer_state.json`` (step, epoch, where the data resumes) and, for
an objective with state of its own (stage 1's momentum teacher: EMA weights and feature queue,
``objective.checkpoint_state()``), ``objective_state.safetensors``.
accelerate writes into a temporary directory which is renamed only when every process has
finished, so a run killed mid-save leaves the previous checkpoint intact.

Under FSDP2 (:mod:`qformer.sharding`) accelerate's ``save_state`` would write every parameter,
frozen LLM included, as sharded files; instead the trainable weights are gathered to rank 0
and written as the same ``model/`` and the optimizer as ``optimizer.pt`` (full tensors keyed
by parameter name), so a checkpoint does not depend on the number of ranks. RNG states are not
needed: every step's randomness is seeded from the step (:func:`qformer.training.step_seed`).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .io import atomic_write_text
from .sharding import full_optimizer_state_dict, full_state_dict, load_full_optimizer_state_dict, load_full_state_dict
from .weights import safe_torch_load


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    samples_seen: int = 0
    loader: dict[str, Any] = field(default_factory=dict)  # CaptionLoader.state_dict(): where the data resumes
    best: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)  # the most recent evaluation's metrics
    skipped_nonfinite: int = 0  # optimizer steps skipped for a NaN/inf loss (TrainConfig.skip_nonfinite_steps)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        return cls(**json.loads(text))


class CheckpointManager:
    """Save and resume; see the module docstring. ``model`` is the unwrapped model whose
    ``save_pretrained`` writes the trainable weights."""

    STATE = "trainer_state.json"
    OBJECTIVE = "objective_state.safetensors"
    OPTIMIZER = "optimizer.pt"  # FSDP2 only: full optimizer state by parameter name

    def __init__(self, accelerator, output_dir: Path, *, model, keep: int = 2, objective=None,
                 sharded_optimizer: torch.optim.Optimizer | None = None) -> None:
        """``objective``: the unwrapped training objective; if it has ``checkpoint_state()`` /
        ``load_checkpoint_state(state, source=...)`` its state (the same on every rank) is saved
        by the main process and restored on every rank. ``sharded_optimizer``: the (unwrapped)
        optimizer of a model sharded with FSDP2; checkpoints are then written as described in
        the module docstring."""
        self.accelerator = accelerator
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep
        self.model = model
        self.objective = objective
        self.sharded_optimizer = sharded_optimizer
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

    # -- accelerate hooks: the model as model/ (trainable weights), never a full state dict
    def _save_hook(self, models, weights, output_dir) -> None:
        if self.accelerator.is_main_process:
            self.model.save_pretrained(Path(output_dir) / "model", include_frozen=False)
        weights.clear()  # accelerate must not write its own copy

    def _load_hook(self, models, input_dir) -> None:
        sd, own = self._read_weights(input_dir)
        with torch.no_grad():
            for k, v in sd.items():
                own[k].copy_(v)
        models.clear()

    def _read_weights(self, input_dir) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The checkpoint's ``model/`` weights, checked against the model (and its state dict)."""
        path = Path(input_dir) / "model" / "model.safetensors"
        try:
            sd = load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"cannot read checkpoint weights {path}: {e}") from e
        own = self.model.state_dict()
        missing = [n for n, p in self.model.named_parameters() if p.requires_grad and n not in sd]
        unexpected = sorted(set(sd) - set(own))
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {input_dir} does not fit the model: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
        return sd, own

    # -- FSDP2: full trainable weights and optimizer state, gathered to rank 0
    def _save_sharded(self, directory: Path) -> None:
        must_save_tower = bool(getattr(getattr(self.model, "vision", None), "must_be_saved", False))
        weights = full_state_dict(self.model, trainable_only=not must_save_tower)  # collective
        optimizer = full_optimizer_state_dict(self.model, self.sharded_optimizer)  # collective
        if self.accelerator.is_main_process:
            self.model.save_pretrained(directory / "model", include_frozen=False, state_dict=weights)
            torch.save(optimizer, directory / self.OPTIMIZER)

    def _load_sharded(self, path: Path) -> None:
        sd, _ = self._read_weights(path)
        load_full_state_dict(self.model, sd)
        load_full_optimizer_state_dict(self.model, self.sharded_optimizer, safe_torch_load(path / self.OPTIMIZER))

    # -- files
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
        if self.sharded_optimizer is not None:
            self._save_sharded(tmp)
        else:
            acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            extra = self._objective_state()
            if extra:
                save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()}, str(tmp / self.OBJECTIVE))
            atomic_write_text(tmp / self.STATE, state.to_json())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.checkpoints()[: -self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> TrainState:
        """Restore the model, optimizer, scheduler and RNG states of checkpoint ``path``.

        Files accelerate unpickles (``optimizer.bin`` ...) are untrusted input like any
        checkpoint: one that needs more than tensors and plain containers is refused with
        :class:`~qformer.errors.UnsafeCheckpointError` naming it."""
        path = Path(path)
        if not (path / self.STATE).is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no {self.STATE})")
        try:
            if self.sharded_optimizer is not None:
                self._load_sharded(path)
            else:
                self.accelerator.load_state(str(path))
        except pickle.UnpicklingError:
            for f in sorted(path.rglob("*")):
                if f.is_file() and f.suffix in (".bin", ".pt", ".pth", ".pkl"):
                    safe_torch_load(f)  # raises UnsafeCheckpointError naming the file
            raise
        self._load_objective_state(path)
        return TrainState.from_json((path / self.STATE).read_text())

    def _objective_state(self) -> dict[str, torch.Tensor]:
        get = getattr(self.objective, "checkpoint_state", None)
        return get() if get is not None else {}

    def _load_objective_state(self, path: Path) -> None:
        load = getattr(self.objective, "load_checkpoint_state", None)
        if load is None:
            return
        file = path / self.OBJECTIVE
        if not file.is_file():
            if self._objective_state():
                raise CheckpointError(f"checkpoint {path} has no {self.OBJECTIVE}: it was written without the "
                                      "objective's state (e.g. momentum distillation off); it cannot resume this run")
            return
        try:
            state = load_file(str(file))
        except Exception as e:
            raise CheckpointError(f"cannot read {file}: {e}") from e
        load(state, source=str(file))

    def resolve(self, resume: str | os.PathLike) -> Path | None:
        """``"latest"`` -> the newest complete checkpoint (None if there is none); a path -> itself,
        checked."""
        if str(resume) == "latest":
            return self.latest()
        path = Path(resume)
        if not (path / self.STATE).is_file():
            raise CheckpointError(f"--resume {path}: not a complete checkpoint (no {self.STATE})")
        return path


__all__ = ["CheckpointManager", "TrainState"]
