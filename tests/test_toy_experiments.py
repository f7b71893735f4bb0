"""The toy experiments' helpers (qformer.toy.experiments) and recipes/finetune_toy.py's plan and
table, with the recipe runs stood in by files (the real runs are the README's table)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from qformer.data import open_caption_source
from qformer.toy.experiments import paraphrase_file, run_recipe, spread

REPO = Path(__file__).resolve().parents[1]


def _metadata(tmp_path: Path) -> Path:
    meta = tmp_path / "export" / "metadata.jsonl"
    meta.parent.mkdir()
    rows = [{"file_name": f"images/{i}.png", "text": f"scene {i} a", "captions": [f"scene {i} a", f"scene {i} b",
                                                                                  f"scene {i} c"], "attributes": {}}
            for i in range(2)]
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return meta


def test_paraphrase_file_gives_one_record_per_caption_with_the_scenes_id(tmp_path: Path) -> None:
    meta = _metadata(tmp_path)
    out = paraphrase_file(meta, tmp_path / "para" / "train.jsonl")
    records = list(open_caption_source(str(out)))
    assert [r.caption for r in records] == [f"scene {i} {c}" for i in range(2) for c in "abc"]
    assert [r.image_id for r in records] == ["images/0.png"] * 3 + ["images/1.png"] * 3
    assert {r.image for r in records} == {str(meta.parent.resolve() / f"images/{i}.png") for i in range(2)}
    out.write_text("kept\n")  # an existing file is kept, not rewritten
    assert paraphrase_file(meta, out).read_text() == "kept\n"
    assert [p.name for p in out.parent.iterdir()] == ["train.jsonl"]  # no temporary left behind


def test_spread() -> None:
    assert spread([3.0, 1.0, 2.5]) == "1.0 / 2.5 / 3.0"
    assert spread([1.234, 1.0], 2) == "1.00 / 1.12 / 1.23"


def test_run_recipe_skips_finished_runs_and_stops_on_failure(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text("import sys, pathlib\nassert sys.argv[-1] == '--no-progress'\n"
                      "out = pathlib.Path(sys.argv[1]); out.mkdir(); (out / 'results.json').write_text('{}')\n"
                      "sys.exit(int(sys.argv[2]))\n")
    out, log = tmp_path / "run", tmp_path / "logs" / "run.log"
    assert run_recipe([str(script), str(out), "0"], out, log) == out
    assert (out / "results.json").is_file() and log.is_file()
    assert run_recipe([str(script), str(out), "0"], out, log) == out  # done before: the script would fail (mkdir)
    with pytest.raises(SystemExit, match="bad.log"):
        run_recipe([str(script), str(tmp_path / "bad"), "3"], tmp_path / "bad", tmp_path / "logs" / "bad.log")


def _finetune_toy():
    spec = importlib.util.spec_from_file_location("finetune_toy", REPO / "recipes" / "finetune_toy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _results(out: Path, kind: str, value: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if kind == "caption":
        r = {"captioning": {"CIDEr": value / 50, "toy_shape_recall": value / 100, "toy_colour_recall": 0.5,
                            "toy_size_recall": 0.9, "toy_exact": 0.2}}
    else:
        r = {"retrieval": {"itc_i2t_r1": value, "itc_t2i_r1": value + 1, "i2t_r1": value - 1, "t2i_r1": value}}
    (out / "results.json").write_text(json.dumps({"results": r}))


def test_finetune_toy_plans_the_runs_and_tabulates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    import qformer.toy.experiments as experiments

    mod = _finetune_toy()
    for name, kind in (("stage1", "retrieval"), ("stage2", "caption")):
        (tmp_path / name / "model").mkdir(parents=True)
        _results(tmp_path / name, kind, 50.0)
    monkeypatch.setattr(mod, "toy_train_metadata", lambda: str(_metadata(tmp_path)))
    calls: list[list[str]] = []

    def fake_run(args, out, log):
        calls.append(list(args))
        seed = int(args[args.index("--seed") + 1])
        _results(out, "caption" if "stage2.py" in args[0] else "retrieval", 60.0 + seed + 5 * ("-unfrozen-" in str(out)))
        return out

    monkeypatch.setattr(experiments, "run_recipe", fake_run)
    mod.main(["--root", str(tmp_path)])
    assert len(calls) == 12
    by_out = {c[c.index("--output-dir") + 1]: c for c in calls}
    cap_u, ret_u, ret_f = (by_out[str(tmp_path / f"ft-{r}-s1")] for r in
                           ("caption-unfrozen", "retrieval-unfrozen", "retrieval-frozen"))
    assert cap_u[cap_u.index("--init-from") + 1] == str(tmp_path / "stage2" / "model")
    assert cap_u[cap_u.index("--vision-trainable-blocks") + 1] == "-1"
    assert "--vision-trainable-blocks" not in by_out[str(tmp_path / "ft-caption-frozen-s1")]
    assert "--vision-trainable-blocks" not in ret_f and ret_u[ret_u.index("--vision-layer-decay") + 1] == "0.95"
    assert ret_u[ret_u.index("--init-from") + 1] == str(tmp_path / "stage1" / "model")
    assert ret_u[ret_u.index("--train-data") + 1] == str(tmp_path / "paraphrases" / "train.jsonl")
    # every run of a pair has the same budget and schedule: only the tower's options differ
    assert [x for x in cap_u if x not in ("--vision-trainable-blocks", "-1", "--cache-features", "false")] == \
        [x.replace("frozen", "unfrozen") for x in by_out[str(tmp_path / "ft-caption-frozen-s1")]]
    table = json.loads((tmp_path / "finetune_table.json").read_text())
    assert table["results"]["retrieval-unfrozen"]["2"]["itc_i2t_r1"] == 67.0
    md = (tmp_path / "finetune_table.md").read_text()
    assert "| tower unfrozen | 65.0 / 66.0 / 67.0 and 66.0 / 67.0 / 68.0 | 64.0 / 65.0 / 66.0 and 65.0 / 66.0 / 67.0 |" in md
    assert "| tower frozen | 1.20 / 1.22 / 1.24 | 60.0 / 61.0 / 62.0 | 50.0 / 50.0 / 50.0 |" in md
    assert "| start: the toy stage-2 model | 1.00 | 50.0 | 50.0 | 90.0 | 20.0 |" in md


def test_finetune_toy_needs_the_starting_runs(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        _finetune_toy().main(["--root", str(tmp_path), "--rows", "caption-frozen"])


def test_finetune_toy_help() -> None:
    import subprocess

    out = subprocess.run([sys.executable, str(REPO / "recipes" / "finetune_toy.py"), "--help"], capture_output=True,
                         text=True, timeout=300, cwd=REPO).stdout
    assert "--rows" in out and "image id" in out
