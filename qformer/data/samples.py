"""Record -> training sample, with validation: the one place where records' images are decoded.

:class:`SampleProcessor` turns a :class:`~qformer.data.sources.CaptionRecord` into a
:class:`Sample` (cleaned caption + ``pixel_values`` or cached ``vision_features``) or into a
:class:`Skipped` sentinel that carries the reason as a :class:`~qformer.data.report.DataReport`
delta. It never raises for bad data and never returns None, so DataLoaders, collators and the
stage-2 pipeline can all share it. Validation is lazy (one sample at a time, when loaded); the
map-style dataset offers an optional up-front scan built on :meth:`SampleProcessor.validate`.

Checks, cheapest first: the caption (missing, empty after cleaning), then the image (missing,
unreadable, corrupt, truncated, too large for PIL's bomb guard, smaller than ``min_image_size``
on a side), then the mode conversion (a valid image in CMYK / RGBA / palette / greyscale / 16-bit
is converted by :func:`qformer.images.to_rgb` and counted as ``converted:<MODE>``, not dropped).

Both kinds of item also say which record they are (``index``, set by the map-style dataset) and
what became of it (:func:`record_status`), so that the loader can count each record once however
many epochs read it (see :mod:`qformer.data.report`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch
from PIL import Image

from ..errors import ConfigError, ImageLoadError
from ..video import clip_frames
from .cache import FeatureCache
from .reading import SkipSample, decode_or_skip, image_content_key, read_image, read_image_bytes
from .report import CONVERTED, USABLE, DataReport
from .sources import BadRecord, CaptionRecord
from .transforms import CaptionCleaner, ImageTransform

__all__ = [
    "Sample",
    "SampleOrSkipped",
    "SampleProcessor",
    "SkipSample",
    "Skipped",
    "converted_report",
    "image_content_key",
    "read_image",
    "record_status",
]


@dataclass(kw_only=True)
class Sample:
    """A usable sample. Exactly one of ``pixel_values`` (3, S, S) / ``vision_features`` (N, C) is set.

    ``report`` is a delta to count with this sample (its mode conversion; in streaming datasets
    also the skips that preceded it), or None. ``mode``: the image's original PIL mode.
    ``index``: the record's index in a map-style dataset (None when streaming).
    """

    caption: str
    image_id: int | str
    key: str
    source: str
    pixel_values: torch.Tensor | None = None
    vision_features: torch.Tensor | None = None
    report: DataReport | None = None
    mode: str = "RGB"
    index: int | None = None
    prompt: str | None = None  # the instruction (instruction tuning); None: the card's prompt
    # Weighted targets (VQA fine-tuning): each distinct cleaned answer and its share of the human
    # answers (the shares sum to 1); None: ``caption`` is the one target.
    answers: tuple[tuple[str, float], ...] | None = None


@dataclass(kw_only=True)
class Skipped:
    """A sentinel in place of a bad sample: the collator drops it and merges its ``report``.

    ``reason``: why (one of :data:`~qformer.data.report.SKIP_REASONS`); ``index``: the record's
    index in a map-style dataset. ``carrier=True`` marks the end-of-stream sentinel of a
    streaming dataset, which stands for no record and no batch slot (only for counts still to
    deliver); a batch of carriers only is not an empty batch.
    """

    report: DataReport = field(default_factory=DataReport)
    reason: str = ""
    index: int | None = None
    carrier: bool = False


SampleOrSkipped = Union[Sample, Skipped]


def record_status(item: Sample | Skipped) -> str:
    """What became of the item's record: ``usable``, ``converted:<MODE>`` or the skip reason."""
    if isinstance(item, Sample):
        return USABLE if item.mode == "RGB" else f"{CONVERTED}:{item.mode}"
    return item.reason or "bad_record"


