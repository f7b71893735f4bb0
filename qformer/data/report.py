"""Counting what the data pipeline used, skipped or converted: once per record, and per epoch.

``data_report.json`` gives two kinds of count, because they answer different questions:

* **unique records**: what the data *is*. How many distinct records are usable, skipped (by
  reason) or converted to RGB (by original mode). A bad file read in 3 epochs counts once.
* **events**: what training *consumed*. Every sample delivered and every skip, summed over
  epochs and ranks (a bad file read in 3 epochs counts 3 times), with the batch bookkeeping.

How the counts travel: DataLoader workers are separate processes, so a report object they update
is a copy the training process never sees. Every collated batch therefore carries a small
:class:`DataReport` delta (under :data:`DATA_STATS_KEY`) that describes exactly the samples that
batch consumed: event counts and, for map-style datasets, each sample's dataset index and status
(:attr:`DataReport.records`). :class:`~qformer.data.loader.CaptionLoader` merges the deltas:
event counts are summed; statuses go into a :class:`RecordStatus`, an array indexed by the
dataset index holding each record's latest status. The result is exact with any number of
workers, persistent or not, forked or spawned. Ranks are merged when the report is written:
event counts are summed (:meth:`DataReport.all_reduce`), status arrays are combined index by
index (:meth:`RecordStatus.all_gather`), so a record that two ranks read (the sampler pads the
last round by repetition) still counts once.

Unique counts by kind of dataset:

* map-style: exact, from the status array. Records never read (a run that stops mid-epoch) are
  not counted; ``records_seen < records`` then says so.
* streaming: a stream has no index to key a status array by, so the first epoch (the first pass
  over the data) stands for the unique records: its counts are kept apart from later epochs'.
  ``unique_basis`` says which basis was used; ``complete`` is false until that pass has ended.

``data_report.json`` (:meth:`LoaderReport.to_dict`)::

    dataset         the dataset's name
    unique_basis    "per_record" (map-style, exact) or "first_epoch" (streaming: the first pass)
    records         map-style: records in the dataset (after a scan: those it kept); streaming:
                    records read in the first pass
    records_seen    records read at least once (streaming: the same as records)
    complete        every record was read (map-style) / the first pass ended (streaming)
    usable_samples  unique records that gave a usable sample
    skipped_total   unique records skipped
    skipped         {reason: records}, reasons from SKIP_REASONS (``unreadable_shard`` counts errors)
    converted       {"total": records, "by_mode": {original mode: records}}: usable, converted to RGB
    events          per-epoch events, summed over epochs and ranks:
        usable_samples  samples training received (after rank trimming and drop_last)
        skipped_total / skipped / converted   as above, but once per read
        counts      every raw counter: samples, batches, empty_batches, rank_trimmed,
                    rank_skipped_batches, dropped_last, ...
    examples        up to 5 paths / sample names per reason, for a human to look at
    world_size      ranks merged
    epochs          epochs finished (per rank)
    scan            the up-front scan's counts in events form (map-style with scan=True only)
"""

from __future__ import annotations

import base64
import os
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from ..distributed import dist_info
from ..errors import DataError
from ..io import atomic_write_json

