"""Where a training stage starts from: BERT for the stage-1 Q-Former (as BLIP-2 does from
bert-base-uncased), a stage-1 model of ours for stage 2, a stage-2 model (+ its stage-1 text
parts) for instruction tuning."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import Blip2Config, VisionConfig
from ..errors import CheckpointError
from ..model import Blip2Model, is_stage1_only, is_text_input
from ..tokenizer import load_qformer_tokenizer
from ..weights import read_hf_weights, read_state_dict
from .common import CONFIG_NAME, VISION_PREFIX, WEIGHTS_NAME, frozen_llm_keys, read_json
from .keymaps import Converted, bert_to_qformer
from .ours import is_ours
from .report import LoadReport, load_into


def init_from_stage1(model: Blip2Model, directory: str | os.PathLike, *, strict: bool = True) -> LoadReport:
    """Start a stage-2 model from a stage-1 model directory saved by qformer: the vision
    side, ln_vision, the queries and the Q-Former are copied (shapes checked); the stage-1-only
    parts the stage-2 model does not have (text embeddings and FFNs, LM head, ITC/ITM heads)
    are listed as dropped; the language projection (and any LoRA adapter) starts from a random
    initialisation; the frozen LLM and tower come from their own sources, named in the report."""
    directory = Path(directory)
    meta = read_json(directory / CONFIG_NAME) if (directory / CONFIG_NAME).is_file() else {}
    if not is_ours(meta):
        raise CheckpointError(f"{directory} is not a model saved by qformer (run stage 1 first, or pass --init-from)")
    sd = read_state_dict(directory / WEIGHTS_NAME)
    own = model.state_dict()
    conv = Converted(state_dict={})
    for key, value in sd.items():
        if key in own:
            conv.state_dict[key] = value
        elif is_stage1_only(key):
            conv.dropped[key] = "stage-1 only (text side / ITC-ITM heads), not used in stage 2"
        else:
            conv.unrecognised.append(key)
    fresh = {"language_projection.": "new in stage 2, trainable"}
    fresh.update({k: "LoRA adapter, new in stage 2, trainable" for k in own if k.startswith("llm.") and "lora_" in k})
    llm = model.config.llm
    elsewhere = {k: f"frozen LLM from {llm.path or 'llm.hf_config'}" for k in frozen_llm_keys(model)}
    if not any(k.startswith(VISION_PREFIX) for k in sd) and model.config.vision.pretrained:
        elsewhere[VISION_PREFIX] = f"frozen vision tower from {model.config.vision.pretrained!r}"
    report = load_into(model, conv, source=str(directory), strict=strict, fresh_ok=fresh, elsewhere=elsewhere)
    # e.g. a fine-tuned tower: later saves must write it, vision.pretrained no longer gives it
    model.vision.weights_from_checkpoint = bool(model.config.vision.pretrained) and any(
        k.startswith(VISION_PREFIX) for k in conv.state_dict)
    return report


def instruction_aware_from(
    cls: type[Blip2Model],
    stage2: Blip2Model,
    *,
    stage1: str | os.PathLike | None = None,
    tokenizer=None,
    strict: bool = True,
    vision: VisionConfig | None = None,
) -> tuple[Blip2Model, LoadReport]:
    """An instruction-aware (InstructBLIP) model started from a BLIP-2 stage-2 model, as
    InstructBLIP starts from BLIP-2: the same tower, LLM (shared, not copied), ``ln_vision``,
    queries, Q-Former query path and projection; the Q-Former's text-input parts (word/position
    embeddings, text FFNs) from ``stage2`` when it kept them, else from the ``stage1`` model
    directory it was trained from (LAVIS's stage-2 models drop them: LAVIS #344). ``tokenizer``:
    the Q-Former tokenizer (default: ``stage2``'s, else the one saved with ``stage1``).

    ``vision``: other tower settings (BLIP-2's VQA fine-tuning: float32 weights, 490 px). A new
    ``dtype`` keeps the stage-2 tower's weights (cast); a new ``image_size`` builds the tower
    from ``vision.pretrained`` at that size (timm resamples the position table), which is the
    stage-2 model's tower only when that one was frozen: a trained (saved) tower is refused."""
    if stage2.config.llm is None:
        raise CheckpointError("an instruction-aware model starts from a stage-2 model (one with an LLM)")
    config = Blip2Config.from_dict(stage2.config.to_dict())
    new_size = vision is not None and vision.image_size != config.vision.image_size
    if new_size and (stage2.vision.must_be_saved or not vision.pretrained):
        raise CheckpointError(f"vision.image_size {vision.image_size} differs from the stage-2 model's "
                              f"{config.vision.image_size}, and its tower is "
                              + ("a trained one (its weights are not vision.pretrained's)" if vision.pretrained
                                 else "not named by vision.pretrained") + ": keep the stage-2 model's image size")
    if vision is not None:
        config.vision = VisionConfig.from_dict(vision.to_dict())
    config.qformer.text_input, config.qformer.lm_head = True, False
    config.stage1_heads, config.instruction_aware = False, True
    if config.llm.text_mode == "prefix_lm":
        config.llm.text_mode = "prompt"  # instruction -> answer, not BLIP-2's prefix-LM split
    own_sd = {k: v for k, v in stage2.state_dict().items()
              if not k.startswith("llm.") and not (new_size and k.startswith(VISION_PREFIX))}
    text_sd: dict[str, torch.Tensor] = {}
    source = "the stage-2 model"
    if not any(is_text_input(k) for k in own_sd):
        if stage1 is None:
            raise CheckpointError("the stage-2 model has no Q-Former text parts (LAVIS-style stage 2): "
                                  "pass the stage-1 model directory they come from")
        stage1 = Path(stage1)
        if not (stage1 / WEIGHTS_NAME).is_file():
            raise CheckpointError(f"{stage1}: no {WEIGHTS_NAME} (the stage-1 model for the Q-Former's text parts)")
        text_sd = {k: v for k, v in read_state_dict(stage1 / WEIGHTS_NAME).items() if is_text_input(k)}
        source = str(stage1)
        if tokenizer is None and stage2.tokenizer is None:
            tokenizer = load_qformer_tokenizer(stage1)
    tokenizer = tokenizer if tokenizer is not None else stage2.tokenizer
    if tokenizer is None:
        raise CheckpointError("no Q-Former tokenizer for the instruction: pass tokenizer=")
    model = cls(config, tokenizer=tokenizer, llm_tokenizer=stage2.llm_tokenizer, llm=stage2.llm)
    conv = Converted(state_dict={})
    own = model.state_dict()
    for key, value in {**own_sd, **text_sd}.items():
        if key in own:
            conv.state_dict[key] = value
        elif is_stage1_only(key):
            conv.dropped[key] = "stage-1 only, not in an instruction-aware model"
        else:
            conv.unrecognised.append(key)
    elsewhere = {k: "the stage-2 model's frozen LLM (shared)" for k in frozen_llm_keys(model)}
    if new_size:
        elsewhere[VISION_PREFIX] = f"the tower from {config.vision.pretrained!r} at {config.vision.image_size} px"
    report = load_into(model, conv, source=f"the stage-2 model + text parts from {source}", strict=strict,
                       elsewhere=elsewhere)
    # a stage-2 tower that vision.pretrained does not give (a fine-tuned one) must still be saved
    model.vision.weights_from_checkpoint = stage2.vision.must_be_saved and not new_size
    return model, report


def init_qformer_from_bert(model: Blip2Model, path: str | os.PathLike, *, strict: bool = True) -> LoadReport:
    """Initialise the Q-Former from a transformers BERT checkpoint directory (as BLIP-2 does
    from bert-base-uncased): embeddings, self-attention, text FFN and LM head are copied;
    the text FFN is also copied into the query FFN; cross-attention stays freshly
    initialised. A vocabulary that grew (``[DEC]`` added) keeps the new rows' init."""
    directory = Path(path)
    sd = read_hf_weights(directory) if directory.is_dir() else read_state_dict(directory)
    conv = bert_to_qformer(sd)
    med = model.qformer
    own = med.state_dict()
    # Grown vocabulary: copy the old rows into the fresh matrix.
    for key in ("embeddings.word_embeddings.weight", "lm_head.bias"):
        if key in conv.state_dict and key in own and conv.state_dict[key].shape[0] < own[key].shape[0]:
            grown = own[key].clone()
            grown[: conv.state_dict[key].shape[0]] = conv.state_dict[key]
            conv.state_dict[key] = grown
    # BLIP-2 starts the query FFN as a copy of the text FFN.
    for key in list(conv.state_dict):
        if ".ffn." in key:
            conv.state_dict[key.replace(".ffn.", ".ffn_query.")] = conv.state_dict[key]
    fresh = {f"layers.{i}.cross_attn.": "new cross-attention layer" for i in med.cross_attention_layers}
    return load_into(med, conv, source=str(directory), strict=strict, fresh_ok=fresh)


__all__ = ["init_from_stage1", "init_qformer_from_bert", "instruction_aware_from"]
