"""Varlen attention dispatch: every path that can run here against the reference."""
import pytest
import torch

import diffcr_kernels as dk
from diffcr_kernels import reference as ref
from diffcr_kernels.attention import available_attention_backends


def _segments(lengths_q, lengths_k, H=2, Dh=8, dtype=torch.float32, device="cpu"):
    cq = torch.tensor([0] + list(torch.tensor(lengths_q).cumsum(0)), dtype=torch.int32)
    ck = torch.tensor([0] + list(torch.tensor(lengths_k).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(cq[-1]), H, Dh, dtype=dtype, device=device)
    k = torch.randn(int(ck[-1]), H, Dh, dtype=dtype, device=device)
    v = torch.randn(int(ck[-1]), H, Dh, dtype=dtype, device=device)
    return q, k, v, cq.to(device), ck.to(device), max(lengths_q), max(lengths_k)


@pytest.mark.parametrize("backend", ["sdpa_segments", "sdpa_grouped", "reference", None])
@pytest.mark.parametrize("lq,lk", [([5, 1, 9], [5, 1, 9]), ([3, 7], [11, 2]), ([1], [1]),
                                   ([4, 6, 4, 6], [4, 6, 4, 6]), ([2, 3], [0, 3]),
                                   ([4, 6, 4, 6, 4, 6], [4, 6, 4, 6, 4, 6]),  # periodic, P = 2
                                   ([3, 3, 5, 3, 3, 5], [2, 2, 7, 2, 2, 7]),  # periodic, P = 3
                                   ([4, 6, 6, 4], [4, 6, 6, 4]),              # groups, not periodic
                                   ([2, 2, 2, 2], [3, 3, 3, 3])])             # P = 1
def test_ragged_paths_match_reference(backend, lq, lk):
    q, k, v, cq, ck, mq, mk = _segments(lq, lk)
    out = dk.varlen_attention(q, k, v, cq, ck, mq, mk, backend=backend, seqlens_q=lq,
                              seqlens_k=lk)
    expect = ref.varlen_attention(q, k, v, cq, ck, mq, mk)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [None, 0.3])
def test_uniform_sdpa_matches_reference(scale):
    q, k, v, cq, ck, mq, mk = _segments([6, 6, 6], [4, 4, 4])
    out = dk.varlen_attention(q, k, v, cq, ck, mq, mk, scale, uniform=True)
    expect = ref.varlen_attention(q, k, v, cq, ck, mq, mk, scale)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lens", [[4, 7], [4, 7, 4, 7, 4, 7], [4, 7, 7, 4, 5]])
