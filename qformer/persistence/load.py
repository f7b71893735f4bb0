"""``Blip2.from_pretrained``: which format a path holds, and its loader."""

from __future__ import annotations

from pathlib import Path

from ..config import Blip2Config
from ..errors import CheckpointError
from ..model import Blip2Model
from .common import CONFIG_NAME, LoadOptions, read_json
from .hf import is_generation, is_hf_blip2, load_hf_generation, load_hf_retrieval
from .instructblip import is_hf_instructblip, load_hf_instructblip
from .lavis import load_lavis
from .ours import is_ours, load_ours
from .report import LoadReport


def load_blip2(cls: type[Blip2Model], path: Path, opts: LoadOptions) -> tuple[Blip2Model, LoadReport]:
    """Build ``cls`` from a model directory saved by qformer, a transformers BLIP-2 directory,
    or a LAVIS ``.pth`` (whose shapes ``opts.config`` gives)."""
    config = opts.config
    if isinstance(config, dict):
        config = opts.config = Blip2Config.from_dict(config)
    if path.is_dir():
        cfg_path = path / CONFIG_NAME
        if not cfg_path.is_file():
            raise CheckpointError(f"{path} has no {CONFIG_NAME}: not a qformer or transformers model directory")
        meta = read_json(cfg_path)
        if is_ours(meta):
            return load_ours(cls, path, meta, opts)
        if is_hf_blip2(meta):
            loader = load_hf_generation if is_generation(meta) else load_hf_retrieval
            return loader(cls, path, meta, opts)
        if is_hf_instructblip(meta):
            return load_hf_instructblip(cls, path, meta, opts)
        raise CheckpointError(
            f"{cfg_path}: neither a qformer checkpoint (format={meta.get('format')!r}) "
            f"nor a transformers BLIP-2 / InstructBLIP config (model_type={meta.get('model_type')!r})"
        )
    if path.suffix in (".pth", ".pt", ".bin"):
        if config is None:
            raise CheckpointError(
                f"{path}: a LAVIS .pth carries no architecture; pass config=Blip2Config(...) with its shapes"
            )
        return load_lavis(cls, path, config, opts)
    if not path.exists():
        raise CheckpointError(f"model not found: {path}")
    raise CheckpointError(f"{path}: expected a model directory or a LAVIS .pth file")


__all__ = ["load_blip2"]
