"""CapFilt (qformer.capfilt, recipes/capfilt.py) on tiny random models: the counts of a dataset
with bad images, a caption file the stage-1 loader reads, filter decisions equal to a naive
per-pair computation, captions independent of the batch and of the number of ranks, resume
without redoing finished shards, BLIP-2's best 2 of 10 by ITC, in-memory images written out."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from recipe_fixtures import make_tiny_card

from qformer import Blip2
from qformer.adapters import load_adapter
from qformer.capfilt import CapFiltConfig, SeededNucleusSampler, keep_mask, run_capfilt, sample_captions
from qformer.data import CaptionLoader, Stage1Collator, open_caption_dataset, pre_caption
from qformer.errors import ConfigError
from qformer.tokenizer import load_qformer_tokenizer

REPO = Path(__file__).resolve().parents[1]
FAST = dict(shard_size=4, batch_size=3, max_new_tokens=6, min_new_tokens=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A saved model with an LLM and the stage-1 heads (captioner and filter at once) and a
    shapes folder of 10 images plus a corrupt image, a tiny image and an empty caption."""
    root = tmp_path_factory.mktemp("capfilt")
    card = load_adapter(make_tiny_card(root, train_size=10, eval_size=2))
    torch.manual_seed(0)
    model = Blip2(card.blip2_config(), tokenizer=load_qformer_tokenizer(card.tokenizer)).eval()
    model.save_pretrained(root / "model")
    return {"root": root, "model": model, "data": root / "train", "model_dir": root / "model"}


def shard_pairs(out: Path) -> list[dict]:
    return [p for f in sorted((out / "shards").glob("shard-*.json")) for p in json.loads(f.read_text())["pairs"]]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "capfilt.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- end to end
def test_end_to_end_counts_and_a_file_the_stage1_loader_reads(tiny, tmp_path):
    m = tiny["model"]
    res = run_capfilt(m, m, str(tiny["data"]), tmp_path, CapFiltConfig(num_captions=2, **FAST))
    assert res.finished and res.shards == 3 and res.processed == [0, 1, 2] and res.reused == []
    report = json.loads((tmp_path / "capfilt_report.json").read_text())
    assert report["images"] == {"total": 12, "usable": 10, "skipped": 2, "with_a_kept_pair": report["images"]["with_a_kept_pair"]}
    assert report["data"]["skipped"] == {"corrupt_image": 1, "tiny_image": 1, "empty_caption": 1}  # as training counts
    assert report["data"]["usable_samples"] == 10
    pairs = shard_pairs(tmp_path)
    web = [p for p in pairs if p["source"] == "web"]
    synthetic = [p for p in pairs if p["source"] == "synthetic"]
    assert len(web) == 10 and report["pairs"]["web"]["scored"] == 10
    assert len(synthetic) + report["pairs"]["duplicate_synthetic_dropped"] <= 20 and len(synthetic) >= 10
    kept = [p for p in pairs if p["kept"]]
    assert report["pairs"]["kept"] == len(kept) == len(rows(tmp_path))
    assert all(p["itm"] >= 0.5 for p in kept) and all(p["itm"] < 0.5 for p in pairs if not p["kept"])
    for source in ("web", "synthetic"):
        assert report["pairs"][source]["kept"] + report["pairs"][source]["dropped"] == report["pairs"][source]["scored"]
    assert (tmp_path / "capfilt_report.png").stat().st_size > 1000
    assert [r["caption"] for r in rows(tmp_path)] == [p["caption"] for p in kept]
    # the training recipes' loader reads the file as it is: every kept pair is a usable sample
    ds = open_caption_dataset(str(tmp_path / "capfilt.jsonl"), vision=m.config.vision, train=False)
    loader = CaptionLoader(ds, Stage1Collator(m.tokenizer), batch_size=4, shuffle=False)
    batches = list(loader)
    assert sum(b["input_ids"].shape[0] for b in batches) == len(kept)


def test_a_rule_is_needed_and_the_captioner_needs_an_llm(tiny, tmp_path):
    with pytest.raises(ConfigError, match="filter rule"):
        CapFiltConfig(itm_threshold=None, itc_top_n=0).check()
    stage1 = Blip2(dataclasses.replace(tiny["model"].config, llm=None), tokenizer=tiny["model"].tokenizer)
    with pytest.raises(ConfigError, match="no LLM"):
        run_capfilt(stage1, stage1, str(tiny["data"]), tmp_path, CapFiltConfig(**FAST))


