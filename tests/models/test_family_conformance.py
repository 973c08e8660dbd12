"""Every registered model family (``diffcr.models``) against the same contract, on a tiny random
model of the family (CPU, no downloads):

- at kappa = 1 with ``gate="sigmoid2x"`` (fresh routers) the converted model computes exactly
  what the original computes;
- the fused path equals the compat path at kappa < 1, in eval and in training (two bins per
  sample, samples in different timestep regions), and so do the router and ratio gradients;
- ``revert`` restores the model exactly (classes, attributes, hooks, state dict, outputs).

Adding a family: its file under ``python/diffcr/models/``, its registration line, and its case
in ``tests/tiny_models.py``'s ``FAMILY_CASES`` (a tiny model and its inputs); docs/extending.md
has the exact list.
"""
import copy

import pytest
import torch

import diffcr
from diffcr import DiffCRConfig

from tiny_models import (FAMILIES, FAMILY_CASES, FUSED_FAMILIES, fused_and_compat, make,
                         qwenimage_inputs, set_ratios)
from tiny_models import run_model as _run


def test_every_registered_family_has_a_case():
    assert set(FAMILY_CASES) == set(FAMILIES)


def _case(name):
    factory, inputs = FAMILY_CASES[name]
    model = factory()
    assert diffcr.family_for(model).name == name
    return model, inputs


