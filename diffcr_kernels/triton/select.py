"""Triton per-segment top-k selection that writes the packed layout directly.

One program per segment: the sample's scores are turned into 64-bit keys (an order-preserving
integer image of the float score in the high word, the inverted token index in the low word, so
ties go to the lower index and NaN / padding rank last), bitonic-sorted descending with
``tl.sort``, the first k kept, re-sorted ascending by token index and stored at the segment's
offset in the packed index array. Same result as :func:`diffcr_kernels.reference.select_topk`.
Single-program sort: meant for N up to 16384 tokens.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TOKENS = 16384


@triton.jit
def _select_kernel(scores_ptr, ks_ptr, cu_ptr, out_ptr, N, P, BLOCK_N: tl.constexpr):
    seg = tl.program_id(0)
    b = (seg // P).to(tl.int64)
    k = tl.load(ks_ptr + seg)
    start = tl.load(cu_ptr + seg).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    s = tl.load(scores_ptr + b * N + n, mask=n < N, other=float("-inf"))
    s = tl.where(s != s, float("-inf"), s)  # NaN ranks last (with -inf and the padding)
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 ties with +0.0 (lower index first), as torch.sort does
    bits = s.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # monotonic int image of the float
    key = (ordered.to(tl.int64) << 32) | (BLOCK_N - 1 - n).to(tl.int64)
    key = tl.sort(key, descending=True)
    j = tl.arange(0, BLOCK_N)
    idx = (BLOCK_N - 1 - (key & 0xFFFFFFFF)).to(tl.int64)
    idx = tl.sort(tl.where(j < k, idx, 2 * BLOCK_N))
    tl.store(out_ptr + start + j, idx + b * N, mask=j < k)


def select_indices(scores: torch.Tensor, ks: torch.Tensor, cu_seqlens: torch.Tensor, P: int,
                   total: int) -> torch.Tensor:
    """Packed flat indices ``[total]`` for segments with kept counts ``ks`` (int32 ``[S]``) and
    offsets ``cu_seqlens`` (int32 ``[S+1]``); ``scores`` ``[B, N]`` (upcast to float32)."""
    B, N = scores.shape
    if N > MAX_TOKENS:
        raise ValueError(f"triton select: N = {N} tokens exceeds {MAX_TOKENS}")
    out = torch.empty(total, dtype=torch.int64, device=scores.device)
    if total == 0:
        return out
    block = triton.next_power_of_2(max(N, 2))
    _select_kernel[(ks.numel(),)](scores.float().contiguous(), ks, cu_seqlens, out, N, P,
                                  BLOCK_N=block, num_warps=4 if block <= 1024 else 8)
    return out
