"""qformer.data: sources, BLIP-2 transforms, bad-data accounting, collators, feature cache.

Everything is built in tmp_path (tiny images, JSONL/CSV files, imagefolder, tar shards, an
in-memory datasets.Dataset standing in for a hub dataset); nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qformer.config import VisionConfig
from qformer.data import (
    DATA_STATS_KEY,
    CaptionCleaner,
    CaptionDataset,
    CaptionLoader,
    DataReport,
    DatasetSpecError,
    EvalTransform,
    FeatureCache,
    IterableCaptionDataset,
    NoUsableDataError,
    Sample,
    Skipped,
    Stage1Collator,
    TrainTransform,
    collate_samples,
    detect_spec_kind,
    fill_feature_cache,
    open_caption_dataset,
    open_caption_source,
    pre_caption,
    sample_generator,
    sample_seed,
    stable_image_id,
    tower_fingerprint,
)
from qformer.images import ImagePreprocessor
from qformer.vision import VisionTower, build_vision_tower

S = 32
VISION = VisionConfig(image_size=S)
MEAN = torch.tensor(VISION.mean).view(3, 1, 1)
STD = torch.tensor(VISION.std).view(3, 1, 1)
TINY_VIT = dict(embed_dim=32, depth=3, num_heads=2, patch_size=8)


def normalized(rgb255) -> torch.Tensor:
    """A solid (3, S, S) image of colour ``rgb255``, normalized."""
    return ((torch.tensor(rgb255, dtype=torch.float32).view(3, 1, 1) / 255 - MEAN) / STD).expand(3, S, S)


def rand_rgb(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from conftest import write_bert_tokenizer

    return write_bert_tokenizer(tmp_path_factory.mktemp("tok"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def epoch_of(loader: CaptionLoader) -> list[dict]:
    return list(loader)


# ----------------------------------------------------------------------------------------------
# Caption cleaning
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ('A man, riding a "Red" bus!!  (downtown)...', "a man, riding a red bus downtown"),
        ("Two dogs;\tplaying\n\nin the SNOW~", "two dogs playing in the snow"),
        ("It's a dog-house #1: *great*", "it's a dog-house 1 great"),
        ("   ...!!!   ", ""),
        ("", ""),
    ],
)
def test_pre_caption(raw, expected):
    assert pre_caption(raw) == expected


def test_pre_caption_max_words_and_prompt():
    words = [f"w{i}" for i in range(60)]
    assert pre_caption(" ".join(words)) == " ".join(words[:50])
    assert pre_caption("One. Two. Three. Four.", max_words=2) == "one two"
    stage2 = CaptionCleaner(prompt="a photo of ")
    assert stage2("A Cat, sitting.") == "a photo of a cat, sitting"
    assert stage2(" ... ") == ""  # nothing left: empty whatever the prompt
    assert CaptionCleaner(max_words=3)("a b c d e") == "a b c"


# ----------------------------------------------------------------------------------------------
# Image transforms
# ----------------------------------------------------------------------------------------------


def test_train_transform_deterministic_shapes_and_normalisation():
    tf = TrainTransform.from_config(VISION)
    assert tf.image_size == S and tf.scale == (0.5, 1.0) and tf.is_random
    img = rand_rgb(0, (50, 40))
    a = tf(img, generator=sample_generator(0, 0, "k"))
    b = tf(img, generator=sample_generator(0, 0, "k"))
    assert a.shape == (3, S, S) and a.dtype == torch.float32
    assert torch.equal(a, b)
    others = [tf(img, generator=sample_generator(0, e, "k")) for e in range(1, 4)]
    assert any(not torch.equal(a, o) for o in others)
    # Seeds: a pure function of (seed, epoch, key).
    assert sample_seed(0, 0, "k") == sample_seed(0, 0, "k") != sample_seed(0, 1, "k") != sample_seed(1, 0, "k")
    assert sample_seed(3, 2, "x") == int.from_bytes(hashlib.blake2b(b"3/2/x", digest_size=8).digest(), "little") & (2**63 - 1)
    # Normalisation: any crop/flip of a solid image is solid.
    solid = Image.new("RGB", (45, 37), (200, 100, 50))
    assert torch.allclose(tf(solid, generator=sample_generator(0, 0, 1)), normalized((200, 100, 50)), atol=1e-5)
    # Odd modes go through qformer.images' conversion: transparent -> white, CMYK -> RGB.
    assert torch.allclose(tf(Image.new("RGBA", (20, 20), (255, 0, 0, 0)), generator=None), normalized((255, 255, 255)), atol=1e-5)
    assert torch.allclose(tf(Image.new("CMYK", (20, 20), (0, 255, 0, 0)), generator=None), normalized((255, 0, 255)), atol=1e-5)


def test_train_transform_matches_torchvision_crop_params():
    """Same draws as torchvision's RandomResizedCrop.get_params from the global RNG with that seed."""
    from torchvision import transforms as T

    tf = TrainTransform.from_config(VISION)
    img = rand_rgb(1, (64, 48))
    for seed in range(5):
        torch.manual_seed(seed)
        ref = T.RandomResizedCrop.get_params(img, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3))
        assert tf.crop_params(64, 48, torch.Generator().manual_seed(seed)) == tuple(ref)


