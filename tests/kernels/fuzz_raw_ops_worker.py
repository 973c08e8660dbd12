"""Worker of ``tests/kernels/test_raw_ops_fuzz.py``: drives the compiled ops ``torch.ops.diffcr.*``
directly (no Python-side validation: what a ``torch.compile`` graph calls) with arbitrary
shapes, dtypes, values, strides and storage offsets, in its own process.

Every call must either run or raise a Python exception; the process must not crash. Every
tensor argument is a view into a larger buffer filled with a sentinel, and after each call the
bytes outside the view (and, for arguments the op does not write, the view itself) must be
unchanged: an out-of-bounds or stray write is found even when it does not crash.

Usage: ``python fuzz_raw_ops_worker.py EXAMPLES [--compile]``; prints one summary line
``fuzz: <calls> calls, <ran> ran, <refused> refused``.
"""
import sys

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffcr_kernels  # noqa: F401  (loads the extension and defines torch.ops.diffcr)

torch.set_num_threads(1)
SENTINEL = -7.0
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
STATS = {"calls": 0, "ran": 0, "refused": 0}
ALLOWED = (RuntimeError, ValueError, IndexError, TypeError, NotImplementedError)


class Guarded:
    """A view with arbitrary strides and offset into a sentinel-filled buffer."""

    def __init__(self, draw, shape, dtype, values, writable=False):
        n = 1
        for s in shape:
            n *= s
        strides, span = [], 1
        for s in reversed(shape):
            step = draw(st.sampled_from([0, 1, 1, 2, 3])) if s > 1 else 1
            strides.insert(0, step * span if step else 0)
            span = span * (max(step, 1) * (s - 1) + 1) if step else span
        offset = draw(st.integers(0, 3))
        size = offset + span + 3
        self.base = torch.full((size,), SENTINEL, dtype=torch.float64).to(dtype)
        # for a stride-0 dimension several elements share memory: a write to one is fine
        self.view = self.base.as_strided(shape, strides, offset)
        self.footprint = torch.zeros(size, dtype=torch.bool)
        if n:
            pos = torch.zeros(shape, dtype=torch.long) + offset
            for d, (s, stride) in enumerate(zip(shape, strides)):
                ar = torch.arange(s) * stride
                pos = pos + ar.view([-1 if i == d else 1 for i in range(len(shape))])
            # through the base: a stride-0 view has several elements on one memory location
            self.base[pos.reshape(-1)] = values(shape).to(dtype).reshape(-1)
            self.footprint[pos.reshape(-1)] = True
        self.before = self.base.clone()
        self.writable = writable

    def check(self, name):
        same = _same(self.base, self.before)
        outside = ~self.footprint
        if not bool(same[outside].all()):
            raise AssertionError(f"{name}: write outside the tensor's memory")
        if not self.writable and not bool(same.all()):
            raise AssertionError(f"{name}: an input the op does not write was modified")


def _same(a, b):
    if a.is_floating_point():
        return (a == b) | (torch.isnan(a) & torch.isnan(b))
    return a == b


@st.composite
def tensor(draw, shape, dtypes, lo=-3.0, hi=3.0, writable=False):
    dtype = draw(st.sampled_from(dtypes))

    def values(shp):
        g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
        if dtype.is_floating_point:
            return torch.empty(shp, dtype=torch.float64).uniform_(lo, hi, generator=g)
        return torch.randint(int(lo), int(hi) + 1, shp, generator=g, dtype=torch.int64)

    return Guarded(draw, shape, dtype, values, writable)


@st.composite
def fixed(draw, values, dtype):
    """A guarded view (arbitrary strides and offset) holding exactly ``values``."""
    return Guarded(draw, tuple(values.shape), dtype, lambda shp: values.double()
                   if dtype.is_floating_point else values.long())


def _maybe(draw, strategy):
    return draw(st.one_of(st.none(), strategy)) if draw(st.booleans()) else draw(strategy)


def _near(draw, n):
    """Usually n, sometimes a wrong size (n +- 1, 0)."""
    return draw(st.sampled_from([n, n, n, n, max(0, n - 1), n + 1, 0]))


