"""Triton kernels of the DiffCR data path, with plain Python launchers.

The launchers mirror the compiled ``torch.ops.diffcr.*`` operators (one schema table for both:
``diffcr_kernels/_schemas.py``) argument for argument and output for output, and the kernels
follow the CUDA kernels of ``csrc/kernels/*.cu`` (same formulas, same order of operations where it matters, same
deterministic slot-by-slot scatter). They do no ``torch.library`` registration: dispatch is wired
elsewhere. :func:`router_scores` has no compiled counterpart; it mirrors
:func:`diffcr_kernels.reference.router_scores`.

Conventions (as in ``csrc/kernels/diffcr_cuda.h``):

* x is ``[B, N, D]`` viewed as ``[B * N, D]`` rows; ``idx`` is int64 ``[T]`` flat row indices
  ``b * N + n`` (the sample of a packed row is ``idx // N``);
* ``cu_seqlens`` is int32 ``[S + 1]``; segment s owns packed rows ``[cu[s], cu[s + 1])``;
  segments are sample-major with P (``segs_per_sample``) segments per sample;
* "acc" tensors (mean, rstd, scores, seg_weight, row_dot, grad_scores) are float64 for float64
  data and float32 otherwise; loads are upcast to the acc dtype, math is done in it, and results
  are rounded once to the data dtype on store.

Kernel layout: each program handles a tile of ``BLOCK_R`` packed rows (``BLOCK_R`` is 1 for
wide rows, up to :data:`MAX_BLOCK_R` for narrow ones); the segment-based kernels use the CUDA
grid ``(row blocks of max_seqlen, segments)`` and mask the rows past the end of each segment.
The hidden dimension is walked in chunks of ``BLOCK_D`` elements (:func:`_block_d`: a power of
two that leaves at most 1/8 of the lanes masked, at most :data:`MAX_BLOCK_D`), with masks for D
that is not a multiple of it.

The launchers validate shapes, dtypes and devices (and, for CPU tensors, where it costs no device
sync, the contents of ``idx`` and ``cu_seqlens``) and raise :class:`ValueError` naming the
offending argument before anything is launched.
"""
from __future__ import annotations

import contextlib
import operator
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRETED",
    "MAX_BLOCK_D",
    "MAX_BLOCK_R",
    "gather_norm_modulate",
    "gather_norm_modulate_backward",
    "scatter_back",
    "scatter_back_",
    "scatter_back_backward",
    "router_scores",
]

#: Largest chunk of the hidden dimension one program holds at a time (a power of two). Rows with
#: D > MAX_BLOCK_D are processed in several chunks. Module-level so tests can shrink it to
#: exercise the chunk loop on tiny shapes.
MAX_BLOCK_D = 8192
#: Most packed rows one program handles (a power of two); the launchers use
#: ``min(MAX_BLOCK_R, TILE // BLOCK_D)`` rows (at least 1), see :func:`_block_r`.
MAX_BLOCK_R = 16

