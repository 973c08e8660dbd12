"""Inputs and naive definitions shared by the kernel tests (test_ops, test_reference,
test_property)."""
import math

import pytest
import torch

from diffcr_kernels import reference as ref

# (B, N, D, ks): ks is [B][P] kept counts: N = 1, B = 1 with k = 1 and k = N, ragged k, two
# bins (ragged and uniform)
CASES = [
    pytest.param(1, 1, 8, [[1]], id="N1"),
    pytest.param(1, 37, 24, [[1]], id="B1-k1"),
    pytest.param(1, 37, 24, [[37]], id="B1-kN"),
    pytest.param(3, 29, 40, [[5], [29], [1]], id="ragged"),
    pytest.param(2, 50, 72, [[13, 31], [50, 7]], id="two-bins-ragged"),
    pytest.param(4, 16, 33, [[8, 12]] * 4, id="two-bins-uniform"),
]


def naive_select(scores, ks):
    """ks: list (per sample) of lists (per segment) of k. Returns list of segments as lists of
    flat indices, ascending."""
    B, N = scores.shape
    segs = []
    for b in range(B):
        vals = [(-(float("-inf") if math.isnan(v) else v), n) for n, v in
                enumerate(scores[b].tolist())]
        order = [n for _, n in sorted(vals)]  # descending score, ties: lower index first
        for k in ks[b]:
            segs.append(sorted(b * N + n for n in order[:k]))
    return segs


def op_inputs(B, N, D, ks, dtype, device, mod=True):
    """Random inputs of one routed block's ops: x [B, N, D], a selection with kept counts
    ``ks`` ([B][P]), per-sample shift/scale/gate [B, D] and the selected rows' updates [T, D]."""
    g = torch.Generator().manual_seed(B * 1000 + N * 10 + D)
    x = torch.randn(B, N, D, generator=g).to(device, dtype)
    scores = torch.rand(B, N, generator=g).to(device)
    P = len(ks[0])
    w = torch.rand(B, P, generator=g).to(device)
    sel = ref.select_topk(scores, torch.tensor(ks), w)
    T = sel.total
    shift = torch.randn(B, D, generator=g).to(device, dtype) if mod else None
    scale = (0.5 * torch.randn(B, D, generator=g)).to(device, dtype) if mod else None
    attn_update = torch.randn(T, D, generator=g).to(device, dtype)
    mlp_out = torch.randn(T, D, generator=g).to(device, dtype)
    gate = torch.randn(B, D, generator=g).to(device, dtype)
    return x, sel, shift, scale, attn_update, mlp_out, gate
