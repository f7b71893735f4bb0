"""A DataLoader wrapper that accounts for skipped data, skips empty batches and keeps ranks in step.

:class:`CaptionLoader` builds the torch ``DataLoader`` (a :class:`ResumableSampler` for map-style
datasets) and, for every batch, pops the batch's counts (``data_stats``), merges them into its
:class:`~qformer.data.report.DataReport`, and:

* skips a batch that ended up empty (every sample in it was bad), counting it;
* with several ranks (``balance_ranks``, the default then), trims every rank's batch to the
  smallest one so that all ranks see the same batch size — stage 1 gathers features across
  ranks and needs equal local batches — and all ranks skip a step together when one is empty;
* at the end of an epoch with no usable sample (summed over ranks), raises
  :class:`~qformer.data.report.NoUsableDataError` naming the dataset and the reason counts.

It also counts every record once, however many epochs read it: for map-style datasets the
batch's record statuses go into a :class:`~qformer.data.report.RecordStatus` indexed by the
dataset index; for streaming ones the first pass over the data is kept apart as the unique count.
:meth:`CaptionLoader.write_report` merges the ranks' counts and writes ``data_report.json``
(fields: :mod:`qformer.data.report`). :meth:`state_dict` / :meth:`load_state_dict` resume
mid-epoch exactly (map-style: the sampler restarts at the next unseen index; streaming: the
consumed batches are read and discarded).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from ..distributed import dist_info
from .collate import is_empty_batch
from .dataset import CaptionDataset
from .report import DATA_STATS_KEY, DataReport, LoaderReport, RecordStatus

__all__ = ["CaptionLoader", "ResumableSampler"]


class ResumableSampler(Sampler[int]):
    """Like ``DistributedSampler`` (a seeded permutation per epoch, rank-strided, padded by
    repetition unless ``drop_last``) plus a one-shot ``start`` offset for mid-epoch resume."""

    def __init__(self, length: int, *, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> None:
        self.length, self.rank, self.world_size = int(length), int(rank), int(world_size)
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self.epoch = 0
        self.start = 0
        if self.drop_last:
            self.per_rank = self.length // self.world_size
        else:
            self.per_rank = math.ceil(self.length / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> list[int]:
        """This rank's indices for the current epoch (without the start offset)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.per_rank * self.world_size
        if total > len(order) and order:
            order = (order * math.ceil(total / len(order)))[:total]
        return order[:total][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        return iter(self.indices()[start:])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)


def _trim(batch: dict[str, Any], n: int) -> dict[str, Any]:
    return {k: (v[:n] if isinstance(v, torch.Tensor) and v.ndim > 0 else v) for k, v in batch.items()}


