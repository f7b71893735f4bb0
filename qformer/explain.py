"""Where the Q-Former looks: each query's cross-attention maps, and Grad-CAM of the ITM score.

In BLIP-2 only the learned queries cross-attend to the image (every ``cross_attention_freq``-th
Q-Former layer); text reaches the image through the queries, by self-attention. So:

* :func:`attention_maps` -- per image, per cross-attention layer, per query: the attention
  probabilities over the image tokens of the query-only pass (the one that makes the visual
  features), averaged over heads, the patch tokens laid out on the tower's grid and the prefix
  tokens (CLS, registers) kept apart.
* :func:`gradcam` -- per (image, text) pair: Grad-CAM of the ITM match logit at one
  cross-attention layer, as ALBEF's ``Grounding.py`` (``--gradcam_mode itm``) and LAVIS's
  ``compute_gradcam`` do for their fusion layers: ``grad.clamp(min=0) * attn`` on the layer's
  cross-attention probabilities, averaged over heads -- and here over the queries too, since
  queries, not words, are the rows. The default layer is the middle cross-attention layer
  (layer 6 of BLIP-2's 0, 2, ..., 10, as LAVIS uses block 6 of BLIP's 12).
* per word (``words=True``), because no word cross-attends in BLIP-2, by occlusion of the text:
  the word's tokens are removed from the attention mask (the queries no longer see them), and
  the word's map is ``clamp(cam(caption) - cam(caption without the word), 0)`` -- the image
  evidence for the match that the word brings -- with ``logit(caption) - logit(caption without
  the word)`` as its score (positive: the word supports the match).

The probabilities come from :class:`~qformer.med.MEDAttention`'s opt-in explicit path
(``probs_hook``); the default forward keeps the fused SDPA kernel.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .generation import as_list
from .images import ImageInput
from .inference import encode_texts
from .med import MED, expand_kv, index_kv
from .model import Blip2Model


@dataclass
class AttentionMaps:
    """Each query's cross-attention over the image, per cross-attention layer, averaged over heads."""

    maps: torch.Tensor  # (B, L, Q, h, w) over the patch grid
    prefix: torch.Tensor  # (B, L, Q, P) over the prefix tokens (CLS ...; P = 0 for SigLIP)
    layers: list[int]  # the Q-Former layer of each of the L entries

    def layer(self, layer: int) -> torch.Tensor:
        """(B, Q, h, w): the maps of Q-Former layer ``layer``."""
        if layer not in self.layers:
            raise ConfigError(f"layer {layer} has no cross-attention; the cross-attention layers are {self.layers}")
        return self.maps[:, self.layers.index(layer)]


@dataclass
class GradCam:
    """Grad-CAM of the ITM match logit, per (image, text) pair."""

    maps: torch.Tensor  # (N, h, w) over the patch grid, >= 0
    prefix: torch.Tensor  # (N, P) on the prefix tokens
    itm_logit: torch.Tensor  # (N,) match logit (what was differentiated)
    itm_score: torch.Tensor  # (N,) match probability
    layer: int  # the Q-Former layer
    texts: list[str]
    words: list[list[str]] | None = None  # per pair, its words (words=True)
    word_maps: list[torch.Tensor] | None = None  # per pair, (W, h, w): evidence each word brings
    word_scores: list[torch.Tensor] | None = None  # per pair, (W,): logit drop when the word is masked


# ---------------------------------------------------------------------------- probabilities
@contextmanager
def capture_cross_attention(qformer: MED, layers: Sequence[int], *, leaf: bool = False) -> Iterator[dict[int, list]]:
    """Within the block, the cross-attention of ``layers`` runs explicitly and each pass appends
    its probabilities (B, H, Q, N) to ``records[layer]``. ``leaf``: they are recorded as graph
    leaves that require grad and the forward continues from them, so ``torch.autograd.grad``
    of a later score with respect to them works even when no parameter requires grad."""
    records: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    modules = {i: qformer.layers[i].cross_attn for i in layers}
    bad = [i for i, m in modules.items() if m is None]
    if bad:
        raise ConfigError(f"Q-Former layer(s) {bad} have no cross-attention; the cross-attention layers are "
                         f"{qformer.cross_attention_layers}")

    def hook_for(store: list[torch.Tensor]):
        def hook(probs: torch.Tensor) -> torch.Tensor:
            if leaf:
                probs = probs.detach().requires_grad_(True)
            store.append(probs)
            return probs
        return hook

    for i, module in modules.items():
        module.probs_hook = hook_for(records[i])
    try:
        yield records
    finally:
        for module in modules.values():
            module.probs_hook = None


