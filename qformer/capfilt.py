"""CapFilt, BLIP's captioning and filtering data engine (reference notes, sections 5 and 9).

A *captioner* (a stage-2 model) writes synthetic captions of every image by nucleus sampling; a
*filter* (a stage-1 model with ITC / ITM heads) scores the web caption(s) and each synthetic
caption against the image and keeps the pairs that match. The kept pairs are a caption file the
training recipes read as they are (``--train-data OUT/capfilt.jsonl``).

    result = run_capfilt(captioner, filter_model, "web.jsonl", "out/", CapFiltConfig())   # BLIP
    result = run_capfilt(captioner, filter_model, "web.jsonl", "out/", CapFiltConfig.blip2())

* **BLIP** (default): one caption per image (top-p 0.9); a pair is kept when its ITM match
  probability is at least 0.5. **BLIP-2** (:meth:`CapFiltConfig.blip2`): ten captions per image,
  ranked with the web caption by ITC similarity, the best two kept. Both rules can be combined
  (``itm_threshold`` and ``itc_top_n``, ``rule`` "all" or "any").
* **Seeded per caption**: caption ``k`` of image ``i`` is sampled with its own generator, seeded
  from (seed, i, k) (:class:`SeededNucleusSampler`), so the captions do not depend on the batch,
  the shard or the number of ranks.
* **Shards**: image ``i`` (images numbered in the order the data first names them; the captions
  of one image share its image id) is in shard ``i // shard_size``; rank ``r`` of ``W`` does the
  shards ``s`` with ``s % W == r`` and writes each to ``shards/shard-NNNNN.json`` atomically (a
  temporary file, then a rename), so a shard is either finished or absent: a run started again
  skips every finished shard. No caption goes through another rank; after a barrier rank 0
  concatenates the kept pairs of every shard into ``capfilt.jsonl`` and writes the report.
* **Bad data** is skipped and counted as in training (:class:`~qformer.data.report.DataReport`,
  the same reasons); an image without a usable web caption is still captioned.

A streaming source (webdataset shards, a streamed hub dataset) is read through by every rank
(only its own shards are decoded) and an image is a run of consecutive records with one image
id; a map-style source groups all records of an image id wherever they are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from transformers import LogitsProcessor, LogitsProcessorList

from .data import open_caption_source
from .data.reading import SkipSample
from .data.report import DataReport
from .data.samples import SampleProcessor, converted_report
from .data.sources import BadRecord, CaptionRecord
from .data.transforms import CaptionCleaner, sample_seed
from .distributed import resolve_dist
from .errors import ConfigError, DataError, ImageLoadError
from .generation import generate
from .inference import text_features_of, tokenize
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .med import index_kv
from .model import Blip2Model

FORMAT_VERSION = 1
RULES = ("all", "any")
SOURCES = ("web", "synthetic")


@dataclass(kw_only=True)
class CapFiltConfig:
    """What to write and what to keep. Defaults are BLIP's CapFilt; :meth:`blip2` is BLIP-2's."""

    num_captions: int = 1  # synthetic captions per image (BLIP 1, BLIP-2 10)
    top_p: float = 0.9  # nucleus sampling (BLIP's captioner)
    top_k: int = 50  # applied first, as transformers' (and so BLIP's) sampling does by default; 0: off
    temperature: float = 1.0
    max_new_tokens: int = 30  # BLIP: max_length 30
    min_new_tokens: int = 5  # BLIP: min_length 5
    repetition_penalty: float = 1.0  # BLIP's generate used 1.1 with its own decoder
    prompt: str | None = None  # None: the captioner's training prompt (config.llm.prompt)
    itm_threshold: float | None = 0.5  # keep pairs whose ITM match probability >= this (None: no ITM rule)
    itc_top_n: int = 0  # keep each image's n best candidates (web and synthetic) by ITC (0: no ITC rule)
    rule: str = "all"  # with both rules: "all" keeps pairs passing both, "any" pairs passing either
    shard_size: int = 1000  # images per shard (the unit of resumption and of rank assignment)
    batch_size: int = 16  # images per captioning / scoring pass (x num_captions generated rows)
    num_workers: int = 0  # DataLoader workers decoding images
    seed: int = 0
    max_words: int = 50  # the training recipes' caption cleaning, before scoring
    min_image_size: int = 8  # as training: smaller images are skipped (tiny_image)
    dropped_examples: int = 20  # dropped pairs quoted in the report

    @classmethod
    def blip2(cls, **overrides: Any) -> "CapFiltConfig":
        """BLIP-2's bootstrapping: 10 captions per image, the best 2 of them and the web caption by ITC."""
        return cls(**{"num_captions": 10, "itm_threshold": None, "itc_top_n": 2, **overrides})

    def check(self) -> None:
        if self.num_captions < 0:
            raise ConfigError(f"num_captions must be >= 0, got {self.num_captions}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.itm_threshold is None and self.itc_top_n <= 0:
            raise ConfigError("CapFilt needs a filter rule: an itm_threshold, an itc_top_n > 0, or both")
        if self.rule not in RULES:
            raise ConfigError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ConfigError("shard_size and batch_size must be >= 1")

    def fingerprint(self, identity: Any = None) -> str:
        """What decides a shard's rows (not how fast they are made): finished shards of another
        fingerprint are not reused."""
        keep = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("batch_size", "num_workers")}
        blob = json.dumps({"config": keep, "identity": identity, "version": FORMAT_VERSION}, sort_keys=True, default=str)
        return hashlib.blake2b(blob.encode(), digest_size=12).hexdigest()


