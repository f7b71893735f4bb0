"""BLIP's multimodal mixture of encoder-decoder (MED), in the Q-Former form BLIP-2 uses.

One BERT stack serves every role; what a position may see is decided by the attention
mask, built once per forward:

* unimodal text encoder: text only, bidirectional, no image (ITC's text side);
* image-grounded encoder: ``[queries ; text]``, bidirectional; only query positions
  cross-attend to the image (ITM, and the query-only pass that makes the visual tokens);
* image-grounded causal decoder: text sees every query and the earlier text, queries
  never see text (ITG); the queries' keys/values can come from an earlier query-only pass.

Differences from BERT that BLIP-2 relies on:

* queries get no word/position embeddings, but go through the embedding LayerNorm
  together with the text;
* cross-attention only every ``cross_attention_freq`` layers, with K/V projected from the
  vision width; the image K/V depend only on (image, layer), so :meth:`MED.image_kv`
  computes them once and every pass reuses them;
* separate FFNs for query positions (``ffn_query``) and text positions (``ffn``).

Attention runs through :func:`torch.nn.functional.scaled_dot_product_attention` with boolean
masks (``True`` = may attend).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN

from .config import QFormerConfig

KV = tuple[torch.Tensor, torch.Tensor]  # (B, H, N, Dh) keys and values
ImageKV = list[KV | None]  # per Q-Former layer: the image's cross-attention K/V (None: no cross-attention)


# ---------------------------------------------------------------------------- per-row K/V plumbing
# The image K/V of :meth:`MED.image_kv` are computed once per image and then paired with other
# texts (ITM negatives, retrieval candidates) by indexing rows; these keep the layer structure.
def index_kv(image_kv: ImageKV, index: torch.Tensor) -> ImageKV:
    """Rows ``index`` (N,) of every layer's K/V: pair each output row with image ``index[i]``."""
    return [None if kv is None else (kv[0][index], kv[1][index]) for kv in image_kv]


def expand_kv(image_kv: ImageKV, n: int) -> ImageKV:
    """One image's K/V (batch 1) viewed as ``n`` rows, without a copy."""
    return [None if kv is None else tuple(t.expand(n, *t.shape[1:]) for t in kv) for kv in image_kv]


def cat_kv(*parts: ImageKV) -> ImageKV:
    """Concatenate the rows of several K/V lists, layer by layer."""
    return [
        None if layer[0] is None else (torch.cat([p[0] for p in layer]), torch.cat([p[1] for p in layer]))
        for layer in zip(*parts)
    ]


def put_kv(image_kv: ImageKV, rows: torch.Tensor, values: ImageKV) -> ImageKV:
    """A copy of ``image_kv`` with ``rows`` (R,) replaced by ``values`` (R rows per layer), differentiably."""
    return [
        None if kv is None else (kv[0].index_put((rows,), v[0]), kv[1].index_put((rows,), v[1]))
        for kv, v in zip(image_kv, values)
    ]


