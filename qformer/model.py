"""The BLIP-2 model's parts and features: a frozen vision tower, the Q-Former (MED) with its
stage-1 heads, and (stage 2) a frozen LLM with the projection that feeds it.

:class:`Blip2Model` computes features and head outputs from tensors; it tokenises nothing,
reads no files and holds no losses. The stage-1 / stage-2 losses live in
:mod:`qformer.losses` and are orchestrated by the objectives (:mod:`qformer.stage1`,
:mod:`qformer.stage2`); generation is :mod:`qformer.generation`; saving and loading is
:mod:`qformer.persistence`. :class:`qformer.Blip2` puts the convenience API on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .config import Blip2Config, ConfigError
from .llm import hidden_size, input_dtype, load_llm, load_llm_tokenizer
from .med import KV, MED, ImageKV
from .vision import build_vision_tower

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

# Parameters that only stage 1 uses (the text side of the Q-Former and the ITC / ITM / ITG heads):
# stage 2 freezes them, LAVIS's stage-2 models do not have them, the transformers export drops them.
STAGE1_ONLY_PREFIXES: tuple[str, ...] = (
    "vision_proj.", "text_proj.", "itm_head.", "qformer.lm_head.",
    "qformer.embeddings.word_embeddings.", "qformer.embeddings.position_embeddings.",
)


# The Q-Former's text-input parts: an instruction-aware Q-Former (InstructBLIP) uses them in stage 2.
TEXT_INPUT_PREFIXES: tuple[str, ...] = ("qformer.embeddings.word_embeddings.", "qformer.embeddings.position_embeddings.")


def is_stage1_only(name: str) -> bool:
    """Whether parameter ``name`` belongs to the stage-1-only parts (see :data:`STAGE1_ONLY_PREFIXES`;
    the temperature and the text FFNs ``layers.N.ffn.*`` too)."""
    return name == "temp" or name.startswith(STAGE1_ONLY_PREFIXES) or ".ffn." in name


def is_text_input(name: str) -> bool:
    """Whether parameter ``name`` is one of the Q-Former's text-input parts (word/position
    embeddings, text FFNs), which an instruction-aware Q-Former runs on the instruction."""
    return name.startswith(TEXT_INPUT_PREFIXES) or (name.startswith("qformer.layers.") and ".ffn." in name)


def unused_in_stage2(name: str, config: Blip2Config) -> bool:
    """Whether parameter ``name`` gets no gradient from a stage-2 (or instruction-tuning) step:
    the stage-1-only parts, except the text-input parts an instruction-aware Q-Former reads
    (all but the last layer's text FFN: only query outputs leave the last layer)."""
    if config.instruction_aware and is_text_input(name):
        return name.startswith(f"qformer.layers.{config.qformer.num_layers - 1}.ffn.")
    return is_stage1_only(name)


@dataclass
class ImageEncoding:
    """Everything the stage-1 passes reuse about a batch of images."""

    image_embeds: torch.Tensor  # (B, N, C) ln_vision(ViT features)
    image_kv: ImageKV  # per Q-Former layer, cross-attention K/V of each image
    query_output: torch.Tensor  # (B, Q, D) queries after the query-only pass
    query_kv: list[KV] | None  # per layer, self-attention K/V of the queries (for ITG)


@dataclass
class Blip2Features:
    image: ImageEncoding
    image_feats: torch.Tensor  # (B, Q, E) normalised
    text_hidden: torch.Tensor  # (B, L, D) unimodal text encoder output ((B, 1, D): [CLS] only, see forward)
    text_feats: torch.Tensor  # (B, E) normalised [CLS] embedding


def check_tokenizer(tokenizer: "PreTrainedTokenizerBase", config: Blip2Config) -> None:
    """Adopt the tokenizer's ``[DEC]`` / ``[SEP]`` ids into ``config`` (the tokenizer is their
    source of truth), and refuse a tokenizer whose padding id or vocabulary does not fit the
    Q-Former's embeddings."""
    problems = []
    if tokenizer.bos_token_id is None and config.stage1_heads:
        problems.append("it has no bos token; load it with qformer.tokenizer.load_qformer_tokenizer to add [DEC]")
    if tokenizer.pad_token_id != config.qformer.pad_token_id:
        problems.append(f"pad token id {tokenizer.pad_token_id} != qformer.pad_token_id {config.qformer.pad_token_id}")
    if len(tokenizer) > config.qformer.vocab_size:
        problems.append(f"it has {len(tokenizer)} tokens but qformer.vocab_size is {config.qformer.vocab_size}")
    if problems:
        raise ConfigError("tokenizer does not match the model config: " + "; ".join(problems))
    if tokenizer.bos_token_id is not None:
        config.dec_token_id = tokenizer.bos_token_id
    if tokenizer.sep_token_id is not None:
        config.sep_token_id = tokenizer.sep_token_id


class Blip2Model(nn.Module):
    """BLIP-2's modules and the features they compute: frozen tower, Q-Former, heads, LLM bridge.

    Users normally hold a :class:`qformer.Blip2` (this class plus raw-input convenience,
    generation and persistence); the objectives and evaluation need only what is here.
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
        self.vision = build_vision_tower(config.vision)
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
            self.llm = llm if llm is not None else load_llm(config.llm)
            self.language_projection = nn.Linear(hidden, hidden_size(self.llm))
            self.llm_tokenizer = llm_tokenizer if llm_tokenizer is not None else load_llm_tokenizer(config.llm)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    @property
    def temperature(self) -> torch.Tensor:
        """ITC's learnable temperature (similarities are divided by it); 0-dim (FSDP2 holds the
        parameter as a 1-element vector while sharded: :mod:`qformer.sharding`)."""
        self._require_stage1_heads()
        return self.temp.reshape(())

    def _require_stage1_heads(self) -> None:
        if not self.config.stage1_heads:
            raise ConfigError("this model has no stage-1 heads (ITC/ITM/ITG): config.stage1_heads is False")

    # ------------------------------------------------------------------ features
    def embed_image(
        self, pixel_values: torch.Tensor | None = None, *, vision_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The ViT (frozen unless fine-tuned) then the trainable ``ln_vision``: (B, 3, H, W) -> (B, N, C) float32.

        ``vision_features`` (B, N, C): the tower's output computed earlier (e.g. read from a
        feature cache), used instead of running the tower.
        """
        if vision_features is None:
            if pixel_values is None:
                raise ValueError("embed_image needs pixel_values or vision_features")
            vision_features = self.vision(pixel_values)  # (B, N, C), no grad unless the tower trains
        return self.ln_vision(vision_features.to(self.ln_vision.weight.dtype))

    def image_kv(self, image_embeds: torch.Tensor) -> ImageKV:
        """Cross-attention K/V of every cross-attention layer for ``image_embeds`` (B, N, C): they
        depend only on the image, so compute them once and pair rows with texts (see
        :func:`qformer.med.index_kv`)."""
        return self.qformer.image_kv(image_embeds)

    def encode_image(self, image_embeds: torch.Tensor, *, return_kv: bool = False) -> ImageEncoding:
        """The query-only pass: queries attend to each other and cross-attend to the image."""
        image_kv = self.image_kv(image_embeds)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)  # (B, Q, D)
        out = self.qformer(query_embeds=queries, image_kv=image_kv, return_kv=return_kv)
        return ImageEncoding(image_embeds=image_embeds, image_kv=image_kv, query_output=out.hidden, query_kv=out.kv)

    def encode_image_with_instruction(
        self, image_embeds: torch.Tensor, instruction_ids: torch.Tensor, instruction_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """InstructBLIP's Q-Former pass: ``[queries ; instruction]`` share bidirectional
        self-attention, only the queries cross-attend to the image (B, N, C); returns the query
        outputs (B, Q, D). ``instruction_ids`` (B, L) are Q-Former (BERT) tokens."""
        n, q = image_embeds.shape[0], self.num_query_tokens
        if instruction_ids.shape[0] != n:
            raise ValueError(f"{instruction_ids.shape[0]} instructions for {n} images (one per image)")
        if instruction_mask is None:
            instruction_mask = torch.ones_like(instruction_ids)
        mask = torch.cat([instruction_mask.new_ones(n, q), instruction_mask], dim=1)  # (B, Q+L)
        return self.qformer(
            input_ids=instruction_ids, query_embeds=self.query_tokens.expand(n, -1, -1), attention_mask=mask,
            image_kv=self.image_kv(image_embeds), output_rows=q,
        ).hidden  # (B, Q, D)

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

    def itm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_kv: ImageKV) -> torch.Tensor:
        """The image-grounded encoder over N (text, image) pairs -> (N, 2) ITM logits.

        ``image_kv`` rows must be aligned with the texts (index :meth:`image_kv` rows to pair
        images with other texts). The head is averaged over the query outputs.
        """
        n, q = input_ids.shape[0], self.num_query_tokens
        queries = self.query_tokens.expand(n, -1, -1)
        mask = torch.cat([attention_mask.new_ones(n, q), attention_mask], dim=1)  # (N, Q+L)
        hidden = self.qformer(
            input_ids=input_ids, query_embeds=queries, attention_mask=mask, image_kv=image_kv, output_rows=q
        ).hidden  # (N, Q, D): the text positions' last-layer outputs are never used
        return self.itm_head(hidden).mean(dim=1)  # (N, 2)

    def grounded_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_kv: ImageKV) -> torch.Tensor:
        """The image-grounded encoder's text outputs (MLM, ALBEF / BLIP-1): ``[queries ; text]``,
        bidirectional, the queries cross-attending to the image -> (N, L, D) text hidden states
        (feed them to :meth:`lm_logits`). ``image_kv`` rows are aligned with the texts."""
        n, q = input_ids.shape[0], self.num_query_tokens
        mask = torch.cat([attention_mask.new_ones(n, q), attention_mask], dim=1)  # (N, Q+L)
        hidden = self.qformer(input_ids=input_ids, query_embeds=self.query_tokens.expand(n, -1, -1),
                              attention_mask=mask, image_kv=image_kv).hidden  # (N, Q+L, D)
        return hidden[:, q:]

    def decode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_kv: list[KV]) -> torch.Tensor:
        """The image-grounded causal decoder: text sees all queries (their K/V from the
        query-only pass) and earlier text -> (B, L, D) text hidden states."""
        b, q = input_ids.shape[0], self.num_query_tokens
        mask = torch.cat([attention_mask.new_ones(b, q), attention_mask], dim=1)  # (B, Q+L)
        return self.qformer(
            input_ids=input_ids, attention_mask=mask, causal=True, past_kv=query_kv, num_past_queries=q
        ).hidden

    def lm_logits(self, text_hidden: torch.Tensor) -> torch.Tensor:
        """The Q-Former's LM head (ITG): (..., D) text hidden states -> (..., V) vocabulary logits."""
        return self.qformer.lm_logits(text_hidden)

    def soft_prompts(
        self,
        image_embeds: torch.Tensor,
        *,
        instruction_ids: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
        frames: int = 1,
    ) -> torch.Tensor:
        """Stage 2: image embeddings -> projected query outputs, in the dtype of the LLM's
        input embeddings.

        Images: (B, N, C) -> (B, Q, H_llm). Video clips of ``frames`` frames each: (B*T, N, C)
        frame-major per clip -> (B, T*Q, H_llm), each frame's Q outputs in frame order
        (InstructBlipVideo). An instruction-aware model reads ``instruction_ids`` (B, L) (one
        per image or clip, repeated over its frames); without them it runs queries only.
        """
        if self.config.llm is None:
            raise ConfigError("this is a stage-1 model: soft prompts need an LLM (config.llm)")
        if image_embeds.shape[0] % frames:
            raise ValueError(f"{image_embeds.shape[0]} frames do not split into clips of {frames}")
        if self.config.instruction_aware and instruction_ids is None:
            raise ValueError("this model is instruction-aware: pass the instruction's Q-Former tokens (instruction_ids)")
        if instruction_ids is not None:
            if not self.config.instruction_aware:
                raise ConfigError("instruction_ids given to a model whose Q-Former reads no instruction "
                                  "(config.instruction_aware is False)")
            if frames > 1:  # every frame of a clip reads the clip's instruction
                instruction_ids = instruction_ids.repeat_interleave(frames, dim=0)
                if instruction_mask is not None:
                    instruction_mask = instruction_mask.repeat_interleave(frames, dim=0)
            query_output = self.encode_image_with_instruction(image_embeds, instruction_ids, instruction_mask)
        else:
            query_output = self.encode_image(image_embeds).query_output  # (B*T, Q, D)
        prompts = self.language_projection(query_output).to(input_dtype(self.llm))  # (B*T, Q, H)
        if frames > 1:
            prompts = prompts.reshape(prompts.shape[0] // frames, frames * prompts.shape[1], prompts.shape[2])
        return prompts

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
                raise ValueError("Blip2Model.forward needs pixel_values or image_embeds")
            image_embeds = self.embed_image(pixel_values)
        image = self.encode_image(image_embeds, return_kv=return_query_kv)
        text_hidden = self.encode_text(input_ids, attention_mask, cls_only=text_cls_only)
        return Blip2Features(
            image=image,
            image_feats=self.image_features(image.query_output),
            text_hidden=text_hidden,
            text_feats=self.text_features(text_hidden),
        )

    # ------------------------------------------------------------------ what trains
    def train(self, mode: bool = True) -> "Blip2Model":
        super().train(mode)
        self.vision.train(mode)  # the tower keeps its frozen parts in eval mode (see VisionTower.train)
        if self.config.llm is not None:
            self.llm.eval()  # frozen LLM: no dropout ...
            for name, module in self.llm.named_modules():
                if "lora_dropout" in name:  # ... except LoRA's own, which trains
                    module.train(mode)
        return self

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def set_stage(self, stage: int, *, vision_trainable_blocks: int = 0) -> None:
        """Make exactly the parameters of a training stage trainable.

        Stage 1: everything but the frozen vision tower (and LLM). Stage 2: the query path of
        the Q-Former (query tokens, ln_vision, self/cross-attention, query FFNs, embedding
        LayerNorm), the language projection and any LoRA adapters; the stage-1-only parts
        (:func:`is_stage1_only`) get no gradient in stage 2, so they are frozen -- except, in an
        instruction-aware model, the text-input parts that read the instruction
        (:func:`unused_in_stage2`).

        ``vision_trainable_blocks``: BLIP-2's fine-tuning also trains the vision tower: -1 all
        of it, N its last N blocks, 0 (default) none (see ``VisionTower.set_trainable_blocks``).
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
                p.requires_grad_(not name.startswith("language_projection."))
            else:
                p.requires_grad_(not unused_in_stage2(name, self.config))
        self.vision.set_trainable_blocks(vision_trainable_blocks)

    @torch.no_grad()
    def clamp_temperature_(self, low: float = 0.001, high: float = 0.5) -> None:
        """BLIP / ALBEF clamp the temperature after each step; LAVIS's BLIP-2 does not."""
        self._require_stage1_heads()
        self.temp.clamp_(low, high)  # the parameter itself (a DTensor shard under FSDP2), not a view


__all__ = ["Blip2Features", "Blip2Model", "ImageEncoding", "STAGE1_ONLY_PREFIXES", "TEXT_INPUT_PREFIXES",
           "check_tokenizer", "is_stage1_only", "is_text_input", "unused_in_stage2"]
