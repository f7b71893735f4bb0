"""Saving and loading: our own format, transformers' BLIP-2 directories, LAVIS ``.pth`` files,
and BERT initialisation of the Q-Former.

Checkpoints are untrusted input. ``.pth``/``.bin`` files are read with
``torch.load(weights_only=True)``; one that needs arbitrary unpickling is refused with
:class:`UnsafeCheckpointError` before anything in it can run. Nothing here sets
``trust_remote_code``.

Loads are strict by default: every key of the model must be provided and every key of the
file must be used, except keys a format is known not to carry (they are initialised fresh
and listed) or known to carry redundantly (tied copies, buffers: listed as dropped).
Shapes are checked against the model before any weight is copied.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from .config import Blip2Config, ConfigError, LLMConfig, QFormerConfig, VisionConfig
from .convert import Converted, bert_to_qformer, hf_retrieval_to_ours, lavis_to_ours

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from .model import Blip2

FORMAT = "qformer"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Where the vision tower's own (timm / transformers) parameter names start in our state dict.
VISION_PREFIX = "vision.model."


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the model; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """The file needs arbitrary unpickling (code execution) and was refused."""


@dataclass
class LoadReport:
    source: str
    missing: list[str] = field(default_factory=list)  # model keys the file lacks (an error when strict)
    unexpected: list[str] = field(default_factory=list)  # file keys with no place in the model (error when strict)
    initialized: dict[str, str] = field(default_factory=dict)  # model keys set fresh, with the reason
    dropped: dict[str, str] = field(default_factory=dict)  # file keys deliberately unused, with the reason
    loaded: int = 0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensors from {self.source}"]
        if self.missing:
            lines.append(f"missing ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        if self.initialized:
            groups: dict[str, list[str]] = {}
            for k, why in self.initialized.items():
                groups.setdefault(why, []).append(k)
            for why, keys in groups.items():
                lines.append(f"initialised fresh ({why}): {_summarise(keys)}")
        if self.dropped:
            groups = {}
            for k, why in self.dropped.items():
                groups.setdefault(why, []).append(k)
            for why, keys in groups.items():
                lines.append(f"ignored ({why}): {_summarise(keys)}")
        return "\n".join(lines)


def _summarise(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


# ---------------------------------------------------------------------------- raw file IO
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
            f"({first}). Only tensors and plain containers are accepted. If you trust this "
            "file, re-save its state dict (e.g. with safetensors) in a trusted environment."
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a (safely loaded) ``.pth``/``.bin``. Training
    checkpoints that wrap the weights (``{"model": ...}`` as LAVIS saves them,
    ``{"state_dict": ...}``, ``{"module": ...}``) are unwrapped."""
    path = Path(path)
    if path.suffix == ".safetensors":
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


def _is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers model directory (single or sharded safetensors/bin)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                sd.update(read_state_dict(directory / shard))
            return sd
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return read_state_dict(directory / name)
    raise CheckpointError(f"{directory} holds no model.safetensors or pytorch_model.bin")


# ---------------------------------------------------------------------------- strict loading
def load_into(
    module: "nn.Module",
    converted: Converted,
    *,
    source: str,
    strict: bool = True,
    absent_ok: dict[str, str] | None = None,
) -> LoadReport:
    """Copy ``converted.state_dict`` into ``module`` after checking names and shapes.

    ``absent_ok`` maps key prefixes the source format is known not to carry to the reason;
    such keys keep their fresh initialisation and are reported, not treated as missing.
    """
    absent_ok = absent_ok or {}
    report = LoadReport(source=source, dropped=dict(converted.dropped))
    own = module.state_dict()
    sd = converted.state_dict
    report.unexpected = sorted(set(converted.unrecognised) | (set(sd) - set(own)))
    for key in sorted(set(own) - set(sd)):
        why = next((r for p, r in absent_ok.items() if key.startswith(p)), None)
        if why is None:
            report.missing.append(key)
        else:
            report.initialized[key] = why
    mismatched = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(sd) & set(own))
        if sd[k].shape != own[k].shape
    ]
    if mismatched:
        raise CheckpointError(f"{source}: shapes do not match the config:\n  " + "\n  ".join(mismatched))
    if strict and not report.ok:
        raise CheckpointError(f"{source}: strict load failed\n{report}")
    usable = {k: v for k, v in sd.items() if k in own}
    with torch.no_grad():
        for k, v in usable.items():
            own[k].copy_(v)
    report.loaded = len(usable)
    return report


