"""Mask-aware routing: tokens that every routed block must compute (an inpainting region).

In an inpainting pipeline that blends latents each step (``latents = (1 - mask) * init + mask
* latents``), the transformer's prediction outside the mask is thrown away: those tokens
matter only as context. With a :class:`KeepMask` on the routing state
(:func:`diffcr.mask_routing`), every routed block computes the masked tokens first and spends
its learned kept ratio on the others:

* the masked tokens of sample ``b`` (``n_b`` of them, rounded up to a multiple of ``bucket *
  N`` so that ``k`` is the same for masks of about the same size: static shapes for
  ``torch.compile`` and CUDA graphs) are always selected;
* of the remaining ``N - n_b`` context tokens the block keeps its usual share: ``k_b = n_b +
  kept_count(k / N, N - n_b)``, ``k`` the block's own kept count for that sample (per bin in
  training) or, with ``context_kept_ratio`` r, ``n_b + kept_count(r, N - n_b)`` in every
  block, as the router ranks them;
* the router gate on the MLP branch is the router's own score, as for any selected token.

This module holds the mechanics (the mask at token resolution, the kept counts); turning it
on is :func:`diffcr.mask_routing` (:mod:`diffcr.cache_control`).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import diffcr_kernels as dk

__all__ = ["KeepMask", "token_grid", "spatial_mask", "random_box_masks"]


def spatial_mask(mask) -> torch.Tensor:
    """``[M, H, W]`` bool (on the CPU) from a PIL image, a numpy array or a tensor ``[H, W]``,
    ``[M, H, W]`` or ``[M, 1, H, W]``: a pixel is masked where its value is above half the
    value range (0.5 for floats in [0, 1], 127 for 8-bit images; a PIL image in any mode is
    read as grayscale), ``M`` 1 or one mask per sample."""
    if hasattr(mask, "convert") and hasattr(mask, "size"):  # PIL
        import numpy as np

        mask = torch.from_numpy(np.asarray(mask.convert("L")).copy())
    elif not torch.is_tensor(mask):
        import numpy as np

        mask = torch.from_numpy(np.asarray(mask).copy())
    m = mask.detach().cpu()
    if m.dim() == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.dim() == 2:
        m = m[None]
    if m.dim() != 3 or m.shape[-1] < 1 or m.shape[-2] < 1 or m.shape[0] < 1:
        raise ValueError(f"diffcr.mask_routing: the mask must be [H, W], [M, H, W] or "
                         f"[M, 1, H, W], got shape {tuple(mask.shape)}")
    if m.dtype == torch.bool:
        return m
    if m.is_floating_point() and not bool(torch.isfinite(m).all()):
        raise ValueError("diffcr.mask_routing: the mask has non-finite values")
    half = 127 if m.dtype == torch.uint8 else 0.5
    return m > half


def random_box_masks(n: int, height: int, width: int, generator: torch.Generator,
                     area: Tuple[float, float] = (0.1, 0.5)) -> torch.Tensor:
    """``[n, height, width]`` bool: one random box per sample, as inpainting fine-tuning draws
    them: its area a uniform share of the image in ``area``, its aspect ratio log-uniform in
    [1/2, 2], its place uniform, every side at least 1 (on the CPU, from ``generator``)."""
    lo, hi = (float(v) for v in area)
    if not (0.0 < lo <= hi <= 1.0):
        raise ValueError(f"area must satisfy 0 < lo <= hi <= 1, got {area!r}")
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    out = torch.zeros(n, height, width, dtype=torch.bool)
    for i, (a, r, y, x) in enumerate(u.tolist()):
        frac = lo + (hi - lo) * a
        aspect = 2.0 ** (2 * r - 1)  # height / width
        h = min(height, max(1, round((frac * height * width * aspect) ** 0.5)))
        w = min(width, max(1, round(frac * height * width / h)))
        top, left = int(y * (height - h + 1)), int(x * (width - w + 1))
        out[i, top:top + h, left:left + w] = True
    return out


def token_grid(n: int, height: int, width: int) -> Tuple[int, int]:
    """``(gh, gw)`` with ``gh * gw == n`` whose aspect ratio is closest to ``height / width``:
    the token grid of an image of that shape (row-major tokens, as every image family lays
    them out). ValueError when no factorisation is within 10 % of the aspect ratio."""
    want = height / width
    best = None
    for gh in range(1, int(math.isqrt(n)) + 1):
        if n % gh:
            continue
        for h, w in ((gh, n // gh), (n // gh, gh)):
            err = abs(math.log((h / w) / want))
            if best is None or err < best[0]:
                best = (err, h, w)
    if best is None or best[0] > math.log(1.1):
        raise ValueError(f"diffcr.mask_routing: {n} tokens are no grid of the mask's aspect "
                         f"ratio {height}x{width} (a video, or a block whose tokens are not "
                         "only the image's: pass grid=(rows, columns) of the image tokens "
                         "that come first, e.g. an edit model's generated image)")
    return best[1], best[2]


class KeepMask:
    """The tokens every routed block computes (see the module docstring).

    Args:
        mask: anything :func:`spatial_mask` takes, at any resolution with the image's aspect
            ratio (the pipeline's ``mask_image``), one mask or one per sample.
        margin: tokens of dilation around the mask at token resolution (the context right at
            the mask's edge).
        context_kept_ratio: kept ratio of the context tokens in every block (None: each
            block's own kept ratio).
        bucket: the masked count is rounded up to a multiple of ``ceil(bucket * N)`` tokens.
        grid: ``(rows, columns)`` of the image tokens the mask covers, the first ``rows *
            columns`` of a block's tokens; any after them (an edit model's condition-image
            tokens) are context. None: all of a block's tokens, their grid found from the
            mask's aspect ratio (:func:`token_grid`).
    """

    def __init__(self, mask, margin: int = 1, context_kept_ratio: Optional[float] = None,
                 bucket: float = 1 / 32, grid: Optional[Tuple[int, int]] = None):
        if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
            raise ValueError(f"diffcr.mask_routing: margin must be an integer >= 0, got "
                             f"{margin!r}")
        if context_kept_ratio is not None and not (0.0 < float(context_kept_ratio) <= 1.0):
            raise ValueError(f"diffcr.mask_routing: context_kept_ratio must be in (0, 1], got "
                             f"{context_kept_ratio!r}")
        if not (0.0 < float(bucket) <= 1.0):
            raise ValueError(f"diffcr.mask_routing: bucket must be in (0, 1], got {bucket!r}")
        self.pixels = spatial_mask(mask)
        self.margin = margin
        self.context_kept_ratio = None if context_kept_ratio is None else \
            float(context_kept_ratio)
        self.bucket = float(bucket)
        if grid is not None:
            ok = (isinstance(grid, (tuple, list)) and len(grid) == 2
                  and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                          for v in grid))
            if not ok:
                raise ValueError(f"diffcr.mask_routing: grid must be (rows, columns) of "
                                 f"positive integers, got {grid!r}")
            grid = (int(grid[0]), int(grid[1]))
        self.grid = grid
        self._tokens: Dict[int, torch.Tensor] = {}  # N -> [M, N] bool, CPU
        self._counts: Dict[int, List[int]] = {}  # N -> masked tokens per mask
        self._device: Dict[Tuple[int, str], torch.Tensor] = {}
        #: model input shapes already run eagerly under compile (convert._eager_first)
        self.planned: set = set()

    def tokens(self, n: int) -> torch.Tensor:
        """``[M, n]`` bool on the CPU: a token is masked when any pixel of its patch is, then
        dilated by ``margin`` tokens (tokens after ``grid``'s: never)."""
        if n not in self._tokens:
            M, H, W = self.pixels.shape
            if self.grid is None:
                gh, gw = token_grid(n, H, W)
            else:
                gh, gw = self.grid
                if gh * gw > n:
                    raise ValueError(f"diffcr.mask_routing: grid {gh}x{gw} has more tokens "
                                     f"than the block's {n}")
            m = F.adaptive_max_pool2d(self.pixels[:, None].float(), (gh, gw))
            if self.margin:
                r = self.margin
                m = F.max_pool2d(m, 2 * r + 1, stride=1, padding=r)
            tok = torch.zeros(M, n, dtype=torch.bool)
            tok[:, :gh * gw] = m[:, 0].reshape(M, gh * gw) > 0
            self._tokens[n] = tok
            self._counts[n] = [int(c) for c in self._tokens[n].sum(1).tolist()]
        return self._tokens[n]

    def plan(self, ks: List[List[int]], n: int, device) -> Tuple[torch.Tensor, List[List[int]]]:
        """``(mask [B, n] bool on device, kept counts [B][P])``: the block's kept counts ``ks``
        (per sample, per bin) spent on the context after the masked tokens."""
        B = len(ks)
        tok = self.tokens(n)
        M = tok.shape[0]
        if M not in (1, B):
            raise ValueError(f"diffcr.mask_routing: {M} masks for a batch of {B} (give one, "
                             f"or one per sample)")
        key = (n, str(device))
        if key not in self._device:
            self._device[key] = tok.to(device)
        dev_mask = self._device[key]
        if M == 1:
            dev_mask = dev_mask.expand(B, n)
        q = max(1, math.ceil(self.bucket * n))
        counts = self._counts[n]
        out = []
        for b, row in enumerate(ks):
            c = min(n, -(-counts[b if M > 1 else 0] // q) * q)
            if c >= n:
                out.append([n] * len(row))
                continue
            rest = n - c
            out.append([c + dk.kept_count(self.context_kept_ratio or (k / n), rest)
                        for k in row])
        return dev_mask, out

    @staticmethod
    def ranking(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scores that rank every masked token above every other (for the selection only)."""
        s = scores.detach()
        span = s.nan_to_num(0.0, 0.0, 0.0).abs().amax() * 2 + 1
        return torch.where(mask, s + span, s)
