"""Instruction-tuning data (InstructBLIP): (image or video, instruction, answer) records, from
instruction files, LLaVA conversations, and caption / VQA datasets through task templates,
mixed across datasets.

Every record is a :class:`~.base.CaptionRecord` whose ``caption`` is the answer (the target)
and whose ``prompt`` is the instruction; ``video=True`` marks a video file or frame folder.

Formats (``task="auto"`` tells them apart by their fields):

* instruction rows (JSONL / JSON list): ``image`` or ``video`` (a path; a frame folder for
  video), ``instruction`` (or ``question`` / ``prompt``), ``answer`` or ``answers``;
* LLaVA conversations (JSON): ``{"image": ..., "conversations": [{"from": "human", "value":
  "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}``: each human turn and the answer that
  follows is one pair (the ``<image>`` tag removed; turns are not chained);
* ``task="vqa"``: VQA rows (``question`` + ``answers``), the question put in one of
  InstructBLIP's VQA templates;
* ``task="caption"``: any caption dataset the training recipes read, each caption the answer to
  one of InstructBLIP's captioning templates.

Several answers (VQAv2's ten) train on the most frequent one (ties: the first given), or with
``weighted=True`` (BLIP-2's VQA fine-tuning) on every distinct answer, weighted by its share of
the human answers (the record's ``answers``; the loss is :class:`qformer.stage2.Stage2Objective`'s).
A VQA row's template is one of InstructBLIP's ten, fixed by a hash of its key (the same in every
epoch, rank and resume), or the one ``template`` given (fine-tuning asks one way).
:class:`InstructionMixture` samples datasets with probability proportional to the square root of
their size (InstructBLIP's rule), or to given weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import FILE_IMAGE_COLUMNS, AnyRecord, BadRecord, CaptionRecord, CaptionSource, DatasetSpecError, json_rows

# InstructBLIP's templates (paper, appendix), without the leading <Image> (the soft prompts come first).
CAPTION_TEMPLATES: tuple[str, ...] = (
    "A short image caption:",
    "A short image description:",
    "A photo of",
    "An image that shows",
    "Write a short description for the image.",
    "Write a description for the photo.",
    "Provide a description of what is presented in the photo.",
    "Briefly describe the content of the image.",
    "Can you briefly explain what you see in the image?",
    "Could you use a few words to describe what you perceive in the photo?",
    "Please provide a short depiction of the picture.",
    "Using language, provide a short account of the image.",
    "Use a few words to illustrate what is happening in the picture.",
)
VQA_TEMPLATES: tuple[str, ...] = (
    "{}",
    "Question: {}",
    "{} A short answer to the question is",
    "Q: {} A:",
    "Question: {} Short answer:",
    "Given the image, answer the following question with no more than three words. {}",
    "Based on the image, respond to this question with a short answer: {}. Answer:",
    "Use the provided image to answer the question: {} Provide your answer as short as possible:",
    'What is the answer to the following question? "{}"',
    'The question "{}" can be answered using the image. A short answer is',
)
TASKS = ("auto", "instruction", "vqa", "caption")
INSTRUCTION_FIELDS = ("instruction", "question", "prompt")
ANSWER_FIELDS = ("answer", "answers", "output", "response")


def pick_template(templates: Sequence[str], key: str) -> str:
    """A template fixed by ``key`` (blake2b, so the same in every process)."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return templates[h % len(templates)]


def answer_list(value: Any) -> list[str]:
    """The non-empty answers of an answer cell, in order, repeats kept (a string is one answer;
    VQAv2 ``[{"answer": ...}]`` objects give their ``answer``)."""
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, (list, tuple)):
        answers = [a.get("answer") if isinstance(a, dict) else a for a in value]
        return [a for a in answers if isinstance(a, str) and a.strip()]
    return []


