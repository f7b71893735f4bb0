"""Search your own images by text: an on-disk index of ITC image features, queried by ITC and
re-ranked by ITM exactly as retrieval evaluation does (:mod:`qformer.eval.retrieval`).

    index, stats = build_index(model, "my_photos/", "my_photos.index")   # or update_index: only new images
    hits = index.search(model, ["a dog on a sofa"], k=5)                # ITC top-16, re-ranked by ITM

What the index holds (a folder): ``features.safetensors`` with the normalised query embeddings
``(N, Q, E)`` of every image (float32) and ``index.json`` with each image's key (its path
relative to a folder, else the data's image id), where to read it again and a stamp (size and
modification time of a file, a content hash otherwise), plus a fingerprint of the model.

* **Build** -- the images are read by DataLoader workers (``num_workers``) while the model runs;
  with several processes (``accelerate launch``) each rank encodes a contiguous slice and the
  slices are all-gathered; rank 0 writes. Unreadable images are skipped and listed.
* **Update** -- images whose key and stamp are unchanged keep their features; new or changed
  ones are encoded, removed ones dropped. A different model (fingerprint) re-encodes everything.
* **Query** -- ITC: cosine of the text embedding with every query embedding, max over queries,
  as :func:`~qformer.eval.retrieval.itc_similarity`, by a plain matrix product or, for large
  collections, a faiss index over the ``N*Q`` query embeddings (``pip install
  'qformer[search]'``): exact (``IndexFlatIP``) by default, so both give the same top-k; any
  ``faiss.index_factory`` string (e.g. ``"HNSW32"``) trades exactness for speed. Then
  ``rerank`` candidates per text are re-read, run through the tower and scored by the ITM head
  (:func:`~qformer.eval.retrieval.rerank_with_itm`, ``itm+itc`` as LAVIS).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from .data import open_caption_source
from .data.cache import weights_fingerprint
from .data.reading import SkipSample, image_content_key, read_image, read_image_bytes
from .data.sources import CaptionRecord
from .distributed import all_gather_uneven, gather_objects, resolve_dist
from .errors import ConfigError, DataError
from .eval.retrieval import Blip2ItmScorer, itc_similarity, rerank_with_itm
from .generation import as_list
from .inference import text_features_of, tokenize
from .io import atomic_write_json
from .model import Blip2Model

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------- what to index
@dataclass
class ImageItem:
    """One image of a collection: ``key`` names it in results, ``ref`` reads it again (a path,
    bytes or a PIL image), ``stamp`` changes when the image does."""

    key: str
    ref: Any
    stamp: str


def _file_stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def collect_images(spec: Any, **source_options: Any) -> list[ImageItem]:
    """The images of a folder (every image file below it, by suffix, keyed by relative path) or of
    any dataset the recipes read (a .jsonl / .csv / webdataset / hub dataset ...; one item per
    distinct image id, keyed by the image's path or ``source#id``)."""
    if isinstance(spec, (str, os.PathLike)) and Path(spec).expanduser().is_dir():
        root = Path(spec).expanduser()
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        return [ImageItem(p.relative_to(root).as_posix(), str(p), _file_stamp(p)) for p in files]
    items: dict[str, ImageItem] = {}
    seen_ids: set[Any] = set()
    for record in open_caption_source(spec, **source_options):
        if not isinstance(record, CaptionRecord) or record.image_id in seen_ids:
            continue
        seen_ids.add(record.image_id)
        ref = record.image
        if isinstance(ref, (str, os.PathLike)):
            path = Path(ref)
            key, stamp = str(path), _file_stamp(path) if path.is_file() else "missing"
        else:
            key = f"{record.source}#{record.image_id}"
            try:
                stamp = image_content_key(read_image_bytes(ref, where=key))
            except SkipSample:
                stamp = "missing"
        items.setdefault(key, ImageItem(key, ref, stamp))
    return list(items.values())


def model_fingerprint(model: Blip2Model) -> str:
    """Identity of the ITC image features: the architecture and the weights on the image path."""
    h = hashlib.blake2b(digest_size=16)
    config = model.config.to_dict()
    config["vision"].pop("pretrained", None)  # where the weights came from, not what they are
    config.pop("llm", None)  # not on the image path
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for part in (model.vision.model, model.ln_vision, model.qformer, model.vision_proj):
        h.update(weights_fingerprint(part).encode())
    h.update(weights_fingerprint(torch.nn.ParameterList([model.query_tokens])).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------- encoding
class _Pixels(Dataset):
    """Resized pixels of items (uint8, see ``ImagePreprocessor.resize``; None for an unreadable image),
    read in DataLoader workers."""

    def __init__(self, items: Sequence[ImageItem], preprocess) -> None:
        self.items, self.preprocess = items, preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        item = self.items[i]
        try:
            return i, self.preprocess.resize(read_image(item.ref, where=item.key)), ""  # uint8 (3, S, S) mostly
        except SkipSample as exc:
            return i, None, exc.reason


def _collate(preprocess: Any, batch: list[tuple[int, torch.Tensor | None, str]]
             ) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """(indices of the readable images, their pixels stacked (b, 3, S, S), (index, reason) of every
    item). Stacked in the worker, so a batch crosses to the main process as one shared-memory
    tensor instead of one per image (which cost about as much as the Q-Former's forward)."""
    good = [(i, px) for i, px, _ in batch if px is not None]
    pixels = [px for _, px in good]
    if any(px.is_floating_point() for px in pixels):  # a high-bit-depth grey image came normalized already
        pixels = [px if px.is_floating_point() else preprocess.normalize(px) for px in pixels]
    return [i for i, _ in good], torch.stack(pixels) if pixels else None, [(i, why) for i, _, why in batch]


def encode_items(model: Blip2Model, items: Sequence[ImageItem], *, batch_size: int = 64, num_workers: int = 0,
                 progress: bool = False) -> tuple[torch.Tensor, list[str]]:
    """ITC features (n, Q, E) float32 of ``items`` (rows of unreadable images are zero) and the
    skip reason of each item ("" when it was encoded)."""
    q, e = model.num_query_tokens, model.config.embed_dim
    feats = torch.zeros(len(items), q, e)
    reasons = [""] * len(items)
    preprocess = model.vision.preprocessor
    loader = DataLoader(_Pixels(items, preprocess), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=functools.partial(_collate, preprocess))
    from tqdm.auto import tqdm

    for good, pixels, why in tqdm(loader, desc="indexing images", unit="batch", disable=not progress):
        for i, reason in why:
            reasons[i] = reason
        if pixels is not None:
            with torch.inference_mode():  # features only: no autograd bookkeeping at all
                if not pixels.is_floating_point():  # uint8: normalized here, once per batch
                    pixels = preprocess.normalize(pixels)
                pixels = pixels.to(model.device)  # (b, 3, S, S)
                out = model.image_features(model.encode_image(model.embed_image(pixels)).query_output)  # (b, Q, E)
            feats[torch.tensor(good)] = out.float().cpu()
    return feats, reasons


# ---------------------------------------------------------------------------- the index
@dataclass
class SearchHit:
    key: str  # the image's key (relative path, or the data's id)
    score: float  # the ranking score: ITM logit + ITC similarity when re-ranked, else ITC
    itc: float  # ITC similarity (cosine, max over queries)
    itm: float | None = None  # ITM match logit (re-ranked candidates only; score = itm + itc)


@dataclass
class BuildStats:
    total: int = 0  # images in the collection
    encoded: int = 0  # encoded in this call
    kept: int = 0  # features reused from the existing index
    removed: int = 0  # dropped from the index (no longer in the collection)
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why it could not be read
    rebuilt: bool = False  # the model changed: everything re-encoded


class ImageIndex:
    """ITC features of a collection of images, searchable by text; see the module docstring."""

    def __init__(self, features: torch.Tensor, items: list[ImageItem], *, fingerprint: str,
                 directory: Path | None = None) -> None:
        if features.shape[0] != len(items):
            raise ValueError(f"{features.shape[0]} feature rows for {len(items)} images")
        self.features = features  # (N, Q, E) float32, normalised
        self.items = items
        self.fingerprint = fingerprint
        self.directory = directory
        self._faiss: dict[str, Any] = {}
        self._checked: tuple[weakref.ref, int] | None = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def keys(self) -> list[str]:
        return [it.key for it in self.items]

    # -------------------------------------------------------------------- disk
    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / "features.safetensors.tmp"
        save_file({"features": self.features.contiguous()}, str(tmp))
        os.replace(tmp, directory / "features.safetensors")
        refs = [it.ref if isinstance(it.ref, (str, os.PathLike)) else None for it in self.items]
        atomic_write_json(directory / "index.json", {
            "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint,
            "shape": list(self.features.shape),
            "images": [{"key": it.key, "path": None if r is None else str(r), "stamp": it.stamp}
                       for it, r in zip(self.items, refs)],
        })
        self.directory = directory
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ImageIndex":
        directory = Path(directory)
        meta_path = directory / "index.json"
        if not meta_path.is_file():
            raise DataError(f"{directory}: not an image index (no index.json); build one with build_index")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{meta_path}: index format {meta.get('format_version')}, expected {FORMAT_VERSION}")
        features = load_file(str(directory / "features.safetensors"))["features"]
        items = [ImageItem(m["key"], m["path"], m["stamp"]) for m in meta["images"]]
        return cls(features, items, fingerprint=meta["fingerprint"], directory=directory)

    # -------------------------------------------------------------------- ITC
    def itc_topk(self, text_feats: torch.Tensor, k: int, *, backend: str = "torch",
                 faiss_factory: str = "Flat") -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, indices), each (T, k'): the ``k`` best images of each text feature (T, E) by ITC,
        best first (k' = min(k, N)). ``backend``: "torch" (a matrix product) or "faiss"."""
        k = min(k, len(self))
        if k < 1:
            raise DataError("the index is empty")
        if backend == "torch":
            sim = itc_similarity(self.features, text_feats.float())  # (N, T)
            scores, index = sim.t().topk(k, dim=1)
            return scores, index
        if backend != "faiss":
            raise ConfigError(f"search backend must be 'torch' or 'faiss', got {backend!r}")
        return self._faiss_topk(text_feats, k, faiss_factory)

    def _faiss_topk(self, text_feats: torch.Tensor, k: int, factory: str) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            import faiss
        except ImportError as exc:
            raise ConfigError("the faiss backend needs faiss: pip install 'qformer[search]' (faiss-cpu)") from exc
        n, q, e = self.features.shape
        index = self._faiss.get(factory)
        if index is None:
            index = faiss.index_factory(e, factory, faiss.METRIC_INNER_PRODUCT)
            vectors = self.features.reshape(n * q, e).contiguous().numpy()
            if not index.is_trained:
                index.train(vectors)
            index.add(vectors)
            self._faiss[factory] = index
        # An image's ITC score is the best of its Q query vectors: the top k*Q vectors hold at
        # least k distinct images, and each image's first (best) vector is its score.
        sims, ids = index.search(text_feats.float().contiguous().numpy(), min(n * q, k * q))
        scores, images = torch.full((len(ids), k), float("-inf")), torch.full((len(ids), k), -1, dtype=torch.long)
        for t, (row_s, row_i) in enumerate(zip(sims, ids)):
            seen: dict[int, float] = {}
            for s, v in zip(row_s.tolist(), row_i.tolist()):
                if v >= 0 and v // q not in seen:
                    seen[v // q] = s
                    if len(seen) == k:
                        break
            scores[t, :len(seen)] = torch.tensor(list(seen.values()))
            images[t, :len(seen)] = torch.tensor(list(seen.keys()))
        return scores, images

    # -------------------------------------------------------------------- search
    @torch.no_grad()
    def search(self, model: Blip2Model, texts: str | Sequence[str], *, k: int = 10, rerank: int = 16,
               backend: str = "torch", faiss_factory: str = "Flat", batch_size: int = 32) -> list[list[SearchHit]]:
        """The ``k`` best images of each text. ``rerank`` > 0: the ITC top ``max(rerank, k)`` are
        re-read and re-ranked by ITM + ITC (BLIP-2's retrieval protocol; a candidate that cannot be
        read any more is left out: update the index); 0: ITC alone."""
        if model.config.stage1_heads is False or model.tokenizer is None:
            raise ConfigError("search needs the ITC / ITM heads and the Q-Former tokenizer (a stage-1 model)")
        versions = sum(p._version for p in model.parameters())  # changes with any in-place update
        checked = self._checked is not None and self._checked[0]() is model and self._checked[1] == versions
        if not checked and self.fingerprint != model_fingerprint(model):
            raise ConfigError(f"the index {self.directory or ''} was built with another model; rebuild it "
                              "(update_index re-encodes everything)")
        self._checked = (weakref.ref(model), versions)  # this model, these weights: checked once, not per query
        texts = as_list(texts)
        was_training = model.training
        model.eval()
        try:
            text_feats = text_features_of(model, texts).float().cpu()  # (T, E)
            if rerank <= 0:
                scores, index = self.itc_topk(text_feats, k, backend=backend, faiss_factory=faiss_factory)
                return [[SearchHit(self.items[i].key, float(s), float(s)) for s, i in zip(rs, ri) if i >= 0]
                        for rs, ri in zip(scores.tolist(), index.tolist())]
            return self._rerank(model, texts, text_feats, k, max(rerank, k), backend, faiss_factory, batch_size)
        finally:
            model.train(was_training)

    def _rerank(self, model, texts, text_feats, k, rerank, backend, factory, batch_size) -> list[list[SearchHit]]:
        _, cand = self.itc_topk(text_feats, rerank, backend=backend, faiss_factory=factory)  # (T, r)
        readable, decoded = [], []
        for i in torch.unique(cand[cand >= 0]).tolist():  # the candidates of every text, read once
            try:
                decoded.append(read_image(self.items[i].ref, where=self.items[i].key))
                readable.append(i)
            except SkipSample:  # gone or broken since the index was built: it cannot be re-ranked
                continue
        if not readable:
            raise DataError("none of the candidate images can be read any more; update the index")
        images = torch.tensor(readable)
        pixels = model.vision.preprocess(decoded)
        embeds = torch.cat([model.embed_image(p.to(model.device)) for p in pixels.split(batch_size)])  # (C, N, C)
        sim = itc_similarity(self.features[images], text_feats)  # (C, T): ITC of the candidates
        ids, mask = tokenize(model, texts)
        scorer = Blip2ItmScorer(model, embeds, ids.cpu(), mask.cpu())
        final = rerank_with_itm(sim.to(model.device), scorer, k=rerank, combine="itm+itc", directions=("t2i",),
                                chunk_size=batch_size, world_size=1, rank=0).t2i.cpu()  # (T, C), -inf: not a candidate
        itm_logit = final - sim.t().to(final.device)  # (T, C): what the ITM head added
        best_scores, best = final.topk(min(k, images.numel()), dim=1)
        return [[SearchHit(self.items[int(images[c])].key, float(s), float(sim[c, t]), float(itm_logit[t, c]))
                 for s, c in zip(best_scores[t].tolist(), best[t].tolist()) if s > float("-inf")]
                for t in range(len(texts))]


# ---------------------------------------------------------------------------- build / update
def update_index(model: Blip2Model, spec: Any, directory: str | os.PathLike, *, rebuild: bool = False,
                 batch_size: int = 64, num_workers: int = 0, rank: int | None = None, world_size: int | None = None,
                 progress: bool = False, **source_options: Any) -> tuple[ImageIndex, BuildStats]:
    """Build the index of ``spec`` (a folder or a dataset, :func:`collect_images`) in
    ``directory``, or bring an existing one up to date (only new or changed images are encoded;
    ``rebuild``: encode everything). With several ranks each encodes a slice; every rank returns
    the whole index, rank 0 writes it."""
    rank, world_size = resolve_dist(rank, world_size)
    directory = Path(directory)
    fingerprint = model_fingerprint(model)
    items = collect_images(spec, **source_options)
    stats = BuildStats(total=len(items))
    old: dict[tuple[str, str], torch.Tensor] = {}
    if not rebuild and (directory / "index.json").is_file():
        previous = ImageIndex.load(directory)
        if previous.fingerprint == fingerprint:
            old = {(it.key, it.stamp): previous.features[i] for i, it in enumerate(previous.items)}
            stats.removed = len({k for k, _ in old} - {it.key for it in items})
        else:
            stats.rebuilt = True
    todo = [i for i, it in enumerate(items) if (it.key, it.stamp) not in old]
    stats.kept, stats.encoded = len(items) - len(todo), len(todo)
    was_training = model.training
    model.eval()
    try:
        sizes = [len(todo) // world_size + (1 if r < len(todo) % world_size else 0) for r in range(world_size)]
        start = sum(sizes[:rank])
        mine = [items[i] for i in todo[start:start + sizes[rank]]]
        feats, reasons = encode_items(model, mine, batch_size=batch_size, num_workers=num_workers,
                                      progress=progress and rank == 0)
    finally:
        model.train(was_training)
    q, e = model.num_query_tokens, model.config.embed_dim
    new = all_gather_uneven(feats.to(model.device).reshape(-1), [s * q * e for s in sizes],
                            world_size=world_size).cpu().view(-1, q, e)  # (len(todo), Q, E)
    reasons = [r for part in gather_objects(reasons, world_size=world_size) for r in part] if world_size > 1 else reasons
    features = torch.zeros(len(items), q, e)
    keep = torch.ones(len(items), dtype=torch.bool)
    for row, i in enumerate(todo):
        if reasons[row]:
            stats.skipped[items[i].key] = reasons[row]
            keep[i] = False
        features[i] = new[row]
    for i, it in enumerate(items):
        if (it.key, it.stamp) in old:
            features[i] = old[(it.key, it.stamp)]
    stats.encoded -= len(stats.skipped)
    index = ImageIndex(features[keep], [it for it, ok in zip(items, keep.tolist()) if ok], fingerprint=fingerprint,
                       directory=directory)
    if rank == 0:
        index.save(directory)
    return index, stats


def build_index(model: Blip2Model, spec: Any, directory: str | os.PathLike, **options: Any) -> tuple[ImageIndex, BuildStats]:
    """:func:`update_index` encoding every image (an existing index there is replaced)."""
    return update_index(model, spec, directory, rebuild=True, **options)


__all__ = ["BuildStats", "IMAGE_SUFFIXES", "ImageIndex", "ImageItem", "SearchHit", "build_index", "collect_images",
           "encode_items", "model_fingerprint", "update_index"]
