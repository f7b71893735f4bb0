"""Visual questions about toy scenes, with VQAv2-style answers.

Why the world asks its own questions: zero-shot VQA is half of BLIP-2's evaluation, and the
default run has no VQA data to download. The scene description says everything true about an
image, so questions with exactly one right answer can be generated from it, like the captions.
A question is only asked when its answer is unambiguous: the object it refers to is the only
one that fits the description, and a relation question's answer is the only object on that
side of the reference (loosely as well as on the reference's row/column), so no reading of
"left of" gives another answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .language import COLOUR_WORDS, SHAPE_WORDS, SIZE_WORDS, article
from .scenes import COLOURS, RELATIONS, SHAPES, SIZES, ToyScene, pick

__all__ = [
    "QUESTION_TYPES",
    "VQA_FILE",
    "VQA_NUM_ANSWERS",
    "VQA_SYNONYM_ANSWERS",
    "ToyQuestion",
    "toy_questions",
]

#: Human answers per question, as in VQAv2.
VQA_NUM_ANSWERS = 10
#: How many of the ten annotators say each synonym (when the world has synonyms) instead of
#: the canonical word: three make a synonym score 90 % VQA accuracy, and the canonical word, said
#: by the other four to seven, scores 100 %.
VQA_SYNONYM_ANSWERS = 3
#: File written next to an export's images by :meth:`qformer.toy.ToyWorld.export_vqa`.
VQA_FILE = "vqa.jsonl"
#: Kinds of question, in the order makers are listed (a scene's order is shuffled by its seed).
QUESTION_TYPES: tuple[str, ...] = ("count", "exists", "colour", "shape", "size", "relation")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
#: Last element of a world's question seed ``[seed, split_id, index, QUESTION_STREAM]``: far
#: from the scene draws' attempt counter (at most 100_000), so questions have their own stream.
QUESTION_STREAM = 2**31 - 1
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
    words = [pick(rng, _WORD_TABLES[a][spec[a]]) for a in ("size", "colour", "shape") if a in spec]
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
        value = pick(rng, SIZES if attr == "size" else COLOURS)
        n = sum(o.get(attr) == value for o in objs)
        question = f"how many {pick(rng, _WORD_TABLES[attr][value])} objects are there?"
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
    words = " ".join(pick(rng, _WORD_TABLES[a][spec[a]]) for a in ("colour", "shape") if a in spec)
    return ToyQuestion(f"is there {article(words)} {words}?", answer, _ten_answers(answer), "yes/no", "exists")


def _all_values(attrs: tuple[str, ...]) -> list[tuple[str, ...]]:
    tables = {"shape": SHAPES, "colour": COLOURS, "size": SIZES}
    out: list[tuple[str, ...]] = [()]
    for a in attrs:
        out = [v + (x,) for v in out for x in tables[a]]
    return out


_Ask = Callable[[list[_Obj], np.random.Generator], "ToyQuestion | None"]


def _ask_attribute(attr: str, options: Sequence[tuple[str, ...]]) -> _Ask:
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


_ASK: dict[str, _Ask] = {
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
    unambiguous answer (see the module doc). A pure function of (scene, seed).

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
