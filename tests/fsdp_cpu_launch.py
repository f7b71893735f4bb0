"""Run a recipe under ``accelerate launch --multi_gpu`` on CPU as accelerate would run it with
an FSDP2 config on GPUs: ``python tests/fsdp_cpu_launch.py recipes/stage1.py ARGS``.

accelerate 1.x never selects FSDP on a CPU machine (accelerate/state.py: ``ACCELERATE_USE_FSDP``
is only read under the GPU/XPU/NPU/... distributed types, not ``MULTI_CPU``, so the run would
silently be DDP over gloo). This launcher changes only that decision: after accelerate has set
up its gloo process group, the state says FSDP with an FSDP2 plugin (as built from
configs/accelerate/fsdp_8gpu.yaml), and everything downstream -- ``Accelerator.prepare``'s
FSDP2 path, ``clip_grad_norm_``, ``accumulate`` -- is accelerate's own code. A test helper,
not part of the package.
"""

from __future__ import annotations

import runpy
import sys

import accelerate.state as state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True)


state.AcceleratorState.__init__ = _fsdp_on_cpu

if __name__ == "__main__":
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
