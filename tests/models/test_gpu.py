"""GPU-only checks of the routed model (skipped without a CUDA device; run by
benchmarks/gpu_check.sh). The op-level CUDA tests live in test_ops.py (device-parametrised)."""
import pytest
import torch

import diffcr
from diffcr import DiffCRConfig

from tiny_models import make, set_ratios

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _pixart_inputs(B, t, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    return dict(hidden_states=torch.randn(B, 4, 8, 8, generator=g, device="cuda", dtype=dtype),
                encoder_hidden_states=torch.randn(B, 5, 32, generator=g, device="cuda",
                                                  dtype=dtype),
                timestep=torch.full((B,), t, device="cuda"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_equals_compat_on_cuda(dtype):
    outs = {}
    for path in ("compat", "fused"):
        m = make("pixart").to("cuda", dtype)
        diffcr.convert(m, DiffCRConfig(path=path))
        set_ratios(m, [0.3, 0.5, 0.7, 1.0])
        diffcr.freeze(m)
        with torch.no_grad():
            outs[path] = m(**_pixart_inputs(4, 300, dtype)).sample.float()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(outs["fused"], outs["compat"], rtol=tol, atol=tol)


def test_training_step_on_cuda_reaches_ratios_and_routers():
    m = make("pixart").cuda()
    diffcr.convert(m)
    set_ratios(m, 0.65)
    m.train()
    kw = _pixart_inputs(4, 0, torch.float32)
    kw["timestep"] = torch.tensor([100, 300, 600, 900], device="cuda")
    (m(**kw).sample.square().mean() + diffcr.ratio_loss(m)).backward()
    for b in diffcr.routed_blocks(m).values():
        assert b.router.weight.grad.abs().sum() > 0 and (b.ratio.kept.grad != 0).all()


def test_denoising_step_captures_into_cuda_graph():
    """A frozen model has static k per (block, region): after a warm-up call (which caches the
    host-derived index tables on the device) one denoising step captures into a CUDA graph and
    replays to the eager result."""
    m = make("pixart").cuda().eval()
    diffcr.convert(m)
    set_ratios(m, [0.3, 0.5, 0.7, 1.0])
    diffcr.freeze(m)
    kw = _pixart_inputs(2, 300, torch.float32)
    static = {k: v.clone() for k, v in kw.items()}
    diffcr.set_timestep(m, static["timestep"])  # host side, outside the graph
    fwd = type(m).forward.__get__(m)  # the forward without hooks (they run on the host)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(2):
            fwd(**static)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = fwd(**static).sample
    new = _pixart_inputs(2, 300, torch.float32)
    new["hidden_states"].mul_(0.5)
    for k in static:
        static[k].copy_(new[k])
    graph.replay()
    with torch.no_grad():
        expect = m(**new).sample
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4)


def test_compile_inductor_on_cuda():
    m = make("pixart").cuda().eval()
    diffcr.convert(m)
    set_ratios(m, 0.5)
    diffcr.freeze(m)
    kw = _pixart_inputs(2, 300, torch.float32)
    with torch.no_grad():
        expect = m(**kw).sample
    torch._dynamo.reset()
    diffcr.compile_model(m)
    with torch.no_grad():
        out = m(**kw).sample
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4)
