"""The recipes end to end on a tiny local pairing: one process and two (gloo), exact resume,
stage 2 from stage 1, the bad-data report; and a few-step run on the built-in toy world."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from recipe_fixtures import make_tiny_card

from qformer import Blip2

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_card(tmp_path_factory.mktemp("tiny"))


def _env() -> dict[str, str]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    return env


def run_recipe(stage: int | str, card: Path, out: Path, *extra: str, processes: int = 1, timeout: int = 600) -> str:
    script = str(REPO / "recipes" / (f"stage{stage}.py" if isinstance(stage, int) else f"{stage}.py"))
    args = ["--adapter", str(card), "--output-dir", str(out), "--no-progress", *extra]
    if processes == 1:
        cmd = [sys.executable, script, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout


def losses(out: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss")} for r in rows if "loss" in r}


@pytest.mark.slow
def test_stage1_then_stage2_single_process(tiny, tmp_path):
    s1 = tmp_path / "s1"
    stdout = run_recipe(1, tiny, s1)
    assert "retrieval among 16 held-out images" in stdout and "stage 1 done" in stdout
    for name in ("loss_curve.png", "metrics.jsonl", "results.json", "results.md", "data_report.json", "model/config.json"):
        assert (s1 / name).is_file(), name
    assert list((s1 / "tb").rglob("events.out.tfevents.*")), "no TensorBoard events"
    assert [p.name for p in (s1 / "checkpoints").iterdir()] and all(
        (p / "trainer_state.json").is_file() for p in (s1 / "checkpoints").iterdir())
    report = json.loads((s1 / "data_report.json").read_text())
    assert report["skipped"] == {"corrupt_image": 1, "tiny_image": 1, "empty_caption": 1}
    assert len(losses(s1)) == 6 and all(v["loss"] > 0 for v in losses(s1).values())
    # the saved model loads on its own and scores images against texts
    model = Blip2.from_pretrained(s1 / "model")
    assert model.similarity(torch.zeros(2, 3, 32, 32), ["a red circle", "a blue square"]).shape == (2, 2)

    s2 = tmp_path / "s2"
    stdout = run_recipe(2, tiny, s2, "--init-from", str(s1 / "model"))
    assert "captioning 8 held-out images" in stdout and "sample captions" in stdout and "stage 2 done" in stdout
    assert (s2 / "samples.txt").is_file() and (s2 / "loss_curve.png").is_file()
    model = Blip2.from_pretrained(s2 / "model")
    assert len(model.caption(torch.zeros(2, 3, 32, 32), num_beams=1, max_new_tokens=3)) == 2
    # One caption-metric definition: recipes/evaluate.py scores the same captions of the same images
    # against the same references (all three of each image's list) and prints the same numbers.
    val = tiny.parent / "val"
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / "evaluate.py"), "--model", str(s2 / "model"),
                           "--data", str(val), "--task", "caption", "--max-images", "8", "--no-progress",
                           "--caption-metrics", "bleu,cider,rouge,meteor", "--output-dir", str(tmp_path / "ev")],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = json.loads((s2 / "results.json").read_text())["results"]["captioning"]
    evaluated = json.loads((tmp_path / "ev" / "results.json").read_text())["results"]["captioning"]
    assert trained == evaluated  # (a 6-step model's captions are poor: tests/test_evaluate.py checks the numbers)
    rows = [json.loads(line) for line in (tmp_path / "ev" / "captions.jsonl").read_text().splitlines()]
    assert all(len(r["references"]) == 3 for r in rows)

    # Instruction tuning from the stage-2 model (text parts from stage 1), and its exact resume.
    inst = tmp_path / "inst"
    common = ["--init-from", str(s2 / "model"), "--stage1-from", str(s1 / "model")]
    stdout = run_recipe("instruct", tiny, inst, *common)
    assert "BLIP-2 zero-shot on 12 held-out questions" in stdout and "instruction tuning done" in stdout
    for name in ("loss_curve.png", "metrics.jsonl", "results.json", "answers.jsonl", "data_report.json",
                 "model/config.json"):
        assert (inst / name).is_file(), name
    results = json.loads((inst / "results.json").read_text())["results"]["vqa"]
    for column in ("instruction-tuned", "BLIP-2 zero-shot", "image-blind"):
        assert {f"table/{column}/{t}" for t in ("colour", "shape", "all")} <= set(results), column
    asked = [json.loads(line) for line in (val / "vqa.jsonl").read_text().splitlines()][:12]
    colours = Counter(r["answers"][0] for r in asked if r["question_type"] == "colour")
    assert results["table/image-blind/colour"] == pytest.approx(100 * max(colours.values()) / sum(colours.values()))
    report = json.loads((inst / "data_report.json").read_text())  # bad rows and images: skipped and counted
    assert report["skipped_total"] >= 1 and report["usable_samples"] + report["skipped_total"] == report["records_seen"]
    assert set(report["skipped"]) <= {"bad_record", "missing_image", "corrupt_image", "tiny_image", "empty_caption"}
    model = Blip2.from_pretrained(inst / "model")
    assert model.config.instruction_aware
    assert len(model.answer(torch.zeros(1, 3, 32, 32), ["what colour is the shape?", "what shape is it?"],
                            num_beams=1, max_new_tokens=3)) == 2
    parts = tmp_path / "inst-parts"
    run_recipe("instruct", tiny, parts, *common, "--stop-after", "3")
    run_recipe("instruct", tiny, parts, *common, "--resume")
    a, b = losses(inst), losses(parts)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(a[k]["loss"] == pytest.approx(b[k]["loss"], abs=1e-6) for k in a)


@pytest.mark.slow
def test_resumed_run_logs_the_same_losses(tiny, tmp_path):
    """A run stopped at a checkpoint and resumed equals an uninterrupted run, step for step."""
    full, parts = tmp_path / "full", tmp_path / "parts"
    common = ["--set", "stage1.eval_every=1000", "--set", "model.qformer.hidden_dropout=0.1"]
    run_recipe(1, tiny, full, *common)
    out = run_recipe(1, tiny, parts, *common, "--stop-after", "3")
    assert "stopping after 3 steps" in out and not (parts / "model").exists()
    run_recipe(1, tiny, parts, *common, "--resume")
    a, b = losses(full), losses(parts)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        for key in a[step]:
            assert a[step][key] == pytest.approx(b[step][key], abs=1e-6), (step, key)


@pytest.mark.slow
def test_two_processes_gloo(tiny, tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 on CPU: DDP over gloo, both stages."""
    s1 = tmp_path / "s1"
    out = run_recipe(1, tiny, s1, "--set", "stage1.batch_size=4", processes=2)
    assert "2 process(es)" in out and (s1 / "model" / "model.safetensors").is_file()
    report = json.loads((s1 / "data_report.json").read_text())
    assert report["skipped"]["corrupt_image"] >= 1
    s2 = tmp_path / "s2"
    out = run_recipe(2, tiny, s2, "--init-from", str(s1 / "model"), "--set", "stage2.batch_size=4", processes=2)
    assert "stage 2 done" in out


