"""The part every preparation shares: validate (image, caption) pairs, resolve paths, count
what is dropped, and write the kept rows atomically."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ...io import atomic_write_text
from .report import PrepareError, PrepareReport

__all__ = ["RowCollector"]

_MAX_EXAMPLES = 5


class RowCollector:
    """Takes (image, caption) pairs from a reader, drops and counts bad ones, writes the rest.

    One collector per output, used as a context manager: the rows are kept in memory and
    written (with :func:`qformer.io.atomic_write_text`) only when the block ends without an
    error, so a failed or interrupted run leaves the previous output as it was.

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
        image_root: str | os.PathLike | None,
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
        self.lines: list[str] = []
        self.rows = 0
        self.captions = 0
        self.full = False
        self._start = time.perf_counter()

    # -- context: rows -> output ---------------------------------------------------------------

    def __enter__(self) -> "RowCollector":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            return
        self._write_groups()
        # fsync: a dataset file is read by long runs; a crash right after this must not leave
        # an empty file under the final name.
        atomic_write_text(self.output, "".join(self.lines), fsync=True)
        self._finish_report()

    def _write_row(self, image: str, caption: str | list[str], image_id: Any) -> None:
        image_col, caption_col, id_col = self.columns
        row: dict[str, Any] = {image_col: image, caption_col: caption}
        if id_col is not None:
            row[id_col] = image_id
        self.lines.append(json.dumps(row, ensure_ascii=False) + "\n")
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
        """The path as written in the row (see :mod:`qformer.data.prepare` for why)."""
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
            return self._add_to_group(key, text, image_id)
        self._write_row(key, text, image_id)
        self.images.add(key)
        if self.limit is not None and self.rows >= self.limit:
            self.full = True
            return False
        return True

    def _add_to_group(self, key: str, text: str, image_id: Any) -> bool:
        if key not in self.groups:
            if self.limit is not None and len(self.groups) >= self.limit:
                self.full = True  # the reader keeps going: later captions of kept images still count
                return True
            self.groups[key] = (image_id, [])
        self.groups[key][1].append(text)
        self.images.add(key)
        return True

    def accepting(self) -> bool:
        """False once the limit is reached: the next input file need not be read."""
        return not self.full
