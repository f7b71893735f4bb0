"""Helpers of the toy world's multi-run experiments (``recipes/noisy_toy.py``,
``recipes/finetune_toy.py``): run a recipe once into its folder (resumable run by run), summarise
a metric over seeds, and the world's paraphrase data (several captions per scene, one image id)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from ..adapters import load_adapter
from .plugin import resolve

__all__ = ["card_resource", "paraphrase_file", "run_recipe", "spread"]


def card_resource(name: str, overrides: Sequence[str] = ()) -> str:
    """The value of ``toy://NAME`` with the toy card's plugin options (``overrides``: ``--set``
    style ``key=value`` changes to the card), prepared on first use: e.g. a split's file on disk."""
    card = load_adapter("toy", list(overrides))
    return resolve({name}, dict(card.plugins["toy"]), progress=False)[name]


def run_recipe(args: Sequence[str], out: Path, log: Path) -> Path:
    """``python ARGS --no-progress`` into ``out``, its output in ``log``; skipped when ``out``
    already holds a finished run (``results.json``, or CapFilt's ``capfilt.jsonl``), so a killed
    experiment resumes at the run it was in. A failing run stops the experiment, naming its log."""
    if (out / "results.json").is_file() or (out / "capfilt.jsonl").is_file():
        print(f"  {out}: done before, kept")
        return out
    print(f"  {out}: {' '.join(args)}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        code = subprocess.call([sys.executable, *args, "--no-progress"], stdout=f, stderr=subprocess.STDOUT)
    if code:
        sys.exit(f"error: {args[0]} failed (exit {code}); its output is in {log}")
    return out


def spread(values: Sequence[float], digits: int = 1) -> str:
    """``min / median / max`` to ``digits`` decimals."""
    return " / ".join(f"{v:.{digits}f}" for v in (min(values), statistics.median(values), max(values)))


def paraphrase_file(metadata: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A JSONL of ``metadata``'s scenes (a toy export's ``metadata.jsonl``) with every caption
    variant: ``{"image", "captions", "image_id"}`` per scene, the image an absolute path. The
    caption sources read a list column as one record per caption, all with the scene's
    ``image_id``: the layout of COCO's five captions per image (``prepare_data.py coco``), for
    stage 1's image-id positives. Written atomically; kept when it exists."""
    out = Path(out)
    if out.is_file():
        return out
    root = Path(metadata).resolve().parent
    lines = []
    with open(metadata, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                lines.append(json.dumps({"image": str(root / row["file_name"]), "captions": list(row["captions"]),
                                         "image_id": row["file_name"]}))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out
