"""Turn the standard downloads of BLIP-2's caption datasets into files the recipes read directly.

BLIP-2 pretrains on COCO + Visual Genome (+ CC / SBU / LAION, which come as webdataset shards
the recipes already read) and fine-tunes and evaluates on COCO's Karpathy split. Those downloads
come in several JSON layouts; this module writes each as a JSONL file of
``{"image", "caption", "image_id"}`` rows, one per caption, which
:func:`qformer.data.open_caption_source` opens with no options
(``--train-data data/coco_train.jsonl``). A folder of images with sidecar captions becomes an
imagefolder ``metadata.jsonl`` instead (``{"file_name", "text"}``, what ``datasets`` expects).

What happens here, and what deliberately does not:

* The layout is checked strictly: a wrong one is an error naming the file, the item and the
  field. A silently empty or half-read dataset is the expensive failure (found hours later).
* Captions are only stripped. BLIP-2's cleaning (lower case, punctuation, 50 words) is done by
  the collator, so that the file keeps the annotators' text and the cleaning lives in one place.
* Bad rows (empty captions, duplicate or surplus region phrases, annotations of unknown images,
  and with ``check_images`` missing image files) are dropped and counted, never fatal: a few of
  them in 600k captions should not stop anything, but they must be visible (see
  :class:`PrepareReport`, also written as ``<output>.report.json``).
* The output is written to a temp file in the same directory and moved into place with
  ``os.replace``, so an interrupted run never leaves a truncated file that a training run would
  take for the whole dataset.

Image paths: with ``image_root`` they are written absolute (``image_root`` / the annotation's
path). Readers resolve a relative path against the JSONL file's own directory, not the current
directory, so a cwd-relative path would point elsewhere; an absolute one works from anywhere.
Without ``image_root`` the annotation's relative paths are kept, and are resolved (and checked)
against the output's directory, exactly as the readers will.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from .sources import CAPTION_COLUMNS, FILE_IMAGE_COLUMNS

__all__ = [
    "IMAGE_EXTENSIONS",
    "SKIP_REASONS",
    "PrepareError",
    "PrepareReport",
    "prepare_coco",
    "prepare_folder",
    "prepare_vg",
    "report_path",
]

#: Files that ``prepare_folder`` takes for images.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

#: Why a caption can be dropped (keys of :attr:`PrepareReport.skipped`).
SKIP_REASONS: tuple[str, ...] = (
    "empty_caption",  # empty / whitespace-only / null caption
    "no_image",  # an empty image path in the annotation
    "unknown_image_id",  # a COCO annotation / VG region whose image is not in the image list
    "duplicate_caption",  # VG: the same phrase again for the same image (case and spacing ignored)
    "over_max_per_image",  # VG: beyond --max-per-image for that image
    "missing_image",  # the image file does not exist (checked with check_images; always for folders)
    "no_caption",  # folder: an image without a sidecar .txt / CSV row
)

_MAX_EXAMPLES = 5
T = TypeVar("T")


class PrepareError(ValueError):
    """An input is missing or not in the expected layout; the message names the file and the field."""


@dataclass(kw_only=True)
class PrepareReport:
    """What one preparation wrote and dropped.

    ``rows``: lines written. ``captions``: captions in them (more than ``rows`` when a row holds
    a list). ``images``: distinct images. ``skipped``: dropped captions per reason, with up to
    five ``examples`` each (file items or image paths, for a human to look at).
    ``missing_files``: distinct missing image files (``skipped["missing_image"]`` counts their
    captions). ``stopped_at_limit``: ``limit`` cut the input short, so the counts describe only
    the part that was read.
    """

    dataset: str
    inputs: list[str]
    output: str
    image_root: str | None = None
    checked_images: bool = False
    limit: int | None = None
    rows: int = 0
    captions: int = 0
    images: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    missing_files: int = 0
    stopped_at_limit: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A few lines for a terminal: what was written, then each skip reason with examples."""
        lines = [f"{self.dataset}: wrote {self.rows} rows ({self.captions} captions, {self.images} images) "
                 f"to {self.output} in {self.seconds:.1f}s"]
        if self.stopped_at_limit:
            lines.append(f"  stopped at --limit {self.limit}: the counts cover only the part read")
        if not self.checked_images:
            lines.append("  image files were not checked (--check-images to count missing ones)")
        if not self.skipped:
            lines.append("  nothing skipped")
        for reason, n in sorted(self.skipped.items()):
            extra = f" ({self.missing_files} distinct files)" if reason == "missing_image" else ""
            shown = self.examples.get(reason, [])
            lines.append(f"  skipped {n} {reason}{extra}" + (f", e.g. {', '.join(shown)}" if shown else ""))
        if self.rows == 0 and self.missing_files:
            lines.append(f"  no row is left because no image was found: is --image-root right "
                         f"(got {self.image_root or 'none: paths are resolved against the output directory'})?")
        return "\n".join(lines)


