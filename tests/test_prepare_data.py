"""recipes/prepare_data.py and qformer.data.prepare on tiny fake COCO (Karpathy and 2017 layouts),
Visual Genome (LAVIS and raw layouts) and folder inputs: rows, skip counts, missing images,
atomic output, layout errors, and that the recipes' readers open what is written."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from qformer.config import VisionConfig
from qformer.data import open_caption_dataset, open_caption_source
from qformer.data.prepare import PrepareError, prepare_coco, prepare_folder, prepare_vg, report_path
from qformer.data.samples import Sample
from qformer.data.sources import CaptionRecord

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "recipes" / "prepare_data.py"


def _png(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    """A real 16x16 image (PNG bytes, whatever the suffix: PIL reads by content, as COCO's .jpg)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path, format="PNG")
    return path


def _json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def _load_script():
    spec = importlib.util.spec_from_file_location("prepare_data_recipe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------
# fake downloads
# ----------------------------------------------------------------------------------------------

K1 = "train2014/COCO_train2014_000000000001.jpg"
K2 = "val2014/COCO_val2014_000000000002.jpg"
K_MISSING = "val2014/COCO_val2014_000000000404.jpg"


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    """/coco with two images; Karpathy train/val and a 2017-style annotation file beside it."""
    root = tmp_path / "coco"
    _png(root / K1)
    _png(root / K2, (30, 200, 30))
    _png(root / "train2017" / "000000000001.jpg")
    _png(root / "train2017" / "000000000002.jpg")
    ann = tmp_path / "ann"
    _json(ann / "coco_karpathy_train.json", [
        {"image": K1, "caption": "  A red square on a table. ", "image_id": "coco_1"},
        {"image": K1, "caption": "a red block", "image_id": "coco_1"},
        {"image": K2, "caption": "a green square", "image_id": "coco_2"},
        {"image": K2, "caption": "   ", "image_id": "coco_2"},
        {"image": K_MISSING, "caption": "a lost image", "image_id": "coco_404"},
        {"image": K_MISSING, "caption": "the same lost image", "image_id": "coco_404"},
    ])
    _json(ann / "coco_karpathy_val.json", [
        {"image": K1, "caption": ["a red square", "a square that is red"]},
        {"image": K2, "caption": ["a green square", ""]},
    ])
    _json(ann / "captions_train2017.json", {
        "info": {}, "licenses": [],
        "images": [{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "000000000002.jpg"}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "a red square"},
            {"id": 11, "image_id": 2, "caption": "a green square"},
            {"id": 12, "image_id": 1, "caption": "red block on white"},
            {"id": 13, "image_id": 99, "caption": "an image that is not listed"},
            {"id": 14, "image_id": 2, "caption": ""},
        ],
    })
    return tmp_path


@pytest.fixture
def vg(tmp_path: Path) -> Path:
    root = tmp_path / "vg"
    _png(root / "VG_100K" / "1.jpg")
    _png(root / "VG_100K_2" / "2.jpg", (20, 20, 220))
    ann = tmp_path / "vgann"
    _json(ann / "vg_caption.json", [
        {"image": "VG_100K/1.jpg", "caption": "a man riding a horse"},
        {"image": "VG_100K/1.jpg", "caption": "A  man riding a HORSE "},  # duplicate: case and spacing
        {"image": "VG_100K/1.jpg", "caption": "green grass"},
        {"image": "VG_100K/1.jpg", "caption": "a blue sky"},
        {"image": "VG_100K_2/2.jpg", "caption": ""},
        {"image": "VG_100K_2/2.jpg", "caption": "a dog on a sofa"},
    ])
    _json(ann / "image_data.json", [
        {"image_id": 1, "url": "https://cs.stanford.edu/people/rak248/VG_100K/1.jpg", "width": 16, "height": 16},
        {"image_id": 2, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/2.jpg", "width": 16, "height": 16},
    ])
    _json(ann / "region_descriptions.json", [
        {"id": 1, "regions": [
            {"region_id": 1, "image_id": 1, "phrase": "small button", "x": 0, "y": 0, "width": 2, "height": 2},
            {"region_id": 2, "image_id": 1, "phrase": "a man riding a horse", "x": 0, "y": 0, "width": 15, "height": 15},
            {"region_id": 3, "image_id": 1, "phrase": "A man riding a horse", "x": 1, "y": 1, "width": 10, "height": 10},
            {"region_id": 4, "image_id": 1, "phrase": " ", "x": 1, "y": 1, "width": 12, "height": 12},
            {"region_id": 5, "image_id": 1, "phrase": "green grass", "x": 0, "y": 8, "width": 16, "height": 8},
        ]},
        {"id": 2, "regions": [
            {"region_id": 6, "image_id": 2, "phrase": "a dog on a sofa", "x": 0, "y": 0, "width": 16, "height": 16},
        ]},
        {"id": 3, "regions": [  # not in image_data.json
            {"region_id": 7, "image_id": 3, "phrase": "a lamp", "x": 0, "y": 0, "width": 4, "height": 4},
        ]},
    ])
    return tmp_path


# ----------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------


def test_karpathy_train_rows_skips_and_missing_images(coco: Path) -> None:
    out = coco / "data" / "coco_train.jsonl"
    report = prepare_coco(karpathy=coco / "ann" / "coco_karpathy_train.json", image_root=coco / "coco", output=out,
                          check_images=True)
    rows = _rows(out)
    assert rows == [
        {"image": str(coco / "coco" / K1), "caption": "A red square on a table.", "image_id": "coco_1"},
        {"image": str(coco / "coco" / K1), "caption": "a red block", "image_id": "coco_1"},
        {"image": str(coco / "coco" / K2), "caption": "a green square", "image_id": "coco_2"},
    ]
    assert (report.rows, report.captions, report.images) == (3, 3, 2)
    assert report.skipped == {"empty_caption": 1, "missing_image": 2}
    assert report.missing_files == 1  # two captions, one file
    assert report.examples["missing_image"] == [str(coco / "coco" / K_MISSING)]
    assert report.examples["empty_caption"] == ["coco_karpathy_train.json item 3"]
    saved = json.loads(report_path(out).read_text())
    assert saved == report.to_dict() and saved["skipped"]["missing_image"] == 2
    assert "missing_image (1 distinct files)" in report.summary()
    assert _leftovers(out.parent) == []


def test_karpathy_unchecked_keeps_rows_and_relative_paths_resolve_like_the_reader(coco: Path) -> None:
    """Without --image-root the annotation's paths are kept relative; the reader resolves them
    against the JSONL's folder, and so does --check-images."""
    out = coco / "coco" / "train.jsonl"  # next to train2014/ and val2014/
    report = prepare_coco(karpathy=[coco / "ann" / "coco_karpathy_train.json"], output=out, check_images=True)
    assert [r["image"] for r in _rows(out)] == [K1, K1, K2]
    assert report.skipped == {"empty_caption": 1, "missing_image": 2}
    unchecked = prepare_coco(karpathy=[coco / "ann" / "coco_karpathy_train.json"], output=coco / "coco" / "all.jsonl")
    assert unchecked.rows == 5 and unchecked.skipped == {"empty_caption": 1} and not unchecked.checked_images
    src = open_caption_source(str(out))
    assert [r.image for r in src] == [str(coco / "coco" / p) for p in (K1, K1, K2)]


def test_karpathy_val_lists_expand_or_group(coco: Path) -> None:
    val = coco / "ann" / "coco_karpathy_val.json"
    out = coco / "val.jsonl"
    report = prepare_coco(karpathy=val, image_root=coco / "coco", output=out)
    rows = _rows(out)
    assert [(r["caption"], r["image_id"]) for r in rows] == [
        ("a red square", 1), ("a square that is red", 1), ("a green square", 2)]
    assert report.skipped == {"empty_caption": 1}
    grouped = coco / "val_grouped.jsonl"
    report = prepare_coco(karpathy=val, image_root=coco / "coco", output=grouped, group=True)
    assert _rows(grouped) == [
        {"image": str(coco / "coco" / K1), "caption": ["a red square", "a square that is red"], "image_id": 1},
        {"image": str(coco / "coco" / K2), "caption": ["a green square"], "image_id": 2},
    ]
    assert (report.rows, report.captions, report.images) == (2, 3, 2)
    # the readers expand a grouped file back to one record per caption with a shared image_id
    records = list(open_caption_source(str(grouped)))
    assert [(r.caption, r.image_id) for r in records] == [("a red square", 1), ("a square that is red", 1),
                                                          ("a green square", 2)]


def test_coco_2017_annotations_and_limit(coco: Path) -> None:
    ann = coco / "ann" / "captions_train2017.json"
    out = coco / "coco2017.jsonl"
    report = prepare_coco(annotations=ann, image_root=coco / "coco" / "train2017", output=out, check_images=True)
    rows = _rows(out)
    assert [(Path(r["image"]).name, r["caption"], r["image_id"]) for r in rows] == [
        ("000000000001.jpg", "a red square", 1), ("000000000002.jpg", "a green square", 2),
        ("000000000001.jpg", "red block on white", 1)]
    assert report.skipped == {"empty_caption": 1, "unknown_image_id": 1}
    assert "image_id 99" in report.examples["unknown_image_id"][0]
    limited = prepare_coco(annotations=ann, image_root=coco / "coco" / "train2017", output=coco / "two.jsonl", limit=2)
    assert limited.rows == 2 and limited.stopped_at_limit and len(_rows(coco / "two.jsonl")) == 2
    grouped = prepare_coco(annotations=ann, image_root=coco / "coco" / "train2017", output=coco / "g.jsonl", group=True,
                           limit=1)
    # captions of the kept image are collected even when they come after other images' captions
    assert _rows(coco / "g.jsonl")[0]["caption"] == ["a red square", "red block on white"] and grouped.images == 1


# ----------------------------------------------------------------------------------------------
# Visual Genome
# ----------------------------------------------------------------------------------------------


def test_vg_captions_deduplicated_and_capped(vg: Path) -> None:
    out = vg / "vg.jsonl"
    report = prepare_vg(captions=vg / "vgann" / "vg_caption.json", image_root=vg / "vg", output=out, check_images=True)
    assert [(Path(r["image"]).relative_to(vg / "vg").as_posix(), r["caption"], r["image_id"]) for r in _rows(out)] == [
        ("VG_100K/1.jpg", "a man riding a horse", 1), ("VG_100K/1.jpg", "green grass", 1),
        ("VG_100K/1.jpg", "a blue sky", 1), ("VG_100K_2/2.jpg", "a dog on a sofa", 2)]
    assert report.skipped == {"duplicate_caption": 1, "empty_caption": 1}
    capped = prepare_vg(captions=[vg / "vgann" / "vg_caption.json"], image_root=vg / "vg", output=vg / "cap.jsonl",
                        max_per_image=2)
    assert [r["caption"] for r in _rows(vg / "cap.jsonl")] == ["a man riding a horse", "green grass", "a dog on a sofa"]
    assert capped.skipped == {"duplicate_caption": 1, "empty_caption": 1, "over_max_per_image": 1}


def test_vg_regions_largest_first_dedup_unknown_and_image_data(vg: Path) -> None:
    out = vg / "regions.jsonl"
    # image_data.json is found next to region_descriptions.json
    report = prepare_vg(regions=vg / "vgann" / "region_descriptions.json", image_root=vg / "vg", output=out,
                        max_per_image=2, check_images=True)
    rows = _rows(out)
    assert [(Path(r["image"]).relative_to(vg / "vg").as_posix(), r["caption"], r["image_id"]) for r in rows] == [
        ("VG_100K/1.jpg", "a man riding a horse", 1),  # 15x15: the largest region
        ("VG_100K/1.jpg", "green grass", 1),  # 16x8; the 12x12 one is empty, the 10x10 a duplicate
        ("VG_100K_2/2.jpg", "a dog on a sofa", 2)]
    assert report.skipped == {"duplicate_caption": 1, "empty_caption": 1, "over_max_per_image": 1,
                              "unknown_image_id": 1}
    uncapped = prepare_vg(regions=vg / "vgann" / "region_descriptions.json",
                          image_data=vg / "vgann" / "image_data.json", image_root=vg / "vg", output=vg / "all.jsonl")
    assert [r["caption"] for r in _rows(vg / "all.jsonl")][:3] == ["small button", "a man riding a horse", "green grass"]
    assert "over_max_per_image" not in uncapped.skipped
    (vg / "lone").mkdir()
    (vg / "lone" / "region_descriptions.json").write_text("[]")
    with pytest.raises(PrepareError, match=r"image_data\.json.*--image-data"):
        prepare_vg(regions=vg / "lone" / "region_descriptions.json", output=vg / "x.jsonl")


# ----------------------------------------------------------------------------------------------
# folders
# ----------------------------------------------------------------------------------------------


def test_folder_sidecars_make_an_imagefolder(tmp_path: Path) -> None:
    d = tmp_path / "pics"
    _png(d / "a.png")
    (d / "a.txt").write_text("a red square\n")
    _png(d / "b.jpg")  # no caption
    _png(d / "c.png")
    (d / "c.txt").write_text("  \n")
    _png(d / "sub" / "d.png", (0, 0, 255))
    (d / "sub" / "d.txt").write_text("a blue square")
    report = prepare_folder(folder=d)
    meta = d / "metadata.jsonl"
    assert _rows(meta) == [{"file_name": "a.png", "text": "a red square"},
                           {"file_name": "sub/d.png", "text": "a blue square"}]
    assert report.skipped == {"empty_caption": 1, "no_caption": 1}
    assert report.examples["no_caption"] == ["b.jpg"]
    # both readers: the folder as an imagefolder, and metadata.jsonl as a caption file
    folder_src = open_caption_source(str(d), cache_dir=str(tmp_path / "hf"))
    as_file = open_caption_source(str(meta))
    for src in (folder_src, as_file):
        records = list(src)
        assert sorted(r.caption for r in records) == ["a blue square", "a red square"]
        assert all(isinstance(r, CaptionRecord) for r in records)
    assert sorted(Path(r.image).name for r in as_file) == ["a.png", "d.png"]
    assert all(Path(r.image).is_file() for r in as_file)


def test_folder_csv_lists_and_missing_files(tmp_path: Path) -> None:
    d = tmp_path / "pics"
    _png(d / "x.png")
    _png(d / "y.png")
    (tmp_path / "caps.csv").write_text(
        "filepath,caption\nx.png,a red square\ny.png,a green one\nx.png,red again\ngone.png,a lost image\n")
    out = tmp_path / "elsewhere" / "meta.jsonl"  # outside the folder: absolute paths
    report = prepare_folder(folder=d, csv_file=tmp_path / "caps.csv", output=out)
    assert _rows(out) == [{"file_name": str(d / "x.png"), "text": ["a red square", "red again"]},
                          {"file_name": str(d / "y.png"), "text": ["a green one"]}]
    assert report.skipped == {"missing_image": 1} and report.missing_files == 1
    assert [(r.caption, Path(r.image).name) for r in open_caption_source(str(out))] == [
        ("a red square", "x.png"), ("red again", "x.png"), ("a green one", "y.png")]
    with pytest.raises(PrepareError, match=r"no caption column .*\['filepath', 'caption'\].*--caption-column"):
        prepare_folder(folder=d, csv_file=tmp_path / "caps.csv", output=out, caption_column="text")


# ----------------------------------------------------------------------------------------------
# errors and atomic output
# ----------------------------------------------------------------------------------------------


def test_layout_errors_name_the_file_item_and_field(coco: Path, vg: Path) -> None:
    bad = _json(coco / "ann" / "bad" / "coco_karpathy_train.json", [
        {"image": K1, "caption": "ok"}, {"image": K1, "caption": "ok"}, {"image": K2, "caption": "ok"},
        {"image": K2, "text": "the wrong field"}])
    message = r"coco_karpathy_train\.json: item 3 has no 'caption' \(its fields: image, text\)"
    with pytest.raises(PrepareError, match=message):
        prepare_coco(karpathy=bad, output=coco / "bad.jsonl")
    with pytest.raises(PrepareError, match=r"official .* layout: pass it with --annotations"):
        prepare_coco(karpathy=coco / "ann" / "captions_train2017.json", output=coco / "bad.jsonl")
    with pytest.raises(PrepareError, match=r"Karpathy split: pass it with --karpathy"):
        prepare_coco(annotations=coco / "ann" / "coco_karpathy_train.json", output=coco / "bad.jsonl")
    no_ann = _json(coco / "ann" / "bad" / "captions_val2017.json", {"images": [{"id": 1, "file_name": "a.jpg"}]})
    with pytest.raises(PrepareError, match=r"captions_val2017\.json: has no 'annotations' list"):
        prepare_coco(annotations=no_ann, output=coco / "bad.jsonl")
    ann_no_id = _json(coco / "ann" / "bad" / "captions2.json", {"images": [{"id": 1}], "annotations": []})
    with pytest.raises(PrepareError, match=r"captions2\.json: images\[0\] has no 'file_name'"):
        prepare_coco(annotations=ann_no_id, output=coco / "bad.jsonl")
    wrong_type = _json(coco / "ann" / "bad" / "k.json", [{"image": K1, "caption": 7}])
    with pytest.raises(PrepareError, match=r"k\.json: item 0 has a int 'caption', expected a string or a list"):
        prepare_coco(karpathy=wrong_type, output=coco / "bad.jsonl")
    (coco / "ann" / "bad" / "broken.json").write_text('[{"image": "a.jpg", "caption": ')
    with pytest.raises(PrepareError, match=r"broken\.json: not valid JSON"):
        prepare_coco(karpathy=coco / "ann" / "bad" / "broken.json", output=coco / "bad.jsonl")
    with pytest.raises(PrepareError, match=r"out\.json: the output must be a \.jsonl file"):
        prepare_coco(karpathy=coco / "ann" / "coco_karpathy_train.json", output=coco / "out.json")
    with pytest.raises(PrepareError, match=r"nowhere\.json: no such file"):
        prepare_coco(karpathy=coco / "nowhere.json", output=coco / "bad.jsonl")
    regions = _json(vg / "vgann" / "bad" / "region_descriptions.json", [{"id": 1, "regions": [{"image_id": 1}]}])
    with pytest.raises(PrepareError, match=r"region_descriptions\.json: item 0 regions\[0\] has no 'phrase'"):
        prepare_vg(regions=regions, image_data=vg / "vgann" / "image_data.json", output=vg / "bad.jsonl")
    with pytest.raises(PrepareError, match=r"raw region_descriptions\.json layout: pass it with --regions"):
        prepare_vg(captions=vg / "vgann" / "region_descriptions.json", output=vg / "bad.jsonl")
    assert not (coco / "bad.jsonl").exists() and not (vg / "bad.jsonl").exists()
    assert _leftovers(coco) == [] and _leftovers(vg) == []


def test_output_is_replaced_atomically(coco: Path) -> None:
    """A failed run leaves the previous output untouched and no temp file; a good one replaces it."""
    out = coco / "coco_train.jsonl"
    out.write_text('{"image": "old.jpg", "caption": "the previous file"}\n')
    bad = _json(coco / "ann" / "bad.json", [{"image": K1, "caption": "fine"}, {"caption": "no image"}])
    with pytest.raises(PrepareError, match=r"bad\.json: item 1 has no 'image'"):
        prepare_coco(karpathy=bad, image_root=coco / "coco", output=out)
    assert out.read_text() == '{"image": "old.jpg", "caption": "the previous file"}\n'
    assert _leftovers(coco) == [] and not report_path(out).exists()
    prepare_coco(karpathy=coco / "ann" / "coco_karpathy_train.json", image_root=coco / "coco", output=out)
    assert len(_rows(out)) == 5 and _leftovers(coco) == []
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------------
# the script, and the recipes' readers on its output
# ----------------------------------------------------------------------------------------------


def test_script_as_a_subprocess(coco: Path) -> None:
    out = coco / "data" / "coco_train.jsonl"
    cmd = [sys.executable, str(SCRIPT), "coco", "--karpathy", str(coco / "ann" / "coco_karpathy_train.json"),
           "--image-root", str(coco / "coco"), "--output", str(out), "--check-images", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "coco: wrote 3 rows (3 captions, 2 images)" in proc.stdout
    assert f"skipped 2 missing_image (1 distinct files), e.g. {coco / 'coco' / K_MISSING}" in proc.stdout
    assert "skipped 1 empty_caption" in proc.stdout and str(report_path(out)) in proc.stdout
    assert len(_rows(out)) == 3 and json.loads(report_path(out).read_text())["rows"] == 3


def test_script_exit_codes(coco: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = _load_script()
    bad = _json(coco / "ann" / "coco_karpathy_train.json", [{"image": K1, "caption": "x"}] * 3 + [{"image": K2}])
    assert script.main(["coco", "--karpathy", str(bad), "--output", str(coco / "o.jsonl"), "--no-progress"]) == 2
    assert "coco_karpathy_train.json: item 3 has no 'caption'" in capsys.readouterr().err
    # a wrong --image-root: nothing is left, the summary says why, the exit status says so
    status = script.main(["coco", "--karpathy", str(coco / "ann" / "coco_karpathy_val.json"), "--image-root",
                          str(coco / "nowhere"), "--check-images", "--output", str(coco / "o.jsonl"), "--no-progress"])
    captured = capsys.readouterr()
    assert status == 1 and "is --image-root right" in captured.out and "no row was written" in captured.err
    with pytest.raises(SystemExit):
        script.parse_args(["coco", "--output", "o.jsonl"])  # no input
    assert "--karpathy and/or --annotations" in capsys.readouterr().err


def test_readers_open_the_output(coco: Path) -> None:
    """`--train-data X.jsonl` works as written: records resolve to the images, captions are
    intact (cleaning is the collator's job), captions of one image share its image_id, and the
    dataset decodes the images."""
    out = coco / "data" / "coco_train.jsonl"
    prepare_coco(karpathy=coco / "ann" / "coco_karpathy_train.json", image_root=coco / "coco", output=out,
                 check_images=True)
    records = list(open_caption_source(str(out)))
    assert [r.caption for r in records] == ["A red square on a table.", "a red block", "a green square"]
    assert [r.image_id for r in records] == ["coco_1", "coco_1", "coco_2"]
    assert all(Path(r.image).is_file() for r in records)
    ds = open_caption_dataset(str(out), vision=VisionConfig(image_size=16), train=False)
    sample = ds[0]
    assert isinstance(sample, Sample) and tuple(sample.pixel_values.shape) == (3, 16, 16)
    assert sample.caption == "a red square on a table"  # BLIP-2's cleaning, in the pipeline


# ----------------------------------------------------------------------------------------------
# VQAv2: the official questions + annotations files
# ----------------------------------------------------------------------------------------------

def _vqav2(root: Path) -> tuple[Path, Path, Path]:
    """Tiny files in the official layout: 3 images (one missing on disk), 5 questions, one of
    them without an annotation; answers as annotators give them (10 per question)."""
    images = root / "train2014"
    for image_id in (9, 25):
        _png(images / f"COCO_train2014_{image_id:012d}.jpg")
    questions = [{"image_id": 9, "question": "What color is the bus?", "question_id": 9000},
                 {"image_id": 9, "question": "Is it raining?", "question_id": 9001},
                 {"image_id": 25, "question": "How many giraffes are there?", "question_id": 25000},
                 {"image_id": 30, "question": "What is on the table?", "question_id": 30000},
                 {"image_id": 25, "question": "Is this a zoo?", "question_id": 25001}]

    def ann(qid, image_id, answers, qtype, atype):
        return {"question_id": qid, "image_id": image_id, "question_type": qtype, "answer_type": atype,
                "multiple_choice_answer": answers[0],
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}

    annotations = [ann(9000, 9, ["red"] * 7 + ["orange"] * 2 + ["red and white"], "what color is the", "other"),
                   ann(9001, 9, ["no"] * 9 + ["yes"], "is it", "yes/no"),
                   ann(25000, 25, ["2"] * 6 + ["two"] * 3 + ["3"], "how many", "number"),
                   ann(30000, 30, ["food"] * 10, "what is on the", "other")]
    q = _json(root / "v2_OpenEnded_mscoco_train2014_questions.json",
              {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
               "data_subtype": "train2014", "questions": questions})
    a = _json(root / "v2_mscoco_train2014_annotations.json",
              {"info": {}, "license": {}, "data_subtype": "train2014", "annotations": annotations})
    return q, a, images


def test_vqav2_joins_questions_and_annotations(tmp_path: Path) -> None:
    from qformer.data.prepare import prepare_vqav2
    from qformer.eval.tasks import load_vqa_questions

    q, a, images = _vqav2(tmp_path / "vqa")
    out = tmp_path / "out" / "vqav2_train.jsonl"
    report = prepare_vqav2(questions=q, annotations=a, output=out, image_root=images, check_images=True)
    rows = _rows(out)
    assert [r["question_id"] for r in rows] == [9000, 9001, 25000]
    first = rows[0]
    assert first["image"] == str(images / "COCO_train2014_000000000009.jpg") and Path(first["image"]).is_file()
    assert first["question"] == "What color is the bus?" and len(first["answers"]) == 10
    assert first["answers"][:7] == ["red"] * 7 and first["answers"][-1] == "red and white"
    assert (first["question_type"], first["answer_type"], first["image_id"]) == ("what color is the", "other", 9)
    assert report.rows == 3 and report.captions == 30 and report.images == 2
    assert report.skipped == {"missing_image": 1, "no_annotation": 1} and report.missing_files == 1
    assert json.loads(report_path(out).read_text())["skipped"] == report.skipped
    # the readers take it as it is: VQA evaluation and the instruction recipe's weighted VQA rows
    questions = load_vqa_questions(out)
    assert [x.answer_type for x in questions] == ["other", "yes/no", "number"] and len(questions[2].answers) == 10
    from qformer.data import open_instruction_mixture

    mix = open_instruction_mixture([str(out)], vqa_template="Question: {} Answer:", weighted_answers=True)
    recs = sorted((mix.record(i) for i in range(len(mix))), key=lambda r: r.key)
    assert {r.prompt for r in recs} == {f"Question: {x['question']} Answer:" for x in rows}
    assert all(len(r.answers) == 10 for r in recs)
    # without --check-images (and without a root) every annotated question is kept, bare file names
    out2 = tmp_path / "out" / "all.jsonl"
    report = prepare_vqav2(questions=q, annotations=a, output=out2, limit=2)
    assert [r["image"] for r in _rows(out2)] == ["COCO_train2014_000000000009.jpg"] * 2 and report.stopped_at_limit


def test_vqav2_layout_errors_name_the_file(tmp_path: Path) -> None:
    from qformer.data.prepare import prepare_vqav2

    q, a, images = _vqav2(tmp_path / "vqa")
    out = tmp_path / "o.jsonl"
    with pytest.raises(PrepareError, match=f"{a.name}.*has no 'annotations' list"):
        prepare_vqav2(questions=q, annotations=_json(a, {"questions": []}), output=out)
    q2, a2, _ = _vqav2(tmp_path / "v2")
    with pytest.raises(PrepareError, match=f"{q.name}: expected VQAv2's questions layout"):
        prepare_vqav2(questions=_json(q, [1, 2]), annotations=a2, output=out)
    data = json.loads(q2.read_text())
    del data["questions"][1]["question"]
    with pytest.raises(PrepareError, match=r"q3.json: questions\[1\] has no 'question'"):
        prepare_vqav2(questions=_json(tmp_path / "q3.json", data), annotations=a2, output=out)
    data = json.loads(a2.read_text())
    data["annotations"][0]["answers"] = "red"
    with pytest.raises(PrepareError, match=r"a3.json: annotations\[0\] has a str 'answers'"):
        prepare_vqav2(questions=q2, annotations=_json(tmp_path / "a3.json", data), output=out)
    data = json.loads(q2.read_text())
    data["questions"][0]["image_id"] = 25  # the annotation says 9: files of different splits
    with pytest.raises(PrepareError, match="question_id 9000 is about image 25"):
        prepare_vqav2(questions=_json(tmp_path / "q4.json", data), annotations=a2, output=out)
    data = json.loads(q2.read_text())
    del data["data_subtype"]
    b = json.loads(a2.read_text())
    del b["data_subtype"]
    with pytest.raises(PrepareError, match="no 'data_subtype'"):
        prepare_vqav2(questions=_json(tmp_path / "q5.json", data), annotations=_json(tmp_path / "a5.json", b), output=out)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PrepareError, match="bad.json: not valid JSON"):
        prepare_vqav2(questions=tmp_path / "bad.json", annotations=a2, output=out)
    assert not out.exists()


def test_vqav2_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    q, a, images = _vqav2(tmp_path / "vqa")
    script = _load_script()
    out = tmp_path / "v.jsonl"
    assert script.main(["vqav2", "--questions", str(q), "--annotations", str(a), "--image-root", str(images),
                        "--output", str(out), "--no-progress"]) == 0
    assert "vqav2: wrote 4 rows (40 answers, 3 images)" in capsys.readouterr().out
    assert script.main(["vqav2", "--questions", str(tmp_path / "none.json"), "--annotations", str(a),
                        "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none.json: no such file" in err[0]
