"""Where image-caption records come from: HF datasets, imagefolder, JSONL/CSV, webdataset tars.

Every source yields :class:`CaptionRecord` ``{image, caption, image_id, source, key}`` with the
image still undecoded (a path, encoded bytes, or a PIL image someone already holds). Decoding and
validation happen later, per sample (:mod:`qformer.data.samples`), so that opening a source never
reads a million images, and a bad one costs one skipped sample instead of a crash. A record the
source itself cannot parse (a malformed JSON line, an unreadable tar member) is a
:class:`BadRecord` that flows down the same path and is counted.

Sources that can index their records (in-memory lists, arrow tables) are *map-style*: ``len`` and
``record(i)``, for exact resume and global shuffling. All sources are iterable with
``iter_records(shard=k, num_shards=n)``, which gives consumer ``k`` of ``n`` (rank x worker) a
disjoint part of the data: tar shards / HF shards when there are enough, else every n-th record.

:func:`open_caption_source` picks the source from a spec string or dict.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from PIL import Image

__all__ = [
    "CAPTION_COLUMNS",
    "BadRecord",
    "CaptionRecord",
    "CaptionSource",
    "DatasetSpecError",
    "FileCaptionSource",
    "ConcatCaptionSource",
    "HFCaptionSource",
    "WebDatasetCaptionSource",
    "detect_spec_kind",
    "expand_shards",
    "open_caption_source",
]

#: Caption columns tried in order when none is given.
CAPTION_COLUMNS: tuple[str, ...] = ("text", "caption", "captions", "sentences")
#: Image columns tried in order for JSONL / CSV files when none is given.
FILE_IMAGE_COLUMNS: tuple[str, ...] = ("image", "image_path", "file_name", "filepath", "path", "file")
#: Id columns tried in order when none is given.
ID_COLUMNS: tuple[str, ...] = ("image_id", "img_id", "cocoid", "id")
#: Fields of a dict-valued caption entry (e.g. Flickr30k's ``sentences: [{"raw": ...}]``).
_CAPTION_FIELDS: tuple[str, ...] = ("raw", "text", "caption", "sentence")

ImageRef = Union[Image.Image, str, Path, bytes, None]


class DatasetSpecError(ValueError):
    """A dataset spec cannot be understood (or a named column does not exist); names the spec."""


@dataclass(kw_only=True)
class CaptionRecord:
    """One (image, caption) pair before decoding.

    ``image``: a path, encoded bytes, a PIL image, or None (missing). ``caption``: the raw text or
    None. ``image_id``: shared by all captions of one image (ITC must not treat them as
    negatives). ``key``: stable and unique within the source; it seeds the sample's augmentation.
    """

    image: ImageRef
    caption: Any
    image_id: int | str
    source: str
    key: str

    @property
    def where(self) -> str:
        """What to show a human: the path, else source + key."""
        if isinstance(self.image, (str, Path)):
            return str(self.image)
        return f"{self.source}#{self.key}"


@dataclass(kw_only=True)
class BadRecord:
    """A record the source could not parse; counted under ``reason`` and skipped."""

    reason: str
    where: str
    source: str
    key: str
    detail: str = ""


AnyRecord = Union[CaptionRecord, BadRecord]


def caption_list(value: Any) -> list[Any]:
    """A caption cell -> one entry per caption (a list-valued cell expands, an empty list is one
    missing caption). Dict entries give their ``raw`` / ``text`` / ``caption`` / ``sentence``."""
    if isinstance(value, dict):
        for f in _CAPTION_FIELDS:
            if f in value:
                return [value[f]]
        return [None]
    if isinstance(value, (list, tuple)):
        if not value:
            return [None]
        return [caption_list(v)[0] if isinstance(v, dict) else v for v in value]
    return [value]


def _first_present(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
    return next((c for c in candidates if c in columns), None)


# ----------------------------------------------------------------------------------------------
# Base
# ----------------------------------------------------------------------------------------------


class CaptionSource:
    """A collection of :class:`CaptionRecord`; map-style when :attr:`is_map_style`."""

    name: str

    @property
    def is_map_style(self) -> bool:
        return False

    def __len__(self) -> int:
        raise TypeError(f"{self.name} is a streaming source: it has no length (use it as an iterable)")

    def record(self, index: int) -> AnyRecord:
        raise TypeError(f"{self.name} is a streaming source: records cannot be read by index")

    def iter_records(self, *, shard: int = 0, num_shards: int = 1) -> Iterator[AnyRecord]:
        """Consumer ``shard`` of ``num_shards``'s records (map-style: every n-th index)."""
        if not self.is_map_style:  # pragma: no cover - streaming sources override this
            raise NotImplementedError
        for i in range(shard, len(self), num_shards):
            yield self.record(i)

    def __iter__(self) -> Iterator[AnyRecord]:
        return self.iter_records()

    def __repr__(self) -> str:
        size = f", {len(self)} records" if self.is_map_style else ", streaming"
        return f"{type(self).__name__}({self.name}{size})"


