"""Dataclass configs: one source of truth for every default.

The defaults are BLIP-2's own (EVA ViT-g/14 with its last block dropped, a BERT-base
Q-Former with 32 queries and cross-attention every second layer, 256-d ITC embeddings);
adapter cards and tests override fields explicitly.

Every config round-trips through plain dicts (``to_dict`` / ``from_dict``) so that it can
be written next to a checkpoint as JSON and read back without pickling anything.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# CLIP's normalisation, used by EVA-CLIP, CLIP and BLIP-2 alike.
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


class ConfigError(ValueError):
    """A config field has a value that cannot work; the message names the field."""


def _from_dict(cls, data: dict[str, Any], where: str):
    """Build dataclass ``cls`` from ``data``, refusing unknown fields by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known fields are {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = tuple(value) if isinstance(value, list) and key in ("mean", "std") else value
    return cls(**kwargs)


@dataclass(kw_only=True)
class VisionConfig:
    """A frozen vision tower.

    ``backend="timm"``: ``name`` is a timm architecture (``eva_giant_patch14_clip_224``,
    ``vit_large_patch14_clip_224``, ...) and ``model_kwargs`` are passed to
    ``timm.create_model`` (use them for tiny test towers: ``depth``, ``embed_dim``, ...).
    ``pretrained`` may be ``True`` (timm's hub weights, for users), a path to a weights
    file, or ``False``.

    ``backend="hf"``: ``name`` is a transformers vision ``model_type``
    (``blip_2_vision_model``, ``clip_vision_model``, ``siglip_vision_model``) built from
    ``model_kwargs`` (config fields), or ``pretrained`` is a directory to load from.
    """

    backend: str = "timm"
    name: str = "eva_giant_patch14_clip_224"
    pretrained: bool | str = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # Output of which block feeds the Q-Former (Python indexing over the tower's blocks).
    # BLIP-2 drops EVA ViT-g's last block: -2 on the full 40-block model.
    feature_layer: int = -2
    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    interpolation: str = "bicubic"
    # The tower's weights and compute dtype: "float32", "bfloat16" or "float16".
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.backend not in ("timm", "hf"):
            raise ConfigError(f"vision.backend must be 'timm' or 'hf', got {self.backend!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"vision.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError("vision.mean and vision.std must have 3 entries (RGB)")
        if self.image_size <= 0:
            raise ConfigError(f"vision.image_size must be positive, got {self.image_size}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VisionConfig":
        return _from_dict(cls, data, "vision config")


@dataclass(kw_only=True)
class QFormerConfig:
    """BLIP's MED as the Q-Former: a BERT encoder with cross-attention to the image every
    ``cross_attention_freq`` layers (for query positions only), separate query and text
    FFNs, and BERT's LM head. Defaults are bert-base-uncased plus the ``[DEC]`` token."""

    vocab_size: int = 30523
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02
    cross_attention_freq: int = 2
    # Width of the vision features the cross-attention reads (1408 for EVA ViT-g).
    encoder_width: int = 1408
    num_query_tokens: int = 32
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"qformer.hidden_size ({self.hidden_size}) must be divisible by qformer.num_heads ({self.num_heads})"
            )
        if self.cross_attention_freq < 1:
            raise ConfigError(f"qformer.cross_attention_freq must be >= 1, got {self.cross_attention_freq}")
        if self.num_query_tokens < 1:
            raise ConfigError(f"qformer.num_query_tokens must be >= 1, got {self.num_query_tokens}")

    def has_cross_attention(self, layer_idx: int) -> bool:
        return layer_idx % self.cross_attention_freq == 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QFormerConfig":
        return _from_dict(cls, data, "qformer config")


@dataclass(kw_only=True)
class Blip2Config:
    """The whole model: frozen vision tower, Q-Former, and the stage-1 heads.

    ``qformer.encoder_width`` must equal the vision tower's width (checked when the model
    is built). ``dec_token_id`` is the tokenizer's ``[DEC]`` (bos) token that starts ITG
    captions; ``sep_token_id`` ends them.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    embed_dim: int = 256  # ITC embedding size (vision_proj / text_proj)
    # ln_vision: LAVIS uses torch's default 1e-5; transformers' post_layernorm uses 1e-6.
    ln_vision_eps: float = 1e-5
    temp_init: float = 0.07
    max_txt_len: int = 32
    dec_token_id: int = 30522
    sep_token_id: int = 102

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["vision"] = self.vision.to_dict()
        d["qformer"] = self.qformer.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Blip2Config":
        data = dict(data)
        vision = VisionConfig.from_dict(data.pop("vision", {}))
        qformer = QFormerConfig.from_dict(data.pop("qformer", {}))
        return _from_dict(cls, dict(data, vision=vision, qformer=qformer), "blip2 config")
