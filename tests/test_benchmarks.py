"""Smoke tests of benchmarks/: the shared helpers (statistics, tables, the worker protocol, the
A/B alternation) and a very small retrieval-scaling run. The timed comparisons themselves are
run by ``python benchmarks/run_all.py``, not by the test suite."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common as C  # noqa: E402

WORKER = (
    "import sys; sys.path.insert(0, {bench!r}); import _common as C; "
    "C.serve({{'echo': lambda x: x, 'steps': lambda n: C.timed_block(lambda: sum(range(1000)), n), "
    "'boom': lambda: 1 / 0}})"
)


def test_stats_and_table():
    s = C.Stats([3.0, 1.0, 2.0, 4.0])
    assert s.median == 2.5 and s.n == 4 and s.min == 1.0
    assert abs(s.iqr - 1.5) < 1e-12
    table = C.md_table(["a", "b"], [[1, "x"], [2, "y"]])
    assert table.splitlines()[0] == "| a | b |" and table.count("\n") == 3
    assert C.ratio(2.0, 1.0) == "2.00x"


def test_timing_prefers_quiet_blocks():
    t = C.Timing(blocks=[{"times": [1.0, 1.1], "foreign_cores": 0.0}, {"times": [9.0, 9.0], "foreign_cores": 1.0},
                         {"times": [1.2], "foreign_cores": 0.05}])
    assert t.stats.median == 1.1 and not t.contended and t.describe() == "2/3 quiet"
    busy = C.Timing(blocks=[{"times": [5.0], "foreign_cores": 2.0}, {"times": [1.0], "foreign_cores": 0.0},
                            {"times": [6.0], "foreign_cores": 2.0}])
    assert busy.stats.n == 3 and busy.contended  # too few quiet steps: all of them, flagged


def test_worker_protocol_and_alternation(tmp_path):
    argv = [sys.executable, "-c", WORKER.format(bench=str(BENCH))]
    with C.Worker("a", argv, log=tmp_path / "a.log") as a, C.Worker("b", argv, log=tmp_path / "b.log") as b:
        assert a.call("echo", x=[1, 2]) == [1, 2]
        with pytest.raises(C.WorkerError, match="ZeroDivisionError"):
            a.call("boom")
        assert a.call("echo", x="still alive") == "still alive"
        times = C.alternate([a, b], rounds=2, steps=3, quiet_wait=0)
        assert set(times) == {"a", "b"} and all(len(t.all.times) == 6 for t in times.values())


def test_peak_rss_reset():
    before = C.peak_rss_bytes()
    assert before >= C.rss_bytes() > 0
    if C.reset_peak_rss():
        assert C.peak_rss_bytes() <= before


@pytest.mark.slow
def test_retrieval_scaling_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "RESULTS_DIR", tmp_path / "results")
    import retrieval_scaling

    sec = retrieval_scaling.main(["--sizes", "12", "24", "--k", "3", "--repeats", "1", "--quiet-wait", "0",
                                  "--workdir", str(tmp_path)])
    sizes = sec.data["sizes"]
    assert set(sizes) == {12, 24}
    assert all(0 < v["pairs"] <= 2 * n * 3 for n, v in sizes.items())
    assert (tmp_path / "results" / "retrieval_scaling.json").exists()


@pytest.mark.slow
def test_search_index_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "RESULTS_DIR", tmp_path / "results")
    import search_index

    sec = search_index.main(["--images", "40", "--queries", "2", "--batch-size", "16", "--num-workers", "0",
                             "--quiet-wait", "0", "--workdir", str(tmp_path)])
    d = sec.data
    assert d["images"] == 40 and d["update_images"] == 1
    assert 0 < d["build_tower_s"] <= d["build_s"] and d["tower_s"] > 0
    assert {"ITC, matrix product", "ITC, faiss (exact)", "ITC top-16 + ITM re-rank"} <= set(d["latency_s"])
    assert len(sec.goals) == 2 and (tmp_path / "results" / "search_index.json").exists()


def test_readme_only_rebuild_keeps_the_runs_machine_and_embeds_the_analysis(tmp_path, monkeypatch):
    import json

    import run_all

    results, profiles = tmp_path / "results", tmp_path / "profiles"
    results.mkdir()
    profiles.mkdir()
    monkeypatch.setattr(C, "BENCH_DIR", tmp_path)
    monkeypatch.setattr(C, "RESULTS_DIR", results)
    monkeypatch.setattr(C, "PROFILE_DIR", profiles)
    sec = C.Section(title="Generation: x", intro="intro")
    sec.goal("generation (greedy) ≥ 1.2x transformers with identical tokens", "1.26x", True)
    sec.save("generation")
    (tmp_path / "analysis.md").write_text("## Why the missed goals are missed\n\nbecause.\n")
    info = dict(C.machine_info(with_lavis=False), date="2000-01-02 03:04")
    (results / "run.json").write_text(json.dumps(dict(info=info, durations={"generation": 12.0}, failures={})))
    assert run_all.main(["--readme-only"]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "- Date: 2000-01-02 03:04" in text and "generation 12 s" in text
    assert "| generation (greedy) ≥ 1.2x transformers with identical tokens | 1.26x | **met** |" in text
    assert text.index("## Goals") < text.index("## Why the missed goals are missed") < text.index("## Generation: x")


def test_profile_call_writes_the_top_operators(tmp_path):
    import torch

    out = C.profile_call(lambda: torch.ones(64, 64) @ torch.ones(64, 64), tmp_path / "p.txt", title="a title")
    text = (tmp_path / "p.txt").read_text()
    assert out == {"path": str(tmp_path / "p.txt")} and text.startswith("a title") and "aten::mm" in text


def _gpu_tiny(tmp_path, *extra):
    import json

    import gpu

    sec = gpu.main(["--tiny", "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work"), "--measure-s", "0",
                    *extra])
    data = json.loads((tmp_path / "out" / "gpu.json").read_text())["data"]
    assert (tmp_path / "out" / "gpu.md").read_text().startswith("## GPU")
    assert data == json.loads(json.dumps(sec.data, default=str))
    return sec, data


def _check_ok(row, batch):
    assert row["status"] == "ok", row
    assert row["batch"] == batch and 2 <= row["steps"] <= 3 and row["median_s"] > 0
    assert abs(row["samples_per_s"] - batch / row["median_s"]) < 1e-9 * row["samples_per_s"]
    assert row["peak_memory_bytes"] > 2**20


def test_gpu_script_tiny_run_reports_every_part_and_survives_an_oom(tmp_path):
    """benchmarks/gpu.py --tiny: the GPU script's code on the CPU at toy sizes; an out-of-memory
    error in one measurement (injected) is reported in its row and the others still run."""
    sec, data = _gpu_tiny(tmp_path, "--only", "stage1", "opt", "--fail", "stage1_eager=oom")
    m = data["measurements"]
    assert data["mode"] == "tiny" and data["machine"]["device"] == "cpu"
    assert m["stage1_eager"]["status"] == "oom" and "injected" in m["stage1_eager"]["detail"]
    _check_ok(m["stage1_cached"], 4)
    for name in ("stage2_opt_ours", "stage2_opt_transformers", "generate_opt_ours", "generate_opt_transformers"):
        _check_ok(m[name], 4)
    assert m["stage2_opt_transformers"]["library"] == "transformers" and m["stage2_opt_ours"]["library"] == "qformer"
    same, rows = m["generate_opt_transformers"]["identical_rows"].split("/")
    assert rows == "4" and 0 <= int(same) <= 4
    assert not any(k.startswith(("stage2_t5", "vision_ft", "stage1_compiled")) for k in m)
    # the goal needs the compiled run (not in this run) and a GPU (never judged with --tiny)
    assert data["goal"]["met"] is None and data["goal"]["samples_per_s"] is None
    assert [g[0] for g in sec.goals] == ["stage 1 with EVA ViT-g ≥ 150 samples/s, compiled"]


@pytest.mark.slow
def test_gpu_script_tiny_full_run_in_subprocesses(tmp_path):
    """Every group, each in its own subprocess (as on a GPU), with torch.compile (aot_eager)."""
    sec, data = _gpu_tiny(tmp_path, "--isolate", "--budget", "1500", "--fail", "stage2_t5_transformers=error")
    m = data["measurements"]
    import gpu

    assert set(m) == {n for _, names in gpu.GROUPS.values() for n in names}
    assert m["stage2_t5_transformers"]["status"] == "error" and "RuntimeError" in m["stage2_t5_transformers"]["detail"]
    for name, row in m.items():
        if name != "stage2_t5_transformers":
            _check_ok(row, 4)
    assert "aot_eager" in m["stage1_compiled"]["what"] and "checkpointing on" in m["vision_ft_checkpointed"]["what"]
    assert data["goal"]["samples_per_s"] == m["stage1_compiled"]["samples_per_s"] and data["goal"]["met"] is None


@pytest.mark.slow
def test_capfilt_throughput_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "RESULTS_DIR", tmp_path / "results")
    import capfilt_throughput

    sec = capfilt_throughput.main(["--images", "4", "--batch-size", "2", "--shard-size", "2", "--num-workers", "0",
                                   "--repeats", "1", "--quiet-wait", "0", "--workdir", str(tmp_path)])
    modes = sec.data["modes"]
    assert set(modes) == {"blip", "blip2"} and modes["blip2"]["captions"] == 10
    for r in modes.values():
        assert r["images_per_s"] > 0 and 0 < r["captioning_s"] + r["filtering_s"] <= r["seconds"]
        assert r["pairs"] >= 4 and r["kept"] >= 0
    assert sec.data["cpu"] and (tmp_path / "results" / "capfilt_throughput.json").exists()


@pytest.mark.slow
def test_compile_step_smoke(tmp_path, monkeypatch):
    """benchmarks/compile_step.py at the tiny config with the aot_eager backend (no code generation):
    both ways of compiling run, the compiled step gives the eager losses, the results are written."""
    if not (C.ORACLE_DIR / "lavis_oracle.py").is_file():  # stage1_step's configs start from its defaults
        pytest.skip(f"{C.ORACLE_DIR / 'lavis_oracle.py'} not found (../shared/tools/lavis-oracle, as stage1_step.py)")
    monkeypatch.setattr(C, "RESULTS_DIR", tmp_path / "results")
    import compile_step

    sec = compile_step.main(["--config", "tiny", "--precisions", "fp32", "--backend", "aot_eager", "--steps", "1",
                             "--warmup", "1"])
    rows = sec.data["rows"]
    assert [(r["mode"], r["precision"]) for r in rows] == [("whole", "fp32"), ("regions", "fp32")]
    assert rows[0]["regions"] == 2 and rows[1]["regions"] > 2
    for r in rows:
        assert r["eager_s"] > 0 and r["compiled_s"] > 0 and r["compile_s"] > 0
        assert r["max_loss_diff"] < 1e-5
    assert (tmp_path / "results" / "compile_step.json").exists()
