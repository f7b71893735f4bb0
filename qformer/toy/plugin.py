"""The toy world as a qformer plugin (see :mod:`qformer.plugins`).

* **``toy://NAME`` resources** for adapter cards (:func:`resolve`): the cached toy backbones
  (pretrained once on first use) and the world's splits exported as imagefolder datasets,
  with their VQA questions. Only what a card asks for is prepared: a card that only needs
  the vision tower never exports data, and evaluating on toy data never trains backbones.
* **Caption scores for toy data** (:class:`ToyCaptionScorer`): whether a generated caption
  names each object of the image with the right shape, colour and size.

Options come from the card's ``plugins: {toy: {...}}`` section:

* ``budget``: ``"default"`` (the real toy backbones) or ``"tiny"`` (for smoke tests: trains in
  moments, the backbones barely learn). Each budget is cached under its own key.
* ``sizes``: ``{split: n}``, images exported per split (``DEFAULT_SIZES`` for splits not given).
* ``noise`` (0.4), ``noise_seed`` (0): the corrupted fraction of ``noisy/SPLIT.jsonl`` and its
  seed (:mod:`qformer.toy.noise`); ``clean_fraction`` (0.1): the share of ``clean/SPLIT.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..tokenizer import load_qformer_tokenizer
from .backbones import ensure_toy_backbones
from .cache import default_cache_root, publish_dir
from .export import METADATA_FILE
from .noise import clean_subset_file, noisy_file
from .language import score_caption
from .questions import VQA_FILE
from .scenes import SPLITS
from .specs import ToyPretrainBudget
from .world import ToyWorld

if TYPE_CHECKING:
    from ..plugins import PluginRegistry

__all__ = [
    "BACKBONE_RESOURCES",
    "DEFAULT_SIZES",
    "EXPORT_VERSION",
    "SCHEME",
    "ToyCaptionScorer",
    "ToyOptions",
    "data_root",
    "register",
    "resolve",
    "resource_names",
]

SCHEME = "toy"
#: Images exported per split when the card's ``plugins.toy.sizes`` does not say.
DEFAULT_SIZES: dict[str, int] = {"train": 20_000, "val": 1_000, "test": 1_000}
BUDGETS = {"default": ToyPretrainBudget, "tiny": ToyPretrainBudget.tiny}
#: Resources that come from the cached backbones (asking for any of them may pretrain them).
BACKBONE_RESOURCES: tuple[str, ...] = ("vision_config", "vision_width", "bert_tokenizer", "bert_vocab_size", "lm")
#: Part of the exported data's cache key: bump when the export's files change for the same world.
EXPORT_VERSION = 1


# ----------------------------------------------------------------------------------------
# Options and names
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyOptions:
    """The card's ``plugins.toy`` section, checked."""

    budget: str = "default"
    sizes: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SIZES))
    noise: float = 0.4
    noise_seed: int = 0
    clean_fraction: float = 0.1

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None, *, world: ToyWorld) -> ToyOptions:
        """Check ``options`` against what the toy world offers; a :class:`ConfigError` names
        the first option at fault."""
        options = dict(options or {})
        known = ["budget", "sizes", "noise", "noise_seed", "clean_fraction"]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(f"plugins.toy: unknown option(s) {unknown}; known: {known}")
        budget = options.get("budget", "default")
        if budget not in BUDGETS:
            raise ConfigError(f"plugins.toy.budget must be one of {sorted(BUDGETS)}, got {budget!r}")
        given = options.get("sizes") or {}
        if not isinstance(given, Mapping):
            raise ConfigError(f"plugins.toy.sizes must map splits to image counts, e.g. {DEFAULT_SIZES}, got {given!r}")
        bad = sorted(str(s) for s in set(given) - set(SPLITS))
        if bad:
            raise ConfigError(f"plugins.toy.sizes: unknown split(s) {bad}; known: {list(SPLITS)}")
        sizes = {**DEFAULT_SIZES, **given}
        for split, n in sizes.items():
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= world.split_size(split):
                raise ConfigError(f"plugins.toy.sizes.{split} must be an integer from 1 to "
                                  f"{world.split_size(split)} (the toy world's {split} split), got {n!r}")
        noise, noise_seed = options.get("noise", cls.noise), options.get("noise_seed", cls.noise_seed)
        clean_fraction = options.get("clean_fraction", cls.clean_fraction)
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise <= 1:
            raise ConfigError(f"plugins.toy.noise must be a fraction from 0 to 1, got {noise!r}")
        if isinstance(noise_seed, bool) or not isinstance(noise_seed, int):
            raise ConfigError(f"plugins.toy.noise_seed must be an integer, got {noise_seed!r}")
        if isinstance(clean_fraction, bool) or not isinstance(clean_fraction, (int, float)) or not 0 < clean_fraction <= 1:
            raise ConfigError(f"plugins.toy.clean_fraction must be a fraction in (0, 1], got {clean_fraction!r}")
        return cls(budget=budget, sizes=sizes, noise=float(noise), noise_seed=noise_seed,
                   clean_fraction=float(clean_fraction))