class CaptionLoader:
    """Iterate clean batches (dicts of tensors) over a caption dataset; see the module docstring.

    Args:
        dataset: a :class:`CaptionDataset` or :class:`IterableCaptionDataset`.
        collate_fn: e.g. :class:`~qformer.data.collate.Stage1Collator`; it must put the batch's
            counts under ``data_stats``.
        batch_size / shuffle / drop_last / num_workers / pin_memory / persistent_workers /
            prefetch_factor / multiprocessing_context: as for ``DataLoader`` (``shuffle`` only for
            map-style; streaming datasets shuffle with their ``shuffle_buffer``).
        seed: the sampler's permutation seed.
        rank / world_size: default to the process group's (or 0 / 1).
        balance_ranks: equalise batch sizes across ranks (default: when world_size > 1).
        device: where the small cross-rank reductions run (default: CUDA for NCCL, else CPU).
    """

    def __init__(
        self,
        dataset: Any,
        collate_fn: Callable[[list[Any]], dict[str, Any]],
        *,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        multiprocessing_context: Any = None,
        balance_ranks: bool | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if rank is None or world_size is None:
            rank, world_size = dist_info()
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.drop_last = drop_last
        self.rank, self.world_size = int(rank), int(world_size)
        self.balance_ranks = self.world_size > 1 if balance_ranks is None else balance_ranks
        self.device = torch.device(device) if device is not None else None
        self.name = getattr(dataset, "name", type(dataset).__name__)
        self.map_style = isinstance(dataset, CaptionDataset)
        self.sampler: ResumableSampler | None = None
        if self.map_style:
            self.sampler = ResumableSampler(len(dataset), rank=self.rank, world_size=self.world_size, shuffle=shuffle,
                                            seed=seed, drop_last=drop_last)
        kwargs: dict[str, Any] = {}
        if num_workers > 0:
            kwargs.update(persistent_workers=persistent_workers, multiprocessing_context=multiprocessing_context)
            if prefetch_factor is not None:
                kwargs["prefetch_factor"] = prefetch_factor
        self.loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
            # Streaming: the last partial batch of a worker carries the trailing counts, so it is
            # always produced; drop_last is applied after its counts are merged (below).
            drop_last=drop_last if self.map_style else False,
            **kwargs,
        )
        self.epoch = 0
        self.epochs_done = 0  # epochs this loader finished (restored on resume)
        self.report = DataReport(dataset=self.name)  # events of finished epochs, this rank
        self.epoch_report = DataReport(dataset=self.name)  # events of the current epoch
        # Unique records: map-style, each record's latest status by dataset index; streaming,
        # the raw counts of the first pass (before rank trimming / drop_last adjust the events).
        self.status: RecordStatus | None = RecordStatus(len(dataset)) if self.map_style else None
        self.first_pass = DataReport(dataset=self.name)
        self.first_pass_done = False
        self._batches_done = 0  # raw DataLoader batches consumed in the current epoch
        self._resume_batches = 0

    # -- epochs and resume ---------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation and augmentations the next iteration uses."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Batches per epoch on this rank (map-style only; empty batches are skipped, so at most this)."""
        if self.sampler is None:
            raise TypeError(f"{self.name} is streaming: its number of batches is not known")
        n = self.sampler.per_rank
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def state_dict(self, *, all_ranks: bool = False) -> dict[str, Any]:
        """Where to resume: the epoch, the raw batches consumed in it, and the counts so far.

        Every rank holds only its own counts, while a checkpoint usually keeps one rank's state:
        restored on every rank, rank 0's past events would then count once per rank, and the
        other ranks' past would be lost. ``all_ranks=True`` (a collective: call it on every
        rank, e.g. just before saving) stores
        the counts merged over ranks instead; :meth:`load_state_dict` then gives them to rank 0
        alone, so that the report merged after a resume counts every rank's past exactly once.
        """
        report, epoch_report, first, status = self.report, self.epoch_report, self.first_pass, self.status
        merged = all_ranks and self.world_size > 1
        if merged:
            report = report.all_reduce(world_size=self.world_size)
            epoch_report = epoch_report.all_reduce(world_size=self.world_size)
            first = first.all_reduce(world_size=self.world_size)
            status = status.all_gather(world_size=self.world_size) if status is not None else None
        return {
            "epoch": self.epoch,
            "batches_done": self._batches_done,
            "epochs_done": self.epochs_done,
            "report": report.to_dict(),  # finished epochs
            "epoch_report": epoch_report.to_dict(),  # the current epoch so far
            "first_pass": first.to_dict(),
            "first_pass_done": self.first_pass_done,
            "records": status.state_dict() if status is not None else None,
            "merged_over_ranks": merged,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self._resume_batches = int(state.get("batches_done", 0))
        self.epochs_done = int(state.get("epochs_done", 0))
        self.first_pass_done = bool(state.get("first_pass_done", False))
        mine = not state.get("merged_over_ranks") or self.rank == 0  # merged counts: rank 0 holds them
        empty: dict[str, Any] = {}
        self.report = DataReport.from_dict(state.get("report", empty) if mine else empty)
        self.epoch_report = DataReport.from_dict(state.get("epoch_report", empty) if mine else empty)
        self.first_pass = DataReport.from_dict(state.get("first_pass", empty) if mine else empty)
        for r in (self.report, self.epoch_report, self.first_pass):
            r.dataset = self.name
        if self.status is not None:
            records = state.get("records") if mine else None
            self.status = RecordStatus.from_state_dict(records) if records else RecordStatus(len(self.dataset))

    # -- iteration -----------------------------------------------------------------------------

    def _reduce_device(self) -> torch.device:
        if self.device is not None:
            return self.device
        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _all_reduce_min(self, n: int) -> int:
        t = torch.tensor([n], dtype=torch.int64, device=self._reduce_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def _all_reduce_sum(self, n: int) -> int:
        if self.world_size == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64, device=self._reduce_device())
        dist.all_reduce(t)
        return int(t.item())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch
        resume, self._resume_batches = self._resume_batches, 0
        if resume == 0:
            # A previous iteration left before the end (a step budget, a break): keep its counts.
            self.report.merge(self.epoch_report)
            self.epoch_report = DataReport(dataset=self.name)
            if not self.first_pass_done:  # the pass starts again from the top: count it afresh
                self.first_pass = DataReport(dataset=self.name)
        self.dataset.set_epoch(epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
            self.sampler.start = resume * self.batch_size
            skip_raw = 0
        else:
            skip_raw = resume  # streaming: re-read and discard (their counts were restored)
        self._batches_done = resume
        for raw_index, batch in enumerate(self.loader):
            if raw_index < skip_raw:
                continue
            self._batches_done += 1
            stats = batch.pop(DATA_STATS_KEY, None)
            if stats is None:
                raise TypeError(f"the collate_fn must put the batch's DataReport under {DATA_STATS_KEY!r}")
            self._count(stats)
            n = 0 if is_empty_batch(batch) else len(batch["image_ids"])
            report = self.epoch_report
            if not self.map_style and self.drop_last and 0 < n < self.batch_size:
                # "samples" / "batches" count what training received: take these back out.
                report.add("dropped_last", n=n).add("samples", n=-n).add("batches", n=-1)
                n = 0
            if self.balance_ranks and self.world_size > 1:
                m = self._all_reduce_min(n)
                if m < n:
                    report.add("rank_trimmed", n=n - m).add("samples", n=-(n - m))
                    if m == 0:
                        report.add("rank_skipped_batches").add("batches", n=-1)
                    n = m
                    batch = _trim(batch, m)
            if n == 0:
                continue
            yield batch
        self._finish_epoch()

    def _count(self, stats: DataReport | dict[str, Any]) -> None:
        """Merge one batch's delta: record statuses into :attr:`status`, the raw counts into the
        first pass (streaming, until it ends) and into the epoch's events."""
        if not isinstance(stats, DataReport):
            stats = DataReport.from_dict(stats)
        if stats.records:
            if self.status is not None:
                self.status.update(stats.records)
            stats.records = {}
        if self.status is None and not self.first_pass_done:
            self.first_pass.merge(stats)
        self.epoch_report.merge(stats)

    def _finish_epoch(self) -> None:
        report = self.epoch_report
        usable = self._all_reduce_sum(report.samples)
        self.report.merge(report)
        self.epochs_done += 1
        self.first_pass_done = True
        self.epoch_report = DataReport(dataset=self.name)
        self.epoch += 1
        self._batches_done = 0
        if usable == 0:
            merged = report.all_reduce(world_size=self.world_size)
            merged.dataset = self.name
            merged.raise_if_unusable(what=f"in epoch {self.epoch - 1}")

    # -- reporting ------------------------------------------------------------------------------

    def merged_report(self) -> LoaderReport:
        """Unique record counts and events, every rank's merged, the unfinished epoch included
        (a collective when world_size > 1). Fields: :mod:`qformer.data.report`."""
        events = self.report.copy().merge(self.epoch_report).all_reduce(world_size=self.world_size)
        events.dataset = self.name
        if self.status is not None:
            status = self.status.all_gather(world_size=self.world_size)
            unique = status.to_report(dataset=self.name)
            basis, records, seen, complete = "per_record", len(status), status.seen, status.seen == len(status)
        else:
            unique = self.first_pass.all_reduce(world_size=self.world_size)
            unique.dataset = self.name
            basis, complete = "first_epoch", self.first_pass_done
            records = seen = unique.samples + unique.skipped
        extra: dict[str, Any] = {}
        scan = getattr(self.dataset, "scan_report", None)
        if scan is not None:
            extra["scan"] = scan.to_dict()
        return LoaderReport(dataset=self.name, unique=unique, events=events, unique_basis=basis, records=records,
                            records_seen=seen, complete=complete, world_size=self.world_size, epochs=self.epochs_done,
                            extra=extra)

    def write_report(self, output_dir: str | os.PathLike, *, filename: str = "data_report.json") -> Path | None:
        """Merge the ranks' counts and write ``output_dir/filename`` on rank 0 (a collective).

        The pre-scan's counts, if the dataset was scanned, are written under ``"scan"``.
        """
        merged = self.merged_report()
        if self.rank != 0:
            return None
        return merged.write(output_dir, filename=filename)
