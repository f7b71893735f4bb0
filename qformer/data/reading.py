"""A record's image -> a decoded PIL image or its raw bytes, every failure named as a skip reason.

The decoding itself is :mod:`qformer.images` (shared with the model's own API, so training and
inference read a file the same way); this module only turns its errors into a
:class:`SkipSample` whose ``reason`` is one of :data:`~qformer.data.report.SKIP_REASONS`. Both
the sample processor and the feature cache read images through here.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from PIL import Image

from ..errors import ImageLoadError
from ..images import decode_image_bytes, load_image
from .sources import ImageRef

__all__ = ["SkipSample", "decode_or_skip", "image_content_key", "read_image", "read_image_bytes"]


class SkipSample(Exception):
    """Raised inside the loading helpers; becomes a :class:`~qformer.data.samples.Skipped` with ``reason``."""

    def __init__(self, reason: str, where: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {where}" + (f" ({detail})" if detail else ""))
        self.reason, self.where, self.detail = reason, where, detail


def _classify(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, ImageLoadError) and exc.__cause__ is not None else exc
    if isinstance(cause, (PermissionError, IsADirectoryError)):
        return "unreadable_image"
    if "truncat" in str(cause).lower():
        return "truncated_image"
    return "corrupt_image"


def decode_or_skip(data: bytes, *, where: str) -> Image.Image:
    """:func:`qformer.images.decode_image_bytes`, failures raised as :class:`SkipSample`."""
    try:
        return decode_image_bytes(data, where=where)
    except Image.DecompressionBombError as exc:
        raise SkipSample("oversized_image", where, str(exc)) from exc
    except ImageLoadError as exc:
        raise SkipSample(_classify(exc), where, str(exc.__cause__ or exc)) from exc


def read_image(image: ImageRef, *, where: str) -> Image.Image:
    """A decoded PIL image (original mode) from a path, bytes or PIL image; raises :class:`SkipSample`."""
    if image is None:
        raise SkipSample("missing_image", where, "the record has no image")
    if isinstance(image, Image.Image):
        try:
            image.load()
        except Exception as exc:  # a lazily opened file that turns out to be bad
            raise SkipSample(_classify(exc), where, str(exc)) from exc
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_or_skip(bytes(image), where=where)
    if isinstance(image, (str, os.PathLike)):
        try:
            return load_image(image)
        except FileNotFoundError as exc:
            raise SkipSample("missing_image", where, str(exc)) from exc
        except ImageLoadError as exc:
            raise SkipSample(_classify(exc), where, str(exc.__cause__ or exc)) from exc
        except Image.DecompressionBombError as exc:
            raise SkipSample("oversized_image", where, str(exc)) from exc
        except OSError as exc:  # pragma: no cover - load_image wraps OSErrors; belt and braces
            raise SkipSample("unreadable_image", where, str(exc)) from exc
    raise SkipSample("bad_record", where, f"unsupported image value of type {type(image).__name__}")


def read_image_bytes(image: ImageRef, *, where: str) -> bytes | Image.Image:
    """Raw encoded bytes (files are read, not decoded) or the PIL image itself, for hashing."""
    if image is None:
        raise SkipSample("missing_image", where, "the record has no image")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        try:
            return Path(image).read_bytes()
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
