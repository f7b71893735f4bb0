"""transformers InstructBLIP directories: ``InstructBlipForConditionalGeneration`` (the layout of
Salesforce/instructblip-vicuna-* and instructblip-flan-t5-*) and
``InstructBlipVideoForConditionalGeneration``, loaded into an instruction-aware model, and
exported back.

The hub layout keeps the LLM tokenizer at the top and the Q-Former's BERT tokenizer in a
``qformer_tokenizer/`` subfolder. The Q-Former reads text (word/position embeddings, text FFNs)
but has no LM head; transformers keeps its embedding LayerNorm under ``qformer.embeddings``.
Generation stops where the checkpoint says, as for BLIP-2 (:mod:`.hf`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import Blip2Config
from ..errors import CheckpointError
from ..tokenizer import load_qformer_tokenizer
from .common import VISION_PREFIX, LoadOptions
from .hf import hf_blip2_parts, llm_config_from_hf, load_generation_model
from .keymaps import Converted, hf_retrieval_to_ours, ours_to_hf_retrieval
from .report import LoadReport

if TYPE_CHECKING:  # pragma: no cover
    from ..model import Blip2Model

INSTRUCTBLIP_TYPES = ("instructblip", "instructblipvideo")
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"

# transformers' InstructBlip Q-Former names -> transformers' Blip2 retrieval names (whose map to ours exists).
_TO_BLIP2 = (
    ("qformer.embeddings.layernorm.", "qformer.layernorm."),
    ("qformer.embeddings.word_embeddings.", "embeddings.word_embeddings."),
    ("qformer.embeddings.position_embeddings.", "embeddings.position_embeddings."),
)


def is_hf_instructblip(meta: dict) -> bool:
    return meta.get("model_type") in INSTRUCTBLIP_TYPES


def instructblip_to_ours(sd: dict[str, torch.Tensor], *, vision_prefix: str = VISION_PREFIX) -> Converted:
    """transformers ``InstructBlip(Video)ForConditionalGeneration`` weights (without
    ``language_model.*``) -> ours."""
    renamed: dict[str, torch.Tensor] = {}
    dropped: dict[str, str] = {}
    for key, value in sd.items():
        if key == "qformer.embeddings.position_ids":
            dropped[key] = "buffer (positions are computed)"
            continue
        for src, dst in _TO_BLIP2:
            if key.startswith(src):
                key = dst + key[len(src):]
                break
        renamed[key] = value
    out = hf_retrieval_to_ours(renamed, vision_prefix=vision_prefix)
    out.dropped.update(dropped)
    return out


def ours_to_instructblip(sd: dict[str, torch.Tensor], *, vision_prefix: str = VISION_PREFIX) -> dict[str, torch.Tensor]:
    """Ours (no LLM) -> transformers ``InstructBlip(Video)ForConditionalGeneration`` names."""
    out = {}
    for key, value in ours_to_hf_retrieval(sd, vision_prefix=vision_prefix).items():
        for dst, src in _TO_BLIP2:
            if key.startswith(src):
                key = dst + key[len(src):]
                break
        out[key] = value
    return out


def instructblip_config_from_hf(meta: dict, directory: Path | None = None) -> Blip2Config:
    """Our config equivalent to a transformers ``InstructBlipConfig`` / ``InstructBlipVideoConfig``."""
    if meta.get("text_config") is None:
        raise CheckpointError(f"{directory}: an InstructBLIP config without text_config")
    vision, qformer = hf_blip2_parts(meta, directory)
    qformer.text_input, qformer.lm_head = True, False
    llm = llm_config_from_hf(meta, directory)
    return Blip2Config(
        vision=vision, qformer=qformer, llm=llm, stage1_heads=False, instruction_aware=True,
        video=meta.get("model_type") == "instructblipvideo",
        ln_vision_eps=vision.model_kwargs.get("layer_norm_eps", 1e-6),
    )


def instruction_tokenizer(tokenizer, path: Path):
    """The Q-Former tokenizer asked for, else ``path/qformer_tokenizer`` (the hub layout), as
    saved: InstructBLIP's Q-Former generates nothing, so no ``[DEC]`` is added."""
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    where = Path(tokenizer) if tokenizer is not None else path / QFORMER_TOKENIZER_DIR
    if not where.is_dir():
        raise CheckpointError(f"{path}: no {QFORMER_TOKENIZER_DIR}/ (the Q-Former's tokenizer); pass tokenizer=...")
    return load_qformer_tokenizer(where, add_dec=False)


def load_hf_instructblip(cls, path: Path, meta: dict, opts: LoadOptions) -> tuple["Blip2Model", LoadReport]:
    """transformers ``InstructBlipForConditionalGeneration`` / ``InstructBlipVideoForConditionalGeneration``."""
    config = instructblip_config_from_hf(meta, path)
    return load_generation_model(cls, path, config, opts, tokenizer=instruction_tokenizer(opts.tokenizer, path),
                                 convert=instructblip_to_ours)


__all__ = [
    "INSTRUCTBLIP_TYPES",
    "QFORMER_TOKENIZER_DIR",
    "instructblip_config_from_hf",
    "instructblip_to_ours",
    "instruction_tokenizer",
    "is_hf_instructblip",
    "load_hf_instructblip",
    "ours_to_instructblip",
]
