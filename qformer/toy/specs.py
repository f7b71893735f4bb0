"""What the toy backbones are: their architectures, the pretraining budget, the cache's file names.

Everything here is plain data (no torch), so the cache key and the ``toy://`` plugin's
options can be worked out without importing torch; :mod:`qformer.toy.backbones` trains what
these describe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "TOY_BACKBONES_VERSION",
    "TOY_MEAN",
    "TOY_STD",
    "ToyLMSpec",
    "ToyPretrainBudget",
    "ToyVisionSpec",
]

# Bump when anything that changes the trained weights changes (world, objective, code): it is
# part of every cache key, so old caches are then ignored instead of silently reused.
TOY_BACKBONES_VERSION = 1

# Layout of a cache directory (see qformer.toy.backbones.ToyBackbones).
VISION_SUBDIR, LM_SUBDIR, BERT_SUBDIR = "vision", "lm", "bert_tokenizer"
MANIFEST = "manifest.json"
VISION_CONFIG, VISION_WEIGHTS = "config.json", "model.safetensors"
# Images are rendered at the tower's resolution, so normalisation is the only transform.
TOY_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
TOY_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)


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
    """How much pretraining to do (the default is what the toy adapter card's results use).

    Tests use :meth:`tiny`; the budget is part of the cache key, so a tiny cache never stands
    in for a real one.
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
    # threads competing with other processes for the same cores can make training many times slower.

    @classmethod
    def tiny(cls) -> ToyPretrainBudget:
        """A budget that trains in moments: for tests, not for use (the backbones barely learn)."""
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