# ----------------------------------------------------------------------------------------------
# Hugging Face datasets (hub, imagefolder, in-memory)
# ----------------------------------------------------------------------------------------------


def _is_list_feature(feature: Any) -> bool:
    import datasets

    kinds = tuple(getattr(datasets, n) for n in ("List", "LargeList", "Sequence") if hasattr(datasets, n))
    return isinstance(feature, (list, *kinds))


class HFCaptionSource(CaptionSource):
    """A ``datasets.Dataset`` (map-style) or ``datasets.IterableDataset`` (streaming).

    The image column is cast to ``Image(decode=False)`` so that rows carry the encoded bytes or
    the path and a corrupt image is found (and counted) when its sample is loaded, instead of
    raising inside ``datasets`` and ending the epoch. List-valued caption columns expand to one
    record per caption with a shared ``image_id``; for a map-style dataset the (row, caption)
    index is built from the caption column alone, and only when that column is a list.

    Args:
        dataset: the HF dataset.
        name: for reports and errors.
        image_column: default ``"image"``. caption_column: default the first of
            :data:`CAPTION_COLUMNS` present. id_column: default the first of ``image_id`` /
            ``img_id`` / ``cocoid`` / ``id`` present, else the row number.
        id_from_path: use the image file path (relative to ``base_dir``) as ``image_id``
            (imagefolder: captions of the same file share it).
        base_dir: resolves relative string paths in the image column.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        name: str,
        image_column: str | None = None,
        caption_column: str | None = None,
        id_column: str | None = None,
        id_from_path: bool = False,
        base_dir: str | os.PathLike | None = None,
    ) -> None:
        import datasets

        self.name = name
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.id_from_path = id_from_path
        columns = list(dataset.column_names or [])
        if columns:
            image_column = image_column or "image"
            if image_column not in columns:
                raise DatasetSpecError(f"{name}: no image column {image_column!r}; columns are {columns} (set image_column=)")
            caption_column = caption_column or _first_present(columns, CAPTION_COLUMNS)
            if caption_column is None or caption_column not in columns:
                raise DatasetSpecError(
                    f"{name}: no caption column {caption_column or ' / '.join(CAPTION_COLUMNS)}; columns are {columns} "
                    "(set caption_column=)"
                )
            id_column = id_column or _first_present(columns, ID_COLUMNS)
            if id_column is not None and id_column not in columns:
                raise DatasetSpecError(f"{name}: no id column {id_column!r}; columns are {columns}")
            dataset = dataset.select_columns([c for c in (image_column, caption_column, id_column) if c])
        else:  # streaming with unknown columns: trust the names (missing ones read as None)
            image_column = image_column or "image"
            caption_column = caption_column or "text"
        features = getattr(dataset, "features", None)
        if features is not None and isinstance(features.get(image_column), datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = dataset
        self.image_column, self.caption_column, self.id_column = image_column, caption_column, id_column
        self._list_captions = features is not None and _is_list_feature(features.get(caption_column))
        self._index: tuple[list[int], list[int]] | None = None

    @property
    def is_map_style(self) -> bool:
        import datasets

        return isinstance(self.dataset, datasets.Dataset)

    def _build_index(self) -> tuple[list[int], list[int]]:
        rows: list[int] = []
        subs: list[int] = []
        for row, value in enumerate(self.dataset[self.caption_column]):
            n = len(caption_list(value))
            rows.extend([row] * n)
            subs.extend(range(n))
        return rows, subs

    def __len__(self) -> int:
        if not self.is_map_style:
            return super().__len__()
        if not self._list_captions:
            return len(self.dataset)
        if self._index is None:
            self._index = self._build_index()
        return len(self._index[0])

    def record(self, index: int) -> AnyRecord:
        if not self.is_map_style:
            return super().record(index)
        if self._list_captions:
            if self._index is None:
                self._index = self._build_index()
            row, sub = self._index[0][index], self._index[1][index]
        else:
            row, sub = index, 0
        return self._make(self.dataset[row], row=row, sub=sub, key=f"{row}" if not self._list_captions else f"{row}.{sub}")

    def _image_of(self, value: Any) -> tuple[ImageRef, str | None]:
        """(image reference, file path if known)."""
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            if data:
                return bytes(data), path
            value = path
        if isinstance(value, (str, Path)):
            p = Path(value)
            if not p.is_absolute() and self.base_dir is not None:
                p = self.base_dir / p
            return str(p), str(p)
        if isinstance(value, Image.Image):
            return value, getattr(value, "filename", None) or None
        return None, None

    def _make(self, example: dict, *, row: int | str, sub: int, key: str) -> AnyRecord:
        image, path = self._image_of(example.get(self.image_column))
        captions = caption_list(example.get(self.caption_column))
        caption = captions[sub] if sub < len(captions) else None
        if self.id_column is not None and example.get(self.id_column) is not None:
            image_id = example[self.id_column]
            if not isinstance(image_id, (int, str)):
                image_id = str(image_id)
        elif self.id_from_path and path:
            image_id = os.path.relpath(path, self.base_dir) if self.base_dir is not None else path
        else:
            image_id = row
        return CaptionRecord(image=image, caption=caption, image_id=image_id, source=self.name, key=key)

    def iter_records(self, *, shard: int = 0, num_shards: int = 1) -> Iterator[AnyRecord]:
        if self.is_map_style:
            yield from super().iter_records(shard=shard, num_shards=num_shards)
            return
        from datasets.distributed import split_dataset_by_node

        ds = self.dataset if num_shards == 1 else split_dataset_by_node(self.dataset, rank=shard, world_size=num_shards)
        # .iter() rather than iter(): inside a DataLoader worker, IterableDataset.__iter__ would
        # split by worker a second time; .iter() applies only the split asked for above.
        n = 0
        for batch in ds.iter(batch_size=64):
            columns = list(batch)
            size = len(batch[columns[0]]) if columns else 0
            for i in range(size):
                example = {c: batch[c][i] for c in columns}
                row = f"{shard}/{num_shards}:{n}"
                for sub in range(len(caption_list(example.get(self.caption_column)))):
                    yield self._make(example, row=row, sub=sub, key=f"{row}.{sub}")
                n += 1


def _load_hub(name: str, *, config: str | None, split: str | None, streaming: bool, cache_dir: str | None, **kwargs) -> Any:
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming, cache_dir=cache_dir, **kwargs)
    except Exception as exc:
        raise DatasetSpecError(f"could not load {name!r} as a Hugging Face dataset (split={split!r}): {exc}") from exc
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise DatasetSpecError(f"{name!r} has splits {sorted(ds)}; pass split=")
    return ds


# ----------------------------------------------------------------------------------------------
# JSONL / JSON / CSV files of image path + caption
# ----------------------------------------------------------------------------------------------


class FileCaptionSource(CaptionSource):
    """A JSONL (one object per line), JSON (a list of objects) or CSV/TSV file of image + caption.

    Relative image paths are resolved against ``image_root`` (default: the file's directory).
    Columns default to the first present of :data:`FILE_IMAGE_COLUMNS` / :data:`CAPTION_COLUMNS`
    / :data:`ID_COLUMNS`; without an id column the image path is the ``image_id``, so the
    captions of one image (COCO's one-row-per-caption files) share it. List-valued captions
    (JSON only) expand. A line that is not valid JSON is a ``bad_record``.

    Map-style (default) reads the rows (not the images) into memory; ``streaming=True`` reads the
    file lazily and splits lines across consumers, for files too large to hold.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        format: str | None = None,
        image_column: str | None = None,
        caption_column: str | None = None,
        id_column: str | None = None,
        image_root: str | os.PathLike | None = None,
        streaming: bool = False,
        name: str | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(2, "caption file not found", str(self.path))
        suffix = self.path.suffix.lower()
        self.format = format or {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}.get(suffix, "")
        if self.format not in ("jsonl", "json", "csv", "tsv"):
            raise DatasetSpecError(f"{self.path}: unknown caption file format {suffix!r} (use .jsonl, .json, .csv or .tsv)")
        self.name = name or f"{self.format}:{self.path}"
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.columns = (image_column, caption_column, id_column)
        self.streaming = streaming and self.format != "json"
        self._rows: list[AnyRecord] | None = None
        if not self.streaming:
            self._rows = list(self._parse(self._lines()))
        else:  # find a wrong column name now, not in a DataLoader worker mid-epoch
            lines = self._lines()
            first = next((row for _, row in lines if isinstance(row, dict)), None)
            lines.close()
            if first is not None:
                self._resolve_columns(first)

    @property
    def is_map_style(self) -> bool:
        return self._rows is not None

    def __len__(self) -> int:
        return len(self._rows) if self._rows is not None else super().__len__()

    def record(self, index: int) -> AnyRecord:
        if self._rows is None:
            return super().record(index)
        return self._rows[index]

    def iter_records(self, *, shard: int = 0, num_shards: int = 1) -> Iterator[AnyRecord]:
        if self._rows is not None:
            yield from super().iter_records(shard=shard, num_shards=num_shards)
            return
        lines = ((n, row) for n, row in self._lines() if n % num_shards == shard)
        yield from self._parse(lines)

    # -- parsing ------------------------------------------------------------------------------

    def _lines(self) -> Iterator[tuple[int, Any]]:
        """(line number, parsed row or an exception) in file order."""
        if self.format == "json":
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(data, dict):  # {"annotations": [...]} / {"data": [...]}
                data = next((v for v in data.values() if isinstance(v, list)), None)
            if not isinstance(data, list):
                raise DatasetSpecError(f"{self.path}: a .json caption file must hold a list of objects")
            yield from enumerate(data)
        elif self.format == "jsonl":
            with open(self.path, encoding="utf-8") as f:
                for n, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        yield n, json.loads(line)
                    except json.JSONDecodeError as exc:
                        yield n, exc
        else:
            with open(self.path, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f, delimiter="\t" if self.format == "tsv" else ",")
                for n, row in enumerate(reader):
                    yield n, row

    def _resolve_columns(self, row: dict) -> tuple[str, str, str | None]:
        image_column, caption_column, id_column = self.columns
        cols = list(row)
        image_column = image_column or _first_present(cols, FILE_IMAGE_COLUMNS)
        caption_column = caption_column or _first_present(cols, CAPTION_COLUMNS)
        if image_column is None or image_column not in cols:
            raise DatasetSpecError(
                f"{self.path}: no image column {image_column or ' / '.join(FILE_IMAGE_COLUMNS)}; columns are {cols} (set image_column=)"
            )
        if caption_column is None or caption_column not in cols:
            raise DatasetSpecError(
                f"{self.path}: no caption column {caption_column or ' / '.join(CAPTION_COLUMNS)}; columns are {cols} (set caption_column=)"
            )
        if id_column is None:
            id_column = _first_present(cols, ID_COLUMNS)
        self.columns = (image_column, caption_column, id_column)
        return image_column, caption_column, id_column

    def _parse(self, lines: Iterator[tuple[int, Any]]) -> Iterator[AnyRecord]:
        resolved: tuple[str, str, str | None] | None = None
        for n, row in lines:
            where = f"{self.path}:{n + 1}"
            if isinstance(row, Exception) or not isinstance(row, dict):
                detail = str(row) if isinstance(row, Exception) else f"not an object: {type(row).__name__}"
                yield BadRecord(reason="bad_record", where=where, source=self.name, key=str(n), detail=detail)
                continue
            if resolved is None:
                resolved = self._resolve_columns(row)
            image_column, caption_column, id_column = resolved
            raw = row.get(image_column)
            image: ImageRef = None
            if isinstance(raw, str) and raw.strip():
                p = Path(raw.strip()).expanduser()
                image = str(p if p.is_absolute() else self.image_root / p)
            image_id = row.get(id_column) if id_column else None
            if image_id in (None, ""):
                image_id = raw if isinstance(raw, str) and raw else f"line{n}"
            elif self.format in ("csv", "tsv") and isinstance(image_id, str) and image_id.strip().lstrip("-").isdigit():
                image_id = int(image_id)
            captions = caption_list(row.get(caption_column))
            for sub, caption in enumerate(captions):
                key = str(n) if len(captions) == 1 else f"{n}.{sub}"
                yield CaptionRecord(image=image, caption=caption, image_id=image_id, source=self.name, key=key)


# ----------------------------------------------------------------------------------------------
# webdataset tar shards
# ----------------------------------------------------------------------------------------------


def expand_shards(urls: str | Sequence[str]) -> list[str]:
    """Brace-expand ``shards-{000..099}.tar`` (and ``::``-joined lists) with webdataset's rules."""
    from webdataset.shardlists import expand_urls

    if isinstance(urls, (str, os.PathLike)):
        return expand_urls(str(urls))
    return [u for url in urls for u in expand_urls(str(url))]


def _is_local(url: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url) or url.startswith("file:")


class WebDatasetCaptionSource(CaptionSource):
    """webdataset tar shards (streaming only), read with the ``webdataset`` library.

    A sample's image is its first member among ``image_keys`` (jpg, jpeg, png, webp); its caption
    is ``txt``, else the ``caption`` / ``text`` field of ``json`` (a list there expands).
    ``image_id`` is the sample's ``__key__``. Consumers split whole shards when there are at least
    as many shards as consumers, else every consumer reads all shards and keeps every n-th sample.
    A shard that cannot be read is counted as ``unreadable_shard`` and the stream goes on.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        name: str | None = None,
        image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
        caption_keys: Sequence[str] = ("txt", "json"),
        json_caption_fields: Sequence[str] = ("caption", "text"),
    ) -> None:
        self.urls = urls
        self.shards = expand_shards(urls)
        self.name = name or f"webdataset:{urls if isinstance(urls, str) else ','.join(map(str, urls))}"
        if not self.shards:
            raise DatasetSpecError(f"{self.name}: the pattern expands to no shard")
        local = [s for s in self.shards if _is_local(s)]
        if local and len(local) == len(self.shards) and not any(Path(s.removeprefix("file:")).is_file() for s in local):
            raise FileNotFoundError(2, f"none of the {len(local)} tar shard(s) exists", str(urls))
        self.image_keys = tuple(k.lower() for k in image_keys)
        self.caption_keys = tuple(k.lower() for k in caption_keys)
        self.json_caption_fields = tuple(json_caption_fields)

    def iter_records(self, *, shard: int = 0, num_shards: int = 1) -> Iterator[AnyRecord]:
        import webdataset as wds

        by_shard = len(self.shards) >= num_shards
        mine = self.shards[shard::num_shards] if by_shard else list(self.shards)
        report_errors = by_shard or shard == 0  # else every consumer would count the same error
        errors: list[Exception] = []

        def handler(exc: Exception) -> bool:
            errors.append(exc)
            return True  # go on with the next member / shard

        pipeline = wds.WebDataset(
            mine, handler=handler, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
        )
        for n, sample in enumerate(pipeline):
            yield from self._flush(errors, report_errors)
            if not by_shard and n % num_shards != shard:
                continue
            yield from self._records(sample)
        yield from self._flush(errors, report_errors)

    def _flush(self, errors: list[Exception], report: bool) -> Iterator[AnyRecord]:
        while errors:
            exc = errors.pop(0)
            if report:
                # webdataset appends the url to the exception's args; OSErrors name the file.
                names = [getattr(exc, "filename", None), *reversed(exc.args)]
                where = next((a for a in names if isinstance(a, str) and a in self.shards), None)
                where = where or next((a for a in names if isinstance(a, str) and ".tar" in a), self.name)
                yield BadRecord(reason="unreadable_shard", where=where, source=self.name, key=f"error:{where}", detail=str(exc))

    def _records(self, sample: dict[str, Any]) -> Iterator[AnyRecord]:
        key = str(sample.get("__key__"))
        url = str(sample.get("__url__", ""))
        skey = f"{os.path.basename(url)}/{key}"
        where = f"{url}#{key}"
        image = next((sample[k] for k in self.image_keys if k in sample), None)
        captions: list[Any] = [None]
        for ck in self.caption_keys:
            if ck not in sample:
                continue
            raw = sample[ck]
            try:
                text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
                if ck == "json":
                    obj = json.loads(text) if isinstance(text, str) else text
                    field = next((f for f in self.json_caption_fields if isinstance(obj, dict) and f in obj), None)
                    if field is None:
                        continue
                    captions = caption_list(obj[field])
                else:
                    captions = [text]
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                yield BadRecord(reason="bad_record", where=where, source=self.name, key=skey, detail=str(exc))
                return
            break
        for sub, caption in enumerate(captions):
            k = skey if len(captions) == 1 else f"{skey}.{sub}"
            yield CaptionRecord(
                image=bytes(image) if image is not None else None, caption=caption, image_id=key, source=self.name, key=k
            )

    def __repr__(self) -> str:
        return f"WebDatasetCaptionSource({self.name}, {len(self.shards)} shard(s))"


# ----------------------------------------------------------------------------------------------
# Spec -> source
# ----------------------------------------------------------------------------------------------

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


class ConcatCaptionSource(CaptionSource):
    """Several sources one after the other (e.g. COCO + Visual Genome + CC + SBU + LAION).

    Image ids and sample keys are prefixed with the source's position, so that two datasets'
    ids never collide (a collision would make unrelated captions ITC positives of each other).
    Map-style when every part is; otherwise the parts are streamed one after another.
    """

    def __init__(self, sources: list[CaptionSource]) -> None:
        if not sources:
            raise DatasetSpecError("an empty list of datasets")
        self.sources = list(sources)
        self.name = " + ".join(s.name for s in self.sources)
        self._starts: list[int] = []
        if self.is_map_style:
            total = 0
            for src in self.sources:
                self._starts.append(total)
                total += len(src)
            self._len = total

    @property
    def is_map_style(self) -> bool:
        return all(s.is_map_style for s in self.sources)

    def __len__(self) -> int:
        if not self.is_map_style:
            return super().__len__()
        return self._len

    @staticmethod
    def _tag(record: AnyRecord, part: int) -> AnyRecord:
        if isinstance(record, CaptionRecord):
            return dataclasses.replace(record, image_id=f"{part}:{record.image_id}", key=f"{part}:{record.key}")
        return record

    def record(self, index: int) -> AnyRecord:
        if not self.is_map_style:
            return super().record(index)
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for {self.name} ({self._len} records)")
        part = bisect.bisect_right(self._starts, index) - 1
        return self._tag(self.sources[part].record(index - self._starts[part]), part)

    def iter_records(self, *, shard: int = 0, num_shards: int = 1) -> Iterator[AnyRecord]:
        if self.is_map_style:
            yield from super().iter_records(shard=shard, num_shards=num_shards)
            return
        for part, src in enumerate(self.sources):
            for record in src.iter_records(shard=shard, num_shards=num_shards):
                yield self._tag(record, part)


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
    cols = dict(image_column=image_column, caption_column=caption_column, id_column=id_column)
    if isinstance(spec, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in spec:
            raise DatasetSpecError(f"dataset has splits {sorted(spec)}, not {split!r}")
        spec = spec[split]
    if isinstance(spec, (datasets.Dataset, datasets.IterableDataset)):
        label = name or f"hf:{getattr(spec, 'info', None) and spec.info.dataset_name or 'in-memory'}"
        return HFCaptionSource(spec, name=label, **cols, **options)
    if isinstance(spec, dict):
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
        options = {**options, **spec}
    elif isinstance(spec, (str, os.PathLike)):
        kind, location = detect_spec_kind(str(spec))
    else:
        raise DatasetSpecError(f"cannot open a dataset from a {type(spec).__name__}: {spec!r}")

    cache = str(cache_dir) if cache_dir is not None else None
    if kind == "hf":
        config = options.pop("config", None)
        source_opts = {k: options.pop(k) for k in ("base_dir", "id_from_path") if k in options}
        ds = _load_hub(str(location), config=config, split=split, streaming=streaming, cache_dir=cache, **options)
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
