"""Shared machinery of the benchmarks: timing statistics, per-process memory, worker
subprocesses driven side by side, machine description and markdown tables.

This module only uses the standard library (torch is imported lazily inside functions), so
it also runs inside the LAVIS venv (``.venv-lavis``: torch 2.13, transformers 4.26).

How a side-by-side comparison runs
----------------------------------
Each implementation ("side") lives in its own long-lived worker subprocess (so that its peak
RSS is its own). A worker builds its model once, runs its warm-up steps, and then waits for
commands on stdin; every command is answered by one JSON line on a private pipe (the worker's
own stdout/stderr, including library prints, go to the parent's stderr or a log). The parent
then runs a few *rounds*; in each round every side runs a *block* of timed steps, in the order
A B C ... and then ... C B A on the next round (ABBA), so that drift and the load of other
processes on this shared 2-core machine hit all sides alike. Only one worker computes at any
time; the others sleep in ``readline``.

Memory: after its warm-up, a worker resets the kernel's peak-RSS counter (``VmHWM``, through
``/proc/self/clear_refs``) so that the reported peak covers the timed steps (model, optimizer
state and activations) and not the transient copies made while loading checkpoints.
``ru_maxrss`` (the lifetime peak, including loading) is reported as well.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

# OpenMP wait policy. Default: libgomp's own (idle threads spin briefly, then sleep) -- what users
# get, so what the tables report. BENCH_OMP_WAIT_POLICY=PASSIVE (threads sleep at once) makes timings
# robust when other jobs share the cores (with spinning threads, one foreign busy thread can make every
# parallel region wait for a descheduled thread: 2-10x slower steps), but it charges a thread wake-up to
# every parallel region, so it penalises a program made of many small ops more than one of few large
# ones (measured: our stage-1 step 1.36x slower under PASSIVE, LAVIS's 1.0-1.1x). It is set here, before
# torch is imported by any benchmark process, and inherited by every worker.
OMP_WAIT_POLICY = os.environ.get("BENCH_OMP_WAIT_POLICY", "default")
if OMP_WAIT_POLICY != "default":
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
SHARED = REPO.parent / "shared"
ORACLE_DIR = Path(os.environ.get("QFORMER_LAVIS_ORACLE_DIR", SHARED / "tools" / "lavis-oracle"))
PROFILE_DIR = BENCH_DIR / "profiles"
RESULTS_DIR = BENCH_DIR / "results"
THREADS = 2


def lavis_python() -> Path | None:
    """The LAVIS 1.0.2 venv's interpreter: ``$QFORMER_LAVIS_PYTHON`` or ``.venv-lavis/``."""
    env = os.environ.get("QFORMER_LAVIS_PYTHON")
    for cand in ([Path(env)] if env else []) + [REPO / ".venv-lavis" / "bin" / "python"]:
        if cand.is_file():
            return cand
    return None


