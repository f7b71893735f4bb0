"""Record -> training sample, with validation: the one place where images are decoded.

:class:`SampleProcessor` turns a :class:`~qformer.data.sources.CaptionRecord` into a
:class:`Sample` (cleaned caption + ``pixel_values`` or cached ``vision_features``) or into a
:class:`Skipped` sentinel that carries the reason as a :class:`~qformer.data.report.DataReport`
delta. It never raises for bad data and never returns None, so DataLoaders, collators and the
stage-2 pipeline can all share it. Validation is lazy (one sample at a time, when loaded); the
map-style dataset offers an optional up-front scan built on :meth:`SampleProcessor.validate`.

Checks, cheapest first: the caption (missing, empty after cleaning), then the image (missing,
unreadable, corrupt, truncated, too large for PIL's bomb guard, smaller than ``min_image_size``
on a side), then the mode conversion (a valid image in CMYK / RGBA / palette / greyscale / 16-bit
is converted by :mod:`qformer.vision`'s rules and counted as ``converted:<MODE>``, not dropped).
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch
from PIL import Image, UnidentifiedImageError

from ..images import ImageLoadError, load_image
from .report import CONVERTED, DataReport
from .sources import BadRecord, CaptionRecord, ImageRef
from .transforms import CaptionCleaner, ImageTransform

if TYPE_CHECKING:  # pragma: no cover
    from .cache import FeatureCache

__all__ = [
    "Sample",
    "SampleProcessor",
    "Skipped",
    "SkipSample",
    "decode_image_bytes",
    "image_content_key",
    "read_image",
]


@dataclass(kw_only=True)
class Sample:
    """A usable sample. Exactly one of ``pixel_values`` (3, S, S) / ``vision_features`` (N, C) is set.

    ``report`` is a delta to count with this sample (its mode conversion; in streaming datasets
    also the skips that preceded it), or None.
    """

    caption: str
    image_id: int | str
    key: str
    source: str
    pixel_values: torch.Tensor | None = None
    vision_features: torch.Tensor | None = None
    report: DataReport | None = None


@dataclass(kw_only=True)
class Skipped:
    """A sentinel in place of a bad sample: the collator drops it and merges its ``report``.

    ``carrier=True`` marks the end-of-stream sentinel of a streaming dataset, which stands for no
    batch slot (only for counts still to deliver); a batch of carriers only is not an empty batch.
    """

    report: DataReport = field(default_factory=DataReport)
    carrier: bool = False


class SkipSample(Exception):
    """Raised inside the loading helpers; becomes a :class:`Skipped` with ``reason``."""

    def __init__(self, reason: str, where: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {where}" + (f" ({detail})" if detail else ""))
        self.reason, self.where, self.detail = reason, where, detail


def _classify_decode_error(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, ImageLoadError) and exc.__cause__ is not None else exc
    if isinstance(cause, (PermissionError, IsADirectoryError)):
        return "unreadable_image"
    if "truncat" in str(cause).lower():
        return "truncated_image"
    return "corrupt_image"


def decode_image_bytes(data: bytes, *, where: str) -> Image.Image:
    """Decode encoded image bytes fully (as :func:`qformer.vision.load_image` does for files)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.copy()
    except Image.DecompressionBombError as exc:
        raise SkipSample("oversized_image", where, str(exc)) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise SkipSample(_classify_decode_error(exc), where, str(exc)) from exc


def read_image(image: ImageRef, *, where: str) -> Image.Image:
    """A decoded PIL image (original mode) from a path, bytes or PIL image; raises :class:`SkipSample`."""
    if image is None:
        raise SkipSample("missing_image", where, "the record has no image")
    if isinstance(image, Image.Image):
        try:
            image.load()
        except Exception as exc:  # a lazily opened file that turns out to be bad
            raise SkipSample(_classify_decode_error(exc), where, str(exc)) from exc
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image_bytes(bytes(image), where=where)
    if isinstance(image, (str, os.PathLike)):
        try:
            return load_image(image)
        except FileNotFoundError as exc:
            raise SkipSample("missing_image", where, str(exc)) from exc
        except ImageLoadError as exc:
            raise SkipSample(_classify_decode_error(exc), where, str(exc.__cause__ or exc)) from exc
        except Image.DecompressionBombError as exc:
            raise SkipSample("oversized_image", where, str(exc)) from exc
        except OSError as exc:  # pragma: no cover - load_image wraps OSErrors; belt and braces
            raise SkipSample("unreadable_image", where, str(exc)) from exc
    raise SkipSample("bad_record", where, f"unsupported image value of type {type(image).__name__}")