def report_path(output: str | os.PathLike) -> Path:
    """``<output>.report.json``: the report lives next to the file it describes."""
    return Path(f"{output}.report.json")


# ----------------------------------------------------------------------------------------------
# Writing: validation, path resolution, counting, atomic output
# ----------------------------------------------------------------------------------------------


class _Collector:
    """Takes (image, caption) pairs from a reader, drops and counts bad ones, writes the rest.

    One collector per output, used as a context manager: rows go to a temp file next to the
    output, which replaces the output only when the block ends without an error.

    ``group``: one row per image with a list of captions (written at the end, since COCO's
    annotations are not ordered by image); ``single_as_string`` then writes a plain string when
    every image has one caption (what an imagefolder ``text`` column usually is). ``dedupe`` /
    ``max_per_image``: per image, in the order the reader gives the captions.
    """

    def __init__(
        self,
        *,
        report: PrepareReport,
        output: Path,
        image_root: Path | None,
        check_images: bool,
        limit: int | None,
        columns: tuple[str, str, str | None] = ("image", "caption", "image_id"),
        group: bool = False,
        single_as_string: bool = False,
        relative_to_output: bool = False,
        dedupe: bool = False,
        max_per_image: int | None = None,
    ) -> None:
        if Path(output).suffix.lower() != ".jsonl":  # the readers pick the format from the suffix
            raise PrepareError(f"{output}: the output must be a .jsonl file (one JSON object per line)")
        if limit is not None and limit < 1:
            raise PrepareError(f"limit must be at least 1 (got {limit})")
        if max_per_image is not None and max_per_image < 1:
            raise PrepareError(f"max_per_image must be at least 1 (got {max_per_image})")
        self.report = report
        self.output = Path(os.path.abspath(output))
        self.out_dir = self.output.parent
        self.image_root = Path(os.path.abspath(Path(image_root).expanduser())) if image_root is not None else None
        self.check_images = check_images
        self.limit = limit
        self.columns = columns
        self.group = group
        self.single_as_string = single_as_string
        self.relative_to_output = relative_to_output
        self.dedupe = dedupe
        self.max_per_image = max_per_image
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.groups: dict[str, tuple[Any, list[str]]] = {}
        self.seen: dict[str, set[str]] = {}  # per image: normalised captions (dedupe)
        self.kept: Counter[str] = Counter()  # per image: captions kept (max_per_image)
        self.exists: dict[Path, bool] = {}
        self.images: set[str] = set()
        self.rows = 0
        self.captions = 0
        self.full = False
        self._file: IO[str] | None = None
        self._tmp: str | None = None
        self._start = time.perf_counter()

    # -- context: temp file -> output ----------------------------------------------------------

    def __enter__(self) -> "_Collector":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=str(self.out_dir), prefix=f".{self.output.name}.", suffix=".tmp")
        self._file = os.fdopen(fd, "w", encoding="utf-8")
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self._file is not None and self._tmp is not None
        try:
            try:
                if exc_type is None:
                    self._write_groups()
                    self._file.flush()
                    os.fsync(self._file.fileno())
            finally:
                self._file.close()
            if exc_type is None:
                _publish(self._tmp, self.output)
                self._finish_report()
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)

    def _write_row(self, image: str, caption: str | list[str], image_id: Any) -> None:
        image_col, caption_col, id_col = self.columns
        row: dict[str, Any] = {image_col: image, caption_col: caption}
        if id_col is not None:
            row[id_col] = image_id
        assert self._file is not None
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.rows += 1
        self.captions += len(caption) if isinstance(caption, list) else 1

    def _write_groups(self) -> None:
        as_string = self.single_as_string and all(len(c) == 1 for _, c in self.groups.values())
        for image, (image_id, captions) in self.groups.items():
            self._write_row(image, captions[0] if as_string else captions, image_id)

    def _finish_report(self) -> None:
        r = self.report
        r.output = str(self.output)
        r.image_root = str(self.image_root) if self.image_root is not None else None
        r.checked_images = self.check_images
        r.limit = self.limit
        r.rows, r.captions, r.images = self.rows, self.captions, len(self.images)
        r.skipped = dict(sorted(self.skipped.items()))
        r.examples = {k: v for k, v in sorted(self.examples.items())}
        r.missing_files = sum(1 for ok in self.exists.values() if not ok)
        r.stopped_at_limit = self.full
        r.seconds = round(time.perf_counter() - self._start, 3)

    # -- accounting ----------------------------------------------------------------------------

    def skip(self, reason: str, example: str, *, n: int = 1) -> None:
        """Count ``n`` dropped captions under ``reason``; remember a few distinct examples."""
        self.skipped[reason] += n
        shown = self.examples.setdefault(reason, [])
        if len(shown) < _MAX_EXAMPLES and example not in shown:
            shown.append(example)

    def _resolve(self, image: str) -> Path:
        """Where the file is: absolute as given, else under image_root, else under the output's
        directory (where the readers will look for it)."""
        p = Path(image).expanduser()
        if p.is_absolute():
            return Path(os.path.abspath(p))
        return Path(os.path.abspath((self.image_root or self.out_dir) / p))

    def _written(self, image: str, path: Path) -> str:
        """The path as written in the row (see the module docstring for why)."""
        if self.relative_to_output:  # imagefolder: file_name relative to metadata.jsonl
            rel = Path(os.path.relpath(path, self.out_dir))
            return str(path) if rel.parts and rel.parts[0] == ".." else rel.as_posix()
        if self.image_root is not None or Path(image).expanduser().is_absolute():
            return str(path)
        return image

    def _file_exists(self, path: Path) -> bool:
        if path not in self.exists:  # COCO has 5 captions per image: stat each file once
            self.exists[path] = path.is_file()
        return self.exists[path]

    # -- the one entry point -------------------------------------------------------------------

    def add(self, *, image: str, caption: str | None, image_id: Any, where: str) -> bool:
        """One caption of ``image`` (``where``: "file item N", for examples). Returns False once
        ``limit`` rows are written: the reader should stop."""
        if self.full and not self.group:
            return False
        image = image.strip()
        if not image:
            self.skip("no_image", where)
            return True
        path = self._resolve(image)
        key = self._written(image, path)
        if self.full and key not in self.groups:
            return True  # grouped, limit reached: only the kept images' further captions count
        text = caption.strip() if caption is not None else ""
        if not text:
            self.skip("empty_caption", where)
            return True
        if self.dedupe:
            norm = " ".join(text.lower().split())
            seen = self.seen.setdefault(key, set())
            if norm in seen:
                self.skip("duplicate_caption", f"{key}: {text!r}")
                return True
            seen.add(norm)
        if self.max_per_image is not None:
            if self.kept[key] >= self.max_per_image:
                self.skip("over_max_per_image", key)
                return True
            self.kept[key] += 1
        if self.check_images and not self._file_exists(path):
            self.skip("missing_image", str(path))
            return True
        if self.group:
            if key not in self.groups:
                if self.limit is not None and len(self.groups) >= self.limit:
                    self.full = True  # the reader keeps going: later captions of kept images still count
                    return True
                self.groups[key] = (image_id, [])
            self.groups[key][1].append(text)
            self.images.add(key)
            return True
        self._write_row(key, text, image_id)
        self.images.add(key)
        if self.limit is not None and self.rows >= self.limit:
            self.full = True
            return False
        return True

    def accepting(self) -> bool:
        """False once the limit is reached: the next input file need not be read."""
        return not self.full


