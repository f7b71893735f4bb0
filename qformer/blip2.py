"""``Blip2``: the model users hold. :class:`~qformer.model.Blip2Model`'s features and heads,
plus thin methods over the modules above it: raw-input scores (:mod:`qformer.inference`),
generation (:mod:`qformer.generation`) and persistence (:mod:`qformer.persistence`).

    model = Blip2.from_pretrained("runs/toy/stage2/model")
    model.caption(images); model.answer(images, questions)
    model.similarity(images, texts); model.itm(images, texts)
    model.attention_maps(images); model.gradcam(images, texts)
    model.save_pretrained("out/model"); model.export_transformers("out/hf")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import explain, generation, inference
from .images import ImageInput
from .model import Blip2Model
from .video import VideoInput
from .persistence import LoadOptions, LoadReport, export_transformers, load_blip2, save_blip2

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

    from .config import Blip2Config


class Blip2(Blip2Model):
    """BLIP-2 with a frozen vision tower, a trainable Q-Former and (stage 2) a frozen LLM.

    Build with ``Blip2(config, tokenizer=...)`` or load with :meth:`from_pretrained`. Images may
    be PIL images, file paths, or a preprocessed float tensor ``(B, 3, H, W)``.
    """

    # ------------------------------------------------------------------ scores from raw inputs
    def similarity(self, images: ImageInput, texts: str | Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
        """(N_images, N_texts) ITC similarity: cosine, max over queries, no temperature."""
        return inference.similarity(self, images, texts, batch_size=batch_size)

    def itm(self, images: ImageInput, texts: str | Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
        """(N,) probability that each (image, text) pair matches; one image or text is broadcast."""
        return inference.itm(self, images, texts, batch_size=batch_size)

    def image_features_of(self, images: ImageInput, *, batch_size: int = 64) -> torch.Tensor:
        """(N, Q, E) normalised query embeddings of raw images."""
        return inference.image_features_of(self, images, batch_size=batch_size)

    def text_features_of(self, texts: str | Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
        """(N, E) normalised text embeddings of raw strings."""
        return inference.text_features_of(self, texts, batch_size=batch_size)

    # ------------------------------------------------------------------ where the queries look
    def attention_maps(self, images: ImageInput, *, batch_size: int = 64) -> explain.AttentionMaps:
        """Each query's cross-attention over the image patches, per cross-attention layer, averaged
        over heads: ``.maps`` (B, layers, Q, h, w), ``.prefix`` (CLS ...); see :mod:`qformer.explain`."""
        return explain.attention_maps(self, images, batch_size=batch_size)

    def gradcam(self, images: ImageInput, texts: str | Sequence[str], *, layer: int | None = None,
                words: bool = False, batch_size: int = 16) -> explain.GradCam:
        """Grad-CAM of the ITM match score of each (image, text) pair over the patches (``.maps``
        (N, h, w)), per word with ``words=True``; see :func:`qformer.explain.gradcam`."""
        return explain.gradcam(self, images, texts, layer=layer, words=words, batch_size=batch_size)

    # ------------------------------------------------------------------ generation
    def generate(self, images: ImageInput | None = None, prompt: str | Sequence[str] | None = None,
                 **options: Any) -> list[str]:
        """Text for each image (or ``videos=`` clip) after a prompt; see
        :func:`qformer.generation.generate` (LAVIS's defaults: beam 5, up to 30 new tokens;
        sampling, ``num_captions``, penalties ...)."""
        return generation.generate(self, images, prompt, **options)

    def caption(self, images: ImageInput | None = None, *, videos: VideoInput | None = None,
                **options: Any) -> list[str]:
        """Captions of images (or ``videos=`` clips) with the training prompt; see
        :func:`qformer.generation.caption`."""
        return generation.caption(self, images, videos=videos, **options)

    def answer(self, images: ImageInput | None = None, questions: str | Sequence[str] = (), *,
               videos: VideoInput | None = None, **options: Any) -> list[str]:
        """BLIP-2's zero-shot VQA (an instruction-aware model reads the question in its Q-Former
        too); see :func:`qformer.generation.answer`."""
        if not questions:
            raise ValueError("answer() needs questions")
        return generation.answer(self, images, questions, videos=videos, **options)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike, *, include_frozen: bool = True,
                        state_dict: "dict[str, torch.Tensor] | None" = None) -> None:
        """Write ``model.safetensors`` + ``config.json`` + tokenizers (+ ``llm/``) atomically.

        ``include_frozen=False`` leaves the frozen vision tower and LLM out (training
        checkpoints); they are then rebuilt from ``vision.pretrained`` / ``llm.path``.
        ``state_dict``: the weights to write instead of the model's own (a model sharded with
        FSDP2 holds only shards; :func:`qformer.sharding.full_state_dict` gathers them).
        """
        save_blip2(self, Path(directory), include_frozen=include_frozen, state_dict=state_dict)

    def export_transformers(self, directory: str | os.PathLike) -> None:
        """Write a directory that ``transformers.Blip2ForConditionalGeneration.from_pretrained``
        loads with the same outputs (plus its tokenizer and ``Blip2Processor``); a model without
        an LLM as ``Blip2ForImageTextRetrieval``. The vision tower's weights go along."""
        export_transformers(self, Path(directory))

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        config: "Blip2Config | dict | None" = None,
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
        opts = LoadOptions(config=config, tokenizer=tokenizer, llm_tokenizer=llm_tokenizer, llm_dtype=llm_dtype,
                           llm_quantization=llm_quantization, strict=strict)
        model, report = load_blip2(cls, Path(path), opts)
        return (model, report) if return_report else model


__all__ = ["Blip2"]
