"""The fused paths of Qwen-Image and HunyuanVideo against their compat paths (the blocks' own
diffusers forwards on the gathered tokens), in float64 so that the two must agree to rounding:
the text padding mask (a key mask over joint segments), Qwen-Image's edit models
(``zero_cond_t``: per-token modulation, doubled ``temb``), complex rotary tables, and both
training bins with their gradients. The family conformance tests run the same families at
float32 on the common inputs; these add the inputs those do not vary."""
import copy
import inspect

import pytest
import torch

import diffcr
from diffcr import DiffCRConfig

from tiny_models import (_randomise_weights, fused_and_compat, hunyuanvideo_inputs,
                         qwenimage_inputs, set_ratios, tiny_hunyuanvideo, tiny_qwenimage)


def _both_paths(base, kw, train):
    """``{path: (output, router and ratio gradients, last_path of every block)}``, float64."""
    return fused_and_compat(lambda: copy.deepcopy(base), kw,
                            [0.35, 0.55, 0.75, 0.95] if train else [0.3, 0.5, 0.8, 1.0], train,
                            dtype=torch.float64)


def _check(out):
    (yf, gf, pf), (yc, gc, pc) = out["fused"], out["compat"]
    assert set(pf) == {"fused"} and set(pc) == {"compat"}, (pf, pc)
    torch.testing.assert_close(yf, yc, rtol=1e-10, atol=1e-10 * max(1.0, yc.abs().max().item()))
    assert sorted(gf) == sorted(gc)
    for key, g in gc.items():
        assert g.abs().sum() > 0, key
        torch.testing.assert_close(gf[key], g, rtol=1e-8,
                                   atol=1e-8 * max(1.0, g.abs().max().item()), msg=key)


def _has_zero_cond_t():
    from diffusers import QwenImageTransformer2DModel

    return "zero_cond_t" in inspect.signature(QwenImageTransformer2DModel).parameters


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("mask", ["none", "padded"])
@pytest.mark.parametrize("edit", [False, True], ids=["t2i", "edit"])
def test_qwenimage_fused_equals_compat(edit, mask, train):
    if edit and not _has_zero_cond_t():
        pytest.skip("this diffusers has no Qwen-Image zero_cond_t (added in 0.36)")
    base = _randomise_weights(tiny_qwenimage(zero_cond_t=edit))
    kw = qwenimage_inputs([0.1, 0.9], images=2 if edit else 1)
    if mask == "none":  # what the pipelines pass when no prompt is padded
        kw.pop("encoder_hidden_states_mask")
    else:
        kw["encoder_hidden_states_mask"][1, 3:] = 0
    _check(_both_paths(base, kw, train))


def test_qwenimage_fused_path_honours_the_text_padding_mask_as_diffusers_does():
    """Padding sample 1's text changes sample 1's output on the fused path exactly when it
    changes the unconverted model's (diffusers 0.35-0.36 ignore the mask in the attention,
    later releases apply it), and never sample 0's. A mask that the fused attention ignored
    where diffusers applies it would change nothing."""
    base = _randomise_weights(tiny_qwenimage())
    routed, dense = [], []
    for pad in (False, True):
        kw = qwenimage_inputs([0.5, 0.5])
        if pad:
            kw["encoder_hidden_states_mask"][1, 3:] = 0
        m = copy.deepcopy(base)
        with torch.no_grad():
            dense.append(m(**kw).sample)
        diffcr.convert(m, DiffCRConfig(num_regions=1, path="fused"))
        set_ratios(m, 0.5)
        diffcr.freeze(m)
        with torch.no_grad():
            routed.append(m(**kw).sample)
        assert {b.last_path for b in diffcr.routing_state(m).blocks.values()} == {"fused"}
    applies = not torch.allclose(dense[0][1], dense[1][1])
    assert torch.equal(routed[0][0], routed[1][0])
    assert (not torch.allclose(routed[0][1], routed[1][1])) == applies


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("t", [(100, 900), (500,)], ids=["padded-text", "one-sample"])
def test_hunyuanvideo_fused_equals_compat(t, train):
    """Double and single blocks; with two samples the second one's text is padded (the joint
    attention mask the model builds)."""
    base = _randomise_weights(tiny_hunyuanvideo())
    _check(_both_paths(base, hunyuanvideo_inputs(t), train))


def test_hunyuanvideo_float_attention_mask_runs_compat():
    """A float attention mask holds additive biases, not keep/drop: the fused path (a key
    mask) cannot take it, so the block runs compat, with the same result as the boolean mask
    it encodes (-1e9 where a key is dropped)."""
    m = _randomise_weights(tiny_hunyuanvideo())
    diffcr.convert(m, DiffCRConfig(num_regions=1))
    set_ratios(m, 0.5)
    diffcr.freeze(m)
    blk = diffcr.routed_blocks(m)[0]
    calls = []
    h = blk.register_forward_pre_hook(lambda mod, a, k: calls.append((a, dict(k))),
                                      with_kwargs=True)
    with torch.no_grad():
        m(**hunyuanvideo_inputs((100, 900)))
    h.remove()
    args, kw = calls[0]
    names = ("hidden_states", "encoder_hidden_states", "temb", "attention_mask", "freqs_cis")
    kw = {**dict(zip(names, args)), **kw}  # (the model passes the double blocks positionally)
    args = ()
    state = diffcr.routing_state(m).blocks[0]
    assert state.last_path == "fused" and not kw["attention_mask"].is_floating_point()
    with torch.no_grad():
        want = blk(*args, **kw)
        bias = torch.zeros(kw["attention_mask"].shape).masked_fill(~kw["attention_mask"], -1e9)
        got = blk(*args, **dict(kw, attention_mask=bias))
    assert state.last_path == "compat"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_split_linear_is_one_linear_over_both_column_halves(bias):
    """``common.split_linear`` (single-stream blocks' output projection, each half on its own
    rows): values and every gradient, weight and bias included, are those of one linear over
    ``[a; m]`` columns (gradcheck in float64); the weight's gradient is one tensor."""
    from diffcr.models.common import split_linear

    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 7, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    ya, ym = split_linear(a, m, w, b)
    torch.testing.assert_close(ya + ym, torch.nn.functional.linear(torch.cat([a, m], 1), w, b))
    torch.testing.assert_close(ya, torch.nn.functional.linear(a, w[:, :3], b))
    # the halves on different row counts, as a training pass uses them (m: the shared rows)
    m2 = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: split_linear(*t), (a, m2, w, b))
    (ya.sum() + 2 * split_linear(a, m2, w, b)[1].sum()).backward()
    assert w.grad.shape == w.shape and w.grad.is_contiguous()


def test_split_linear_under_autocast_computes_in_autocasts_dtype():
    """As ``F.linear`` under ``torch.autocast``: outputs in the low precision, equal to the
    linear of the cast operands; gradients in each operand's own dtype."""
    from diffcr.models.common import split_linear

    g = torch.Generator().manual_seed(1)
    a, m = torch.randn(6, 8, generator=g), torch.randn(4, 16, generator=g)
    w = torch.randn(8, 24, generator=g, requires_grad=True)
    b = torch.randn(8, generator=g, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        ya, ym = split_linear(a, m, w, b)
        ra = torch.nn.functional.linear(a, w[:, :8], b)
    assert ya.dtype == ym.dtype == torch.bfloat16
    torch.testing.assert_close(ya, ra)
    torch.testing.assert_close(ym, m.bfloat16() @ w[:, 8:].bfloat16().t())
    (ya.float().sum() + ym.float().sum()).backward()
    assert w.grad.dtype == b.grad.dtype == torch.float32