# ---------------------------------------------------------------------------- our format
def _atomic_dir(target: Path):
    """Context manager: write into a temp dir next to ``target``, then swap it in, so an
    interrupted save never leaves a half-written checkpoint under the final name."""

    class _Ctx:
        def __enter__(self) -> Path:
            target.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            return self.tmp

        def __exit__(self, exc_type, exc, tb) -> None:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return
            old = None
            if target.exists():
                old = target.parent / f".{target.name}.old-{os.getpid()}"
                os.replace(target, old)
            os.replace(self.tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    return _Ctx()


@dataclass
class LoadOptions:
    """What :meth:`qformer.Blip2.from_pretrained` was asked for, besides the path."""

    config: Blip2Config | None = None
    tokenizer: Any = None
    llm_tokenizer: Any = None
    llm_dtype: str | None = None
    llm_quantization: str | None = None
    strict: bool = True


def _frozen_llm_keys(model: "Blip2") -> list[str]:
    """State-dict keys of the frozen LLM (everything under ``llm.`` but LoRA adapters)."""
    if model.config.llm is None:
        return []
    return [k for k in model.state_dict() if k.startswith("llm.") and "lora_" not in k]


def clean_llm_state_dict(model: "Blip2") -> dict[str, torch.Tensor]:
    """The LLM's own transformers state dict, without LoRA layers (``base_layer`` unwrapped)."""
    from .llm import base_llm

    out = {}
    for key, value in base_llm(model.llm).state_dict().items():
        if "lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


def save_blip2(model: "Blip2", directory: Path, *, include_frozen: bool = True) -> None:
    """Write ``config.json`` + ``model.safetensors`` (+ tokenizers, + ``llm/``) atomically.

    ``include_frozen=True`` makes the directory self-contained: the frozen vision tower is in
    ``model.safetensors`` and the frozen LLM is a transformers directory ``llm/``.
    ``include_frozen=False`` (training checkpoints) keeps only what trains (and small
    buffers); the frozen towers are then rebuilt from ``vision.pretrained`` / ``llm.path``.
    A quantised LLM is never written: it is re-quantised from ``llm.path`` at load.
    """
    config = Blip2Config.from_dict(model.config.to_dict())
    state = model.state_dict()
    drop = set(_frozen_llm_keys(model))
    if not include_frozen:
        if not config.vision.pretrained:
            raise CheckpointError(
                "include_frozen=False leaves the vision tower out, but vision.pretrained does not say "
                "where to load it from; save with include_frozen=True"
            )
        drop |= {k for k in state if k.startswith(VISION_PREFIX)}
    save_llm = config.llm is not None and include_frozen and config.llm.quantization is None
    if config.llm is not None and not save_llm and config.llm.path is None:
        raise CheckpointError("the frozen LLM is not written here and llm.path is unset: it could not be reloaded")
    sd = {k: v.detach().contiguous().cpu() for k, v in state.items() if k not in drop}
    with _atomic_dir(directory) as tmp:
        save_file(sd, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if save_llm:
            from .llm import base_llm

            base_llm(model.llm).save_pretrained(str(tmp / "llm"), state_dict=clean_llm_state_dict(model))
            model.llm_tokenizer.save_pretrained(str(tmp / "llm"))
            config.llm.path, config.llm.hf_config = "llm", None
        if model.llm_tokenizer is not None:
            model.llm_tokenizer.save_pretrained(str(tmp / "llm_tokenizer"))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": type(model).__name__,
            "include_frozen": include_frozen,
            "config": config.to_dict(),
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def _load_tokenizer(tokenizer: Any, fallback_dir: Path | None):
    from .tokenizer import load_qformer_tokenizer

    if tokenizer is None:
        if fallback_dir is not None and any(
            (fallback_dir / n).is_file() for n in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
        ):
            return load_qformer_tokenizer(fallback_dir)
        return None
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_qformer_tokenizer(tokenizer)
    return tokenizer


def _load_llm_tokenizer(tokenizer: Any, *candidates: Any):
    from transformers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    for cand in ([tokenizer] if tokenizer is not None else []) + [c for c in candidates if c is not None]:
        if Path(str(cand)).is_dir() or tokenizer is not None:
            return AutoTokenizer.from_pretrained(str(cand), trust_remote_code=False)
    return None


def load_blip2(cls, path: Path, opts: LoadOptions):
    config = opts.config
    if isinstance(config, dict):
        config = opts.config = Blip2Config.from_dict(config)
    if path.is_dir():
        cfg_path = path / CONFIG_NAME
        if not cfg_path.is_file():
            raise CheckpointError(f"{path} has no {CONFIG_NAME}: not a qformer or transformers model directory")
        meta = _read_json(cfg_path)
        if meta.get("format") == FORMAT:
            return _load_ours(cls, path, meta, opts)
        if meta.get("model_type") == "blip-2":
            archs = meta.get("architectures") or []
            if "Blip2ForConditionalGeneration" in archs or ("text_config" in meta and "Blip2ForImageTextRetrieval" not in archs):
                return _load_hf_generation(cls, path, meta, opts)
            return _load_hf_retrieval(cls, path, meta, opts)
        raise CheckpointError(
            f"{cfg_path}: neither a qformer checkpoint (format={meta.get('format')!r}) "
            f"nor a transformers BLIP-2 config (model_type={meta.get('model_type')!r})"
        )
    if path.suffix in (".pth", ".pt", ".bin"):
        if config is None:
            raise CheckpointError(
                f"{path}: a LAVIS .pth carries no architecture; pass config=Blip2Config(...) with its shapes"
            )
        return _load_lavis(cls, path, config, opts)
    raise CheckpointError(f"{path}: expected a model directory or a LAVIS .pth file")


def _override_llm(config: Blip2Config, opts: LoadOptions) -> None:
    if config.llm is None:
        return
    if opts.llm_dtype is not None:
        config.llm.dtype = opts.llm_dtype
    if opts.llm_quantization is not None:
        config.llm.quantization = opts.llm_quantization
    config.llm.__post_init__()


def _load_ours(cls, path: Path, meta: dict, opts: LoadOptions):
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer qformer (format_version {meta['format_version']})")
    config = Blip2Config.from_dict(meta["config"])
    if config.llm is not None and config.llm.path is not None and not os.path.isabs(config.llm.path):
        if (path / config.llm.path).is_dir():
            config.llm.path = str(path / config.llm.path)
    _override_llm(config, opts)
    llm_tok = None
    if config.llm is not None:
        llm_tok = _load_llm_tokenizer(opts.llm_tokenizer, path / "llm_tokenizer", config.llm.path)
    model = cls(config, tokenizer=_load_tokenizer(opts.tokenizer, path), llm_tokenizer=llm_tok)
    sd = read_state_dict(path / WEIGHTS_NAME)
    absent_ok = {k: f"frozen LLM, loaded from {config.llm.path}" for k in _frozen_llm_keys(model)}
    if not any(k.startswith(VISION_PREFIX) for k in sd) and config.vision.pretrained:
        absent_ok[VISION_PREFIX] = f"frozen vision tower, loaded from {config.vision.pretrained!r}"
    report = load_into(model, Converted(state_dict=sd), source=str(path / WEIGHTS_NAME), strict=opts.strict,
                       absent_ok=absent_ok)
    return model, report


def _lavis_vision_weights(sd: dict[str, torch.Tensor], config: Blip2Config) -> dict[str, torch.Tensor]:
    """LAVIS's ``visual_encoder.*`` (EVA) -> the tower's own key names."""
    from .vision import convert_eva_timm_to_blip2_hf, convert_lavis_eva_to_timm

    timm_sd = convert_lavis_eva_to_timm(sd)
    if config.vision.backend == "hf":
        if config.vision.name != "blip_2_vision_model":
            raise CheckpointError(
                f"a LAVIS EVA ViT cannot be loaded into a {config.vision.name!r} tower; "
                "use a timm Eva tower or transformers' blip_2_vision_model"
            )
        return convert_eva_timm_to_blip2_hf(timm_sd)
    return timm_sd


_LAVIS_LLM_PREFIXES = ("opt_model.", "t5_model.")


def _load_lavis(cls, path: Path, config: Blip2Config, opts: LoadOptions):
    """LAVIS ``Blip2Qformer`` (stage 1) or ``Blip2OPT`` / ``Blip2T5`` (stage 2) weights.

    LAVIS saves only trainable tensors, so its files normally lack the frozen ViT and LLM:
    they then come from ``config.vision.pretrained`` and ``config.llm.path``. When the file
    does hold them (``visual_encoder.*``, ``opt_model.*``), they are loaded and checked too.
    """
    config = Blip2Config.from_dict(config.to_dict())
    _override_llm(config, opts)
    sd = read_state_dict(path)
    llm_tok = None
    if config.llm is not None:
        llm_tok = _load_llm_tokenizer(opts.llm_tokenizer, config.llm.path)
    model = cls(config, tokenizer=_load_tokenizer(opts.tokenizer, None), llm_tokenizer=llm_tok)
    body = {k: v for k, v in sd.items() if not k.startswith(_LAVIS_LLM_PREFIXES)}
    converted = lavis_to_ours(body, vision_prefix=None)
    for key in ("opt_proj.", "t5_proj."):
        for k in [k for k in converted.unrecognised if k.startswith(key)]:
            converted.unrecognised.remove(k)
            converted.state_dict["language_projection." + k[len(key):]] = body[k]
    absent_ok: dict[str, str] = {}
    if any(k.startswith("visual_encoder.") for k in sd):
        converted.dropped = {k: v for k, v in converted.dropped.items() if not k.startswith("visual_encoder.")}
        for key, value in _lavis_vision_weights(sd, config).items():
            converted.state_dict[VISION_PREFIX + key] = value
    elif config.vision.pretrained:
        absent_ok[VISION_PREFIX] = f"frozen vision tower not in the LAVIS file; loaded from {config.vision.pretrained!r}"
    # (else the tower would stay random, so its keys are reported as missing)
    llm_sd = {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith(_LAVIS_LLM_PREFIXES)}
    if config.llm is not None:
        source = f"{path} (opt_model / t5_model)" if llm_sd else f"{config.llm.path}"
        if llm_sd:
            load_llm_weights(model, llm_sd, source=source)
        for k in _frozen_llm_keys(model):
            absent_ok[k] = f"frozen LLM, loaded from {source}"
    elif llm_sd:
        converted.unrecognised.extend(k for k in sd if k.startswith(_LAVIS_LLM_PREFIXES))
    report = load_into(model, converted, source=str(path), strict=opts.strict, absent_ok=absent_ok)
    return model, report


def load_llm_weights(model: "Blip2", sd: dict[str, torch.Tensor], *, source: str) -> None:
    """Copy a plain transformers state dict of the LLM into ``model.llm`` (LoRA-wrapped or
    not), strictly: every weight must be given except those tied to the input embeddings."""
    from .llm import base_llm

    lm = base_llm(model.llm)
    params = {k.replace(".base_layer.", "."): t for k, t in lm.state_dict(keep_vars=True).items() if "lora_" not in k}
    unexpected = sorted(set(sd) - set(params))
    emb = lm.get_input_embeddings().weight
    missing = sorted(k for k in set(params) - set(sd) if params[k].data_ptr() != emb.data_ptr())
    bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(params[k].shape)}" for k in set(sd) & set(params)
           if sd[k].shape != params[k].shape]
    if unexpected or missing or bad:
        raise CheckpointError(
            f"{source}: LLM weights do not fit: missing {_summarise(missing)}; unexpected {_summarise(unexpected)}; "
            f"shapes {bad}"
        )
    with torch.no_grad():
        for k, v in sd.items():
            params[k].copy_(v)


