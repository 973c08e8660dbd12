"""The fused paths' rotary embedding (``diffcr.models.common.rotate_interleaved``) against
diffusers' own: Flux's and HunyuanVideo's ``apply_rotary_emb`` (float32 compute) and Wan's
processor formula (promoted dtype), bit for bit, on diffusers' pair-repeated tables, with
the gradient of the input too."""
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed  # noqa: E402

from diffcr.models.common import rotate_interleaved  # noqa: E402


def _tables(n, dh):
    return get_1d_rotary_pos_embed(dh, torch.arange(n).float(), use_real=True,
                                   repeat_interleave_real=True)


def _wan(t, cos, sin):
    """``WanAttnProcessor``'s rotary (diffusers 0.42), on ``t`` ``[B, S, H, Dh]``."""
    x1, x2 = t.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[None, :, None, 0::2], sin[None, :, None, 1::2]
    out = torch.empty_like(t)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_rotary_is_diffusers_bit_for_bit(dtype):
    torch.manual_seed(0)
    cos, sin = _tables(37, 16)
    t = torch.randn(1, 37, 3, 16).to(dtype)
    flux = apply_rotary_emb(t, (cos, sin), sequence_dim=1)[0]
    assert torch.equal(rotate_interleaved(t[0], cos, sin, torch.float32), flux)
    assert torch.equal(rotate_interleaved(t[0], cos, sin), _wan(t, cos, sin)[0])
    # text rows [B, L, H, Dh] with one table row per position (the joint forwards' text)
    tb = torch.randn(2, 37, 3, 16).to(dtype)
    assert torch.equal(rotate_interleaved(tb, cos, sin, torch.float32),
                       apply_rotary_emb(tb, (cos, sin), sequence_dim=1))


def test_rotary_gradient_is_diffusers():
    torch.manual_seed(0)
    cos, sin = _tables(11, 8)
    t = torch.randn(1, 11, 2, 8, dtype=torch.float64)
    a, b = t.clone().requires_grad_(), t.clone().requires_grad_()
    g = torch.randn(11, 2, 8, dtype=torch.float64)
    (rotate_interleaved(a[0], cos, sin) * g).sum().backward()
    (_wan(b, cos, sin)[0] * g).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-15)
