"""The token-cache pass (``diffcr_kernels.apply_token_cache_``): the reference against a naive
per-row loop of its definition, every compiled / Triton backend against the reference (odd
sizes, k = 1, k = N, ragged k, two bins, cache in another dtype than the stream), opcheck, and
bad inputs refused before anything is written."""
import pytest
import torch

import diffcr_kernels as dk
from diffcr_kernels import reference as ref

from op_cases import CASES, op_inputs

def _case(B, N, D, ks, dtype, cache_dtype, device):
    """A routed block's output after its scatter-back, its selection, the inputs of the
    selected rows, and a cache of earlier updates."""
    x, sel, shift, scale, attn_update, mlp_out, gate = op_inputs(B, N, D, ks, dtype, device)
    out = ref.scatter_back(x, sel.indices, sel.cu_seqlens, sel.seg_weight, attn_update,
                           mlp_out, sel.scores, gate)
    g = torch.Generator().manual_seed(7)
    cache = torch.randn(B * N, D, generator=g).to(device, cache_dtype)
    slot = dk.token_cache_slots(sel, B * N)
    x_rows = x.reshape(B * N, D).index_select(0, sel.indices)
    two_bins = len(ks[0]) > 1
    miss = None
    if two_bins:  # 1 - coverage: a row in one bin only misses the block with the other's weight
        from diffcr.token_cache import coverage

        miss = (1 - coverage(sel, B * N)).to(ref.acc_dtype(dtype))
    return out, cache, slot, x_rows, miss


def _naive(out, cache, slot, x_rows, miss):
    """The definition, row by row, in float64."""
    B, N, D = out.shape
    o = out.reshape(B * N, D).clone()
    c = cache.clone()
    for r in range(B * N):
        t = int(slot[r])
        m = float(miss[r]) if miss is not None else (1.0 if t < 0 else 0.0)
        if m != 0:
            o[r] = (o[r].double() + m * cache[r].double()).to(out.dtype)
        if t >= 0:
            c[r] = (o[r].double() - x_rows[t].double()).to(cache.dtype)
    return o.view(B, N, D), c


@pytest.mark.parametrize("B,N,D,ks", CASES)
def test_reference_matches_the_definition(B, N, D, ks):
    out, cache, slot, x_rows, miss = _case(B, N, D, ks, torch.float32, torch.float32, "cpu")
    want_o, want_c = _naive(out, cache, slot, x_rows, miss)
    o, c = out.clone(), cache.clone()
    ref.apply_token_cache_(o, c, slot, x_rows, miss)
    torch.testing.assert_close(o, want_o, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c, want_c, rtol=1e-6, atol=1e-6)
    skipped = slot < 0
    if miss is None:  # inference: skipped rows got exactly x + cache, selected rows untouched
        assert torch.equal(o.view(-1, D)[~skipped], out.view(-1, D)[~skipped])
        assert torch.equal(c[skipped], cache[skipped])


@pytest.mark.parametrize("B,N,D,ks", CASES)
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32),
                                               (torch.float32, torch.bfloat16),
                                               (torch.bfloat16, torch.bfloat16),
                                               (torch.float64, torch.float32)],
                         ids=["fp32", "fp32-bf16cache", "bf16", "fp64-fp32cache"])
def test_backend_matches_the_reference(B, N, D, ks, dtype, cache_dtype, device, ext_backend):
    out, cache, slot, x_rows, miss = _case(B, N, D, ks, dtype, cache_dtype, device)
    o_ref, c_ref = out.clone(), cache.clone()
    ref.apply_token_cache_(o_ref, c_ref, slot, x_rows, miss)
    o, c = out.clone(), cache.clone()
    with dk.use_backend(ext_backend):
        ret = dk.apply_token_cache_(o, c, slot, x_rows, miss)
    assert ret is o
    if dtype == torch.bfloat16 or cache_dtype == torch.bfloat16:
        # one rounding to bf16 of the same fp32 sum; the Triton interpreter rounds toward zero
        tol = dict(rtol=2 ** -7, atol=2 ** -7 * 8)
    else:
        tol = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(o, o_ref, **tol)
    torch.testing.assert_close(c, c_ref, **tol)
    # rows the pass must not touch are bit for bit unchanged
    R = B * N
    m = (slot < 0).float() if miss is None else miss.float()
    assert torch.equal(o.view(R, D)[m == 0], out.view(R, D)[m == 0])
    assert torch.equal(c[slot < 0], cache[slot < 0])


