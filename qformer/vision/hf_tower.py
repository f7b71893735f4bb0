"""transformers towers: ``Blip2VisionModel``, ``CLIPVisionModel`` and ``SiglipVisionModel``.

``vision.name`` is the transformers ``model_type``; the model is built from
``vision.model_kwargs`` (config fields), or ``vision.pretrained`` is a local directory saved by
transformers, holding the vision model alone or a whole model (BLIP-2, CLIP, SigLIP) whose
``vision_model.*`` tensors are taken.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import ConfigError, VisionConfig
from ..weights import hf_weight_files, read_hf_weights, strict_load
from .base import VisionTower, drop_removed_parts, resolve_feature_layer

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PretrainedConfig, PreTrainedModel

#: transformers ``model_type`` -> (config class name, model class name) of the supported towers.
HF_VISION_MODEL_TYPES: dict[str, tuple[str, str]] = {
    "blip_2_vision_model": ("Blip2VisionConfig", "Blip2VisionModel"),
    "clip_vision_model": ("CLIPVisionConfig", "CLIPVisionModel"),
    "siglip_vision_model": ("SiglipVisionConfig", "SiglipVisionModel"),
}
# Modules after the encoder that the tower removes (SigLIP's attention-pooling head, and the
# post-layernorm which for BLIP-2 is ``ln_vision``: trainable and owned by the model, not the tower).
HF_HEAD_PREFIXES = ("post_layernorm.", "head.")


def hf_vision_classes(name: str) -> tuple[type["PretrainedConfig"], type["PreTrainedModel"]]:
    """(config class, model class) of a supported transformers vision ``model_type``."""
    if name not in HF_VISION_MODEL_TYPES:
        raise ConfigError(
            f"vision.name={name!r} is not a supported transformers vision model_type; "
            f"use one of {sorted(HF_VISION_MODEL_TYPES)}"
        )
    import transformers

    config_cls, model_cls = HF_VISION_MODEL_TYPES[name]
    return getattr(transformers, config_cls), getattr(transformers, model_cls)


def read_hf_vision_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The vision weights of a transformers directory: the keys under ``vision_model.`` of a full
    model (BLIP-2, CLIP, SigLIP), else every key (a vision model saved alone).

    Read here rather than by ``from_pretrained`` because ``Blip2VisionModel.from_pretrained`` on a
    full BLIP-2 directory silently loads nothing (every key is reported missing, as a warning only).
    """
    prefix = "vision_model."
    files = hf_weight_files(directory)
    if all(p.suffix == ".safetensors" for p in files):  # look at the key names only
        from safetensors import safe_open

        full_model = False
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                full_model = full_model or any(k.startswith(prefix) for k in f.keys())
        return read_hf_weights(directory, prefix=prefix if full_model else None)
    state = read_hf_weights(directory)
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


class HFTower(VisionTower):
    backend = "hf"
    block_prefix = "encoder.layers."

    def _build(self, config: VisionConfig) -> tuple[nn.Module, int]:
        """Build or load the transformers vision model, then remove what follows block ``feature_layer``."""
        config_cls, model_cls = hf_vision_classes(config.name)
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
        num_blocks = resolve_feature_layer(config.feature_layer, len(model.encoder.layers))
        full_keys = set(model.state_dict())
        # Truncate the encoder and keep the config truthful: transformers resolves hidden-state
        # indices against config.num_hidden_layers.
        model.encoder.layers = nn.ModuleList(list(model.encoder.layers)[:num_blocks])
        model.config.num_hidden_layers = num_blocks
        # BLIP-2's ln_vision / CLIP's pooled-output norm / SigLIP's final norm: not part of the tower.
        model.post_layernorm = nn.Identity()
        if pretrained:
            source = str(Path(pretrained))
            state = drop_removed_parts(read_hf_vision_weights(Path(pretrained)), full_keys - set(model.state_dict()),
                                       HF_HEAD_PREFIXES, source=source)
            strict_load(model, state, source=source, target=f"{config.name} cut to {num_blocks} layer(s)")
        return model, num_blocks

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_tokens(self) -> int:
        return int(self.model.embeddings.num_positions)

    @property
    def grid_size(self) -> tuple[int, int]:
        side = int(self.model.config.image_size) // int(self.model.config.patch_size)
        return side, side  # the class token (BLIP-2, CLIP; none in SigLIP) comes first

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        # The post-layernorm and SigLIP's head were removed, so hidden state `num_blocks` (the output
        # of the last kept layer; index 0 is the embeddings) is also last_hidden_state. Asking for
        # that one index keeps transformers from holding every layer's output.
        out = self.model(pixel_values=x, output_hidden_states=[self.num_blocks])
        return out.hidden_states[self.num_blocks]

    def _set_checkpointing(self, enabled: bool) -> None:
        # transformers checkpoints each encoder layer that is in training mode (the trainable ones).
        # activation_checkpointing_* are the names of recent 5.x releases; gradient_checkpointing_* before.
        m = self.model
        if enabled:
            enable = getattr(m, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:  # pragma: no cover - older transformers
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            disable = getattr(m, "activation_checkpointing_disable", None) or m.gradient_checkpointing_disable
            disable()


__all__ = ["HF_HEAD_PREFIXES", "HF_VISION_MODEL_TYPES", "HFTower", "hf_vision_classes", "read_hf_vision_weights"]
