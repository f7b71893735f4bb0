"""Frozen toy backbones: a small timm ViT and a small OPT LM, pretrained once on the toy world.

BLIP-2's premise is that both backbones are *frozen and already competent*: the Q-Former
only learns to bridge them. A randomly initialised tower or LM would make the toy run a
lie (nothing to bridge), and real checkpoints need downloads and far more compute than a
2-core CPU has. So the project pretrains its own tiny backbones on the toy world, once,
and caches them:

* **Vision tower** -- a real ``timm`` ViT (``vit_tiny_patch16_224`` re-shaped to 64 px
  images: 16 px patches, width 192, 4 blocks, 1 + 16 tokens), so the code path is the
  one used for real towers. The world puts objects in a 4x4 grid of 16 px cells, so each
  patch holds at most one whole object: after the same 150 steps, 8 px patches that cut
  objects apart (4x the tokens) reached 18 % held-out shape accuracy, these 54 %.
  It is trained with *supervised dense multi-task classification*, chosen over a
  CLIP-style contrastive objective because it converges in a couple of minutes on CPU
  (no text encoder, no large batches of negatives) and because it targets exactly what
  the Q-Former must read:

  - every **patch token** predicts the shape, colour and size of the object in it (or
    background), so patch features encode *what is where*; positions, hence the
    caption's relations, come with the tokens' position embeddings;
  - the **CLS token** predicts which of the 128 object types are present (multi-label),
    so it summarises the scene.

  The heads are discarded; the cache keeps the trunk (``num_classes=0``) whose
  ``forward_features`` output (B, 1 + 16, 192) feeds the Q-Former.

* **Language model** -- a real ``transformers`` ``OPTForCausalLM`` (BLIP-2's LM family:
  learned positions, BOS ``</s>``, captions ended by ``"\\n"``) with a byte-level BPE
  tokenizer trained on the world's captions (no ``<unk>`` is ever produced). It is trained
  by language modelling only, on *packed paraphrases*: one training sequence is
  ``</s>caption_1\\n</s>caption_2\\n...`` with 1-4 captions *of the same scene*. Why: a
  model trained only on isolated captions is a pure unconditional prior with untrained
  positions beyond ~30 tokens; stage 2 puts 32 soft prompts *before* ``</s>caption\\n``.
  Packed paraphrases teach it (like a real LLM's in-context ability) that text before a
  ``</s>`` may describe the scene that follows, and train every position up to ~120, so
  soft prompts have something to steer. Its held-out perplexity drops from ~3.6 alone to
  ~2.0 given a paraphrase; greedy in-context paraphrasing names ~45 % of the objects
  exactly (it tends to repeat one object): a small LM, not a real LLM.

* **Q-Former text tokenizer** -- a WordPiece ``BertTokenizer`` over the world's words
  (plus single characters, so any lowercase text tokenizes without ``[UNK]``), with
  ``[PAD]`` = 0 and BLIP-2's added ``[DEC]`` bos token.

Everything lives under ``~/.cache/qformer/toy/<hash>`` (``$QFORMER_CACHE`` replaces
``~/.cache/qformer``), where the hash covers the code version, seed, world, architectures
and training budget. The cache is written atomically (trained in a temporary sibling
directory, then renamed), so an interrupted run never leaves a half-written cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .world import COLOURS, SHAPES, SIZES, ToyScene, ToyWorld, caption_vocabulary, score_caption

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

# Bump when anything that changes the trained weights changes (world, objective, code).
TOY_BACKBONES_VERSION = 1

VISION_SUBDIR, LM_SUBDIR, BERT_SUBDIR = "vision", "lm", "bert_tokenizer"
MANIFEST = "manifest.json"
VISION_CONFIG, VISION_WEIGHTS = "config.json", "model.safetensors"
# Images are rendered at the tower's resolution, so normalisation is the only transform.
TOY_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
TOY_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)


# ----------------------------------------------------------------------------------------
# Specs and budget
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyVisionSpec:
    """Architecture of the toy vision tower (a timm ViT, kwargs override the base name's)."""

    timm_name: str = "vit_tiny_patch16_224"
    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 4
    num_heads: int = 3
    mlp_ratio: float = 4.0

    def timm_kwargs(self, image_size: int) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model(self.timm_name, pretrained=False, **kw)``."""
        return {
            "img_size": image_size,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "num_classes": 0,
        }


@dataclass(frozen=True)
class ToyLMSpec:
    """Architecture of the toy causal LM (an ``OPTForCausalLM``)."""

    hidden_size: int = 256
    # 2 layers (the minimum for induction-style copying) trained for 2x the steps beat 4
    # layers in the same time: held-out ppl given a paraphrase 2.0 vs 2.8.
    num_layers: int = 2
    num_heads: int = 4
    ffn_dim: int = 1024
    # Learned positions: stage 2 prepends 32 soft prompts to ~30 caption tokens; pretraining
    # packs up to 4 captions (~120 tokens), and 256 leaves room for prompts and questions.
    max_position_embeddings: int = 256
    bpe_vocab_size: int = 512


@dataclass(frozen=True)
class ToyPretrainBudget:
    """How much pretraining to do. The default takes ~4 minutes on 2 idle CPU cores.

    Tests use :meth:`tiny` (a few seconds); the budget is part of the cache key, so a tiny
    cache never stands in for a real one.
    """

    vision_images: int = 20_000  # rendered once, reused across epochs (~4 epochs)
    vision_steps: int = 600
    vision_batch: int = 128
    vision_lr: float = 2e-3
    lm_steps: int = 600
    lm_batch: int = 32  # sequences per step, 1-4 captions each
    lm_lr: float = 2e-3
    eval_images: int = 1_000  # held-out (test split) images for the tower's accuracy
    eval_scenes: int = 500  # held-out scenes for the LM's perplexity
    eval_generations: int = 50  # held-out scenes for the LM's in-context paraphrase test
    threads: int = 2  # torch intra-op threads; not part of the cache key. Use 1 on a busy CPU:
    # 2 threads fighting other processes for 2 cores can run 10-40x slower.

    @classmethod
    def tiny(cls) -> "ToyPretrainBudget":
        """A budget that trains in seconds: for tests, not for use."""
        return cls(
            vision_images=64,
            vision_steps=3,
            vision_batch=16,
            lm_steps=3,
            lm_batch=8,
            eval_images=32,
            eval_scenes=16,
            eval_generations=2,
            threads=1,  # tiny matrices gain nothing from a second thread
        )


# ----------------------------------------------------------------------------------------
# Cache locations
# ----------------------------------------------------------------------------------------


def default_cache_root() -> Path:
    """``$QFORMER_CACHE`` if set, else ``~/.cache/qformer``; toy backbones go in ``<root>/toy``."""
    env = os.environ.get("QFORMER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qformer"


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
    def from_dir(cls, root: str | Path) -> "ToyBackbones":
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
# Tokenizers
# ----------------------------------------------------------------------------------------


def build_lm_tokenizer(world: ToyWorld, vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer for the toy LM, OPT-style.

    Byte-level, like OPT/GPT-2: any text round-trips and nothing maps to ``<unk>``; the BPE
    merges are fit on world captions so each caption word is one token. Special tokens
    follow OPT's ids (``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3) and ``</s>`` is both
    BOS and EOS; encoding with special tokens prepends ``</s>``, as OPT's tokenizer does.
    Captions end with ``"\\n"`` (its own token), BLIP-2's end-of-caption marker.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def corpus() -> Iterator[str]:
        # Every word at the start of a line and after a space, plus real captions for
        # natural merge frequencies. Deterministic: the world is seeded.
        words = caption_vocabulary()
        yield from (w + "\n" for w in words)
        yield from (" " + w for w in words)
        for caps in world.iter_captions("train", 0, min(500, world.split_size("train"))):
            yield from (c + "\n" for c in caps)

    tok.train_from_iterator(corpus(), trainer=trainer)
    bos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=256,
    )


_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_EXTRA_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,!?;:'\"-()/&")


def build_bert_tokenizer(out_dir: str | Path) -> Any:
    """Write and return the Q-Former's WordPiece tokenizer (``BertTokenizer``).

    Vocabulary: ``[PAD]`` (id 0, the Q-Former's ``pad_token_id``), ``[UNK]``, ``[CLS]``,
    ``[SEP]``, ``[MASK]``, every caption word whole, then single characters and their
    ``##`` continuations so that words outside the world still tokenize (as characters)
    instead of collapsing to ``[UNK]``. ``[DEC]`` is added as the bos token, as BLIP-2 does
    to bert-base-uncased; it lands at the last id.
    """
    from transformers import BertTokenizer

    words = [w for w in caption_vocabulary() if w not in _EXTRA_CHARS]
    vocab = _BERT_SPECIALS + words + _EXTRA_CHARS + ["##" + c for c in _EXTRA_CHARS]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizer(vocab=str(out / "vocab.txt"), do_lower_case=True, model_max_length=64)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.save_pretrained(out)
    return tok


# ----------------------------------------------------------------------------------------
# Vision pretraining
# ----------------------------------------------------------------------------------------

N_SHAPE, N_COLOUR, N_SIZE = len(SHAPES) + 1, len(COLOURS) + 1, len(SIZES) + 1  # +1: empty/background
N_ATTR = N_SHAPE + N_COLOUR + N_SIZE
N_TYPES = len(SHAPES) * len(COLOURS) * len(SIZES)  # object types, for the CLS presence head


def _object_labels(scene: ToyScene) -> np.ndarray:
    """``(num_objects + 1, 3)`` int64: row 0 is background, row i+1 is object i's labels."""
    rows = [(0, 0, 0)]
    for o in scene.objects:
        rows.append((SHAPES.index(o.shape) + 1, COLOURS.index(o.colour) + 1, SIZES.index(o.size) + 1))
    return np.asarray(rows, dtype=np.int64)


def _type_index(shape: int, colour: int, size: int) -> int:
    """Object type id in [0, N_TYPES) from 1-based attribute labels."""
    return ((shape - 1) * len(COLOURS) + (colour - 1)) * len(SIZES) + (size - 1)


def _vision_labels(world: ToyWorld, scene: ToyScene, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch labels ``(P, 3)`` and the multi-hot object types ``(N_TYPES,)`` of a scene.

    A patch is labelled (shape, colour, size) of the object with most pixels in it (at
    least 4), else background (0, 0, 0). With the default world/tower every object lies
    inside one 16 px patch, so this is simply "the object in this cell".
    """
    table = _object_labels(scene)
    mask = world.render_mask(scene)  # (H, W) uint8, 0 = background, i + 1 = object i
    g = world.image_size // patch
    blocks = mask[: g * patch, : g * patch].reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, -1)
    counts = np.stack([(blocks == k).sum(1) for k in range(1, len(scene.objects) + 1)], 1)  # (P, n)
    best = counts.argmax(1)
    patches = np.where((counts.max(1) >= 4)[:, None], table[best + 1], table[0])  # (P, 3)
    types = np.zeros(N_TYPES, dtype=np.float32)
    for row in table[1:]:
        types[_type_index(*row)] = 1.0
    return patches, types


@dataclass
class _VisionData:
    images: torch.Tensor  # (N, 3, H, W) uint8
    patches: torch.Tensor  # (N, P, 3) int64 per-patch (shape, colour, size), 0 = background
    types: torch.Tensor  # (N, N_TYPES) float multi-hot object types


def _render_vision_data(world: ToyWorld, split: str, n: int, patch: int, desc: str, progress: bool) -> _VisionData:
    from tqdm.auto import tqdm

    s, g = world.image_size, world.image_size // patch
    images = np.empty((n, s, s, 3), dtype=np.uint8)
    patches = np.empty((n, g * g, 3), dtype=np.int64)
    types = np.empty((n, N_TYPES), dtype=np.float32)
    for i in tqdm(range(n), desc=desc, disable=not progress, leave=False, mininterval=0.5):
        scene = world.scene(split, i)
        images[i] = np.asarray(world.render(scene))
        patches[i], types[i] = _vision_labels(world, scene, patch)
    return _VisionData(
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(patches), torch.from_numpy(types)
    )


def _normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float normalised with TOY_MEAN/TOY_STD."""
    mean = torch.tensor(TOY_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(TOY_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


class _VisionHeads(nn.Module):
    """Training-only heads: patch tokens -> their object's attributes; CLS -> object types present."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.patch = nn.Linear(width, N_ATTR)
        self.types = nn.Linear(width, N_TYPES)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # tokens: (B, 1 + P, D) from forward_features (CLS first).
        return self.patch(tokens[:, 1:]), self.types(tokens[:, 0])  # (B, P, A), (B, N_TYPES)


def _split_logits(logits: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.split(logits, [N_SHAPE, N_COLOUR, N_SIZE], dim=-1))


def _vision_loss(
    patch_logits: torch.Tensor, type_logits: torch.Tensor, patches: torch.Tensor, types: torch.Tensor
) -> torch.Tensor:
    """Per-patch attribute cross-entropy (mean of the 3 groups) + CLS multi-label BCE."""
    parts = _split_logits(patch_logits.float())
    ce = sum(F.cross_entropy(p.reshape(-1, p.shape[-1]), patches[..., k].reshape(-1)) for k, p in enumerate(parts)) / 3
    # BCE summed over types, averaged over images: ~2.5 positives out of 128 per image.
    bce = F.binary_cross_entropy_with_logits(type_logits.float(), types, reduction="sum") / types.shape[0]
    return ce + 0.1 * bce


def _lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first 5 % of steps, then cosine decay to 5 % of the peak."""
    warm = max(1, total // 20)
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def _autocast() -> contextlib.AbstractContextManager:
    # bf16 matmuls are ~4x faster than fp32 on AVX512-BF16 CPUs; never fp16 on CPU (slow).
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _pretrain_vision(
    world: ToyWorld, spec: ToyVisionSpec, budget: ToyPretrainBudget, seed: int, progress: bool
) -> tuple[nn.Module, dict[str, Any]]:
    import timm
    from tqdm.auto import tqdm

    if world.image_size % spec.patch_size:
        raise ValueError(f"patch_size {spec.patch_size} must divide image_size {world.image_size}")
    t0 = time.perf_counter()
    data = _render_vision_data(world, "train", budget.vision_images, spec.patch_size, "toy vision: rendering", progress)
    render_s = time.perf_counter() - t0

    torch.manual_seed(seed)
    model = timm.create_model(spec.timm_name, pretrained=False, **spec.timm_kwargs(world.image_size))
    heads = _VisionHeads(spec.embed_dim)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=budget.vision_lr, weight_decay=0.05, betas=(0.9, 0.98))
    rng = np.random.default_rng([seed, 101])
    n = data.images.shape[0]
    order, pos = rng.permutation(n), 0
    model.train()
    bar = tqdm(range(budget.vision_steps), desc="toy vision: training", disable=not progress, mininterval=0.5)
    loss_ema = None
    for step in bar:
        if pos + budget.vision_batch > n:
            order, pos = rng.permutation(n), 0
        idx = torch.from_numpy(order[pos : pos + budget.vision_batch])
        pos += budget.vision_batch
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, budget.vision_steps, budget.vision_lr)
        with _autocast():
            tokens = model.forward_features(_normalise(data.images[idx]))  # (B, 1 + P, D)
            patch_logits, type_logits = heads(tokens)
        loss = _vision_loss(patch_logits, type_logits, data.patches[idx], data.types[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        bar.set_postfix(loss=f"{loss_ema:.3f}", refresh=False)
    train_s = time.perf_counter() - t0 - render_s
    metrics = _eval_vision(world, model, heads, spec, budget, progress)
    metrics.update(
        render_s=round(render_s, 1),
        train_s=round(train_s, 1),
        eval_s=round(time.perf_counter() - t0 - render_s - train_s, 1),
        final_train_loss=round(loss_ema or 0.0, 4),
    )
    return model.eval(), metrics


@torch.no_grad()
def _eval_vision(
    world: ToyWorld,
    model: nn.Module,
    heads: _VisionHeads,
    spec: ToyVisionSpec,
    budget: ToyPretrainBudget,
    progress: bool,
) -> dict[str, Any]:
    """Held-out (test split) accuracy of the training heads: how well the features encode scenes.

    * ``object_*_acc``: over objects, from the patch tokens that hold them: each attribute,
      and all three at once (``object_acc``).
    * ``background_acc``: patches without an object predicted as background.
    * ``scene_exact_acc``: every patch of the image right (all objects, attributes, layout).
    * ``cls_types_exact_acc``: the CLS token's set of object types exactly right.
    """
    data = _render_vision_data(world, "test", budget.eval_images, spec.patch_size, "toy vision: eval data", progress)
    model.eval()
    patch_pred, type_pred = [], []
    for i in range(0, data.images.shape[0], 256):
        with _autocast():
            p, t = heads(model.forward_features(_normalise(data.images[i : i + 256])))
        patch_pred.append(torch.stack([x.argmax(-1) for x in _split_logits(p.float())], -1))
        type_pred.append(t.float() > 0)
    pp, tp = torch.cat(patch_pred), torch.cat(type_pred)  # (N, P, 3), (N, N_TYPES)
    pl = data.patches
    has_obj = pl[..., 0] > 0  # (N, P)
    ok = pp == pl  # (N, P, 3)

    def pct(x: torch.Tensor) -> float:
        return round(100.0 * x.float().mean().item(), 2)

    return {
        "eval_images": int(pl.shape[0]),
        "object_acc": pct(ok.all(-1)[has_obj]),
        "object_shape_acc": pct(ok[..., 0][has_obj]),
        "object_colour_acc": pct(ok[..., 1][has_obj]),
        "object_size_acc": pct(ok[..., 2][has_obj]),
        "background_acc": pct(ok.all(-1)[~has_obj]),
        "scene_exact_acc": pct(ok.all(-1).all(-1)),
        "cls_types_exact_acc": pct((tp == (data.types > 0)).all(-1)),
    }


@torch.no_grad()
def _tower_cost(model: nn.Module, image_size: int, batch: int = 64) -> dict[str, Any]:
    """Tokens, width and forward time (bf16 autocast and fp32) of the frozen tower."""
    x = torch.randn(batch, 3, image_size, image_size)
    out: dict[str, Any] = {}
    for name, ctx in (("bf16", _autocast), ("fp32", contextlib.nullcontext)):
        with ctx():
            feats = model.forward_features(x)
            t = time.perf_counter()
            for _ in range(3):
                model.forward_features(x)
        out[f"forward_ms_b{batch}_{name}"] = round((time.perf_counter() - t) / 3 * 1e3, 1)
    out["tokens"], out["width"] = int(feats.shape[1]), int(feats.shape[2])
    out["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    return out


def _save_vision(model: nn.Module, spec: ToyVisionSpec, world: ToyWorld, out: Path, metrics: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / VISION_WEIGHTS)
    cfg = {
        "timm_name": spec.timm_name,
        "timm_kwargs": spec.timm_kwargs(world.image_size),
        "image_size": world.image_size,
        "mean": list(TOY_MEAN),
        "std": list(TOY_STD),
        "interpolation": "bicubic",
        # The pretraining heads read the final (normed) block output: use the last block.
        "feature_layer": -1,
        "num_tokens": (world.image_size // spec.patch_size) ** 2 + 1,
        "width": spec.embed_dim,
        "metrics": metrics,
    }
    (out / VISION_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")


# ----------------------------------------------------------------------------------------
# LM pretraining
# ----------------------------------------------------------------------------------------


def _lm_sequence(caps: list[str], k: int, tok: Any, rng: np.random.Generator) -> list[int]:
    """``</s>c1\\n</s>c2\\n...`` for ``k`` distinct paraphrases of one scene, as token ids."""
    bos = tok.bos_token_id
    ids: list[int] = []
    for j in rng.permutation(len(caps))[:k]:
        ids += [bos] + tok.encode(caps[j] + "\n", add_special_tokens=False)
    return ids


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to (B, T): input ids, attention mask and labels (-100 on padding)."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _pretrain_lm(
    world: ToyWorld, tok: Any, spec: ToyLMSpec, budget: ToyPretrainBudget, seed: int, progress: bool
) -> tuple[nn.Module, dict[str, Any]]:
    from tqdm.auto import tqdm
    from transformers import GenerationConfig, OPTConfig, OPTForCausalLM

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    newline = tok.encode("\n", add_special_tokens=False)
    assert len(newline) == 1, "the LM tokenizer must encode '\\n' as one token"
    config = OPTConfig(
        vocab_size=len(tok),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        ffn_dim=spec.ffn_dim,
        num_attention_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        word_embed_proj_dim=spec.hidden_size,
        do_layer_norm_before=True,
        dropout=0.0,  # fresh scenes every step: nothing to overfit
        attention_dropout=0.0,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    model = OPTForCausalLM(config)
    # BLIP-2 ends captions with "\n" and stops generation on it.
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=[newline[0], tok.eos_token_id], pad_token_id=tok.pad_token_id
    )
    opt = torch.optim.AdamW(model.parameters(), lr=budget.lm_lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng = np.random.default_rng([seed, 202])
    n_train = world.split_size("train")
    model.train()
    bar = tqdm(range(budget.lm_steps), desc="toy LM: training", disable=not progress, mininterval=0.5)
    loss_ema = None
    for step in bar:
        seqs = []
        for _ in range(budget.lm_batch):
            caps = world.captions(world.scene("train", int(rng.integers(n_train))))
            seqs.append(_lm_sequence(caps, int(rng.integers(1, 5)), tok, rng))
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, budget.lm_steps, budget.lm_lr)
        # Mixed 1-4 caption sequences in one batch (this matters: in-context use of the
        # paraphrases is learnt much better than with one k per batch), but run as
        # length-sorted micro-batches so short sequences are not padded to the longest;
        # the summed loss / total tokens is exactly the full batch's mean loss.
        seqs.sort(key=len)
        n_tokens = sum(len(q) - 1 for q in seqs)
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for chunk in np.array_split(np.arange(len(seqs)), min(4, len(seqs))):
            ids, mask, labels = _pad([seqs[j] for j in chunk], tok.pad_token_id)  # (b, T) each
            with _autocast():
                logits = model(input_ids=ids, attention_mask=mask).logits  # (b, T, V)
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
            )
            (loss / n_tokens).backward()
            loss_sum += loss.item()
        loss = torch.tensor(loss_sum / n_tokens)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        bar.set_postfix(loss=f"{loss_ema:.3f}", refresh=False)
    train_s = time.perf_counter() - t0
    model.eval()
    metrics = _eval_lm(world, model, tok, budget)
    metrics.update(
        train_s=round(train_s, 1),
        eval_s=round(time.perf_counter() - t0 - train_s, 1),
        final_train_loss=round(loss_ema or 0.0, 4),
    )
    return model, metrics


@torch.no_grad()
def _eval_lm(world: ToyWorld, model: nn.Module, tok: Any, budget: ToyPretrainBudget) -> dict[str, Any]:
    """Held-out (test split) perplexities, per predicted token of a caption (incl. its "\\n").

    * ``ppl``: ``</s>caption\\n`` alone -- the LM as a prior over captions.
    * ``ppl_given_paraphrase``: the second caption of ``</s>c1\\n</s>c2\\n`` -- how much the LM
      uses preceding text that describes the same scene (what soft prompts will exploit).
    """
    bos = tok.bos_token_id
    totals = {"ppl": [0.0, 0], "ppl_given_paraphrase": [0.0, 0]}
    batch: list[tuple[list[int], int]] = []  # (ids, index of the first scored target)

    def flush() -> None:
        ids, mask, _ = _pad([s for s, _ in batch], tok.pad_token_id)
        with _autocast():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
        for row, (seq, first) in enumerate(batch):
            key = "ppl" if first == 1 else "ppl_given_paraphrase"
            totals[key][0] -= logp[row, first - 1 : len(seq) - 1].sum().item()
            totals[key][1] += len(seq) - first
        batch.clear()

    for i in range(min(budget.eval_scenes, world.split_size("test"))):
        caps = world.captions(world.scene("test", i))
        c1 = [bos] + tok.encode(caps[0] + "\n", add_special_tokens=False)
        c2 = [bos] + tok.encode(caps[1] + "\n", add_special_tokens=False)
        batch += [(c1, 1), (c1 + c2, len(c1) + 1)]
        if len(batch) >= 64:
            flush()
    if batch:
        flush()
    out: dict[str, Any] = {k: round(math.exp(s / max(n, 1)), 3) for k, (s, n) in totals.items()}
    # In-context paraphrase: after "</s>c1\n</s>", does greedy decoding name c1's objects?
    # A proxy for what stage 2 needs: text-like context that the LM turns into a caption.
    newline = tok.encode("\n", add_special_tokens=False)[0]
    recall = []
    for i in range(min(budget.eval_generations, world.split_size("test"))):
        sample_scene = world.scene("test", i)
        caps = world.captions(sample_scene)
        ids = torch.tensor([[bos] + tok.encode(caps[0] + "\n", add_special_tokens=False) + [bos]])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False,
                             eos_token_id=newline, pad_token_id=tok.pad_token_id)
        text = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
        recall.append(score_caption(text, sample_scene.to_dict())["recall"])
    out["paraphrase_object_recall"] = round(100.0 * float(np.mean(recall)), 2) if recall else 0.0
    # One greedy caption from BOS alone: a readable sanity check of the LM's language.
    gen = model.generate(torch.tensor([[bos]]), max_new_tokens=40, do_sample=False, eos_token_id=newline,
                         pad_token_id=tok.pad_token_id)
    out["greedy_sample"] = tok.decode(gen[0, 1:], skip_special_tokens=True).strip()
    return out


# ----------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


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
    with _torch_threads(budget.threads):
        tower, vmetrics = _pretrain_vision(world, vision, budget, seed, progress)
        vmetrics["cost"] = _tower_cost(tower, world.image_size)
        _save_vision(tower, vision, world, out / VISION_SUBDIR, vmetrics)
        t_tok = time.perf_counter()
        lm_tok = build_lm_tokenizer(world, lm.bpe_vocab_size)
        tokenizer_s = time.perf_counter() - t_tok
        model, lmetrics = _pretrain_lm(world, lm_tok, lm, budget, seed, progress)
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
    complete, so an interrupted run never leaves a half-written cache; if another process
    finishes first, its cache is used and ours discarded.
    """
    world = world if world is not None else ToyWorld(seed=seed)
    vision, lm, budget = vision or ToyVisionSpec(), lm or ToyLMSpec(), budget or ToyPretrainBudget()
    record = _spec_record(seed, world, vision, lm, budget)
    key = toy_cache_key(record)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root() / "toy" / key

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

    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-{os.getpid()}-", dir=root.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would carry over to the published cache
    try:
        summary = _train_into(tmp, record, world, vision, lm, budget, seed, progress)
        _publish(tmp, root, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        _print_summary(root, summary)
    return ToyBackbones.from_dir(root)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(root: Path) -> None:
    """Delete temp/old siblings of ``root`` left by killed runs (their pid is gone).

    A run killed by a signal Python cannot turn into an exception (SIGKILL, OOM) cannot
    clean up after itself; the next run does.
    """
    for kind in ("tmp", "old"):
        for path in root.parent.glob(f".{root.name}.{kind}-*"):
            pid = path.name.rsplit(f".{kind}-", 1)[1].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _publish(tmp: Path, root: Path, replace: bool) -> None:
    """Move the finished ``tmp`` cache to ``root`` with renames only (atomic per step)."""
    old = None
    if root.exists() and replace and any(root.iterdir()):
        old = root.with_name(f".{root.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(root, old)
    try:
        os.rename(tmp, root)  # succeeds onto a missing or empty directory
    except OSError:
        if not _is_complete(root):  # not a concurrent winner: genuinely failed
            if old is not None:
                os.rename(old, root)
            raise
        # Another process published a cache meanwhile; keep theirs (ours is discarded).
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
