"""Quantized weights under routing, on every family: torchao's ``quantize_`` (int8 and float8
weight-only), bitsandbytes layers (4-bit NF4 and 8-bit) and GGUF (diffusers' ``GGUFLinear``,
Q8_0).

The fused path calls the blocks' linear modules, so a quantized layer computes itself; where it
reads a weight directly (the Flux single block cuts ``proj_out`` by columns) it does so only
for a plain ``nn.Linear`` and calls the module otherwise (``models.common.plain_weight``).
Before that, a bitsandbytes 8-bit ``proj_out`` gave a silently wrong result and a 4-bit one a
shape error.

Each kind quantizes the linears of the transformer blocks, as the quantizers are used on DiTs
(the embedders and the final projection stay in float, diffusers' ``modules_to_not_convert`` /
``_keep_in_fp32_modules``). diffusers' bitsandbytes and GGUF quantizers load from checkpoints
and bitsandbytes' needs a GPU; here the same layer classes are made in place
(``bitsandbytes.nn.Linear4bit`` / ``Linear8bitLt`` quantize on ``.to("cpu")``, a
``GGUFParameter`` holds blocks made by the ``gguf`` package)."""
import copy

import pytest
import torch
from torch import nn

import diffcr
import diffcr_kernels as dk

from tiny_models import FAMILIES, FAMILY_CASES, FUSED_FAMILIES, run_model, set_ratios

BLOCK_LISTS = ("transformer_blocks.", "single_transformer_blocks.", "blocks.")
KINDS = ("torchao-int8", "torchao-float8", "bnb-4bit", "bnb-8bit", "gguf")


def _block_linears(model):
    """(parent, attribute name, linear) of every plain nn.Linear inside the block lists."""
    out = []
    for name, mod in model.named_modules():
        for cname, child in mod.named_children():
            full = f"{name}.{cname}" if name else cname
            if type(child) is nn.Linear and full.startswith(BLOCK_LISTS):
                out.append((mod, cname, child))
    return out


def _swap(model, make_layer):
    for parent, cname, lin in _block_linears(model):
        setattr(parent, cname, make_layer(lin))


def quantize(model, kind):
    """Quantize the block linears of ``model`` in place (after diffcr.convert or before:
    the router and ratio are not nn.Linear and stay float32)."""
    if kind.startswith("torchao"):
        q = pytest.importorskip("torchao.quantization")
        cfg = q.Int8WeightOnlyConfig() if kind == "torchao-int8" else q.Float8WeightOnlyConfig()
        q.quantize_(model, cfg, filter_fn=lambda m, fqn: type(m) is nn.Linear
                    and fqn.startswith(BLOCK_LISTS))
    elif kind.startswith("bnb"):
        bnb = pytest.importorskip("bitsandbytes")

        def layer(lin):
            bias = lin.bias is not None
            if kind == "bnb-4bit":
                new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=bias,
                                        compute_dtype=torch.float32, quant_type="nf4")
            else:
                new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=bias,
                                          has_fp16_weights=False)
            new.load_state_dict(lin.state_dict())
            return new.to("cpu")  # quantizes

        _swap(model, layer)
    else:
        gguf = pytest.importorskip("gguf")
        from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

        # Q8_0 blocks are 32 wide; the tiny models with narrower rows store BF16 blocks (still
        # GGUF bytes that only the module can read)
        T = gguf.GGMLQuantizationType
        qt = T.Q8_0 if all(lin.in_features % 32 == 0 for _, _, lin in _block_linears(model)) \
            else T.BF16

        def layer(lin):
            new = GGUFLinear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                             compute_dtype=torch.float32)
            blocks = gguf.quants.quantize(lin.weight.detach().numpy(), qt)
            new.weight = GGUFParameter(torch.from_numpy(blocks), quant_type=qt)
            if lin.bias is not None:
                new.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
            return new

        _swap(model, layer)
    return model


def _case(family):
    factory, inputs = FAMILY_CASES[family]
    return factory().requires_grad_(False), inputs([100, 900])


