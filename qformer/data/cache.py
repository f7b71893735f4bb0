"""An on-disk cache of the frozen vision tower's features, for runs without augmentation.

Why: BLIP-2's tower (EVA ViT-g, 1B parameters) is frozen, so without random augmentation its
output for an image never changes; recomputing it every epoch is most of a stage-1 step's cost.

Key: ``(image content hash, tower identity)``. The content hash (blake2b of the encoded file
bytes, see :func:`~qformer.data.reading.image_content_key`) makes an entry valid whatever path,
dataset or split the image is reached through; the tower identity (:func:`tower_fingerprint`:
its :class:`~qformer.config.VisionConfig` minus the weights location, plus a fingerprint of the
weights themselves) is the cache *directory*, so a different tower, feature layer, image size,
dtype or checkpoint can never read another's features.

Layout::

    <root>/<tower name>-<fingerprint[:16]>/
        tower.json                       # identity: fingerprint, VisionConfig, tokens, width
        shard-<uuid>.npy                 # features (n, N, C), float32 or float16, memory-mapped
        shard-<uuid>.json                # keys, original modes and sizes of those n images

A shard is written with :mod:`qformer.io` (a temp file renamed into place, with the user's umask
permissions), its ``.npy`` before its ``.json``: the JSON is the commit marker, so readers never see half a shard, a crashed fill
loses at most the shard in flight, and several fillers may run at once (a key cached twice is
harmless; the first shard read wins). Readers memory-map the ``.npy`` files, so DataLoader
workers share the page cache and open nothing until first use.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..config import VisionConfig
from ..errors import ConfigError, DataError, ImageLoadError
from ..images import ImagePreprocessor
from ..io import atomic_write_bytes, atomic_write_json
from .reading import SkipSample, decode_or_skip, image_content_key, read_image_bytes
from .report import CONVERTED, DataReport, NoUsableDataError
from .sources import BadRecord, CaptionRecord, CaptionSource

__all__ = [
    "FeatureCache",
    "FeatureCacheWriter",
    "FeatureTower",
    "fill_feature_cache",
    "tower_fingerprint",
    "weights_fingerprint",
]


class FeatureTower(Protocol):
    """What the cache needs of a frozen vision tower (:class:`qformer.vision.VisionTower` is one):
    its config and weights (its identity), its eval preprocessing, and its forward."""

    config: VisionConfig
    model: nn.Module
    preprocessor: ImagePreprocessor

    @property
    def num_tokens(self) -> int: ...

    @property
    def width(self) -> int: ...

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor: ...


_FORMAT = 1
_STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}


def weights_fingerprint(module: nn.Module, *, samples: int = 64) -> str:
    """A hash of every tensor's name, dtype and shape and of ``samples`` evenly strided values of each.

    Cheap for a 1B-parameter tower (a few thousand numbers are read, no full pass over the
    weights) and in practice unique: two checkpoints agreeing on every sampled value of every
    tensor do not occur.
    """
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        flat = t.detach().reshape(-1)
        if flat.numel():
            step = max(1, flat.numel() // samples)
            h.update(flat[::step][:samples].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()


def tower_fingerprint(tower: FeatureTower) -> str:
    """Identity of a tower's features: its VisionConfig (without ``pretrained``, a location) + weights."""
    cfg = tower.config.to_dict()
    cfg.pop("pretrained", None)
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(weights_fingerprint(tower.model).encode())
    return h.hexdigest()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:64] or "tower"


@dataclass
class _Shard:
    features: Path
    keys: list[str]
    modes: list[str]
    sizes: list[tuple[int, int]]
    array: np.ndarray | None = None


