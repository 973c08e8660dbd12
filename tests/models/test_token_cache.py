"""The token cache (diffcr.enable_token_cache): skipped tokens receive the forecast of their
update, per family, on the fused and compat paths, and nothing changes at kept ratio 1."""
import copy

import pytest
import torch

import diffcr
from diffcr import DiffCRConfig, TokenCacheConfig

from tiny_models import FAMILY_CASES, set_ratios

FAMILIES = sorted(FAMILY_CASES)
STEPS = (900, 700, 500, 300, 100)


def _model(name, kappa, path="auto", inplace=False):
    factory, inputs = FAMILY_CASES[name]
    m = factory()
    diffcr.convert(m, DiffCRConfig(target_kept_ratio=0.5, path=path))
    set_ratios(m, kappa)
    diffcr.freeze(m, inplace_residual=inplace)
    return m, inputs


def _generate(m, inputs, steps=STEPS):
    """One generation: a forward per step, the latents moved a little at each (so the router
    picks other tokens from step to step, as in sampling)."""
    out = []
    with torch.no_grad():
        for t in steps:
            kw = inputs([t, t])
            x = kw["hidden_states"]
            g = torch.Generator().manual_seed(t)
            kw["hidden_states"] = x + 0.5 * torch.randn(x.shape, generator=g, dtype=x.dtype)
            out.append(m(**kw).sample.clone())
    return out


class _Spy:
    """Per routed block and forward: its input image stream, output image stream, the path
    it took and the rows it selected (None: every row)."""

    def __init__(self, model):
        self.model = model
        self.calls = {i: [] for i in diffcr.routing_state(model).blocks}
        fam = diffcr.family_for(model)
        self.handles = []
        for i, b in diffcr.routed_blocks(model).items():
            r = diffcr.routing_state(model).blocks[i]

            def pre(mod, args, kw, i=i):
                x = args[0] if args else kw["hidden_states"]
                self._x = x.detach().clone()

            def post(mod, args, kw, out, i=i, r=r):
                sel = r.last_selection
                self.calls[i].append((self._x, fam.hidden_states_of(out).detach().clone(),
                                      r.last_path, None if sel is None else sel.indices.clone()))

            self.handles.append(b.register_forward_pre_hook(pre, with_kwargs=True))
            self.handles.append(b.register_forward_hook(post, with_kwargs=True))

    def remove(self):
        for h in self.handles:
            h.remove()


def _check_forecasts(spy, order):
    """Replay the cache from the spied calls: every skipped row of every routed step got
    exactly ``x + forecast``, the forecast that ``order`` asks for."""
    checked = 0
    for i, calls in spy.calls.items():
        u1 = u0 = s1 = s0 = None
        twice = 0
        for step, (x, out, path, rows) in enumerate(calls):
            B, N, D = x.shape
            xf, of = x.reshape(B * N, D), out.reshape(B * N, D)
            if path == "refresh":
                if u1 is not None:
                    u0, s0 = u1.clone(), s1.clone()
                u1, s1 = of - xf, torch.full((B * N,), step)
                continue
            assert path in ("fused", "compat"), path
            skipped = torch.ones(B * N, dtype=torch.bool)
            skipped[rows] = False
            assert skipped.any()
            want = u1
            if order == 1 and u0 is not None:
                span = (s1 - s0).clamp(min=1).to(u1.dtype)
                ahead = (step - s1).clamp(min=0).to(u1.dtype)
                slope = torch.where((s0 >= 0).unsqueeze(-1), (u1 - u0) / span.unsqueeze(-1),
                                    torch.zeros((), dtype=u1.dtype))
                want = u1 + slope * ahead.unsqueeze(-1)
            torch.testing.assert_close(of[skipped], xf[skipped] + want[skipped], rtol=0,
                                       atol=0)
            checked += int(skipped.sum())
            if s0 is not None:
                twice += int((skipped & (s0 >= 0)).sum())
            # the selected rows' new updates go into the cache
            if u0 is None:
                u0, s0 = torch.zeros_like(u1), torch.full_like(s1, -1)
            u0, s0 = u0.clone(), s0.clone()
            u0[rows], s0[rows] = u1[rows], s1[rows]
            u1 = u1.clone()
            u1[rows] = of[rows] - xf[rows]
            s1 = s1.clone()
            s1[rows] = step
        # some skipped rows had two computed updates (order 1 extrapolates for those)
        assert twice > 0
    assert checked > 0


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("order", [0, 1])
def test_skipped_tokens_receive_the_forecast(name, order):
    torch.set_num_threads(1)
    m, inputs = _model(name, 0.5)
    diffcr.enable_token_cache(m, TokenCacheConfig(order=order, refresh_every=5))
    spy = _Spy(m)
    _generate(m, inputs, steps=(950, 850, 750, 650, 550, 450, 350))
    spy.remove()
    paths = [c[2] for c in next(iter(spy.calls.values()))]
    assert paths[0] == "refresh" and paths[5] == "refresh" and "refresh" not in paths[1:5]
    _check_forecasts(spy, order)


