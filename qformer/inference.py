"""Scores from raw images and strings: ITC similarity, ITM match probability, features.

The feature methods of :class:`~qformer.model.Blip2Model` take tensors; these take what a user
holds (PIL images, paths, preprocessed tensors; strings), preprocess and tokenise them, and run
the same methods under ``no_grad``, a batch at a time. :class:`qformer.Blip2` exposes them as
methods (``model.similarity(images, texts)``, ``model.itm(images, texts)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .generation import as_list
from .images import ImageInput
from .losses import similarity_matrix
from .med import expand_kv
from .model import Blip2Model

if TYPE_CHECKING:  # pragma: no cover
    from transformers import BatchEncoding


def encode_texts(model: Blip2Model, texts: Sequence[str]) -> "BatchEncoding":
    """``texts`` through the model's Q-Former tokenizer (padded, ``max_txt_len``), on the CPU; the
    encoding keeps the word / character maps (:mod:`qformer.explain` masks words with them)."""
    if model.tokenizer is None:
        raise ValueError("this model has no Q-Former tokenizer; build it with Blip2(config, tokenizer=...)")
    return model.tokenizer(
        list(texts), padding=True, truncation=True, max_length=model.config.max_txt_len, return_tensors="pt"
    )


def tokenize(model: Blip2Model, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of ``texts`` with the model's Q-Former tokenizer, on its device."""
    enc = encode_texts(model, texts)
    return enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)


@torch.no_grad()
def image_features_of(model: Blip2Model, images: ImageInput, *, batch_size: int = 64) -> torch.Tensor:
    """(N, Q, E) normalised query embeddings of raw images."""
    pixels = model.vision.preprocess(images).to(model.device)
    out = []
    for chunk in pixels.split(batch_size):
        out.append(model.image_features(model.encode_image(model.embed_image(chunk)).query_output))
    return torch.cat(out)


@torch.no_grad()
def text_features_of(model: Blip2Model, texts: str | Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
    """(N, E) normalised text embeddings of raw strings."""
    texts = as_list(texts)
    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask = tokenize(model, texts[start : start + batch_size])
        out.append(model.text_features(model.encode_text(ids, mask, cls_only=True)))
    return torch.cat(out)


@torch.no_grad()
def similarity(model: Blip2Model, images: ImageInput, texts: str | Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
    """(N_images, N_texts) ITC similarity: cosine, max over queries, no temperature (as
    transformers' ``Blip2ForImageTextRetrieval``)."""
    return similarity_matrix(image_features_of(model, images, batch_size=batch_size),
                             text_features_of(model, texts, batch_size=batch_size))


@torch.no_grad()
def itm(model: Blip2Model, images: ImageInput, texts: str | Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
    """Probability that each (image, text) pair matches, shape (N,).

    ``images`` and ``texts`` are paired in order; a single image or a single text is
    broadcast against the other side.
    """
    pixels = model.vision.preprocess(images).to(model.device)
    texts = as_list(texts)
    n_img, n_txt = pixels.shape[0], len(texts)
    if n_img != n_txt and 1 not in (n_img, n_txt):
        raise ValueError(f"itm pairs images with texts: got {n_img} images and {n_txt} texts")
    n = max(n_img, n_txt)
    # One image against many texts: its cross-attention K/V are computed once.
    single_kv = model.image_kv(model.embed_image(pixels)) if n_img == 1 else None
    probs = []
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        ids, mask = tokenize(model, texts[start:stop] if n_txt > 1 else texts * (stop - start))
        if single_kv is not None:
            kv = expand_kv(single_kv, stop - start)
        else:
            kv = model.image_kv(model.embed_image(pixels[start:stop]))
        probs.append(model.itm_logits(ids, mask, kv).float().softmax(dim=-1)[:, 1])
    return torch.cat(probs)


__all__ = ["encode_texts", "image_features_of", "itm", "similarity", "text_features_of", "tokenize"]
