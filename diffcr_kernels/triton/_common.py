"""Shared by the Triton op files (one per op: :mod:`.gather_norm`, :mod:`.scatter`,
:mod:`.router`, :mod:`.select`): tile and chunk sizes, the interpreter flag, and the argument
checks every launcher runs before it launches (ValueError naming the argument).

Conventions of every Triton kernel (as in ``csrc/kernels/diffcr_cuda.h``):

* x is ``[B, N, D]`` viewed as ``[B * N, D]`` rows; ``idx`` is int64 ``[T]`` flat row indices
  ``b * N + n`` (the sample of a packed row is ``idx // N``);
* ``cu_seqlens`` is int32 ``[S + 1]``; segment s owns packed rows ``[cu[s], cu[s + 1])``;
  segments are sample-major with P (``segs_per_sample``) segments per sample;
* "acc" tensors (mean, rstd, scores, seg_weight, row_dot, grad_scores) are float64 for float64
  data and float32 otherwise; loads are upcast to the acc dtype, math is done in it, and results
  are rounded once to the data dtype on store.

Names: a launched kernel is ``_<op>_kernel``; a ``@triton.jit`` helper that kernels call is named
otherwise (:mod:`.aot` records the launches of the ``*_kernel`` functions only).

Kernel layout: each program handles a tile of ``BLOCK_R`` packed rows (:func:`pick_block_r`); the
segment-based kernels use the CUDA grid ``(row blocks of max_seqlen, segments)`` and mask the
rows past the end of each segment. The hidden dimension is walked in chunks of ``BLOCK_D``
elements (:func:`pick_block_d`), with masks for D that is not a multiple of it. The launchers check
shapes, dtypes and devices (and, for CPU tensors, where it costs no device sync, the contents of
``idx`` and ``cu_seqlens``) before anything is launched.
"""
from __future__ import annotations

import contextlib
import operator
from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference import check_cu_seqlens

#: Largest chunk of the hidden dimension one program holds at a time (a power of two). Rows with
#: D > MAX_BLOCK_D are processed in several chunks. Module-level so tests can shrink it to
#: exercise the chunk loop on tiny shapes.
MAX_BLOCK_D = 8192
#: Most packed rows one program handles (a power of two); the launchers use
#: ``min(MAX_BLOCK_R, TILE // BLOCK_D)`` rows (at least 1), see :func:`pick_block_r`.
MAX_BLOCK_R = 16

DATA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

@triton.jit
def _probe_kernel(x_ptr):
    pass


#: True when the kernels were defined under the Triton interpreter (TRITON_INTERPRET=1 at import):
#: they then run on CPU tensors (slowly); otherwise they need CUDA tensors.
INTERPRETED = type(_probe_kernel).__name__ == "InterpretedFunction"


# ============================================================================================
# validation helpers (ValueError naming the argument; nothing is launched before they pass)
# ============================================================================================
def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_tensor(t, op: str, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def check_x(x, op: str, name: str = "x") -> None:
    check_tensor(x, op, name)
    if x.dim() != 3:
        raise ValueError(f"{op}: {name} must be [B, N, D], got shape {tuple(x.shape)}")
    if x.dtype not in DATA_DTYPES:
        raise ValueError(f"{op}: {name} must be float32, float64, float16 or bfloat16, got "
                         f"{x.dtype}")


def check_device(x: torch.Tensor, op: str, name: str = "x") -> None:
    if x.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"{op}: {name} is on {x.device}, but the Triton kernels need CUDA "
                         "tensors (or the Triton interpreter: TRITON_INTERPRET=1 set before "
                         "diffcr_kernels.triton is imported)")


