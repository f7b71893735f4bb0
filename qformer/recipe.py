"""What the training recipes share between the command line and the loop: the run set up from
an adapter card with every cheap check first, and the stage's data.

:func:`start_recipe` orders the work so that mistakes cost seconds, not the minutes of building,
downloading or pretraining backbones: the card and every ``--set`` key, the local data files
and their columns, the output folder, ``--resume`` / ``--init-from`` are all checked before
any ``SCHEME://`` resource is prepared (the toy world's backbones are pretrained once, on first
use, by one process) or any model is built.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed

from .adapters import AdapterCard, Stage, has_placeholder, resolve_resources, stage_key
from .cli import card_from_args
from .config import VisionConfig
from .data import CaptionLoader, FeatureCache, fill_feature_cache, open_caption_dataset, open_caption_source
from .data.sources import FileCaptionSource, WebDatasetCaptionSource, detect_spec_kind
from .errors import CheckpointError, ConfigError
from .eval.report import write_results
from .eval.tasks import EvalSet, open_eval_set
from .io import atomic_write_json
from .run import Run, start_run
from .sharding import full_state_dict, is_sharded

_METADATA = ("metadata.jsonl", "metadata.csv")


def check_data_spec(spec: Any, *, caption_column: str | None = None, image_column: str | None = None) -> None:
    """Cheap checks of a dataset spec before any heavy work: local files and shards exist, and
    a file's (or an imagefolder's metadata's) first record has the image and caption columns.
    Hub datasets and in-memory datasets are checked when they are opened."""
    if isinstance(spec, (list, tuple)):
        for item in spec:
            check_data_spec(item, caption_column=caption_column, image_column=image_column)
        return
    if not isinstance(spec, (str, os.PathLike)):
        return
    kind, location = detect_spec_kind(str(spec))  # a missing local path raises FileNotFoundError here
    cols = {"caption_column": caption_column, "image_column": image_column}
    if kind in ("jsonl", "csv", "tsv", "json"):
        FileCaptionSource(location, format=kind, streaming=kind != "json", **cols)
    elif kind == "imagefolder":
        meta = next((Path(location) / m for m in _METADATA if (Path(location) / m).is_file()), None)
        if meta is not None:
            FileCaptionSource(meta, streaming=True, **{**cols, "image_column": image_column or "file_name"})
    elif kind == "webdataset":
        WebDatasetCaptionSource(location)


def check_instruction_spec(spec: Any) -> None:
    """Each instruction dataset (a spec or ``{path, task, weight}``) exists, or a clear error."""
    for entry in spec if isinstance(spec, (list, tuple)) else [spec]:
        path = entry.get("path") if isinstance(entry, dict) else entry
        if isinstance(path, (str, os.PathLike)) and not has_placeholder(path):
            detect_spec_kind(str(path))  # a missing local path raises FileNotFoundError here


def _check_spec(stage: Stage, spec: Any, card: AdapterCard) -> None:
    if stage == "instruct":  # the files exist; their rows are read (and checked) when opened, before training
        check_instruction_spec(spec)
    else:
        check_data_spec(spec, **card.data.source_options())


def _check_paths(card: AdapterCard, stage: Stage, args: argparse.Namespace) -> None:
    split = card.data.split(stage)
    if split.train is None:
        raise ConfigError(f"no training data: pass --train-data (adapter {card.name!r} has no "
                          f"data.{stage_key(stage)}.train)")
    for name in ("train", "eval"):
        spec = getattr(split, name)
        if spec is not None and not has_placeholder(spec):  # a plugin's data is checked once it exists
            _check_spec(stage, spec, card)
    if args.resume not in (None, "latest"):
        if not (Path(args.resume) / "trainer_state.json").is_file():
            raise CheckpointError(f"--resume {args.resume}: not a complete checkpoint (no trainer_state.json)")
    init_from = getattr(args, "init_from", None)
    if stage in (2, "instruct") or init_from is not None:
        init_from = init_from or default_init_from(card, stage)
        before = {1: "qformer", 2: "stage-1", "instruct": "stage-2 (BLIP-2)"}[stage]
        recipe = {1: "a recipe", 2: "recipes/stage1.py",
                  "instruct": "make demo (or recipes/stage1.py then recipes/stage2.py)"}[stage]
        if not (Path(init_from) / "config.json").is_file():
            raise CheckpointError(f"--init-from {init_from}: no {before} model there (run {recipe} first, "
                                  "or pass --init-from DIR)")


def check_tower_training(card: AdapterCard, stage: Stage) -> None:
    """A trainable vision tower (``stageN.vision_trainable_blocks``) cannot read cached features
    (they are the frozen tower's output) and needs float32 weights; both are checked here, before
    anything is built (a ``SCHEME://`` tower's dtype is checked when the tower is unfrozen)."""
    blocks = card.train_config(stage).vision_trainable_blocks
    if blocks == 0:
        return
    if card.data.cache_features:
        raise ConfigError(f"{stage_key(stage)}.vision_trainable_blocks={blocks} trains the vision tower, so its features "
                          "cannot be cached: set data.cache_features=false (--cache-features false)")
    vision = card.model.get("vision")
    if isinstance(vision, dict) and not has_placeholder(vision) and vision.get("dtype", "float32") != "float32":
        raise ConfigError(f"{stage_key(stage)}.vision_trainable_blocks={blocks} trains the vision tower, which needs float32 "
                          f"weights (model.vision.dtype is {vision['dtype']}): --set model.vision.dtype=float32 "
                          "(bf16 compute comes from mixed_precision=bf16)")


def default_init_from(card: AdapterCard, stage: Stage = 2) -> Path:
    """Where a stage starts from by default: the previous stage's model of this card."""
    return Path("runs") / card.name / ("stage2" if stage == "instruct" else "stage1") / "model"


def start_recipe(args: argparse.Namespace, stage: Stage) -> tuple[Run, AdapterCard]:
    """Check everything cheap, then set up the run and prepare the card's resources."""
    card = card_from_args(args, stage)  # every key and value of the card and the command line
    _check_paths(card, stage, args)
    check_tower_training(card, stage)
    train = card.train_config(stage)
    set_seed(train.seed)  # the same initial weights on every rank and in every rerun
    run = start_run(args.output_dir or Path("runs") / card.name / stage_key(stage), progress=not args.no_progress,
                    mixed_precision=train.mixed_precision, grad_accum=train.grad_accum, log_with="tensorboard")
    provided = [name for name in ("train", "eval") if has_placeholder(getattr(card.data.split(stage), name))]
    with run.accelerator.main_process_first():  # e.g. the toy backbones: pretrained once, by one process
        card = resolve_resources(card, progress=run.progress)
    for name in provided:  # what a plugin provided, now that it exists (the rest was checked above)
        _check_spec(stage, getattr(card.data.split(stage), name), card)
    if run.is_main:
        atomic_write_json(run.output_dir / "card.json", card.to_dict(), default=str)
    hparams = {f"train/{k}": v for k, v in train.to_dict().items() if isinstance(v, (int, float, str, bool))}
    run.accelerator.init_trackers(stage_key(stage), config={"adapter": card.name, **hparams})
    return run, card


def finish_recipe(run: Run, card: AdapterCard, stage: Stage, state, model, *, task: str, include_frozen: bool) -> None:
    """After a run that reached its last step: the final model in ``model/`` (the frozen parts
    only when nothing else says where to load them from) and ``results.{json,md}`` with the
    last evaluation under ``task``, the steps, samples and seconds per phase."""
    if state.step == card.train_config(stage).max_steps:
        # FSDP2: every rank takes part in gathering the full weights (to rank 0's CPU memory)
        weights = full_state_dict(model, trainable_only=False) if is_sharded(model) else None
        if run.is_main:
            model.save_pretrained(run.output_dir / "model", include_frozen=include_frozen, state_dict=weights)
    if state.step == card.train_config(stage).max_steps and run.is_main:
        what = "instruction tuning" if stage == "instruct" else f"stage {stage}"
        write_results({task: state.last_eval}, run.output_dir, name="results", title=f"{card.name}: {what}",
                      extra={"adapter": card.name, "steps": state.step, "samples": state.samples_seen,
                             "seconds": run.seconds()})
        run.print(f"\n{what} done: {run.timing_summary()}; model saved to {run.output_dir / 'model'}")
    run.accelerator.end_training()


# ---------------------------------------------------------------------------- data
def feature_cache_for(run: Run, tower, specs: list[Any], *, source_options: dict[str, str] | None = None):
    """Open (and fill, on the main process) the frozen-feature cache for ``specs``."""
    root = run.output_dir.parent / "feature-cache"
    cache = FeatureCache.for_tower(root, tower)
    with run.phase("feature cache"):
        if run.is_main:
            for spec in specs:
                if spec is not None:
                    fill_feature_cache(cache, tower, open_caption_source(spec, **(source_options or {})),
                                       progress=run.progress)
        run.accelerator.wait_for_everyone()
    return FeatureCache.for_tower(root, tower)


def open_training_data(run: Run, card: AdapterCard, stage: Stage, *, vision: VisionConfig, collate,
                       feature_cache=None) -> CaptionLoader:
    """The training :class:`~qformer.data.CaptionLoader` of this rank."""
    data, train = card.data, card.train_config(stage)
    ds = open_caption_dataset(
        data.split(stage).train, vision=vision, train=data.augment and feature_cache is None,
        feature_cache=feature_cache, streaming=data.streaming, seed=train.seed, rank=run.rank,
        world_size=run.world_size, **data.source_options(),
    )
    return CaptionLoader(ds, collate, batch_size=train.batch_size, num_workers=train.num_workers, seed=train.seed,
                         rank=run.rank, world_size=run.world_size, drop_last=True,
                         persistent_workers=train.num_workers > 0)


def load_eval_set(card: AdapterCard, stage: Stage, *, vision: VisionConfig, max_images: int,
                  feature_cache=None) -> EvalSet | None:
    """The first ``max_images`` distinct images of ``data.stageN.eval`` with their captions,
    preprocessed with the eval transform (or read from the feature cache); None when the card
    has no eval data or ``max_images`` is 0. The same loader as ``recipes/evaluate.py``."""
    spec = card.data.split(stage).eval
    if spec is None or max_images == 0:
        return None
    return open_eval_set(spec, vision=vision, max_images=max_images, feature_cache=feature_cache,
                         seed=card.train_config(stage).seed, caption_column=card.data.caption_column)


__all__ = ["check_data_spec", "check_instruction_spec", "check_tower_training", "default_init_from", "feature_cache_for",
           "finish_recipe", "load_eval_set", "open_training_data",
           "start_recipe"]