@pytest.mark.parametrize("name", FAMILIES)
def test_at_kept_ratio_one_the_cache_changes_nothing(name):
    torch.set_num_threads(1)
    m, inputs = _model(name, 1.0)
    plain = _generate(m, inputs)
    diffcr.enable_token_cache(m, TokenCacheConfig(order=1, refresh_every=3, staleness=0.1))
    cached = _generate(m, inputs)
    for a, b in zip(plain, cached):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", FAMILIES)
def test_fused_compat_and_inplace_residual_agree(name):
    torch.set_num_threads(1)
    outs = []
    for path, inplace in (("auto", False), ("compat", False), ("auto", True)):
        m, inputs = _model(name, 0.5, path=path, inplace=inplace)
        diffcr.enable_token_cache(m, TokenCacheConfig(order=1, refresh_every=3))
        outs.append(_generate(m, inputs))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_inference_at_order_zero_is_the_one_pass_op_and_equals_the_torch_composite(name,
                                                                                 monkeypatch):
    """Order 0 at inference runs diffcr_kernels.apply_token_cache_ (one pass over the rows);
    forcing the differentiable torch composite instead gives the same images bit for bit
    (float32), also with the cache stored in bfloat16 and with the in-place residual."""
    import diffcr_kernels as dk
    from diffcr import token_cache as tcm

    torch.set_num_threads(1)
    calls = []
    real = dk.apply_token_cache_

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    for cache_dtype, inplace in ((None, False), (torch.bfloat16, True)):
        outs = []
        for fused in (True, False):
            monkeypatch.setattr(dk, "apply_token_cache_", spy)
            if not fused:
                monkeypatch.setattr(tcm, "_FUSED_CACHE_DTYPES", ())
            calls.clear()
            m, inputs = _model(name, 0.5, inplace=inplace)
            diffcr.enable_token_cache(m, TokenCacheConfig(refresh_every=3, dtype=cache_dtype))
            outs.append(_generate(m, inputs))
            n_routed = len(diffcr.routing_state(m).blocks) * (len(STEPS) - 2)
            assert len(calls) == (n_routed if fused else 0), (fused, len(calls))
            monkeypatch.undo()
        for a, b in zip(*outs):
            if cache_dtype is None:
                assert torch.equal(a, b)
            else:  # bf16 cache: the op rounds the fp32 difference once, the composite twice
                torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_a_new_generation_starts_fresh_and_separate_calls_per_step_have_their_own_slot():
    torch.set_num_threads(1)
    m, inputs = _model("dit", 0.5)
    tc = diffcr.enable_token_cache(m, TokenCacheConfig(refresh_every=0))
    first = _generate(m, inputs)
    assert tc.step == len(STEPS) - 1
    again = _generate(m, inputs)  # the noise level goes up: a new generation by itself
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    # cond / uncond as two calls per step: each call of a step has its own cache (slot)
    tc.reset()
    with torch.no_grad():
        for t in STEPS[:3]:
            m(**inputs([t, t]))
            m(**inputs([t, t]))
    assert tc.step == 2 and {s for _, s in tc.entries} == {0, 1}
    diffcr.reset_token_cache(m)
    # the entries stay allocated (a compiled model does not allocate them again), every update
    # forgotten: the next forward is a refresh at step 0
    assert tc.step == 0 and tc.refresh and int(tc.step_tensor("cpu")) == 0
    assert all(bool((e.s1 == -1).all()) for e in tc.entries.values())