# ---------------------------------------------------------------------------- captioning
class SeededNucleusSampler(LogitsProcessor):
    """Top-k then nucleus (top-p) sampling, transformers' ``do_sample`` filters in their order
    (temperature, top-k, top-p), with one generator per row: row ``b`` draws its token from
    its own generator and the scores become one-hot, so greedy decoding (``do_sample=False``)
    emits the drawn token. A row's draws depend only on its seed, never on the rows it is
    batched with. Only the ``top_k`` best tokens are sorted (transformers sorts the vocabulary)."""

    def __init__(self, seeds: Sequence[int], *, top_p: float = 0.9, top_k: int = 50, temperature: float = 1.0) -> None:
        self.seeds = list(seeds)
        self.top_p, self.top_k, self.temperature = float(top_p), int(top_k), float(temperature)
        self.generators: list[torch.Generator] | None = None

    def nucleus(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities (B, k) renormalised over the kept tokens, their token ids (B, k)), best first."""
        scores = scores.float() / self.temperature
        k = scores.shape[1] if self.top_k <= 0 else min(self.top_k, scores.shape[1])
        values, ids = scores.topk(k, dim=1)  # (B, k), descending
        probs = values.softmax(dim=1)
        before = probs.cumsum(dim=1) - probs  # mass of the better tokens
        if self.top_p < 1.0:
            probs = probs.masked_fill(before >= self.top_p, 0.0)  # the best token is always kept (before = 0)
        return probs / probs.sum(dim=1, keepdim=True), ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.seeds):
            raise ValueError(f"{scores.shape[0]} rows but {len(self.seeds)} seeds")
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        probs, ids = self.nucleus(scores)
        u = torch.stack([torch.rand((), generator=g, device=scores.device) for g in self.generators])  # (B,)
        pick = torch.searchsorted(probs.cumsum(dim=1), u.unsqueeze(1)).clamp_(max=probs.shape[1] - 1)  # (B, 1)
        token = ids.gather(1, pick)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


def caption_seed(seed: int, image_index: int, k: int) -> int:
    """The seed of caption ``k`` of image ``image_index``."""
    return sample_seed(seed, 0, f"capfilt/{image_index}/{k}")


@torch.no_grad()
def sample_captions(captioner: Blip2Model, pixels: torch.Tensor, image_indices: Sequence[int],
                    config: CapFiltConfig) -> list[list[str]]:
    """``config.num_captions`` nucleus-sampled captions of each image (pixels (B, 3, S, S)),
    caption ``k`` of image ``i`` drawn with :func:`caption_seed` (seed, i, k)."""
    k = config.num_captions
    if k == 0 or pixels.shape[0] == 0:
        return [[] for _ in range(pixels.shape[0])]
    feats = captioner.vision(pixels.to(captioner.device))  # (B, N, C): the tower runs once per image
    feats = feats.repeat_interleave(k, dim=0)  # (B*K, N, C)
    seeds = [caption_seed(config.seed, i, j) for i in image_indices for j in range(k)]
    sampler = SeededNucleusSampler(seeds, top_p=config.top_p, top_k=config.top_k, temperature=config.temperature)
    texts = generate(captioner, vision_features=feats, prompt=config.prompt, num_beams=1, do_sample=False,
                     max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens,
                     repetition_penalty=config.repetition_penalty, batch_size=len(seeds),
                     logits_processor=LogitsProcessorList([sampler]))
    return [texts[b * k:(b + 1) * k] for b in range(pixels.shape[0])]


# ---------------------------------------------------------------------------- filtering
@torch.no_grad()
def score_pairs(filter_model: Blip2Model, pixels: torch.Tensor, pair_image: torch.Tensor, texts: Sequence[str], *,
                batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(ITM match probability, ITC similarity), each (P,), of the pairs (image ``pair_image[p]``
    of ``pixels`` (B, 3, S, S), ``texts[p]``): each image goes through the tower and the
    query-only pass once; ITC is the cosine max over queries (as :func:`~qformer.inference.similarity`),
    ITM the softmax of the head (as :func:`~qformer.inference.itm`)."""
    if filter_model.config.stage1_heads is False or filter_model.tokenizer is None:
        raise ConfigError("the filter needs the ITC / ITM heads and the Q-Former tokenizer (a stage-1 model)")
    if len(texts) == 0:
        return torch.zeros(0), torch.zeros(0)
    dev = filter_model.device
    embeds = filter_model.embed_image(pixels.to(dev))  # (B, N, C)
    enc = filter_model.encode_image(embeds)
    image_feats = filter_model.image_features(enc.query_output)  # (B, Q, E)
    text_feats = text_features_of(filter_model, list(texts), batch_size=batch_size)  # (P, E)
    pair_image = pair_image.to(dev)
    itc = torch.einsum("pqe,pe->pq", image_feats[pair_image], text_feats).amax(dim=-1)  # (P,)
    itm = []
    for start in range(0, len(texts), batch_size):
        rows = pair_image[start:start + batch_size]
        ids, mask = tokenize(filter_model, list(texts[start:start + batch_size]))
        logits = filter_model.itm_logits(ids, mask, index_kv(enc.image_kv, rows))  # (b, 2)
        itm.append(logits.float().softmax(dim=-1)[:, 1])
    return torch.cat(itm).float().cpu(), itc.float().cpu()