def _hf_blip2_parts(meta: dict[str, Any], directory: Path | None) -> tuple[VisionConfig, QFormerConfig]:
    v = dict(meta["vision_config"])
    q = dict(meta["qformer_config"])
    mean, std = None, None
    if directory is not None and (directory / "preprocessor_config.json").is_file():
        pre = _read_json(directory / "preprocessor_config.json")
        mean, std = pre.get("image_mean"), pre.get("image_std")
    vision_kwargs = {k: v[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
        "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout", "qkv_bias", "initializer_range",
    ) if k in v}
    vision = VisionConfig(
        backend="hf",
        name="blip_2_vision_model",
        model_kwargs=vision_kwargs,
        feature_layer=-1,
        image_size=v.get("image_size", 224),
        **({"mean": tuple(mean), "std": tuple(std)} if mean and std else {}),
    )
    qformer = QFormerConfig(
        vocab_size=q.get("vocab_size", 30522),
        hidden_size=q.get("hidden_size", 768),
        num_layers=q.get("num_hidden_layers", 12),
        num_heads=q.get("num_attention_heads", 12),
        intermediate_size=q.get("intermediate_size", 3072),
        hidden_act=q.get("hidden_act", "gelu"),
        hidden_dropout=q.get("hidden_dropout_prob", 0.1),
        attention_dropout=q.get("attention_probs_dropout_prob", 0.1),
        max_position_embeddings=q.get("max_position_embeddings", 512),
        layer_norm_eps=q.get("layer_norm_eps", 1e-12),
        pad_token_id=q["pad_token_id"] if q.get("pad_token_id") is not None else 0,
        initializer_range=q.get("initializer_range", 0.02),
        cross_attention_freq=q.get("cross_attention_frequency", 2),
        encoder_width=q.get("encoder_hidden_size", v.get("hidden_size", 1408)),
        num_query_tokens=meta.get("num_query_tokens", 32),
        text_input=bool(q.get("use_qformer_text_input", False)),
    )
    return vision, qformer