def _quantized_layers(model):
    n = sum(1 for m in model.modules()
            if type(m) is not nn.Linear and isinstance(m, nn.Linear))  # bnb / GGUF layers
    n += sum(1 for m in model.modules() if type(m) is nn.Linear
             and type(m.weight) not in (torch.Tensor, nn.Parameter))  # torchao subclasses
    return n


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_converted_model_at_kappa_one_is_the_quantized_model(family, kind):
    """Converted (fresh routers), then quantized: at kept ratio 1 the output is the
    unconverted quantized model's, bit for bit."""
    base, kw = _case(family)
    ref = quantize(copy.deepcopy(base), kind)
    assert _quantized_layers(ref) > 0
    model = copy.deepcopy(base)
    diffcr.convert(model, diffcr.DiffCRConfig(num_regions=2, gate="sigmoid2x"))
    quantize(model, kind)
    for b in diffcr.routed_blocks(model).values():
        assert b.router.weight.dtype == torch.float32 and type(b.router.weight) is nn.Parameter
    with torch.no_grad():
        assert torch.equal(run_model(model, kw), run_model(ref, kw))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_quantized_fused_equals_compat_below_one(family, kind):
    """Frozen at kept ratios [0.3, 0.6] per region: every routed block runs the fused path,
    routes exactly its k tokens per sample, and the output equals the compat path's (the
    block's own diffusers forward, which the quantized layers run as they always do)."""
    base, kw = _case(family)
    outs = {}
    for path in ("fused", "compat"):
        model = copy.deepcopy(base)
        diffcr.convert(model, diffcr.DiffCRConfig(num_regions=2, gate="sigmoid2x", path=path))
        quantize(model, kind)
        set_ratios(model, [0.3, 0.6])
        diffcr.freeze(model)
        with torch.no_grad():
            outs[path] = run_model(model, kw)
        st = diffcr.routing_state(model)
        for i, r in st.blocks.items():
            assert r.last_path == path, (i, r.last_path, r.last_compat_reason)
            sel = r.last_selection
            N = sel.num_tokens
            want = tuple(dk.kept_count(r.frozen_bins[reg], N) for reg in st.regions)
            assert sel.seqlens == want and want[0] < N
    torch.testing.assert_close(outs["fused"], outs["compat"], rtol=1e-5,
                               atol=1e-5 * outs["compat"].abs().max().item())


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_bnb_4bit_two_bin_training_fused_equals_compat(family):
    """QLoRA-style: routers and ratios trained over frozen 4-bit block weights (two bins per
    sample); the fused path's outputs and router gradients equal the compat path's."""
    base, kw = _case(family)
    res = {}
    for path in ("fused", "compat"):
        model = copy.deepcopy(base)
        diffcr.convert(model, diffcr.DiffCRConfig(num_regions=2, gate="sigmoid2x", path=path))
        quantize(model, "bnb-4bit")
        set_ratios(model, [0.45, 0.8])
        torch.manual_seed(5)
        for b in diffcr.routed_blocks(model).values():
            nn.init.normal_(b.router.weight, std=0.3)
        model.train()
        out = run_model(model, kw)
        (out.square().mean() + diffcr.ratio_loss(model)).backward()
        assert {r.last_path for r in diffcr.routing_state(model).blocks.values()} == {path}
        res[path] = (out.detach(), [b.router.weight.grad for b in
                                    diffcr.routed_blocks(model).values()])
    (of, gf), (oc, gc) = res["fused"], res["compat"]
    torch.testing.assert_close(of, oc, rtol=1e-5, atol=1e-5 * oc.abs().max().item())
    for a, b in zip(gf, gc):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * b.abs().max().item())


def test_flux_single_block_with_a_lora_proj_out_runs_fused():
    """A peft LoRA layer on the Flux single block's ``proj_out`` (not an ``nn.Linear``) is
    called as a module by the fused path (it used to send the block to compat): the fused
    path is taken and equals the compat path, outputs and LoRA gradients."""
    pytest.importorskip("peft")
    base, kw = _case("flux")
    res = {}
    for path in ("fused", "compat"):
        model = copy.deepcopy(base)
        diffcr.convert(model, diffcr.DiffCRConfig(num_regions=2, gate="sigmoid2x", path=path))
        torch.manual_seed(7)  # peft draws lora_A at random
        diffcr.add_lora(model, rank=2, targets=("proj_out",))
        lora_b = {n: p for n, p in model.named_parameters() if ".lora_B." in n}
        assert lora_b and all(".single_transformer_blocks." in f".{n}" for n in lora_b)
        with torch.no_grad():
            for p in lora_b.values():
                p.normal_(0, 0.1)  # peft zero-inits B: give the adapters a visible effect
        set_ratios(model, [0.45, 0.8])
        model.train()
        out = run_model(model, kw)
        out.square().mean().backward()
        st = diffcr.routing_state(model)
        assert {r.last_path for r in st.blocks.values()} == {path}
        res[path] = (out.detach(), {n: p.grad for n, p in lora_b.items()})
    (of, gf), (oc, gc) = res["fused"], res["compat"]
    torch.testing.assert_close(of, oc, rtol=1e-5, atol=1e-5 * oc.abs().max().item())
    for n, g in gc.items():
        assert g.abs().sum() > 0
        torch.testing.assert_close(gf[n], g, rtol=1e-4, atol=1e-5 * g.abs().max().item())
