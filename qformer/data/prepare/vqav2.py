"""VQAv2's official question and annotation files -> JSONL rows the VQA readers and the instruction
recipe take directly (``--train-data`` / ``--eval-data``).

The official downloads are two files per split: ``v2_OpenEnded_mscoco_<subtype>_questions.json``
(``{"data_subtype": "train2014", "questions": [{image_id, question, question_id}]}``) and
``v2_mscoco_<subtype>_annotations.json`` (``{"annotations": [{question_id, image_id, answers: [{answer,
answer_confidence, answer_id}] x 10, multiple_choice_answer, question_type, answer_type}]}``). They
are joined on ``question_id``; the image is COCO's ``COCO_<subtype>_<image_id, 12 digits>.jpg`` under
``image_root`` (the ``train2014/`` or ``val2014/`` folder itself). Each row is
``{"image", "question", "answers" (the ten human answers, as given), "question_id", "image_id",
"question_type", "answer_type"}``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ...io import atomic_write_text
from .layout import field_names, items, load_json
from .report import PrepareError, PrepareReport, write_report

__all__ = ["prepare_vqav2"]

_MAX_EXAMPLES = 5


def _section(data: object, path: Path, key: str, layout: str) -> list:
    if not isinstance(data, dict):
        raise PrepareError(f"{path}: expected {layout}, got a JSON {type(data).__name__}")
    if not isinstance(data.get(key), list):
        raise PrepareError(f"{path}: has no {key!r} list (its fields: {field_names(data)}); expected {layout}")
    return data[key]


def prepare_vqav2(
    *,
    questions: str | os.PathLike,
    annotations: str | os.PathLike,
    output: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    data_subtype: str | None = None,
    check_images: bool = False,
    limit: int | None = None,
    progress: bool = False,
) -> PrepareReport:
    """VQAv2 questions + annotations -> JSONL, one row per question (see the module docstring).

    Args:
        questions: ``v2_OpenEnded_mscoco_<subtype>_questions.json``.
        annotations: ``v2_mscoco_<subtype>_annotations.json`` (same split).
        output: the ``.jsonl`` to write (``<output>.report.json`` gets the report).
        image_root: the folder holding the split's images (``/data/coco/train2014``); paths are
            written absolute. Without it they are bare file names, resolved against the output's folder.
        data_subtype: the file name's split (``train2014``); default: the files' ``data_subtype``.
        check_images: drop (and count) questions whose image file does not exist.
        limit: stop after this many rows, for a quick trial file.
        progress: tqdm bars.

    A malformed file is a :class:`PrepareError` naming the file, the item and the field; questions
    with no annotation, no non-empty answer or (``check_images``) no image are dropped and counted.
    """
    start = time.perf_counter()
    qpath, apath, out = Path(questions).expanduser(), Path(annotations).expanduser(), Path(output)
    if out.suffix.lower() != ".jsonl":
        raise PrepareError(f"{out}: the output must be a .jsonl file (one JSON object per line)")
    if limit is not None and limit < 1:
        raise PrepareError(f"limit must be at least 1 (got {limit})")
    qdata = load_json(qpath, what="VQAv2 questions")
    qlist = _section(qdata, qpath, "questions", "VQAv2's questions layout {'data_subtype', 'questions': "
                                                "[{image_id, question, question_id}]}")
    adata = load_json(apath, what="VQAv2 annotations")
    alist = _section(adata, apath, "annotations", "VQAv2's annotations layout {'annotations': [{question_id, "
                                                  "image_id, answers: [{answer, ...}], question_type, answer_type}]}")
    subtype = data_subtype or qdata.get("data_subtype") or adata.get("data_subtype")
    if not isinstance(subtype, str) or not subtype.strip():
        raise PrepareError(f"{qpath}: no 'data_subtype' (e.g. train2014) to name the images COCO_<subtype>_<id>.jpg; "
                           "pass data_subtype= (--data-subtype)")
    report = PrepareReport(dataset="vqav2", inputs=[str(qpath), str(apath)], output=str(os.path.abspath(out)),
                           image_root=None if image_root is None else str(os.path.abspath(Path(image_root).expanduser())),
                           checked_images=check_images, limit=limit)

    answers_of: dict[int | str, tuple[int | str, list[str], str | None, str | None]] = {}
    for ann in items(alist, apath, progress=progress, name="annotations", unit="annotation"):
        qid, image_id = ann.image_id("question_id"), ann.image_id("image_id")
        raw = ann.get("answers")
        if not isinstance(raw, list):
            raise PrepareError(f"{apath}: {ann.where} has a {type(raw).__name__} 'answers', expected a list of "
                               "{\"answer\": ...} objects")
        answers = []
        for j, a in enumerate(raw):
            text = a.get("answer") if isinstance(a, dict) else None
            if not isinstance(text, str):
                raise PrepareError(f"{apath}: {ann.where} answers[{j}] is not an object with a string 'answer'")
            answers.append(text)
        if qid in answers_of:
            raise PrepareError(f"{apath}: {ann.where} repeats question_id {qid!r}")
        qtype, atype = ann.value.get("question_type"), ann.value.get("answer_type")
        answers_of[qid] = (image_id, answers, qtype if isinstance(qtype, str) else None,
                           atype if isinstance(atype, str) else None)

    root = Path(report.image_root) if report.image_root else None
    skipped: dict[str, int] = {}
    examples: dict[str, list[str]] = {}

    def skip(reason: str, example: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1
        shown = examples.setdefault(reason, [])
        if len(shown) < _MAX_EXAMPLES:
            shown.append(example)

    lines: list[str] = []
    images: set[str] = set()
    answers_total = 0
    missing: set[str] = set()
    for item in items(qlist, qpath, progress=progress, name="questions", unit="question"):
        if limit is not None and len(lines) >= limit:
            report.stopped_at_limit = True
            break
        qid, image_id, question = item.image_id("question_id"), item.image_id("image_id"), item.text("question")
        where = f"{qpath.name} {item.where} (question_id {qid!r})"
        if qid not in answers_of:
            skip("no_annotation", where)
            continue
        ann_image, answers, qtype, atype = answers_of[qid]
        if ann_image != image_id:
            raise PrepareError(f"{qpath}: {item.where} question_id {qid!r} is about image {image_id!r} but its "
                               f"annotation in {apath.name} is about image {ann_image!r}: files of different splits?")
        if not question.strip():
            skip("empty_question", where)
            continue
        answers = [a.strip() for a in answers if a.strip()]
        if not answers:
            skip("empty_answers", where)
            continue
        if isinstance(image_id, str) and not image_id.isdigit():
            raise PrepareError(f"{qpath}: {item.where} has image_id {image_id!r}, expected COCO's integer id")
        name = f"COCO_{subtype}_{int(image_id):012d}.jpg"
        image = str(root / name) if root is not None else name
        if check_images:
            path = Path(image) if root is not None else Path(os.path.abspath(out)).parent / name
            if not path.is_file():
                missing.add(str(path))
                skip("missing_image", str(path))
                continue
        row = {"image": image, "question": question.strip(), "answers": answers, "question_id": qid,
               "image_id": image_id}
        if qtype is not None:
            row["question_type"] = qtype
        if atype is not None:
            row["answer_type"] = atype
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        images.add(image)
        answers_total += len(answers)
    atomic_write_text(out, "".join(lines), fsync=True)
    report.rows, report.captions, report.images = len(lines), answers_total, len(images)
    report.skipped, report.examples = dict(sorted(skipped.items())), dict(sorted(examples.items()))
    report.missing_files = len(missing)
    report.seconds = round(time.perf_counter() - start, 3)
    write_report(report)
    return report
