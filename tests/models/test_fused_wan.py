"""The Wan family's fused routed path on the two block calls that used to fall back to the
compat path: Wan 2.2 TI2V's per-token timestep embedding (``temb`` ``[B, N, 6, D]``, one
modulation per token) and the I2V blocks' image K/V in the cross-attention
(``attn2.add_k_proj``; the model puts the image embedding before the 512 text tokens).

Each case against the compat path (the block's own diffusers forward on the gathered tokens)
in eval with ragged kept ratios and in two-bin training (outputs, router and ratio gradients),
the path each block reports, and the converted model against the unconverted one."""
import copy

import pytest
import torch

import diffcr
from diffcr import DiffCRConfig

from tiny_models import _randomise_weights, _wan_inputs, fused_and_compat, make, set_ratios
from tiny_models import run_model as _run

N = 32  # tokens of the tiny Wan models: 2 frames of 8x8 latents, patch (1, 2, 2)
TEXT = 512  # diffusers' WanAttnProcessor: the last 512 context tokens of an I2V block are text


def tiny_wan_i2v(layers=2, seed=0):
    """``tiny_wan`` with Wan 2.1 I2V's image branch: a CLIP-like image embedding (dim 8, 6
    tokens) projected to the model width, and image K/V projections in every cross-attention
    (``added_kv_proj_dim`` = the model width 24)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return _randomise_weights(WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        image_dim=8, added_kv_proj_dim=24).eval())


def i2v_inputs(t, image_tokens=6):
    g = torch.Generator().manual_seed(0)
    B = len(t)
    return {"hidden_states": torch.randn(B, 4, 2, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(B, TEXT, 16, generator=g),
            "encoder_hidden_states_image": torch.randn(B, image_tokens, 8, generator=g),
            "timestep": torch.tensor(t)}


def per_token_inputs(t):
    """Wan 2.2 TI2V: one timestep per token, the first latent frame (the conditioning image)
    at 0, as ``test_wan_per_token_timesteps_route_by_the_noisiest_token``."""
    kw = _wan_inputs(t)
    ts = kw["timestep"][:, None].expand(-1, N).clone()
    ts[:, :N // 2] = 0
    kw["timestep"] = ts
    return kw


# case -> (tiny model factory, inputs for timesteps t)
CASES = {"per_token": (lambda: make("wan"), per_token_inputs),
         "i2v": (tiny_wan_i2v, i2v_inputs)}


def _block_calls(model, inputs):
    """``(temb shape, encoder_hidden_states shape)`` of every routed block call of one
    forward."""
    seen = []

    def hook(block, args, kwargs):
        names = ("hidden_states", "encoder_hidden_states", "temb", "rotary_emb")
        call = {**dict(zip(names, args)), **kwargs}
        seen.append((tuple(call["temb"].shape), tuple(call["encoder_hidden_states"].shape)))

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True)
               for b in diffcr.routed_blocks(model).values()]
    with torch.no_grad():
        _run(model, inputs)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_blocks_receive_the_per_token_temb_or_the_image_context(case):
    """The inputs do what they are for: a 4-D temb with one row per token, or an I2V context
    of image tokens followed by 512 text tokens, reaches the blocks."""
    factory, inputs = CASES[case]
    model = factory()
    diffcr.convert(model, DiffCRConfig(num_regions=4))
    calls = _block_calls(model, inputs((100, 900)))
    assert len(calls) == 2
    for temb, ctx in calls:
        if case == "per_token":
            assert len(temb) == 4 and temb[:3] == (2, N, 6)
        else:
            assert len(temb) == 3 and ctx[:2] == (2, 6 + TEXT)
            assert all(b.attn2.add_k_proj is not None
                       for b in diffcr.routed_blocks(model).values())


def _paths(case, ratios, train, **config):
    """Output (and router / ratio gradients in training) of the fused and the compat path,
    same non-zero routers, four timestep regions, samples at t = 100 and 900."""
    factory, inputs = CASES[case]
    out = fused_and_compat(factory, inputs((100, 900)), ratios, train, **config)
    for path, (_, _, paths) in out.items():
        assert paths == [path, path], (path, paths)
    return {path: (y, grads) for path, (y, grads, _) in out.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_equals_compat_in_eval(case):
    out = _paths(case, [0.3, 0.5, 0.8, 1.0], train=False)  # k = 10 and 32 (dense) per sample
    torch.testing.assert_close(out["fused"][0], out["compat"][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_equals_compat_in_training_with_gradients(case):
    out = _paths(case, [0.35, 0.55, 0.75, 0.95], train=True)  # two bins per sample
    (yf, gf), (yc, gc) = out["fused"], out["compat"]
    torch.testing.assert_close(yf, yc, rtol=1e-5, atol=1e-5)
    assert sorted(gf) == sorted(gc) and gf
    for key in gf:
        assert gf[key].abs().sum() > 0, key
        torch.testing.assert_close(gf[key], gc[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("case", sorted(CASES))
def test_last_path_reports_fused_for_every_block(case):
    """path="auto" picks the fused forward for these calls: in eval, in two-bin training and
    frozen with the in-place scatter-back; "dense" where every token is kept."""
    factory, inputs = CASES[case]
    model = factory()
    diffcr.convert(model, DiffCRConfig(path="auto", num_regions=1))
    st = diffcr.routing_state(model)
    kw = inputs((100, 900))

    def paths(ratio, **freeze):
        set_ratios(model, ratio)
        if freeze:
            diffcr.freeze(model, **freeze)
        with torch.no_grad():
            _run(model, kw)
        if freeze:
            diffcr.unfreeze(model)
        return [(r.last_path, r.last_compat_reason) for r in st.blocks.values()]

    assert paths(0.5) == [("fused", None)] * 2
    assert paths(1.0) == [("dense", None)] * 2
    assert paths(0.5, inplace_residual=True) == [("fused", None)] * 2
    model.train()
    assert paths(0.55) == [("fused", None)] * 2  # two bins: 0.5 and 0.6


@pytest.mark.parametrize("case", sorted(CASES))
def test_inference_never_writes_into_block_inputs_and_inplace_residual_agrees(case):
    """Frozen, without autograd: the fused path leaves every block's input as it was and
    computes what it computes with autograd on (the out-of-place code); with
    ``inplace_residual`` (each block adds its rows into its input) the output is bitwise the
    same."""
    factory, inputs = CASES[case]
    model = factory()
    diffcr.convert(model, DiffCRConfig(path="fused", num_regions=4))
    set_ratios(model, [0.3, 0.5, 0.8, 1.0])
    diffcr.freeze(model)
    kw = inputs((100, 900))
    seen = []
    handles = [b.register_forward_pre_hook(lambda m, a, k: seen.append((a[0], a[0].clone())),
                                           with_kwargs=True)
               for b in diffcr.routed_blocks(model).values()]
    with torch.no_grad():
        out = _run(model, kw)
    for h in handles:
        h.remove()
    assert len(seen) == 2 and all(torch.equal(x, before) for x, before in seen)
    with torch.enable_grad():
        assert torch.equal(out, _run(model, kw).detach())
    diffcr.freeze(model, inplace_residual=True)
    with torch.no_grad():
        assert torch.equal(_run(model, kw), out)
    assert {r.last_path for r in diffcr.routing_state(model).blocks.values()} == {"fused"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_at_full_ratio_equals_dense_in_training(case):
    """kappa = 1 in training: bins 0.9 and 1.0 (weights 0 and 1), both computed in one fused
    pass, the k = N bin over every token: the unconverted model's output."""
    factory, inputs = CASES[case]
    dense = factory().train()
    kw = inputs((100, 900))
    with torch.no_grad():
        expect = _run(dense, kw)
    model = factory()
    diffcr.convert(model, DiffCRConfig(path="fused"))
    model.train()
    with torch.no_grad():
        out = _run(model, kw)
    assert {r.last_path for r in diffcr.routing_state(model).blocks.values()} == {"fused"}
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_model_at_full_ratio_equals_the_unconverted_model(case):
    factory, inputs = CASES[case]
    model = factory()
    ref = copy.deepcopy(model)
    diffcr.convert(model, DiffCRConfig(gate="sigmoid2x", num_regions=2))
    set_ratios(model, 1.0)
    kw = inputs((100, 900))
    with torch.no_grad():
        assert torch.equal(_run(model.eval(), kw), _run(ref.eval(), kw))


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_under_bf16_autocast_stays_as_close_to_compat_as_autocast_moves_compat(case):
    """Two-bin training under CPU bf16 autocast: the dtypes meet the ops as in the block's
    eager code (the float32 modulation, the image and text attention outputs summed in the
    queries' dtype)."""
    factory, inputs = CASES[case]
    base = factory()
    kw = inputs((100, 900))
    res = {}
    for path in ("compat", "fused"):
        model = copy.deepcopy(base)
        diffcr.convert(model, DiffCRConfig(num_regions=2, path=path))
        set_ratios(model, [0.5, 0.75])
        model.train()
        for amp in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                y = _run(model, kw)
                loss = y.float().square().mean() + diffcr.ratio_loss(model)
            loss.backward()
            model.zero_grad()
            res[path, amp] = y.detach()
        assert {r.last_path for r in diffcr.routing_state(model).blocks.values()} == {path}

    def rel(a, b):
        return float((a.float() - b.float()).abs().max() / b.float().abs().max())

    yf, yc, y32 = res["fused", True], res["compat", True], res["compat", False]
    assert yf.dtype == yc.dtype and torch.isfinite(yf).all()
    assert rel(res["fused", False], y32) < 1e-5
    # measured: 0.5 % (per token) and 0.75 % (I2V), where autocast moves compat 0.6 / 0.7 %
    assert rel(yf, yc) <= max(2 * rel(yc, y32), 1e-3), (rel(yf, yc), rel(yc, y32))


