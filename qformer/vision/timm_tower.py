"""timm towers: ViT-style models (``VisionTransformer``, ``Eva`` ...) built by ``timm.create_model``.

``vision.pretrained`` may be ``True`` (timm's hub weights, for users with network), a path to a
weights file (``.safetensors`` or a safely loaded ``.pth``/``.bin``), or ``False``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError, VisionConfig
from ..weights import read_state_dict, strict_load
from .base import VisionTower, drop_removed_parts, resolve_feature_layer

# Top-level timm modules that only serve classification; a weights file may carry them but the
# tower never uses them (``head`` is already gone because the model is built with num_classes=0).
TIMM_HEAD_PREFIXES = ("head.", "fc_norm.", "norm.", "attn_pool.")


class TimmTower(VisionTower):
    backend = "timm"
    block_prefix = "blocks."

    def _build(self, config: VisionConfig) -> tuple[nn.Module, int]:
        """Create the timm model, prune it after block ``feature_layer``, load its weights."""
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
        num_blocks = resolve_feature_layer(config.feature_layer, len(blocks))
        full_keys = set(model.state_dict())
        model.prune_intermediate_layers(indices=[config.feature_layer], prune_norm=True, prune_head=True)
        if len(model.blocks) != num_blocks:  # pragma: no cover - guards a timm behaviour change
            raise RuntimeError(f"timm pruned {config.name} to {len(model.blocks)} blocks, expected {num_blocks}")
        if from_file:
            path = Path(pretrained)
            state = drop_removed_parts(read_state_dict(path), full_keys - set(model.state_dict()), TIMM_HEAD_PREFIXES,
                                       source=str(path))
            strict_load(model, state, source=f"vision weights file {path}",
                        target=f"timm {config.name} cut to {num_blocks} block(s)")
        return model, num_blocks

    @property
    def width(self) -> int:
        return int(self.model.num_features)

    @property
    def num_tokens(self) -> int:
        return int(self.model.patch_embed.num_patches) + int(getattr(self.model, "num_prefix_tokens", 0))

    @property
    def grid_size(self) -> tuple[int, int]:
        rows, cols = self.model.patch_embed.grid_size
        return int(rows), int(cols)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)  # pruned: block `feature_layer`'s output, no norm

    def _set_checkpointing(self, enabled: bool) -> None:
        # timm checkpoints each block in forward_features (non-reentrant unless timm's global
        # set_reentrant_ckpt(True) was called).
        self.model.set_grad_checkpointing(enabled)


__all__ = ["TIMM_HEAD_PREFIXES", "TimmTower"]
