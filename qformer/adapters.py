"""Adapter cards: one small YAML file per frozen-backbone pairing (``adapters/*.yaml``).

A card declares the vision tower, the LLM, the Q-Former's shape, the tokenizer, where the
Q-Former is initialised from, the prompts and each stage's training defaults. Recipes pick
one with ``--adapter NAME|PATH`` and override any field from the command line with dotted
``--set`` assignments (``--set stage1.lr=3e-4 model.qformer.num_layers=6``). Every section is
typed and checked when the card is loaded, so a misspelt key fails at once, before anything
is built, downloaded or trained.

Sections::

    name, description
    model:        Blip2Config fields (vision, qformer, llm, embed_dim, ...)
    tokenizer:    the Q-Former's BERT tokenizer (a directory or hub name)
    qformer_init: a BERT checkpoint to initialise the Q-Former from (null: random init)
    arch:         offline architecture of hub-hosted parts (``llm``: a transformers config dict),
                  used only to build the card on the meta device without downloads
    data:         DataConfig: per stage ``train`` / ``eval`` datasets, augmentation, columns
    stage1:       TrainConfig fields, plus ``objective:`` (Stage1Config: loss weights, ramp, and the
                  optional ALBEF/BLIP terms, off by default: ``momentum_distill``, ``momentum``,
                  ``momentum_alpha``, ``momentum_alpha_ramp_steps``, ``momentum_queue_size``,
                  ``momentum_itm``, ``mlm_weight``, ``mlm_probability``)
    stage2:       TrainConfig fields
    instruct:     TrainConfig fields of instruction tuning (recipes/instruct.py)
    eval:         EvalConfig: per-stage evaluation settings
    plugins:      options of resource schemes, per scheme (``plugins: {toy: {budget: tiny}}``)
    expected:     figures from the paper that tests check (parameter counts)

A value ``"SCHEME://NAME"`` stands for something a plugin provides (the built-in ``toy://``
resources are the toy world's cached backbones and data): :func:`resolve_resources` replaces
them, preparing what they need once (see :mod:`qformer.plugins`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import plugins
from .config import Blip2Config, ConfigError, LLMConfig, QFormerConfig, VisionConfig, _from_dict
from .stage1 import Stage1Config
from .training import TrainConfig

#: Where the cards are: ``$QFORMER_ADAPTERS``, else the repository's ``adapters/`` folder (a
#: source checkout or editable install), else the copy shipped inside the package (a wheel).
_PACKAGED = Path(__file__).resolve().parent / "cards"
_CHECKOUT = Path(__file__).resolve().parents[1] / "adapters"
SCHEME_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)://(.*)$")
# URL schemes that are locations, not plugin resources.
_URL_SCHEMES = frozenset({"http", "https", "file", "s3", "gs", "gcs", "az", "hf", "pipe"})


def _placeholder(value: Any) -> tuple[str, str] | None:
    """(scheme, name) of a ``SCHEME://NAME`` plugin value, else None."""
    m = SCHEME_RE.match(value) if isinstance(value, str) else None
    return (m.group(1), m.group(2)) if m and m.group(1) not in _URL_SCHEMES else None


def adapters_dir() -> Path:
    env = os.environ.get("QFORMER_ADAPTERS")
    if env:
        return Path(env)
    return _CHECKOUT if _CHECKOUT.is_dir() and any(_CHECKOUT.glob("*.yaml")) else _PACKAGED


#: A training stage: 1, 2 or "instruct" (instruction tuning, after stage 2).
Stage = int | str
STAGES: tuple[Stage, ...] = (1, 2, "instruct")


def stage_key(stage: Stage) -> str:
    """The card section of a stage: ``stage1``, ``stage2``, ``instruct``."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    return f"stage{stage}" if isinstance(stage, int) else stage


# ---------------------------------------------------------------------------- typed sections
@dataclass(kw_only=True)
class DataSplits:
    """One stage's datasets: anything the data pipeline opens (see :func:`qformer.data.open_caption_source`)."""

    train: Any = None
    eval: Any = None


