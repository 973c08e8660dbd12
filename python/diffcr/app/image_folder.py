"""ImageFolder-style trees of user images: ``root/<class>/<image>.{png,jpg,jpeg}`` (the
torchvision / diffusers convention), read into tensors for ``diffcr train`` and written by the
demo. Application code: the library never imports it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

PathLike = Union[str, os.PathLike]
CLASSES_FILE = "classes.txt"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _to_uint8(images: Tensor) -> Tensor:
    """``[n, 3, H, W]`` in [-1, 1] -> uint8 ``[n, H, W, 3]``."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def save_image_folder(images: Tensor, labels: Tensor, root: PathLike,
                      class_names: Optional[Sequence[str]] = None) -> Path:
    """Write ``images`` as uint8 RGB PNGs to ``root/<class_name>/<i>.png``.

    ``i`` is the zero-padded index of the image in ``images``, so files sort in input order.
    ``class_names`` defaults to ``class_<k>``. The class order
    is also written to ``root/classes.txt``, which :func:`load_image_folder` uses to give back the
    same labels. Returns ``root`` as a Path.
    """
    from PIL import Image

    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [n, 3, H, W], got {tuple(images.shape)}")
    labels = torch.as_tensor(labels).flatten().long().cpu()
    if labels.numel() != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.numel()} labels")
    n_cls = int(labels.max()) + 1 if labels.numel() else 0
    if class_names is None:
        class_names = [f"class_{k}" for k in range(max(n_cls, 1))]
    class_names = list(class_names)
    if n_cls > len(class_names):
        raise ValueError(f"label {n_cls - 1} has no name in class_names ({len(class_names)})")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name in class_names:
        (root / name).mkdir(exist_ok=True)
    (root / CLASSES_FILE).write_text("\n".join(class_names) + "\n")
    width = max(6, len(str(max(images.shape[0] - 1, 0))))
    arr = _to_uint8(images).numpy()
    for i, (a, y) in enumerate(zip(arr, labels.tolist())):
        Image.fromarray(a).save(root / class_names[y] / f"{i:0{width}d}.png")
    return root


def load_image(path: Path, size: int) -> Tensor:
    """The image at ``path`` as ``[3, size, size]`` in [-1, 1] (RGB, shorter side to ``size``,
    bicubic, center crop); ``ValueError`` naming the file when it cannot be read."""
    from PIL import Image

    try:
        return _decode(Image, path, size)
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # truncated, corrupt, huge
        raise ValueError(f"cannot read image {str(path)!r}: {e}") from e


def _decode(Image, path: Path, size: int) -> Tensor:
    with Image.open(path) as im:
        return to_square_tensor(im, size)


def to_square_tensor(im, size: int) -> Tensor:
    """A PIL image as ``[3, size, size]`` in [-1, 1]: RGB, the shorter side resized to
    ``size`` (bicubic), center-cropped."""
    from PIL import Image

    im = im.convert("RGB")
    w, h = im.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return data.view(size, size, 3).permute(2, 0, 1).float() / 127.5 - 1.0


def load_image_folder(root: PathLike, size: int = 32) -> Tuple[Tensor, Tensor, List[str]]:
    """Read an ImageFolder-style tree: ``root/<class>/<image>.{png,jpg,jpeg}``.

    Classes are the subfolders of ``root`` (hidden ones skipped), in the order of
    ``root/classes.txt`` when present (as written by :func:`save_image_folder`; subfolders it does
    not list follow, sorted), else sorted by name. Images are read in sorted file-name order
    within each class, converted to RGB, resized so the shorter side is ``size`` (bicubic) and
    center-cropped to ``size x size``.

    Returns:
        ``(images, labels, class_names)``: float32 ``[n, 3, size, size]`` in [-1, 1], int64
        ``[n]``, and the class names (``class_names[label]``).

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a folder.
        ValueError: ``root`` has no class subfolders, they hold no images, or an image cannot
            be decoded (the message names the file).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a folder")
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subdirs:
        raise ValueError(f"image folder {str(root)!r} has no class subfolders "
                         "(expected root/<class>/<image>.png)")
    order: List[str] = []
    listed = root / CLASSES_FILE
    if listed.is_file():
        for name in listed.read_text().splitlines():
            name = name.strip()
            if name and name in subdirs and name not in order:
                order.append(name)
    class_names = order + [d for d in subdirs if d not in order]
    files: List[Tuple[Path, int]] = []
    for k, name in enumerate(class_names):
        for f in sorted((root / name).iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append((f, k))
    if not files:
        raise ValueError(f"image folder {str(root)!r} has no images "
                         f"({'/'.join(IMAGE_EXTENSIONS)}) in its class subfolders")
    images = torch.stack([load_image(f, size) for f, _ in files])
    labels = torch.tensor([k for _, k in files], dtype=torch.int64)
    return images, labels, class_names
