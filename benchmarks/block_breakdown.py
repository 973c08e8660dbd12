"""Where a routed block's time goes: each piece of one frozen routed call timed on its own.

    python benchmarks/block_breakdown.py [--model dit-demo] [--tokens 64] [--batch 1]
                                         [--kappa 0.5] [--threads 1]

The pieces are the routed forward's own steps, called one at a time on the same inputs:
host planning (bind, plan, hook scan, path choice), the router, the selection, then the
fused forward and its parts for the DiT/PixArt block family (modulation, gather + norm +
modulate, attention: projections and varlen attention, against plain SDPA on the same rows,
feed-forward, scatter-back). Each number is the best of 5 timing loops (microseconds per call),
next to the dense block and the whole routed call. CPU only; timings are of this machine."""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def best_us(fn, n: int = 1000) -> float:
    for _ in range(50):
        fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n // 5):
            fn()
        best = min(best, (time.perf_counter() - t0) / (n // 5) * 1e6)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="dit-demo", choices=["dit-demo", "dit", "pixart"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--kappa", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    import diffcr_kernels as dk
    from diffcr.app.bench import make_block_bench
    from diffcr.models import _basic_block as BB
    from diffcr.routing import _inner_hooks

    bb = make_block_bench(a.model, N=a.tokens, B=a.batch)
    bb.set_kappa(a.kappa)
    blk = bb.block
    r = blk._diffcr
    fam = r.state.family
    B, N = a.batch, a.tokens
    with torch.no_grad():
        x = bb.inputs["hidden_states"]
        call = fam.bind(blk, (), dict(bb.inputs))
        ks, _, _ = r.plan(blk, B, N)
        s = blk.router(x)
        sel = dk.select_topk(s, ks)
        g = r.gate(blk, sel.scores)
        ts, cl = call.get("timestep"), call.get("class_labels")
        mods = BB._modulation(blk, x, ts, cl)
        norm1 = blk.norm1 if blk.norm_type == "ada_norm_single" else blk.norm1.norm
        h = dk.gather_norm_modulate(x, sel, mods[0], mods[1], norm1.weight, norm1.bias,
                                    norm1.eps)
        att = blk.attn1
        q = att.to_q(h)
        T, H = q.shape[0], att.heads
        Dh = q.shape[1] // H
        qh = q.view(T, H, Dh)
        qs = q.view(sel.num_segments, sel.max_seqlen, H, Dh).transpose(1, 2) \
            if sel.uniform else None
        a_out = BB._self_attention(att, h, sel)
        pieces = {
            "dense block": bb.run_dense,
            "routed block (whole call)": bb.run_routed,
            "  host: bind + plan": lambda: (fam.bind(blk, (), dict(bb.inputs)),
                                            r.plan(blk, B, N)),
            "  host: hook scan + path choice": lambda: (_inner_hooks(blk),
                                                        r.use_fused(blk, call, [])),
            "  router scores": lambda: blk.router(x),
            "  selection (select_topk)": lambda: dk.select_topk(s, ks),
            "  fused forward": lambda: fam.fused_forward(blk, call, sel, g),
            "    adaLN modulation (dense computes it too)":
                lambda: BB._modulation(blk, x, ts, cl),
            "    gather + norm + modulate": lambda: dk.gather_norm_modulate(
                x, sel, mods[0], mods[1], norm1.weight, norm1.bias, norm1.eps),
            "    gather residual rows": lambda: dk.gather_rows(x, sel.indices),
            "    self-attention (4 linears + varlen)": lambda: BB._self_attention(att, h, sel),
            "      q, k, v projections": lambda: (att.to_q(h), att.to_k(h), att.to_v(h)),
            "      varlen attention": lambda: dk.selection_attention(qh, qh, qh, sel),
            "      plain SDPA, same rows": (lambda: F.scaled_dot_product_attention(qs, qs, qs))
            if qs is not None else (lambda: None),
            "    feed-forward": lambda: BB._feed_forward(blk.ff, h, True),
            "    scatter-back": lambda: dk.scatter_back_selection(x, sel, a_out, a_out, mods[5],
                                                                 scores=g),
        }
        print(f"{a.model} block, N={N}, B={B}, kept {a.kappa} (k={sel.max_seqlen}), "
              f"{a.threads} thread(s): best of 5 loops, microseconds per call")
        for name, fn in pieces.items():
            print(f"{name:48s} {best_us(fn):9.1f}")


if __name__ == "__main__":
    main()
