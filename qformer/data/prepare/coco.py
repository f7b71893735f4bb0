"""COCO captions (BLIP / LAVIS's Karpathy split files, or COCO's own ``captions_*.json``) -> JSONL."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .collector import RowCollector
from .layout import expect_list, field_names, items, load_json, paths, read_pairs
from .report import PrepareError, PrepareReport, write_report

__all__ = ["prepare_coco"]


def _read_karpathy(path: Path, col: RowCollector, *, progress: bool) -> None:
    data = load_json(path, what="COCO Karpathy split")
    hint = (" (this is COCO's official {images, annotations} layout: pass it with --annotations)"
            if isinstance(data, dict) and "annotations" in data else "")
    values = expect_list(data, path=path, what='{"image", "caption"} items (the Karpathy split JSON)', hint=hint)
    read_pairs(values, path, col, progress=progress)


def _read_coco_annotations(path: Path, col: RowCollector, *, progress: bool) -> None:
    data = load_json(path, what="COCO captions annotations")
    layout = "COCO's captions_*.json layout {'images': [{id, file_name}], 'annotations': [{image_id, caption}]}"
    if isinstance(data, list):
        raise PrepareError(f"{path}: expected {layout}, got a list (a list of {{image, caption}} items is the "
                           "Karpathy split: pass it with --karpathy)")
    if not isinstance(data, dict):
        raise PrepareError(f"{path}: expected {layout}, got a JSON {type(data).__name__}")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise PrepareError(f"{path}: has no {key!r} list (its fields: {field_names(data)}); expected {layout}")
    files = {img.image_id("id"): img.text("file_name")
             for img in items(data["images"], path, progress=False, name="images")}
    for ann in items(data["annotations"], path, progress=progress, name="annotations", unit="caption"):
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
    karpathy_files, annotation_files = paths(karpathy), paths(annotations)
    if not karpathy_files and not annotation_files:
        raise PrepareError("COCO: pass karpathy= (coco_karpathy_*.json) and/or annotations= (captions_*.json)")
    inputs = [str(p) for p in (*karpathy_files, *annotation_files)]
    report = PrepareReport(dataset="coco", inputs=inputs, output=str(output))
    with RowCollector(report=report, output=Path(output), image_root=image_root, check_images=check_images,
                    limit=limit, group=group) as col:
        for path in karpathy_files:
            if col.accepting():
                _read_karpathy(path, col, progress=progress)
        for path in annotation_files:
            if col.accepting():
                _read_coco_annotations(path, col, progress=progress)
    write_report(report)
    return report
