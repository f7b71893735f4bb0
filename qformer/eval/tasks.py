"""Evaluation tasks run on a model: what the training recipes evaluate periodically and what
``recipes/evaluate.py`` runs on a finished model, so both report the same numbers.

    eval_set = open_eval_set("data/val", vision=model.config.vision, max_images=500)
    cap = evaluate_captioning(model, eval_set, rank=rank, world_size=world_size)   # COCO metrics (+ plugins')
    vqa = evaluate_vqa(model, load_vqa_questions("data/val/vqa.jsonl"), rank=rank, world_size=world_size)
    ret = evaluate_eval_set_retrieval(model, eval_set, k=128, rank=rank, world_size=world_size)
    write_results({"captioning": cap.metrics, "vqa": vqa.metrics, "retrieval": ret}, out_dir)

Several ranks split the generation work: rank ``r`` of ``W`` handles items ``r, r+W, ...`` and
the predictions are all-gathered, so every rank returns the same, complete result (and the
metrics equal a one-process run's). With ``world_size=1`` nothing distributed is called.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Iterable, Iterator, Mapping, Sequence

import torch

from .. import plugins
from ..config import VisionConfig
from ..data import open_caption_dataset
from ..data.samples import Sample, SkipSample
from ..data.sources import CaptionRecord, json_rows
from ..distributed import gather_dict
from ..errors import DataError
from ..blip2 import Blip2
from ..generation import vqa_template as default_vqa_template
from ..io import atomic_write_lines, atomic_write_text
from ..model import Blip2Model
from .captioning import CaptionScores, caption_metrics
from .retrieval import RetrievalResult, evaluate_retrieval, flatten_captions
from .vqa import Protocol, VQADecodeSettings, exact_match_accuracy, normalize_answer, vqa_accuracy, vqa_score

#: What stage 2 reports while training: SPICE is left out (it needs Stanford CoreNLP on disk
#: and takes minutes), METEOR runs when Java is present.
TRAINING_CAPTION_METRICS: tuple[str, ...] = ("bleu", "cider", "rouge", "meteor")
#: Image columns tried in a VQA file, in order.
VQA_IMAGE_FIELDS: tuple[str, ...] = ("image", "image_path", "file_name", "filepath", "path", "file")


# ---------------------------------------------------------------------------- held-out images
@dataclass
class EvalSet:
    """Held-out images with all their reference captions."""

    inputs: torch.Tensor  # (N, 3, H, W) pixels or (N, T, C) cached tower features
    kind: str  # "pixel_values" or "vision_features"
    references: list[list[str]]  # per image
    image_ids: list[Hashable] | None = None  # per image, as the data names it (file path, id column)
    # Per caption scorer that knows this data (qformer.plugins), its reference of each image.
    scorer_references: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.references)

    def batches(self, batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
        return [{self.kind: self.inputs[s : s + batch_size]} for s in range(0, len(self), batch_size)]

    def generate_inputs(self, index: list[int]) -> dict[str, torch.Tensor]:
        """Keyword arguments of ``Blip2.generate`` for the images at ``index``."""
        return {"images" if self.kind == "pixel_values" else "vision_features": self.inputs[index]}

    @property
    def first_captions(self) -> list[str]:
        return [refs[0] for refs in self.references]

def first_record(path: Path) -> dict[str, Any]:
    """The first JSON object of a .jsonl / .json file ({} if there is none)."""
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data if isinstance(data, list) else next((v for v in data.values() if isinstance(v, list)), [])
        return rows[0] if rows and isinstance(rows[0], dict) else {}
    with path.open(encoding="utf-8") as f:
        line = next((line for line in f if line.strip()), "{}")
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return row if isinstance(row, dict) else {}


#: List-valued columns of reference captions, preferred for evaluation (COCO style: 5 per image).
REFERENCE_LIST_COLUMNS: tuple[str, ...] = ("captions", "sentences")


def reference_column(spec: Any) -> str | None:
    """The caption column evaluation scores against: a list of reference captions per image
    when the data has one (COCO files, toy exports: every reference counts, as in the COCO
    evaluation), else the data's caption column (None: the pipeline's default choice).

    One definition for the training recipes' periodic evaluation and ``recipes/evaluate.py``,
    so both report the same number for the same captions."""
    if not isinstance(spec, (str, os.PathLike)):
        return None
    path = Path(spec).expanduser()
    meta = path / "metadata.jsonl" if path.is_dir() else path
    if meta.is_file() and meta.suffix.lower() in (".jsonl", ".json"):
        row = first_record(meta)
        return next((c for c in REFERENCE_LIST_COLUMNS if isinstance(row.get(c), list)), None)
    return None


def open_eval_set(
    spec: Any,
    *,
    vision: VisionConfig,
    max_images: int | None,
    feature_cache: Any = None,
    seed: int = 0,
    caption_column: str | None = None,
    progress: bool = False,
) -> EvalSet:
    """The first ``max_images`` distinct images of ``spec`` (anything
    :func:`qformer.data.open_caption_dataset` opens) with all their captions, preprocessed with
    the eval transform (or read from ``feature_cache``).

    Unusable records (corrupt images, empty captions) are skipped, as in training.
    ``caption_column`` picks the references; by default :func:`reference_column`'s choice (all
    the references a record lists). Raises :class:`~qformer.errors.DataError` naming ``spec`` if
    no image is usable.
    """
    from tqdm.auto import tqdm

    caption_column = caption_column or reference_column(spec)
    options = {"caption_column": caption_column} if caption_column else {}
    ds = open_caption_dataset(spec, vision=vision, train=False, feature_cache=feature_cache, seed=seed, **options)
    if not hasattr(ds, "source_index"):
        raise DataError(f"eval data {spec!r} is streamed; evaluation needs an indexable dataset (drop streaming)")
    order: list[Any] = []
    groups: dict[Any, list[str]] = {}
    tensors: dict[Any, torch.Tensor] = {}
    limit = max_images if max_images is not None and max_images > 0 else None
    for i in tqdm(range(len(ds)), desc="loading eval images", unit="record", disable=not progress, leave=False):
        # Decode an image only when it is new and wanted: further captions of a loaded image
        # only need cleaning, and images past the limit are not read at all.
        record = ds.source.record(ds.source_index(i))
        if isinstance(record, CaptionRecord) and (record.image_id in groups or
                                                  (limit is not None and len(order) == limit)):
            if record.image_id in groups:
                try:
                    groups[record.image_id].append(ds.processor.caption_of(record))
                except SkipSample:
                    pass
            continue
        item = ds[i]
        if not isinstance(item, Sample):
            continue
        if item.image_id not in groups:
            if limit is not None and len(order) == limit:
                continue
            order.append(item.image_id)
            groups[item.image_id] = []
            tensors[item.image_id] = item.vision_features if item.vision_features is not None else item.pixel_values
        groups[item.image_id].append(item.caption)
    if not order:
        raise DataError(f"eval data {spec!r} has no usable image")
    scorer_refs = {}
    for scorer in plugins.caption_scorers():
        refs = scorer.references(spec, order)
        if refs is not None and all(r is not None for r in refs):
            scorer_refs[scorer.name] = refs
    return EvalSet(inputs=torch.stack([tensors[i] for i in order]),
                   kind="vision_features" if feature_cache is not None else "pixel_values",
                   references=[groups[i] for i in order], image_ids=list(order), scorer_references=scorer_refs)


# ---------------------------------------------------------------------------- helpers
def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for s in range(0, len(items), size):
        yield items[s : s + size]


def _progress(iterable: Iterable, *, enabled: bool, total: int, desc: str) -> Iterable:
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------------------- captioning
@dataclass
class CaptioningEvaluation:
    """Captions of an :class:`EvalSet` and their scores.

    ``metrics``: COCO metrics (:func:`caption_metrics`'s :class:`CaptionScores`, with its
    skipped metrics and notices) plus, for data a plugin's caption scorer knows (the toy
    world's), ``<scorer>_<key>`` metrics averaged over images.
    """

    metrics: CaptionScores
    captions: dict[int, str]  # image index -> generated caption
    references: list[list[str]]
    image_ids: list[Hashable] | None = None
    per_image: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # scorer -> per-image metrics

    def sample_lines(self, n: int = 8) -> str:
        """The first ``n`` captions next to a reference, for a log."""
        return "\n".join(f"{i:4d}  pred: {self.captions[i]}\n      true: {self.references[i][0]}"
                         for i in range(min(n, len(self.references))))

    def write_samples(self, path: str | os.PathLike) -> Path:
        """Every caption with all its references, one tab-separated line per image (samples.txt)."""
        path = Path(path)
        atomic_write_text(path, "\n".join(f"{i}\tpred: {self.captions[i]}\ttrue: {' | '.join(self.references[i])}"
                                  for i in range(len(self.references))) + "\n")
        return path

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-ready row per image (captions.jsonl)."""
        out = []
        for i in range(len(self.references)):
            row: dict[str, Any] = {"index": i}
            if self.image_ids is not None:
                row["image"] = self.image_ids[i]
            row.update(prediction=self.captions[i], references=self.references[i])
            for name, scores in self.per_image.items():
                row[name] = scores[i]
            out.append(row)
        return out