def blip2_config_from_hf(meta: dict[str, Any], directory: Path | None = None) -> Blip2Config:
    """Our config equivalent to a transformers ``Blip2Config`` dict (retrieval or generation)."""
    vision, qformer = _hf_blip2_parts(meta, directory)
    llm = None
    if "text_config" in meta and meta.get("text_config") is not None and (
        "Blip2ForConditionalGeneration" in (meta.get("architectures") or []) or not qformer.text_input
    ):
        text = {k: v for k, v in meta["text_config"].items() if not k.startswith("_") and k != "transformers_version"}
        llm = LLMConfig(hf_config=text, dtype="bfloat16")
    retrieval = llm is None
    if retrieval:
        qformer.text_input = True
    return Blip2Config(
        vision=vision,
        qformer=qformer,
        llm=llm,
        stage1_heads=retrieval,
        embed_dim=meta.get("image_text_hidden_size", 256),
        ln_vision_eps=vision.model_kwargs.get("layer_norm_eps", 1e-6),
    )


def _load_hf_retrieval(cls, path: Path, meta: dict, opts: LoadOptions):
    config = blip2_config_from_hf(meta, path)
    model = cls(config, tokenizer=_load_tokenizer(opts.tokenizer, path))
    converted = hf_retrieval_to_ours(read_hf_weights(path), vision_prefix=VISION_PREFIX)
    absent_ok = {
        "temp": "transformers' retrieval model has no temperature; set to temp_init",
        "qformer.lm_head.": "transformers' retrieval model has no LM head; needed only for ITG training",
    }
    report = load_into(model, converted, source=str(path), strict=opts.strict, absent_ok=absent_ok)
    return model, report