@st.composite
def valid_scatter_case(draw):
    """Inputs a correct caller could pass (segments sample-major, P per sample, indices distinct
    within a segment), at arbitrary strides, then at most one thing made wrong."""
    B, N, D = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 9))
    P = draw(st.integers(1, 2))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    lens, rows = [], []
    for b in range(B):
        for _ in range(P):
            k = draw(st.integers(1, N))
            lens.append(k)
            rows.append(torch.randperm(N, generator=g)[:k] + b * N)
    idx = torch.cat(rows)
    cu = torch.tensor([0] + lens).cumsum(0)
    T, S = int(idx.numel()), len(lens)
    fdt = draw(st.sampled_from(FLOATS))
    acc = torch.float64 if fdt == torch.float64 else torch.float32
    args = dict(
        x=draw(fixed(torch.randn(B, N, D, generator=g), fdt)),
        idx=draw(fixed(idx, torch.int64)), cu=draw(fixed(cu, torch.int32)),
        max_seqlen=max(lens), segs_per_sample=P,
        seg_weight=draw(fixed(torch.rand(S, generator=g), acc)),
        attn_update=draw(fixed(torch.randn(T, D, generator=g), fdt)),
        mlp_out=_maybe(draw, fixed(torch.randn(T, D, generator=g), fdt)),
        scores=_maybe(draw, fixed(torch.rand(T, generator=g), acc)),
        gate=_maybe(draw, fixed(torch.randn(B, D, generator=g), fdt)))
    wrong = draw(st.sampled_from(["none", "none", "idx", "cu", "cu_last", "max_seqlen", "P",
                                  "dtype", "shape"]))
    if wrong == "idx":
        bad = idx.clone()
        bad[draw(st.integers(0, T - 1))] = draw(st.sampled_from([-1, B * N, 2 ** 40]))
        args["idx"] = draw(fixed(bad, torch.int64))
    elif wrong == "cu":
        bad = cu.clone()
        bad[draw(st.integers(0, S))] += draw(st.sampled_from([-3, 1, 1000, -(2 ** 30)]))
        args["cu"] = draw(fixed(bad, torch.int32))
    elif wrong == "cu_last":
        args["cu"] = draw(fixed(cu[:-1], torch.int32))
    elif wrong == "max_seqlen":
        args["max_seqlen"] = draw(st.sampled_from([0, max(lens) - 1, -1]))
    elif wrong == "P":
        args["segs_per_sample"] = draw(st.sampled_from([0, P + 1, S + 1, -1]))
    elif wrong == "dtype":
        name = draw(st.sampled_from(["attn_update", "seg_weight", "x", "idx", "cu"]))
        t = args[name].view
        other = torch.int32 if t.dtype == torch.int64 else (
            torch.int64 if not t.is_floating_point() else
            (torch.float16 if t.dtype != torch.float16 else torch.float32))
        args[name] = draw(fixed(t.detach().clone().to(other), other))
    elif wrong == "shape":
        name = draw(st.sampled_from(["attn_update", "seg_weight", "x"]))
        t = args[name].view
        args[name] = draw(fixed(t.reshape(-1)[:max(0, t.numel() - 1)].clone(), t.dtype))
    return args


