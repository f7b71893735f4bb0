"""The training loop: any objective, exact resume, a guard against non-finite losses.

:func:`fit` knows nothing of a particular stage. An objective is an ``nn.Module`` whose
``forward(**batch, step=..., generator=...)`` runs one whole training step's model passes
(so DDP / FSDP / DeepSpeed synchronise correctly) and returns an output with ``.loss`` and
``.metrics()``; after each optimizer step the loop calls ``objective.after_optimizer_step(step)``
(stage 1 clamps its temperature and updates its momentum teacher there, if asked). An objective's
own state (``checkpoint_state()``, e.g. the momentum teacher's EMA weights and queue) is
checkpointed with the model.

The loop's randomness is seeded per step (:func:`qformer.training.step_seed`): dropout and the
ITM negatives of step ``s`` on rank ``r`` depend only on (seed, s, r), the data order only on
(seed, epoch) and the augmentation of a sample on (seed, epoch, sample). A run killed at a
checkpoint and resumed therefore logs exactly the losses of an uninterrupted run.

A NaN or infinite loss or gradient norm stops training at that step (every rank agrees) with
:class:`~qformer.errors.NonFiniteLossError` naming the step, the learning rate and the loss
term; no checkpoint or model is written after it, so the last good checkpoint stays the
newest. ``TrainConfig.skip_nonfinite_steps`` allows skipping up to that many such steps instead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from .checkpoints import CheckpointManager, TrainState
from .errors import NonFiniteLossError
from .metric_log import MetricLog
from .run import Run
from .sharding import fsdp2_active, gathered, plain, restore_optimizer_params, shard_
from .training import TrainConfig, build_optimizer, build_scheduler, step_seed


class StepOutput(Protocol):
    loss: torch.Tensor

    def metrics(self) -> dict[str, float]: ...


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class _Batches:
    """Batches forever: a new epoch (reshuffled, ``loader.set_epoch``) when one runs out."""

    def __init__(self, loader, state: TrainState) -> None:
        self.loader, self.state = loader, state
        self.it = iter(loader)

    def next(self) -> dict[str, Any]:
        try:
            return next(self.it)
        except StopIteration:
            self.state.epoch += 1
            self.loader.set_epoch(self.state.epoch)
            self.it = iter(self.loader)
            return next(self.it)


def _nonfinite(metrics: dict[str, float], grad_norm: float | None) -> list[str]:
    """Names of the values that are NaN or infinite."""
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if grad_norm is not None and not math.isfinite(grad_norm):
        bad.append("gradient norm")
    return bad


def _mean_over_ranks(acc, values: dict[str, float]) -> dict[str, float]:
    if acc.num_processes == 1:
        return values
    t = torch.tensor([values[k] for k in sorted(values)], device=acc.device, dtype=torch.float64)
    return dict(zip(sorted(values), acc.reduce(t, reduction="mean").tolist()))


def fit(
    run: Run,
    train: TrainConfig,
    *,
    model: nn.Module,
    objective: nn.Module,
    loader,
    evaluate: Callable[[int], dict[str, float]] | None = None,
    resume: str | None = None,
    stop_after: int | None = None,
    plot_spans: list[tuple[int, int, str]] = (),
    title: str = "training",
) -> TrainState:
    """Train ``objective`` for ``train.max_steps`` optimizer steps; see the module docstring.

    Args:
        model: the model being trained (its trainable parameters are optimised; checkpoints
            call its ``save_pretrained``).
        objective: wraps ``model``; one ``forward`` = one micro-step's loss.
        loader: a :class:`qformer.data.CaptionLoader` (resumable, with a data report).
        evaluate: ``evaluate(step) -> metrics``, run on every rank every ``eval_every`` steps
            and at the end; its metrics are logged with an ``eval/`` prefix.
        resume: "latest" or a checkpoint directory.
        stop_after: stop after that many optimizer steps of this invocation, as if killed
            (checkpoint first), e.g. to fit a job into a scheduler's time limit.
        plot_spans: step ranges to shade on the loss curve, with a label.
    """
    from tqdm.auto import tqdm

    acc = run.accelerator
    sharded = fsdp2_active(acc)
    if sharded:  # our plan (qformer.sharding); accelerate's prepare keeps an FSDP2 module as it is
        plugin = acc.state.fsdp_plugin
        plan = shard_(objective, frozen=train.fsdp_frozen, device=acc.device, mp_policy=plugin.mixed_precision_policy,
                      reshard_after_forward=plugin.reshard_after_forward,
                      offload_policy=plugin.cpu_offload if plugin.cpu_offload else None)
        run.print(f"FSDP2: {len(plan.units)} units over {run.world_size} ranks; frozen blocks {train.fsdp_frozen}ed "
                  f"({len(plan.replicated)} parameters kept whole)")
    if str(acc.distributed_type).split(".")[-1] == "DEEPSPEED":
        # prepare() gets no DataLoader (ours is resumable and sharded by rank already), so DeepSpeed
        # learns the per-GPU micro-batch here.
        acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = train.batch_size
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train)  # stepped by hand: once per optimizer step
    raw_optimizer, groups = optimizer, [list(g["params"]) for g in optimizer.param_groups]
    wrapped, optimizer = acc.prepare(objective, optimizer)
    if sharded:
        restore_optimizer_params(raw_optimizer, groups)
    ckpt = CheckpointManager(acc, run.output_dir, model=model, keep=train.keep_checkpoints, objective=objective,
                             sharded_optimizer=raw_optimizer if sharded else None)
    state = TrainState()
    if resume is not None:
        path = ckpt.resolve(resume)
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
    batches = _Batches(loader, state)
    bar = tqdm(total=train.max_steps, initial=state.step, disable=not run.progress, desc=title, dynamic_ncols=True)
    window: list[dict[str, float]] = []
    t_last, done_here = time.perf_counter(), 0
    wrapped.train()
    while state.step < train.max_steps:
        lr = scheduler.get_last_lr()[0]
        # ------------------------------------------------ one optimizer step (grad_accum micro-steps)
        step_metrics: list[dict[str, float]] = []
        grad_norm, failed = None, None
        for micro in range(train.grad_accum):
            with run.phase("data"):
                batch = _to_device(batches.next(), acc.device)
            seed = step_seed(train.seed, state.step, run.rank, micro)
            torch.manual_seed(seed)  # dropout
            generator = torch.Generator(device=acc.device).manual_seed(seed + 1)  # e.g. ITM negatives
            state.samples_seen += len(batch["input_ids"]) * run.world_size
            with acc.accumulate(wrapped), run.phase("train"):
                try:
                    out = wrapped(**batch, step=state.step, generator=generator)
                except NonFiniteLossError as e:  # found inside the step (e.g. ITM sampling): same handling
                    failed = str(e)
                    break
                acc.backward(out.loss)
                step_metrics.append(out.metrics())
                if acc.sync_gradients:
                    # The total gradient norm, clipped to max_grad_norm if set (inf: measured only).
                    grad_norm = float(plain(acc.clip_grad_norm_(trainable, train.max_grad_norm or math.inf)))
                    if _all_finite(acc, step_metrics, grad_norm):
                        optimizer.step()
                    else:
                        failed = ""
        if failed is not None:  # skip the step if allowed (no update), else stop: nothing saved after it
            _nonfinite_step(run, train, state, log, step_metrics, grad_norm, lr, failed)
            optimizer.optimizer.zero_grad(set_to_none=True)  # also mid-accumulation, where accelerate's is a no-op
        else:
            optimizer.zero_grad(set_to_none=True)
        window.extend(step_metrics)
        scheduler.step()
        objective.after_optimizer_step(state.step)
        state.step += 1
        done_here += 1
        bar.update(1)
        # ------------------------------------------------ log, evaluate, checkpoint
        if window and (state.step % train.log_every == 0 or state.step == train.max_steps):
            values = _mean_over_ranks(acc, {k: sum(m[k] for m in window) / len(window) for k in window[0]})
            now = time.perf_counter()
            values.update(lr=lr, grad_norm=grad_norm, epoch=state.epoch,
                          steps_per_s=len(window) / max(1e-9, (now - t_last) * train.grad_accum))
            t_last, window = now, []
            log.log(state.step, values)
            acc.log({f"train/{k}": v for k, v in values.items() if v is not None}, step=state.step)
            bar.set_postfix(loss=f"{values['loss']:.3f}")
        if evaluate is not None and state.step % train.eval_every == 0 and state.step < train.max_steps:
            _evaluate(run, evaluate, state, log, wrapped)
        if state.step % train.save_every == 0 or state.step == train.max_steps:
            _save(ckpt, state, loader)
        if stop_after is not None and done_here >= stop_after and state.step < train.max_steps:
            if state.step % train.save_every:
                _save(ckpt, state, loader)
            run.print(f"stopping after {done_here} steps at step {state.step} (resume with --resume)")
            break
    bar.close()
    if state.step == train.max_steps and evaluate is not None:
        _evaluate(run, evaluate, state, log, wrapped)
    if run.is_main:
        png = log.plot(run.output_dir / "loss_curve.png", title=title, spans=list(plot_spans))
        if png is not None:
            run.print(f"loss curve: {png}")
    loader.write_report(run.output_dir)
    return state


def _save(ckpt: CheckpointManager, state: TrainState, loader) -> None:
    # Where the data resumes, with every rank's data counts merged (a collective: all ranks call it).
    state.loader = loader.state_dict(all_ranks=True)
    ckpt.save(state)


def _all_finite(acc, step_metrics: list[dict[str, float]], grad_norm: float) -> bool:
    """Whether every rank's losses and the gradient norm are finite (all ranks agree)."""
    bad = any(_nonfinite(m, None) for m in step_metrics) or not math.isfinite(grad_norm)
    if acc.num_processes > 1:
        flag = torch.tensor([1.0 if bad else 0.0], device=acc.device)
        bad = bool(acc.reduce(flag, reduction="sum").item() > 0)
    return not bad


