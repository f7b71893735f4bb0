"""Saving and loading, every format: our own, transformers' BLIP-2 directories (import and
export), LAVIS ``.pth`` files, BERT initialisation, and the key maps between them.

This package depends on the model (:mod:`qformer.model`); the model never depends on it.
:class:`qformer.Blip2`'s ``from_pretrained`` / ``save_pretrained`` / ``export_transformers``
delegate here.

Checkpoints are untrusted input: ``.pth`` / ``.bin`` files are read with
``torch.load(weights_only=True)`` (:mod:`qformer.weights`, shared with the frozen towers) and
refused with :class:`~qformer.errors.UnsafeCheckpointError` if they need more. Loads are strict
and report what came from where (:class:`LoadReport`).

Modules: :mod:`.keymaps` (Q-Former keys: LAVIS, transformers, BERT), :mod:`.eva` (EVA ViT keys
and LAVIS's EVA rebuilt in timm), :mod:`.report` (strict loading), :mod:`.ours`, :mod:`.lavis`,
:mod:`.hf`, :mod:`.export`, :mod:`.init` (stage starts), :mod:`.load` (format dispatch).
"""

from ..errors import CheckpointError, UnsafeCheckpointError
from ..weights import read_hf_weights, read_state_dict, safe_torch_load
from .common import CONFIG_NAME, FORMAT, FORMAT_VERSION, VISION_PREFIX, WEIGHTS_NAME, LoadOptions
from .eva import (
    LAVIS_EVA_TIMM_NAME,
    blip2_vision_config_kwargs_from_eva,
    convert_blip2_hf_to_eva_timm,
    convert_eva_timm_to_blip2_hf,
    convert_lavis_eva_to_timm,
    lavis_eva_timm_kwargs,
    lavis_eva_vision_config,
)
from .export import IMAGE_TOKEN, export_transformers, to_transformers
from .instructblip import QFORMER_TOKENIZER_DIR, instructblip_to_ours, ours_to_instructblip
from .hf import blip2_config_from_hf, build_llm_from_state_dict
from .init import init_from_stage1, init_qformer_from_bert, instruction_aware_from
from .keymaps import Converted, bert_to_qformer, hf_retrieval_to_ours, lavis_to_ours, ours_to_hf_retrieval, ours_to_lavis
from .load import load_blip2
from .ours import save_blip2
from .report import LoadReport, load_into

__all__ = [
    "CONFIG_NAME",
    "CheckpointError",
    "Converted",
    "FORMAT",
    "FORMAT_VERSION",
    "IMAGE_TOKEN",
    "QFORMER_TOKENIZER_DIR",
    "LAVIS_EVA_TIMM_NAME",
    "LoadOptions",
    "LoadReport",
    "UnsafeCheckpointError",
    "VISION_PREFIX",
    "WEIGHTS_NAME",
    "bert_to_qformer",
    "blip2_config_from_hf",
    "blip2_vision_config_kwargs_from_eva",
    "build_llm_from_state_dict",
    "convert_blip2_hf_to_eva_timm",
    "convert_eva_timm_to_blip2_hf",
    "convert_lavis_eva_to_timm",
    "export_transformers",
    "to_transformers",
    "hf_retrieval_to_ours",
    "init_from_stage1",
    "instructblip_to_ours",
    "init_qformer_from_bert",
    "instruction_aware_from",
    "lavis_eva_timm_kwargs",
    "lavis_eva_vision_config",
    "lavis_to_ours",
    "load_blip2",
    "load_into",
    "ours_to_hf_retrieval",
    "ours_to_instructblip",
    "ours_to_lavis",
    "read_hf_weights",
    "read_state_dict",
    "safe_torch_load",
    "save_blip2",
]
