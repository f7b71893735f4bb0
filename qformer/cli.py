"""Command-line options shared by ``recipes/stage1.py`` and ``recipes/stage2.py``.

Every training option maps onto a field of the adapter card (``stage1.*`` / ``stage2.*``,
``data.*``); ``--set`` reaches any other card field. What the command line gives wins over
the card, which wins over the library defaults.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from .adapters import AdapterCard, list_adapters, load_adapter
from .training import TrainConfig

_TRAIN_HELP = {
    "lr": "peak learning rate",
    "min_lr": "final learning rate of the cosine decay",
    "warmup_lr": "learning rate at step 0 of the linear warmup",
    "warmup_steps": "optimizer steps of linear warmup",
    "weight_decay": "AdamW weight decay (not applied to biases, norms and scalars)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2 (the paper uses 0.98)",
    "max_grad_norm": "clip the gradient norm to this (default: no clipping)",
    "batch_size": "samples per process per micro-step",
    "grad_accum": "micro-steps per optimizer step",
    "max_steps": "optimizer steps to train for",
    "log_every": "log metrics every N optimizer steps",
    "eval_every": "evaluate on the held-out set every N optimizer steps",
    "save_every": "write a checkpoint every N optimizer steps",
    "keep_checkpoints": "how many recent checkpoints to keep",
    "mixed_precision": "no | bf16 | fp16 (bf16 is fast on this project's CPUs and on GPUs; never fp16 on CPU)",
    "gradient_checkpointing": "recompute Q-Former activations in the backward pass to save memory",
    "seed": "seed of data order, augmentation, dropout and ITM negatives",
    "num_workers": "DataLoader worker processes per rank",
    "clamp_temperature": "clamp the ITC temperature to [0.001, 0.5] after each step (BLIP/ALBEF; LAVIS BLIP-2 does not)",
    "itc_weight": "weight of the ITC loss in the stage-1 sum (BLIP-2: 1)",
    "itm_weight": "weight of the ITM loss in the stage-1 sum (BLIP-2: 1)",
    "itg_weight": "weight of the ITG loss in the stage-1 sum (BLIP-2: 1)",
    "loss_ramp_steps": "ramp the ITM and ITG weights linearly from 0 over the first N steps so that ITC leads "
                       "(helps a Q-Former trained from scratch; 0 = BLIP-2's constant weights)",
}
_STAGE1_ONLY = {"itc_weight", "itm_weight", "itg_weight", "loss_ramp_steps"}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser(stage: int, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Adapter cards: " + ", ".join(list_adapters()) + ". Any card field can be set with --set.",
    )
    g = p.add_argument_group("what to train")
    g.add_argument("--adapter", default="toy",
                   help="adapter card name (adapters/NAME.yaml) or path: the frozen-backbone pairing and its defaults")
    g.add_argument("--output-dir", type=Path, default=None,
                   help=f"where checkpoints, logs, plots and the final model go (default: runs/ADAPTER/stage{stage})")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any card field with a dotted key, e.g. --set model.qformer.num_layers=6 (repeatable)")
    if stage == 2:
        g.add_argument("--init-from", type=Path, default=None,
                       help="stage-1 model directory to start from (default: runs/ADAPTER/stage1/model)")
        g.add_argument("--keep-stage1-heads", action="store_true",
                       help="keep the Q-Former's text parts and ITC/ITM heads (LAVIS drops them in stage 2)")
    d = p.add_argument_group("data")
    d.add_argument("--train-data", nargs="+", default=None, metavar="DATA",
                   help="training data, one or more (concatenated): a hub dataset name, an imagefolder dir with "
                        "metadata.jsonl, a .jsonl/.json/.csv of image path + caption, or webdataset shards "
                        "('shards/{000..099}.tar')")
    d.add_argument("--eval-data", nargs="+", default=None, metavar="DATA",
                   help="held-out data for periodic and final evaluation (same forms)")
    d.add_argument("--eval-size", type=int, default=None, help="held-out images to evaluate on (default: card's eval.*.max_images)")
    d.add_argument("--streaming", action="store_true", help="stream the training data instead of indexing it")
    d.add_argument("--augment", type=_bool, default=None,
                   help="BLIP-2's random crop + flip (default: card data.augment, else true); off enables --cache-features")
    d.add_argument("--cache-features", type=_bool, default=None,
                   help="cache the frozen tower's features on disk (needs --augment false; default: card data.cache_features)")
    t = p.add_argument_group(f"training (defaults from the card's stage{stage} section)")
    for f in fields(TrainConfig):
        if stage != 1 and f.name in _STAGE1_ONLY:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = {int: int, float: float, bool: _bool}.get(type(f.default), None)
        if f.name == "max_grad_norm":
            kind = float
        if f.name == "mixed_precision":
            t.add_argument(flag, dest=f.name, choices=["no", "bf16", "fp16"], default=None, help=_TRAIN_HELP[f.name])
        else:
            t.add_argument(flag, dest=f.name, type=kind or str, default=None, help=_TRAIN_HELP.get(f.name, f.name))
    r = p.add_argument_group("run control")
    r.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint dir, or the latest one in --output-dir (same data order, RNG, schedule)")
    r.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N optimizer steps of this invocation, checkpointed (continue with --resume)")
    r.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def card_from_args(args: argparse.Namespace, stage: int) -> AdapterCard:
    """The adapter card with the command line applied (``toy://`` resources are resolved
    later, by :func:`qformer.recipe.start_run`, on the main process first)."""
    overrides = list(args.overrides)
    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            overrides.append(f"stage{stage}.{f.name}={value}")
    for key, value in (("train", args.train_data), ("eval", args.eval_data)):
        if value is not None:  # JSON is YAML: a one-element list stays a plain spec
            overrides.append(f"data.stage{stage}.{key}={json.dumps(value[0] if len(value) == 1 else value)}")
    for key in ("augment", "cache_features", "streaming"):
        value = getattr(args, key, None)
        if value not in (None, False):
            overrides.append(f"data.{key}={value}")
    return load_adapter(args.adapter, overrides)


__all__ = ["build_parser", "card_from_args"]