def keep_mask(itm: torch.Tensor, itc: torch.Tensor, groups: torch.Tensor, config: CapFiltConfig) -> torch.Tensor:
    """Which pairs to keep (P,) bool: ITM probability >= threshold and/or among the ``itc_top_n``
    best of their image (``groups[p]``: the pair's image) by ITC, combined by ``config.rule``."""
    rules = []
    if config.itm_threshold is not None:
        rules.append(itm >= config.itm_threshold)
    if config.itc_top_n > 0:
        top = torch.zeros_like(itm, dtype=torch.bool)
        for g in torch.unique(groups).tolist():
            members = (groups == g).nonzero().flatten()
            best = itc[members].argsort(descending=True, stable=True)[:config.itc_top_n]
            top[members[best]] = True
        rules.append(top)
    out = rules[0]
    for r in rules[1:]:
        out = out & r if config.rule == "all" else out | r
    return out


# ---------------------------------------------------------------------------- data
@dataclass
class ImageGroup:
    """One image and the records (web captions) that name it; ``index`` numbers it in the data."""

    index: int
    records: list[CaptionRecord]


def iter_images(source) -> Iterator[ImageGroup | BadRecord]:
    """The images of a source in order of first appearance (see the module docstring), and the
    records that could not be parsed (belonging to no image)."""
    if source.is_map_style:
        groups: dict[Any, list[CaptionRecord]] = {}
        for record in source.iter_records():
            if isinstance(record, BadRecord):
                yield record
            else:
                groups.setdefault(record.image_id, []).append(record)
        for i, records in enumerate(groups.values()):
            yield ImageGroup(i, records)
        return
    current: list[CaptionRecord] = []
    n = 0
    for record in source.iter_records():
        if isinstance(record, BadRecord):
            yield record
            continue
        if current and record.image_id != current[0].image_id:
            yield ImageGroup(n, current)
            n, current = n + 1, []
        current.append(record)
    if current:
        yield ImageGroup(n, current)


