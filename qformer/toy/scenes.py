"""What a toy scene is, and how scenes are drawn and assigned to splits.

Design choices, and why:

* **2-3 objects per image, each with a shape, a colour and a size, placed on a 4x4 grid
  of cells** (one object per cell at most). A caption names every object with all three
  attributes and states how they sit relative to each other ("a large red circle to the
  left of a small blue square").
  Objects relate to an *anchor* object along a row or a column of the grid, so every
  stated relation is visually unambiguous (A is in the same row as B and to its left).
* **Retrieval must not be trivial**: with 8 shapes x 8 colours x 2 sizes = 128 object
  types there are ~32.5k distinct two-object scenes and ~12.3M three-object scenes (see
  :meth:`qformer.toy.ToyWorld.space_size`), each drawable in many layouts. Among hundreds
  of held-out candidates, many differ from the right one in a single word (one colour, one
  size, one relation), so a model has to bind attributes to objects and objects to
  positions to rank the right one first.
* **Splits are disjoint by construction, at the level of scene *semantics*.** Every scene
  has a canonical key (its objects and relations, independent of exact position, jitter,
  noise and wording); a seeded hash of the key assigns it to train (90 %), val (5 %) or
  test (5 %), and each split only keeps scenes whose key hashes to it. Held-out images
  therefore show compositions never seen in training (their objects and pairs are seen,
  in other arrangements), so held-out retrieval measures generalisation, not memory.
* **Everything is a pure function of (seed, split, index)**: scenes are drawn from
  ``numpy.random.default_rng([seed, split_id, index, attempt])`` (see
  :class:`qformer.toy.ToyWorld`), so the train split can be as large as one likes and is
  generated lazily, in any order, in any process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "SHAPES",
    "COLOURS",
    "SIZES",
    "RELATIONS",
    "SPLITS",
    "INVERSE",
    "ToyObject",
    "ToyScene",
    "ToySample",
    "draw_scene",
    "split_of_key",
]

# ----------------------------------------------------------------------------------------
# The world's canonical attribute values (what ``attributes`` and scene keys contain;
# captions say them with synonyms, see qformer.toy.language).
# ----------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "heart")
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")
SIZES: tuple[str, ...] = ("small", "large")
# Relations of a subject object to its anchor object ("subject is <rel> anchor").
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
SPLITS: tuple[str, ...] = ("train", "val", "test")

INVERSE: dict[str, str] = {"left": "right", "right": "left", "above": "below", "below": "above"}
# Grid step (d_row, d_col) that moves *from the anchor towards the subject*.
DIRECTION: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "above": (-1, 0), "below": (1, 0)}

# Mid-range RGB per colour name; each object gets a small per-channel jitter around it.
BASE_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (240, 225, 45),
    "green": (45, 185, 65),
    "cyan": (40, 215, 225),
    "blue": (45, 85, 235),
    "purple": (150, 60, 205),
    "white": (240, 240, 240),
}
# Object diameter as a fraction of the grid cell, per size.
SIZE_FRACTION: dict[str, tuple[float, float]] = {"small": (0.52, 0.62), "large": (0.84, 0.94)}
# Location words for single-object scenes (only used when object_counts includes 1). They are
# part of a lone object's scene key, because a caption can tell "top left" from "center".
ROW_WORDS: tuple[str, ...] = ("top", "middle", "bottom")
COL_WORDS: tuple[str, ...] = ("left", "middle", "right")

SPLIT_ID: dict[str, int] = {"train": 0, "val": 1, "test": 2}
# Hash buckets (out of 1000) that belong to each split when holdout="scene".
SPLIT_BUCKETS: dict[str, tuple[int, int]] = {"train": (0, 900), "val": (900, 950), "test": (950, 1000)}


def pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    """One of ``options``, uniformly (the one way every module draws a word or a value)."""
    return options[int(rng.integers(len(options)))]


# ----------------------------------------------------------------------------------------
# Scene description
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyObject:
    """One object: canonical attribute names plus where it was drawn (in pixels)."""

    shape: str
    colour: str
    size: str
    row: int  # grid cell row, 0 = top
    col: int  # grid cell column, 0 = left
    center: tuple[float, float]  # (x, y) in pixels
    diameter: float  # in pixels
    rgb: tuple[int, int, int]

    @property
    def name(self) -> str:
        """Canonical description "size colour shape", e.g. "large red circle"."""
        return f"{self.size} {self.colour} {self.shape}"

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        r = self.diameter / 2
        return (self.center[0] - r, self.center[1] - r, self.center[0] + r, self.center[1] + r)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "row": self.row,
            "col": self.col,
            "center": [round(self.center[0], 2), round(self.center[1], 2)],
            "bbox": [round(v, 2) for v in self.bbox],
        }


def location_phrase(o: ToyObject, grid: int) -> str:
    """Where a lone object is, in words (rows/columns between the edges are "middle")."""

    def third(i: int) -> int:
        return 0 if i == 0 else 2 if i == grid - 1 else 1

    r, c = ROW_WORDS[third(o.row)], COL_WORDS[third(o.col)]
    if r == "middle" and c == "middle":
        return "in the center"
    if r == "middle":
        return f"on the {c}"
    if c == "middle":
        return f"at the {r}"
    return f"in the {r} {c} corner"


@dataclass(frozen=True)
class ToyScene:
    """Everything needed to render an image and write its captions, deterministically.

    ``relations`` are ``(subject_index, relation, anchor_index)`` triples with relation in
    :data:`RELATIONS`; all of them are true in the image and all are stated in captions.
    """

    objects: tuple[ToyObject, ...]
    relations: tuple[tuple[int, str, int], ...]
    background: tuple[int, int, int]
    gradient: tuple[float, float]  # background brightness slope along (x, y), per image
    texture_seed: int
    caption_seed: int
    grid: int = 4  # the world's grid (cells per side)

    @property
    def key(self) -> str:
        """Canonical semantic key: equal for two scenes iff a caption cannot tell them apart.

        Relations are normalised to "left"/"above" (``A right of B`` == ``B left of A``), and
        positions, jitter, texture and wording are ignored.
        """
        if len(self.objects) == 1:
            o = self.objects[0]
            return f"{o.name} {location_phrase(o, self.grid)}"
        parts = []
        for s, rel, a in self.relations:
            subj, anchor = self.objects[s].name, self.objects[a].name
            if rel in ("right", "below"):
                subj, anchor, rel = anchor, subj, INVERSE[rel]
            parts.append(f"{subj} {rel} {anchor}")
        return " | ".join(sorted(parts))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly attributes (what :class:`ToySample` exposes)."""
        return {
            "num_objects": len(self.objects),
            "objects": [o.to_dict() for o in self.objects],
            "relations": [{"subject": s, "relation": r, "anchor": a} for s, r, a in self.relations],
            "key": self.key,
        }


