"""Video clips in, frames out: what ``videos=`` accepts, and uniform frame sampling.

A clip is any of: a ``(T, 3, H, W)`` tensor (already preprocessed), a list of frames (PIL
images or image paths, used as given), a folder of frame images (sorted by name, ``T``
sampled), or a video file (decoded with PyAV, the optional ``video`` extra, ``T`` sampled).
A ``(B, T, 3, H, W)`` tensor is ``B`` clips of ``T`` frames. The ``videos=`` keyword is
separate from ``images=`` so that a 4-D tensor is never ambiguous.

Sampling is uniform over the clip: frame ``i`` of ``T`` is the middle of the ``i``-th of ``T``
equal segments (a clip shorter than ``T`` repeats frames, so every clip gets ``T``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Union

import torch
from PIL import Image

from .errors import ConfigError, ImageLoadError
from .images import ImageInput

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
ClipInput = Union[torch.Tensor, str, Path, Sequence[ImageInput]]
VideoInput = Union[torch.Tensor, Sequence[ClipInput], str, Path]


def sample_frame_indices(total: int, num_frames: int) -> list[int]:
    """``num_frames`` indices into ``total`` frames, the middle of each of ``num_frames`` equal
    segments (in order; repeats when ``total < num_frames``)."""
    if total < 1:
        raise ValueError("a clip with no frames")
    return [min(total - 1, int((i + 0.5) * total / num_frames)) for i in range(num_frames)]


def frame_files(folder: Path) -> list[Path]:
    """The image files of a frame folder, sorted by name."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and p.is_file())
    if not files:
        raise ImageLoadError(f"{folder}: a frame folder with no image files ({', '.join(FRAME_SUFFIXES)})")
    return files


def decode_video(path: Path, num_frames: int) -> list[Image.Image]:
    """``num_frames`` frames of a video file, sampled uniformly (PyAV)."""
    try:
        import av
    except ImportError as e:  # optional extra
        raise ConfigError(f"{path}: reading video files needs PyAV: pip install 'qformer[video]' (or pip install av)") from e
    if not path.is_file():
        raise FileNotFoundError(2, "video file not found", str(path))
    try:
        with av.open(str(path)) as container:
            frames = [f.to_image() for f in container.decode(video=0)]
    except (av.error.FFmpegError, ValueError, IndexError) as e:  # not a video, or no video stream
        raise ImageLoadError(f"cannot read video {path}: {e}") from e
    if not frames:
        raise ImageLoadError(f"{path}: a video with no decodable frames")
    return [frames[i] for i in sample_frame_indices(len(frames), num_frames)]


def clip_frames(clip: ClipInput, num_frames: int) -> torch.Tensor | list[ImageInput]:
    """One clip -> a preprocessed ``(T, 3, H, W)`` tensor (passed through) or its frames."""
    if isinstance(clip, torch.Tensor):
        if clip.dim() != 4:
            raise ValueError(f"a clip tensor must be (T, 3, H, W), got shape {tuple(clip.shape)}")
        return clip
    if isinstance(clip, (str, Path)):
        path = Path(clip)
        if path.is_dir():
            files = frame_files(path)
            return [files[i] for i in sample_frame_indices(len(files), num_frames)]
        return decode_video(path, num_frames)
    frames = list(clip)
    if not frames:
        raise ValueError("a clip with no frames")
    return frames


def as_clips(videos: VideoInput) -> list[ClipInput]:
    """``videos=`` -> a list of clips (a 5-D tensor is B clips; one path or 4-D tensor is one clip)."""
    if isinstance(videos, torch.Tensor):
        if videos.dim() == 5:
            return list(videos.unbind(0))
        if videos.dim() == 4:
            return [videos]
        raise ValueError(f"videos must be (B, T, 3, H, W) or (T, 3, H, W), got shape {tuple(videos.shape)}")
    if isinstance(videos, (str, Path)):
        return [videos]
    clips = list(videos)
    if clips and all(_is_frame(c) for c in clips):
        return [clips]  # a flat list of frames (PIL images, image files) is one clip
    return clips


def _is_frame(x: object) -> bool:
    if isinstance(x, Image.Image):
        return True
    return isinstance(x, (str, Path)) and Path(x).suffix.lower() in FRAME_SUFFIXES and Path(x).is_file()


def preprocess_videos(
    videos: VideoInput, preprocess: Callable[[Sequence[ImageInput]], torch.Tensor], num_frames: int
) -> list[torch.Tensor]:
    """Every clip as a float32 ``(T_i, 3, S, S)`` tensor (``preprocess`` is the tower's)."""
    out = []
    for clip in as_clips(videos):
        frames = clip_frames(clip, num_frames)
        out.append(preprocess(frames))  # a tensor is checked and passed through by the preprocessor
    return out


__all__ = [
    "ClipInput",
    "FRAME_SUFFIXES",
    "VideoInput",
    "as_clips",
    "clip_frames",
    "decode_video",
    "frame_files",
    "preprocess_videos",
    "sample_frame_indices",
]
