"""Exercise every compiled op (forward and backward) once per dtype on small ragged inputs: the
workload that benchmarks/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck).
Runs on CPU too (``--device cpu``) so the script itself is tested without a GPU."""
import argparse

import torch

import diffcr_kernels as dk
from diffcr_kernels import reference as ref


def run(device: str) -> None:
    backend = "cuda" if device == "cuda" else "cpu"
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        g = torch.Generator().manual_seed(0)
        B, N, D = 3, 37, 72
        x = torch.randn(B, N, D, generator=g).to(device, dtype).requires_grad_()
        shift = torch.randn(B, D, generator=g).to(device, dtype).requires_grad_()
        scale = torch.randn(B, D, generator=g).to(device, dtype).requires_grad_()
        gate = torch.randn(B, D, generator=g).to(device, dtype).requires_grad_()
        scores = torch.rand(B, N, generator=g).to(device)
        w = torch.rand(B, 2, generator=g).to(device).requires_grad_()
        sel = ref.select_topk(scores, [[5, 11], [1, 37], [20, 20]], w)
        with dk.use_backend(backend):
            y = dk.gather_norm_modulate(x, sel.indices, shift, scale)
            d2 = torch.tanh(y)
            out = dk.scatter_back(x, sel.indices, sel.cu_seqlens, sel.seg_weight, y, d2,
                                  sel.scores, gate, max_seqlen=sel.max_seqlen,
                                  segs_per_sample=2)
            out.float().square().sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"{device} {dtype}: ok (out {tuple(out.shape)}, grad x {x.grad.abs().sum():.3g})")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run(p.parse_args().device)