class MEDAttention(nn.Module):
    """Multi-head attention with BERT's output block: ``LayerNorm(x + dropout(dense(attn)))``.

    Used for self-attention (``kv_width == hidden``) and for cross-attention to the image
    (``kv_width`` = vision width).
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        kv_width: int,
        attention_dropout: float,
        hidden_dropout: float,
        layer_norm_eps: float,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.attention_dropout = attention_dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(kv_width, hidden_size)
        self.value = nn.Linear(kv_width, hidden_size)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(hidden_dropout)
        # Opt-in: when set, attention is computed explicitly and the probabilities (B, H, L, N)
        # are handed to this callback, which returns the tensor to continue with (the same one, or
        # a leaf to differentiate against: qformer.explain). None keeps the fused SDPA kernel.
        self.probs_hook: Callable[[torch.Tensor], torch.Tensor] | None = None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)

    def project_kv(self, x: torch.Tensor) -> KV:
        """Keys and values of ``x`` (B, N, kv_width) -> two (B, H, N, Dh) tensors."""
        return self._heads(self.key(x)), self._heads(self.value(x))

    def forward(self, x: torch.Tensor, kv: KV, mask: torch.Tensor | None) -> torch.Tensor:
        q = self._heads(self.query(x))  # (B, H, L, Dh)
        k, v = kv
        dropout = self.attention_dropout if self.training else 0.0
        if self.probs_hook is not None:
            ctx = self._explicit(q, k, v, mask, dropout)
        elif q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
            # On CPU, SDPA's flash kernel is slower than its math kernel in bf16 for the short
            # sequences of a Q-Former (its backward dominated a training step); in fp32 the
            # flash kernel is the faster one. Measured in benchmarks/ (stage-1 step profiles).
            with sdpa_kernel(SDPBackend.MATH):
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (B, H, L, Dh)
        ctx = ctx.transpose(1, 2).reshape(x.shape)  # (B, L, D)
        return self.layer_norm(self.dropout(self.dense(ctx)) + x)

    def _explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  dropout: float) -> torch.Tensor:
        """``softmax(QK^T / sqrt(d) + mask) V`` with the probabilities materialised and passed to
        :attr:`probs_hook` (before dropout, as the maps of BLIP / ALBEF are), same result as SDPA."""
        scores = (q @ k.transpose(-1, -2)) * self.head_dim ** -0.5  # (B, H, L, N)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.float().softmax(dim=-1).to(q.dtype)  # (B, H, L, N)
        probs = self.probs_hook(probs)
        return F.dropout(probs, dropout, training=dropout > 0) @ v  # (B, H, L, Dh)


class MEDFeedForward(nn.Module):
    """BERT's intermediate + output block: ``LayerNorm(x + dropout(fc2(act(fc1(x)))))``."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.dropout(self.fc2(self.act(self.fc1(x)))) + x)


class MEDLayer(nn.Module):
    def __init__(self, config: QFormerConfig, layer_idx: int) -> None:
        super().__init__()
        common = dict(
            hidden_size=config.hidden_size,
            num_heads=config.num_heads,
            attention_dropout=config.attention_dropout,
            hidden_dropout=config.hidden_dropout,
            layer_norm_eps=config.layer_norm_eps,
        )
        self.self_attn = MEDAttention(kv_width=config.hidden_size, **common)
        self.cross_attn = (
            MEDAttention(kv_width=config.encoder_width, **common) if config.has_cross_attention(layer_idx) else None
        )
        # Text FFN only when the Q-Former reads text (stage-2-only Q-Formers drop it).
        self.ffn = MEDFeedForward(config) if config.text_input else None
        self.ffn_query = MEDFeedForward(config)

    def forward(
        self,
        hidden: torch.Tensor,
        self_mask: torch.Tensor | None,
        image_kv: KV | None,
        past_kv: KV | None,
        num_queries: int,
        rows: int | None = None,
    ) -> tuple[torch.Tensor, KV]:
        """``hidden`` (B, L, D) holds ``num_queries`` query positions, then text.

        Returns the new hidden states and this layer's self-attention K/V over all keys
        (past included), which a later decoder pass can reuse. ``rows``: compute the output
        of only the first ``rows`` positions (every position is still a key).
        """
        k, v = self.self_attn.project_kv(hidden)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        if rows is not None and rows < hidden.shape[1]:
            hidden = hidden[:, :rows]
            if self_mask is not None and self_mask.shape[2] > 1:
                self_mask = self_mask[:, :, :rows]
        x = self.self_attn(hidden, (k, v), self_mask)
        if num_queries == 0:
            return self.ffn(x), (k, v)
        xq = x[:, :num_queries]  # (B, Q, D)
        if self.cross_attn is not None:
            if image_kv is None:
                raise ValueError("query positions need the image: pass image_kv (see MED.image_kv)")
            xq = self.cross_attn(xq, image_kv, None)
        xq = self.ffn_query(xq)
        if x.shape[1] <= num_queries:  # no text rows (or only query rows were asked for)
            return xq, (k, v)
        return torch.cat([xq, self.ffn(x[:, num_queries:])], dim=1), (k, v)


