"""The frozen vision tower interface: what the Q-Former reads, and how a tower stays frozen.

BLIP-2 reads the output of one block of a frozen ViT (EVA ViT-g/14 without its last block,
or CLIP ViT-L/14 without its last layer) for ALL tokens, before any final norm: its own
trainable ``ln_vision`` is applied outside the tower. A :class:`VisionTower` gives exactly that
tensor, ``(B, N, width)`` in float32, with the blocks after ``feature_layer`` removed so that
they cost nothing. One subclass per backend (:mod:`.timm_tower`, :mod:`.hf_tower`) builds and
loads its model; this base class owns everything they share.

Weights are always loaded strictly: every tensor the tower needs must be present and every
tensor given must be used, except the parts the tower removed on purpose (the blocks after
``feature_layer``, the final norm, the pooling head). LAVIS loads its ViT with
``strict=False``, which hides mismatches; here they are errors that name the keys.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..config import ConfigError, VisionConfig, torch_dtype
from ..images import ImageInput, ImagePreprocessor
from ..weights import strict_load

logger = logging.getLogger(__name__)


def resolve_feature_layer(feature_layer: int, depth: int) -> int:
    """Number of blocks to keep so that the last kept block is ``feature_layer`` (Python indexing)."""
    if not -depth <= feature_layer < depth:
        raise ConfigError(
            f"vision.feature_layer={feature_layer} is out of range for a tower with {depth} blocks "
            f"(valid: {-depth}..{depth - 1})"
        )
    return feature_layer % depth + 1


def drop_removed_parts(
    state: Mapping[str, torch.Tensor], removed: set[str], head_prefixes: Iterable[str], *, source: str
) -> dict[str, torch.Tensor]:
    """Remove the keys of parts the tower removed on purpose (later blocks, final norm, head)."""
    head_prefixes = tuple(head_prefixes)
    kept = {k: v for k, v in state.items() if k not in removed and not k.startswith(head_prefixes)}
    if len(kept) < len(state):
        logger.info("%s: ignoring %d tensor(s) of removed parts (later blocks, final norm, head)",
                    source, len(state) - len(kept))
    return kept


class VisionTower(nn.Module):
    """An image encoder returning the output of block ``config.feature_layer`` for all tokens.

    Build one with :func:`qformer.vision.build_vision_tower` (it picks the backend's class).
    ``forward(pixel_values)`` maps ``(B, 3, S, S)`` (``S = config.image_size``) to float32
    ``(B, num_tokens, width)``: CLS/prefix tokens included, no final norm.

    The tower is built frozen, as BLIP-2 pre-training keeps it: its parameters do not require
    grad, its inner model stays in eval mode whatever ``train()`` is called with (no dropout, no
    drop-path), and ``forward`` runs under ``torch.no_grad()``. That is ``no_grad`` and not
    ``inference_mode`` on purpose: the features are ordinary tensors that a trainable
    ``ln_vision`` may take as input.

    BLIP-2's fine-tuning recipes train the tower too: :meth:`set_trainable_blocks` unfreezes all
    of it or its last N blocks (``TrainConfig.vision_trainable_blocks``). Then the trainable
    blocks follow ``train()`` (dropout / drop-path as the model's config says), ``forward`` keeps
    the graph, and :meth:`set_gradient_checkpointing` recomputes the trainable blocks' activations
    in the backward pass (the backend's own mechanism, non-reentrant). A trainable tower must
    hold float32 weights (mixed precision comes from autocast, ``mixed_precision=bf16``): a
    half-precision tower cannot take small AdamW updates (LAVIS issue #279).

    Weights and compute use ``config.dtype``; the input is cast to it and the output returned in
    float32 so that everything downstream sees one dtype.

    Subclasses set ``self.model`` (the inner, pruned model) and ``self.num_blocks`` in
    :meth:`_build`, name their block list in ``block_prefix`` and implement :attr:`width`,
    :attr:`num_tokens`, :meth:`_features` and :meth:`_set_checkpointing`.
    """

    backend: str = ""
    #: Where the inner model's blocks are, as a parameter-name prefix with the index following it.
    block_prefix: str = ""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if not isinstance(config, VisionConfig):
            raise TypeError(f"{type(self).__name__} expects a VisionConfig, got {type(config).__name__}")
        if config.backend != self.backend:
            raise ConfigError(f"{type(self).__name__} builds vision.backend={self.backend!r} towers, not {config.backend!r}")
        self.config = config
        self.preprocessor = ImagePreprocessor.from_config(config)
        self.model, self.num_blocks = self._build(config)
        self.model.to(torch_dtype(config.dtype))
        self.model.requires_grad_(False)
        self.model.eval()
        self.trainable_blocks = 0  # see set_trainable_blocks
        # True once weights other than config.pretrained's were loaded from a saved model (e.g. a
        # fine-tuned tower): saving then writes the tower even where a frozen one is left out.
        self.weights_from_checkpoint = False

    # -- what a backend provides ------------------------------------------------------------------

    def _build(self, config: VisionConfig) -> tuple[nn.Module, int]:
        """(the pruned inner model with its weights loaded, number of blocks kept)."""
        raise NotImplementedError

    @property
    def width(self) -> int:
        """Feature dimension C of the output (1408 for EVA ViT-g)."""
        raise NotImplementedError

    @property
    def num_tokens(self) -> int:
        """Tokens per image at ``config.image_size`` (257 for EVA ViT-g/14 at 224 px: 1 CLS + 16x16)."""
        raise NotImplementedError

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in the tower's dtype -> (B, N, C): the last kept block's output, no norm."""
        raise NotImplementedError

    def _set_checkpointing(self, enabled: bool) -> None:
        """Turn the backend's own activation checkpointing of the blocks on or off."""
        raise NotImplementedError

    @property
    def grid_size(self) -> tuple[int, int]:
        """(rows, columns) of the patch grid at ``config.image_size``: the output's patch tokens,
        row-major after the prefix tokens (16x16 for EVA ViT-g/14 at 224 px)."""
        raise NotImplementedError

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch grid in the output (CLS, register tokens): 1 for EVA / CLIP, 0 for SigLIP."""
        rows, cols = self.grid_size
        return self.num_tokens - rows * cols

    # -- shared -----------------------------------------------------------------------------------

    def load_weights(self, state: Mapping[str, torch.Tensor], *, source: str = "state dict") -> None:
        """Strictly load ``state`` (the inner model's own key names, kept blocks only)."""
        strict_load(self.model, state, source=source, target=f"the vision tower ({self.describe()})")

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights and of the compute."""
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> str:
        """One line naming the architecture, for error messages."""
        c = self.config
        return f"{c.backend} {c.name}, {self.num_blocks} block(s) up to feature_layer={c.feature_layer}, width {self.width}"

    def extra_repr(self) -> str:
        return f"{self.describe()}, {self.num_tokens} tokens at {self.config.image_size}px, dtype {self.config.dtype}"

    # -- training the tower (BLIP-2's fine-tuning) ------------------------------------------------

    @property
    def blocks(self) -> nn.ModuleList | nn.Sequential:
        """The kept blocks, in order."""
        module = self.model
        for part in self.block_prefix.strip(".").split("."):
            module = getattr(module, part)
        return module

    def set_trainable_blocks(self, n: int) -> None:
        """Train the last ``n`` kept blocks (``-1``: the whole tower, embeddings included; ``0``:
        frozen, the default). Everything else stays frozen and in eval mode."""
        if not isinstance(n, int) or isinstance(n, bool) or not -1 <= n <= self.num_blocks:
            raise ConfigError(f"vision_trainable_blocks must be -1 (all), 0 (frozen) or 1..{self.num_blocks} "
                              f"(the last N of the tower's {self.num_blocks} block(s)), got {n!r}")
        if n != 0 and self.dtype != torch.float32:
            raise ConfigError(
                f"vision_trainable_blocks={n} trains the vision tower, which then needs float32 weights "
                f"(vision.dtype=float32; vision.dtype is {self.config.dtype}): use mixed_precision=bf16 for "
                "bf16 compute, never a half-precision tower"
            )
        self.model.requires_grad_(False)
        for module in self._trainable_modules(n):
            module.requires_grad_(True)
        self.trainable_blocks = n
        self.train(self.training)

    def _trainable_modules(self, n: int) -> list[nn.Module]:
        if n == -1:
            return [self.model]
        return list(self.blocks)[self.num_blocks - n:] if n else []

    @property
    def trains(self) -> bool:
        """Whether any of the tower's parameters requires grad (then ``forward`` keeps the graph)."""
        return any(p.requires_grad for p in self.model.parameters())

    @property
    def must_be_saved(self) -> bool:
        """Whether a save must write the tower: it trains, or its weights came from a saved model
        rather than from ``config.pretrained``."""
        return self.trains or self.weights_from_checkpoint

    def layer_id(self, name: str) -> int:
        """Depth of parameter ``name`` (the inner model's own name): ``i + 1`` for block ``i``,
        ``0`` for everything before the blocks (patch / position embeddings, class token,
        pre-norm), which is all a pruned tower has besides its blocks. Layer-wise learning-rate
        decay scales each depth's rate (:func:`qformer.training.param_groups`)."""
        if name.startswith(self.block_prefix):
            return int(name[len(self.block_prefix):].split(".", 1)[0]) + 1
        return 0

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the trainable blocks' activations in the backward pass (frozen blocks keep
        no graph anyway). Non-reentrant, so a block whose input needs no grad still gets its
        parameters' gradients."""
        self._set_checkpointing(bool(enabled))

    def train(self, mode: bool = True) -> "VisionTower":
        """Set the wrapper's flag as asked; the frozen parts stay in eval mode, always, and only
        the trainable blocks (see :meth:`set_trainable_blocks`) follow ``mode``."""
        super().train(mode)
        self.model.eval()
        for module in self._trainable_modules(getattr(self, "trainable_blocks", 0)):
            module.train(mode)
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` normalized pixels -> float32 features ``(B, num_tokens, width)``."""
        size = self.config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[-2:]) != (size, size):
            # HF towers would otherwise slice their position table silently for smaller inputs.
            raise ValueError(
                f"the vision tower expects pixel_values of shape (B, 3, {size}, {size}), got {tuple(pixel_values.shape)}"
            )
        x = pixel_values.to(device=self.device, dtype=self.dtype)  # (B, 3, S, S)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trains):  # frozen: no_grad, as always
            feats = self._features(x)  # (B, N, C)
        return feats.float()

    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Images (PIL, paths, or preprocessed tensors) -> float32 ``(B, 3, S, S)``; see :class:`ImagePreprocessor`."""
        return self.preprocessor(images)


__all__ = ["VisionTower", "drop_removed_parts", "resolve_feature_layer"]
