"""Where image-caption records come from: HF datasets, imagefolder, JSONL/CSV, webdataset tars.

Every source yields :class:`CaptionRecord` ``{image, caption, image_id, source, key}`` with the
image still undecoded (a path, encoded bytes, or a PIL image someone already holds). Decoding and
validation happen later, per sample (:mod:`qformer.data.samples`), so that opening a source never
reads a million images, and a bad one costs one skipped sample instead of a crash. A record the
source itself cannot parse (a malformed JSON line, an unreadable tar member) is a
:class:`BadRecord` that flows down the same path and is counted.

Sources that can index their records (in-memory lists, arrow tables) are *map-style*: ``len`` and
``record(i)``, for exact resume and global shuffling. All sources are iterable with
``iter_records(shard=k, num_shards=n)``, which gives consumer ``k`` of ``n`` (rank x worker) a
disjoint part of the data: tar shards / HF shards when there are enough, else every n-th record.

Modules: :mod:`.base` (records, the source interface, concatenation, column errors),
:mod:`.hf` (Hugging Face datasets), :mod:`.files` (JSONL/JSON/CSV/TSV), :mod:`.tars`
(webdataset shards), :mod:`.spec` (:func:`open_caption_source` picks the source from a spec
string or dict).
"""

from .base import (
    CAPTION_COLUMNS,
    FILE_IMAGE_COLUMNS,
    ID_COLUMNS,
    AnyRecord,
    BadRecord,
    CaptionRecord,
    CaptionSource,
    ConcatCaptionSource,
    DatasetSpecError,
    ImageRef,
    caption_list,
    json_rows,
    missing_column_error,
)
from .files import FileCaptionSource
from .hf import HFCaptionSource
from .spec import detect_spec_kind, open_caption_source
from .tars import WebDatasetCaptionSource, expand_shards

__all__ = [
    "CAPTION_COLUMNS",
    "FILE_IMAGE_COLUMNS",
    "ID_COLUMNS",
    "AnyRecord",
    "BadRecord",
    "CaptionRecord",
    "CaptionSource",
    "ConcatCaptionSource",
    "DatasetSpecError",
    "FileCaptionSource",
    "HFCaptionSource",
    "ImageRef",
    "WebDatasetCaptionSource",
    "caption_list",
    "detect_spec_kind",
    "expand_shards",
    "json_rows",
    "missing_column_error",
    "open_caption_source",
]
