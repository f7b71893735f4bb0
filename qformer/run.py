"""A run: the processes (through ``accelerate``), the output folder, timing and printing.

Training recipes and ``recipes/evaluate.py`` set up a run the same way (:func:`start_run`):
one ``Accelerator`` (DDP or FSDP2 as the accelerate config says -- :mod:`qformer.sharding`; gloo on
CPU, where accelerate runs an FSDP config as DDP; DeepSpeed is untested: README), the
CPU threads each rank may use, an output folder checked for writing before any heavy work,
and main-process printing with per-phase timings.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import OutputDirError


def check_output_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove it writable (write and remove a probe file).

    Raises:
        OutputDirError: naming the folder, when it cannot be created or written to.
    """
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".qformer-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"cannot write to the output folder {out}: {e.strerror or e}") from None
    return out


def cpu_threads_per_process(num_processes: int) -> int:
    """Intra-op threads for one rank on a CPU machine: ``$QFORMER_NUM_THREADS`` if set, else
    the cores this process may use divided by the ranks on this machine.

    Why not ``OMP_NUM_THREADS``: ``accelerate launch`` without a config sets it to 1 on
    machines whose physical-core count psutil reports as 1 per rank (e.g. 2 vCPUs), which
    halves the speed of a small CPU run; the cores we are allowed to use are the honest budget."""
    env = os.environ.get("QFORMER_NUM_THREADS")
    if env:
        return max(1, int(env))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or num_processes))  # ranks on this machine
    return max(1, cores // local)


@dataclass
class Run:
    accelerator: Any
    output_dir: Path
    progress: bool  # tqdm bars (main process only)
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase (see phase())

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def print(self, *args: Any) -> None:
        if self.is_main:
            print(*args, flush=True)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time a phase of the run (summed if entered again); reported in results.json."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def seconds(self) -> dict[str, float]:
        return {**{k: round(v, 1) for k, v in self.timings.items()}, "total": round(time.perf_counter() - self.started, 1)}

    def timing_summary(self) -> str:
        total = time.perf_counter() - self.started
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in self.timings.items())
        return f"{total:.0f} s in all ({parts})"


def start_run(
    output_dir: str | os.PathLike,
    *,
    progress: bool = True,
    mixed_precision: str = "no",
    grad_accum: int = 1,
    log_with: str | None = None,
) -> Run:
    """The Accelerator (processes, devices, mixed precision, gradient accumulation, an
    optional tracker logging to ``output_dir/tb``) and the CPU thread budget of this rank.
    The output folder is checked for writing first (every rank: a shared file system can
    differ per node)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = check_output_dir(output_dir)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tb")),
    )
    if not torch.cuda.is_available():
        torch.set_num_threads(cpu_threads_per_process(accelerator.num_processes))
    return Run(accelerator, out, progress and accelerator.is_main_process)


__all__ = ["Run", "check_output_dir", "cpu_threads_per_process", "start_run"]
