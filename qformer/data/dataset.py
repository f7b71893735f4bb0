"""torch datasets over caption sources: map-style (exact length, exact resume) and iterable.

How bad samples flow, so that the DataLoader never receives None:

* :class:`CaptionDataset` (map-style) returns a :class:`~qformer.data.samples.Skipped` sentinel
  for a bad index; the collator drops it and counts it. Batches can be smaller than
  ``batch_size``, and a batch of only bad samples is an *empty batch*, counted and skipped by
  :class:`~qformer.data.loader.CaptionLoader`.
* :class:`IterableCaptionDataset` filters bad samples itself and attaches their counts to the
  next good sample (and a final stats-only sentinel at the end of the stream), so streaming
  batches stay full.

Augmentation is seeded per sample from ``(seed, epoch, sample key)`` (see
:func:`~qformer.data.transforms.sample_seed`); the epoch lives in shared memory so that
``set_epoch`` reaches persistent DataLoader workers too.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..config import VisionConfig
from ..distributed import dist_info
from ..errors import ConfigError
from .cache import FeatureCache
from .report import DataReport, NoUsableDataError
from .samples import Sample, SampleProcessor, Skipped
from .sources import CaptionSource, json_rows, open_caption_source
from .sources.instruct import TASKS, InstructionMixture, InstructionSource
from .transforms import CaptionCleaner, ImageTransform, build_image_transform, sample_generator

__all__ = ["CaptionDataset", "IterableCaptionDataset", "open_caption_dataset"]


def _shared_epoch(epoch: int = 0) -> torch.Tensor:
    """An int64 scalar in shared memory: forked or spawned workers see later writes."""
    return torch.tensor(epoch, dtype=torch.int64).share_memory_()


class _SharedEpoch:
    """The source's name and the epoch, held in shared memory so that ``set_epoch`` reaches
    persistent DataLoader workers too (it seeds the next epoch's augmentations)."""

    source: CaptionSource
    _epoch: torch.Tensor

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))


class CaptionDataset(_SharedEpoch, Dataset):
    """Map-style: ``dataset[i]`` is a :class:`Sample` or a :class:`Skipped` sentinel.

    Args:
        source: a map-style :class:`CaptionSource`.
        processor: validates and transforms records.
        seed: augmentation seed (with the epoch and the record's key).
        scan: validate every record now and keep only the usable ones, so that ``len`` is exact
            (decodes every image once: for small local datasets). The result is
            :attr:`scan_report`; nothing usable raises :class:`NoUsableDataError`.
        progress: a tqdm bar for the scan.
    """

    def __init__(self, source: CaptionSource, *, processor: SampleProcessor, seed: int = 0, scan: bool = False,
                 progress: bool = False) -> None:
        if not source.is_map_style:
            raise TypeError(f"{source.name} is a streaming source; use IterableCaptionDataset")
        self.source = source
        self.processor = processor
        self.seed = int(seed)
        self._epoch = _shared_epoch()
        self._indices: list[int] | None = None
        self.scan_report: DataReport | None = None
        if scan:
            self.scan(progress=progress)

    def __len__(self) -> int:
        return len(self._indices) if self._indices is not None else len(self.source)

    def source_index(self, index: int) -> int:
        return self._indices[index] if self._indices is not None else index

    def __getitem__(self, index: int) -> Sample | Skipped:
        src = self.source_index(int(index))
        record = self.source.record(src)
        key = getattr(record, "key", str(src))
        item = self.processor(record, generator=sample_generator(self.seed, self.epoch, key))
        item.index = int(index)  # the loader counts each record once by this index (see .report)
        return item

    def scan(self, *, progress: bool = False) -> DataReport:
        """Validate every record and keep the usable ones; returns (and stores) the scan report."""
        from tqdm.auto import tqdm

        report = DataReport(dataset=self.name)
        keep: list[int] = []
        for i in tqdm(range(len(self.source)), disable=not progress, desc=f"scanning {self.name}", unit="record"):
            delta = self.processor.validate(self.source.record(i))
            report.merge(delta)
            if delta.skipped == 0:
                keep.append(i)
        report.add("scanned", n=len(self.source))
        report.add("samples", n=len(keep))
        self._indices = keep
        self.scan_report = report
        if not keep:
            raise NoUsableDataError(
                f"dataset {self.name!r}: nothing usable is left after the scan of {len(self.source)} record(s): "
                f"{report.summary()}"
            )
        return report


