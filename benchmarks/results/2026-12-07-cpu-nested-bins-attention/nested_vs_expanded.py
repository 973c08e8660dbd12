"""The two training bins' self-attention, forward + backward, on CPU: the nested path
(diffcr_kernels.shared_bins_attention, from the larger bin's rows) against varlen attention
over the rows expanded to both bins (what the fused path ran before, DIFFCR_ATTENTION's
sdpa_grouped), alternating, median of R rounds each.

    python nested_vs_expanded.py HEADS HEAD_DIM N KA KB BATCH DTYPE ROUNDS
"""
import statistics
import sys
import time

import torch

import diffcr_kernels as dk
import diffcr_kernels.attention

torch.set_num_threads(1)
diffcr_kernels.attention.NESTED_MIN_ROWS = 0  # the nested path at every size (the results
# were measured on 0b01866, before the threshold existed)
H, Dh, N = (int(a) for a in sys.argv[1:4])
ka, kb = float(sys.argv[4]), float(sys.argv[5])
B, dtype, R = int(sys.argv[6]), getattr(torch, sys.argv[7]), int(sys.argv[8])
k = [[dk.kept_count(ka, N), dk.kept_count(kb, N)]] * B
sel = dk.select_topk(torch.rand(B, N), k)
union, src = sel.shared_rows()
U = union.total
q, kk, v = (torch.randn(U, H, Dh, dtype=dtype) for _ in range(3))


def run(nested):
    leaves = [t.clone().requires_grad_() for t in (q, kk, v)]
    if nested:
        o = dk.shared_bins_attention(*leaves, sel)
    else:
        o = dk.selection_attention(*(t.index_select(0, src) for t in leaves), sel,
                                   backend="sdpa_grouped")
    o.float().sum().backward()


ts = {True: [], False: []}
for f in (True, False):
    run(f)
for _ in range(R):
    for f in (True, False):
        t0 = time.perf_counter()
        run(f)
        ts[f].append(time.perf_counter() - t0)
n, e = statistics.median(ts[True]) * 1e3, statistics.median(ts[False]) * 1e3
print(f"H={H} Dh={Dh} N={N} bins {k[0]} B={B} {sys.argv[7]}: nested {n:.1f} ms, expanded "
      f"{e:.1f} ms, ratio {n / e:.3f}")