@dataclass(kw_only=True)
class DataConfig:
    stage1: DataSplits = field(default_factory=DataSplits)
    stage2: DataSplits = field(default_factory=DataSplits)
    # Instruction tuning: train is one dataset or a list, each a spec or {path, task, weight}
    # (qformer.data.open_instruction_dataset); eval a VQA file (question, answers[, question_type]).
    instruct: DataSplits = field(default_factory=DataSplits)
    # BLIP-2's random crop + flip; off makes the frozen tower's output cacheable.
    augment: bool = True
    # Cache the frozen tower's features on disk (needs augment off): the ViT runs once per image.
    cache_features: bool = False
    streaming: bool = False
    caption_column: str | None = None  # default: the first of text / caption / captions / sentences
    image_column: str | None = None  # default: the first of image / image_path / file_name / ...
    # Instruction tuning's VQA rows: one prompt template for all (BLIP-2's VQA fine-tuning; also the
    # held-out questions' prompt) instead of InstructBLIP's ten; null: those ten (held out:
    # "Question: {} Short answer:").
    vqa_template: str | None = None
    # "main": train on the most frequent human answer (InstructBLIP); "weighted": on every distinct
    # answer, weighted by its share of the human answers (BLIP / BLIP-2 VQA fine-tuning).
    vqa_answers: str = "main"

    def __post_init__(self) -> None:
        if self.cache_features and self.augment:
            raise ConfigError("data.cache_features needs data.augment=false: cached features are of un-augmented images")
        if self.vqa_template is not None and (not isinstance(self.vqa_template, str) or "{}" not in self.vqa_template):
            raise ConfigError(f"data.vqa_template needs a '{{}}' for the question, got {self.vqa_template!r}")
        if self.vqa_answers not in ("main", "weighted"):
            raise ConfigError(f"data.vqa_answers must be 'main' or 'weighted', got {self.vqa_answers!r}")

    def instruction_options(self) -> dict[str, Any]:
        """The VQA settings as :func:`qformer.data.open_instruction_mixture`'s keyword arguments."""
        return {"vqa_template": self.vqa_template, "weighted_answers": self.vqa_answers == "weighted"}

    def split(self, stage: Stage) -> DataSplits:
        return getattr(self, stage_key(stage))

    def source_options(self) -> dict[str, str]:
        """Column choices as the data pipeline's keyword arguments."""
        return {k: v for k, v in (("caption_column", self.caption_column), ("image_column", self.image_column)) if v}


@dataclass(kw_only=True)
class RetrievalEval:
    """Stage 1's held-out retrieval: ITC top-k, then ITM re-ranking of the k candidates."""

    k: int = 128
    max_images: int = 1000


