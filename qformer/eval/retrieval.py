"""Image-text retrieval (COCO / Flickr30K protocol): ITC top-k, then ITM re-ranking.

What BLIP-2 / LAVIS do (``compute_sim_matrix`` in ``lavis/models/blip2_models/blip2.py``):

1. ITC similarity of every image with every text: cosine of the normalised embeddings, max
   over the query tokens, no temperature (an N_img x N_txt matrix of dot products).
2. For each image, the top-k texts by ITC are scored by the ITM head (the match logit,
   averaged over the query outputs); its final score for those k texts is
   ``ITM logit + ITC similarity``; every other text keeps a sentinel score (LAVIS: -100).
   Symmetrically for each text over the images.
3. Recall@K from the two score matrices: an image query hits if *any* of its captions is in
   its top K; a text query hits if its image is.

What is done differently here, and why (the numbers are the same, the cost is not):

* **Batched, never one query at a time.** LAVIS runs one Q-Former pass of k pairs per query.
  Here all candidate pairs are pooled and go through the Q-Former ``chunk_size`` pairs at a time.
* **Each pair scored once.** The ITM score of (image, text) does not depend on which direction
  proposed it, so the i2t and t2i candidate sets are merged and deduplicated first (LAVIS
  scores pairs proposed by both directions twice). The ITM work is at most
  ``N_img*k + N_txt*k`` pairs: it grows with N*k, never N^2.
* **Cross-attention K/V computed per chunk, from embeddings kept for all images.** The
  ln_vision outputs of all N images stay in memory (optionally on the CPU); the K/V
  projections are computed for the distinct images of each chunk only, never stored for all
  N. Pairs are sorted by image, so a chunk covers few images and each image's K/V is
  computed about once per direction instead of once per pair.
* **Ranks split the work evenly.** Every rank agrees on the candidate pairs (rank 0's top-k
  is broadcast, so tiny numerical differences between ranks cannot desynchronise them), scores
  a contiguous slice of the deduplicated pairs, and the scores are all-gathered. With
  ``world_size=1`` and no process group nothing distributed is called. (LAVIS splits
  queries and all-reduces two dense N_img x N_txt matrices.)
* Non-candidates get ``-inf`` (not -100), and ties are broken pessimistically when ranking
  (a ground-truth item ranks after every other item with an equal score), so a non-candidate
  can never count as a hit by luck of the sort order.

The ``combine`` option chooses the final score of a candidate: ``"itm+itc"`` (LAVIS),
``"itm"`` (ITM logit only) or ``"itc"`` (no re-ranking at all: the full ITC matrix is the
score, and no ITM pass runs).

Recall values are percentages. Key names say the direction: ``i2t_r1`` is image->text
(LAVIS's ``txt_r1``, "TR@1"), ``t2i_r1`` is text->image (LAVIS's ``img_r1``, "IR@1").
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol

import torch

from ..distributed import all_gather_uneven, broadcast_, resolve_dist
from ..losses import similarity_matrix
from ..med import expand_kv, index_kv
from ..model import Blip2Model

Combine = Literal["itm+itc", "itm", "itc"]
COMBINES: tuple[str, ...] = ("itm+itc", "itm", "itc")
RECALL_KS: tuple[int, ...] = (1, 5, 10)
#: LAVIS's retrieval evaluation tokenises with max_length=35 (training uses 32).
LAVIS_EVAL_MAX_TXT_LEN = 35


class ItmScorer(Protocol):
    """Scores P (image, text) pairs given by global indices: ``(P,), (P,) -> (P,)`` floats,
    higher = better match (BLIP-2: the ITM match logit)."""

    def __call__(self, image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor: ...


class SimMatrices(NamedTuple):
    """Final retrieval scores. Candidates hold their combined score, others ``-inf``."""

    i2t: torch.Tensor  # (N_img, N_txt)
    t2i: torch.Tensor  # (N_txt, N_img)
    num_itm_pairs: int  # distinct pairs scored by the ITM head (all ranks together)
    k_i2t: int  # candidates per image (k clamped to N_txt)
    k_t2i: int  # candidates per text (k clamped to N_img)
    itc: torch.Tensor | None = None  # (N_img, N_txt) the ITC similarity the candidates came from


class RetrievalResult(dict):
    """``dict[str, float]`` of recall metrics (percent) plus optional details.

    Keys: ``i2t_r1, i2t_r5, i2t_r10, i2t_r_mean, t2i_r1, t2i_r5, t2i_r10, t2i_r_mean, r_mean``.
    Attributes: ``scores_i2t`` / ``scores_t2i`` (only with ``return_scores=True``), ``ranks_i2t``
    / ``ranks_t2i`` (0-based rank of the best ground truth of each query), ``k_i2t``, ``k_t2i``,
    ``num_itm_pairs``, ``combine``; ``itc_only``: the same recall metrics of the ITC similarity
    alone, before re-ranking (from the same pass; None for ``combine="itc"``).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scores_i2t: torch.Tensor | None = None
        self.scores_t2i: torch.Tensor | None = None
        self.ranks_i2t: torch.Tensor | None = None
        self.ranks_t2i: torch.Tensor | None = None
        self.k_i2t = 0
        self.k_t2i = 0
        self.num_itm_pairs = 0
        self.combine = ""
        self.itc_only: dict[str, float] | None = None

    def metadata(self) -> dict:
        """What :mod:`qformer.eval.report` writes next to the numbers."""
        return {"combine": self.combine, "k_i2t": self.k_i2t, "k_t2i": self.k_t2i, "num_itm_pairs": self.num_itm_pairs}