class FeatureCache:
    """Cached ``(N, C)`` tower features by image content key; see the module docstring.

    Build it with :meth:`for_tower` (computes the tower's fingerprint and directory) or open an
    existing directory with ``FeatureCache(directory)``. Picklable: the index and memory maps are
    rebuilt lazily in each process.
    """

    def __init__(self, directory: str | os.PathLike, *, fingerprint: str | None = None, identity: dict[str, Any] | None = None,
                 storage_dtype: str = "float32") -> None:
        if storage_dtype not in _STORAGE_DTYPES:
            raise ConfigError(f"storage_dtype must be one of {sorted(_STORAGE_DTYPES)}, got {storage_dtype!r}")
        self.directory = Path(directory)
        self.storage_dtype = storage_dtype
        self._identity = identity
        on_disk = self._read_identity()
        if fingerprint is None:
            if on_disk is None:
                raise FileNotFoundError(2, "no feature cache (tower.json) in", str(self.directory))
            fingerprint = on_disk["fingerprint"]
        elif on_disk is not None and on_disk.get("fingerprint") != fingerprint:
            raise DataError(
                f"feature cache {self.directory} belongs to another tower (fingerprint {on_disk.get('fingerprint')}, "
                f"expected {fingerprint})"
            )
        self.fingerprint: str = fingerprint
        self._shards: list[_Shard] | None = None
        self._index: dict[str, tuple[int, int]] = {}

    @classmethod
    def for_tower(cls, root: str | os.PathLike, tower: FeatureTower, *, storage_dtype: str = "float32") -> "FeatureCache":
        """The cache of ``tower``'s features under ``root`` (one sub-directory per tower identity)."""
        fp = tower_fingerprint(tower)
        identity = {
            "format": _FORMAT,
            "fingerprint": fp,
            "config": tower.config.to_dict(),
            "num_tokens": int(tower.num_tokens),
            "width": int(tower.width),
        }
        directory = Path(root) / f"{_slug(tower.config.name)}-{fp[:16]}"
        return cls(directory, fingerprint=fp, identity=identity, storage_dtype=storage_dtype)

    # -- pickling: no open maps or index across processes -------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_shards"], state["_index"] = None, {}
        return state

    # -- reading ------------------------------------------------------------------------------

    def _read_identity(self) -> dict[str, Any] | None:
        path = self.directory / "tower.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def refresh(self) -> None:
        """Re-read the shard list (e.g. after another process added shards)."""
        self._shards, self._index = None, {}
        self._load_index()

    def _load_index(self) -> list[_Shard]:
        if self._shards is not None:
            return self._shards
        self._shards, self._index = [], {}
        if self.directory.is_dir():
            for meta_path in sorted(self.directory.glob("shard-*.json")):
                self._add_shard(meta_path, json.loads(meta_path.read_text()))
        return self._shards

    def _add_shard(self, meta_path: Path, meta: dict[str, Any]) -> None:
        """Index one committed shard (no-op until the index is first needed)."""
        if self._shards is None or meta.get("fingerprint") != self.fingerprint:
            return
        shard = _Shard(
            features=meta_path.with_suffix(".npy"),
            keys=list(meta["keys"]),
            modes=list(meta["modes"]),
            sizes=[(int(s[0]), int(s[1])) for s in meta["sizes"]],
        )
        si = len(self._shards)
        self._shards.append(shard)
        for row, key in enumerate(shard.keys):
            self._index.setdefault(key, (si, row))

    def __contains__(self, key: str) -> bool:
        self._load_index()
        return key in self._index

    def __len__(self) -> int:
        self._load_index()
        return len(self._index)

    def keys(self) -> Iterator[str]:
        self._load_index()
        return iter(self._index)

    def lookup(self, key: str) -> tuple[torch.Tensor, str, tuple[int, int]] | None:
        """(float32 features (N, C), original image mode, original (w, h)) or None if not cached."""
        shards = self._load_index()
        loc = self._index.get(key)
        if loc is None:
            return None
        shard = shards[loc[0]]
        if shard.array is None:
            shard.array = np.load(shard.features, mmap_mode="r")
        row = np.array(shard.array[loc[1]], dtype=np.float32)  # copy out of the map
        return torch.from_numpy(row), shard.modes[loc[1]], shard.sizes[loc[1]]

    # -- writing ------------------------------------------------------------------------------

    def writer(self, *, shard_size: int = 256) -> "FeatureCacheWriter":
        return FeatureCacheWriter(self, shard_size=shard_size)

    def _ensure_identity(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "tower.json"
        if not path.is_file():
            identity = dict(self._identity or {"format": _FORMAT, "fingerprint": self.fingerprint})
            identity["storage_dtype"] = self.storage_dtype
            atomic_write_json(path, identity, default=str)

    def __repr__(self) -> str:
        return f"FeatureCache({self.directory})"


class FeatureCacheWriter:
    """Buffers features and writes them as one atomic shard per ``shard_size`` images."""

    def __init__(self, cache: FeatureCache, *, shard_size: int = 256) -> None:
        self.cache = cache
        self.shard_size = max(1, int(shard_size))
        self._rows: list[tuple[str, np.ndarray, str, tuple[int, int]]] = []
        self.written = 0

    def add(self, key: str, features: torch.Tensor, *, mode: str, size: tuple[int, int]) -> None:
        """Queue one image's (N, C) features; a full buffer is written as a shard."""
        arr = features.detach().to(torch.float32).cpu().numpy().astype(_STORAGE_DTYPES[self.cache.storage_dtype])
        self._rows.append((key, arr, mode, (int(size[0]), int(size[1]))))
        if len(self._rows) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        cache = self.cache
        cache._ensure_identity()
        name = f"shard-{uuid.uuid4().hex}"
        stacked = np.stack([r[1] for r in self._rows])  # (n, N, C)
        buf = io.BytesIO()
        np.save(buf, stacked)
        # getbuffer(): a view, not a third copy of a shard that can be hundreds of MB.
        atomic_write_bytes(cache.directory / f"{name}.npy", buf.getbuffer(), fsync=True)  # type: ignore[arg-type]
        meta = {
            "format": _FORMAT,
            "fingerprint": cache.fingerprint,
            "keys": [r[0] for r in self._rows],
            "modes": [r[2] for r in self._rows],
            "sizes": [list(r[3]) for r in self._rows],
            "shape": list(stacked.shape),
            "dtype": cache.storage_dtype,
        }
        meta_path = cache.directory / f"{name}.json"
        atomic_write_json(meta_path, meta, indent=None)  # the commit marker, written after the .npy
        self.written += len(self._rows)
        self._rows = []
        cache._add_shard(meta_path, meta)

    def __enter__(self) -> "FeatureCacheWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.flush()  # what was computed is valid even if the fill was interrupted


def _records_of(data: Any) -> tuple[Iterable[CaptionRecord | BadRecord], int | None, str]:
    """Records (all of them, one process) of a source, a caption dataset or a plain iterable."""
    source = getattr(data, "source", None)
    if isinstance(source, CaptionSource):
        data = source
    if isinstance(data, CaptionSource):
        return data.iter_records(), (len(data) if data.is_map_style else None), data.name
    return data, (len(data) if hasattr(data, "__len__") else None), getattr(data, "name", "records")


@torch.no_grad()
def fill_feature_cache(
    cache: FeatureCache,
    tower: FeatureTower,
    data: Any,
    *,
    batch_size: int = 32,
    min_image_size: int = 8,
    shard_size: int = 256,
    progress: bool = True,
) -> DataReport:
    """Compute and store ``tower(pixel_values)`` for every distinct valid image in ``data``.

    ``data``: a :class:`~qformer.data.sources.CaptionSource`, a caption dataset (its source is
    used) or an iterable of records. Images are preprocessed with the tower's eval transform
    (:class:`~qformer.images.ImagePreprocessor`), deduplicated by content, and those already in
    the cache are not recomputed (a second run calls the tower zero times). Captions are not
    checked here. Bad images are skipped and counted as in training.

    Returns a :class:`DataReport` with ``feature_cache_writes`` (new), ``feature_cache_hits``
    (already cached or duplicate) and the skip reasons. Raises :class:`NoUsableDataError` if no
    image was usable at all.
    """
    from tqdm.auto import tqdm

    fp = tower_fingerprint(tower)
    if fp != cache.fingerprint:
        raise DataError(f"{cache} was opened for another tower (fingerprint {cache.fingerprint}, this tower {fp})")
    records, total, name = _records_of(data)
    report = DataReport(dataset=name)
    preprocess = tower.preprocessor
    seen: set[str] = set()
    pending: list[tuple[str, torch.Tensor, str, tuple[int, int]]] = []

    def run(writer: FeatureCacheWriter) -> None:
        if not pending:
            return
        pixels = torch.stack([p[1] for p in pending])  # (B, 3, S, S)
        feats = tower(pixels)  # (B, N, C) float32
        for (key, _, mode, size), f in zip(pending, feats):
            writer.add(key, f, mode=mode, size=size)
        report.add("feature_cache_writes", n=len(pending))
        pending.clear()

    bar = tqdm(records, total=total, disable=not progress, desc="caching vision features", unit="record")
    with cache.writer(shard_size=shard_size) as writer:
        for rec in bar:
            if isinstance(rec, BadRecord):
                report.add(rec.reason, rec.where)
                continue
            try:
                raw = read_image_bytes(rec.image, where=rec.where)
                key = image_content_key(raw)
                if key in seen or key in cache:
                    report.add("feature_cache_hits")
                    continue
                img = raw if not isinstance(raw, bytes) else decode_or_skip(raw, where=rec.where)
                if min(img.size) < min_image_size:
                    raise SkipSample("tiny_image", rec.where, f"{img.size[0]}x{img.size[1]}")
                try:
                    pixels = preprocess.transform(img)
                except (ImageLoadError, OSError, ValueError) as exc:
                    raise SkipSample("unsupported_image", rec.where, str(exc)) from exc
            except SkipSample as skip:
                report.add(skip.reason, skip.where)
                continue
            seen.add(key)
            if img.mode != "RGB":
                report.add(CONVERTED).add(f"{CONVERTED}:{img.mode}")
            pending.append((key, pixels, img.mode, img.size))
            if len(pending) >= batch_size:
                run(writer)
        run(writer)
    if report.count("feature_cache_writes") + report.count("feature_cache_hits") == 0:
        raise NoUsableDataError(f"dataset {name!r}: no usable image to cache features of: {report.summary()}")
    return report
