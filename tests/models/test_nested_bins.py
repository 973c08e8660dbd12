"""The fused training step of every family without a text key mask takes the nested bins'
attention (:func:`diffcr_kernels.nested_attention`) on CPU, and computes with it what it
computes over the expanded rows (outputs and every gradient)."""
import copy

import pytest
import torch

import diffcr
import diffcr_kernels.attention as A
from diffcr import DiffCRConfig

from tiny_models import FAMILY_CASES, set_ratios

# Qwen-Image's tiny case pads its prompt and HunyuanVideo always passes a text mask: their
# joint attention takes the key-masked path (one SDPA call per bin length)
NESTED = ("pixart", "dit", "sd3", "flux", "wan")


@pytest.mark.parametrize("family", NESTED)
def test_fused_training_step_uses_the_nested_bins_attention(family, monkeypatch):
    monkeypatch.setattr(A, "NESTED_MIN_ROWS", 0)  # the tiny models' bins are below it
    calls = []
    orig = A._NestedAttention.apply
    monkeypatch.setattr(A._NestedAttention, "apply", lambda *a: (calls.append(1), orig(*a))[1])
    factory, inputs = FAMILY_CASES[family]
    model = factory()
    diffcr.convert(model, DiffCRConfig(num_regions=2, path="fused"))
    set_ratios(model, [0.5, 0.75])
    model.train()
    out = model(**inputs((100, 900)))
    out = out.sample if hasattr(out, "sample") else out[0]
    out.float().square().mean().backward()
    assert {b.last_path for b in diffcr.routing_state(model).blocks.values()} == {"fused"}
    assert calls, "no routed block took the nested bins' attention"
    grads = [b.router.weight.grad for b in diffcr.routed_blocks(model).values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("family", NESTED)
def test_nested_and_expanded_bins_attention_give_one_training_step(family, monkeypatch):
    factory, inputs = FAMILY_CASES[family]
    base = factory()
    diffcr.convert(base, DiffCRConfig(num_regions=2, path="fused"))
    set_ratios(base, [0.5, 0.75])
    base.train()
    kw = inputs((100, 900))
    res = []
    for min_rows in (0, 10 ** 9):  # nested; expanded rows (the path below the threshold)
        monkeypatch.setattr(A, "NESTED_MIN_ROWS", min_rows)
        model = copy.deepcopy(base)
        torch.manual_seed(0)  # DiT drops class labels at random in train mode
        out = model(**kw)
        out = out.sample if hasattr(out, "sample") else out[0]
        out.double().square().mean().backward()
        res.append((out.detach(), {n: p.grad for n, p in model.named_parameters()
                                   if p.grad is not None}))
    (o1, g1), (o2, g2) = res
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
    assert g1.keys() == g2.keys() and g1
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-5, msg=n)