# ---------------------------------------------------------------------------- helpers
def _split_sizes(n: int, parts: int) -> list[int]:
    """Sizes of ``n`` items split into ``parts`` contiguous slices (as ``tensor_split``)."""
    return [n // parts + (1 if r < n % parts else 0) for r in range(parts)]


def _progress(iterable: Iterable, *, enabled: bool, **kwargs: Any) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


def flatten_captions(captions: Sequence[Sequence[str]]) -> tuple[list[str], list[int], list[list[int]]]:
    """Captions grouped per image (COCO: 5 each) -> ``(texts, txt2img, img2txt)``."""
    texts: list[str] = []
    txt2img: list[int] = []
    img2txt: list[list[int]] = []
    for i, caps in enumerate(captions):
        img2txt.append(list(range(len(texts), len(texts) + len(caps))))
        texts.extend(caps)
        txt2img.extend([i] * len(caps))
    return texts, txt2img, img2txt


def _as_lists(mapping: Sequence[int | Sequence[int]], n: int, n_targets: int, what: str) -> list[list[int]]:
    if len(mapping) != n:
        raise ValueError(f"{what} has {len(mapping)} entries for {n} queries")
    out = []
    for q, targets in enumerate(mapping):
        scalar = isinstance(targets, numbers.Integral) or getattr(targets, "ndim", None) == 0
        items = [int(targets)] if scalar else [int(t) for t in targets]  # type: ignore[union-attr]
        if not items:
            raise ValueError(f"{what}[{q}] is empty: every query needs a ground truth")
        if min(items) < 0 or max(items) >= n_targets:
            raise ValueError(f"{what}[{q}] = {items} is out of range [0, {n_targets})")
        out.append(items)
    return out


# ---------------------------------------------------------------------------- ITC
@torch.no_grad()
def itc_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor, *, max_elements: int = 1 << 26) -> torch.Tensor:
    """BLIP-2's ITC similarity (max over queries, no temperature), ``(Ni, Q, E) x (Nt, E) ->
    (Ni, Nt)`` float32, computed a block of images at a time so the ``(i, t, q)``
    intermediate stays under ``max_elements`` (COCO 5k x 25k x 32 queries would be 4e9)."""
    ni, q, _ = image_feats.shape
    nt = text_feats.shape[0]
    out = torch.empty(ni, nt, dtype=torch.float32, device=image_feats.device)
    rows = max(1, max_elements // max(1, nt * q))
    text_feats = text_feats.to(image_feats.device, image_feats.dtype)
    for s in range(0, ni, rows):
        out[s : s + rows] = similarity_matrix(image_feats[s : s + rows], text_feats).float()
    return out


# ---------------------------------------------------------------------------- re-ranking
def _score_pairs(
    image_index: torch.Tensor,
    text_index: torch.Tensor,
    itm_scorer: ItmScorer,
    *,
    chunk_size: int,
    rank: int,
    world_size: int,
    progress: bool,
) -> torch.Tensor:
    """ITM scores of all P pairs: this rank scores its contiguous slice in chunks, then the
    slices are all-gathered (padded to equal length, sizes known to every rank)."""
    p = image_index.numel()
    sizes = _split_sizes(p, world_size)
    start = sum(sizes[:rank])
    end = start + sizes[rank]
    device = image_index.device
    pieces = []
    starts = range(start, end, chunk_size)
    for s in _progress(starts, enabled=progress and rank == 0, desc="ITM re-ranking", unit="chunk"):
        e = min(end, s + chunk_size)
        scores = itm_scorer(image_index[s:e], text_index[s:e])
        if scores.shape != (e - s,):
            raise ValueError(f"the ITM scorer returned shape {tuple(scores.shape)} for {e - s} pairs")
        pieces.append(scores.detach().float().to(device))
    local = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.float32, device=device)
    return all_gather_uneven(local, sizes, world_size=world_size)