def test_train_transform_full_crop_equals_eval_or_its_flip():
    tf = TrainTransform.from_config(VISION, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    ev = EvalTransform.from_config(VISION)
    img = rand_rgb(2, (40, 40))
    want = ImagePreprocessor.from_config(VISION).transform(img)
    assert torch.equal(ev(img), want) and not ev.is_random
    seen = set()
    for k in range(8):
        out = tf(img, generator=sample_generator(0, 0, k))
        if torch.equal(out, want):
            seen.add("plain")
        elif torch.equal(out, want.flip(-1)):
            seen.add("flipped")
        else:  # pragma: no cover - a failure message
            raise AssertionError("a full-image crop must equal the eval transform or its mirror")
    assert seen == {"plain", "flipped"}


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


def test_jsonl_source_relative_paths_list_captions_and_map_vs_streaming(tmp_path):
    (tmp_path / "imgs").mkdir()
    rand_rgb(0).save(tmp_path / "imgs" / "a.png")
    rand_rgb(1).save(tmp_path / "imgs" / "b.png")
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"image": "imgs/a.png", "caption": ["A dog.", "The DOG!"]},
        {"image": str(tmp_path / "imgs" / "b.png"), "caption": "A cat"},
    ])
    ds = open_caption_dataset(str(path), vision=VISION, train=False)
    assert isinstance(ds, CaptionDataset) and len(ds) == 3
    samples = [ds[i] for i in range(3)]
    assert [s.caption for s in samples] == ["a dog", "the dog", "a cat"]
    assert samples[0].image_id == samples[1].image_id == "imgs/a.png" != samples[2].image_id
    pre = ImagePreprocessor.from_config(VISION)
    assert torch.equal(samples[0].pixel_values, pre.transform(tmp_path / "imgs" / "a.png"))
    assert torch.equal(samples[2].pixel_values, pre.transform(tmp_path / "imgs" / "b.png"))
    # Streaming reads the file lazily and gives the same samples.
    stream = open_caption_dataset(str(path), vision=VISION, train=False, streaming=True)
    assert isinstance(stream, IterableCaptionDataset)
    got = list(stream)
    assert [s.caption for s in got] == ["a dog", "the dog", "a cat"]
    assert all(torch.equal(g.pixel_values, s.pixel_values) for g, s in zip(got, samples))
    # Consumers split the records disjointly.
    src = open_caption_source(str(path), streaming=True)
    parts = [[r.caption for r in src.iter_records(shard=k, num_shards=2)] for k in range(2)]
    assert parts == [["A dog.", "The DOG!"], ["A cat"]]


def test_csv_and_tsv_sources_with_configurable_columns(tmp_path):
    rand_rgb(0).save(tmp_path / "x.jpg")
    rand_rgb(1).save(tmp_path / "y.jpg")
    (tmp_path / "data.csv").write_text('filepath,title,cocoid\nx.jpg,"A red bus.",7\ny.jpg,Two cats,8\nx.jpg,a BUS,7\n')
    ds = open_caption_dataset(str(tmp_path / "data.csv"), vision=VISION, train=False, image_column="filepath",
                              caption_column="title", id_column="cocoid")
    assert len(ds) == 3
    assert [(ds[i].caption, ds[i].image_id) for i in range(3)] == [("a red bus", 7), ("two cats", 8), ("a bus", 7)]
    (tmp_path / "data.tsv").write_text("image\ttext\nx.jpg\tA dog\n")
    tsv = open_caption_dataset(str(tmp_path / "data.tsv"), vision=VISION, train=False)
    assert tsv[0].caption == "a dog" and tsv[0].image_id == "x.jpg"
    with pytest.raises(DatasetSpecError, match="no caption column") as err:
        open_caption_source(str(tmp_path / "data.csv"))
    check_column_error(str(err.value), "caption", ["filepath", "title", "cocoid"])
    with pytest.raises(DatasetSpecError, match="no image column 'photo'") as err:
        open_caption_source(str(tmp_path / "data.csv"), image_column="photo", caption_column="title")
    check_column_error(str(err.value), "image", ["filepath", "title", "cocoid"])
    # Streaming finds a wrong column when the source is opened, not mid-epoch in a worker.
    with pytest.raises(DatasetSpecError, match="no caption column 'caption'"):
        open_caption_source(str(tmp_path / "data.tsv"), streaming=True, caption_column="caption")


def check_column_error(message: str, role: str, columns: list[str]) -> None:
    """One line that names the columns found and every way to choose one."""
    assert "\n" not in message and str(columns) in message
    assert f"--{role}-column NAME" in message and f"{role}_column=" in message and f"data.{role}_column" in message


def test_imagefolder_source_via_datasets(tmp_path):
    d = tmp_path / "folder"
    d.mkdir()
    for i in range(3):
        rand_rgb(i).save(d / f"im{i}.png")
    write_jsonl(d / "metadata.jsonl", [{"file_name": f"im{i}.png", "text": f"Image number {i}."} for i in range(3)])
    ds = open_caption_dataset(str(d), vision=VISION, train=False, cache_dir=str(tmp_path / "hf"))
    assert ds.name == f"imagefolder:{d}" and len(ds) == 3
    by_id = {ds[i].image_id: ds[i] for i in range(3)}
    assert sorted(by_id) == ["im0.png", "im1.png", "im2.png"]
    assert by_id["im1.png"].caption == "image number 1"
    assert torch.equal(by_id["im2.png"].pixel_values, ImagePreprocessor.from_config(VISION).transform(d / "im2.png"))
    stream = open_caption_dataset(str(d), vision=VISION, train=False, streaming=True, cache_dir=str(tmp_path / "hf"))
    assert isinstance(stream, IterableCaptionDataset)
    assert sorted(s.caption for s in stream) == ["image number 0", "image number 1", "image number 2"]


