"""Images in, normalised pixels out: decoding, mode conversion and BLIP-2's eval preprocessing.

One module that the model (its convenience API takes PIL images, paths or tensors) and the
data pipeline (:mod:`qformer.data`) share, so that training, evaluation and inference see the
same pixels for the same file.

* :func:`load_image` / :func:`decode_image_bytes` fully decode a file or encoded bytes, with
  errors that name the path;
* :func:`to_rgb` converts any mode to RGB (transparent images over white, 16-bit greyscale
  kept in float), the conversion LAVIS's ``convert("RGB")`` gets wrong for those two;
* :func:`to_normalized_tensor` is ToTensor + Normalize;
* :class:`ImagePreprocessor` is BLIP-2's eval transform (LAVIS's ``blip_image_eval``): resize
  to (S, S), bicubic by default, then the two above.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .config import VisionConfig
from .errors import ConfigError, ImageLoadError

ImageInput = Union[Image.Image, str, Path, torch.Tensor]

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_HIGH_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError)


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file (no mode conversion).

    Raises:
        FileNotFoundError: the path does not exist (``filename`` is the path).
        ImageLoadError: the file exists but is not a readable image; the message names the path.
        PIL.Image.DecompressionBombError: PIL's guard against huge images refused it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "image file not found", str(path))
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()  # detached from the file handle (keeps mode, palette and info)
    except Image.DecompressionBombError:
        raise
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(f"cannot read image {path}: {exc}") from exc


def decode_image_bytes(data: bytes, *, where: str = "image bytes") -> Image.Image:
    """Decode encoded image bytes fully (as :func:`load_image` does for files); ``where`` names
    the source in errors (a tar member, a dataset row)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.copy()
    except Image.DecompressionBombError:
        raise
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(f"cannot decode {where}: {exc}") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """An ``RGB`` image, or for high-bit-depth greyscale a mode ``F`` image with values in [0, 1].

    Transparent images are composited over white (``convert("RGB")`` would expose whatever
    colour the transparent pixels carry, often black). 16-bit greyscale is scaled by 1/65535 and
    kept in float so that no precision is lost before resizing (PIL's own ``convert`` clips it at
    255). Mode ``I`` (32-bit int, how some PIL versions open 16-bit PNGs) is read as 16-bit.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _HIGH_BIT_MODES:
        arr = np.asarray(img).astype(np.float32) / 65535.0
        return Image.fromarray(np.clip(arr, 0.0, 1.0).astype(np.float32))
    if mode == "F":
        raise ImageLoadError("image mode 'F' (32-bit float) has no defined value range; convert it to 8-bit RGB first")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...
    except (ValueError, OSError) as exc:
        raise ImageLoadError(f"cannot convert image mode {mode!r} to RGB: {exc}") from exc


def to_normalized_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """An ``RGB`` (uint8) or ``F`` (grey in [0, 1]) PIL image (see :func:`to_rgb`) -> float32
    ``(3, H, W)``: ToTensor (values / 255) then Normalize(mean, std)."""
    from torchvision.transforms.v2 import functional as TF

    if img.mode == "F":
        pixels = TF.pil_to_tensor(img).clamp_(0.0, 1.0).expand(3, -1, -1)  # (3, H, W) grey
    else:
        pixels = TF.pil_to_tensor(img).to(torch.float32).div_(255.0)  # (3, H, W), as ToTensor
    return TF.normalize(pixels.contiguous(), mean=list(mean), std=list(std))


class ImagePreprocessor:
    """BLIP-2's eval transform: resize to (S, S) (bicubic by default), RGB, ToTensor, Normalize.

    This is LAVIS's ``blip_image_eval`` (``Resize((S, S), BICUBIC)`` on the PIL image, then
    ``ToTensor`` and ``Normalize(mean, std)``), so features match LAVIS for RGB inputs. It needs no
    model: data pipelines build it with :meth:`from_config` and call :meth:`transform` per image.
    """

    def __init__(
        self,
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bicubic",
    ) -> None:
        from torchvision.transforms import InterpolationMode

        if interpolation not in INTERPOLATIONS:
            raise ConfigError(f"vision.interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.interpolation = InterpolationMode(interpolation)

    @classmethod
    def from_config(cls, config: VisionConfig) -> "ImagePreprocessor":
        return cls(image_size=config.image_size, mean=config.mean, std=config.std, interpolation=config.interpolation)

    def transform(self, image: Image.Image | str | Path) -> torch.Tensor:
        """One PIL image or path -> normalized float32 ``(3, S, S)``."""
        from torchvision.transforms.v2 import functional as TF

        if isinstance(image, (str, Path)):
            image = load_image(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image or a path, got {type(image).__name__}")
        img = TF.resize(to_rgb(image), [self.image_size, self.image_size], interpolation=self.interpolation)
        return to_normalized_tensor(img, self.mean, self.std)

    def resize(self, image: Image.Image) -> torch.Tensor:
        """The first half of :meth:`transform`: resized pixels, uint8 ``(3, S, S)`` for RGB
        images (a float32 normalized ``(3, S, S)`` for high-bit-depth grey, which has no uint8
        form). :meth:`normalize` finishes a batch of uint8 ones; together they give exactly
        :meth:`transform`'s values, with a quarter of the bytes to move between processes and
        the float work done once per batch instead of once per image."""
        from torchvision.transforms.v2 import functional as TF

        img = TF.resize(to_rgb(image), [self.image_size, self.image_size], interpolation=self.interpolation)
        return TF.pil_to_tensor(img) if img.mode != "F" else to_normalized_tensor(img, self.mean, self.std)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``(..., 3, S, S)`` from :meth:`resize` -> float32, normalized: ToTensor's / 255
        then Normalize, the same float operations as :meth:`transform`, so the same values."""
        from torchvision.transforms.v2 import functional as TF

        return TF.normalize(pixels.to(torch.float32).div_(255.0).contiguous(), mean=list(self.mean), std=list(self.std))

    def _check_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """A preprocessed tensor passes through unchanged, batched; only its shape/dtype are checked."""
        if not t.is_floating_point():
            raise ValueError(
                f"a tensor input must be already preprocessed (normalized float); got dtype {t.dtype}. "
                "Pass PIL images or paths to have them preprocessed."
            )
        if t.ndim == 3:
            t = t.unsqueeze(0)  # (1, 3, H, W)
        s = self.image_size
        if t.ndim != 4 or t.shape[1] != 3 or tuple(t.shape[-2:]) != (s, s):
            raise ValueError(f"a preprocessed tensor must have shape (B, 3, {s}, {s}) or (3, {s}, {s}), got {tuple(t.shape)}")
        return t

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """One image / path / tensor, or a list of them -> float32 ``(B, 3, S, S)``."""
        if isinstance(images, torch.Tensor):
            return self._check_tensor(images)
        if isinstance(images, (Image.Image, str, Path)):
            images = [images]
        items = list(images)
        if not items:
            raise ValueError("preprocess got an empty list of images")
        out = []
        for item in items:
            if isinstance(item, torch.Tensor):
                t = self._check_tensor(item)
                if t.shape[0] != 1:
                    raise ValueError("tensors inside a list must be single images of shape (3, S, S)")
                out.append(t[0].to(torch.float32))
            else:
                out.append(self.transform(item))
        return torch.stack(out)  # (B, 3, S, S)


__all__ = [
    "INTERPOLATIONS",
    "ImageInput",
    "ImageLoadError",
    "ImagePreprocessor",
    "decode_image_bytes",
    "load_image",
    "to_normalized_tensor",
    "to_rgb",
]