def test_help_documents_every_option():
    for stage in (1, 2, "instruct"):
        script = f"stage{stage}.py" if isinstance(stage, int) else f"{stage}.py"
        out = subprocess.run([sys.executable, str(REPO / "recipes" / script), "--help"],
                             capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120).stdout
        for flag in ("--adapter", "--output-dir", "--set", "--train-data", "--eval-data", "--lr", "--batch-size",
                     "--grad-accum", "--max-steps", "--mixed-precision", "--gradient-checkpointing", "--resume",
                     "--save-every", "--eval-every", "--warmup-steps", "--weight-decay", "--cache-features"):
            assert flag in out, (stage, flag)
        if stage != 1:
            assert "--init-from" in out
        if stage == "instruct":
            assert "--stage1-from" in out and "square root" in out


def test_missing_training_data_is_a_clear_error(tiny, tmp_path):
    with pytest.raises(AssertionError, match="no training data"):
        run_recipe(1, tiny, tmp_path / "x", "--set", "data.stage1.train=null")


# ------------------------------------------------------------------ the built-in toy world
def _toy_args(stage: int) -> list[str]:
    """--adapter toy with backbones pretrained on the tiny budget (seconds, in a temp cache),
    a small slice of the world and a few steps: the real toy code path, shrunk."""
    return ["--adapter", "toy", "--set", "plugins.toy.budget=tiny", "--set", "plugins.toy.sizes={train: 96, val: 24}",
            "--set", "model.qformer.num_layers=2", "--set", "model.qformer.num_query_tokens=4",
            "--set", f"eval.stage{stage}.max_images=12", "--set", f"stage{stage}.save_every=1000",
            "--max-steps", "3", "--batch-size", "8", "--log-every", "1", "--num-workers", "0"]