def test_in_memory_hub_dataset_list_captions_expand(tmp_path):
    import datasets

    hub = datasets.Dataset.from_dict({
        "image": [rand_rgb(0), rand_rgb(1)],
        "sentences": [[{"raw": "A dog."}, {"raw": "A brown dog"}], [{"raw": "A cat!"}]],  # Flickr30k-style
        "cocoid": [11, 12],
    })
    ds = open_caption_dataset(hub, vision=VISION, train=False, name="hf:toy")
    assert len(ds) == 3
    samples = [ds[i] for i in range(3)]
    assert [(s.caption, s.image_id) for s in samples] == [("a dog", 11), ("a brown dog", 11), ("a cat", 12)]
    assert torch.equal(samples[2].pixel_values, ImagePreprocessor.from_config(VISION).transform(rand_rgb(1)))
    # Columns are configurable; the streaming form of the same data expands the same way.
    renamed = hub.rename_columns({"image": "img", "sentences": "caps"})
    ds2 = open_caption_dataset(renamed, vision=VISION, train=False, image_column="img", caption_column="caps")
    assert [ds2[i].caption for i in range(3)] == ["a dog", "a brown dog", "a cat"]
    stream = open_caption_dataset(hub.to_iterable_dataset(num_shards=2), vision=VISION, train=False)
    assert isinstance(stream, IterableCaptionDataset)
    assert sorted((s.caption, s.image_id) for s in stream) == [("a brown dog", 11), ("a cat", 12), ("a dog", 11)]
    with pytest.raises(DatasetSpecError, match="no image column 'picture'") as err:
        open_caption_source(hub, image_column="picture")
    check_column_error(str(err.value), "image", ["image", "sentences", "cocoid"])
    with pytest.raises(DatasetSpecError, match="no caption column text / caption / captions / sentences") as err:
        open_caption_source(hub.remove_columns("sentences"))
    check_column_error(str(err.value), "caption", ["image", "cocoid"])


def write_shards(tmp_path: Path) -> str:
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "shard-000.tar")) as w:
        w.write({"__key__": "s0", "jpg": encoded(rand_rgb(0), "JPEG"), "txt": "A JPEG dog."})
        w.write({"__key__": "s1", "png": encoded(rand_rgb(1)), "json": {"caption": "A PNG cat"}})
        w.write({"__key__": "s2", "jpg": b"not an image at all", "txt": "corrupt"})
    with wds.TarWriter(str(tmp_path / "shard-001.tar")) as w:
        w.write({"__key__": "s3", "webp": encoded(rand_rgb(3), "WEBP"), "json": {"text": ["Web one", "Web two"]}})
        w.write({"__key__": "s4", "txt": "no image here"})
        w.write({"__key__": "s5", "png": encoded(rand_rgb(5))})
    return str(tmp_path / "shard-{000..001}.tar")


def test_webdataset_source_and_bad_members(tmp_path):
    pattern = write_shards(tmp_path)
    assert detect_spec_kind(pattern) == ("webdataset", pattern)
    ds = open_caption_dataset(pattern, vision=VISION, train=False)
    assert isinstance(ds, IterableCaptionDataset)
    items = list(ds)
    good = [i for i in items if isinstance(i, Sample)]
    assert [(s.caption, s.image_id) for s in good] == [
        ("a jpeg dog", "s0"), ("a png cat", "s1"), ("web one", "s3"), ("web two", "s3")]
    pre = ImagePreprocessor.from_config(VISION)
    assert torch.equal(good[1].pixel_values, pre.transform(rand_rgb(1)))
    report = DataReport()
    for i in items:
        report.merge(i.report)
    assert report.skipped_by_reason() == {"corrupt_image": 1, "missing_image": 1, "missing_caption": 1}
    # Two consumers: one shard each.
    src = open_caption_source(pattern)
    keys = [[r.image_id for r in src.iter_records(shard=k, num_shards=2)] for k in range(2)]
    assert keys == [["s0", "s1", "s2"], ["s3", "s3", "s4", "s5"]]


def test_spec_detection_and_errors(tmp_path):
    (tmp_path / "d").mkdir()
    assert detect_spec_kind("org/my-dataset") == ("hf", "org/my-dataset")
    assert detect_spec_kind("coco") == ("hf", "coco")
    assert detect_spec_kind(str(tmp_path / "a.jsonl")) == ("jsonl", str(tmp_path / "a.jsonl"))
    assert detect_spec_kind("x/train.csv") == ("csv", "x/train.csv")
    assert detect_spec_kind(str(tmp_path / "d")) == ("imagefolder", str(tmp_path / "d"))
    assert detect_spec_kind("wds:/data/x-{0..3}") == ("webdataset", "/data/x-{0..3}")
    assert detect_spec_kind("imagefolder:rel/dir") == ("imagefolder", "rel/dir")
    with pytest.raises(DatasetSpecError, match=r"cannot tell what kind of dataset 'what is this\?'"):
        detect_spec_kind("what is this?")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetSpecError, match="notes.txt"):
        detect_spec_kind(str(tmp_path / "notes.txt"))
    with pytest.raises(FileNotFoundError, match="nope"):
        open_caption_source(str(tmp_path / "nope" / "x"))
    with pytest.raises(DatasetSpecError, match="no metadata.jsonl"):
        open_caption_source(str(tmp_path / "d"))
    with pytest.raises(ValueError, match="vision="):
        open_caption_dataset({"type": "jsonl", "path": str(write_jsonl(tmp_path / "e.jsonl", [{"image": "a", "text": "b"}]))})