@st.composite
def scatter_case(draw):
    if draw(st.integers(0, 3)):
        return draw(valid_scatter_case())
    B, N, D = draw(st.integers(0, 3)), draw(st.integers(0, 6)), draw(st.integers(1, 9))
    S = draw(st.integers(0, 4))
    T = draw(st.integers(0, 8))
    fdt = draw(st.sampled_from(FLOATS))
    other = [fdt, fdt, fdt, torch.float32, torch.int32]
    x = draw(tensor((B, _near(draw, N), D), [fdt, fdt, torch.int64], writable=True))
    idx = draw(tensor((_near(draw, T),), [torch.int64, torch.int64, torch.int32],
                      lo=-2, hi=B * N + 2))
    cu = draw(tensor((_near(draw, S + 1),), [torch.int32, torch.int32, torch.int64],
                     lo=-2, hi=T + 3))
    args = dict(
        x=x, idx=idx, cu=cu, max_seqlen=draw(st.integers(-1, 10)),
        segs_per_sample=draw(st.integers(-1, 4)),
        seg_weight=draw(tensor((_near(draw, S),), [torch.float32, torch.float64, fdt])),
        attn_update=draw(tensor((_near(draw, T), _near(draw, D)), other)),
        mlp_out=_maybe(draw, tensor((_near(draw, T), _near(draw, D)), other)),
        scores=_maybe(draw, tensor((_near(draw, T),), [torch.float32, torch.float64, fdt])),
        gate=_maybe(draw, tensor((_near(draw, B), _near(draw, D)), other)))
    return args


@st.composite
def gather_case(draw):
    B, N, D = draw(st.integers(0, 3)), draw(st.integers(0, 6)), draw(st.integers(1, 9))
    T = draw(st.integers(0, 8))
    fdt = draw(st.sampled_from(FLOATS))
    other = [fdt, fdt, fdt, torch.float32, torch.int32]
    return dict(
        x=draw(tensor((B, _near(draw, N), D), [fdt, fdt, torch.int64])),
        idx=draw(tensor((_near(draw, T),), [torch.int64, torch.int64, torch.int32],
                        lo=-2, hi=B * N + 2)),
        shift=_maybe(draw, tensor((_near(draw, B), _near(draw, D)), other)),
        scale=_maybe(draw, tensor((_near(draw, B), _near(draw, D)), other)),
        weight=_maybe(draw, tensor((_near(draw, D),), other)),
        bias=_maybe(draw, tensor((_near(draw, D),), other)),
        eps=draw(st.sampled_from([1e-6, 0.0, -1.0, float("nan")])),
        grad=draw(tensor((_near(draw, T), _near(draw, D)), other)),
        mean=draw(tensor((_near(draw, T),), [torch.float32, torch.float64, fdt])),
        rstd=draw(tensor((_near(draw, T),), [torch.float32, torch.float64, fdt], lo=0.1)))


@st.composite
def token_cache_case(draw):
    """The token-cache pass: a valid call (slot a map of the selected rows, cache in any float
    dtype) at arbitrary strides, or one with wrong shapes, dtypes or slot values."""
    B, N, D = draw(st.integers(0, 3)), draw(st.integers(0, 6)), draw(st.integers(1, 9))
    R = B * N
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    T = draw(st.integers(0, R)) if R else 0
    slot = torch.full((R,), -1, dtype=torch.int64)
    if T:
        slot[torch.randperm(R, generator=g)[:T]] = torch.arange(T)
    valid = draw(st.integers(0, 2)) > 0
    fdt = draw(st.sampled_from(FLOATS))
    acc = torch.float64 if fdt == torch.float64 else torch.float32
    if valid:
        return dict(
            out=draw(fixed(torch.randn(B, N, D, generator=g), fdt)),
            cache=draw(fixed(torch.randn(R, D, generator=g), draw(st.sampled_from(FLOATS)))),
            slot=draw(fixed(slot, torch.int32)),
            x_rows=draw(fixed(torch.randn(T, D, generator=g), fdt)),
            miss=_maybe(draw, fixed(torch.rand(R, generator=g), acc)))
    other = [fdt, fdt, torch.float32, torch.int32]
    return dict(
        out=draw(tensor((B, _near(draw, N), D), [fdt, fdt, torch.int64])),
        cache=draw(tensor((_near(draw, R), _near(draw, D)), other)),
        slot=draw(tensor((_near(draw, R),), [torch.int32, torch.int32, torch.int64],
                         lo=-3, hi=T + 2)),
        x_rows=draw(tensor((_near(draw, T), _near(draw, D)), other)),
        miss=_maybe(draw, tensor((_near(draw, R),), [torch.float32, torch.float64, fdt])))


def _v(g):
    return None if g is None else g.view


