"""Our own format: ``config.json`` (format, version, the Blip2Config) + ``model.safetensors``
(+ the Q-Former tokenizer, ``llm_tokenizer/`` and, when included, the frozen LLM as a
transformers directory ``llm/``), written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import save_file

from ..config import Blip2Config
from ..errors import CheckpointError
from ..io import atomic_dir
from ..llm import base_llm
from ..weights import read_state_dict
from .common import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    VISION_PREFIX,
    WEIGHTS_NAME,
    LoadOptions,
    clean_llm_state_dict,
    frozen_llm_keys,
    llm_tokenizer,
    override_llm,
    qformer_tokenizer,
)
from .keymaps import Converted
from .report import LoadReport, load_into

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..model import Blip2Model


def save_blip2(model: "Blip2Model", directory: Path, *, include_frozen: bool = True,
               state_dict: "dict[str, torch.Tensor] | None" = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` (+ tokenizers, + ``llm/``) atomically.

    ``include_frozen=True`` makes the directory self-contained: the frozen vision tower is in
    ``model.safetensors`` and the frozen LLM is a transformers directory ``llm/``.
    ``include_frozen=False`` (training checkpoints) keeps only what trains (and small
    buffers); the frozen towers are then rebuilt from ``vision.pretrained`` / ``llm.path``.
    A vision tower that trains (BLIP-2's fine-tuning), or whose weights were loaded from a saved
    model, is always written whole: its weights are not what ``vision.pretrained`` gives.
    A quantised LLM is never written: it is re-quantised from ``llm.path`` at load.
    ``state_dict``: full weights to write instead of ``model.state_dict()`` (an FSDP2-sharded
    model's, gathered); the LLM directory ``llm/`` is never written from it.
    """
    config = Blip2Config.from_dict(model.config.to_dict())
    state = model.state_dict() if state_dict is None else state_dict
    drop = set(frozen_llm_keys(model))
    if not include_frozen and not model.vision.must_be_saved:
        if not config.vision.pretrained:
            raise CheckpointError(
                "include_frozen=False leaves the vision tower out, but vision.pretrained does not say "
                "where to load it from; save with include_frozen=True"
            )
        drop |= {k for k in state if k.startswith(VISION_PREFIX)}
    save_llm = config.llm is not None and include_frozen and config.llm.quantization is None
    if save_llm and state_dict is not None:
        raise CheckpointError("a sharded (FSDP) model's frozen LLM is not written into llm/: set llm.path "
                              "(and vision.pretrained) so that the saved model reloads it from there")
    if config.llm is not None and not save_llm and config.llm.path is None:
        raise CheckpointError("the frozen LLM is not written here and llm.path is unset: it could not be reloaded")
    sd = {k: v.detach().contiguous().cpu() for k, v in state.items() if k not in drop}
    with atomic_dir(directory) as tmp:
        save_file(sd, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if save_llm:
            base_llm(model.llm).save_pretrained(str(tmp / "llm"), state_dict=clean_llm_state_dict(model))
            model.llm_tokenizer.save_pretrained(str(tmp / "llm"))
            config.llm.path, config.llm.hf_config = "llm", None
        if model.llm_tokenizer is not None:
            model.llm_tokenizer.save_pretrained(str(tmp / "llm_tokenizer"))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": "Blip2",
            "include_frozen": include_frozen,
            "config": config.to_dict(),
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))


def is_ours(meta: dict) -> bool:
    return meta.get("format") == FORMAT


def load_ours(cls, path: Path, meta: dict, opts: LoadOptions) -> tuple["Blip2Model", LoadReport]:
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer qformer (format_version {meta['format_version']})")
    config = Blip2Config.from_dict(meta["config"])
    if config.llm is not None and config.llm.path is not None and not os.path.isabs(config.llm.path):
        if (path / config.llm.path).is_dir():
            config.llm.path = str(path / config.llm.path)
    override_llm(config, opts)
    llm_tok = None
    if config.llm is not None:
        llm_tok = llm_tokenizer(opts.llm_tokenizer, path / "llm_tokenizer", config.llm.path)
    model = cls(config, tokenizer=qformer_tokenizer(opts.tokenizer, path), llm_tokenizer=llm_tok)
    sd = read_state_dict(path / WEIGHTS_NAME)
    elsewhere = {k: f"frozen LLM from {config.llm.path}" for k in frozen_llm_keys(model)}
    if not any(k.startswith(VISION_PREFIX) for k in sd) and config.vision.pretrained:
        elsewhere[VISION_PREFIX] = f"frozen vision tower from {config.vision.pretrained!r}"
    report = load_into(model, Converted(state_dict=sd), source=str(path / WEIGHTS_NAME), strict=opts.strict,
                       elsewhere=elsewhere)
    model.vision.weights_from_checkpoint = bool(config.vision.pretrained) and any(k.startswith(VISION_PREFIX) for k in sd)
    return model, report


__all__ = ["is_ours", "load_ours", "save_blip2"]