# ----------------------------------------------------------------------------------------------
# Bad data: skipped and counted, odd modes converted and counted
# ----------------------------------------------------------------------------------------------


def build_messy(tmp_path: Path) -> tuple[Path, dict]:
    """A JSONL of every kind of bad and odd record. The first 4 are bad (so batch 0 of size 4 is empty)."""
    d = tmp_path / "messy"
    d.mkdir()
    good_png = encoded(rand_rgb(7, (40, 40)))
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (d / "trunc.png").write_bytes(good_png[: len(good_png) // 2])
    jpg = encoded(rand_rgb(8, (40, 40)), "JPEG")
    (d / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    rand_rgb(9, (5, 20)).save(d / "tiny.png")
    rand_rgb(10).save(d / "good1.png")
    rand_rgb(11).save(d / "good2.jpg")
    Image.new("CMYK", (20, 12), (0, 255, 0, 0)).save(d / "cmyk.tiff")
    Image.new("RGBA", (20, 12), (255, 0, 0, 0)).save(d / "rgba.png")
    Image.fromarray(np.full((12, 20), 40000, dtype=np.uint16)).save(d / "grey16.png")
    pal = Image.new("P", (20, 12), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(d / "palette.png")
    Image.new("L", (20, 12), 128).save(d / "grey.png")
    rows = [
        {"image": "corrupt.png", "text": "corrupt"},
        {"image": "missing.png", "text": "missing"},
        {"image": "trunc.png", "text": "truncated png"},
        {"image": "good1.png", "text": "   "},  # empty caption
        {"image": "good1.png", "text": "A good one."},
        {"image": "trunc.jpg", "text": "truncated jpeg"},
        {"image": "tiny.png", "text": "tiny"},
        {"image": "good2.jpg", "text": None},  # missing caption
        {"image": "good2.jpg"},  # no caption field at all
        {"image": "good2.jpg", "text": "...!"},  # empty after cleaning
        {"image": "cmyk.tiff", "text": "cmyk"},
        {"image": "rgba.png", "text": "rgba"},
        {"image": "grey16.png", "text": "sixteen bit"},
        {"image": "palette.png", "text": "palette"},
        {"image": "grey.png", "text": "grey"},
        "{this is not json",
    ]
    expected = {
        "samples": 6,
        "skipped": {"corrupt_image": 1, "missing_image": 1, "truncated_image": 2, "tiny_image": 1,
                    "empty_caption": 2, "missing_caption": 2, "bad_record": 1},
        "converted": {"total": 5, "by_mode": {"CMYK": 1, "RGBA": 1, "I;16": 1, "P": 1, "L": 1}},
    }
    return write_jsonl(d / "messy.jsonl", rows), expected


def check_report(data: dict, expected: dict, *, epochs: int = 1) -> None:
    """Unique records at the top level; the events of ``epochs`` epochs under "events"."""
    for counts, times in ((data, 1), (data["events"], epochs)):
        assert counts["usable_samples"] == expected["samples"] * times
        assert counts["skipped"] == {k: v * times for k, v in expected["skipped"].items()}
        assert counts["skipped_total"] == sum(expected["skipped"].values()) * times
        assert counts["converted"] == {"total": expected["converted"]["total"] * times,
                                       "by_mode": {k: v * times for k, v in expected["converted"]["by_mode"].items()}}


def test_bad_data_skipped_and_counted_exactly(tmp_path, tokenizer):
    path, expected = build_messy(tmp_path)
    ds = open_caption_dataset(str(path), vision=VISION, train=True, seed=3)
    assert len(ds) == 16  # lazy: nothing was read yet
    loader = CaptionLoader(ds, Stage1Collator(tokenizer), batch_size=4, shuffle=False)
    batches = epoch_of(loader)
    assert [len(b["image_ids"]) for b in batches] == [1, 2, 3]  # batch 0 (all bad) was skipped
    assert all(DATA_STATS_KEY not in b for b in batches)
    out = loader.write_report(tmp_path / "run")
    data = json.loads(out.read_text())
    check_report(data, expected)
    assert data["events"]["counts"]["empty_batches"] == 1 and data["events"]["counts"]["batches"] == 3
    assert data["dataset"] == f"jsonl:{path}" and data["epochs"] == 1
    assert data["unique_basis"] == "per_record" and data["records"] == data["records_seen"] == 16 and data["complete"]
    assert str(path.parent / "missing.png") in data["examples"]["missing_image"]
    assert data["examples"]["bad_record"] == [f"{path}:16"]
    # The converted images have the right colours (CMYK -> magenta, transparent -> white, palette entry 1).
    by_caption = {}
    for i in range(len(ds)):
        s = ds[i]
        if isinstance(s, Sample):
            by_caption[s.caption] = s
    ev = open_caption_dataset(str(path), vision=VISION, train=False)
    colours = {"cmyk": (255, 0, 255), "rgba": (255, 255, 255), "palette": (10, 200, 30), "grey": (128, 128, 128),
               "sixteen bit": (40000 / 65535 * 255,) * 3}
    for i in range(len(ev)):
        s = ev[i]
        if isinstance(s, Sample) and s.caption in colours:
            assert torch.allclose(s.pixel_values, normalized(colours[s.caption]), atol=1e-4), s.caption


def test_dataloader_with_two_workers_full_epoch_and_merged_report(tmp_path, tokenizer):
    path, expected = build_messy(tmp_path)
    # Map-style with 2 workers: same batches, same augmentations as in-process, exact merged counts.
    ds = open_caption_dataset(str(path), vision=VISION, train=True, seed=5)
    ref = epoch_of(CaptionLoader(ds, Stage1Collator(tokenizer), batch_size=3, shuffle=True, seed=1))
    loader = CaptionLoader(ds, Stage1Collator(tokenizer), batch_size=3, shuffle=True, seed=1, num_workers=2)
    got = epoch_of(loader)
    assert len(got) == len(ref) and sum(len(b["image_ids"]) for b in got) == expected["samples"]
    for a, b in zip(got, ref):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["input_ids"], b["input_ids"])
    check_report(json.loads(loader.write_report(tmp_path / "w2").read_text()), expected)
    # Streaming with 2 workers (records split between them): same counts.
    stream = open_caption_dataset(str(path), vision=VISION, train=True, streaming=True)
    sloader = CaptionLoader(stream, Stage1Collator(tokenizer), batch_size=4, num_workers=2)
    sbatches = epoch_of(sloader)
    assert sum(len(b["image_ids"]) for b in sbatches) == expected["samples"]
    check_report(json.loads(sloader.write_report(tmp_path / "s2").read_text()), expected)


def test_scan_drops_bad_records_up_front(tmp_path, tokenizer):
    path, expected = build_messy(tmp_path)
    ds = open_caption_dataset(str(path), vision=VISION, train=False, scan=True)
    assert len(ds) == expected["samples"]
    assert ds.scan_report.skipped_by_reason() == expected["skipped"]
    assert ds.scan_report.converted_by_mode() == expected["converted"]["by_mode"]
    assert all(isinstance(ds[i], Sample) for i in range(len(ds)))
    loader = CaptionLoader(ds, Stage1Collator(tokenizer), batch_size=4, shuffle=False)
    assert len(loader) == 2 and [len(b["image_ids"]) for b in loader] == [4, 2]
    data = json.loads(loader.write_report(tmp_path / "run").read_text())
    assert data["skipped_total"] == 0 and data["usable_samples"] == 6 and data["records"] == 6
    assert data["scan"]["skipped"] == expected["skipped"] and data["scan"]["counts"]["scanned"] == 16


def test_all_bad_dataset_raises_a_clear_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"image": "gone.png", "text": "a"}, {"image": "gone2.png", "text": ""}])
    ds = open_caption_dataset(str(path), vision=VISION)
    loader = CaptionLoader(ds, Stage1Collator(tokenizer), batch_size=2)
    with pytest.raises(NoUsableDataError, match=r"bad\.jsonl.*no usable sample.*1 missing_image.*1 empty_caption"):
        epoch_of(loader)
    with pytest.raises(NoUsableDataError, match=r"bad\.jsonl.*nothing usable is left.*1 missing_image"):
        open_caption_dataset(str(path), vision=VISION, scan=True)
    stream = open_caption_dataset(str(path), vision=VISION, streaming=True)
    with pytest.raises(NoUsableDataError, match="missing_image"):
        epoch_of(CaptionLoader(stream, Stage1Collator(tokenizer), batch_size=2))


