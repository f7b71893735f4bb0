"""Export to transformers: ``Blip2ForConditionalGeneration`` (BLIP-2 with an LLM),
``InstructBlipForConditionalGeneration`` / ``InstructBlipVideoForConditionalGeneration``
(instruction-aware models), or, for a model without an LLM (stage 1, retrieval fine-tuning),
``Blip2ForImageTextRetrieval``; with tokenizer(s) and processor. All carry the vision tower's
weights (a fine-tuned tower as it trained).

transformers 5.x inserts ``num_query_tokens`` image placeholder tokens (``image_token_index``)
into the LLM's input ids and scatters the projected queries there; the export adds an
``<image>`` token to the LLM tokenizer for that (it must fit in the LLM's embedding matrix).
LoRA adapters are merged into the exported weights; a quantised LLM cannot be exported.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..io import atomic_dir
from ..llm import base_llm, end_of_text_ids, is_encoder_decoder
from ..model import Blip2Model, is_stage1_only, is_text_input
from .common import VISION_PREFIX, clean_llm_state_dict
from .instructblip import QFORMER_TOKENIZER_DIR, ours_to_instructblip
from .eva import blip2_vision_config_kwargs_from_eva, convert_eva_timm_to_blip2_hf
from .keymaps import ours_to_hf_retrieval

IMAGE_TOKEN = "<image>"


def _vision_for_hf(model: Blip2Model) -> tuple[dict, dict[str, torch.Tensor]]:
    """(Blip2VisionConfig kwargs, Blip2VisionModel weights without post_layernorm)."""
    cfg = model.config.vision
    tower_sd = {k[len(VISION_PREFIX):]: v for k, v in model.state_dict().items() if k.startswith(VISION_PREFIX)}
    if cfg.backend == "hf" and cfg.name == "blip_2_vision_model":
        hf = model.vision.model.config
        kwargs = dict(
            hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
            num_hidden_layers=hf.num_hidden_layers, num_attention_heads=hf.num_attention_heads,
            image_size=hf.image_size, patch_size=hf.patch_size, hidden_act=hf.hidden_act,
            layer_norm_eps=hf.layer_norm_eps, qkv_bias=hf.qkv_bias,
        )
        return kwargs, tower_sd
    if cfg.backend == "timm":
        try:
            kwargs = blip2_vision_config_kwargs_from_eva(model.vision.model)
        except (ValueError, TypeError) as e:
            raise CheckpointError(
                f"transformers' BLIP-2 holds only its EVA-style vision model; the tower {cfg.name!r} "
                f"cannot be expressed as one: {e}"
            ) from e
        return kwargs, convert_eva_timm_to_blip2_hf(tower_sd)
    raise CheckpointError(
        f"transformers' BLIP-2 holds only its EVA-style vision model; a {cfg.backend}:{cfg.name} tower cannot be exported"
    )


def _merged_llm_state_dict(model: Blip2Model) -> dict[str, torch.Tensor]:
    """The LLM's weights with any LoRA adapters merged in (W + scale * B @ A)."""
    sd = clean_llm_state_dict(model)
    lm = base_llm(model.llm)
    for name, module in lm.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            for adapter in getattr(module, "active_adapters", []) or []:
                key = f"{name}.weight"
                sd[key] = sd[key] + module.get_delta_weight(adapter).to(sd[key].dtype)
    return sd


def _qformer_config_for_hf(model: Blip2Model, *, text_input: bool) -> dict:
    """transformers ``Blip2QFormerConfig`` fields of our Q-Former."""
    q = model.config.qformer
    return dict(
        vocab_size=q.vocab_size, hidden_size=q.hidden_size, num_hidden_layers=q.num_layers,
        num_attention_heads=q.num_heads, intermediate_size=q.intermediate_size, hidden_act=q.hidden_act,
        hidden_dropout_prob=q.hidden_dropout, attention_probs_dropout_prob=q.attention_dropout,
        max_position_embeddings=q.max_position_embeddings, layer_norm_eps=q.layer_norm_eps,
        pad_token_id=q.pad_token_id, cross_attention_frequency=q.cross_attention_freq,
        encoder_hidden_size=q.encoder_width, use_qformer_text_input=text_input,
    )