def _nonfinite_step(run: Run, train: TrainConfig, state: TrainState, log: MetricLog,
                    step_metrics: list[dict[str, float]], grad_norm: float | None, lr: float, detail: str) -> None:
    """A step whose loss or gradient norm is NaN/inf: skip it (if allowed) or stop, logged."""
    if detail:
        what = detail
    else:
        names = sorted({n for m in step_metrics for n in _nonfinite(m, None)} | set(_nonfinite({}, grad_norm)))
        what = (", ".join(names) if names else "another rank's loss") + " is not finite (NaN or inf)"
    values = {**({k: sum(m[k] for m in step_metrics) / len(step_metrics) for k in step_metrics[0]} if step_metrics
                 else {}), "lr": lr, "grad_norm": grad_norm, "nonfinite": what}
    log.log(state.step + 1, values)  # NaN/inf are written as null (metrics.jsonl stays strict JSON)
    if state.skipped_nonfinite < train.skip_nonfinite_steps:
        state.skipped_nonfinite += 1
        run.print(f"step {state.step + 1} (lr {lr:.3g}): {what}; step skipped "
                  f"({state.skipped_nonfinite} of skip_nonfinite_steps={train.skip_nonfinite_steps})")
        return
    raise NonFiniteLossError(
        f"step {state.step + 1} (lr {lr:.3g}): {what}; training stopped and nothing was saved after the last "
        "checkpoint. Lower the learning rate, clip gradients (--max-grad-norm), or allow skipping such steps with "
        "--skip-nonfinite-steps N"
    )


def _evaluate(run: Run, evaluate, state: TrainState, log: MetricLog, objective: nn.Module) -> None:
    objective.eval()
    with torch.no_grad(), run.phase("evaluation"), gathered(objective):  # FSDP2: the full model on every rank
        metrics = evaluate(state.step)
    objective.train()
    if metrics:
        log.log(state.step, {f"eval/{k}": v for k, v in metrics.items()})
        run.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)
        state.best = {**state.best, **{k: max(v, state.best.get(k, -math.inf)) for k, v in metrics.items()}}
        state.last_eval = dict(metrics)


__all__ = ["StepOutput", "fit"]
