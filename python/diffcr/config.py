"""DiffCRConfig: every choice of the method in one validated, JSON-serialisable object."""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional, Sequence, Tuple

__all__ = ["DiffCRConfig", "DEFAULT_BINS", "GATES"]

DEFAULT_BINS: Tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
GATES = ("sigmoid", "sigmoid2x")
PATHS = ("auto", "fused", "compat")
SELECTIONS = ("router", "random")
_DTYPES = ("float32", "float64", "bfloat16", "float16")


def _finite_number(name: str, v) -> float:
    """A real, finite number (int or float, not bool, not a string) as float; else ValueError."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


@dataclass
class DiffCRConfig:
    """Configuration of a DiffCR conversion (docs/method.md §1-§4).

    Attributes
    ----------
    bins:
        Kept-ratio bins of the two-bin interpolation, each in (0, 1]; given sorted (either
        direction), without duplicates, at least two. Stored ascending. Default 0.1 ... 1.0
        (the paper's compression 0-90 % in 10 % steps).
    num_regions:
        R, timestep regions with their own ratio per block ("-LT" variant); 1 gives the
        layer-only "-L" variant. Paper: 4 for PixArt-Sigma text-to-image, 10 for inpainting.
    num_train_timesteps:
        T, the scheduler's training timesteps; region(t) = min(R - 1, floor(t * R / T)). None:
        taken from the model when :func:`diffcr.convert` can tell, else 1000 (PixArt, DiT).
        Use 1.0 for flow-matching models whose timestep lies in [0, 1].
    target_kept_ratio:
        kappa_target of the ratio loss (mean kept ratio to reach); 0.8 = 20 % compression.
    lam:
        lambda, weight of the ratio loss ``lam * (mean_kappa - target) ** 2`` (paper: 0.3).
    gate:
        ``"sigmoid"`` (paper: the MLP branch is multiplied by s) or ``"sigmoid2x"`` (ours:
        multiplied by 2s, so a zero-initialised router leaves a converted model's output
        exactly unchanged at kappa = 1).
    routed_blocks:
        indices of the transformer blocks to route; None routes all of them.
    param_dtype:
        dtype of the new router and ratio parameters ("float32" recommended even for bf16
        models: ratios move in small steps).
    router_init_std:
        std of the normal router init for ``gate="sigmoid"`` (``"sigmoid2x"`` starts at zero).
    init_kept_ratio:
        initial value of every ratio parameter (paper: 1.0, "zero compression").
    selection:
        ``"router"`` (DiffCR / MoD: the router's top-k) or ``"random"`` (a baseline: k tokens
        drawn uniformly at random per sample and block, no router gating).
    path:
        execution of routed blocks: ``"fused"`` (our forward over the packed layout: one pass
        for all segments and both training bins), ``"compat"`` (the block's own diffusers
        forward on gathered tokens, one call per group of equal k), or ``"auto"`` (fused
        whenever the block and the call allow it, else compat).
    """

    bins: Sequence[float] = field(default_factory=lambda: DEFAULT_BINS)
    num_regions: int = 4
    num_train_timesteps: Optional[float] = None
    target_kept_ratio: float = 0.8
    lam: float = 0.3
    gate: str = "sigmoid2x"
    routed_blocks: Optional[Sequence[int]] = None
    param_dtype: str = "float32"
    router_init_std: float = 0.02
    init_kept_ratio: float = 1.0
    path: str = "auto"
    selection: str = "router"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> "DiffCRConfig":
        """Check every field; raise ValueError naming the field and what was expected.
        Normalises ``bins`` to an ascending tuple of floats."""
        try:
            bins = [float(b) for b in self.bins]
        except (TypeError, ValueError) as e:
            raise ValueError(f"bins must be a sequence of numbers, got {self.bins!r}") from e
        if len(bins) < 2:
            raise ValueError(f"bins needs at least two kept ratios, got {bins}")
        for b in bins:
            if not (0.0 < b <= 1.0) or math.isnan(b):
                raise ValueError(f"every bin must be a kept ratio in (0, 1], got {b} in {bins}")
        asc = sorted(bins)
        if bins != asc and bins != asc[::-1]:
            raise ValueError(f"bins must be sorted (ascending or descending), got {bins}")
        if len(set(asc)) != len(asc):
            raise ValueError(f"bins must not repeat a value, got {bins}")
        self.bins = tuple(asc)
        if not isinstance(self.num_regions, int) or isinstance(self.num_regions, bool) \
                or self.num_regions < 1:
            raise ValueError(f"num_regions must be an integer >= 1, got {self.num_regions!r}")
        if self.num_train_timesteps is not None:
            t = float(self.num_train_timesteps)
            if not (t > 0) or math.isinf(t):
                raise ValueError("num_train_timesteps must be a positive number (1000 for "
                                 f"DDPM-style models, 1.0 for flow matching), got "
                                 f"{self.num_train_timesteps!r}")
            self.num_train_timesteps = t
        for name in ("target_kept_ratio", "init_kept_ratio", "lam", "router_init_std"):
            setattr(self, name, _finite_number(name, getattr(self, name)))
        lo, hi = self.bins[0], self.bins[-1]
        if not (lo <= float(self.target_kept_ratio) <= hi):
            raise ValueError(f"target_kept_ratio must lie within the bins [{lo}, {hi}], got "
                             f"{self.target_kept_ratio}")
        if not (lo <= float(self.init_kept_ratio) <= hi):
            raise ValueError(f"init_kept_ratio must lie within the bins [{lo}, {hi}], got "
                             f"{self.init_kept_ratio}")
        if float(self.lam) < 0 or math.isnan(float(self.lam)):
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if self.routed_blocks is not None:
            if isinstance(self.routed_blocks, (str, bytes)) or not hasattr(
                    self.routed_blocks, "__iter__"):
                raise ValueError(f"routed_blocks must be a sequence of block indices (or None: "
                                 f"every block), got {self.routed_blocks!r}")
            rb = list(self.routed_blocks)
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in rb):
                raise ValueError(f"routed_blocks must be non-negative block indices, got {rb}")
            if len(set(rb)) != len(rb):
                raise ValueError(f"routed_blocks repeats an index: {rb}")
            self.routed_blocks = tuple(sorted(rb))
        if self.param_dtype not in _DTYPES:
            raise ValueError(f"param_dtype must be one of {_DTYPES}, got {self.param_dtype!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")
        if float(self.router_init_std) < 0:
            raise ValueError(f"router_init_std must be >= 0, got {self.router_init_std}")
        return self

    # ------------------------------------------------------------------ helpers
    @property
    def min_bin(self) -> float:
        return self.bins[0]

    @property
    def max_bin(self) -> float:
        return self.bins[-1]

    @property
    def timesteps(self) -> float:
        """T used for the regions (1000 when not set)."""
        return 1000.0 if self.num_train_timesteps is None else float(self.num_train_timesteps)

    def region_of_level(self, level: float) -> int:
        """The region of a noise level in [0, 1] (method §3): ``min(R - 1, floor(level * R))``,
        clamped at 0 below 0. ``level * R`` is rounded to 9 decimals first, so a boundary such
        as ``t = 250`` of ``T = 1000`` (R = 4) starts region 1 whatever the float rounding of
        ``t / T``."""
        R = self.num_regions
        return max(0, min(R - 1, int(math.floor(round(float(level) * R, 9)))))

    def region_of(self, t: float) -> int:
        """Region of a DDPM-style timestep ``t`` in ``[0, T)``: the region of noise level
        ``t / T`` (:meth:`region_of_level`). Model families with other timestep conventions
        map to a noise level first (:mod:`diffcr.models`)."""
        return self.region_of_level(float(t) / self.timesteps)

    def torch_dtype(self):
        import torch

        return getattr(torch, self.param_dtype)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        d = asdict(self)
        d["bins"] = list(self.bins)
        d["routed_blocks"] = None if self.routed_blocks is None else list(self.routed_blocks)
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "DiffCRConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DiffCRConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "DiffCRConfig":
        try:
            d = json.loads(s)
        except ValueError as e:
            raise ValueError(f"DiffCRConfig JSON is not valid JSON: {e}") from e
        if not isinstance(d, dict):
            raise ValueError("DiffCRConfig JSON must be an object")
        return cls.from_dict(d)

    def routed_indices(self, num_blocks: int) -> List[int]:
        if self.routed_blocks is None:
            return list(range(num_blocks))
        bad = [i for i in self.routed_blocks if i >= num_blocks]
        if bad:
            raise ValueError(f"routed_blocks {bad} out of range for a model with {num_blocks} "
                             "transformer blocks")
        return list(self.routed_blocks)
