"""Spec -> source: what kind of dataset a string names, and opening it as a :class:`CaptionSource`."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .base import CaptionSource, ConcatCaptionSource, DatasetSpecError
from .files import FileCaptionSource
from .hf import HFCaptionSource, load_hub_dataset
from .tars import WebDatasetCaptionSource, expand_shards

__all__ = ["detect_spec_kind", "open_caption_source"]

_KINDS = ("hf", "imagefolder", "jsonl", "json", "csv", "tsv", "webdataset")
_ALIASES = {"hub": "hf", "wds": "webdataset", "tar": "webdataset"}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TAR = re.compile(r"\.(tar|tgz|tar\.gz)$", re.IGNORECASE)
_METADATA = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def detect_spec_kind(spec: str) -> tuple[str, str]:
    """(kind, location) of a spec string; raises :class:`DatasetSpecError` when it cannot tell.

    ``kind:location`` prefixes (``hf:``, ``imagefolder:``, ``jsonl:``, ``csv:``, ``wds:`` ...)
    force a kind. Otherwise: a pattern whose first expansion ends in .tar/.tgz (or a ``pipe:``)
    is webdataset; .jsonl/.json/.csv/.tsv are caption files; an existing directory is an
    imagefolder; a name like ``org/dataset`` that is not a local path is a hub dataset.
    """
    s = str(spec).strip()
    prefix, sep, rest = s.partition(":")
    if sep and prefix.lower() in (*_KINDS, *_ALIASES) and not re.match(r"^[A-Za-z]:[\\/]", s):
        return _ALIASES.get(prefix.lower(), prefix.lower()), rest
    if s.startswith("pipe:"):
        return "webdataset", s
    first = expand_shards(s)[0] if "{" in s else s
    if _TAR.search(first):
        return "webdataset", s
    suffix = Path(s).suffix.lower()
    if suffix in (".jsonl", ".json", ".csv", ".tsv"):
        return suffix[1:], s
    path = Path(s).expanduser()
    if path.is_dir():
        return "imagefolder", s
    if path.exists():
        raise DatasetSpecError(
            f"cannot tell what kind of dataset {spec!r} is: a file that is not .jsonl/.json/.csv/.tsv/.tar "
            "(prefix it with jsonl:, csv:, wds: ... to say)"
        )
    looks_local = s.startswith(("/", "./", "../", "~")) or (os.sep in s and Path(s.split(os.sep)[0]).exists())
    if looks_local:
        raise FileNotFoundError(2, "dataset path not found", s)
    if _HUB_NAME.match(s):
        return "hf", s
    raise DatasetSpecError(
        f"cannot tell what kind of dataset {spec!r} is: not an existing directory (imagefolder), not a .jsonl/.json/.csv/"
        ".tsv file, not a .tar shard pattern and not a Hugging Face hub name (or prefix it with hf:, imagefolder:, jsonl:, "
        "csv:, wds:)"
    )


def _from_dict(spec: dict[str, Any], *, split: str, streaming: bool, cache_dir: Any, cols: dict[str, Any],
               options: dict[str, Any]) -> tuple[str, Any, str, bool, Any, dict[str, Any]]:
    """A ``{"type", "path" | "urls" | "name" | "data_dir", **options}`` spec, taken apart:
    (kind, location, split, streaming, cache_dir, options); ``cols`` is updated in place."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    location = next((spec.pop(k) for k in ("path", "urls", "name", "data_dir") if k in spec), None)
    if kind is None or location is None:
        raise DatasetSpecError(f"a dataset spec dict needs 'type' and 'path' (or 'urls' / 'name'): {spec!r}")
    kind = _ALIASES.get(str(kind).lower(), str(kind).lower())
    if kind not in _KINDS:
        raise DatasetSpecError(f"unknown dataset type {kind!r} in {spec!r}; use one of {_KINDS}")
    split = spec.pop("split", split)
    streaming = spec.pop("streaming", streaming)
    cache_dir = spec.pop("cache_dir", cache_dir)
    for k in list(cols):
        if k in spec:
            cols[k] = spec.pop(k)
    return kind, location, split, streaming, cache_dir, {**options, **spec}