@dataclass(kw_only=True)
class SampleProcessor:
    """Validate and transform one record; see the module docstring for the checks.

    Args:
        transform: image -> (3, S, S) (:class:`~qformer.data.transforms.TrainTransform` /
            ``EvalTransform``); not used (may be None) when ``feature_cache`` is given.
        captions: the caption cleaner (max words, prompt prefix).
        min_image_size: images with a side below this many pixels are skipped as ``tiny_image``.
        feature_cache: read ``vision_features`` from this cache instead of decoding pixels. It holds
            features of un-augmented images, so a random ``transform`` is refused.
        require_caption: False for pipelines that only need images (filling the feature cache).
        num_frames: frames sampled from a video record (a video file or frame folder); its
            ``pixel_values`` are then (T, 3, S, S).
    """

    transform: ImageTransform | None = None
    captions: CaptionCleaner = field(default_factory=CaptionCleaner)
    min_image_size: int = 8
    feature_cache: FeatureCache | None = None
    require_caption: bool = True
    num_frames: int = 4

    def __post_init__(self) -> None:
        if self.feature_cache is not None and self.transform is not None and getattr(self.transform, "is_random", True):
            raise ConfigError(
                "the feature cache holds the frozen tower's features of un-augmented (eval-transformed) images; it "
                f"cannot be combined with a random image transform ({type(self.transform).__name__}). Use train=False "
                "(no augmentation) with the cache, or drop the cache to train with augmentation."
            )
        if self.feature_cache is None and self.transform is None:
            raise ConfigError("SampleProcessor needs an image transform (or a feature cache)")

    # -- pieces -------------------------------------------------------------------------------

    def caption_of(self, record: CaptionRecord) -> str:
        """The cleaned caption (prompt included); raises :class:`SkipSample` when there is none."""
        raw = record.caption
        if raw is None:
            if not self.require_caption:
                return ""
            raise SkipSample("missing_caption", record.where)
        if not isinstance(raw, str):
            raise SkipSample("bad_record", record.where, f"caption of type {type(raw).__name__}")
        caption = self.captions(raw)
        if not caption and self.require_caption:
            raise SkipSample("empty_caption", record.where, repr(raw[:40]))
        return caption

    def answers_of(self, record: CaptionRecord) -> tuple[tuple[str, float], ...] | None:
        """A record's weighted targets: each distinct answer after cleaning (so "Yes" and "yes."
        are one answer) with its share of the non-empty cleaned answers, the most frequent first
        (ties: the first given). None when the record has no ``answers``."""
        if record.answers is None:
            return None
        cleaned = [c for c in (self.captions(a) for a in record.answers if isinstance(a, str)) if c]
        if not cleaned:
            raise SkipSample("empty_caption", record.where, f"no answer left of {list(record.answers)[:3]!r}")
        counts = Counter(cleaned)
        order = sorted(counts, key=lambda a: (-counts[a], cleaned.index(a)))
        return tuple((a, counts[a] / len(cleaned)) for a in order)

    def _check_size(self, size: tuple[int, int], where: str) -> None:
        if min(size) < self.min_image_size:
            raise SkipSample("tiny_image", where, f"{size[0]}x{size[1]} < {self.min_image_size}px")

    def image_of(self, record: CaptionRecord) -> Image.Image:
        """The decoded image, size-checked; raises :class:`SkipSample`."""
        img = read_image(record.image, where=record.where)
        self._check_size(img.size, record.where)
        return img

    def video_of(self, record: CaptionRecord, generator: torch.Generator | None) -> torch.Tensor:
        """A video record's sampled frames, each decoded, checked and transformed: (T, 3, S, S).
        One seed per clip, so every frame gets the same augmentation."""
        if self.feature_cache is not None:
            raise SkipSample("unsupported_image", record.where, "video records are not read from the feature cache")
        if not isinstance(record.image, (str, Path)):
            raise SkipSample("missing_image" if record.image is None else "bad_record", record.where,
                             "a video record needs a path (a video file or a frame folder)")
        try:
            frames = clip_frames(record.image, self.num_frames)
        except FileNotFoundError as exc:
            raise SkipSample("missing_image", record.where, str(exc)) from exc
        except (ImageLoadError, ConfigError, OSError, ValueError) as exc:
            raise SkipSample("unreadable_image", record.where, str(exc)) from exc
        seed = None if generator is None else int(torch.randint(0, 2**62, (1,), generator=generator))
        out = []
        for frame in frames:
            img = frame if isinstance(frame, Image.Image) else read_image(frame, where=f"{record.where} ({frame})")
            self._check_size(img.size, record.where)
            g = None if seed is None else torch.Generator().manual_seed(seed)
            out.append(self.transform(img, generator=g))  # type: ignore[misc]
        return torch.stack(out)  # (T, 3, S, S)

    def _cached_features(self, record: CaptionRecord) -> tuple[torch.Tensor, str]:
        assert self.feature_cache is not None
        data = read_image_bytes(record.image, where=record.where)
        hit = self.feature_cache.lookup(image_content_key(data))
        if hit is not None:
            features, mode, size = hit
            self._check_size(size, record.where)
            return features, mode
        # Not cached: find out why (a bad image is counted under its own reason).
        img = data if isinstance(data, Image.Image) else decode_or_skip(data, where=record.where)
        self._check_size(img.size, record.where)
        raise SkipSample("uncached_image", record.where, "valid image without cached features (fill the cache first)")

    # -- public -------------------------------------------------------------------------------

    def __call__(self, record: CaptionRecord | BadRecord, *, generator: torch.Generator | None = None) -> Sample | Skipped:
        """A :class:`Sample`, or a :class:`Skipped` whose report names the reason."""
        if isinstance(record, BadRecord):
            return _skipped(record.reason, record.where)
        try:
            caption = self.caption_of(record)
            answers = self.answers_of(record)
            features = pixels = None
            if record.video:
                pixels, mode = self.video_of(record, generator), "RGB"
            elif self.feature_cache is not None:
                features, mode = self._cached_features(record)
            else:
                img = self.image_of(record)
                mode = img.mode
                try:
                    pixels = self.transform(img, generator=generator)  # type: ignore[misc]
                except (ImageLoadError, OSError, ValueError) as exc:
                    raise SkipSample("unsupported_image", record.where, str(exc)) from exc
        except SkipSample as skip:
            return _skipped(skip.reason, skip.where)
        return Sample(caption=caption, image_id=record.image_id, key=record.key, source=record.source,
                      pixel_values=pixels, vision_features=features, mode=mode, prompt=record.prompt,
                      answers=answers, report=converted_report(mode) if mode != "RGB" else None)

    def validate(self, record: CaptionRecord | BadRecord) -> DataReport:
        """Check a record without transforming it (for pre-scans): the delta it would count.

        A usable record gives an empty report or one with ``converted``; a bad one gives its
        skip reason. With a feature cache, a valid image must also be cached.
        """
        if isinstance(record, BadRecord):
            return _skipped(record.reason, record.where).report
        try:
            self.caption_of(record)
            self.answers_of(record)
            if self.feature_cache is not None:
                _, mode = self._cached_features(record)
            else:
                img = self.image_of(record)
                mode = img.mode
                if mode == "F":
                    raise SkipSample("unsupported_image", record.where, "32-bit float mode 'F' has no value range")
        except SkipSample as skip:
            return _skipped(skip.reason, skip.where).report
        return converted_report(mode) if mode != "RGB" else DataReport()


def converted_report(mode: str) -> DataReport:
    """The delta of one usable image converted from ``mode`` to RGB."""
    return DataReport().add(CONVERTED).add(f"{CONVERTED}:{mode}")


def _skipped(reason: str, where: str) -> Skipped:
    return Skipped(report=DataReport().add(reason, where), reason=reason)
