"""Property-based tests (hypothesis) over shapes: the reference against the naive loops, and the
compiled ops against the reference. Skipped as a module where hypothesis is not installed (the
GPU image), never silently in CI (it is a `test` extra)."""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import diffcr_kernels as dk  # noqa: E402
from diffcr_kernels import reference as ref  # noqa: E402

from op_cases import naive_select  # noqa: E402
from op_cases import op_inputs as _inputs  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), N=st.integers(1, 23), P=st.integers(1, 2), data=st.data())
def test_select_property(B, N, P, data):
    ks = [[data.draw(st.integers(1, N)) for _ in range(P)] for _ in range(B)]
    scores = torch.rand(B, N)
    sel = ref.select_topk(scores, torch.tensor(ks))
    assert sel.indices.tolist() == [i for s in naive_select(scores, ks) for i in s]


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 3), N=st.integers(1, 40), D=st.integers(1, 70), P=st.integers(1, 2),
       data=st.data())
def test_ops_property(ext_backend, device, B, N, D, P, data):
    ks = [[data.draw(st.integers(1, N)) for _ in range(P)] for _ in range(B)]
    x, sel, shift, scale, attn_update, mlp_out, gate = _inputs(B, N, D, ks, torch.float32, device)
    with dk.use_backend(ext_backend):
        y = dk.gather_norm_modulate(x, sel.indices, shift, scale)
        out = dk.scatter_back_selection(x, sel, attn_update, mlp_out, gate)
    torch.testing.assert_close(y, ref.gather_norm_modulate(x, sel.indices, shift, scale),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        out,
        ref.scatter_back(x, sel.indices, sel.cu_seqlens, sel.seg_weight, attn_update, mlp_out,
                         sel.scores, gate), rtol=1e-5, atol=1e-5)
