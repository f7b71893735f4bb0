"""The noisy toy split (qformer.toy.noise): exactly the asked fraction corrupted, half swapped
with another scene's caption, half with one fact wrong; seeded; served as toy:// resources."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from qformer.errors import ConfigError
from qformer.toy import ToyWorld
from qformer.toy.language import parse_caption, score_caption
from qformer.toy.noise import alter_scene, noisy_rows
from qformer.toy.plugin import resolve

WORLD = ToyWorld()


def test_fraction_kinds_and_determinism() -> None:
    rows = noisy_rows(WORLD, "train", 200, fraction=0.4, seed=3)
    assert Counter(r["noise"] for r in rows) == {"clean": 120, "swapped": 40, "altered": 40}
    assert rows == noisy_rows(WORLD, "train", 200, fraction=0.4, seed=3)
    other = noisy_rows(WORLD, "train", 200, fraction=0.4, seed=4)
    assert [r["noise"] for r in other] != [r["noise"] for r in rows]
    assert Counter(r["noise"] for r in noisy_rows(WORLD, "train", 200, fraction=0.0)) == {"clean": 200}
    for i, r in enumerate(rows):
        sample = WORLD.sample("train", i)
        assert r["clean_text"] == sample.caption and r["file_name"] == f"images/{i:06d}.png"
        score = score_caption(r["text"], sample.attributes)
        if r["noise"] == "clean":
            assert r["text"] == r["clean_text"] and score["exact"] == 1.0
        else:
            assert r["text"] != r["clean_text"]


def test_altered_changes_exactly_one_fact() -> None:
    rng = np.random.default_rng(0)
    for i in range(60):
        scene = WORLD.scene("train", i)
        out = alter_scene(scene, rng)
        assert out.key != scene.key
        changed = sum(a != b for o, p in zip(scene.objects, out.objects) for a, b in
                      ((o.shape, p.shape), (o.colour, p.colour), (o.size, p.size)))
        flipped = sum(r != s for r, s in zip(scene.relations, out.relations))
        assert changed + flipped == 1
        assert len(parse_caption(WORLD.captions(out, 1)[0])) == len(scene.objects)  # still the world's language


def test_resources_beside_the_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QFORMER_CACHE", str(tmp_path))
    options = {"sizes": {"train": 20}, "noise": 0.5, "noise_seed": 1, "clean_fraction": 0.25}
    out = resolve({"noisy/train.jsonl", "clean/train.jsonl", "data/train.jsonl"}, options, progress=False)
    folder = Path(out["data/train.jsonl"]).parent
    noisy = [json.loads(x) for x in Path(out["noisy/train.jsonl"]).read_text().splitlines()]
    assert Path(out["noisy/train.jsonl"]).parent == folder and len(noisy) == 20
    assert Counter(r["noise"] for r in noisy) == {"clean": 10, "swapped": 5, "altered": 5}
    assert all((folder / r["file_name"]).is_file() for r in noisy)
    clean = Path(out["clean/train.jsonl"]).read_text().splitlines()
    assert clean == Path(out["data/train.jsonl"]).read_text().splitlines()[:5]


@pytest.mark.parametrize("options, message", [
    ({"noise": 1.5}, r"plugins.toy.noise must be a fraction from 0 to 1"),
    ({"noise_seed": "a"}, r"plugins.toy.noise_seed must be an integer"),
    ({"clean_fraction": 0}, r"plugins.toy.clean_fraction must be a fraction in \(0, 1\]"),
])
def test_option_errors(options: dict, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QFORMER_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match=message):
        resolve({"noisy/train.jsonl"}, options, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_the_experiments_filter_scores(tmp_path: Path) -> None:
    """recipes/noisy_toy.py: a corrupted web caption counts as caught when CapFilt dropped it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("noisy_toy", Path(__file__).parents[1] / "recipes" / "noisy_toy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kinds = ["clean", "swapped", "altered", "clean", "altered"]
    noisy = tmp_path / "noisy.jsonl"
    noisy.write_text("".join(json.dumps({"file_name": f"images/{i}.png", "text": "t", "noise": k}) + "\n"
                             for i, k in enumerate(kinds)))
    kept_web = [0, 2, 4]  # clean 0 kept, altered 2 and 4 missed; swapped 1 caught, clean 3 wrongly dropped
    out = tmp_path / "capfilt.jsonl"
    out.write_text("".join(json.dumps({"image": str(tmp_path / f"images/{i}.png"), "caption": "c", "source": s}) + "\n"
                           for i, s in [*((i, "web") for i in kept_web), (3, "synthetic")]))
    q = mod.filter_quality(str(noisy), out)
    assert (q["corrupted"], q["flagged"]) == (3, 2)
    assert q["precision"] == 50.0 and q["recall"] == pytest.approx(100 / 3)
    assert q["recall_swapped"] == 100.0 and q["recall_altered"] == 0.0