def test_staleness_picks_long_skipped_tokens_and_keeps_the_router_gate():
    torch.set_num_threads(1)
    m, inputs = _model("pixart", 0.5)
    diffcr.enable_token_cache(m, TokenCacheConfig(staleness=10.0))
    spy = _Spy(m)
    _generate(m, inputs, steps=STEPS[:3])
    spy.remove()
    for calls in spy.calls.values():
        r1, r2 = calls[1][3], calls[2][3]
        # with a large staleness the second routed step takes the rows the first skipped
        assert set(r1.tolist()).isdisjoint(r2.tolist())
    sel = next(iter(diffcr.routing_state(m).blocks.values())).last_selection
    blk = next(iter(diffcr.routed_blocks(m).values()))
    assert sel.scores.max() <= 1.0  # the router's own scores, not score + staleness
    del blk


def test_kept_ratio_override_runs_a_full_step_without_touching_the_frozen_bins():
    torch.set_num_threads(1)
    m, inputs = _model("pixart", 0.5)
    bins = [copy.copy(r.frozen_bins) for r in diffcr.routing_state(m).blocks.values()]
    ref, _ = _model("pixart", 1.0)
    with torch.no_grad():
        with diffcr.kept_ratio_override(m, 1.0):
            a = m(**inputs([500, 500])).sample
        b = ref(**inputs([500, 500])).sample
        c = m(**inputs([500, 500])).sample
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert [r.frozen_bins for r in diffcr.routing_state(m).blocks.values()] == bins
    with pytest.raises(ValueError, match="kept ratio must be in"):
        with diffcr.kept_ratio_override(m, 0.0):
            pass


def test_kept_ratio_override_under_torch_compile_fullgraph_is_a_constant_per_value():
    """``kept_ratio_override`` inside a model compiled with ``fullgraph=True``: the kept count
    is computed on the host from the override, so Dynamo must read it as a constant. Each
    override equals eager, a second value compiles a second graph (guarded by value, not
    traced as a symbolic float), and the first value again compiles nothing new."""
    torch.set_num_threads(1)
    m, inputs = _model("pixart", 0.5)
    kw = inputs([500, 500])
    with torch.no_grad():
        want = {}
        for kappa in (0.3, 0.7):
            with diffcr.kept_ratio_override(m, kappa):
                want[kappa] = m(**kw).sample
    assert not torch.equal(want[0.3], want[0.7])
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    try:
        compiled = torch.compile(m, fullgraph=True, backend="eager")
        before = counters["stats"]["unique_graphs"]
        with torch.no_grad():
            for kappa in (0.3, 0.7, 0.3):
                with diffcr.kept_ratio_override(m, kappa):
                    got = compiled(**kw).sample
                torch.testing.assert_close(got, want[kappa], rtol=1e-5, atol=1e-6)
        assert counters["stats"]["unique_graphs"] - before == 2
    finally:
        torch._dynamo.reset()
    assert diffcr.routing_state(m).kept_override is None


