"""webdataset tar shards as a (streaming) caption source."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .base import AnyRecord, BadRecord, CaptionRecord, CaptionSource, DatasetSpecError, caption_list

__all__ = ["WebDatasetCaptionSource", "expand_shards"]


def expand_shards(urls: str | os.PathLike | Sequence[str]) -> list[str]:
    """Brace-expand ``shards-{000..099}.tar`` (and ``::``-joined lists) with webdataset's rules."""
    from webdataset.shardlists import expand_urls

    if isinstance(urls, (str, os.PathLike)):
        return expand_urls(str(urls))
    return [u for url in urls for u in expand_urls(str(url))]


def _is_local(url: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url) or url.startswith("file:")


class WebDatasetCaptionSource(CaptionSource):
    """webdataset tar shards (streaming only), read with the ``webdataset`` library.

    A sample's image is its first member among ``image_keys`` (jpg, jpeg, png, webp); its caption
    is ``txt``, else the ``caption`` / ``text`` field of ``json`` (a list there expands).
    ``image_id`` is the sample's ``__key__``. Consumers split whole shards when there are at least
    as many shards as consumers, else every consumer reads all shards and keeps every n-th sample.
    A shard that cannot be read is counted as ``unreadable_shard`` and the stream goes on.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        name: str | None = None,
        image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
        caption_keys: Sequence[str] = ("txt", "json"),
        json_caption_fields: Sequence[str] = ("caption", "text"),
    ) -> None:
        self.urls = urls
        self.shards = expand_shards(urls)
        self.name = name or f"webdataset:{urls if isinstance(urls, str) else ','.join(map(str, urls))}"
        if not self.shards:
            raise DatasetSpecError(f"{self.name}: the pattern expands to no shard")
        local = [s for s in self.shards if _is_local(s)]
        if local and len(local) == len(self.shards) and not any(Path(s.removeprefix("file:")).is_file() for s in local):
            raise FileNotFoundError(2, f"none of the {len(local)} tar shard(s) exists", str(urls))
        self.image_keys = tuple(k.lower() for k in image_keys)
        self.caption_keys = tuple(k.lower() for k in caption_keys)
        self.json_caption_fields = tuple(json_caption_fields)

    def iter_records(self, *, shard: int = 0, num_shards: int = 1) -> Iterator[AnyRecord]:
        import webdataset as wds

        by_shard = len(self.shards) >= num_shards
        mine = self.shards[shard::num_shards] if by_shard else list(self.shards)
        report_errors = by_shard or shard == 0  # else every consumer would count the same error
        errors: list[Exception] = []

        def handler(exc: Exception) -> bool:
            errors.append(exc)
            return True  # go on with the next member / shard

        pipeline = wds.WebDataset(
            mine, handler=handler, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
        )
        for n, sample in enumerate(pipeline):
            yield from self._flush(errors, report_errors)
            if not by_shard and n % num_shards != shard:
                continue
            yield from self._records(sample)
        yield from self._flush(errors, report_errors)

    def _flush(self, errors: list[Exception], report: bool) -> Iterator[AnyRecord]:
        while errors:
            exc = errors.pop(0)
            if report:
                # webdataset appends the url to the exception's args; OSErrors name the file.
                names = [getattr(exc, "filename", None), *reversed(exc.args)]
                where = next((a for a in names if isinstance(a, str) and a in self.shards), None)
                where = where or next((a for a in names if isinstance(a, str) and ".tar" in a), self.name)
                yield BadRecord(reason="unreadable_shard", where=where, source=self.name, key=f"error:{where}", detail=str(exc))

    def _captions(self, sample: dict[str, Any]) -> list[Any]:
        """The sample's captions ([None] when it has none); raises on undecodable text / JSON."""
        for ck in self.caption_keys:
            if ck not in sample:
                continue
            raw = sample[ck]
            text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
            if ck != "json":
                return [text]
            obj = json.loads(text) if isinstance(text, str) else text
            field = next((f for f in self.json_caption_fields if isinstance(obj, dict) and f in obj), None)
            if field is not None:
                return caption_list(obj[field])
        return [None]

    def _records(self, sample: dict[str, Any]) -> Iterator[AnyRecord]:
        key = str(sample.get("__key__"))
        url = str(sample.get("__url__", ""))
        skey = f"{os.path.basename(url)}/{key}"
        image = next((sample[k] for k in self.image_keys if k in sample), None)
        try:
            captions = self._captions(sample)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            yield BadRecord(reason="bad_record", where=f"{url}#{key}", source=self.name, key=skey, detail=str(exc))
            return
        for sub, caption in enumerate(captions):
            k = skey if len(captions) == 1 else f"{skey}.{sub}"
            yield CaptionRecord(
                image=bytes(image) if image is not None else None, caption=caption, image_id=key, source=self.name, key=k
            )

    def __repr__(self) -> str:
        return f"WebDatasetCaptionSource({self.name}, {len(self.shards)} shard(s))"