def iter_shards(items, shard_size: int, bad: DataReport) -> Iterator[tuple[int, list[ImageGroup]]]:
    """(shard, its images), shard after shard, from :func:`iter_images`'s items; unparseable
    records are counted into ``bad``."""
    shard: list[ImageGroup] = []
    for item in items:
        if isinstance(item, BadRecord):
            bad.add(item.reason, item.where)
            continue
        shard.append(item)
        if len(shard) == shard_size:
            yield item.index // shard_size, shard
            shard = []
    if shard:
        yield shard[-1].index // shard_size, shard


@dataclass
class _Decoded:
    index: int
    image: str  # the path capfilt.jsonl names (relative to the output folder for in-memory images)
    image_id: Any
    web: list[tuple[str, str]]  # (raw caption, cleaned caption) of each usable web caption
    report: DataReport
    pixels: dict[str, torch.Tensor] | None = None  # preprocessed pixels per model name; None: unusable


class _ShardImages(Dataset):
    """A shard's images, read in DataLoader workers: validation as in training (the sample
    processor's checks), one preprocessing per model, in-memory images written to disk."""

    def __init__(self, groups: list[ImageGroup], processor: SampleProcessor, preprocessors: dict[str, Any],
                 output_dir: Path) -> None:
        self.groups, self.processor, self.preprocessors, self.output_dir = groups, processor, preprocessors, output_dir

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> _Decoded:
        group = self.groups[i]
        first = group.records[0]
        report = DataReport()
        web = []
        for record in group.records:
            try:
                raw = record.caption
                web.append((raw, self.processor.caption_of(record)))
            except SkipSample as skip:
                report.add(skip.reason, skip.where)
        item = _Decoded(group.index, "", first.image_id, web, report)
        try:
            img = self.processor.image_of(first)
            try:
                item.pixels = {name: pre.transform(img) for name, pre in self.preprocessors.items()}
            except (ImageLoadError, OSError, ValueError) as exc:
                raise SkipSample("unsupported_image", first.where, str(exc)) from exc
        except SkipSample as skip:  # every record of the image is skipped for it
            item.report = DataReport().add(skip.reason, skip.where, n=len(group.records))
            item.web = []
            return item
        item.report.add("samples", n=len(web))  # usable (image, web caption) records, as training counts them
        if img.mode != "RGB":
            item.report.merge(converted_report(img.mode))
        item.image = self._image_path(group.index, first, img)
        return item

    def _image_path(self, index: int, record: CaptionRecord, img: Image.Image) -> str:
        """A file's absolute path; an in-memory image (tar member, hub row) is written once to
        ``images/NNNNNNNN.EXT`` under the output folder (its original bytes when it has them)."""
        if isinstance(record.image, (str, os.PathLike)):
            return str(Path(record.image).resolve())
        if isinstance(record.image, (bytes, bytearray, memoryview)):
            data = bytes(record.image)
            ext = (Image.open(io.BytesIO(data)).format or "png").lower().replace("jpeg", "jpg")
        else:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            data, ext = buf.getvalue(), "png"
        rel = Path("images") / f"{index:08d}.{ext}"
        atomic_write_bytes(self.output_dir / rel, data)
        return rel.as_posix()


def _collate(batch: list[_Decoded]) -> list[_Decoded]:
    return batch


