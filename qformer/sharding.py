"""FSDP2 (torch's ``fully_shard``) for training: how a BLIP-2 objective is cut into units, and
its checkpoints as full, trainable-only state dicts.

Why our own plan instead of accelerate's auto-wrap: a BLIP-2 model mixes frozen parts (the
vision tower, the LLM) with trainable ones (the Q-Former, its queries and projections), and
it is no transformers ``PreTrainedModel`` (no ``_no_split_modules`` for accelerate's
transformer policy). FSDP1 flattens every wrapped module's parameters into one tensor, so a
module holding frozen and trainable parameters fails (``use_orig_params`` works around it at
a memory cost). FSDP2 shards each parameter on its own (a ``DTensor``), so one unit may mix
frozen and trainable parameters; it only reduce-scatters gradients that exist. We therefore
use FSDP2 only (FSDP1 is refused) and make one unit per transformer block -- every child of an
``nn.ModuleList`` / ``nn.Sequential`` made of parameterised modules -- the tower's blocks, the LLM's decoder layers -- plus the root for the rest
(the Q-Former, its queries, projections and heads, embeddings). Frozen blocks are sharded like
the others (``frozen="shard"``) or kept whole on every rank (``frozen="replicate"``: no
all-gather for them, more memory). accelerate's ``prepare`` leaves an already sharded module
as it is, so the same plan runs under ``accelerate launch`` (with ``fsdp_version: 2``) and in
plain ``torch.distributed`` (the 2-rank gloo test).

``fully_shard`` refuses 0-dim parameters (the ITC temperature): they become 1-element 1-D
parameters while sharded; :func:`full_state_dict` / :func:`load_full_state_dict` convert
back, so checkpoints keep the model's own shapes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from .config import ConfigError
from .distributed import gather_objects
from .med import MED
from .momentum import MomentumTeacher

FROZEN_MODES = ("shard", "replicate")
_SCALARS = "_qformer_fsdp_scalars"  # attribute of a module: names of its 0-dim parameters made 1-D
_ROOT = "_qformer_fsdp_root"  # attribute of every module of a sharded tree: its root (unregistered)


@dataclass
class ShardingPlan:
    """What :func:`shard_` did (reported by the run, asserted by tests)."""

    units: list[str] = field(default_factory=list)  # module names given their own fully_shard ("" = the root)
    replicated: list[str] = field(default_factory=list)  # frozen parameters kept whole on every rank
    scalars: list[str] = field(default_factory=list)  # 0-dim parameters made 1-element 1-D


def fsdp2_active(accelerator: Any) -> bool:
    """Whether ``accelerate`` was configured for FSDP (then FSDP2, else :class:`ConfigError`).

    accelerate 1.x selects FSDP only on accelerator devices; on a CPU machine an FSDP config
    runs as DDP over gloo (accelerate/state.py: the ``ACCELERATE_USE_FSDP`` switch sits under
    the GPU/XPU/NPU distributed types, ``MULTI_CPU`` is not among them)."""
    if str(getattr(accelerator, "distributed_type", "")).split(".")[-1] != "FSDP":
        return False
    if not accelerator.is_fsdp2:
        raise ConfigError("FSDP1 (fsdp_version: 1) cannot train a model that mixes frozen and trainable parameters "
                          "in one wrapped module; set fsdp_version: 2 in the accelerate config "
                          "(configs/accelerate/fsdp_8gpu.yaml)")
    return True


def _scalars_to_1d(module: nn.Module) -> list[str]:
    done = []
    for name, owner in module.named_modules():
        for pname, p in list(owner.named_parameters(recurse=False)):
            if p.ndim == 0:
                setattr(owner, pname, nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
                getattr(owner, _SCALARS, None) or setattr(owner, _SCALARS, set())
                getattr(owner, _SCALARS).add(pname)
                done.append(f"{name}.{pname}" if name else pname)
    return done


def _scalar_names(module: nn.Module) -> set[str]:
    """Full names (relative to ``module``) of parameters that were 0-dim before sharding."""
    return {f"{name}.{p}" if name else p for name, m in module.named_modules() for p in getattr(m, _SCALARS, ())}


def shard_(
    module: nn.Module,
    *,
    frozen: str = "shard",
    device: torch.device | str | None = None,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
    offload_policy: Any = None,
    mesh: Any = None,
) -> ShardingPlan:
    """Apply FSDP2 to ``module`` in place (see the module docstring): one unit per child of an
    ``nn.ModuleList``, children before parents, then the root. Needs an initialised process
    group. ``device``: where the model lives first (FSDP moves the shards to the mesh's device;
    replicated parameters stay where they are)."""
    if frozen not in FROZEN_MODES:
        raise ConfigError(f"fsdp_frozen must be one of {', '.join(FROZEN_MODES)}, got {frozen!r}")
    if any(isinstance(m, MomentumTeacher) for m in module.modules()):
        raise ConfigError("momentum distillation (stage1.momentum_distill) is not supported with FSDP: its EMA teacher "
                          "shares the online model's modules unregistered; use DDP (multi-GPU) for it")
    if device is not None:
        module.to(device)
    plan = ShardingPlan(scalars=_scalars_to_1d(module))
    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    if offload_policy is not None:
        kwargs["offload_policy"] = offload_policy
    if mesh is not None:
        kwargs["mesh"] = mesh
    # The Q-Former stays in the root unit: it projects every layer's cross-attention keys/values up
    # front (MED.image_kv), i.e. calls into its layers outside their forward, where FSDP2 would
    # not have gathered them; it is small (~100M parameters at BLIP-2's size) and trains.
    inside_qformer = {id(m) for q in module.modules() if isinstance(q, MED) for m in q.modules()}
    # Blocks: children of a ModuleList / Sequential (timm keeps ViT blocks in a Sequential) that are
    # themselves made of parameterised modules -- not the Linear / GELU of a small MLP head.
    blocks = {id(child) for m in module.modules() if isinstance(m, (nn.ModuleList, nn.Sequential))
              and id(m) not in inside_qformer for child in m
              if any(any(True for _ in c.parameters()) for c in child.children())}
    named = list(module.named_modules())
    kept_whole: set[int] = set()
    for name, m in reversed(named):  # children before their parents
        if id(m) not in blocks or isinstance(m, FSDPModule):
            continue
        params = list(m.parameters())
        if not params:
            continue
        if frozen == "replicate" and not any(p.requires_grad for p in params):
            kept_whole |= {id(p) for p in params}
            continue
        fully_shard(m, **kwargs)
        plan.units.append(name)
    ignored = {p for p in module.parameters() if id(p) in kept_whole}
    if frozen == "replicate":  # the root's own frozen parameters (embeddings ...) stay whole too
        ignored |= {p for n, p in module.named_parameters() if not p.requires_grad and not isinstance(p, DTensor)}
    plan.replicated = [n for n, p in module.named_parameters() if p in ignored]
    fully_shard(module, ignored_params=ignored or None, **kwargs)
    plan.units.append("")
    for m in module.modules():  # so that gathered() finds the root from any part (e.g. the Blip2 inside)
        object.__setattr__(m, _ROOT, module)
    return plan


def restore_optimizer_params(optimizer: torch.optim.Optimizer, groups: list[list[torch.Tensor]]) -> None:
    """Put back the parameters ``optimizer`` held before ``accelerate.prepare`` under FSDP2.

    accelerate (1.15, ``Accelerator._prepare_fsdp2``) re-maps an optimizer's parameters to the
    sharded ones by the ``data_ptr()`` of each local shard. A rank whose shard of a tiny
    parameter is empty (the query tokens' first dimension is 1, the temperature has one
    element) sees ``data_ptr() == 0`` for all of them, so their entries collide and that rank's
    optimizer ends up holding one empty parameter several times and the others not at all. Our
    model was sharded before ``prepare`` (which then leaves it as it is), so the parameters the
    optimizer was built with are already the right ones."""
    for group, params in zip(optimizer.param_groups, groups):
        group["params"] = list(params)


def plain(t: torch.Tensor) -> torch.Tensor:
    """A ``DTensor`` (e.g. a gradient norm over sharded gradients) as a full plain tensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` is (part of) a tree sharded by :func:`shard_`."""
    return getattr(module, _ROOT, None) is not None


def full_state_dict(model: nn.Module, *, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of a sharded ``model`` on CPU, in the model's own
    shapes, on rank 0 (other ranks: ``{}``). A collective: every rank must call it.
    ``trainable_only``: frozen parameters are not gathered (the frozen LLM can be gigabytes).

    Gathered entry by entry (``DTensor.full_tensor``), so at most one full tensor is in flight."""
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad} if trainable_only else set()
    scalars = _scalar_names(model)
    out = {}
    for key, value in model.state_dict().items():
        if key in frozen:
            continue
        value = plain(value).detach()
        if rank0:
            out[key] = (value.reshape(()) if key in scalars else value).cpu().clone()
    return out


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (e.g. written from :func:`full_state_dict`) into a sharded
    ``model``; every rank passes the whole dict. Keys it lacks keep their values.

    Copied in place, shard by shard: the optimizer and FSDP's all-gather buffers keep pointing
    at the same storage (torch's ``set_model_state_dict`` swaps the parameters, so an optimizer
    built before the load would then step parameters the model no longer holds)."""
    scalars = _scalar_names(model)
    own = dict(model.named_parameters())
    own.update(model.named_buffers())
    with torch.no_grad():
        for name, value in state.items():
            target = own.get(name)
            if target is None:
                continue
            value = value.reshape(1) if name in scalars else value
            if isinstance(target, DTensor):
                local = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements,
                                          src_data_rank=None).to_local()  # this rank's shard, no communication
                target.to_local().copy_(local)
            else:
                target.copy_(value)


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state, keyed by parameter names relative to ``model``, on rank 0
    (others ``{}``). A collective.

    Written here rather than with torch's ``get_optimizer_state_dict``: that one first runs a
    zero-gradient step on optimizers with parameters lacking state (e.g. never reached by a
    gradient), which moves Adam's moments and step count -- no exact resume after it. Ranks
    can differ in which parameters have state (a rank whose shard of a tiny parameter is empty
    may get no gradient for it), so the entries to gather are agreed first; a rank without an
    entry contributes zeros for its (empty) shard."""
    names = {id(p): n for n, p in model.named_parameters()}
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if world > 1 else 0
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # every rank's entries: sharded ones by key, the others (Adam's step) by value
    local = {names[id(p)]: {k: ("sharded" if isinstance(v, DTensor) else v) for k, v in optimizer.state[p].items()}
             for p in params if optimizer.state.get(p)}
    merged: dict[str, dict[str, Any]] = {}
    for part in gather_objects(local, world_size=world):
        for name, entries in part.items():
            merged.setdefault(name, {}).update({k: v for k, v in entries.items() if k not in merged.get(name, {})})
    state: dict[str, dict[str, Any]] = {}
    for p in params:
        name = names[id(p)]
        for key, value in sorted(merged.get(name, {}).items()):
            if value == "sharded":
                own = optimizer.state.get(p, {}).get(key)
                value = plain(own if own is not None else torch.zeros_like(p)).detach().cpu().clone()
            elif isinstance(value, torch.Tensor):
                value = value.detach().cpu().clone()
            state.setdefault(name, {})[key] = value
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups} if rank == 0 else {}


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore :func:`full_optimizer_state_dict`'s output (every rank passes the whole dict):
    hyperparameters by group, each parameter's moments as its own shards (no communication)."""
    params = dict(model.named_parameters())
    if len(state["param_groups"]) != len(optimizer.param_groups):
        raise ConfigError(f"the saved optimizer has {len(state['param_groups'])} parameter groups, this one "
                          f"{len(optimizer.param_groups)}")
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):
        if [params.get(n) for n in saved["params"]] != group["params"]:
            raise ConfigError("the saved optimizer's parameters do not match this model's (names or order differ)")
        group.update({k: v for k, v in saved.items() if k != "params"})
    optimizer.state.clear()
    for name, entries in state["state"].items():
        p = params[name]
        optimizer.state[p] = {k: _like(v, p) for k, v in entries.items()}


def _like(value: Any, param: torch.Tensor) -> Any:
    """An optimizer state entry laid out like ``param``: a parameter-shaped tensor as the same
    shards (a DTensor) on the same device, a scalar (Adam's step) as saved."""
    if not isinstance(value, torch.Tensor) or value.shape != param.shape:
        return value
    if isinstance(param, DTensor):
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                                 src_data_rank=None)
    return value.to(param.device)


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Every FSDP unit of the sharded tree ``module`` belongs to all-gathered and its full
    parameters registered (as during a forward), so methods other than ``forward`` (evaluation:
    ``similarity``, ``caption`` ...) run on a sharded model; a no-op for a model that is not
    sharded. A collective; memory: the whole model per rank.
    Uses FSDP2's parameter groups (``_get_fsdp_state``), a private torch API, because
    ``FSDPModule.unshard`` gathers without registering the full parameters outside forward."""
    root = getattr(module, _ROOT, None)
    if root is None:
        yield
        return
    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    groups = [g for m in units for g in m._get_fsdp_state()._fsdp_param_groups]
    # No resharding after each forward while gathered: a rank may run more forwards than another
    # (uneven evaluation shards), and a unit resharded after its forward would all-gather again.
    resharding = {id(m): any(g.post_forward_mesh_info is not None for g in m._get_fsdp_state()._fsdp_param_groups)
                  for m in units}
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
    for g in groups:
        g.lazy_init()
        g.unshard()
        g.wait_for_unshard()
    try:
        yield
    finally:
        for m in units:
            m.set_reshard_after_forward(resharding[id(m)], recurse=False)
        for g in groups:
            g.reshard()


__all__ = [
    "FROZEN_MODES",
    "ShardingPlan",
    "fsdp2_active",
    "full_optimizer_state_dict",
    "full_state_dict",
    "gathered",
    "is_sharded",
    "load_full_optimizer_state_dict",
    "load_full_state_dict",
    "plain",
    "restore_optimizer_params",
    "shard_",
]
