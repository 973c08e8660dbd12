"""Per-rank block time under diffusers' context parallelism: dense against routed, one run.

    torchrun --nproc_per_node 2 benchmarks/cp_block_time.py [--tokens 1024] [--kept 0.5]
                                                            [--rounds 5] [--device cpu|cuda]

A one-block Flux.1-style model (a double-stream block, D = 512: 8 heads x 64, 64 text
tokens, random weights) split over the ranks with ``enable_parallelism(ContextParallelConfig(
ulysses_degree=WORLD))``: the unconverted model, and the same weights converted and frozen at
kept ratio ``--kept`` (per-shard top-k; under context parallelism the routed block runs the
compat path, whose attention is diffusers' all-to-all). Each rank times its own block call
(forward hooks around the block, the all-to-all included), median over ``--rounds`` calls
after a warm-up, dense and routed interleaved; rank 0 prints every rank's times, the ratio
and the ideal of the block's work at that kept ratio (method section 6).

On CPU (gloo) the ranks are processes on one machine, and diffusers needs a non-zero
``torch.accelerator.device_count()``: the script stands in 1 for it, as the CP tests do. With
``--device cuda`` (one GPU per rank, nccl) nothing is stood in."""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024, help="image tokens (a square)")
    ap.add_argument("--kept", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    a = ap.parse_args(argv)
    cuda = a.device == "cuda"
    if not cuda:
        torch.accelerator.device_count = lambda: 1  # diffusers divides the rank by it
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else \
        torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    torch.set_num_threads(a.threads)

    import diffcr
    from diffusers import ContextParallelConfig, FluxTransformer2DModel

    side = int(round(a.tokens ** 0.5))
    if side * side != a.tokens or a.tokens % world:
        raise SystemExit(f"--tokens must be a square that splits over {world} ranks")
    text, heads, hd = 64, 8, 64

    def model(kept):
        torch.manual_seed(0)
        m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1,
                                   num_single_layers=0, attention_head_dim=hd,
                                   num_attention_heads=heads, joint_attention_dim=256,
                                   pooled_projection_dim=64, axes_dims_rope=(16, 24, 24))
        m = m.to(dev).eval()
        if kept is not None:
            diffcr.convert(m, diffcr.DiffCRConfig(num_regions=1))
            with torch.no_grad():
                for b in diffcr.routed_blocks(m).values():
                    b.ratio.kept.fill_(kept)
            diffcr.freeze(m)
        m.set_attention_backend("native")
        m.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        return m

    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    kw = dict(hidden_states=torch.randn(1, a.tokens, 16, generator=g).to(dev),
              encoder_hidden_states=torch.randn(1, text, 256, generator=g).to(dev),
              pooled_projections=torch.randn(1, 64, generator=g).to(dev),
              timestep=torch.tensor([0.5], device=dev),
              img_ids=ids.reshape(-1, 3).to(dev), txt_ids=torch.zeros(text, 3, device=dev))
    models = {"dense": model(None), "routed": model(a.kept)}
    times = {k: [] for k in models}

    def timed(name, m):
        blk = m.transformer_blocks[0]
        t = {}

        def pre(*_):
            if cuda:
                torch.cuda.synchronize()
            t["0"] = time.perf_counter()

        def post(*_):
            if cuda:
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t["0"]) * 1e3)

        return blk.register_forward_pre_hook(pre), blk.register_forward_hook(post)

    with torch.no_grad():
        for m in models.values():  # warm-up
            m(**kw, return_dict=False)
        hooks = [h for n, m in models.items() for h in timed(n, m)]
        for r in range(a.rounds):
            for n in (list(models) if r % 2 == 0 else list(models)[::-1]):
                models[n](**kw, return_dict=False)
        for h in hooks:
            h.remove()
    mine = {n: statistics.median(v) for n, v in times.items()}
    every = [None] * world
    dist.all_gather_object(every, mine)
    if rank == 0:
        D = heads * hd
        n_local = a.tokens // world

        def cost(n):
            # one rank's share of a double-stream block (method section 6, as diffcr bench's
            # joint cost): 24 D^2 per token of its image rows and its 1/WORLD of the text, and
            # attention over every rank's kept rows and the text for its 1/WORLD of the heads
            return 24 * D * D * (n + text / world) + 4 * (world * n + text) ** 2 * D / world

        ideal = cost(n_local) / cost(a.kept * n_local)
        print(f"per-rank block time, Flux double-stream block D={D}, {a.tokens} image + {text} "
              f"text tokens, Ulysses {world}, kept {a.kept}, {a.device}, median of "
              f"{a.rounds} calls (ms)")
        print(f"{'rank':>4s} {'dense':>9s} {'routed':>9s} {'speedup':>8s}")
        for i, t in enumerate(every):
            print(f"{i:4d} {t['dense']:9.2f} {t['routed']:9.2f} {t['dense'] / t['routed']:7.2f}x")
        print(f"ideal of the block's work at kept {a.kept}: {ideal:.2f}x")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