# ---------------------------------------------------------------------------- the filter
def test_keep_mask_equals_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    itm, itc = torch.rand(40, generator=g), torch.rand(40, generator=g)
    groups = torch.randint(0, 7, (40,), generator=g)
    for cfg in (CapFiltConfig(itm_threshold=0.4), CapFiltConfig(itm_threshold=None, itc_top_n=2),
                CapFiltConfig(itm_threshold=0.6, itc_top_n=1, rule="all"),
                CapFiltConfig(itm_threshold=0.6, itc_top_n=1, rule="any")):
        want = []
        for p in range(40):
            ok_itm = cfg.itm_threshold is None or float(itm[p]) >= cfg.itm_threshold
            mates = sorted((float(itc[q]) for q in range(40) if groups[q] == groups[p]), reverse=True)
            ok_itc = cfg.itc_top_n <= 0 or float(itc[p]) >= mates[min(cfg.itc_top_n, len(mates)) - 1]
            if cfg.itm_threshold is not None and cfg.itc_top_n > 0:
                want.append((ok_itm and ok_itc) if cfg.rule == "all" else (ok_itm or ok_itc))
            else:
                want.append(ok_itm and ok_itc)
        assert keep_mask(itm, itc, groups, cfg).tolist() == want


def test_scores_and_decisions_equal_a_naive_per_pair_computation(tiny, tmp_path):
    m = tiny["model"]
    first = run_capfilt(m, m, str(tiny["data"]), tmp_path / "a", CapFiltConfig(num_captions=2, **FAST))
    assert first.finished
    pairs = shard_pairs(tmp_path / "a")
    naive_itm = [float(m.itm(p["image"], pre_caption(p["caption"]))[0]) for p in pairs]
    naive_itc = [float(m.similarity(p["image"], [pre_caption(p["caption"])])[0, 0]) for p in pairs]
    assert [p["itm"] for p in pairs] == pytest.approx(naive_itm, abs=1e-5)
    assert [p["itc"] for p in pairs] == pytest.approx(naive_itc, abs=1e-5)
    # a threshold between two naive scores, and the best 1 by ITC: the same captions (seeded), naive decisions
    s = sorted(naive_itm)
    threshold = (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
    cfg = CapFiltConfig(num_captions=2, itm_threshold=threshold, itc_top_n=1, rule="any", **FAST)
    run_capfilt(m, m, str(tiny["data"]), tmp_path / "b", cfg)
    second = shard_pairs(tmp_path / "b")
    assert [(p["image"], p["caption"]) for p in second] == [(p["image"], p["caption"]) for p in pairs]
    best = {}
    for p, c in zip(pairs, naive_itc):
        best[p["image"]] = max(best.get(p["image"], -2.0), c)
    want = [t >= threshold or c == best[p["image"]] for p, t, c in zip(pairs, naive_itm, naive_itc)]
    assert [p["kept"] for p in second] == want
    assert 0 < sum(want) < len(want)


def test_blip2_mode_keeps_the_best_two_of_ten_by_itc(tiny, tmp_path):
    m = tiny["model"]
    cfg = CapFiltConfig.blip2(**FAST)
    assert (cfg.num_captions, cfg.itm_threshold, cfg.itc_top_n) == (10, None, 2)
    run_capfilt(m, m, str(tiny["data"]), tmp_path, cfg)
    report = json.loads((tmp_path / "capfilt_report.json").read_text())
    assert report["pairs"]["synthetic"]["scored"] + report["pairs"]["duplicate_synthetic_dropped"] == 100
    pairs = shard_pairs(tmp_path)
    by_image: dict[str, list[dict]] = {}
    for p in pairs:
        by_image.setdefault(p["image"], []).append(p)
    assert len(by_image) == 10
    for image, cands in by_image.items():
        naive = [float(m.similarity(image, [pre_caption(p["caption"])])[0, 0]) for p in cands]
        order = sorted(range(len(cands)), key=lambda i: -naive[i])
        assert {i for i, p in enumerate(cands) if p["kept"]} == set(order[:2]), image
    assert len(rows(tmp_path)) == 20


# ---------------------------------------------------------------------------- seeded captions
def test_a_captions_draws_do_not_depend_on_its_batch(tiny):
    m = tiny["model"]
    px = m.vision.preprocess([str(p) for p in sorted((tiny["data"] / "images").glob("000*.png"))[:3]])
    cfg = CapFiltConfig(num_captions=3, max_new_tokens=8, min_new_tokens=2)
    together = sample_captions(m, px, [5, 6, 7], cfg)
    alone = sample_captions(m, px[1:2], [6], cfg)
    assert together[1] == alone[0] and len(set(together[1])) > 1  # three distinct draws, the same in any batch
    assert sample_captions(m, px[1:2], [6], CapFiltConfig(num_captions=3, max_new_tokens=8, min_new_tokens=2,
                                                          seed=1))[0] != alone[0]


def test_the_sampler_keeps_what_transformers_warpers_keep_and_draws_inside_it():
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 300, generator=g) * 3
    ids = torch.zeros(6, 1, dtype=torch.long)
    for top_k, top_p, temperature in ((50, 0.9, 1.0), (0, 0.9, 1.0), (5, 1.0, 1.0), (20, 0.5, 0.7)):
        want = scores.clone()
        for w in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k) if top_k else None, TopPLogitsWarper(top_p)):
            want = w(ids, want) if w is not None else want
        sampler = SeededNucleusSampler(range(6), top_p=top_p, top_k=top_k, temperature=temperature)
        probs, tokens = sampler.nucleus(scores)
        for b in range(6):
            kept = set(tokens[b][probs[b] > 0].tolist())
            assert kept == set(torch.isfinite(want[b]).nonzero().flatten().tolist())
            expect = want[b].softmax(dim=0)
            assert probs[b][probs[b] > 0].tolist() == pytest.approx(expect[tokens[b][probs[b] > 0]].tolist(), abs=1e-6)
    # draws: one-hot scores (greedy takes the drawn token), inside the nucleus, at its frequencies
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 400))
    out = SeededNucleusSampler(list(range(400)), top_p=0.7)(torch.zeros(400, 1, dtype=torch.long), scores)
    assert torch.isinf(out).sum(dim=1).eq(3).all()
    counts = torch.bincount(out.argmax(dim=1), minlength=4).tolist()
    assert counts[2] == counts[3] == 0  # 0.5 + 0.3 >= 0.7: the nucleus is the first two
    assert 0.5 < counts[0] / 400 < 0.75  # 0.5 / 0.8 = 0.625 renormalised


