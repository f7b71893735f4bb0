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

import torch

from .errors import ConfigError

# CLIP's normalisation, used by EVA-CLIP, CLIP and BLIP-2 alike.
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


#: The dtype names configs use, and the torch dtypes they stand for (the one map in qformer).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; a clear error for anything else."""
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def _from_dict(cls, data: dict[str, Any], where: str, *, legacy: frozenset[str] = frozenset()):
    """Build dataclass ``cls`` from ``data``, refusing unknown fields by name. Keys in ``legacy``
    (fields of older versions, written into saved configs) are accepted and ignored."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if k not in legacy}
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
        if self.dtype not in DTYPES:
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
    # False: the stage-2-only Q-Former of transformers' Blip2ForConditionalGeneration and
    # LAVIS's Blip2OPT/T5 (no word/position embeddings, no text FFNs, no LM head).
    text_input: bool = True
    # BERT's LM head (ITG); InstructBLIP's Q-Former reads text but has none (transformers'
    # InstructBlip classes, LAVIS's *_instruct models).
    lm_head: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"qformer.hidden_size ({self.hidden_size}) must be divisible by qformer.num_heads ({self.num_heads})"
            )
        if self.cross_attention_freq < 1:
            raise ConfigError(f"qformer.cross_attention_freq must be >= 1, got {self.cross_attention_freq}")
        if self.num_query_tokens < 1:
            raise ConfigError(f"qformer.num_query_tokens must be >= 1, got {self.num_query_tokens}")
        if self.lm_head and not self.text_input:
            self.lm_head = False  # no text input, nothing for an LM head to read

    def has_cross_attention(self, layer_idx: int) -> bool:
        return layer_idx % self.cross_attention_freq == 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QFormerConfig":
        # gradient_checkpointing moved to the training config (one knob): older saved configs carry it.
        return _from_dict(cls, data, "qformer config", legacy=frozenset({"gradient_checkpointing"}))


@dataclass(kw_only=True)
class LLMConfig:
    """The frozen language model of stage 2 (any causal or seq2seq transformers LM).

    ``path``: a local directory or hub name for ``from_pretrained``; or ``hf_config``: a
    transformers config dict to build it from (tiny test models, meta-device cards).
    """

    path: str | None = None
    hf_config: dict[str, Any] | None = None
    # Frozen weights' dtype: "bfloat16" (half the memory of fp32 and, unlike fp16, the same
    # exponent range: no overflow in a frozen LLM), "float32" or "float16". Ignored for the
    # quantised layers.
    dtype: str = "bfloat16"
    quantization: str | None = None  # None, "8bit", "4bit" (nf4) or "4bit-fp4"
    lora: dict[str, Any] | None = None  # peft.LoraConfig fields; None keeps the LLM fully frozen
    # Training text: "prompt" = prompt + caption (OPT; FlanT5 fine-tuning);
    # "prefix_lm" = BLIP-2's FlanT5 stage-2 pretraining: each caption split at a random word
    # into an encoder prefix and a decoder target (seq2seq models only).
    text_mode: str = "prompt"
    prompt: str = ""  # e.g. "a photo of" for caption fine-tuning
    max_txt_len: int = 32
    # Appended to causal-LM captions in training; its token ends generation (OPT's "\n" in
    # BLIP-2). None: the tokenizer's eos token instead.
    end_of_text: str | None = "\n"
    # The token id(s) that end generation, when a checkpoint says so (a transformers BLIP-2's
    # generation / text config). None: derived from end_of_text (see qformer.llm.end_of_text_ids).
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.hf_config is None):
            raise ConfigError("llm: give exactly one of llm.path (from_pretrained) and llm.hf_config (build from config)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"llm.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quantization not in (None, "8bit", "4bit", "4bit-fp4"):
            raise ConfigError(f"llm.quantization must be None, '8bit', '4bit' or '4bit-fp4', got {self.quantization!r}")
        if self.text_mode not in ("prompt", "prefix_lm"):
            raise ConfigError(f"llm.text_mode must be 'prompt' or 'prefix_lm', got {self.text_mode!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LLMConfig":
        return _from_dict(cls, data, "llm config")


@dataclass(kw_only=True)
class Blip2Config:
    """The whole model: frozen vision tower, Q-Former, and the stage-1 heads.

    ``qformer.encoder_width`` must equal the vision tower's width (checked when the model
    is built). ``dec_token_id`` is the tokenizer's ``[DEC]`` (bos) token that starts ITG
    captions; ``sep_token_id`` ends them.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    # Stage 2: the frozen LLM the queries are projected into (None for a stage-1 model).
    llm: LLMConfig | None = None
    # The stage-1 heads (vision_proj, text_proj, itm_head, temp); need qformer.text_input.
    stage1_heads: bool = True
    embed_dim: int = 256  # ITC embedding size (vision_proj / text_proj)
    # ln_vision: LAVIS uses torch's default 1e-5; transformers' post_layernorm uses 1e-6.
    ln_vision_eps: float = 1e-5
    temp_init: float = 0.07
    max_txt_len: int = 32
    dec_token_id: int = 30522
    sep_token_id: int = 102
    # InstructBLIP: the Q-Former reads the instruction (Q-Former tokenizer) beside the queries;
    # only the query outputs become soft prompts. Needs qformer.text_input.
    instruction_aware: bool = False
    # Longest instruction the Q-Former reads, in its tokens (LAVIS's instruct configs: 128);
    # longer ones keep their end (truncated on the left, as LAVIS).
    instruction_max_len: int = 128
    # A video model (transformers' InstructBlipVideo): exported as that class. Any model with an
    # LLM takes videos= (frames through the tower and Q-Former, T x Q soft prompts in frame order).
    video: bool = False
    # Frames sampled uniformly from a video file or frame folder (InstructBlipVideo: 4).
    num_frames: int = 4

    def __post_init__(self) -> None:
        if self.stage1_heads and not self.qformer.text_input:
            raise ConfigError("stage1_heads=True needs qformer.text_input=True (ITC/ITM/ITG read text)")
        if self.stage1_heads and not self.qformer.lm_head:
            raise ConfigError("stage1_heads=True needs qformer.lm_head=True (ITG predicts words)")
        if self.instruction_aware and not self.qformer.text_input:
            raise ConfigError("instruction_aware=True needs qformer.text_input=True (the Q-Former reads the instruction)")
        if self.num_frames < 1:
            raise ConfigError(f"num_frames must be >= 1, got {self.num_frames}")

    @property
    def instruction_tokens(self) -> int:
        """The instruction's Q-Former token budget: ``instruction_max_len``, within the
        Q-Former's position embeddings."""
        return min(self.instruction_max_len, self.qformer.max_position_embeddings)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["vision"] = self.vision.to_dict()
        d["qformer"] = self.qformer.to_dict()
        d["llm"] = None if self.llm is None else self.llm.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Blip2Config":
        data = dict(data)
        vision = VisionConfig.from_dict(data.pop("vision", {}))
        qformer = QFormerConfig.from_dict(data.pop("qformer", {}))
        llm = data.pop("llm", None)
        llm = None if llm is None else LLMConfig.from_dict(llm)
        return _from_dict(cls, dict(data, vision=vision, qformer=qformer, llm=llm), "blip2 config")