# ----------------------------------------------------------------------------- statistics
@dataclass
class Stats:
    """Summary of repeated timings (seconds)."""

    times: list[float]

    @property
    def n(self) -> int:
        return len(self.times)

    def quantile(self, q: float) -> float:
        xs = sorted(self.times)
        if not xs:
            return float("nan")
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def iqr(self) -> float:
        return self.quantile(0.75) - self.quantile(0.25)

    @property
    def min(self) -> float:
        return min(self.times) if self.times else float("nan")

    def ms(self) -> str:
        """``median ms (IQR ms)``."""
        return f"{self.median * 1e3:.1f} (±{self.iqr * 1e3 / 2:.1f})"


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    """Run ``fn`` n times, returning the wall time of each call (perf_counter)."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------- other processes
# This machine is shared: other engineers' jobs may run beside a benchmark. With 2 cores and
# 2 OpenMP threads, one foreign busy thread makes every parallel region wait for a descheduled
# thread, and steps get several times slower (not uniformly: the more, smaller, parallel regions a
# step has, the more it loses). So every timed block also records how much CPU *other*
# processes used meanwhile (all CPUs' busy time from /proc/stat minus this process's own), and
# the summary uses the quiet blocks when there are enough of them.
_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
QUIET_CORES = 0.15  # foreign CPU use (in cores) under which a block counts as quiet


def _machine_busy_ticks() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v[:8]) - idle


def _self_ticks() -> int:
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, all threads


def timed_block(fn: Callable[[], Any], n: int) -> dict[str, Any]:
    """``{"times": [...], "foreign_cores": x}``: n timed calls and the average number of cores
    that other processes kept busy during them."""
    busy0, self0, t0 = _machine_busy_ticks(), _self_ticks(), time.perf_counter()
    times = timed(fn, n)
    wall = time.perf_counter() - t0
    foreign = (_machine_busy_ticks() - busy0) - (_self_ticks() - self0)
    return {"times": times, "foreign_cores": max(0.0, foreign / _CLK / wall) if wall > 0 else 0.0}


def foreign_load(seconds: float = 0.5) -> float:
    """Cores kept busy by other processes over the next ``seconds`` (this process sleeps)."""
    busy0, self0 = _machine_busy_ticks(), _self_ticks()
    time.sleep(seconds)
    return max(0.0, ((_machine_busy_ticks() - busy0) - (_self_ticks() - self0)) / _CLK / seconds)


def wait_for_quiet(max_wait: float = 30.0, *, threshold: float = QUIET_CORES, probe: float = 0.5) -> float:
    """Sleep until other processes use less than ``threshold`` cores (at most ``max_wait`` s);
    returns the last measured foreign load."""
    deadline = time.monotonic() + max_wait
    load = foreign_load(probe)
    while load > threshold and time.monotonic() < deadline:
        load = foreign_load(probe)
    return load


# ----------------------------------------------------------------------------- memory
def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak RSS since the process started or since the last :func:`reset_peak_rss`."""
    return _status_kib("VmHWM") * 1024


def lifetime_peak_rss_bytes() -> int:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux): the process's lifetime peak."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0). False where not possible."""
    import gc

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_report(baseline: int | None = None, floor: int | None = None) -> dict[str, int]:
    """Peak RSS since the reset, lifetime peak, current RSS; ``baseline_rss``: RSS when the
    peak was reset (after warm-up); ``floor_rss``: RSS right after ``import torch``."""
    out = {"peak_rss": peak_rss_bytes(), "lifetime_peak_rss": lifetime_peak_rss_bytes(), "rss": rss_bytes()}
    if baseline is not None:
        out["baseline_rss"] = baseline
    if floor is not None:
        out["floor_rss"] = floor
    return out


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# ----------------------------------------------------------------------------- workers
class WorkerError(RuntimeError):
    pass


