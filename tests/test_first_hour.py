"""A user's first hour, run as a user runs the recipes (a subprocess per recipe): mistakes are
found before any heavy work and end with one ``error: ...`` line; a non-finite loss stops the
run and leaves the last good checkpoint the newest; reports and ``--help`` say what is true."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from recipe_fixtures import make_tiny_card

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_card(tmp_path_factory.mktemp("tiny"))


def recipe(stage: int, *args: str, cache: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if cache is not None:
        env["QFORMER_CACHE"] = str(cache)
    return subprocess.run([sys.executable, str(REPO / "recipes" / f"stage{stage}.py"), "--no-progress", *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def strict_json_lines(path: Path) -> list[dict]:
    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- cheap mistakes, found first
@pytest.mark.parametrize("args, message", [
    (["--set", "model.qformer.num_querys=8"], r"error: model.qformer: unknown field\(s\) \['num_querys'\]"),
    (["--set", "stage1.loss_ramp_steps=10"], r"error: stage1.loss_ramp_steps is not a setting any more: use "
                                             r"stage1.objective.loss_ramp_steps"),
    (["--train-data", "no/such/file.jsonl"], r"error: FileNotFoundError: .*no/such/file.jsonl"),
    (["--lr", "-1"], r"error: lr must be a number > 0, got -1"),
])
def test_mistakes_fail_in_seconds_before_the_toy_backbones(tmp_path, args, message):
    """With an empty cache the toy card would first pretrain its backbones (minutes); a typo,
    a missing file or a bad value must be reported before that, in one last line."""
    cache = tmp_path / "cache"
    started = time.perf_counter()
    proc = recipe(1, "--adapter", "toy", "--output-dir", str(tmp_path / "out"), *args, cache=cache, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.match(message, last_line(proc)), last_line(proc)
    assert "Traceback" not in proc.stderr
    assert not cache.exists() or not any(cache.rglob("*")), "something was built before the check"
    assert time.perf_counter() - started < 60


def test_unwritable_output_folder_is_one_line(tiny, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = recipe(1, "--adapter", str(tiny), "--output-dir", str(blocker / "out"))
    assert proc.returncode == 2
    assert last_line(proc).startswith(f"error: cannot write to the output folder {blocker / 'out'}"), last_line(proc)
    assert "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    proc = recipe(1, "--adapter", "toy", "--set", "model.qformer.num_querys=8", "--debug",
                  "--output-dir", str(tmp_path / "o"), cache=tmp_path / "c", timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


# ---------------------------------------------------------------- a non-finite loss
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_nan_run_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path, stage):
    out = tmp_path / f"s{stage}"
    extra = []
    if stage == 2:
        s1 = tmp_path / "s1-init"
        assert recipe(1, "--adapter", str(tiny), "--output-dir", str(s1), "--eval-size", "0").returncode == 0
        extra = ["--init-from", str(s1 / "model")]
    proc = recipe(stage, "--adapter", str(tiny), "--output-dir", str(out), "--lr", "1e6", "--warmup-steps", "0",
                  "--save-every", "1", "--max-steps", "6", "--eval-size", "0", *extra)
    line = last_line(proc)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert line.startswith("error: NonFiniteLossError: step "), line
    bad_step = int(line.split("step ")[1].split(" ")[0])
    assert " (lr " in line and "not finite" in line and ("loss" in line or "ITC similarities" in line)
    assert 2 <= bad_step <= 6
    saved = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert saved and max(saved) == bad_step - 1  # nothing was saved at or after the bad step
    assert not (out / "model").exists() and not (out / "results.json").exists()
    rows = strict_json_lines(out / "metrics.jsonl")  # strict JSON: the non-finite values are null
    assert rows[-1]["step"] == bad_step and rows[-1].get("loss") is None and rows[-1]["nonfinite"]


@pytest.mark.slow
def test_nonfinite_steps_can_be_skipped(tiny, tmp_path):
    """--skip-nonfinite-steps N: up to N such steps are skipped (no update), then the run stops."""
    out = tmp_path / "skip"
    proc = recipe(1, "--adapter", str(tiny), "--output-dir", str(out), "--lr", "1e6", "--warmup-steps", "0",
                  "--max-steps", "6", "--eval-size", "0", "--skip-nonfinite-steps", "2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "step skipped (1 of skip_nonfinite_steps=2)" in proc.stdout
    assert "step skipped (2 of skip_nonfinite_steps=2)" in proc.stdout
    assert last_line(proc).startswith("error: NonFiniteLossError")


# ---------------------------------------------------------------- checkpoints are untrusted input
@pytest.mark.slow
def test_resume_over_a_malicious_optimizer_state_names_the_file(tiny, tmp_path):
    import pickle

    out = tmp_path / "run"
    assert recipe(1, "--adapter", str(tiny), "--output-dir", str(out), "--max-steps", "2", "--save-every", "1",
                  "--eval-size", "0").returncode == 0
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (ckpt / "optimizer.bin").write_bytes(pickle.dumps({"state": Evil()}))
    proc = recipe(1, "--adapter", str(tiny), "--output-dir", str(out), "--max-steps", "4", "--save-every", "1",
                  "--eval-size", "0", "--resume")
    assert proc.returncode == 2 and not marker.exists()
    line = last_line(proc)
    assert line.startswith("error: UnsafeCheckpointError: refused to load ") and "optimizer.bin" in line, line


# ---------------------------------------------------------------- --help
def test_help_keeps_the_examples_and_shows_the_cards_defaults(tiny):
    out = recipe(1, "--help").stdout
    assert "    python recipes/stage1.py                            # the built-in toy world" in out  # verbatim
    assert "--max-steps MAX_STEPS" in out and "(card: 550)" in out  # the toy card's effective default
    assert "(default: None)" not in out
    out = recipe(2, "--help", "--adapter", str(tiny)).stdout
    assert "(card: 6)" in out  # the tiny card's stage-2 max_steps