def split_grid(x: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., N) over the tower's tokens -> ((..., h, w) patches, (..., P) prefix tokens)."""
    h, w = grid
    if x.shape[-1] != num_prefix + h * w:
        raise ValueError(f"{x.shape[-1]} image tokens do not make {num_prefix} prefix token(s) + a {h}x{w} grid "
                         "(vision_features from another tower?)")
    return x[..., num_prefix:].unflatten(-1, (h, w)), x[..., :num_prefix]


def _grid(model: Blip2Model) -> tuple[tuple[int, int], int]:
    return model.vision.grid_size, model.vision.num_prefix_tokens


def _embeds(model: Blip2Model, images: ImageInput | None, vision_features: torch.Tensor | None) -> torch.Tensor:
    """(B, N, C) ln_vision embeddings, without gradient (the tower is frozen; Grad-CAM stops at the attention)."""
    with torch.no_grad():
        if vision_features is not None:
            return model.embed_image(vision_features=vision_features.to(model.device))
        if images is None:
            raise ValueError("pass images or vision_features")
        return model.embed_image(model.vision.preprocess(images).to(model.device))


@contextmanager
def _eval_mode(model: Blip2Model) -> Iterator[None]:
    was_training = model.training
    model.eval()  # no dropout: the maps of the model as it predicts
    try:
        yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------- query maps
@torch.no_grad()
def attention_maps(model: Blip2Model, images: ImageInput | None = None, *, vision_features: torch.Tensor | None = None,
                   batch_size: int = 64) -> AttentionMaps:
    """Each query's cross-attention over the image tokens in the query-only pass, per
    cross-attention layer, averaged over heads; see :class:`AttentionMaps`."""
    layers = model.qformer.cross_attention_layers
    grid, num_prefix = _grid(model)
    embeds = _embeds(model, images, vision_features)  # (B, N, C)
    out = []
    with _eval_mode(model):
        for chunk in embeds.split(batch_size):
            with capture_cross_attention(model.qformer, layers) as records:
                model.encode_image(chunk)
            out.append(torch.stack([records[i][0].float().mean(dim=1) for i in layers], dim=1))  # (b, L, Q, N)
    maps, prefix = split_grid(torch.cat(out), grid, num_prefix)
    return AttentionMaps(maps=maps, prefix=prefix, layers=list(layers))


