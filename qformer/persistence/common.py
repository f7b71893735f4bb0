"""What every checkpoint format shares: names of our files, load options, tokenizer and LLM
helpers."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import Blip2Config
from ..errors import CheckpointError
from ..llm import base_llm, load_llm_tokenizer
from ..tokenizer import load_qformer_tokenizer
from .report import summarise

if TYPE_CHECKING:  # pragma: no cover
    from ..model import Blip2Model

FORMAT = "qformer"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Where the vision tower's own (timm / transformers) parameter names start in our state dict.
VISION_PREFIX = "vision.model."


@dataclass
class LoadOptions:
    """What :meth:`qformer.Blip2.from_pretrained` was asked for, besides the path."""

    config: Blip2Config | None = None
    tokenizer: Any = None
    llm_tokenizer: Any = None
    llm_dtype: str | None = None
    llm_quantization: str | None = None
    strict: bool = True


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def qformer_tokenizer(tokenizer: Any, fallback_dir: Path | None):
    """The Q-Former tokenizer asked for (an object or a path), else the one saved in ``fallback_dir``."""
    if tokenizer is None:
        if fallback_dir is not None and any(
            (fallback_dir / n).is_file() for n in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
        ):
            return load_qformer_tokenizer(fallback_dir)
        return None
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_qformer_tokenizer(tokenizer)
    return tokenizer


def llm_tokenizer(tokenizer: Any, *candidates: Any):
    """The LLM tokenizer asked for (an object or a path), else the first candidate directory that exists."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    for cand in ([tokenizer] if tokenizer is not None else []) + [c for c in candidates if c is not None]:
        if Path(str(cand)).is_dir() or tokenizer is not None:
            return load_llm_tokenizer(path=cand)
    return None


def override_llm(config: Blip2Config, opts: LoadOptions) -> None:
    if config.llm is None:
        return
    if opts.llm_dtype is not None:
        config.llm.dtype = opts.llm_dtype
    if opts.llm_quantization is not None:
        config.llm.quantization = opts.llm_quantization
    config.llm.__post_init__()


def frozen_llm_keys(model: "Blip2Model") -> list[str]:
    """State-dict keys of the frozen LLM (everything under ``llm.`` but LoRA adapters)."""
    if model.config.llm is None:
        return []
    return [k for k in model.state_dict() if k.startswith("llm.") and "lora_" not in k]


def clean_llm_state_dict(model: "Blip2Model") -> dict[str, torch.Tensor]:
    """The LLM's own transformers state dict, without LoRA layers (``base_layer`` unwrapped)."""
    out = {}
    for key, value in base_llm(model.llm).state_dict().items():
        if "lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


def load_llm_weights(model: "Blip2Model", sd: dict[str, torch.Tensor], *, source: str) -> None:
    """Copy a plain transformers state dict of the LLM into ``model.llm`` (LoRA-wrapped or
    not), strictly: every weight must be given except those tied to the input embeddings."""
    lm = base_llm(model.llm)
    params = {k.replace(".base_layer.", "."): t for k, t in lm.state_dict(keep_vars=True).items() if "lora_" not in k}
    unexpected = sorted(set(sd) - set(params))
    emb = lm.get_input_embeddings().weight
    missing = sorted(k for k in set(params) - set(sd) if params[k].data_ptr() != emb.data_ptr())
    bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(params[k].shape)}" for k in set(sd) & set(params)
           if sd[k].shape != params[k].shape]
    if unexpected or missing or bad:
        raise CheckpointError(
            f"{source}: LLM weights do not fit: missing {summarise(missing)}; unexpected {summarise(unexpected)}; "
            f"shapes {bad}"
        )
    with torch.no_grad():
        for k, v in sd.items():
            params[k].copy_(v)


__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "LoadOptions",
    "VISION_PREFIX",
    "WEIGHTS_NAME",
    "clean_llm_state_dict",
    "frozen_llm_keys",
    "llm_tokenizer",
    "load_llm_weights",
    "override_llm",
    "qformer_tokenizer",
    "read_json",
]
