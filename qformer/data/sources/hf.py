"""Hugging Face ``datasets`` as a caption source: hub datasets, imagefolder, in-memory datasets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from .base import (
    CAPTION_COLUMNS,
    ID_COLUMNS,
    AnyRecord,
    CaptionRecord,
    CaptionSource,
    DatasetSpecError,
    ImageRef,
    caption_list,
    first_present,
    missing_column_error,
)

__all__ = ["HFCaptionSource", "load_hub_dataset"]


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
                raise missing_column_error(name, role="image", wanted=image_column, tried=(), columns=columns)
            wanted_caption = caption_column
            caption_column = caption_column or first_present(columns, CAPTION_COLUMNS)
            if caption_column is None or caption_column not in columns:
                raise missing_column_error(name, role="caption", wanted=wanted_caption, tried=CAPTION_COLUMNS,
                                           columns=columns)
            id_column = id_column or first_present(columns, ID_COLUMNS)
            if id_column is not None and id_column not in columns:
                raise missing_column_error(name, role="id", wanted=id_column, tried=ID_COLUMNS, columns=columns)
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
        key = f"{row}" if not self._list_captions else f"{row}.{sub}"
        return self._make(self.dataset[row], row=row, sub=sub, key=key)

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


def load_hub_dataset(
    name: str, *, config: str | None, split: str | None, streaming: bool, cache_dir: str | None, **kwargs: Any
) -> Any:
    """``datasets.load_dataset`` for one split, with errors that name the dataset."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming, cache_dir=cache_dir, **kwargs)
    except Exception as exc:
        raise DatasetSpecError(f"could not load {name!r} as a Hugging Face dataset (split={split!r}): {exc}") from exc
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise DatasetSpecError(f"{name!r} has splits {sorted(ds)}; pass split=")
    return ds