class IterableCaptionDataset(_SharedEpoch, IterableDataset):
    """Streaming: yields :class:`Sample` only (bad samples are filtered and counted).

    The data is split across ``rank`` x DataLoader worker (``world_size * num_workers``
    consumers, see :meth:`CaptionSource.iter_records`). ``shuffle_buffer > 0`` shuffles within a
    buffer, seeded by (seed, epoch, consumer). Counts of skipped records ride on the next good
    sample's ``report``; whatever is pending at the end is yielded as one :class:`Skipped`.

    Note: with several ranks the number of batches per rank can differ for streaming data; stop
    every rank at a fixed number of steps (as usual for streaming DDP).
    """

    def __init__(self, source: CaptionSource, *, processor: SampleProcessor, seed: int = 0, shuffle_buffer: int = 0,
                 rank: int | None = None, world_size: int | None = None) -> None:
        self.source = source
        self.processor = processor
        self.seed = int(seed)
        self.shuffle_buffer = int(shuffle_buffer)
        if rank is None or world_size is None:
            rank, world_size = dist_info()
        self.rank, self.world_size = int(rank), int(world_size)
        self._epoch = _shared_epoch()

    def _consumer(self) -> tuple[int, int]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * nworkers + wid, self.world_size * nworkers

    def __iter__(self) -> Iterator[Sample | Skipped]:
        consumer, consumers = self._consumer()
        epoch = self.epoch
        records: Iterator[Any] = self.source.iter_records(shard=consumer, num_shards=consumers)
        if self.shuffle_buffer > 1:
            records = _buffer_shuffle(records, size=self.shuffle_buffer,
                                      rng=random.Random(f"{self.seed}/{epoch}/{consumer}"))
        pending = DataReport()
        for record in records:
            item = self.processor(record, generator=sample_generator(self.seed, epoch, getattr(record, "key", "")))
            if isinstance(item, Skipped):
                pending.merge(item.report)
                continue
            if pending:
                item.report = pending.merge(item.report) if item.report is not None else pending
                pending = DataReport()
            yield item
        if pending:
            yield Skipped(report=pending, carrier=True)


