"""Reading the downloads' JSON: strict layout checks with messages that name the file, the item
and the field (a silently empty or half-read dataset is the expensive failure)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .collector import RowCollector
from .report import PrepareError

__all__ = ["Item", "bar", "expect_list", "field_names", "id_from_path", "items", "load_json", "paths", "read_pairs"]

T = TypeVar("T")


def bar(items: Sequence[T], *, desc: str, progress: bool, unit: str = "item") -> Iterator[T]:
    """``items`` with a tqdm bar when ``progress``."""
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, unit=unit, disable=not progress, total=len(items), dynamic_ncols=True)


def load_json(path: Path, *, what: str) -> Any:
    if not path.is_file():
        raise PrepareError(f"{path}: no such file ({what})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PrepareError(f"{path}: not valid JSON ({what}): {exc}") from exc


def field_names(obj: dict) -> str:
    """The first few keys of an object, for an error message."""
    names = [str(k) for k in list(obj)[:8]]
    return (", ".join(names) + (", ..." if len(obj) > 8 else "")) if names else "none"


def expect_list(data: Any, *, path: Path, what: str, hint: str = "") -> list:
    if not isinstance(data, list):
        raise PrepareError(f"{path}: expected a list of {what}, got a JSON {type(data).__name__}{hint}")
    return data


@dataclass(frozen=True)
class Item:
    """One JSON object of an input file. Its accessors check the field's presence and type, and
    raise errors that say which file, which item ("item 3", "annotations[7]") and which field."""

    value: Any
    path: Path
    where: str

    def _fail(self, message: str) -> PrepareError:
        return PrepareError(f"{self.path}: {self.where} {message}")

    def has(self, key: str) -> bool:
        return isinstance(self.value, dict) and key in self.value

    def get(self, key: str, *alternatives: str) -> Any:
        """The first of ``key``, ``*alternatives`` present (VG names an id ``image_id`` or ``id``)."""
        if not isinstance(self.value, dict):
            raise self._fail(f"is a {type(self.value).__name__}, not an object with {key!r}")
        for k in (key, *alternatives):
            if k in self.value:
                return self.value[k]
        raise self._fail(f"has no {key!r} (its fields: {field_names(self.value)})")

    def text(self, key: str) -> str:
        """A path or url: a string."""
        value = self.get(key)
        if not isinstance(value, str):
            raise self._fail(f"has a {type(value).__name__} {key!r}, expected a string")
        return value

    def captions(self, key: str) -> list[str | None]:
        """A string, or a list of them (Karpathy val/test). Null or an empty list is one empty
        caption (dropped and counted, not fatal); any other type is a layout error."""
        value = self.get(key)
        if value is None or isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(v is None or isinstance(v, str) for v in value):
            return list(value) or [None]
        raise self._fail(f"has a {type(value).__name__} {key!r}, expected a string or a list of strings")

    def image_id(self, key: str, *alternatives: str) -> int | str:
        value = self.get(key, *alternatives)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise self._fail(f"has a {type(value).__name__} {key!r}, expected an int or a string")
        return value


def items(values: list, path: Path, *, progress: bool, name: str = "", unit: str = "item") -> Iterator[Item]:
    """The objects of a list, as "item 3" (a top-level list) or "annotations[3]" (a named one)."""
    for i, value in enumerate(bar(values, desc=path.name, progress=progress, unit=unit)):
        yield Item(value, path, f"{name}[{i}]" if name else f"item {i}")


def id_from_path(image: str) -> int | str:
    """COCO's id from its file name (``COCO_val2014_000000391895.jpg`` -> 391895), since the
    Karpathy val/test files carry none; else the path itself (unique, shared by its captions)."""
    m = re.search(r"(\d+)$", Path(image).stem)
    return int(m.group(1)) if m else image


def paths(files: str | os.PathLike | Iterable[str | os.PathLike] | None) -> list[Path]:
    """None, one path or several -> a list of paths (``~`` expanded)."""
    if files is None:
        return []
    if isinstance(files, (str, os.PathLike)):
        return [Path(files).expanduser()]
    return [Path(f).expanduser() for f in files]


def read_pairs(values: list, path: Path, col: RowCollector, *, progress: bool) -> None:
    """A list of ``{"image", "caption", "image_id"?}`` (Karpathy COCO, LAVIS VG): one row per
    caption; without an ``image_id`` the id comes from the file name."""
    for item in items(values, path, progress=progress):
        image = item.text("image")
        captions = item.captions("caption")
        image_id = item.image_id("image_id") if item.value.get("image_id") not in (None, "") else id_from_path(image)
        for caption in captions:
            if not col.add(image=image, caption=caption, image_id=image_id, where=f"{path.name} {item.where}"):
                return