@pytest.mark.parametrize("case", sorted(CASES))
def test_frozen_model_compiles_fullgraph(case):
    """The new code (the per-row modulation, the image/text split of the context) compiles
    without a graph break and matches eager."""
    factory, inputs = CASES[case]
    model = factory()
    diffcr.convert(model, DiffCRConfig(path="fused", num_regions=4))
    set_ratios(model, [0.3, 0.5, 0.8, 1.0])
    diffcr.freeze(model)
    kw = inputs((100, 900))
    with torch.no_grad():
        expect = _run(model, kw)
    torch._dynamo.reset()
    diffcr.compile_model(model, backend="eager")  # fullgraph=True: any graph break raises
    try:
        with torch.no_grad():
            out = _run(model, kw)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, expect, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("path", ["fused", "compat"])
def test_i2v_block_refuses_a_context_shorter_than_the_text(path):
    """An I2V block splits off the last 512 context tokens as the text; with fewer there is
    no such split (diffusers would slice with a negative length): a clear error."""
    model = tiny_wan_i2v()
    diffcr.convert(model, DiffCRConfig(num_regions=1, path=path))
    set_ratios(model, 0.5)
    diffcr.freeze(model)
    blk = diffcr.routed_blocks(model)[0]
    diffcr.set_timestep(model, [100, 900])
    rope = model.rope(torch.randn(2, 4, 2, 8, 8))
    with pytest.raises(ValueError, match=r"512 text tokens .* got 100 tokens"), torch.no_grad():
        blk(torch.randn(2, N, 24), torch.randn(2, 100, 24), torch.randn(2, 6, 24), rope)