def _buffer_shuffle(items: Iterator[Any], *, size: int, rng: random.Random) -> Iterator[Any]:
    """A seeded shuffle buffer of ``size`` items (webdataset-style)."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


def open_caption_dataset(
    spec: Any,
    *,
    split: str = "train",
    streaming: bool = False,
    vision: VisionConfig | None = None,
    train: bool = True,
    transform: ImageTransform | None = None,
    captions: CaptionCleaner | None = None,
    min_image_size: int = 8,
    scan: bool = False,
    feature_cache: FeatureCache | None = None,
    seed: int = 0,
    shuffle_buffer: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = False,
    **source_options: Any,
) -> CaptionDataset | IterableCaptionDataset:
    """Open an image-caption dataset for training or evaluation.

    Args:
        spec: what :func:`~qformer.data.sources.open_caption_source` takes (hub name, imagefolder
            directory, .jsonl/.json/.csv/.tsv file, .tar shard pattern, a dict, an HF dataset).
        split / streaming: for HF datasets; ``streaming=True`` also makes JSONL/CSV lazy. A
            map-style source gives a :class:`CaptionDataset`, a streaming one an
            :class:`IterableCaptionDataset`.
        vision: the tower's :class:`VisionConfig` (image size, mean/std, interpolation), used to
            build the transform unless ``transform`` is given.
        train: True for BLIP-2's random train transform, False for the eval transform.
        captions: caption cleaning (default :class:`CaptionCleaner`: 50 words, no prompt).
        min_image_size: smaller images are skipped as ``tiny_image``.
        scan: pre-validate every record (map-style only) so that ``len`` is exact.
        feature_cache: a :class:`~qformer.data.cache.FeatureCache`; samples then carry
            ``vision_features``. Refused with ``train=True`` (random augmentation).
        seed: augmentation / shuffle-buffer seed.
        source_options: ``image_column``, ``caption_column``, ``id_column``, ``cache_dir``,
            ``image_root`` ...
    """
    source = open_caption_source(spec, split=split, streaming=streaming, **source_options)
    if feature_cache is not None and train and (transform is None or getattr(transform, "is_random", True)):
        raise ConfigError(
            f"{source.name}: the feature cache holds features of un-augmented images and cannot be used with random "
            "augmentation; pass train=False to read cached features (or drop feature_cache to augment)"
        )
    if transform is None and feature_cache is None:
        if vision is None:
            raise ConfigError("open_caption_dataset needs vision= (the tower's VisionConfig) or transform=")
        transform = build_image_transform(vision, train=train)
    processor = SampleProcessor(
        transform=None if feature_cache is not None else transform,
        captions=captions or CaptionCleaner(),
        min_image_size=min_image_size,
        feature_cache=feature_cache,
    )
    if source.is_map_style:
        return CaptionDataset(source, processor=processor, seed=seed, scan=scan, progress=progress)
    if scan:
        raise ConfigError(f"{source.name}: scan=True needs a map-style source (a streaming one has no index to prune)")
    return IterableCaptionDataset(source, processor=processor, seed=seed, shuffle_buffer=shuffle_buffer, rank=rank,
                                  world_size=world_size)



def _instruction_part(entry: Any, *, image_root: Any = None, template: str | None = None, weighted: bool = False,
                      **source_options: Any) -> tuple[InstructionSource, float | None]:
    """One dataset of an instruction mixture: ``entry`` is a spec (a path: an instruction / LLaVA /
    VQA file is recognised by its fields, anything else is a caption dataset) or a dict
    ``{"path": spec, "task": auto|instruction|vqa|caption, "weight": w}``; ``template`` /
    ``weighted`` as :meth:`InstructionSource.from_file`."""
    if isinstance(entry, dict):
        entry = dict(entry)
        spec, task, weight = entry.pop("path", entry.pop("spec", None)), entry.pop("task", "auto"), entry.pop("weight", None)
        if spec is None:
            raise ConfigError(f"instruction dataset {entry}: no 'path'")
        if entry:
            raise ConfigError(f"instruction dataset {spec}: unknown field(s) {sorted(entry)}; known: path, task, weight")
    else:
        spec, task, weight = entry, "auto", None
    if task not in TASKS:
        raise ConfigError(f"instruction dataset {spec}: task must be one of {list(TASKS)}, got {task!r}")
    is_file = isinstance(spec, (str, Path)) and Path(str(spec)).suffix.lower() in (".jsonl", ".json")
    if task == "auto" and is_file:
        first = _first_row(Path(str(spec)))
        looks_instructed = any(f in first for f in ("conversations", "instruction", "question", "prompt"))
        task = "auto" if looks_instructed else "caption"
    if task == "caption" or not is_file:
        return InstructionSource.from_captions(open_caption_source(spec, **source_options)), weight
    return InstructionSource.from_file(spec, task=task, image_root=image_root, template=template,
                                       weighted=weighted), weight


def _first_row(path: Path) -> dict:
    """The first object of a JSONL / JSON-list file ({} if none), to tell its format."""
    if not path.is_file():
        raise FileNotFoundError(2, "instruction file not found", str(path))
    return next((row for _, _, row in json_rows(path, what="instruction") if isinstance(row, dict)), {})


def open_instruction_mixture(specs: Any, *, weights: list[float] | None = None, seed: int = 0,
                             vqa_template: str | None = None, weighted_answers: bool = False,
                             **source_options: Any) -> InstructionMixture:
    """The instruction datasets of ``specs`` (one or a list; see :func:`open_instruction_dataset`)
    as one mixture: sampled in proportion to the square root of their sizes (InstructBLIP), or to
    the ``weight`` of each entry / ``weights``. ``vqa_template``: VQA rows all asked this way
    (default: one of InstructBLIP's ten per row); ``weighted_answers``: rows with several answers
    train on all of them, weighted (BLIP-2's VQA fine-tuning; default: the most frequent one)."""
    entries = list(specs) if isinstance(specs, (list, tuple)) else [specs]
    parts = [_instruction_part(e, template=vqa_template, weighted=weighted_answers, **source_options) for e in entries]
    given = [w for _, w in parts]
    if weights is None and any(w is not None for w in given):
        if not all(w is not None for w in given):
            raise ConfigError("give a weight to every instruction dataset or to none (default: sqrt of the sizes)")
        weights = [float(w) for w in given]
    return InstructionMixture([p for p, _ in parts], weights=weights, seed=seed)


def open_instruction_dataset(
    specs: Any,
    *,
    vision: VisionConfig,
    train: bool = True,
    feature_cache: FeatureCache | None = None,
    num_frames: int = 4,
    weights: list[float] | None = None,
    seed: int = 0,
    max_words: int = 256,
    min_image_size: int = 8,
    **source_options: Any,
) -> CaptionDataset:
    """The instruction-tuning dataset: one or more datasets (see :mod:`qformer.data.sources.instruct`)
    mixed by :func:`open_instruction_mixture` (or an :class:`InstructionMixture` already opened).
    Answers are cleaned as captions (lowercase, no punctuation) up to ``max_words``; instructions
    are kept verbatim. Video records are sampled to ``num_frames`` frames (and never read from the
    feature cache)."""
    source = specs if isinstance(specs, InstructionMixture) else open_instruction_mixture(
        specs, weights=weights, seed=seed, **source_options)
    if feature_cache is not None and train:
        raise ConfigError("the feature cache holds un-augmented features: open instruction data with train=False")
    if feature_cache is not None and source.has_video:
        raise ConfigError(f"{source.name}: video clips are not in the feature cache; open it without feature_cache")
    processor = SampleProcessor(
        transform=None if feature_cache is not None else build_image_transform(vision, train=train),
        captions=CaptionCleaner(max_words=max_words), min_image_size=min_image_size, feature_cache=feature_cache,
        num_frames=num_frames,
    )
    return CaptionDataset(source, processor=processor, seed=seed)
