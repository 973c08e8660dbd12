"""Compiled ops (C++ CPU kernels; CUDA kernels when a GPU is present) against the reference.

Fresh random inputs, odd sizes (N not a power of two, B = 1, k = 1, k = N, ragged k, two
segments per sample), float32 and bfloat16, forward and backward; gradcheck in float64; opcheck;
inputs poisoned with NaN where the kernel must not read them.
"""
import pytest
import torch
import torch.nn.functional as F

import diffcr_kernels as dk
from diffcr_kernels import reference as ref

from op_cases import CASES
from op_cases import op_inputs as _inputs

def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=0)


def _assert_close_lowp(out, expect_fp32, naive_lowp, factor=2.0):
    """bf16: the kernel's error against the fp32 reference must be within `factor` times the error
    of the same computation done naively in bf16 torch ops, plus one bf16 ulp of the largest
    magnitude (the Triton interpreter rounds fp32 -> bf16 toward zero, compiled Triton and the
    C++/CUDA kernels round to nearest)."""
    err = (out.float() - expect_fp32).abs().max().item()
    base = (naive_lowp.float() - expect_fp32).abs().max().item()
    floor = max(1e-2, 2.0 ** -7 * expect_fp32.abs().max().item())
    assert err <= factor * base + floor, (err, base, floor)


def _as_fp32_inputs(*ts):
    return [None if t is None else t.float() for t in ts]


