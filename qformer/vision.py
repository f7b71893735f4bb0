"""The frozen vision tower that feeds the Q-Former, its eval preprocessing, and EVA key conversions.

BLIP-2 reads the output of one block of a frozen ViT (EVA ViT-g/14 without its last block,
or CLIP ViT-L/14 without its last layer) for ALL tokens, before any final norm: its own
trainable ``ln_vision`` is applied outside the tower. :class:`VisionTower` gives exactly that
tensor, ``(B, N, width)`` in float32, from a timm model or from a transformers
``Blip2VisionModel`` / ``CLIPVisionModel`` / ``SiglipVisionModel``, with the blocks after
``feature_layer`` removed so that they cost nothing.

Weights are always loaded strictly: every tensor the tower needs must be present and every
tensor given must be used, except the parts the tower removed on purpose (the blocks after
``feature_layer``, the final norm, the pooling head). LAVIS loads its ViT with
``strict=False``, which hides mismatches; here they are errors that name the keys.

Layouts of the same EVA ViT (``checkpoint key`` examples):

- LAVIS ``visual_encoder.blocks.0.attn.q_bias`` — timm ``Eva`` is the same without the prefix;
- timm ``blocks.0.attn.q_bias`` + ``v_bias`` — transformers ``Blip2VisionModel``
  ``encoder.layers.0.self_attn.qkv.bias = cat(q, zeros, v)``.

:func:`convert_lavis_eva_to_timm`, :func:`convert_eva_timm_to_blip2_hf` and
:func:`convert_blip2_hf_to_eva_timm` translate between them; :func:`blip2_vision_config_kwargs_from_eva`
gives the ``Blip2VisionConfig`` of a timm EVA; :func:`lavis_eva_vision_config` gives the
:class:`~qformer.config.VisionConfig` that rebuilds a LAVIS EVA ViT (``create_eva_vit_g`` or the
oracle's tiny one) in timm.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from qformer.config import ConfigError, VisionConfig

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = [
    "HF_VISION_MODEL_TYPES",
    "LAVIS_EVA_TIMM_NAME",
    "ImageLoadError",
    "ImagePreprocessor",
    "VisionTower",
    "WeightsMismatchError",
    "blip2_vision_config_kwargs_from_eva",
    "convert_blip2_hf_to_eva_timm",
    "convert_eva_timm_to_blip2_hf",
    "convert_lavis_eva_to_timm",
    "lavis_eva_timm_kwargs",
    "lavis_eva_vision_config",
    "load_image",
    "load_tower_state_dict",
    "read_state_dict_file",
]

logger = logging.getLogger(__name__)

ImageInput = Union[Image.Image, str, Path, torch.Tensor]

#: transformers ``model_type`` -> (config class name, model class name) of the supported HF towers.
HF_VISION_MODEL_TYPES: dict[str, tuple[str, str]] = {
    "blip_2_vision_model": ("Blip2VisionConfig", "Blip2VisionModel"),
    "clip_vision_model": ("CLIPVisionConfig", "CLIPVisionModel"),
    "siglip_vision_model": ("SiglipVisionConfig", "SiglipVisionModel"),
}

#: The timm architecture that rebuilds LAVIS's EVA ViT. Any timm ``eva_giant_*`` entry builds
#: the same ``timm.models.eva.Eva`` (abs pos embed, no RoPE, no layer scale, fused qkv with
#: q/v bias, LayerNorm eps 1e-6, exact GELU); this one is also the default
#: ``VisionConfig.name``. It differs from ``eva_giant_patch14_224`` only in the pooling head,
#: which the tower removes.
LAVIS_EVA_TIMM_NAME = "eva_giant_patch14_clip_224"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Top-level timm modules that only serve classification; a weights file may carry them but the
# tower never uses them (``head`` is already gone because the model is built with num_classes=0).
_TIMM_HEAD_PREFIXES = ("head.", "fc_norm.", "norm.", "attn_pool.")
# HF modules after the encoder that the tower removes (SigLIP's attention-pooling head, and the
# post-layernorm which for BLIP-2 is ``ln_vision``: trainable and owned by the model, not the tower).
_HF_HEAD_PREFIXES = ("post_layernorm.", "head.")


class WeightsMismatchError(ValueError):
    """A state dict does not fit the tower (or a key layout); the message names the keys."""


class ImageLoadError(OSError):
    """An image file exists but cannot be decoded or converted; the message names the path."""


# ----------------------------------------------------------------------------------------------
# State-dict files and strict loading
# ----------------------------------------------------------------------------------------------


def read_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file: ``.safetensors``, or a torch pickle read with ``weights_only=True``
    (see :func:`qformer.checkpoint.read_state_dict`, which this is)."""
    from .checkpoint import read_state_dict

    return read_state_dict(path)


