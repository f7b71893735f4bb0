"""The toy plugin (qformer.toy.plugin): toy:// resources for adapter cards and caption scores
for toy data. Backbones are pretrained with the tiny budget into a temporary QFORMER_CACHE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qformer.errors import ConfigError
from qformer.plugins import PluginRegistry
from qformer.toy import ToyWorld, score_caption
from qformer.toy.plugin import (
    BACKBONE_RESOURCES,
    DEFAULT_SIZES,
    ToyCaptionScorer,
    ToyOptions,
    data_root,
    register,
    resolve,
    resource_names,
)

SIZES = {"train": 12, "val": 6}
TINY = {"budget": "tiny", "sizes": SIZES}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("qformer_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QFORMER_CACHE", str(root))
        yield root


def toy_dirs(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "toy").iterdir()) if (cache / "toy").is_dir() else []


def test_register_adds_the_scheme_and_the_scorer() -> None:
    reg = PluginRegistry()
    register(reg)
    assert reg.schemes == {"toy": resolve}
    assert [s.name for s in reg.caption_scorers] == ["toy"]


def test_only_what_is_asked_is_prepared(cache: Path) -> None:
    out = resolve({"data/val"}, TINY, progress=False)
    assert set(out) == {"data/val"}
    assert toy_dirs(cache) == [data_root(ToyWorld()).name]  # data needs no backbones
    out = resolve({"vision_config"}, TINY, progress=False)
    assert set(out) == {"vision_config"} and Path(out["vision_config"]["pretrained"]).is_file()
    assert len(toy_dirs(cache)) == 2  # the backbones, and no further export
    assert [p.name for p in data_root(ToyWorld()).iterdir()] == ["val-6"]


def test_every_resource(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qformer.tokenizer import load_qformer_tokenizer

    names = set(resource_names(SIZES))
    out = resolve(names, TINY, progress=False)
    assert set(out) == names
    assert out["vision_config"]["backend"] == "timm" and out["vision_width"] == 192
    assert out["bert_vocab_size"] == len(load_qformer_tokenizer(out["bert_tokenizer"]))
    assert (Path(out["lm"]) / "config.json").is_file()
    world = ToyWorld()
    for split, n in SIZES.items():
        folder = Path(out[f"data/{split}"])
        assert folder.name == f"{split}-{n}" and out[f"data/{split}.jsonl"] == str(folder / "metadata.jsonl")
        rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        assert len(rows) == n and rows[-1]["text"] == world.sample(split, n - 1).caption
        questions = [json.loads(line) for line in Path(out[f"vqa/{split}"]).read_text().splitlines()]
        assert Path(out[f"vqa/{split}"]) == folder / "vqa.jsonl"
        assert [q["question"] for q in questions if q["image"] == rows[0]["file_name"]] == [
            q.question for q in world.questions(split, 0)]
    assert not [p for p in data_root(world).iterdir() if p.name.startswith(".")]  # no temporaries left

    # A second run finds everything in place: nothing is exported or trained again.
    import qformer.toy.backbones as bb

    def boom(*args, **kwargs):
        raise AssertionError("prepared again")

    for owner, name in ((ToyWorld, "export"), (ToyWorld, "export_vqa"), (bb, "_train_into")):
        monkeypatch.setattr(owner, name, boom)
    assert resolve(names, TINY, progress=False) == out


@pytest.mark.parametrize(
    "options, message",
    [
        ({"budget": "huge"}, r"plugins.toy.budget must be one of \['default', 'tiny'\], got 'huge'"),
        ({"budgte": "tiny", "sizes": {}}, r"unknown option\(s\) \['budgte'\]"),
        ({"sizes": {"dev": 3}}, r"plugins.toy.sizes: unknown split\(s\) \['dev'\]"),
        ({"sizes": {"val": 0}}, r"plugins.toy.sizes.val must be an integer from 1 to 2000"),
        ({"sizes": {"val": 5000}}, r"plugins.toy.sizes.val must be an integer from 1 to 2000"),
        ({"sizes": {"train": "many"}}, r"plugins.toy.sizes.train must be an integer"),
        ({"sizes": {"train": True}}, r"plugins.toy.sizes.train must be an integer"),
        ({"sizes": [1, 2]}, r"plugins.toy.sizes must map splits to image counts"),
    ],
)
def test_option_errors_name_the_option(options: dict, message: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QFORMER_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match=message):
        resolve({"data/val"}, options, progress=False)
    assert list(tmp_path.iterdir()) == []  # checked before anything is prepared


def test_unknown_resource_lists_the_known_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QFORMER_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match=r"unknown toy resource\(s\) \['toy://data/dev', 'toy://vit'\]") as e:
        resolve({"vit", "data/dev", "lm"}, {}, progress=False)
    for name in (*BACKBONE_RESOURCES, "data/test", "data/test.jsonl", "vqa/test"):
        assert repr(name) in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_default_options() -> None:
    opts = ToyOptions.parse(None, world=ToyWorld())
    assert opts.budget == "default" and opts.sizes == DEFAULT_SIZES
    assert ToyOptions.parse({"sizes": {"val": 7}}, world=ToyWorld()).sizes == {**DEFAULT_SIZES, "val": 7}


# ---------------------------------------------------------------------------- caption scores


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ToyWorld(seed=0).export("val", 5, tmp_path_factory.mktemp("toy_export") / "val")


def test_scorer_finds_the_scenes_of_an_export(export: Path) -> None:
    scorer = ToyCaptionScorer()
    world = ToyWorld(seed=0)
    truth = [world.scene("val", i).to_dict() for i in range(5)]
    ids = [f"images/{i:06d}.png" for i in (3, 0, 4)]
    assert scorer.references(export, ids) == [truth[3], truth[0], truth[4]]
    assert scorer.references(str(export), ids) == [truth[3], truth[0], truth[4]]
    # Absolute paths (or any path ending in the file name) match too; so does the metadata file.
    assert scorer.references(export, [str(export / ids[0])]) == [truth[3]]
    assert scorer.references(export / "metadata.jsonl", [str(export / ids[1])]) == [truth[0]]
    # An image the export does not hold: no references for this eval set.
    assert scorer.references(export, [*ids, "images/000099.png"]) is None
    caption = world.sample("val", 3).caption
    assert scorer.score(caption, truth[3]) == score_caption(caption, truth[3])
    assert set(scorer.score(caption, truth[3])) == {
        "recall", "precision", "exact", "shape_recall", "colour_recall", "size_recall"}
    assert scorer.score(caption, truth[3])["exact"] == 1.0


def test_scorer_ignores_data_that_is_not_toy(tmp_path: Path) -> None:
    scorer = ToyCaptionScorer()
    user = tmp_path / "user"
    (user / "images").mkdir(parents=True)
    (user / "metadata.jsonl").write_text(json.dumps({"file_name": "images/a.png", "text": "a dog"}) + "\n")
    assert scorer.references(user, ["images/a.png"]) is None
    assert scorer.references(tmp_path / "missing", ["images/a.png"]) is None
    assert scorer.references(tmp_path, ["images/a.png"]) is None  # a folder without metadata
    assert scorer.references("org/hub-dataset", ["0"]) is None
    assert scorer.references({"train": "x"}, ["0"]) is None
    (user / "metadata.jsonl").write_text("{not json\n")
    assert scorer.references(user, ["images/a.png"]) is None
