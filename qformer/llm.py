"""The frozen LLM of stage 2: loading (bf16/fp16/fp32, 8-bit or 4-bit through bitsandbytes,
optional LoRA through peft) and the few operations BLIP-2 needs from it.

Any transformers causal LM (OPT, GPT-2, LLaMA, Qwen, ...) or seq2seq LM (T5 / FlanT5, BART,
...) works: the soft prompts are passed as ``inputs_embeds``. For causal LMs the vocabulary
logits are computed only at positions that have a label (never over the query slots or the
prompt), through the model's own base model and output head. LLMs loaded here get
:class:`VocabHead` as their output head: the same weights, with a faster CPU path for the few
rows of a decoding step.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .config import ConfigError, LLMConfig, torch_dtype


def _quantization_config(cfg: LLMConfig):
    if cfg.quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4" if cfg.quantization == "4bit" else "fp4",
        bnb_4bit_compute_dtype=compute,
    )


def auto_class(hf_config) -> type:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if getattr(hf_config, "is_encoder_decoder", False) else AutoModelForCausalLM


class VocabHead(nn.Linear):
    """The LLM's output head (``nn.Linear`` over the vocabulary) with a faster CPU decode path.

    For a vocabulary-sized fp32 weight and the handful of rows a decoding step has (batch x
    beams), MKL computes ``x @ W.T`` markedly slower than the same product taken as
    ``(W @ x.T).T`` (the figures are in benchmarks/README.md, "Generation"). That path is used
    only where it was measured to win -- CPU, fp32, at most :attr:`FAST_ROWS` rows, no
    autograd -- and computes the same fp32 products (rounding differs from ``F.linear`` at the
    1e-7 relative level). Training, bf16/fp16, GPUs and long prompts take ``nn.Linear``'s path.
    Parameters and state-dict keys are ``nn.Linear``'s (tied weights stay tied).
    """

    FAST_ROWS = 128

    @classmethod
    def from_linear(cls, head: nn.Linear) -> VocabHead:
        new = cls(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
        new.weight = head.weight  # the same Parameter: ties to the input embeddings survive
        new.bias = head.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and 0 < rows <= self.FAST_ROWS
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        ):
            flat = x.reshape(rows, x.shape[-1])  # (N, D)
            out = torch.mm(self.weight, flat.t()).t()  # (N, V), computed as (V, D) @ (D, N)
            if self.bias is not None:
                out = out + self.bias
            return out.contiguous().view(*x.shape[:-1], self.out_features)
        return super().forward(x)


def use_vocab_head(model: nn.Module, *, min_vocab: int = 8192) -> bool:
    """Give a transformers LM the :class:`VocabHead` (through ``set_output_embeddings``).

    Only a plain ``nn.Linear`` head over at least ``min_vocab`` outputs is replaced (quantised,
    LoRA-wrapped or custom heads are left alone); returns whether it was.
    """
    get, put = getattr(model, "get_output_embeddings", None), getattr(model, "set_output_embeddings", None)
    if not (callable(get) and callable(put)):
        return False
    head = get()
    if type(head) is not nn.Linear or head.out_features < min_vocab:
        return False
    put(VocabHead.from_linear(head))
    return True


def hf_config_of(cfg: LLMConfig):
    """The transformers config of the LLM (from ``hf_config`` or the checkpoint's config)."""
    from transformers import AutoConfig

    if cfg.hf_config is not None:
        data = dict(cfg.hf_config)
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise ConfigError("llm.hf_config needs a 'model_type' (e.g. 'opt', 't5', 'llama')")
        return AutoConfig.for_model(model_type, **data)
    return AutoConfig.from_pretrained(cfg.path, trust_remote_code=False)


def load_llm(cfg: LLMConfig, *, path: str | None = None) -> nn.Module:
    """Build or load the frozen LLM. ``path`` overrides ``cfg.path`` (a saved copy)."""
    source = path or cfg.path
    dtype = torch_dtype(cfg.dtype)
    quant = _quantization_config(cfg)
    if source is not None:
        hf_config = hf_config_of(LLMConfig(path=source))
        kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=False)
        if quant is not None:
            kwargs["quantization_config"] = quant
        model = auto_class(hf_config).from_pretrained(source, **kwargs)
    else:
        hf_config = hf_config_of(cfg)
        if quant is not None:
            raise ConfigError("llm.quantization needs weights to quantise: set llm.path, not llm.hf_config")
        model = auto_class(hf_config).from_config(hf_config, dtype=dtype)
    model.requires_grad_(False)
    model.eval()
    use_vocab_head(model)
    if cfg.lora is not None:
        model = add_lora(model, cfg.lora, quantized=quant is not None)
    return model