# ----------------------------------------------------------------------------------------------
# Reading: strict layout checks with messages that name the file, the item and the field
# ----------------------------------------------------------------------------------------------


def _bar(items: Sequence[T], *, desc: str, progress: bool, unit: str = "item") -> Iterator[T]:
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, unit=unit, disable=not progress, total=len(items), dynamic_ncols=True)


def _load_json(path: Path, *, what: str) -> Any:
    if not path.is_file():
        raise PrepareError(f"{path}: no such file ({what})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PrepareError(f"{path}: not valid JSON ({what}): {exc}") from exc


def _keys(obj: dict) -> str:
    names = [str(k) for k in list(obj)[:8]]
    return (", ".join(names) + (", ..." if len(obj) > 8 else "")) if names else "none"


def _expect_list(data: Any, *, path: Path, what: str, hint: str = "") -> list:
    if not isinstance(data, list):
        raise PrepareError(f"{path}: expected a list of {what}, got a JSON {type(data).__name__}{hint}")
    return data


@dataclass(frozen=True)
class _Item:
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
        raise self._fail(f"has no {key!r} (its fields: {_keys(self.value)})")

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


def _items(items: list, path: Path, *, progress: bool, name: str = "", unit: str = "item") -> Iterator[_Item]:
    """The objects of a list, as "item 3" (a top-level list) or "annotations[3]" (a named one)."""
    for i, value in enumerate(_bar(items, desc=path.name, progress=progress, unit=unit)):
        yield _Item(value, path, f"{name}[{i}]" if name else f"item {i}")


def _id_from_path(image: str) -> int | str:
    """COCO's id from its file name (``COCO_val2014_000000391895.jpg`` -> 391895), since the
    Karpathy val/test files carry none; else the path itself (unique, shared by its captions)."""
    m = re.search(r"(\d+)$", Path(image).stem)
    return int(m.group(1)) if m else image


def _paths(files: str | os.PathLike | Iterable[str | os.PathLike] | None) -> list[Path]:
    if files is None:
        return []
    if isinstance(files, (str, os.PathLike)):
        return [Path(files).expanduser()]
    return [Path(f).expanduser() for f in files]


def _read_pairs(items: list, path: Path, col: _Collector, *, progress: bool) -> None:
    """A list of ``{"image", "caption", "image_id"?}`` (Karpathy COCO, LAVIS VG): one row per
    caption; without an ``image_id`` the id comes from the file name."""
    for item in _items(items, path, progress=progress):
        image = item.text("image")
        captions = item.captions("caption")
        image_id = item.image_id("image_id") if item.value.get("image_id") not in (None, "") else _id_from_path(image)
        for caption in captions:
            if not col.add(image=image, caption=caption, image_id=image_id, where=f"{path.name} {item.where}"):
                return


# -- COCO ----------------------------------------------------------------------------------------


def _read_karpathy(path: Path, col: _Collector, *, progress: bool) -> None:
    data = _load_json(path, what="COCO Karpathy split")
    hint = (" (this is COCO's official {images, annotations} layout: pass it with --annotations)"
            if isinstance(data, dict) and "annotations" in data else "")
    items = _expect_list(data, path=path, what='{"image", "caption"} items (the Karpathy split JSON)', hint=hint)
    _read_pairs(items, path, col, progress=progress)


def _read_coco_annotations(path: Path, col: _Collector, *, progress: bool) -> None:
    data = _load_json(path, what="COCO captions annotations")
    layout = "COCO's captions_*.json layout {'images': [{id, file_name}], 'annotations': [{image_id, caption}]}"
    if isinstance(data, list):
        raise PrepareError(f"{path}: expected {layout}, got a list (a list of {{image, caption}} items is the "
                           "Karpathy split: pass it with --karpathy)")
    if not isinstance(data, dict):
        raise PrepareError(f"{path}: expected {layout}, got a JSON {type(data).__name__}")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise PrepareError(f"{path}: has no {key!r} list (its fields: {_keys(data)}); expected {layout}")
    files = {img.image_id("id"): img.text("file_name")
             for img in _items(data["images"], path, progress=False, name="images")}
    for ann in _items(data["annotations"], path, progress=progress, name="annotations", unit="caption"):
        image_id, captions = ann.image_id("image_id"), ann.captions("caption")
        if image_id not in files:
            col.skip("unknown_image_id", f"{path.name} {ann.where} (image_id {image_id!r})", n=len(captions))
            continue
        for caption in captions:
            if not col.add(image=files[image_id], caption=caption, image_id=image_id, where=f"{path.name} {ann.where}"):
                return


def prepare_coco(
    *,
    output: str | os.PathLike,
    karpathy: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    annotations: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    image_root: str | os.PathLike | None = None,
    check_images: bool = False,
    limit: int | None = None,
    group: bool = False,
    progress: bool = False,
) -> PrepareReport:
    """COCO captions -> JSONL ``{"image", "caption", "image_id"}``, one row per caption.

    Args:
        output: the JSONL to write (``<output>.report.json`` gets the report).
        karpathy: BLIP / LAVIS's Karpathy split files (``coco_karpathy_train.json``: a list of
            ``{"image": "val2014/COCO_val2014_....jpg", "caption": str, "image_id"}``; ``_val`` /
            ``_test``: ``{"image", "caption": [str, ...]}``, whose ids are taken from the file name).
            Several files are concatenated (e.g. train + val for pretraining).
        annotations: COCO's own ``captions_train2017.json`` / ``captions_val2017.json``
            (``{"images": [{id, file_name}], "annotations": [{image_id, caption}]}``; paths are
            bare file names, so ``image_root`` is the ``train2017/`` folder itself).
        image_root: the folder the annotation's paths are relative to (``/data/coco`` for
            Karpathy, ``/data/coco/train2017`` for the 2017 annotations).
        check_images: drop (and count) captions whose image file does not exist.
        limit: stop after this many rows (images with ``group``): for a quick trial file.
        group: one row per image with the list of its captions (an eval file; the readers expand
            it back to one record per caption with a shared ``image_id``).
        progress: tqdm bars.
    """
    karpathy_files, annotation_files = _paths(karpathy), _paths(annotations)
    if not karpathy_files and not annotation_files:
        raise PrepareError("COCO: pass karpathy= (coco_karpathy_*.json) and/or annotations= (captions_*.json)")
    inputs = [str(p) for p in (*karpathy_files, *annotation_files)]
    report = PrepareReport(dataset="coco", inputs=inputs, output=str(output))
    with _Collector(report=report, output=Path(output), image_root=image_root, check_images=check_images,
                    limit=limit, group=group) as col:
        for path in karpathy_files:
            if col.accepting():
                _read_karpathy(path, col, progress=progress)
        for path in annotation_files:
            if col.accepting():
                _read_coco_annotations(path, col, progress=progress)
    _write_report(report)
    return report


# -- Visual Genome -------------------------------------------------------------------------------


def _read_vg_captions(path: Path, col: _Collector, *, progress: bool) -> None:
    data = _load_json(path, what="Visual Genome captions (LAVIS vg_caption.json)")
    if isinstance(data, list) and data and isinstance(data[0], dict) and "regions" in data[0]:
        raise PrepareError(f"{path}: this is the raw region_descriptions.json layout: pass it with --regions")
    items = _expect_list(data, path=path, what='{"image", "caption"} items (LAVIS vg_caption.json)')
    _read_pairs(items, path, col, progress=progress)


def _vg_image_paths(path: Path, *, progress: bool) -> dict[int | str, str]:
    """image_data.json -> {image id: "VG_100K_2/1.jpg"}: the last two parts of the image's url,
    which is how the two download zips (VG_100K, VG_100K_2) lay the images out."""
    items = _expect_list(_load_json(path, what="Visual Genome image_data.json"), path=path,
                         what='{"image_id", "url"} items (Visual Genome image_data.json)')
    paths: dict[int | str, str] = {}
    for item in _items(items, path, progress=progress, unit="image"):
        parts = [p for p in item.text("url").split("/") if p]
        if not parts:
            raise PrepareError(f"{path}: {item.where} has an empty 'url'")
        paths[item.image_id("image_id", "id")] = "/".join(parts[-2:])
    return paths


def _area(region: Any) -> float:
    w, h = (region.get("width"), region.get("height")) if isinstance(region, dict) else (None, None)
    return float(w) * float(h) if isinstance(w, (int, float)) and isinstance(h, (int, float)) else 0.0


def _read_vg_regions(path: Path, image_data: Path, col: _Collector, *, largest_first: bool, progress: bool) -> None:
    paths = _vg_image_paths(image_data, progress=progress)
    data = _load_json(path, what="Visual Genome region_descriptions.json")
    items = _expect_list(data, path=path,
                         what='{"id", "regions": [...]} items (Visual Genome region_descriptions.json)')
    for item in _items(items, path, progress=progress, unit="image"):
        regions = item.get("regions")
        if not isinstance(regions, list):
            raise PrepareError(f"{path}: {item.where} has a {type(regions).__name__} 'regions', expected a list")
        if not regions:
            continue
        region_items = [_Item(r, path, f"{item.where} regions[{j}]") for j, r in enumerate(regions)]
        # the image's id: "id" (v1.2) or "image_id" on the entry, else on its regions
        owner = item if item.has("id") or item.has("image_id") else region_items[0]
        image_id = owner.image_id("id", "image_id") if owner is item else owner.image_id("image_id")
        phrases = []
        for j, region in enumerate(region_items):
            phrase = region.get("phrase")
            if phrase is not None and not isinstance(phrase, str):
                raise PrepareError(f"{path}: {region.where} has a {type(phrase).__name__} 'phrase', expected a string")
            phrases.append((_area(region.value), j, phrase, region.where))
        if image_id not in paths:
            col.skip("unknown_image_id", f"{path.name} {item.where} (image {image_id!r} is not in {image_data.name})",
                     n=len(phrases))
            continue
        if largest_first:  # with a cap, keep the phrases of the largest regions: they describe the image best
            phrases.sort(key=lambda p: (-p[0], p[1]))
        for _, _, phrase, where in phrases:
            if not col.add(image=paths[image_id], caption=phrase, image_id=image_id, where=f"{path.name} {where}"):
                return


def prepare_vg(
    *,
    output: str | os.PathLike,
    captions: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    regions: str | os.PathLike | None = None,
    image_data: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    max_per_image: int | None = None,
    check_images: bool = False,
    limit: int | None = None,
    progress: bool = False,
) -> PrepareReport:
    """Visual Genome captions -> JSONL ``{"image", "caption", "image_id"}``, one row per caption.

    Captions are deduplicated per image (ignoring case and spacing: region phrases repeat a lot,
    and a repeated pair is just a heavier weight on it) and empty ones dropped, both counted.

    Args:
        output: the JSONL to write (``<output>.report.json`` gets the report).
        captions: LAVIS's ``vg_caption.json`` (a list of ``{"image": "VG_100K/1.jpg", "caption"}``),
            what BLIP-2 trained on. Several files are concatenated.
        regions: or the raw ``region_descriptions.json`` (``[{"id", "regions": [{"phrase", ...}]}]``):
            one caption per region phrase. Needs ``image_data``.
        image_data: the raw ``image_data.json`` (id -> url, which names the ``VG_100K`` /
            ``VG_100K_2`` folder); default: next to ``regions``.
        image_root: the folder holding ``VG_100K/`` and ``VG_100K_2/``.
        max_per_image: keep at most this many captions per image (from ``regions``: those of the
            largest regions; from ``captions``: the first ones).
        check_images / limit / progress: as for :func:`prepare_coco`.
    """
    caption_files = _paths(captions)
    if not caption_files and regions is None:
        raise PrepareError("Visual Genome: pass captions= (vg_caption.json) or regions= (region_descriptions.json)")
    regions_path = Path(regions).expanduser() if regions is not None else None
    image_data_path: Path | None = None
    if regions_path is not None:
        image_data_path = (Path(image_data).expanduser() if image_data is not None
                           else regions_path.parent / "image_data.json")
        if not image_data_path.is_file():
            raise PrepareError(f"{image_data_path}: no such file; the raw layout needs image_data.json (image id -> "
                               f"file) next to {regions_path.name}, or pass it with --image-data")
    inputs = [str(p) for p in (*caption_files, regions_path, image_data_path) if p is not None]
    report = PrepareReport(dataset="vg", inputs=inputs, output=str(output))
    with _Collector(report=report, output=Path(output), image_root=image_root, check_images=check_images, limit=limit,
                    dedupe=True, max_per_image=max_per_image) as col:
        for path in caption_files:
            if col.accepting():
                _read_vg_captions(path, col, progress=progress)
        if regions_path is not None and image_data_path is not None and col.accepting():
            _read_vg_regions(regions_path, image_data_path, col, largest_first=max_per_image is not None,
                             progress=progress)
    _write_report(report)
    return report


# -- a folder of images --------------------------------------------------------------------------


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted, hidden files and folders left out)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / f for f in sorted(files)
                     if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS)
    return found