class MEDEmbeddings(nn.Module):
    """Word + absolute position embeddings for text (no token types); queries get none.
    ``[queries ; text]`` then share one LayerNorm and dropout, as in BLIP-2."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        if config.text_input:
            self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        query_embeds: torch.Tensor | None,
        position_offset: int = 0,
    ) -> torch.Tensor:
        parts = []
        if query_embeds is not None:
            parts.append(query_embeds)  # (B, Q, D)
        if input_ids is not None:
            length = input_ids.shape[1]
            if position_offset + length > self.position_embeddings.num_embeddings:
                raise ValueError(
                    f"text of {position_offset + length} tokens exceeds max_position_embeddings="
                    f"{self.position_embeddings.num_embeddings}"
                )
            pos = torch.arange(position_offset, position_offset + length, device=input_ids.device)
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(pos))  # (B, L, D)
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.dropout(self.layer_norm(x))


class MEDLMHead(nn.Module):
    """BERT's ``cls.predictions``: dense + activation + LayerNorm, then a decoder tied to the
    word embeddings (so it owns only the transform and the output bias)."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.layer_norm(self.act(self.dense(hidden))), word_embeddings, self.bias)


@dataclass
class MEDOutput:
    hidden: torch.Tensor  # (B, L, D): queries first (if any), then text
    kv: list[KV] | None = None  # per layer, self-attention K/V over all keys (past included)