# ---------------------------------------------------------------------------- resume, ranks, recipe
def test_resume_skips_finished_shards(tiny, tmp_path):
    m = tiny["model"]
    cfg = CapFiltConfig(num_captions=1, **FAST)
    part = run_capfilt(m, m, str(tiny["data"]), tmp_path / "r", cfg, stop_after=1)
    assert part.processed == [0] and not part.finished and not (tmp_path / "r" / "capfilt.jsonl").exists()
    first = tmp_path / "r" / "shards" / "shard-00000.json"
    stamp = first.stat().st_mtime_ns
    (tmp_path / "r" / "shards" / ".shard-00001.json.x.tmp").write_text("half written by a killed run")
    rest = run_capfilt(m, m, str(tiny["data"]), tmp_path / "r", cfg)
    assert rest.reused == [0] and rest.processed == [1, 2] and rest.finished
    assert first.stat().st_mtime_ns == stamp and not list((tmp_path / "r" / "shards").glob(".*.tmp"))
    whole = run_capfilt(m, m, str(tiny["data"]), tmp_path / "w", cfg)
    assert whole.processed == [0, 1, 2]
    assert (tmp_path / "r" / "capfilt.jsonl").read_text() == (tmp_path / "w" / "capfilt.jsonl").read_text()
    with pytest.raises(ConfigError, match="other settings"):  # finished shards of another run are not mixed in
        run_capfilt(m, m, str(tiny["data"]), tmp_path / "r", CapFiltConfig(num_captions=2, **FAST))


