"""The fused training step of every family without a text key mask takes the nested bins'
attention (:func:`diffcr_kernels.nested_attention`) on CPU; that it computes what the compat
path computes is checked by the conformance tests (fused == compat, outputs and gradients)."""
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
