"""The toy world: seeded synthetic scenes of coloured shapes with English captions.

Why a synthetic world at all: the product's default run must show the whole BLIP-2
pipeline (stage 1 ITC/ITM/ITG, stage 2 soft prompts into a frozen LM) learning on a 2-core
CPU in minutes, with no downloads. Real image-text data cannot be that small and still
learnable, so we generate it: every image is a few shapes on a lightly textured background
and every caption states exactly what is in it.

Design choices, and why:

* **2-3 objects per image, each with a shape, a colour and a size, placed on a 4x4 grid
  of cells** (one object per cell at most). A caption names every object with all three
  attributes and states how they sit relative to each other ("a large red circle to the
  left of a small blue square").
  Objects relate to an *anchor* object along a row or a column of the grid, so every
  stated relation is visually unambiguous (A is in the same row as B and to its left).
* **Retrieval must not be trivial**: with 8 shapes x 8 colours x 2 sizes = 128 object
  types there are ~32.5k distinct two-object scenes and ~12.3M three-object scenes (see
  :meth:`ToyWorld.space_size`), each drawable in many layouts. Among hundreds of
  held-out candidates, many differ from the right one in a single word (one colour, one
  size, one relation), so a model has to bind attributes to objects and objects to
  positions to rank the right one first.
* **64x64 pixels, 16 px cells by default.** The frozen ViT uses 16 px patches aligned
  with the cells, so it sees 1 + 16 tokens and each patch holds at most one whole
  object: few image tokens keep the tower and the Q-Former's cross-attention cheap on
  CPU, and the tower learns in a couple of minutes (after equal steps, 8 px patches that
  cut objects apart reached 18 % shape accuracy, aligned 16 px patches 54 %). Objects keep a random offset inside their
  cell, and 4x supersampled (anti-aliased) rendering keeps a 9 px star distinguishable
  from a cross.
* **Splits are disjoint by construction, at the level of scene *semantics*.** Every scene
  has a canonical key (its objects and relations, independent of exact position, jitter,
  noise and wording); a seeded hash of the key assigns it to train (90 %), val (5 %) or
  test (5 %), and each split only keeps scenes whose key hashes to it. Held-out images
  therefore show compositions never seen in training (their objects and pairs are seen,
  in other arrangements), so held-out retrieval measures generalisation, not memory.
* **Everything is a pure function of (seed, split, index)**: scenes are drawn from
  ``numpy.random.default_rng([seed, split_id, index, attempt])``, so the train split can be
  as large as one likes and is generated lazily, in any order, in any process.

The module depends only on numpy and Pillow, so data loaders can import it cheaply.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES",
    "COLOURS",
    "SIZES",
    "RELATIONS",
    "SPLITS",
    "ToyObject",
    "ToyScene",
    "ToySample",
    "ToySplit",
    "ToyWorld",
    "CaptionMention",
    "parse_caption",
    "score_caption",
    "caption_vocabulary",
    "QUESTION_TYPES",
    "VQA_FILE",
    "ToyQuestion",
    "toy_questions",
]

# ----------------------------------------------------------------------------------------
# The world's vocabulary. The first word of every synonym list is the canonical name that
# appears in ``attributes``; captions draw from the whole list.
# ----------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "heart")
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")
SIZES: tuple[str, ...] = ("small", "large")
# Relations of a subject object to its anchor object ("subject is <rel> anchor").
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
SPLITS: tuple[str, ...] = ("train", "val", "test")

SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disk"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
    "star": ("star",),
    "cross": ("cross", "plus"),
    "ring": ("ring", "donut"),
    "heart": ("heart",),
}
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red",),
    "orange": ("orange",),
    "yellow": ("yellow",),
    "green": ("green",),
    "cyan": ("cyan", "turquoise"),
    "blue": ("blue",),
    "purple": ("purple", "violet"),
    "white": ("white",),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big"),
}
# Precise phrases: "<subject> <phrase> <anchor>".
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
# Vague phrases for horizontal relations, used only in non-first caption variants.
VAGUE_HORIZONTAL: tuple[str, ...] = ("next to", "beside")
INVERSE: dict[str, str] = {"left": "right", "right": "left", "above": "below", "below": "above"}
# Grid step (d_row, d_col) that moves *from the anchor towards the subject*.
_DIRECTION: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "above": (-1, 0), "below": (1, 0)}

# Mid-range RGB per colour name; each object gets a small per-channel jitter around it.
_RGB: dict[str, tuple[int, int, int]] = {
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
_SIZE_FRACTION: dict[str, tuple[float, float]] = {"small": (0.52, 0.62), "large": (0.84, 0.94)}
# Location phrases for single-object scenes (only used when object_counts includes 1).
_ROW_WORDS = ("top", "middle", "bottom")
_COL_WORDS = ("left", "middle", "right")

_SPLIT_ID: dict[str, int] = {"train": 0, "val": 1, "test": 2}
# Hash buckets (out of 1000) that belong to each split when holdout="scene".
_SPLIT_BUCKETS: dict[str, tuple[int, int]] = {"train": (0, 900), "val": (900, 950), "test": (950, 1000)}



def _article(next_word: str) -> str:
    return "an" if next_word[:1] in "aeiou" else "a"


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
            return f"{o.name} {_location(o, self.grid)}"
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
# Captions
# ----------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _np(o: ToyObject, rng: np.random.Generator) -> str:
    """Full noun phrase: "a big red circle"."""
    words = f"{_pick(rng, SIZE_WORDS[o.size])} {_pick(rng, COLOUR_WORDS[o.colour])} {_pick(rng, SHAPE_WORDS[o.shape])}"
    return f"{_article(words)} {words}"


def _ref(o: ToyObject, rng: np.random.Generator) -> str:
    """Second mention: "the red circle" (the size was already stated)."""
    return f"the {_pick(rng, COLOUR_WORDS[o.colour])} {_pick(rng, SHAPE_WORDS[o.shape])}"


def _rel(rel: str, rng: np.random.Generator, vague: bool) -> str:
    if vague and rel in ("left", "right") and rng.random() < 0.3:
        return _pick(rng, VAGUE_HORIZONTAL)
    return _pick(rng, RELATION_WORDS[rel])


_PREFIXES: tuple[str, ...] = ("", "", "", "", "there is ", "a picture of ", "an image of ", "a photo of ")
# Literal words used by the templates below (kept in sync by tests/test_toy_world.py, which
# checks that every generated caption word is in caption_vocabulary()).
_TEMPLATE_WORDS: tuple[str, ...] = (
    "a", "an", "the", "is", "and", "with", "it", "placed", "sits", "in", "at", "on", "corner", "center",
)  # fmt: skip


def _location(o: ToyObject, grid: int) -> str:
    """Where a lone object is, in words (rows/columns between the edges are "middle")."""

    def third(i: int) -> int:
        return 0 if i == 0 else 2 if i == grid - 1 else 1

    r, c = _ROW_WORDS[third(o.row)], _COL_WORDS[third(o.col)]
    if r == "middle" and c == "middle":
        return "in the center"
    if r == "middle":
        return f"on the {c}"
    if c == "middle":
        return f"at the {r}"
    return f"in the {r} {c} corner"


def _caption(scene: ToyScene, rng: np.random.Generator, vague: bool) -> str:
    """One caption of ``scene`` from a randomly chosen template."""
    objs, rels = scene.objects, scene.relations
    prefix = _pick(rng, _PREFIXES)
    if len(objs) == 1:
        return f"{prefix}{_np(objs[0], rng)} {_location(objs[0], scene.grid)}"
    if len(objs) == 2:
        s, rel, a = rels[0]
        if rng.random() < 0.5:  # state it from the other side: "B right of A"
            s, rel, a = a, INVERSE[rel], s
        x, y, r = objs[s], objs[a], _rel(rel, rng, vague)
        t = int(rng.integers(4))
        if t == 0:
            return f"{prefix}{_np(x, rng)} {r} {_np(y, rng)}"
        if t == 1:
            return f"{_np(x, rng)} is {r} {_np(y, rng)}"
        if t == 2:
            return f"{_np(x, rng)} {_pick(rng, ('placed', 'sits'))} {r} {_np(y, rng)}"
        return f"{prefix}{_np(y, rng)} with {_np(x, rng)} {r} it"
    # Three objects: two subjects related to one shared anchor.
    (s1, r1, a), (s2, r2, _) = rels
    if rng.random() < 0.5:
        s1, r1, s2, r2 = s2, r2, s1, r1
    x1, x2, y = objs[s1], objs[s2], objs[a]
    p1, p2 = _rel(r1, rng, vague), _rel(r2, rng, vague)
    t = int(rng.integers(4))
    if t == 0:
        return f"{prefix}{_np(x1, rng)} {p1} {_np(y, rng)}, and {_np(x2, rng)} {p2} it"
    if t == 1:
        return f"{prefix}{_np(y, rng)} with {_np(x1, rng)} {p1} it and {_np(x2, rng)} {p2} it"
    if t == 2:
        return f"{_np(x1, rng)} is {p1} {_np(y, rng)}, and {_np(x2, rng)} is {p2} {_ref(y, rng)}"
    return f"{prefix}{_np(x1, rng)} {p1} {_np(y, rng)} and {_np(x2, rng)} {p2} {_ref(y, rng)}"


def caption_vocabulary() -> list[str]:
    """Every word (and punctuation mark) a toy caption can contain, sorted.

    Tokenizers for the toy backbones are built from this list, which is why it is derived
    from the synonym tables rather than from sampled captions: it is complete by design.
    """
    words: set[str] = {","}
    tables: list[Sequence[str]] = [*SHAPE_WORDS.values(), *COLOUR_WORDS.values(), *SIZE_WORDS.values()]
    tables += [*RELATION_WORDS.values(), VAGUE_HORIZONTAL, _PREFIXES, _TEMPLATE_WORDS, _ROW_WORDS, _COL_WORDS]
    for table in tables:
        for phrase in table:
            words.update(phrase.split())
    return sorted(words)


@dataclass(frozen=True)
class CaptionMention:
    """An object named in a caption: "size colour shape" with canonical attribute names."""

    size: str
    colour: str
    shape: str
    start: int  # word index of the size word

    @property
    def name(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


def _inverse_table(table: dict[str, tuple[str, ...]]) -> dict[str, str]:
    return {word: canon for canon, words in table.items() for word in words}


_SIZE_OF, _COLOUR_OF, _SHAPE_OF = _inverse_table(SIZE_WORDS), _inverse_table(COLOUR_WORDS), _inverse_table(SHAPE_WORDS)


def parse_caption(text: str) -> list[CaptionMention]:
    """Objects named in ``text`` as "size colour shape" word triples (synonyms allowed).

    Meant for scoring generated captions (stage 2): it reads any text, not just ours.
    """
    words = re.findall(r"[a-z]+", text.lower())
    found = []
    for i in range(len(words) - 2):
        size, colour, shape = _SIZE_OF.get(words[i]), _COLOUR_OF.get(words[i + 1]), _SHAPE_OF.get(words[i + 2])
        if size and colour and shape:
            found.append(CaptionMention(size, colour, shape, i))
    return found


def score_caption(text: str, attributes: dict[str, Any]) -> dict[str, float]:
    """How well ``text`` names the objects of a scene (``ToySample.attributes``).

    Returns ``recall`` (fraction of the scene's objects named with all three attributes
    right), ``precision`` (fraction of named objects that are in the scene), the same two
    per attribute (``shape_recall``, ...: the object's attribute word is right for some
    mention), and ``exact`` (1.0 iff the named objects are exactly the scene's objects).
    Relations are not scored: they need a parse of the template, which generated text
    need not follow.
    """
    truth = [f"{o['size']} {o['colour']} {o['shape']}" for o in attributes["objects"]]
    named = [m.name for m in parse_caption(text)]
    hits = sum(1 for t in set(truth) if t in named)
    out = {
        "recall": hits / max(len(truth), 1),
        "precision": sum(1 for n in named if n in truth) / max(len(named), 1) if named else 0.0,
        "exact": float(sorted(set(named)) == sorted(set(truth)) and len(named) == len(truth)),
    }
    mentions = parse_caption(text)
    for attr in ("shape", "colour", "size"):
        have = {getattr(m, attr) for m in mentions}
        out[f"{attr}_recall"] = sum(1 for o in attributes["objects"] if o[attr] in have) / max(len(truth), 1)
    return out


# ----------------------------------------------------------------------------------------
# Visual questions
# ----------------------------------------------------------------------------------------
#
# Why the world asks its own questions: zero-shot VQA is half of BLIP-2's evaluation, and the
# default run has no VQA data to download. The scene description says everything true about an
# image, so questions with exactly one right answer can be generated from it, like the captions.
# A question is only asked when its answer is unambiguous: the object it refers to is the only
# one that fits the description, and a relation question's answer is the only object on that
# side of the reference (loosely as well as on the reference's row/column), so no reading of
# "left of" gives another answer.

#: Human answers per question, as in VQAv2.
VQA_NUM_ANSWERS = 10
#: How many of the ten annotators say each synonym (when the world has synonyms) instead of
#: the canonical word: three make a synonym score 90 % VQA accuracy, and the canonical word, said
#: by the other four to seven, scores 100 %.
VQA_SYNONYM_ANSWERS = 3
#: File written next to an export's images by :meth:`ToyWorld.export_vqa`.
VQA_FILE = "vqa.jsonl"
#: Kinds of question, in the order makers are listed (a scene's order is shuffled by its seed).
QUESTION_TYPES: tuple[str, ...] = ("count", "exists", "colour", "shape", "size", "relation")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
# Spread the question stream far from the scene draws' attempt counter (at most 100_000).
_QUESTION_STREAM = 2**31 - 1
_QUESTION_RELATION: dict[str, str] = {"left": "to the left of", "right": "to the right of", "above": "above",
                                      "below": "below"}
_WORD_TABLES: dict[str, dict[str, tuple[str, ...]]] = {"shape": SHAPE_WORDS, "colour": COLOUR_WORDS, "size": SIZE_WORDS}


@dataclass(frozen=True)
class ToyQuestion:
    """One question about a scene, with its answers in the VQAv2 format.

    ``answer`` is the canonical answer; ``answers`` are the ten "human" answers (the canonical
    word, and synonyms where the world has them). ``answer_type`` is VQAv2's ("yes/no",
    "number", "other"); ``question_type`` is one of :data:`QUESTION_TYPES`.
    """

    question: str
    answer: str
    answers: tuple[str, ...]
    answer_type: str
    question_type: str

    def to_dict(self) -> dict[str, Any]:
        return {"question": self.question, "answer": self.answer, "answers": list(self.answers),
                "answer_type": self.answer_type, "question_type": self.question_type}


@dataclass(frozen=True)
class _Obj:
    shape: str
    colour: str
    size: str
    row: int
    col: int

    def get(self, attr: str) -> str:
        return getattr(self, attr)


def _scene_objects(scene: ToyScene | dict[str, Any]) -> list[_Obj]:
    """Objects of a :class:`ToyScene` or of its ``to_dict()`` (an export's ``attributes``)."""
    if isinstance(scene, ToyScene):
        return [_Obj(o.shape, o.colour, o.size, o.row, o.col) for o in scene.objects]
    try:
        return [_Obj(o["shape"], o["colour"], o["size"], int(o["row"]), int(o["col"])) for o in scene["objects"]]
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a toy scene description (ToyScene.to_dict()): missing {e}") from e


def _ten_answers(canonical: str, table: dict[str, tuple[str, ...]] | None = None,
                 alternatives: Sequence[str] = ()) -> tuple[str, ...]:
    """Ten answers: the canonical one, and :data:`VQA_SYNONYM_ANSWERS` of each synonym
    (``table[canonical]`` or ``alternatives``) when there are any."""
    others = [w for w in (table.get(canonical, ()) if table else alternatives) if w != canonical]
    synonyms = tuple(w for w in others for _ in range(VQA_SYNONYM_ANSWERS))
    if VQA_NUM_ANSWERS - len(synonyms) < 4:  # the canonical answer must keep 100 % accuracy
        raise ValueError(f"too many synonyms of {canonical!r} for {VQA_NUM_ANSWERS} answers: {others}")
    return (canonical,) * (VQA_NUM_ANSWERS - len(synonyms)) + synonyms


def _matches(o: _Obj, spec: dict[str, str]) -> bool:
    return all(o.get(a) == v for a, v in spec.items())


def _phrase(spec: dict[str, str], rng: np.random.Generator) -> str:
    """ "the big red object" / "the circle": canonical values said with a random synonym."""
    words = [_pick(rng, _WORD_TABLES[a][spec[a]]) for a in ("size", "colour", "shape") if a in spec]
    if "shape" not in spec:
        words.append("object")
    return "the " + " ".join(words)


def _unique_description(objs: list[_Obj], i: int, options: Sequence[tuple[str, ...]]) -> dict[str, str] | None:
    """The first attribute subset in ``options`` that fits object ``i`` and no other object."""
    for attrs in options:
        spec = {a: objs[i].get(a) for a in attrs}
        if sum(_matches(o, spec) for o in objs) == 1:
            return spec
    return None


# Descriptions tried (shortest first) for each question that names an object: never the
# attribute being asked about.
_DESCRIBE_FOR_COLOUR = (("shape",), ("size", "shape"))
_DESCRIBE_FOR_SHAPE = (("colour",), ("size",), ("size", "colour"))
_DESCRIBE_FOR_SIZE = (("shape",), ("colour",), ("colour", "shape"))
_DESCRIBE_ANY = (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape"))


def _number(n: int) -> tuple[str, tuple[str, ...]]:
    """VQAv2 writes counts as digits; some annotators write the word (normalisation maps it)."""
    return str(n), _ten_answers(str(n), alternatives=(NUMBER_WORDS[n],))


def _ask_count(objs: list[_Obj], rng: np.random.Generator) -> ToyQuestion:
    kind = int(rng.integers(3))
    if kind == 0:
        question, n = "how many objects are there?", len(objs)
    else:
        attr = "size" if kind == 1 else "colour"
        value = _pick(rng, SIZES if attr == "size" else COLOURS)
        n = sum(o.get(attr) == value for o in objs)
        question = f"how many {_pick(rng, _WORD_TABLES[attr][value])} objects are there?"
    answer, answers = _number(n)
    return ToyQuestion(question, answer, answers, "number", "count")


def _ask_exists(objs: list[_Obj], rng: np.random.Generator) -> ToyQuestion:
    attrs = ("colour", "shape") if rng.random() < 0.5 else ("shape",)
    present = sorted({tuple(o.get(a) for a in attrs) for o in objs})
    if rng.random() < 0.5:
        values, answer = present[int(rng.integers(len(present)))], "yes"
    else:
        absent = [v for v in _all_values(attrs) if v not in present]
        values, answer = absent[int(rng.integers(len(absent)))], "no"
    spec = dict(zip(attrs, values))
    words = " ".join(_pick(rng, _WORD_TABLES[a][spec[a]]) for a in ("colour", "shape") if a in spec)
    return ToyQuestion(f"is there {_article(words)} {words}?", answer, _ten_answers(answer), "yes/no", "exists")


def _all_values(attrs: tuple[str, ...]) -> list[tuple[str, ...]]:
    tables = {"shape": SHAPES, "colour": COLOURS, "size": SIZES}
    out: list[tuple[str, ...]] = [()]
    for a in attrs:
        out = [v + (x,) for v in out for x in tables[a]]
    return out


def _ask_attribute(attr: str, options: Sequence[tuple[str, ...]]):
    def ask(objs: list[_Obj], rng: np.random.Generator) -> ToyQuestion | None:
        candidates = [(i, spec) for i in range(len(objs)) if (spec := _unique_description(objs, i, options)) is not None]
        if not candidates:
            return None
        i, spec = candidates[int(rng.integers(len(candidates)))]
        answer = objs[i].get(attr)
        return ToyQuestion(f"what {attr} is {_phrase(spec, rng)}?", answer, _ten_answers(answer, _WORD_TABLES[attr]),
                           "other", attr)

    return ask


def _on_side(o: _Obj, ref: _Obj, relation: str, *, strict: bool) -> bool:
    """Is ``o`` <relation> ``ref``? Strictly: in its row/column (how captions state
    relations); loosely: anywhere on that side."""
    if relation in ("left", "right"):
        side = o.col < ref.col if relation == "left" else o.col > ref.col
        return side and (o.row == ref.row or not strict)
    side = o.row < ref.row if relation == "above" else o.row > ref.row
    return side and (o.col == ref.col or not strict)


def _ask_relation(objs: list[_Obj], rng: np.random.Generator) -> ToyQuestion | None:
    candidates = []
    for i, ref in enumerate(objs):
        spec = _unique_description(objs, i, _DESCRIBE_ANY)
        for relation in RELATIONS:
            loose = [j for j, o in enumerate(objs) if j != i and _on_side(o, ref, relation, strict=False)]
            if spec is not None and len(loose) == 1 and _on_side(objs[loose[0]], ref, relation, strict=True):
                candidates.append((loose[0], relation, spec))
    if not candidates:
        return None
    j, relation, spec = candidates[int(rng.integers(len(candidates)))]
    attr = "shape" if rng.random() < 0.5 else "colour"
    where = f"{_QUESTION_RELATION[relation]} {_phrase(spec, rng)}"
    question = f"what shape is {where}?" if attr == "shape" else f"what colour is the object {where}?"
    answer = objs[j].get(attr)
    return ToyQuestion(question, answer, _ten_answers(answer, _WORD_TABLES[attr]), "other", "relation")


_ASK = {
    "count": _ask_count,
    "exists": _ask_exists,
    "colour": _ask_attribute("colour", _DESCRIBE_FOR_COLOUR),
    "shape": _ask_attribute("shape", _DESCRIBE_FOR_SHAPE),
    "size": _ask_attribute("size", _DESCRIBE_FOR_SIZE),
    "relation": _ask_relation,
}


def toy_questions(
    scene: ToyScene | dict[str, Any], *, seed: int | Sequence[int], num_questions: int = 3
) -> list[ToyQuestion]:
    """Up to ``num_questions`` questions about ``scene``, each of a different kind, each with one
    unambiguous answer (see the section comment). A pure function of (scene, seed).

    ``scene`` is a :class:`ToyScene` or its ``to_dict()`` (an export's ``attributes``). Kinds
    (:data:`QUESTION_TYPES`) are tried in a seeded random order and skipped when the scene
    allows no unambiguous question of that kind (counts and existence always work, so at
    least two questions come back when ``num_questions >= 2``).
    """
    if num_questions < 0:
        raise ValueError(f"num_questions must be >= 0, got {num_questions}")
    objs = _scene_objects(scene)
    rng = np.random.default_rng(seed)
    out: list[ToyQuestion] = []
    for t in rng.permutation(len(QUESTION_TYPES)):
        if len(out) == num_questions:
            break
        q = _ASK[QUESTION_TYPES[int(t)]](objs, rng)
        if q is not None and all(q.question != other.question for other in out):
            out.append(q)
    return out


# ----------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Outline of a filled polygonal shape of radius ``r`` centred on (cx, cy)."""
    if shape == "square":
        h = 0.84 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.98 * r, cy + 0.8 * r), (cx - 0.98 * r, cy + 0.8 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.78 * r, cy), (cx, cy + r), (cx - 0.78 * r, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + 0.05 * r + rad * math.sin(ang)))
        return pts
    if shape == "cross":
        w = 0.32 * r
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    if shape == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * x / 16.5, cy - r * (y + 2.5) / 15.5))
        return pts
    raise ValueError(f"no polygon for shape {shape!r}")


