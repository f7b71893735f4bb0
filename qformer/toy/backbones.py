"""Frozen toy backbones: a small timm ViT and a small OPT LM, pretrained once on the toy world.

BLIP-2's premise is that both backbones are *frozen and already competent*: the Q-Former
only learns to bridge them. A randomly initialised tower or LM would make the toy run a
lie (nothing to bridge), and real checkpoints need downloads and far more compute than a
laptop CPU has. So the project pretrains its own tiny backbones on the toy world, once,
and caches them:

* **Vision tower** -- a real ``timm`` ViT trained by dense attribute classification
  (:mod:`qformer.toy.vision_pretraining`).
* **Language model** -- a real ``transformers`` ``OPTForCausalLM`` trained on packed
  paraphrases of the world's captions (:mod:`qformer.toy.lm_pretraining`).
* **Q-Former text tokenizer** -- a WordPiece ``BertTokenizer`` over the world's words
  (:mod:`qformer.toy.tokenizer`).

Both models train with the same small loop (:mod:`qformer.toy.trainer`); their
architectures and the budget are plain data (:mod:`qformer.toy.specs`).

Everything lives under ``~/.cache/qformer/toy/<key>`` (``$QFORMER_CACHE`` replaces
``~/.cache/qformer``), where the key hashes the code version, seed, world, architectures
and training budget. The cache is written atomically (trained in a temporary sibling
directory, then renamed; see :mod:`qformer.toy.cache`), so an interrupted run never leaves
a half-written cache, and its temporary directory is removed (at once, or by the next run
if the process was killed outright).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io import remove_stale_temps
from . import lm_pretraining, vision_pretraining
from .cache import default_cache_root, publish_dir
from .specs import (
    BERT_SUBDIR,
    LM_SUBDIR,
    MANIFEST,
    TOY_BACKBONES_VERSION,
    VISION_CONFIG,
    VISION_SUBDIR,
    VISION_WEIGHTS,
    ToyLMSpec,
    ToyPretrainBudget,
    ToyVisionSpec,
)
from .tokenizer import build_bert_tokenizer, build_lm_tokenizer
from .trainer import torch_threads
from .world import ToyWorld

if TYPE_CHECKING:  # torch is imported when something is trained or loaded, not before
    from torch import nn

__all__ = [
    "TOY_BACKBONES_VERSION",
    "ToyVisionSpec",
    "ToyLMSpec",
    "ToyPretrainBudget",
    "ToyBackbones",
    "ensure_toy_backbones",
    "default_cache_root",
    "toy_cache_key",
    "load_toy_vision_tower",
    "build_lm_tokenizer",
    "build_bert_tokenizer",
]


# ----------------------------------------------------------------------------------------
# Cache keys
# ----------------------------------------------------------------------------------------


def _spec_record(
    seed: int, world: ToyWorld, vision: ToyVisionSpec, lm: ToyLMSpec, budget: ToyPretrainBudget
) -> dict[str, Any]:
    # Thread count is left out: it changes speed (and float summation order), not what is
    # trained, so a cache trained with 1 thread on a busy machine serves everyone.
    budget_fields = {k: v for k, v in dataclasses.asdict(budget).items() if k != "threads"}
    return {
        "version": TOY_BACKBONES_VERSION,
        "seed": seed,
        "world": world.config(),
        "vision": dataclasses.asdict(vision),
        "lm": dataclasses.asdict(lm),
        "budget": budget_fields,
    }


def toy_cache_key(record: dict[str, Any]) -> str:
    """Short hash of a spec record: the cache directory's name."""
    blob = json.dumps(record, sort_keys=True).encode()
    return f"v{TOY_BACKBONES_VERSION}-" + hashlib.sha256(blob).hexdigest()[:12]