def test_fused_path_refuses_a_per_token_temb_of_the_wrong_length():
    model = make("wan")
    diffcr.convert(model, DiffCRConfig(num_regions=1, path="fused"))
    set_ratios(model, 0.5)
    diffcr.freeze(model)
    blk = diffcr.routed_blocks(model)[0]
    diffcr.set_timestep(model, [100, 900])
    rope = model.rope(torch.randn(2, 4, 2, 8, 8))
    with pytest.raises(ValueError, match="per-token temb has 31 tokens but the block input "
                       "has 32"), torch.no_grad():
        blk(torch.randn(2, N, 24), torch.randn(2, 5, 24), torch.randn(2, 31, 6, 24), rope)


def test_fused_path_still_refuses_other_processors_and_fused_projections():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    class Custom(WanAttnProcessor):
        pass

    model = tiny_wan_i2v()
    model.blocks[1].attn2.set_processor(Custom())
    with pytest.raises(ValueError, match=r"cannot run these blocks: \{1: 'attn2 processor Custom'"):
        diffcr.convert(model, DiffCRConfig(path="fused"))
    assert not diffcr.is_converted(model)

    model = tiny_wan_i2v()
    model.blocks[0].attn2.fuse_projections()
    with pytest.raises(ValueError, match=r"\{0: 'attn2 has fused projections"):
        diffcr.convert(model, DiffCRConfig(path="fused"))
    # path="auto": that block runs compat, the other fused, and both still compute the model
    diffcr.convert(model, DiffCRConfig(path="auto", num_regions=1))
    set_ratios(model, 0.5)
    with torch.no_grad():
        _run(model, i2v_inputs((100, 900)))
    assert [r.last_path for r in diffcr.routing_state(model).blocks.values()] == \
        ["compat", "fused"]
