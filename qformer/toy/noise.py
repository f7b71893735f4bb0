"""A noisy toy split that looks like web data, and a small clean subset (BLIP's CapFilt setting).

Web alt-texts are often about another picture or get a detail wrong. :func:`noisy_rows` corrupts
a given fraction of a split's captions in those two ways, seeded and documented:

* ``swapped`` (half of the corrupted rows, rounded down): the caption of another scene of the
  split (one whose semantic key differs), as an alt-text that belongs to another page;
* ``altered`` (the other half): the scene's own caption with exactly one fact wrong -- one
  object's shape, colour or size changed to another value, or one relation stated the other
  way round ("left of" -> "right of") -- written by the world's own caption generator, so the
  wrong caption is as fluent as a right one and differs from the truth in one word or two.

Which rows are corrupted is a seeded choice of exactly ``round(fraction * n)`` rows; each
row's corruption is a pure function of (seed, split, index), so the same options always give
the same file. Every row keeps its clean caption (``clean_text``) and says what was done
(``noise``: ``clean`` / ``swapped`` / ``altered``): training reads ``text`` only; the
experiment reads the rest to score a filter.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write_text
from .export import METADATA_FILE, image_name
from .language import COLOUR_WORDS, SHAPE_WORDS, SIZE_WORDS, scene_captions
from .scenes import INVERSE, SPLIT_ID, ToyScene
from .world import ToyWorld


__all__ = ["NOISE_KINDS", "alter_scene", "clean_subset_file", "noisy_file", "noisy_rows"]

NOISE_KINDS: tuple[str, ...] = ("clean", "swapped", "altered")
_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": tuple(SHAPE_WORDS), "colour": tuple(COLOUR_WORDS), "size": tuple(SIZE_WORDS),
}


def alter_scene(scene: ToyScene, rng: np.random.Generator) -> ToyScene:
    """``scene`` with exactly one fact changed: an object's attribute, or a relation reversed.
    The result's semantic key always differs from ``scene``'s (a caption of it is wrong)."""
    for _ in range(100):
        if scene.relations and rng.random() < 0.25:  # relations are rarer in captions than attributes
            k = int(rng.integers(len(scene.relations)))
            s, rel, a = scene.relations[k]
            relations = list(scene.relations)
            relations[k] = (s, INVERSE[rel], a)
            out = replace(scene, relations=tuple(relations))
        else:
            i = int(rng.integers(len(scene.objects)))
            attribute = str(rng.choice(list(_ATTRIBUTES)))
            old = getattr(scene.objects[i], attribute)
            new = str(rng.choice([v for v in _ATTRIBUTES[attribute] if v != old]))
            objects = list(scene.objects)
            objects[i] = replace(objects[i], **{attribute: new})
            out = replace(scene, objects=tuple(objects))
        if out.key != scene.key:  # e.g. reversing "A left of B" between two identical objects says nothing new
            return out
    raise RuntimeError(f"could not alter scene {scene.key!r}")


def noisy_rows(world: ToyWorld, split: str, n: int, *, fraction: float, seed: int = 0) -> list[dict[str, Any]]:
    """The first ``n`` samples of ``split`` as caption rows, ``round(fraction * n)`` of them
    corrupted (module docstring). Rows: ``{"file_name", "text", "clean_text", "noise"}``, with
    ``file_name`` as in the split's imagefolder export."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the noise fraction must be within [0, 1], got {fraction}")
    scenes = [world.scene(split, i) for i in range(n)]
    clean = [scene_captions(s, 1)[0] for s in scenes]  # == the export's "text" (its first caption)
    order = np.random.default_rng([seed, SPLIT_ID[split], n]).permutation(n)
    corrupted = order[: round(fraction * n)]
    kind = ["clean"] * n
    for j, i in enumerate(corrupted):
        kind[int(i)] = "swapped" if j < len(corrupted) // 2 else "altered"
    rows = []
    for i, scene in enumerate(scenes):
        rng = np.random.default_rng([seed, SPLIT_ID[split], i, 7])
        text = clean[i]
        if kind[i] == "swapped":
            for _ in range(100):
                j = int(rng.integers(n))
                if scenes[j].key != scene.key:
                    text = clean[j]
                    break
            else:
                raise RuntimeError(f"{split}: no other scene to swap a caption with")
        elif kind[i] == "altered":
            text = scene_captions(alter_scene(scene, rng), 1)[0]
        rows.append({"file_name": image_name(i), "text": text, "clean_text": clean[i], "noise": kind[i]})
    return rows


def noisy_file(world: ToyWorld, split: str, n: int, folder: str | Path, *, fraction: float, seed: int = 0) -> Path:
    """``noisy-F-sS.jsonl`` beside ``folder``'s exported ``metadata.jsonl`` (so its image paths
    resolve), written once, atomically. Checks the export shows the same scenes."""
    folder = Path(folder)
    path = folder / f"noisy-{fraction:g}-s{seed}.jsonl"
    if path.is_file():
        return path
    meta = folder / METADATA_FILE
    texts = {}
    for line in meta.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            texts[row["file_name"]] = row["text"]
    rows = noisy_rows(world, split, n, fraction=fraction, seed=seed)
    for row in rows:
        if texts.get(row["file_name"]) != row["clean_text"]:
            raise ValueError(f"{meta}: {row['file_name']} is not {split}'s sample of this world "
                             "(exported from another world or split)")
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def clean_subset_file(folder: str | Path, *, fraction: float) -> Path:
    """``clean-F.jsonl``: the first ``fraction`` of ``folder``'s exported rows, clean (the small
    human-annotated set CapFilt's captioner and filter are fine-tuned on)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the clean fraction must be within (0, 1], got {fraction}")
    folder = Path(folder)
    path = folder / f"clean-{fraction:g}.jsonl"
    if not path.is_file():
        lines = [x for x in (folder / METADATA_FILE).read_text(encoding="utf-8").splitlines() if x.strip()]
        keep = max(1, round(fraction * len(lines)))
        atomic_write_text(path, "".join(x + "\n" for x in lines[:keep]))
    return path
