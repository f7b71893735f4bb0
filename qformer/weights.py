"""Tensor files, read safely, and strict loading of a state dict into a module.

The bottom layer that the frozen towers (reading their own weight files) and
:mod:`qformer.persistence` (every checkpoint format) share. Checkpoints are untrusted input:
``.pth`` / ``.bin`` files are read with ``torch.load(weights_only=True)``, and one that needs
arbitrary unpickling is refused with :class:`~qformer.errors.UnsafeCheckpointError` before
anything in it can run.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, UnsafeCheckpointError, WeightsMismatchError


def short_list(keys: Sequence[str], limit: int = 20) -> str:
    """``[a, b, ... (N more)]``: a key list short enough for an error message."""
    keys = list(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"[{', '.join(keys[:limit])}{more}]"


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file.

    A pickle that references anything beyond tensors and plain containers (which is how a
    malicious checkpoint runs code) raises :class:`UnsafeCheckpointError`; nothing in it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"refused to load {path}: it needs arbitrary unpickling, which can run code "
            f"({first}). Only tensors and plain containers are accepted. If you trust this file, re-save its "
            "state dict (e.g. with safetensors) in a trusted environment."
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e


def _is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a (safely loaded) ``.pth``/``.bin``. Training
    checkpoints that wrap the weights (``{"model": ...}`` as LAVIS saves them,
    ``{"state_dict": ...}``, ``{"module": ...}``) are unwrapped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if not path.is_file():
            raise CheckpointError(f"checkpoint file not found: {path}")
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
    obj = safe_torch_load(path)
    if isinstance(obj, dict) and not _is_tensor_mapping(obj):
        for key in ("model", "state_dict", "module"):
            if _is_tensor_mapping(obj.get(key)):
                obj = obj[key]
                break
    if not _is_tensor_mapping(obj):
        raise CheckpointError(
            f"{path} holds no state dict (a mapping of names to tensors, possibly under 'model', "
            f"'state_dict' or 'module'); found {type(obj).__name__}"
        )
    return dict(obj)


def hf_weight_files(directory: str | os.PathLike) -> list[Path]:
    """The weight files of a transformers model directory (sharded or not), safetensors first."""
    directory = Path(directory)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid weight index: {e}") from e
            return [directory / shard for shard in sorted(set(weight_map.values()))]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    raise CheckpointError(f"{directory} holds no model.safetensors or pytorch_model.bin (or their .index.json)")


def read_hf_weights(directory: str | os.PathLike, *, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a transformers model directory (single or sharded safetensors/bin).

    ``prefix``: keep only the keys under it, with the prefix removed (safetensors files are then
    read key by key, so the other tensors are never loaded)."""
    out: dict[str, torch.Tensor] = {}
    for path in hf_weight_files(directory):
        if path.suffix == ".safetensors" and prefix:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                for k in f.keys():
                    if k.startswith(prefix):
                        out[k[len(prefix):]] = f.get_tensor(k)
            continue
        sd = read_state_dict(path)
        out.update({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)} if prefix else sd)
    return out


def strict_load(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str, target: str) -> None:
    """Load ``state_dict`` into ``module`` only if every key and shape fits.

    Nothing is copied unless everything fits, so a failed load leaves the module untouched.

    Raises:
        WeightsMismatchError: naming ``source``, ``target`` and the missing, unexpected and
            mis-shaped keys.
    """
    expected = module.state_dict()
    given = dict(state_dict)
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    not_tensors = sorted(k for k in set(given) & set(expected) if not isinstance(given[k], torch.Tensor))
    mismatched = sorted(
        f"{k}: given {tuple(given[k].shape)}, expected {tuple(expected[k].shape)}"
        for k in set(given) & set(expected)
        if k not in not_tensors and tuple(given[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched or not_tensors:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) {short_list(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) {short_list(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es) {short_list(mismatched)}")
        if not_tensors:
            parts.append(f"non-tensor value(s) for {short_list(not_tensors)}")
        raise WeightsMismatchError(f"{source} does not fit {target}: " + "; ".join(parts))
    module.load_state_dict(given, strict=True)


__all__ = [
    "hf_weight_files",
    "read_hf_weights",
    "read_state_dict",
    "safe_torch_load",
    "short_list",
    "strict_load",
]
