"""Procedural image data for the DiffCR demo.

:func:`make_shapes` draws a class-conditional data set of one coloured shape per image on a
textured background, fully vectorised in torch and deterministic for a seed. Images are float32
``[n, 3, size, size]`` in [-1, 1], labels int64 ``[n]``. :func:`save_image_folder` and
:func:`load_image_folder` (from :mod:`diffcr.app.image_folder`, with the demo's class names)
move such tensors to and from a ``root/<class>/<file>.png`` tree.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import image_folder as _image_folder

NUM_CLASSES = 6
CLASS_NAMES: Tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")

_CHUNK = 2048          # images rendered at a time (bounds the memory of the temporaries)
_MAX_ROT = math.radians(12.0)   # shape rotation range: keeps square and diamond apart
_SUBSAMPLES = ((-0.25, -0.25), (-0.25, 0.25), (0.25, -0.25), (0.25, 0.25))  # 2x2 anti-aliasing

PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------ generation
def _u(g: torch.Generator, *shape: int, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    return torch.rand(*shape, generator=g) * (hi - lo) + lo


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """``[n]`` hue/saturation/value in [0, 1] -> ``[n, 3]`` RGB in [0, 1]."""
    n = torch.tensor([5.0, 3.0, 1.0])
    k = (n + h[:, None] * 6.0) % 6.0
    return v[:, None] - v[:, None] * s[:, None] * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def _inside(cls: int, u: Tensor, v: Tensor, ring_inner: Tensor, cross_w: Tensor) -> Tensor:
    """Boolean mask of class ``cls`` in normalised shape coordinates.

    Every shape stays inside the square [-1, 1]^2 even after a rotation of up to 12 degrees, so a
    shape centred at least one radius from every border is fully inside the image (make_shapes
    adds a pixel of margin). ``ring_inner`` and ``cross_w`` broadcast against ``u``."""
    if cls == 0:                                   # circle (an ellipse after the aspect jitter)
        return u * u + v * v <= 1.0
    if cls == 1:                                   # square
        return torch.maximum(u.abs(), v.abs()) <= 0.80
    if cls == 2:                                   # equilateral triangle, pointing up
        c, s = math.cos(math.pi / 6), 0.5
        return (v <= 0.5) & (c * u - s * v <= 0.5) & (-c * u - s * v <= 0.5)
    if cls == 3:                                   # plus-shaped cross
        a = 0.92
        return (((u.abs() <= cross_w) & (v.abs() <= a)) | ((v.abs() <= cross_w) & (u.abs() <= a)))
    if cls == 4:                                   # ring
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= ring_inner * ring_inner)
    if cls == 5:                                   # diamond: rhombus, taller than wide
        return u.abs() / 0.75 + v.abs() <= 1.0
    raise ValueError(f"no shape for class {cls}")


def make_shapes(n: int, size: int = 32, seed: int = 0, num_classes: int = NUM_CLASSES,
                return_masks: bool = False, spread: float = 1.0, mono: bool = False,
                scale: float = 1.0):
    """Procedural class-conditional images: one coloured shape per image on a textured background.

    Each image has a muted background (random mix of a two-colour gradient, stripes at a random
    angle and frequency, and low-amplitude noise) and ONE saturated shape of its class
    (:data:`CLASS_NAMES`: circle, square, triangle, cross, ring, diamond) at a random position,
    with a random size of 20-45 % of the image side, a small random rotation and aspect jitter,
    fully inside the image with a margin (1 px from 20 px up, 5 % of the side below), with a
    luminance that contrasts with the background. Edges are anti-aliased (2x2 supersampling).
    The demo of ``diffcr train`` uses ``size=16, spread=0.3, mono=True, scale=1.6``: shapes near
    the centre, near-white or near-black, 32-72 % of the side.

    Args:
        n: number of images.
        size: image side in pixels.
        seed: seed of the private ``torch.Generator``; the global RNG is not touched.
        num_classes: use the first ``num_classes`` shapes (1..6).
        return_masks: also return the shape masks.
        spread: how far from the centre a shape may sit, as a fraction of the room it has
            (1: anywhere fully inside the image; 0: always centred). The other draws do not
            depend on it.
        scale: multiply the shapes' size range by this (at most 2: they must fit).
        mono: draw the shape near-white or near-black (the side of its drawn luminance), not
            in a saturated hue; the background still contrasts with it. The other draws do
            not depend on it.

    Returns:
        ``(images, labels)``: float32 ``[n, 3, size, size]`` in [-1, 1] and int64 ``[n]``
        (classes balanced to within one image, in shuffled order); with ``return_masks=True``
        ``(images, labels, masks)`` where ``masks`` is bool ``[n, size, size]``, True on the pixels
        at least half covered by the shape (never empty).
    """
    if not 1 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be in 1..{len(CLASS_NAMES)}, got {num_classes}")
    if n < 0 or size < 4:
        raise ValueError(f"need n >= 0 and size >= 4, got n={n}, size={size}")
    g = torch.Generator().manual_seed(int(seed))
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]

    # ---- per-image parameters (all drawn up front so they do not depend on the chunking)
    S = float(size)
    if not 0 < scale <= 2:
        raise ValueError(f"scale must be in (0, 2], got {scale}")
    radius = _u(g, n, lo=0.10, hi=0.225) * S * float(scale)    # half extent, pixels
    margin = radius + min(1.0, 0.05 * S)                        # 1 px off the border
    cx = S / 2 + (_u(g, n) - 0.5) * (S - 2 * margin) * float(spread)
    cy = S / 2 + (_u(g, n) - 0.5) * (S - 2 * margin) * float(spread)
    rot = _u(g, n, lo=-_MAX_ROT, hi=_MAX_ROT)
    aspect = _u(g, n, 2, lo=0.85, hi=1.0)                       # shrink-only keeps it inside
    ring_inner = _u(g, n, lo=0.45, hi=0.60)
    cross_w = _u(g, n, lo=0.22, hi=0.34)
    shape_rgb = _hsv_to_rgb(_u(g, n), _u(g, n, lo=0.75, hi=1.0), _u(g, n, lo=0.75, hi=1.0))
    shape_rgb = shape_rgb * 2 - 1                               # [-1, 1]
    lum = shape_rgb @ torch.tensor([0.299, 0.587, 0.114])
    if mono:
        shape_rgb = torch.where(lum > 0, 0.9, -0.9)[:, None].expand(n, 3).clone()
        lum = shape_rgb[:, 0]
    # background grey level: on the far side of the shape's luminance, 0.45-0.9 away
    delta = _u(g, n, lo=0.45, hi=0.9)
    base = torch.where(lum > 0, lum - delta, lum + delta).clamp(-0.8, 0.8)
    tint = _u(g, n, 2, 3, lo=-0.12, hi=0.12)                    # two muted gradient colours
    grad_amp = _u(g, n, lo=0.0, hi=0.25)
    grad_ang = _u(g, n, hi=2 * math.pi)
    stripe_on = (_u(g, n) < 0.6).float()
    stripe_amp = _u(g, n, lo=0.04, hi=0.16) * stripe_on
    stripe_ang = _u(g, n, hi=math.pi)
    stripe_freq = _u(g, n, lo=1.5, hi=6.0)                      # cycles per image side
    stripe_phase = _u(g, n, hi=2 * math.pi)
    stripe_rgb = 0.6 + 0.4 * _u(g, n, 3)
    noise_sd = _u(g, n, lo=0.0, hi=0.06)

    # background = coef @ [1, gradient, stripes] per channel, plus grey (luminance) noise
    t0, t1 = tint[:, 0], tint[:, 1]
    coef = torch.stack([base[:, None] + (t0 + t1) / 2,                      # constant
                        math.sqrt(0.5) * ((t1 - t0) + 2 * grad_amp[:, None]),  # gradient
                        stripe_amp[:, None] * stripe_rgb], dim=2)              # [n, 3, 3]
    # shape frame: u = (R(-rot) (p - c)) / (r * aspect), affine in the pixel position
    cr, sr = torch.cos(rot), torch.sin(rot)
    su, sv = 1.0 / (radius * aspect[:, 0]), 1.0 / (radius * aspect[:, 1])

    images = torch.empty(n, 3, size, size)
    masks = torch.empty(n, size, size, dtype=torch.bool)
    pix = torch.arange(size, dtype=torch.float32) + 0.5
    Y, X = pix[:, None].expand(size, size), pix[None, :].expand(size, size)
    Xn, Yn = (X / S - 0.5).reshape(1, -1), (Y / S - 0.5).reshape(1, -1)   # [1, P]
    P = size * size
    for s0 in range(0, n, _CHUNK):
        sl = slice(s0, min(n, s0 + _CHUNK))
        m = sl.stop - sl.start
        ga, sa = grad_ang[sl, None], stripe_ang[sl, None]
        gdir = torch.cos(ga) * Xn + torch.sin(ga) * Yn                        # [m, P]
        wave = torch.sin((2 * math.pi * stripe_freq[sl, None])
                         * (torch.cos(sa) * Xn + torch.sin(sa) * Yn) + stripe_phase[sl, None])
        basis = torch.stack([torch.ones_like(gdir), gdir, wave], dim=1)        # [m, 3, P]
        bg = torch.bmm(coef[sl], basis)                                        # [m, 3, P]
        bg += noise_sd[sl, None, None] * torch.randn(m, 1, P, generator=g)

        # shape coverage, class by class on the images of that class
        cover = torch.zeros(m, P)
        lab = labels[sl]
        for c in range(num_classes):
            idx = (lab == c).nonzero().flatten()
            if idx.numel() == 0:
                continue
            gi = idx + sl.start
            k = idx.numel()
            a_u, b_u = (cr[gi] * su[gi])[:, None], (sr[gi] * su[gi])[:, None]
            a_v, b_v = (-sr[gi] * sv[gi])[:, None], (cr[gi] * sv[gi])[:, None]
            px, py = X.reshape(1, -1) - cx[gi, None], Y.reshape(1, -1) - cy[gi, None]
            u0 = a_u * px + b_u * py                                           # [k, P]
            v0 = a_v * px + b_v * py
            ri, cw = ring_inner[gi, None], cross_w[gi, None]
            acc = torch.zeros(k, P)
            for ox, oy in _SUBSAMPLES:
                acc += _inside(c, u0 + (a_u * ox + b_u * oy), v0 + (a_v * ox + b_v * oy),
                               ri, cw)
            cover[idx] = acc.mul_(1.0 / len(_SUBSAMPLES))

        mk = cover >= 0.5
        empty = ~mk.any(1)
        if empty.any():                                          # only for tiny images
            peak = cover[empty].amax(1, keepdim=True)
            mk[empty] = (cover[empty] >= peak) & (peak > 0)
        img = torch.lerp(bg, shape_rgb[sl, :, None].expand(m, 3, P), cover[:, None])
        images[sl] = img.clamp_(-1.0, 1.0).view(m, 3, size, size)
        masks[sl] = mk.view(m, size, size)
    if return_masks:
        return images, labels, masks
    return images, labels


def shape_masks(n: int, size: int = 32, seed: int = 0,
                num_classes: int = NUM_CLASSES) -> Tensor:
    """Bool ``[n, size, size]`` masks of the shape pixels of ``make_shapes(n, size, seed,
    num_classes)`` (same arguments give the masks of the same images)."""
    return make_shapes(n, size, seed, num_classes, return_masks=True)[2]


# ------------------------------------------------------------------ image folders
def save_image_folder(images: Tensor, labels: Tensor, root: PathLike,
                      class_names: Optional[Sequence[str]] = None) -> Path:
    """:func:`diffcr.app.image_folder.save_image_folder` with the demo's class names
    (:data:`CLASS_NAMES`, then ``class_<k>``) as the default."""
    if class_names is None:
        labels = torch.as_tensor(labels).flatten().long().cpu()
        n_cls = int(labels.max()) + 1 if labels.numel() else 0
        class_names = [CLASS_NAMES[k] if k < len(CLASS_NAMES) else f"class_{k}"
                       for k in range(max(n_cls, 1))]
    return _image_folder.save_image_folder(images, labels, root, class_names)


load_image_folder = _image_folder.load_image_folder