@dataclass
class ToySample:
    """One (image, caption) pair of the toy world.

    ``caption`` is ``captions[0]``; the other variants are paraphrases of the same scene
    (different templates, synonyms and object order), usable as COCO-style extra captions.
    ``attributes`` is :meth:`ToyScene.to_dict` (objects with canonical attribute names,
    grid cells and pixel boxes; relations; the semantic key).
    """

    image: Image.Image
    caption: str
    captions: list[str]
    attributes: dict[str, Any]
    split: str = ""
    index: int = -1


# ----------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------


def split_bucket(seed: int, key: str) -> int:
    """The hash bucket (0..999) of a scene key in the world of ``seed``."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 1000


def split_of_key(seed: int, key: str) -> str:
    """Which split a semantic scene key belongs to under ``holdout="scene"``."""
    b = split_bucket(seed, key)
    return next(s for s, (lo, hi) in SPLIT_BUCKETS.items() if lo <= b < hi)


# ----------------------------------------------------------------------------------------
# Drawing a scene
# ----------------------------------------------------------------------------------------


def cells_towards(anchor: tuple[int, int], direction: str, grid: int) -> list[tuple[int, int]]:
    """Cells in the anchor's row/column on the ``direction`` side of it."""
    dr, dc = DIRECTION[direction]
    out, (r, c) = [], anchor
    while 0 <= r + dr < grid and 0 <= c + dc < grid:
        r, c = r + dr, c + dc
        out.append((r, c))
    return out


def draw_scene(
    rng: np.random.Generator,
    *,
    object_counts: Sequence[int],
    count_p: np.ndarray,
    grid: int,
    image_size: int,
) -> ToyScene:
    """One random scene. Every draw from ``rng`` happens in a fixed order (changing that order
    changes every world's scenes, and every cache built on them)."""
    n = int(object_counts[rng.choice(len(object_counts), p=count_p)])
    # Distinct object types, so that "it" and "the red circle" are never ambiguous.
    types: list[tuple[str, str, str]] = []
    while len(types) < n:
        t = (pick(rng, SHAPES), pick(rng, COLOURS), pick(rng, SIZES))
        if t not in types:
            types.append(t)
    # Layout: an anchor cell and subjects along its row/column.
    cells: list[tuple[int, int]]
    relations: list[tuple[int, str, int]] = []
    anchor = (int(rng.integers(grid)), int(rng.integers(grid)))
    if n == 1:
        cells = [anchor]
    else:
        free = [d for d in RELATIONS if cells_towards(anchor, d, grid)]
        dirs = [free[i] for i in rng.permutation(len(free))[: n - 1]]
        subj_cells = []
        for d in dirs:
            options = cells_towards(anchor, d, grid)
            subj_cells.append(options[int(rng.integers(len(options)))])
        if n == 2:  # objects: [subject, anchor]
            cells = [subj_cells[0], anchor]
            relations = [(0, dirs[0], 1)]
        else:  # objects: [subject 1, anchor, subject 2]
            cells = [subj_cells[0], anchor, subj_cells[1]]
            relations = [(0, dirs[0], 1), (2, dirs[1], 1)]
    cell = image_size / grid
    objects = []
    for (shape, colour, size), (row, col) in zip(types, cells):
        lo, hi = SIZE_FRACTION[size]
        diameter = cell * float(rng.uniform(lo, hi))
        slack = 0.45 * (cell - diameter)  # keep the object inside its cell
        cx = (col + 0.5) * cell + float(rng.uniform(-slack, slack))
        cy = (row + 0.5) * cell + float(rng.uniform(-slack, slack))
        base = np.asarray(BASE_RGB[colour])
        rgb = tuple(int(v) for v in np.clip(base + rng.integers(-14, 15, size=3), 0, 255))
        objects.append(ToyObject(shape, colour, size, row, col, (cx, cy), diameter, rgb))  # type: ignore[arg-type]
    grey = int(rng.integers(35, 96))
    background = tuple(int(v) for v in np.clip(grey + rng.integers(-8, 9, size=3), 0, 255))
    gradient = (float(rng.uniform(-10, 10)), float(rng.uniform(-10, 10)))
    seeds = rng.integers(0, 2**62, size=2)
    return ToyScene(
        objects=tuple(objects),
        relations=tuple(relations),
        background=background,  # type: ignore[arg-type]
        gradient=gradient,
        texture_seed=int(seeds[0]),
        caption_seed=int(seeds[1]),
        grid=grid,
    )
