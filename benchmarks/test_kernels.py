"""Memory-bound kernels of the routing data path: compiled backend vs plain torch (the
reference), measured in the same run. ``extra_info`` records the baseline time and the speedup.

CPU: PixArt-Sigma-XL hidden size (D = 1152), N = 1024 tokens, B = 1 and 8, kept ratio 0.5, fp32,
one thread. GPU: bf16, N = 4096, B = 8.
"""
import pytest
import torch

import diffcr_kernels as dk
from diffcr_kernels import _ext
from diffcr_kernels import reference as ref
from diffcr.app.bench import time_fn

D = 1152


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, device, reps=20):
    return time_fn(fn, device, rounds=reps)


def _setup(device, B, kappa, P=1):
    N = 4096 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(B, N, D, device=device, dtype=dtype)
    scores = torch.rand(B, N, device=device)
    k = dk.kept_count(kappa, N)
    ks = torch.tensor([[max(1, k // 2), k]] * B) if P == 2 else k
    sel = dk.select_topk(scores, ks, torch.full((B, P), 1.0 / P) if P == 2 else None)
    T = sel.total
    mod = [torch.randn(B, D, device=device, dtype=dtype) for _ in range(3)]
    d = [torch.randn(T, D, device=device, dtype=dtype) for _ in range(2)]
    return x, sel, mod, d


def _compiled(device):
    key = "CUDA" if device.type == "cuda" else "CPU"
    if not _ext.has_kernel("scatter_back", key):
        pytest.skip(f"compiled {key} kernels not available: {_ext.LOAD_ERROR}")
    return device.type


_COPY_BW = {}


def _copy_bandwidth(device):
    """Measured device-to-device copy bandwidth (bytes read + written per second)."""
    if device.type not in _COPY_BW:
        src = torch.empty(64 * 2 ** 20, dtype=torch.float32, device=device).normal_()
        dst = torch.empty_like(src)
        t = _median_time(lambda: dst.copy_(src), device)
        _COPY_BW[device.type] = 2 * src.numel() * 4 / t
    return _COPY_BW[device.type]


def _record(benchmark, device, base_fn, fn, bytes_moved):
    base = _median_time(base_fn, device)

    def run():
        fn()
        _sync(device)

    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
    mine = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (1 thread)",
        "versions": f"torch {torch.__version__}",
        "baseline": "plain torch (reference)",
        "baseline_ms": base * 1e3,
        "speedup_vs_torch": base / mine,
        "GB_per_s": bytes_moved / mine / 1e9,
        "fraction_of_copy_bw": bytes_moved / mine / _copy_bandwidth(device),
    })


@pytest.mark.parametrize("B", [1, 8])
def test_kernels_gather_norm_modulate(benchmark, bench_device, B):
    backend = _compiled(bench_device)
    x, sel, (shift, scale, _), _ = _setup(bench_device, B, 0.5)
    es = x.element_size()
    bytes_moved = 2 * sel.total * D * es

    def base():
        return ref.gather_norm_modulate(x, sel.indices, shift, scale)

    def fn():
        with dk.use_backend(backend):
            return dk.gather_norm_modulate(x, sel.indices, shift, scale)

    _record(benchmark, bench_device, base, fn, bytes_moved)


@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("P", [1, 2], ids=["inference", "two-bin"])
def test_kernels_scatter_back(benchmark, bench_device, B, P):
    backend = _compiled(bench_device)
    x, sel, (_, _, gate), (attn_update, mlp_out) = _setup(bench_device, B, 0.5, P)
    es = x.element_size()
    # out = copy of x (read + write) + per packed row: read attn_update, mlp_out, out row,
    # write out row
    bytes_moved = 2 * x.numel() * es + 4 * sel.total * D * es

    def base():
        return ref.scatter_back(x, sel.indices, sel.cu_seqlens, sel.seg_weight, attn_update,
                                mlp_out, sel.scores, gate)

    def fn():
        with dk.use_backend(backend):
            return dk.scatter_back_selection(x, sel, attn_update, mlp_out, gate)

    _record(benchmark, bench_device, base, fn, bytes_moved)


@pytest.mark.parametrize("B", [1, 8])
def test_kernels_scatter_back_backward(benchmark, bench_device, B):
    backend = _compiled(bench_device)
    x, sel, (_, _, gate), (attn_update, mlp_out) = _setup(bench_device, B, 0.5, 2)
    leaves = [t.clone().requires_grad_() for t in (x, attn_update, mlp_out, gate)]
    scores = sel.scores.clone().requires_grad_()
    w = sel.seg_weight.clone().requires_grad_()
    G = torch.randn_like(x)
    es = x.element_size()
    bytes_moved = 7 * sel.total * D * es

    def run(bk):
        def f():
            with dk.use_backend(bk):
                out = dk.scatter_back(leaves[0], sel.indices, sel.cu_seqlens, w, leaves[1],
                                      leaves[2], scores, leaves[3], max_seqlen=sel.max_seqlen,
                                      segs_per_sample=2)
            return torch.autograd.grad(out, [*leaves, scores, w], G)
        return f

    _record(benchmark, bench_device, run("reference"), run(backend), bytes_moved)


@pytest.mark.parametrize("B", [1, 8])
def test_kernels_token_cache(benchmark, bench_device, B):
    """The token-cache pass (``apply_token_cache_``, in place, inference) against the torch
    composite it replaces (forecast x miss added to the whole stream, then the selected rows'
    updates gathered and copied into the cache)."""
    from diffcr.token_cache import coverage

    backend = _compiled(bench_device)
    x, sel, _, _ = _setup(bench_device, B, 0.5)
    N = x.shape[1]
    R = B * N
    out = x.clone()
    cache = torch.randn(R, D, device=bench_device, dtype=x.dtype)
    x_rows = x.reshape(R, D).index_select(0, sel.indices)
    es = x.element_size()
    # every row: read out and (skipped) cache or (selected) its input, write one of them
    bytes_moved = 3 * R * D * es

    def base():
        miss = (1 - coverage(sel, R)).to(out.dtype).unsqueeze(-1)
        out.view(R, D).add_(cache * miss)
        cache.index_copy_(0, sel.indices, out.view(R, D).index_select(0, sel.indices) - x_rows)

    def fn():
        with dk.use_backend(backend):
            dk.apply_token_cache_(out, cache, dk.token_cache_slots(sel, R), x_rows)

    with torch.no_grad():
        _record(benchmark, bench_device, base, fn, bytes_moved)
    benchmark.extra_info["baseline"] = "torch composite (the runtime before the fused op)"