def main_answer(value: Any) -> str | None:
    """The training target of an answer cell: a string, or the most frequent of a list (VQAv2
    ``[{"answer": ...}]`` objects too; ties: the first given)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value:
        answers = answer_list(value)
        if answers:
            counts = Counter(answers)
            return max(answers, key=lambda a: (counts[a], -answers.index(a)))
    return None


class InstructionSource(CaptionSource):
    """A map-style list of instruction records (see the module docstring)."""

    def __init__(self, records: list[AnyRecord], *, name: str, task: str) -> None:
        self.records, self.name, self.task = records, name, task

    @property
    def is_map_style(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self.records)

    def record(self, index: int) -> AnyRecord:
        return self.records[index]

    @classmethod
    def from_file(cls, path: str | Path, *, task: str = "auto", image_root: str | Path | None = None,
                  name: str | None = None, template: str | None = None, weighted: bool = False) -> "InstructionSource":
        """Read an instruction / LLaVA / VQA file (``task`` as in :data:`TASKS`, not "caption").
        ``template``: the one prompt template of VQA rows (``{}`` is the question; default: one of
        :data:`VQA_TEMPLATES` per row). ``weighted``: rows with several answers keep them all
        (``CaptionRecord.answers``) for the weighted multi-answer loss."""
        path = Path(path)
        if template is not None and (not isinstance(template, str) or "{}" not in template):
            raise DatasetSpecError(f"{path}: a VQA template needs a '{{}}' for the question, got {template!r}")
        if not path.is_file():
            raise FileNotFoundError(2, "instruction file not found", str(path))
        if task not in TASKS or task == "caption":
            raise DatasetSpecError(f"{path}: task must be one of {[t for t in TASKS if t != 'caption']} for a file "
                                   f"(captions: task 'caption' over a caption dataset), got {task!r}")
        root = Path(image_root) if image_root is not None else path.parent
        name = name or f"instructions:{path}"
        records: list[AnyRecord] = []
        tasks: set[str] = set()
        for n, (where, _, row) in enumerate(json_rows(path, what="instruction")):
            if not isinstance(row, dict):
                detail = str(row) if isinstance(row, Exception) else f"not an object: {type(row).__name__}"
                records.append(BadRecord(reason="bad_record", where=where, source=name, key=str(n), detail=detail))
                continue
            kind = task if task != "auto" else "llava" if "conversations" in row else "vqa" if (
                "question" in row and "instruction" not in row and "answers" in row) else "instruction"
            tasks.add(kind)
            records.extend(_records_of(row, n, where, kind, root, name, template=template, weighted=weighted))
        if not records:
            raise DatasetSpecError(f"{path}: no instruction rows")
        return cls(records, name=name, task="+".join(sorted(tasks)))

    @classmethod
    def from_captions(cls, source: CaptionSource) -> "InstructionSource":
        """Captions as answers to InstructBLIP's captioning templates."""
        if not source.is_map_style:
            raise DatasetSpecError(f"{source.name}: instruction mixtures need map-style datasets (not streaming)")
        records: list[AnyRecord] = []
        for i in range(len(source)):
            r = source.record(i)
            if isinstance(r, CaptionRecord):
                r = dataclasses.replace(r, prompt=pick_template(CAPTION_TEMPLATES, f"{source.name}#{r.key}"))
            records.append(r)
        return cls(records, name=f"captions:{source.name}", task="caption")


