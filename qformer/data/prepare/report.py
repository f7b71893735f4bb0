"""What a preparation wrote and dropped (:class:`PrepareReport`), and its errors."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...errors import DataError
from ...io import atomic_write_json

__all__ = ["IMAGE_EXTENSIONS", "SKIP_REASONS", "PrepareError", "PrepareReport", "report_path", "write_report"]

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
    "no_annotation",  # VQAv2: a question with no annotation (answers) in the annotations file
    "empty_question",  # VQAv2: an empty question
    "empty_answers",  # VQAv2: a question whose answers are all empty
)


class PrepareError(DataError):
    """An input is missing or not in the expected layout; the message names the file and the field."""


@dataclass(kw_only=True)
class PrepareReport:
    """What one preparation wrote and dropped.

    ``rows``: lines written. ``captions``: captions in them (more than ``rows`` when a row holds
    a list). ``images``: distinct images. ``skipped``: dropped captions per reason, with up to
    five ``examples`` each (file items or image paths, for a human to look at).
    ``missing_files``: distinct missing image files (``skipped["missing_image"]`` counts their
    captions). ``stopped_at_limit``: ``limit`` cut the input short, so the counts describe only
    the part that was read. ``seconds``: how long this preparation took.
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
        texts = "answers" if self.dataset == "vqav2" else "captions"  # VQAv2 rows are questions with ten answers
        lines = [f"{self.dataset}: wrote {self.rows} rows ({self.captions} {texts}, {self.images} images) "
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


def write_report(report: PrepareReport) -> Path:
    """Write ``<output>.report.json`` atomically; returns its path."""
    return atomic_write_json(report_path(report.output), report.to_dict(), ensure_ascii=False)