def test_opcheck(device, ext_backend):
    from diffcr_kernels.ops import _ns

    out, cache, slot, x_rows, miss = _case(2, 11, 8, [[3, 6], [11, 2]], torch.float32,
                                           torch.float32, device)
    op = _ns(ext_backend).apply_token_cache_
    torch.library.opcheck(op, (out.clone(), cache.clone(), slot, x_rows, miss))
    torch.library.opcheck(op, (out.clone(), cache.clone(), slot, x_rows, None))


def test_traces_under_torch_compile(device, ext_backend):
    out, cache, slot, x_rows, _ = _case(2, 11, 8, [[3], [11]], torch.float32, torch.float32,
                                        device)

    def f(o, c):
        dk.apply_token_cache_(o, c, slot, x_rows)
        return o, c

    with dk.use_backend(ext_backend):
        eo, ec = f(out.clone(), cache.clone())
        co, cc = torch.compile(f, fullgraph=True, backend="eager")(out.clone(), cache.clone())
    assert torch.equal(co, eo) and torch.equal(cc, ec)


def test_bad_inputs_are_refused_on_the_reference(device):
    _check_bad_inputs(device, "reference")


def test_bad_inputs_are_refused_before_anything_is_written(device, ext_backend):
    _check_bad_inputs(device, ext_backend)


def _check_bad_inputs(device, any_backend):
    out, cache, slot, x_rows, miss = _case(2, 9, 8, [[3, 5], [4, 2]], torch.float32,
                                           torch.float32, device)
    R, D = 18, 8
    bad_slot = slot.clone()
    bad_slot[4] = x_rows.shape[0]
    cases = [
        (dict(slot=slot.long()), "slot must be"),
        (dict(slot=slot[:-1]), "slot"),
        (dict(slot=bad_slot), r"slot\[4\]"),
        (dict(cache=cache[:-1]), "cache"),
        (dict(cache=cache.t().contiguous().t()), "contiguous"),
        (dict(cache=cache.to(torch.int32)), "cache must be"),
        (dict(x_rows=x_rows[:, :-1]), "x_rows"),
        (dict(x_rows=x_rows.double()), "x_rows has dtype"),
        (dict(miss=miss.double()), "miss"),
        (dict(miss=miss[:-1]), "miss"),
        (dict(out=out.transpose(0, 1).contiguous().transpose(0, 1)), "contiguous"),
    ]
    for change, match in cases:
        args = dict(out=out.clone(), cache=cache.clone(), slot=slot, x_rows=x_rows, miss=miss)
        args.update(change)
        before = (args["out"].clone(), args["cache"].clone())
        with dk.use_backend(any_backend):
            with pytest.raises(ValueError, match=match):
                dk.apply_token_cache_(args["out"], args["cache"], args["slot"], args["x_rows"],
                                      args["miss"])
        assert torch.equal(args["out"], before[0]) and torch.equal(args["cache"], before[1])
    alias = out.clone()
    with pytest.raises(ValueError, match="shares memory"):
        dk.apply_token_cache_(alias, alias.view(R, D), slot, x_rows, miss)
    with pytest.raises(ValueError, match="inference"):
        dk.apply_token_cache_(out.clone().requires_grad_(), cache.clone(), slot, x_rows, miss)


def test_raw_op_refuses_bad_shapes_and_strides(device, ext_backend):
    """``torch.ops.diffcr.apply_token_cache_`` (what a compiled graph calls, without the Python
    checks) refuses the same inputs."""
    from diffcr_kernels.ops import _ns

    op = _ns(ext_backend).apply_token_cache_
    out, cache, slot, x_rows, miss = _case(2, 9, 8, [[3], [4]], torch.float32, torch.float32,
                                           device)
    bad_slot = slot.clone()
    bad_slot[0] = 99
    for args, match in [
        ((out, cache[:-1], slot, x_rows, None), "cache"),
        ((out, cache, slot.long(), x_rows, None), "slot"),
        ((out, cache, slot, x_rows.double(), None), "x_rows"),
        ((out.transpose(0, 1), cache, slot, x_rows, None), "out"),
        ((out, cache.t().contiguous().t(), slot, x_rows, None), "contiguous"),
        ((out, cache, slot, x_rows, torch.zeros(3, device=device)), "miss"),
    ] + ([((out, cache, bad_slot, x_rows, None), r"slot\[0\]")]
         if device.type == "cpu" else []):
        before = (out.clone(), cache.clone())
        with pytest.raises((ValueError, RuntimeError), match=match):
            op(*args)
        assert torch.equal(out, before[0]) and torch.equal(cache, before[1])
