"""Mixed precision (``torch.autocast``, what ``accelerate``'s ``--mixed-precision bf16`` turns
on): every family's routed blocks run forward and backward under CPU autocast, return the
dtype the dense model returns, and stay close to the float32 routed model. Under autocast the
routed path is the compat one (the fused ops take one dtype); ``path="fused"`` says so."""
import copy

import pytest
import torch

pytest.importorskip("diffusers")

import diffcr  # noqa: E402
from diffcr import DiffCRConfig  # noqa: E402

from tiny_models import FAMILIES, FAMILY_CASES, set_ratios  # noqa: E402


def _out(model, kw):
    torch.manual_seed(3)  # DiT drops class labels at random in training
    return model(**kw).sample


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_blocks_run_under_bf16_autocast(family):
    torch.set_num_threads(1)
    factory, inputs = FAMILY_CASES[family]
    dense = factory().train()
    model = copy.deepcopy(dense)
    diffcr.convert(model, DiffCRConfig(num_regions=2))
    set_ratios(model, [0.5, 0.75])
    model.train()
    kw = inputs((100, 900))
    ref, dense_ref = _out(model, kw), _out(dense, kw)  # float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense_out = _out(dense, kw)
        out = _out(model, kw)
        loss = out.float().square().mean() + diffcr.ratio_loss(model)
    assert out.dtype == dense_out.dtype
    assert torch.isfinite(out).all()

    def rel(a, b):
        return float((a.float() - b).abs().max() / b.abs().max())

    # bf16 moves the routed model about as far as it moves the dense one (measured: within
    # 1 % for all but Qwen-Image, whose tiny model moves 46 % dense and 40 % routed)
    dense_err, err = rel(dense_out.detach(), dense_ref.detach()), rel(out.detach(), ref.detach())
    assert err <= max(0.05, 2 * dense_err), (err, dense_err)
    loss.backward()
    routers = diffcr.router_parameters(model)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in routers)
    assert any(p.grad.abs().sum() > 0 for p in routers)


def test_fused_path_under_autocast_names_the_reason():
    factory, inputs = FAMILY_CASES["pixart"]
    model = factory().eval()
    diffcr.convert(model, DiffCRConfig(num_regions=2, path="fused"))
    set_ratios(model, [0.5, 0.75])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), \
            pytest.raises(RuntimeError, match=r"autocast \(mixed precision\) is on"):
        model(**inputs((100, 900)))
