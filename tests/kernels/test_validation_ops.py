"""Bad inputs to the public ops, on every backend (reference included): each is refused with an
error that names the argument, before any kernel writes memory, and the inputs are unchanged."""
import pytest
import torch

import diffcr_kernels as dk


def _base():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 8, generator=g)
    sel = dk.select_topk(torch.rand(2, 9, generator=g), [[3, 5], [9, 2]], torch.rand(2, 2))
    T = sel.total
    return dict(x=x, sel=sel, attn_update=torch.randn(T, 8), mlp_out=torch.randn(T, 8),
                gate=torch.randn(2, 8), shift=torch.randn(2, 8))


BACKENDS = ["reference", "cpu", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    from diffcr_kernels import _ext, ops

    if request.param == "cpu" and not _ext.has_kernel("scatter_back", "CPU"):
        pytest.skip("compiled CPU kernels not built")
    if request.param == "triton" and ops._triton_ok(torch.device("cpu")):
        pytest.skip(ops._triton_ok(torch.device("cpu")))
    return request.param


GATHER_CASES = {
    "x 2-D": (lambda b: dict(x=b["x"][0]), "x must be \\[B, N, D\\]"),
    "x int": (lambda b: dict(x=b["x"].long()), "x must be float32"),
    "idx int32": (lambda b: dict(idx=b["sel"].indices.int()), "idx must be a 1-D int64"),
    "idx 2-D": (lambda b: dict(idx=b["sel"].indices.view(1, -1)), "idx must be a 1-D int64"),
    "idx negative": (lambda b: dict(idx=torch.tensor([0, -1])), r"idx\[1\] = -1 is out of range"),
    "idx past B*N": (lambda b: dict(idx=torch.tensor([18])), r"idx\[0\] = 18 is out of range"),
    "shift wrong shape": (lambda b: dict(shift=b["shift"][:1]), "shift has shape"),
    "scale wrong shape": (lambda b: dict(scale=b["shift"].t()), "scale has shape"),
    "weight wrong shape": (lambda b: dict(weight=torch.ones(7)), "weight has shape"),
    "shift not a tensor": (lambda b: dict(shift=[1.0] * 8), "shift must be a tensor"),
}


@pytest.mark.parametrize("case", list(GATHER_CASES))
def test_gather_norm_modulate_rejects(backend, case):
    b = _base()
    make, pattern = GATHER_CASES[case]
    args = dict(x=b["x"], idx=b["sel"].indices, shift=b["shift"], scale=None, weight=None)
    args.update(make(b))
    snapshot = {k: v.clone() for k, v in args.items() if torch.is_tensor(v)}
    with dk.use_backend(backend), pytest.raises((ValueError, TypeError), match=pattern):
        dk.gather_norm_modulate(**args)
    for k, v in snapshot.items():
        assert torch.equal(args[k], v), f"{k} was modified"


def _cu(b, f):
    cu = b["sel"].cu_seqlens.clone()
    f(cu)
    return cu


SCATTER_CASES = {
    "cu int64": (lambda b: dict(cu_seqlens=b["sel"].cu_seqlens.long()), "cu_seqlens must be"),
    "cu not from 0": (lambda b: dict(cu_seqlens=_cu(b, lambda c: c.__setitem__(0, 1))),
                      r"cu_seqlens\[0\] must be 0"),
    "cu decreasing": (lambda b: dict(cu_seqlens=_cu(b, lambda c: c.__setitem__(2, 1))),
                      "non-decreasing"),
    "cu not ending at T": (lambda b: dict(cu_seqlens=_cu(b, lambda c: c.__setitem__(-1, 99))),
                           "must equal the number of rows"),
    "max_seqlen too small": (lambda b: dict(max_seqlen=1), "max_seqlen"),
    "segs_per_sample": (lambda b: dict(segs_per_sample=3), "not a multiple of segs_per_sample"),
    "segs_per_sample contradicts the layout": (lambda b: dict(segs_per_sample=1),
                                               "does not match the layout: 4 segments over B = 2"),
    "seg_weight shape": (lambda b: dict(seg_weight=torch.ones(3)), "seg_weight has shape"),
    "attn_update rows": (lambda b: dict(attn_update=b["attn_update"][:-1]),
                         "attn_update has shape"),
    "attn_update dtype": (lambda b: dict(attn_update=b["attn_update"].double()),
                          "attn_update has dtype"),
    "mlp_out shape": (lambda b: dict(mlp_out=b["mlp_out"][:, :4]), "mlp_out has shape"),
    "scores shape": (lambda b: dict(scores=torch.ones(3)), "scores has shape"),
    "gate shape": (lambda b: dict(gate=b["gate"][:1]), "gate has shape"),
    "idx out of range": (lambda b: dict(idx=b["sel"].indices + 100), "out of range"),
    "duplicate in a segment": (lambda b: dict(idx=b["sel"].indices.clone().index_fill_(
        0, torch.tensor([1]), int(b["sel"].indices[0]))),
                               "appears twice in the segments of slot 0"),
}


def test_scatter_back_rejects_a_row_shared_by_two_segments_of_one_slot(backend):
    """With segs_per_sample=1, two segments naming the same row would race in one launch."""
    b = _base()
    x = b["x"]
    idx = torch.tensor([0, 1, 1, 2])  # segments [0, 1] and [1, 2] share row 1, same slot
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    attn_update = torch.randn(4, 8)
    with dk.use_backend(backend), pytest.raises(ValueError, match="slot 0"):
        dk.scatter_back(x, idx, cu, torch.ones(2), attn_update, max_seqlen=2, segs_per_sample=1)
    # the same rows as two slots of one sample (B = 1: P = 2 derived) are fine: added one slot
    # after the other
    x1 = x[:1]
    with dk.use_backend(backend):
        out = dk.scatter_back(x1, idx, cu, torch.ones(2), attn_update, max_seqlen=2)
    expect = dk.reference.scatter_back(x1, idx, cu, torch.ones(2), attn_update)
    torch.testing.assert_close(out, expect)


def test_scatter_back_derives_segs_per_sample_from_the_layout(backend):
    """A two-bin layout (two segments per sample, the rows of the smaller bin inside the
    larger) with max_seqlen given and segs_per_sample left out: P = S // B = 2 is derived, so
    the two bins of a sample are never added concurrently (with P = 1 they would race)."""
    b = _base()
    s = b["sel"]
    assert s.segs_per_sample == 2
    with dk.use_backend(backend):
        out = dk.scatter_back(b["x"], s.indices, s.cu_seqlens, s.seg_weight, b["attn_update"],
                              b["mlp_out"], s.scores, b["gate"], max_seqlen=s.max_seqlen)
    expect = dk.reference.scatter_back(b["x"], s.indices, s.cu_seqlens, s.seg_weight,
                                       b["attn_update"], b["mlp_out"], s.scores, b["gate"])
    torch.testing.assert_close(out, expect)


def test_raw_scatter_ops_refuse_a_segs_per_sample_that_contradicts_the_layout():
    """The compiled op and the Triton launcher (what torch.compile graphs call, with the Python
    checks traced away) check S == B * P from the shapes alone."""
    from diffcr_kernels import _ext
    from diffcr_kernels import ops

    b = _base()
    s = b["sel"]
    args = (b["x"], s.indices, s.cu_seqlens, s.max_seqlen, 1, s.seg_weight, b["attn_update"],
            b["mlp_out"], s.scores, b["gate"])
    tried = 0
    if _ext.has_kernel("scatter_back", "CPU"):
        with pytest.raises(ValueError, match="does not match the layout"):
            torch.ops.diffcr.scatter_back(*args)
        tried += 1
    if ops._triton_ok(torch.device("cpu")) is None:
        from diffcr_kernels.triton import kernels as K

        with pytest.raises(ValueError, match="does not match the layout"):
            K.scatter_back(*args)
        tried += 1
    if not tried:
        pytest.skip("neither the compiled CPU op nor the Triton interpreter is available")


@pytest.mark.parametrize("case", list(SCATTER_CASES))
def test_scatter_back_rejects(backend, case):
    b = _base()
    s = b["sel"]
    make, pattern = SCATTER_CASES[case]
    args = dict(x=b["x"], idx=s.indices, cu_seqlens=s.cu_seqlens, seg_weight=s.seg_weight,
                attn_update=b["attn_update"], mlp_out=b["mlp_out"], scores=s.scores, gate=b["gate"],
                max_seqlen=s.max_seqlen, segs_per_sample=2)
    args.update(make(b))
    snapshot = {k: v.clone() for k, v in args.items() if torch.is_tensor(v)}
    with dk.use_backend(backend), pytest.raises((ValueError, TypeError), match=pattern):
        dk.scatter_back(**args)
    for k, v in snapshot.items():
        assert torch.equal(args[k], v), f"{k} was modified"


@pytest.mark.parametrize("scores,k,pattern", [
    (torch.rand(9), 3, r"scores must be \[B, N\]"),
    (torch.rand(0, 9), 3, "B >= 1 and N >= 1"),
    (torch.rand(2, 0), 1, "B >= 1 and N >= 1"),
    (torch.rand(2, 9), 10, r"every k must be in \[1, N=9\]"),
    (torch.rand(2, 9), 0, r"every k must be in \[1, N=9\]"),
    (torch.rand(2, 9), [[1, 2], [3]], "same number of segments"),
    (torch.rand(2, 9), [1, 2, 3], "B = 2"),
    (torch.rand(2, 9), 3.5, "whole numbers of tokens, got 3.5"),
    (torch.rand(2, 9), [2, 2.5], "whole numbers of tokens, got 2.5"),
    (torch.rand(2, 9), None, "whole numbers of tokens"),
    (torch.rand(2, 9), torch.tensor([1.5, 2.0]), "whole numbers of tokens, got 1.5"),
])
def test_select_topk_rejects(scores, k, pattern):
    with pytest.raises(ValueError, match=pattern):
        dk.select_topk(scores, k)


def test_select_topk_nan_scores_never_pick_nan_before_numbers():
    s = torch.tensor([[float("nan"), 0.1, float("nan"), 0.7, 0.3]])
    sel = dk.select_topk(s, 3)
    assert sel.indices.tolist() == [1, 3, 4]
    assert torch.isfinite(sel.scores).all()


def test_router_scores_rejects_mismatched_weight():
    with pytest.raises(ValueError, match=r"weight must be \[D\]"):
        dk.router_scores(torch.randn(1, 4, 8), torch.randn(7))


def test_non_contiguous_inputs_are_accepted(backend):
    b = _base()
    x = b["x"].transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous [B, N, D]
    assert not x.is_contiguous()
    s = b["sel"]
    with dk.use_backend(backend):
        y = dk.gather_norm_modulate(x, s.indices, b["shift"])
        out = dk.scatter_back_selection(x, s, b["attn_update"], b["mlp_out"], b["gate"])
    torch.testing.assert_close(y, dk.reference.gather_norm_modulate(x.contiguous(), s.indices,
                                                                    b["shift"]))
    assert out.shape == x.shape


def test_a_selection_from_select_topk_is_not_rescanned_but_raw_indices_are(backend, monkeypatch):
    """The host-side content checks (index range, cu_seqlens, the per-slot uniqueness scan)
    run for user-supplied tensors on every call, and never for a Selection that select_topk
    made (correct by construction): no per-call scan on the hot path. A Selection built by
    hand is checked like raw tensors."""
    import dataclasses

    from diffcr_kernels import ops

    b = _base()
    s = b["sel"]
    assert s.checked
    calls = []
    real = ops._check_slots
    monkeypatch.setattr(ops, "_check_slots", lambda *a: calls.append(1) or real(*a))
    with dk.use_backend(backend):
        out_sel = dk.scatter_back_selection(b["x"], s, b["attn_update"], b["mlp_out"], b["gate"])
        dk.gather_norm_modulate(b["x"], s, b["shift"])
        assert calls == []
        out_raw = dk.scatter_back(b["x"], s.indices, s.cu_seqlens, s.seg_weight, b["attn_update"],
                                  b["mlp_out"], s.scores, b["gate"], max_seqlen=s.max_seqlen)
        assert calls == [1]
        torch.testing.assert_close(out_sel, out_raw, rtol=0, atol=0)
        bad = dataclasses.replace(s, indices=s.indices + 100, checked=False)
        with pytest.raises(ValueError, match="out of range"):
            dk.scatter_back_selection(b["x"], bad, b["attn_update"])
        with pytest.raises(ValueError, match="out of range"):
            dk.gather_norm_modulate(b["x"], bad, b["shift"])


def test_raw_cpu_op_checks_the_values_of_a_strided_cu_seqlens():
    """torch.ops.diffcr.scatter_back (what a compiled graph calls) reads cu_seqlens by its
    strides: a valid non-contiguous one is accepted and gives the contiguous result; a
    stride-0 one whose values do not describe the rows is refused (it used to pass a check of
    the raw memory and let the kernel write past a buffer)."""
    from diffcr_kernels import _ext

    if not _ext.has_kernel("scatter_back", "CPU"):
        pytest.skip("compiled CPU kernels not built")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 8, generator=g)
    sel = dk.select_topk(torch.rand(2, 9, generator=g), [[3], [4]])
    attn_update = torch.randn(sel.total, 8, generator=g)
    w = torch.ones(2)
    cu = sel.cu_seqlens
    strided = torch.stack([cu, torch.full_like(cu, 999)], 1).reshape(-1)[::2]
    assert not strided.is_contiguous() and torch.equal(strided, cu)
    op = torch.ops.diffcr.scatter_back
    expect = op(x, sel.indices, cu, sel.max_seqlen, 1, w, attn_update, None, None, None)
    got = op(x, sel.indices, strided, sel.max_seqlen, 1, w, attn_update, None, None, None)
    assert torch.equal(got, expect)
    zero_stride = torch.zeros(1, dtype=torch.int32).expand(3)
    with pytest.raises(ValueError, match="must equal the number of rows"):
        op(x, sel.indices, zero_stride, sel.max_seqlen, 1, w, attn_update, None, None, None)
    with pytest.raises(ValueError, match="must equal the number of rows"):
        torch.ops.diffcr.scatter_back_backward(x, sel.indices, zero_stride, sel.max_seqlen, w,
                                               attn_update, None, None, None)


