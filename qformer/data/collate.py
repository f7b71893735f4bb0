"""Collators: drop the skipped-sample sentinels, count them, stack images, tokenise captions.

Tokenisation happens here (in DataLoader workers), never in the model's forward — one of the
costs of the original implementation. :func:`collate_samples` is the tokenizer-free part, shared
with the stage-2 collator (which tokenises for the LLM instead of BERT).

Every collated batch carries its :class:`~qformer.data.report.DataReport` delta under
:data:`~qformer.data.report.DATA_STATS_KEY`: samples used, batches, empty batches, skips and
conversions, and (map-style datasets) the dataset index and status of every record it read, from
which the loader counts each record once however many epochs read it.
:class:`~qformer.data.loader.CaptionLoader` pops it and merges it; a loop that iterates a plain
DataLoader must pop it too before calling the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from .report import DATA_STATS_KEY, DataReport
from .samples import Sample, Skipped, record_status
from .transforms import sample_seed

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

__all__ = ["CollatedSamples", "Stage1Collator", "Stage2Collator", "collate_samples", "is_empty_batch", "stable_image_id"]


def stable_image_id(image_id: Any) -> int:
    """An int64 image id, the same in every process and run.

    Integers pass through; anything else (file names, tar keys) is hashed with blake2b
    (Python's ``hash`` is salted per process, so it cannot be used across workers and ranks).
    """
    if isinstance(image_id, bool):
        return int(image_id)
    if isinstance(image_id, int) or (hasattr(image_id, "__index__") and not isinstance(image_id, str)):
        return int(image_id)
    digest = hashlib.blake2b(str(image_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(kw_only=True)
class CollatedSamples:
    """The tokenizer-free part of a batch: images (or cached features), captions, ids, counts."""

    captions: list[str]
    image_ids: torch.Tensor  # (B,) int64, see stable_image_id
    keys: list[str]
    pixel_values: torch.Tensor | None  # (B, 3, S, S) float32; video clips (B, T, 3, S, S)
    vision_features: torch.Tensor | None  # (B, N, C) float32
    report: DataReport
    prompts: list[str | None] | None = None  # per-sample instructions (instruction tuning), else None
    # Per-sample weighted targets (VQA fine-tuning) when any sample has them (the others: their
    # caption at weight 1), else None.
    answers: list[tuple[tuple[str, float], ...]] | None = None

    def __len__(self) -> int:
        return len(self.captions)

    def image_inputs(self) -> dict[str, torch.Tensor]:
        """``{"pixel_values": ...}`` or ``{"vision_features": ...}``, whichever this batch has."""
        if self.vision_features is not None:
            return {"vision_features": self.vision_features}
        if self.pixel_values is not None:
            return {"pixel_values": self.pixel_values}
        return {}


def collate_samples(items: Sequence[Sample | Skipped]) -> CollatedSamples:
    """Drop :class:`Skipped` sentinels (merging their counts) and stack the rest.

    An all-skipped list gives an empty :class:`CollatedSamples` (``len == 0``, no tensors) whose
    report counts one ``empty_batches`` (unless it holds only end-of-stream count carriers); it
    does not raise.
    """
    report = DataReport()
    good: list[Sample] = []
    for item in items:
        if item is None:  # not produced by qformer datasets; tolerated and counted
            report.add("bad_record", "None item in batch")
            continue
        if item.report is not None:
            report.merge(item.report)
        if item.index is not None:
            report.records[item.index] = record_status(item)
        if isinstance(item, Sample):
            good.append(item)
    if not good:
        if not all(isinstance(i, Skipped) and i.carrier for i in items):
            report.add("empty_batches")
        return CollatedSamples(captions=[], image_ids=torch.empty(0, dtype=torch.long), keys=[], pixel_values=None,
                               vision_features=None, report=report)
    report.add("samples", n=len(good)).add("batches")
    has_feats = [s.vision_features is not None for s in good]
    if any(has_feats) and not all(has_feats):
        raise ValueError("a batch mixes samples with vision_features and samples with pixel_values")
    if not has_feats[0] and len({tuple(s.pixel_values.shape) for s in good}) > 1:
        shapes = sorted({tuple(s.pixel_values.shape) for s in good})
        raise ValueError(f"a batch mixes samples of different shapes {shapes} (images with video clips, or clips "
                         "of different lengths): keep one kind per dataset and sample every clip to num_frames")
    pixel_values = None if has_feats[0] else torch.stack([s.pixel_values for s in good]).to(torch.float32)  # (B, 3, S, S)
    vision_features = torch.stack([s.vision_features for s in good]).to(torch.float32) if has_feats[0] else None  # (B, N, C)
    return CollatedSamples(
        captions=[s.caption for s in good],
        image_ids=torch.tensor([stable_image_id(s.image_id) for s in good], dtype=torch.long),
        keys=[s.key for s in good],
        pixel_values=pixel_values,
        vision_features=vision_features,
        report=report,
        prompts=[s.prompt for s in good] if any(s.prompt is not None for s in good) else None,
        answers=[s.answers or ((s.caption, 1.0),) for s in good] if any(s.answers for s in good) else None,
    )


def is_empty_batch(batch: dict[str, Any]) -> bool:
    """True for a collated batch with no usable sample (only its counts)."""
    return "image_ids" not in batch or len(batch["image_ids"]) == 0


class Stage1Collator:
    """Stage-1 batches: ``pixel_values`` (B, 3, S, S) or ``vision_features`` (B, N, C), ``input_ids``
    and ``attention_mask`` (B, L) (BERT, ``padding="longest"``, truncated on the right to
    ``max_length``), ``image_ids`` (B,) int64, and the batch's counts under ``data_stats``.

    An all-skipped batch gives ``{"data_stats": report}`` only (see :func:`is_empty_batch`).
    """

    def __init__(self, tokenizer: "PreTrainedTokenizerBase", *, max_length: int = 32) -> None:
        if getattr(tokenizer, "truncation_side", "right") != "right":
            raise ConfigError("Stage1Collator needs a tokenizer that truncates on the right (BLIP-2 keeps the caption's start)")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    def __call__(self, items: Sequence[Sample | Skipped]) -> dict[str, Any]:
        collated = collate_samples(items)
        if len(collated) == 0:
            return {DATA_STATS_KEY: collated.report}
        tokens = self.tokenizer(
            collated.captions, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {
            **collated.image_inputs(),
            "input_ids": tokens["input_ids"].to(torch.long),
            "attention_mask": tokens["attention_mask"].to(torch.long),
            "image_ids": collated.image_ids,
            DATA_STATS_KEY: collated.report,
        }


class Stage2Collator:
    """Stage-2 batches: the images (or cached features) plus the LLM tensors of
    :class:`qformer.stage2.Stage2TextCollator` (prompt handling, BLIP-2's label rules, the
    prefix-LM split), ``image_ids`` and the batch's counts under ``data_stats``. A batch with
    weighted answers (VQA fine-tuning) has one LLM row per (question, distinct answer), with
    ``answer_rows`` / ``answer_weights`` (see :meth:`~qformer.stage2.Stage2TextCollator.weighted`)."""

    def __init__(self, text_collator: Any, *, seed: int = 0) -> None:
        self.text = text_collator
        self.seed = int(seed)

    def __call__(self, items: Sequence[Sample | Skipped]) -> dict[str, Any]:
        collated = collate_samples(items)
        if len(collated) == 0:
            return {DATA_STATS_KEY: collated.report}
        seeds = [sample_seed(self.seed, 0, key) for key in collated.keys]  # prefix-LM split per sample
        if collated.answers is not None:
            text = self.text.weighted(collated.answers, prompts=collated.prompts)
        else:
            text = self.text(collated.captions, seeds=seeds, prompts=collated.prompts) \
                if collated.prompts is not None else self.text(collated.captions, seeds=seeds)
        return {
            **collated.image_inputs(),
            **text,
            "image_ids": collated.image_ids,
            DATA_STATS_KEY: collated.report,
        }