def _read_sidecars(folder: Path, col: _Collector, *, progress: bool) -> None:
    images = _image_files(folder)
    for image in _bar(images, desc=folder.name or str(folder), progress=progress, unit="image"):
        rel = image.relative_to(folder).as_posix()
        sidecar = image.with_suffix(".txt")
        if not sidecar.is_file():
            col.skip("no_caption", rel)
            continue
        try:
            text = sidecar.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise PrepareError(f"{sidecar}: not UTF-8 text: {exc}") from exc
        if not col.add(image=str(image), caption=text, image_id=rel, where=rel) or not col.accepting():
            return


def _read_folder_csv(path: Path, col: _Collector, *, image_column: str | None,
                     caption_column: str | None, progress: bool) -> None:
    if not path.is_file():
        raise PrepareError(f"{path}: no such file (captions CSV)")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    image_col = image_column or next((c for c in FILE_IMAGE_COLUMNS if c in columns), None)
    caption_col = caption_column or next((c for c in CAPTION_COLUMNS if c in columns), None)
    for role, name, tried in (("image", image_col, FILE_IMAGE_COLUMNS), ("caption", caption_col, CAPTION_COLUMNS)):
        if name is None or name not in columns:
            raise PrepareError(f"{path}: no {role} column {name or ' / '.join(tried)}; its columns are {columns} "
                               f"(pass --{role}-column)")
    for n, row in enumerate(_bar(rows, desc=path.name, progress=progress, unit="row")):
        image = (row.get(image_col) or "").strip()
        if not col.add(image=image, caption=row.get(caption_col), image_id=image, where=f"{path.name} row {n + 2}"):
            return


