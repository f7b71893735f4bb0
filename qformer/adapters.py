"""Adapter cards: one small YAML file per frozen-backbone pairing (``adapters/*.yaml``).

A card declares the vision tower, the LLM, the Q-Former's shape, the tokenizer, where the
Q-Former is initialised from, the prompts and each stage's training defaults. Recipes pick
one with ``--adapter NAME|PATH`` and override any field from the command line with dotted
``--set`` assignments (``--set stage1.lr=3e-4 model.qformer.num_layers=6``).

Sections::

    name, description
    model:        Blip2Config fields (vision, qformer, llm, embed_dim, ...)
    tokenizer:    the Q-Former's BERT tokenizer (a directory or hub name)
    qformer_init: a BERT checkpoint to initialise the Q-Former from (null: random init)
    arch:         offline architecture of hub-hosted parts (``llm``: a transformers config dict),
                  used only to build the card on the meta device without downloads
    data:         per stage, ``train`` / ``eval`` dataset specs (see qformer.data.open_caption_dataset)
    stage1, stage2: TrainConfig fields;  eval: evaluation settings per stage
    expected:     figures from the paper that tests check (parameter counts)

Values starting with ``toy://`` refer to the built-in toy world's cached backbones; they
are resolved (and the backbones pretrained once, if needed) by :func:`resolve_toy`.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import Blip2Config, ConfigError

ADAPTERS_DIR = Path(os.environ.get("QFORMER_ADAPTERS", Path(__file__).resolve().parents[1] / "adapters"))
TOY_SCHEME = "toy://"


@dataclass(kw_only=True)
class AdapterCard:
    name: str
    description: str = ""
    model: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    qformer_init: str | None = None
    arch: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    stage1: dict[str, Any] = field(default_factory=dict)
    stage2: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    expected: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    def blip2_config(self, *, stage: int | None = None) -> Blip2Config:
        """The model config; for stage 1 the LLM is left out (stage 1 never touches it)."""
        model = copy.deepcopy(self.model)
        if stage == 1:
            model.pop("llm", None)
        return Blip2Config.from_dict(model)

    def train_config(self, stage: int):
        from .training import TrainConfig

        return TrainConfig.from_dict(dict(getattr(self, f"stage{stage}")))

    def to_dict(self) -> dict[str, Any]:
        return {k: copy.deepcopy(getattr(self, k)) for k in self.__dataclass_fields__ if k != "source"}

    def meta_config(self) -> Blip2Config:
        """The full config with hub-hosted parts replaced by their offline architecture, for
        building on the meta device (parameter counts) without any download."""
        model = copy.deepcopy(self.model)
        model.get("vision", {})["pretrained"] = False
        if model.get("llm") is not None:
            arch = self.arch.get("llm")
            if arch is None and model["llm"].get("hf_config") is None:
                raise ConfigError(f"adapter {self.name!r}: arch.llm is needed to build the LLM offline")
            if arch is not None:
                model["llm"]["hf_config"], model["llm"]["path"] = arch, None
            model["llm"]["quantization"] = None
        return Blip2Config.from_dict(model)


def list_adapters(directory: Path = ADAPTERS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def _parse_value(text: str) -> Any:
    """YAML, plus numbers YAML 1.1 leaves as strings (``3e-4``)."""
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str):
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
    return value


def apply_overrides(data: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """``["stage1.lr=3e-4", "model.qformer.num_layers=6"]`` -> a new dict with those set.
    Values are YAML (numbers, booleans, null, lists). A path into a non-mapping is an error."""
    out = copy.deepcopy(data)
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE with a dotted key, got {item!r}")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ValueError(f"--set: empty key in {item!r}")
        node = out
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ValueError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
            node = node[part]
        node[parts[-1]] = _parse_value(value)
    return out


def load_adapter(name_or_path: str | os.PathLike, overrides: list[str] | None = None,
                 *, directory: Path = ADAPTERS_DIR) -> AdapterCard:
    """A card by name (``adapters/NAME.yaml``) or by path, with ``overrides`` applied."""
    path = Path(name_or_path)
    if not path.is_file() and (directory / f"{name_or_path}.yaml").is_file():
        path = directory / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(list_adapters(directory)) or "none found"
        raise FileNotFoundError(f"adapter card {str(name_or_path)!r} not found (known adapters: {known})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an adapter card must be a mapping")
    data = apply_overrides(data, list(overrides or []))
    known_fields = set(AdapterCard.__dataclass_fields__) - {"source"}
    unknown = sorted(set(data) - known_fields)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; known: {sorted(known_fields)}")
    if "name" not in data:
        data["name"] = path.stem
    return AdapterCard(**data, source=str(path))


def _walk(node: Any, fn) -> Any:
    if isinstance(node, dict):
        return {k: _walk(v, fn) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk(v, fn) for v in node]
    return fn(node)


def uses_toy(card: AdapterCard) -> bool:
    found = []
    _walk(card.to_dict(), lambda v: found.append(v) if isinstance(v, str) and v.startswith(TOY_SCHEME) else v)
    return bool(found)


def toy_resources(card: AdapterCard, *, progress: bool = True) -> dict[str, Any]:
    """What ``toy://NAME`` values stand for: the cached toy backbones (pretrained once, a
    few minutes on a CPU) and the toy world's splits exported as imagefolder datasets."""
    import shutil
    import tempfile

    from .toy import ToyPretrainBudget, ToyWorld, ensure_toy_backbones
    from .tokenizer import load_qformer_tokenizer

    # data.toy_budget: "default" (the real toy backbones) or "tiny" (seconds; for smoke tests:
    # the backbones barely learn). Each budget is cached under its own key.
    budget_name = str((card.data or {}).get("toy_budget", "default"))
    budgets = {"default": ToyPretrainBudget, "tiny": ToyPretrainBudget.tiny}
    if budget_name not in budgets:
        raise ConfigError(f"adapter {card.name!r}: data.toy_budget must be one of {sorted(budgets)}, got {budget_name!r}")
    backbones = ensure_toy_backbones(progress=progress, budget=budgets[budget_name]())
    world = ToyWorld()
    sizes = dict((card.data or {}).get("toy_sizes", {"train": 20000, "val": 1000, "test": 1000}))
    out: dict[str, Any] = {}
    for split, n in sizes.items():
        target = backbones.root / "data" / f"{split}-{n}"
        if not (target / "metadata.jsonl").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            world.export(split, int(n), tmp, overwrite=True)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        out[f"data/{split}"] = str(target)  # imagefolder (datasets): ~25 s to index 30k files
        out[f"data/{split}.jsonl"] = str(target / "metadata.jsonl")  # the same records, read directly: ~3 s
    vision = backbones.vision_config()
    out.update({
        "vision_config": vision,
        "vision_width": int(vision["model_kwargs"]["embed_dim"]),
        "bert_tokenizer": str(backbones.bert_tokenizer_dir),
        "bert_vocab_size": len(load_qformer_tokenizer(backbones.bert_tokenizer_dir)),
        "lm": str(backbones.lm_dir),
    })
    return out


def resolve_toy(card: AdapterCard, *, progress: bool = True) -> AdapterCard:
    """Replace every ``toy://NAME`` value by what it stands for (:func:`toy_resources`)."""
    if not uses_toy(card):
        return card
    resources = toy_resources(card, progress=progress)

    def fn(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(TOY_SCHEME):
            key = value[len(TOY_SCHEME):]
            if key not in resources:
                raise ConfigError(f"adapter {card.name!r}: unknown toy resource {value!r}; known: {sorted(resources)}")
            return copy.deepcopy(resources[key])
        return value

    return AdapterCard(**_walk(card.to_dict(), fn), source=card.source)


__all__ = [
    "ADAPTERS_DIR",
    "AdapterCard",
    "apply_overrides",
    "list_adapters",
    "load_adapter",
    "resolve_toy",
    "toy_resources",
    "uses_toy",
]
