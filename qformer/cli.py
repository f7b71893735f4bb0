"""Command lines of the recipes: options built from the configs, and one clear error line.

Every training option maps onto a field of the adapter card (``stage1.*`` / ``stage2.*``,
``stage1.objective.*``, ``data.*``); ``--set`` reaches any other card field. What the command
line gives wins over the card, which wins over the library defaults; ``--help`` shows each
option's effective default, read from the card named by ``--adapter`` (default: toy).

:func:`run_main` runs a recipe's ``main`` so that the library's own errors (bad config, data,
checkpoint, output folder, a non-finite loss ...) end the run with a single ``error: ...`` line
as the last thing printed and exit code 2, without a traceback (``--debug`` or
``QFORMER_DEBUG=1`` shows it). Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from .adapters import AdapterCard, Stage, list_adapters, load_adapter, stage_key
from .errors import QFormerError
from .stage1 import Stage1Config
from .training import TrainConfig

_TRAIN_HELP = {
    "lr": "peak learning rate",
    "min_lr": "final learning rate of the cosine decay",
    "warmup_lr": "learning rate at step 0 of the linear warmup",
    "warmup_steps": "optimizer steps of linear warmup",
    "weight_decay": "AdamW weight decay (not applied to biases, norms and scalars)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2 (the paper uses 0.98)",
    "max_grad_norm": "clip the gradient norm to this (null: no clipping)",
    "batch_size": "samples per process per micro-step",
    "grad_accum": "micro-steps per optimizer step",
    "max_steps": "optimizer steps to train for",
    "log_every": "log metrics every N optimizer steps",
    "eval_every": "evaluate on the held-out set every N optimizer steps",
    "save_every": "write a checkpoint every N optimizer steps",
    "keep_checkpoints": "how many recent checkpoints to keep",
    "mixed_precision": "no | bf16 | fp16 (bf16 on CPUs and recent GPUs; never fp16 on a CPU)",
    "gradient_checkpointing": "recompute activations in the backward pass to save memory (the Q-Former's, and the "
                              "vision tower's trainable blocks')",
    "vision_trainable_blocks": "fine-tune the vision tower too (BLIP-2's fine-tuning): -1 all of it, N its last N "
                               "blocks, 0 frozen (pre-training); needs model.vision.dtype=float32",
    "vision_lr": "base learning rate of the vision tower, before layer-wise decay (null: --lr)",
    "vision_layer_decay": "layer-wise lr decay of the tower: block i of D kept blocks trains at vision_lr * "
                          "decay^(D-i), the embeddings at vision_lr * decay^(D+1) (1: none; BLIP-2's fine-tuning: 0.95)",
    "skip_nonfinite_steps": "skip up to N optimizer steps whose loss or gradient norm is NaN/inf (0: stop at the first)",
    "fsdp_frozen": "under FSDP (accelerate config, fsdp_version 2): shard the frozen tower's and LLM's blocks "
                   "(least memory) or replicate them on every rank (no all-gather)",
    "seed": "seed of data order, augmentation, dropout and ITM negatives",
    "num_workers": "DataLoader worker processes per rank",
}
_OBJECTIVE_HELP = {
    "itc_weight": "weight of the ITC loss in the stage-1 sum (BLIP-2: 1)",
    "itm_weight": "weight of the ITM loss in the stage-1 sum (BLIP-2: 1)",
    "itg_weight": "weight of the ITG loss in the stage-1 sum (BLIP-2: 1)",
    "loss_ramp_steps": "ramp the ITM and ITG weights linearly from 0 over the first N steps so that ITC leads "
                       "(helps a Q-Former trained from scratch; 0 = BLIP-2's constant weights)",
    "itc_label_smoothing": "label smoothing of ITC (BLIP-2: 0.1)",
    "itg_label_smoothing": "label smoothing of ITG (BLIP-2: 0.1)",
    "gather_with_grad": "gather other ranks' ITC features with gradient (false reproduces LAVIS)",
    "clamp_temperature": "clamp the ITC temperature to [0.001, 0.5] after each step (BLIP/ALBEF; LAVIS BLIP-2 does not)",
    "momentum_distill": "momentum distillation (ALBEF/BLIP): an EMA teacher of the Q-Former side gives soft ITC "
                        "targets (BLIP-2: off)",
    "momentum": "EMA momentum of the teacher, p_m = m p_m + (1 - m) p after each step (ALBEF/BLIP: 0.995)",
    "momentum_alpha": "weight of the teacher's soft targets (ALBEF/BLIP: 0.4)",
    "momentum_alpha_ramp_steps": "ramp alpha linearly from 0 over the first N steps (ALBEF: one epoch; 0 = constant)",
    "momentum_queue_size": "queue of the last N teacher features as extra ITC negatives (ALBEF 65536, BLIP 57600; "
                           "0 = the global batch only)",
    "momentum_itm": "draw ITM hard negatives from the teacher's similarities (default: from ITC's logits, as ALBEF)",
    "mlm_weight": "weight of MLM on the image-grounded encoder (ALBEF/BLIP-1; 0 = off, as BLIP-2)",
    "mlm_probability": "share of non-special text tokens MLM masks (80%% [MASK], 10%% random, 10%% kept)",
}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _kind(f: dataclasses.Field) -> Callable[[str], Any]:
    if f.name in ("max_grad_norm", "vision_lr"):
        return lambda s: None if s.lower() in ("null", "none") else float(s)
    return {int: int, float: float, bool: _bool}.get(type(f.default), str)


def _card_for_help(argv: list[str]) -> AdapterCard | None:
    """The card ``--adapter`` / ``--set`` name on this command line, for ``--help``'s defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--adapter", default="toy")
    pre.add_argument("--set", dest="overrides", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    try:
        return load_adapter(known.adapter, known.overrides)
    except (QFormerError, OSError):
        return None


def build_parser(stage: Stage, description: str, *, card: AdapterCard | None = None) -> argparse.ArgumentParser:
    """The recipe's options; with ``card``, each option's help ends with the card's value."""

    def dflt(value: Any) -> str:
        return "" if card is None else f" (card: {json.dumps(value) if not isinstance(value, str) else value})"

    p = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Adapter cards: {', '.join(list_adapters())}. Any card field can be set with --set KEY=VALUE.",
    )
    g = p.add_argument_group("what to train")
    g.add_argument("--adapter", default="toy",
                   help="adapter card name (adapters/NAME.yaml) or path: the frozen-backbone pairing and its defaults "
                        "(default: toy)")
    g.add_argument("--output-dir", type=Path, default=None,
                   help=f"where checkpoints, logs, plots and the final model go (default: runs/ADAPTER/{stage_key(stage)})")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any card field with a dotted key, e.g. --set model.qformer.num_layers=6 (repeatable)")
    if stage == 1:
        g.add_argument("--init-from", type=Path, default=None,
                       help="a model directory saved by qformer to start from instead of the card's qformer_init, "
                            "e.g. a pretrained stage-1 model for retrieval fine-tuning (default: none)")
    if stage == 2:
        g.add_argument("--init-from", type=Path, default=None,
                       help="stage-1 model directory to start from (default: runs/ADAPTER/stage1/model)")
        g.add_argument("--keep-stage1-heads", action="store_true",
                       help="keep the Q-Former's text parts and ITC/ITM heads (LAVIS drops them in stage 2)")
    if stage == "instruct":
        g.add_argument("--init-from", type=Path, default=None,
                       help="BLIP-2 stage-2 model directory to start from (default: runs/ADAPTER/stage2/model)")
        g.add_argument("--stage1-from", type=Path, default=None,
                       help="stage-1 model directory with the Q-Former's text parts, when the stage-2 model dropped "
                            "them (default: runs/ADAPTER/stage1/model)")
    data = card.data if card is not None else None
    split = data.split(stage) if data is not None else None
    d = p.add_argument_group("data")
    train_help = ("training data, one or more (concatenated): a hub dataset name, an imagefolder dir with "
                  "metadata.jsonl, a .jsonl/.json/.csv of image path + caption, or webdataset shards "
                  "('shards/{000..099}.tar')")
    if stage == "instruct":
        train_help = ("instruction data, one or more (mixed, each sampled in proportion to the square root of its "
                      "size): .jsonl/.json of {image|video, instruction|question, answer|answers}, LLaVA conversation "
                      ".json, or any caption dataset (answers to captioning instructions)")
    d.add_argument("--train-data", nargs="+", default=None, metavar="DATA",
                   help=f"{train_help}{dflt(split.train) if split else ''}")
    d.add_argument("--eval-data", nargs="+", default=None, metavar="DATA",
                   help=f"held-out data for periodic and final evaluation (same forms){dflt(split.eval) if split else ''}")
    eval_max = card.eval.of(stage).max_images if card is not None else None
    what = "questions" if stage == "instruct" else "images"
    d.add_argument("--eval-size", type=int, default=None,
                   help=f"held-out {what} to evaluate on (0: no evaluation){dflt(eval_max) if card else ''}")
    d.add_argument("--caption-column", default=None,
                   help="the data's caption column (default: the first of text / caption / captions / sentences)"
                        f"{dflt(data.caption_column) if data and data.caption_column else ''}")
    d.add_argument("--image-column", default=None,
                   help="the data's image column (default: the first of image / image_path / file_name / filepath / "
                        f"path / file){dflt(data.image_column) if data and data.image_column else ''}")
    d.add_argument("--streaming", action="store_true", help="stream the training data instead of indexing it")
    d.add_argument("--augment", type=_bool, default=None,
                   help=f"BLIP-2's random crop + flip; off enables --cache-features{dflt(data.augment) if data else ''}")
    d.add_argument("--cache-features", type=_bool, default=None,
                   help="cache the frozen tower's features on disk (needs --augment false)"
                        f"{dflt(data.cache_features) if data else ''}")
    if stage == "instruct":
        d.add_argument("--vqa-template", default=None, metavar="TEMPLATE",
                       help="ask every VQA row (training and held-out) with this template, '{}' the question, e.g. "
                            "'Question: {} Answer:' (BLIP-2's VQA fine-tuning); default: one of InstructBLIP's ten "
                            "per training row, 'Question: {} Short answer:' held out"
                            f"{dflt(data.vqa_template) if data and data.vqa_template else ''}")
        d.add_argument("--vqa-answers", choices=["main", "weighted"], default=None,
                       help="train a VQA row on its most frequent answer (main, InstructBLIP) or on every distinct "
                            "answer weighted by its share of the human answers (weighted, BLIP-2's VQA fine-tuning)"
                            f"{dflt(data.vqa_answers) if data else ''}")
    t = p.add_argument_group(f"training (the card's {stage_key(stage)} section)")
    train = card.train_config(stage) if card is not None else None
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(train, f.name) if train is not None else None
        help_text = _TRAIN_HELP.get(f.name, f.name) + (dflt(value) if train is not None else "")
        # SUPPRESS: an option not given leaves no attribute, so "--max-grad-norm null" is a value.
        if f.name in ("mixed_precision", "fsdp_frozen"):
            choices = ["no", "bf16", "fp16"] if f.name == "mixed_precision" else ["shard", "replicate"]
            t.add_argument(flag, dest=f.name, choices=choices, default=argparse.SUPPRESS, help=help_text)
        else:
            t.add_argument(flag, dest=f.name, type=_kind(f), default=argparse.SUPPRESS, help=help_text)
    if stage == 1:
        o = p.add_argument_group("stage-1 objective (the card's stage1.objective section)")
        for f in fields(Stage1Config):
            value = getattr(card.stage1_objective, f.name) if card is not None else None
            o.add_argument("--" + f.name.replace("_", "-"), dest=f"objective_{f.name}", type=_kind(f),
                           default=argparse.SUPPRESS, metavar=f.name.upper(),
                           help=_OBJECTIVE_HELP.get(f.name, f.name) + (dflt(value) if card is not None else ""))
    r = p.add_argument_group("run control")
    r.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint dir, or the latest one in --output-dir (same data order, RNG, schedule)")
    r.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N optimizer steps of this invocation, checkpointed (continue with --resume)")
    r.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    r.add_argument("--debug", action="store_true", help="show the full traceback of an error (also QFORMER_DEBUG=1)")
    return p


