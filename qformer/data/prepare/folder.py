"""A folder of images with sidecar ``.txt`` captions or a captions CSV -> an imagefolder ``metadata.jsonl``."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from ..sources.base import CAPTION_COLUMNS, FILE_IMAGE_COLUMNS
from .collector import RowCollector
from .layout import bar
from .report import IMAGE_EXTENSIONS, PrepareError, PrepareReport, write_report

__all__ = ["prepare_folder"]


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted, hidden files and folders left out)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / f for f in sorted(files)
                     if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS)
    return found


def _read_sidecars(folder: Path, col: RowCollector, *, progress: bool) -> None:
    images = _image_files(folder)
    for image in bar(images, desc=folder.name or str(folder), progress=progress, unit="image"):
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


def _read_folder_csv(path: Path, col: RowCollector, *, image_column: str | None,
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
            looked_for = repr(name) if name else " / ".join(tried)
            raise PrepareError(f"{path}: no {role} column {looked_for}; its columns are {columns}; choose one with "
                               f"--{role}-column NAME (prepare_data.py folder) or {role}_column= in Python")
    for n, row in enumerate(bar(rows, desc=path.name, progress=progress, unit="row")):
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
    with RowCollector(report=report, output=out, image_root=root, check_images=True, limit=limit,
                    columns=("file_name", "text", None), group=True, single_as_string=True,
                    relative_to_output=True) as col:
        if csv_path is not None:
            _read_folder_csv(csv_path, col, image_column=image_column, caption_column=caption_column,
                             progress=progress)
        else:
            _read_sidecars(Path(os.path.abspath(root)), col, progress=progress)
    write_report(report)
    return report
