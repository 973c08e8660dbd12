"""Triton kernels (diffcr_kernels.triton) against the reference and the compiled C++ CPU ops.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py
before any kernel import) on CPU tensors, so every shape here is tiny. Fresh random inputs, odd
sizes (N and D not powers of two, B = 1, k = 1, k = N, ragged k, two segments per sample),
float32 (tight), bfloat16 (against the float32 reference, loose), float64 backward against
torch.autograd through the reference, NaN-poisoned rows the kernels must not read, pass-through
of rows that are never selected, the D-chunk loop and argument validation.
"""
import os

import pytest
import torch

try:
    import diffcr_kernels.triton as dkt
except Exception as e:  # pragma: no cover - depends on the environment
    pytest.skip(f"diffcr_kernels.triton cannot be imported: {e}", allow_module_level=True)
if not dkt.AVAILABLE:  # pragma: no cover - depends on the environment
    pytest.skip(f"triton is not importable: {dkt.IMPORT_ERROR}", allow_module_level=True)

from diffcr_kernels import _ext  # noqa: E402
from diffcr_kernels import reference as ref  # noqa: E402
from diffcr_kernels.triton import _common as C  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if INTERPRET:
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():  # pragma: no cover - GPU runs
    DEVICE = torch.device("cuda")
else:  # pragma: no cover
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1",
                allow_module_level=True)

# on a GPU these are GPU tests (benchmarks/gpu_check.sh selects `-m gpu`)
pytestmark = [pytest.mark.gpu] if DEVICE.type == "cuda" else []

HAS_CPU_OPS = DEVICE.type == "cpu" and _ext.LOADED and _ext.has_kernel("scatter_back", "CPU")

