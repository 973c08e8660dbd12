"""CPU inference: linear layers with MKL-prepacked weights.

Why: at the row counts routing produces (k ~ 300 rows of a 1024-token image at kappa 0.3),
MKL's ``sgemm`` runs DiT-sized GEMMs slower per row than at full size; weights prepacked for
the exact row count take that back (the measurement is in docs/library.md, "CPU inference"
paragraph). The ideal of method §6 scales linear layers with the row count, so this is the
fixed cost that keeps a routed block from its ideal at small kappa on CPU.

Cost: each packed copy takes 1.8x (4D x D) to 3.3x (D x D) the weight's memory, once per
distinct row count (at most ``max_shapes`` per layer, least recently used dropped). That is a lot
for a whole model, so it is opt-in: :func:`prepack_linears` on the module(s) you run on CPU.

Results match ``F.linear`` to float rounding (the tests require 1e-5). The packed path is used
only where it is exact and safe: CPU, float32 input and weight, no autograd needed, no autocast,
not while ``torch.compile`` traces (inductor packs weights itself when freezing); everything
else falls back to ``F.linear``. A weight changed in place or moved is noticed (storage pointer
and version counter) and repacked.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PackedLinear", "prepack_linears", "unpack_linears", "prepack_available"]


def prepack_available() -> bool:
    """Whether this torch build can prepack linear weights (x86 builds with MKL)."""
    return bool(torch.backends.mkl.is_available()
                and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
                and hasattr(torch.ops.mkl, "_mkl_linear"))


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) whose CPU float32 inference forward
    uses a weight prepacked by MKL for the input's row count. Made by :func:`prepack_linears`
    (class swap); :func:`unpack_linears` turns it back into ``nn.Linear``."""

    max_shapes = 4

    def _can_pack(self, x: torch.Tensor) -> bool:
        w, b = self.weight, self.bias
        if x.device.type != "cpu" or w.device.type != "cpu":
            return False
        if x.dtype != torch.float32 or w.dtype != torch.float32 or x.dim() < 1 or x.numel() == 0:
            return False
        if b is not None and b.dtype != torch.float32:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                        or (b is not None and b.requires_grad)):
            return False
        if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
            return False
        return not w.is_inference()  # inference tensors have no version counter

    def _packed(self, rows: int) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version)
        cache = self.__dict__.get("_diffcr_packed")
        if cache is None or cache[0] != key:
            cache = (key, OrderedDict())
            self.__dict__["_diffcr_packed"] = cache
        packs = cache[1]
        p = packs.get(rows)
        if p is None:
            while len(packs) >= max(1, int(self.max_shapes)):
                packs.popitem(last=False)
            p = packs[rows] = torch.ops.mkl._mkl_reorder_linear_weight(w.detach(), rows)
        else:
            packs.move_to_end(rows)
        return p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._can_pack(x):
            return F.linear(x, self.weight, self.bias)
        if x.shape[-1] != self.in_features:  # same message path as nn.Linear
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        out = torch.ops.mkl._mkl_linear(x2, self._packed(rows), self.weight.detach(),
                                        None if self.bias is None else self.bias.detach(), rows)
        return out.view(*x.shape[:-1], self.out_features)

    def packed_bytes(self) -> int:
        """Memory held by the packed copies now."""
        cache = self.__dict__.get("_diffcr_packed")
        if cache is None:
            return 0
        return sum(p.numel() * p.element_size() for p in cache[1].values())

    def clear_packed(self) -> None:
        """Drop the packed copies (they are rebuilt on the next packed forward)."""
        self.__dict__.pop("_diffcr_packed", None)

    def __getstate__(self):  # deepcopy / pickle: the packed copies are a cache, not state
        state = super().__getstate__().copy()
        state.pop("_diffcr_packed", None)
        return state


def prepack_linears(module: nn.Module, max_shapes: int = 4) -> int:
    """Make every plain ``nn.Linear`` inside ``module`` (itself included) a
    :class:`PackedLinear`, in place. Returns how many were swapped.

    Use for CPU float32 inference (e.g. a frozen DiffCR model under ``torch.no_grad()``);
    training, other devices and dtypes run ``F.linear`` unchanged. ``max_shapes``: packed copies
    kept per layer (one per distinct row count; each costs 1.8-3.3x the weight's memory).
    Subclasses of ``nn.Linear`` (LoRA layers and the like) are left alone.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"prepack_linears expects an nn.Module, got {type(module).__name__}")
    if isinstance(max_shapes, bool) or not isinstance(max_shapes, int) or max_shapes < 1:
        raise ValueError(f"max_shapes must be a positive integer, got {max_shapes!r}")
    if not prepack_available():
        raise RuntimeError("prepack_linears needs a torch build with MKL "
                           "(torch.backends.mkl.is_available() is False here)")
    n = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = PackedLinear
            n += 1
        if type(m) is PackedLinear:
            m.max_shapes = max_shapes
    return n


def unpack_linears(module: nn.Module) -> int:
    """Undo :func:`prepack_linears`: back to ``nn.Linear``, packed copies freed. Returns how
    many were restored."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"unpack_linears expects an nn.Module, got {type(module).__name__}")
    n = 0
    for m in module.modules():
        if type(m) is PackedLinear:
            m.clear_packed()
            m.__dict__.pop("max_shapes", None)
            m.__class__ = nn.Linear
            n += 1
    return n