def resource_names(sizes: Mapping[str, int] = DEFAULT_SIZES) -> list[str]:
    """Every ``toy://NAME`` a card may use."""
    data = [name for split in sizes
            for name in (f"data/{split}", f"data/{split}.jsonl", f"vqa/{split}", f"noisy/{split}.jsonl",
                         f"clean/{split}.jsonl")]
    return [*BACKBONE_RESOURCES, *data]


# ----------------------------------------------------------------------------------------
# Resolving
# ----------------------------------------------------------------------------------------


def data_root(world: ToyWorld) -> Path:
    """Where ``world``'s splits are exported: a function of the world (and the export format)
    only, so every backbone budget and every card shares one export per split size."""
    blob = json.dumps({"export": EXPORT_VERSION, "world": world.config()}, sort_keys=True).encode()
    return default_cache_root() / "toy" / f"data-v{EXPORT_VERSION}-{hashlib.sha256(blob).hexdigest()[:12]}"


def _has_metadata(folder: Path) -> bool:
    return (folder / METADATA_FILE).is_file()


def _exported_split(world: ToyWorld, split: str, n: int) -> Path:
    """The folder holding ``split[0:n]`` as an imagefolder, exported (atomically) if missing."""
    target = data_root(world) / f"{split}-{n}"
    if not _has_metadata(target):
        publish_dir(target, lambda tmp: world.export(split, n, tmp, overwrite=True), complete=_has_metadata)
    return target


def _exported_questions(world: ToyWorld, split: str, n: int, folder: Path) -> Path:
    """``vqa.jsonl`` next to the split's images, written once (a pure function of the world)."""
    path = folder / VQA_FILE
    if not path.is_file():
        try:
            world.export_vqa(split, n, folder)
        except FileExistsError:  # another process wrote it meanwhile (the same questions)
            pass
    return path


def _backbone_values(names: set[str], budget: str, *, progress: bool) -> dict[str, Any]:
    backbones = ensure_toy_backbones(progress=progress, budget=BUDGETS[budget]())
    vision = backbones.vision_config()
    out: dict[str, Any] = {
        "vision_config": vision,
        "vision_width": int(vision["model_kwargs"]["embed_dim"]),
        "bert_tokenizer": str(backbones.bert_tokenizer_dir),
        "lm": str(backbones.lm_dir),
    }
    if "bert_vocab_size" in names:
        # As the Q-Former's tokenizer is loaded for training (with [DEC]), not as written.
        out["bert_vocab_size"] = len(load_qformer_tokenizer(backbones.bert_tokenizer_dir))
    return {k: v for k, v in out.items() if k in names}