def build_llm_from_state_dict(llm_config: LLMConfig, sd: dict[str, torch.Tensor], *, source: str):
    """A frozen LLM from a config and a state dict, without a random initialisation first
    (parameters start on the meta device and are assigned the checkpoint's tensors)."""
    from accelerate import init_empty_weights

    from .llm import _auto_class, hf_config_of, torch_dtype, use_vocab_head

    hf_config = hf_config_of(llm_config)
    dtype = torch_dtype(llm_config.dtype)
    with init_empty_weights():
        model = _auto_class(hf_config).from_config(hf_config, dtype=dtype)
    own = model.state_dict()
    unexpected = sorted(set(sd) - set(own))
    if unexpected:
        raise CheckpointError(f"{source}: LLM weights with no place in {type(model).__name__}: {_summarise(unexpected)}")
    bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd if sd[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{source}: LLM weight shapes do not match its config:\n  " + "\n  ".join(bad))
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False, assign=True)
    # Tie only what the checkpoint leaves out: FlanT5 stores an lm_head that differs from its
    # input embeddings even though transformers 5 configures T5 as tied (its own loader keeps
    # such a head untied too).
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if isinstance(tied, dict):
        for target, source in tied.items():
            if target not in sd and source in sd:
                owner, _, leaf = target.rpartition(".")
                setattr(model.get_submodule(owner) if owner else model, leaf, model.get_parameter(source))
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{source}: LLM weights missing from the checkpoint: {_summarise(still_meta)}")
    model.requires_grad_(False)
    use_vocab_head(model)
    return model.eval()