def _draw(draw: ImageDraw.ImageDraw, o: ToyObject, fill: int | tuple[int, int, int], scale: float) -> None:
    """Draw object ``o`` at ``scale`` times its pixel coordinates."""
    cx, cy, r = o.center[0] * scale, o.center[1] * scale, o.diameter / 2 * scale
    if o.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif o.shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, round(0.36 * r)))
    else:
        draw.polygon(_polygon(o.shape, cx, cy, r), fill=fill)


# ----------------------------------------------------------------------------------------
# The world
# ----------------------------------------------------------------------------------------


@dataclass
class ToySplit:
    """A split as a random-access sequence of :class:`ToySample` (a map-style dataset).

    ``torch.utils.data.DataLoader`` accepts it as is (with a ``collate_fn`` for PIL images).
    """

    world: "ToyWorld"
    split: str
    length: int

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> ToySample:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.split} split of size {self.length}")
        return self.world.sample(self.split, index % self.length)

    def __iter__(self) -> Iterator[ToySample]:
        return (self[i] for i in range(self.length))


@dataclass
class ToyWorld:
    """A seeded world of rendered shape scenes with captions.

    Args:
        seed: world seed; two worlds with the same arguments produce identical samples.
        image_size: side of the square RGB images in pixels (64 default: 8x8 patches of 8 px
            for the toy ViT). Must be >= 48 so that small objects stay legible.
        object_counts: possible numbers of objects per scene (subset of {1, 2, 3}).
        object_count_weights: sampling weights for ``object_counts`` (uniform if None).
        split_sizes: number of samples per split; train is generated lazily, so it may be
            large.
        num_captions: caption variants per sample (``captions``); ``caption`` is the first.
        holdout: "scene" keeps each semantic scene key in one split only (see module doc);
            "none" only separates splits by seed (identical compositions may recur).
        grid: objects sit in a ``grid`` x ``grid`` layout of square cells, one object per
            cell at most. With ``image_size / grid`` equal to the ViT patch size (16 px by
            default) every object lies inside exactly one patch: the tower's tokens are the
            cells, which makes it learn fast and keeps only 16 image tokens.
        supersample: render at this multiple of ``image_size`` and box-downsample, for
            anti-aliased edges.
        noise: standard deviation of the per-pixel grey noise (the "light texture").
        unique_eval_scenes: no two val (or test) samples share a semantic key, so no
            held-out caption fits two held-out images and retrieval R@1 can reach 100 %.
            Without it, ~7 % of test[:500] (~15 % of test[:1000]) would share their key
            with another sample: held-out splits only own 5 % of the ~32.5k two-object
            scenes. The price: later val/test indices lean slightly towards 3 objects.
    """

    seed: int = 0
    image_size: int = 64
    object_counts: tuple[int, ...] = (2, 3)
    object_count_weights: tuple[float, ...] | None = None
    split_sizes: dict[str, int] = field(default_factory=lambda: {"train": 100_000, "val": 2_000, "test": 2_000})
    num_captions: int = 5
    holdout: str = "scene"
    grid: int = 4
    supersample: int = 4
    noise: float = 3.0
    unique_eval_scenes: bool = True
    # val/test scenes drawn so far and their keys (see ``scene``); not part of the config.
    _eval_scenes: dict[str, tuple[list[ToyScene], set[str]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.image_size < 48:
            raise ValueError(f"image_size must be >= 48 for legible shapes, got {self.image_size}")
        self.object_counts = tuple(int(n) for n in self.object_counts)
        if not self.object_counts or not set(self.object_counts) <= {1, 2, 3}:
            raise ValueError(f"object_counts must be a non-empty subset of (1, 2, 3), got {self.object_counts}")
        if self.object_count_weights is not None:
            if len(self.object_count_weights) != len(self.object_counts):
                raise ValueError("object_count_weights must have one weight per entry of object_counts")
            w = np.asarray(self.object_count_weights, dtype=np.float64)
            self._count_p = w / w.sum()
        else:
            self._count_p = np.full(len(self.object_counts), 1 / len(self.object_counts))
        if self.holdout not in ("scene", "none"):
            raise ValueError(f"holdout must be 'scene' or 'none', got {self.holdout!r}")
        unknown = set(self.split_sizes) - set(SPLITS)
        if unknown or any(n < 0 for n in self.split_sizes.values()):
            raise ValueError(f"split_sizes keys must be among {SPLITS} with sizes >= 0, got {self.split_sizes}")
        if self.num_captions < 1:
            raise ValueError("num_captions must be >= 1")
        if not 2 <= self.grid <= 6 or self.image_size % self.grid:
            raise ValueError(f"grid must be in 2..6 and divide image_size, got {self.grid} for {self.image_size}")

    # -- description -----------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The arguments that define this world (JSON-friendly; hashed into cache keys)."""
        return {
            "seed": self.seed,
            "image_size": self.image_size,
            "object_counts": list(self.object_counts),
            "object_count_weights": None if self.object_count_weights is None else list(self.object_count_weights),
            "split_sizes": dict(self.split_sizes),
            "num_captions": self.num_captions,
            "holdout": self.holdout,
            "unique_eval_scenes": self.unique_eval_scenes,
            "grid": self.grid,
            "supersample": self.supersample,
            "noise": self.noise,
        }

    def split_size(self, split: str) -> int:
        """Number of samples in ``split`` ("train", "val" or "test")."""
        self._check_split(split)
        return int(self.split_sizes.get(split, 0))

    def dataset(self, split: str) -> ToySplit:
        """``split`` as a map-style dataset of :class:`ToySample`."""
        return ToySplit(self, split, self.split_size(split))

    def space_size(self) -> dict[str, int]:
        """Number of distinct semantic scenes (caption-distinguishable), per object count.

        Objects in a scene have distinct types (T = shapes x colours x sizes).
        * 1 object: T types x 9 location phrases (corners, edges, centre).
        * 2 objects: ordered (subject, anchor) x {left, above} after normalising
          right/below: T (T-1) x 2.
        * 3 objects: an anchor and two subjects in two different directions; the key is the
          unordered pair of normalised relations, so count anchor x unordered
          {(subject, direction)} pairs with distinct directions: T x C(4, 2) x (T-1)(T-2).
        """
        t = len(SHAPES) * len(COLOURS) * len(SIZES)
        return {
            "object_types": t,
            "scenes_1": t * 9,
            "scenes_2": t * (t - 1) * 2,
            "scenes_3": t * 6 * (t - 1) * (t - 2),
        }

    # -- sampling --------------------------------------------------------------------

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")

    def _bucket(self, key: str) -> int:
        digest = hashlib.blake2b(f"{self.seed}:{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % 1000

    def split_of_key(self, key: str) -> str:
        """Which split a semantic scene key belongs to under ``holdout="scene"``."""
        b = self._bucket(key)
        return next(s for s, (lo, hi) in _SPLIT_BUCKETS.items() if lo <= b < hi)

    def scene(self, split: str, index: int) -> ToyScene:
        """The scene at ``index`` of ``split`` (a pure function of world, split, index).

        With ``unique_eval_scenes``, val/test scene ``i`` is drawn after scenes ``0..i-1``
        (memoised, ~3 ms a scene) so that it can skip their keys; train scenes are
        independent of each other and cost ~0.25 ms.
        """
        self._check_split(split)
        n = self.split_size(split)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {split} split of size {n}")
        if split == "train" or not self.unique_eval_scenes:
            return self._draw_for_split(split, index, ())
        cache = self._eval_scenes.setdefault(split, ([], set()))
        scenes, seen = cache
        while len(scenes) <= index:
            scene = self._draw_for_split(split, len(scenes), seen)
            scenes.append(scene)
            seen.add(scene.key)
        return scenes[index]

    def _draw_for_split(self, split: str, index: int, avoid: set[str] | tuple[()]) -> ToyScene:
        """Rejection-sample the split's scene ``index``: its key must hash to the split
        (``holdout="scene"``) and must not be in ``avoid``."""
        for attempt in range(100_000):
            rng = np.random.default_rng([self.seed, _SPLIT_ID[split], index, attempt])
            scene = self._draw_scene(rng)
            if (self.holdout == "none" or self.split_of_key(scene.key) == split) and scene.key not in avoid:
                return scene
        raise RuntimeError(f"could not draw a new scene for {split}[{index}]; is the split too large?")

    def _draw_scene(self, rng: np.random.Generator) -> ToyScene:
        n = int(self.object_counts[rng.choice(len(self.object_counts), p=self._count_p)])
        # Distinct object types, so that "it" and "the red circle" are never ambiguous.
        types: list[tuple[str, str, str]] = []
        while len(types) < n:
            t = (_pick(rng, SHAPES), _pick(rng, COLOURS), _pick(rng, SIZES))
            if t not in types:
                types.append(t)
        # Layout: an anchor cell and subjects along its row/column.
        cells: list[tuple[int, int]]
        relations: list[tuple[int, str, int]] = []
        anchor = (int(rng.integers(self.grid)), int(rng.integers(self.grid)))
        if n == 1:
            cells = [anchor]
        else:
            free = [d for d in RELATIONS if self._cells_towards(anchor, d)]
            dirs = [free[i] for i in rng.permutation(len(free))[: n - 1]]
            subj_cells = []
            for d in dirs:
                options = self._cells_towards(anchor, d)
                subj_cells.append(options[int(rng.integers(len(options)))])
            if n == 2:  # objects: [subject, anchor]
                cells = [subj_cells[0], anchor]
                relations = [(0, dirs[0], 1)]
            else:  # objects: [subject 1, anchor, subject 2]
                cells = [subj_cells[0], anchor, subj_cells[1]]
                relations = [(0, dirs[0], 1), (2, dirs[1], 1)]
        cell = self.image_size / self.grid
        objects = []
        for (shape, colour, size), (row, col) in zip(types, cells):
            lo, hi = _SIZE_FRACTION[size]
            diameter = cell * float(rng.uniform(lo, hi))
            slack = 0.45 * (cell - diameter)  # keep the object inside its cell
            cx = (col + 0.5) * cell + float(rng.uniform(-slack, slack))
            cy = (row + 0.5) * cell + float(rng.uniform(-slack, slack))
            base = np.asarray(_RGB[colour])
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
            grid=self.grid,
        )

    def _cells_towards(self, anchor: tuple[int, int], direction: str) -> list[tuple[int, int]]:
        """Cells in the anchor's row/column on the ``direction`` side of it."""
        dr, dc = _DIRECTION[direction]
        out, (r, c) = [], anchor
        while 0 <= r + dr < self.grid and 0 <= c + dc < self.grid:
            r, c = r + dr, c + dc
            out.append((r, c))
        return out

    def captions(self, scene: ToyScene, n: int | None = None) -> list[str]:
        """``n`` (default ``num_captions``) caption variants of ``scene``, deterministic.

        The first variant always uses a precise relation word; later ones may say "next
        to"/"beside" for horizontal relations, as people do.
        """
        rng = np.random.default_rng([scene.caption_seed, 1])
        return [_caption(scene, rng, vague=i > 0) for i in range(self.num_captions if n is None else n)]

    def render(self, scene: ToyScene) -> Image.Image:
        """Render ``scene`` as an RGB image of ``image_size`` x ``image_size`` pixels."""
        s, k = self.image_size, self.supersample
        img = Image.new("RGB", (s * k, s * k), scene.background)
        draw = ImageDraw.Draw(img)
        for o in scene.objects:
            _draw(draw, o, o.rgb, k)
        if k > 1:
            img = img.reduce(k)  # box filter: anti-aliased edges
        # Light texture: a brightness gradient plus grey per-pixel noise.
        rng = np.random.default_rng([scene.texture_seed, 0])
        ramp = np.linspace(-0.5, 0.5, s, dtype=np.float32)
        shade = scene.gradient[0] * ramp[None, :] + scene.gradient[1] * ramp[:, None]  # (H, W)
        shade = shade + rng.normal(0.0, self.noise, size=(s, s)).astype(np.float32)
        arr = np.asarray(img, dtype=np.float32) + shade[:, :, None]  # (H, W, 3)
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")

    def render_mask(self, scene: ToyScene) -> np.ndarray:
        """Instance mask ``(H, W) uint8``: 0 = background, ``i + 1`` = ``scene.objects[i]``.

        Used to derive dense (per-patch) labels when pretraining the toy vision tower.
        """
        s = self.image_size
        mask = Image.new("L", (s, s), 0)
        draw = ImageDraw.Draw(mask)
        for i, o in enumerate(scene.objects):
            _draw(draw, o, i + 1, 1.0)
        return np.asarray(mask)

    def sample(self, split: str, index: int) -> ToySample:
        """The sample at ``index`` of ``split``: image, captions and attributes."""
        scene = self.scene(split, index)
        caps = self.captions(scene)
        return ToySample(self.render(scene), caps[0], caps, scene.to_dict(), split, index)

    def iter_captions(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[list[str]]:
        """Caption variants of samples ``start..stop`` without rendering (cheap: for LMs)."""
        stop = self.split_size(split) if stop is None else stop
        for i in range(start, stop):
            yield self.captions(self.scene(split, i))

    # -- export ----------------------------------------------------------------------

    def export(self, split: str, n: int, out_dir: str | Path, *, start: int = 0, overwrite: bool = False) -> Path:
        """Write samples ``start..start+n`` of ``split`` as an HF ``imagefolder`` dataset.

        Layout: ``out_dir/images/<index>.png`` and ``out_dir/metadata.jsonl`` with one
        ``{"file_name", "text", "captions", "attributes"}`` line per image (``attributes`` is a
        JSON string, so the column has a flat type). ``datasets.load_dataset("imagefolder",
        data_dir=out_dir)`` loads it as a "train" split, like any user folder (file names
        carry no split word, from which HF would infer a split), and recipes can treat it
        exactly like user data.
        """
        self._check_split(split)
        if start < 0 or n < 0 or start + n > self.split_size(split):
            raise IndexError(f"{split}[{start}:{start + n}] exceeds the split size {self.split_size(split)}")
        out = Path(out_dir)
        meta_path = out / "metadata.jsonl"
        if meta_path.exists() and not overwrite:
            raise FileExistsError(f"{meta_path} exists; pass overwrite=True to replace it")
        (out / "images").mkdir(parents=True, exist_ok=True)
        tmp = meta_path.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for i in range(start, start + n):
                sample = self.sample(split, i)
                name = f"images/{i:06d}.png"  # no split word: HF would infer a split from it
                sample.image.save(out / name)
                row = {
                    "file_name": name,
                    "text": sample.caption,
                    "captions": sample.captions,
                    "attributes": json.dumps(sample.attributes),
                }
                f.write(json.dumps(row) + "\n")
        tmp.replace(meta_path)  # the metadata appears only once every image is written
        return out

    def questions(self, split: str, index: int, n: int = 3) -> list[ToyQuestion]:
        """Questions about sample ``index`` of ``split`` (:func:`toy_questions`): a pure
        function of (world, split, index), drawn from their own random stream so that asking
        them changes no image and no caption."""
        scene = self.scene(split, index)
        return toy_questions(scene, seed=[self.seed, _SPLIT_ID[split], index, _QUESTION_STREAM], num_questions=n)

    def export_vqa(
        self, split: str, n: int, out_dir: str | Path, *, start: int = 0, num_questions: int = 3,
        overwrite: bool = False,
    ) -> Path:
        """Write the questions of samples ``start..start+n`` of ``split`` as ``out_dir/vqa.jsonl``,
        next to the images :meth:`export` wrote there (export them first).

        One line per question: ``{"question_id", "image", "question", "answers" (ten, VQAv2
        style), "answer", "answer_type", "question_type"}``, ``image`` relative to ``out_dir``.
        Each exported image's scene key (``metadata.jsonl``) is checked against the scene the
        questions are about, so questions never land next to another world's images.
        Returns the file's path.
        """
        self._check_split(split)
        if start < 0 or n < 0 or start + n > self.split_size(split):
            raise IndexError(f"{split}[{start}:{start + n}] exceeds the split size {self.split_size(split)}")
        out = Path(out_dir)
        meta_path, vqa_path = out / "metadata.jsonl", out / VQA_FILE
        if vqa_path.exists() and not overwrite:
            raise FileExistsError(f"{vqa_path} exists; pass overwrite=True to replace it")
        if not meta_path.is_file():
            raise FileNotFoundError(2, "no exported images here (run ToyWorld.export first)", str(meta_path))
        keys = {}
        for line in meta_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                keys[row["file_name"]] = json.loads(row["attributes"])["key"] if "attributes" in row else None
        # A temporary file of our own, renamed when complete: two processes exporting the same
        # folder (a shared cache) never interleave or leave half a file behind.
        fd, tmp_name = tempfile.mkstemp(dir=out, prefix=f".{VQA_FILE}.", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                self._write_questions(f, split, range(start, start + n), keys, meta_path, num_questions)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache's file from other users
            tmp.replace(vqa_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return vqa_path

    def _write_questions(self, f: Any, split: str, indices: range, keys: dict[str, str | None], meta_path: Path,
                         num_questions: int) -> None:
        """The lines of :meth:`export_vqa`, each sample's scene checked against the exported one."""
        for i in indices:
            name = f"images/{i:06d}.png"
            if name not in keys:
                raise FileNotFoundError(2, f"{split}[{i}] was not exported here", str(meta_path.parent / name))
            scene = self.scene(split, i)
            if keys[name] is not None and keys[name] != scene.key:
                raise ValueError(f"{meta_path}: {name} shows {keys[name]!r}, but {split}[{i}] of this world is "
                                 f"{scene.key!r}: the images were exported from another world or split")
            for k, q in enumerate(self.questions(split, i, num_questions)):
                f.write(json.dumps({"question_id": f"{split}-{i:06d}-{k}", "image": name, **q.to_dict()}) + "\n")