def _module_snapshot(model):
    return {name: (type(m), sorted(vars(m)), list(m._forward_hooks.values()),
                   list(m._forward_pre_hooks.values()))
            for name, m in model.named_modules()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_kappa_one_equals_the_original(family, mode):
    model, inputs = _case(family)
    ref = copy.deepcopy(model)
    getattr(model, mode)()
    getattr(ref, mode)()
    diffcr.convert(model, DiffCRConfig(gate="sigmoid2x", num_regions=2))
    if mode == "train":
        # kappa = 1 keeps every token with weight 1 in the frozen routing of a trained model
        diffcr.freeze(model)
    kw = inputs((100, 900))
    with torch.no_grad():
        assert torch.equal(_run(model, kw), _run(ref, kw))


def _paths(family, ratios, train, **config):
    factory, inputs = FAMILY_CASES[family]
    out = fused_and_compat(factory, inputs((100, 900)), ratios, train, **config)
    return {path: (y, grads) for path, (y, grads, _) in out.items()}


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_fused_equals_compat_in_eval(family):
    out = _paths(family, [0.3, 0.5, 0.8, 1.0], train=False)
    torch.testing.assert_close(out["fused"][0], out["compat"][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_fused_equals_compat_in_training_with_gradients(family):
    out = _paths(family, [0.35, 0.55, 0.75, 0.95], train=True)
    (yf, gf), (yc, gc) = out["fused"], out["compat"]
    torch.testing.assert_close(yf, yc, rtol=1e-5, atol=1e-5)
    assert sorted(gf) == sorted(gc) and gf
    for key in gf:
        assert gf[key].abs().sum() > 0, key
        torch.testing.assert_close(gf[key], gc[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_fused_equals_compat_in_full_fine_tuning(family):
    """Every weight of the model takes a gradient (a full fine-tune): the fused path's
    gradient of each equals the compat path's (the block's own diffusers forward), including
    the projections the fused path cuts by columns or computes once for both bins."""
    factory, inputs = FAMILY_CASES[family]
    out = fused_and_compat(factory, inputs((100, 900)), [0.35, 0.55, 0.75, 0.95], True,
                           weights=True)
    (_, gf), (_, gc) = ((y, g) for y, g, _ in out.values())
    params = [k for k in gf if k.startswith("param ")]
    assert sorted(gf) == sorted(gc) and params
    assert sum(gf[k] is not None for k in params) > len(params) // 2
    for key in params:
        if gc[key] is None:
            assert gf[key] is None or not gf[key].any(), key
            continue
        torch.testing.assert_close(gf[key], gc[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("family", FUSED_FAMILIES)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_fused_equals_compat_when_a_block_keeps_one_token(family, train):
    """k = 1, the smallest segment: bins (0.01, 1) give k = 1 in eval, and in training each
    sample runs its k = 1 bin next to its k = N bin in the same packed pass."""
    out = _paths(family, [0.01, 0.3, 0.6, 0.9] if train else 0.01, train,
                 bins=(0.01, 1.0))
    (yf, gf), (yc, gc) = out["fused"], out["compat"]
    torch.testing.assert_close(yf, yc, rtol=1e-5, atol=1e-5)
    for key in gf:
        torch.testing.assert_close(gf[key], gc[key], rtol=1e-4, atol=1e-6, msg=key)
    if not train:
        model, inputs = _case(family)
        diffcr.convert(model, DiffCRConfig(bins=(0.01, 1.0), num_regions=4))
        set_ratios(model, 0.01)
        model.eval()
        with torch.no_grad():
            _run(model, inputs((100, 900)))
        for b in diffcr.routing_state(model).blocks.values():
            assert b.last_kappa is not None and torch.all(b.last_kappa == 0.01)


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_blocks_change_exactly_k_tokens_computed_by_the_block_itself(family):
    """Frozen, kappa = 0.5: every routed block changes exactly k image tokens per sample, and
    those rows (and any text output) are what the unconverted block computes when it is
    called on the gathered tokens alone."""
    model, inputs = _case(family)
    _check_exactly_k_tokens_by_the_block_itself(model, inputs((100, 900)))


def _gathered_by_hand(family, block, call, s, pos):
    """The unconverted block's arguments for sample ``s``'s kept positions ``pos`` ``[k]``,
    written out per family: the spec that each family's ``gathered_call`` is checked against
    (the routed path runs through ``gathered_call``, so it cannot be its own reference)."""
    x = call["hidden_states"]
    B, N = x.shape[:2]
    out = {name: v[s:s + 1] if torch.is_tensor(v) and v.dim() and v.shape[0] == B else v
           for name, v in call.items()}
    out["hidden_states"] = x[s:s + 1, pos]
    if family == "flux":  # rotary table [text; image] rows, no batch dim
        L = call["encoder_hidden_states"].shape[1]
        rows = torch.cat([torch.arange(L), L + pos])
        out["image_rotary_emb"] = tuple(r[rows] for r in call["image_rotary_emb"])
    elif family == "wan":  # rotary [1, N, 1, hd] (0.36+) or [1, 1, N, hd / 2] complex (0.35)
        rope = call["rotary_emb"]
        pick = (lambda r: r[:, pos]) if rope[0].shape[1] == N else (lambda r: r[:, :, pos])
        out["rotary_emb"] = tuple(map(pick, rope)) if isinstance(rope, tuple) else pick(rope)
        if call["temb"].dim() == 4:  # Wan 2.2 TI2V: per-token [B, N, 6, D]
            out["temb"] = call["temb"][s:s + 1, pos]
    elif family == "qwenimage":  # image rotary [N, hd / 2] without batch dim; text unchanged
        img, txt = call["image_rotary_emb"]
        out["image_rotary_emb"] = (img[pos], txt)
        joint = (call.get("joint_attention_kwargs") or {}).get("attention_mask")
        if joint is not None:  # diffusers 0.37-0.41: the model's [B, L + N] mask, text first
            L = call["encoder_hidden_states"].shape[1]
            out["joint_attention_kwargs"] = dict(call["joint_attention_kwargs"],
                                                 attention_mask=joint[s:s + 1][:, torch.cat(
                                                     [torch.arange(L), L + pos])])
        if torch.is_tensor(call.get("modulate_index")):  # edit models: [B, N], temb [2B, D]
            out["modulate_index"] = call["modulate_index"][s:s + 1, pos]
            out["temb"] = call["temb"][[s, B + s]]
    elif family == "hunyuanvideo":  # [video; text]: rotary rows of the video tokens only,
        L = call["encoder_hidden_states"].shape[1]  # mask columns [kept video; every text]
        rope = "image_rotary_emb" if hasattr(block, "proj_mlp") else "freqs_cis"
        out[rope] = tuple(r[pos] for r in call[rope])
        out["attention_mask"] = call["attention_mask"][s:s + 1][..., torch.cat(
            [pos, torch.arange(N, N + L)])]
    return out


def _rank_without_gating(model):
    """Router weights ~1e-7: the zero init ties every score and keeps the first k positions,
    which would hide a wrong gather of per-token inputs (rotary rows, modulation); weights this
    small rank the tokens while the ``sigmoid2x`` gate stays 1 to within ~1e-6."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for b in diffcr.routed_blocks(model).values():
            b.router.weight.copy_(1e-7 * torch.randn(b.router.weight.shape, generator=g))


def _check_exactly_k_tokens_by_the_block_itself(model, kw):
    import diffcr_kernels as dk

    ref = copy.deepcopy(model)
    fam = diffcr.family_for(model)
    diffcr.convert(model, DiffCRConfig(gate="sigmoid2x", num_regions=1))
    _rank_without_gating(model)
    set_ratios(model, 0.5)
    diffcr.freeze(model)
    calls = []
    for i, b in diffcr.routed_blocks(model).items():
        b.register_forward_hook(
            lambda mod, args, kwargs, out, i=i: calls.append((i, args, kwargs, out)),
            with_kwargs=True)
    with torch.no_grad():
        _run(model, kw)
    assert sorted({c[0] for c in calls}) == sorted(diffcr.routed_blocks(model))
    ref_blocks = dict(fam.blocks(ref))
    for i, args, kwargs, out in calls:
        x = args[0] if args else kwargs["hidden_states"]
        B, N, _ = x.shape
        k = dk.kept_count(0.5, N)
        changed = (fam.hidden_states_of(out) != x).any(-1)  # [B, N]
        assert changed.sum(-1).tolist() == [k] * B, (i, changed.sum(-1).tolist())
        pos = changed.nonzero()[:, 1].view(B, k)
        assert not bool((pos == torch.arange(k)).all()), "the test must not keep the first k"
        routed_block = diffcr.routed_blocks(model)[i]
        block = ref_blocks[diffcr.routing_state(model).blocks[i].name]
        call = fam.bind(routed_block, args, kwargs)
        for s in range(B):  # the unconverted block on [its inputs; sample s's kept tokens]
            gcall = _gathered_by_hand(fam.name, block, call, s, pos[s])
            with torch.no_grad():
                want = block(**gcall)
            got = fam.hidden_states_of(out)[s, pos[s]]
            torch.testing.assert_close(got, fam.hidden_states_of(want)[0], rtol=1e-5,
                                       atol=1e-5)
            if fam.text_of(out) is not None:  # a text stream
                torch.testing.assert_close(fam.text_of(out)[s], fam.text_of(want)[0],
                                           rtol=1e-5, atol=1e-5)


def test_qwenimage_edit_model_gathers_modulate_index_and_both_temb_halves():
    """Qwen-Image edit models (``zero_cond_t``): condition-image tokens appended, a per-token
    ``modulate_index`` and a doubled ``temb``; sample 1's text is padded (mask 0)."""
    import inspect

    from tiny_models import _randomise_weights, tiny_qwenimage

    from diffusers import QwenImageTransformer2DModel

    if "zero_cond_t" not in inspect.signature(QwenImageTransformer2DModel).parameters:
        pytest.skip("this diffusers has no Qwen-Image zero_cond_t (added in 0.36)")
    model = _randomise_weights(tiny_qwenimage(zero_cond_t=True))
    kw = qwenimage_inputs([0.1, 0.9], images=2)
    kw["encoder_hidden_states_mask"][1, 3:] = 0
    ref_block = copy.deepcopy(model.transformer_blocks[1])
    _check_exactly_k_tokens_by_the_block_itself(copy.deepcopy(model), kw)

    # the gathering itself, written out by hand against the family's
    diffcr.convert(model, DiffCRConfig(gate="sigmoid2x", num_regions=1))
    _rank_without_gating(model)
    set_ratios(model, 0.5)
    diffcr.freeze(model)
    seen = []
    model.transformer_blocks[1].register_forward_hook(
        lambda mod, args, kwargs, out: seen.append((kwargs, out)), with_kwargs=True)
    with torch.no_grad():
        _run(model, kw)
    (call, out), = seen
    x, (img_rope, txt_rope) = call["hidden_states"], call["image_rotary_emb"]
    B, N = x.shape[:2]
    assert call["temb"].shape[0] == 2 * B and call["modulate_index"].shape == (B, N)
    assert call["modulate_index"].unique().tolist() == [0, 1]
    for s in range(B):
        pos = (out[1][s] != x[s]).any(-1).nonzero()[:, 0]
        with torch.no_grad():
            want_ctx, want = ref_block(
                hidden_states=x[s:s + 1, pos],
                encoder_hidden_states=call["encoder_hidden_states"][s:s + 1],
                encoder_hidden_states_mask=call["encoder_hidden_states_mask"][s:s + 1],
                temb=call["temb"][[s, B + s]], image_rotary_emb=(img_rope[pos], txt_rope),
                modulate_index=call["modulate_index"][s:s + 1, pos])
        torch.testing.assert_close(out[1][s, pos], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[0][s], want_ctx[0], rtol=1e-5, atol=1e-5)
        assert call["modulate_index"][s, pos].unique().tolist() == [0, 1]  # both kinds kept


def test_qwenimage_refuses_a_modulate_index_of_the_wrong_length():
    model = make("qwenimage")
    fam = diffcr.family_for(model)
    block = model.transformer_blocks[0]
    call = dict(hidden_states=torch.zeros(1, 16, 32), temb=torch.zeros(1, 32),
                modulate_index=torch.zeros(1, 12, dtype=torch.int))
    with pytest.raises(ValueError, match="modulate_index has 12 tokens but the block input "
                       "has 16"):
        fam.gathered_call(block, call, torch.tensor([0]), torch.arange(4)[None])


@pytest.mark.parametrize("family", FAMILIES)
def test_revert_is_exact(family):
    model, inputs = _case(family)
    before = _module_snapshot(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    kw = inputs((100, 900))
    with torch.no_grad():
        want = _run(model, kw)
    diffcr.convert(model, DiffCRConfig(num_regions=2))
    set_ratios(model, 0.5)
    diffcr.freeze(model)
    with torch.no_grad():
        assert not torch.equal(_run(model, kw), want)  # routing was active
    diffcr.revert(model)
    assert _module_snapshot(model) == before
    after = model.state_dict()
    assert sorted(after) == sorted(sd) and all(torch.equal(after[k], sd[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(_run(model, kw), want)


# ------------------------------------------------------------------ registry and version gate
def test_tested_diffusers_range_matches_pyproject():
    import os
    import re

    from diffcr.models import TESTED_DIFFUSERS

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    text = open(os.path.join(root, "pyproject.toml")).read()
    m = re.search(r'^tested-diffusers = \["([\d.]+)", "([\d.]+)"\]', text, re.M)
    assert m, "pyproject.toml has no [tool.diffcr] tested-diffusers"
    assert (m.group(1), m.group(2)) == TESTED_DIFFUSERS
    for fam in diffcr.families().values():
        assert fam.tested_diffusers == TESTED_DIFFUSERS, fam.name


@pytest.mark.parametrize("family", FAMILIES)
def test_untested_diffusers_version_auto_runs_compat_fused_refused(family, monkeypatch):
    import warnings

    import diffusers

    from diffcr.models import base

    monkeypatch.setattr(diffusers, "__version__", "9.1.0")
    monkeypatch.setattr(base, "_WARNED", set())  # warn_once's memory
    model, inputs = _case(family)
    with pytest.raises(ValueError, match=r"path='fused' refused: diffusers 9.1.0 is outside"):
        diffcr.convert(model, DiffCRConfig(path="fused"))
    assert not diffcr.is_converted(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diffcr.convert(model, DiffCRConfig(path="auto", num_regions=4))
    assert any("outside the releases" in str(w.message) for w in caught)
    st = diffcr.routing_state(model)
    assert all("9.1.0" in r.fused_reason for r in st.blocks.values())
    set_ratios(model, [0.3, 0.5, 0.8, 1.0])
    compat, _ = _case(family)
    diffcr.convert(compat, DiffCRConfig(path="compat", num_regions=4))
    set_ratios(compat, [0.3, 0.5, 0.8, 1.0])
    kw = inputs((100, 900))
    with torch.no_grad():
        assert torch.equal(_run(model, kw), _run(compat, kw))


def test_supported_models_are_the_registered_families_classes():
    from diffcr.convert import SUPPORTED_MODELS

    assert set(SUPPORTED_MODELS) == {c for f in diffcr.families().values()
                                     for c in f.model_classes}


def test_registry_refuses_a_second_family_for_a_model_class():
    from diffcr.models import ModelFamily, register_family

    class Clash(ModelFamily):
        name = "clash"
        model_classes = ("PixArtTransformer2DModel",)

    with pytest.raises(ValueError, match="already belong to family 'pixart'"):
        register_family(Clash)
    assert "clash" not in diffcr.families()


def test_unknown_model_names_the_supported_classes():
    with pytest.raises(TypeError, match=r"supports PixArtTransformer2DModel \(pixart\), "
                                        r"DiTTransformer2DModel \(dit\), "
                                        r"SD3Transformer2DModel \(sd3\), "
                                        r"FluxTransformer2DModel \(flux\), "
                                        r"WanTransformer3DModel \(wan\), "
                                        r"QwenImageTransformer2DModel \(qwenimage\), "
                                        r"HunyuanVideoTransformer3DModel \(hunyuanvideo\); "
                                        r"got Linear"):
        diffcr.convert(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_model_deepcopies_and_pickles(family):
    """The routed forward lives in a class (not in closures on the module), so copies are
    independent models that route with their own parameters."""
    import pickle

    model, inputs = _case(family)
    diffcr.convert(model, DiffCRConfig(num_regions=2))
    set_ratios(model, 0.5)
    kw = inputs((100, 900))
    with torch.no_grad():
        want = _run(model, kw)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert diffcr.routing_state(clone) is not diffcr.routing_state(model)
        with torch.no_grad():
            assert torch.equal(_run(clone, kw), want)
            for b in diffcr.routed_blocks(clone).values():
                b.router.weight.normal_()
            assert not torch.equal(_run(clone, kw), want)
            assert torch.equal(_run(model, kw), want)
        diffcr.revert(clone)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_roundtrip(family, tmp_path):
    model, inputs = _case(family)
    diffcr.convert(model, DiffCRConfig(num_regions=2))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for b in diffcr.routed_blocks(model).values():
            b.router.weight.copy_(torch.randn(b.router.weight.shape, generator=g))
    set_ratios(model, [0.4, 0.7])
    diffcr.freeze(model)
    kw = inputs((100, 900))
    with torch.no_grad():
        want = _run(model, kw)
    diffcr.save(model, tmp_path / "ck")
    fresh, _ = _case(family)
    diffcr.load(fresh, tmp_path / "ck")
    assert diffcr.routing_state(fresh).frozen
    with torch.no_grad():
        assert torch.equal(_run(fresh, kw), want)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_the_same_training_step(family):
    results = []
    for ckpt in (False, True):
        model, inputs = _case(family)
        diffcr.convert(model, DiffCRConfig(num_regions=4, path="compat"))
        set_ratios(model, [0.35, 0.55, 0.75, 0.95])
        if ckpt:
            model.enable_gradient_checkpointing()
        model.train()
        y = _run(model, inputs((100, 900)))
        (y.square().mean() + diffcr.ratio_loss(model)).backward()
        results.append((y.detach(), [b.ratio.kept.grad.clone()
                                     for b in diffcr.routed_blocks(model).values()]))
    (y0, g0), (y1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_model_compiles_fullgraph(family):
    """diffcr.compile_model (torch.compile, fullgraph=True: any graph break fails) of a frozen
    routed model, mixed regions in one batch, equals the eager model."""
    torch._dynamo.reset()
    model, inputs = _case(family)
    diffcr.convert(model, DiffCRConfig(num_regions=4))
    set_ratios(model, [0.3, 0.5, 0.8, 1.0])
    diffcr.freeze(model)
    kw = inputs((100, 900))
    with torch.no_grad():
        want = _run(model, kw)
        diffcr.compile_model(model, backend="eager")
        assert torch.equal(_run(model, kw), want)


# ------------------------------------------------------------------ family specifics
def test_wan_per_token_timesteps_route_by_the_noisiest_token():
    """Wan 2.2 TI2V: one timestep per token (the conditioning frame at 0) and a per-token temb
    [B, N, 6, D] gathered with the tokens; a sample's region is that of its largest timestep."""
    model, inputs = _case("wan")
    diffcr.convert(model, DiffCRConfig(num_regions=4))
    set_ratios(model, [0.3, 0.5, 0.8, 1.0])
    diffcr.freeze(model)
    kw = inputs((100, 900))
    N = 32
    t = kw["timestep"][:, None].expand(-1, N).clone()
    t[:, :16] = 0  # first latent frame: conditioning
    kw["timestep"] = t
    seen = []
    blk = diffcr.routed_blocks(model)[0]
    blk.register_forward_hook(
        lambda m, a, k, o: seen.append((a[2] if len(a) > 2 else k["temb"]).shape),
        with_kwargs=True)
    with torch.no_grad():
        out = _run(model, kw)
    assert torch.isfinite(out).all()
    assert diffcr.routing_state(model).regions == [0, 3]
    assert seen and len(seen[0]) == 4 and seen[0][1] == N  # per-token temb reached the block


def test_wan_refuses_a_per_token_temb_of_the_wrong_length():
    model, inputs = _case("wan")
    diffcr.convert(model, DiffCRConfig(num_regions=1))
    set_ratios(model, 0.5)
    diffcr.freeze(model)
    blk = diffcr.routed_blocks(model)[0]
    x = torch.randn(2, 32, 24)
    diffcr.set_timestep(model, [100, 900])
    rope = model.rope(torch.randn(2, 4, 2, 8, 8))
    with pytest.raises(ValueError, match="per-token temb has 31 tokens but the block input has 32"):
        blk(x, torch.randn(2, 5, 24), torch.randn(2, 31, 6, 24), rope)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_lora_layer_gets_a_gradient(family):
    """diffcr.add_lora on the family's default targets: every adapter takes part in the loss
    (a layer whose output a block never uses would get no gradient, which DDP refuses)."""
    pytest.importorskip("peft")
    model, inputs = _case(family)
    diffcr.convert(model, DiffCRConfig(num_regions=2))
    diffcr.add_lora(model, rank=2)
    set_ratios(model, [0.5, 0.8])
    model.train()
    (_run(model, inputs((100, 900))).square().mean() + diffcr.ratio_loss(model)).backward()
    lora_b = {n: p for n, p in model.named_parameters() if ".lora_B." in n}
    assert lora_b
    dead = [n for n, p in lora_b.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead[:3]
    assert all(p.grad is None for n, p in model.named_parameters()
               if ".lora_" not in n and not n.endswith(("router.weight", "ratio.kept")))


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_repeated_blocks_and_declared_modules_see_the_routed_blocks(family):
    """diffusers matches ``_repeated_blocks`` (``compile_repeated_blocks``) and
    ``_no_split_modules`` (device maps, offloading) by class name: a converted model declares
    its ``Routed*`` classes too, and ``_keep_in_fp32_modules`` declares the router and ratio;
    revert removes all three. Regional compilation then runs the routed blocks (same output)."""
    factory, inputs = FAMILY_CASES[family]
    model = factory().eval()
    cls = type(model)
    diffcr.convert(model, DiffCRConfig(target_kept_ratio=0.5))
    set_ratios(model, 0.5)
    diffcr.freeze(model)
    routed = {type(b).__name__ for b in diffcr.routed_blocks(model).values()}
    assert {"router", "ratio"} <= set(model._keep_in_fp32_modules)
    for attr in ("_repeated_blocks", "_no_split_modules"):
        names = getattr(cls, attr, None)
        if names:
            assert set(model.__dict__[attr]) >= set(names)
            base = {n[len("Routed"):] for n in routed}
            assert routed & set(model.__dict__[attr]) == {
                f"Routed{n}" for n in base if n in names}
    if getattr(cls, "_repeated_blocks", None) and hasattr(model, "compile_repeated_blocks"):
        kw = inputs([500, 500])
        with torch.no_grad():
            want = model(**kw).sample
        model.compile_repeated_blocks(backend="eager")
        with torch.no_grad():
            got = model(**kw).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch._dynamo.reset()
    else:
        diffcr.revert(model)
        assert not {"_repeated_blocks", "_no_split_modules",
                    "_keep_in_fp32_modules"} & set(model.__dict__)


def test_declared_module_names_given_as_one_string(monkeypatch):
    """diffusers accepts ``_keep_in_fp32_modules`` (and the other name lists) as one bare
    string; convert extends it as one name, not as its characters."""
    factory, _ = FAMILY_CASES["wan"]
    model = factory()
    monkeypatch.setattr(type(model), "_keep_in_fp32_modules", "time_embedder")
    monkeypatch.setattr(type(model), "_no_split_modules", "WanTransformerBlock")
    diffcr.convert(model, DiffCRConfig())
    assert model._keep_in_fp32_modules == ["time_embedder", "router", "ratio"]
    assert model._no_split_modules == ["WanTransformerBlock", "RoutedWanTransformerBlock"]


def _regionally_compiled_families():
    import diffusers

    return [f for f in FAMILIES
            if any(getattr(getattr(diffusers, c, None), "_repeated_blocks", None)
                   for c in diffcr.families()[f].model_classes)]


@pytest.mark.parametrize("family", _regionally_compiled_families())
def test_compile_repeated_blocks_fullgraph_with_per_block_ratios(family):
    """diffusers' regional compile with ``fullgraph=True`` on a frozen model whose blocks keep
    different ratios (as a fine-tuned one does). One block class is compiled for blocks with
    other frozen ratios, which Dynamo traced as symbolic floats, so ``fullgraph`` failed (the
    host kept count needs the value). The ratios are now constants guarded by value
    (``routing.static_ratios``). Every denoising step equals eager, across region changes; a
    repeated step compiles nothing new; and there is one graph per distinct (block class,
    ratios of the regions in the batch) (docs/ecosystem.md#torchcompile)."""
    factory, inputs = FAMILY_CASES[family]
    model = factory().eval()
    diffcr.convert(model, DiffCRConfig(num_regions=4))
    with torch.no_grad():
        for i, b in enumerate(diffcr.routed_blocks(model).values()):
            b.ratio.kept.copy_(torch.tensor([0.3, 0.5, 0.7, 0.9]) - 0.1 * (i % 2))
    diffcr.freeze(model)
    st = diffcr.routing_state(model)
    assert len({tuple(r.frozen_bins) for r in st.blocks.values()}) == 2
    times = ([900, 900], [600, 600], [100, 900])
    steps = [inputs(t) for t in times]
    with torch.no_grad():
        want = [model(**kw).sample for kw in steps]
    expected = set()
    for t in times:
        regions = [min(3, v * 4 // 1000) for v in t]
        for name, r in st.blocks.items():
            cls = type(diffcr.routed_blocks(model)[name])
            expected.add((cls, tuple(r.frozen_bins[g] for g in regions)))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    before = counters["stats"]["unique_graphs"]
    try:
        with torch._dynamo.config.patch(recompile_limit=64):
            model.compile_repeated_blocks(fullgraph=True, backend="eager")
            with torch.no_grad():
                got = [model(**kw).sample for kw in steps]
                graphs = counters["stats"]["unique_graphs"] - before
                again = model(**steps[0]).sample
            assert counters["stats"]["unique_graphs"] - before == graphs
        # diffusers hands HunyuanVideo's blocks inputs of more than one memory layout: stride
        # guards add two graphs there
        assert graphs == len(expected) + (2 if family == "hunyuanvideo" else 0)
        for a, b in zip(got + [again], want + want[:1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_compile_whole_model_fullgraph(family):
    """``torch.compile(model, fullgraph=True)`` and ``model.compile(fullgraph=True)`` on a
    converted, frozen model, as users call them: the timestep's host copy stays outside the
    graph (no break, so ``fullgraph`` traces), the output equals eager for a batch of two
    timestep regions, a deep copy carries its own call and compile, and revert removes both
    attributes. The eager backend checks the tracing without inductor's CPU compile time;
    ``model.compile`` is compiled on one family (the same code path for all)."""
    import copy

    factory, inputs = FAMILY_CASES[family]
    model = factory().eval()
    diffcr.convert(model, DiffCRConfig(target_kept_ratio=0.5))
    set_ratios(model, [0.3, 0.5, 0.7, 0.9])
    diffcr.freeze(model)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        kw = inputs([900, 100])
        with torch.no_grad():
            _run(model, inputs([100, 900]))  # other regions: a stale capture would show
            got = _run(compiled, kw)
            want = _run(model, kw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        twin = copy.deepcopy(model)
        assert twin.__call__.__self__.model is twin and twin.compile.__self__.model is twin
        if family == "dit":
            twin.compile(fullgraph=True, backend="eager")
            with torch.no_grad():
                _run(twin, inputs([100, 900]))  # compiles and runs other regions first
                torch.testing.assert_close(_run(twin, kw), want, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()
    diffcr.revert(model)
    assert not {"__call__", "compile"} & set(model.__dict__)


def test_convert_on_the_meta_device_then_load_the_weights():
    """A model built and converted on the meta device (``init_empty_weights``, as
    ``from_pretrained`` and big-model loading build it), then loaded with ``assign=True``, moves
    to the CPU and computes what the converted original does. The ratio used to hold a
    non-persistent buffer, which no checkpoint fills: it stayed on meta and ``.to()`` failed."""
    accelerate = pytest.importorskip("accelerate")
    from tiny_models import tiny_flux

    factory, inputs = FAMILY_CASES["flux"]
    ref = factory()
    diffcr.convert(ref, DiffCRConfig(num_regions=2))
    set_ratios(ref, [0.5, 0.8])
    with accelerate.init_empty_weights(include_buffers=True):
        model = tiny_flux()
    diffcr.convert(model, DiffCRConfig(num_regions=2))
    assert all(p.is_meta for p in model.parameters())
    model.load_state_dict(ref.state_dict(), assign=True)
    model.to("cpu")
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    kw = inputs([100, 900])
    ref.train()
    model.train()  # two bins: the ratio's bins are read
    torch.testing.assert_close(model(**kw).sample, ref(**kw).sample)
