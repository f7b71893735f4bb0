"""Text from images: the frozen LLM generates after the projected queries and a text prompt.

* :func:`generation_inputs` builds the ``inputs_embeds`` that the LLM's ``generate`` starts
  from: soft prompts then each text prompt, padded on the side each LLM family needs (left for
  decoder-only, so every row ends in real tokens; right for encoder inputs).
* :func:`generate` runs transformers' ``generate`` with LAVIS's defaults (beam 5, up to 30 new
  tokens) and stops where the checkpoint says (:func:`qformer.llm.end_of_text_ids`).
* :func:`caption` and :func:`answer` are BLIP-2's captioning and zero-shot VQA prompts.

An instruction-aware model (InstructBLIP) reads each text prompt twice, as transformers'
processor feeds it: in the Q-Former beside the queries, and in the LLM after the soft prompts.
Video clips (``videos=``) give T x Q soft prompts each, frame by frame (InstructBlipVideo).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .config import ConfigError
from .images import ImageInput
from .llm import end_of_text_ids, input_embeddings, is_encoder_decoder
from .model import Blip2Model
from .tokenizer import instruction_tokens
from .video import VideoInput, preprocess_videos

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


def instruction_inputs(model: Blip2Model, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """An instruction-aware model's Q-Former tokens of ``prompts`` (empty for other models)."""
    if not model.config.instruction_aware:
        return {}
    if model.tokenizer is None:
        raise ConfigError("this instruction-aware model has no Q-Former tokenizer to read the instruction with")
    toks = instruction_tokens(model.tokenizer, list(prompts), max_length=model.config.instruction_tokens)
    return {k: v.to(model.device) for k, v in toks.items()}


def clip_soft_prompts(
    model: Blip2Model, image_embeds: torch.Tensor, lengths: Sequence[int], prompts: Sequence[str]
) -> list[torch.Tensor]:
    """Soft prompts of clips whose frames are stacked in ``image_embeds`` (sum T_i, N, C), clip
    ``i`` having ``lengths[i]`` frames and the text prompt ``prompts[i]``: a list of
    (T_i * Q, H) tensors, each frame's Q projected query outputs in frame order. Images are
    clips of one frame."""
    toks = instruction_inputs(model, prompts)
    frames = torch.tensor(list(lengths), device=image_embeds.device)
    if toks:  # each frame reads its clip's instruction
        toks = {k: v.repeat_interleave(frames, dim=0) for k, v in toks.items()}
    soft = model.soft_prompts(image_embeds, instruction_ids=toks.get("qformer_input_ids"),
                              instruction_mask=toks.get("qformer_attention_mask"))  # (sum T, Q, H)
    return [clip.flatten(0, 1) for clip in soft.split(list(lengths))]


def generation_inputs(
    model: Blip2Model, soft_prompts: torch.Tensor | Sequence[torch.Tensor], prompts: Sequence[str]
) -> dict[str, torch.Tensor]:
    """``inputs_embeds`` / ``attention_mask`` for ``llm.generate``: each row's soft prompts
    ((B, S, H), or one (S_i, H) tensor per row: clips of different lengths) then its text
    prompt. Decoder-only LLMs are LEFT padded (so every row ends in real tokens, and a row's
    result does not depend on what it is batched with); encoder inputs are right padded."""
    tok = model.llm_tokenizer
    rows = list(soft_prompts.unbind(0)) if isinstance(soft_prompts, torch.Tensor) else list(soft_prompts)
    ids = [tok(p).input_ids for p in prompts]  # BOS / </s> as the tokenizer adds them
    b, h = len(rows), rows[0].shape[-1]
    lengths = [r.shape[0] + len(x) for r, x in zip(rows, ids)]
    longest = max(lengths)
    ref = rows[0]
    embeds = ref.new_zeros(b, longest, h)
    mask = torch.zeros(b, longest, dtype=torch.long, device=ref.device)
    left = not is_encoder_decoder(model.llm)
    for i, (soft, row) in enumerate(zip(rows, ids)):
        n = lengths[i]
        start = longest - n if left else 0
        text = input_embeddings(model.llm, torch.tensor([row], device=ref.device))[0] if row else ref.new_zeros(0, h)
        embeds[i, start : start + n] = torch.cat([soft, text.to(soft.dtype)])
        mask[i, start : start + n] = 1
    return dict(inputs_embeds=embeds, attention_mask=mask)


