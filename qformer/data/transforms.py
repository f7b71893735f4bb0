"""BLIP-2's image transforms and caption cleaning, deterministic per sample.

Train: ``RandomResizedCrop(S, scale=(0.5, 1.0), ratio=(3/4, 4/3), bicubic)`` + horizontal flip
(p=0.5) + ToTensor + Normalize — LAVIS's ``blip2_image_train``. Eval: the tower's own
:class:`~qformer.images.ImagePreprocessor` (resize to (S, S), bicubic) — LAVIS's
``blip_image_eval``. Both convert odd modes (CMYK, RGBA over white, palette, greyscale, 16-bit)
with :func:`qformer.images.to_rgb` and normalise with :func:`qformer.images.to_normalized_tensor`,
so train and eval see the same colours.

Why a generator per sample: torchvision's random transforms draw from the global torch RNG,
whose state in a DataLoader worker depends on the worker count and on which worker got which
sample. Here every draw comes from a ``torch.Generator`` seeded by :func:`sample_seed` from
``(seed, epoch, sample key)``, so a resumed run, or a run with another number of workers or
ranks, sees exactly the same crops and flips for the same sample in the same epoch.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image

from ..config import VisionConfig
from ..errors import ConfigError
from ..images import ImagePreprocessor, to_normalized_tensor, to_rgb

__all__ = [
    "CaptionCleaner",
    "EvalTransform",
    "ImageTransform",
    "TrainTransform",
    "build_image_transform",
    "pre_caption",
    "sample_generator",
    "sample_seed",
]

# BLIP's pre_caption punctuation set.
_PUNCT = re.compile(r"[.!\"()*#:;~]")
_SPACES = re.compile(r"\s+")


def pre_caption(caption: str, *, max_words: int = 50) -> str:
    """BLIP's caption cleaning: lowercase, ``.!"()*#:;~`` -> space, collapse whitespace, strip,
    keep at most ``max_words`` words.

    One deliberate difference: BLIP collapses runs of 2+ whitespace characters only, leaving a
    single tab or newline inside the caption; here every whitespace run becomes one space.
    """
    caption = _PUNCT.sub(" ", caption.lower())
    caption = _SPACES.sub(" ", caption).strip()
    words = caption.split(" ")
    if max_words > 0 and len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


@dataclass(kw_only=True, frozen=True)
class CaptionCleaner:
    """:func:`pre_caption` plus an optional prompt prefix (stage 2 uses ``"a photo of "``).

    The prompt is prepended after cleaning, verbatim, as LAVIS's ``BlipCaptionProcessor`` does;
    a caption that cleans to nothing is empty whatever the prompt (the caller skips it).
    """

    max_words: int = 50
    prompt: str = ""

    def clean(self, caption: str) -> str:
        """The cleaned caption without the prompt ("" when nothing is left)."""
        return pre_caption(caption, max_words=self.max_words)

    def __call__(self, caption: str) -> str:
        cleaned = self.clean(caption)
        return self.prompt + cleaned if cleaned else ""


def sample_seed(seed: int, epoch: int, key: str | int) -> int:
    """A 63-bit seed from (run seed, epoch, stable sample key), the same in every process."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_generator(seed: int, epoch: int, key: str | int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`sample_seed`."""
    return torch.Generator().manual_seed(sample_seed(seed, epoch, key))


@runtime_checkable
class ImageTransform(Protocol):
    """``transform(image, generator=...) -> (3, S, S)`` float32; ``is_random`` says whether the
    output depends on the generator (a feature cache refuses random transforms)."""

    is_random: bool

    def __call__(self, image: Image.Image, *, generator: torch.Generator | None = None) -> torch.Tensor: ...


def _pil_resample(name: str) -> Image.Resampling:
    try:
        return Image.Resampling[name.upper()]
    except KeyError:
        raise ConfigError(f"unknown interpolation {name!r}") from None


@dataclass(kw_only=True)
class TrainTransform:
    """BLIP-2's train transform with every random draw taken from ``generator``.

    The crop parameters follow torchvision's ``RandomResizedCrop.get_params`` (10 tries of a
    log-uniform aspect ratio and a uniform area fraction, then a centre-crop fallback); the crop
    is resized with PIL (bicubic), as LAVIS does on PIL images.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    interpolation: str = "bicubic"
    hflip: float = 0.5
    is_random: bool = True

    def __post_init__(self) -> None:
        self._resample = _pil_resample(self.interpolation)
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ConfigError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")

    @classmethod
    def from_config(cls, config: VisionConfig, **overrides: Any) -> "TrainTransform":
        """The train transform for a tower: its image size, mean/std and interpolation."""
        kw = dict(image_size=config.image_size, mean=tuple(config.mean), std=tuple(config.std), interpolation=config.interpolation)
        kw.update(overrides)
        return cls(**kw)

    def crop_params(self, width: int, height: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width), as torchvision's RandomResizedCrop draws them."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1], generator=generator).item()
            aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
                left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
                return top, left, h, w
        # Fallback: the largest centre crop within the ratio range.
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Image.Image, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """PIL image (any mode :func:`qformer.images.to_rgb` converts) -> normalized float32 (3, S, S)."""
        img = to_rgb(image)
        top, left, h, w = self.crop_params(img.width, img.height, generator)
        size = (self.image_size, self.image_size)
        img = img.crop((left, top, left + w, top + h)).resize(size, resample=self._resample)
        if self.hflip > 0 and torch.rand(1, generator=generator).item() < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_normalized_tensor(img, self.mean, self.std)


@dataclass(kw_only=True)
class EvalTransform:
    """The tower's eval preprocessing (:class:`ImagePreprocessor`), as an :class:`ImageTransform`."""

    preprocessor: ImagePreprocessor
    is_random: bool = False

    @classmethod
    def from_config(cls, config: VisionConfig) -> "EvalTransform":
        return cls(preprocessor=ImagePreprocessor.from_config(config))

    @property
    def image_size(self) -> int:
        return self.preprocessor.image_size

    def __call__(self, image: Image.Image, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.preprocessor.transform(image)


def build_image_transform(config: VisionConfig, *, train: bool, **overrides: Any) -> TrainTransform | EvalTransform:
    """BLIP-2's train transform (``train=True``, random) or the tower's eval transform."""
    if train:
        return TrainTransform.from_config(config, **overrides)
    if overrides:
        raise ConfigError(f"the eval transform takes no overrides, got {sorted(overrides)}")
    return EvalTransform.from_config(config)
