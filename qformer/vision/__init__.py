"""Frozen vision towers: one interface (:class:`VisionTower`), one class per backend.

    tower = build_vision_tower(VisionConfig(backend="timm", name="eva_giant_patch14_clip_224"))
    features = tower(tower.preprocess(images))       # (B, N, C) float32, no grad

* :class:`TimmTower` -- timm ViT / EVA models (``vision.backend = "timm"``);
* :class:`HFTower` -- transformers ``Blip2VisionModel``, ``CLIPVisionModel``, ``SiglipVisionModel``
  (``vision.backend = "hf"``).

Image loading and preprocessing live in :mod:`qformer.images`; checkpoint key maps between
EVA layouts (LAVIS, timm, transformers) in :mod:`qformer.persistence`.
"""

from __future__ import annotations

from ..config import ConfigError, VisionConfig
from .base import VisionTower
from .hf_tower import HF_VISION_MODEL_TYPES, HFTower, hf_vision_classes
from .timm_tower import TimmTower

#: ``vision.backend`` -> tower class.
BACKENDS: dict[str, type[VisionTower]] = {"timm": TimmTower, "hf": HFTower}


def build_vision_tower(config: VisionConfig) -> VisionTower:
    """The frozen tower ``config`` describes, with its weights (``config.pretrained``) loaded."""
    if not isinstance(config, VisionConfig):
        raise TypeError(f"build_vision_tower expects a VisionConfig, got {type(config).__name__}")
    if config.backend not in BACKENDS:
        raise ConfigError(f"vision.backend must be one of {sorted(BACKENDS)}, got {config.backend!r}")
    return BACKENDS[config.backend](config)


__all__ = ["BACKENDS", "HF_VISION_MODEL_TYPES", "HFTower", "TimmTower", "VisionTower", "build_vision_tower",
           "hf_vision_classes"]