def _visual_inputs(
    model: Blip2Model, images: ImageInput | None, videos: VideoInput | None, vision_features: torch.Tensor | None
) -> tuple[list[torch.Tensor], bool]:
    """Per image or clip, its preprocessed frames ((T, 3, S, S); T = 1 for images) or its
    tower features ((T, N, C)), and whether they are features."""
    given = [x is not None for x in (images, videos, vision_features)]
    if sum(given) != 1:
        raise ValueError("pass exactly one of images=, videos= and vision_features=")
    if vision_features is not None:
        if vision_features.dim() == 3:  # (B, N, C) images
            return list(vision_features.unsqueeze(1).unbind(0)), True
        return list(vision_features.unbind(0)), True  # (B, T, N, C) clips
    if videos is not None:
        return preprocess_videos(videos, model.vision.preprocess, model.config.num_frames), False
    return list(model.vision.preprocess(images).unsqueeze(1).unbind(0)), False


@torch.no_grad()
def generate(
    model: Blip2Model,
    images: ImageInput | None = None,
    prompt: str | Sequence[str] | None = None,
    *,
    videos: VideoInput | None = None,
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
    """Text for each image or video clip (``num_captions`` each, input-major), from the LLM
    conditioned on the soft prompts and the text ``prompt`` (one for all, or one per input;
    default ``config.llm.prompt``). An instruction-aware model (InstructBLIP) also feeds each
    prompt to its Q-Former, as transformers' processor does. Defaults are LAVIS's: beam 5, up
    to 30 new tokens. ``do_sample=True`` is nucleus sampling (``top_p``, ``temperature``), one beam.

    ``videos``: a (B, T, 3, H, W) tensor or a list of clips (see :mod:`qformer.video`: tensors,
    frame lists, frame folders, video files sampled to ``config.num_frames``); each frame goes
    through the tower and the Q-Former and the clip's T x Q outputs are its soft prompt. Clips
    of different lengths may share a batch (each row is padded on its own).
    ``vision_features`` (B, N, C) or (B, T, N, C): the frozen tower's output instead.
    Other keyword arguments go to transformers' ``generate``."""
    _require_llm(model)
    inputs, are_features = _visual_inputs(model, images, videos, vision_features)
    n = len(inputs)
    prompts = [prompt] * n if prompt is None or isinstance(prompt, str) else list(prompt)
    prompts = [model.config.llm.prompt if p is None else p for p in prompts]
    if len(prompts) != n:
        raise ValueError(f"got {n} {'clips' if videos is not None else 'images'} but {len(prompts)} prompts")
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
        chunk = inputs[start : start + batch_size]
        stacked = torch.cat(chunk).to(model.device)  # (sum T, 3, S, S) or (sum T, N, C)
        embeds = model.embed_image(vision_features=stacked) if are_features else model.embed_image(stacked)
        soft = clip_soft_prompts(model, embeds, [x.shape[0] for x in chunk], prompts[start : start + batch_size])
        out = model.llm.generate(**generation_inputs(model, soft, prompts[start : start + batch_size]), **options)
        texts.extend(t.strip() for t in tok.batch_decode(out, skip_special_tokens=True))
    return texts


@torch.no_grad()
def caption(model: Blip2Model, images: ImageInput | None = None, *, videos: VideoInput | None = None,
            **generate_options: Any) -> list[str]:
    """Captions of images or video clips with the training prompt (``config.llm.prompt``); see
    :func:`generate`."""
    return generate(model, images, None, videos=videos, **generate_options)


@torch.no_grad()
def answer(
    model: Blip2Model,
    images: ImageInput | None,
    questions: str | Sequence[str],
    *,
    videos: VideoInput | None = None,
    template: str | None = None,
    num_beams: int = 5,
    max_new_tokens: int = 10,
    length_penalty: float = -1.0,
    **generate_options: Any,
) -> list[str]:
    """Zero-shot VQA as BLIP-2: "Question: {} Answer:" (causal LMs) or "Question: {} Short
    answer:" (seq2seq), beam 5, at most 10 new tokens, length penalty -1. One image (or clip,
    ``videos=``) may be asked several questions. An instruction-aware model's Q-Former reads
    the formatted question too."""
    _require_llm(model)
    questions = as_list(questions)
    template = template if template is not None else vqa_template(model)
    visual: dict[str, Any]
    if videos is not None:
        clips = preprocess_videos(videos, model.vision.preprocess, model.config.num_frames)
        if len(clips) == 1 and len(questions) > 1:
            clips = clips * len(questions)
        visual = dict(videos=clips)
    else:
        pixels = model.vision.preprocess(images)
        if pixels.shape[0] == 1 and len(questions) > 1:
            pixels = pixels.expand(len(questions), -1, -1, -1)
        visual = dict(images=pixels)
    return generate(
        model,
        prompt=[template.format(q) for q in questions],
        **visual,
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
    "clip_soft_prompts",
    "generate",
    "generation_inputs",
    "instruction_inputs",
    "vqa_template",
]
