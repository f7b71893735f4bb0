"""Fast tests of the toy world (qformer.toy.world) and its cached backbones (qformer.toy.backbones).

Backbone pretraining runs with ``ToyPretrainBudget.tiny()`` (seconds); the real budget is
exercised by running ``ensure_toy_backbones()`` by hand.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from qformer.toy.world import (
    COLOURS,
    INVERSE,
    SHAPES,
    SIZES,
    ToyWorld,
    caption_vocabulary,
    parse_caption,
    score_caption,
)

N = 60  # samples per check: enough to hit every template, cheap to render


@pytest.fixture(scope="module")
def world() -> ToyWorld:
    return ToyWorld(seed=0)


# ---------------------------------------------------------------------------- the world


def test_samples_are_deterministic(world: ToyWorld) -> None:
    other = ToyWorld(seed=0)
    for split in ("train", "test"):
        for i in (0, 7, 123):
            a, b = world.sample(split, i), other.sample(split, i)
            assert a.captions == b.captions and a.attributes == b.attributes
            assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    # Order of access does not matter (samples are pure functions of seed, split, index).
    assert world.sample("train", 5).captions == ToyWorld(seed=0).sample("train", 5).captions
    # Another seed is another world.
    assert [world.sample("train", i).caption for i in range(5)] != [
        ToyWorld(seed=1).sample("train", i).caption for i in range(5)
    ]


def test_image_format(world: ToyWorld) -> None:
    s = world.sample("val", 3)
    assert s.image.mode == "RGB" and s.image.size == (64, 64)
    assert s.caption == s.captions[0] and len(s.captions) == world.num_captions
    assert ToyWorld(image_size=96).sample("val", 3).image.size == (96, 96)


def test_split_sizes_and_bounds(world: ToyWorld) -> None:
    assert world.split_size("train") >= 10_000
    assert world.split_size("val") >= 1_000 and world.split_size("test") >= 1_000
    assert len(world.dataset("test")) == world.split_size("test")
    with pytest.raises(IndexError):
        world.sample("test", world.split_size("test"))
    with pytest.raises(ValueError):
        world.split_size("dev")


def test_splits_are_disjoint(world: ToyWorld) -> None:
    keys = {split: [world.scene(split, i).key for i in range(400)] for split in ("train", "val", "test")}
    assert not set(keys["train"]) & set(keys["test"])
    assert not set(keys["train"]) & set(keys["val"])
    assert not set(keys["val"]) & set(keys["test"])
    for split, ks in keys.items():  # each split only holds scene keys that hash to it
        assert all(world.split_of_key(k) == split for k in ks)
    # Without scene hold-out, splits still differ (different seeds per split).
    loose = ToyWorld(seed=0, holdout="none")
    assert [loose.scene("train", i).key for i in range(20)] != [loose.scene("test", i).key for i in range(20)]


def test_space_is_large(world: ToyWorld) -> None:
    space = world.space_size()
    assert space["object_types"] == len(SHAPES) * len(COLOURS) * len(SIZES) >= 96
    assert space["scenes_2"] > 20_000 and space["scenes_3"] > 1_000_000
    # No two held-out samples share a caption-level scene key: each held-out caption fits
    # exactly one held-out image, so retrieval R@1 can reach 100 %.
    keys = [world.scene("test", i).key for i in range(500)]
    assert len(set(keys)) == len(keys)
    # Without that guarantee, keys repeat (this is what unique_eval_scenes prevents).
    loose = ToyWorld(seed=0, unique_eval_scenes=False)
    assert len({loose.scene("test", i).key for i in range(500)}) < 500


def test_single_object_scenes_state_their_location() -> None:
    w = ToyWorld(seed=3, object_counts=(1,))
    vocab = set(caption_vocabulary())
    for i in range(20):
        s = w.sample("train", i)
        assert len(s.attributes["objects"]) == 1 and not s.attributes["relations"]
        for cap in s.captions:
            assert len(parse_caption(cap)) == 1 and set(cap.split()) <= vocab
            assert any(word in cap.split() for word in ("top", "bottom", "left", "right", "center"))


def test_captions_state_objects_attributes_and_relations(world: ToyWorld) -> None:
    vocab = set(caption_vocabulary())
    for i in range(N):
        s = world.sample("train", i)
        objs = s.attributes["objects"]
        truth = sorted(f"{o['size']} {o['colour']} {o['shape']}" for o in objs)
        for cap in s.captions:
            assert set(cap.replace(",", " , ").split()) <= vocab, cap
            # Every object named once with all three attributes; nothing else named.
            assert sorted(m.name for m in parse_caption(cap)) == truth, (cap, truth)
            assert score_caption(cap, s.attributes)["exact"] == 1.0
        # Relations are true in the image: same row/column, on the stated side.
        for rel in s.attributes["relations"]:
            a, b, r = objs[rel["subject"]], objs[rel["anchor"]], rel["relation"]
            if r in ("left", "right"):
                assert a["row"] == b["row"] and (a["col"] < b["col"]) == (r == "left")
                assert (a["center"][0] < b["center"][0]) == (r == "left")
            else:
                assert a["col"] == b["col"] and (a["row"] < b["row"]) == (r == "above")
                assert (a["center"][1] < b["center"][1]) == (r == "above")
        assert len(objs) in world.object_counts
        assert len({(o["row"], o["col"]) for o in objs}) == len(objs)  # one object per cell
    assert INVERSE["left"] == "right"


def test_image_shows_objects_in_their_colours(world: ToyWorld) -> None:
    for i in range(10):
        scene = world.scene("train", i)
        img = np.asarray(world.render(scene)).astype(int)
        mask = world.render_mask(scene)
        for k, o in enumerate(scene.objects):
            m = mask == k + 1
            assert m.sum() > 10
            # Interior pixels (mask eroded by one pixel): free of anti-aliased edges.
            core = m.copy()
            core[1:-1, 1:-1] &= m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
            core[[0, -1], :] = core[:, [0, -1]] = False
            if core.sum() >= 3:  # thin small rings have no interior
                assert np.abs(np.median(img[core], 0) - np.asarray(o.rgb)).max() < 25


def test_score_caption_penalises_wrong_attributes(world: ToyWorld) -> None:
    s = world.sample("test", 0)
    o = s.attributes["objects"][0]
    wrong_colour = next(c for c in COLOURS if c != o["colour"])
    bad = f"a {o['size']} {wrong_colour} {o['shape']}"
    scores = score_caption(bad, s.attributes)
    assert scores["recall"] == 0.0 and scores["exact"] == 0.0 and scores["shape_recall"] > 0


def test_export_is_a_loadable_imagefolder(world: ToyWorld, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    out = world.export("test", 12, tmp_path / "toy_export")
    lines = [json.loads(l) for l in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and all((out / l["file_name"]).is_file() for l in lines)
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert len(ds) == 12
    want = {world.sample("test", i).caption for i in range(12)}
    assert set(ds["text"]) == want
    row = ds[0]
    assert row["image"].size == (64, 64)
    attrs = json.loads(row["attributes"])
    assert score_caption(row["text"], attrs)["exact"] == 1.0
    with pytest.raises(FileExistsError):
        world.export("test", 2, out)


# ---------------------------------------------------------------------------- backbones


@pytest.fixture(scope="module")
def tiny_backbones(tmp_path_factory: pytest.TempPathFactory):
    from qformer.toy.backbones import ToyPretrainBudget, ensure_toy_backbones

    root = tmp_path_factory.mktemp("toy_cache") / "tiny"
    return ensure_toy_backbones(root, seed=0, budget=ToyPretrainBudget.tiny(), progress=False)


def test_cache_layout_loads_back(tiny_backbones) -> None:
    import timm
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    b = tiny_backbones
    assert not [p for p in b.root.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    cfg = json.loads((b.vision_dir / "config.json").read_text())
    tower = timm.create_model(cfg["timm_name"], pretrained=False, **cfg["timm_kwargs"])
    tower.load_state_dict(load_file(b.vision_dir / "model.safetensors"))
    tower.eval()
    x = torch.randn(2, 3, cfg["image_size"], cfg["image_size"])
    with torch.no_grad():
        feats = tower.forward_features(x)
        assert feats.shape == (2, cfg["num_tokens"], cfg["width"])
        assert torch.allclose(feats, b.load_vision_tower().forward_features(x))
    vc = b.vision_config()
    assert vc["backend"] == "timm" and Path(vc["pretrained"]).is_file() and len(vc["mean"]) == 3

    lm = AutoModelForCausalLM.from_pretrained(b.lm_dir)
    tok = AutoTokenizer.from_pretrained(b.lm_dir)
    ids = tok(["a big red circle\n"], return_tensors="pt")
    assert ids.input_ids[0, 0].item() == tok.bos_token_id  # OPT-style BOS prepended
    with torch.no_grad():
        out = lm(**ids)
    assert out.logits.shape == (1, ids.input_ids.shape[1], len(tok))
    assert lm.config.model_type == "opt"
    summary = b.summary
    assert {"vision", "lm", "total_s"} <= set(summary)


def test_tokenizers_cover_world_captions(tiny_backbones, world: ToyWorld) -> None:
    from transformers import AutoTokenizer

    lm_tok = AutoTokenizer.from_pretrained(tiny_backbones.lm_dir)
    bert = AutoTokenizer.from_pretrained(tiny_backbones.bert_tokenizer_dir)
    assert bert.pad_token_id == 0 and bert.bos_token == "[DEC]" and bert.unk_token_id is not None
    newline = lm_tok.encode("\n", add_special_tokens=False)
    assert len(newline) == 1
    caps = [c for i in range(N) for c in world.sample("val", i).captions]
    for cap in caps:
        ids = lm_tok.encode(cap + "\n", add_special_tokens=False)
        assert lm_tok.unk_token_id not in ids
        assert lm_tok.decode(ids) == cap + "\n"
        assert len(ids) == len(cap.replace(",", " ,").split()) + 1  # one token per word
        bids = bert(cap).input_ids
        assert bert.unk_token_id not in bids
        assert bert.decode(bids, skip_special_tokens=True).replace(" ,", ",") == cap
    # Words outside the world become characters, not [UNK].
    assert bert.unk_token_id not in bert("a zebra on the moon").input_ids


def test_second_call_reuses_cache(tiny_backbones, monkeypatch: pytest.MonkeyPatch) -> None:
    import qformer.toy.backbones as bb

    def boom(*args, **kwargs):
        raise AssertionError("retrained although a cache exists")

    monkeypatch.setattr(bb, "_train_into", boom)
    again = bb.ensure_toy_backbones(tiny_backbones.root, seed=0, budget=bb.ToyPretrainBudget.tiny(), progress=False)
    assert again.root == tiny_backbones.root and again.manifest["key"] == tiny_backbones.manifest["key"]
    with pytest.raises(ValueError, match="another spec"):  # a different spec never reuses it silently
        bb.ensure_toy_backbones(tiny_backbones.root, seed=1, budget=bb.ToyPretrainBudget.tiny(), progress=False)


def test_interrupted_training_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import qformer.toy.backbones as bb
    import qformer.toy.lm_pretraining as lm_pretraining

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lm_pretraining, "pretrain_lm", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bb.ensure_toy_backbones(tmp_path / "cache", budget=bb.ToyPretrainBudget.tiny(), progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the cache nor its temp dir


def test_stale_temp_dirs_of_dead_runs_are_removed(tiny_backbones) -> None:
    import subprocess
    import sys

    import qformer.toy.backbones as bb

    root = tiny_backbones.root
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = root.parent / f".{root.name}.tmp-{int(dead.stdout)}-abc"  # as left by a SIGKILLed run
    stale_old = root.parent / f".{root.name}.old-{int(dead.stdout)}"
    live = root.parent / f".{root.name}.tmp-{os.getpid()}-abc"  # a run still in progress
    for d in (stale, stale_old, live):
        d.mkdir()
    # Any later call cleans up, even one that finds the cache complete and trains nothing.
    bb.ensure_toy_backbones(root, seed=0, budget=bb.ToyPretrainBudget.tiny(), progress=False)
    assert not stale.exists() and not stale_old.exists() and live.exists()
    live.rmdir()


def test_tiny_pretraining_is_deterministic(tiny_backbones, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    import qformer.toy.backbones as bb

    again = bb.ensure_toy_backbones(tmp_path / "again", seed=0, budget=bb.ToyPretrainBudget.tiny(), progress=False)
    for sub, name in (("vision", "model.safetensors"), ("lm", "model.safetensors")):
        a = load_file(tiny_backbones.root / sub / name)
        b = load_file(again.root / sub / name)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import qformer.toy.backbones as bb

    monkeypatch.setenv("QFORMER_CACHE", str(tmp_path))
    assert bb.default_cache_root() == tmp_path
    monkeypatch.delenv("QFORMER_CACHE")
    assert bb.default_cache_root() == Path(os.path.expanduser("~")) / ".cache" / "qformer"
