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
from .eval.tasks import EvalSet, open_eval_set
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
        torch.set_num_threads(cpu_threads_per_process(accelerator))
    return Run(accelerator, card, stage, train, out, progress and accelerator.is_main_process,
               accelerator.process_index, accelerator.num_processes)


def cpu_threads_per_process(accelerator) -> int:
    """Intra-op threads for one rank on a CPU machine: ``$QFORMER_NUM_THREADS`` if set, else
    the cores this process may use divided by the ranks on this machine.

    Why not ``OMP_NUM_THREADS``: ``accelerate launch`` without a config sets it to 1 on
    machines whose physical-core count psutil reports as 1 per rank (e.g. 2 vCPUs), which
    halves the speed of a 2-core laptop/CI run; the cores we are allowed to use are the
    honest budget."""
    import os

    env = os.environ.get("QFORMER_NUM_THREADS")
    if env:
        return max(1, int(env))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or accelerator.num_processes))  # ranks on this machine
    return max(1, cores // local)


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


def load_eval_set(run: Run, *, vision, max_images: int, feature_cache=None) -> EvalSet | None:
    """The first ``max_images`` distinct images of ``data.stageN.eval`` with their captions,
    preprocessed with the eval transform (or read from the feature cache); None when the card
    has no eval data. The same loader as ``recipes/evaluate.py`` (:func:`open_eval_set`)."""
    spec = (run.card.data.get(f"stage{run.stage}") or {}).get("eval")
    if spec is None:
        return None
    return open_eval_set(spec, vision=vision, max_images=max_images, feature_cache=feature_cache, seed=run.train.seed)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def fit(
    run: Run,
    *,
    model: nn.Module,
    objective: nn.Module,
    loader,
    step_fn: Callable[[nn.Module, dict[str, Any], torch.Generator, int], Any],
    evaluate: Callable[[int], dict[str, float]] | None = None,
    resume: str | None = None,
    stop_after: int | None = None,
) -> TrainState:
    """Train ``objective`` for ``run.train.max_steps`` optimizer steps.

    ``step_fn(objective, batch, generator, step)`` (``step``: optimizer steps done so far)
    returns an output with ``.loss`` and
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
                out = step_fn(objective, batch, generator, state.step)
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


__all__ = ["EvalSet", "Run", "cpu_threads_per_process", "data_settings", "feature_cache_for", "fit", "load_eval_set", "open_training_data",
           "start_run"]