def on_device(x: torch.Tensor):
    """Launch on x's GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def check_idx(idx, x: torch.Tensor, op: str, xname: str = "x") -> None:
    check_tensor(idx, op, "idx")
    if idx.dim() != 1:
        raise ValueError(f"{op}: idx must be 1-D [T], got shape {tuple(idx.shape)}")
    if idx.dtype != torch.int64:
        raise ValueError(f"{op}: idx must be int64, got {idx.dtype}")
    if idx.device != x.device:
        raise ValueError(f"{op}: idx is on {idx.device} but {xname} is on {x.device}")
    if idx.device.type == "cpu" and idx.numel():  # content check only where it needs no sync
        rows = x.shape[0] * x.shape[1]
        bad = ((idx < 0) | (idx >= rows)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ValueError(f"{op}: idx[{i}] = {int(idx[i])} is out of range [0, {rows}) "
                             f"(B * N rows of {xname})")


def check_data(t, op: str, name: str, x: torch.Tensor, shape, xname: str = "x") -> None:
    check_tensor(t, op, name)
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {xname} is on {x.device}")
    if t.dtype != x.dtype:
        raise ValueError(f"{op}: {name} has dtype {t.dtype}, expected {x.dtype} (the dtype of "
                         f"{xname})")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def check_opt(t, op: str, name: str, x: torch.Tensor, shape, xname: str = "x") -> None:
    if t is not None:
        check_data(t, op, name, x, shape, xname)


def check_acc(t, op: str, name: str, x: torch.Tensor, n: int, xname: str = "x") -> None:
    check_tensor(t, op, name)
    a = acc_dtype(x.dtype)
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {xname} is on {x.device}")
    if t.dtype != a:
        raise ValueError(f"{op}: {name} has dtype {t.dtype}, expected {a} (float64 for float64 "
                         f"data, float32 otherwise)")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected [{n}]")


def check_int(v, op: str, name: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        try:
            v = operator.index(v)
        except TypeError:
            raise ValueError(f"{op}: {name} must be an int, got {type(v).__name__}") from None
    if v < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {v}")
    return int(v)


def check_segments(op: str, x: torch.Tensor, idx: torch.Tensor, cu_seqlens, max_seqlen: int,
                    segs_per_sample: int, xname: str = "x") -> int:
    """Checks cu_seqlens (and, on CPU, its contents); returns the number of segments S."""
    S = check_cu_seqlens(op, cu_seqlens, x.device, xname)
    if S % segs_per_sample != 0:
        raise ValueError(f"{op}: the number of segments ({S}) is not a multiple of "
                         f"segs_per_sample ({segs_per_sample})")
    if cu_seqlens.device.type == "cpu":
        cu = cu_seqlens.tolist()
        T = idx.numel()
        if cu[0] != 0:
            raise ValueError(f"{op}: cu_seqlens[0] must be 0, got {cu[0]}")
        for s in range(S):
            n = cu[s + 1] - cu[s]
            if n < 0:
                raise ValueError(f"{op}: cu_seqlens must be non-decreasing, but cu_seqlens"
                                 f"[{s + 1}] = {cu[s + 1]} < cu_seqlens[{s}] = {cu[s]}")
            if n > max_seqlen:
                raise ValueError(f"{op}: segment {s} has {n} rows but max_seqlen = "
                                 f"{max_seqlen}")
        if cu[S] != T:
            raise ValueError(f"{op}: cu_seqlens[-1] = {cu[S]} must equal the number of rows "
                             f"T = {T}")
    return S


#: Largest fraction of masked (idle) lanes :func:`pick_block_d` accepts in the last chunk of a row.
MAX_MASKED = 0.125
#: Elements of one program's tile (BLOCK_R x BLOCK_D) for the light kernels (forward gather +
#: norm, scatter, router) and for the heavy ones (the two backward kernels, and float64 data),
#: which hold several [BLOCK_R, BLOCK_D] values at once: at 4096 elements the scatter backward
#: needed 207-254 registers per thread (one 8-warp program per SM), at 2048 see
#: ``python -m diffcr_kernels.triton.aot``.
TILE = 4096
TILE_HEAVY = 2048


def pick_block_d(D: int) -> int:
    """The chunk of the hidden dimension one program walks at a time: the largest power of two
    (at most :data:`MAX_BLOCK_D`, at most ``next_power_of_2(D)``) whose chunked walk of D leaves
    at most :data:`MAX_MASKED` of the lanes masked, and not below 128 lanes (else the least
    masked of those). D = 1152 (PixArt/DiT-XL) gives 256 (5 chunks, 10 % masked) instead of
    one 2048-wide chunk with 44 % of its lanes idle; 3072 (Flux) and 5120 (Wan-14B) give 1024
    (no masked lane); D <= 128 one chunk of next_power_of_2(D)."""
    D = max(D, 1)
    top = min(triton.next_power_of_2(D), MAX_BLOCK_D)
    lo = min(128, top)  # narrower chunks only multiply the loop trips of tiny rows
    best, best_waste = top, 1.0
    bd = top
    while bd >= lo:
        chunks = -(-D // bd)
        waste = (chunks * bd - D) / (chunks * bd)
        if waste <= MAX_MASKED:
            return bd
        if waste < best_waste:
            best, best_waste = bd, waste
        bd //= 2
    return best


def pick_block_r(block_d: int, heavy: bool = False) -> int:
    """Packed rows per program: the tile (:data:`TILE` or :data:`TILE_HEAVY` elements) divided
    by the chunk, at most :data:`MAX_BLOCK_R`."""
    return max(1, min(MAX_BLOCK_R, (TILE_HEAVY if heavy else TILE) // block_d))


def pick_num_warps(block: int) -> int:
    return min(max(block // 256, 1), 8)


def contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t.contiguous()`` (None stays None)."""
    return None if t is None else t.contiguous()
