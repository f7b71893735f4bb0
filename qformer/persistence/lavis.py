"""LAVIS ``.pth`` checkpoints: ``Blip2Qformer`` (stage 1, ``blip2_pretrained.pth``),
``Blip2OPT`` / ``Blip2T5`` (stage 2) and InstructBLIP's ``Blip2VicunaInstruct`` /
``Blip2T5Instruct`` (``llm_proj`` / ``t5_proj``, a Q-Former with text input and no LM head: give
a config with ``instruction_aware=True`` and ``qformer.lm_head=False``). A ``.pth`` carries no
architecture: a :class:`~qformer.config.Blip2Config` gives the shapes.

LAVIS saves only trainable tensors, so its files normally lack the frozen ViT and LLM: they
then come from ``config.vision.pretrained`` and ``config.llm.path``. When the file does hold
them (``visual_encoder.*``, ``opt_model.*`` / ``t5_model.*``), they are loaded and checked too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import Blip2Config
from ..errors import CheckpointError
from ..weights import read_state_dict
from .common import (
    VISION_PREFIX,
    LoadOptions,
    frozen_llm_keys,
    llm_tokenizer,
    load_llm_weights,
    override_llm,
    qformer_tokenizer,
)
from .eva import convert_eva_timm_to_blip2_hf, convert_lavis_eva_to_timm
from .keymaps import lavis_to_ours
from .report import LoadReport, load_into

if TYPE_CHECKING:  # pragma: no cover
    from ..model import Blip2Model

# Blip2OPT, Blip2T5 / Blip2T5Instruct, Blip2VicunaInstruct.
LAVIS_LLM_PREFIXES = ("opt_model.", "t5_model.", "llm_model.")
LAVIS_PROJECTIONS = ("opt_proj.", "t5_proj.", "llm_proj.")


def lavis_vision_weights(sd: dict[str, torch.Tensor], config: Blip2Config) -> dict[str, torch.Tensor]:
    """LAVIS's ``visual_encoder.*`` (EVA) -> the tower's own key names."""
    timm_sd = convert_lavis_eva_to_timm(sd)
    if config.vision.backend == "hf":
        if config.vision.name != "blip_2_vision_model":
            raise CheckpointError(
                f"a LAVIS EVA ViT cannot be loaded into a {config.vision.name!r} tower; "
                "use a timm Eva tower or transformers' blip_2_vision_model"
            )
        return convert_eva_timm_to_blip2_hf(timm_sd)
    return timm_sd


def load_lavis(cls, path: Path, config: Blip2Config, opts: LoadOptions) -> tuple["Blip2Model", LoadReport]:
    config = Blip2Config.from_dict(config.to_dict())
    override_llm(config, opts)
    sd = read_state_dict(path)
    llm_tok = llm_tokenizer(opts.llm_tokenizer, config.llm.path) if config.llm is not None else None
    model = cls(config, tokenizer=qformer_tokenizer(opts.tokenizer, None), llm_tokenizer=llm_tok)
    body = {k: v for k, v in sd.items() if not k.startswith(LAVIS_LLM_PREFIXES)}
    converted = lavis_to_ours(body, vision_prefix=None)
    for prefix in LAVIS_PROJECTIONS:
        for k in [k for k in converted.unrecognised if k.startswith(prefix)]:
            converted.unrecognised.remove(k)
            converted.state_dict["language_projection." + k[len(prefix):]] = body[k]
    elsewhere: dict[str, str] = {}
    if any(k.startswith("visual_encoder.") for k in sd):
        converted.dropped = {k: v for k, v in converted.dropped.items() if not k.startswith("visual_encoder.")}
        for key, value in lavis_vision_weights(sd, config).items():
            converted.state_dict[VISION_PREFIX + key] = value
    elif config.vision.pretrained:
        elsewhere[VISION_PREFIX] = f"frozen vision tower (not in the LAVIS file) from {config.vision.pretrained!r}"
    # (else the tower would stay random, so its keys are reported as missing)
    llm_sd = {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith(LAVIS_LLM_PREFIXES)}
    if config.llm is not None:
        source = f"{path} ({'/'.join(p.rstrip('.') for p in LAVIS_LLM_PREFIXES)})" if llm_sd else f"{config.llm.path}"
        if llm_sd:
            load_llm_weights(model, llm_sd, source=source)
        elsewhere.update({k: f"frozen LLM from {source}" for k in frozen_llm_keys(model)})
    elif llm_sd:
        converted.unrecognised.extend(k for k in sd if k.startswith(LAVIS_LLM_PREFIXES))
    report = load_into(model, converted, source=str(path), strict=opts.strict, elsewhere=elsewhere)
    return model, report


__all__ = ["LAVIS_LLM_PREFIXES", "lavis_vision_weights", "load_lavis"]
