"""The demo's inpainting task (DiffCR's second task in the paper).

Every held-out image loses its shape: the region to inpaint is the shape's mask dilated by one
pixel (:func:`inpaint_regions`), so the model has to draw the shape of the image's class again
into the hole, from the class label and the background around it. Sampling blends as
diffusers' inpaint pipelines do (:func:`~diffcr.app.ddpm.sample_images` with ``init`` and
``mask``): only the inside of the mask comes from the model.

Quality is measured inside the mask: the class accuracy of the inpainted images (the
classifier sees the whole image, whose only shape is the inpainted one) and the mean squared
error of the masked pixels against the original (:func:`masked_error`; the original shape is
one of many a class allows, so this is a distance, not a target). Mask-aware routing
(:func:`diffcr.mask_routing`) computes every masked token in every routed block and routes
only the context; :class:`ComputedShare` measures the share of token-blocks a sampling loop
actually computed.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["inpaint_regions", "masked_error", "masked_inputs", "ComputedShare"]


def inpaint_regions(shape_masks: Tensor, dilate: int = 1) -> Tensor:
    """``[n, H, W]`` bool: the region to inpaint, each shape's mask (``[n, H, W]`` bool)
    dilated by ``dilate`` pixels (its anti-aliased edge belongs to the shape)."""
    if shape_masks.dim() != 3:
        raise ValueError(f"shape masks must be [n, H, W], got {tuple(shape_masks.shape)}")
    m = shape_masks.float()[:, None]
    if dilate:
        m = F.max_pool2d(m, 2 * dilate + 1, stride=1, padding=dilate)
    return m[:, 0] > 0


def masked_error(images: Tensor, originals: Tensor, regions: Tensor) -> float:
    """Mean over samples of the mean squared error, inside each sample's region, of
    ``images`` against ``originals`` (both ``[n, C, H, W]`` in [-1, 1]; ``regions`` ``[n, H,
    W]`` bool, none empty)."""
    if images.shape != originals.shape or regions.shape != (images.shape[0],
                                                             *images.shape[2:]):
        raise ValueError(f"masked_error: images {tuple(images.shape)}, originals "
                         f"{tuple(originals.shape)} and regions {tuple(regions.shape)} do not "
                         "match")
    w = regions.float()[:, None]
    area = w.sum((1, 2, 3)) * images.shape[1]
    if bool((area == 0).any()):
        raise ValueError("masked_error: a region is empty")
    err = ((images.float() - originals.float()) ** 2 * w).sum((1, 2, 3)) / area
    return float(err.mean())


def masked_inputs(originals: Tensor, regions: Tensor) -> Tensor:
    """What an inpainting user sees before sampling: the images with their regions grey."""
    return torch.where(regions[:, None], torch.zeros_like(originals), originals)


class ComputedShare:
    """Counts, while active, the token-blocks the routed blocks of a converted model compute:
    per routed block call, the rows of its last selection (every row when it computed all of
    them). ``share`` is computed / (calls x tokens); reading it does not reset it.

    ``required`` (``[rows, H, W]`` bool, the pixel regions of the sampled batch's rows, CFG
    halves included): also count the token-blocks that hold a required pixel (a token holds
    one when any pixel of its patch is in the region, as :func:`diffcr.mask_routing` pools)
    and ``missed``, those of them a block skipped: 0 when every block computed every token of
    the region at every call.

    Use as a context manager around a sampling loop; the forward hooks come off on exit. The
    hooks only keep each call's selection (a reference, no work inside a timed loop); the
    counting happens when a count is first read after the calls."""

    def __init__(self, model: torch.nn.Module, required: Optional[Tensor] = None):
        import diffcr

        self._blocks = [(b, diffcr.routing_state(model).blocks[i])
                        for i, b in diffcr.routed_blocks(model).items()]
        if required is not None and required.dim() != 3:
            raise ValueError("ComputedShare: required must be [rows, H, W] bool, got "
                             f"{tuple(required.shape)}")
        self._required = required
        self._tokens: Dict[int, Tensor] = {}  # N -> [rows * N] bool, pooled once
        self._hooks = []
        self._pending: List[Tuple[object, int, int]] = []  # (selection or None, rows, tokens)
        self._counts = {"computed": 0, "total": 0, "required": 0, "missed": 0}

    def _required_tokens(self, n: int) -> Tensor:
        req = self._required
        if n not in self._tokens:
            side = int(round(n ** 0.5))
            H, W = req.shape[1:]
            if side * side != n or H % side or W % side:
                raise ValueError(f"ComputedShare: {n} tokens are not a square grid of the "
                                 f"{H}x{W} regions")
            pooled = F.max_pool2d(req.float()[:, None], (H // side, W // side))
            self._tokens[n] = pooled.reshape(-1) > 0
        return self._tokens[n]

    def _record(self, routing, out) -> None:
        y = out[0] if isinstance(out, (tuple, list)) else out
        b, n = int(y.shape[0]), int(y.shape[1])
        if self._required is not None and self._required.shape[0] != b:
            raise ValueError(f"ComputedShare: required has {self._required.shape[0]} rows, "
                             f"the block ran {b}")
        self._pending.append((routing.last_selection, b, n))

    def _flush(self) -> Dict[str, int]:
        c = self._counts
        for sel, b, n in self._pending:
            c["total"] += b * n
            c["computed"] += b * n if sel is None else int(sum(sel.seqlens))
            if self._required is not None:
                need = self._required_tokens(n)
                c["required"] += int(need.sum())
                if sel is not None:
                    hit = torch.zeros(b * n, dtype=torch.bool)
                    hit[sel.indices.cpu()] = True
                    c["missed"] += int((need & ~hit).sum())
        self._pending.clear()
        return c

    @property
    def computed(self) -> int:
        """Token-blocks computed."""
        return self._flush()["computed"]

    @property
    def total(self) -> int:
        """Token-blocks of every routed block call (rows x tokens)."""
        return self._flush()["total"]

    @property
    def required(self) -> int:
        """Token-blocks holding a pixel of ``required`` (0 without it)."""
        return self._flush()["required"]

    @property
    def missed(self) -> int:
        """Of :attr:`required`, those a block skipped."""
        return self._flush()["missed"]

    def __enter__(self) -> "ComputedShare":
        for block, routing in self._blocks:
            self._hooks.append(block.register_forward_hook(
                lambda mod, args, out, r=routing: self._record(r, out)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @property
    def share(self) -> float:
        return self.computed / self.total if self.total else float("nan")

    def summary(self) -> Dict[str, float]:
        return {"computed": self.computed, "total": self.total, "share": self.share,
                "required": self.required, "missed": self.missed}