_DATA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ============================================================================================
# kernels
# ============================================================================================
@triton.jit
def _gnm_fwd_kernel(x_ptr, idx_ptr, shift_ptr, scale_ptr, weight_ptr, bias_ptr, y_ptr,
                    mean_ptr, rstd_ptr, T, N, D, eps_hi, eps_lo,
                    HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
                    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # BLOCK_R packed rows per program; every reduction is per row (axis 1)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < T
    src = tl.load(idx_ptr + r, mask=rm, other=0)
    b = src // N
    x_rows = x_ptr + src[:, None] * D
    offs = tl.arange(0, BLOCK_D)
    # mean
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = (d0 + offs)[None, :]
        m = rm[:, None] & (d < D)
        acc += tl.load(x_rows + d, mask=m, other=0.0).to(ACC)
    mu = tl.sum(acc, axis=1) / D
    # biased variance (two-pass, like the CUDA kernel)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = (d0 + offs)[None, :]
        m = rm[:, None] & (d < D)
        t = tl.where(m, tl.load(x_rows + d, mask=m, other=0.0).to(ACC) - mu[:, None], 0.0)
        acc += t * t
    var = tl.sum(acc, axis=1) / D
    # eps arrives as two float32 halves (hi + lo) so that float64 data sees eps exactly
    rs = 1.0 / tl.sqrt(var + eps_hi + eps_lo)
    y_rows = y_ptr + r[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        d = (d0 + offs)[None, :]
        dm = d < D
        m = rm[:, None] & dm
        h = (tl.load(x_rows + d, mask=m, other=0.0).to(ACC) - mu[:, None]) * rs[:, None]
        if HAS_WEIGHT:
            h = h * tl.load(weight_ptr + d, mask=dm, other=0.0).to(ACC)
        if HAS_BIAS:
            h = h + tl.load(bias_ptr + d, mask=dm, other=0.0).to(ACC)
        if HAS_SCALE:
            h = h * (1.0 + tl.load(scale_ptr + b[:, None] * D + d, mask=m, other=0.0).to(ACC))
        if HAS_SHIFT:
            h = h + tl.load(shift_ptr + b[:, None] * D + d, mask=m, other=0.0).to(ACC)
        tl.store(y_rows + d, h.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(mean_ptr + r, mu, mask=rm)
    tl.store(rstd_ptr + r, rs, mask=rm)


@triton.jit
def _gnm_bwd_kernel(gy_ptr, x_ptr, idx_ptr, mean_ptr, rstd_ptr, scale_ptr, weight_ptr, out_ptr,
                    T, N, D,
                    HAS_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < T
    src = tl.load(idx_ptr + r, mask=rm, other=0)
    b = src // N
    x_rows = x_ptr + src[:, None] * D
    g_rows = gy_ptr + r[:, None] * D
    mu = tl.load(mean_ptr + r, mask=rm, other=0.0)[:, None]
    rs = tl.load(rstd_ptr + r, mask=rm, other=0.0)[:, None]
    offs = tl.arange(0, BLOCK_D)
    # g = dL/dxhat = gy * (1 + scale) * weight;  m1 = mean(g), m2 = mean(g * xhat)
    a1 = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    a2 = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = (d0 + offs)[None, :]
        dm = d < D
        m = rm[:, None] & dm
        g = tl.load(g_rows + d, mask=m, other=0.0).to(ACC)
        if HAS_SCALE:
            g = g * (1.0 + tl.load(scale_ptr + b[:, None] * D + d, mask=m, other=0.0).to(ACC))
        if HAS_WEIGHT:
            g = g * tl.load(weight_ptr + d, mask=dm, other=0.0).to(ACC)
        xh = tl.where(m, (tl.load(x_rows + d, mask=m, other=0.0).to(ACC) - mu) * rs, 0.0)
        a1 += g
        a2 += g * xh
    m1 = (tl.sum(a1, axis=1) / D)[:, None]
    m2 = (tl.sum(a2, axis=1) / D)[:, None]
    o_rows = out_ptr + r[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        d = (d0 + offs)[None, :]
        dm = d < D
        m = rm[:, None] & dm
        g = tl.load(g_rows + d, mask=m, other=0.0).to(ACC)
        if HAS_SCALE:
            g = g * (1.0 + tl.load(scale_ptr + b[:, None] * D + d, mask=m, other=0.0).to(ACC))
        if HAS_WEIGHT:
            g = g * tl.load(weight_ptr + d, mask=dm, other=0.0).to(ACC)
        xh = (tl.load(x_rows + d, mask=m, other=0.0).to(ACC) - mu) * rs
        tl.store(o_rows + d, (rs * (g - m1 - xh * m2)).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _scatter_fwd_kernel(out_ptr, idx_ptr, cu_ptr, w_ptr, d1_ptr, d2_ptr, scores_ptr, gate_ptr,
                        P, p, N, D,
                        HAS_D2: tl.constexpr, HAS_SCORES: tl.constexpr, HAS_GATE: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid (row blocks of max_seqlen, samples): segment j * P + p, rows of this block
    seg = tl.program_id(1).to(tl.int64) * P + p
    start = tl.load(cu_ptr + seg).to(tl.int64)
    end = tl.load(cu_ptr + seg + 1).to(tl.int64)
    r = start + tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < end
    dst = tl.load(idx_ptr + r, mask=rm, other=0)
    b = dst // N
    w = tl.load(w_ptr + seg)
    if HAS_SCORES:
        s = tl.load(scores_ptr + r, mask=rm, other=0.0)[:, None]
    o_rows = out_ptr + dst[:, None] * D
    offs = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = (d0 + offs)[None, :]
        m = rm[:, None] & (d < D)
        c = tl.load(d1_ptr + r[:, None] * D + d, mask=m, other=0.0).to(ACC)
        if HAS_D2:
            mm = tl.load(d2_ptr + r[:, None] * D + d, mask=m, other=0.0).to(ACC)
            if HAS_GATE:
                mm = mm * tl.load(gate_ptr + b[:, None] * D + d, mask=m, other=0.0).to(ACC)
            if HAS_SCORES:
                c = c + s * mm
            else:
                c = c + mm
        o = tl.load(o_rows + d, mask=m, other=0.0).to(ACC)
        tl.store(o_rows + d, (o + w * c).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _scatter_bwd_kernel(gout_ptr, idx_ptr, cu_ptr, w_ptr, d1_ptr, d2_ptr, scores_ptr, gate_ptr,
                        gd1_ptr, gd2_ptr, gs_ptr, dot_ptr, N, D,
                        HAS_D2: tl.constexpr, HAS_SCORES: tl.constexpr, HAS_GATE: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    seg = tl.program_id(1).to(tl.int64)
    start = tl.load(cu_ptr + seg).to(tl.int64)
    end = tl.load(cu_ptr + seg + 1).to(tl.int64)
    r = start + tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < end
    src = tl.load(idx_ptr + r, mask=rm, other=0)
    b = src // N
    w = tl.load(w_ptr + seg)
    if HAS_SCORES:
        s = tl.load(scores_ptr + r, mask=rm, other=0.0)[:, None]
    g_rows = gout_ptr + src[:, None] * D
    offs = tl.arange(0, BLOCK_D)
    acc_s = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    acc_w = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = (d0 + offs)[None, :]
        m = rm[:, None] & (d < D)
        rd = r[:, None] * D + d
        g = tl.load(g_rows + d, mask=m, other=0.0).to(ACC)
        tl.store(gd1_ptr + rd, (w * g).to(gd1_ptr.dtype.element_ty), mask=m)
        c = tl.load(d1_ptr + rd, mask=m, other=0.0).to(ACC)
        if HAS_D2:
            mm = tl.load(d2_ptr + rd, mask=m, other=0.0).to(ACC)
            if HAS_SCORES:
                ws = w * s
            else:
                ws = w
            if HAS_GATE:
                gt = tl.load(gate_ptr + b[:, None] * D + d, mask=m, other=0.0).to(ACC)
                mm = mm * gt
                g2 = ws * gt * g
            else:
                g2 = ws * g
            tl.store(gd2_ptr + rd, g2.to(gd2_ptr.dtype.element_ty), mask=m)
            acc_s += mm * g
            if HAS_SCORES:
                c = c + s * mm
            else:
                c = c + mm
        acc_w += c * g
    if HAS_SCORES:
        # zero when d2 is absent (acc_s never accumulates), like the CUDA kernel
        tl.store(gs_ptr + r, w * tl.sum(acc_s, axis=1), mask=rm)
    tl.store(dot_ptr + r, tl.sum(acc_w, axis=1), mask=rm)


@triton.jit
def _router_kernel(x_ptr, w_ptr, out_ptr, M, D,
                   ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < M
    offs = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs
        dm = d < D
        wv = tl.load(w_ptr + d, mask=dm, other=0.0).to(ACC)
        xv = tl.load(x_ptr + rows[:, None] * D + d[None, :], mask=rm[:, None] & dm[None, :],
                     other=0.0).to(ACC)
        acc += xv * wv[None, :]
    z = tl.sum(acc, axis=1)
    tl.store(out_ptr + rows, 1.0 / (1.0 + tl.exp(-z)), mask=rm)


#: True when the kernels were defined under the Triton interpreter (TRITON_INTERPRET=1 at import):
#: they then run on CPU tensors (slowly); otherwise they need CUDA tensors.
INTERPRETED = type(_router_kernel).__name__ == "InterpretedFunction"


# ============================================================================================
# validation helpers (ValueError naming the argument; nothing is launched before they pass)
# ============================================================================================
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _is_tensor(t, op: str, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def _check_x(x, op: str, name: str = "x") -> None:
    _is_tensor(x, op, name)
    if x.dim() != 3:
        raise ValueError(f"{op}: {name} must be [B, N, D], got shape {tuple(x.shape)}")
    if x.dtype not in _DATA_DTYPES:
        raise ValueError(f"{op}: {name} must be float32, float64, float16 or bfloat16, got "
                         f"{x.dtype}")


def _check_device(x: torch.Tensor, op: str, name: str = "x") -> None:
    if x.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"{op}: {name} is on {x.device}, but the Triton kernels need CUDA "
                         "tensors (or the Triton interpreter: TRITON_INTERPRET=1 set before "
                         "diffcr_kernels.triton is imported)")


def _on_device(x: torch.Tensor):
    """Launch on x's GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _check_idx(idx, x: torch.Tensor, op: str, xname: str = "x") -> None:
    _is_tensor(idx, op, "idx")
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


def _check_data(t, op: str, name: str, x: torch.Tensor, shape, xname: str = "x") -> None:
    _is_tensor(t, op, name)
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {xname} is on {x.device}")
    if t.dtype != x.dtype:
        raise ValueError(f"{op}: {name} has dtype {t.dtype}, expected {x.dtype} (the dtype of "
                         f"{xname})")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _check_opt(t, op: str, name: str, x: torch.Tensor, shape, xname: str = "x") -> None:
    if t is not None:
        _check_data(t, op, name, x, shape, xname)


def _check_acc(t, op: str, name: str, x: torch.Tensor, n: int, xname: str = "x") -> None:
    _is_tensor(t, op, name)
    a = _acc_dtype(x.dtype)
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {xname} is on {x.device}")
    if t.dtype != a:
        raise ValueError(f"{op}: {name} has dtype {t.dtype}, expected {a} (float64 for float64 "
                         f"data, float32 otherwise)")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected [{n}]")


def _check_int(v, op: str, name: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        try:
            v = operator.index(v)
        except TypeError:
            raise ValueError(f"{op}: {name} must be an int, got {type(v).__name__}") from None
    if v < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {v}")
    return int(v)


def _check_segments(op: str, x: torch.Tensor, idx: torch.Tensor, cu_seqlens, max_seqlen: int,
                    segs_per_sample: int, xname: str = "x") -> int:
    """Checks cu_seqlens (and, on CPU, its contents); returns the number of segments S."""
    _is_tensor(cu_seqlens, op, "cu_seqlens")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{op}: cu_seqlens must be 1-D [S+1] with S >= 0, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{op}: cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.device != x.device:
        raise ValueError(f"{op}: cu_seqlens is on {cu_seqlens.device} but {xname} is on "
                         f"{x.device}")
    S = cu_seqlens.numel() - 1
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


#: Largest fraction of masked (idle) lanes :func:`_block_d` accepts in the last chunk of a row.
MAX_MASKED = 0.125
#: Elements of one program's tile (BLOCK_R x BLOCK_D) for the light kernels (forward gather +
#: norm, scatter, router) and for the heavy ones (the two backward kernels, and float64 data),
#: which hold several [BLOCK_R, BLOCK_D] values at once: at 4096 elements the scatter backward
#: needed 207-254 registers per thread (one 8-warp program per SM), at 2048 see
#: ``python -m diffcr_kernels.triton.aot``.
TILE = 4096
TILE_HEAVY = 2048


def _block_d(D: int) -> int:
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


def _block_r(block_d: int, heavy: bool = False) -> int:
    """Packed rows per program: the tile (:data:`TILE` or :data:`TILE_HEAVY` elements) divided
    by the chunk, at most :data:`MAX_BLOCK_R`."""
    return max(1, min(MAX_BLOCK_R, (TILE_HEAVY if heavy else TILE) // block_d))


def _num_warps(block: int) -> int:
    return min(max(block // 256, 1), 8)


def _c(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


# ============================================================================================
# launchers
# ============================================================================================
def gather_norm_modulate(
    x: torch.Tensor,
    idx: torch.Tensor,
    shift: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather + LayerNorm + adaLN modulate on packed rows (Triton twin of
    ``torch.ops.diffcr.gather_norm_modulate``).

    ``y[r] = (LN(x[idx[r]]) * weight + bias) * (1 + scale[b]) + shift[b]``, ``b = idx[r] // N``;
    biased variance, ``eps`` inside the square root, math in the acc dtype.

    x ``[B, N, D]``; idx int64 ``[T]``; shift/scale ``[B, D]`` or None; weight/bias ``[D]`` or
    None (all in x's dtype and on x's device). Returns ``(y [T, D] in x's dtype, mean [T],
    rstd [T])`` with mean/rstd in the acc dtype (float64 for float64 x, float32 otherwise).
    """
    op = "gather_norm_modulate"
    _check_x(x, op)
    _check_device(x, op)
    _check_idx(idx, x, op)
    B, N, D = x.shape
    _check_opt(shift, op, "shift", x, (B, D))
    _check_opt(scale, op, "scale", x, (B, D))
    _check_opt(weight, op, "weight", x, (D,))
    _check_opt(bias, op, "bias", x, (D,))
    eps = float(eps)
    if not eps >= 0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")
    T = idx.numel()
    a = _acc_dtype(x.dtype)
    y = torch.empty(T, D, dtype=x.dtype, device=x.device)
    mean = torch.empty(T, dtype=a, device=x.device)
    rstd = torch.empty(T, dtype=a, device=x.device)
    if T == 0:
        return y, mean, rstd
    x, idx = x.contiguous(), idx.contiguous()
    shift, scale, weight, bias = _c(shift), _c(scale), _c(weight), _c(bias)
    eps_hi = float(torch.tensor(eps, dtype=torch.float32))
    eps_lo = float(torch.tensor(eps - eps_hi, dtype=torch.float32))
    BLOCK_D = _block_d(D)
    BLOCK_R = _block_r(BLOCK_D, heavy=x.dtype == torch.float64)
    with _on_device(x):
        _gnm_fwd_kernel[(triton.cdiv(T, BLOCK_R),)](
            x, idx, x if shift is None else shift, x if scale is None else scale,
            x if weight is None else weight, x if bias is None else bias, y, mean, rstd, T, N, D,
            eps_hi, eps_lo,
            HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            ACC=_tl_acc(x.dtype), BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
            num_warps=_num_warps(BLOCK_R * BLOCK_D))
    return y, mean, rstd


def gather_norm_modulate_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    idx: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    scale: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
) -> torch.Tensor:
    """Per-row backward of :func:`gather_norm_modulate` with respect to the gathered rows
    (Triton twin of ``torch.ops.diffcr.gather_norm_modulate_backward``).

    With ``g = grad_y[r] * (1 + scale[b]) * weight`` and ``xhat = (x[idx[r]] - mean[r]) *
    rstd[r]``: ``grad_rows[r] = rstd[r] * (g - mean(g) - xhat * mean(g * xhat))``.

    grad_y ``[T, D]`` (x's dtype); x ``[B, N, D]``; idx int64 ``[T]``; mean/rstd ``[T]`` (acc
    dtype, as returned by the forward); scale ``[B, D]`` or None; weight ``[D]`` or None.
    Returns grad_rows ``[T, D]`` in x's dtype (the caller scatters it into ``grad_x``).
    """
    op = "gather_norm_modulate_backward"
    _check_x(x, op)
    _check_device(x, op)
    _check_idx(idx, x, op)
    B, N, D = x.shape
    T = idx.numel()
    _check_data(grad_y, op, "grad_y", x, (T, D))
    _check_acc(mean, op, "mean", x, T)
    _check_acc(rstd, op, "rstd", x, T)
    _check_opt(scale, op, "scale", x, (B, D))
    _check_opt(weight, op, "weight", x, (D,))
    out = torch.empty(T, D, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    grad_y, x, idx, mean, rstd = (t.contiguous() for t in (grad_y, x, idx, mean, rstd))
    scale, weight = _c(scale), _c(weight)
    BLOCK_D = _block_d(D)
    BLOCK_R = _block_r(BLOCK_D, heavy=True)
    with _on_device(x):
        _gnm_bwd_kernel[(triton.cdiv(T, BLOCK_R),)](
            grad_y, x, idx, mean, rstd, x if scale is None else scale,
            x if weight is None else weight, out, T, N, D,
            HAS_SCALE=scale is not None, HAS_WEIGHT=weight is not None,
            ACC=_tl_acc(x.dtype), BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
            num_warps=_num_warps(BLOCK_R * BLOCK_D))
    return out


def scatter_back_(
    x: torch.Tensor,
    idx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    segs_per_sample: int,
    seg_weight: torch.Tensor,
    d1: torch.Tensor,
    d2: Optional[torch.Tensor],
    scores: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
) -> None:
    """In-place :func:`scatter_back`: ``x`` itself receives the update (no copy of the
    ``[B, N, D]`` residual stream). x must be contiguous and share no memory with d1, d2, gate
    or idx. Same arguments and result otherwise."""
    _scatter_launch("scatter_back_", x, x, idx, cu_seqlens, max_seqlen, segs_per_sample,
                    seg_weight, d1, d2, scores, gate)


def scatter_back(
    x: torch.Tensor,
    idx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    segs_per_sample: int,
    seg_weight: torch.Tensor,
    d1: torch.Tensor,
    d2: Optional[torch.Tensor],
    scores: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
) -> torch.Tensor:
    """Gated, bin-weighted scatter-back (Triton twin of ``torch.ops.diffcr.scatter_back``).

    ``out = x.clone()``; then for each segment s and packed row r of s:
    ``out[idx[r]] += seg_weight[s] * (d1[r] + scores[r] * gate[b] * d2[r])``, ``b = idx[r] //
    N``. A missing scores/gate counts as 1; a missing d2 drops the second term. Rows never
    selected are copied bit-exactly.

    Deterministic without atomics: segments are sample-major with ``P = segs_per_sample``
    segments per sample; each slot p (segments ``s = j * P + p``) is one launch over grid
    ``(row blocks of max_seqlen, S // P)``, so no row is written twice within a launch (this
    relies on the indices of one segment being distinct, as
    :func:`~diffcr_kernels.reference.select_topk` produces). Each update is accumulated in the
    acc dtype and stored in x's dtype (with P > 1, a row in several segments is rounded once
    per slot, like the CUDA kernel).

    x ``[B, N, D]``; idx int64 ``[T]``; cu_seqlens int32 ``[S + 1]``; seg_weight ``[S]`` (acc
    dtype); d1, d2 ``[T, D]`` (x's dtype); scores ``[T]`` (acc dtype); gate ``[B, D]``.
    ``max_seqlen`` must be >= the longest segment. Returns ``[B, N, D]`` in x's dtype.
    """
    return _scatter_launch("scatter_back", x, None, idx, cu_seqlens, max_seqlen,
                           segs_per_sample, seg_weight, d1, d2, scores, gate)


def _scatter_launch(op, x, out, idx, cu_seqlens, max_seqlen, segs_per_sample, seg_weight, d1,
                    d2, scores, gate):
    """Validates, then adds the packed rows into ``out`` (a contiguous copy of x when None)."""
    _check_x(x, op)
    _check_device(x, op)
    _check_idx(idx, x, op)
    B, N, D = x.shape
    T = idx.numel()
    max_seqlen = _check_int(max_seqlen, op, "max_seqlen", 0)
    P = _check_int(segs_per_sample, op, "segs_per_sample", 1)
    S = _check_segments(op, x, idx, cu_seqlens, max_seqlen, P)
    if B and S and S % B == 0 and S // B != P:
        raise ValueError(f"{op}: segs_per_sample = {P} does not match the layout: {S} segments "
                         f"over B = {B} samples is {S // B} per sample (sample-major)")
    _check_acc(seg_weight, op, "seg_weight", x, S)
    _check_data(d1, op, "d1", x, (T, D))
    _check_opt(d2, op, "d2", x, (T, D))
    if scores is not None:
        _check_acc(scores, op, "scores", x, T)
    _check_opt(gate, op, "gate", x, (B, D))
    if out is None:
        out = x.clone(memory_format=torch.contiguous_format)
    else:
        if not out.is_contiguous():
            raise ValueError(f"{op}: x must be contiguous to be updated in place (use "
                             "scatter_back, which returns a new tensor)")
        for name, t in (("d1", d1), ("d2", d2), ("gate", gate), ("idx", idx)):
            if t is not None and t.untyped_storage().data_ptr() == \
                    out.untyped_storage().data_ptr():
                raise ValueError(f"{op}: {name} shares memory with x, which is updated in "
                                 "place")
    if T == 0 or S == 0 or max_seqlen == 0 or D == 0:
        return out
    idx, cu_seqlens, seg_weight, d1 = (t.contiguous() for t in (idx, cu_seqlens, seg_weight, d1))
    d2, scores, gate = _c(d2), _c(scores), _c(gate)
    BLOCK_D = _block_d(D)
    BLOCK_R = _block_r(BLOCK_D, heavy=x.dtype == torch.float64)
    grid = (triton.cdiv(max_seqlen, BLOCK_R), S // P)
    with _on_device(x):
        for p in range(P):  # one launch per slot: no row is written twice within a launch
            _scatter_fwd_kernel[grid](
                out, idx, cu_seqlens, seg_weight, d1, d1 if d2 is None else d2,
                seg_weight if scores is None else scores, d1 if gate is None else gate,
                P, p, N, D,
                HAS_D2=d2 is not None, HAS_SCORES=scores is not None, HAS_GATE=gate is not None,
                ACC=_tl_acc(x.dtype), BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
                num_warps=_num_warps(BLOCK_R * BLOCK_D))
    return out


def scatter_back_backward(
    grad_out: torch.Tensor,
    idx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    seg_weight: torch.Tensor,
    d1: torch.Tensor,
    d2: Optional[torch.Tensor],
    scores: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row backward of :func:`scatter_back` (Triton twin of
    ``torch.ops.diffcr.scatter_back_backward``).

    For packed row r of segment s, with ``G = grad_out[idx[r]]``, ``w = seg_weight[s]``,
    ``s_r = scores[r]`` (1 if None) and ``gate[b]`` (1 if None):

    * ``grad_d1[r] = w * G``
    * ``grad_d2[r] = w * s_r * gate[b] * G``                       (``[0, D]`` when d2 is None)
    * ``grad_scores[r] = w * sum(gate[b] * d2[r] * G)``            (0 when d2 is None; ``[0]``
      when scores is None)
    * ``row_dot[r] = sum((d1[r] + s_r * gate[b] * d2[r]) * G)``    (segment sums give
      d out / d seg_weight)

    grad_out ``[B, N, D]``; the other arguments as in :func:`scatter_back` (d1, d2, gate in
    grad_out's dtype; seg_weight, scores in the acc dtype). Returns ``(grad_d1 [T, D],
    grad_d2 [T or 0, D], grad_scores [T or 0], row_dot [T])``; the first two in grad_out's
    dtype, the last two in the acc dtype.
    """
    op = "scatter_back_backward"
    xn = "grad_out"
    _check_x(grad_out, op, xn)
    _check_device(grad_out, op, xn)
    _check_idx(idx, grad_out, op, xn)
    B, N, D = grad_out.shape
    T = idx.numel()
    max_seqlen = _check_int(max_seqlen, op, "max_seqlen", 0)
    S = _check_segments(op, grad_out, idx, cu_seqlens, max_seqlen, 1, xn)
    _check_acc(seg_weight, op, "seg_weight", grad_out, S, xn)
    _check_data(d1, op, "d1", grad_out, (T, D), xn)
    _check_opt(d2, op, "d2", grad_out, (T, D), xn)
    if scores is not None:
        _check_acc(scores, op, "scores", grad_out, T, xn)
    _check_opt(gate, op, "gate", grad_out, (B, D), xn)
    a = seg_weight.dtype
    dev = grad_out.device
    grad_d1 = torch.empty(T, D, dtype=d1.dtype, device=dev)
    grad_d2 = torch.empty(T if d2 is not None else 0, D, dtype=d1.dtype, device=dev)
    grad_s = torch.empty(T if scores is not None else 0, dtype=a, device=dev)
    row_dot = torch.empty(T, dtype=a, device=dev)
    if T == 0 or S == 0 or max_seqlen == 0:
        return grad_d1, grad_d2, grad_s, row_dot
    grad_out, idx, cu_seqlens, seg_weight, d1 = (
        t.contiguous() for t in (grad_out, idx, cu_seqlens, seg_weight, d1))
    d2, scores, gate = _c(d2), _c(scores), _c(gate)
    BLOCK_D = _block_d(D)
    BLOCK_R = _block_r(BLOCK_D, heavy=True)
    with _on_device(grad_out):
        _scatter_bwd_kernel[(triton.cdiv(max_seqlen, BLOCK_R), S)](
            grad_out, idx, cu_seqlens, seg_weight, d1, d1 if d2 is None else d2,
            seg_weight if scores is None else scores, d1 if gate is None else gate,
            grad_d1, grad_d1 if d2 is None else grad_d2, row_dot if scores is None else grad_s,
            row_dot, N, D,
            HAS_D2=d2 is not None, HAS_SCORES=scores is not None, HAS_GATE=gate is not None,
            ACC=_tl_acc(grad_out.dtype), BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
            num_warps=_num_warps(BLOCK_R * BLOCK_D))
    return grad_d1, grad_d2, grad_s, row_dot


def router_scores(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router scores ``sigmoid(x . weight)`` for every token (Triton twin of
    :func:`diffcr_kernels.reference.router_scores`).

    x ``[B, N, D]`` (any supported float dtype); weight ``[D]`` (any float dtype, on x's
    device; upcast like x). A GEMV done as elementwise products and row sums in the acc dtype
    (no ``tl.dot``). Returns ``[B, N]`` in the acc dtype (float64 for float64 x, float32
    otherwise).
    """
    op = "router_scores"
    _check_x(x, op)
    _check_device(x, op)
    B, N, D = x.shape
    _is_tensor(weight, op, "weight")
    if weight.device != x.device:
        raise ValueError(f"{op}: weight is on {weight.device} but x is on {x.device}")
    if weight.dtype not in _DATA_DTYPES:
        raise ValueError(f"{op}: weight must be float32, float64, float16 or bfloat16, got "
                         f"{weight.dtype}")
    if tuple(weight.shape) != (D,):
        raise ValueError(f"{op}: weight must be [D] = [{D}], got shape {tuple(weight.shape)}")
    a = _acc_dtype(x.dtype)
    M = B * N
    out = torch.empty(B, N, dtype=a, device=x.device)
    if M == 0:
        return out
    if D == 0:
        return out.fill_(0.5)
    x, weight = x.contiguous(), weight.contiguous()
    BLOCK_D = _block_d(D)
    BLOCK_R = _block_r(BLOCK_D, heavy=x.dtype == torch.float64)
    with _on_device(x):
        _router_kernel[(triton.cdiv(M, BLOCK_R),)](
            x, weight, out, M, D, ACC=_tl_acc(x.dtype), BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
            num_warps=_num_warps(BLOCK_R * BLOCK_D))
    return out