def test_in_memory_images_are_written_beside_the_file(tiny, tmp_path):
    import webdataset as wds

    images = sorted((tiny["data"] / "images").glob("000*.png"))[:3]
    with wds.TarWriter(str(tmp_path / "web-000.tar")) as w:
        for i, path in enumerate(images):
            w.write({"__key__": f"s{i}", "png": path.read_bytes(), "txt": f"web caption {i}"})
        w.write({"__key__": "s9", "png": b"broken", "txt": "bad"})
    m = tiny["model"]
    res = run_capfilt(m, m, str(tmp_path / "web-000.tar"), tmp_path / "o", CapFiltConfig(num_captions=1, **FAST))
    assert res.finished
    report = json.loads((tmp_path / "o" / "capfilt_report.json").read_text())
    assert report["images"]["total"] == 4 and report["data"]["skipped"] == {"corrupt_image": 1}
    written = {p["image"] for p in shard_pairs(tmp_path / "o")}
    assert written == {f"images/{i:08d}.png" for i in range(3)}
    for i, path in enumerate(images):
        assert (tmp_path / "o" / "images" / f"{i:08d}.png").read_bytes() == path.read_bytes()
    ds = open_caption_dataset(str(tmp_path / "o" / "capfilt.jsonl"), vision=m.config.vision, train=False)
    assert len(ds) == len(rows(tmp_path / "o"))


def _env() -> dict[str, str]:
    return dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))


def run_recipe(*args: str, processes: int = 1) -> str:
    script = str(REPO / "recipes" / "capfilt.py")
    if processes == 1:
        cmd = [sys.executable, script, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout


@pytest.mark.slow
def test_two_ranks_write_what_one_process_writes(tiny, tmp_path):
    common = ["--captioner", str(tiny["model_dir"]), "--filter", str(tiny["model_dir"]), "--data", str(tiny["data"]),
              "--num-captions", "2", "--shard-size", "3", "--batch-size", "2", "--max-new-tokens", "6",
              "--num-workers", "0", "--no-progress"]
    one = run_recipe(*common, "--output-dir", str(tmp_path / "one"))
    two = run_recipe(*common, "--output-dir", str(tmp_path / "two"), processes=2)
    assert "1 process(es)" in one and "2 process(es)" in two
    a, b = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [(r["image"], r["caption"], r["source"]) for r in a] == [(r["image"], r["caption"], r["source"]) for r in b]
    assert [r["itm"] for r in a] == pytest.approx([r["itm"] for r in b], abs=1e-5)
    ra, rb = (json.loads((tmp_path / d / "capfilt_report.json").read_text()) for d in ("one", "two"))
    assert ra["images"] == rb["images"] and ra["data"]["skipped"] == rb["data"]["skipped"] and rb["world_size"] == 2
    written_by = {int(f.stem[-5:]): json.loads(f.read_text())["rank"] for f in (tmp_path / "two" / "shards").glob("shard-*.json")}
    assert written_by == {0: 0, 1: 1, 2: 0, 3: 1}  # each rank wrote its own shards


def test_help_documents_the_options():
    out = subprocess.run([sys.executable, str(REPO / "recipes" / "capfilt.py"), "--help"], capture_output=True,
                         text=True, env=_env(), cwd=REPO, timeout=120).stdout
    for flag in ("--captioner", "--filter", "--data", "--output-dir", "--mode", "--num-captions", "--top-p",
                 "--top-k", "--itm-threshold", "--itc-top-n", "--rule", "--shard-size", "--seed", "--stop-after"):
        assert flag in out, flag
    assert "accelerate launch" in out and "capfilt.jsonl" in out and "blip2" in out


def test_dataloader_workers_give_the_same_rows(tiny, tmp_path):
    """The recipe's default reads images in DataLoader workers: the same kept rows as in-process."""
    m = tiny["model"]
    run_capfilt(m, m, str(tiny["data"]), tmp_path / "a", CapFiltConfig(num_captions=2, **FAST))
    run_capfilt(m, m, str(tiny["data"]), tmp_path / "b", CapFiltConfig(num_captions=2, num_workers=2, **FAST))
    assert rows(tmp_path / "a") == rows(tmp_path / "b")
