"""JSONL / JSON / CSV / TSV files of image path + caption as a caption source."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .base import (
    CAPTION_COLUMNS,
    FILE_IMAGE_COLUMNS,
    ID_COLUMNS,
    AnyRecord,
    BadRecord,
    CaptionRecord,
    CaptionSource,
    DatasetSpecError,
    ImageRef,
    caption_list,
    first_present,
    missing_column_error,
)

__all__ = ["FileCaptionSource"]

_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}


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
        self.format = format or _FORMATS.get(suffix, "")
        if self.format not in _FORMATS.values():
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
        found_image = image_column or first_present(cols, FILE_IMAGE_COLUMNS)
        found_caption = caption_column or first_present(cols, CAPTION_COLUMNS)
        if found_image is None or found_image not in cols:
            raise missing_column_error(str(self.path), role="image", wanted=image_column, tried=FILE_IMAGE_COLUMNS,
                                       columns=cols)
        if found_caption is None or found_caption not in cols:
            raise missing_column_error(str(self.path), role="caption", wanted=caption_column, tried=CAPTION_COLUMNS,
                                       columns=cols)
        if id_column is None:
            id_column = first_present(cols, ID_COLUMNS)
        self.columns = (found_image, found_caption, id_column)
        return found_image, found_caption, id_column

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
