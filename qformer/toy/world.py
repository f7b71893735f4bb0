"""The toy world: seeded synthetic scenes of coloured shapes with English captions.

Why a synthetic world at all: the product's default run must show the whole BLIP-2
pipeline (stage 1 ITC/ITM/ITG, stage 2 soft prompts into a frozen LM) learning on a small
CPU in minutes, with no downloads. Real image-text data cannot be that small and still
learnable, so we generate it: every image is a few shapes on a lightly textured background
and every caption states exactly what is in it.

:class:`ToyWorld` ties the parts together; each concept lives in its own module:

* :mod:`qformer.toy.scenes` -- objects, scenes, how they are drawn and assigned to splits;
* :mod:`qformer.toy.rendering` -- images and instance masks of a scene;
* :mod:`qformer.toy.language` -- captions, the vocabulary, reading and scoring captions;
* :mod:`qformer.toy.questions` -- VQA questions with VQAv2-style answers;
* :mod:`qformer.toy.export` -- imagefolder and VQA files on disk.

This module also re-exports their public names, so ``from qformer.toy.world import ...``
keeps working. The world depends only on numpy and Pillow, so data loaders can import it
cheaply.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .export import export_imagefolder, export_vqa
from .language import (
    COLOUR_WORDS,
    RELATION_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
    VAGUE_HORIZONTAL,
    CaptionMention,
    caption_vocabulary,
    parse_caption,
    scene_captions,
    score_caption,
)
from .questions import QUESTION_STREAM, QUESTION_TYPES, VQA_FILE, ToyQuestion, toy_questions
from .rendering import render_mask, render_scene
from .scenes import (
    COLOURS,
    INVERSE,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLIT_ID,
    SPLITS,
    ToyObject,
    ToySample,
    ToyScene,
    draw_scene,
    split_of_key,
)

__all__ = [
    "SHAPES",
    "COLOURS",
    "SIZES",
    "RELATIONS",
    "SPLITS",
    "INVERSE",
    "SHAPE_WORDS",
    "COLOUR_WORDS",
    "SIZE_WORDS",
    "RELATION_WORDS",
    "VAGUE_HORIZONTAL",
    "ToyObject",
    "ToyScene",
    "ToySample",
    "ToySplit",
    "ToyWorld",
    "CaptionMention",
    "parse_caption",
    "score_caption",
    "caption_vocabulary",
    "QUESTION_TYPES",
    "VQA_FILE",
    "ToyQuestion",
    "toy_questions",
]


@dataclass
class ToySplit:
    """A split as a random-access sequence of :class:`ToySample` (a map-style dataset).

    ``torch.utils.data.DataLoader`` accepts it as is (with a ``collate_fn`` for PIL images).
    """

    world: ToyWorld
    split: str
    length: int

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> ToySample:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.split} split of size {self.length}")
        return self.world.sample(self.split, index % self.length)

    def __iter__(self) -> Iterator[ToySample]:
        return (self[i] for i in range(self.length))


@dataclass
class ToyWorld:
    """A seeded world of rendered shape scenes with captions.

    Args:
        seed: world seed; two worlds with the same arguments produce identical samples.
        image_size: side of the square RGB images in pixels (64 default: 4x4 patches of 16 px
            for the toy ViT). Must be >= 48 so that small objects stay legible.
        object_counts: possible numbers of objects per scene (subset of {1, 2, 3}).
        object_count_weights: sampling weights for ``object_counts`` (uniform if None).
        split_sizes: number of samples per split; train is generated lazily, so it may be
            large.
        num_captions: caption variants per sample (``captions``); ``caption`` is the first.
        holdout: "scene" keeps each semantic scene key in one split only (see
            :mod:`qformer.toy.scenes`); "none" only separates splits by seed (identical
            compositions may recur).
        grid: objects sit in a ``grid`` x ``grid`` layout of square cells, one object per
            cell at most. With ``image_size / grid`` equal to the ViT patch size (16 px by
            default) every object lies inside exactly one patch: the tower's tokens are the
            cells, which makes it learn fast and keeps only 16 image tokens.
        supersample: render at this multiple of ``image_size`` and box-downsample, for
            anti-aliased edges.
        noise: standard deviation of the per-pixel grey noise (the "light texture").
        unique_eval_scenes: no two val (or test) samples share a semantic key, so no
            held-out caption fits two held-out images and retrieval R@1 can reach 100 %.
            Without it, ~7 % of test[:500] (~15 % of test[:1000]) would share their key
            with another sample: held-out splits only own 5 % of the ~32.5k two-object
            scenes. The price: later val/test indices lean slightly towards 3 objects.
    """

    seed: int = 0
    image_size: int = 64
    object_counts: tuple[int, ...] = (2, 3)
    object_count_weights: tuple[float, ...] | None = None
    split_sizes: dict[str, int] = field(default_factory=lambda: {"train": 100_000, "val": 2_000, "test": 2_000})
    num_captions: int = 5
    holdout: str = "scene"
    grid: int = 4
    supersample: int = 4
    noise: float = 3.0
    unique_eval_scenes: bool = True
    # val/test scenes drawn so far and their keys (see ``scene``); not part of the config.
    _eval_scenes: dict[str, tuple[list[ToyScene], set[str]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.image_size < 48:
            raise ValueError(f"image_size must be >= 48 for legible shapes, got {self.image_size}")
        self.object_counts = tuple(int(n) for n in self.object_counts)
        if not self.object_counts or not set(self.object_counts) <= {1, 2, 3}:
            raise ValueError(f"object_counts must be a non-empty subset of (1, 2, 3), got {self.object_counts}")
        if self.object_count_weights is not None:
            if len(self.object_count_weights) != len(self.object_counts):
                raise ValueError("object_count_weights must have one weight per entry of object_counts")
            w = np.asarray(self.object_count_weights, dtype=np.float64)
            self._count_p = w / w.sum()
        else:
            self._count_p = np.full(len(self.object_counts), 1 / len(self.object_counts))
        if self.holdout not in ("scene", "none"):
            raise ValueError(f"holdout must be 'scene' or 'none', got {self.holdout!r}")
        unknown = set(self.split_sizes) - set(SPLITS)
        if unknown or any(n < 0 for n in self.split_sizes.values()):
            raise ValueError(f"split_sizes keys must be among {SPLITS} with sizes >= 0, got {self.split_sizes}")
        if self.num_captions < 1:
            raise ValueError("num_captions must be >= 1")
        if not 2 <= self.grid <= 6 or self.image_size % self.grid:
            raise ValueError(f"grid must be in 2..6 and divide image_size, got {self.grid} for {self.image_size}")

    # -- description -----------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The arguments that define this world (JSON-friendly; hashed into cache keys)."""
        return {
            "seed": self.seed,
            "image_size": self.image_size,
            "object_counts": list(self.object_counts),
            "object_count_weights": None if self.object_count_weights is None else list(self.object_count_weights),
            "split_sizes": dict(self.split_sizes),
            "num_captions": self.num_captions,
            "holdout": self.holdout,
            "unique_eval_scenes": self.unique_eval_scenes,
            "grid": self.grid,
            "supersample": self.supersample,
            "noise": self.noise,
        }

    def split_size(self, split: str) -> int:
        """Number of samples in ``split`` ("train", "val" or "test")."""
        self._check_split(split)
        return int(self.split_sizes.get(split, 0))

    def dataset(self, split: str) -> ToySplit:
        """``split`` as a map-style dataset of :class:`ToySample`."""
        return ToySplit(self, split, self.split_size(split))

    def space_size(self) -> dict[str, int]:
        """Number of distinct semantic scenes (caption-distinguishable), per object count.

        Objects in a scene have distinct types (T = shapes x colours x sizes).
        * 1 object: T types x 9 location phrases (corners, edges, centre).
        * 2 objects: ordered (subject, anchor) x {left, above} after normalising
          right/below: T (T-1) x 2.
        * 3 objects: an anchor and two subjects in two different directions; the key is the
          unordered pair of normalised relations, so count anchor x unordered
          {(subject, direction)} pairs with distinct directions: T x C(4, 2) x (T-1)(T-2).
        """
        t = len(SHAPES) * len(COLOURS) * len(SIZES)
        return {
            "object_types": t,
            "scenes_1": t * 9,
            "scenes_2": t * (t - 1) * 2,
            "scenes_3": t * 6 * (t - 1) * (t - 2),
        }

    # -- sampling --------------------------------------------------------------------

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")

    def split_of_key(self, key: str) -> str:
        """Which split a semantic scene key belongs to under ``holdout="scene"``."""
        return split_of_key(self.seed, key)

    def scene(self, split: str, index: int) -> ToyScene:
        """The scene at ``index`` of ``split`` (a pure function of world, split, index).

        With ``unique_eval_scenes``, val/test scene ``i`` is drawn after scenes ``0..i-1``
        (memoised) so that it can skip their keys, which makes held-out scenes costlier to
        draw than train scenes, which are independent of each other.
        """
        self._check_split(split)
        n = self.split_size(split)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {split} split of size {n}")
        if split == "train" or not self.unique_eval_scenes:
            return self._draw_for_split(split, index, ())
        cache = self._eval_scenes.setdefault(split, ([], set()))
        scenes, seen = cache
        while len(scenes) <= index:
            scene = self._draw_for_split(split, len(scenes), seen)
            scenes.append(scene)
            seen.add(scene.key)
        return scenes[index]

    def _draw_for_split(self, split: str, index: int, avoid: set[str] | tuple[()]) -> ToyScene:
        """Rejection-sample the split's scene ``index``: its key must hash to the split
        (``holdout="scene"``) and must not be in ``avoid``."""
        for attempt in range(100_000):
            rng = np.random.default_rng([self.seed, SPLIT_ID[split], index, attempt])
            scene = draw_scene(rng, object_counts=self.object_counts, count_p=self._count_p, grid=self.grid,
                               image_size=self.image_size)
            if (self.holdout == "none" or self.split_of_key(scene.key) == split) and scene.key not in avoid:
                return scene
        raise RuntimeError(f"could not draw a new scene for {split}[{index}]; is the split too large?")

    def captions(self, scene: ToyScene, n: int | None = None) -> list[str]:
        """``n`` (default ``num_captions``) caption variants of ``scene``, deterministic.

        The first variant always uses a precise relation word; later ones may say "next
        to"/"beside" for horizontal relations, as people do.
        """
        return scene_captions(scene, self.num_captions if n is None else n)

    def render(self, scene: ToyScene) -> Image.Image:
        """Render ``scene`` as an RGB image of ``image_size`` x ``image_size`` pixels."""
        return render_scene(scene, image_size=self.image_size, supersample=self.supersample, noise=self.noise)

    def render_mask(self, scene: ToyScene) -> np.ndarray:
        """Instance mask ``(H, W) uint8``: 0 = background, ``i + 1`` = ``scene.objects[i]``.

        Used to derive dense (per-patch) labels when pretraining the toy vision tower.
        """
        return render_mask(scene, image_size=self.image_size)

    def sample(self, split: str, index: int) -> ToySample:
        """The sample at ``index`` of ``split``: image, captions and attributes."""
        scene = self.scene(split, index)
        caps = self.captions(scene)
        return ToySample(self.render(scene), caps[0], caps, scene.to_dict(), split, index)

    def iter_captions(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[list[str]]:
        """Caption variants of samples ``start..stop`` without rendering (cheap: for LMs)."""
        stop = self.split_size(split) if stop is None else stop
        for i in range(start, stop):
            yield self.captions(self.scene(split, i))

    def questions(self, split: str, index: int, n: int = 3) -> list[ToyQuestion]:
        """Questions about sample ``index`` of ``split`` (:func:`toy_questions`): a pure
        function of (world, split, index), drawn from their own random stream so that asking
        them changes no image and no caption."""
        scene = self.scene(split, index)
        return toy_questions(scene, seed=[self.seed, SPLIT_ID[split], index, QUESTION_STREAM], num_questions=n)

    # -- export ----------------------------------------------------------------------

    def export(self, split: str, n: int, out_dir: str | Path, *, start: int = 0, overwrite: bool = False) -> Path:
        """Write samples ``start..start+n`` of ``split`` as an HF ``imagefolder`` dataset
        (:func:`qformer.toy.export.export_imagefolder`)."""
        return export_imagefolder(self, split, n, out_dir, start=start, overwrite=overwrite)

    def export_vqa(
        self, split: str, n: int, out_dir: str | Path, *, start: int = 0, num_questions: int = 3,
        overwrite: bool = False,
    ) -> Path:
        """Write the questions of samples ``start..start+n`` of ``split`` as ``out_dir/vqa.jsonl``
        next to the images :meth:`export` wrote there (:func:`qformer.toy.export.export_vqa`)."""
        return export_vqa(self, split, n, out_dir, start=start, num_questions=num_questions, overwrite=overwrite)