def _read_bytes(image: ImageRef, *, where: str) -> bytes | Image.Image:
    """Raw encoded bytes (files are read, not decoded) or the PIL image itself, for hashing."""
    if image is None:
        raise SkipSample("missing_image", where, "the record has no image")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise SkipSample("missing_image", where, str(exc)) from exc
        except OSError as exc:  # permissions, a directory, I/O errors
            raise SkipSample("unreadable_image", where, str(exc)) from exc
    raise SkipSample("bad_record", where, f"unsupported image value of type {type(image).__name__}")


def image_content_key(data: bytes | Image.Image) -> str:
    """A content hash: of the encoded bytes, or for an in-memory PIL image of its mode, size and pixels."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(data, Image.Image):
        h.update(f"pil:{data.mode}:{data.size}".encode())
        h.update(data.tobytes())
    else:
        h.update(data)
    return h.hexdigest()


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
    """

    transform: ImageTransform | None = None
    captions: CaptionCleaner = field(default_factory=CaptionCleaner)
    min_image_size: int = 8
    feature_cache: "FeatureCache | None" = None
    require_caption: bool = True

    def __post_init__(self) -> None:
        if self.feature_cache is not None and self.transform is not None and getattr(self.transform, "is_random", True):
            raise ValueError(
                "the feature cache holds the frozen tower's features of un-augmented (eval-transformed) images; it "
                f"cannot be combined with a random image transform ({type(self.transform).__name__}). Use train=False "
                "(no augmentation) with the cache, or drop the cache to train with augmentation."
            )
        if self.feature_cache is None and self.transform is None:
            raise ValueError("SampleProcessor needs an image transform (or a feature cache)")

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

    def _check_size(self, size: tuple[int, int], where: str) -> None:
        if min(size) < self.min_image_size:
            raise SkipSample("tiny_image", where, f"{size[0]}x{size[1]} < {self.min_image_size}px")

    def image_of(self, record: CaptionRecord) -> Image.Image:
        """The decoded image, size-checked; raises :class:`SkipSample`."""
        img = read_image(record.image, where=record.where)
        self._check_size(img.size, record.where)
        return img

    def _cached_features(self, record: CaptionRecord) -> tuple[torch.Tensor, str]:
        assert self.feature_cache is not None
        data = _read_bytes(record.image, where=record.where)
        hit = self.feature_cache.lookup(image_content_key(data))
        if hit is not None:
            features, mode, size = hit
            self._check_size(size, record.where)
            return features, mode
        # Not cached: find out why (a bad image is counted under its own reason).
        img = data if isinstance(data, Image.Image) else decode_image_bytes(data, where=record.where)
        self._check_size(img.size, record.where)
        raise SkipSample("uncached_image", record.where, "valid image without cached features (fill the cache first)")

    # -- public -------------------------------------------------------------------------------

    def __call__(self, record: CaptionRecord | BadRecord, *, generator: torch.Generator | None = None) -> Sample | Skipped:
        """A :class:`Sample`, or a :class:`Skipped` whose report names the reason."""
        if isinstance(record, BadRecord):
            return _skipped(record.reason, record.where)
        try:
            caption = self.caption_of(record)
            if self.feature_cache is not None:
                features, mode = self._cached_features(record)
                sample = Sample(caption=caption, image_id=record.image_id, key=record.key, source=record.source,
                                vision_features=features)
            else:
                img = self.image_of(record)
                mode = img.mode
                try:
                    pixels = self.transform(img, generator=generator)  # type: ignore[misc]
                except (ImageLoadError, OSError, ValueError) as exc:
                    raise SkipSample("unsupported_image", record.where, str(exc)) from exc
                sample = Sample(caption=caption, image_id=record.image_id, key=record.key, source=record.source,
                                pixel_values=pixels)
        except SkipSample as skip:
            return _skipped(skip.reason, skip.where)
        if mode != "RGB":
            sample.report = converted_report(mode)
        return sample

    def validate(self, record: CaptionRecord | BadRecord) -> DataReport:
        """Check a record without transforming it (for pre-scans): the delta it would count.

        A usable record gives an empty report or one with ``converted``; a bad one gives its
        skip reason. With a feature cache, a valid image must also be cached.
        """
        if isinstance(record, BadRecord):
            return _skipped(record.reason, record.where).report
        try:
            self.caption_of(record)
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
    return DataReport().add(CONVERTED).add(f"{CONVERTED}:{mode}")


def _skipped(reason: str, where: str) -> Skipped:
    return Skipped(report=DataReport().add(reason, where))


SampleOrSkipped = Union[Sample, Skipped]