def test_self_attention_gradients_match_reference(lens):
    """Per-segment, periodic (split along the sample dim) and grouped (stacked) paths."""
    q, k, v, cq, ck, mq, mk = _segments(lens, lens)
    grads = []
    for backend in ("sdpa_segments", "sdpa_grouped", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        dk.varlen_attention(*leaves, cq, ck, mq, mk, backend=backend, seqlens_q=lens,
                            seqlens_k=lens).square().sum().backward()
        grads.append([t.grad for t in leaves])
    for got in grads[:-1]:
        for a, b in zip(got, grads[-1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("B,k", [(3, 3), (3, [2, 5, 3]), (2, [[2, 4], [2, 4]])],
                         ids=["uniform", "ragged", "two-bins"])
def test_selection_attention_is_varlen_attention_over_the_selection(B, k):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    sel = dk.select_topk(torch.rand(B, 6, generator=g), k)
    q, k_, v = (torch.randn(sel.total, 2, 8, generator=g) for _ in range(3))
    out = dk.selection_attention(q, k_, v, sel)
    expect = ref.varlen_attention(q, k_, v, sel.cu_seqlens, sel.cu_seqlens, sel.max_seqlen,
                                  sel.max_seqlen)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(out, dk.varlen_attention(
        q, k_, v, sel.cu_seqlens, sel.cu_seqlens, sel.max_seqlen, sel.max_seqlen,
        uniform=sel.uniform, seqlens_q=sel.seqlens, seqlens_k=sel.seqlens))


def test_slot_period():
    from diffcr_kernels.attention import slot_period

    assert slot_period([4, 6, 4, 6]) == 2
    assert slot_period([4, 6, 4, 6], [1, 2, 1, 3]) is None
    assert slot_period([5, 5, 5]) == 1
    assert slot_period([4, 6]) is None and slot_period([7]) is None and slot_period([]) is None


def test_forced_unavailable_backend_raises():
    q, k, v, cq, ck, mq, mk = _segments([3], [3])
    with pytest.raises(RuntimeError, match="cannot run here"):
        dk.varlen_attention(q, k, v, cq, ck, mq, mk, backend="flash2")
    with pytest.raises(RuntimeError, match="uniform=True"):
        dk.varlen_attention(q, k, v, cq, ck, mq, mk, backend="sdpa_uniform")
    with pytest.raises(ValueError, match="must be one of"):
        dk.varlen_attention(q, k, v, cq, ck, mq, mk, backend="nope")


def test_report_lists_every_backend():
    rep = available_attention_backends()
    assert set(rep) == {"flash3", "flash2", "torch_varlen", "sdpa_uniform", "sdpa_grouped",
                        "sdpa_segments", "reference"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_default_path_matches_reference(dtype):
    q, k, v, cq, ck, mq, mk = _segments([33, 7, 64], [33, 120, 5], H=4, Dh=64, dtype=dtype,
                                        device="cuda")
    out = dk.varlen_attention(q, k, v, cq, ck, mq, mk)
    expect = ref.varlen_attention(q.float(), k.float(), v.float(), cq, ck, mq, mk)
    torch.testing.assert_close(out.float(), expect, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("case,pattern", [
    ("heads", "same number of heads"),
    ("head_dim", "same head dim"),
    ("kv_rows", "k has .* rows but v has"),
    ("dtype", "k is torch.float64 on cpu but q is torch.float32"),
    ("cu_dtype", "cu_seqlens_q must be a 1-D int32 tensor"),
    ("cu_short", "the segments cover 5 rows but q has 8"),
    ("max_small", "a segment has 5 rows but max_seqlen_q = 2"),
    ("max_type", "max_seqlen_k must be an int"),
    ("seqlens", "seqlens_q has 1 segments but cu_seqlens_q describes 2"),
])
@pytest.mark.parametrize("backend", [None, "reference", "sdpa_segments"])
def test_varlen_attention_refuses_bad_inputs_on_every_path(case, pattern, backend):
    """Checked once before any path runs: the reference used to drop the rows a short
    cu_seqlens did not cover, and mismatched heads, dtypes and max_seqlen went through."""
    q, k, v, cq, ck, mq, mk = _segments([3, 5], [3, 5])
    kw = dict(backend=backend)
    if case == "heads":
        k, v = k[:, :1], v[:, :1]
    elif case == "head_dim":
        k = k[..., :-1]
    elif case == "kv_rows":
        v = v[:-1]
    elif case == "dtype":
        k = k.double()
    elif case == "cu_dtype":
        cq = cq.long()
    elif case == "cu_short":
        cq = torch.tensor([0, 3, 5], dtype=torch.int32)
    elif case == "max_small":
        mq = 2
    elif case == "max_type":
        mk = 5.0
    elif case == "seqlens":
        kw.update(seqlens_q=[8], seqlens_k=[3, 5])
    with pytest.raises(ValueError, match=pattern):
        dk.varlen_attention(q, k, v, cq, ck, mq, mk, **kw)


_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("backend,uniform", [(None, False), (None, True), ("sdpa_segments", False),
                                             ("sdpa_grouped", False), ("reference", False)])
def test_nan_reaches_the_same_rows_on_every_path(device, where, backend, uniform):
    """A NaN in q, k or v makes exactly the output rows NaN that the reference makes NaN (the
    CPU flash SDPA kernel alone would return zeros for a NaN query)."""
    lens = [4, 4, 4] if uniform else [3, 5, 4]
    torch.manual_seed(0)
    q, k, v, cq, ck, mq, mk = _segments(lens, lens, device=device)
    t = {"q": q, "k": k, "v": v}[where]
    t[4, 1, 2] = float("nan")
    out = dk.varlen_attention(q, k, v, cq, ck, mq, mk, uniform=uniform, backend=backend,
                              seqlens_q=lens, seqlens_k=lens)
    expect = ref.varlen_attention(q.cpu(), k.cpu(), v.cpu(), cq.cpu(), ck.cpu(), mq, mk)
    assert torch.isnan(expect).any()
    assert torch.equal(torch.isnan(out.cpu()), torch.isnan(expect))
    finite = ~torch.isnan(expect)
    torch.testing.assert_close(out.cpu()[finite], expect[finite], rtol=1e-4, atol=1e-5)
