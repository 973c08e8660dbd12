"""The demo's sampling loop timed on its own: dense against routed models at fixed kept ratios
and against diffusers' caches, in interleaved rounds.

    python benchmarks/demo_sampling_speed.py [--kept 0.5,0.3] [--rounds 3] [--threads 2]
                                             [--token-cache 8]

Same model (the shipped dense demo DiT), sampler (DDIM, 20 steps, CFG 2), batch (84 samples:
168 rows of 64 tokens) and threads as ``diffcr train``'s comparison. The routed rows are the
dense model converted with one region at a fixed kept ratio and frozen (uniform MoD: speed
does not depend on the weights, so nothing is fine-tuned), optionally with the token cache
(refresh every ``--token-cache`` steps). Every round samples every row once, in a rotating
order; the report gives each row's median and best loop time and the speedup of each against
dense, next to the ideal of the routed blocks' work (method section 6, blocks only). Quality is
not measured here (``diffcr train`` does that)."""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kept", default="0.5,0.3", help="kept ratios of the routed rows")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--token-cache", type=int, default=0,
                    help="also each kept ratio with the token cache, refresh every R steps")
    ap.add_argument("--caches", action="store_true", help="also FirstBlockCache 0.2 and "
                    "TaylorSeer /3 on the dense model, as the demo applies them")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    import diffcr
    from diffcr.app.bench import ideal_speedup
    from diffcr.app.demo.data import NUM_CLASSES
    from diffcr.app.demo.peers import CacheSetting, cache_available
    from diffcr.app.demo.run import DEMO_PER_CLASS, _demo_sampler, load_shipped_dense

    dense = load_shipped_dense()
    if dense is None:
        raise SystemExit("this install ships no dense demo DiT")
    dense = dense.eval().requires_grad_(False)
    sampler = _demo_sampler(False)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(DEMO_PER_CLASS)
    D = dense.config.num_attention_heads * dense.config.attention_head_dim
    N = (dense.config.sample_size // dense.config.patch_size) ** 2

    def routed(kept, refresh=0):
        m = copy.deepcopy(dense)
        diffcr.convert(m, diffcr.DiffCRConfig(num_regions=1))
        with torch.no_grad():
            for b in diffcr.routed_blocks(m).values():
                b.ratio.kept.fill_(kept)
        diffcr.freeze(m)
        if refresh:
            diffcr.enable_token_cache(m, diffcr.TokenCacheConfig(refresh_every=refresh,
                                                                 plain_refresh=True))
        return m.eval()

    rows = {"dense": (dense, 1.0)}
    for kept in (float(k) for k in a.kept.split(",")):
        rows[f"kept {kept:g}"] = (routed(kept), ideal_speedup(kept, N, D, 0))
        if a.token_cache:
            steps = 20
            full = len(range(0, steps, a.token_cache))
            work = (full + (steps - full) / ideal_speedup(kept, N, D, 0)) / steps
            rows[f"kept {kept:g} + token cache /{a.token_cache}"] = (
                routed(kept, a.token_cache), 1 / work)
    if a.caches:
        for kind, value in (("fbc", 0.2), ("taylorseer", 3)):
            if cache_available(kind):
                s = CacheSetting(kind, value)
                rows[s.label] = (s.apply(copy.deepcopy(dense)), None)
    names = list(rows)
    times = {n: [] for n in names}
    with torch.no_grad():
        for n in names:  # warm-up
            sampler(rows[n][0], labels[:8], seed=0)
        for r in range(a.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                t0 = time.perf_counter()
                sampler(rows[n][0], labels, seed=99 + r)
                times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    best = {n: min(v) for n, v in times.items()}
    print(f"demo sampling loop ({len(labels)} samples, 20 steps, CFG), {a.threads} thread(s), "
          f"{a.rounds} interleaved rounds")
    print(f"{'row':34s} {'median s':>9s} {'best s':>7s} {'speedup (median)':>17s} "
          f"{'speedup (best)':>15s} {'ideal (blocks)':>15s}")
    for n in names:
        ideal = rows[n][1]
        print(f"{n:34s} {med[n]:9.2f} {best[n]:7.2f} {med['dense'] / med[n]:16.2f}x "
              f"{best['dense'] / best[n]:14.2f}x {'' if ideal is None else f'{ideal:14.2f}x'}")


if __name__ == "__main__":
    main()
