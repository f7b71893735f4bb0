"""The toy world and its frozen toy backbones: BLIP-2 end to end on a CPU, no downloads.

``qformer.toy.world`` (numpy + Pillow only) generates captioned scenes; ``qformer.toy.backbones``
(torch, timm, transformers) pretrains and caches a small ViT, a small OPT LM and the
Q-Former's tokenizer on that world; ``qformer.toy.plugin`` offers both to adapter cards as
``toy://`` resources and scores captions of toy data.
"""

from __future__ import annotations

from .backbones import (
    TOY_BACKBONES_VERSION,
    ToyBackbones,
    ToyLMSpec,
    ToyPretrainBudget,
    ToyVisionSpec,
    build_bert_tokenizer,
    build_lm_tokenizer,
    default_cache_root,
    ensure_toy_backbones,
    load_toy_vision_tower,
    toy_cache_key,
)
from .world import (
    COLOURS,
    QUESTION_TYPES,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    VQA_FILE,
    CaptionMention,
    ToyObject,
    ToyQuestion,
    ToySample,
    ToyScene,
    ToySplit,
    ToyWorld,
    caption_vocabulary,
    parse_caption,
    score_caption,
    toy_questions,
)

__all__ = [
    "COLOURS",
    "QUESTION_TYPES",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "VQA_FILE",
    "CaptionMention",
    "ToyObject",
    "ToyQuestion",
    "ToySample",
    "ToyScene",
    "ToySplit",
    "ToyWorld",
    "caption_vocabulary",
    "parse_caption",
    "score_caption",
    "toy_questions",
    "TOY_BACKBONES_VERSION",
    "ToyBackbones",
    "ToyLMSpec",
    "ToyPretrainBudget",
    "ToyVisionSpec",
    "build_bert_tokenizer",
    "build_lm_tokenizer",
    "default_cache_root",
    "ensure_toy_backbones",
    "load_toy_vision_tower",
    "toy_cache_key",
]