@torch.no_grad()
def rerank_with_itm(
    sim: torch.Tensor,
    itm_scorer: ItmScorer | None,
    *,
    k: int = 128,
    combine: Combine = "itm+itc",
    chunk_size: int = 128,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = False,
    directions: Sequence[str] = ("i2t", "t2i"),
) -> SimMatrices:
    """Re-rank the ITC top-k of every query in both directions with the ITM scorer.

    Args:
        sim: (N_img, N_txt) ITC similarity (e.g. :func:`itc_similarity`).
        itm_scorer: see :class:`ItmScorer`; called with global indices on ``sim``'s device,
            ``chunk_size`` pairs at most per call, each distinct pair exactly once over all
            ranks. Unused (may be None) for ``combine="itc"``.
        k: candidates per query, clamped to the number of candidates.
        combine: ``"itm+itc"`` (LAVIS), ``"itm"`` or ``"itc"`` (no re-ranking; the ITC matrix).
        rank, world_size: default to the process group's (or 0, 1 without one). Every rank
            must call this with the same ``sim`` shape; the returned matrices are complete on
            every rank.
        directions: which queries to re-rank: ``"i2t"`` (images -> texts), ``"t2i"`` or both;
            a direction left out gets no candidates (its matrix is all ``-inf``, its k is 0),
            e.g. text search over images (:mod:`qformer.search`).
    """
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    sim = sim.float()
    ni, nt = sim.shape
    unknown = set(directions) - {"i2t", "t2i"}
    if unknown or not directions:
        raise ValueError(f"directions must be 'i2t' and/or 't2i', got {list(directions)}")
    k_i2t, k_t2i = min(k, nt), min(k, ni)
    if combine == "itc":
        return SimMatrices(sim.clone(), sim.t().contiguous(), 0, nt, ni)
    if itm_scorer is None:
        raise ValueError(f"combine={combine!r} needs an ITM scorer")
    rank, world_size = resolve_dist(rank, world_size)
    k_i2t = k_i2t if "i2t" in directions else 0
    k_t2i = k_t2i if "t2i" in directions else 0

    # One candidate set for all ranks, whatever their numerics: rank 0's.
    top_i2t = broadcast_(sim.topk(k_i2t, dim=1).indices, world_size=world_size)  # (Ni, k)
    top_t2i = broadcast_(sim.t().topk(k_t2i, dim=1).indices, world_size=world_size)  # (Nt, k)

    # Pair key = image * Nt + text: unique() both deduplicates and sorts image-major, which
    # is the order that lets each chunk reuse one image's cross-attention K/V.
    dev = sim.device
    keys_i2t = torch.arange(ni, device=dev)[:, None] * nt + top_i2t
    keys_t2i = top_t2i * nt + torch.arange(nt, device=dev)[:, None]
    keys, inverse = torch.unique(torch.cat([keys_i2t.reshape(-1), keys_t2i.reshape(-1)]), return_inverse=True)
    itm = _score_pairs(
        keys // nt, keys % nt, itm_scorer,
        chunk_size=chunk_size, rank=rank, world_size=world_size, progress=progress,
    )
    itm_i2t = itm[inverse[: ni * k_i2t]].view(ni, k_i2t)
    itm_t2i = itm[inverse[ni * k_i2t :]].view(nt, k_t2i)
    if combine == "itm+itc":
        itm_i2t = itm_i2t + sim.gather(1, top_i2t)
        itm_t2i = itm_t2i + sim.t().gather(1, top_t2i)
    scores_i2t = sim.new_full((ni, nt), float("-inf")).scatter_(1, top_i2t, itm_i2t)
    scores_t2i = sim.new_full((nt, ni), float("-inf")).scatter_(1, top_t2i, itm_t2i)
    return SimMatrices(scores_i2t, scores_t2i, int(keys.numel()), k_i2t, k_t2i, sim)