def add_lora(model: nn.Module, lora: dict[str, Any], *, quantized: bool = False) -> nn.Module:
    """Wrap a frozen LLM with fresh LoRA adapters (peft ``LoraConfig`` fields); only they train."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if hasattr(model, "peft_config"):
        raise ConfigError("this LLM already has LoRA adapters")
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model.requires_grad_(False)
    lora = dict(lora)
    lora.setdefault("task_type", "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM")
    return get_peft_model(model, LoraConfig(**lora))


def base_llm(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (LoRA layers stay injected)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(base_llm(model).config, "is_encoder_decoder", False))


def input_embeddings(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return base_llm(model).get_input_embeddings()(input_ids)


def input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the LLM's input embeddings (what soft prompts are cast to)."""
    return base_llm(model).get_input_embeddings().weight.dtype


def load_llm_tokenizer(cfg: LLMConfig | None = None, path: str | os.PathLike | None = None):
    """The LLM's tokenizer from ``path`` or ``cfg.path`` (never ``trust_remote_code``)."""
    source = path or (cfg.path if cfg is not None else None)
    if source is None:
        raise ConfigError("an LLM built from llm.hf_config needs its tokenizer: pass Blip2(config, llm_tokenizer=...)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)


def end_of_text_ids(tokenizer, cfg: LLMConfig, *, encoder_decoder: bool = False) -> list[int]:
    """The token id(s) that end a generated text.

    In order: ``cfg.eos_token_id`` (what a loaded checkpoint says: transformers' generation
    config or text config); for a causal LM, the single token of ``cfg.end_of_text`` (OPT's
    "\\n" in BLIP-2's own training); else the tokenizer's eos token (a seq2seq decoder's
    target always ends with it)."""
    if cfg.eos_token_id is not None:
        ids = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
        return [int(i) for i in ids]
    if cfg.end_of_text is None or encoder_decoder:
        if tokenizer.eos_token_id is None:
            raise ConfigError("the LLM tokenizer has no eos token: set llm.end_of_text or llm.eos_token_id")
        return [tokenizer.eos_token_id]
    ids = tokenizer(cfg.end_of_text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ConfigError(
            f"llm.end_of_text={cfg.end_of_text!r} is {len(ids)} tokens for this LLM's tokenizer ({ids}); it must be one "
            "token to end generation. Set llm.end_of_text: null to end texts with the tokenizer's eos token "
            f"({tokenizer.eos_token!r}), or llm.eos_token_id to the id(s) that end them"
        )
    return ids


def checkpoint_eos_ids(text_config: dict | None, generation_config: dict | None = None) -> list[int] | None:
    """The eos id(s) a transformers BLIP-2 checkpoint generates until: its text config's
    ``eos_token_id`` (``Blip2ForConditionalGeneration.generate`` runs the language model's own
    generation config, which is built from it), else the checkpoint's generation config's;
    None when neither says."""
    for source in (text_config or {}, generation_config or {}):
        eos = source.get("eos_token_id")
        if eos is not None:
            return [int(i) for i in eos] if isinstance(eos, list) else [int(eos)]
    return None


def hidden_size(model: nn.Module) -> int:
    cfg = base_llm(model).config
    for name in ("hidden_size", "d_model", "n_embd"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name))
    return base_llm(model).get_input_embeddings().embedding_dim


def causal_logits_at(
    model: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Vocabulary logits (N, V) of a causal LM at ``positions`` (B, L) bool only.

    Runs the base model once over the whole sequence, then the output head only on the N
    selected hidden states: the (B, L, V) logits over soft prompts, prompts and padding are
    never materialised. Final-logit soft-capping and logit scaling (Gemma-2, Cohere) are
    applied as the models' own heads do.
    """
    lm = base_llm(model)
    hidden = lm.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
    logits = lm.get_output_embeddings()(hidden[positions])  # (N, V)
    cfg = lm.config
    scale = getattr(cfg, "logit_scale", None)
    if isinstance(scale, (int, float)):
        logits = logits * scale
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


__all__ = [
    "base_llm",
    "causal_logits_at",
    "hf_config_of",
    "hidden_size",
    "checkpoint_eos_ids",
    "end_of_text_ids",
    "input_dtype",
    "input_embeddings",
    "is_encoder_decoder",
    "load_llm",
    "load_llm_tokenizer",
    "use_vocab_head",
    "VocabHead",
]