def test_unreadable_file_is_skipped(tmp_path, monkeypatch):
    rand_rgb(0).save(tmp_path / "locked.png")
    rand_rgb(1).save(tmp_path / "ok.png")
    path = write_jsonl(tmp_path / "u.jsonl", [{"image": "locked.png", "text": "a"}, {"image": "ok.png", "text": "b"}])
    real_open = Image.open

    def guarded_open(fp, *a, **kw):  # what a chmod 000 file does for a non-root user
        if str(fp).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *a, **kw)

    monkeypatch.setattr(Image, "open", guarded_open)
    ds = open_caption_dataset(str(path), vision=VISION, train=False)
    first, second = ds[0], ds[1]
    assert isinstance(first, Skipped) and first.report.counts == {"unreadable_image": 1}
    assert first.report.examples["unreadable_image"] == [str(tmp_path / "locked.png")]
    assert isinstance(second, Sample)


def test_unreadable_file_permissions(tmp_path, monkeypatch):
    """A chmod 000 file is skipped and counted as unreadable_image, when decoding it and when
    reading its bytes for the feature cache. Root reads such a file anyway, so open() is made to
    do the kernel's permission check itself: the PermissionError any other user gets."""
    import builtins

    from qformer.data.reading import SkipSample, read_image_bytes

    rand_rgb(0).save(tmp_path / "locked.png")
    rand_rgb(1).save(tmp_path / "ok.png")
    real_open = builtins.open

    def checked_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.exists(file) and not os.stat(file).st_mode & 0o444:
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", checked_open)  # PIL's Image.open
    monkeypatch.setattr(io, "open", checked_open)  # pathlib's read_bytes
    path = write_jsonl(tmp_path / "u.jsonl", [{"image": "locked.png", "text": "a"}, {"image": "ok.png", "text": "b"}])
    ds = open_caption_dataset(str(path), vision=VISION, train=False)
    os.chmod(tmp_path / "locked.png", 0)
    try:
        locked, ok = ds[0], ds[1]
        with pytest.raises(SkipSample) as skip:
            read_image_bytes(str(tmp_path / "locked.png"), where="locked.png")
    finally:
        os.chmod(tmp_path / "locked.png", 0o644)
    assert isinstance(locked, Skipped) and locked.reason == "unreadable_image"
    assert locked.report.counts == {"unreadable_image": 1}
    assert locked.report.examples["unreadable_image"] == [str(tmp_path / "locked.png")]
    assert skip.value.reason == "unreadable_image" and isinstance(ok, Sample)