def parse_recipe_args(stage: Stage, description: str, argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    card = _card_for_help(argv) if any(a in ("-h", "--help") for a in argv) else None
    return build_parser(stage, description, card=card).parse_args(argv)


def card_from_args(args: argparse.Namespace, stage: Stage) -> AdapterCard:
    """The adapter card with the command line applied, every section checked (``SCHEME://``
    resources are resolved later, once everything cheap has been checked)."""
    overrides = list(args.overrides)
    for f in fields(TrainConfig):
        if hasattr(args, f.name):
            overrides.append(f"{stage_key(stage)}.{f.name}={json.dumps(getattr(args, f.name))}")
    for f in fields(Stage1Config):
        if hasattr(args, f"objective_{f.name}"):
            overrides.append(f"stage1.objective.{f.name}={json.dumps(getattr(args, f'objective_{f.name}'))}")
    for key, value in (("train", args.train_data), ("eval", args.eval_data)):
        if value is not None:  # JSON is YAML: a one-element list stays a plain spec
            overrides.append(f"data.{stage_key(stage)}.{key}={json.dumps(value[0] if len(value) == 1 else value)}")
    for key in ("augment", "cache_features", "streaming", "caption_column", "image_column", "vqa_template", "vqa_answers"):
        value = getattr(args, key, None)
        # None: not given; --streaming is a store_true flag, so False means not given there too,
        # but "--augment false" / "--cache-features false" are values that override the card.
        if value is not None and not (key == "streaming" and value is False):
            overrides.append(f"data.{key}={json.dumps(value)}")
    if args.eval_size is not None:
        overrides.append(f"eval.{stage_key(stage)}.max_images={args.eval_size}")
    return load_adapter(args.adapter, overrides)


def debug_requested(argv: list[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get("QFORMER_DEBUG", "") not in ("", "0")


def error_line(e: BaseException) -> str:
    """``error: <message>`` on one line (the class name where it says what went wrong)."""
    message = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, FileNotFoundError) and e.filename and str(e.filename) not in message:
        message = f"{message}: {e.filename}"
    name = type(e).__name__
    shown = name in ("UnsafeCheckpointError", "NonFiniteLossError", "FileNotFoundError", "PermissionError")
    return f"error: {name}: {message}" if shown else f"error: {message}"


def run_main(main: Callable[[], Any]) -> None:
    """Run a recipe's ``main``; the library's own errors end it with one ``error: ...`` line."""
    try:
        main()
    except (QFormerError, FileNotFoundError, PermissionError) as e:
        if debug_requested():
            raise
        sys.stdout.flush()
        print(error_line(e), file=sys.stderr, flush=True)
        sys.exit(2)


__all__ = ["build_parser", "card_from_args", "debug_requested", "error_line", "parse_recipe_args", "run_main"]