# ---------------------------------------------------------------------------- Grad-CAM
def default_gradcam_layer(model: Blip2Model) -> int:
    """The middle cross-attention layer (BLIP-2's layer 6 of 0, 2, ..., 10; LAVIS uses block 6 of BLIP's 12)."""
    layers = model.qformer.cross_attention_layers
    return layers[len(layers) // 2]


def _cam_rows(model: Blip2Model, ids: torch.Tensor, mask: torch.Tensor, kv, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM logits (R, 2) and Grad-CAM (R, N) of R (text, image K/V) rows at ``layer``."""
    with torch.enable_grad(), capture_cross_attention(model.qformer, [layer], leaf=True) as records:
        logits = model.itm_logits(ids, mask, kv)  # (R, 2)
        attn = records[layer][0]  # (R, H, Q, N), a leaf
        (grad,) = torch.autograd.grad(logits[:, 1].sum(), attn)  # rows are independent: per-row gradients
    cam = (grad.clamp(min=0) * attn.detach()).float().mean(dim=(1, 2))  # mean over heads and queries -> (R, N)
    return logits.detach().float(), cam


def _words(enc, row: int, text: str) -> tuple[list[str], list[list[int]]]:
    """The words of tokenised ``text`` (row ``row`` of ``enc``) and the token positions of each."""
    if not enc.is_fast:
        raise ConfigError("per-word Grad-CAM needs a fast (Rust) tokenizer, which maps tokens to words")
    ids = enc.word_ids(row)
    positions: dict[int, list[int]] = {}
    for pos, w in enumerate(ids):
        if w is not None:
            positions.setdefault(w, []).append(pos)
    order = sorted(positions)
    words = []
    for w in order:
        span = enc.word_to_chars(row, w)
        words.append(text[span.start:span.end] if span is not None else str(w))
    return words, [positions[w] for w in order]


def gradcam(model: Blip2Model, images: ImageInput | None, texts: str | Sequence[str], *, layer: int | None = None,
            words: bool = False, vision_features: torch.Tensor | None = None, batch_size: int = 16) -> GradCam:
    """Grad-CAM of the ITM match logit of each (image, text) pair; see the module docstring.

    ``images`` and ``texts`` are paired in order; one image or one text is broadcast against the
    other side (as :meth:`qformer.Blip2.itm`). ``layer``: a cross-attention layer of the Q-Former
    (default :func:`default_gradcam_layer`). ``words``: also a map and a score per word, by
    masking each word in turn (one more ITM row per word).
    """
    if model.tokenizer is None or not model.config.stage1_heads:
        raise ConfigError("Grad-CAM of the ITM score needs the stage-1 heads and the Q-Former tokenizer "
                         "(a stage-1 model, or stage 2 trained with --keep-stage1-heads)")
    layer = default_gradcam_layer(model) if layer is None else layer
    if layer not in model.qformer.cross_attention_layers:
        raise ConfigError(f"layer {layer} has no cross-attention; the cross-attention layers are "
                          f"{model.qformer.cross_attention_layers}")
    grid, num_prefix = _grid(model)
    texts = as_list(texts)
    embeds = _embeds(model, images, vision_features)  # (B, N, C)
    n_img, n_txt = embeds.shape[0], len(texts)
    if n_img != n_txt and 1 not in (n_img, n_txt):
        raise ValueError(f"gradcam pairs images with texts: got {n_img} images and {n_txt} texts")
    n = max(n_img, n_txt)
    texts = texts * n if n_txt == 1 else texts
    single_kv = model.image_kv(embeds) if n_img == 1 else None  # one image: its K/V once

    def kv_of(rows: torch.Tensor, chunk_kv):
        """Image K/V for ITM rows whose images are ``rows`` (positions within the chunk)."""
        return expand_kv(single_kv, rows.numel()) if single_kv is not None else index_kv(chunk_kv, rows)

    logits, cams = [], []
    word_lists: list[list[str]] = []
    word_maps: list[torch.Tensor] = []
    word_scores: list[torch.Tensor] = []
    with _eval_mode(model):
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            enc = encode_texts(model, texts[start:stop])
            ids, mask = enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)
            chunk_kv = None if single_kv is not None else model.image_kv(embeds[start:stop])
            lg, cam = _cam_rows(model, ids, mask, kv_of(torch.arange(stop - start, device=model.device), chunk_kv), layer)
            logits.append(lg)
            cams.append(cam)
            if not words:
                continue
            # One occluded row per word: the word's tokens leave the attention mask.
            rows, masks, counts = [], [], []
            for r in range(stop - start):
                ws, positions = _words(enc, r, texts[start + r])
                word_lists.append(ws)
                counts.append(len(ws))
                for pos in positions:
                    rows.append(r)
                    masks.append(mask[r].clone().index_fill_(0, torch.tensor(pos, device=mask.device), 0))
            occ_lg, occ_cam = [], []
            for s in range(0, len(rows), batch_size):
                sel = torch.tensor(rows[s:s + batch_size], dtype=torch.long, device=model.device)
                lg_o, cam_o = _cam_rows(model, ids[sel], torch.stack(masks[s:s + batch_size]), kv_of(sel, chunk_kv),
                                        layer)
                occ_lg.append(lg_o)
                occ_cam.append(cam_o)
            occ_logit = torch.cat(occ_lg)[:, 1] if rows else torch.zeros(0)  # (W_total,)
            occ_cams = torch.cat(occ_cam) if rows else torch.zeros(0, cam.shape[1])  # (W_total, N)
            offset = 0
            for r, count in enumerate(counts):
                part = slice(offset, offset + count)
                offset += count
                word_maps.append(split_grid((cam[r:r + 1] - occ_cams[part]).clamp(min=0), grid, num_prefix)[0].cpu())
                word_scores.append((lg[r, 1] - occ_logit[part]).cpu())
    logit = torch.cat(logits)  # (N, 2)
    maps, prefix = split_grid(torch.cat(cams), grid, num_prefix)
    return GradCam(maps=maps.cpu(), prefix=prefix.cpu(), itm_logit=logit[:, 1].cpu(),
                   itm_score=logit.softmax(dim=-1)[:, 1].cpu(), layer=layer, texts=texts,
                   words=word_lists if words else None, word_maps=word_maps if words else None,
                   word_scores=word_scores if words else None)


__all__ = ["AttentionMaps", "GradCam", "attention_maps", "capture_cross_attention", "default_gradcam_layer", "gradcam",
           "split_grid"]