def test_imagefolder_bad_images_are_skipped_lazily(tmp_path):
    d = tmp_path / "folder"
    d.mkdir()
    rand_rgb(0).save(d / "ok.png")
    (d / "bad.png").write_bytes(b"garbage")
    Image.new("P", (20, 12), 0).save(d / "pal.png")
    write_jsonl(d / "metadata.jsonl", [{"file_name": "ok.png", "text": "fine"}, {"file_name": "bad.png", "text": "bad"},
                                       {"file_name": "pal.png", "text": " "}])
    ds = open_caption_dataset(str(d), vision=VISION, train=False, cache_dir=str(tmp_path / "hf"))
    report = DataReport()
    for i in range(len(ds)):
        report.merge(ds[i].report)
    assert report.skipped_by_reason() == {"corrupt_image": 1, "empty_caption": 1}


# ----------------------------------------------------------------------------------------------
# Collators
# ----------------------------------------------------------------------------------------------


def test_stage1_collator_shapes_dtypes_and_tokenisation(tmp_path, tokenizer):
    samples = [
        Sample(caption="a red circle left of a blue square", image_id=3, key="0", source="t", pixel_values=torch.randn(3, S, S)),
        Skipped(report=DataReport().add("missing_image", "x.png")),
        Sample(caption="two dogs", image_id="dog.png", key="1", source="t", pixel_values=torch.randn(3, S, S)),
        Sample(caption="two dogs", image_id="dog.png", key="2", source="t", pixel_values=torch.randn(3, S, S)),
    ]
    batch = Stage1Collator(tokenizer, max_length=6)(samples)
    assert batch["pixel_values"].shape == (3, 3, S, S) and batch["pixel_values"].dtype == torch.float32
    want = tokenizer(["a red circle left of a blue square", "two dogs", "two dogs"], padding="longest", truncation=True,
                     max_length=6, return_tensors="pt")
    assert torch.equal(batch["input_ids"], want["input_ids"]) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["attention_mask"], want["attention_mask"])
    assert batch["input_ids"].shape == (3, 6)  # truncated on the right: [CLS] a red circle left [SEP]
    assert batch["input_ids"][0, 0] == tokenizer.cls_token_id and batch["input_ids"][0, -1] == tokenizer.sep_token_id
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0]
    ids = batch["image_ids"]
    assert ids.dtype == torch.long and ids[0] == 3 and ids[1] == ids[2] == stable_image_id("dog.png")
    assert stable_image_id("dog.png") == int.from_bytes(hashlib.blake2b(b"dog.png", digest_size=8).digest(), "little") & (2**63 - 1)
    stats = batch[DATA_STATS_KEY]
    assert stats.counts == {"missing_image": 1, "samples": 3, "batches": 1}
    # A batch with nothing usable: counts only, no crash.
    empty = Stage1Collator(tokenizer)([Skipped(report=DataReport().add("tiny_image"))])
    assert list(empty) == [DATA_STATS_KEY] and empty[DATA_STATS_KEY].counts == {"tiny_image": 1, "empty_batches": 1}
    # The tokenizer-free part, for stage 2.
    c = collate_samples(samples)
    assert c.captions == ["a red circle left of a blue square", "two dogs", "two dogs"] and len(c) == 3
    assert list(c.image_inputs()) == ["pixel_values"]