def resolve(names: set[str], options: dict[str, Any] | None, *, progress: bool = True) -> dict[str, Any]:
    """Values of the ``toy://NAME`` resources in ``names``, preparing only what they need.

    * ``vision_config`` (fields of ``VisionConfig``), ``vision_width``, ``bert_tokenizer`` (a
      directory), ``bert_vocab_size``, ``lm`` (a directory): from the cached toy backbones of
      the ``budget`` option, pretrained first if needed.
    * ``data/SPLIT``: an imagefolder directory holding the first ``sizes[SPLIT]`` samples of
      the split; ``data/SPLIT.jsonl``: its ``metadata.jsonl`` (the same records, which a
      loader can read without indexing every image file); ``vqa/SPLIT``: the split's
      ``vqa.jsonl`` beside its images; ``noisy/SPLIT.jsonl``: the same images with the
      ``noise`` fraction of captions corrupted (:mod:`qformer.toy.noise`); ``clean/SPLIT.jsonl``:
      the first ``clean_fraction`` of the rows, clean. Exported once, atomically, shared by
      concurrent runs.
    """
    world = ToyWorld()
    opts = ToyOptions.parse(options, world=world)
    known = resource_names(opts.sizes)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ConfigError(f"unknown toy resource(s) {[f'{SCHEME}://{n}' for n in unknown]}; known: {known}")
    out: dict[str, Any] = {}
    if set(names) & set(BACKBONE_RESOURCES):
        out.update(_backbone_values(set(names), opts.budget, progress=progress))
    for split in SPLITS:
        wanted = {f"data/{split}", f"data/{split}.jsonl", f"vqa/{split}", f"noisy/{split}.jsonl",
                  f"clean/{split}.jsonl"} & set(names)
        if not wanted:
            continue
        n = opts.sizes[split]
        folder = _exported_split(world, split, n)
        out[f"data/{split}"] = str(folder)
        out[f"data/{split}.jsonl"] = str(folder / METADATA_FILE)
        if f"vqa/{split}" in wanted:
            out[f"vqa/{split}"] = str(_exported_questions(world, split, n, folder))
        if f"noisy/{split}.jsonl" in wanted:
            out[f"noisy/{split}.jsonl"] = str(noisy_file(world, split, n, folder, fraction=opts.noise,
                                                         seed=opts.noise_seed))
        if f"clean/{split}.jsonl" in wanted:
            out[f"clean/{split}.jsonl"] = str(clean_subset_file(folder, fraction=opts.clean_fraction))
    return {k: v for k, v in out.items() if k in names}


# ----------------------------------------------------------------------------------------
# Caption scores
# ----------------------------------------------------------------------------------------


def _metadata_of(spec: Any) -> Path | None:
    """The ``metadata.jsonl`` an eval-data spec points at: a folder's, or the file itself."""
    if not isinstance(spec, (str, os.PathLike)):
        return None
    path = Path(spec)
    if path.is_dir():
        path = path / METADATA_FILE
    return path if path.suffix == ".jsonl" and path.is_file() else None


def _attributes_by_name(meta: Path) -> dict[str, dict[str, Any]] | None:
    """Scene attributes per image file name, or None if ``meta`` is not a toy export's."""
    by_name: dict[str, dict[str, Any]] = {}
    try:
        with meta.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or "attributes" not in row or "file_name" not in row:
                    return None  # a user's dataset: rows without scene attributes
                attributes = row["attributes"]
                by_name[str(Path(row["file_name"]))] = (
                    json.loads(attributes) if isinstance(attributes, str) else attributes)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # not ours to judge: the data loader reports broken files
    return by_name or None


def _lookup(by_name: Mapping[str, dict[str, Any]], image_id: Hashable) -> dict[str, Any] | None:
    """The attributes of ``image_id``: a file name as the export wrote it, or a path ending in
    one (the longest such ending wins)."""
    name = Path(str(image_id))
    if str(name) in by_name:
        return by_name[str(name)]
    parts = name.parts
    for k in range(1, len(parts)):
        match = by_name.get(str(Path(*parts[k:])))
        if match is not None:
            return match
    return None


class ToyCaptionScorer:
    """Scores captions of toy-world images against their scenes (:func:`score_caption`):
    ``recall``, ``precision``, ``exact`` and ``shape_recall`` / ``colour_recall`` /
    ``size_recall`` (reported as ``toy_<key>``)."""

    name = SCHEME

    def references(self, spec: Any, image_ids: Sequence[Hashable]) -> list[dict[str, Any]] | None:
        """Per image, its scene attributes as the toy export stored them in ``metadata.jsonl``;
        None unless ``spec`` is a toy export (a folder, or its ``metadata.jsonl``) that has
        every one of ``image_ids``. An image id is its path relative to the folder (an
        imagefolder's id) or any path that ends in it."""
        meta = _metadata_of(spec)
        by_name = _attributes_by_name(meta) if meta is not None else None
        if by_name is None:
            return None
        out = []
        for image_id in image_ids:
            match = _lookup(by_name, image_id)
            if match is None:
                return None
            out.append(match)
        return out

    def score(self, caption: str, reference: dict[str, Any]) -> dict[str, float]:
        return score_caption(caption, reference)


def register(registry: PluginRegistry) -> None:
    """Entry point named in :data:`qformer.plugins.BUILTIN_PLUGINS`."""
    registry.add_scheme(SCHEME, resolve)
    registry.add_caption_scorer(ToyCaptionScorer())