def _checked_vision(model: Blip2Model) -> tuple[dict, dict[str, torch.Tensor]]:
    vision_kwargs, vision_sd = _vision_for_hf(model)
    eps = model.config.ln_vision_eps
    if abs(vision_kwargs.get("layer_norm_eps", 1e-6) - eps) > 0:
        warnings.warn(
            f"transformers uses the vision layer_norm_eps ({vision_kwargs.get('layer_norm_eps')}) for post_layernorm "
            f"(our ln_vision has eps {eps}): exported outputs differ by about that much in relative terms",
            stacklevel=4,
        )
    return vision_kwargs, vision_sd


def _image_processor(model: Blip2Model):
    from transformers import BlipImageProcessor

    vcfg = model.config.vision
    return BlipImageProcessor(
        size={"height": vcfg.image_size, "width": vcfg.image_size},
        image_mean=list(vcfg.mean), image_std=list(vcfg.std), resample=3,  # PIL bicubic
    )


def _assign(hf_class, hf_config, sd: dict[str, torch.Tensor]):
    """A transformers model of ``hf_class`` holding exactly ``sd`` (no random initialisation first)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        hf = hf_class(hf_config)
    own = hf.state_dict()
    unexpected = sorted(set(sd) - set(own))
    if unexpected:
        raise CheckpointError(f"export produced keys transformers does not have: {unexpected[:8]}")
    hf.load_state_dict({k: v.float() if k.startswith(("qformer.", "query_tokens")) else v for k, v in sd.items()},
                       strict=False, assign=True)
    hf.tie_weights()
    missing = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if missing:
        raise CheckpointError(f"export is missing weights transformers needs: {missing[:8]}")
    return hf


def export_transformers_retrieval(model: Blip2Model, directory: Path) -> None:
    """Write a directory that ``transformers.Blip2ForImageTextRetrieval.from_pretrained`` loads
    with the same ITM logits and ITC similarities (plus the Q-Former's tokenizer and the image
    processor). transformers' class has no temperature and no LM head: they are not written."""
    from transformers import Blip2Config as HFBlip2Config
    from transformers import Blip2ForImageTextRetrieval

    cfg = model.config
    if not cfg.stage1_heads:
        raise CheckpointError("a model with neither an LLM nor stage-1 heads has no transformers BLIP-2 class to export to")
    vision_kwargs, vision_sd = _checked_vision(model)
    hf_config = HFBlip2Config(
        vision_config=vision_kwargs,
        qformer_config=_qformer_config_for_hf(model, text_input=True),
        num_query_tokens=cfg.qformer.num_query_tokens,
        image_text_hidden_size=cfg.embed_dim,
    )
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith(VISION_PREFIX)}
    sd = ours_to_hf_retrieval(ours, vision_prefix=VISION_PREFIX)
    sd.update({"vision_model." + k: v for k, v in vision_sd.items()})
    hf = _assign(Blip2ForImageTextRetrieval, hf_config, sd)
    with atomic_dir(directory) as tmp:
        hf.save_pretrained(str(tmp))
        _image_processor(model).save_pretrained(str(tmp))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))


def _placeholder_token(model: Blip2Model, tok, token: str) -> int:
    """Add the image/video placeholder ``token`` to ``tok``; its id must be a row of the LLM's embeddings."""
    if token not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [token]})
    token_id = tok.convert_tokens_to_ids(token)
    rows = base_llm(model.llm).get_input_embeddings().weight.shape[0]
    if token_id >= rows:
        raise CheckpointError(
            f"the {token} placeholder token would get id {token_id}, outside the LLM's {rows}-row embedding matrix; "
            "transformers needs it inside (resize the LLM's embeddings first)"
        )
    return token_id


