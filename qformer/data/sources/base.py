"""The record types every source yields, the source interface, and concatenation of sources.

A :class:`CaptionRecord` is one (image, caption) pair with the image still undecoded (a path,
encoded bytes, or a PIL image someone already holds); a :class:`BadRecord` is one the source
could not parse, which flows down the same path and is counted. :class:`CaptionSource` is the
interface: map-style sources (``len`` + ``record(i)``) support exact resume and global shuffling;
every source is iterable per consumer with ``iter_records(shard=k, num_shards=n)``.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from PIL import Image

from ...errors import DataError


#: Caption columns tried in order when none is given.
CAPTION_COLUMNS: tuple[str, ...] = ("text", "caption", "captions", "sentences")
#: Image columns tried in order for JSONL / CSV files when none is given.
FILE_IMAGE_COLUMNS: tuple[str, ...] = ("image", "image_path", "file_name", "filepath", "path", "file")
#: Id columns tried in order when none is given.
ID_COLUMNS: tuple[str, ...] = ("image_id", "img_id", "cocoid", "id")
#: Fields of a dict-valued caption entry (e.g. Flickr30k's ``sentences: [{"raw": ...}]``).
_CAPTION_FIELDS: tuple[str, ...] = ("raw", "text", "caption", "sentence")

ImageRef = Union[Image.Image, str, Path, bytes, None]


class DatasetSpecError(DataError):
    """A dataset spec cannot be understood (or a named column does not exist); names the spec."""


def missing_column_error(
    where: str, *, role: str, wanted: str | None, tried: Sequence[str], columns: Sequence[str]
) -> DatasetSpecError:
    """The one-line error for a missing image / caption / id column: what was looked for, the
    columns that exist, and every way to name the right one (recipe option, Python, card)."""
    looked_for = repr(wanted) if wanted else " / ".join(tried)
    how = f"{role}_column= in Python"
    if role in ("image", "caption"):
        how = f"--{role}-column NAME (recipes), {how} or data.{role}_column in an adapter card"
    return DatasetSpecError(f"{where}: no {role} column {looked_for}; its columns are {list(columns)}; choose one with {how}")


def json_rows(path: Path, *, error: type[Exception] = DatasetSpecError, what: str = "data") -> list[tuple[str, int, Any]]:
    """``(where, number, row)`` of a JSONL file (number: the 1-based line; a line that is not JSON
    gives its ``json.JSONDecodeError`` as the row, for the caller to count or refuse) or of a JSON
    list (number: the item's index; ``{"key": [...]}`` is that list). A .json file that is not a
    list of rows raises ``error`` naming the file."""
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise error(f"{path}: not valid JSON: {e}") from e
        if isinstance(data, dict):  # {"questions": [...]} / {"data": [...]} / {"annotations": [...]}
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if not isinstance(data, list):
            raise error(f"{path}: a .json {what} file must hold a list of objects")
        return [(f"{path}: item {i}", i, row) for i, row in enumerate(data)]
    out: list[tuple[str, int, Any]] = []
    for n, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                out.append((f"{path}:{n + 1}", n + 1, json.loads(line)))
            except json.JSONDecodeError as e:
                out.append((f"{path}:{n + 1}", n + 1, e))
    return out


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
    # Instruction tuning: the instruction this caption (answer) responds to; None: the card's prompt.
    prompt: str | None = None
    # ``image`` is a video file or a frame folder (sampled to the model's num_frames).
    video: bool = False
    # VQA fine-tuning with weighted answers: every human answer (VQAv2's ten, repeats kept), each
    # distinct one a target weighted by its share; None: ``caption`` is the one target.
    answers: tuple[str, ...] | None = None

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


def first_present(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
    """The first of ``candidates`` that is one of ``columns``."""
    return next((c for c in candidates if c in columns), None)


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