def build_attention_mask(
    *,
    batch_size: int,
    num_past_queries: int,
    num_past_text: int,
    num_queries: int,
    num_text: int,
    key_padding: torch.Tensor | None,
    causal: bool,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean SDPA mask (B, 1, rows, keys), or None when every position sees every key.

    Keys are laid out ``[past queries ; past text ; queries ; text]`` and rows
    ``[queries ; text]``. ``key_padding`` (B, keys) marks real keys with 1 (padding 0).
    Non-causal: every row sees every real key (bidirectional). Causal (BLIP-2's multimodal
    causal mask): query rows see only query keys; a text row sees all query keys and the
    text keys at or before its own position.
    """
    num_keys = num_past_queries + num_past_text + num_queries + num_text
    pad = None
    if key_padding is not None:
        if key_padding.shape != (batch_size, num_keys):
            raise ValueError(
                f"attention_mask must cover every key: expected shape {(batch_size, num_keys)}, "
                f"got {tuple(key_padding.shape)}"
            )
        pad = key_padding.bool()[:, None, None, :]  # (B, 1, 1, K)
    if not causal:
        return pad
    # Per key: is it a query, and the text position it holds.
    key_is_query = torch.zeros(num_keys, dtype=torch.bool, device=device)
    key_is_query[:num_past_queries] = True
    start = num_past_queries + num_past_text
    key_is_query[start : start + num_queries] = True
    key_text_pos = torch.full((num_keys,), -1, dtype=torch.long, device=device)
    key_text_pos[num_past_queries:start] = torch.arange(num_past_text, device=device)
    key_text_pos[start + num_queries :] = torch.arange(num_past_text, num_past_text + num_text, device=device)
    # Per row.
    row_text_pos = torch.arange(num_past_text, num_past_text + num_text, device=device)
    text_rows = key_is_query[None, :] | (
        (~key_is_query)[None, :] & (key_text_pos[None, :] <= row_text_pos[:, None])
    )  # (L, K)
    query_rows = key_is_query[None, :].expand(num_queries, num_keys)  # (Q, K)
    mask = torch.cat([query_rows, text_rows], dim=0)[None, None]  # (1, 1, rows, K)
    if pad is not None:
        mask = mask & pad
    return mask.expand(batch_size, 1, -1, -1) if mask.shape[0] == 1 else mask


class MED(nn.Module):
    """The Q-Former's BERT stack. See the module docstring for its three modes."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = MEDEmbeddings(config)
        self.layers = nn.ModuleList([MEDLayer(config, i) for i in range(config.num_layers)])
        self.lm_head = MEDLMHead(config) if config.text_input and config.lm_head else None
        self.gradient_checkpointing = False  # set by the training recipe (TrainConfig.gradient_checkpointing)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """BERT's initialisation: normal(0, initializer_range) weights, zero biases,
        LayerNorms at (1, 0); the padding row of the word embeddings at zero."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.zero_()
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        if self.lm_head is not None:
            self.lm_head.bias.zero_()

    @property
    def cross_attention_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.cross_attn is not None]

    def image_kv(self, image_embeds: torch.Tensor) -> ImageKV:
        """Cross-attention keys/values of every cross-attention layer for ``image_embeds``
        (B, N, C). They depend only on the image and the layer: compute once per step and
        pass to every query pass (index rows to pair images with other texts)."""
        return [
            layer.cross_attn.project_kv(image_embeds) if layer.cross_attn is not None else None
            for layer in self.layers
        ]

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def forward(
        self,
        *,
        input_ids: torch.Tensor | None = None,
        query_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_kv: list[KV | None] | None = None,
        causal: bool = False,
        past_kv: list[KV] | None = None,
        num_past_queries: int = 0,
        return_kv: bool = False,
        output_rows: int | None = None,
    ) -> MEDOutput:
        """Run the stack over ``[query_embeds ; embed(input_ids)]``.

        Args:
            input_ids: (B, L) text tokens, or None for a query-only pass.
            query_embeds: (B, Q, D) query tokens, or None for a text-only pass.
            attention_mask: (B, keys) 1 for real keys, 0 for padding, covering every key:
                past keys first, then the queries and text of this pass. None: no padding.
            image_kv: from :meth:`image_kv`, required whenever queries are present.
            causal: BLIP-2's multimodal causal mask (decoder mode) instead of bidirectional.
            past_kv: per-layer self-attention K/V of earlier positions, laid out
                ``[num_past_queries queries ; earlier text]`` (e.g. a query-only pass run with
                ``return_kv=True``). Text positions continue after the earlier text.
            return_kv: also return each layer's self-attention K/V (for reuse by a decoder).
            output_rows: return only the first ``output_rows`` positions' hidden states (e.g.
                the queries for ITM, [CLS] for ITC): the last layer then computes only those
                rows -- every position is still a key there, and every earlier layer runs
                in full -- so the returned rows are the same as a full pass's.
        """
        if input_ids is None and query_embeds is None:
            raise ValueError("MED needs input_ids, query_embeds or both")
        if input_ids is not None and not self.config.text_input:
            raise ValueError("this Q-Former has no text input (qformer.text_input=False): it only runs queries")
        num_queries = 0 if query_embeds is None else query_embeds.shape[1]
        num_text = 0 if input_ids is None else input_ids.shape[1]
        batch = (input_ids if input_ids is not None else query_embeds).shape[0]
        past_len = 0 if past_kv is None else past_kv[0][0].shape[2]
        num_past_text = past_len - num_past_queries
        if num_past_text < 0:
            raise ValueError(f"num_past_queries={num_past_queries} exceeds the past length {past_len}")

        hidden = self.embeddings(input_ids, query_embeds, position_offset=num_past_text)  # (B, Q+L, D)
        mask = build_attention_mask(
            batch_size=batch,
            num_past_queries=num_past_queries,
            num_past_text=num_past_text,
            num_queries=num_queries,
            num_text=num_text,
            key_padding=attention_mask,
            causal=causal,
            device=hidden.device,
        )
        if output_rows is not None and not 0 < output_rows <= num_queries + num_text:
            raise ValueError(f"output_rows={output_rows} outside 1..{num_queries + num_text} (queries + text)")
        all_kv: list[KV] = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            layer_image_kv = image_kv[i] if image_kv is not None else None
            layer_past = past_kv[i] if past_kv is not None else None
            rows = output_rows if i == last else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden, kv = checkpoint(
                    layer, hidden, mask, layer_image_kv, layer_past, num_queries, rows, use_reentrant=False
                )
            else:
                hidden, kv = layer(hidden, mask, layer_image_kv, layer_past, num_queries, rows)
            if return_kv:
                all_kv.append(kv)
        return MEDOutput(hidden=hidden, kv=all_kv if return_kv else None)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (..., V) of text hidden states (..., D)."""
        if self.lm_head is None:
            raise ValueError("this Q-Former has no LM head (qformer.lm_head=False or text_input=False)")
        return self.lm_head(hidden, self.embeddings.word_embeddings.weight)


__all__ = [
    "KV",
    "ImageKV",
    "MED",
    "MEDAttention",
    "MEDEmbeddings",
    "MEDFeedForward",
    "MEDLayer",
    "MEDLMHead",
    "MEDOutput",
    "build_attention_mask",
    "cat_kv",
    "expand_kv",
    "index_kv",
    "put_kv",
]
