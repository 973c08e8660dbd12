"""Attention of the two nested training bins from the larger bin's rows
(:func:`diffcr_kernels.shared_bins_attention` / :func:`diffcr_kernels.nested_attention`):
equal, forward and backward, to the varlen attention over both bins' rows expanded."""
import pytest
import torch

import diffcr_kernels as dk
from diffcr_kernels import reference as ref


@pytest.fixture(autouse=True)
def _nested_on_small_shapes(monkeypatch):
    """These shapes are below the rows from which the nested path pays on CPU: run it."""
    import diffcr_kernels.attention as A
    monkeypatch.setattr(A, "NESTED_MIN_ROWS", 0)


def _case(ks, N=12, H=2, Dh=8, Dv=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(ks)
    sel = dk.select_topk(torch.rand(B, N, generator=g, dtype=torch.float64), ks)
    union, src = sel.shared_rows()
    U = union.total
    q, k = (torch.randn(U, H, Dh, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(U, H, Dv or Dh, generator=g, dtype=dtype)
    return sel, src, q, k, v


def _expected(q, k, v, sel, src, scale=None):
    cu = sel.cu_seqlens
    return ref.varlen_attention(q[src], k[src], v[src], cu, cu, sel.max_seqlen, sel.max_seqlen,
                                scale)


# (smaller, larger) bins per sample, in either segment order; ragged across samples;
# bins of equal length (no extra keys); one token
CASES = [[[3, 5]], [[5, 3]], [[2, 7], [2, 7], [4, 6]], [[4, 4], [1, 12]], [[1, 1]],
         [[6, 9], [9, 6], [6, 9]]]


@pytest.mark.parametrize("ks", CASES)
@pytest.mark.parametrize("backend,Dv", [(None, None), (None, 5), ("sdpa_grouped", None),
                                        ("reference", None)])
def test_matches_expanded_attention_forward_and_backward(ks, backend, Dv):
    sel, src, q, k, v = _case(ks, Dv=Dv)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = dk.shared_bins_attention(*leaves, sel, backend=backend)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expect = _expected(*ref_leaves, sel, src)
    torch.testing.assert_close(out, expect, rtol=1e-10, atol=1e-10)
    gout = torch.randn_like(out)
    torch.autograd.backward(out, gout)
    torch.autograd.backward(expect, gout)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9)


def test_gradcheck_cpu_path():
    sel, src, q, k, v = _case([[2, 5], [3, 4]], N=6, H=1, Dh=3)
    torch.autograd.gradcheck(lambda a, b, c: dk.shared_bins_attention(a, b, c, sel, 0.7),
                             tuple(t.requires_grad_() for t in (q, k, v)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_close_to_float64(dtype):
    sel, src, q, k, v = _case([[40, 52], [52, 40]], N=64, H=3, Dh=16, dtype=torch.float64)
    out = dk.shared_bins_attention(q.to(dtype), k.to(dtype), v.to(dtype), sel)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), _expected(q, k, v, sel, src), rtol=tol, atol=tol)


def test_under_autocast_runs_in_the_low_dtype():
    sel, src, q, k, v = _case([[3, 5], [4, 6]], dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dk.shared_bins_attention(q, k, v, sel)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _expected(q, k, v, sel, src), rtol=2e-2,
                               atol=2e-2)


def test_nan_query_gives_nan_rows_as_every_path():
    sel, src, q, k, v = _case([[3, 5]], dtype=torch.float32)
    q[1, 0, 0] = float("nan")
    out = dk.shared_bins_attention(q, k, v, sel)
    expect = _expected(q, k, v, sel, src)
    assert torch.equal(out.isnan(), expect.isnan()) and out.isnan().any()
    ok = ~expect.isnan()
    torch.testing.assert_close(out[ok], expect[ok])


def test_rejects_a_selection_without_two_nested_segments():
    sel = dk.select_topk(torch.rand(2, 8), [3, 4])
    q = torch.randn(sel.total, 1, 4)
    with pytest.raises(ValueError, match="two segments per sample"):
        dk.shared_bins_attention(q, q, q, sel)


def test_rejects_bad_tables_naming_them():
    sel, src, q, k, v = _case([[3, 5]], dtype=torch.float32)
    src_, ulens, lo_rows, lo_lens, out_map = dk.nested_plan(sel)
    lo_idx = src_[lo_rows]
    with pytest.raises(ValueError, match="out_map"):
        dk.nested_attention(q, k, v, ulens, lo_idx, lo_lens, out_map[:-1], sel.seqlens)
    with pytest.raises(ValueError, match="lo_idx"):
        dk.nested_attention(q, k, v, ulens, lo_idx.int(), lo_lens, out_map, sel.seqlens)
    sel2, _, q2, k2, v2 = _case([[2, 3], [2, 3]], dtype=torch.float32)
    src2, ulens2, lo_rows2, lo_lens2, out_map2 = dk.nested_plan(sel2)
    swapped = torch.cat([src2[lo_rows2][2:], src2[lo_rows2][:2]])  # each sample's rows swapped
    with pytest.raises(ValueError, match="outside its sample"):
        dk.nested_attention(q2, k2, v2, ulens2, swapped, lo_lens2, out_map2, sel2.seqlens)
    with pytest.raises(ValueError, match="repeats"):
        dk.nested_attention(q, k, v, ulens, torch.zeros_like(lo_idx), lo_lens, out_map,
                            sel.seqlens)


def test_cpu_path_is_the_nested_one_and_a_forced_backend_is_not(monkeypatch):
    """The CPU tests above check the nested kernels, not only the fallback."""
    import diffcr_kernels.attention as A
    calls = []
    orig = A._NestedAttention.apply
    monkeypatch.setattr(A._NestedAttention, "apply",
                        lambda *a: (calls.append(1), orig(*a))[1])
    sel, src, q, k, v = _case([[3, 5]])
    dk.shared_bins_attention(q, k, v, sel)
    assert calls == [1]
    dk.shared_bins_attention(q, k, v, sel, backend="sdpa_grouped")
    assert calls == [1]
    monkeypatch.setattr(A, "NESTED_MIN_ROWS", 9)  # 3 + 5 rows: below it, the expanded rows
    out = dk.shared_bins_attention(q, k, v, sel)
    assert calls == [1]
    torch.testing.assert_close(out, _expected(q, k, v, sel, src), rtol=1e-10, atol=1e-10)
    monkeypatch.setattr(A, "NESTED_MIN_ROWS", 8)
    dk.shared_bins_attention(q, k, v, sel)
    assert calls == [1, 1]