@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf"), "1e-6"])
def test_gather_norm_modulate_refuses_bad_eps_on_every_backend(backend, eps):
    b = _base()
    with dk.use_backend(backend), pytest.raises(ValueError, match="eps must be a finite number"):
        dk.gather_norm_modulate(b["x"], b["sel"].indices, b["shift"], eps=eps)


def test_gather_norm_modulate_refuses_a_modulation_dtype_on_every_backend(backend):
    """The reference used to accept a float64 shift for float32 x; every backend refuses it."""
    b = _base()
    with dk.use_backend(backend), pytest.raises(ValueError, match="shift has dtype"):
        dk.gather_norm_modulate(b["x"], b["sel"].indices, b["shift"].double())


def test_last_bad_inputs_are_value_errors_naming_the_argument():
    """gather_rows out of range, scatter_back with no segment, router weight on another
    device, routed_blocks not a sequence, an infinite timestep: each a ValueError that names
    what is wrong."""
    import diffcr
    import diffcr_kernels as dk
    from diffcr_kernels import reference as ref

    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="gather_rows: idx holds 99, outside the 10 rows"):
        dk.gather_rows(x, torch.tensor([0, 99]))
    with pytest.raises(ValueError, match="gather_rows: idx must be int64"):
        dk.gather_rows(x, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens \\[0\\] has no segment"):
        ref.scatter_back(x, torch.tensor([0]), torch.tensor([0], dtype=torch.int32),
                         torch.ones(0), torch.randn(1, 4))
    with pytest.raises(ValueError, match="router_scores: weight is on meta"):
        dk.router_scores(x, torch.randn(4, device="meta"))
    with pytest.raises(ValueError, match="routed_blocks must be a sequence"):
        diffcr.DiffCRConfig(routed_blocks=3)
    from tiny_models import make

    m = make("dit")
    diffcr.convert(m)
    with pytest.raises(ValueError, match="timestep is inf"):
        m(hidden_states=torch.randn(1, 4, 8, 8), timestep=torch.tensor([float("inf")]),
          class_labels=torch.tensor([1]))
