"""Exercise every compiled op (forward, in-place forward and backward, the token-cache pass)
once per dtype on small ragged inputs: the workload that benchmarks/gpu_check.sh runs under compute-sanitizer memcheck.
On CUDA both kernel families run (the CUDA extension and the compiled Triton kernels), at a
hidden size that takes the 16-byte vector path (D = 72) and one that takes the scalar path
(D = 70). Runs on CPU too (``--device cpu``) so the script itself is tested without a GPU."""
import argparse

import torch

import diffcr_kernels as dk
from diffcr_kernels import reference as ref


def run(device: str) -> None:
    backends = ("cuda", "triton") if device == "cuda" else ("cpu",)
    for backend in backends:
        for D in (72, 70):
            for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                _one(device, backend, D, dtype)


def _one(device, backend, D, dtype):
    g = torch.Generator().manual_seed(0)
    B, N = 3, 37
    x = torch.randn(B, N, D, generator=g).to(device, dtype).requires_grad_()
    shift = torch.randn(B, D, generator=g).to(device, dtype).requires_grad_()
    scale = torch.randn(B, D, generator=g).to(device, dtype).requires_grad_()
    gate = torch.randn(B, D, generator=g).to(device, dtype).requires_grad_()
    scores = torch.rand(B, N, generator=g).to(device)
    w = torch.rand(B, 2, generator=g).to(device).requires_grad_()
    sel = ref.select_topk(scores, [[5, 11], [1, 37], [20, 20]], w)
    with dk.use_backend(backend):
        y = dk.gather_norm_modulate(x, sel.indices, shift, scale)
        mlp_out = torch.tanh(y)
        out = dk.scatter_back(x, sel.indices, sel.cu_seqlens, sel.seg_weight, y, mlp_out,
                              sel.scores, gate, max_seqlen=sel.max_seqlen)
        out.float().square().sum().backward()
        with torch.no_grad():
            inplace = dk.scatter_back_(x.detach().clone(), sel.indices, sel.cu_seqlens,
                                       sel.seg_weight.detach(), y.detach(), mlp_out.detach(),
                                       sel.scores, gate.detach(), max_seqlen=sel.max_seqlen)
        # the token-cache pass: cache in bf16 (its own dtype), with and without miss weights
        with torch.no_grad():
            one = ref.select_topk(scores, [[5], [1], [37]])
            cache = torch.randn(B * N, D, generator=g).to(device, torch.bfloat16)
            x_rows = x.detach().reshape(B * N, D).index_select(0, one.indices)
            slot = dk.token_cache_slots(one, B * N)
            for miss in (None, torch.rand(B * N, generator=g).to(device, ref.acc_dtype(dtype))):
                dk.apply_token_cache_(inplace.clone(), cache, slot, x_rows, miss)
    if device == "cuda":
        torch.cuda.synchronize()
    same = torch.equal(inplace, out.detach())
    print(f"{device} {backend} D={D} {dtype}: ok (out {tuple(out.shape)}, grad x "
          f"{x.grad.abs().sum():.3g}, in place == out of place: {same})")
    if not same:
        raise SystemExit(f"{backend} D={D} {dtype}: scatter_back_ differs from scatter_back")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run(p.parse_args().device)