# ---------------------------------------------------------------------------- one shard
def process_shard(captioner: Blip2Model, filter_model: Blip2Model, shard: int, groups: list[ImageGroup],
                  output_dir: Path, config: CapFiltConfig, fingerprint: str, *, rank: int = 0,
                  progress=None) -> dict[str, Any]:
    """Caption, score and filter one shard's images; its file is written atomically and returned
    as a dict: ``pairs`` (every scored pair, ``kept`` or not), the ``data`` report, counts."""
    processor = SampleProcessor(transform=filter_model.vision.preprocessor, captions=CaptionCleaner(max_words=config.max_words),
                                min_image_size=config.min_image_size)
    preprocessors = {"filter": filter_model.vision.preprocessor}
    if config.num_captions:
        preprocessors["captioner"] = captioner.vision.preprocessor
    loader = DataLoader(_ShardImages(groups, processor, preprocessors, output_dir), batch_size=config.batch_size,
                        num_workers=config.num_workers, collate_fn=_collate)
    report, pairs, usable, duplicates = DataReport(), [], 0, 0
    cleaner = CaptionCleaner(max_words=config.max_words)
    for batch in loader:
        for item in batch:
            report.merge(item.report)
        good = [it for it in batch if it.pixels is not None]
        usable += len(good)
        if progress is not None:
            progress.update(len(batch))
        if not good:
            continue
        synthetic = sample_captions(captioner, torch.stack([it.pixels["captioner"] for it in good])
                                    if config.num_captions else torch.zeros(len(good), 0),
                                    [it.index for it in good], config)
        rows: list[dict[str, Any]] = []
        texts: list[str] = []
        owner: list[int] = []
        for b, (it, captions) in enumerate(zip(good, synthetic)):
            seen = set()
            candidates = [("web", raw, clean) for raw, clean in it.web]
            candidates += [("synthetic", c, cleaner.clean(c)) for c in captions]
            for source, raw, clean in candidates:
                if not clean:  # a synthetic caption of nothing but punctuation: nothing to train on
                    continue
                if source == "synthetic" and clean in seen:
                    duplicates += 1
                    continue
                seen.add(clean)
                rows.append({"image": it.image, "caption": raw, "source": source, "image_id": it.image_id,
                             "image_index": it.index})
                texts.append(clean)
                owner.append(b)
        groups_t = torch.tensor(owner, dtype=torch.long)
        itm, itc = score_pairs(filter_model, torch.stack([it.pixels["filter"] for it in good]), groups_t, texts,
                               batch_size=max(config.batch_size * max(config.num_captions, 1), 1))
        kept = keep_mask(itm, itc, groups_t, config)
        for row, p, s, k in zip(rows, itm.tolist(), itc.tolist(), kept.tolist()):
            pairs.append({**row, "itm": round(p, 6), "itc": round(s, 6), "kept": bool(k)})
    out = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "shard": shard, "rank": rank,
           "images": len(groups), "usable_images": usable, "duplicates": duplicates,
           "data": {"counts": report.counts, "examples": report.examples}, "pairs": pairs}
    atomic_write_text(shard_path(output_dir, shard), json.dumps(out, default=str) + "\n")
    return out


def shard_path(output_dir: Path, shard: int) -> Path:
    return Path(output_dir) / "shards" / f"shard-{shard:05d}.json"