def compute_sim_matrix(image_feats: torch.Tensor, text_feats: torch.Tensor, itm_scorer: ItmScorer | None,
                       **rerank: Any) -> SimMatrices:
    """LAVIS's ``compute_sim_matrix`` on precomputed features: ITC similarity of normalised
    ``image_feats`` (N_img, Q, E) and ``text_feats`` (N_txt, E), then :func:`rerank_with_itm`
    (``rerank``: its keyword arguments ``k``, ``combine``, ``chunk_size``, ``rank``, ...)."""
    return rerank_with_itm(itc_similarity(image_feats, text_feats), itm_scorer, **rerank)


# ---------------------------------------------------------------------------- metrics
def best_gt_rank(scores: torch.Tensor, targets: Sequence[Sequence[int]], *, block: int = 1024) -> torch.Tensor:
    """0-based rank of the best-scored ground truth of each query (row), ties pessimistic:
    the number of non-ground-truth items scoring at least as high as the best ground truth."""
    n, m = scores.shape
    ranks = torch.empty(n, dtype=torch.long)
    lengths = torch.tensor([len(t) for t in targets])
    rows_all = torch.repeat_interleave(torch.arange(n), lengths)
    cols_all = torch.tensor([c for t in targets for c in t], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    for s in range(0, n, block):
        e = min(n, s + block)
        part = scores[s:e].float()
        mask = torch.zeros(e - s, m, dtype=torch.bool, device=part.device)
        a, b = int(offsets[s]), int(offsets[e])
        mask[(rows_all[a:b] - s).to(part.device), cols_all[a:b].to(part.device)] = True
        best = part.masked_fill(~mask, float("-inf")).amax(dim=1, keepdim=True)
        ranks[s:e] = ((part >= best) & ~mask).sum(dim=1).cpu()
    return ranks


def retrieval_metrics(
    scores_i2t: torch.Tensor,
    scores_t2i: torch.Tensor,
    txt2img: Sequence[int | Sequence[int]],
    img2txt: Sequence[Sequence[int]] | None = None,
    *,
    ks: Sequence[int] = RECALL_KS,
) -> RetrievalResult:
    """Recall@K (percent) in both directions from the score matrices.

    ``txt2img[t]``: the image of text t (or a list of images); ``img2txt[i]``: the texts of
    image i (derived from ``txt2img`` when None). An image query hits at K if any of its
    texts ranks in the top K.
    """
    ni, nt = scores_i2t.shape
    if tuple(scores_t2i.shape) != (nt, ni):
        raise ValueError(f"scores_t2i has shape {tuple(scores_t2i.shape)}, expected {(nt, ni)}")
    gt_t2i = _as_lists(txt2img, nt, ni, "txt2img")
    if img2txt is None:
        derived: list[list[int]] = [[] for _ in range(ni)]
        for t, imgs in enumerate(gt_t2i):
            for i in imgs:
                derived[i].append(t)
        img2txt = derived
    gt_i2t = _as_lists(img2txt, ni, nt, "img2txt")
    ranks_i2t = best_gt_rank(scores_i2t, gt_i2t)
    ranks_t2i = best_gt_rank(scores_t2i, gt_t2i)
    out = RetrievalResult()
    for name, ranks in (("i2t", ranks_i2t), ("t2i", ranks_t2i)):
        values = [100.0 * float((ranks < kk).double().mean()) for kk in ks]
        for kk, v in zip(ks, values):
            out[f"{name}_r{kk}"] = v
        out[f"{name}_r_mean"] = sum(values) / len(values)
    out["r_mean"] = (out["i2t_r_mean"] + out["t2i_r_mean"]) / 2
    out.ranks_i2t, out.ranks_t2i = ranks_i2t, ranks_t2i
    return out


def retrieval_from_features(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    itm_scorer: ItmScorer | None,
    txt2img: Sequence[int | Sequence[int]],
    img2txt: Sequence[Sequence[int]] | None = None,
    *,
    return_scores: bool = False,
    **rerank: Any,
) -> RetrievalResult:
    """:func:`compute_sim_matrix` then :func:`retrieval_metrics`: the whole protocol on
    precomputed features and any ITM scorer (a fake one in tests); ``rerank``: the keyword
    arguments of :func:`rerank_with_itm`."""
    sims = compute_sim_matrix(image_feats, text_feats, itm_scorer, **rerank)
    return _finish(sims, txt2img, img2txt, combine=rerank.get("combine", "itm+itc"), return_scores=return_scores)


def _finish(sims: SimMatrices, txt2img, img2txt, *, combine: str, return_scores: bool) -> RetrievalResult:
    out = retrieval_metrics(sims.i2t, sims.t2i, txt2img, img2txt)
    out.k_i2t, out.k_t2i, out.num_itm_pairs, out.combine = sims.k_i2t, sims.k_t2i, sims.num_itm_pairs, combine
    if sims.itc is not None:  # what ITM re-ranking changed, at no extra model cost
        out.itc_only = dict(retrieval_metrics(sims.itc, sims.itc.t(), txt2img, img2txt))
    if return_scores:
        out.scores_i2t, out.scores_t2i = sims.i2t, sims.t2i
    return out


# ---------------------------------------------------------------------------- the model
class Blip2ItmScorer:
    """ITM scorer over a :class:`~qformer.model.Blip2Model`: the match logit (index 1 of the ITM
    head, averaged over the query outputs, as LAVIS's ``compute_itm``).

    Holds the ln_vision image embeddings of all images and the tokenised texts; per call it
    computes the cross-attention K/V of the *distinct* images of the chunk only and reuses
    them for every pair of that image, and trims the text padding to the chunk's longest text.
    """

    def __init__(self, model: Blip2Model, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        if input_ids.shape != attention_mask.shape:
            raise ValueError("input_ids and attention_mask must have the same shape")
        self.model = model
        self.image_embeds = image_embeds  # (N_img, N, C), any device
        self.input_ids = input_ids  # (N_txt, L)
        self.attention_mask = attention_mask

    @torch.no_grad()
    def __call__(self, image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        dev = self.model.device
        uniq, inverse = torch.unique(image_index, return_inverse=True)
        embeds = self.image_embeds[uniq.to(self.image_embeds.device)].to(dev, non_blocking=True)
        kv_unique = self.model.image_kv(embeds)
        if uniq.numel() == 1:  # the usual i2t chunk: a view, no copy
            kv = expand_kv(kv_unique, image_index.numel())
        else:
            kv = index_kv(kv_unique, inverse.to(dev))
        t = text_index.to(self.input_ids.device)
        ids, mask = self.input_ids[t], self.attention_mask[t]
        width = int(mask.any(dim=0).nonzero().max()) + 1 if mask.any() else mask.shape[1]
        ids, mask = ids[:, :width].to(dev), mask[:, :width].to(dev)
        return self.model.itm_logits(ids, mask, kv)[:, 1].float()


def _tokenize_texts(
    model: Blip2Model, texts: Sequence[str] | Mapping[str, torch.Tensor] | tuple[torch.Tensor, torch.Tensor], max_txt_len: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(texts, tuple) and len(texts) == 2 and all(isinstance(t, torch.Tensor) for t in texts):
        return texts[0].cpu(), texts[1].cpu()
    if isinstance(texts, Mapping):
        return texts["input_ids"].cpu(), texts["attention_mask"].cpu()
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer: pass texts pre-tokenised as (input_ids, attention_mask)")
    limit = model.config.qformer.max_position_embeddings
    length = min(max_txt_len or model.config.max_txt_len, limit)
    enc = model.tokenizer(list(texts), padding="longest", truncation=True, max_length=length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _image_batches(images: torch.Tensor | Iterable[Any], batch_size: int) -> Iterable[tuple[str, torch.Tensor]]:
    """Yield ("pixels" | "vision_features", tensor) batches from a tensor or a loader."""
    if isinstance(images, torch.Tensor):
        for chunk in images.split(batch_size):
            yield "pixels", chunk
        return
    for batch in images:
        if isinstance(batch, torch.Tensor):
            yield "pixels", batch
        elif isinstance(batch, Mapping):
            for key, kind in (("pixel_values", "pixels"), ("image", "pixels"), ("vision_features", "vision_features")):
                if key in batch:
                    yield kind, batch[key]
                    break
            else:
                raise ValueError(f"an image batch dict needs 'pixel_values', 'image' or 'vision_features'; got {sorted(batch)}")
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            yield "pixels", batch[0]
        else:
            raise TypeError(f"cannot read images from a batch of type {type(batch).__name__}")


@torch.no_grad()
def encode_images(
    model: Blip2Model,
    images: torch.Tensor | Iterable[Any],
    *,
    batch_size: int = 64,
    embeds_device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ln_vision embeddings (N, N_tok, C) on ``embeds_device``, ITC features (N, Q, E))."""
    embeds, feats = [], []
    total = None
    if isinstance(images, torch.Tensor):
        total = -(-images.shape[0] // batch_size)
    elif hasattr(images, "__len__"):
        total = len(images)  # type: ignore[arg-type]
    store = torch.device(embeds_device) if embeds_device is not None else model.device
    for kind, batch in _progress(_image_batches(images, batch_size), enabled=progress, total=total, desc="images", unit="batch"):
        batch = batch.to(model.device)
        e = model.embed_image(batch) if kind == "pixels" else model.embed_image(vision_features=batch)
        feats.append(model.image_features(model.encode_image(e).query_output).float())
        embeds.append(e.to(store))
    if not embeds:
        raise ValueError("no images")
    return torch.cat(embeds), torch.cat(feats)


@torch.no_grad()
def encode_texts(
    model: Blip2Model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, batch_size: int = 256, progress: bool = False
) -> torch.Tensor:
    """ITC text features (N_txt, E), a batch at a time, padding trimmed per batch."""
    out = []
    starts = range(0, input_ids.shape[0], batch_size)
    for s in _progress(starts, enabled=progress, desc="texts", unit="batch"):
        ids, mask = input_ids[s : s + batch_size], attention_mask[s : s + batch_size]
        width = int(mask.any(dim=0).nonzero().max()) + 1 if mask.any() else mask.shape[1]
        ids, mask = ids[:, :width].to(model.device), mask[:, :width].to(model.device)
        out.append(model.text_features(model.encode_text(ids, mask, cls_only=True)).float())
    return torch.cat(out)


@torch.no_grad()
def evaluate_retrieval(
    model: Blip2Model,
    images: torch.Tensor | Iterable[Any],
    texts: Sequence[str] | Mapping[str, torch.Tensor] | tuple[torch.Tensor, torch.Tensor],
    txt2img: Sequence[int | Sequence[int]],
    img2txt: Sequence[Sequence[int]] | None = None,
    *,
    k: int = 128,
    combine: Combine = "itm+itc",
    batch_size: int = 64,
    text_batch_size: int = 256,
    chunk_size: int = 128,
    max_txt_len: int | None = LAVIS_EVAL_MAX_TXT_LEN,
    embeds_device: torch.device | str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    return_scores: bool = False,
) -> RetrievalResult:
    """Image<->text retrieval of ``model`` with ITC top-k + ITM re-ranking (BLIP-2 protocol).

    Args:
        images: preprocessed pixels (N, 3, H, W), or an iterable of batches (tensors, dicts
            with ``pixel_values`` / ``image`` / ``vision_features``, or tuples whose first item
            is the pixels), in image-index order. With several ranks each rank reads *all*
            images (pass an unsharded loader); the ITM work, the expensive part, is split.
        texts: strings (tokenised with the model's tokenizer, ``max_txt_len`` tokens), or
            pre-tokenised ``(input_ids, attention_mask)`` / a dict with those keys.
        txt2img, img2txt: ground truth (see :func:`retrieval_metrics`).
        k: ITC candidates re-ranked per query (BLIP-2: 128 on COCO and Flickr30K).
        combine: ``"itm+itc"`` (LAVIS), ``"itm"``, or ``"itc"`` (no ITM pass).
        batch_size / text_batch_size: images / texts per feature pass.
        chunk_size: (image, text) pairs per ITM pass through the Q-Former.
        embeds_device: where the ln_vision embeddings of all images are kept (default: the
            model's device; ``"cpu"`` saves accelerator memory at COCO scale, ~7 GB for
            5k images with ViT-g in fp32).
        progress: tqdm bars (rank 0 only for the ITM pass).
        return_scores: keep the (N_img, N_txt) and (N_txt, N_img) score matrices on the result.
    """
    rank, world_size = resolve_dist(rank, world_size)
    was_training = model.training
    model.eval()
    try:
        ids, mask = _tokenize_texts(model, texts, max_txt_len)
        if ids.shape[0] != len(txt2img):
            raise ValueError(f"{ids.shape[0]} texts but txt2img has {len(txt2img)} entries")
        show = progress and rank == 0
        text_feats = encode_texts(model, ids, mask, batch_size=text_batch_size, progress=show)
        image_embeds, image_feats = encode_images(
            model, images, batch_size=batch_size, embeds_device=embeds_device, progress=show
        )
        if img2txt is not None and len(img2txt) != image_feats.shape[0]:
            raise ValueError(f"{image_feats.shape[0]} images but img2txt has {len(img2txt)} entries")
        scorer = Blip2ItmScorer(model, image_embeds, ids, mask)
        sims = compute_sim_matrix(
            image_feats, text_feats, scorer, k=k, combine=combine, chunk_size=chunk_size,
            rank=rank, world_size=world_size, progress=show,
        )
        return _finish(sims, txt2img, img2txt, combine=combine, return_scores=return_scores)
    finally:
        model.train(was_training)


__all__ = [
    "Blip2ItmScorer",
    "COMBINES",
    "Combine",
    "ItmScorer",
    "LAVIS_EVAL_MAX_TXT_LEN",
    "RetrievalResult",
    "SimMatrices",
    "best_gt_rank",
    "compute_sim_matrix",
    "encode_images",
    "encode_texts",
    "evaluate_retrieval",
    "flatten_captions",
    "itc_similarity",
    "rerank_with_itm",
    "retrieval_from_features",
    "retrieval_metrics",
]
