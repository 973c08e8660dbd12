"""MKL-prepacked linear layers for CPU inference (diffcr.cpu): same results as nn.Linear, used
only where safe, invalidated when the weight changes, and the bench plumbing that uses them."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffcr
from diffcr import cpu
from diffcr.app import bench
from tiny_models import make, set_ratios

needs_mkl = pytest.mark.skipif(not cpu.prepack_available(),
                               reason="this torch build has no MKL packed GEMM")


def _lin(i=24, o=40, bias=True, seed=0):
    torch.manual_seed(seed)
    m = nn.Linear(i, o, bias=bias)
    ref = copy.deepcopy(m)
    assert cpu.prepack_linears(m) == 1
    assert type(m) is cpu.PackedLinear
    return m, ref


@needs_mkl
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 24), (7, 24), (3, 5, 24), (2, 1, 4, 24)])
def test_packed_forward_matches_linear(shape, bias):
    m, ref = _lin(bias=bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        y = m(x)
        assert m.packed_bytes() > 0, "the packed path was not taken"
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    assert y.shape == (*shape[:-1], 40)


@needs_mkl
def test_one_packed_copy_per_row_count_lru():
    m, ref = _lin()
    cpu.prepack_linears(m, max_shapes=2)
    with torch.no_grad():
        for rows in (3, 5, 3, 9):  # 3 is reused, so 5 is the one dropped
            x = torch.randn(rows, 24)
            torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    packs = m.__dict__["_diffcr_packed"][1]
    assert list(packs) == [3, 9]


@needs_mkl
def test_weight_changed_in_place_or_replaced_is_repacked():
    m, ref = _lin()
    x = torch.randn(6, 24)
    with torch.no_grad():
        m(x)
        m.weight.mul_(2)
        ref.weight.mul_(2)
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
        m.weight = nn.Parameter(torch.randn(40, 24))
        torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias), rtol=1e-5, atol=1e-5)


@needs_mkl
def test_autograd_dtype_and_grad_modes_fall_back():
    m, ref = _lin()
    x = torch.randn(4, 24, requires_grad=True)
    y = m(x)  # grad enabled, parameters require grad: plain F.linear, differentiable
    assert m.packed_bytes() == 0
    y.square().sum().backward()
    xr = x.detach().clone().requires_grad_()
    ref(xr).square().sum().backward()
    torch.testing.assert_close(m.weight.grad, ref.weight.grad)
    torch.testing.assert_close(x.grad, xr.grad)
    m64 = copy.deepcopy(m).double()
    with torch.no_grad():
        torch.testing.assert_close(m64(x.double()), ref.double()(x.double()))
        assert m64.packed_bytes() == 0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert m(x).dtype == torch.bfloat16  # autocast semantics kept
        assert m.packed_bytes() == 0


@needs_mkl
def test_state_dict_deepcopy_pickle_and_unpack():
    m, ref = _lin()
    with torch.no_grad():
        m(torch.randn(5, 24))
    assert m.packed_bytes() > 0
    assert m.state_dict().keys() == ref.state_dict().keys()
    c = copy.deepcopy(m)
    assert c.packed_bytes() == 0 and type(c) is cpu.PackedLinear
    p = pickle.loads(pickle.dumps(m))
    assert p.packed_bytes() == 0
    torch.testing.assert_close(p.weight, m.weight)
    assert cpu.unpack_linears(m) == 1
    assert type(m) is nn.Linear and "_diffcr_packed" not in m.__dict__


@needs_mkl
def test_subclasses_are_left_alone_and_counts():
    class MyLinear(nn.Linear):
        pass

    seq = nn.Sequential(nn.Linear(4, 4), MyLinear(4, 4), nn.Sequential(nn.Linear(4, 2)))
    assert cpu.prepack_linears(seq) == 2
    assert type(seq[1]) is MyLinear
    assert cpu.prepack_linears(seq) == 0  # already packed
    assert cpu.unpack_linears(seq) == 2


def test_bad_arguments(monkeypatch):
    with pytest.raises(TypeError, match="nn.Module"):
        cpu.prepack_linears(torch.zeros(3))
    with pytest.raises(TypeError, match="nn.Module"):
        cpu.unpack_linears("model")
    with pytest.raises(ValueError, match="max_shapes"):
        cpu.prepack_linears(nn.Linear(2, 2), max_shapes=0)
    monkeypatch.setattr(cpu, "prepack_available", lambda: False)
    lin = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="MKL"):
        cpu.prepack_linears(lin)
    assert type(lin) is nn.Linear  # nothing changed


@needs_mkl
@pytest.mark.parametrize("kind", ["pixart", "dit"])
def test_converted_model_inference_unchanged(kind):
    model = make(kind)
    diffcr.convert(model, diffcr.DiffCRConfig(num_regions=2))
    set_ratios(model, [0.5, 0.8])
    diffcr.freeze(model)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    kw = dict(timestep=torch.tensor([100, 900]))
    if kind == "pixart":
        kw["encoder_hidden_states"] = torch.randn(2, 5, 32)
    else:
        kw["class_labels"] = torch.tensor([1, 2])
    with torch.no_grad():
        want = model(x, **kw).sample
        n = diffcr.prepack_linears(model)
        got = model(x, **kw).sample
    assert n > 0
    assert sum(m.packed_bytes() for m in model.modules() if isinstance(m, cpu.PackedLinear)) > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    diffcr.unpack_linears(model)
    diffcr.revert(model)


def test_time_pairs_rotates_order():
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    ts = bench.time_pairs(fns, torch.device("cpu"), rounds=3, warmup=0)
    assert calls == list("abcbcacab")
    assert all(len(v) == 3 and all(t >= 0 for t in v) for v in ts.values())


def test_bench_blocks_rows_small():
    """Plumbing of the block benchmark on a tiny token count (sizes, not timing)."""
    rows = bench.bench_blocks("pixart", N=16, B=1, kappas=(1.0, 0.5), rounds=1)
    assert [r["k"] for r in rows] == [16, 8]
    for r in rows:
        assert r["prepacked"] == cpu.prepack_available()
        for key in ("dense_ms", "routed_ms", "naive_ms", "speedup", "fraction_of_ideal",
                    "naive_fraction_of_ideal", "routed_vs_naive"):
            assert r[key] > 0, key
        assert r["fraction_of_ideal"] == pytest.approx(r["speedup"] / r["ideal_speedup"])
    with pytest.raises(ValueError, match="prepack=True"):
        bench.bench_blocks("pixart", N=16, kappas=(1.0,), rounds=1, prepack=True,
                                  device="meta")
