"""Pictures of :mod:`qformer.explain`'s maps (matplotlib, PNG): each query's cross-attention over
an image, and the Grad-CAM overlay of an (image, caption) pair with its ITM score.

The image drawn is the one the model saw (its preprocessing undone: resized to the tower's
input size), and each map is upsampled bilinearly from the patch grid to that size.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .config import VisionConfig
from .explain import attention_maps, gradcam
from .images import ImageInput
from .io import atomic_write_json
from .model import Blip2Model


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def display_images(pixels: torch.Tensor, vision: VisionConfig) -> np.ndarray:
    """Preprocessed pixels (B, 3, S, S) -> (B, S, S, 3) floats in [0, 1]: what the model saw."""
    mean = torch.tensor(vision.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(vision.std, dtype=torch.float32)[:, None, None]
    return (pixels.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def upsample(maps: torch.Tensor, size: int) -> np.ndarray:
    """(..., h, w) maps -> (..., size, size), bilinear (each patch's value at its centre)."""
    lead = maps.shape[:-2]
    up = F.interpolate(maps.float().reshape(-1, 1, *maps.shape[-2:]).cpu(), size=(size, size), mode="bilinear",
                       align_corners=False)
    return up.reshape(*lead, size, size).numpy()


def _overlay(ax, image: np.ndarray, heat: np.ndarray | None, title: str, *, vmax: float | None = None,
             fontsize: float = 8) -> None:
    ax.imshow(image)
    if heat is not None:
        top = float(heat.max()) if vmax is None else vmax
        ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=max(top, 1e-12))
    ax.set_title(title, fontsize=fontsize)
    ax.axis("off")


def query_maps_figure(image: np.ndarray, maps: torch.Tensor, *, title: str, prefix: torch.Tensor | None = None,
                      columns: int | None = None):
    """The image, then each query's map over it: ``maps`` (Q, h, w) of one cross-attention layer;
    ``prefix`` (Q, P): the attention on the prefix tokens (CLS ...), whose total each title shows.
    Each map is drawn on its own scale (0 to its maximum)."""
    plt = _pyplot()
    q, size = maps.shape[0], image.shape[0]
    columns = columns or math.ceil(math.sqrt(q + 1))
    rows = math.ceil((q + 1) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.7 * rows + 0.4), squeeze=False)
    heats = upsample(maps, size)
    for k, ax in enumerate(axes.flat):
        if k == 0:
            _overlay(ax, image, None, "image")
        elif k <= q:
            cls = "" if prefix is None or prefix.shape[-1] == 0 else f", CLS {float(prefix[k - 1].sum()):.0%}"
            _overlay(ax, image, heats[k - 1], f"query {k - 1}{cls}")
        else:
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def gradcam_figure(image: np.ndarray, cam: torch.Tensor, *, text: str, score: float, layer: int,
                   words: list[str] | None = None, word_maps: torch.Tensor | None = None,
                   word_scores: torch.Tensor | None = None):
    """The image and its Grad-CAM overlay (``cam`` (h, w)), titled with the caption and the ITM
    match probability; with ``words``, one more panel per word (its map, on one scale for all
    words, and the drop of the match logit when it is masked)."""
    plt = _pyplot()
    size = image.shape[0]
    n_words = len(words) if words is not None else 0
    panels = 2 + n_words
    columns = min(panels, 6)
    rows = math.ceil(panels / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.3 * rows + 0.5), squeeze=False)
    flat = list(axes.flat)
    _overlay(flat[0], image, None, "image")
    _overlay(flat[1], image, upsample(cam, size), f"Grad-CAM, layer {layer}")
    shared = float(word_maps.max()) if n_words else None  # one scale: a word that changes nothing stays dark
    for k in range(n_words):
        _overlay(flat[2 + k], image, upsample(word_maps[k], size), f"'{words[k]}': {float(word_scores[k]):+.2f}",
                 vmax=shared)
    for ax in flat[panels:]:
        ax.axis("off")
    fig.suptitle(f'"{text}"\nITM match probability {score:.3f}', fontsize=9)
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path, *, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG and free it."""
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def figure_png(fig, *, dpi: int = 100) -> bytes:
    """``fig`` as PNG bytes, in memory (nothing written to disk), and free it."""
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:limit].lower() or "x"


def write_pictures(model: Blip2Model, images: Sequence[ImageInput], output_dir: Path, *,
                   texts: Sequence[str] = (), names: Sequence[str] | None = None, layer: int | None = None,
                   gradcam_layer: int | None = None, words: bool = False) -> dict[str, Any]:
    """PNGs for each image: ``queries_NAME.png`` (each query's map at cross-attention ``layer``,
    default the last) and, for every text, ``gradcam_NAME_TEXT.png`` (Grad-CAM of the ITM score
    at ``gradcam_layer``); plus ``pictures.json`` listing them with the ITM scores. Returns it."""
    names = list(names) if names is not None else [f"image{i}" for i in range(len(images))]
    pixels = model.vision.preprocess(list(images))  # (B, 3, S, S)
    shown = display_images(pixels, model.config.vision)
    maps = attention_maps(model, pixels)
    layer = maps.layers[-1] if layer is None else layer
    per_layer = maps.layer(layer)  # (B, Q, h, w)
    summary: dict[str, Any] = {"query_layer": layer, "grid": list(per_layer.shape[-2:]), "images": []}
    stems = [_slug(Path(name).stem) for name in names]
    for i, name in enumerate(names):
        stem = stems[i] if stems.count(stems[i]) == 1 else f"{i}-{stems[i]}"  # two a.jpg from two folders
        prefix = maps.prefix[:, maps.layers.index(layer)]  # (B, Q, P)
        fig = query_maps_figure(shown[i], per_layer[i], prefix=prefix[i],
                                title=f"{name}: each query's cross-attention, layer {layer}")
        entry: dict[str, Any] = {"image": name, "queries": str(save_figure(fig, output_dir / f"queries_{stem}.png")),
                                 "gradcam": []}
        if texts:
            cam = gradcam(model, pixels[i:i + 1], list(texts), layer=gradcam_layer, words=words)
            summary["gradcam_layer"] = cam.layer
            for t, text in enumerate(texts):
                fig = gradcam_figure(shown[i], cam.maps[t], text=text, score=float(cam.itm_score[t]), layer=cam.layer,
                                     words=cam.words[t] if words else None,
                                     word_maps=cam.word_maps[t] if words else None,
                                     word_scores=cam.word_scores[t] if words else None)
                path = save_figure(fig, output_dir / f"gradcam_{stem}_{t}_{_slug(text, 30)}.png")
                peak = divmod(int(cam.maps[t].argmax()), cam.maps.shape[-1])
                entry["gradcam"].append({"text": text, "itm_score": float(cam.itm_score[t]),
                                         "itm_logit": float(cam.itm_logit[t]), "peak_cell": list(peak),
                                         "file": str(path)})
        summary["images"].append(entry)
    atomic_write_json(output_dir / "pictures.json", summary)
    return summary


__all__ = ["display_images", "figure_png", "gradcam_figure", "query_maps_figure", "save_figure", "upsample", "write_pictures"]