# ---------------------------------------------------------------- gather + norm + modulate
@pytest.mark.parametrize("B,N,D,ks", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mod", [True, False], ids=["mod", "plain"])
def test_gather_norm_modulate_forward(device, ext_backend, B, N, D, ks, dtype, mod):
    x, sel, shift, scale, *_ = _inputs(B, N, D, ks, dtype, device, mod)
    # poison every row that is not selected: the kernel must never read it
    poisoned = x.clone().reshape(B * N, D)
    keep = torch.zeros(B * N, dtype=torch.bool, device=device)
    keep[sel.indices] = True
    poisoned[~keep] = float("nan")
    poisoned = poisoned.view(B, N, D)
    with dk.use_backend(ext_backend):
        y = dk.gather_norm_modulate(poisoned, sel.indices, shift, scale, eps=1e-6)
    assert y.dtype == dtype and y.shape == (sel.total, D)
    assert torch.isfinite(y).all()
    xf, sf, cf = _as_fp32_inputs(x, shift, scale)
    expect = ref.gather_norm_modulate(xf, sel.indices, sf, cf, eps=1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(y, expect, **_tol(dtype))
    else:
        rows = x.reshape(B * N, D)[sel.indices]
        naive = F.layer_norm(rows, (D,), eps=1e-6)
        b = sel.row_sample()
        if mod:
            naive = naive * (1 + scale[b]) + shift[b]
        _assert_close_lowp(y, expect, naive)


def test_gather_norm_modulate_affine(device, ext_backend):
    x, sel, shift, scale, *_ = _inputs(2, 19, 12, [[4], [19]], torch.float32, device)
    w = torch.randn(12, device=device)
    b = torch.randn(12, device=device)
    with dk.use_backend(ext_backend):
        y = dk.gather_norm_modulate(x, sel.indices, shift, scale, w, b, eps=1e-5)
    expect = ref.gather_norm_modulate(x, sel.indices, shift, scale, w, b, eps=1e-5)
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,N,D,ks", CASES)
def test_gather_norm_modulate_backward_fp32(device, ext_backend, B, N, D, ks):
    x, sel, shift, scale, *_ = _inputs(B, N, D, ks, torch.float32, device)
    w = torch.randn(D, device=device)
    bias = torch.randn(D, device=device)
    gy = torch.randn(sel.total, D, device=device)
    grads = {}
    for backend in ("reference", ext_backend):
        leaves = [t.clone().requires_grad_() for t in (x, shift, scale, w, bias)]
        with dk.use_backend(backend):
            y = dk.gather_norm_modulate(leaves[0], sel.indices, *leaves[1:], eps=1e-6)
        y.backward(gy)
        grads[backend] = [t.grad for t in leaves]
    for a, b in zip(grads["reference"], grads[ext_backend]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_gather_norm_modulate_gradcheck_float64(device, ext_backend):
    x, sel, shift, scale, *_ = _inputs(2, 7, 5, [[2, 5], [7, 1]], torch.float64, device)
    w = torch.randn(5, dtype=torch.float64, device=device)
    bias = torch.randn(5, dtype=torch.float64, device=device)
    leaves = [t.clone().requires_grad_() for t in (x, shift, scale, w, bias)]
    with dk.use_backend(ext_backend):
        assert torch.autograd.gradcheck(
            lambda *a: dk.gather_norm_modulate(a[0], sel.indices, *a[1:], eps=1e-6), leaves)


@pytest.mark.parametrize("affine,needs", [
    ("none", "all"), ("none", "scale"), ("weight", "all"), ("weight", "scale"),
    ("both", "scale"), ("both", "affine"), ("both", "x")])
def test_gather_norm_modulate_gradcheck_partial(device, ext_backend, affine, needs):
    """The backward takes separate branches for LN weight/bias present or absent and for which
    inputs need a gradient (PixArt: no LN affine, only the modulation needs one)."""
    x, sel, shift, scale, *_ = _inputs(2, 7, 5, [[2, 5], [7, 1]], torch.float64, device)
    w = torch.randn(5, dtype=torch.float64, device=device) if affine != "none" else None
    bias = torch.randn(5, dtype=torch.float64, device=device) if affine == "both" else None
    want = {"all": (0, 1, 2, 3, 4), "scale": (2,), "affine": (3, 4), "x": (0,)}[needs]
    args = [t if t is None else t.clone().requires_grad_(i in want)
            for i, t in enumerate((x, shift, scale, w, bias))]
    leaves = [t for t in args if t is not None and t.requires_grad]

    def f(*vals):
        it = iter(vals)
        full = [next(it) if (t is not None and t.requires_grad) else t for t in args]
        return dk.gather_norm_modulate(full[0], sel.indices, *full[1:], eps=1e-6)

    with dk.use_backend(ext_backend):
        assert torch.autograd.gradcheck(f, leaves)


# ---------------------------------------------------------------- scatter back
def _scatter(backend, x, sel, attn_update, mlp_out, gate, use_scores=True):
    with dk.use_backend(backend):
        return dk.scatter_back_selection(x, sel, attn_update, mlp_out, gate, use_scores=use_scores)


@pytest.mark.parametrize("B,N,D,ks", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("parts", ["attn_update", "gated", "all"])
def test_scatter_back_forward(device, ext_backend, B, N, D, ks, dtype, parts):
    x, sel, _, _, attn_update, mlp_out, gate = _inputs(B, N, D, ks, dtype, device)
    if parts == "attn_update":
        mlp_out = gate = None
    use_scores = parts == "all"
    if parts == "gated":
        gate = None
    x_before = x.clone()
    out = _scatter(ext_backend, x, sel, attn_update, mlp_out, gate, use_scores)
    assert torch.equal(x, x_before), "scatter_back modified its input"
    assert out.dtype == dtype and out.shape == x.shape
    keep = torch.zeros(B * N, dtype=torch.bool, device=device)
    keep[sel.indices] = True
    # rows never selected are passed through bit-exactly
    assert torch.equal(out.reshape(B * N, D)[~keep], x.reshape(B * N, D)[~keep])
    xf, attn_update_f, mlp_out_f, gf = _as_fp32_inputs(x, attn_update, mlp_out, gate)
    expect = ref.scatter_back(xf, sel.indices, sel.cu_seqlens, sel.seg_weight, attn_update_f,
                              mlp_out_f, sel.scores if use_scores else None, gf)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expect, **_tol(dtype))
    else:
        naive = ref.scatter_back(x, sel.indices, sel.cu_seqlens, sel.seg_weight.to(dtype),
                                 attn_update, mlp_out,
                                 sel.scores.to(dtype) if use_scores else None, gate)
        # naive bf16: the reference formula with every intermediate rounded to bf16
        c = attn_update if mlp_out is None else attn_update + (
            sel.scores.to(dtype)[:, None] if use_scores else 1) * (
                mlp_out * (gate[sel.row_sample()] if gate is not None else 1))
        naive = x.reshape(B * N, D).index_add(
            0, sel.indices, c * sel.seg_weight.to(dtype)[sel.row_segment()][:, None]).view_as(x)
        _assert_close_lowp(out, expect, naive)


@pytest.mark.parametrize("B,N,D,ks", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scatter_back_inplace_equals_out_of_place(device, ext_backend, B, N, D, ks, dtype):
    """scatter_back_ writes into x exactly what scatter_back returns (same kernel, no copy),
    on the same backend, for one bin and two bins per sample."""
    x, sel, _, _, attn_update, mlp_out, gate = _inputs(B, N, D, ks, dtype, device)
    expect = _scatter(ext_backend, x, sel, attn_update, mlp_out, gate)
    y = x.clone()
    with dk.use_backend(ext_backend):
        out = dk.scatter_back_(y, sel.indices, sel.cu_seqlens, sel.seg_weight, attn_update, mlp_out,
                               sel.scores, gate, max_seqlen=sel.max_seqlen)
    assert out is y
    assert torch.equal(y, expect)


def test_scatter_back_inplace_refuses_what_it_cannot_do_safely(device, ext_backend):
    x, sel, _, _, attn_update, mlp_out, gate = _inputs(2, 9, 8, [[3, 5], [9, 2]], torch.float32,
                                                       device)
    args = (sel.indices, sel.cu_seqlens, sel.seg_weight, attn_update, mlp_out, sel.scores, gate)
    with dk.use_backend(ext_backend):
        xt = x.transpose(0, 1).contiguous().transpose(0, 1)
        with pytest.raises(ValueError, match="x must be contiguous"):
            dk.scatter_back_(xt, *args)
        big = torch.randn(x.numel() + attn_update.numel(), device=device)
        xa, attn_update_a = big[:x.numel()].view_as(x), big[x.numel():].view_as(attn_update)
        with pytest.raises(ValueError, match="attn_update shares memory with x"):
            dk.scatter_back_(xa, sel.indices, sel.cu_seqlens, sel.seg_weight, attn_update_a)
        with pytest.raises(ValueError, match="for inference"):
            dk.scatter_back_(x, sel.indices, sel.cu_seqlens, sel.seg_weight,
                             attn_update.clone().requires_grad_())
    # the raw op (what a compiled graph calls) checks contiguity and aliasing too
    ns = torch.ops.diffcr_triton if ext_backend == "triton" else torch.ops.diffcr
    with pytest.raises(ValueError, match="must be contiguous"):
        ns.scatter_back_(xt, sel.indices, sel.cu_seqlens, sel.max_seqlen, 2, sel.seg_weight,
                         attn_update, mlp_out, sel.scores, gate)


def test_scatter_back_poisoned_unselected_rows_stay_poisoned(device, ext_backend):
    B, N, D = 2, 31, 16
    x, sel, _, _, attn_update, mlp_out, gate = _inputs(B, N, D, [[3, 9], [1, 31]], torch.float32,
                                                       device)
    keep = torch.zeros(B * N, dtype=torch.bool, device=device)
    keep[sel.indices] = True
    xp = x.clone().reshape(B * N, D)
    xp[~keep] = float("nan")
    out = _scatter(ext_backend, xp.view(B, N, D), sel, attn_update, mlp_out, gate).reshape(B * N, D)
    assert torch.isfinite(out[keep]).all()
    assert torch.isnan(out[~keep]).all()


def test_scatter_back_is_deterministic(device, ext_backend):
    x, sel, _, _, attn_update, mlp_out, gate = _inputs(2, 50, 72, [[13, 31], [50, 7]],
                                                       torch.float32, device)
    a = _scatter(ext_backend, x, sel, attn_update, mlp_out, gate)
    b = _scatter(ext_backend, x, sel, attn_update, mlp_out, gate)
    assert torch.equal(a, b)


@pytest.mark.parametrize("B,N,D,ks", CASES)
def test_scatter_back_backward_fp32(device, ext_backend, B, N, D, ks):
    x, sel, _, _, attn_update, mlp_out, gate = _inputs(B, N, D, ks, torch.float32, device)
    G = torch.randn_like(x)
    grads = {}
    for backend in ("reference", ext_backend):
        leaves = [t.clone().requires_grad_() for t in (x, attn_update, mlp_out, gate, sel.scores,
                                                       sel.seg_weight)]
        with dk.use_backend(backend):
            out = dk.scatter_back(leaves[0], sel.indices, sel.cu_seqlens, leaves[5], leaves[1],
                                  leaves[2], leaves[4], leaves[3], max_seqlen=sel.max_seqlen,
                                  segs_per_sample=sel.segs_per_sample)
        out.backward(G)
        grads[backend] = [t.grad for t in leaves]
    for name, a, b in zip(("x", "attn_update", "mlp_out", "gate", "scores", "seg_weight"),
                          grads["reference"], grads[ext_backend]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("optional", ["all", "no-gate", "no-scores", "attn_update-only"])
def test_scatter_back_gradcheck_float64(device, ext_backend, optional):
    x, sel, _, _, attn_update, mlp_out, gate = _inputs(2, 7, 5, [[2, 5], [7, 1]], torch.float64,
                                                       device)
    scores = sel.scores.double()
    use = {"all": (True, True, True), "no-gate": (True, True, False),
           "no-scores": (True, False, True), "attn_update-only": (False, False, False)}[optional]
    leaves = [x, attn_update, sel.seg_weight.double()]
    leaves += [mlp_out] if use[0] else []
    leaves += [scores] if use[1] else []
    leaves += [gate] if use[2] else []
    leaves = [t.clone().requires_grad_() for t in leaves]

    def f(*a):
        it = iter(a[3:])
        m = next(it) if use[0] else None
        s = next(it) if use[1] else None
        g = next(it) if use[2] else None
        with dk.use_backend(ext_backend):
            return dk.scatter_back(a[0], sel.indices, sel.cu_seqlens, a[2], a[1], m, s, g,
                                   max_seqlen=sel.max_seqlen, segs_per_sample=2)

    assert torch.autograd.gradcheck(f, leaves)


# ---------------------------------------------------------------- opcheck / compile
def test_opcheck_compiled_ops(device, ext_backend):
    """torch.library.opcheck (schema, fake kernel, autograd registration, dispatch) of every op of
    the backend's namespace: torch.ops.diffcr (C++/CUDA) or torch.ops.diffcr_triton."""
    from diffcr_kernels.ops import _ns

    ops = _ns(ext_backend)
    x, sel, shift, scale, attn_update, mlp_out, gate = _inputs(2, 11, 8, [[3, 6], [11, 2]],
                                                               torch.float32, device)
    xr = x.clone().requires_grad_()
    torch.library.opcheck(ops.gather_norm_modulate,
                          (xr, sel.indices, shift, scale, None, None, 1e-6))
    y, mean, rstd = ops.gather_norm_modulate(x, sel.indices, shift, scale, None, None, 1e-6)
    torch.library.opcheck(ops.gather_norm_modulate_backward,
                          (torch.randn_like(y), x, sel.indices, mean, rstd, scale, None))
    args = (xr, sel.indices, sel.cu_seqlens, sel.max_seqlen, 2, sel.seg_weight,
            attn_update.clone().requires_grad_(), mlp_out, sel.scores, gate)
    torch.library.opcheck(ops.scatter_back, args)
    torch.library.opcheck(ops.scatter_back_,
                          (x.clone(),) + tuple(a.detach() if torch.is_tensor(a) else a
                                               for a in args[1:]))
    torch.library.opcheck(ops.scatter_back_backward,
                          (torch.randn_like(x), sel.indices, sel.cu_seqlens, sel.max_seqlen,
                           sel.seg_weight, attn_update, mlp_out, sel.scores, gate))


def test_compiled_ops_trace_with_torch_compile(ext_backend, device):
    x, sel, shift, scale, attn_update, mlp_out, gate = _inputs(2, 11, 8, [[3], [11]], torch.float32,
                                                               device)

    def f(x, shift, scale, mlp_out, gate):
        y = dk.gather_norm_modulate(x, sel.indices, shift, scale)
        return dk.scatter_back(x, sel.indices, sel.cu_seqlens, sel.seg_weight, y, mlp_out,
                               sel.scores, gate, max_seqlen=sel.max_seqlen)

    with dk.use_backend(ext_backend):
        eager = f(x, shift, scale, mlp_out, gate)
        compiled = torch.compile(f, fullgraph=True, backend="eager")(x, shift, scale, mlp_out, gate)
    torch.testing.assert_close(compiled, eager)


# ---------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors(device, ext_backend):
    x, sel, shift, scale, attn_update, mlp_out, gate = _inputs(2, 9, 8, [[3], [4]], torch.float32,
                                                               device)
    with dk.use_backend(ext_backend):
        with pytest.raises(ValueError, match="shift has shape"):
            dk.gather_norm_modulate(x, sel.indices, shift[:1], scale)
        with pytest.raises(ValueError, match="idx must be a 1-D int64 tensor"):
            dk.gather_norm_modulate(x, sel.indices.int(), shift, scale)
        with pytest.raises(ValueError, match="dtype"):
            dk.gather_norm_modulate(x, sel.indices, shift.double(), scale)
        with pytest.raises(ValueError, match="attn_update has shape"):
            dk.scatter_back(x, sel.indices, sel.cu_seqlens, sel.seg_weight, attn_update[:-1])
        with pytest.raises(ValueError, match="not a multiple of segs_per_sample"):
            dk.scatter_back(x, sel.indices, sel.cu_seqlens, sel.seg_weight, attn_update,
                            segs_per_sample=3)
    if device.type == "cpu":  # content checks that need no device sync
        with dk.use_backend(ext_backend):
            bad = sel.indices.clone()
            bad[0] = 2 * 9
            with pytest.raises(ValueError, match=r"idx\[0\] = 18 is out of range"):
                dk.gather_norm_modulate(x, bad, shift, scale)
            cu = sel.cu_seqlens.clone()
            cu[-1] += 1
            with pytest.raises(ValueError, match="must equal the number of rows"):
                dk.scatter_back(x, sel.indices, cu, sel.seg_weight, attn_update)
            with pytest.raises(ValueError, match="max_seqlen"):
                dk.scatter_back(x, sel.indices, sel.cu_seqlens, sel.seg_weight, attn_update,
                                max_seqlen=1)


def test_forced_backend_that_cannot_run_raises():
    x = torch.randn(1, 4, 8)
    idx = torch.arange(4)
    with dk.use_backend("cuda"), pytest.raises(RuntimeError, match="requested"):
        dk.gather_norm_modulate(x, idx)
