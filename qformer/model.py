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
    text_hidden: torch.Tensor  # (B, L, D) unimodal text encoder output ((B, 1, D): [CLS] only, see forward)
    text_feats: torch.Tensor  # (B, E) normalised [CLS] embedding


class Blip2(nn.Module):
    """BLIP-2 with a frozen vision tower and a trainable Q-Former.

    Build with ``Blip2(config, tokenizer=...)`` or load with :meth:`from_pretrained`.
    """

    def __init__(
        self,
        config: Blip2Config | None = None,
        *,
        tokenizer: "PreTrainedTokenizerBase | None" = None,
        llm_tokenizer: "PreTrainedTokenizerBase | None" = None,
        llm: nn.Module | None = None,
    ):
        """Args:
            config: the architecture (defaults: BLIP-2's EVA ViT-g + BERT-base Q-Former).
            tokenizer: the Q-Former's BERT tokenizer with ``[DEC]`` (stage 1 and itm/similarity).
            llm_tokenizer: the LLM's tokenizer (stage 2); loaded from ``config.llm.path`` if omitted.
            llm: an already built LLM module for ``config.llm`` (used by the checkpoint loaders).
        """
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
        if config.stage1_heads:
            self.vision_proj = nn.Linear(hidden, config.embed_dim)
            self.text_proj = nn.Linear(hidden, config.embed_dim)
            self.itm_head = nn.Linear(hidden, 2)
            self.temp = nn.Parameter(torch.tensor(float(config.temp_init)))
        self.tokenizer = tokenizer
        if tokenizer is not None:
            check_tokenizer(tokenizer, config)
        self.llm_tokenizer = None
        if config.llm is not None:
            from .llm import hidden_size, load_llm

            self.llm = llm if llm is not None else load_llm(config.llm)
            self.language_projection = nn.Linear(hidden, hidden_size(self.llm))
            self.llm_tokenizer = llm_tokenizer if llm_tokenizer is not None else _load_llm_tokenizer(config)

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

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *, cls_only: bool = False
    ) -> torch.Tensor:
        """The unimodal text encoder: (B, L) -> (B, L, D), bidirectional, no image.

        ``cls_only``: return (B, 1, D), the [CLS] output alone (all ITC needs); the last
        layer then skips the other positions."""
        return self.qformer(
            input_ids=input_ids, attention_mask=attention_mask, output_rows=1 if cls_only else None
        ).hidden

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
        hidden = self.qformer(
            input_ids=input_ids, query_embeds=queries, attention_mask=mask, image_kv=image_kv, output_rows=q
        ).hidden  # (N, Q, D): the text positions' last-layer outputs are never used
        return self.itm_head(hidden).mean(dim=1)  # (N, 2)

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
        text_cls_only: bool = False,
    ) -> Blip2Features:
        """ITC features of a batch of images and texts (plus the caches later passes reuse).

        Pass either ``pixel_values`` (B, 3, H, W) or precomputed ``image_embeds`` (B, N, C)
        (already through ``ln_vision``, e.g. from :meth:`embed_image`). ``text_cls_only``:
        ``text_hidden`` holds only the [CLS] output (B, 1, D), computed without the other
        positions' last layer (see :meth:`encode_text`).
        """
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("Blip2.forward needs pixel_values or image_embeds")
            image_embeds = self.embed_image(pixel_values)
        image = self.encode_image(image_embeds, return_kv=return_query_kv)
        text_hidden = self.encode_text(input_ids, attention_mask, cls_only=text_cls_only)
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
        if self.config.llm is not None:
            self.llm.eval()  # frozen LLM: no dropout ...
            for name, module in self.llm.named_modules():
                if "lora_dropout" in name:  # ... except LoRA's own, which trains
                    module.train(mode)
        return self

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def set_stage(self, stage: int) -> None:
        """Make exactly the parameters of a training stage trainable.

        Stage 1: everything but the frozen vision tower (and LLM). Stage 2: the query path of
        the Q-Former (query tokens, ln_vision, self/cross-attention, query FFNs, embedding
        LayerNorm), the language projection and any LoRA adapters; the text-only parts and
        the stage-1 heads get no gradient in stage 2, so they are frozen.
        """
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        if stage == 2 and self.config.llm is None:
            raise ConfigError("stage 2 needs an LLM: set config.llm")
        for name, p in self.named_parameters():
            if name.startswith("vision."):
                p.requires_grad_(False)
            elif name.startswith("llm."):
                p.requires_grad_(stage == 2 and "lora_" in name)
            elif stage == 1:
                p.requires_grad_(name != "language_projection.weight" and name != "language_projection.bias")
            else:
                text_only = (
                    name.startswith(("vision_proj.", "text_proj.", "itm_head.", "qformer.lm_head."))
                    or name == "temp"
                    or name.startswith(("qformer.embeddings.word_embeddings.", "qformer.embeddings.position_embeddings."))
                    or ".ffn." in name
                )
                p.requires_grad_(not text_only)

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
            out.append(self.text_features(self.encode_text(ids, mask, cls_only=True)))
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

    # ------------------------------------------------------------------ stage 2: generation
    def _require_llm(self) -> None:
        if self.config.llm is None:
            raise ConfigError("this is a stage-1 model: generation needs an LLM (config.llm)")

    @torch.no_grad()
    def generate(
        self,
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
        """Text for each image (``num_captions`` per image, image-major), from the LLM
        conditioned on the soft prompts and the text ``prompt`` (one for all, or one per image;
        default ``config.llm.prompt``). Defaults are LAVIS's: beam 5, up to 30 new tokens.
        ``do_sample=True`` is nucleus sampling (``top_p``, ``temperature``), one beam.
        ``vision_features`` (N, T, C): the frozen tower's output instead of ``images``.
        Other keyword arguments go to transformers' ``generate``."""
        self._require_llm()
        from .llm import is_encoder_decoder
        from .stage2 import end_of_text_id, generation_inputs

        if vision_features is None:
            pixels = self._pixels(images)
            n = pixels.shape[0]
        else:
            n = vision_features.shape[0]
        prompts = [prompt] * n if prompt is None or isinstance(prompt, str) else list(prompt)
        prompts = [self.config.llm.prompt if p is None else p for p in prompts]
        if len(prompts) != n:
            raise ValueError(f"got {n} images but {len(prompts)} prompts")
        tok = self.llm_tokenizer
        eos = tok.eos_token_id if is_encoder_decoder(self.llm) else end_of_text_id(tok, self.config.llm)
        options = dict(
            num_beams=1 if do_sample else num_beams,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=do_sample,
            num_return_sequences=num_captions,
            repetition_penalty=repetition_penalty,
            length_penalty=length_penalty,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id,
        )
        if do_sample:
            options.update(top_p=top_p, temperature=temperature)
        options.update(generate_kwargs)
        texts: list[str] = []
        for start in range(0, n, batch_size):
            if vision_features is None:
                embeds = self.embed_image(pixels[start : start + batch_size])
            else:
                embeds = self.embed_image(vision_features=vision_features[start : start + batch_size].to(self.device))
            inputs = generation_inputs(self, embeds, prompts[start : start + batch_size])
            out = self.llm.generate(**inputs, **options)
            texts.extend(t.strip() for t in tok.batch_decode(out, skip_special_tokens=True))
        return texts

    @torch.no_grad()
    def caption(self, images: ImageInput, **generate_options: Any) -> list[str]:
        """Captions with the training prompt (``config.llm.prompt``); see :meth:`generate`."""
        return self.generate(images, None, **generate_options)

    @torch.no_grad()
    def answer(
        self,
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
        answer:" (seq2seq), beam 5, at most 10 new tokens, length penalty -1."""
        self._require_llm()
        from .llm import is_encoder_decoder
        from .stage2 import VQA_PROMPT_CAUSAL, VQA_PROMPT_SEQ2SEQ

        questions = self._as_list(questions)
        if template is None:
            template = VQA_PROMPT_SEQ2SEQ if is_encoder_decoder(self.llm) else VQA_PROMPT_CAUSAL
        pixels = self._pixels(images)
        if pixels.shape[0] == 1 and len(questions) > 1:
            pixels = pixels.expand(len(questions), -1, -1, -1)
        return self.generate(
            pixels,
            [template.format(q) for q in questions],
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            length_penalty=length_penalty,
            **generate_options,
        )

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike, *, include_frozen: bool = True) -> None:
        """Write ``model.safetensors`` + ``config.json`` + tokenizers (+ ``llm/``) atomically.

        ``include_frozen=False`` leaves the frozen vision tower and LLM out (training
        checkpoints); they are then rebuilt from ``vision.pretrained`` / ``llm.path``.
        """
        from .checkpoint import save_blip2

        save_blip2(self, Path(directory), include_frozen=include_frozen)

    def export_transformers(self, directory: str | os.PathLike) -> None:
        """Write a directory that ``transformers.Blip2ForConditionalGeneration.from_pretrained``
        loads with the same outputs (plus its tokenizer and ``Blip2Processor``)."""
        from .export import export_transformers

        export_transformers(self, Path(directory))

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        config: Blip2Config | dict | None = None,
        tokenizer: "PreTrainedTokenizerBase | str | os.PathLike | None" = None,
        llm_tokenizer: "PreTrainedTokenizerBase | str | os.PathLike | None" = None,
        llm_dtype: str | None = None,
        llm_quantization: str | None = None,
        strict: bool = True,
        return_report: bool = False,
    ) -> "Blip2 | tuple[Blip2, LoadReport]":
        """Load a model saved by qformer, a transformers BLIP-2 directory
        (``Blip2ForImageTextRetrieval`` or ``Blip2ForConditionalGeneration``, the layout of
        Salesforce/blip2-*), or a LAVIS ``.pth`` (stage 1 or 2; ``config`` gives the shapes,
        the frozen towers come from ``config.vision.pretrained`` / ``config.llm.path``).

        ``llm_dtype`` / ``llm_quantization`` ("8bit", "4bit", "4bit-fp4") override how the
        frozen LLM is held. Loading is strict: a missing or unexpected key raises, naming the
        keys (keys a format does not carry, such as transformers' missing ``temp`` and LM
        head, are initialised fresh and listed in the report); shapes are checked before any
        weight is copied. Checkpoint files are untrusted input: ``.pth`` files are read with
        ``weights_only=True`` and refused if they need more.
        """
        from .checkpoint import LoadOptions, load_blip2

        opts = LoadOptions(
            config=config,
            tokenizer=tokenizer,
            llm_tokenizer=llm_tokenizer,
            llm_dtype=llm_dtype,
            llm_quantization=llm_quantization,
            strict=strict,
        )
        model, report = load_blip2(cls, Path(path), opts)
        return (model, report) if return_report else model


def _load_llm_tokenizer(config: Blip2Config):
    if config.llm.path is None:
        raise ConfigError("an LLM built from llm.hf_config needs its tokenizer: pass Blip2(config, llm_tokenizer=...)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(config.llm.path, trust_remote_code=False)


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
