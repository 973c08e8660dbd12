"""Gated, bin-weighted scatter-back into the residual stream: forward, in-place forward and
per-row backward (Triton twins of ``torch.ops.diffcr.scatter_back`` / ``scatter_back_`` /
``scatter_back_backward``). Deterministic without atomics: one launch per slot."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (check_acc, check_data, check_device, check_idx, check_int, check_opt,
                      check_segments, check_x, contiguous, on_device, pick_block_d, pick_block_r,
                      pick_num_warps, tl_acc)

__all__ = ["scatter_back", "scatter_back_", "scatter_back_backward"]

@triton.jit
def _segment_tile(cu_ptr, idx_ptr, w_ptr, scores_ptr, seg, N, HAS_SCORES: tl.constexpr,
                  ACC: tl.constexpr, BLOCK_R: tl.constexpr):
    # this program's tile of segment seg: packed rows r (mask rm: inside the segment), their
    # flat rows idx[r] and samples, the segment's weight, and the scores as a column (1 when
    # there are none)
    start = tl.load(cu_ptr + seg).to(tl.int64)
    end = tl.load(cu_ptr + seg + 1).to(tl.int64)
    r = start + tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < end
    row = tl.load(idx_ptr + r, mask=rm, other=0)
    w = tl.load(w_ptr + seg)
    if HAS_SCORES:
        s = tl.load(scores_ptr + r, mask=rm, other=0.0).to(ACC)[:, None]
    else:
        s = tl.full([BLOCK_R, 1], 1.0, ACC)
    return r, rm, row, row // N, w, s


@triton.jit
def _scatter_fwd_kernel(out_ptr, idx_ptr, cu_ptr, w_ptr, attn_update_ptr, mlp_out_ptr, scores_ptr,
                        gate_ptr, P, p, N, D, HAS_MLP_OUT: tl.constexpr, HAS_SCORES: tl.constexpr,
                        HAS_GATE: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    # grid (row blocks of max_seqlen, samples): segment j * P + p, rows of this block
    seg = tl.program_id(1).to(tl.int64) * P + p
    r, rm, dst, b, w, s = _segment_tile(cu_ptr, idx_ptr, w_ptr, scores_ptr, seg, N, HAS_SCORES,
                                        ACC, BLOCK_R)
    o_rows = out_ptr + dst[:, None] * D
    offs = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = (d0 + offs)[None, :]
        m = rm[:, None] & (d < D)
        c = tl.load(attn_update_ptr + r[:, None] * D + d, mask=m, other=0.0).to(ACC)
        if HAS_MLP_OUT:
            mm = tl.load(mlp_out_ptr + r[:, None] * D + d, mask=m, other=0.0).to(ACC)
            if HAS_GATE:
                mm = mm * tl.load(gate_ptr + b[:, None] * D + d, mask=m, other=0.0).to(ACC)
            if HAS_SCORES:
                c = c + s * mm
            else:
                c = c + mm
        o = tl.load(o_rows + d, mask=m, other=0.0).to(ACC)
        tl.store(o_rows + d, (o + w * c).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _scatter_bwd_kernel(gout_ptr, idx_ptr, cu_ptr, w_ptr, attn_update_ptr, mlp_out_ptr, scores_ptr,
                        gate_ptr, g_attn_update_ptr, g_mlp_out_ptr, gs_ptr, dot_ptr, N, D,
                        HAS_MLP_OUT: tl.constexpr, HAS_SCORES: tl.constexpr, HAS_GATE: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    seg = tl.program_id(1).to(tl.int64)
    r, rm, src, b, w, s = _segment_tile(cu_ptr, idx_ptr, w_ptr, scores_ptr, seg, N, HAS_SCORES,
                                        ACC, BLOCK_R)
    g_rows = gout_ptr + src[:, None] * D
    offs = tl.arange(0, BLOCK_D)
    acc_s = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    acc_w = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = (d0 + offs)[None, :]
        m = rm[:, None] & (d < D)
        rd = r[:, None] * D + d
        g = tl.load(g_rows + d, mask=m, other=0.0).to(ACC)
        tl.store(g_attn_update_ptr + rd, (w * g).to(g_attn_update_ptr.dtype.element_ty), mask=m)
        c = tl.load(attn_update_ptr + rd, mask=m, other=0.0).to(ACC)
        if HAS_MLP_OUT:
            mm = tl.load(mlp_out_ptr + rd, mask=m, other=0.0).to(ACC)
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
            tl.store(g_mlp_out_ptr + rd, g2.to(g_mlp_out_ptr.dtype.element_ty), mask=m)
            acc_s += mm * g
            if HAS_SCORES:
                c = c + s * mm
            else:
                c = c + mm
        acc_w += c * g
    if HAS_SCORES:
        # zero when mlp_out is absent (acc_s never accumulates), like the CUDA kernel
        tl.store(gs_ptr + r, w * tl.sum(acc_s, axis=1), mask=rm)
    tl.store(dot_ptr + r, tl.sum(acc_w, axis=1), mask=rm)


def scatter_back_(
    x: torch.Tensor,
    idx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    segs_per_sample: int,
    seg_weight: torch.Tensor,
    attn_update: torch.Tensor,
    mlp_out: Optional[torch.Tensor],
    scores: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
) -> None:
    """In-place :func:`scatter_back`: ``x`` itself receives the update (no copy of the
    ``[B, N, D]`` residual stream). x must be contiguous and share no memory with attn_update,
    mlp_out, gate or idx. Same arguments and result otherwise."""
    _scatter_launch("scatter_back_", x, x, idx, cu_seqlens, max_seqlen, segs_per_sample,
                    seg_weight, attn_update, mlp_out, scores, gate)


def scatter_back(
    x: torch.Tensor,
    idx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    segs_per_sample: int,
    seg_weight: torch.Tensor,
    attn_update: torch.Tensor,
    mlp_out: Optional[torch.Tensor],
    scores: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
) -> torch.Tensor:
    """Gated, bin-weighted scatter-back (Triton twin of ``torch.ops.diffcr.scatter_back``).

    ``out = x.clone()``; then for each segment s and packed row r of s:
    ``out[idx[r]] += seg_weight[s] * (attn_update[r] + scores[r] * gate[b] * mlp_out[r])``,
    ``b = idx[r] // N``. A missing scores/gate counts as 1; a missing mlp_out drops the second term.
    Rows never selected are copied bit-exactly.

    Deterministic without atomics: segments are sample-major with ``P = segs_per_sample``
    segments per sample; each slot p (segments ``s = j * P + p``) is one launch over grid
    ``(row blocks of max_seqlen, S // P)``, so no row is written twice within a launch (this
    relies on the indices of one segment being distinct, as
    :func:`~diffcr_kernels.reference.select_topk` produces). Each update is accumulated in the
    acc dtype and stored in x's dtype (with P > 1, a row in several segments is rounded once
    per slot, like the CUDA kernel).

    x ``[B, N, D]``; idx int64 ``[T]``; cu_seqlens int32 ``[S + 1]``; seg_weight ``[S]`` (acc
    dtype); attn_update, mlp_out ``[T, D]`` (x's dtype); scores ``[T]`` (acc dtype); gate
    ``[B, D]``.
    ``max_seqlen`` must be >= the longest segment. Returns ``[B, N, D]`` in x's dtype.
    """
    return _scatter_launch("scatter_back", x, None, idx, cu_seqlens, max_seqlen,
                           segs_per_sample, seg_weight, attn_update, mlp_out, scores, gate)


def _scatter_launch(op, x, out, idx, cu_seqlens, max_seqlen, segs_per_sample, seg_weight,
                    attn_update, mlp_out, scores, gate):
    """Validates, then adds the packed rows into ``out`` (a contiguous copy of x when None)."""
    check_x(x, op)
    check_device(x, op)
    check_idx(idx, x, op)
    B, N, D = x.shape
    T = idx.numel()
    max_seqlen = check_int(max_seqlen, op, "max_seqlen", 0)
    P = check_int(segs_per_sample, op, "segs_per_sample", 1)
    S = check_segments(op, x, idx, cu_seqlens, max_seqlen, P)
    if B and S and S % B == 0 and S // B != P:
        raise ValueError(f"{op}: segs_per_sample = {P} does not match the layout: {S} segments "
                         f"over B = {B} samples is {S // B} per sample (sample-major)")
    check_acc(seg_weight, op, "seg_weight", x, S)
    check_data(attn_update, op, "attn_update", x, (T, D))
    check_opt(mlp_out, op, "mlp_out", x, (T, D))
    if scores is not None:
        check_acc(scores, op, "scores", x, T)
    check_opt(gate, op, "gate", x, (B, D))
    if out is None:
        out = x.clone(memory_format=torch.contiguous_format)
    else:
        if not out.is_contiguous():
            raise ValueError(f"{op}: x must be contiguous to be updated in place (use "
                             "scatter_back, which returns a new tensor)")
        for name, t in (("attn_update", attn_update), ("mlp_out", mlp_out), ("gate", gate), ("idx",
                                                                                             idx)):
            if t is not None and t.untyped_storage().data_ptr() == \
                    out.untyped_storage().data_ptr():
                raise ValueError(f"{op}: {name} shares memory with x, which is updated in "
                                 "place")
    if T == 0 or S == 0 or max_seqlen == 0 or D == 0:
        return out
    idx, cu_seqlens, seg_weight, attn_update = (t.contiguous()
                                                for t in (idx, cu_seqlens, seg_weight, attn_update))
    mlp_out, scores, gate = contiguous(mlp_out), contiguous(scores), contiguous(gate)
    BLOCK_D = pick_block_d(D)
    BLOCK_R = pick_block_r(BLOCK_D, heavy=x.dtype == torch.float64)
    grid = (triton.cdiv(max_seqlen, BLOCK_R), S // P)
    with on_device(x):
        for p in range(P):  # one launch per slot: no row is written twice within a launch
            _scatter_fwd_kernel[grid](out, idx, cu_seqlens, seg_weight, attn_update,
                                      attn_update if mlp_out is None else mlp_out,
                                      seg_weight if scores is None else scores,
                                      attn_update if gate is None else gate, P, p, N, D,
                                      HAS_MLP_OUT=mlp_out is not None,
                                      HAS_SCORES=scores is not None, HAS_GATE=gate is not None,
                                      ACC=tl_acc(x.dtype), BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
                                      num_warps=pick_num_warps(BLOCK_R * BLOCK_D))
    return out


def scatter_back_backward(
    grad_out: torch.Tensor,
    idx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    seg_weight: torch.Tensor,
    attn_update: torch.Tensor,
    mlp_out: Optional[torch.Tensor],
    scores: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row backward of :func:`scatter_back` (Triton twin of
    ``torch.ops.diffcr.scatter_back_backward``).

    For packed row r of segment s, with ``G = grad_out[idx[r]]``, ``w = seg_weight[s]``,
    ``s_r = scores[r]`` (1 if None) and ``gate[b]`` (1 if None):

    * ``grad_attn_update[r] = w * G``
    * ``grad_mlp_out[r] = w * s_r * gate[b] * G`` (``[0, D]`` when mlp_out is None)
    * ``grad_scores[r] = w * sum(gate[b] * mlp_out[r] * G)`` (0 when mlp_out is None; ``[0]``
      when scores is None)
    * ``row_dot[r] = sum((attn_update[r] + s_r * gate[b] * mlp_out[r]) * G)`` (segment sums
      give d out / d seg_weight)

    grad_out ``[B, N, D]``; the other arguments as in :func:`scatter_back` (attn_update,
    mlp_out, gate in grad_out's dtype; seg_weight, scores in the acc dtype). Returns
    ``(grad_attn_update [T, D], grad_mlp_out [T or 0, D], grad_scores [T or 0], row_dot [T])``;
    the first two in grad_out's dtype, the last two in the acc dtype.
    """
    op = "scatter_back_backward"
    xn = "grad_out"
    check_x(grad_out, op, xn)
    check_device(grad_out, op, xn)
    check_idx(idx, grad_out, op, xn)
    B, N, D = grad_out.shape
    T = idx.numel()
    max_seqlen = check_int(max_seqlen, op, "max_seqlen", 0)
    S = check_segments(op, grad_out, idx, cu_seqlens, max_seqlen, 1, xn)
    check_acc(seg_weight, op, "seg_weight", grad_out, S, xn)
    check_data(attn_update, op, "attn_update", grad_out, (T, D), xn)
    check_opt(mlp_out, op, "mlp_out", grad_out, (T, D), xn)
    if scores is not None:
        check_acc(scores, op, "scores", grad_out, T, xn)
    check_opt(gate, op, "gate", grad_out, (B, D), xn)
    a = seg_weight.dtype
    dev = grad_out.device
    grad_attn_update = torch.empty(T, D, dtype=attn_update.dtype, device=dev)
    grad_mlp_out = torch.empty(T if mlp_out is not None else 0, D, dtype=attn_update.dtype,
                               device=dev)
    grad_s = torch.empty(T if scores is not None else 0, dtype=a, device=dev)
    row_dot = torch.empty(T, dtype=a, device=dev)
    if T == 0 or S == 0 or max_seqlen == 0:
        return grad_attn_update, grad_mlp_out, grad_s, row_dot
    grad_out, idx, cu_seqlens, seg_weight, attn_update = (
        t.contiguous() for t in (grad_out, idx, cu_seqlens, seg_weight, attn_update))
    mlp_out, scores, gate = contiguous(mlp_out), contiguous(scores), contiguous(gate)
    BLOCK_D = pick_block_d(D)
    BLOCK_R = pick_block_r(BLOCK_D, heavy=True)
    with on_device(grad_out):
        _scatter_bwd_kernel[(triton.cdiv(max_seqlen, BLOCK_R), S)](
            grad_out, idx, cu_seqlens, seg_weight, attn_update,
            attn_update if mlp_out is None else mlp_out, seg_weight if scores is None else scores,
            attn_update if gate is None else gate, grad_attn_update,
            grad_attn_update if mlp_out is None else grad_mlp_out,
            row_dot if scores is None else grad_s, row_dot, N, D, HAS_MLP_OUT=mlp_out is not None,
            HAS_SCORES=scores is not None, HAS_GATE=gate is not None, ACC=tl_acc(grad_out.dtype),
            BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=pick_num_warps(BLOCK_R * BLOCK_D))
    return grad_attn_update, grad_mlp_out, grad_s, row_dot