# ----------------------------------------------------------------------------------------
# Result handle and loaders
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyBackbones:
    """Paths of a complete toy-backbone cache, plus what pretraining measured.

    * ``vision_dir``: ``config.json`` (timm name, kwargs, normalisation) + ``model.safetensors``.
    * ``lm_dir``: ``save_pretrained`` of an ``OPTForCausalLM`` and its tokenizer.
    * ``bert_tokenizer_dir``: ``save_pretrained`` of the Q-Former's ``BertTokenizer``.
    """

    root: Path
    vision_dir: Path
    lm_dir: Path
    bert_tokenizer_dir: Path
    manifest: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dir(cls, root: str | Path) -> ToyBackbones:
        root = Path(root)
        manifest = json.loads((root / MANIFEST).read_text())
        return cls(root, root / VISION_SUBDIR, root / LM_SUBDIR, root / BERT_SUBDIR, manifest)

    @property
    def summary(self) -> dict[str, Any]:
        """Timings and held-out metrics recorded when the cache was trained."""
        return self.manifest.get("summary", {})

    def vision_config(self) -> dict[str, Any]:
        """Fields for ``qformer.config.VisionConfig.from_dict`` that load the toy tower."""
        cfg = json.loads((self.vision_dir / VISION_CONFIG).read_text())
        return {
            "backend": "timm",
            "name": cfg["timm_name"],
            "pretrained": str(self.vision_dir / VISION_WEIGHTS),
            "model_kwargs": cfg["timm_kwargs"],
            "feature_layer": cfg["feature_layer"],
            "image_size": cfg["image_size"],
            "mean": list(cfg["mean"]),
            "std": list(cfg["std"]),
            "interpolation": cfg["interpolation"],
            "dtype": "float32",
        }

    def load_vision_tower(self) -> nn.Module:
        """The tower (a ``timm`` ``VisionTransformer``) in eval mode."""
        return load_toy_vision_tower(self.vision_dir)

    def load_lm(self) -> tuple[nn.Module, Any]:
        """``(AutoModelForCausalLM, AutoTokenizer)`` from ``lm_dir``, offline, in eval mode."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(self.lm_dir).eval()
        return model, AutoTokenizer.from_pretrained(self.lm_dir)

    def load_bert_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.bert_tokenizer_dir)


def load_toy_vision_tower(vision_dir: str | Path) -> nn.Module:
    """Rebuild the tower from its ``config.json`` and ``model.safetensors`` (eval mode).

    Only the JSON is needed to build the architecture, exactly as for a real timm tower:
    ``timm.create_model(timm_name, pretrained=False, **timm_kwargs)``.
    """
    import timm
    from safetensors.torch import load_file

    vision_dir = Path(vision_dir)
    cfg = json.loads((vision_dir / VISION_CONFIG).read_text())
    model = timm.create_model(cfg["timm_name"], pretrained=False, **cfg["timm_kwargs"])
    model.load_state_dict(load_file(vision_dir / VISION_WEIGHTS))
    return model.eval()


# ----------------------------------------------------------------------------------------
# Training into a cache directory
# ----------------------------------------------------------------------------------------


def _is_complete(root: Path) -> bool:
    need = [
        root / MANIFEST,
        root / VISION_SUBDIR / VISION_CONFIG,
        root / VISION_SUBDIR / VISION_WEIGHTS,
        root / LM_SUBDIR / "config.json",
        root / BERT_SUBDIR / "vocab.txt",
    ]
    return all(p.exists() for p in need)


def _train_into(
    out: Path,
    record: dict[str, Any],
    world: ToyWorld,
    vision: ToyVisionSpec,
    lm: ToyLMSpec,
    budget: ToyPretrainBudget,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    """Train both backbones and write the whole cache layout into ``out``; returns the summary."""
    t0 = time.perf_counter()
    with torch_threads(budget.threads):
        tower, vmetrics = vision_pretraining.pretrain_vision(world, vision, budget, seed=seed, progress=progress)
        vmetrics["cost"] = vision_pretraining.tower_cost(tower, world.image_size)
        vision_pretraining.save_vision(tower, vision, world, out / VISION_SUBDIR, vmetrics)
        t_tok = time.perf_counter()
        lm_tok = build_lm_tokenizer(world, lm.bpe_vocab_size)
        tokenizer_s = time.perf_counter() - t_tok
        model, lmetrics = lm_pretraining.pretrain_lm(world, lm_tok, lm, budget, seed=seed, progress=progress)
        lmetrics["tokenizer_s"] = round(tokenizer_s, 1)
        model.save_pretrained(out / LM_SUBDIR)
        lm_tok.save_pretrained(out / LM_SUBDIR)
        bert = build_bert_tokenizer(out / BERT_SUBDIR)
    summary = {
        "total_s": round(time.perf_counter() - t0, 1),
        "threads": budget.threads,
        "vision": vmetrics,
        "lm": {
            **lmetrics,
            "vocab_size": len(lm_tok),
            "newline_token_id": lm_tok.encode("\n", add_special_tokens=False)[0],
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        },
        "bert_tokenizer": {"vocab_size": len(bert), "dec_token_id": bert.bos_token_id},
    }
    manifest = {**record, "key": toy_cache_key(record), "summary": summary}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # written last
    return summary


def _print_summary(root: Path, s: dict[str, Any]) -> None:
    v, lm = s["vision"], s["lm"]
    print(
        f"toy backbones -> {root}\n"
        f"  total {s['total_s']:.0f}s | vision: render {v['render_s']:.0f}s + train {v['train_s']:.0f}s, "
        f"loss {v['final_train_loss']:.3f}, held-out object acc {v['object_acc']:.1f}% "
        f"(shape {v['object_shape_acc']:.1f} / colour {v['object_colour_acc']:.1f} / size {v['object_size_acc']:.1f}), "
        f"scene exact {v['scene_exact_acc']:.1f}%\n"
        f"  LM: train {lm['train_s']:.0f}s, loss {lm['final_train_loss']:.3f}, held-out ppl {lm['ppl']:.2f} "
        f"(given a paraphrase {lm['ppl_given_paraphrase']:.2f}), in-context paraphrase object recall "
        f"{lm['paraphrase_object_recall']:.0f}%; sample: {lm['greedy_sample']!r}"
    )


def ensure_toy_backbones(
    cache_dir: str | Path | None = None,
    *,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    budget: ToyPretrainBudget | None = None,
    world: ToyWorld | None = None,
    vision: ToyVisionSpec | None = None,
    lm: ToyLMSpec | None = None,
) -> ToyBackbones:
    """Return the toy backbones, pretraining and caching them first if needed.

    Args:
        cache_dir: the cache directory itself. Default:
            ``<default_cache_root()>/toy/<toy_cache_key>`` (the key hashes everything below,
            so a changed world/spec/budget gets its own directory). An explicit directory
            that holds a cache for a *different* spec is an error unless ``force``.
        seed: seeds the world (if ``world`` is None) and all training.
        force: retrain even if a matching cache exists (it is replaced atomically).
        progress: show tqdm bars and print a summary when training.
        budget: training budget (default ``ToyPretrainBudget()``; tests pass ``.tiny()``).
        world, vision, lm: override the default world / architectures.

    Training happens in a temporary sibling directory which is renamed into place when
    complete, so an interrupted run never leaves a half-written cache (Ctrl-C and SIGTERM
    remove the temporary directory; the next call removes those of killed runs); if
    another process finishes first, its cache is used and ours discarded.
    """
    world = world if world is not None else ToyWorld(seed=seed)
    vision, lm, budget = vision or ToyVisionSpec(), lm or ToyLMSpec(), budget or ToyPretrainBudget()
    record = _spec_record(seed, world, vision, lm, budget)
    key = toy_cache_key(record)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root() / "toy" / key
    if root.parent.is_dir():  # on every call: a killed run's leftovers must not outlive it
        remove_stale_temps(root.parent, root.name)

    if root.exists() and not force:
        if _is_complete(root):
            found = json.loads((root / MANIFEST).read_text()).get("key")
            if found != key:
                raise ValueError(
                    f"{root} holds toy backbones for another spec (key {found}, wanted {key}); "
                    "pass force=True to replace them or use another cache_dir"
                )
            return ToyBackbones.from_dir(root)
        if any(root.iterdir()):
            raise FileExistsError(f"{root} exists, is not empty and is not a toy-backbone cache")
    elif root.exists() and force and any(root.iterdir()) and not (root / MANIFEST).exists():
        raise FileExistsError(f"refusing to replace {root}: not a toy-backbone cache")

    summary: dict[str, Any] = {}

    def build(tmp: Path) -> None:
        summary.update(_train_into(tmp, record, world, vision, lm, budget, seed, progress))

    publish_dir(root, build, complete=_is_complete, replace=force)
    if progress:
        _print_summary(root, summary)
    return ToyBackbones.from_dir(root)