def test_loader_resume_is_exact(tmp_path, tokenizer):
    d = tmp_path / "r"
    d.mkdir()
    rows = []
    for i in range(7):
        rand_rgb(i, (36, 30)).save(d / f"{i}.png")
        rows.append({"image": f"{i}.png", "text": f"image {i}"})
    rows.insert(3, {"image": "nope.png", "text": "gone"})
    path = write_jsonl(d / "r.jsonl", rows)

    def make():
        ds = open_caption_dataset(str(path), vision=VISION, train=True, seed=9)
        return CaptionLoader(ds, Stage1Collator(tokenizer), batch_size=2, shuffle=True, seed=4)

    full = make()
    full.set_epoch(1)
    ref = epoch_of(full)
    part = make()
    part.set_epoch(1)
    it = iter(part)
    head = [next(it), next(it)]
    state = part.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    tail = epoch_of(resumed)
    assert len(head) + len(tail) == len(ref)
    for a, b in zip(head + tail, ref):
        assert torch.equal(a["image_ids"], b["image_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    assert resumed.report.counts["samples"] == full.report.counts["samples"] == 7
    assert resumed.report.count("missing_image") == 1 and resumed.epoch == 2
    # The record statuses read before the checkpoint travel with it: the unique counts are exact.
    assert resumed.merged_report().to_dict() == full.merged_report().to_dict()
    assert resumed.status.seen == 8 and resumed.status.counts() == {"usable": 7, "missing_image": 1}


def test_streaming_loader_drop_last_resume_and_full_batches(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    rows = []
    for i in range(9):
        rand_rgb(i, (30, 30)).save(d / f"{i}.png")
        rows.append({"image": f"{i}.png", "text": f"c {i}"})
    rows.insert(4, {"image": "nope.png", "text": "gone"})
    path = write_jsonl(d / "s.jsonl", rows)

    def make(**kw):
        ds = open_caption_dataset(str(path), vision=VISION, train=True, streaming=True, shuffle_buffer=4, seed=1)
        return CaptionLoader(ds, _plain_collate, batch_size=2, **kw)

    full = make(drop_last=True)
    ref = epoch_of(full)
    # Bad records are filtered in the stream, so batches stay full; the odd one out is dropped.
    assert [len(b["image_ids"]) for b in ref] == [2, 2, 2, 2]
    assert full.report.counts == {"samples": 8, "batches": 4, "missing_image": 1, "dropped_last": 1}
    assert full.epochs_done == 1
    # The unique count is of what the stream held (the dropped last sample was read: it is usable).
    unique = full.merged_report()
    assert unique.unique_basis == "first_epoch" and unique.complete and unique.records == 10
    assert unique.unique.samples == 9 and unique.unique.skipped_by_reason() == {"missing_image": 1}
    part = make(drop_last=True)
    it = iter(part)
    head = [next(it)]
    resumed = make(drop_last=True)
    resumed.load_state_dict(part.state_dict())
    tail = epoch_of(resumed)
    assert len(head) + len(tail) == len(ref)
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(head + tail, ref))
    assert resumed.report.counts == full.report.counts
    assert resumed.merged_report().to_dict() == unique.to_dict()
    two = make(num_workers=2)
    assert sum(len(b["image_ids"]) for b in two) == 9
    assert two.report.counts == {"samples": 9, "batches": 5, "missing_image": 1}  # no empty batch


# ----------------------------------------------------------------------------------------------
# Feature cache
# ----------------------------------------------------------------------------------------------


def tiny_tower(**kw) -> VisionTower:
    torch.manual_seed(0)
    cfg = dict(backend="timm", name="vit_base_patch16_224", model_kwargs=dict(TINY_VIT), image_size=S)
    cfg.update(kw)
    return build_vision_tower(VisionConfig(**cfg))


def test_feature_cache_round_trip(tmp_path, tokenizer):
    d = tmp_path / "c"
    d.mkdir()
    rand_rgb(0).save(d / "a.png")
    rand_rgb(1).save(d / "b.png")
    Image.new("L", (20, 20), 99).save(d / "g.png")
    path = write_jsonl(d / "c.jsonl", [
        {"image": "a.png", "text": ["a one", "a two"]},  # two captions, one image: computed once
        {"image": "b.png", "text": "b"},
        {"image": "g.png", "text": "grey"},
        {"image": "missing.png", "text": "x"},
    ])
    tower = tiny_tower()
    calls = []
    tower.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    cache = FeatureCache.for_tower(tmp_path / "cache", tower)
    first = fill_feature_cache(cache, tower, open_caption_source(str(path)), batch_size=2, progress=False)
    assert calls == [2, 1]
    assert first.counts["feature_cache_writes"] == 3 and first.counts["feature_cache_hits"] == 1
    assert first.counts["missing_image"] == 1 and first.converted_by_mode() == {"L": 1}
    assert len(cache) == 3 and (cache.directory / "tower.json").is_file()
    # A second run (another process, a fresh object) reads from disk: the tower is not called.
    calls.clear()
    again = FeatureCache.for_tower(tmp_path / "cache", tower)
    second = fill_feature_cache(again, tower, open_caption_source(str(path)), progress=False)
    assert calls == [] and second.counts["feature_cache_hits"] == 4 and "feature_cache_writes" not in second.counts
    # The dataset path yields the tower's own features, and never calls the tower.
    ds = open_caption_dataset(str(path), train=False, feature_cache=pickle.loads(pickle.dumps(again)))
    loader = CaptionLoader(ds, Stage1Collator(tokenizer), batch_size=8, shuffle=False)
    (batch,) = epoch_of(loader)
    assert calls == [] and "pixel_values" not in batch
    feats = batch["vision_features"]
    assert feats.shape == (4, tower.num_tokens, tower.width) and feats.dtype == torch.float32
    pre = tower.preprocessor
    with torch.no_grad():
        want = tower(torch.stack([pre.transform(d / "a.png"), pre.transform(d / "b.png"), pre.transform(d / "g.png")]))
    assert torch.equal(feats[0], want[0]) and torch.equal(feats[1], want[0])
    assert torch.equal(feats[2], want[1]) and torch.equal(feats[3], want[2])
    assert loader.report.count("missing_image") == 1 and loader.report.converted_by_mode() == {"L": 1}
    # Random augmentation cannot use the cache.
    with pytest.raises(ValueError, match="random augmentation"):
        open_caption_dataset(str(path), train=True, vision=VISION, feature_cache=again)
    # Another tower (config or weights) has another identity, hence another directory.
    other_cfg = tiny_tower(feature_layer=-1)
    assert tower_fingerprint(other_cfg) != tower_fingerprint(tower)
    assert FeatureCache.for_tower(tmp_path / "cache", other_cfg).directory != cache.directory
    assert len(FeatureCache.for_tower(tmp_path / "cache", other_cfg)) == 0
    other_weights = tiny_tower()
    with torch.no_grad():
        other_weights.model.blocks[0].mlp.fc1.weight.mul_(1.01)
    assert tower_fingerprint(other_weights) != tower_fingerprint(tower) == tower_fingerprint(tiny_tower())
    with pytest.raises(ValueError, match="another tower"):
        fill_feature_cache(cache, other_weights, open_caption_source(str(path)), progress=False)


def test_feature_cache_uncached_image_is_counted(tmp_path):
    rand_rgb(0).save(tmp_path / "a.png")
    rand_rgb(1).save(tmp_path / "new.png")
    path = write_jsonl(tmp_path / "x.jsonl", [{"image": "a.png", "text": "a"}])
    tower = tiny_tower()
    cache = FeatureCache.for_tower(tmp_path / "cache", tower, storage_dtype="float16")
    fill_feature_cache(cache, tower, open_caption_source(str(path)), progress=False)
    later = write_jsonl(tmp_path / "y.jsonl", [{"image": "a.png", "text": "a"}, {"image": "new.png", "text": "n"}])
    ds = open_caption_dataset(str(later), train=False, feature_cache=cache)
    hit, miss = ds[0], ds[1]
    assert isinstance(hit, Sample) and hit.vision_features.dtype == torch.float32
    with torch.no_grad():
        want = tower(tower.preprocess(tmp_path / "a.png"))[0]
    assert torch.allclose(hit.vision_features, want, atol=1e-2, rtol=1e-3)  # stored as float16
    assert isinstance(miss, Skipped) and miss.report.counts == {"uncached_image": 1}


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------


def test_report_merge_all_reduce_single_process_and_atomic_write(tmp_path):
    a = DataReport(dataset="d").add("missing_image", "x.png").add("samples", n=3).add("converted").add("converted:CMYK")
    b = DataReport().add("missing_image", "y.png", n=2).add("samples", n=1)
    merged = a.copy().merge(b)
    assert merged.counts["missing_image"] == 3 and merged.samples == 4 and merged.examples["missing_image"] == ["x.png", "y.png"]
    same = merged.all_reduce(world_size=1)  # no process group needed
    assert same is not merged and same.counts == merged.counts
    out = merged.write(tmp_path / "o")
    assert json.loads(out.read_text())["skipped"] == {"missing_image": 3}
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["data_report.json"]
    assert DataReport.from_dict(json.loads(out.read_text())).counts == merged.counts
    with pytest.raises(NoUsableDataError, match="'d'.*3 missing_image.*x.png"):
        DataReport(dataset="d").add("missing_image", "x.png", n=3).raise_if_unusable()


# ----------------------------------------------------------------------------------------------
# Two ranks (gloo): reports merge across ranks, batches stay equal across ranks
# ----------------------------------------------------------------------------------------------


def _plain_collate(items):
    c = collate_samples(items)
    return {**c.image_inputs(), "image_ids": c.image_ids, DATA_STATS_KEY: c.report} if len(c) else {DATA_STATS_KEY: c.report}


def _two_rank_worker(rank: int, store: str, path: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    ds = open_caption_dataset(path, vision=VISION, train=False)
    loader = CaptionLoader(ds, _plain_collate, batch_size=2, shuffle=False)  # rank/world from the group
    sizes = [len(b["image_ids"]) for b in loader]
    loader.write_report(out)
    torch.save({"sizes": sizes, "local": loader.report.counts}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_merge_reports_and_balance_batches(tmp_path):
    import torch.multiprocessing as mp

    rand_rgb(0).save(tmp_path / "ok.png")
    # Rank r reads indices r, r+2, ...: rank 0 gets [0, 2] then [4, 6]; rank 1 gets [1, 3] then [5, 7].
    bad = {0, 2, 4}
    rows = [{"image": "missing.png" if i in bad else "ok.png", "text": f"c{i}"} for i in range(8)]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    # fork: the children need nothing re-imported (spawn would cost seconds per process here).
    mp.start_processes(_two_rank_worker, args=(str(tmp_path / "store"), str(path), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    # Step 0: rank 0's batch is empty, so both ranks skip it; step 1: 1 vs 2 samples -> both get 1.
    assert r0["sizes"] == r1["sizes"] == [1]
    assert r0["local"]["empty_batches"] == 1 and r1["local"]["rank_skipped_batches"] == 1
    data = json.loads((tmp_path / "data_report.json").read_text())  # written by rank 0, merged over ranks
    assert data["world_size"] == 2 and data["epochs"] == 1
    # Unique records: 8 read, 3 missing; events: what training received after the balancing.
    assert data["records"] == data["records_seen"] == 8 and data["usable_samples"] == 5
    assert data["skipped"] == data["events"]["skipped"] == {"missing_image": 3}
    assert data["events"]["usable_samples"] == 2
    assert data["events"]["counts"]["rank_trimmed"] == 3 and data["events"]["counts"]["batches"] == 2


def test_several_datasets_concatenate_with_distinct_ids(tmp_path):
    """--train-data A B: one dataset after the other; ids of different datasets never collide."""
    import json as _json

    from qformer.data import ConcatCaptionSource, open_caption_source

    a, b = tmp_path / "a", tmp_path / "b"
    for d, colour in ((a, "red"), (b, "blue")):
        d.mkdir()
        Image.new("RGB", (16, 16), colour).save(d / "0.png")
        Image.new("RGB", (16, 16), colour).save(d / "1.png")
        (d / "caps.jsonl").write_text("".join(_json.dumps({"image": f"{i}.png", "caption": f"a {colour} {i}",
                                                            "image_id": i}) + "\n" for i in range(2)))
    src = open_caption_source([str(a / "caps.jsonl"), str(b / "caps.jsonl")])
    assert isinstance(src, ConcatCaptionSource) and src.is_map_style and len(src) == 4
    recs = [src.record(i) for i in range(4)]
    assert [r.caption for r in recs] == ["a red 0", "a red 1", "a blue 0", "a blue 1"]
    assert len({r.image_id for r in recs}) == 4 and len({r.key for r in recs}) == 4
    assert [r.caption for r in src.iter_records(shard=1, num_shards=2)] == ["a red 1", "a blue 1"]
    with pytest.raises(IndexError):
        src.record(4)
    assert open_caption_source([str(a / "caps.jsonl")]).name == open_caption_source(str(a / "caps.jsonl")).name
