"""transformers BLIP-2 directories: ``Blip2ForImageTextRetrieval`` (stage-1 heads, no LLM) and
``Blip2ForConditionalGeneration`` (the layout of Salesforce/blip2-opt-* and blip2-flan-t5-*).

A checkpoint loaded from transformers stops generating where transformers stops: its own
``eos_token_id`` (its text config's, which the language model generates with; else its
generation config's) becomes ``llm.eos_token_id``; "\\n" is BLIP-2's OPT convention only where
the checkpoint says so (Salesforce's OPT configs do).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig, torch_dtype
from ..errors import CheckpointError
from ..io import atomic_dir, cache_root
from ..llm import auto_class, checkpoint_eos_ids, hf_config_of, use_vocab_head
from ..weights import read_hf_weights
from .common import VISION_PREFIX, LoadOptions, frozen_llm_keys, llm_tokenizer, override_llm, qformer_tokenizer, read_json
from .keymaps import hf_retrieval_to_ours
from .report import LoadReport, load_into, summarise

if TYPE_CHECKING:  # pragma: no cover
    from ..model import Blip2Model


def is_hf_blip2(meta: dict) -> bool:
    return meta.get("model_type") == "blip-2"


def is_generation(meta: dict) -> bool:
    archs = meta.get("architectures") or []
    return "Blip2ForConditionalGeneration" in archs or ("text_config" in meta and "Blip2ForImageTextRetrieval" not in archs)


def hf_blip2_parts(meta: dict[str, Any], directory: Path | None) -> tuple[VisionConfig, QFormerConfig]:
    v = dict(meta["vision_config"])
    q = dict(meta["qformer_config"])
    mean, std = None, None
    if directory is not None and (directory / "preprocessor_config.json").is_file():
        pre = read_json(directory / "preprocessor_config.json")
        mean, std = pre.get("image_mean"), pre.get("image_std")
    vision_kwargs = {k: v[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
        "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout", "qkv_bias", "initializer_range",
    ) if k in v}
    vision = VisionConfig(
        backend="hf",
        name="blip_2_vision_model",
        model_kwargs=vision_kwargs,
        feature_layer=-1,
        image_size=v.get("image_size", 224),
        **({"mean": tuple(mean), "std": tuple(std)} if mean and std else {}),
    )
    qformer = QFormerConfig(
        vocab_size=q.get("vocab_size", 30522),
        hidden_size=q.get("hidden_size", 768),
        num_layers=q.get("num_hidden_layers", 12),
        num_heads=q.get("num_attention_heads", 12),
        intermediate_size=q.get("intermediate_size", 3072),
        hidden_act=q.get("hidden_act", "gelu"),
        hidden_dropout=q.get("hidden_dropout_prob", 0.1),
        attention_dropout=q.get("attention_probs_dropout_prob", 0.1),
        max_position_embeddings=q.get("max_position_embeddings", 512),
        layer_norm_eps=q.get("layer_norm_eps", 1e-12),
        pad_token_id=q["pad_token_id"] if q.get("pad_token_id") is not None else 0,
        initializer_range=q.get("initializer_range", 0.02),
        cross_attention_freq=q.get("cross_attention_frequency", 2),
        encoder_width=q.get("encoder_hidden_size", v.get("hidden_size", 1408)),
        num_query_tokens=meta.get("num_query_tokens", 32),
        text_input=bool(q.get("use_qformer_text_input", False)),
    )
    return vision, qformer


def llm_config_from_hf(meta: dict[str, Any], directory: Path | None) -> LLMConfig:
    """The frozen LLM of a transformers BLIP-2 / InstructBLIP config: its ``text_config``, and where
    generation stops (its text config's eos, else ``directory``'s ``generation_config.json``)."""
    text = {k: v for k, v in meta["text_config"].items() if not k.startswith("_") and k != "transformers_version"}
    generation = None
    if directory is not None and (directory / "generation_config.json").is_file():
        generation = read_json(directory / "generation_config.json")
    eos = checkpoint_eos_ids(text, generation)
    return LLMConfig(hf_config=text, dtype="bfloat16", end_of_text=None,
                     eos_token_id=None if eos is None else (eos[0] if len(eos) == 1 else eos))


def blip2_config_from_hf(meta: dict[str, Any], directory: Path | None = None) -> Blip2Config:
    """Our config equivalent to a transformers ``Blip2Config`` dict (retrieval or generation).
    With ``directory``, its ``generation_config.json`` says where generation stops."""
    vision, qformer = hf_blip2_parts(meta, directory)
    llm = None
    if meta.get("text_config") is not None and (
        "Blip2ForConditionalGeneration" in (meta.get("architectures") or []) or not qformer.text_input
    ):
        llm = llm_config_from_hf(meta, directory)
    retrieval = llm is None
    if retrieval:
        qformer.text_input = True
    return Blip2Config(
        vision=vision,
        qformer=qformer,
        llm=llm,
        stage1_heads=retrieval,
        embed_dim=meta.get("image_text_hidden_size", 256),
        ln_vision_eps=vision.model_kwargs.get("layer_norm_eps", 1e-6),
    )


def adopt_end_of_text(llm: LLMConfig, tokenizer) -> None:
    """Training appends ``llm.end_of_text`` to captions: make it the text of the checkpoint's
    eos token when that differs from the tokenizer's own eos (OPT BLIP-2: "\\n"), so training
    and generation agree on where a caption ends."""
    if tokenizer is None or llm.eos_token_id is None:
        return
    eos = llm.eos_token_id if isinstance(llm.eos_token_id, int) else llm.eos_token_id[0]
    if eos == tokenizer.eos_token_id:
        return
    text = tokenizer.decode([eos])
    if text and tokenizer(text, add_special_tokens=False).input_ids == [eos]:
        llm.end_of_text = text


def load_hf_retrieval(cls, path: Path, meta: dict, opts: LoadOptions) -> tuple["Blip2Model", LoadReport]:
    config = blip2_config_from_hf(meta, path)
    model = cls(config, tokenizer=qformer_tokenizer(opts.tokenizer, path))
    converted = hf_retrieval_to_ours(read_hf_weights(path), vision_prefix=VISION_PREFIX)
    fresh_ok = {
        "temp": "transformers' retrieval model has no temperature; set to temp_init",
        "qformer.lm_head.": "transformers' retrieval model has no LM head; needed only for ITG training",
    }
    report = load_into(model, converted, source=str(path), strict=opts.strict, fresh_ok=fresh_ok)
    return model, report


def build_llm_from_state_dict(llm_config: LLMConfig, sd: dict[str, torch.Tensor], *, source: str):
    """A frozen LLM from a config and a state dict, without a random initialisation first
    (parameters start on the meta device and are assigned the checkpoint's tensors)."""
    from accelerate import init_empty_weights

    hf_config = hf_config_of(llm_config)
    dtype = torch_dtype(llm_config.dtype)
    with init_empty_weights():
        model = auto_class(hf_config).from_config(hf_config, dtype=dtype)
    own = model.state_dict()
    unexpected = sorted(set(sd) - set(own))
    if unexpected:
        raise CheckpointError(f"{source}: LLM weights with no place in {type(model).__name__}: {summarise(unexpected)}")
    bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd if sd[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{source}: LLM weight shapes do not match its config:\n  " + "\n  ".join(bad))
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False, assign=True)
    # Tie only what the checkpoint leaves out: FlanT5 stores an lm_head that differs from its
    # input embeddings even though transformers 5 configures T5 as tied (its own loader keeps
    # such a head untied too).
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if isinstance(tied, dict):
        for target, tied_to in tied.items():
            if target not in sd and tied_to in sd:
                owner, _, leaf = target.rpartition(".")
                setattr(model.get_submodule(owner) if owner else model, leaf, model.get_parameter(tied_to))
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{source}: LLM weights missing from the checkpoint: {summarise(still_meta)}")
    model.requires_grad_(False)
    use_vocab_head(model)
    return model.eval()


def extract_llm(path: Path, llm_config: LLMConfig, llm_sd: dict[str, torch.Tensor]) -> str:
    """Write the LLM of a BLIP-2 directory out once (cached by content), for bitsandbytes,
    which quantises only while loading from a transformers directory."""
    digest = hashlib.sha256()
    for name in sorted(llm_sd)[:8]:
        digest.update(name.encode())
        digest.update(llm_sd[name].flatten()[:64].float().numpy().tobytes())
    target = cache_root() / "extracted-llm" / f"{path.name}-{digest.hexdigest()[:16]}"
    if not (target / "config.json").is_file():
        with atomic_dir(target) as tmp:
            llm = build_llm_from_state_dict(LLMConfig(hf_config=llm_config.hf_config, dtype=llm_config.dtype), llm_sd,
                                            source=str(path))
            llm.save_pretrained(str(tmp))
    return str(target)


def load_generation_model(
    cls, path: Path, config: Blip2Config, opts: LoadOptions, *, tokenizer: Any, convert
) -> tuple["Blip2Model", LoadReport]:
    """A transformers generation directory (BLIP-2 or InstructBLIP) into ``cls``: the frozen LLM
    built from its ``language_model.*`` weights (or written out for bitsandbytes when quantised),
    its tokenizer and end of text, then the rest through ``convert`` (a key map to ours), strictly."""
    override_llm(config, opts)
    sd = read_hf_weights(path)
    llm_sd = {k[len("language_model."):]: v for k, v in sd.items() if k.startswith("language_model.")}
    if not llm_sd:
        raise CheckpointError(f"{path}: no language_model.* weights")
    if config.llm.quantization is not None:
        config.llm.path = extract_llm(path, config.llm, llm_sd)
        config.llm.hf_config = None
        llm = None
    else:
        llm = build_llm_from_state_dict(config.llm, llm_sd, source=str(path))
    tok = llm_tokenizer(opts.llm_tokenizer, path)
    adopt_end_of_text(config.llm, tok)
    model = cls(config, tokenizer=tokenizer, llm_tokenizer=tok, llm=llm)
    converted = convert({k: v for k, v in sd.items() if not k.startswith("language_model.")})
    elsewhere = {k: f"frozen LLM from {path} (language_model.*)" for k in frozen_llm_keys(model)}
    report = load_into(model, converted, source=str(path), strict=opts.strict, elsewhere=elsewhere)
    return model, report


def load_hf_generation(cls, path: Path, meta: dict, opts: LoadOptions) -> tuple["Blip2Model", LoadReport]:
    """transformers ``Blip2ForConditionalGeneration`` (Salesforce/blip2-opt-*, blip2-flan-t5-*)."""
    config = blip2_config_from_hf(meta, path)
    if config.llm is None:
        raise CheckpointError(f"{path}: a Blip2ForConditionalGeneration config without text_config")
    return load_generation_model(cls, path, config, opts, tokenizer=None,
                                 convert=lambda sd: hf_retrieval_to_ours(sd, vision_prefix=VISION_PREFIX))


__all__ = [
    "adopt_end_of_text",
    "extract_llm",
    "hf_blip2_parts",
    "llm_config_from_hf",
    "blip2_config_from_hf",
    "build_llm_from_state_dict",
    "is_generation",
    "is_hf_blip2",
    "load_generation_model",
    "load_hf_generation",
    "load_hf_retrieval",
]
