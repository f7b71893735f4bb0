"""data_report.json counts each record once (unique) and each read of it (events, per epoch).

The issue this answers: a 30,000-record dataset reported 35,200 usable samples and 57 skips for 6
bad files, because every count was an event summed over epochs. Here 12 records, 3 of them bad
files, read for 3 epochs must report 9 usable / 3 skipped records, and 27 / 9 events; with
DataLoader workers, streaming, ranks, and a resume in between.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from qformer.config import VisionConfig
from qformer.data import (
    DATA_STATS_KEY,
    CaptionLoader,
    DataReport,
    LoaderReport,
    RecordStatus,
    collate_samples,
    open_caption_dataset,
)

VISION = VisionConfig(image_size=16)
EPOCHS = 3
UNIQUE = {"usable_samples": 9, "skipped_total": 3, "skipped": {"corrupt_image": 3},
          "converted": {"total": 1, "by_mode": {"CMYK": 1}}}
EVENTS = {"usable_samples": 27, "skipped_total": 9, "skipped": {"corrupt_image": 9},
          "converted": {"total": 3, "by_mode": {"CMYK": 3}}}


def plain_collate(items):
    c = collate_samples(items)
    return {**c.image_inputs(), "image_ids": c.image_ids, DATA_STATS_KEY: c.report} if len(c) else {DATA_STATS_KEY: c.report}


def twelve_records(tmp_path: Path) -> Path:
    """12 records, one image file each: 8 RGB, 1 CMYK (converted, usable), 3 corrupt files."""
    d = tmp_path / "data"
    d.mkdir()
    rows = []
    for i in range(12):
        name = f"{i}.png"
        if i in (2, 5, 11):
            (d / name).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        elif i == 7:
            name = f"{i}.tiff"
            Image.new("CMYK", (20, 20), (0, 255, 0, 0)).save(d / name)
        else:
            Image.new("RGB", (20, 20), (10 * i, 100, 200)).save(d / name)
        rows.append(json.dumps({"image": name, "text": f"image {i}"}) + "\n")
    (d / "twelve.jsonl").write_text("".join(rows))
    return d / "twelve.jsonl"


def run_epochs(loader: CaptionLoader, epochs: range) -> None:
    for epoch in epochs:
        loader.set_epoch(epoch)
        for _ in loader:
            pass


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check(data: dict, *, basis: str) -> None:
    assert data["unique_basis"] == basis and data["epochs"] == EPOCHS
    assert data["records"] == data["records_seen"] == 12 and data["complete"] is True
    assert {k: data[k] for k in UNIQUE} == UNIQUE
    assert {k: data["events"][k] for k in EVENTS} == EVENTS
    assert len(data["examples"]["corrupt_image"]) == 3


@pytest.mark.parametrize("num_workers", [0, 2])
def test_map_style_unique_counts_over_epochs(tmp_path, num_workers):
    ds = open_caption_dataset(str(twelve_records(tmp_path)), vision=VISION, train=True)
    loader = CaptionLoader(ds, plain_collate, batch_size=4, shuffle=True, num_workers=num_workers,
                           persistent_workers=num_workers > 0)
    run_epochs(loader, range(EPOCHS))
    out = loader.write_report(tmp_path / "run")
    check(json.loads(out.read_text()), basis="per_record")
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask()  # qformer.io: the umask's permissions, not 0600
    assert loader.status.counts() == {"usable": 8, "converted:CMYK": 1, "corrupt_image": 3}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_streaming_first_pass_is_the_unique_count(tmp_path, num_workers):
    ds = open_caption_dataset(str(twelve_records(tmp_path)), vision=VISION, train=True, streaming=True)
    loader = CaptionLoader(ds, plain_collate, batch_size=4, num_workers=num_workers)
    run_epochs(loader, range(EPOCHS))
    check(json.loads(loader.write_report(tmp_path / "run").read_text()), basis="first_epoch")


def test_partial_epoch_says_what_was_read(tmp_path):
    """A run that stops mid-epoch: the unique counts cover the records read, and say so."""
    path = twelve_records(tmp_path)
    loader = CaptionLoader(open_caption_dataset(str(path), vision=VISION, train=False), plain_collate, batch_size=4,
                           shuffle=False)
    next(iter(loader))  # indices 0-3: record 2 is bad
    data = loader.merged_report().to_dict()
    assert (data["records"], data["records_seen"], data["complete"]) == (12, 4, False)
    assert data["usable_samples"] == 3 and data["skipped"] == {"corrupt_image": 1} and data["epochs"] == 0
    stream = CaptionLoader(open_caption_dataset(str(path), vision=VISION, train=False, streaming=True), plain_collate,
                           batch_size=4)
    next(iter(stream))
    first = stream.merged_report()
    assert first.unique_basis == "first_epoch" and not first.complete and first.records == first.records_seen
    assert "records in the first pass" in first.summary()


def test_record_status_merge_and_state_round_trip():
    a, b = RecordStatus(6), RecordStatus(6)
    a.update({0: "usable", 1: "corrupt_image", 2: "converted:L"})
    b.update({1: "usable", 3: "missing_image", 5: "converted:L"})  # record 1 was fixed: its newest status wins
    merged = RecordStatus(6).merge(a).merge(b)
    assert merged.seen == 5 and merged.counts() == {"usable": 2, "converted:L": 2, "missing_image": 1}
    again = RecordStatus.from_state_dict(json.loads(json.dumps(merged.state_dict())))
    assert again.counts() == merged.counts() and torch.equal(torch.from_numpy(again.codes != 0),
                                                             torch.from_numpy(merged.codes != 0))
    report = merged.to_report(dataset="d")
    assert report.samples == 4 and report.converted_by_mode() == {"L": 2} and report.skipped_by_reason() == {
        "missing_image": 1}
    with pytest.raises(ValueError, match="6 records into 5"):
        RecordStatus(5).merge(merged)
    # A batch's delta carries statuses; they are transport, not counts.
    delta = DataReport().add("samples")
    delta.records[3] = "usable"
    assert delta and DataReport().merge(delta).records == {3: "usable"} and "records" not in delta.to_dict()


def test_loader_report_fields():
    unique = DataReport().add("samples", n=9).add("corrupt_image", "a.png", n=3)
    events = DataReport().add("samples", n=27).add("corrupt_image", "b.png", n=9).add("batches", n=9)
    data = LoaderReport(dataset="d", unique=unique, events=events, unique_basis="per_record", records=12,
                        records_seen=12, complete=True, world_size=1, epochs=3).to_dict()
    assert list(data) == ["dataset", "unique_basis", "records", "records_seen", "complete", "usable_samples",
                          "skipped_total", "skipped", "converted", "events", "examples", "world_size", "epochs"]
    assert data["usable_samples"] == 9 and data["events"]["usable_samples"] == 27
    assert data["events"]["counts"] == {"batches": 9, "corrupt_image": 9, "samples": 27}
    assert data["examples"] == {"corrupt_image": ["b.png", "a.png"]}


# ----------------------------------------------------------------------------------------------
# Two ranks (gloo), with a resume from one rank's checkpoint in between
# ----------------------------------------------------------------------------------------------


def _two_rank_worker(rank: int, store: str, path: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)

    def make() -> CaptionLoader:
        ds = open_caption_dataset(path, vision=VISION, train=True)
        return CaptionLoader(ds, plain_collate, batch_size=3, shuffle=True)  # rank/world from the group

    full = make()
    run_epochs(full, range(EPOCHS))
    full.write_report(f"{out}/full")
    # Stop after epoch 0; resume from rank 0's state only, as a checkpoint written by the main
    # process is; all_ranks=True puts every rank's counts in that state.
    part = make()
    run_epochs(part, range(1))
    state = part.state_dict(all_ranks=True)
    shared = [state]
    dist.broadcast_object_list(shared, src=0)
    resumed = make()
    resumed.load_state_dict(shared[0])
    run_epochs(resumed, range(1, EPOCHS))
    resumed.write_report(f"{out}/resumed")
    torch.save({"seen": full.status.seen}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_unique_counts_and_resume(tmp_path):
    import torch.multiprocessing as mp

    path = twelve_records(tmp_path)
    mp.start_processes(_two_rank_worker, args=(str(tmp_path / "store"), str(path), str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")
    full = json.loads((tmp_path / "full" / "data_report.json").read_text())
    assert full["world_size"] == 2 and full["epochs"] == EPOCHS
    assert full["records"] == full["records_seen"] == 12 and full["complete"]
    assert {k: full[k] for k in UNIQUE} == UNIQUE
    # Events: every read. Ranks trim their batches to the smaller one, so training received
    # fewer samples than were read; the trimmed ones are counted as such.
    ev = full["events"]
    assert ev["usable_samples"] + ev["counts"].get("rank_trimmed", 0) == 27
    assert ev["skipped"] == {"corrupt_image": 9} and ev["converted"] == EVENTS["converted"]
    # Both ranks read some records (over 3 shuffled epochs): a sum of per-rank counts would
    # count those twice; the merged count is of distinct records.
    seen = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["seen"] for r in range(2)]
    assert sum(seen) > 12, seen
    resumed = json.loads((tmp_path / "resumed" / "data_report.json").read_text())
    examples = resumed.pop("examples"), full.pop("examples")
    assert resumed == full
    assert sorted(examples[0]["corrupt_image"]) == sorted(examples[1]["corrupt_image"])
