"""Writing a toy split to disk: an HF ``imagefolder`` of images and captions, and its VQA questions.

An export is ordinary user data (a folder of PNGs and a ``metadata.jsonl``), so recipes,
data loaders and evaluation treat the toy world exactly like a user's dataset. Files appear
atomically: the metadata (which makes the folder a dataset) is written last, and both JSONL
files go through a temporary name, so a reader never sees half of one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..io import atomic_write_text
from .questions import VQA_FILE

# The world these functions export: a ToyWorld (not imported: world.py imports this module).
ToyWorld = Any

__all__ = ["METADATA_FILE", "export_imagefolder", "export_vqa", "image_name"]

#: The imagefolder's metadata file (``datasets`` reads captions and attributes from it).
METADATA_FILE = "metadata.jsonl"


def image_name(index: int) -> str:
    """Path of sample ``index``'s image inside an export. No split word in it: HF would infer a
    split from the file name."""
    return f"images/{index:06d}.png"


def _check_range(world: ToyWorld, split: str, start: int, n: int) -> None:
    if start < 0 or n < 0 or start + n > world.split_size(split):
        raise IndexError(f"{split}[{start}:{start + n}] exceeds the split size {world.split_size(split)}")


def export_imagefolder(
    world: ToyWorld, split: str, n: int, out_dir: str | Path, *, start: int = 0, overwrite: bool = False
) -> Path:
    """Write samples ``start..start+n`` of ``split`` as an HF ``imagefolder`` dataset.

    Layout: ``out_dir/images/<index>.png`` and ``out_dir/metadata.jsonl`` with one
    ``{"file_name", "text", "captions", "attributes"}`` line per image (``attributes`` is a
    JSON string, so the column has a flat type). ``datasets.load_dataset("imagefolder",
    data_dir=out_dir)`` loads it as a "train" split, like any user folder, and recipes can
    treat it exactly like user data.
    """
    _check_range(world, split, start, n)
    out = Path(out_dir)
    meta_path = out / METADATA_FILE
    if meta_path.exists() and not overwrite:
        raise FileExistsError(f"{meta_path} exists; pass overwrite=True to replace it")
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(start, start + n):
        sample = world.sample(split, i)
        name = image_name(i)
        sample.image.save(out / name)
        row = {
            "file_name": name,
            "text": sample.caption,
            "captions": sample.captions,
            "attributes": json.dumps(sample.attributes),
        }
        lines.append(json.dumps(row) + "\n")
    atomic_write_text(meta_path, "".join(lines))  # the metadata appears only once every image is written
    return out


def export_vqa(
    world: ToyWorld, split: str, n: int, out_dir: str | Path, *, start: int = 0, num_questions: int = 3,
    overwrite: bool = False,
) -> Path:
    """Write the questions of samples ``start..start+n`` of ``split`` as ``out_dir/vqa.jsonl``,
    next to the images :func:`export_imagefolder` wrote there (export them first).

    One line per question: ``{"question_id", "image", "question", "answers" (ten, VQAv2
    style), "answer", "answer_type", "question_type"}``, ``image`` relative to ``out_dir``.
    Each exported image's scene key (``metadata.jsonl``) is checked against the scene the
    questions are about, so questions never land next to another world's images.
    The file is written under a temporary name and renamed when complete, so two processes
    exporting into one folder (a shared cache) never interleave or leave half a file.
    Returns the file's path.
    """
    _check_range(world, split, start, n)
    out = Path(out_dir)
    meta_path, vqa_path = out / METADATA_FILE, out / VQA_FILE
    if vqa_path.exists() and not overwrite:
        raise FileExistsError(f"{vqa_path} exists; pass overwrite=True to replace it")
    if not meta_path.is_file():
        raise FileNotFoundError(2, "no exported images here (run ToyWorld.export first)", str(meta_path))
    keys: dict[str, str | None] = {}
    for line in meta_path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            keys[row["file_name"]] = json.loads(row["attributes"])["key"] if "attributes" in row else None
    lines = []
    for i in range(start, start + n):
        name = image_name(i)
        if name not in keys:
            raise FileNotFoundError(2, f"{split}[{i}] was not exported here", str(out / name))
        scene = world.scene(split, i)
        if keys[name] is not None and keys[name] != scene.key:
            raise ValueError(f"{meta_path}: {name} shows {keys[name]!r}, but {split}[{i}] of this world is "
                             f"{scene.key!r}: the images were exported from another world or split")
        for k, q in enumerate(world.questions(split, i, num_questions)):
            lines.append(json.dumps({"question_id": f"{split}-{i:06d}-{k}", "image": name, **q.to_dict()}) + "\n")
    atomic_write_text(vqa_path, "".join(lines))
    return vqa_path
