"""A learned token cache for routed blocks: skipped tokens receive a forecast of their update.

This module holds the mechanics (the config, the per-block cache, the forecast), below the
routing runtime that uses them; turning it on and off is :mod:`diffcr.cache_control`.

DiffCR gives the tokens a block does not select nothing (their update is zero). With the token
cache on (:func:`diffcr.enable_token_cache`), every routed block keeps, per batch row and token, the
update it last computed for it (``out - x`` on the token's row, the router gate included); at
the next step the block computes its top-k tokens as before, writes their new updates into the
cache, and every skipped token receives a forecast of its update instead of zero:

* ``order=0``: the cached update itself (the update its block computed for it at the last step
  it was selected);
* ``order=1``: the first-order extrapolation from its last two computed updates, per token
  (TaylorSeer's forecast applied per token): ``u1 + (u1 - u0) (s - s1) / (s1 - s0)``, ``s`` the
  step index, ``s1`` and ``s0`` the steps ``u1`` and ``u0`` were computed at; order 0 for a
  token computed once.

Steps and generations. A step is one denoising step of the model: one forward, or several at
the same timestep (a pipeline that runs the conditional and the unconditional half in separate
calls: the j-th call at a timestep has its own cache, *slot* j; halves in one batch are
separate rows). Step 0 of a generation, and every ``refresh_every``-th step after it, is a
*refresh*: every token computed by the dense block (as at kept ratio 1: the router gating the
MLP branch; ``plain_refresh=True``: the plain block, without the gate) and its update cached.
At kept ratio 1 the token cache therefore changes nothing. A new generation starts on
:func:`diffcr.reset_token_cache`, or by itself when a forward's noise level is above the last step's
for any sample (denoising goes down in noise), or when the batch or token count changes.

Training with the cache in the loop (:func:`diffcr.fill_token_cache` then the training forward): the
skipped tokens' forecast enters the output with weight ``1 - coverage``, ``coverage`` the
two-bin weight with which a token is selected (1 for a token in both bins), so the router and
the ratios learn which tokens can live on a stale update.

Memory: the cache holds ``B * N * D`` values per routed block (twice that at ``order=1``) in
``dtype`` (default the residual stream's): :func:`token_cache_bytes`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

__all__ = ["TokenCacheConfig", "TokenCache", "token_cache_bytes", "apply_token_cache",
           "coverage"]


@dataclass(frozen=True)
class TokenCacheConfig:
    """How skipped tokens are forecast (see the module docstring).

    Args:
        order: 0 (reuse the last update) or 1 (extrapolate from the last two).
        refresh_every: a refresh (dense) step every this many steps; 0: only the first step of
            a generation.
        plain_refresh: refresh steps run the plain block, as the model was before conversion
            (False: with the router gate on the MLP branch, as routing at kept ratio 1 does).
        staleness: added to a token's router score per step since it was last computed (ToCa's
            "cache frequency": a token skipped for long is chosen); 0 leaves the selection to
            the router alone. The gate on the MLP branch is always the router's own score.
        dtype: storage dtype of the cache (None: the residual stream's; ``torch.bfloat16``
            halves its memory).
    """

    order: int = 0
    refresh_every: int = 0
    plain_refresh: bool = False
    staleness: float = 0.0
    dtype: Optional[torch.dtype] = None

    def __post_init__(self):
        if self.order not in (0, 1):
            raise ValueError(f"TokenCacheConfig.order must be 0 or 1, got {self.order!r}")
        if isinstance(self.refresh_every, bool) or not isinstance(self.refresh_every, int) \
                or self.refresh_every < 0 or self.refresh_every == 1:
            raise ValueError("TokenCacheConfig.refresh_every must be an integer >= 2, or 0 "
                             f"(only the first step), got {self.refresh_every!r}")
        if not (isinstance(self.staleness, (int, float)) and self.staleness >= 0):
            raise ValueError(f"TokenCacheConfig.staleness must be >= 0, got {self.staleness!r}")
        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype)
                                           and self.dtype.is_floating_point):
            raise ValueError(f"TokenCacheConfig.dtype must be a float dtype or None, got "
                             f"{self.dtype!r}")


class _Entry:
    """The cache of one routed block and slot: updates ``[B * N, D]`` and the step each was
    computed at (``-1``: never)."""

    __slots__ = ("shape", "u1", "u0", "s1", "s0", "step_t")

    def __init__(self, B: int, N: int, D: int, dtype, device, order: int):
        self.shape = (B, N, D)
        self.u1 = torch.zeros(B * N, D, dtype=dtype, device=device)
        self.s1 = torch.full((B * N,), -1, dtype=torch.int64, device=device)
        self.u0 = torch.zeros_like(self.u1) if order else None
        self.s0 = torch.full_like(self.s1, -1) if order else None
        #: the cache's current step, a 0-dim int64 tensor on the device (set by the cache)
        self.step_t: Optional[torch.Tensor] = None

    def forget(self) -> None:
        """Mark every update as never computed (a new generation)."""
        self.s1.fill_(-1)
        if self.s0 is not None:
            self.s0.fill_(-1)

    def forecast(self, step) -> torch.Tensor:
        """``[B * N, D]``: every token's forecast update at ``step`` (an int or a 0-dim
        tensor; cache dtype)."""
        if self.u0 is None:
            return self.u1
        span = (self.s1 - self.s0).clamp(min=1).to(self.u1.dtype)
        ahead = (step - self.s1).clamp(min=0).to(self.u1.dtype)
        slope = torch.where((self.s0 >= 0).unsqueeze(-1), (self.u1 - self.u0) / span.unsqueeze(-1),
                            torch.zeros((), dtype=self.u1.dtype, device=self.u1.device))
        return self.u1 + slope * ahead.unsqueeze(-1)

    @torch.no_grad()
    def write(self, rows: Optional[torch.Tensor], update: torch.Tensor, step) -> None:
        """The updates ``[R, D]`` computed at ``step`` (an int or a 0-dim tensor) for ``rows``
        (int64 ``[R]``; None: every row)."""
        update = update.detach().to(self.u1.dtype)
        if rows is None:
            if self.u0 is not None:
                self.u0.copy_(self.u1)
                self.s0.copy_(self.s1)
            self.u1.copy_(update)
            self.s1.fill_(step)
            return
        if self.u0 is not None:
            self.u0.index_copy_(0, rows, self.u1.index_select(0, rows))
            self.s0.index_copy_(0, rows, self.s1.index_select(0, rows))
        self.u1.index_copy_(0, rows, update)
        self.s1.index_fill_(0, rows, step)

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.u1, self.u0, self.s1, self.s0)
                   if t is not None)


class TokenCache:
    """The token cache of one converted model (``routing_state(model).token_cache``): its
    config, the step and slot of the current forward, and one entry per (block, slot).
    Entries are dropped by ``copy.deepcopy`` and pickling (they belong to one generation)."""

    def __init__(self, config: TokenCacheConfig):
        self.config = config
        self.entries: Dict[Tuple[int, int], _Entry] = {}
        #: the slot of the current forward (the how-many-th call at this timestep)
        self.slot = 0
        #: whether the current forward is a refresh (dense) step; decided on the host per
        #: forward, so that a compiled graph guards on this bool, not on the step number
        self.refresh = True
        self._step = 0
        # the step as a 0-dim tensor per device: what the traced code reads (no guard on it)
        self._step_t: Dict[torch.device, torch.Tensor] = {}
        # (slot, input shape) pairs whose entries exist: diffcr.compile_model runs a forward
        # eagerly until they do (allocating an entry cannot happen inside a graph)
        self.allocated: set = set()
        self._last_key: Optional[tuple] = None
        self._last_levels: Optional[list] = None

    def __deepcopy__(self, memo):
        return TokenCache(self.config)

    def __getstate__(self):
        return {"config": self.config}

    def __setstate__(self, state):
        self.__init__(state["config"])

    # ------------------------------------------------------------------ steps
    @property
    def step(self) -> int:
        """The step of the current forward within its generation (host int)."""
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step = int(value)
        R = self.config.refresh_every
        self.refresh = self._step == 0 or (R > 0 and self._step % R == 0)
        for t in self._step_t.values():
            t.fill_(self._step)

    def step_tensor(self, device) -> torch.Tensor:
        """The current step as a 0-dim int64 tensor on ``device`` (kept up to date in place)."""
        device = torch.device(device)
        t = self._step_t.get(device)
        if t is None:
            t = self._step_t[device] = torch.full((), self._step, dtype=torch.int64,
                                                  device=device)
        return t

    def reset(self) -> None:
        """Forget every cached update: the next forward is step 0 of a new generation (a
        refresh, which overwrites every entry; the entries stay allocated, so that a compiled
        model does not allocate them again)."""
        for e in self.entries.values():
            e.forget()
        self.slot = 0
        self.step = 0
        self._last_key = self._last_levels = None

    def next_forward(self, timesteps, noise_levels) -> None:
        """Called once per model forward with its timesteps and noise levels (host lists):
        the same timesteps as the last forward are the next slot of the same step; a noise
        level above the last step's starts a new generation; anything else is the next step."""
        key = tuple(timesteps)
        if key == self._last_key:
            self.slot += 1
            return
        if self._last_levels is not None and (
                len(noise_levels) != len(self._last_levels)
                or any(a > b + 1e-12 for a, b in zip(noise_levels, self._last_levels))):
            self.reset()
        elif self._last_key is not None:
            self.step = self._step + 1
        self.slot = 0
        self._last_key = key
        self._last_levels = list(noise_levels)

    def is_refresh(self) -> bool:
        """Whether the current forward is a refresh (dense) step (:attr:`refresh`)."""
        return self.refresh

    def entry(self, block_index: int, B: int, N: int, D: int, dtype, device,
              create: bool, num_blocks: int = 1) -> Optional[_Entry]:
        """The entry of a block in the current slot (a new one with ``create`` when there is
        none or its shape differs). On a CUDA device, the first entry of a slot checks that
        the ``num_blocks`` entries of the slot fit in the free memory (``RuntimeError`` naming
        the sizes otherwise)."""
        key = (block_index, self.slot)
        e = self.entries.get(key)
        if e is not None and e.shape == (B, N, D) and e.u1.device == device:
            return e
        if not create:
            return None
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "diffcr: the token cache would allocate an entry inside a compiled graph "
                "(new batch or token count). Compile with diffcr.compile_model, which runs "
                "such a forward eagerly, or call diffcr.reset_token_cache after the first "
                "eager forward of the new shape")
        store = self.config.dtype or dtype
        if device.type == "cuda" and not any(k[1] == self.slot for k in self.entries):
            need = token_cache_bytes(num_blocks, B, N, D, store, self.config.order)
            free = torch.cuda.mem_get_info(device)[0]
            if need > free:
                raise RuntimeError(
                    f"diffcr: the token cache needs {need / 2**30:.2f} GiB ({num_blocks} "
                    f"routed blocks x {B} rows x {N} tokens x {D} in {store}) and "
                    f"{free / 2**30:.2f} GiB are free; use TokenCacheConfig(dtype="
                    "torch.bfloat16) or order=0, a smaller batch, or diffcr."
                    "disable_token_cache")
        e = _Entry(B, N, D, store, device, self.config.order)
        e.step_t = self.step_tensor(device)
        self.entries[key] = e
        return e

    def bytes(self) -> int:
        """Bytes the cached updates take now."""
        return sum(e.bytes() for e in self.entries.values())