def _call(fn, guarded):
    STATS["calls"] += 1
    try:
        fn()
        STATS["ran"] += 1
    except ALLOWED:
        STATS["refused"] += 1
    for name, g in guarded.items():
        if g is not None:
            g.check(name)


def run_scatter(a, ops):
    g = {k: a[k] for k in ("x", "idx", "cu", "seg_weight", "attn_update", "mlp_out", "scores",
                           "gate")}
    common = (_v(a["idx"]), _v(a["cu"]), a["max_seqlen"])
    rest = (_v(a["seg_weight"]), _v(a["attn_update"]), _v(a["mlp_out"]), _v(a["scores"]),
            _v(a["gate"]))
    _call(lambda: ops.scatter_back(_v(a["x"]), *common, a["segs_per_sample"], *rest),
          {k: v for k, v in g.items()})
    _call(lambda: ops.scatter_back_backward(_v(a["x"]), *common, *rest), g)
    g["x"].writable = True
    _call(lambda: ops.scatter_back_(_v(a["x"]), *common, a["segs_per_sample"], *rest), g)


def run_gather(a, ops):
    g = {k: a[k] for k in ("x", "idx", "shift", "scale", "weight", "bias")}
    _call(lambda: ops.gather_norm_modulate(_v(a["x"]), _v(a["idx"]), _v(a["shift"]),
                                           _v(a["scale"]), _v(a["weight"]), _v(a["bias"]),
                                           a["eps"]), g)
    g2 = dict(g, grad=a["grad"], mean=a["mean"], rstd=a["rstd"])
    _call(lambda: ops.gather_norm_modulate_backward(_v(a["grad"]), _v(a["x"]), _v(a["idx"]),
                                                    _v(a["mean"]), _v(a["rstd"]),
                                                    _v(a["scale"]), _v(a["weight"])), g2)


def run_token_cache(a, ops):
    g = dict(a)
    g["out"].writable = True
    g["cache"].writable = True
    _call(lambda: ops.apply_token_cache_(_v(a["out"]), _v(a["cache"]), _v(a["slot"]),
                                         _v(a["x_rows"]), _v(a["miss"])), g)


class _Compiled:
    """The ops behind ``torch.compile`` (aot_eager: the fake kernels run at trace time, then
    the real kernels; no Python-side validation in between)."""

    def __init__(self):
        raw = torch.ops.diffcr
        self._fns = {name: torch.compile(getattr(raw, name), backend="aot_eager",
                                         dynamic=True, fullgraph=True)
                     for name in ("scatter_back", "scatter_back_backward",
                                  "gather_norm_modulate", "gather_norm_modulate_backward")}
        self.scatter_back_ = raw.scatter_back_  # mutating: called as is
        self.apply_token_cache_ = raw.apply_token_cache_

    def __getattr__(self, name):
        return self._fns[name]


def main():
    examples = int(sys.argv[1])
    ops = _Compiled() if "--compile" in sys.argv else torch.ops.diffcr
    if "--compile" in sys.argv:
        torch._dynamo.config.recompile_limit = 10 ** 6
        torch._dynamo.config.accumulated_recompile_limit = 10 ** 6
        ALLOWED_EXTRA = (torch._dynamo.exc.TorchRuntimeError,
                         torch._dynamo.exc.BackendCompilerFailed, AssertionError)
    else:
        ALLOWED_EXTRA = ()
    global ALLOWED
    ALLOWED = ALLOWED + ALLOWED_EXTRA

    cfg = settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck))

    @cfg
    @given(scatter_case())
    def fuzz_scatter(a):
        run_scatter(a, ops)

    @cfg
    @given(gather_case())
    def fuzz_gather(a):
        run_gather(a, ops)

    @cfg
    @given(token_cache_case())
    def fuzz_token_cache(a):
        run_token_cache(a, ops)

    fuzz_scatter()
    fuzz_gather()
    fuzz_token_cache()
    print(f"fuzz: {STATS['calls']} calls, {STATS['ran']} ran, {STATS['refused']} refused")


if __name__ == "__main__":
    main()
