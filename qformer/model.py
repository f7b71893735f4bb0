"""The BLIP-2 model: a frozen vision tower, the Q-Former (MED) and its stage-1 heads.

``forward`` and the ``encode_*`` methods return features; the stage-1 losses live in
:mod:`qformer.losses` and are orchestrated by :class:`qformer.stage1.Stage1Objective`.
The convenience API (:meth:`Blip2.itm`, :meth:`Blip2.similarity`) takes raw images and
strings; training code tokenises in the collator and calls the feature methods.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import Blip2Config, ConfigError
from .med import KV, MED
from .vision import VisionTower

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

    from .checkpoint import LoadReport

ImageInput = Any  # a PIL image, a path, a list of those, or a float tensor (B, 3, H, W)


@dataclass
class ImageEncoding:
    """Everything the stage-1 passes reuse about a batch of images."""

    image_embeds: torch.Tensor  # (B, N, C) ln_vision(ViT features)
    image_kv: list[KV | None]  # per Q-Former layer, cross-attention K/V of each image
    query_output: torch.Tensor  # (B, Q, D) queries after the query-only pass
    query_kv: list[KV] | None  # per layer, self-attention K/V of the queries (for ITG)


@dataclass
class Blip2Features:
    image: ImageEncoding
    image_feats: torch.Tensor  # (B, Q, E) normalised
    text_hidden: torch.Tensor  # (B, L, D) unimodal text encoder output
    text_feats: torch.Tensor  # (B, E) normalised [CLS] embedding


class Blip2(nn.Module):
    """BLIP-2 with a frozen vision tower and a trainable Q-Former.

    Build with ``Blip2(config, tokenizer=...)`` or load with :meth:`from_pretrained`.
    """

    def __init__(self, config: Blip2Config | None = None, *, tokenizer: "PreTrainedTokenizerBase | None" = None):
        super().__init__()
        config = config if config is not None else Blip2Config()
        self.config = config
        self.vision = VisionTower(config.vision)
        if self.vision.width != config.qformer.encoder_width:
            raise ConfigError(
                f"qformer.encoder_width={config.qformer.encoder_width} but the vision tower "
                f"{config.vision.name!r} produces {self.vision.width}-wide features; set them equal"
            )
        width, hidden = self.vision.width, config.qformer.hidden_size
        self.ln_vision = nn.LayerNorm(width, eps=config.ln_vision_eps)
        self.query_tokens = nn.Parameter(
            torch.empty(1, config.qformer.num_query_tokens, hidden).normal_(0.0, config.qformer.initializer_range)
        )
        self.qformer = MED(config.qformer)
        self.vision_proj = nn.Linear(hidden, config.embed_dim)
        self.text_proj = nn.Linear(hidden, config.embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.temp = nn.Parameter(torch.tensor(float(config.temp_init)))
        self.tokenizer = tokenizer
        if tokenizer is not None:
            check_tokenizer(tokenizer, config)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    # ------------------------------------------------------------------ features
    def embed_image(
        self, pixel_values: torch.Tensor | None = None, *, vision_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Frozen ViT then the trainable ``ln_vision``: (B, 3, H, W) -> (B, N, C) float32.

        ``vision_features`` (B, N, C): the tower's output computed earlier (e.g. read from a
        feature cache), used instead of running the tower.
        """
        if vision_features is None:
            if pixel_values is None:
                raise ValueError("embed_image needs pixel_values or vision_features")
            vision_features = self.vision(pixel_values)  # (B, N, C), no grad
        return self.ln_vision(vision_features.to(self.ln_vision.weight.dtype))

    def encode_image(self, image_embeds: torch.Tensor, *, return_kv: bool = False) -> ImageEncoding:
        """The query-only pass: queries attend to each other and cross-attend to the image."""
        image_kv = self.qformer.image_kv(image_embeds)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)  # (B, Q, D)
        out = self.qformer(query_embeds=queries, image_kv=image_kv, return_kv=return_kv)
        return ImageEncoding(image_embeds=image_embeds, image_kv=image_kv, query_output=out.hidden, query_kv=out.kv)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The unimodal text encoder: (B, L) -> (B, L, D), bidirectional, no image."""
        return self.qformer(input_ids=input_ids, attention_mask=attention_mask).hidden

    def image_features(self, query_output: torch.Tensor) -> torch.Tensor:
        """(B, Q, D) -> (B, Q, E), L2-normalised."""
        return F.normalize(self.vision_proj(query_output), dim=-1)

    def text_features(self, text_hidden: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, E): the normalised projection of the [CLS] output."""
        return F.normalize(self.text_proj(text_hidden[:, 0]), dim=-1)

    def itm_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_kv: list[KV | None]
    ) -> torch.Tensor:
        """The image-grounded encoder over N (text, image) pairs -> (N, 2) ITM logits.

        ``image_kv`` rows must be aligned with the texts (index :meth:`ImageEncoding.image_kv`
        rows to pair images with other texts). The head is averaged over the query outputs.
        """
        n, q = input_ids.shape[0], self.num_query_tokens
        queries = self.query_tokens.expand(n, -1, -1)
        mask = torch.cat([attention_mask.new_ones(n, q), attention_mask], dim=1)  # (N, Q+L)
        hidden = self.qformer(input_ids=input_ids, query_embeds=queries, attention_mask=mask, image_kv=image_kv).hidden
        return self.itm_head(hidden[:, :q]).mean(dim=1)  # (N, 2)

    def decode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_kv: list[KV]
    ) -> torch.Tensor:
        """The image-grounded causal decoder: text sees all queries (their K/V from the
        query-only pass) and earlier text -> (B, L, D) text hidden states."""
        b, q = input_ids.shape[0], self.num_query_tokens
        mask = torch.cat([attention_mask.new_ones(b, q), attention_mask], dim=1)  # (B, Q+L)
        return self.qformer(
            input_ids=input_ids, attention_mask=mask, causal=True, past_kv=query_kv, num_past_queries=q
        ).hidden

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        *,
        image_embeds: torch.Tensor | None = None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_query_kv: bool = False,
    ) -> Blip2Features:
        """ITC features of a batch of images and texts (plus the caches later passes reuse).

        Pass either ``pixel_values`` (B, 3, H, W) or precomputed ``image_embeds`` (B, N, C)
        (already through ``ln_vision``, e.g. from :meth:`embed_image`).
        """
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("Blip2.forward needs pixel_values or image_embeds")
            image_embeds = self.embed_image(pixel_values)
        image = self.encode_image(image_embeds, return_kv=return_query_kv)
        text_hidden = self.encode_text(input_ids, attention_mask)
        return Blip2Features(
            image=image,
            image_feats=self.image_features(image.query_output),
            text_hidden=text_hidden,
            text_feats=self.text_features(text_hidden),
        )

    # ------------------------------------------------------------------ training helpers
    def train(self, mode: bool = True) -> "Blip2":
        super().train(mode)
        self.vision.eval()  # frozen: dropout / drop-path always off
        return self

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def clamp_temperature_(self, low: float = 0.001, high: float = 0.5) -> None:
        """BLIP / ALBEF clamp the temperature after each step; LAVIS's BLIP-2 does not."""
        self.temp.clamp_(low, high)

    # ------------------------------------------------------------------ convenience API
    def _tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; build it with Blip2(config, tokenizer=...)")
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.config.max_txt_len, return_tensors="pt"
        )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _pixels(self, images: ImageInput) -> torch.Tensor:
        return self.vision.preprocess(images).to(self.device)

    @staticmethod
    def _as_list(x: Any) -> list:
        if isinstance(x, (str, os.PathLike)) or not isinstance(x, (list, tuple)):
            return [x]
        return list(x)

    @torch.no_grad()
    def similarity(self, images: ImageInput, texts: str | Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
        """(N_images, N_texts) ITC similarity: cosine, max over queries, no temperature
        (as transformers' ``Blip2ForImageTextRetrieval``)."""
        image_feats = self.image_features_of(images, batch_size=batch_size)
        text_feats = self.text_features_of(texts, batch_size=batch_size)
        from .losses import similarity_matrix

        return similarity_matrix(image_feats, text_feats)

    @torch.no_grad()
    def image_features_of(self, images: ImageInput, *, batch_size: int = 64) -> torch.Tensor:
        """(N, Q, E) normalised query embeddings of raw images."""
        pixels = self._pixels(images)
        out = []
        for chunk in pixels.split(batch_size):
            out.append(self.image_features(self.encode_image(self.embed_image(chunk)).query_output))
        return torch.cat(out)

    @torch.no_grad()
    def text_features_of(self, texts: str | Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
        """(N, E) normalised text embeddings of raw strings."""
        texts = self._as_list(texts)
        out = []
        for start in range(0, len(texts), batch_size):
            ids, mask = self._tokenize(texts[start : start + batch_size])
            out.append(self.text_features(self.encode_text(ids, mask)))
        return torch.cat(out)

    @torch.no_grad()
    def itm(self, images: ImageInput, texts: str | Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
        """Probability that each (image, text) pair matches, shape (N,).

        ``images`` and ``texts`` are paired in order; a single image or a single text is
        broadcast against the other side.
        """
        pixels = self._pixels(images)
        texts = self._as_list(texts)
        n_img, n_txt = pixels.shape[0], len(texts)
        if n_img != n_txt and 1 not in (n_img, n_txt):
            raise ValueError(f"itm pairs images with texts: got {n_img} images and {n_txt} texts")
        n = max(n_img, n_txt)
        # One image against many texts: its cross-attention K/V are computed once.
        single_kv = self.qformer.image_kv(self.embed_image(pixels)) if n_img == 1 else None
        probs = []
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            ids, mask = self._tokenize(texts[start:stop] if n_txt > 1 else texts * (stop - start))
            if single_kv is not None:
                kv = [None if x is None else tuple(t.expand(stop - start, -1, -1, -1) for t in x) for x in single_kv]
            else:
                kv = self.qformer.image_kv(self.embed_image(pixels[start:stop]))
            probs.append(self.itm_logits(ids, mask, kv).float().softmax(dim=-1)[:, 1])
        return torch.cat(probs)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike, *, safe_serialization: bool = True) -> None:
        """Write ``model.safetensors`` + ``config.json`` (+ the tokenizer) atomically."""
        from .checkpoint import save_blip2

        save_blip2(self, Path(directory))

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        config: Blip2Config | dict | None = None,
        tokenizer: "PreTrainedTokenizerBase | str | os.PathLike | None" = None,
        strict: bool = True,
        return_report: bool = False,
    ) -> "Blip2 | tuple[Blip2, LoadReport]":
        """Load our own saved model, a transformers ``Blip2ForImageTextRetrieval`` directory,
        or a LAVIS stage-1 ``.pth`` (``config`` gives the shapes; ``tokenizer`` the BERT
        tokenizer with ``[DEC]``).

        Loading is strict: a missing or unexpected key raises, naming the keys (keys a
        format does not carry, such as transformers' missing ``temp`` and LM head, are
        initialised fresh and listed in the report). Checkpoint files are untrusted input:
        ``.pth`` files are read with ``weights_only=True`` and refused if they need more.
        """
        from .checkpoint import load_blip2

        model, report = load_blip2(cls, Path(path), config=config, tokenizer=tokenizer, strict=strict)
        return (model, report) if return_report else model


def check_tokenizer(tokenizer: "PreTrainedTokenizerBase", config: Blip2Config) -> None:
    """Adopt the tokenizer's ``[DEC]`` / ``[SEP]`` ids into ``config`` (the tokenizer is their
    source of truth), and refuse a tokenizer whose padding id or vocabulary does not fit the
    Q-Former's embeddings."""
    problems = []
    if tokenizer.bos_token_id is None:
        problems.append("it has no bos token; load it with qformer.tokenizer.load_qformer_tokenizer to add [DEC]")
    if tokenizer.pad_token_id != config.qformer.pad_token_id:
        problems.append(f"pad token id {tokenizer.pad_token_id} != qformer.pad_token_id {config.qformer.pad_token_id}")
    if len(tokenizer) > config.qformer.vocab_size:
        problems.append(f"it has {len(tokenizer)} tokens but qformer.vocab_size is {config.qformer.vocab_size}")
    if problems:
        raise ConfigError("tokenizer does not match the model config: " + "; ".join(problems))
    config.dec_token_id = tokenizer.bos_token_id
    if tokenizer.sep_token_id is not None:
        config.sep_token_id = tokenizer.sep_token_id