@dataclass(kw_only=True)
class CaptionEval:
    """Stage 2's held-out captioning (LAVIS's decoding defaults)."""

    num_beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 1
    max_images: int = 500

    def generate_options(self) -> dict[str, int]:
        return {"num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens}


@dataclass(kw_only=True)
class InstructEval:
    """Instruction tuning's held-out VQA (InstructBLIP's short-answer decoding: beam 5, at most
    10 new tokens, length penalty -1)."""

    num_beams: int = 5
    max_new_tokens: int = 10
    length_penalty: float = -1.0
    max_images: int = 500  # questions asked, at most

    def generate_options(self) -> dict[str, Any]:
        return {"num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens,
                "length_penalty": self.length_penalty}


@dataclass(kw_only=True)
class EvalConfig:
    stage1: RetrievalEval = field(default_factory=RetrievalEval)
    stage2: CaptionEval = field(default_factory=CaptionEval)
    instruct: InstructEval = field(default_factory=InstructEval)

    def of(self, stage: Stage) -> RetrievalEval | CaptionEval | InstructEval:
        return getattr(self, stage_key(stage))


# Keys that moved, for a helpful error instead of a bare "unknown".
_MOVED = {
    "stage1.itc_weight": "stage1.objective.itc_weight",
    "stage1.itm_weight": "stage1.objective.itm_weight",
    "stage1.itg_weight": "stage1.objective.itg_weight",
    "stage1.loss_ramp_steps": "stage1.objective.loss_ramp_steps",
    "stage1.clamp_temperature": "stage1.objective.clamp_temperature",
    "stage2.clamp_temperature": "(stage 2 has no temperature)",
    "data.toy_budget": "plugins.toy.budget",
    "data.toy_sizes": "plugins.toy.sizes",
    "model.qformer.gradient_checkpointing": "stage1.gradient_checkpointing / stage2.gradient_checkpointing",
}


def _typed(cls, data: Any, where: str):
    """``cls`` from a mapping, nested dataclass fields included; unknown keys name their path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    for key in data:
        moved = _MOVED.get(f"{where}.{key}")
        if moved:
            raise ConfigError(f"{where}.{key} is not a setting any more: use {moved}")
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        f = hints.get(key)
        sub = f.default_factory if f is not None and f.default_factory is not dataclasses.MISSING else None
        kwargs[key] = _typed(sub, value, f"{where}.{key}") if isinstance(sub, type) and dataclasses.is_dataclass(sub) \
            else value
    try:
        return _from_dict(cls, kwargs, where)
    except TypeError as e:  # a wrong value type the dataclass could not take
        raise ConfigError(f"{where}: {e}") from e


def has_placeholder(node: Any) -> bool:
    """Whether ``node`` (a value, list or mapping) holds a ``SCHEME://NAME`` plugin value."""
    if isinstance(node, dict):
        return any(has_placeholder(v) for v in node.values())
    if isinstance(node, list):
        return any(has_placeholder(v) for v in node)
    return _placeholder(node) is not None


def _check_keys(cls, data: dict[str, Any], where: str) -> None:
    """Refuse keys that moved (naming where they went) and keys ``cls`` does not have."""
    for key in data:
        if f"{where}.{key}" in _MOVED:
            raise ConfigError(f"{where}.{key} is not a setting any more: use {_MOVED[f'{where}.{key}']}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known fields are {sorted(known)}")


def check_model_section(model: dict[str, Any], where: str = "model") -> None:
    """Refuse unknown keys anywhere in a card's ``model`` section (values may still be
    ``SCHEME://`` placeholders); build each placeholder-free sub-config to check its values."""
    if not isinstance(model, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(model).__name__}")
    for name, cls in (("vision", VisionConfig), ("qformer", QFormerConfig), ("llm", LLMConfig)):
        sub = model.get(name)
        if isinstance(sub, dict):
            _check_keys(cls, sub, f"{where}.{name}")
            if not has_placeholder(sub):
                cls.from_dict(sub)
    _check_keys(Blip2Config, model, where)
    if not has_placeholder(model):
        Blip2Config.from_dict(model)


# ---------------------------------------------------------------------------- the card
@dataclass(kw_only=True)
class AdapterCard:
    name: str
    description: str = ""
    model: dict[str, Any] = field(default_factory=dict)  # Blip2Config fields (may hold SCHEME:// values)
    tokenizer: str | None = None
    qformer_init: str | None = None
    arch: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    stage1: TrainConfig = field(default_factory=TrainConfig)
    stage1_objective: Stage1Config = field(default_factory=Stage1Config)
    stage2: TrainConfig = field(default_factory=TrainConfig)
    instruct: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)
    expected: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str | None = None) -> "AdapterCard":
        """A typed card from a YAML mapping; every key is checked here."""
        data = copy.deepcopy(data)
        where = source or "adapter card"
        known = {"name", "description", "model", "tokenizer", "qformer_init", "arch", "data", "stage1", "stage2",
                 "instruct", "eval", "plugins", "expected"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown section(s) {unknown}; known: {sorted(known)}")
        check_model_section(data.get("model") or {})
        stage1 = dict(data.get("stage1") or {})
        objective = stage1.pop("objective", None)
        plugin_opts = data.get("plugins") or {}
        if not isinstance(plugin_opts, dict) or not all(isinstance(v, dict) for v in plugin_opts.values()):
            raise ConfigError(f"{where}: plugins must map a scheme name to its options, e.g. plugins: {{toy: {{budget: tiny}}}}")
        return cls(
            name=str(data.get("name") or "card"),
            description=str(data.get("description") or ""),
            model=data.get("model") or {},
            tokenizer=data.get("tokenizer"),
            qformer_init=data.get("qformer_init"),
            arch=data.get("arch") or {},
            data=_typed(DataConfig, data.get("data"), "data"),
            stage1=_typed(TrainConfig, stage1, "stage1"),
            stage1_objective=_typed(Stage1Config, objective, "stage1.objective"),
            stage2=_typed(TrainConfig, data.get("stage2"), "stage2"),
            instruct=_typed(TrainConfig, data.get("instruct"), "instruct"),
            eval=_typed(EvalConfig, data.get("eval"), "eval"),
            plugins=plugin_opts,
            expected=data.get("expected") or {},
            source=source,
        )

    def to_dict(self) -> dict[str, Any]:
        """The card as YAML/JSON data (``from_dict(to_dict())`` gives it back)."""
        stage1 = self.stage1.to_dict()
        stage1["objective"] = self.stage1_objective.to_dict()
        return {
            "name": self.name, "description": self.description, "model": copy.deepcopy(self.model),
            "tokenizer": self.tokenizer, "qformer_init": self.qformer_init, "arch": copy.deepcopy(self.arch),
            "data": dataclasses.asdict(self.data), "stage1": stage1, "stage2": self.stage2.to_dict(),
            "instruct": self.instruct.to_dict(),
            "eval": dataclasses.asdict(self.eval), "plugins": copy.deepcopy(self.plugins),
            "expected": copy.deepcopy(self.expected),
        }

    def train_config(self, stage: Stage) -> TrainConfig:
        return copy.deepcopy(getattr(self, stage_key(stage)))

    def blip2_config(self, *, stage: int | None = None) -> Blip2Config:
        """The model config; for stage 1 the LLM is left out (stage 1 never touches it)."""
        if has_placeholder(self.model):
            raise ConfigError(f"adapter {self.name!r}: resolve its SCHEME:// values first (resolve_resources)")
        model = copy.deepcopy(self.model)
        if stage == 1:
            model.pop("llm", None)
        return Blip2Config.from_dict(model)

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


def list_adapters(directory: Path | None = None) -> list[str]:
    return sorted(p.stem for p in (directory or adapters_dir()).glob("*.yaml"))


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
            raise ConfigError(f"--set expects KEY=VALUE with a dotted key, got {item!r}")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set: empty key in {item!r}")
        node = out
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
            node = node[part]
        try:
            node[parts[-1]] = _parse_value(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: the value {value!r} is not valid YAML: {e}") from None
    return out


def load_adapter(name_or_path: str | os.PathLike, overrides: list[str] | None = None,
                 *, directory: Path | None = None) -> AdapterCard:
    """A card by name (``adapters/NAME.yaml``) or by path, with ``overrides`` applied and every
    section typed and checked."""
    directory = directory or adapters_dir()
    path = Path(name_or_path)
    if not path.is_file() and (directory / f"{name_or_path}.yaml").is_file():
        path = directory / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(list_adapters(directory)) or "none found"
        raise ConfigError(f"adapter card {str(name_or_path)!r} not found (known adapters: {known})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an adapter card must be a mapping")
    data = apply_overrides(data, list(overrides or []))
    data.setdefault("name", path.stem)
    return AdapterCard.from_dict(data, source=str(path))


# ---------------------------------------------------------------------------- SCHEME:// values
def _walk(node: Any, fn) -> Any:
    if isinstance(node, dict):
        return {k: _walk(v, fn) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk(v, fn) for v in node]
    return fn(node)


def placeholders(card: AdapterCard) -> dict[str, set[str]]:
    """``{scheme: {names}}`` of every ``SCHEME://NAME`` value in the card."""
    found: dict[str, set[str]] = {}

    def note(value: Any) -> Any:
        p = _placeholder(value)
        if p is not None:
            found.setdefault(p[0], set()).add(p[1])
        return value

    _walk(card.to_dict(), note)
    return found


def resolve_resources(card: AdapterCard, *, progress: bool = True) -> AdapterCard:
    """The card with every ``SCHEME://NAME`` value replaced by what the scheme's plugin
    provides (it may prepare it first: the toy backbones are pretrained once and cached)."""
    wanted = placeholders(card)
    if not wanted:
        return card
    values: dict[str, dict[str, Any]] = {}
    for scheme, names in wanted.items():
        resolver = plugins.resolver(scheme)
        values[scheme] = resolver(set(names), dict(card.plugins.get(scheme) or {}), progress=progress)
        missing = sorted(set(names) - set(values[scheme]))
        if missing:
            raise ConfigError(f"adapter {card.name!r}: the {scheme}:// plugin did not provide {missing}")

    def fn(value: Any) -> Any:
        p = _placeholder(value)
        return copy.deepcopy(values[p[0]][p[1]]) if p is not None and p[0] in values else value

    return AdapterCard.from_dict(_walk(card.to_dict(), fn), source=card.source)


def resolve_value(value: Any, plugin_options: dict[str, dict[str, Any]] | None = None, *, progress: bool = True) -> Any:
    """One value, with a ``SCHEME://NAME`` replaced by what the scheme's plugin provides
    (``plugin_options``: a card's ``plugins`` section); anything else is returned as is."""
    p = _placeholder(value)
    if p is None:
        return value
    scheme, name = p
    got = plugins.resolver(scheme)({name}, dict((plugin_options or {}).get(scheme) or {}), progress=progress)
    if name not in got:
        raise ConfigError(f"the {scheme}:// plugin did not provide {name!r}")
    return got[name]


__all__ = [
    "AdapterCard",
    "CaptionEval",
    "DataConfig",
    "DataSplits",
    "EvalConfig",
    "InstructEval",
    "RetrievalEval",
    "STAGES",
    "Stage",
    "adapters_dir",
    "apply_overrides",
    "check_model_section",
    "has_placeholder",
    "list_adapters",
    "load_adapter",
    "placeholders",
    "resolve_resources",
    "resolve_value",
    "stage_key",
]