def open_caption_source(
    spec: Any,
    *,
    split: str = "train",
    streaming: bool = False,
    image_column: str | None = None,
    caption_column: str | None = None,
    id_column: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    name: str | None = None,
    **options: Any,
) -> CaptionSource:
    """A :class:`CaptionSource` from a spec.

    ``spec`` is a :class:`CaptionSource` (returned as is), a list of specs (concatenated, see
    :class:`ConcatCaptionSource`), a ``datasets.Dataset`` /
    ``IterableDataset`` / ``DatasetDict`` (a hub dataset already loaded), a string (see
    :func:`detect_spec_kind`), or a dict ``{"type": kind, "path" | "name" | "urls": location,
    **options}`` whose options override the keyword arguments. Remaining ``options`` go to the
    source (``image_root``, ``image_keys`` ...) or, for hub datasets, to ``load_dataset``
    (``config``/``name`` for the config, ``revision`` ...). ``trust_remote_code`` is never set.
    """
    import datasets

    if isinstance(spec, CaptionSource):
        return spec
    if isinstance(spec, (list, tuple)):
        if len(spec) == 1:
            spec = spec[0]
        else:
            return ConcatCaptionSource([
                open_caption_source(s, split=split, streaming=streaming, image_column=image_column,
                                    caption_column=caption_column, id_column=id_column, cache_dir=cache_dir, **options)
                for s in spec
            ])
    cols: dict[str, Any] = dict(image_column=image_column, caption_column=caption_column, id_column=id_column)
    if isinstance(spec, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in spec:
            raise DatasetSpecError(f"dataset has splits {sorted(spec)}, not {split!r}")
        spec = spec[split]
    if isinstance(spec, (datasets.Dataset, datasets.IterableDataset)):
        label = name or f"hf:{getattr(spec, 'info', None) and spec.info.dataset_name or 'in-memory'}"
        return HFCaptionSource(spec, name=label, **cols, **options)
    if isinstance(spec, dict):
        kind, location, split, streaming, cache_dir, options = _from_dict(
            spec, split=split, streaming=streaming, cache_dir=cache_dir, cols=cols, options=options)
    elif isinstance(spec, (str, os.PathLike)):
        kind, location = detect_spec_kind(str(spec))
    else:
        raise DatasetSpecError(f"cannot open a dataset from a {type(spec).__name__}: {spec!r}")

    cache = str(cache_dir) if cache_dir is not None else None
    if kind == "hf":
        config = options.pop("config", None)
        source_opts = {k: options.pop(k) for k in ("base_dir", "id_from_path") if k in options}
        ds = load_hub_dataset(str(location), config=config, split=split, streaming=streaming, cache_dir=cache, **options)
        return HFCaptionSource(ds, name=name or f"hf:{location}", **cols, **source_opts)
    if kind == "imagefolder":
        directory = Path(location).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(2, "imagefolder directory not found", str(directory))
        if not any((directory / m).is_file() for m in _METADATA):
            raise DatasetSpecError(
                f"imagefolder {str(directory)!r} has no metadata.jsonl / metadata.csv: captions come from its "
                '"text" column ({"file_name": ..., "text": ...} per line)'
            )
        ds = datasets.load_dataset("imagefolder", data_dir=str(directory), split=split, streaming=streaming, cache_dir=cache)
        return HFCaptionSource(
            ds, name=name or f"imagefolder:{directory}", id_from_path=True, base_dir=directory, **cols, **options
        )
    if kind in ("jsonl", "json", "csv", "tsv"):
        return FileCaptionSource(location, format=kind, streaming=streaming, name=name, **cols, **options)
    if kind == "webdataset":
        return WebDatasetCaptionSource(location, name=name, **options)
    raise DatasetSpecError(f"unknown dataset kind {kind!r}")  # pragma: no cover