def _records_of(row: dict, n: int, where: str, kind: str, root: Path, name: str, *, template: str | None = None,
                weighted: bool = False) -> list[AnyRecord]:
    video = "video" in row
    field = "video" if video else next((f for f in FILE_IMAGE_COLUMNS if f in row), None)
    raw = row.get(field) if field else None
    if not isinstance(raw, str) or not raw.strip():
        return [BadRecord(reason="bad_record", where=where, source=name, key=str(n),
                          detail=f"no image/video path (fields {['video', *FILE_IMAGE_COLUMNS]})")]
    p = Path(raw.strip()).expanduser()
    image = str(p if p.is_absolute() else root / p)
    image_id = row.get("image_id", row.get("id", raw))
    image_id = image_id if isinstance(image_id, (int, str)) else raw
    base = dict(image=image, image_id=image_id, source=name, video=video)
    if kind == "llava":
        turns = row.get("conversations")
        if not isinstance(turns, list):
            return [BadRecord(reason="bad_record", where=where, source=name, key=str(n), detail="conversations is not a list")]
        out: list[AnyRecord] = []
        for t in range(len(turns) - 1):
            a, b = turns[t], turns[t + 1]
            if not (isinstance(a, dict) and isinstance(b, dict)) or a.get("from") != "human" or b.get("from") != "gpt":
                continue
            prompt = str(a.get("value", "")).replace("<image>", "").strip()
            out.append(CaptionRecord(caption=b.get("value"), prompt=prompt, key=f"{n}.{t}", **base))
        return out or [BadRecord(reason="bad_record", where=where, source=name, key=str(n),
                                 detail="no human -> gpt turn pair")]
    question = next((row[f] for f in INSTRUCTION_FIELDS if isinstance(row.get(f), str) and row[f].strip()), None)
    cell = next((row[f] for f in ANSWER_FIELDS if f in row), None)
    answer = main_answer(cell)
    if question is None:
        return [BadRecord(reason="bad_record", where=where, source=name, key=str(n),
                          detail=f"no instruction (fields {list(INSTRUCTION_FIELDS)})")]
    key = str(row.get("question_id", n))
    if kind == "vqa":
        prompt = (template or pick_template(VQA_TEMPLATES, f"{name}#{key}")).format(question.strip())
    else:
        prompt = question.strip()
    answers = tuple(answer_list(cell)) if weighted and isinstance(cell, (list, tuple)) else None
    return [CaptionRecord(caption=answer, prompt=prompt, key=key, answers=answers or None, **base)]


class InstructionMixture(CaptionSource):
    """Several instruction sources, sampled with probability proportional to ``weights`` (default:
    the square root of each dataset's size, as InstructBLIP). One epoch is ``sum(sizes)`` draws;
    within a dataset, items come in a seeded random order, cycling when a small dataset is drawn
    more often than it has items. Keys and image ids are prefixed with the dataset's position."""

    def __init__(self, sources: Sequence[InstructionSource], *, weights: Sequence[float] | None = None,
                 seed: int = 0) -> None:
        if not sources:
            raise DatasetSpecError("an instruction mixture of no datasets")
        self.sources = list(sources)
        sizes = np.array([len(s) for s in self.sources], dtype=np.float64)
        if (sizes == 0).any():
            raise DatasetSpecError(f"empty dataset(s) in the mixture: {[s.name for s in self.sources if not len(s)]}")
        w = np.sqrt(sizes) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != sizes.shape or (w < 0).any() or w.sum() <= 0:
            raise DatasetSpecError(f"mixture weights must be {len(sizes)} non-negative numbers, got {weights}")
        self.probabilities = w / w.sum()
        self.name = " | ".join(f"{s.name} ({p:.0%})" for s, p in zip(self.sources, self.probabilities))
        rng = np.random.default_rng(seed)
        total = int(sizes.sum())
        self._which = rng.choice(len(self.sources), size=total, p=self.probabilities)
        self._item = np.empty(total, dtype=np.int64)
        for j, src in enumerate(self.sources):
            slots = np.flatnonzero(self._which == j)
            reps = -(-len(slots) // len(src)) if len(slots) else 0
            order = np.concatenate([rng.permutation(len(src)) for _ in range(reps)]) if reps else np.empty(0, np.int64)
            self._item[slots] = order[: len(slots)]

    @property
    def is_map_style(self) -> bool:
        return True

    @property
    def has_video(self) -> bool:
        """Whether any record is a video clip (those are never read from a feature cache)."""
        return any(getattr(r, "video", False) for s in self.sources for r in s.records)

    def __len__(self) -> int:
        return len(self._which)

    def record(self, index: int) -> AnyRecord:
        j = int(self._which[index])
        r = self.sources[j].record(int(self._item[index]))
        if isinstance(r, CaptionRecord):
            return dataclasses.replace(r, image_id=f"{j}:{r.image_id}", key=f"{j}:{r.key}")
        return dataclasses.replace(r, key=f"{j}:{r.key}")


__all__ = ["CAPTION_TEMPLATES", "TASKS", "VQA_TEMPLATES", "InstructionMixture", "InstructionSource", "answer_list",
           "main_answer", "pick_template"]
