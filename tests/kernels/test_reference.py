"""The reference ops (the executable spec) against independent, loop-based definitions of
docs/method.md.

These naive versions loop over samples, segments and rows in Python and share no code with
``diffcr_kernels.reference``; if the vectorised reference drifts from the spec, these fail.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from diffcr_kernels import reference as ref

from op_cases import naive_select


# ---------------------------------------------------------------- naive definitions
def naive_gnm(x, idx, shift, scale, eps):
    B, N, D = x.shape
    out = []
    for r in idx.tolist():
        row = x.reshape(-1, D)[r].double()
        mu = row.mean()
        var = ((row - mu) ** 2).mean()
        y = (row - mu) / math.sqrt(var + eps)
        b = r // N
        if scale is not None:
            y = y * (1 + scale[b].double())
        if shift is not None:
            y = y + shift[b].double()
        out.append(y)
    return torch.stack(out) if out else x.new_zeros(0, D).double()


def naive_scatter(x, segs, w, attn_update, mlp_out, scores, gate):
    B, N, D = x.shape
    out = x.reshape(-1, D).double().clone()
    r = 0
    for j, seg in enumerate(segs):
        for dst in seg:
            c = attn_update[r].double()
            if mlp_out is not None:
                m = mlp_out[r].double()
                if gate is not None:
                    m = m * gate[dst // N].double()
                c = c + (scores[r].double() if scores is not None else 1.0) * m
            out[dst] += float(w[j]) * c
            r += 1
    return out.reshape(B, N, D)


# ---------------------------------------------------------------- kept_count
@pytest.mark.parametrize("kappa,n,k", [
    (1.0, 1024, 1024), (0.5, 1024, 512), (0.3, 1024, 308), (0.7, 10, 7), (0.1, 10, 1),
    (0.9, 10, 9), (0.2, 5, 1), (1e-6, 100, 1), (0.999, 4, 4), (0.8, 4096, 3277), (0.5, 1, 1),
])
def test_kept_count(kappa, n, k):
    assert ref.kept_count(kappa, n) == k


@pytest.mark.parametrize("kappa", [0.0, -0.1, 1.01, float("nan")])
def test_kept_count_rejects_bad_ratio(kappa):
    with pytest.raises(ValueError, match="kappa"):
        ref.kept_count(kappa, 10)


# ---------------------------------------------------------------- router scores
def test_router_scores_matches_definition():
    x = torch.randn(2, 7, 5)
    w = torch.randn(5)
    s = ref.router_scores(x, w)
    expect = torch.tensor([[1 / (1 + math.exp(-float(x[b, n] @ w))) for n in range(7)]
                           for b in range(2)])
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, expect, rtol=1e-5, atol=1e-6)


def test_router_scores_bf16_computes_in_fp32():
    x = torch.randn(1, 9, 16).bfloat16()
    w = torch.randn(16).bfloat16()
    s = ref.router_scores(x, w)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, torch.sigmoid(x.float() @ w.float()))


# ---------------------------------------------------------------- selection
@pytest.mark.parametrize("B,N,ks", [
    (1, 1, [[1]]), (1, 13, [[13]]), (1, 13, [[1]]), (3, 17, [[5], [1], [17]]),
    (2, 10, [[3, 7], [10, 4]]), (2, 33, [[2, 2], [2, 2]]),
])
def test_select_topk_matches_naive(B, N, ks):
    scores = torch.rand(B, N)
    scores[0, 0] = scores[0, -1]  # a tie
    sel = ref.select_topk(scores, torch.tensor(ks))
    segs = naive_select(scores, ks)
    assert sel.indices.tolist() == [i for s in segs for i in s]
    assert sel.cu_seqlens.dtype == torch.int32
    assert sel.cu_seqlens.tolist() == [0] + list(torch.tensor([len(s) for s in segs]).cumsum(0))
    assert sel.max_seqlen == max(len(s) for s in segs)
    assert sel.segs_per_sample == len(ks[0])
    assert sel.seg_sample.tolist() == [b for b in range(B) for _ in ks[b]]
    assert sel.uniform == (len({k for row in ks for k in row}) == 1)
    torch.testing.assert_close(sel.scores, scores.reshape(-1)[sel.indices])
    assert torch.equal(sel.row_sample(), sel.indices // N)


def test_select_ties_go_to_lower_index_and_nested_bins():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1]])
    sel = ref.select_topk(scores, torch.tensor([[2, 3]]))
    assert sel.indices.tolist() == [0, 1, 0, 1, 2]
    a = set(sel.indices[:2].tolist())
    b = set(sel.indices[2:].tolist())
    assert a <= b


@pytest.mark.parametrize("ks", [[[3, 5], [6, 2], [4, 4]], [[2, 7], [2, 7]], [[1, 3, 2], [5, 5, 4]]])
def test_shared_rows_maps_every_packed_row_to_its_token_in_the_largest_segment(ks):
    torch.manual_seed(0)
    B, N = len(ks), 9
    scores = torch.rand(B, N)
    scores[0, 3] = scores[0, 5]  # a tie: decided the same way in every segment
    sel = ref.select_topk(scores, ks, seg_weight=torch.rand(B, len(ks[0])))
    union, src = sel.shared_rows()
    big = [max(range(len(row)), key=lambda p: row[p]) for row in ks]
    assert union.seqlens == tuple(max(row) for row in ks)
    assert union.segs_per_sample == 1 and union.seg_sample.tolist() == list(range(B))
    assert union.cu_seqlens.tolist() == [0] + list(itertools.accumulate(union.seqlens))
    assert union.uniform == (len(set(union.seqlens)) == 1)
    expect = torch.cat([ref.select_topk(scores[b:b + 1], ks[b][big[b]]).indices + b * N
                        for b in range(B)])
    assert torch.equal(union.indices, expect)
    torch.testing.assert_close(union.scores, scores.reshape(-1)[union.indices])
    torch.testing.assert_close(union.seg_weight, sel.seg_weight.view(B, -1)[range(B), big])
    # every packed row reads its own token from the union
    assert src.dtype == torch.int64 and src.shape == sel.indices.shape
    assert torch.equal(union.indices.index_select(0, src), sel.indices)


def test_shared_rows_is_none_without_repeated_rows():
    scores = torch.rand(2, 6)
    assert ref.select_topk(scores, [3, 4]).shared_rows() is None  # one segment per sample
    sel = ref.select_topk(scores, [[2, 3], [3, 4]])
    hand = ref.Selection(**{f: getattr(sel, f) for f in ("indices", "cu_seqlens", "max_seqlen",
                                                          "scores", "seg_weight", "seg_sample",
                                                          "num_tokens", "segs_per_sample",
                                                          "uniform", "seqlens")})
    assert hand.shared_rows() is None  # not made by select_topk: nesting not known


def test_select_nan_scores_rank_last():
    scores = torch.tensor([[float("nan"), 0.2, 0.1, float("nan")]])
    assert ref.select_topk(scores, 2).indices.tolist() == [1, 2]
    assert ref.select_topk(scores, 3).indices.tolist() == [0, 1, 2]


def test_select_int_k_and_weights():
    scores = torch.rand(3, 8)
    sel = ref.select_topk(scores, 4, seg_weight=torch.tensor([0.25, 0.5, 1.0]))
    assert sel.uniform and sel.max_seqlen == 4 and sel.total == 12
    assert sel.seg_weight.tolist() == [0.25, 0.5, 1.0]


@pytest.mark.parametrize("k", [0, 9, [[3], [0]], [[1, 2, 3]]])
def test_select_rejects_bad_k(k):
    with pytest.raises(ValueError):
        ref.select_topk(torch.rand(2, 8), torch.tensor(k) if isinstance(k, list) else k)


def test_select_scores_gradient_flows_to_selected():
    scores = torch.rand(2, 6, requires_grad=True)
    sel = ref.select_topk(scores, torch.tensor([2, 4]))
    sel.scores.sum().backward()
    expect = torch.zeros(12)
    expect[sel.indices] = 1
    assert torch.equal(scores.grad.reshape(-1), expect)


# ---------------------------------------------------------------- gather + norm + modulate
@pytest.mark.parametrize("with_mod", [True, False])
def test_gather_norm_modulate_matches_naive(with_mod):
    x = torch.randn(3, 11, 19)
    idx = torch.tensor([0, 5, 10, 11, 21, 32, 5])
    shift = torch.randn(3, 19) if with_mod else None
    scale = torch.randn(3, 19) if with_mod else None
    y = ref.gather_norm_modulate(x, idx, shift, scale, eps=1e-6)
    torch.testing.assert_close(y.double(), naive_gnm(x, idx, shift, scale, 1e-6),
                               rtol=1e-5, atol=1e-5)


def test_gather_norm_affine_matches_layernorm_module():
    x = torch.randn(2, 5, 8)
    ln = torch.nn.LayerNorm(8, eps=1e-5)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    idx = torch.arange(10)
    y = ref.gather_norm_modulate(x, idx, weight=ln.weight, bias=ln.bias, eps=1e-5)
    torch.testing.assert_close(y, ln(x).reshape(10, 8))


# ---------------------------------------------------------------- scatter back
@pytest.mark.parametrize("parts", ["attn_update", "mlp_out", "scores", "gate", "all"])
def test_scatter_back_matches_naive(parts):
    B, N, D = 2, 9, 6
    x = torch.randn(B, N, D)
    scores = torch.rand(B, N)
    sel = ref.select_topk(scores, torch.tensor([[2, 5], [9, 1]]),
                          torch.tensor([[0.3, 0.7], [0.6, 0.4]]))
    T = sel.total
    attn_update = torch.randn(T, D)
    mlp_out = torch.randn(T, D) if parts in ("mlp_out", "scores", "gate", "all") else None
    s = sel.scores if parts in ("scores", "all") else None
    gate = torch.randn(B, D) if parts in ("gate", "all") else None
    out = ref.scatter_back(x, sel.indices, sel.cu_seqlens, sel.seg_weight, attn_update, mlp_out, s,
                           gate)
    segs = [sel.indices[a:b].tolist() for a, b in zip(sel.cu_seqlens[:-1].tolist(),
                                                        sel.cu_seqlens[1:].tolist())]
    torch.testing.assert_close(
        out.double(), naive_scatter(x, segs, sel.seg_weight.tolist(), attn_update, mlp_out, s,
                                    gate), rtol=1e-5, atol=1e-5)


def test_two_bin_scatter_is_weighted_combination_of_branches():
    """method §2: out = w_a F_a(x) + w_b F_b(x) when each branch is x + scatter(delta)."""
    B, N, D = 2, 12, 4
    x = torch.randn(B, N, D)
    scores = torch.rand(B, N)
    sel = ref.select_topk(scores, torch.tensor([[3, 6], [4, 8]]),
                          torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    delta_full = torch.randn(B * N, D)  # per-token update, same function in both branches
    attn_update = delta_full[sel.indices]
    out = ref.scatter_back(x, sel.indices, sel.cu_seqlens, sel.seg_weight, attn_update)
    expect = torch.empty_like(x)
    for b, (ka, kb, wa, wb) in enumerate([(3, 6, 0.25, 0.75), (4, 8, 0.5, 0.5)]):
        top = torch.sort(scores[b], descending=True, stable=True).indices
        fa, fb = x[b].clone(), x[b].clone()
        fa[top[:ka]] += delta_full[b * N + top[:ka]]
        fb[top[:kb]] += delta_full[b * N + top[:kb]]
        expect[b] = wa * fa + wb * fb
    torch.testing.assert_close(out, expect)


# ---------------------------------------------------------------- attention
def naive_attention(q, k, v, cq, ck, scale):
    outs = []
    for i in range(len(cq) - 1):
        qi, ki, vi = q[cq[i]:cq[i + 1]].double(), k[ck[i]:ck[i + 1]].double(), \
            v[ck[i]:ck[i + 1]].double()
        for r in range(qi.shape[0]):
            heads = []
            for h in range(q.shape[1]):
                if ki.shape[0] == 0:
                    heads.append(torch.zeros(v.shape[-1], dtype=torch.float64))
                    continue
                logits = ki[:, h] @ qi[r, h] * scale
                p = torch.softmax(logits, 0)
                heads.append(p @ vi[:, h])
            outs.append(torch.stack(heads))
    return torch.stack(outs)


def test_varlen_attention_matches_naive():
    H, Dh = 2, 4
    cq = [0, 3, 4, 9]
    ck = [0, 5, 7, 7]  # last segment has no keys -> zeros
    q = torch.randn(9, H, Dh)
    k = torch.randn(7, H, Dh)
    v = torch.randn(7, H, Dh)
    out = ref.varlen_attention(q, k, v, torch.tensor(cq, dtype=torch.int32),
                               torch.tensor(ck, dtype=torch.int32), 5, 5)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, cq, ck, Dh ** -0.5),
                               rtol=1e-5, atol=1e-6)


def test_pack_text_masks_keys():
    B, L, C = 2, 5, 3
    text = torch.randn(B, L, C)
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]])
    seg_sample = torch.tensor([0, 0, 1, 1])
    packed, cu, mx = ref.pack_text(text, seg_sample, mask)
    assert cu.tolist() == [0, 3, 6, 7, 8] and mx == 3
    torch.testing.assert_close(packed[:3], text[0, [0, 1, 3]])
    torch.testing.assert_close(packed[3:6], text[0, [0, 1, 3]])
    torch.testing.assert_close(packed[6:], text[1, [0, 0]])


def test_cross_attention_with_mask_equals_masked_sdpa():
    B, L, H, Dh, Nq = 2, 6, 2, 4, 5
    text = torch.randn(B, L, H * Dh)
    mask = torch.tensor([[1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1]])
    q = torch.randn(B, Nq, H, Dh)
    packed, cu_k, mk = ref.pack_text(text, torch.arange(B), mask)
    kv = packed.view(-1, H, Dh)
    cu_q = torch.tensor([0, Nq, 2 * Nq], dtype=torch.int32)
    out = ref.varlen_attention(q.reshape(-1, H, Dh), kv, kv, cu_q, cu_k, Nq, mk)
    dense = F.scaled_dot_product_attention(
        q.transpose(1, 2), text.view(B, L, H, Dh).transpose(1, 2),
        text.view(B, L, H, Dh).transpose(1, 2), attn_mask=mask.bool()[:, None, None, :])
    torch.testing.assert_close(out, dense.transpose(1, 2).reshape(-1, H, Dh), rtol=1e-5,
                               atol=1e-5)


# ---------------------------------------------------------------- autograd of the reference
def test_reference_gradcheck_float64():
    B, N, D = 2, 5, 4
    x = torch.randn(B, N, D, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    gate = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(D, dtype=torch.float64, requires_grad=True)
    seg_w = torch.tensor([0.3, 0.7, 0.6, 0.4], dtype=torch.float64, requires_grad=True)
    ks = torch.tensor([[2, 4], [3, 5]])

    def f(x, shift, scale, gate, w, seg_w):
        s = ref.router_scores(x, w)
        sel = ref.select_topk(s, ks, seg_w.view(B, 2))
        y = ref.gather_norm_modulate(x, sel.indices, shift, scale)
        attn_update = torch.tanh(y)
        mlp_out = y * 0.5
        return ref.scatter_back(x, sel.indices, sel.cu_seqlens, sel.seg_weight, attn_update,
                                mlp_out, sel.scores, gate)

    assert torch.autograd.gradcheck(f, (x, shift, scale, gate, w, seg_w))


def test_reference_attention_gradcheck_float64():
    q = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    cq = torch.tensor([0, 2, 6], dtype=torch.int32)
    ck = torch.tensor([0, 3, 5], dtype=torch.int32)
    assert torch.autograd.gradcheck(
        lambda q, k, v: ref.varlen_attention(q, k, v, cq, ck, 4, 3), (q, k, v))
