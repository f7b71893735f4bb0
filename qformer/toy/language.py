"""The toy world's English: caption templates and synonyms, its vocabulary, and reading captions back.

Captions name every object with all three attributes and state every relation, drawing
words from synonym lists and templates, so that a model must read the attributes rather
than memorise strings. Because the language is closed, captions can be read back
(:func:`parse_caption`) and a generated caption scored against the scene it describes
(:func:`score_caption`); and tokenizers can be built from :func:`caption_vocabulary`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .scenes import COL_WORDS, INVERSE, ROW_WORDS, ToyObject, ToyScene, location_phrase, pick

__all__ = [
    "SHAPE_WORDS",
    "COLOUR_WORDS",
    "SIZE_WORDS",
    "RELATION_WORDS",
    "VAGUE_HORIZONTAL",
    "CaptionMention",
    "caption_vocabulary",
    "parse_caption",
    "scene_captions",
    "score_caption",
]

# The first word of every synonym list is the canonical name that appears in ``attributes``;
# captions draw from the whole list.
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

_PREFIXES: tuple[str, ...] = ("", "", "", "", "there is ", "a picture of ", "an image of ", "a photo of ")
# Literal words used by the templates below (kept in sync by tests/test_toy_world.py, which
# checks that every generated caption word is in caption_vocabulary()).
_TEMPLATE_WORDS: tuple[str, ...] = (
    "a", "an", "the", "is", "and", "with", "it", "placed", "sits", "in", "at", "on", "corner", "center",
)  # fmt: skip


def article(next_word: str) -> str:
    return "an" if next_word[:1] in "aeiou" else "a"


# ----------------------------------------------------------------------------------------
# Writing captions
# ----------------------------------------------------------------------------------------


def _np(o: ToyObject, rng: np.random.Generator) -> str:
    """Full noun phrase: "a big red circle"."""
    words = f"{pick(rng, SIZE_WORDS[o.size])} {pick(rng, COLOUR_WORDS[o.colour])} {pick(rng, SHAPE_WORDS[o.shape])}"
    return f"{article(words)} {words}"


def _ref(o: ToyObject, rng: np.random.Generator) -> str:
    """Second mention: "the red circle" (the size was already stated)."""
    return f"the {pick(rng, COLOUR_WORDS[o.colour])} {pick(rng, SHAPE_WORDS[o.shape])}"


def _rel(rel: str, rng: np.random.Generator, vague: bool) -> str:
    if vague and rel in ("left", "right") and rng.random() < 0.3:
        return pick(rng, VAGUE_HORIZONTAL)
    return pick(rng, RELATION_WORDS[rel])


def _caption(scene: ToyScene, rng: np.random.Generator, vague: bool) -> str:
    """One caption of ``scene`` from a randomly chosen template."""
    objs, rels = scene.objects, scene.relations
    prefix = pick(rng, _PREFIXES)
    if len(objs) == 1:
        return f"{prefix}{_np(objs[0], rng)} {location_phrase(objs[0], scene.grid)}"
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
            return f"{_np(x, rng)} {pick(rng, ('placed', 'sits'))} {r} {_np(y, rng)}"
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


def scene_captions(scene: ToyScene, n: int) -> list[str]:
    """``n`` caption variants of ``scene``, a pure function of its ``caption_seed``.

    The first variant always uses a precise relation word; later ones may say "next
    to"/"beside" for horizontal relations, as people do.
    """
    rng = np.random.default_rng([scene.caption_seed, 1])
    return [_caption(scene, rng, vague=i > 0) for i in range(n)]


def caption_vocabulary() -> list[str]:
    """Every word (and punctuation mark) a toy caption can contain, sorted.

    Tokenizers for the toy backbones are built from this list, which is why it is derived
    from the synonym tables rather than from sampled captions: it is complete by design.
    """
    words: set[str] = {","}
    tables: list[Sequence[str]] = [*SHAPE_WORDS.values(), *COLOUR_WORDS.values(), *SIZE_WORDS.values()]
    tables += [*RELATION_WORDS.values(), VAGUE_HORIZONTAL, _PREFIXES, _TEMPLATE_WORDS, ROW_WORDS, COL_WORDS]
    for table in tables:
        for phrase in table:
            words.update(phrase.split())
    return sorted(words)


# ----------------------------------------------------------------------------------------
# Reading captions
# ----------------------------------------------------------------------------------------


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
    right), ``precision`` (fraction of named objects that are in the scene), per attribute
    ``shape_recall`` / ``colour_recall`` / ``size_recall`` (fraction of the scene's objects
    whose value of that attribute some mention names), and ``exact`` (1.0 iff the named
    objects are exactly the scene's objects).
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