def _load_hf_generation(cls, path: Path, meta: dict, opts: LoadOptions):
    """transformers ``Blip2ForConditionalGeneration`` (Salesforce/blip2-opt-*, blip2-flan-t5-*)."""
    config = blip2_config_from_hf(meta, path)
    if config.llm is None:
        raise CheckpointError(f"{path}: a Blip2ForConditionalGeneration config without text_config")
    _override_llm(config, opts)
    sd = read_hf_weights(path)
    llm_sd = {k[len("language_model."):]: v for k, v in sd.items() if k.startswith("language_model.")}
    if not llm_sd:
        raise CheckpointError(f"{path}: no language_model.* weights")
    if config.llm.quantization is not None:
        # bitsandbytes quantises while loading from a transformers directory: write the LLM
        # out once (cached by content) and load it from there.
        config.llm.path = _extract_llm(path, config.llm, llm_sd)
        config.llm.hf_config = None
        llm = None
    else:
        llm = build_llm_from_state_dict(config.llm, llm_sd, source=str(path))
    llm_tok = _load_llm_tokenizer(opts.llm_tokenizer, path)
    model = cls(config, tokenizer=None, llm_tokenizer=llm_tok, llm=llm)
    rest = {k: v for k, v in sd.items() if not k.startswith("language_model.")}
    converted = hf_retrieval_to_ours(rest, vision_prefix=VISION_PREFIX)
    absent_ok = {k: "frozen LLM (language_model.*), loaded separately" for k in _frozen_llm_keys(model)}
    report = load_into(model, converted, source=str(path), strict=opts.strict, absent_ok=absent_ok)
    return model, report


