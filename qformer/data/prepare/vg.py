"""Visual Genome captions (LAVIS's ``vg_caption.json``, or the raw region descriptions) -> JSONL."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .collector import RowCollector
from .layout import Item, expect_list, items, load_json, paths, read_pairs
from .report import PrepareError, PrepareReport, write_report

__all__ = ["prepare_vg"]


def _read_vg_captions(path: Path, col: RowCollector, *, progress: bool) -> None:
    data = load_json(path, what="Visual Genome captions (LAVIS vg_caption.json)")
    if isinstance(data, list) and data and isinstance(data[0], dict) and "regions" in data[0]:
        raise PrepareError(f"{path}: this is the raw region_descriptions.json layout: pass it with --regions")
    values = expect_list(data, path=path, what='{"image", "caption"} items (LAVIS vg_caption.json)')
    read_pairs(values, path, col, progress=progress)


def _vg_imagepaths(path: Path, *, progress: bool) -> dict[int | str, str]:
    """image_data.json -> {image id: "VG_100K_2/1.jpg"}: the last two parts of the image's url,
    which is how the two download zips (VG_100K, VG_100K_2) lay the images out."""
    values = expect_list(load_json(path, what="Visual Genome image_data.json"), path=path,
                          what='{"image_id", "url"} items (Visual Genome image_data.json)')
    paths: dict[int | str, str] = {}
    for item in items(values, path, progress=progress, unit="image"):
        parts = [p for p in item.text("url").split("/") if p]
        if not parts:
            raise PrepareError(f"{path}: {item.where} has an empty 'url'")
        paths[item.image_id("image_id", "id")] = "/".join(parts[-2:])
    return paths


def _area(region: Any) -> float:
    w, h = (region.get("width"), region.get("height")) if isinstance(region, dict) else (None, None)
    return float(w) * float(h) if isinstance(w, (int, float)) and isinstance(h, (int, float)) else 0.0


def _read_vg_regions(path: Path, image_data: Path, col: RowCollector, *, largest_first: bool, progress: bool) -> None:
    paths = _vg_imagepaths(image_data, progress=progress)
    data = load_json(path, what="Visual Genome region_descriptions.json")
    values = expect_list(data, path=path,
                          what='{"id", "regions": [...]} items (Visual Genome region_descriptions.json)')
    for item in items(values, path, progress=progress, unit="image"):
        regions = item.get("regions")
        if not isinstance(regions, list):
            raise PrepareError(f"{path}: {item.where} has a {type(regions).__name__} 'regions', expected a list")
        if not regions:
            continue
        region_items = [Item(r, path, f"{item.where} regions[{j}]") for j, r in enumerate(regions)]
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
    caption_files = paths(captions)
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
    with RowCollector(report=report, output=Path(output), image_root=image_root, check_images=check_images, limit=limit,
                    dedupe=True, max_per_image=max_per_image) as col:
        for path in caption_files:
            if col.accepting():
                _read_vg_captions(path, col, progress=progress)
        if regions_path is not None and image_data_path is not None and col.accepting():
            _read_vg_regions(regions_path, image_data_path, col, largest_first=max_per_image is not None,
                             progress=progress)
    write_report(report)
    return report
