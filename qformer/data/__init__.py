"""Image-caption data for the training recipes: sources, BLIP-2 transforms, bad-data accounting,
tokenising collators and a frozen-ViT feature cache.

    from qformer.data import open_caption_dataset, Stage1Collator, CaptionLoader

    ds = open_caption_dataset("data/coco_train.jsonl", vision=cfg.vision, train=True)
    loader = CaptionLoader(ds, Stage1Collator(tokenizer), batch_size=100, num_workers=8)
    for batch in loader:                      # clean dicts: pixel_values, input_ids, attention_mask, image_ids
        objective(**batch)
    loader.write_report(output_dir)           # data_report.json: unique records + per-epoch events, all ranks

Pipeline: a *source* (:mod:`.sources`) yields undecoded records; a *processor* (:mod:`.samples`)
validates one record when it is loaded and returns a sample or a ``Skipped`` sentinel; a
*dataset* (:mod:`.dataset`) is map-style or streaming; a *collator* (:mod:`.collate`) drops the
sentinels, stacks, tokenises and attaches the batch's counts; the *loader* (:mod:`.loader`)
merges those counts (:mod:`.report`: once per record, and per epoch), skips empty batches and
keeps ranks in step. :mod:`.reading` turns a record's image into pixels or bytes (decoding is
:mod:`qformer.images`), naming every failure as a skip reason. :mod:`.cache` stores the frozen
tower's features for runs without augmentation. :mod:`.prepare` (not imported here) turns the
standard COCO / Visual Genome downloads and image folders into files the sources read.
"""

from .cache import (
    FeatureCache,
    FeatureCacheWriter,
    FeatureTower,
    fill_feature_cache,
    tower_fingerprint,
    weights_fingerprint,
)
from .collate import CollatedSamples, Stage1Collator, Stage2Collator, collate_samples, is_empty_batch, stable_image_id
from .dataset import CaptionDataset, IterableCaptionDataset, open_caption_dataset, open_instruction_dataset, open_instruction_mixture
from .loader import CaptionLoader, ResumableSampler
from .reading import SkipSample, image_content_key, read_image
from .report import (
    CONVERTED,
    DATA_STATS_KEY,
    SKIP_REASONS,
    USABLE,
    DataReport,
    LoaderReport,
    NoUsableDataError,
    RecordStatus,
    merge_reports,
)
from .samples import Sample, SampleProcessor, Skipped, record_status
from .sources import (
    BadRecord,
    CaptionRecord,
    CaptionSource,
    DatasetSpecError,
    ConcatCaptionSource,
    FileCaptionSource,
    HFCaptionSource,
    WebDatasetCaptionSource,
    detect_spec_kind,
    open_caption_source,
)
from .transforms import (
    CaptionCleaner,
    EvalTransform,
    ImageTransform,
    TrainTransform,
    build_image_transform,
    pre_caption,
    sample_generator,
    sample_seed,
)

__all__ = [
    "CONVERTED",
    "DATA_STATS_KEY",
    "SKIP_REASONS",
    "USABLE",
    "BadRecord",
    "CaptionCleaner",
    "CaptionDataset",
    "CaptionLoader",
    "CaptionRecord",
    "CaptionSource",
    "CollatedSamples",
    "ConcatCaptionSource",
    "DataReport",
    "DatasetSpecError",
    "EvalTransform",
    "FeatureCache",
    "FeatureCacheWriter",
    "FeatureTower",
    "FileCaptionSource",
    "HFCaptionSource",
    "ImageTransform",
    "IterableCaptionDataset",
    "LoaderReport",
    "NoUsableDataError",
    "RecordStatus",
    "ResumableSampler",
    "Sample",
    "SampleProcessor",
    "SkipSample",
    "Skipped",
    "Stage1Collator",
    "Stage2Collator",
    "TrainTransform",
    "WebDatasetCaptionSource",
    "build_image_transform",
    "collate_samples",
    "detect_spec_kind",
    "fill_feature_cache",
    "image_content_key",
    "is_empty_batch",
    "merge_reports",
    "open_caption_dataset",
    "open_instruction_dataset",
    "open_instruction_mixture",
    "open_caption_source",
    "pre_caption",
    "read_image",
    "record_status",
    "sample_generator",
    "sample_seed",
    "stable_image_id",
    "tower_fingerprint",
    "weights_fingerprint",
]