def _extract_llm(path: Path, llm_config: LLMConfig, llm_sd: dict[str, torch.Tensor]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(llm_sd)[:8]:
        digest.update(name.encode())
        digest.update(llm_sd[name].flatten()[:64].float().numpy().tobytes())
    root = Path(os.environ.get("QFORMER_CACHE", Path.home() / ".cache" / "qformer")) / "extracted-llm"
    target = root / f"{path.name}-{digest.hexdigest()[:16]}"
    if not (target / "config.json").is_file():
        with _atomic_dir(target) as tmp:
            llm = build_llm_from_state_dict(LLMConfig(hf_config=llm_config.hf_config, dtype=llm_config.dtype), llm_sd,
                                            source=str(path))
            llm.save_pretrained(str(tmp))
    return str(target)


# ---------------------------------------------------------------------------- stage 1 -> 2
_STAGE1_ONLY = ("vision_proj.", "text_proj.", "itm_head.", "temp", "qformer.lm_head.",
                "qformer.embeddings.word_embeddings.", "qformer.embeddings.position_embeddings.")


def init_from_stage1(model: "Blip2", directory: str | os.PathLike, *, strict: bool = True) -> LoadReport:
    """Start a stage-2 model from a stage-1 model directory saved by qformer: the vision
    side, ln_vision, the queries and the Q-Former are copied (shapes checked); the stage-1-only
    parts the stage-2 model does not have (text embeddings and FFNs, LM head, ITC/ITM heads)
    are listed as dropped; the language projection and the LLM start fresh / frozen."""
    directory = Path(directory)
    meta = _read_json(directory / CONFIG_NAME) if (directory / CONFIG_NAME).is_file() else {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory} is not a model saved by qformer (run stage 1 first, or pass --init-from)")
    sd = read_state_dict(directory / WEIGHTS_NAME)
    own = model.state_dict()
    conv = Converted(state_dict={})
    for key, value in sd.items():
        if key in own:
            conv.state_dict[key] = value
        elif key.startswith(_STAGE1_ONLY) or ".ffn." in key:
            conv.dropped[key] = "stage-1 only (text side / ITC-ITM heads), not used in stage 2"
        else:
            conv.unrecognised.append(key)
    absent_ok = {"language_projection.": "new in stage 2"}
    absent_ok.update({k: "frozen LLM" for k in _frozen_llm_keys(model)})
    absent_ok.update({k: "LoRA adapter, new in stage 2" for k in own if k.startswith("llm.") and "lora_" in k})
    if not any(k.startswith(VISION_PREFIX) for k in sd) and model.config.vision.pretrained:
        absent_ok[VISION_PREFIX] = f"frozen vision tower, loaded from {model.config.vision.pretrained!r}"
    return load_into(model, conv, source=str(directory), strict=strict, absent_ok=absent_ok)


# ---------------------------------------------------------------------------- BERT init
def init_qformer_from_bert(model: "Blip2", path: str | os.PathLike, *, strict: bool = True) -> LoadReport:
    """Initialise the Q-Former from a transformers BERT checkpoint directory (as BLIP-2 does
    from bert-base-uncased): embeddings, self-attention, text FFN and LM head are copied;
    the text FFN is also copied into the query FFN; cross-attention stays freshly
    initialised. A vocabulary that grew (``[DEC]`` added) keeps the new rows' init."""
    directory = Path(path)
    sd = read_hf_weights(directory) if directory.is_dir() else read_state_dict(directory)
    conv = bert_to_qformer(sd)
    med = model.qformer
    own = med.state_dict()
    # Grown vocabulary: copy the old rows into the fresh matrix.
    for key in ("embeddings.word_embeddings.weight", "lm_head.bias"):
        if key in conv.state_dict and key in own and conv.state_dict[key].shape[0] < own[key].shape[0]:
            grown = own[key].clone()
            grown[: conv.state_dict[key].shape[0]] = conv.state_dict[key]
            conv.state_dict[key] = grown
    # BLIP-2 starts the query FFN as a copy of the text FFN.
    for key in list(conv.state_dict):
        if ".ffn." in key:
            conv.state_dict[key.replace(".ffn.", ".ffn_query.")] = conv.state_dict[key]
    absent_ok = {f"layers.{i}.cross_attn.": "new cross-attention layer" for i in med.cross_attention_layers}
    report = load_into(med, conv, source=str(directory), strict=strict, absent_ok=absent_ok)
    return report


__all__ = [
    "CheckpointError",
    "LoadReport",
    "UnsafeCheckpointError",
    "blip2_config_from_hf",
    "init_from_stage1",
    "init_qformer_from_bert",
    "load_into",
    "read_hf_weights",
    "read_state_dict",
    "safe_torch_load",
    "save_blip2",
]