def token_cache_bytes(num_blocks: int, batch: int, tokens: int, hidden: int,
                      dtype: torch.dtype = torch.bfloat16, order: int = 0) -> int:
    """Bytes the token cache of a model takes: ``num_blocks`` routed blocks of width
    ``hidden``, ``batch`` rows (CFG halves count) of ``tokens`` tokens, stored in ``dtype``."""
    elt = torch.empty((), dtype=dtype).element_size()
    per_row = tokens * (hidden * elt + 8)
    return num_blocks * batch * per_row * (2 if order else 1)


def coverage(sel, rows: int) -> torch.Tensor:
    """``[rows]``: the weight with which each row of the source is selected (the sum of its
    segments' ``seg_weight``: 1 for a row in every bin at inference, the two-bin weights in
    training; 0 for a skipped row). Differentiable in ``seg_weight``."""
    w = sel.seg_weight.index_select(0, sel.row_segment())
    return torch.zeros(rows, dtype=w.dtype, device=w.device).index_add(0, sel.indices, w)


_FUSED_CACHE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def apply_token_cache(family, out, entry: _Entry, sel, x_rows: Optional[torch.Tensor],
                      step: int, unit_weights: bool = False):
    """A routed block's output with the token cache applied (called by the routing runtime):
    every row receives the forecast of its update times ``1 - coverage`` (skipped rows all of
    it, selected rows none), and with ``x_rows`` (the selected rows' inputs, ``[T, D]``) the
    selected rows' new updates are written into ``entry`` at ``step``.

    Inference at order 0 (no gradient, ``x_rows`` given, a contiguous image stream, a cache in
    a float dtype the kernels take) is one pass of :func:`diffcr_kernels.apply_token_cache_`,
    in place on the stream and the cache (``unit_weights``: every segment weighs 1, so a
    selected row misses nothing and no coverage is computed). Otherwise (training, order 1)
    the same definition in differentiable torch ops."""
    import diffcr_kernels as dk

    img = family.hidden_states_of(out)
    B, N, D = img.shape
    fused = (x_rows is not None and entry.u0 is None and img.is_contiguous()
             and entry.u1.dtype in _FUSED_CACHE_DTYPES
             and not (torch.is_grad_enabled() and img.requires_grad))
    if fused:
        with torch.no_grad():
            miss = None if unit_weights else \
                (1 - coverage(sel, B * N)).to(dk.reference.acc_dtype(img.dtype))
            dk.apply_token_cache_(img, entry.u1, dk.token_cache_slots(sel, B * N), x_rows, miss)
            entry.s1.index_fill_(0, sel.indices, step)
        return out
    miss = (1 - coverage(sel, B * N)).to(img.dtype).unsqueeze(-1)
    add = entry.forecast(step).to(img.dtype) * miss
    if not img.requires_grad and img.is_contiguous():
        img.view(B * N, D).add_(add)
    else:
        img = img + add.view(B, N, D)
        out = family.with_hidden_states(out, img)
    if x_rows is not None:
        entry.write(sel.indices, img.reshape(B * N, D).index_select(0, sel.indices) - x_rows,
                    step)
    return out
