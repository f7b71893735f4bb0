"""Text from images: the frozen LLM generates after the projected queries and a text prompt.

* :func:`generation_inputs` builds the ``inputs_embeds`` that the LLM's ``generate`` starts
  from: soft prompts then each text prompt, padded on the side each LLM family needs (left for
  decoder-only, so every row ends in real tokens; right for encoder inputs).
* :func:`generate` runs transformers' ``generate`` with LAVIS's defaults (beam 5, up to 30 new
  tokens) and stops where the checkpoint says (:func:`qformer.llm.end_of_text_ids`).
* :func:`caption` and :func:`answer` are BLIP-2's captioning and zero-shot VQA prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .config import ConfigError
from .images import ImageInput
from .llm import end_of_text_ids, input_embeddings, is_encoder_decoder
from .model import Blip2Model

# BLIP-2's zero-shot VQA prompts.
VQA_PROMPT_CAUSAL = "Question: {} Answer:"
VQA_PROMPT_SEQ2SEQ = "Question: {} Short answer:"


def vqa_template(model: Blip2Model) -> str:
    """BLIP-2's zero-shot VQA prompt for the model's LLM kind."""
    return VQA_PROMPT_SEQ2SEQ if is_encoder_decoder(model.llm) else VQA_PROMPT_CAUSAL


def as_list(x: Any) -> list:
    """One item or a list/tuple of items -> a list (a string is one item)."""
    if isinstance(x, (str, bytes)) or not isinstance(x, (list, tuple)):
        return [x]
    return list(x)


def _require_llm(model: Blip2Model) -> None:
    if model.config.llm is None:
        raise ConfigError("this is a stage-1 model: generation needs an LLM (config.llm)")


def generation_inputs(model: Blip2Model, image_embeds: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """``inputs_embeds`` / ``attention_mask`` for ``llm.generate``: soft prompts then each text
    prompt. Decoder-only LLMs are LEFT padded (so every row ends in real tokens); encoder inputs
    are right padded."""
    tok = model.llm_tokenizer
    soft = model.soft_prompts(image_embeds)  # (B, Q, H)
    b, q, h = soft.shape
    ids = [tok(p).input_ids for p in prompts]  # BOS / </s> as the tokenizer adds them
    longest = max(len(x) for x in ids)
    embeds = soft.new_zeros(b, q + longest, h)
    mask = torch.zeros(b, q + longest, dtype=torch.long, device=soft.device)
    left = not is_encoder_decoder(model.llm)
    for i, row in enumerate(ids):
        n = q + len(row)
        start = q + longest - n if left else 0
        text = input_embeddings(model.llm, torch.tensor([row], device=soft.device))[0] if row else soft.new_zeros(0, h)
        embeds[i, start : start + n] = torch.cat([soft[i], text.to(soft.dtype)])
        mask[i, start : start + n] = 1
    return dict(inputs_embeds=embeds, attention_mask=mask)


@torch.no_grad()
def generate(
    model: Blip2Model,
    images: ImageInput | None = None,
    prompt: str | Sequence[str] | None = None,
    *,
    vision_features: torch.Tensor | None = None,
    num_beams: int = 5,
    max_new_tokens: int = 30,
    min_new_tokens: int = 1,
    do_sample: bool = False,
    top_p: float = 0.9,
    temperature: float = 1.0,
    num_captions: int = 1,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    batch_size: int = 32,
    **generate_kwargs: Any,
) -> list[str]:
    """Text for each image (``num_captions`` per image, image-major), from the LLM conditioned
    on the soft prompts and the text ``prompt`` (one for all, or one per image; default
    ``config.llm.prompt``). Defaults are LAVIS's: beam 5, up to 30 new tokens.
    ``do_sample=True`` is nucleus sampling (``top_p``, ``temperature``), one beam.
    ``vision_features`` (N, T, C): the frozen tower's output instead of ``images``.
    Other keyword arguments go to transformers' ``generate``."""
    _require_llm(model)
    if vision_features is None:
        pixels = model.vision.preprocess(images).to(model.device)
        n = pixels.shape[0]
    else:
        n = vision_features.shape[0]
    prompts = [prompt] * n if prompt is None or isinstance(prompt, str) else list(prompt)
    prompts = [model.config.llm.prompt if p is None else p for p in prompts]
    if len(prompts) != n:
        raise ValueError(f"got {n} images but {len(prompts)} prompts")
    tok = model.llm_tokenizer
    eos = end_of_text_ids(tok, model.config.llm, encoder_decoder=is_encoder_decoder(model.llm))
    options = dict(
        num_beams=1 if do_sample else num_beams,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        do_sample=do_sample,
        num_return_sequences=num_captions,
        repetition_penalty=repetition_penalty,
        length_penalty=length_penalty,
        eos_token_id=eos[0] if len(eos) == 1 else eos,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos[0],
    )
    if do_sample:
        options.update(top_p=top_p, temperature=temperature)
    options.update(generate_kwargs)
    texts: list[str] = []
    for start in range(0, n, batch_size):
        if vision_features is None:
            embeds = model.embed_image(pixels[start : start + batch_size])
        else:
            embeds = model.embed_image(vision_features=vision_features[start : start + batch_size].to(model.device))
        inputs = generation_inputs(model, embeds, prompts[start : start + batch_size])
        out = model.llm.generate(**inputs, **options)
        texts.extend(t.strip() for t in tok.batch_decode(out, skip_special_tokens=True))
    return texts


@torch.no_grad()
def caption(model: Blip2Model, images: ImageInput, **generate_options: Any) -> list[str]:
    """Captions with the training prompt (``config.llm.prompt``); see :func:`generate`."""
    return generate(model, images, None, **generate_options)


@torch.no_grad()
def answer(
    model: Blip2Model,
    images: ImageInput,
    questions: str | Sequence[str],
    *,
    template: str | None = None,
    num_beams: int = 5,
    max_new_tokens: int = 10,
    length_penalty: float = -1.0,
    **generate_options: Any,
) -> list[str]:
    """Zero-shot VQA as BLIP-2: "Question: {} Answer:" (causal LMs) or "Question: {} Short
    answer:" (seq2seq), beam 5, at most 10 new tokens, length penalty -1. One image may be
    asked several questions."""
    _require_llm(model)
    questions = as_list(questions)
    template = template if template is not None else vqa_template(model)
    pixels = model.vision.preprocess(images)
    if pixels.shape[0] == 1 and len(questions) > 1:
        pixels = pixels.expand(len(questions), -1, -1, -1)
    return generate(
        model,
        pixels,
        [template.format(q) for q in questions],
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        length_penalty=length_penalty,
        **generate_options,
    )


__all__ = [
    "VQA_PROMPT_CAUSAL",
    "VQA_PROMPT_SEQ2SEQ",
    "answer",
    "as_list",
    "caption",
    "generate",
    "generation_inputs",
    "vqa_template",
]