def load_shard(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """A finished shard's contents, or None when there is none; a shard of another run is an error."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("fingerprint") != fingerprint:
        raise ConfigError(f"{path} was written by a CapFilt run with other settings, models or data; use another "
                          "--output-dir (or delete its shards/ folder) to start again")
    return data


# ---------------------------------------------------------------------------- the run
@dataclass
class CapFiltResult:
    shards: int = 0  # shards in the data
    processed: list[int] = field(default_factory=list)  # shards this rank captioned and filtered in this call
    reused: list[int] = field(default_factory=list)  # this rank's shards already finished by an earlier run
    finished: bool = False  # every shard is done and rank 0 wrote capfilt.jsonl and the report
    report: dict[str, Any] | None = None  # capfilt_report.json (rank 0, when finished)
    seconds: float = 0.0


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def run_capfilt(captioner: Blip2Model, filter_model: Blip2Model, spec: Any, output_dir: str | os.PathLike,
                config: CapFiltConfig | None = None, *, identity: Any = None, rank: int | None = None,
                world_size: int | None = None, stop_after: int | None = None, progress: bool = False,
                **source_options: Any) -> CapFiltResult:
    """CapFilt over ``spec`` (anything :func:`~qformer.data.open_caption_source` opens) into
    ``output_dir``: see the module docstring. Every rank calls it. ``identity`` (e.g. the model
    paths) goes into the fingerprint that decides whether finished shards may be reused;
    ``stop_after``: this rank stops after that many new shards (concatenated only when that was the last)."""
    from tqdm.auto import tqdm

    config = config or CapFiltConfig()
    config.check()
    if config.num_captions and captioner.config.llm is None:
        raise ConfigError("the captioner has no LLM: it must be a stage-2 model (or set num_captions=0)")
    rank, world_size = resolve_dist(rank, world_size)
    output_dir = Path(output_dir)
    fingerprint = config.fingerprint({"identity": identity, "data": str(spec), "options": source_options})
    source = open_caption_source(spec, **source_options)
    started = time.perf_counter()
    result = CapFiltResult()
    bad = DataReport()
    items: Any = iter_images(source)
    total = None
    if source.is_map_style:  # grouped in memory anyway: the bar can show the total
        items = list(items)
        total = sum(isinstance(it, ImageGroup) for it in items)
    bar = tqdm(desc="capfilt", unit="img", disable=not progress, total=total)
    was = (captioner.training, filter_model.training)
    captioner.eval(), filter_model.eval()
    try:
        for shard, groups in iter_shards(items, config.shard_size, bad):
            result.shards = shard + 1
            if shard % world_size != rank:
                continue
            if load_shard(shard_path(output_dir, shard), fingerprint) is not None:
                result.reused.append(shard)
                bar.update(len(groups))
                continue
            if stop_after is not None and len(result.processed) >= stop_after:
                continue
            process_shard(captioner, filter_model, shard, groups, output_dir, config, fingerprint, rank=rank,
                          progress=bar)
            result.processed.append(shard)
    finally:
        bar.close()
        captioner.train(was[0]), filter_model.train(was[1])
    result.seconds = time.perf_counter() - started
    _barrier(world_size)
    complete = stop_after is None or all(shard_path(output_dir, s).is_file() for s in range(result.shards))
    if rank == 0 and complete:
        result.report = finish(output_dir, result.shards, fingerprint, config, bad, seconds=result.seconds,
                               world_size=world_size, extra={"data_spec": str(spec), "identity": identity})
        result.finished = True
    _barrier(world_size)
    return result


def finish(output_dir: Path, shards: int, fingerprint: str, config: CapFiltConfig, bad: DataReport, *,
           seconds: float, world_size: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Rank 0, after every shard is written: ``capfilt.jsonl`` (the kept pairs, shard after
    shard), ``capfilt_report.json`` and ``capfilt_report.png``."""
    data = DataReport(dataset=str(extra.get("data_spec", ""))).merge(bad)
    parts = []
    for s in range(shards):
        part = load_shard(shard_path(output_dir, s), fingerprint)
        if part is None:
            raise DataError(f"{shard_path(output_dir, s)} is missing: a rank stopped early; run CapFilt again to finish")
        parts.append(part)
        data.merge({"counts": part["data"]["counts"], "examples": part["data"]["examples"]})
    lines, pairs = [], []
    for part in parts:
        for p in part["pairs"]:
            pairs.append(p)
            if p["kept"]:
                row = {k: p[k] for k in ("image", "caption", "source", "itm", "itc", "image_id")}
                lines.append(json.dumps(row, default=str) + "\n")
    atomic_write_text(output_dir / "capfilt.jsonl", "".join(lines))
    for stale in (output_dir / "shards").glob(".shard-*.tmp"):  # left by a run killed mid-write
        stale.unlink(missing_ok=True)
    report = build_report(pairs, parts, data, config, seconds=seconds, world_size=world_size, extra=extra)
    atomic_write_json(output_dir / "capfilt_report.json", report)
    report_figure(pairs, config, output_dir / "capfilt_report.png")
    return report


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "min": None, "max": None}
    t = torch.tensor(values)
    return {"mean": round(float(t.mean()), 4), "median": round(float(t.median()), 4), "min": round(float(t.min()), 4),
            "max": round(float(t.max()), 4)}