def export_transformers(model: Blip2Model, directory: Path) -> None:
    """Write a directory that transformers loads with the same outputs, plus its tokenizer(s)
    and processor: ``Blip2ForConditionalGeneration`` for a BLIP-2 model,
    ``InstructBlipForConditionalGeneration`` for an instruction-aware one,
    ``InstructBlipVideoForConditionalGeneration`` for an instruction-aware video model
    (``config.video``). Generation there stops where ours does: the end-of-text id(s) go into
    the text config and the generation config. A model without an LLM is written as
    ``Blip2ForImageTextRetrieval`` (:func:`export_transformers_retrieval`)."""
    import transformers

    cfg = model.config
    if cfg.llm is None:
        export_transformers_retrieval(model, directory)
        return
    hf, tok = to_transformers(model)
    family = "InstructBlipVideo" if cfg.video else "InstructBlip" if cfg.instruction_aware else "Blip2"
    q = cfg.qformer.num_query_tokens
    with atomic_dir(directory) as tmp:
        hf.save_pretrained(str(tmp))
        if family == "Blip2":
            processor = transformers.Blip2Processor(image_processor=_image_processor(model), tokenizer=tok,
                                                    num_query_tokens=q)
        elif family == "InstructBlip":
            processor = transformers.InstructBlipProcessor(image_processor=_image_processor(model), tokenizer=tok,
                                                           qformer_tokenizer=model.tokenizer, num_query_tokens=q)
        else:
            vcfg = cfg.vision
            video_processor = transformers.InstructBlipVideoVideoProcessor(
                size={"height": vcfg.image_size, "width": vcfg.image_size}, image_mean=list(vcfg.mean),
                image_std=list(vcfg.std), resample=3)
            processor = transformers.InstructBlipVideoProcessor(video_processor=video_processor, tokenizer=tok,
                                                                qformer_tokenizer=model.tokenizer, num_query_tokens=q)
        processor.save_pretrained(str(tmp))
        if cfg.instruction_aware:  # the hub layout: the Q-Former's tokenizer in its own folder
            model.tokenizer.save_pretrained(str(tmp / QFORMER_TOKENIZER_DIR))


def to_transformers(model: Blip2Model):
    """``(transformers model, LLM tokenizer with the placeholder token)`` holding this model's
    weights in memory -- the same tensors, not copies, except the vision tower's fused q/k/v --
    on the model's device: what :func:`export_transformers` writes, without the disk round trip
    (the GPU benchmark runs both libraries on one set of multi-GB weights this way)."""
    import transformers
    from transformers import GenerationConfig

    cfg = model.config
    if cfg.llm is None:
        raise CheckpointError("a model without an LLM has no transformers generation class; see export_transformers")
    if cfg.llm.quantization is not None:
        raise CheckpointError("a quantised LLM cannot be exported; load the model with llm_quantization=None first")
    if cfg.video and not cfg.instruction_aware:
        raise CheckpointError("transformers' video class (InstructBlipVideo) has an instruction-aware Q-Former; "
                              "this model's Q-Former reads no instruction")
    if cfg.instruction_aware and model.tokenizer is None:
        raise CheckpointError("an instruction-aware model needs its Q-Former tokenizer to be exported")
    vision_kwargs, vision_sd = _checked_vision(model)
    lm = base_llm(model.llm)
    eos = end_of_text_ids(model.llm_tokenizer, cfg.llm, encoder_decoder=is_encoder_decoder(model.llm))
    tok = copy.deepcopy(model.llm_tokenizer)
    family = "InstructBlipVideo" if cfg.video else "InstructBlip" if cfg.instruction_aware else "Blip2"
    placeholder = ("<video>", "video_token_index") if family == "InstructBlipVideo" else (IMAGE_TOKEN, "image_token_index")
    token_id = _placeholder_token(model, tok, placeholder[0])
    qformer_kwargs = _qformer_config_for_hf(model, text_input=False)
    if family != "Blip2":
        del qformer_kwargs["use_qformer_text_input"]  # InstructBLIP's Q-Former always reads text
    hf_config = getattr(transformers, f"{family}Config")(
        vision_config=vision_kwargs,
        qformer_config=qformer_kwargs,
        text_config={**lm.config.to_dict(), "eos_token_id": eos[0] if len(eos) == 1 else eos},
        num_query_tokens=cfg.qformer.num_query_tokens,
        **{placeholder[1]: token_id},
    )
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith(("llm.", VISION_PREFIX))}
    # transformers' classes hold no stage-1 heads; InstructBLIP's Q-Former keeps its text-input parts
    ours = {k: v for k, v in ours.items() if not is_stage1_only(k) or (cfg.instruction_aware and is_text_input(k))}
    sd = ours_to_instructblip(ours) if cfg.instruction_aware else ours_to_hf_retrieval(ours, vision_prefix=VISION_PREFIX)
    sd.update({"vision_model." + k: v for k, v in vision_sd.items()})
    sd.update({"language_model." + k: v for k, v in _merged_llm_state_dict(model).items()})
    hf = _assign(getattr(transformers, f"{family}ForConditionalGeneration"), hf_config, sd)
    hf.generation_config = GenerationConfig.from_model_config(hf_config.text_config)
    hf.generation_config.eos_token_id = eos[0] if len(eos) == 1 else eos
    return hf.to(model.device), tok  # buffers transformers built outside the weights come along


__all__ = ["IMAGE_TOKEN", "export_transformers", "export_transformers_retrieval", "to_transformers"]