def _run_toy(stage: int, out: Path, cache: Path, *extra: str, processes: int = 1) -> str:
    script = str(REPO / "recipes" / f"stage{stage}.py")
    args = [*_toy_args(stage), "--output-dir", str(out), "--no-progress", *extra]
    cmd = [sys.executable, script, *args] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(_env(), QFORMER_CACHE=str(cache)), cwd=REPO,
                          timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_toy_world_smoke(tmp_path, processes):
    """`recipes/stage1.py` then `recipes/stage2.py` on the toy adapter (what `make demo` runs),
    in one process and in two."""
    cache = tmp_path / "cache"
    s1 = tmp_path / "toy" / "stage1"
    out = _run_toy(1, s1, cache, processes=processes)
    assert f"{processes} process(es)" in out and "retrieval among 12 held-out images" in out
    assert "ITC top-16 + ITM re-rank" in out and "ITC only" in out
    res = json.loads((s1 / "results.json").read_text())
    retrieval = res["results"]["retrieval"]
    assert 0 <= retrieval["i2t_r1"] <= 100 and "itc_t2i_r1" in retrieval and res["steps"] == 3
    assert sorted(losses(s1)) == [1, 2, 3]
    s2 = tmp_path / "toy" / "stage2"
    out = _run_toy(2, s2, cache, "--init-from", str(s1 / "model"), processes=processes)
    assert "captioning 12 held-out images" in out and "sample captions" in out and "stage 2 done" in out
    res = json.loads((s2 / "results.json").read_text())["results"]["captioning"]
    assert {"CIDEr", "Bleu_4", "ROUGE_L", "toy_recall", "toy_colour_recall"} <= set(res), sorted(res)
    assert all(0 <= res[k] <= 1 for k in ("toy_recall", "toy_colour_recall")) and res["CIDEr"] >= 0
    assert (s2 / "loss_curve.png").is_file() and (s2 / "samples.txt").read_text().count("pred:") == 12


@pytest.mark.slow
def test_stage1_with_the_tower_unfrozen_resumes_exactly(tiny, tmp_path):
    """Fine-tuning's trainable tower through the recipe: checkpoints carry it, --resume continues
    exactly, the final model holds the trained tower."""
    from safetensors.torch import load_file

    opts = ("--vision-trainable-blocks", "-1", "--vision-layer-decay", "0.9", "--gradient-checkpointing", "true",
            "--cache-features", "false", "--eval-size", "0", "--max-steps", "4", "--save-every", "2")
    full, part = tmp_path / "full", tmp_path / "part"
    stdout = run_recipe(1, tiny, full, *opts)
    assert "trainable vision tower" in stdout
    run_recipe(1, tiny, part, *opts, "--stop-after", "2")
    ckpt = load_file(str(part / "checkpoints" / "step-00000002" / "model" / "model.safetensors"))
    assert any(k.startswith("vision.model.blocks.") for k in ckpt)  # the trainable tower is in the checkpoint
    run_recipe(1, tiny, part, *opts, "--resume")
    assert losses(full) == losses(part)
    a, b = load_file(str(full / "model" / "model.safetensors")), load_file(str(part / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(str(tiny.parent / "tower.safetensors"))
    trained = {k[len("vision.model."):]: v for k, v in a.items() if k.startswith("vision.model.")}
    assert trained and set(trained) <= set(start) and all(not torch.equal(trained[k], start[k]) for k in trained)
