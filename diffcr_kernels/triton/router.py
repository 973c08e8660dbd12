"""Router scores ``sigmoid(x . w)`` per token (no compiled C++ counterpart; mirrors
:func:`diffcr_kernels.reference.router_scores`)."""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._common import (DATA_DTYPES, acc_dtype, check_device, check_tensor, check_x, on_device,
                      pick_block_d, pick_block_r, pick_num_warps, tl_acc)

__all__ = ["router_scores"]

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
def router_scores(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router scores ``sigmoid(x . weight)`` for every token (Triton twin of
    :func:`diffcr_kernels.reference.router_scores`).

    x ``[B, N, D]`` (any supported float dtype); weight ``[D]`` (any float dtype, on x's
    device; upcast like x). A GEMV done as elementwise products and row sums in the acc dtype
    (no ``tl.dot``). Returns ``[B, N]`` in the acc dtype (float64 for float64 x, float32
    otherwise).
    """
    op = "router_scores"
    check_x(x, op)
    check_device(x, op)
    B, N, D = x.shape
    check_tensor(weight, op, "weight")
    if weight.device != x.device:
        raise ValueError(f"{op}: weight is on {weight.device} but x is on {x.device}")
    if weight.dtype not in DATA_DTYPES:
        raise ValueError(f"{op}: weight must be float32, float64, float16 or bfloat16, got "
                         f"{weight.dtype}")
    if tuple(weight.shape) != (D,):
        raise ValueError(f"{op}: weight must be [D] = [{D}], got shape {tuple(weight.shape)}")
    a = acc_dtype(x.dtype)
    M = B * N
    out = torch.empty(B, N, dtype=a, device=x.device)
    if M == 0:
        return out
    if D == 0:
        return out.fill_(0.5)
    x, weight = x.contiguous(), weight.contiguous()
    BLOCK_D = pick_block_d(D)
    BLOCK_R = pick_block_r(BLOCK_D, heavy=x.dtype == torch.float64)
    with on_device(x):
        _router_kernel[(triton.cdiv(M, BLOCK_R),)](
            x, weight, out, M, D, ACC=tl_acc(x.dtype), BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
            num_warps=pick_num_warps(BLOCK_R * BLOCK_D))
    return out