# (B, N, D, ks): ks is [B][P] kept counts; T = sum(ks) stays <= 64 for the interpreter
CASES = [
    pytest.param(1, 1, 8, [[1]], id="N1"),
    pytest.param(1, 37, 24, [[1]], id="B1-k1"),
    pytest.param(1, 37, 24, [[37]], id="B1-kN"),
    pytest.param(3, 29, 40, [[5], [29], [1]], id="ragged"),
    pytest.param(2, 23, 72, [[13, 5], [23, 7]], id="two-bins-ragged"),
    pytest.param(3, 14, 33, [[8, 12]] * 3, id="two-bins-uniform"),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def _inputs(B, N, D, ks, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + B * 1000 + N * 10 + D)
    x = torch.randn(B, N, D, generator=g).to(DEVICE, dtype)
    scores = torch.rand(B, N, generator=g).to(DEVICE)
    P = len(ks[0])
    w = (0.5 + torch.rand(B, P, generator=g)).to(DEVICE)
    sel = ref.select_topk(scores, torch.tensor(ks, device=DEVICE), w)
    T = sel.total
    a = ref.acc_dtype(dtype)
    t = dict(
        x=x, sel=sel,
        shift=torch.randn(B, D, generator=g).to(DEVICE, dtype),
        scale=(0.5 * torch.randn(B, D, generator=g)).to(DEVICE, dtype),
        weight=(1 + 0.3 * torch.randn(D, generator=g)).to(DEVICE, dtype),
        bias=(0.3 * torch.randn(D, generator=g)).to(DEVICE, dtype),
        attn_update=torch.randn(T, D, generator=g).to(DEVICE, dtype),
        mlp_out=torch.randn(T, D, generator=g).to(DEVICE, dtype),
        gate=torch.randn(B, D, generator=g).to(DEVICE, dtype),
        seg_weight=sel.seg_weight.to(a),
        scores=sel.scores.to(a),
    )
    return t


def _f32(t):
    return None if t is None else t.float()


def _check(out, expect, dtype):
    """fp32/fp64: tight; low precision: against the fp32 reference, ~2e-2 of the magnitudes."""
    if dtype == torch.float32:
        torch.testing.assert_close(out, expect.to(out.dtype), rtol=1e-5, atol=1e-5)
    elif dtype == torch.float64:
        torch.testing.assert_close(out, expect.to(out.dtype), rtol=1e-12, atol=1e-12)
    else:
        mag = max(1.0, expect.abs().max().item())
        torch.testing.assert_close(out.float(), expect.float(), rtol=2e-2, atol=2e-2 * mag)


def _selected_mask(sel, rows):
    keep = torch.zeros(rows, dtype=torch.bool, device=DEVICE)
    keep[sel.indices] = True
    return keep


def _row_segment(sel):
    return sel.row_segment()


# ---------------------------------------------------------------- gather + norm + modulate
@pytest.mark.parametrize("B,N,D,ks", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mod", ["plain", "mod", "affine"])
def test_gather_norm_modulate_forward(B, N, D, ks, dtype, mod):
    t = _inputs(B, N, D, ks, dtype)
    x, sel = t["x"], t["sel"]
    shift = t["shift"] if mod != "plain" else None
    scale = t["scale"] if mod != "plain" else None
    weight = t["weight"] if mod == "affine" else None
    bias = t["bias"] if mod == "affine" else None
    # poison every row that is not selected: the kernel must never read it
    keep = _selected_mask(sel, B * N)
    poisoned = x.clone().reshape(B * N, D)
    poisoned[~keep] = float("nan")
    poisoned = poisoned.view(B, N, D)
    y, mean, rstd = dkt.gather_norm_modulate(poisoned, sel.indices, shift, scale, weight, bias,
                                             1e-6)
    a = ref.acc_dtype(dtype)
    assert y.dtype == dtype and y.shape == (sel.total, D)
    assert mean.dtype == a and rstd.dtype == a and mean.shape == rstd.shape == (sel.total,)
    assert torch.isfinite(y).all() and torch.isfinite(mean).all() and torch.isfinite(rstd).all()
    expect = ref.gather_norm_modulate(x.float(), sel.indices, _f32(shift), _f32(scale),
                                      _f32(weight), _f32(bias), eps=1e-6)
    _check(y, expect, dtype)
    rows = ref.gather_rows(x, sel.indices).float()
    torch.testing.assert_close(mean, rows.mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd, torch.rsqrt(rows.var(1, unbiased=False) + 1e-6),
                               rtol=1e-5, atol=1e-5)
    if HAS_CPU_OPS and dtype == torch.float32:
        y2, mean2, rstd2 = torch.ops.diffcr.gather_norm_modulate(x, sel.indices, shift, scale,
                                                                 weight, bias, 1e-6)
        torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mean, mean2, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rstd, rstd2, rtol=1e-6, atol=1e-6)


def test_gather_norm_modulate_float64_and_float16():
    t = _inputs(2, 19, 12, [[4], [19]], torch.float64)
    x, sel = t["x"], t["sel"]
    args = (t["shift"], t["scale"], t["weight"], t["bias"])
    y, mean, rstd = dkt.gather_norm_modulate(x, sel.indices, *args, 1e-5)
    assert mean.dtype == rstd.dtype == torch.float64
    _check(y, ref.gather_norm_modulate(x, sel.indices, *args, eps=1e-5), torch.float64)
    # float16 data: float32 math, float16 output
    h = [a.half() for a in args]
    y16, m16, _ = dkt.gather_norm_modulate(x.half(), sel.indices, *h, 1e-5)
    assert y16.dtype == torch.float16 and m16.dtype == torch.float32
    _check(y16, ref.gather_norm_modulate(x.half().float(), sel.indices,
                                         *[a.float() for a in h], eps=1e-5), torch.float16)


def test_gather_norm_modulate_non_contiguous_inputs():
    t = _inputs(3, 11, 24, [[3], [11], [6]], torch.float32)
    x, sel = t["x"], t["sel"]
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    shift = t["shift"].t().contiguous().t()
    assert not xt.is_contiguous() and not shift.is_contiguous()
    y, _, _ = dkt.gather_norm_modulate(xt, sel.indices, shift, t["scale"], None, None, 1e-6)
    _check(y, ref.gather_norm_modulate(x, sel.indices, t["shift"], t["scale"]), torch.float32)


@pytest.mark.parametrize("B,N,D,ks", CASES)
@pytest.mark.parametrize("mod", ["plain", "mod", "affine"])
def test_gather_norm_modulate_backward_float64(B, N, D, ks, mod):
    t = _inputs(B, N, D, ks, torch.float64)
    x, sel = t["x"], t["sel"]
    shift = t["shift"] if mod != "plain" else None
    scale = t["scale"] if mod != "plain" else None
    weight = t["weight"] if mod == "affine" else None
    bias = t["bias"] if mod == "affine" else None
    gy = torch.randn(sel.total, D, dtype=torch.float64, device=DEVICE)
    _, mean, rstd = dkt.gather_norm_modulate(x, sel.indices, shift, scale, weight, bias, 1e-6)
    rows = dkt.gather_norm_modulate_backward(gy, x, sel.indices, mean, rstd, scale, weight)
    assert rows.dtype == torch.float64 and rows.shape == (sel.total, D)
    grad_x = torch.zeros(B * N, D, dtype=torch.float64, device=DEVICE).index_add_(
        0, sel.indices, rows).view(B, N, D)
    xr = x.clone().requires_grad_()
    ref.gather_norm_modulate(xr, sel.indices, shift, scale, weight, bias, eps=1e-6).backward(gy)
    torch.testing.assert_close(grad_x, xr.grad, rtol=1e-10, atol=1e-10)
    if HAS_CPU_OPS:
        rows2 = torch.ops.diffcr.gather_norm_modulate_backward(gy, x, sel.indices, mean, rstd,
                                                               scale, weight)
        torch.testing.assert_close(rows, rows2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_norm_modulate_backward_low_precision(dtype):
    B, N, D, ks = 2, 23, 40, [[13, 5], [23, 7]]
    t = _inputs(B, N, D, ks, dtype)
    x, sel, scale, weight = t["x"], t["sel"], t["scale"], t["weight"]
    gy = torch.randn(sel.total, D, device=DEVICE).to(dtype)
    _, mean, rstd = dkt.gather_norm_modulate(x, sel.indices, t["shift"], scale, weight,
                                             t["bias"], 1e-6)
    rows = dkt.gather_norm_modulate_backward(gy, x, sel.indices, mean, rstd, scale, weight)
    assert rows.dtype == dtype
    # per-row gradient from autograd through the reference on the gathered rows (float32)
    xr = x.float().requires_grad_()
    y = ref.gather_norm_modulate(xr, sel.indices, t["shift"].float(), scale.float(),
                                 weight.float(), t["bias"].float(), eps=1e-6)
    expect = torch.autograd.grad(y, xr, gy.float())[0]
    got = torch.zeros(B * N, D, device=DEVICE).index_add_(0, sel.indices, rows.float())
    _check(got.view(B, N, D), expect, dtype)


# ---------------------------------------------------------------- scatter back
def _parts(t, parts):
    mlp_out = t["mlp_out"] if parts != "attn_update" else None
    scores = t["scores"] if parts in ("all", "no-gate") else None
    gate = t["gate"] if parts in ("all", "no-scores") else None
    return mlp_out, scores, gate


@pytest.mark.parametrize("B,N,D,ks", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parts", ["attn_update", "no-gate", "no-scores", "all"])
def test_scatter_back_forward(B, N, D, ks, dtype, parts):
    t = _inputs(B, N, D, ks, dtype)
    x, sel = t["x"], t["sel"]
    mlp_out, scores, gate = _parts(t, parts)
    x_before = x.clone()
    out = dkt.scatter_back(x, sel.indices, sel.cu_seqlens, sel.max_seqlen, sel.segs_per_sample,
                           t["seg_weight"], t["attn_update"], mlp_out, scores, gate)
    assert torch.equal(x, x_before), "scatter_back modified its input"
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    keep = _selected_mask(sel, B * N)
    # rows never selected are passed through bit-exactly
    assert torch.equal(out.reshape(B * N, D)[~keep], x.reshape(B * N, D)[~keep])
    expect = ref.scatter_back(x.float(), sel.indices, sel.cu_seqlens, t["seg_weight"],
                              t["attn_update"].float(), _f32(mlp_out), scores, _f32(gate))
    _check(out, expect, dtype)
    if HAS_CPU_OPS and dtype == torch.float32:
        out2 = torch.ops.diffcr.scatter_back(x, sel.indices, sel.cu_seqlens, sel.max_seqlen,
                                             sel.segs_per_sample, t["seg_weight"], t["attn_update"],
                                             mlp_out, scores, gate)
        torch.testing.assert_close(out, out2, rtol=1e-6, atol=1e-6)


def test_scatter_back_poisoned_unselected_rows_stay_poisoned():
    B, N, D = 2, 31, 16
    t = _inputs(B, N, D, [[3, 9], [1, 31]], torch.float32)
    x, sel = t["x"], t["sel"]
    keep = _selected_mask(sel, B * N)
    xp = x.clone().reshape(B * N, D)
    xp[~keep] = float("nan")
    out = dkt.scatter_back(xp.view(B, N, D), sel.indices, sel.cu_seqlens, sel.max_seqlen, 2,
                           t["seg_weight"], t["attn_update"], t["mlp_out"], t["scores"], t["gate"])
    out = out.reshape(B * N, D)
    assert torch.isfinite(out[keep]).all()
    assert torch.isnan(out[~keep]).all()


def test_scatter_back_deterministic_and_loose_max_seqlen():
    t = _inputs(2, 23, 72, [[13, 5], [23, 7]], torch.float32)
    x, sel = t["x"], t["sel"]
    args = (t["seg_weight"], t["attn_update"], t["mlp_out"], t["scores"], t["gate"])
    a = dkt.scatter_back(x, sel.indices, sel.cu_seqlens, sel.max_seqlen, 2, *args)
    b = dkt.scatter_back(x, sel.indices, sel.cu_seqlens, sel.max_seqlen, 2, *args)
    assert torch.equal(a, b)
    # a larger max_seqlen than needed only launches idle programs
    c = dkt.scatter_back(x, sel.indices, sel.cu_seqlens, sel.max_seqlen + 5, 2, *args)
    assert torch.equal(a, c)
    expect = ref.scatter_back(x, sel.indices, sel.cu_seqlens, t["seg_weight"], t["attn_update"],
                              t["mlp_out"], t["scores"], t["gate"])
    torch.testing.assert_close(a, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,N,D,ks", CASES)
@pytest.mark.parametrize("parts",
                         ["attn_update", "no-gate", "no-scores", "all", "scores-no-mlp_out"])
def test_scatter_back_backward_float64(B, N, D, ks, parts):
    t = _inputs(B, N, D, ks, torch.float64)
    x, sel = t["x"], t["sel"]
    if parts == "scores-no-mlp_out":
        mlp_out, scores, gate = None, t["scores"], None
    else:
        mlp_out, scores, gate = _parts(t, parts)
    G = torch.randn(B, N, D, dtype=torch.float64, device=DEVICE)
    g_attn_update, g_mlp_out, gs, dots = dkt.scatter_back_backward(G, sel.indices, sel.cu_seqlens,
                                                                   sel.max_seqlen, t["seg_weight"],
                                                                   t["attn_update"], mlp_out,
                                                                   scores, gate)
    T = sel.total
    assert g_attn_update.shape == (T, D) and g_attn_update.dtype == torch.float64
    assert g_mlp_out.shape == ((T if mlp_out is not None else 0),
                               D) and g_mlp_out.dtype == torch.float64
    assert gs.shape == ((T if scores is not None else 0),) and gs.dtype == torch.float64
    assert dots.shape == (T,) and dots.dtype == torch.float64
    # autograd through the reference
    leaves = {"attn_update": t["attn_update"], "w": t["seg_weight"]}
    if mlp_out is not None:
        leaves["mlp_out"] = mlp_out
    if scores is not None:
        leaves["s"] = scores
    if gate is not None:
        leaves["gate"] = gate
    leaves = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    out = ref.scatter_back(x, sel.indices, sel.cu_seqlens, leaves["w"], leaves["attn_update"],
                           leaves.get("mlp_out"), leaves.get("s"), leaves.get("gate"))
    out.backward(G)
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g_attn_update, leaves["attn_update"].grad, **tol)
    if mlp_out is not None:
        torch.testing.assert_close(g_mlp_out, leaves["mlp_out"].grad, **tol)
    if scores is not None:
        expect_s = leaves["s"].grad if leaves["s"].grad is not None else torch.zeros_like(gs)
        torch.testing.assert_close(gs, expect_s, **tol)
        if mlp_out is None:
            assert torch.equal(gs, torch.zeros_like(gs))
    S = sel.num_segments
    grad_w = torch.zeros(S, dtype=torch.float64, device=DEVICE).index_add_(0, _row_segment(sel),
                                                                          dots)
    torch.testing.assert_close(grad_w, leaves["w"].grad, **tol)
    if gate is not None:  # how ops.py turns the per-row outputs into the gate gradient
        contrib = g_attn_update * mlp_out * (scores.unsqueeze(1) if scores is not None else 1)
        grad_gate = torch.zeros(B, D, dtype=torch.float64, device=DEVICE).index_add_(
            0, sel.row_sample(), contrib)
        torch.testing.assert_close(grad_gate, leaves["gate"].grad, **tol)
    if HAS_CPU_OPS:
        expect = torch.ops.diffcr.scatter_back_backward(G, sel.indices, sel.cu_seqlens,
                                                        sel.max_seqlen, t["seg_weight"],
                                                        t["attn_update"], mlp_out, scores, gate)
        for got, exp in zip((g_attn_update, g_mlp_out, gs, dots), expect):
            assert got.shape == exp.shape and got.dtype == exp.dtype
            torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_back_backward_low_precision(dtype):
    B, N, D, ks = 3, 29, 40, [[5], [29], [1]]
    t = _inputs(B, N, D, ks, dtype)
    sel = t["sel"]
    G = torch.randn(B, N, D, device=DEVICE).to(dtype)
    got = dkt.scatter_back_backward(G, sel.indices, sel.cu_seqlens, sel.max_seqlen, t["seg_weight"],
                                    t["attn_update"], t["mlp_out"], t["scores"], t["gate"])
    assert got[0].dtype == got[1].dtype == dtype
    assert got[2].dtype == got[3].dtype == torch.float32
    t32 = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
    leaves = [
        t32[k].clone().requires_grad_() for k in ("attn_update", "mlp_out", "scores", "seg_weight")
    ]
    out = ref.scatter_back(t32["x"], sel.indices, sel.cu_seqlens, leaves[3], leaves[0],
                           leaves[1], leaves[2], t32["gate"])
    out.backward(G.float())
    _check(got[0], leaves[0].grad, dtype)
    _check(got[1], leaves[1].grad, dtype)
    _check(got[2], leaves[2].grad, torch.float32 if dtype == torch.float32 else dtype)
    grad_w = torch.zeros(sel.num_segments, device=DEVICE).index_add_(0, sel.row_segment(),
                                                                    got[3])
    _check(grad_w, leaves[3].grad, torch.float32 if dtype == torch.float32 else dtype)


# ---------------------------------------------------------------- router scores
@pytest.mark.parametrize("B,N,D", [(1, 37, 24), (3, 29, 40), (2, 5, 72), (1, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=["fp32", "bf16", "fp64"])
def test_router_scores(B, N, D, dtype):
    g = torch.Generator().manual_seed(B * 100 + N + D)
    x32 = torch.randn(B, N, D, generator=g).to(DEVICE)
    w32 = (torch.randn(D, generator=g) / D ** 0.5).to(DEVICE)
    x, w = x32.to(dtype), w32.to(dtype)
    s = dkt.router_scores(x, w)
    a = ref.acc_dtype(dtype)
    assert s.dtype == a and s.shape == (B, N)
    # same (upcast) inputs: only the summation order differs, even for bf16
    expect = ref.router_scores(x, w)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(s, expect, rtol=tol, atol=tol)
    # bf16 data against the float32 reference on the float32 originals (before rounding): loose
    if dtype == torch.bfloat16:
        _check(s, ref.router_scores(x32, w32), dtype)
    # a router weight kept in float32 for bf16 activations
    wf = torch.randn(D, generator=g).to(DEVICE)
    torch.testing.assert_close(dkt.router_scores(x, wf), ref.router_scores(x, wf),
                               rtol=tol, atol=tol)


# ---------------------------------------------------------------- D-chunk loop, 1 row per tile
def test_chunked_hidden_dim_and_single_row_tiles(monkeypatch):
    """D larger than the chunk (MAX_BLOCK_D shrunk to 16: D = 40 is 16 + 16 + 8) and one row per
    program; every launcher against the reference."""
    monkeypatch.setattr(C, "MAX_BLOCK_D", 16)
    monkeypatch.setattr(C, "MAX_BLOCK_R", 1)
    B, N, D = 2, 13, 40
    t = _inputs(B, N, D, [[4, 13], [9, 2]], torch.float64)
    x, sel = t["x"], t["sel"]
    mods = (t["shift"], t["scale"], t["weight"], t["bias"])
    y, mean, rstd = dkt.gather_norm_modulate(x, sel.indices, *mods, 1e-6)
    _check(y, ref.gather_norm_modulate(x, sel.indices, *mods, eps=1e-6), torch.float64)
    gy = torch.randn_like(y)
    rows = dkt.gather_norm_modulate_backward(gy, x, sel.indices, mean, rstd, t["scale"],
                                             t["weight"])
    xr = x.clone().requires_grad_()
    ref.gather_norm_modulate(xr, sel.indices, *mods, eps=1e-6).backward(gy)
    torch.testing.assert_close(
        torch.zeros(B * N, D, dtype=x.dtype).index_add_(0, sel.indices, rows).view_as(x),
        xr.grad, rtol=1e-10, atol=1e-10)
    sb = (t["seg_weight"], t["attn_update"], t["mlp_out"], t["scores"], t["gate"])
    out = dkt.scatter_back(x, sel.indices, sel.cu_seqlens, sel.max_seqlen, 2, *sb)
    _check(out, ref.scatter_back(x, sel.indices, sel.cu_seqlens, *sb), torch.float64)
    G = torch.randn_like(x)
    g_attn_update, g_mlp_out, gs, dots = dkt.scatter_back_backward(G, sel.indices, sel.cu_seqlens,
                                                   sel.max_seqlen, *sb)
    leaves = [v.clone().requires_grad_() for v in sb]
    ref.scatter_back(x, sel.indices, sel.cu_seqlens, *leaves).backward(G)
    torch.testing.assert_close(g_attn_update, leaves[1].grad)
    torch.testing.assert_close(g_mlp_out, leaves[2].grad)
    torch.testing.assert_close(gs, leaves[3].grad)
    torch.testing.assert_close(
        torch.zeros(sel.num_segments, dtype=x.dtype).index_add_(0, sel.row_segment(), dots),
        leaves[0].grad)
    w = torch.randn(D, dtype=torch.float64)
    torch.testing.assert_close(dkt.router_scores(x, w), ref.router_scores(x, w))
    # float32 too (chunked sums in float32)
    x32 = x.float()
    y32, _, _ = dkt.gather_norm_modulate(x32, sel.indices, None, None, None, None, 1e-6)
    _check(y32, ref.gather_norm_modulate(x32, sel.indices), torch.float32)


# ---------------------------------------------------------------- empty inputs
def test_empty_selection():
    x = torch.randn(2, 5, 8, device=DEVICE)
    idx = torch.empty(0, dtype=torch.int64, device=DEVICE)
    cu = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    w = torch.empty(0, device=DEVICE)
    attn_update = torch.empty(0, 8, device=DEVICE)
    y, mean, rstd = dkt.gather_norm_modulate(x, idx, None, None, None, None, 1e-6)
    assert y.shape == (0, 8) and mean.shape == rstd.shape == (0,)
    assert dkt.gather_norm_modulate_backward(attn_update, x, idx, mean, rstd, None,
                                             None).shape == (0, 8)
    out = dkt.scatter_back(x, idx, cu, 0, 1, w, attn_update, None, None, None)
    assert torch.equal(out, x)
    g_attn_update, g_mlp_out, gs, dots = dkt.scatter_back_backward(x, idx, cu, 0, w, attn_update,
                                                                   attn_update, None, None)
    assert g_attn_update.shape == g_mlp_out.shape == (0, 8) and gs.shape == dots.shape == (0,)


# ---------------------------------------------------------------- argument validation
def test_bad_inputs_raise_clear_errors():
    t = _inputs(2, 9, 8, [[3], [4]], torch.float32)
    x, sel, shift, scale, attn_update = t["x"], t["sel"], t["shift"], t["scale"], t["attn_update"]
    idx, cu, sw, ms = sel.indices, sel.cu_seqlens, t["seg_weight"], sel.max_seqlen
    gnm = dkt.gather_norm_modulate
    with pytest.raises(ValueError, match="x must be"):
        gnm(x[0], idx, None, None, None, None, 1e-6)
    with pytest.raises(ValueError, match="x must be float32"):
        gnm(x.int(), idx, None, None, None, None, 1e-6)
    with pytest.raises(ValueError, match="shift has shape"):
        gnm(x, idx, shift[:1], scale, None, None, 1e-6)
    with pytest.raises(ValueError, match="idx must be int64"):
        gnm(x, idx.int(), shift, scale, None, None, 1e-6)
    with pytest.raises(ValueError, match="scale has dtype"):
        gnm(x, idx, shift, scale.double(), None, None, 1e-6)
    with pytest.raises(ValueError, match="weight has shape"):
        gnm(x, idx, None, None, torch.ones(7), None, 1e-6)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        gnm(x, idx, None, None, None, None, -1.0)
    bad = idx.clone()
    bad[0] = 2 * 9
    with pytest.raises(ValueError, match=r"idx\[0\] = 18 is out of range"):
        gnm(x, bad, None, None, None, None, 1e-6)
    y, mean, rstd = gnm(x, idx, None, None, None, None, 1e-6)
    with pytest.raises(ValueError, match="grad_y has shape"):
        dkt.gather_norm_modulate_backward(y[:-1], x, idx, mean, rstd, None, None)
    with pytest.raises(ValueError, match="mean has dtype"):
        dkt.gather_norm_modulate_backward(y, x, idx, mean.double(), rstd, None, None)
    with pytest.raises(ValueError, match="rstd has shape"):
        dkt.gather_norm_modulate_backward(y, x, idx, mean, rstd[:-1], None, None)

    sb = dkt.scatter_back
    with pytest.raises(ValueError, match="attn_update has shape"):
        sb(x, idx, cu, ms, 1, sw, attn_update[:-1], None, None, None)
    with pytest.raises(ValueError, match="mlp_out has dtype"):
        sb(x, idx, cu, ms, 1, sw, attn_update, attn_update.double(), None, None)
    with pytest.raises(ValueError, match="not a multiple of segs_per_sample"):
        sb(x, idx, cu, ms, 3, sw, attn_update, None, None, None)
    with pytest.raises(ValueError, match="segs_per_sample must be >= 1"):
        sb(x, idx, cu, ms, 0, sw, attn_update, None, None, None)
    with pytest.raises(ValueError, match="seg_weight has dtype"):
        sb(x, idx, cu, ms, 1, sw.double(), attn_update, None, None, None)
    with pytest.raises(ValueError, match="scores has shape"):
        sb(x, idx, cu, ms, 1, sw, attn_update, None, t["scores"][:-1], None)
    with pytest.raises(ValueError, match="gate has shape"):
        sb(x, idx, cu, ms, 1, sw, attn_update, t["mlp_out"], None, t["gate"][:, :-1])
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32 tensor"):
        sb(x, idx, cu.long(), ms, 1, sw, attn_update, None, None, None)
    cu_bad = cu.clone()
    cu_bad[-1] += 1
    with pytest.raises(ValueError, match="must equal the number of rows"):
        sb(x, idx, cu_bad, ms + 1, 1, sw, attn_update, None, None, None)
    with pytest.raises(ValueError, match="max_seqlen"):
        sb(x, idx, cu, 1, 1, sw, attn_update, None, None, None)
    with pytest.raises(ValueError, match="grad_out must be"):
        dkt.scatter_back_backward(x[0], idx, cu, ms, sw, attn_update, None, None, None)
    with pytest.raises(ValueError, match="attn_update has dtype"):
        dkt.scatter_back_backward(x, idx, cu, ms, sw, attn_update.double(), None, None, None)

    with pytest.raises(ValueError, match="weight must be"):
        dkt.router_scores(x, torch.ones(7))


def test_compiled_kernels_reject_cpu_tensors(monkeypatch):
    monkeypatch.setattr(C, "INTERPRETED", False)
    x = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="x is on cpu, but the Triton kernels need CUDA"):
        dkt.gather_norm_modulate(x, torch.arange(4), None, None, None, None, 1e-6)
    with pytest.raises(ValueError, match="grad_out is on cpu"):
        dkt.scatter_back_backward(x, torch.arange(4), torch.tensor([0, 4], dtype=torch.int32),
                                  4, torch.ones(1), torch.zeros(4, 8), None, None, None)


# ---------------------------------------------------------------- selection kernel (dispatch)
SELECT_CASES = [
    (1, 1, [[1]]), (1, 37, [[1]]), (1, 37, [[37]]), (3, 29, [[5], [29], [1]]),
    (2, 23, [[13, 5], [23, 7]]), (3, 14, [[8, 12]] * 3), (2, 64, [[32], [32]]),
]


@pytest.mark.parametrize("B,N,ks", SELECT_CASES)
def test_triton_select_matches_reference(B, N, ks):
    import diffcr_kernels as dk

    g = torch.Generator().manual_seed(B * 100 + N)
    scores = torch.rand(B, N, generator=g).to(DEVICE)
    if N > 5:
        scores[0, 2] = scores[0, 4]  # a tie: lower index first
        scores[-1, 1] = float("nan")  # NaN ranks last
        scores[-1, 3] = float("-inf")
    w = torch.rand(B, len(ks[0]), generator=g).to(DEVICE)
    expect = ref.select_topk(scores, ks, w)
    with dk.use_backend("triton"):
        got = dk.select_topk(scores, ks, w)
    assert torch.equal(got.indices, expect.indices)
    assert torch.equal(got.cu_seqlens, expect.cu_seqlens)
    torch.testing.assert_close(got.scores, expect.scores, equal_nan=True)
    assert got.seqlens == expect.seqlens and got.max_seqlen == expect.max_seqlen


def test_triton_select_ties_signed_zeros_and_ranks_float64_like_the_reference():
    """-0.0 and +0.0 tie (lower index first, as torch.sort), and float64 scores that float32
    would round to a tie select the same tokens as the reference (they take the torch sort)."""
    import diffcr_kernels as dk

    s = torch.tensor([[0.5, -0.0, 0.0, -0.0, 0.25, 0.0]]).to(DEVICE)
    with dk.use_backend("triton"):
        got = dk.select_topk(s, 4)
    assert got.indices.tolist() == ref.select_topk(s, 4).indices.tolist() == [0, 1, 2, 4]
    d = torch.tensor([[0.5, 0.5 + 1e-12, 0.5 + 2e-12, 0.1]], dtype=torch.float64).to(DEVICE)
    assert float(d[0, 1]) != float(d[0, 2]) and d[0, 1].float() == d[0, 2].float()
    with dk.use_backend("triton"):
        got = dk.select_topk(d, 1)
    assert got.indices.tolist() == ref.select_topk(d, 1).indices.tolist() == [2]
