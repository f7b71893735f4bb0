"""What ``recipes/stage1.py`` and ``recipes/stage2.py`` share: setting up a run (accelerate,
the adapter card, the output directory), opening training and held-out data, and
:func:`fit`, the training loop with exact resume.

The loop's randomness is seeded per step (``qformer.training.step_seed``): dropout and the
ITM negatives of step ``s`` on rank ``r`` depend only on (seed, s, r), the data order only on
(seed, epoch) and the augmentation of a sample on (seed, epoch, sample). A run killed at a
checkpoint and resumed therefore logs exactly the losses of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .adapters import AdapterCard, resolve_toy
from .config import Blip2Config
from .training import CheckpointManager, MetricLog, TrainConfig, TrainState, register_model_hooks, step_seed


@dataclass
class Run:
    accelerator: Any
    card: AdapterCard
    stage: int
    train: TrainConfig
    output_dir: Path
    progress: bool
    rank: int
    world_size: int
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase (see phase())

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def print(self, *args: Any) -> None:
        if self.is_main:
            print(*args, flush=True)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time a phase of the run (summed if entered again); reported in results.json."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def timing_summary(self) -> str:
        total = time.perf_counter() - self.started
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in self.timings.items())
        return f"{total:.0f} s in all ({parts})"

    def elapsed(self) -> str:
        s = time.perf_counter() - self.started
        return f"{int(s // 60)} min {s % 60:.0f} s"

    def last_eval(self) -> dict[str, float]:
        """The most recent evaluation's metrics, from metrics.jsonl."""
        path = self.output_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
        return {k.removeprefix("eval/"): v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else {}


def start_run(card: AdapterCard, stage: int, *, output_dir: Path | None, progress: bool) -> Run:
    """The Accelerator (DDP / FSDP / DeepSpeed as ``accelerate config`` says; gloo on CPU),
    mixed precision, gradient accumulation and a TensorBoard tracker in ``output_dir/tb``."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    train = card.train_config(stage)
    set_seed(train.seed)  # the same initial weights on every rank and in every rerun
    out = Path(output_dir or Path("runs") / card.name / f"stage{stage}")
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=train.mixed_precision,
        gradient_accumulation_steps=train.grad_accum,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tb")),
    )
    with accelerator.main_process_first():  # the toy backbones are pretrained once, by one process
        card = resolve_toy(card, progress=progress)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "card.json").write_text(json.dumps(card.to_dict(), indent=2, default=str) + "\n")
    accelerator.wait_for_everyone()
    hparams = {f"train/{k}": v for k, v in train.to_dict().items() if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers(f"stage{stage}", config={"adapter": card.name, **hparams})
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, torch.get_num_threads() // accelerator.num_processes))
    return Run(accelerator, card, stage, train, out, progress and accelerator.is_main_process,
               accelerator.process_index, accelerator.num_processes)


def data_settings(card: AdapterCard) -> dict[str, Any]:
    d = card.data or {}
    augment = d.get("augment", True)
    cache = d.get("cache_features", False)
    if cache and augment:
        raise ValueError("data.cache_features needs data.augment=false: cached features are of un-augmented images")
    return dict(augment=augment, cache_features=cache, streaming=d.get("streaming", False))


def feature_cache_for(run: Run, tower, specs: list[Any]):
    """Open (and fill, on the main process) the frozen-feature cache for ``specs``."""
    from .data import FeatureCache, fill_feature_cache, open_caption_source

    root = run.output_dir.parent / "feature-cache"
    cache = FeatureCache.for_tower(root, tower)
    with run.phase("feature cache"):
        if run.is_main:
            for spec in specs:
                if spec is not None:
                    fill_feature_cache(cache, tower, open_caption_source(spec), progress=run.progress)
        run.accelerator.wait_for_everyone()
    return FeatureCache.for_tower(root, tower)


def open_training_data(run: Run, *, vision, collate, feature_cache=None):
    """The training :class:`~qformer.data.CaptionLoader` of this rank."""
    from .data import CaptionLoader, open_caption_dataset

    spec = (run.card.data.get(f"stage{run.stage}") or {}).get("train")
    if spec is None:
        raise ValueError(f"no training data: pass --train-data (adapter {run.card.name!r} has no data.stage{run.stage}.train)")
    settings = data_settings(run.card)
    ds = open_caption_dataset(
        spec, vision=vision, train=settings["augment"] and feature_cache is None, feature_cache=feature_cache,
        streaming=settings["streaming"], seed=run.train.seed, rank=run.rank, world_size=run.world_size,
    )
    return CaptionLoader(ds, collate, batch_size=run.train.batch_size, num_workers=run.train.num_workers,
                         seed=run.train.seed, rank=run.rank, world_size=run.world_size, drop_last=True,
                         persistent_workers=run.train.num_workers > 0)


@dataclass
class EvalSet:
    """Held-out images with all their reference captions."""

    inputs: torch.Tensor  # (N, 3, H, W) pixels or (N, T, C) cached tower features
    kind: str  # "pixel_values" or "vision_features"
    references: list[list[str]]  # per image
    attributes: list[dict[str, Any] | None]  # toy world scene attributes, when the data has them

    def __len__(self) -> int:
        return len(self.references)

    def batches(self, batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
        return [{self.kind: self.inputs[s : s + batch_size]} for s in range(0, len(self), batch_size)]

    def generate_inputs(self, index: list[int]) -> dict[str, torch.Tensor]:
        """Keyword arguments of ``Blip2.generate`` for the images at ``index``."""
        return {"images" if self.kind == "pixel_values" else "vision_features": self.inputs[index]}

    @property
    def first_captions(self) -> list[str]:
        return [refs[0] for refs in self.references]


def load_eval_set(run: Run, *, vision, max_images: int, feature_cache=None) -> EvalSet | None:
    """The first ``max_images`` distinct images of ``data.stageN.eval`` with their captions,
    preprocessed with the eval transform (or read from the feature cache)."""
    from .data import open_caption_dataset
    from .data.samples import Sample

    spec = (run.card.data.get(f"stage{run.stage}") or {}).get("eval")
    if spec is None:
        return None
    ds = open_caption_dataset(spec, vision=vision, train=False, feature_cache=feature_cache, seed=run.train.seed)
    order: list[Any] = []
    groups: dict[Any, list[str]] = {}
    tensors: dict[Any, torch.Tensor] = {}
    keys: dict[Any, str] = {}
    for i in range(len(ds)):
        item = ds[i]
        if not isinstance(item, Sample):
            continue
        if item.image_id not in groups:
            if len(order) == max_images:
                continue
            order.append(item.image_id)
            groups[item.image_id] = []
            tensors[item.image_id] = item.vision_features if item.vision_features is not None else item.pixel_values
            keys[item.image_id] = item.key
        groups[item.image_id].append(item.caption)
    if not order:
        raise ValueError(f"eval data {spec!r} has no usable image")
    return EvalSet(inputs=torch.stack([tensors[i] for i in order]),
                   kind="vision_features" if feature_cache is not None else "pixel_values",
                   references=[groups[i] for i in order], attributes=_toy_attributes(spec, [keys[i] for i in order]))


def _toy_attributes(spec: Any, keys: list[str]) -> list[dict[str, Any] | None]:
    """Scene attributes stored by ``ToyWorld.export`` (for attribute accuracy), else None."""
    meta = Path(str(spec)) / "metadata.jsonl"
    if not meta.is_file():
        return [None] * len(keys)
    by_name = {}
    for line in meta.read_text().splitlines():
        row = json.loads(line)
        if "attributes" in row:
            by_name[row["file_name"]] = json.loads(row["attributes"])
    out = []
    for key in keys:
        match = next((v for name, v in by_name.items() if str(key).endswith(name)), None)
        out.append(match)
    return out


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def fit(
    run: Run,
    *,
    model: nn.Module,
    objective: nn.Module,
    loader,
    step_fn: Callable[[nn.Module, dict[str, Any], torch.Generator], Any],
    evaluate: Callable[[int], dict[str, float]] | None = None,
    resume: str | None = None,
    stop_after: int | None = None,
) -> TrainState:
    """Train ``objective`` for ``run.train.max_steps`` optimizer steps.

    ``step_fn(objective, batch, generator)`` returns an output with ``.loss`` and
    ``.metrics()``. ``evaluate(step)`` runs on every rank every ``eval_every`` steps and at the
    end; its metrics are logged. ``resume``: "latest" or a checkpoint directory.
    ``stop_after``: stop after that many optimizer steps of this invocation, as if killed
    (checkpoint first), e.g. to fit a job into a scheduler's time limit.
    """
    from tqdm.auto import tqdm

    from .training import build_optimizer, build_scheduler

    acc, cfg = run.accelerator, run.train
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)  # stepped by hand: once per optimizer step
    objective, optimizer = acc.prepare(objective, optimizer)
    register_model_hooks(acc, lambda: model)
    ckpt = CheckpointManager(acc, run.output_dir, keep=cfg.keep_checkpoints)
    state = TrainState()
    if resume is not None:
        path = ckpt.latest() if resume == "latest" else Path(resume)
        if path is None:
            run.print(f"--resume: no checkpoint in {ckpt.root}; starting from scratch")
        else:
            state = ckpt.load(path)
            loader.load_state_dict(state.loader)
            for _ in range(state.step):  # the schedule is a pure function of the step
                scheduler.step()
            run.print(f"resumed from {path} at step {state.step}")
    log = MetricLog(run.output_dir, enabled=run.is_main, resume_step=state.step)
    trainable = [p for p in model.parameters() if p.requires_grad]
    batches = iter(loader)
    pbar = tqdm(total=cfg.max_steps, initial=state.step, disable=not run.progress, desc=f"stage {run.stage}",
                dynamic_ncols=True)
    window: list[dict[str, float]] = []
    t_last, done_here = time.perf_counter(), 0
    objective.train()
    while state.step < cfg.max_steps:
        for micro in range(cfg.grad_accum):
            with run.phase("data"):
                try:
                    batch = next(batches)
                except StopIteration:
                    state.epoch += 1
                    loader.set_epoch(state.epoch)
                    batches = iter(loader)
                    batch = next(batches)
            batch = _to_device(batch, acc.device)
            seed = step_seed(cfg.seed, state.step, run.rank, micro)
            torch.manual_seed(seed)  # dropout
            generator = torch.Generator(device=acc.device).manual_seed(seed + 1)  # ITM negatives
            with acc.accumulate(objective), run.phase("train"):
                out = step_fn(objective, batch, generator)
                acc.backward(out.loss)
                if acc.sync_gradients and cfg.max_grad_norm:
                    acc.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window.append(out.metrics())
            state.samples_seen += len(batch["input_ids"]) * run.world_size
        scheduler.step()
        if cfg.clamp_temperature and hasattr(model, "clamp_temperature_") and getattr(model.config, "stage1_heads", False):
            model.clamp_temperature_()
        state.step += 1
        done_here += 1
        state.loader = loader.state_dict()
        pbar.update(1)
        if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
            values = {k: sum(m[k] for m in window) / len(window) for k in window[0]}
            values = _reduce_mean(acc, values)
            now = time.perf_counter()
            values.update(lr=scheduler.get_last_lr()[0], epoch=state.epoch,
                          steps_per_s=len(window) / max(1e-9, (now - t_last) * cfg.grad_accum))
            t_last, window = now, []
            log.log(state.step, values)
            acc.log({f"train/{k}": v for k, v in values.items()}, step=state.step)
            pbar.set_postfix(loss=f"{values['loss']:.3f}")
        if evaluate is not None and state.step % cfg.eval_every == 0 and state.step < cfg.max_steps:
            _evaluate(run, evaluate, state, log, objective)
        if state.step % cfg.save_every == 0 or state.step == cfg.max_steps:
            ckpt.save(state)
        if stop_after is not None and done_here >= stop_after and state.step < cfg.max_steps:
            if state.step % cfg.save_every:
                ckpt.save(state)
            run.print(f"stopping after {done_here} steps at step {state.step} (resume with --resume)")
            break
    pbar.close()
    if state.step == cfg.max_steps and evaluate is not None:
        _evaluate(run, evaluate, state, log, objective)
    if run.is_main:
        png = log.plot(run.output_dir / "loss_curve.png", title=f"{run.card.name}: stage {run.stage}")
        if png is not None:
            run.print(f"loss curve: {png}")
    loader.write_report(run.output_dir)
    return state


def _reduce_mean(acc, values: dict[str, float]) -> dict[str, float]:
    if acc.num_processes == 1:
        return values
    t = torch.tensor([values[k] for k in sorted(values)], device=acc.device)
    t = acc.reduce(t, reduction="mean")
    return dict(zip(sorted(values), t.tolist()))


def _evaluate(run: Run, evaluate, state: TrainState, log: MetricLog, objective: nn.Module) -> None:
    objective.eval()
    with torch.no_grad(), run.phase("evaluation"):
        metrics = evaluate(state.step)
    objective.train()
    if metrics:
        log.log(state.step, {f"eval/{k}": v for k, v in metrics.items()})
        run.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)
        state.best = {**state.best, **{k: max(v, state.best.get(k, -math.inf)) for k, v in metrics.items()}}


__all__ = ["EvalSet", "Run", "data_settings", "feature_cache_for", "fit", "load_eval_set", "open_training_data",
           "start_run"]
