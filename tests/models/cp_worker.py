"""Worker of ``tests/models/test_context_parallel.py`` (under torchrun, gloo, CPU): tiny models
of every family diffusers' context-parallel plan covers, run single-process and then under
``enable_parallelism(ContextParallelConfig(...))``; writes what each rank computed.

diffusers resolves the device of a rank as ``rank % torch.accelerator.device_count()``, which
is 0 on a CPU-only machine: the worker stands in 1 for that count (the tensors stay on CPU)."""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.accelerator.device_count = lambda: 1  # stand-in: see the module docstring


def inputs(fam, t=(300, 800)):
    """Inputs whose split dims divide by 2 and 4 (the text is split too in Flux's plan), at
    timesteps ``t`` (out of 1000)."""
    from tiny_models import FAMILY_CASES, flux_ids, qwenimage_inputs

    kw = FAMILY_CASES[fam][1](list(t))
    if fam == "flux":
        g = torch.Generator().manual_seed(0)
        kw["encoder_hidden_states"] = torch.randn(2, 8, 32, generator=g)
        kw["img_ids"], kw["txt_ids"] = flux_ids(4, 8)
    elif fam == "qwenimage":
        kw = qwenimage_inputs([v / 1000 for v in t], text=8)
    return kw


def _first_block_cache(m):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks import hooks as H

    apply_first_block_cache(m, FirstBlockCacheConfig(threshold=0.2))
    if hasattr(H, "_set_cache_context") and hasattr(H, "CacheContext"):
        H._set_cache_context(m, H.CacheContext("cond"))


def main():
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    import diffcr
    from diffusers import ContextParallelConfig
    from tiny_models import FAMILY_CASES, make, set_ratios

    ulysses, ring = int(os.environ["CP_ULYSSES"]), int(os.environ["CP_RING"])
    shards = ulysses * ring
    res = {"rank": dist.get_rank()}

    def run(m, kw):
        with torch.no_grad():
            return m(**kw, return_dict=False)[0]

    for fam in os.environ["CP_FAMILIES"].split(","):
        # Ulysses splits the heads: 4 heads for 4 ranks
        factory = FAMILY_CASES[fam][0] if ulysses <= 2 else (lambda fam=fam: make(fam, heads=4))
        kw = inputs(fam)

        def model(kappa, path="auto", parallel=True):
            m = factory()
            m.set_attention_backend(os.environ.get("CP_BACKEND", "native"))
            if kappa is not None:
                diffcr.convert(m, diffcr.DiffCRConfig(num_regions=2, path=path))
                set_ratios(m, kappa)
                diffcr.freeze(m)
            if parallel:
                m.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses,
                                                                  ring_degree=ring))
            return m

        dense = run(model(None, parallel=False), kw)
        ref_m = model([0.5, 0.75], parallel=False)
        with diffcr.shard_routing(ref_m, shards):
            ref = run(ref_m, kw)
        global_k = run(model([0.5, 0.75], parallel=False), kw)
        out = {"dense_cp": run(model(None), kw), "kappa1_cp": run(model(1.0), kw)}
        for path in ("auto", "compat"):
            m = model([0.5, 0.75], path)
            out[path] = run(m, kw)
            blocks = diffcr.routing_state(m).blocks.values()
            res[f"{fam}/{path}/paths"] = sorted({b.last_path for b in blocks})
            res[f"{fam}/{path}/reasons"] = sorted({str(b.last_compat_reason) for b in blocks})
        for name, y in out.items():
            against = dense if name in ("dense_cp", "kappa1_cp") else ref
            res[f"{fam}/{name}"] = (y - against).abs().max().item()
        # the token cache: each rank caches the updates of its own shard's tokens, so over
        # denoising steps (a refresh, then routed steps that reuse it) the ranks together
        # compute what one process computes when it routes and caches per shard
        steps = [inputs(fam, t) for t in ((400, 400), (300, 300), (200, 200))]  # region 0
        tcc = dict(refresh_every=3, order=1, staleness=0.05)  # staleness: ranked per shard
        ref_m = model([0.5, 0.75], parallel=False)
        diffcr.enable_token_cache(ref_m, diffcr.TokenCacheConfig(**tcc))
        with diffcr.shard_routing(ref_m, shards):
            ref_tc = [run(ref_m, s_kw) for s_kw in steps]
        nocache = run(model([0.5, 0.75], parallel=False), steps[-1])
        m = model([0.5, 0.75])
        diffcr.enable_token_cache(m, diffcr.TokenCacheConfig(**tcc))
        got = [run(m, s_kw) for s_kw in steps]
        res[f"{fam}/tc_paths"] = sorted({b.last_path for b in diffcr.routing_state(m)
                                         .blocks.values()})
        res[f"{fam}/tc"] = max((a - b).abs().max().item() for a, b in zip(got, ref_tc))
        res[f"{fam}/tc_vs_nocache"] = (ref_tc[-1] - nocache).abs().max().item()
        res[f"{fam}/tc_sum"] = got[-1].double().sum().item()
        # a cache that decides from each rank's data is refused with routing (not collective)
        m = model([0.5, 0.75])
        _first_block_cache(m)
        try:
            run(m, kw)
            res[f"{fam}/fbc"] = "ran"
        except RuntimeError as e:
            res[f"{fam}/fbc"] = str(e)
        res[f"{fam}/global_vs_shard"] = (global_k - ref).abs().max().item()
        res[f"{fam}/scale"] = dense.abs().max().item()
        res[f"{fam}/auto_sum"] = out["auto"].double().sum().item()  # identical on every rank
    with open(os.path.join(os.environ["DIFFCR_RESULT_DIR"], f"rank{dist.get_rank()}.json"),
              "w") as f:
        json.dump(res, f)
    dist.barrier()  # both ranks done before the group goes (see tests/app/fsdp2_worker.py)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
