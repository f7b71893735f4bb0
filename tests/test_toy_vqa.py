"""The toy world's visual questions (qformer.toy.world.toy_questions, ToyWorld.questions /
export_vqa): every answer is checked against the scene by an independent reading of the
question, and must be the only answer that reading allows."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from qformer.eval.vqa import vqa_accuracy
from qformer.toy.world import (
    COLOUR_WORDS,
    QUESTION_TYPES,
    SHAPE_WORDS,
    SIZE_WORDS,
    VQA_FILE,
    ToyWorld,
    toy_questions,
)

# Word -> (attribute, canonical value), built here rather than taken from the module under test.
WORDS = {w: (attr, canon) for attr, table in (("shape", SHAPE_WORDS), ("colour", COLOUR_WORDS), ("size", SIZE_WORDS))
         for canon, words in table.items() for w in words}
NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3"}
SIDES = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}


def referents(objs: list[dict], words: str) -> list[int]:
    """Objects that fit a description such as "big red" / "circle" / "small object"."""
    spec = dict(WORDS[w] for w in words.split() if w != "object")
    return [i for i, o in enumerate(objs) if all(o[a] == v for a, v in spec.items())]


def on_side(o: dict, ref: dict, side: str) -> bool:
    """Loosely on that side: anywhere left of / above ..., not only in the same row or column."""
    return {"left": o["col"] < ref["col"], "right": o["col"] > ref["col"],
            "above": o["row"] < ref["row"], "below": o["row"] > ref["row"]}[side]


def answers_by_reading(question: str, objs: list[dict]) -> set[str]:
    """Every answer a careful reader of ``question`` could give about this scene."""
    if question == "how many objects are there?":
        return {str(len(objs))}
    if m := re.fullmatch(r"how many (\w+) objects are there\?", question):
        return {str(len(referents(objs, m.group(1))))}
    if m := re.fullmatch(r"is there an? ([\w ]+)\?", question):
        return {"yes" if referents(objs, m.group(1)) else "no"}
    if m := re.fullmatch(r"what (shape|colour) is (?:the object )?(to the left of|to the right of|above|below) "
                         r"the ([\w ]+)\?", question):
        refs = referents(objs, m.group(3))
        if len(refs) != 1:
            return set()
        ref, side = objs[refs[0]], SIDES[m.group(2)]
        found = [o for i, o in enumerate(objs) if i != refs[0] and on_side(o, ref, side)]
        # read strictly (in the reference's row / column, as captions state relations) it must be the same object
        line = "row" if side in ("left", "right") else "col"
        strict = [o for o in found if o[line] == ref[line]]
        return {o[m.group(1)] for o in found} | ({"?"} if len(found) != 1 or strict != found else set())
    if m := re.fullmatch(r"what (shape|colour|size) is the ([\w ]+)\?", question):
        return {objs[i][m.group(1)] for i in referents(objs, m.group(2))} | (
            {"?"} if len(referents(objs, m.group(2))) != 1 else set())
    raise AssertionError(f"unexpected question form: {question!r}")


def scenes(world: ToyWorld, split: str, n: int):
    for i in range(n):
        yield i, world.scene(split, i)


@pytest.fixture(scope="module")
def world() -> ToyWorld:
    # 1-3 objects: single-object scenes have no relation questions, three-object scenes the
    # trickiest ones (a subject in the anchor's row can also be left of the other subject).
    return ToyWorld(seed=0, object_counts=(1, 2, 3))


def test_every_answer_is_the_only_right_one(world: ToyWorld) -> None:
    kinds: Counter = Counter()
    for split, n in (("train", 150), ("val", 60)):
        for i, scene in scenes(world, split, n):
            objs = scene.to_dict()["objects"]
            questions = world.questions(split, i)
            assert 2 <= len(questions) <= 3 and len({q.question for q in questions}) == len(questions)
            assert len({q.question_type for q in questions}) == len(questions), "one question per kind"
            for q in questions:
                assert answers_by_reading(q.question, objs) == {q.answer}, (scene.key, q)
                kinds[q.question_type] += 1
    assert set(kinds) == set(QUESTION_TYPES), kinds


def test_answers_are_in_the_vqav2_format(world: ToyWorld) -> None:
    types = Counter()
    yes_no = Counter()
    for i, scene in scenes(world, "train", 120):
        for q in world.questions("train", i):
            assert len(q.answers) == 10 and q.answers[:4] == (q.answer,) * 4
            types[q.answer_type] += 1
            if q.answer_type == "yes/no":
                yes_no[q.answer] += 1
                assert set(q.answers) == {q.answer}
            elif q.answer_type == "number":  # digits, as VQAv2; a few annotators write the word
                assert q.answer.isdigit() and set(q.answers) == {q.answer, [w for w, d in NUMBERS.items() if d == q.answer][0]}
            else:  # synonyms the world's captions use for the same attribute
                assert {WORDS[a][1] for a in q.answers} == {q.answer}
            # The canonical answer scores 100 %, any other listed answer at least 90 %.
            assert vqa_accuracy(q.answer, q.answers) == 1.0
            assert all(vqa_accuracy(a, q.answers) >= 0.9 for a in q.answers)
    assert set(types) == {"yes/no", "number", "other"}
    assert min(yes_no.values()) > 0.3 * sum(yes_no.values()), yes_no


def test_questions_are_a_pure_function_of_seed_split_and_index(world: ToyWorld) -> None:
    first = [world.questions("val", i) for i in (5, 0, 3)]
    fresh = ToyWorld(seed=0, object_counts=(1, 2, 3))
    assert [fresh.questions("val", i) for i in (5, 0, 3)] == first  # other order, other instance
    # the scene or its exported attributes give the same questions for the same seed
    scene = world.scene("train", 7)
    assert toy_questions(scene, seed=[1, 2]) == toy_questions(json.loads(json.dumps(scene.to_dict())), seed=[1, 2])
    # another world seed is another set of questions
    other = ToyWorld(seed=1, object_counts=(1, 2, 3))
    assert [q.question for i in range(10) for q in world.questions("train", i)] != [
        q.question for i in range(10) for q in other.questions("train", i)]


def test_asking_questions_changes_no_image_and_no_caption() -> None:
    a, b = ToyWorld(seed=0), ToyWorld(seed=0)
    for i in range(4):
        a.questions("val", i)
    for i in range(4):
        sa, sb = a.sample("val", i), b.sample("val", i)
        assert sa.captions == sb.captions and np.array_equal(np.asarray(sa.image), np.asarray(sb.image))


def test_export_vqa_writes_questions_next_to_the_images(tmp_path: Path) -> None:
    world = ToyWorld(seed=0)
    with pytest.raises(FileNotFoundError, match="export first"):
        world.export_vqa("val", 3, tmp_path)
    world.export("val", 4, tmp_path)
    before = (tmp_path / "metadata.jsonl").read_bytes()
    path = world.export_vqa("val", 4, tmp_path)
    assert path == tmp_path / VQA_FILE and (tmp_path / "metadata.jsonl").read_bytes() == before
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    meta = {json.loads(line)["file_name"]: json.loads(json.loads(line)["attributes"])
            for line in before.decode().splitlines()}
    assert len({r["question_id"] for r in rows}) == len(rows) >= 8
    for r in rows:
        assert (tmp_path / r["image"]).is_file() and len(r["answers"]) == 10
        assert answers_by_reading(r["question"], meta[r["image"]]["objects"]) == {r["answer"]}
    assert [r["question"] for r in rows if r["image"] == "images/000002.png"] == [
        q.question for q in world.questions("val", 2)]
    with pytest.raises(FileExistsError):
        world.export_vqa("val", 4, tmp_path)
    with pytest.raises(ValueError, match="another world"):
        ToyWorld(seed=1).export_vqa("val", 4, tmp_path, overwrite=True)
    with pytest.raises(FileNotFoundError, match="not exported"):
        world.export_vqa("val", 5, tmp_path, overwrite=True)
    assert path.read_text().splitlines() == [json.dumps(r) for r in rows]  # failed exports left it alone
    assert not list(tmp_path.glob(".*tmp"))
