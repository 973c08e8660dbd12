"""Measurements shared by ``pytest benchmarks/`` and ``diffcr bench``: dense vs routed blocks,
the routing overhead, and the two-bin training step, each against a baseline measured in the
same run, with the ideal speedup of SPEC §6.

Sizes are real (PixArt-Sigma-XL block: D = 1152, 16 heads x 72, 120 text tokens; DiT-XL/2:
D = 1152, no cross-attention) with random weights, built on the target device; nothing is
downloaded.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch

import diffcr_kernels as dk

from .config import DiffCRConfig
from .convert import convert, freeze, routed_blocks, set_timestep

__all__ = ["ideal_block_flops", "ideal_speedup", "BlockBench", "make_block_bench", "time_fn",
           "bench_blocks", "bench_overhead", "bench_training"]

XL = dict(num_attention_heads=16, attention_head_dim=72)
TEXT_TOKENS = 120


def ideal_block_flops(n: float, d: int, text: int) -> float:
    """SPEC §6: N (24 D^2 + 4 L D) + 4 N^2 D + 4 L D^2 (the text K/V projection is fixed)."""
    return n * (24 * d * d + 4 * text * d) + 4 * n * n * d + 4 * text * d * d


def ideal_speedup(kappa: float, n: int, d: int, text: int, two_bin: Optional[tuple] = None
                  ) -> float:
    """Dense cost over routed cost at kept ratio kappa (linear parts x kappa, attention x
    kappa^2). ``two_bin=(ka, kb)``: the training pass runs both branches."""
    dense = ideal_block_flops(n, d, text)
    if two_bin is None:
        return dense / ideal_block_flops(kappa * n, d, text)
    ka, kb = two_bin
    routed = ideal_block_flops(ka * n, d, text) + ideal_block_flops(kb * n, d, text) \
        - 4 * text * d * d  # the text projection is shared by both branches
    return dense / routed


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable, device, rounds: int = 5, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _peak_mem(fn, device) -> Optional[float]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


@dataclass
class BlockBench:
    """A dense block and a converted copy of it (same weights) with their inputs."""

    kind: str
    model: torch.nn.Module      # one-block model, converted
    dense: torch.nn.Module      # the unconverted block
    inputs: Dict[str, torch.Tensor]
    N: int
    D: int
    text: int

    @property
    def block(self):
        return self.model.transformer_blocks[0]

    def set_kappa(self, kappa: float) -> None:
        from .convert import unfreeze

        unfreeze(self.model)
        with torch.no_grad():
            for b in routed_blocks(self.model).values():
                b.ratio.kept.fill_(kappa)
        freeze(self.model)

    def run_dense(self):
        return self.dense(**self.inputs)

    def run_routed(self):
        return self.block(**self.inputs)


def make_block_bench(kind: str = "pixart", N: int = 1024, B: int = 1, device="cpu",
                     dtype=torch.float32, seed: int = 0) -> BlockBench:
    """A one-block PixArt-Sigma-XL or DiT-XL/2 model with N image tokens, batch B."""
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    device = torch.device(device)
    side = int(round(N ** 0.5))
    if side * side != N:
        raise ValueError(f"N must be a square number of tokens, got {N}")
    torch.manual_seed(seed)
    with torch.device(device):
        if kind == "pixart":
            model = PixArtTransformer2DModel(**XL, in_channels=4, out_channels=8, num_layers=1,
                                             sample_size=2 * side, patch_size=2,
                                             cross_attention_dim=1152, caption_channels=4096,
                                             norm_type="ada_norm_single",
                                             use_additional_conditions=False)
        elif kind == "dit":
            model = DiTTransformer2DModel(**XL, in_channels=4, out_channels=8, num_layers=1,
                                          sample_size=2 * side, patch_size=2,
                                          num_embeds_ada_norm=1000)
        else:
            raise ValueError(f"kind must be 'pixart' or 'dit', got {kind!r}")
    if dtype != torch.float32:
        model = model.to(dtype)
    model = model.eval().requires_grad_(False)
    blk = model.transformer_blocks[0]
    with torch.no_grad():  # diffusers zero-inits some gates; give every weight a real value
        for p in blk.parameters():
            if p.dim() >= 1 and p.abs().max() == 0:
                p.normal_(0, 0.02)
    D = 1152
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, device=device, dtype=dtype)
    if kind == "pixart":
        inputs = dict(hidden_states=x,
                      encoder_hidden_states=torch.randn(B, TEXT_TOKENS, D, generator=g,
                                                        device=device, dtype=dtype),
                      timestep=0.1 * torch.randn(B, 6 * D, generator=g, device=device,
                                                 dtype=dtype))
        text = TEXT_TOKENS
    else:
        inputs = dict(hidden_states=x, timestep=torch.randint(0, 1000, (B,), device=device),
                      class_labels=torch.randint(0, 1000, (B,), device=device))
        text = 0
    dense = copy.deepcopy(blk)
    convert(model, DiffCRConfig(num_regions=1, param_dtype="float32"))
    set_timestep(model, [500.0] * B)
    return BlockBench(kind, model, dense, inputs, N, D, text)


def bench_blocks(kind="pixart", N=1024, B=1, kappas=(1.0, 0.8, 0.5, 0.3), device="cpu",
                 dtype=torch.float32, rounds=3) -> List[dict]:
    """Dense vs routed (frozen, fused path) block at each kappa: time, speedup, ideal,
    fraction of ideal, peak memory."""
    bb = make_block_bench(kind, N, B, device, dtype)
    dev = torch.device(device)
    rows = []
    with torch.no_grad():
        t_dense = time_fn(bb.run_dense, dev, rounds)
        m_dense = _peak_mem(bb.run_dense, dev)
        for kappa in kappas:
            bb.set_kappa(kappa)
            t = time_fn(bb.run_routed, dev, rounds)
            k = dk.kept_count(kappa, N)
            ideal = ideal_speedup(k / N, N, bb.D, bb.text)
            rows.append(dict(kind=kind, N=N, B=B, kappa=kappa, k=k, dense_ms=t_dense * 1e3,
                             routed_ms=t * 1e3, speedup=t_dense / t, ideal_speedup=ideal,
                             fraction_of_ideal=(t_dense / t) / ideal,
                             peak_mem_MB=_peak_mem(bb.run_routed, dev),
                             dense_peak_mem_MB=m_dense))
    return rows


def bench_overhead(kind="pixart", N=1024, B=1, kappa=0.5, device="cpu", dtype=torch.float32,
                   rounds=5) -> dict:
    """Routing overhead: score + select + gather/norm/modulate + gated scatter-back, as a share
    of the dense block time (the memory-bound work routing adds around the block body)."""
    bb = make_block_bench(kind, N, B, device, dtype)
    dev = torch.device(device)
    blk = bb.block
    x = bb.inputs["hidden_states"]
    k = dk.kept_count(kappa, N)
    D = bb.D
    shift = torch.randn(B, D, device=dev, dtype=dtype)
    gate = torch.randn(B, D, device=dev, dtype=dtype)
    T = B * k
    d1 = torch.randn(T, D, device=dev, dtype=dtype)
    d2 = torch.randn(T, D, device=dev, dtype=dtype)

    def routing():
        s = blk.router(x)
        sel = dk.select_topk(s, k)
        dk.gather_norm_modulate(x, sel.indices, shift, shift)
        dk.gather_rows(x, sel.indices)
        dk.scatter_back_selection(x, sel, d1, d2, gate)

    with torch.no_grad():
        t_dense = time_fn(bb.run_dense, dev, rounds)
        t_route = time_fn(routing, dev, rounds)
    return dict(kind=kind, N=N, B=B, kappa=kappa, dense_ms=t_dense * 1e3,
                routing_ms=t_route * 1e3, overhead_fraction=t_route / t_dense)


def bench_training(kind="pixart", N=1024, B=1, kappa=0.55, device="cpu", dtype=torch.float32,
                   rounds=3) -> dict:
    """One training step of a block (forward + backward): dense vs DiffCR two-bin (both
    branches in one packed pass), with the ideal for the two branches together."""
    bb = make_block_bench(kind, N, B, device, dtype)
    dev = torch.device(device)
    from .convert import unfreeze

    unfreeze(bb.model)
    for b in routed_blocks(bb.model).values():
        with torch.no_grad():
            b.ratio.kept.fill_(kappa)
    bb.model.train()
    bb.dense.train()
    for p in list(bb.block.parameters()) + list(bb.dense.parameters()):
        p.requires_grad_(True)
    x = bb.inputs["hidden_states"].clone().requires_grad_()
    inputs = dict(bb.inputs, hidden_states=x)

    def step(mod):
        def f():
            torch.manual_seed(0)
            out = mod(**inputs)
            out.float().square().mean().backward()
        return f

    t_dense = time_fn(step(bb.dense), dev, rounds)
    t_route = time_fn(step(bb.block), dev, rounds)
    plan = bb.block.ratio.two_bin([0], N)
    ka, kb = (v / N for v in plan.k[0])
    ideal = ideal_speedup(kappa, N, bb.D, bb.text, two_bin=(ka, kb))
    return dict(kind=kind, N=N, B=B, kappa=kappa, bins=(ka, kb), dense_ms=t_dense * 1e3,
                routed_ms=t_route * 1e3, speedup=t_dense / t_route, ideal_speedup=ideal,
                fraction_of_ideal=(t_dense / t_route) / ideal)