def test_cache_aware_training_step_has_gradients_for_routers_and_ratios():
    """Training with the cache in the loop: the forecast enters with weight 1 - coverage, so
    the ratio parameters get a gradient from it."""
    torch.set_num_threads(1)
    factory, inputs = FAMILY_CASES["dit"]
    m = factory()
    diffcr.convert(m, DiffCRConfig(target_kept_ratio=0.5))
    diffcr.enable_token_cache(m, TokenCacheConfig(refresh_every=3))
    m.train()
    diffcr.fill_token_cache(m, **inputs([800, 800]))
    torch.manual_seed(0)
    out = m(**inputs([700, 700])).sample
    paths = {r.last_path for r in diffcr.routing_state(m).blocks.values()}
    assert paths <= {"fused", "compat"}
    out.square().mean().backward()
    for p in diffcr.ratio_parameters(m) + diffcr.router_parameters(m):
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_config_checks_and_memory():
    with pytest.raises(ValueError, match="order must be 0 or 1"):
        TokenCacheConfig(order=2)
    with pytest.raises(ValueError, match="refresh_every must be an integer >= 2"):
        TokenCacheConfig(refresh_every=1)
    with pytest.raises(ValueError, match="staleness"):
        TokenCacheConfig(staleness=-1.0)
    assert diffcr.token_cache_bytes(28, 2, 4096, 1152, torch.bfloat16) == \
        28 * 2 * 4096 * (1152 * 2 + 8)
    m, inputs = _model("dit", 0.5)
    tc = diffcr.enable_token_cache(m, TokenCacheConfig(dtype=torch.bfloat16))
    _generate(m, inputs, steps=STEPS[:2])
    B, N, D = 2, 16, 16
    assert tc.bytes() == len(diffcr.routing_state(m).blocks) * B * N * (D * 2 + 8)
    c = copy.deepcopy(m)  # the cached updates stay with the original
    assert diffcr.routing_state(c).token_cache.entries == {}


@pytest.mark.parametrize("kind", ["fbc", "taylorseer"])
def test_block_level_caches_stack_on_the_token_cache(kind):
    """A diffusers block-level cache applied after convert: the blocks it skips do not run (and
    leave their token cache as it is); the blocks that run get their forecast as without it."""
    from diffcr.app.ddpm import start_cache_run
    from diffcr.app.demo.peers import CacheSetting, cache_available

    if not cache_available(kind):
        pytest.skip(f"this diffusers has no {kind}")
    torch.set_num_threads(1)
    m, inputs = _model("dit", 0.5)
    diffcr.enable_token_cache(m, TokenCacheConfig(refresh_every=3))
    CacheSetting(kind, 0.2 if kind == "fbc" else 2).apply(m)
    start_cache_run(m)
    outs = _generate(m, inputs)
    assert all(torch.isfinite(o).all() for o in outs)
    assert {r.last_path for r in diffcr.routing_state(m).blocks.values()} <= {
        "refresh", "fused", "compat"}


@pytest.mark.parametrize("name", ["dit", "flux"])
def test_compiled_model_with_the_token_cache_does_not_recompile_per_step(name):
    """diffcr.compile_model (fullgraph) with the token cache: the same images as eager; the
    first forward runs eagerly (it allocates the cache), then there is at most one graph per
    (regions, refresh) combination, and a third generation compiles nothing new (the step is
    a device tensor in the graph, not a guarded host int)."""
    from torch._dynamo.utils import counters

    torch.set_num_threads(1)
    steps = (900, 800, 700, 650, 600, 550, 520)  # regions 3, 3, 2, 2, 2, 2, 2
    cfg = TokenCacheConfig(refresh_every=3)
    eager, inputs = _model(name, 0.5)
    diffcr.enable_token_cache(eager, cfg)
    want = _generate(eager, inputs, steps) + _generate(eager, inputs, steps)
    m, _ = _model(name, 0.5)
    diffcr.enable_token_cache(m, cfg)
    torch._dynamo.reset()
    counters.clear()
    diffcr.compile_model(m, backend="aot_eager")
    first = _generate(m, inputs, steps)
    second = _generate(m, inputs, steps)
    graphs = counters["stats"]["unique_graphs"]
    # (region 3 | 2) x (refresh | routed), over 14 steps
    assert 1 <= graphs <= 4, graphs
    _generate(m, inputs, steps)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing new for a 3rd generation
    for a, b in zip(want, first + second):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
