"""The fused routed path against the compat path (the block's own diffusers forward) and the
dense model, forward and backward."""
import pytest
import torch

import diffcr
from diffcr import DiffCRConfig

from tiny_models import make, set_ratios

KINDS = ["pixart", "dit"]


def _inputs(kind, t, mask=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    B = len(t)
    kw = dict(hidden_states=torch.randn(B, 4, 8, 8, generator=g, dtype=dtype),
              timestep=torch.tensor(t))
    if kind == "pixart":
        kw["encoder_hidden_states"] = torch.randn(B, 5, 32, generator=g, dtype=dtype)
        if mask:
            m = torch.ones(B, 5, dtype=torch.long)
            m[0, 3:] = 0
            kw["encoder_attention_mask"] = m
    else:
        kw["class_labels"] = torch.arange(B) % 10
    return kw


def _pair(kind, ratios, regions=4, dtype=torch.float32, **cfg):
    models = {}
    for path in ("compat", "fused"):
        m = make(kind).to(dtype)
        diffcr.convert(m, DiffCRConfig(num_regions=regions, path=path,
                                       param_dtype=str(dtype).replace("torch.", ""), **cfg))
        set_ratios(m, ratios)
        models[path] = m
    return models


def close(a, b, rtol=1e-5):
    """fp32 agreement relative to the tensor's scale (randomised tiny models reach |x| ~ 500,
    where fp32 rounding alone is ~1e-4 absolute)."""
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(1.0, b.abs().max().item()))


def _run(model, kw, seed=0):
    torch.manual_seed(seed)  # DiT's label dropout in train mode
    return model(**kw).sample


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ratios,t", [
    (0.5, (300, 300)),                   # uniform k (CFG-like batch)
    ([0.2, 0.5, 0.7, 1.0], (100, 600, 999)),  # ragged k, one sample at k = N
    (0.1, (10,)),                        # k = ceil(0.1 * 16) = 2
])
def test_fused_equals_compat_eval(kind, ratios, t):
    ms = _pair(kind, ratios)
    kw = _inputs(kind, t, mask=True)
    with torch.no_grad():
        a = _run(ms["compat"].eval(), kw)
        b = _run(ms["fused"].eval(), kw)
    close(b, a)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gate,t", [("sigmoid", (100, 400, 600, 900)),
                                    ("sigmoid2x", (100, 400, 600, 900)),
                                    # one shared region: the same two bins repeat per sample
                                    # (the periodic attention paths)
                                    ("sigmoid2x", (400, 400, 400))])
def test_fused_equals_compat_training_two_bins(kind, gate, t):
    # float64: attention over the large activations of randomised tiny models amplifies fp32
    # rounding in the gradients; in float64 the two paths must agree to ~1e-10
    ms = _pair(kind, [0.35, 0.55, 0.72, 0.95], gate=gate, dtype=torch.float64)
    for m in ms.values():  # same non-zero routers in both
        torch.manual_seed(5)
        for b in diffcr.routed_blocks(m).values():
            torch.nn.init.normal_(b.router.weight, std=0.3)
    kw = _inputs(kind, t, mask=True, dtype=torch.float64)
    grads, outs = {}, {}
    for path, m in ms.items():
        m.train()
        out = _run(m, kw)
        (out.square().mean() + diffcr.ratio_loss(m)).backward()
        outs[path] = out.detach()
        grads[path] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    close(outs["fused"], outs["compat"], rtol=1e-9)
    assert grads["fused"].keys() == grads["compat"].keys()
    for n, g in grads["compat"].items():
        torch.testing.assert_close(grads["fused"][n], g, rtol=1e-8,
                                   atol=1e-8 * max(1.0, g.abs().max().item()),
                                   msg=lambda m: f"{n}: {m}")
    for b in diffcr.routed_blocks(ms["fused"]).values():
        moved = b.ratio.kept.grad != 0  # regions that saw a sample (all four when t is mixed)
        assert (moved.all() if len(set(t)) > 1 else moved.any())
        assert b.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_fused_at_full_ratio_equals_dense_in_training(kind):
    dense = make(kind).train()
    kw = _inputs(kind, (100, 900))
    with torch.no_grad():
        expect = _run(dense, kw)
    m = make(kind)
    diffcr.convert(m, DiffCRConfig(path="fused"))
    m.train()  # kappa = 1: bins 0.9 and 1.0 with weights 0 and 1, both computed in one pass
    with torch.no_grad():
        out = _run(m, kw)
    close(out, expect)


def test_fused_refuses_blocks_it_cannot_run():
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Custom(AttnProcessor2_0):
        pass

    m = make("pixart")
    m.transformer_blocks[1].attn1.set_processor(Custom())
    with pytest.raises(ValueError, match=r"path='fused' cannot run these blocks: \{1:"):
        diffcr.convert(m, DiffCRConfig(path="fused"))
    assert not diffcr.is_converted(m)
    diffcr.convert(m, DiffCRConfig(path="auto"))  # falls back to compat for that block
    set_ratios(m, 0.5)
    with torch.no_grad():
        m(**_inputs("pixart", (10, 20)))


