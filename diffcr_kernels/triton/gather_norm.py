"""Gather + LayerNorm + adaLN modulate on packed rows, forward and per-row backward (Triton twins
of ``torch.ops.diffcr.gather_norm_modulate`` / ``gather_norm_modulate_backward``)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (acc_dtype, check_acc, check_data, check_device, check_idx, check_opt,
                      check_x, contiguous, on_device, pick_block_d, pick_block_r, pick_num_warps,
                      tl_acc)

__all__ = ["gather_norm_modulate", "gather_norm_modulate_backward"]

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
def _grad_xhat(g_rows, x_rows, scale_ptr, weight_ptr, b, d, dm, m, mu, rs, D,
               HAS_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    # one chunk d of the rows: g = dL/dxhat = gy * (1 + scale) * weight, and xhat (0 where
    # masked), in the acc dtype
    g = tl.load(g_rows + d, mask=m, other=0.0).to(ACC)
    if HAS_SCALE:
        g = g * (1.0 + tl.load(scale_ptr + b[:, None] * D + d, mask=m, other=0.0).to(ACC))
    if HAS_WEIGHT:
        g = g * tl.load(weight_ptr + d, mask=dm, other=0.0).to(ACC)
    xh = tl.where(m, (tl.load(x_rows + d, mask=m, other=0.0).to(ACC) - mu) * rs, 0.0)
    return g, xh


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
        g, xh = _grad_xhat(g_rows, x_rows, scale_ptr, weight_ptr, b, d, dm, m, mu, rs, D,
                           HAS_SCALE, HAS_WEIGHT, ACC)
        a1 += g
        a2 += g * xh
    m1 = (tl.sum(a1, axis=1) / D)[:, None]
    m2 = (tl.sum(a2, axis=1) / D)[:, None]
    o_rows = out_ptr + r[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        d = (d0 + offs)[None, :]
        dm = d < D
        m = rm[:, None] & dm
        g, xh = _grad_xhat(g_rows, x_rows, scale_ptr, weight_ptr, b, d, dm, m, mu, rs, D,
                           HAS_SCALE, HAS_WEIGHT, ACC)
        tl.store(o_rows + d, (rs * (g - m1 - xh * m2)).to(out_ptr.dtype.element_ty), mask=m)


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
    check_x(x, op)
    check_device(x, op)
    check_idx(idx, x, op)
    B, N, D = x.shape
    check_opt(shift, op, "shift", x, (B, D))
    check_opt(scale, op, "scale", x, (B, D))
    check_opt(weight, op, "weight", x, (D,))
    check_opt(bias, op, "bias", x, (D,))
    eps = float(eps)
    if not eps >= 0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")
    T = idx.numel()
    a = acc_dtype(x.dtype)
    y = torch.empty(T, D, dtype=x.dtype, device=x.device)
    mean = torch.empty(T, dtype=a, device=x.device)
    rstd = torch.empty(T, dtype=a, device=x.device)
    if T == 0:
        return y, mean, rstd
    x, idx = x.contiguous(), idx.contiguous()
    shift, scale, weight, bias = (contiguous(t) for t in (shift, scale, weight, bias))
    eps_hi = float(torch.tensor(eps, dtype=torch.float32))
    eps_lo = float(torch.tensor(eps - eps_hi, dtype=torch.float32))
    BLOCK_D = pick_block_d(D)
    BLOCK_R = pick_block_r(BLOCK_D, heavy=x.dtype == torch.float64)
    with on_device(x):
        _gnm_fwd_kernel[(triton.cdiv(T, BLOCK_R),)](
            x, idx, x if shift is None else shift, x if scale is None else scale,
            x if weight is None else weight, x if bias is None else bias, y, mean, rstd, T, N, D,
            eps_hi, eps_lo,
            HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            ACC=tl_acc(x.dtype), BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
            num_warps=pick_num_warps(BLOCK_R * BLOCK_D))
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
    check_x(x, op)
    check_device(x, op)
    check_idx(idx, x, op)
    B, N, D = x.shape
    T = idx.numel()
    check_data(grad_y, op, "grad_y", x, (T, D))
    check_acc(mean, op, "mean", x, T)
    check_acc(rstd, op, "rstd", x, T)
    check_opt(scale, op, "scale", x, (B, D))
    check_opt(weight, op, "weight", x, (D,))
    out = torch.empty(T, D, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    grad_y, x, idx, mean, rstd = (t.contiguous() for t in (grad_y, x, idx, mean, rstd))
    scale, weight = contiguous(scale), contiguous(weight)
    BLOCK_D = pick_block_d(D)
    BLOCK_R = pick_block_r(BLOCK_D, heavy=True)
    with on_device(x):
        _gnm_bwd_kernel[(triton.cdiv(T, BLOCK_R),)](
            grad_y, x, idx, mean, rstd, x if scale is None else scale,
            x if weight is None else weight, out, T, N, D,
            HAS_SCALE=scale is not None, HAS_WEIGHT=weight is not None,
            ACC=tl_acc(x.dtype), BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
            num_warps=pick_num_warps(BLOCK_R * BLOCK_D))
    return out
