"""Time per FLOP of torch's CPU attention (``F.scaled_dot_product_attention``, forward and
backward) against the sequence length, in bf16 and fp32: what the routed blocks' two training
bins pay on a CPU, whose joint sequences are shorter than the dense block's and of any length.

    python benchmarks/cpu_attention_shapes.py [--heads 16 --head-dim 72] [--lengths 512,615,...]

The ideal cost model (docs/method.md §6) counts attention FLOPs; this shows when the CPU kernel
does not spend the same time per FLOP at every length (the results of stop 42 found its bf16
path 20-40 % slower per FLOP below 768 query rows than at 768-1127, and fp32 flat). One
thread, as ``diffcr bench``; the median of ``--rounds`` calls after one warm-up call.
"""
from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=72)
    p.add_argument("--lengths", default="512,615,767,768,1024,1127",
                   help="comma-separated sequence lengths (queries = keys)")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
    H, d = args.heads, args.head_dim

    def timed(fn) -> float:
        fn()
        ts = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    print(f"heads {H}, head dim {d}, batch 1, {torch.__version__}, 1 thread; ms and ms per "
          "million query-key pairs")
    print(f"{'dtype':>5} {'length':>7} {'fwd ms':>8} {'fwd /M':>7} {'fwd+bwd ms':>11} "
          f"{'fwd+bwd /M':>11}")
    for name in args.dtypes.split(","):
        dt = dtypes[name]
        for S in (int(s) for s in args.lengths.split(",")):
            q, k, v = (torch.randn(1, S, H, d, dtype=dt).transpose(1, 2).requires_grad_()
                       for _ in range(3))
            g = torch.randn(1, H, S, d, dtype=dt)

            def both():
                F.scaled_dot_product_attention(q, k, v).backward(g)

            fw = timed(lambda: F.scaled_dot_product_attention(q, k, v))
            fb = timed(both)
            pairs = S * S / 1e6
            print(f"{name:>5} {S:>7} {fw:>8.1f} {fw / pairs:>7.1f} {fb:>11.1f} "
                  f"{fb / pairs:>11.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
