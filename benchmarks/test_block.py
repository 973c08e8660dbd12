"""One block, dense vs routed (frozen DiffCR, fused path), measured in the same run.

GPU: PixArt-Sigma-XL block, bf16, N in {1024, 4096}, B in {1, 8}, SDPA/FlashAttention dense
baseline. CPU: N = 1024, B in {1, 8}, fp32, one thread, MKL-prepacked linear weights in the dense
and the routed block alike (``diffcr.prepack_linears``). ``extra_info``: speedup over the dense
block (median over interleaved dense/routed rounds, :func:`diffcr.app.bench.time_pairs`), the ideal
speedup of method §6 and the fraction of it reached, peak memory (GPU).
"""
import statistics

import pytest
import torch

from diffcr import prepack_linears
from diffcr.app import bench

KAPPAS = [1.0, 0.8, 0.5, 0.3]
_CACHE = {}


def _setup(kind, N, B, device):
    key = (kind, N, B, device.type)
    if key not in _CACHE:
        _CACHE.clear()  # one size at a time: XL blocks at B = 8 are large
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        bb = bench.make_block_bench(kind, N, B, device, dtype)
        packed = bench._resolve_prepack(None, device)
        if packed:
            prepack_linears(bb.dense)
            prepack_linears(bb.block)
        _CACHE[key] = (bb, packed)
    return _CACHE[key]


def _skip_size(device, N):
    if device.type != "cuda" and N != 1024:
        pytest.skip("CPU runs N = 1024 only")


def _info(benchmark, device):
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else
            "cpu (1 thread)", "versions": f"torch {torch.__version__}"}


@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("N", [1024, 4096])
@pytest.mark.parametrize("kappa", KAPPAS)
def test_block_pixart(benchmark, bench_device, kappa, N, B):
    _skip_size(bench_device, N)
    bb, packed = _setup("pixart", N, B, bench_device)
    bb.set_kappa(kappa)

    def run():
        with torch.no_grad():
            bb.run_routed()
        if bench_device.type == "cuda":
            torch.cuda.synchronize()

    def dense():
        with torch.no_grad():
            bb.run_dense()

    rounds = 10 if bench_device.type == "cuda" else 4
    ts = bench.time_pairs({"dense": dense, "routed": run}, bench_device, rounds)
    speedup = statistics.median(d / r for d, r in zip(ts["dense"], ts["routed"]))
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    k = bench.dk.kept_count(kappa, N)
    ideal = bench.ideal_speedup(k / N, N, bb.D, bb.text)
    benchmark.extra_info.update(_info(benchmark, bench_device))
    benchmark.extra_info.update({"baseline": "dense diffusers block", "kappa": kappa,
                                 "prepacked_linears": packed,
                                 "baseline_ms": statistics.median(ts["dense"]) * 1e3,
                                 "paired_routed_ms": statistics.median(ts["routed"]) * 1e3,
                                 "speedup": speedup, "ideal_speedup": ideal,
                                 "fraction_of_ideal": speedup / ideal})
    if bench_device.type == "cuda":
        benchmark.extra_info["peak_mem_MB"] = bench._peak_mem(run, bench_device)


def _record(benchmark, device, result):
    """The measurement is taken by diffcr.app.bench (interleaved with its dense baseline); the
    pytest-benchmark entry carries it in extra_info."""
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(_info(benchmark, device))
    benchmark.extra_info.update({k: v for k, v in result.items()
                                 if isinstance(v, (int, float))})


def _size(device):
    return (4096, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)


@pytest.mark.parametrize("B", [1, 8])
def test_block_routing_overhead(benchmark, bench_device, B):
    """score + select + gather/norm/modulate + scatter-back, over the dense block time."""
    N, dtype = _size(bench_device)
    _record(benchmark, bench_device, bench.bench_overhead(
        "pixart", N, B, 0.5, bench_device, dtype,
        rounds=10 if bench_device.type == "cuda" else 3))


@pytest.mark.parametrize("B", [1, 8])
def test_block_training_two_bin(benchmark, bench_device, B):
    """Forward + backward of one block: DiffCR two-bin (kappa 0.55 -> bins 0.5 and 0.6 in one
    packed pass) vs dense; fraction of the ideal for the two branches together (median of 3
    interleaved rounds on CPU: single rounds vary by several percent there)."""
    N, dtype = _size(bench_device)
    _record(benchmark, bench_device, bench.bench_training(
        "pixart", N, B, 0.55, bench_device, dtype,
        rounds=5 if bench_device.type == "cuda" else 3))


_FAMILY_ROWS = {}


@pytest.mark.parametrize("kappa", [0.8, 0.5, 0.3])
@pytest.mark.parametrize("kind", bench.JOINT_KINDS)
def test_block_family(benchmark, bench_device, kind, kappa):
    """The modern families' blocks at real sizes (SD3.5-L, Flux.1 double and single, Wan 2.1
    1.3B and 14B, Qwen-Image, HunyuanVideo), B = 1, N = 1024 on CPU (fp32, one thread) and 4096
    on GPU (bf16), dense vs routed (frozen, the family's path) vs routed with the token cache,
    measured in the same run by :func:`diffcr.app.bench.bench_blocks`; the ideal counts the
    text stream as not routed.
    One block per kind, every kappa timed with it on the first call."""
    N, dtype = _size(bench_device)
    key = (kind, bench_device.type)
    if key not in _FAMILY_ROWS:
        _CACHE.clear()
        _FAMILY_ROWS.clear()  # one block at a time: the 14B block is large
        rows = bench.bench_blocks(kind, N, 1, kappas=(0.8, 0.5, 0.3), device=bench_device,
                                  dtype=dtype, rounds=10 if bench_device.type == "cuda" else 3,
                                  naive=False, token_cache=True)
        _FAMILY_ROWS[key] = {r["kappa"]: r for r in rows}
    row = _FAMILY_ROWS[key][kappa]
    _record(benchmark, bench_device, row)
    benchmark.extra_info.update({"baseline": "dense diffusers block", "kind": kind,
                                 "path": row["path"]})