def _short_list(keys: Sequence[str], limit: int = 20) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ... (%d more)' % (len(keys) - limit) if len(keys) > limit else ''}]"


def load_tower_state_dict(tower: "VisionTower", state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict") -> None:
    """Load ``state_dict`` into ``tower.model`` (the inner timm / transformers model), strictly.

    Keys are those of the inner model as the tower holds it: timm keys (``blocks.0.attn.qkv.weight``)
    or transformers keys (``encoder.layers.0.self_attn.qkv.weight``), for the kept blocks only.
    Nothing is copied unless everything fits, so a failed load leaves the tower untouched.
    Tensors are cast to the tower's dtype.

    Raises:
        WeightsMismatchError: naming ``source`` and the missing, unexpected and mis-shaped keys.
    """
    _strict_load(tower.model, state_dict, source=source, target=f"the vision tower ({tower.describe()})")


def _strict_load(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str, target: str) -> None:
    """Check every key and shape first, then copy; the error names ``source`` and the keys."""
    expected = model.state_dict()
    given = dict(state_dict)
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    not_tensors = sorted(k for k in set(given) & set(expected) if not isinstance(given[k], torch.Tensor))
    mismatched = sorted(
        f"{k}: given {tuple(given[k].shape)}, expected {tuple(expected[k].shape)}"
        for k in set(given) & set(expected)
        if k not in not_tensors and tuple(given[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched or not_tensors:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) {_short_list(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) {_short_list(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es) {_short_list(mismatched)}")
        if not_tensors:
            parts.append(f"non-tensor value(s) for {_short_list(not_tensors)}")
        raise WeightsMismatchError(f"{source} does not fit {target}: " + "; ".join(parts))
    model.load_state_dict(given, strict=True)


# ----------------------------------------------------------------------------------------------
# The tower
# ----------------------------------------------------------------------------------------------


def _resolve_feature_layer(feature_layer: int, depth: int) -> int:
    """Number of blocks to keep so that the last kept block is ``feature_layer`` (Python indexing)."""
    if not -depth <= feature_layer < depth:
        raise ConfigError(
            f"vision.feature_layer={feature_layer} is out of range for a tower with {depth} blocks "
            f"(valid: {-depth}..{depth - 1})"
        )
    return feature_layer % depth + 1


class VisionTower(nn.Module):
    """A frozen image encoder returning the output of block ``config.feature_layer`` for all tokens.

    ``VisionTower(config)`` builds the model described by a :class:`~qformer.config.VisionConfig`
    (``config`` may also be passed by keyword). ``forward(pixel_values)`` maps ``(B, 3, S, S)``
    (``S = config.image_size``) to float32 ``(B, num_tokens, width)``: CLS/prefix tokens included,
    no final norm (BLIP-2's ``ln_vision`` is applied by the caller).

    The tower is frozen for good: its parameters do not require grad, its inner model stays in
    eval mode whatever ``train()`` is called with (no dropout, no drop-path), and ``forward`` runs
    under ``torch.no_grad()``. That is ``no_grad`` and not ``inference_mode`` on purpose: the
    features are ordinary tensors that a trainable ``ln_vision`` may take as input.

    Weights and compute use ``config.dtype``; the input is cast to it and the output returned in
    float32 so that everything downstream sees one dtype.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if not isinstance(config, VisionConfig):
            raise TypeError(f"VisionTower expects a VisionConfig, got {type(config).__name__}")
        self.config = config
        self.preprocessor = ImagePreprocessor.from_config(config)
        dtype = _DTYPES[config.dtype]
        if config.backend == "timm":
            self.model, self.num_blocks = _build_timm(config)
        else:
            self.model, self.num_blocks = _build_hf(config)
        self.model.to(dtype)
        self.model.requires_grad_(False)
        self.model.eval()

    # -- properties ---------------------------------------------------------------------------

    @property
    def width(self) -> int:
        """Feature dimension C of the output (1408 for EVA ViT-g)."""
        if self.config.backend == "timm":
            return int(self.model.num_features)
        return int(self.model.config.hidden_size)

    @property
    def num_tokens(self) -> int:
        """Tokens per image at ``config.image_size`` (257 for EVA ViT-g/14 at 224 px: 1 CLS + 16x16)."""
        if self.config.backend == "timm":
            return int(self.model.patch_embed.num_patches) + int(getattr(self.model, "num_prefix_tokens", 0))
        return int(self.model.embeddings.num_positions)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights and of the compute."""
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> str:
        """One line naming the architecture, for error messages."""
        c = self.config
        return f"{c.backend} {c.name}, {self.num_blocks} block(s) up to feature_layer={c.feature_layer}, width {self.width}"

    def extra_repr(self) -> str:
        return f"{self.describe()}, {self.num_tokens} tokens at {self.config.image_size}px, dtype {self.config.dtype}"

    # -- frozen behaviour ---------------------------------------------------------------------

    def train(self, mode: bool = True) -> "VisionTower":
        """Set the wrapper's flag as asked but keep the frozen model in eval mode, always."""
        super().train(mode)
        self.model.eval()
        return self

    # -- compute ------------------------------------------------------------------------------

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` normalized pixels -> float32 features ``(B, num_tokens, width)``."""
        size = self.config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[-2:]) != (size, size):
            # HF towers would otherwise slice their position table silently for smaller inputs.
            raise ValueError(
                f"VisionTower expects pixel_values of shape (B, 3, {size}, {size}), got {tuple(pixel_values.shape)}"
            )
        x = pixel_values.to(device=self.device, dtype=self.dtype)  # (B, 3, S, S)
        with torch.no_grad():
            if self.config.backend == "timm":
                feats = self.model.forward_features(x)  # (B, N, C): pruned, so block `feature_layer`, no norm
            else:
                # The post-layernorm and SigLIP's head were removed, so hidden state `num_blocks` (the
                # output of the last kept layer; index 0 is the embeddings) is also last_hidden_state.
                # Asking for that one index keeps transformers from holding every layer's output.
                out = self.model(pixel_values=x, output_hidden_states=[self.num_blocks])
                feats = out.hidden_states[self.num_blocks]  # (B, N, C)
        return feats.float()

    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Images (PIL, paths, or preprocessed tensors) -> float32 ``(B, 3, S, S)``; see :class:`ImagePreprocessor`."""
        return self.preprocessor(images)


def _build_timm(config: VisionConfig) -> tuple[nn.Module, int]:
    """Create the timm model, load its weights, and prune it after block ``feature_layer``."""
    import timm

    kwargs = dict(config.model_kwargs)
    for key, want in (("img_size", config.image_size), ("num_classes", 0)):
        if key in kwargs and kwargs[key] != want:
            raise ConfigError(
                f"vision.model_kwargs[{key!r}]={kwargs[key]!r} conflicts with the tower's {key}={want!r}"
                + (" (set vision.image_size instead)" if key == "img_size" else "")
            )
        kwargs[key] = want
    pretrained = config.pretrained
    from_file = isinstance(pretrained, (str, Path))  # else bool: timm's hub weights or none
    model = timm.create_model(config.name, pretrained=bool(pretrained) and not from_file, **kwargs)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not hasattr(model, "prune_intermediate_layers"):
        raise ConfigError(
            f"vision.name={config.name!r}: the timm model has no 'blocks' / prune_intermediate_layers; "
            "the tower needs a ViT-style model (VisionTransformer, Eva, ...)"
        )
    num_blocks = _resolve_feature_layer(config.feature_layer, len(blocks))
    full_keys = set(model.state_dict())
    model.prune_intermediate_layers(indices=[config.feature_layer], prune_norm=True, prune_head=True)
    if len(model.blocks) != num_blocks:  # pragma: no cover - guards a timm behaviour change
        raise RuntimeError(f"timm pruned {config.name} to {len(model.blocks)} blocks, expected {num_blocks}")
    if from_file:
        path = Path(pretrained)
        state = read_state_dict_file(path)
        pruned = full_keys - set(model.state_dict())
        state = _drop_pruned(state, pruned, _TIMM_HEAD_PREFIXES, source=str(path))
        _strict_load(model, state, source=f"vision weights file {path}", target=f"timm {config.name} cut to {num_blocks} block(s)")
    return model, num_blocks


def _hf_classes(name: str) -> tuple[type["PretrainedConfig"], type["PreTrainedModel"]]:
    if name not in HF_VISION_MODEL_TYPES:
        raise ConfigError(
            f"vision.name={name!r} is not a supported transformers vision model_type; "
            f"use one of {sorted(HF_VISION_MODEL_TYPES)}"
        )
    import transformers

    config_cls, model_cls = HF_VISION_MODEL_TYPES[name]
    return getattr(transformers, config_cls), getattr(transformers, model_cls)


def _build_hf(config: VisionConfig) -> tuple[nn.Module, int]:
    """Build or load the transformers vision model, then remove what follows block ``feature_layer``."""
    config_cls, model_cls = _hf_classes(config.name)
    overrides = dict(config.model_kwargs)
    if config.name == "siglip_vision_model":
        overrides["vision_use_head"] = False  # attention pooling head: unused by the Q-Former
    pretrained = config.pretrained
    if pretrained is True:
        raise ConfigError(
            "vision.pretrained=True needs a hub name, which the hf backend does not take; "
            "set vision.pretrained to a local directory saved by transformers"
        )
    if pretrained:
        directory = Path(pretrained)
        if not directory.is_dir():
            raise FileNotFoundError(2, "vision.pretrained directory not found", str(directory))
        hf_config = config_cls.from_pretrained(str(directory), local_files_only=True, **overrides)
    else:
        hf_config = config_cls(**{"image_size": config.image_size, **overrides})
    if hf_config.image_size != config.image_size:
        raise ConfigError(
            f"vision.image_size={config.image_size} but the {config.name} config has image_size={hf_config.image_size}"
        )
    model = model_cls(hf_config)
    depth = len(model.encoder.layers)
    num_blocks = _resolve_feature_layer(config.feature_layer, depth)
    full_keys = set(model.state_dict())
    # Truncate the encoder and keep the config truthful: transformers resolves hidden-state
    # indices against config.num_hidden_layers.
    model.encoder.layers = nn.ModuleList(list(model.encoder.layers)[:num_blocks])
    model.config.num_hidden_layers = num_blocks
    # BLIP-2's ln_vision / CLIP's pooled-output norm / SigLIP's final norm: not part of the tower.
    model.post_layernorm = nn.Identity()
    if pretrained:
        state, source = _read_hf_directory(Path(pretrained))
        pruned = full_keys - set(model.state_dict())
        state = _drop_pruned(state, pruned, _HF_HEAD_PREFIXES, source=source)
        _strict_load(model, state, source=source, target=f"{config.name} cut to {num_blocks} layer(s)")
    return model, num_blocks


def _drop_pruned(
    state: Mapping[str, torch.Tensor], pruned: set[str], head_prefixes: Iterable[str], *, source: str
) -> dict[str, torch.Tensor]:
    """Remove the keys of parts the tower removed on purpose (later blocks, final norm, head)."""
    head_prefixes = tuple(head_prefixes)
    kept, dropped = {}, []
    for key, value in state.items():
        if key in pruned or key.startswith(head_prefixes):
            dropped.append(key)
        else:
            kept[key] = value
    if dropped:
        logger.info("%s: ignoring %d tensor(s) of removed parts (later blocks, final norm, head)", source, len(dropped))
    return kept


def _read_hf_directory(directory: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Read the vision weights from a transformers directory.

    Works for a vision model saved alone (keys ``embeddings.*``, ``encoder.*``) and for the full
    model (``Blip2ForConditionalGeneration``, ``CLIPModel``, ``SiglipModel``: keys under
    ``vision_model.``), reading only the vision tensors of safetensors checkpoints. This is done
    here rather than by ``from_pretrained`` because ``Blip2VisionModel.from_pretrained`` on a full
    BLIP-2 directory silently loads nothing (every key is reported missing, as a warning only).
    """
    prefix = "vision_model."
    single_st, single_bin = directory / "model.safetensors", directory / "pytorch_model.bin"
    index_st, index_bin = directory / "model.safetensors.index.json", directory / "pytorch_model.bin.index.json"
    if single_st.is_file() or index_st.is_file():
        from safetensors import safe_open

        if single_st.is_file():
            files = {single_st: None}
            source = str(single_st)
        else:
            weight_map = json.loads(index_st.read_text())["weight_map"]
            files = {}
            for key, fname in weight_map.items():
                files.setdefault(directory / fname, []).append(key)
            source = str(index_st)
        all_keys = []
        for path, keys in files.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                all_keys.extend((path, k) for k in (keys if keys is not None else f.keys()))
        has_prefix = any(k.startswith(prefix) for _, k in all_keys)
        state: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for path, k in all_keys:
            if not has_prefix or k.startswith(prefix):
                by_file.setdefault(path, []).append(k)
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for k in keys:
                    state[k[len(prefix):] if has_prefix else k] = f.get_tensor(k)
        return state, source
    if single_bin.is_file() or index_bin.is_file():
        if single_bin.is_file():
            paths, source = [single_bin], str(single_bin)
        else:
            weight_map = json.loads(index_bin.read_text())["weight_map"]
            paths, source = sorted({directory / f for f in weight_map.values()}), str(index_bin)
        raw: dict[str, torch.Tensor] = {}
        for path in paths:
            raw.update(read_state_dict_file(path))
        if any(k.startswith(prefix) for k in raw):
            raw = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
        return raw, source
    raise FileNotFoundError(
        2, "no model.safetensors / pytorch_model.bin (or their .index.json) in vision.pretrained directory", str(directory)
    )


# ----------------------------------------------------------------------------------------------
# Eval preprocessing
# ----------------------------------------------------------------------------------------------

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_HIGH_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file (no mode conversion).

    Raises:
        FileNotFoundError: the path does not exist (``filename`` is the path).
        ImageLoadError: the file exists but is not a readable image; the message names the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "image file not found", str(path))
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()  # detached from the file handle (keeps mode, palette and info)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageLoadError(f"cannot read image {path}: {exc}") from exc


def _to_rgb_or_grey_float(img: Image.Image) -> Image.Image:
    """An ``RGB`` image, or for high-bit-depth greyscale a mode ``F`` image with values in [0, 1].

    Transparent images are composited over white (LAVIS's ``convert("RGB")`` would expose whatever
    colour the transparent pixels carry, often black). 16-bit greyscale is scaled by 1/65535 and
    kept in float so that no precision is lost before resizing (PIL's own ``convert`` clips it at 255).
    Mode ``I`` (32-bit int, how some PIL versions open 16-bit PNGs) is read as 16-bit.
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


class ImagePreprocessor:
    """BLIP-2's eval transform: resize to (S, S) (bicubic by default), RGB, ToTensor, Normalize.

    This is LAVIS's ``blip_image_eval`` (``Resize((S, S), BICUBIC)`` on the PIL image, then
    ``ToTensor`` and ``Normalize(mean, std)``), so features match LAVIS for RGB inputs. It needs no
    model: data pipelines can build it with :meth:`from_config` and call :meth:`transform` per image.
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

        if interpolation not in _INTERPOLATIONS:
            raise ConfigError(f"vision.interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
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
        img = _to_rgb_or_grey_float(image)
        size = [self.image_size, self.image_size]
        img = TF.resize(img, size, interpolation=self.interpolation)  # PIL's own resampling, as LAVIS
        if img.mode == "F":
            pixels = TF.pil_to_tensor(img).clamp_(0.0, 1.0).expand(3, -1, -1)  # (3, S, S) grey
        else:
            pixels = TF.pil_to_tensor(img).to(torch.float32).div_(255.0)  # (3, S, S), as ToTensor
        return TF.normalize(pixels.contiguous(), mean=list(self.mean), std=list(self.std))

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


# ----------------------------------------------------------------------------------------------
# EVA key layouts: LAVIS <-> timm Eva <-> transformers Blip2VisionModel
# ----------------------------------------------------------------------------------------------

_EVA_TOP = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
_EVA_BLOCK = re.compile(
    r"^blocks\.(\d+)\.(norm1\.(?:weight|bias)|norm2\.(?:weight|bias)|attn\.q_bias|attn\.v_bias|attn\.k_bias|"
    r"attn\.qkv\.weight|attn\.proj\.(?:weight|bias)|mlp\.fc1\.(?:weight|bias)|mlp\.fc2\.(?:weight|bias))$"
)
_TIMM_TO_HF_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
}
_TIMM_TO_HF_BLOCK = {
    "norm1.weight": "layer_norm1.weight",
    "norm1.bias": "layer_norm1.bias",
    "norm2.weight": "layer_norm2.weight",
    "norm2.bias": "layer_norm2.bias",
    "attn.qkv.weight": "self_attn.qkv.weight",
    "attn.proj.weight": "self_attn.projection.weight",
    "attn.proj.bias": "self_attn.projection.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
_HF_TO_TIMM_TOP = {v: k for k, v in _TIMM_TO_HF_TOP.items()}
_HF_TO_TIMM_BLOCK = {v: k for k, v in _TIMM_TO_HF_BLOCK.items()}
_HF_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


def _select_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if not prefix:
        return dict(state_dict)
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def convert_lavis_eva_to_timm(
    state_dict: Mapping[str, torch.Tensor], *, prefix: str = "visual_encoder."
) -> dict[str, torch.Tensor]:
    """LAVIS EVA ViT keys -> timm ``Eva`` keys (the names are the same once ``prefix`` is removed).

    Only keys under ``prefix`` are taken, so a whole LAVIS BLIP-2 state dict can be passed; use
    ``prefix=""`` for LAVIS's bare ``eva_vit_g.pth``. Keys of EVA variants that timm's plain EVA
    cannot hold (layer scale ``gamma_*``, relative position bias) are refused by name rather than
    dropped. Tensors are shared, not copied; dtypes are kept.
    """
    vit = _select_prefix(state_dict, prefix)
    if not vit:
        raise WeightsMismatchError(f"no keys under prefix {prefix!r}: not a LAVIS EVA state dict")
    unknown = sorted(k for k in vit if k not in _EVA_TOP and not _EVA_BLOCK.match(k))
    if unknown:
        raise WeightsMismatchError(
            f"LAVIS EVA keys that timm's Eva (abs pos embed, no layer scale, no relative position bias) "
            f"cannot hold: {_short_list([prefix + k for k in unknown])}"
        )
    return {k: v for k, v in vit.items() if not k.endswith("attn.k_bias")}


def convert_eva_timm_to_blip2_hf(
    state_dict: Mapping[str, torch.Tensor], *, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """timm ``Eva`` keys -> transformers ``Blip2VisionModel`` keys (without ``post_layernorm``).

    ``blocks.i.attn.{q_bias, v_bias}`` become ``encoder.layers.i.self_attn.qkv.bias =
    cat(q_bias, zeros, v_bias)``; every other tensor is renamed (reference doc, section 4).
    The result has no ``post_layernorm.*``: in BLIP-2 that is ``ln_vision``, which belongs to the
    model; load it there. Keys of a final norm / head (``norm.*``, ``fc_norm.*``, ``head.*``) and of
    EVA features HF lacks are refused by name.
    """
    sd = _select_prefix(state_dict, prefix)
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    biases: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key in _TIMM_TO_HF_TOP:
            out[_TIMM_TO_HF_TOP[key]] = value
            continue
        m = _EVA_BLOCK.match(key)
        if not m:
            unknown.append(prefix + key)
            continue
        i, rest = int(m.group(1)), m.group(2)
        if rest in ("attn.q_bias", "attn.v_bias", "attn.k_bias"):
            biases.setdefault(i, {})[rest.split(".")[1][0]] = value
        else:
            out[f"encoder.layers.{i}.{_TIMM_TO_HF_BLOCK[rest]}"] = value
    if unknown:
        raise WeightsMismatchError(f"timm Eva keys with no Blip2VisionModel counterpart: {_short_list(sorted(unknown))}")
    for i, b in sorted(biases.items()):
        if set(b) - {"k"} != {"q", "v"}:
            raise WeightsMismatchError(f"blocks.{i}.attn has q_bias/v_bias only partly: {sorted(b)}")
        if "k" in b and torch.count_nonzero(b["k"]):
            raise WeightsMismatchError(f"blocks.{i}.attn.k_bias is not zero; EVA has no key bias")
        out[f"encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat([b["q"], torch.zeros_like(b["q"]), b["v"]])
    return out


def convert_blip2_hf_to_eva_timm(
    state_dict: Mapping[str, torch.Tensor], *, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """transformers ``Blip2VisionModel`` keys -> timm ``Eva`` keys.

    Pass ``prefix="vision_model."`` to take the vision part of a whole BLIP-2 state dict. The fused
    ``qkv.bias`` is split into ``q_bias`` and ``v_bias``; its key third must be exactly zero (EVA
    has no key bias), else the conversion is refused. ``post_layernorm.*`` is refused too: it is
    BLIP-2's ``ln_vision``, which belongs to the model, not to the tower — remove it from the
    input (and load it into ``ln_vision``) before converting.
    """
    sd = _select_prefix(state_dict, prefix)
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    post = sorted(prefix + k for k in sd if k.startswith("post_layernorm."))
    if post:
        raise WeightsMismatchError(
            f"{post} is BLIP-2's ln_vision, not part of the EVA tower: pop it and load it into the "
            "model's ln_vision, then convert the rest"
        )
    for key, value in sd.items():
        if key in _HF_TO_TIMM_TOP:
            out[_HF_TO_TIMM_TOP[key]] = value
            continue
        m = _HF_LAYER.match(key)
        if not m:
            unknown.append(prefix + key)
            continue
        i, rest = int(m.group(1)), m.group(2)
        if rest == "self_attn.qkv.bias":
            if value.ndim != 1 or value.shape[0] % 3:
                raise WeightsMismatchError(f"{prefix + key} has shape {tuple(value.shape)}, not (3 * width,)")
            q, k, v = value.chunk(3)
            if torch.count_nonzero(k):
                raise WeightsMismatchError(
                    f"{prefix + key}: the key part of the qkv bias is not zero (max |k_bias| = "
                    f"{k.abs().max().item():.3g}); timm's Eva and LAVIS's EVA have no key bias, so this "
                    "checkpoint cannot be converted without changing its outputs"
                )
            out[f"blocks.{i}.attn.q_bias"] = q.clone()
            out[f"blocks.{i}.attn.v_bias"] = v.clone()
        elif rest in _HF_TO_TIMM_BLOCK:
            out[f"blocks.{i}.{_HF_TO_TIMM_BLOCK[rest]}"] = value
        else:
            unknown.append(prefix + key)
    if unknown:
        raise WeightsMismatchError(f"Blip2VisionModel keys with no timm Eva counterpart: {_short_list(sorted(unknown))}")
    return out


def blip2_vision_config_kwargs_from_eva(model: nn.Module) -> dict[str, Any]:
    """``Blip2VisionConfig`` kwargs for the architecture of a timm ``Eva`` (e.g. ``tower.model``).

    Also a check that the Eva is the plain EVA of LAVIS / BLIP-2 (class token, absolute position
    embeddings, pre-norm blocks, no RoPE, no layer scale, no sub-LayerNorms, no SwiGLU, fused qkv,
    exact GELU, one LayerNorm eps): anything else cannot be expressed as a Blip2VisionModel and is
    refused with the offending feature named. ``num_hidden_layers`` is the number of blocks the
    model holds (after pruning).
    """
    from timm.models.eva import Eva, EvaAttention, EvaBlock
    from timm.layers import Mlp

    if not isinstance(model, Eva):
        raise TypeError(f"expected a timm Eva, got {type(model).__name__}")
    problems = []
    if model.cls_token is None or model.reg_token is not None or model.no_embed_class:
        problems.append("needs exactly one class token with a position embedding (no register tokens)")
    if model.pos_embed is None:
        problems.append("needs absolute position embeddings")
    if model.rope is not None:
        problems.append("uses rotary position embeddings")
    if not isinstance(model.norm_pre, nn.Identity):
        problems.append("has a pre-transformer norm")
    if model.patch_embed.proj.bias is None:
        problems.append("patch embedding without bias")
    img_h, img_w = model.patch_embed.img_size
    patch_h, patch_w = model.patch_embed.patch_size
    if img_h != img_w or patch_h != patch_w:
        problems.append(f"non-square image {model.patch_embed.img_size} or patch {model.patch_embed.patch_size}")
    eps = set()
    heads, mlp_hidden, qkv_bias = set(), set(), set()
    for i, blk in enumerate(model.blocks):
        if type(blk) is not EvaBlock:
            problems.append(f"block {i} is {type(blk).__name__}, not a pre-norm EvaBlock")
            continue
        attn, mlp = blk.attn, blk.mlp
        if blk.gamma_1 is not None or blk.gamma_2 is not None:
            problems.append(f"block {i} has layer scale")
        if type(attn) is not EvaAttention or attn.qkv is None:
            problems.append(f"block {i} attention is not EVA's fused-qkv attention")
            continue
        if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.norm, nn.Identity)) or attn.gate is not None:
            problems.append(f"block {i} attention has qk-norm, an inner scale norm or a gate")
        if attn.head_dim * attn.num_heads != model.embed_dim:
            problems.append(f"block {i} head_dim x heads != width")
        if type(mlp) is not Mlp or not isinstance(mlp.norm, nn.Identity):
            problems.append(f"block {i} MLP is {type(mlp).__name__} (needs a plain Mlp without norm)")
            continue
        if not (isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"):
            problems.append(f"block {i} MLP activation is {mlp.act}, not exact GELU")
        for norm in (blk.norm1, blk.norm2):
            if type(norm) not in (nn.LayerNorm,) and not issubclass(type(norm), nn.LayerNorm):
                problems.append(f"block {i} uses {type(norm).__name__}, not LayerNorm")
            else:
                eps.add(norm.eps)
        heads.add(attn.num_heads)
        mlp_hidden.add(mlp.fc1.out_features)
        qkv_bias.add(attn.q_bias is not None)
    if len(eps) > 1 or len(heads) > 1 or len(mlp_hidden) > 1 or len(qkv_bias) > 1:
        problems.append("blocks differ in LayerNorm eps, heads, MLP width or qkv bias")
    if problems:
        raise ValueError("this timm Eva is not the plain EVA a Blip2VisionModel can hold: " + "; ".join(problems))
    return dict(
        hidden_size=int(model.embed_dim),
        intermediate_size=int(mlp_hidden.pop()),
        num_hidden_layers=len(model.blocks),
        num_attention_heads=int(heads.pop()),
        image_size=int(img_h),
        patch_size=int(patch_h),
        layer_norm_eps=float(eps.pop()),
        qkv_bias=bool(qkv_bias.pop()),
        hidden_act="gelu",
    )


# ----------------------------------------------------------------------------------------------
# LAVIS's EVA ViT rebuilt in timm
# ----------------------------------------------------------------------------------------------

# LAVIS VisionTransformer kwargs that have no effect on the tower's eval-mode output.
_LAVIS_NO_EFFECT = {"use_mean_pooling", "use_checkpoint", "num_classes"}


def lavis_eva_timm_kwargs(vit_cfg: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """timm ``Eva`` kwargs (JSON-able) and image size that rebuild a LAVIS ``eva_vit.VisionTransformer``.

    ``vit_cfg`` holds LAVIS's constructor kwargs, e.g. the oracle fixture's ``cfg.vit``
    (``img_size 32, patch_size 8, embed_dim 48, depth 2, num_heads 4, mlp_ratio 4.3637, qkv_bias``)
    or ``create_eva_vit_g``'s (``224, 14, 1408, 39, 16, 4.3637, qkv_bias``). timm's ``Eva`` with its
    defaults is then exactly LAVIS's module: LayerNorm eps 1e-6, exact GELU, absolute position
    embeddings, no RoPE, no layer scale, fused qkv with q/v bias and a zero key bias; the MLP width
    is ``int(embed_dim * mlp_ratio)`` in both. Options LAVIS's EVA-g never uses (relative position
    bias, layer scale, ``qk_scale``) are refused. Dropout/drop-path are carried over although the
    frozen tower never runs them.
    """
    cfg = dict(vit_cfg)
    unknown = set(cfg) - {
        "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
        "qk_scale", "drop_rate", "attn_drop_rate", "drop_path_rate", "norm_layer", "init_values",
        "use_abs_pos_emb", "use_rel_pos_bias", "use_shared_rel_pos_bias", "init_scale",
    } - _LAVIS_NO_EFFECT
    if unknown:
        raise ValueError(f"unknown LAVIS EVA ViT option(s) {sorted(unknown)}")
    if cfg.get("qk_scale") is not None:
        raise ValueError("LAVIS EVA qk_scale other than head_dim**-0.5 has no timm Eva equivalent")
    if cfg.get("use_rel_pos_bias") or cfg.get("use_shared_rel_pos_bias"):
        raise ValueError("LAVIS EVA with relative position bias has no timm Eva equivalent")
    if not cfg.get("use_abs_pos_emb", True):
        raise ValueError("LAVIS EVA without absolute position embeddings is not supported")
    if cfg.get("init_values") not in (None, 0, 0.0):
        raise ValueError("LAVIS EVA with layer scale (init_values) is not BLIP-2's EVA and is not supported here")
    norm = cfg.get("norm_layer")
    if norm is not None and not _is_layernorm_eps_1e6(norm):
        raise ValueError(f"LAVIS EVA norm_layer {norm!r}: only LayerNorm(eps=1e-6) matches timm's Eva")
    kwargs: dict[str, Any] = dict(
        patch_size=int(cfg.get("patch_size", 16)),
        embed_dim=int(cfg.get("embed_dim", 768)),
        depth=int(cfg.get("depth", 12)),
        num_heads=int(cfg.get("num_heads", 12)),
        mlp_ratio=float(cfg.get("mlp_ratio", 4.0)),
        qkv_bias=bool(cfg.get("qkv_bias", False)),
        # no effect in the frozen (eval-mode) tower; kept for a faithful architecture record
        proj_drop_rate=float(cfg.get("drop_rate", 0.0)),
        attn_drop_rate=float(cfg.get("attn_drop_rate", 0.0)),
        drop_path_rate=float(cfg.get("drop_path_rate", 0.0)),
    )
    if "in_chans" in cfg:
        kwargs["in_chans"] = int(cfg["in_chans"])
    return kwargs, int(cfg.get("img_size", 224))


def _is_layernorm_eps_1e6(norm: Any) -> bool:
    """``norm_layer`` as a string (``"LayerNorm(eps=1e-6)"``, as the oracle records it) or a constructor."""
    if isinstance(norm, str):
        return re.fullmatch(r"(nn\.)?LayerNorm\(eps=1e-0?6\)", norm.replace(" ", "")) is not None
    layer = norm(8)
    return isinstance(layer, nn.LayerNorm) and layer.eps == 1e-6


def lavis_eva_vision_config(vit_cfg: Mapping[str, Any], **overrides: Any) -> VisionConfig:
    """The :class:`VisionConfig` of a timm tower equal to a LAVIS EVA ViT (see :func:`lavis_eva_timm_kwargs`).

    ``feature_layer`` is -1: LAVIS builds its ViT with exactly the blocks it uses (39 of EVA-g's 40).
    ``overrides`` replace VisionConfig fields (``dtype``, ``pretrained``, ...).
    """
    kwargs, img_size = lavis_eva_timm_kwargs(vit_cfg)
    fields = dict(backend="timm", name=LAVIS_EVA_TIMM_NAME, model_kwargs=kwargs, image_size=img_size, feature_layer=-1)
    fields.update(overrides)
    return VisionConfig(**fields)


