"""The public ops under ``torch.autocast`` (``diffcr_kernels.autocast``): a block's tensors
arrive in mixed dtypes (bf16 linear outputs, float32 residual stream, norm weights and router
scores); each op casts them as the block's eager code would meet them, on every backend, and
returns the dtype eager autocast returns. Outside autocast mixed dtypes are still refused."""
import pytest
import torch
import torch.nn.functional as F

import diffcr_kernels as dk
from diffcr_kernels import reference as ref

from op_cases import op_inputs

BF16 = torch.bfloat16
BACKENDS = ["reference", "auto"]  # auto: the compiled extension where it is built


def _amp(device):
    return torch.autocast(device.type, dtype=BF16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype,mod_dtype", [(torch.float32, BF16), (BF16, torch.float32),
                                               (BF16, BF16)], ids=["x32", "x16-mod32", "x16"])
def test_gather_norm_modulate_under_autocast_follows_eager(device, backend, x_dtype, mod_dtype):
    x, sel, shift, scale, *_ = op_inputs(2, 29, 40, [[5], [29]], torch.float32, device)
    x, shift, scale = x.to(x_dtype), shift.to(mod_dtype), scale.to(mod_dtype)
    with _amp(device), dk.use_backend(backend):
        y = dk.gather_norm_modulate(x, sel, shift, scale, eps=1e-6)
        rows = x.reshape(-1, 40)[sel.indices]
        b = sel.row_sample()
        eager = F.layer_norm(rows, (40,), eps=1e-6) * (1 + scale[b]) + shift[b]
    assert y.dtype == eager.dtype
    dt = y.dtype
    expect = ref.gather_norm_modulate(x.to(dt), sel.indices, shift.to(dt), scale.to(dt),
                                      eps=1e-6)
    tol = dict(rtol=1e-5, atol=1e-5) if dt == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, expect, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_back_under_autocast_promotes_as_eager(device, backend):
    x, sel, _, _, a, m, gate = op_inputs(2, 50, 72, [[13, 31], [50, 7]], torch.float32, device)
    a, m, gate = a.to(BF16), m.to(BF16), gate.to(BF16)  # linear outputs under autocast
    x.requires_grad_(True)
    a.requires_grad_(True)
    with _amp(device), dk.use_backend(backend):
        out = dk.scatter_back_selection(x, sel, a, m, gate)
    assert out.dtype == torch.float32  # float32 x (and scores) + bf16 updates
    expect = ref.scatter_back(x.detach(), sel.indices, sel.cu_seqlens, sel.seg_weight,
                              a.detach().float(), m.float(), sel.scores, gate.float())
    torch.testing.assert_close(out.detach(), expect, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert x.grad.dtype == torch.float32 and a.grad.dtype == BF16
    assert torch.isfinite(a.grad.float()).all() and a.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_scatter_back_under_autocast_keeps_x_dtype(device, backend):
    x, sel, _, _, a, m, gate = op_inputs(3, 29, 40, [[5], [29], [1]], torch.float32, device)
    xb = x.to(BF16)
    expect = ref.scatter_back(xb.float(), sel.indices, sel.cu_seqlens, sel.seg_weight, a, m,
                              sel.scores, gate)
    with torch.no_grad(), _amp(device), dk.use_backend(backend):
        out = dk.scatter_back_selection(xb, sel, a, m, gate, inplace=True)  # float32 updates
    assert out is xb and out.dtype == BF16
    torch.testing.assert_close(out.float(), expect, rtol=2e-2, atol=5e-2)


def test_varlen_attention_under_autocast_runs_in_the_low_precision(device):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(12, 2, 8, generator=g).to(device)
    k = torch.randn(12, 2, 8, generator=g).to(device, BF16)
    v = torch.randn(12, 2, 8, generator=g).to(device, BF16)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=device)
    with _amp(device):
        out = dk.varlen_attention(q, k, v, cu, cu, 7, 7, seqlens_q=[5, 7], seqlens_k=[5, 7])
        eager = F.scaled_dot_product_attention(q[None, None, :5, 0], k[None, None, :5, 0],
                                               v[None, None, :5, 0])
    assert out.dtype == eager.dtype == BF16
    expect = ref.varlen_attention(q.to(BF16).float(), k.float(), v.float(), cu, cu)
    torch.testing.assert_close(out.float(), expect, rtol=2e-2, atol=2e-2)


def test_mixed_dtypes_outside_autocast_are_still_refused(device):
    x, sel, shift, scale, a, m, gate = op_inputs(2, 29, 40, [[5], [29]], torch.float32, device)
    with pytest.raises(ValueError, match="shift has dtype torch.bfloat16, expected torch.float32"):
        dk.gather_norm_modulate(x, sel, shift.to(BF16), scale)
    with pytest.raises(ValueError, match="attn_update has dtype torch.bfloat16"):
        dk.scatter_back_selection(x, sel, a.to(BF16), m, gate)
    cu = torch.tensor([0, 5], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="but q is torch.float32"):
        dk.varlen_attention(a[:5].view(5, 5, 8), a[:5].view(5, 5, 8).to(BF16),
                            a[:5].view(5, 5, 8), cu, cu, 5, 5)