class Worker:
    """A side of a comparison, running in its own process.

    ``argv`` starts a program that calls :func:`serve` with its command handlers.
    ``call(cmd, **kw)`` sends one command and returns the handler's (JSON) result.
    """

    def __init__(self, name: str, argv: Sequence[str], *, log: Path | None = None, env: dict | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        r, w = os.pipe()
        self._log = open(log, "ab") if log is not None else None
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env["BENCH_REPLY_FD"] = str(w)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        full_env.setdefault("TOKENIZERS_PARALLELISM", "false")
        full_env.setdefault("HF_HUB_OFFLINE", "1")
        full_env.setdefault("TRANSFORMERS_OFFLINE", "1")
        full_env.setdefault("OMP_NUM_THREADS", str(THREADS))
        self.proc = subprocess.Popen(
            list(map(str, argv)), stdin=subprocess.PIPE, stdout=self._log or sys.stderr,
            stderr=self._log or sys.stderr, pass_fds=(w,), env=full_env, cwd=str(cwd or REPO),
        )
        os.close(w)
        self._reply = os.fdopen(r, "r")

    def call(self, cmd: str, **kwargs: Any) -> Any:
        if self.proc.poll() is not None:
            raise WorkerError(f"worker {self.name} exited with code {self.proc.returncode}")
        self.proc.stdin.write((json.dumps({"cmd": cmd, "kwargs": kwargs}) + "\n").encode())
        self.proc.stdin.flush()
        line = self._reply.readline()
        if not line:
            self.proc.wait()
            raise WorkerError(f"worker {self.name} died (exit code {self.proc.returncode}) during {cmd!r}")
        msg = json.loads(line)
        if "error" in msg:
            raise WorkerError(f"worker {self.name}, command {cmd!r}:\n{msg['error']}")
        return msg["result"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"cmd": "exit", "kwargs": {}}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self._reply.close()
        if self._log:
            self._log.close()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(handlers: dict[str, Callable[..., Any]]) -> None:
    """Worker main loop: read ``{"cmd", "kwargs"}`` lines from stdin, reply with one JSON line
    ``{"result": ...}`` or ``{"error": traceback}`` on the private pipe; ``exit`` stops."""
    reply = os.fdopen(int(os.environ["BENCH_REPLY_FD"]), "w")
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        if msg["cmd"] == "exit":
            break
        try:
            out = {"result": handlers[msg["cmd"]](**msg["kwargs"])}
        except Exception:
            out = {"error": traceback.format_exc()}
        reply.write(json.dumps(out) + "\n")
        reply.flush()


@dataclass
class Timing:
    """All timed blocks of one side: per block its step times and the foreign load."""

    blocks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def all(self) -> Stats:
        return Stats([t for b in self.blocks for t in b["times"]])

    @property
    def quiet(self) -> Stats:
        return Stats([t for b in self.blocks if b["foreign_cores"] <= QUIET_CORES for t in b["times"]])

    @property
    def contended(self) -> bool:
        """True when fewer than half of the steps (or fewer than 2) ran in quiet blocks."""
        return self.quiet.n < max(2, self.all.n // 2)

    @property
    def stats(self) -> Stats:
        """The quiet blocks' steps when at least half of the steps (and 2) were quiet, else all."""
        return self.all if self.contended else self.quiet

    @property
    def foreign(self) -> float:
        """Median foreign load (cores) over the blocks."""
        return statistics.median(b["foreign_cores"] for b in self.blocks) if self.blocks else 0.0

    def describe(self) -> str:
        q = sum(b["foreign_cores"] <= QUIET_CORES for b in self.blocks)
        return f"{q}/{len(self.blocks)} quiet"


def alternate(workers: Sequence[Worker], *, rounds: int, steps: int, cmd: str = "steps", quiet_wait: float = 10.0,
              **kwargs: Any) -> dict[str, Timing]:
    """Timed steps side by side: ``rounds`` rounds of ``steps`` steps per worker, in ABBA order.

    Each worker's ``cmd`` handler must return :func:`timed_block`'s dict. Before each block the
    parent waits (up to ``quiet_wait`` s) for other processes to go quiet. Returns name -> Timing.
    """
    out: dict[str, Timing] = {w.name: Timing() for w in workers}
    for r in range(rounds):
        order = list(workers) if r % 2 == 0 else list(reversed(workers))
        for w in order:
            if quiet_wait > 0:
                wait_for_quiet(quiet_wait)
            out[w.name].blocks.append(w.call(cmd, n=steps, **kwargs))
    return out


def worker_setup(threads: int = THREADS) -> int:
    """What every worker does first: a fixed thread count and seed. Returns the RSS right after
    ``import torch`` (the framework's floor, before any model library is imported): torch builds
    differ a lot there (the CUDA wheel maps ~0.4 GiB more than the CPU wheel on this machine)."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return rss_bytes()


# ----------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx_vnni", "avx512_fp16")))
    except OSError:
        pass
    return []


def mem_total_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def lavis_versions(py: Path | None = None) -> dict[str, str]:
    """torch / transformers / LAVIS versions of the LAVIS venv (empty if absent)."""
    py = py or lavis_python()
    if py is None:
        return {}
    code = (
        "import json, importlib.metadata as m, torch, transformers;"
        "print(json.dumps({'torch': torch.__version__, 'transformers': transformers.__version__,"
        "'lavis': m.version('salesforce-lavis')}))"
    )
    try:
        out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=120, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as e:  # pragma: no cover
        return {"error": repr(e)}


def machine_info(with_lavis: bool = True) -> dict[str, Any]:
    import torch
    import transformers

    info = {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_model(),
        "cpu_flags": " ".join(cpu_flags()),
        "logical_cpus": os.cpu_count(),
        "mem_gib": round(mem_total_gib(), 1),
        "load_average_at_start": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": THREADS,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "libgomp default"),
    }
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    if with_lavis:
        lv = lavis_versions()
        if lv:
            info["lavis_venv"] = lv
    return info


def machine_lines(info: dict[str, Any]) -> list[str]:
    lv = info.get("lavis_venv") or {}
    lines = [
        f"- Date: {info['date']}",
        f"- CPU: {info['cpu']} ({info['logical_cpus']} logical CPUs; {info['cpu_flags']}), {info['mem_gib']} GiB RAM, no GPU",
        f"- Shared machine: load average at start {info['load_average_at_start']} (other engineers' jobs run beside the benchmarks)",
        f"- Ours: Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}"
        + (f", timm {info['timm']}" if "timm" in info else ""),
    ]
    if lv:
        lines.append(f"- LAVIS side: salesforce-lavis {lv.get('lavis')}, torch {lv.get('torch')}, transformers {lv.get('transformers')}")
    lines.append(f"- `torch.set_num_threads({info['threads']})` in every process; `OMP_WAIT_POLICY="
                 f"{info.get('omp_wait_policy', '?')}` (see \"Shared machine\" below)")
    return lines


# ----------------------------------------------------------------------------- tables
def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def ratio(x: float, y: float) -> str:
    return f"{x / y:.2f}x" if y else "n/a"


@dataclass
class Section:
    """One benchmark's findings, printed by the script and written into the README."""

    title: str
    intro: str = ""
    tables: list[tuple[str, str]] = field(default_factory=list)  # (caption, markdown)
    notes: list[str] = field(default_factory=list)
    goals: list[tuple[str, str, bool | None]] = field(default_factory=list)  # (goal, measured, met)
    data: dict[str, Any] = field(default_factory=dict)

    def add_table(self, caption: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        self.tables.append((caption, md_table(headers, rows)))

    def goal(self, text: str, measured: str, met: bool | None) -> None:
        self.goals.append((text, measured, met))

    def markdown(self, level: int = 2) -> str:
        h = "#" * level
        parts = [f"{h} {self.title}", ""]
        if self.intro:
            parts += [self.intro, ""]
        for caption, table in self.tables:
            if caption:
                parts += [caption, ""]
            parts += [table, ""]
        if self.goals:
            parts += [md_table(["goal", "measured", "met?"],
                               [(g, m, {True: "**met**", False: "**missed**", None: "n/a"}[ok]) for g, m, ok in self.goals]), ""]
        for n in self.notes:
            parts.append(f"- {n}")
        if self.notes:
            parts.append("")
        return "\n".join(parts)

    def save(self, name: str, directory: Path | None = None) -> Path:
        directory = RESULTS_DIR if directory is None else Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{name}.json"
        path.write_text(json.dumps(
            {"title": self.title, "intro": self.intro, "tables": self.tables, "notes": self.notes,
             "goals": self.goals, "data": self.data}, indent=1, default=str))
        return path

    @classmethod
    def load(cls, path: Path) -> "Section":
        d = json.loads(Path(path).read_text())
        return cls(title=d["title"], intro=d["intro"], tables=[tuple(t) for t in d["tables"]], notes=d["notes"],
                   goals=[tuple(g) for g in d["goals"]], data=d.get("data", {}))


def print_section(section: Section) -> None:
    print("\n" + section.markdown(level=2), flush=True)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- profiles
def write_profile(prof, path: Path, *, title: str, row_limit: int = 30) -> Path:
    """Top operators by self CPU time of a ``torch.profiler`` run, as text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit, max_name_column_width=60)
    path.write_text(f"{title}\n\n{table}\n")
    return path


def profile_call(fn, path, *, title: str) -> dict[str, str]:
    """Run ``fn()`` once under ``torch.profiler`` (CPU) and write its top operators to ``path``
    (a worker's "profile" command)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    write_profile(p, Path(path), title=title)
    return {"path": str(path)}


def common_arguments(parser, *, rounds: int, steps: int, warmup: int) -> None:
    parser.add_argument("--rounds", type=int, default=rounds, help="ABBA rounds (default %(default)s)")
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per side per round (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed warm-up steps per side (default %(default)s)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler captures")
    parser.add_argument("--quiet-wait", type=float, default=10.0,
                        help="seconds to wait for other processes to go quiet before each timed block (default %(default)s)")


def run_and_save(run, args, name: str):
    """Run a benchmark's ``run(args)``, save its section as ``results/<name>.json`` and print it."""
    sec = run(args)
    sec.save(name)
    print_section(sec)
    return sec
