"""The token-cache pass at op level: the one-pass op (``diffcr_kernels.apply_token_cache_``)
against the torch composite the runtime ran before it, interleaved, median of 30 runs; one CPU
thread, or a GPU with ``--device cuda`` (bf16 there).

    python benchmarks/token_cache_op.py [--device cuda]
"""
import argparse
import statistics
import time

import torch

import diffcr_kernels as dk
from diffcr.token_cache import coverage


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(B, N, D, kappa, dtype, cache_dtype, device, reps=30):
    k = dk.kept_count(kappa, N)
    R = B * N
    x = torch.randn(B, N, D, dtype=dtype, device=device)
    sel = dk.select_topk(torch.rand(B, N, device=device), torch.tensor([k] * B))
    out0 = x.clone()
    out0.view(R, D).index_add_(0, sel.indices,
                               torch.randn(sel.total, D, dtype=dtype, device=device))
    cache0 = torch.randn(R, D, dtype=cache_dtype, device=device)
    x_rows = x.reshape(R, D).index_select(0, sel.indices)

    def composite(out, c):
        miss = (1 - coverage(sel, R)).to(out.dtype).unsqueeze(-1)
        out.view(R, D).add_(c.to(out.dtype) * miss)
        c.index_copy_(0, sel.indices,
                      (out.view(R, D).index_select(0, sel.indices) - x_rows).to(c.dtype))

    def fused(out, c):
        dk.apply_token_cache_(out, c, dk.token_cache_slots(sel, R), x_rows)

    ts = {"composite": [], "fused": []}
    for _ in range(reps):
        for name, f in (("composite", composite), ("fused", fused)):
            o, c = out0.clone(), cache0.clone()
            _sync(device)
            t0 = time.perf_counter()
            f(o, c)
            _sync(device)
            ts[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) * 1e3 for n, v in ts.items()}
    moved = 3 * R * D * x.element_size()
    print(f"B={B} N={N} D={D} kept={kappa} {str(dtype)[6:]} (cache {str(cache_dtype)[6:]}): "
          f"composite {med['composite']:.2f} ms, one-pass op {med['fused']:.2f} ms "
          f"({med['composite'] / med['fused']:.2f}x), {moved / med['fused'] / 1e6:.1f} GB/s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    f32, bf16 = torch.float32, torch.bfloat16
    main_dt = bf16 if device.type == "cuda" else f32
    with torch.no_grad():
        for B, N, D in ((1, 1024, 1152), (4, 1024, 1152), (2, 256, 128), (1, 4096, 1152)):
            run(B, N, D, 0.5, main_dt, main_dt, device)
        run(4, 1024, 1152, 0.5, bf16, bf16, device)
        run(4, 1024, 1152, 0.5, f32, bf16, device)


if __name__ == "__main__":
    main()