def evaluate_captioning(
    model: Blip2,
    eval_set: EvalSet,
    *,
    rank: int = 0,
    world_size: int = 1,
    generate_options: Mapping[str, Any] | None = None,
    metrics: Iterable[str] = TRAINING_CAPTION_METRICS,
    batch_size: int = 32,
    progress: bool = False,
) -> CaptioningEvaluation:
    """Caption every image of ``eval_set`` (this rank its share, then gathered) with the
    model's training prompt, and score the captions against all references.

    ``generate_options`` go to :meth:`qformer.Blip2.generate` (``num_beams``, ``max_new_tokens``, ...;
    its defaults are LAVIS's). ``metrics``: :func:`caption_metrics` groups; metrics that need
    a missing Java are reported as skipped, not raised.
    """
    _check_rank(rank, world_size)
    options = dict(generate_options or {})
    options.setdefault("batch_size", batch_size)
    mine = list(range(rank, len(eval_set), world_size))
    part: dict[int, str] = {}
    chunks = _chunks(mine, batch_size)
    for index in _progress(chunks, enabled=progress and rank == 0, total=-(-len(mine) // batch_size), desc="captioning"):
        part.update(zip(index, model.generate(**eval_set.generate_inputs(list(index)), **options)))
    captions = gather_dict(part, world_size=world_size)
    refs = {i: eval_set.references[i] for i in range(len(eval_set))}
    scores = caption_metrics(captions, refs, metrics=metrics)
    result = CaptionScores({k: float(v) for k, v in scores.items()})
    result.skipped, result.notices, result.tokenizer = dict(scores.skipped), list(scores.notices), scores.tokenizer
    per_image = {}
    scorers = {s.name: s for s in plugins.caption_scorers()}
    for name, refs in eval_set.scorer_references.items():
        scores = [scorers[name].score(captions[i], refs[i]) for i in range(len(eval_set))]
        for key in scores[0]:
            result[f"{name}_{key}"] = sum(p[key] for p in scores) / len(scores)
        per_image[name] = scores
    return CaptioningEvaluation(metrics=result, captions={i: captions[i] for i in range(len(eval_set))},
                                references=eval_set.references, image_ids=eval_set.image_ids, per_image=per_image)


# ---------------------------------------------------------------------------- VQA
@dataclass(frozen=True)
class VQAQuestion:
    """One question about one image, with its human answers (VQAv2: ten; GQA-style: one)."""

    question_id: Hashable
    image: str  # a path
    question: str
    answers: tuple[str, ...]
    answer_type: str | None = None
    question_type: str | None = None


class VQAFileError(DataError):
    """A VQA file that cannot be read; the message names the file, the line and the field."""


def _answers_of(row: dict[str, Any], where: str) -> tuple[str, ...]:
    if "answers" in row:
        raw = row["answers"]
        items = raw if isinstance(raw, list) else [raw]
        answers = []
        for a in items:  # VQAv2 annotations: [{"answer": ..., "answer_confidence": ...}, ...]
            a = a.get("answer") if isinstance(a, dict) else a
            if not isinstance(a, str) or not a.strip():
                raise VQAFileError(f"{where}: field 'answers' must be a list of non-empty strings (or of "
                                   f'{{"answer": ...}} objects), got {raw!r}')
            answers.append(a)
    elif "answer" in row:
        raw = row["answer"]
        answers = [raw] if isinstance(raw, str) else list(raw) if isinstance(raw, list) else []
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise VQAFileError(f"{where}: field 'answer' must be a non-empty string or list of strings, got {raw!r}")
    else:
        raise VQAFileError(f"{where}: no 'answers' field (a list of human answers) and no 'answer' field; "
                           f"fields are {sorted(row)}")
    if not answers:
        raise VQAFileError(f"{where}: field 'answers' is empty: every question needs at least one answer")
    return tuple(answers)


def load_vqa_questions(
    path: str | os.PathLike, *, image_root: str | os.PathLike | None = None, max_questions: int | None = None
) -> list[VQAQuestion]:
    """Read a VQA file: JSONL (one object per line) or JSON (a list of objects).

    Each row needs an image (``image`` / ``image_path`` / ``file_name`` / ... as a path,
    relative to ``image_root``, default the file's folder), a ``question``, and ``answers``
    (a list of strings or of VQAv2 ``{"answer": ...}`` objects) or a single ``answer``.
    Optional: ``question_id`` (default: the line number), ``answer_type``, ``question_type``.
    A bad row raises :class:`VQAFileError` naming the file, the line and the field. Images
    are not opened here (a missing file is reported when it is read).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "VQA file not found", str(path))
    root = Path(image_root) if image_root is not None else path.parent
    rows = json_rows(path, error=VQAFileError, what="VQA")
    for where, _, row in rows:
        if isinstance(row, json.JSONDecodeError):
            raise VQAFileError(f"{where}: not valid JSON: {row}") from row
    out: list[VQAQuestion] = []
    seen: set[Hashable] = set()
    for where, number, row in rows:
        if max_questions is not None and 0 < max_questions <= len(out):
            break
        if not isinstance(row, dict):
            raise VQAFileError(f"{where}: expected a JSON object, got {type(row).__name__}")
        image_field = next((f for f in VQA_IMAGE_FIELDS if f in row), None)
        if image_field is None or not isinstance(row[image_field], str) or not row[image_field].strip():
            raise VQAFileError(f"{where}: no image path (field {' / '.join(VQA_IMAGE_FIELDS)}); fields are {sorted(row)}")
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise VQAFileError(f"{where}: field 'question' is missing or empty")
        qid = row.get("question_id", row.get("id", number))  # default: the line (item) number
        if isinstance(qid, list) or qid in seen:
            raise VQAFileError(f"{where}: question_id {qid!r} is repeated (or not a scalar)")
        seen.add(qid)
        image = Path(row[image_field].strip()).expanduser()
        out.append(VQAQuestion(question_id=qid, image=str(image if image.is_absolute() else root / image),
                               question=question.strip(), answers=_answers_of(row, where),
                               answer_type=row.get("answer_type"), question_type=row.get("question_type")))
    if not out:
        raise VQAFileError(f"{path}: no questions")
    return out


class TaskScores(dict):
    """``dict[str, float]`` of a task's metrics plus what was not computed and why (as
    :class:`CaptionScores`), for :func:`qformer.eval.report.write_results`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skipped: dict[str, str] = {}
        self.notices: list[str] = []
        self.info: dict[str, Any] = {}

    def metadata(self) -> dict[str, Any]:
        return {"skipped": dict(self.skipped), "notices": list(self.notices), **self.info}


@dataclass
class VQAEvaluation:
    """Answers to a list of :class:`VQAQuestion` and their scores.

    ``metrics``: ``vqa_accuracy`` (VQAv2, percent; per ``answer_type`` too when the data has
    types), ``exact_match`` (percent: the normalised answer equals one of the answers, GQA /
    OK-VQA style; per ``question_type`` too when the data has them), ``num_questions``.
    """

    metrics: TaskScores
    predictions: dict[Hashable, str]
    questions: list[VQAQuestion]
    prompts: dict[Hashable, str] = field(default_factory=dict)

    def rows(self, *, protocol: Protocol = "official") -> list[dict[str, Any]]:
        """One JSON-ready row per question (answers.jsonl), with its own scores."""
        out = []
        for q in self.questions:
            pred = self.predictions[q.question_id]
            out.append({
                "question_id": q.question_id, "image": q.image, "question": q.question,
                "prompt": self.prompts.get(q.question_id), "prediction": pred, "answers": list(q.answers),
                "vqa_accuracy": vqa_accuracy(pred, q.answers, protocol=protocol) if len(q.answers) > 1 else None,
                "exact_match": any(normalize_answer(a) == normalize_answer(pred) for a in q.answers),
                "answer_type": q.answer_type, "question_type": q.question_type,
            })
        return out

    def sample_lines(self, n: int = 8) -> str:
        return "\n".join(f"{q.question_id}: {q.question}\n      pred: {self.predictions[q.question_id]}"
                         f"   true: {q.answers[0]}" for q in self.questions[:n])


def vqa_template(model: Blip2Model, template: str | None = None) -> str:
    """BLIP-2's zero-shot prompt for the model's LLM kind ("Question: {} Answer:" for causal LMs,
    "Question: {} Short answer:" for FlanT5), unless ``template`` is given."""
    if template is not None:
        if "{}" not in template:
            raise ValueError(f"a VQA prompt template needs a '{{}}' for the question, got {template!r}")
        return template
    return default_vqa_template(model)


def evaluate_vqa(
    model: Blip2,
    questions: Sequence[VQAQuestion],
    *,
    rank: int = 0,
    world_size: int = 1,
    decode: VQADecodeSettings = VQADecodeSettings(),
    template: str | None = None,
    protocol: Protocol = "official",
    batch_size: int = 32,
    progress: bool = False,
) -> VQAEvaluation:
    """Zero-shot VQA as BLIP-2 evaluates it: the prompt of :func:`vqa_template`, beam search with
    ``decode`` (beam 5, at most 10 new tokens, length penalty -1), then VQAv2 accuracy (official
    normalisation, leave-one-out over the human answers) and exact match.

    This rank answers questions ``rank, rank + world_size, ...``; answers are gathered so every
    rank returns the full result. VQAv2 accuracy needs several human answers per question: on
    single-answer data it is skipped (with the reason) and exact match is the metric.
    """
    _check_rank(rank, world_size)
    if not questions:
        raise ValueError("evaluate_vqa needs at least one question")
    template = vqa_template(model, template)
    mine = list(questions[rank::world_size])
    part: dict[Hashable, str] = {}
    for chunk in _progress(_chunks(mine, batch_size), enabled=progress and rank == 0,
                           total=-(-len(mine) // batch_size), desc="answering"):
        paths = list(dict.fromkeys(q.image for q in chunk))  # each image preprocessed once per chunk
        missing = next((q for q in chunk if not Path(q.image).is_file()), None)
        if missing is not None:
            raise FileNotFoundError(2, f"image of VQA question {missing.question_id!r} not found", missing.image)
        pixels = model.vision.preprocess(paths)
        index = [paths.index(q.image) for q in chunk]
        prompts = [template.format(q.question) for q in chunk]
        answers = model.generate(pixels[index], prompts, batch_size=len(chunk), **decode.generate_kwargs())
        part.update(zip((q.question_id for q in chunk), answers))
    predictions = gather_dict(part, world_size=world_size)
    predictions = {q.question_id: predictions[q.question_id] for q in questions}
    gts = {q.question_id: list(q.answers) for q in questions}
    metrics = TaskScores()
    if all(len(q.answers) > 1 for q in questions):
        types = {q.question_id: q.answer_type for q in questions if q.answer_type}
        score = vqa_score(predictions, gts, answer_types=types or None, protocol=protocol)
        metrics["vqa_accuracy"] = score["accuracy"]
        for k, v in score.items():
            if k.startswith("accuracy/"):
                metrics[f"vqa_accuracy/{k.split('/', 1)[1]}"] = v
    else:
        metrics.skipped["vqa_accuracy"] = ("some questions have a single answer; VQAv2 accuracy averages over "
                                           "several human answers, so only exact match is reported")
    metrics["exact_match"] = exact_match_accuracy(predictions, gts)["accuracy"]
    by_type: dict[str, list[VQAQuestion]] = {}
    for q in questions:
        if q.question_type:
            by_type.setdefault(q.question_type, []).append(q)
    for qtype, qs in sorted(by_type.items()):
        sub = {q.question_id: predictions[q.question_id] for q in qs}
        metrics[f"exact_match/{qtype}"] = exact_match_accuracy(sub, {q.question_id: gts[q.question_id] for q in qs})["accuracy"]
    metrics["num_questions"] = len(questions)
    metrics.info = {"protocol": protocol, "prompt": template, "decode": decode.generate_kwargs()}
    return VQAEvaluation(metrics=metrics, predictions=predictions, questions=list(questions),
                         prompts={q.question_id: template.format(q.question) for q in questions})


# ---------------------------------------------------------------------------- retrieval
def evaluate_eval_set_retrieval(
    model: Blip2Model,
    eval_set: EvalSet,
    *,
    k: int = 128,
    references: str = "all",
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 64,
    progress: bool = False,
    **options: Any,
) -> RetrievalResult:
    """Image<->text retrieval over ``eval_set`` (:func:`evaluate_retrieval`: ITC top-``k``, ITM
    re-ranking). ``references="all"`` uses every caption of every image as a text (the COCO
    protocol: an image query hits if any of its captions is ranked high enough);
    ``"first"`` only the first caption (what stage 1 evaluates while training)."""
    if references not in ("all", "first"):
        raise ValueError(f"references must be 'all' or 'first', got {references!r}")
    captions = eval_set.references if references == "all" else [[c] for c in eval_set.first_captions]
    texts, txt2img, img2txt = flatten_captions(captions)
    return evaluate_retrieval(model, eval_set.batches(batch_size), texts, txt2img, img2txt, k=k, rank=rank,
                              world_size=world_size, batch_size=batch_size, progress=progress, **options)


# ---------------------------------------------------------------------------- files
def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """One JSON object per line, written atomically (a crashed run leaves no half file)."""
    return atomic_write_lines(path, rows)


__all__ = [
    "TRAINING_CAPTION_METRICS",
    "CaptioningEvaluation",
    "EvalSet",
    "TaskScores",
    "VQAEvaluation",
    "VQAFileError",
    "VQAQuestion",
    "evaluate_captioning",
    "evaluate_eval_set_retrieval",
    "evaluate_vqa",
    "load_vqa_questions",
    "first_record",
    "open_eval_set",
    "reference_column",
    "vqa_template",
    "write_jsonl",
]
