"""Counting what the data pipeline skipped or converted, merged over workers and ranks.

Why counts travel with batches: DataLoader workers are separate processes, so a report object
they update is a copy the training process never sees. Every collated batch therefore carries a
small :class:`DataReport` delta (under :data:`DATA_STATS_KEY`) that describes exactly the samples
that batch consumed; the training process merges those deltas (see
:class:`qformer.data.loader.CaptionLoader`). The merged report is thus exact for what training
actually consumed, with any number of workers, persistent or not, forked or spawned. Ranks are
merged at the end with :meth:`DataReport.all_reduce`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..distributed import dist_info
from ..errors import DataError
from ..io import atomic_write_json

__all__ = [
    "CONVERTED",
    "DATA_STATS_KEY",
    "SKIP_REASONS",
    "DataReport",
    "NoUsableDataError",
    "merge_reports",
]

#: Key under which collators put the batch's :class:`DataReport` delta.
DATA_STATS_KEY = "data_stats"

#: Why a sample can be skipped (each is a count in :attr:`DataReport.counts`).
SKIP_REASONS: tuple[str, ...] = (
    "missing_image",  # the file does not exist (or the record has no image)
    "unreadable_image",  # exists but cannot be opened (permissions, a directory, I/O error)
    "corrupt_image",  # not a decodable image
    "truncated_image",  # the decoder ran out of data
    "unsupported_image",  # decodes but cannot be converted to RGB (e.g. 32-bit float mode 'F')
    "oversized_image",  # PIL's decompression-bomb guard refused it
    "tiny_image",  # a side is below min_image_size
    "missing_caption",  # no caption field / None
    "empty_caption",  # empty or whitespace-only (or nothing left after cleaning)
    "bad_record",  # a malformed line / row / tar member
    "unreadable_shard",  # a tar shard that could not be read (counted once per error)
    "uncached_image",  # a valid image whose features are not in the feature cache
)

#: Valid images in another mode (CMYK, RGBA, 16-bit, palette, greyscale, ...) converted to RGB.
#: ``converted`` is the total; ``converted:<MODE>`` counts per original mode.
CONVERTED = "converted"


class NoUsableDataError(DataError, RuntimeError):
    """Nothing usable is left in a dataset (or an epoch yielded no sample); names the reasons."""


@dataclass(kw_only=True)
class DataReport:
    """Counts per reason (skips, conversions, samples, batches) with a few examples each.

    ``counts`` holds plain integers keyed by reason (:data:`SKIP_REASONS`, ``converted``,
    ``converted:<MODE>``) or by event (``samples`` delivered, ``batches``, ``empty_batches``,
    ``rank_trimmed`` ...), so that merging is a sum and any new key merges without a schema.
    ``examples`` keeps up to ``max_examples`` paths / sample names per reason, for a human to go
    and look at.
    """

    dataset: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    # -- accumulate ---------------------------------------------------------------------------

    def add(self, reason: str, example: str | None = None, n: int = 1) -> "DataReport":
        """Count ``n`` events of ``reason``; remember ``example`` if there is room."""
        if n:
            self.counts[reason] = self.counts.get(reason, 0) + int(n)
        if example is not None:
            ex = self.examples.setdefault(reason, [])
            if len(ex) < self.max_examples and example not in ex:
                ex.append(example)
        return self

    def merge(self, other: "DataReport | Mapping[str, Any] | None") -> "DataReport":
        """Add ``other``'s counts and examples into this report (in place); returns self."""
        if other is None:
            return self
        if not isinstance(other, DataReport):
            other = DataReport.from_dict(other)
        for key, n in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + int(n)
        for key, exs in other.examples.items():
            for e in exs:
                self.add(key, e, n=0)
        if not self.dataset:
            self.dataset = other.dataset
        return self

    def copy(self) -> "DataReport":
        return DataReport(dataset=self.dataset, max_examples=self.max_examples).merge(self)

    def __bool__(self) -> bool:
        """True when anything was counted (an empty delta is not worth sending)."""
        return any(self.counts.values()) or any(self.examples.values())

    # -- views --------------------------------------------------------------------------------

    def count(self, key: str) -> int:
        return int(self.counts.get(key, 0))

    @property
    def samples(self) -> int:
        """Usable samples delivered to batches."""
        return self.count("samples")

    @property
    def skipped(self) -> int:
        """Samples dropped for any reason in :data:`SKIP_REASONS`."""
        return sum(self.count(r) for r in SKIP_REASONS)

    @property
    def converted(self) -> int:
        return self.count(CONVERTED)

    def skipped_by_reason(self) -> dict[str, int]:
        return {r: self.count(r) for r in SKIP_REASONS if self.count(r)}

    def converted_by_mode(self) -> dict[str, int]:
        prefix = CONVERTED + ":"
        return {k[len(prefix):]: v for k, v in sorted(self.counts.items()) if k.startswith(prefix) and v}

    def summary_fields(self) -> dict[str, Any]:
        """``usable_samples``, ``skipped_total``, ``skipped``, ``converted``: the human-facing counts."""
        return {
            "usable_samples": self.samples,
            "skipped_total": self.skipped,
            "skipped": self.skipped_by_reason(),
            "converted": {"total": self.converted, "by_mode": self.converted_by_mode()},
        }

    def summary(self) -> str:
        """One line: usable samples, then each skip reason with its count and an example."""
        parts = [f"{self.samples} usable"]
        for reason, n in self.skipped_by_reason().items():
            ex = self.examples.get(reason)
            parts.append(f"{n} {reason}" + (f" (e.g. {ex[0]})" if ex else ""))
        if self.converted:
            modes = ", ".join(f"{m}: {n}" for m, n in self.converted_by_mode().items())
            parts.append(f"{self.converted} converted to RGB ({modes})")
        return "; ".join(parts)

    def raise_if_unusable(self, *, what: str = "") -> None:
        """Raise :class:`NoUsableDataError` naming the dataset and the reasons if no sample was usable."""
        if self.samples > 0:
            return
        where = f" {what}" if what else ""
        raise NoUsableDataError(
            f"dataset {self.dataset or '<unnamed>'!r}{where} yielded no usable sample: {self.summary()}. "
            "Check the image paths and caption column (see data_report.json for examples)."
        )

    # -- (de)serialise ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict: summary fields first, then the raw counts and examples."""
        return {
            "dataset": self.dataset,
            **self.summary_fields(),
            "counts": dict(sorted(self.counts.items())),
            "examples": {k: list(v) for k, v in sorted(self.examples.items()) if v},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DataReport":
        return cls(
            dataset=str(data.get("dataset", "")),
            counts={str(k): int(v) for k, v in dict(data.get("counts", {})).items()},
            examples={str(k): list(v) for k, v in dict(data.get("examples", {})).items()},
        )

    def write(self, output_dir: str | os.PathLike, *, filename: str = "data_report.json",
              extra: Mapping[str, Any] | None = None) -> Path:
        """Write :meth:`to_dict` (plus ``extra``) to ``output_dir/filename`` atomically; returns its path."""
        payload = self.to_dict()
        if extra:
            payload.update(extra)
        return atomic_write_json(Path(output_dir) / filename, payload)

    # -- ranks --------------------------------------------------------------------------------

    def all_reduce(self, *, world_size: int | None = None, group: Any = None) -> "DataReport":
        """The sum of every rank's counts (a new object); with one process, a copy of this one.

        A collective: every rank must call it. It exchanges the (small) reports with
        ``all_gather_object`` so that counts under any key and the examples all merge.
        """
        if world_size is None:
            world_size = dist.get_world_size(group) if group is not None else dist_info()[1]
        if world_size == 1:
            return self.copy()
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, self.to_dict(), group=group)
        return merge_reports((DataReport.from_dict(g) for g in gathered), dataset=self.dataset)


def merge_reports(reports: Iterable[DataReport | None], *, dataset: str = "") -> DataReport:
    """Sum several reports (e.g. one per rank or per worker) into a new one."""
    out = DataReport(dataset=dataset)
    for r in reports:
        out.merge(r)
    return out