def prepare_folder(
    *,
    folder: str | os.PathLike,
    output: str | os.PathLike | None = None,
    csv_file: str | os.PathLike | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    limit: int | None = None,
    progress: bool = False,
) -> PrepareReport:
    """A folder of images + captions -> an imagefolder ``metadata.jsonl`` (``{"file_name", "text"}``).

    Captions come from sidecar files (``cat.jpg`` + ``cat.txt``: the whole file, stripped, is one
    caption) or from ``csv_file`` (an image column, paths relative to ``folder``, and a caption
    column; several rows for one image give it several captions). Images are always checked:
    a folder is local, and an image without a caption (or a CSV row without an image) is
    counted, not written. One row per image; ``text`` is a list of captions for every row as
    soon as one image has several (a column must have one type), else a string.

    ``output`` defaults to ``folder/metadata.jsonl``, which makes ``folder`` an imagefolder
    dataset (``--train-data folder``); ``file_name`` is relative to the output's directory, or
    absolute for images outside it (then read the file itself: ``--train-data out.jsonl``).
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise PrepareError(f"{root}: no such folder")
    out = Path(output).expanduser() if output is not None else root / "metadata.jsonl"
    csv_path = Path(csv_file).expanduser() if csv_file is not None else None
    inputs = [str(root)] + ([str(csv_path)] if csv_path is not None else [])
    report = PrepareReport(dataset="folder", inputs=inputs, output=str(out))
    with _Collector(report=report, output=out, image_root=root, check_images=True, limit=limit,
                    columns=("file_name", "text", None), group=True, single_as_string=True,
                    relative_to_output=True) as col:
        if csv_path is not None:
            _read_folder_csv(csv_path, col, image_column=image_column, caption_column=caption_column,
                             progress=progress)
        else:
            _read_sidecars(Path(os.path.abspath(root)), col, progress=progress)
    _write_report(report)
    return report


def _publish(tmp: str, dest: Path) -> None:
    """Move a finished temp file into place. mkstemp creates it 0600; a dataset file is meant to
    be shared like any other file the user writes, so it gets the umask's usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, dest)


def _write_report(report: PrepareReport) -> None:
    dest = report_path(report.output)
    fd, tmp = tempfile.mkstemp(dir=str(dest.parent), prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
        _publish(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