def build_report(pairs: list[dict[str, Any]], parts: list[dict[str, Any]], data: DataReport, config: CapFiltConfig, *,
                 seconds: float, world_size: int, extra: dict[str, Any]) -> dict[str, Any]:
    """The counts per source (scored / kept / dropped), score summaries, images, the data's
    skips (training's reasons) and a sample of dropped pairs."""
    images = sum(p["images"] for p in parts)
    usable = sum(p["usable_images"] for p in parts)
    per_source = {}
    for source in SOURCES:
        mine = [p for p in pairs if p["source"] == source]
        kept = [p for p in mine if p["kept"]]
        per_source[source] = {
            "scored": len(mine), "kept": len(kept), "dropped": len(mine) - len(kept),
            "itm": _stats([p["itm"] for p in mine]), "itc": _stats([p["itc"] for p in mine]),
            "itm_kept": _stats([p["itm"] for p in kept]), "itc_kept": _stats([p["itc"] for p in kept]),
        }
    dropped = [p for p in pairs if not p["kept"]]
    step = max(1, len(dropped) // max(config.dropped_examples, 1))
    with_kept = len({p["image_index"] for p in pairs if p["kept"]})
    return {
        **extra,
        "config": dataclasses.asdict(config),
        "images": {"total": images, "usable": usable, "skipped": images - usable, "with_a_kept_pair": with_kept},
        "pairs": {"scored": len(pairs), "kept": sum(p["kept"] for p in pairs),
                  "duplicate_synthetic_dropped": sum(p["duplicates"] for p in parts), **per_source},
        "data": data.to_dict(),
        "dropped_sample": [{k: p[k] for k in ("image", "caption", "source", "itm", "itc")}
                           for p in dropped[::step][:config.dropped_examples]],
        "shards": len(parts),
        "world_size": world_size,
        "seconds_last_call": round(seconds, 2),
    }


def report_figure(pairs: list[dict[str, Any]], config: CapFiltConfig, path: Path) -> Path:
    """Kept / dropped pairs per source, and the ITM and ITC histograms per source with the rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    colours = {"web": "tab:blue", "synthetic": "tab:orange"}
    kept = [sum(p["kept"] for p in pairs if p["source"] == s) for s in SOURCES]
    dropped = [sum(not p["kept"] for p in pairs if p["source"] == s) for s in SOURCES]
    axes[0].bar(SOURCES, kept, label="kept", color="tab:green")
    axes[0].bar(SOURCES, dropped, bottom=kept, label="dropped", color="tab:red")
    axes[0].set_title("pairs per source")
    axes[0].legend()
    for ax, key, bins in ((axes[1], "itm", [i / 20 for i in range(21)]), (axes[2], "itc", 20)):
        for s in SOURCES:
            vals = [p[key] for p in pairs if p["source"] == s]
            if vals:
                ax.hist(vals, bins=bins, alpha=0.6, label=s, color=colours[s])
        ax.set_title(f"{key.upper()} {'match probability' if key == 'itm' else 'similarity'}")
        ax.legend()
    if config.itm_threshold is not None:
        axes[1].axvline(config.itm_threshold, color="k", linestyle="--")
    fig.suptitle(f"CapFilt: {sum(kept)} of {len(pairs)} pairs kept")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


__all__ = ["CapFiltConfig", "CapFiltResult", "ImageGroup", "SeededNucleusSampler", "caption_seed", "finish",
           "iter_images", "iter_shards", "keep_mask", "process_shard", "run_capfilt", "sample_captions",
           "score_pairs"]
