"""The token-cache pass of a routed block, in place (Triton twin of
``torch.ops.diffcr.apply_token_cache_``): rows that missed the block receive their cached
update, selected rows write their new update into the cache. Each program owns its rows (no
races)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (DATA_DTYPES, check_acc, check_data, check_device, check_tensor, check_x,
                      contiguous, on_device, pick_block_d, pick_block_r, pick_num_warps, tl_acc)

__all__ = ["apply_token_cache_"]


@triton.jit
def _token_cache_kernel(out_ptr, cache_ptr, slot_ptr, x_rows_ptr, miss_ptr, R, D,
                        HAS_MISS: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < R
    t = tl.load(slot_ptr + r, mask=rm, other=-1).to(tl.int64)
    if HAS_MISS:
        m = tl.load(miss_ptr + r, mask=rm, other=0.0).to(ACC)
    else:
        m = tl.where(t < 0, 1.0, 0.0).to(ACC)
    hit = rm & (m != 0)
    sel = rm & (t >= 0)
    offs = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = (d0 + offs)[None, :]
        dm = d < D
        o_ptrs = out_ptr + r[:, None] * D + d
        c_ptrs = cache_ptr + r[:, None] * D + d
        o = tl.load(o_ptrs, mask=rm[:, None] & dm, other=0.0)
        c = tl.load(c_ptrs, mask=hit[:, None] & dm, other=0.0).to(ACC)
        new = (o.to(ACC) + m[:, None] * c).to(out_ptr.dtype.element_ty)
        o = tl.where(hit[:, None], new, o)
        tl.store(o_ptrs, o, mask=hit[:, None] & dm)
        xr = tl.load(x_rows_ptr + tl.maximum(t, 0)[:, None] * D + d, mask=sel[:, None] & dm,
                     other=0.0).to(ACC)
        tl.store(c_ptrs, (o.to(ACC) - xr).to(cache_ptr.dtype.element_ty), mask=sel[:, None] & dm)


def apply_token_cache_(
    out: torch.Tensor,
    cache: torch.Tensor,
    slot: torch.Tensor,
    x_rows: torch.Tensor,
    miss: Optional[torch.Tensor],
) -> None:
    """The token-cache pass, in place on ``out`` ``[B, N, D]`` and ``cache`` ``[B * N, D]``
    (its own float dtype): for every row r, with ``m = miss[r]`` (acc dtype ``[B * N]``; None:
    1 where ``slot[r] < 0``, else 0), ``out[r] = round(out[r] + m * cache[r])`` where ``m != 0``,
    and ``cache[r] = round_cache(out[r] - x_rows[slot[r]])`` where ``slot[r] >= 0``. slot int32
    ``[B * N]`` in ``[-1, T)``; x_rows ``[T, D]`` in out's dtype. See
    :func:`diffcr_kernels.reference.apply_token_cache_`."""
    op = "apply_token_cache_"
    check_x(out, op, "out")
    check_device(out, op, "out")
    B, N, D = out.shape
    R = B * N
    if not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous (it is updated in place)")
    check_tensor(cache, op, "cache")
    if cache.dtype not in DATA_DTYPES:
        raise ValueError(f"{op}: cache must be float32, float64, float16 or bfloat16, got "
                         f"{cache.dtype}")
    if cache.device != out.device or tuple(cache.shape) != (R, D) or not cache.is_contiguous():
        raise ValueError(f"{op}: cache must be a contiguous [{R}, {D}] tensor on {out.device}, "
                         f"got {tuple(cache.shape)} on {cache.device}")
    check_tensor(slot, op, "slot")
    if slot.dtype != torch.int32 or tuple(slot.shape) != (R,) or slot.device != out.device:
        raise ValueError(f"{op}: slot must be int32 [{R}] on {out.device}, got {slot.dtype} "
                         f"{tuple(slot.shape)} on {slot.device}")
    check_tensor(x_rows, op, "x_rows")
    if x_rows.dim() != 2:
        raise ValueError(f"{op}: x_rows must be [T, D], got shape {tuple(x_rows.shape)}")
    T = x_rows.shape[0]
    check_data(x_rows, op, "x_rows", out, (T, D), "out")
    if miss is not None:
        check_acc(miss, op, "miss", out, R, "out")
    if out.numel() and cache.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
        raise ValueError(f"{op}: cache shares memory with out; both are updated in place")
    if slot.device.type == "cpu" and R:
        bad = ((slot < -1) | (slot >= T)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ValueError(f"{op}: slot[{i}] = {int(slot[i])} is out of range: -1 (skipped) or "
                             f"a row of x_rows, which has {T}")
    if R == 0 or D == 0:
        return
    slot, x_rows, miss = slot.contiguous(), x_rows.contiguous(), contiguous(miss)
    # chunks of at most 2048 lanes: at 4096 (D = 12288) ptxas spills the fp16 variant on sm_80
    BLOCK_D = min(pick_block_d(D), 2048)
    # heavy tiles: out, the cache, its input row and the new value are live per element
    BLOCK_R = pick_block_r(BLOCK_D, heavy=True)
    grid = (triton.cdiv(R, BLOCK_R),)
    with on_device(out):
        _token_cache_kernel[grid](out, cache, slot, x_rows, miss if miss is not None else slot,
                                  R, D, HAS_MISS=miss is not None, ACC=tl_acc(out.dtype),
                                  BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
                                  num_warps=pick_num_warps(BLOCK_R * BLOCK_D))