__all__ = [
    "CONVERTED",
    "DATA_STATS_KEY",
    "SKIP_REASONS",
    "USABLE",
    "DataReport",
    "LoaderReport",
    "NoUsableDataError",
    "RecordStatus",
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

#: The status of a record that gave a usable RGB sample (others: ``converted:<MODE>`` or a reason).
USABLE = "usable"


class NoUsableDataError(DataError, RuntimeError):
    """Nothing usable is left in a dataset (or an epoch yielded no sample); names the reasons."""


@dataclass(kw_only=True)
class DataReport:
    """Counts per reason (skips, conversions, samples, batches) with a few examples each.

    ``counts`` holds plain integers keyed by reason (:data:`SKIP_REASONS`, ``converted``,
    ``converted:<MODE>``) or by event (``samples`` delivered, ``batches``, ``empty_batches``,
    ``rank_trimmed`` ...), so that merging is a sum and any new key merges without a schema.
    ``examples`` keeps up to ``max_examples`` paths / sample names per reason, for a human to go
    and look at. ``records`` (in a batch's delta only) maps the dataset index of each record the
    batch read to its status; the loader moves it into a :class:`RecordStatus`.
    """

    dataset: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    records: dict[int, str] = field(default_factory=dict)
    max_examples: int = 5

    # -- accumulate ---------------------------------------------------------------------------

    def add(self, reason: str, example: str | None = None, *, n: int = 1) -> "DataReport":
        """Count ``n`` events of ``reason``; remember ``example`` if there is room."""
        if n:
            self.counts[reason] = self.counts.get(reason, 0) + int(n)
        if example is not None:
            ex = self.examples.setdefault(reason, [])
            if len(ex) < self.max_examples and example not in ex:
                ex.append(example)
        return self

    def merge(self, other: "DataReport | Mapping[str, Any] | None") -> "DataReport":
        """Add ``other``'s counts, examples and record statuses into this report (in place); returns self."""
        if other is None:
            return self
        if not isinstance(other, DataReport):
            other = DataReport.from_dict(other)
        for key, n in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + int(n)
        for key, exs in other.examples.items():
            for e in exs:
                self.add(key, e, n=0)
        self.records.update(other.records)
        if not self.dataset:
            self.dataset = other.dataset
        return self

    def copy(self) -> "DataReport":
        return DataReport(dataset=self.dataset, max_examples=self.max_examples).merge(self)

    def __bool__(self) -> bool:
        """True when anything was counted (an empty delta is not worth sending)."""
        return any(self.counts.values()) or any(self.examples.values()) or bool(self.records)

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
        """A JSON-able dict of the counts: summary fields first, then the raw counts and examples.
        (``records`` is transport between workers and the loader, not part of it.)"""
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
        """Write :meth:`to_dict` (plus ``extra``) to ``output_dir/filename`` atomically; returns its path.
        A training loader writes a :class:`LoaderReport` instead (unique counts and events)."""
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


class RecordStatus:
    """The latest status of every record of a map-style dataset, indexed by the dataset index.

    One int16 code per record (0: never read) and the status names the codes stand for
    (:data:`USABLE`, ``converted:<MODE>`` or a skip reason). A record read again (next epoch)
    takes its newest status, so a file fixed mid-run counts as what it is now.
    """

    def __init__(self, size: int) -> None:
        self.codes = np.zeros(int(size), dtype=np.int16)
        self.names: list[str] = [""]
        self._index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.codes)

    def code(self, status: str) -> int:
        """The code of ``status``, assigned on first use."""
        c = self._index.get(status)
        if c is None:
            c = len(self.names)
            if c > np.iinfo(np.int16).max:  # pragma: no cover - there are a few dozen statuses
                raise OverflowError("more distinct record statuses than an int16 code can hold")
            self.names.append(status)
            self._index[status] = c
        return c

    def update(self, statuses: Mapping[int, str]) -> None:
        """Set the status of each ``index: status``."""
        for index, status in statuses.items():
            self.codes[int(index)] = self.code(status)

    @property
    def seen(self) -> int:
        """Records read at least once."""
        return int(np.count_nonzero(self.codes))

    def counts(self) -> dict[str, int]:
        """{status: records with it}."""
        tally = np.bincount(self.codes, minlength=len(self.names))
        return {name: int(n) for name, n in zip(self.names[1:], tally[1:]) if n}

    def to_report(self, *, dataset: str = "") -> DataReport:
        """The statuses as counts: ``samples`` (usable records), skip reasons, ``converted[:MODE]``."""
        report = DataReport(dataset=dataset)
        for status, n in self.counts().items():
            if status == USABLE or status.startswith(CONVERTED + ":"):
                report.add("samples", n=n)
                if status != USABLE:
                    report.add(CONVERTED, n=n).add(status, n=n)
            else:
                report.add(status, n=n)
        return report

    def merge(self, other: "RecordStatus") -> "RecordStatus":
        """Take ``other``'s status for every record it has read (in place); returns self."""
        if len(other) != len(self):
            raise ValueError(f"cannot merge the statuses of {len(other)} records into {len(self)}")
        remap = np.array([0] + [self.code(n) for n in other.names[1:]], dtype=np.int16)
        read = other.codes != 0
        self.codes[read] = remap[other.codes[read]]
        return self

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the names and the zlib-compressed codes (runs of one status compress well)."""
        packed = base64.b64encode(zlib.compress(self.codes.tobytes(), 1)).decode("ascii")
        return {"size": len(self), "names": self.names[1:], "codes": packed}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "RecordStatus":
        out = cls(int(state["size"]))
        for name in state.get("names", []):
            out.code(str(name))
        codes = np.frombuffer(zlib.decompress(base64.b64decode(state["codes"])), dtype=np.int16)
        if codes.shape != out.codes.shape:
            raise ValueError(f"record statuses for {codes.size} records, expected {len(out)}")
        out.codes[:] = codes
        return out

    def all_gather(self, *, world_size: int) -> "RecordStatus":
        """Every rank's statuses combined (a new object; a collective when ``world_size > 1``)."""
        merged = RecordStatus(len(self)).merge(self)
        if world_size == 1:
            return merged
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, self.state_dict())
        merged = RecordStatus(len(self))
        for state in gathered:
            merged.merge(RecordStatus.from_state_dict(state))
        return merged


@dataclass(kw_only=True)
class LoaderReport:
    """What ``data_report.json`` holds: unique record counts and per-epoch events (see the module
    docstring for every field). Built by :meth:`qformer.data.loader.CaptionLoader.merged_report`."""

    dataset: str
    unique: DataReport
    events: DataReport
    unique_basis: str  # "per_record" or "first_epoch"
    records: int
    records_seen: int
    complete: bool
    world_size: int = 1
    epochs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        examples = self.events.copy().merge(self.unique).examples
        return {
            "dataset": self.dataset,
            "unique_basis": self.unique_basis,
            "records": self.records,
            "records_seen": self.records_seen,
            "complete": self.complete,
            **self.unique.summary_fields(),
            "events": {**self.events.summary_fields(), "counts": dict(sorted(self.events.counts.items()))},
            "examples": {k: list(v) for k, v in sorted(examples.items()) if v},
            "world_size": self.world_size,
            "epochs": self.epochs,
            **self.extra,
        }

    def summary(self) -> str:
        """One line: the unique counts, then what the epochs consumed."""
        basis = "" if self.unique_basis == "per_record" else " in the first pass"
        seen = "" if self.records_seen == self.records else f" ({self.records_seen} read so far)"
        head = f"{self.records} records{basis}{seen}: {self.unique.summary()}"
        return f"{head}; over {self.epochs} epoch(s): {self.events.samples} samples used, {self.events.skipped} skips"

    def write(self, output_dir: str | os.PathLike, *, filename: str = "data_report.json") -> Path:
        """Write :meth:`to_dict` to ``output_dir/filename`` atomically; returns its path."""
        return atomic_write_json(Path(output_dir) / filename, self.to_dict())
