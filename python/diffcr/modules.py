"""DiffCR's parts that act on a block: the token router and the differentiable kept ratio
(learnable, method §1-§2), and the feed-forward hook that applies the router gate
(:class:`MlpGate`)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import nn

import diffcr_kernels as dk

__all__ = ["Router", "DifferentiableRatio", "TwoBinPlan", "MlpGate", "full_tensor"]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the whole tensor of a DTensor (a parameter sharded by FSDP2 outside
    its forward), for reading values on the host."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


class Router(nn.Module):
    """Token router: ``s_i = sigmoid(w . x_i)``, one weight vector, no bias (method §1).

    ``gate="sigmoid2x"`` makes :meth:`gate_factor` return ``2 s`` (exactly 1 for the zero init),
    ``"sigmoid"`` returns ``s`` (the paper).
    """

    def __init__(self, dim: int, gate: str = "sigmoid2x", init_std: float = 0.02,
                 dtype=torch.float32, device=None):
        super().__init__()
        if gate not in ("sigmoid", "sigmoid2x"):
            raise ValueError(f"gate must be 'sigmoid' or 'sigmoid2x', got {gate!r}")
        self.gate = gate
        self.weight = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device))
        if gate == "sigmoid" and init_std > 0:
            nn.init.normal_(self.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, N, D]`` -> scores ``[B, N]`` (float32; float64 for float64 input)."""
        if x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"Router: hidden size {x.shape[-1]} does not match the router's "
                             f"{self.weight.shape[0]}")
        return dk.router_scores(x, self.weight)

    def gate_factor(self, scores: torch.Tensor) -> torch.Tensor:
        """The factor that multiplies the MLP branch of a selected token."""
        return 2 * scores if self.gate == "sigmoid2x" else scores

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[0]}, gate={self.gate}"


@dataclass
class TwoBinPlan:
    """Per-sample two-bin interpolation (training) for one block.

    k: host list ``[B][2]`` of kept counts ``(k(a), k(b))``; weights: ``[B, 2]`` tensor
    ``(w_a, w_b)``, differentiable in the ratio parameters; kappa: ``[B]`` the clamped ratios.
    """

    k: List[List[int]]
    weights: torch.Tensor
    kappa: torch.Tensor


class DifferentiableRatio(nn.Module):
    """R learnable kept ratios of one block (one per timestep region), method §2.

    ``kept`` lives in kept space and starts at ``init`` (1.0 = no compression). In training the
    block runs the two bins a < b nearest to ``kappa = clamp(kept, min_bin, max_bin)`` and mixes
    them with ``w_a = (b - kappa) / (b - a)``, ``w_b = 1 - w_a``; the gradient of kappa comes
    only through these weights. At inference kappa is rounded to the nearest bin.
    Call :meth:`project_` after each optimiser step (or use
    :func:`diffcr.attach_ratio_projection`) so a parameter pushed out of range comes back
    instead of sitting where the clamp has no gradient.
    """

    def __init__(self, num_regions: int, bins: Sequence[float], init: float = 1.0,
                 dtype=torch.float32, device=None):
        super().__init__()
        bins = [float(b) for b in bins]
        if len(bins) < 2 or sorted(bins) != bins or len(set(bins)) != len(bins):
            raise ValueError(f"bins must be >= 2 ascending distinct kept ratios, got {bins}")
        # host floats only, no buffer: a non-persistent buffer stays on the meta device when
        # diffusers loads a model under init_empty_weights (from_pretrained), and the model's
        # .to() then fails
        self.bins: List[float] = bins
        self.kept = nn.Parameter(torch.full((num_regions,), float(init), dtype=dtype,
                                            device=device))

    @property
    def num_regions(self) -> int:
        return self.kept.shape[0]

    def kappa(self) -> torch.Tensor:
        """``[R]`` kept ratios clamped to the bin range, with a straight-through gradient.

        ``torch.clamp`` has zero gradient *at* the bounds, and the paper initialises every
        ratio exactly at the top bin (1.0): with a plain clamp no ratio would ever move.
        Here the value is clamped but the gradient is always 1; :meth:`project_` keeps the
        parameter itself in range.
        """
        k = self.kept
        return k + (k.clamp(self.bins[0], self.bins[-1]) - k).detach()

    @staticmethod
    def _bracket(bins: Sequence[float], kappa: float):
        """Index j of the lower bin: bins[j] <= kappa <= bins[j+1] (kappa on a bin: that bin as
        the lower one, except at the top, where it is the upper one)."""
        j = 0
        while j + 2 < len(bins) and bins[j + 1] <= kappa:
            j += 1
        return j

    def two_bin(self, regions: Sequence[int], num_tokens: int) -> TwoBinPlan:
        """Two-bin plan for samples in ``regions`` (host ints) with N = ``num_tokens``."""
        kap_all = self.kappa()  # [R], differentiable
        kap_host = kap_all.detach().double().cpu().tolist()  # one small sync per block
        k_of_bin = [dk.kept_count(b, num_tokens) for b in self.bins]
        js = [self._bracket(self.bins, kap_host[r]) for r in regions]
        dev = self.kept.device
        reg = torch.as_tensor(list(regions), device=dev, dtype=torch.long)
        lo, hi = torch.tensor([[self.bins[j] for j in js], [self.bins[j + 1] for j in js]],
                              dtype=kap_all.dtype, device=dev)
        kappa = kap_all[reg]
        w_a = (hi - kappa) / (hi - lo)
        weights = torch.stack([w_a, 1 - w_a], dim=1)
        return TwoBinPlan(k=[[k_of_bin[j], k_of_bin[j + 1]] for j in js], weights=weights,
                          kappa=kappa)

    def nearest_bins(self) -> List[float]:
        """Per region, the bin nearest to kappa (ties go to the larger kept ratio)."""
        out = []
        for kap in full_tensor(self.kappa().detach()).double().cpu().tolist():
            out.append(min(self.bins, key=lambda b: (abs(b - kap), -b)))
        return out

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp the parameters back into [min_bin, max_bin] (in place)."""
        self.kept.clamp_(self.bins[0], self.bins[-1])

    def extra_repr(self) -> str:
        return f"regions={self.num_regions}, bins={self.bins}"


class MlpGate:
    """Forward hook of a routed block's feed-forward: multiplies its output by the router gate
    of each token (method §1: the score gates the MLP branch only). Inactive (identity) unless
    the owning :class:`~diffcr.routing.BlockRouting` runs the block inside :meth:`scaled`. A
    plain object, so ``deepcopy`` and ``pickle`` of the model copy it with the module."""

    def __init__(self):
        self.scale: Optional[torch.Tensor] = None

    def __call__(self, module, inputs, output):
        if self.scale is None:
            return output
        return output * self.scale.to(output.dtype)

    @contextmanager
    def scaled(self, scale: torch.Tensor):
        """Gate the feed-forward output by ``scale`` (``[G, n, 1]`` per token) for one call."""
        self.scale = scale
        try:
            yield
        finally:
            self.scale = None

    def __getstate__(self):
        return {"scale": None}
