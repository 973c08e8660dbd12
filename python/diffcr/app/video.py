"""Video clips for captioned fine-tuning of the video pipelines (Wan, HunyuanVideo): which
files are clips, how many frames they hold, and their first frames as a tensor.

Animated GIFs are read with Pillow; every other container (``.mp4``, ``.webm``, ``.mov``,
``.mkv``, ``.avi``) with imageio's ffmpeg reader (``pip install 'diffcr[video]'``: imageio and
imageio-ffmpeg, the pair ``diffusers.utils.load_video`` / ``export_to_video`` use).
"""
from __future__ import annotations

from pathlib import Path
from typing import List

import torch

from .options import TrainError

__all__ = ["VIDEO_SUFFIXES", "is_video", "frame_count", "load_clip", "save_gif"]

VIDEO_SUFFIXES = (".gif", ".mp4", ".webm", ".mov", ".mkv", ".avi")


def is_video(path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def _imageio():
    import importlib.util

    try:
        import imageio.v2 as imageio
        if importlib.util.find_spec("imageio_ffmpeg") is None:  # the ffmpeg imageio runs
            raise ImportError("no imageio_ffmpeg")
    except ImportError as e:
        raise TrainError("reading .mp4/.webm/.mov/.mkv/.avi clips needs imageio and "
                         "imageio-ffmpeg: pip install 'diffcr[video]' (or use animated .gif "
                         "clips)") from e
    return imageio


def frame_count(path) -> int:
    """How many frames the clip at ``path`` holds (decoding it; TrainError if it cannot)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".gif":
            from PIL import Image

            with Image.open(path) as im:
                return int(getattr(im, "n_frames", 1))
        reader = _imageio().get_reader(str(path), format="ffmpeg")
        try:
            return int(reader.count_frames())
        finally:
            reader.close()
    except TrainError:
        raise
    except Exception as e:  # corrupt or unreadable container: name the file
        raise TrainError(f"cannot read video {str(path)!r}: {e}") from e


def _frames(path: Path, n: int) -> List:
    """The first ``n`` frames of the clip as PIL images."""
    from PIL import Image

    if path.suffix.lower() == ".gif":
        out = []
        with Image.open(path) as im:
            for i in range(n):
                im.seek(i)
                out.append(im.convert("RGB"))
        return out
    reader = _imageio().get_reader(str(path), format="ffmpeg")
    try:
        return [Image.fromarray(reader.get_data(i)) for i in range(n)]
    finally:
        reader.close()


def load_clip(path, frames: int, size: int) -> torch.Tensor:
    """The first ``frames`` frames of the clip at ``path`` as ``[3, frames, size, size]`` in
    [-1, 1], each frame treated as an image is (RGB, shorter side to ``size``, bicubic,
    center crop)."""
    from .image_folder import to_square_tensor

    path = Path(path)
    try:
        images = _frames(path, frames)
    except TrainError:
        raise
    except Exception as e:
        raise TrainError(f"cannot read video {str(path)!r}: {e}") from e
    return torch.stack([to_square_tensor(im, size) for im in images], dim=1)


def save_gif(frames, path, fps: int = 16) -> None:
    """PIL ``frames`` as an animated GIF (looping) at ``fps`` frames per second."""
    frames[0].save(path, save_all=True, append_images=list(frames[1:]), loop=0,
                   duration=max(1, round(1000 / fps)))