def test_last_path_reports_the_path_each_block_took():
    """BlockRouting.last_path: "fused" for a block the fused path runs, "compat" for one that
    falls back (a custom attention processor) or under path="compat", "dense" where every
    token is kept; on every forward, in training (two bins) and frozen with the in-place
    scatter-back alike."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Custom(AttnProcessor2_0):
        pass

    torch.set_num_threads(1)
    m = make("pixart")
    m.transformer_blocks[1].attn1.set_processor(Custom())
    diffcr.convert(m, DiffCRConfig(path="auto", num_regions=1))
    st = diffcr.routing_state(m)
    assert [st.blocks[i].last_path for i in (0, 1)] == [None, None]

    def paths(ratio, **freeze):
        set_ratios(m, ratio)
        if freeze:
            diffcr.freeze(m, **freeze)
        with torch.no_grad():
            m(**_inputs("pixart", (10, 20)))
        if freeze:
            diffcr.unfreeze(m)
        return [st.blocks[i].last_path for i in (0, 1)]

    assert paths(0.5) == ["fused", "compat"]
    assert paths(1.0) == ["dense", "dense"]
    assert paths(0.5, inplace_residual=True) == ["fused", "compat"]
    assert paths(1.0, inplace_residual=True) == ["dense", "dense"]
    m.train()
    assert paths(0.55) == ["fused", "compat"]  # two bins: 0.5 and 0.6
    m.eval()
    c = make("pixart")
    diffcr.convert(c, DiffCRConfig(path="compat", num_regions=1))
    set_ratios(c, 0.5)
    with torch.no_grad():
        c(**_inputs("pixart", (10, 20)))
    assert {r.last_path for r in diffcr.routing_state(c).blocks.values()} == {"compat"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t", [(300, 300), (100, 900)], ids=["uniform", "ragged"])
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_frozen_model_compiles_fullgraph(kind, t, inplace):
    """An eval-mode frozen model compiles with fullgraph=True (no graph break) and matches
    eager; a second call with other regions recompiles rather than breaking. Also with the
    in-place scatter-back (a mutating custom op inside the traced graph)."""
    m = make(kind)
    diffcr.convert(m)
    set_ratios(m, [0.3, 0.5, 0.7, 1.0])
    diffcr.freeze(m)
    kw = _inputs(kind, t, mask=True)
    with torch.no_grad():
        expect = m(**kw).sample
    diffcr.freeze(m, inplace_residual=inplace)
    torch._dynamo.reset()
    diffcr.compile_model(m, backend="eager")  # fullgraph=True: any graph break raises
    blocks = diffcr.routing_state(m).blocks.values()
    for r in blocks:
        r.last_path = None
    with torch.no_grad():
        out = m(**kw).sample
        assert {r.last_path for r in blocks} == {"fused"}  # set inside the compiled graph too
        kw2 = dict(kw, timestep=torch.tensor([999] * len(t)))
        out2 = m(**kw2).sample
    torch.testing.assert_close(out, expect, rtol=1e-6, atol=1e-6)
    assert out2.shape == out.shape
    diffcr.revert(m)
    assert "forward" not in m.__dict__


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_path_on_every_kernel_backend(kind, backend):
    """The whole routed model with the Triton kernels (interpreter on CPU: selection, gather +
    norm, scatter-back) or the pure-torch reference equals the default (C++) run."""
    import diffcr_kernels as dk

    ms = _pair(kind, [0.2, 0.5, 0.7, 1.0])
    m = ms["fused"].eval()
    kw = _inputs(kind, (100, 600, 999), mask=True)
    with torch.no_grad():
        expect = _run(m, kw)
        with dk.use_backend(backend):
            out = _run(m, kw)
    close(out, expect)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ratios", [1.0, 0.5, [0.2, 0.5, 0.7, 1.0]])
def test_inference_never_writes_into_block_inputs(kind, ratios):
    """Without autograd the fused path updates its own buffers in place; the residual stream a
    block receives (and every other input) must come out unchanged, and the result must equal
    the result with autograd on (the out-of-place code)."""
    m = _pair(kind, ratios)["fused"].eval()
    seen = []

    def keep(block, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        seen.append((x, x.clone()))

    for b in diffcr.routed_blocks(m).values():
        b.register_forward_pre_hook(keep, with_kwargs=True)
    kw = _inputs(kind, (100, 600, 999), mask=True)
    with torch.no_grad():
        out = _run(m, kw)
    assert len(seen) == len(diffcr.routed_blocks(m))
    for x, before in seen:
        assert torch.equal(x, before), "a block modified its input"
    seen.clear()
    with torch.enable_grad():
        ref = _run(m, kw)
    assert torch.equal(out, ref.detach())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ["fused", "compat"])
def test_frozen_inplace_residual_gives_the_same_output_without_copying(kind, path):
    """freeze(inplace_residual=True): at inference each routed block adds its rows into its
    input and returns that tensor (no copy of the residual stream); the model's output is
    bitwise the default's. With autograd on, or after unfreeze, blocks copy again."""
    ms = _pair(kind, [0.2, 0.5, 0.7, 1.0])
    m = ms[path].eval()
    kw = _inputs(kind, (100, 600, 999), mask=True)
    diffcr.freeze(m)
    with torch.no_grad():
        expect = _run(m, kw)
    diffcr.freeze(m, inplace_residual=True)
    same = []

    def check(block, args, kwargs, out):
        x = kwargs.get("hidden_states", args[0] if args else None)
        same.append(out.data_ptr() == x.data_ptr())

    hooks = [b.register_forward_hook(check, with_kwargs=True)
             for b in diffcr.routed_blocks(m).values()]
    with torch.no_grad():
        out = _run(m, kw)
    assert torch.equal(out, expect)
    # kappa = 1 blocks (region 4 of sample 3) run the dense block; the routed ones write in place
    assert any(same), "no routed block updated its input in place"
    same.clear()
    with torch.enable_grad():
        out2 = _run(m, kw)
    assert not any(same), "a block wrote into its input with autograd on"
    torch.testing.assert_close(out2.detach(), expect)
    diffcr.unfreeze(m)
    assert not diffcr.routing_state(m).inplace_residual  # unfreeze resets the in-place switch
    for h in hooks:
        h.remove()
    with pytest.raises(ValueError, match="inplace_residual must be True or False"):
        diffcr.freeze(m, inplace_residual="yes")
