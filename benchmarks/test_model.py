"""Whole model: random-weight PixArt-Sigma-XL (1024^2 -> 4096 tokens and 512^2 -> 1024 tokens)
and DiT-XL/2 forward, dense vs frozen DiffCR schedules (uniform 0.8 and 0.5 mean kept ratio and a
layer-varying schedule), plus one two-bin training step vs dense; peak memory.

GPU: 28 layers, bf16, B = 2 (a CFG pair). CPU: the same blocks but 2 layers at 512^2 (N = 1024),
fp32, one thread (a 28-layer XL forward takes minutes on one core); ``extra_info`` says which.
"""
import copy

import pytest
import torch

import diffcr
from diffcr import DiffCRConfig
from diffcr.app import bench

SCHEDULES = {"uniform-0.8": 0.8, "uniform-0.5": 0.5, "varying": "varying"}
_CACHE = {}


def _model(kind, res, device):
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    gpu = device.type == "cuda"
    layers = 28 if gpu else 2
    dtype = torch.bfloat16 if gpu else torch.float32
    side = res // 8  # latent side
    with torch.device(device):
        if kind == "pixart":
            m = PixArtTransformer2DModel(**bench.XL, in_channels=4, out_channels=8,
                                         num_layers=layers, sample_size=side, patch_size=2,
                                         cross_attention_dim=1152, caption_channels=4096,
                                         norm_type="ada_norm_single",
                                         use_additional_conditions=False)
        else:
            m = DiTTransformer2DModel(**bench.XL, in_channels=4, out_channels=8,
                                      num_layers=layers, sample_size=side, patch_size=2,
                                      num_embeds_ada_norm=1000)
    if dtype != torch.float32:
        m = m.to(dtype)
    m = m.eval().requires_grad_(False)
    B = 2
    g = torch.Generator(device=device).manual_seed(0)
    kw = dict(hidden_states=torch.randn(B, 4, side, side, generator=g, device=device,
                                        dtype=dtype),
              timestep=torch.tensor([500] * B, device=device))
    if kind == "pixart":
        kw["encoder_hidden_states"] = torch.randn(B, bench.TEXT_TOKENS, 4096, generator=g,
                                                  device=device, dtype=dtype)
    else:
        kw["class_labels"] = torch.tensor([1, 1000], device=device)
    return m, kw, layers


def _setup(kind, res, device):
    key = (kind, res, device.type)
    if key not in _CACHE:
        _CACHE.clear()
        dense, kw, layers = _model(kind, res, device)
        routed = copy.deepcopy(dense)
        diffcr.convert(routed, DiffCRConfig(num_regions=4))
        with torch.no_grad():
            t_dense = bench.time_fn(lambda: dense(**kw), device,
                                    rounds=5 if device.type == "cuda" else 1)
        mem = bench._peak_mem(lambda: dense(**kw), device) if device.type == "cuda" else None
        _CACHE[key] = (dense, routed, kw, layers, t_dense, mem)
    return _CACHE[key]


def _set_schedule(model, sched):
    diffcr.unfreeze(model)
    blocks = diffcr.routed_blocks(model)
    L = len(blocks)
    with torch.no_grad():
        for i, b in blocks.items():
            if sched == "varying":  # first/last blocks dense, middle blocks most compressed
                v = 1.0 if i in (0, L - 1) else (0.5 if L > 2 else 0.6)
                b.ratio.kept.copy_(torch.tensor([v, v, max(0.3, v - 0.2), max(0.3, v - 0.2)]))
            else:
                b.ratio.kept.fill_(sched)
    diffcr.freeze(model)
    _, table = diffcr.ratio_table(model)
    return table[:, 2].mean().item()  # t = 500 -> region 2


@pytest.mark.parametrize("sched", list(SCHEDULES))
@pytest.mark.parametrize("kind,res", [("pixart", 1024), ("pixart", 512), ("dit", 256)])
def test_model_forward(benchmark, bench_device, kind, res, sched):
    if bench_device.type != "cuda" and res != 512:
        pytest.skip("CPU runs the 512^2 PixArt configuration only")
    dense, routed, kw, layers, t_dense, mem = _setup(kind, res, bench_device)
    mean_kept = _set_schedule(routed, SCHEDULES[sched])

    def run():
        with torch.no_grad():
            routed(**kw)
        if bench_device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=5 if bench_device.type == "cuda" else 1, iterations=1,
                       warmup_rounds=1)
    t = benchmark.stats.stats.median
    N = (res // 16) ** 2
    text = bench.TEXT_TOKENS if kind == "pixart" else 0
    ideal = bench.ideal_block_flops(N, 1152, text) / bench.ideal_block_flops(mean_kept * N,
                                                                            1152, text)
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name() if bench_device.type == "cuda" else
        "cpu (1 thread)", "versions": f"torch {torch.__version__}", "layers": layers,
        "baseline": "dense model", "kappa": round(mean_kept, 3), "baseline_ms": t_dense * 1e3,
        "speedup": t_dense / t, "ideal_speedup": ideal, "fraction_of_ideal": t_dense / t / ideal,
        "faster_than_dense_pct": 100 * (1 - t / t_dense)})
    if bench_device.type == "cuda":
        benchmark.extra_info["peak_mem_MB"] = bench._peak_mem(run, bench_device)
        benchmark.extra_info["baseline_peak_mem_MB"] = mem
