"""The example accelerate configs (configs/accelerate/*.yaml) parse with accelerate's own
classes and turn into the launch environment and plugins they are meant to: what
``accelerate launch --config_file X`` does up to starting the processes (no GPU needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
EXPECTED = {  # file: (distributed_type, machines, processes)
    "1gpu.yaml": ("NO", 1, 1),
    "ddp_8gpu.yaml": ("MULTI_GPU", 1, 8),
    "fsdp_8gpu.yaml": ("FSDP", 1, 8),
    "ddp_16gpu_2nodes.yaml": ("MULTI_GPU", 2, 16),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 1, 8),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 1, 8),
}


def test_every_config_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


def _launch_args(path: Path):
    """The arguments as ``accelerate launch`` completes them from the config (launch_command)."""
    args = launch_command_parser().parse_args(["--config_file", str(path), "recipes/stage1.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    return args


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_and_launches_as_meant(name, monkeypatch):
    kind, machines, processes = EXPECTED[name]
    cfg = load_config_from_file(str(CONFIGS / name))
    assert isinstance(cfg, ClusterConfig)
    assert str(cfg.distributed_type).split(".")[-1] == kind
    assert (cfg.num_machines, cfg.num_processes, cfg.mixed_precision, cfg.use_cpu) == (machines, processes, "bf16", False)
    args = _launch_args(CONFIGS / name)
    assert (args.num_machines, args.num_processes, args.mixed_precision) == (machines, processes, "bf16")
    if kind in ("MULTI_GPU", "FSDP"):
        env = prepare_multi_gpu_env(args)
        assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
        assert (env.get("ACCELERATE_USE_FSDP") == "true") == (kind == "FSDP")
        if kind == "FSDP":  # the plugin accelerate builds from that environment in each process
            for k, v in env.items():
                monkeypatch.setenv(k, v)
            plugin = FullyShardedDataParallelPlugin()
            assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
            assert plugin.auto_wrap_policy is None  # NO_WRAP: qformer.sharding makes the units
    elif kind == "DEEPSPEED":
        stage = 2 if "zero2" in name else 3
        _, env = prepare_deepspeed_cmd_env(args)
        assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
        assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
        if importlib.util.find_spec("deepspeed") is None:
            pytest.skip("deepspeed is not installed (pip install 'qformer[deepspeed]'): plugin not built")
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        plugin = DeepSpeedPlugin()
        assert plugin.zero_stage == stage
        assert plugin.deepspeed_config["zero_optimization"]["stage"] == stage
        assert plugin.deepspeed_config["gradient_clipping"] == 1.0
