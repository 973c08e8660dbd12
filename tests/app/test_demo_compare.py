"""The demo's comparison code on a tiny setting (seconds): diffusers caches on dense and on
converted models, the sampler's cache reset, compare_methods' rows, the trade-off plot, and the
demo training recipe (v-prediction loss, learning-rate schedule, EMA)."""
import copy
import math

import pytest
import torch

import diffcr
from diffcr.app.demo.compare import Method, compare_methods, spread
from diffcr.app.ddpm import diffusion_loss, sample_images, scheduler, start_cache_run
from diffcr.app.core import ema_update, lr_factor
from diffcr.app.demo.peers import CacheSetting, cache_available

from tiny_models import _randomise_weights, frozen_at, tiny_dit

NCLS = 3
STEPS = 6


def _model():
    m = _randomise_weights(tiny_dit(num_classes=NCLS))
    # 4 input channels, 8 output (learned sigma): the sampler keeps the first 4
    return m.eval()


def _sampler(model, labels, seed):
    return sample_images(model, labels, NCLS, 4, 8, steps=STEPS, guidance=2.0, seed=seed,
                         prediction_type="v_prediction")


class _BlockCalls:
    """Counts the blocks that ran, by their feed-forward calls (a skipped block's own call
    still happens, the cache hook returns without running its body)."""

    def __init__(self, model):
        self.n = 0
        for b in model.transformer_blocks:
            b.ff.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.n += 1


CACHE_KINDS = [pytest.param(k, marks=() if cache_available(k) else pytest.mark.skip(
    reason=f"this diffusers has no {k} cache (added in a later release)"))
    for k in ("fbc", "taylorseer")]
# settings this tiny random model always falls under / a cache interval that skips steps
_SETTING = {"fbc": 10.0, "taylorseer": 2}


def test_cache_setting_validation_and_labels():
    assert CacheSetting("fbc", 0.1).label == "FBC 0.1"
    assert CacheSetting("taylorseer", 3).label == "TaylorSeer /3"
    with pytest.raises(ValueError, match="unknown cache kind 'magcache'"):
        CacheSetting("magcache", 1)
    with pytest.raises(ValueError, match="threshold must be > 0"):
        CacheSetting("fbc", 0.0)
    with pytest.raises(ValueError, match="integer >= 2"):
        CacheSetting("taylorseer", 2.5)
    with pytest.raises(ValueError, match="unknown cache kind"):
        cache_available("nope")


@pytest.mark.parametrize("kind", CACHE_KINDS)
@pytest.mark.parametrize("converted", [False, True], ids=["dense", "diffcr"])
def test_cache_skips_blocks_and_resets_between_runs(kind, converted):
    """The cache skips block calls (on dense and on a converted model), and sampling twice with
    the same seed gives the same images: the sampler resets the cache state per run."""
    base = _model()
    plain = frozen_at(base) if converted else copy.deepcopy(base)
    cached = CacheSetting(kind, _SETTING[kind]).apply(copy.deepcopy(plain))
    labels = torch.tensor([0, 1, 2])
    calls_plain, calls_cached = _BlockCalls(plain), _BlockCalls(cached)
    ref = _sampler(plain, labels, seed=5)
    a = _sampler(cached, labels, seed=5)
    n_cached = calls_cached.n
    b = _sampler(cached, labels, seed=5)
    assert calls_plain.n == STEPS * len(base.transformer_blocks)
    assert 0 < n_cached < calls_plain.n
    assert torch.equal(a, b)
    assert torch.isfinite(a).all() and a.shape == ref.shape
    # the cache changed the images (it skipped work), but not beyond recognition
    assert not torch.equal(a, ref)


def test_start_cache_run_without_hooks_is_a_no_op():
    m = _model()
    start_cache_run(m)
    assert "_diffusers_hook" not in m.__dict__


@pytest.mark.skipif(not cache_available("fbc"), reason="this diffusers has no FirstBlockCache")
def test_compare_methods_rows():
    from diffcr.app.demo.classifier import ShapeClassifier

    torch.manual_seed(0)
    base = _model()
    clf = ShapeClassifier(NCLS, in_channels=4).eval()
    conv = frozen_at(base)
    methods = {
        "dense": Method(base, "dense", 1.0, 0.5),
        "routed": Method(conv, "diffcr", 0.5, 0.6),
        "FBC": Method(CacheSetting("fbc", 10.0).apply(copy.deepcopy(base)), "cache"),
        "routed + FBC": Method(CacheSetting("fbc", 10.0).apply(copy.deepcopy(conv)),
                               "diffcr+cache", 0.5),
    }
    real = torch.rand(12, 4, 8, 8) * 2 - 1
    labels = torch.arange(NCLS).repeat_interleave(4)
    seen = []
    rows = compare_methods(methods, _sampler, clf, real, labels, seeds=(1, 2),
                           progress=lambda n, s, dt: seen.append((n, s)))
    # seeds outer, methods inner
    assert seen == [(n, s) for s in (1, 2) for n in methods]
    assert list(rows) == list(methods)
    assert rows["dense"]["speedup_vs_dense"] == 1.0
    for name, r in rows.items():
        assert len(r["sampling_s"]) == 2 and all(t > 0 for t in r["sampling_s"])
        assert r["speedup_vs_dense"] == pytest.approx(sum(rows["dense"]["sampling_s"])
                                                     / sum(r["sampling_s"]))
        assert len(r["class_accuracy_per_seed"]) == 2 and len(r["classifier_fid_per_seed"]) == 2
        assert r["class_accuracy"] == pytest.approx(sum(r["class_accuracy_per_seed"]) / 2)
        assert 0.0 <= r["class_accuracy"] <= 1.0 and r["classifier_fid"] >= 0.0
        assert r["samples"].shape == (12, 4, 8, 8)
        assert r["kind"] == methods[name].kind
    assert rows["FBC"]["heldout_denoising_loss"] is None
    assert rows["routed"]["mean_kept_ratio"] == 0.5
    # the two seeds draw different images
    a = _sampler(base, labels, seed=1)
    assert torch.equal(a, rows["dense"]["samples"])
    assert not torch.equal(a, _sampler(base, labels, seed=2))
    with pytest.raises(ValueError, match="baseline 'dense' is not among"):
        compare_methods({"x": methods["FBC"]}, _sampler, clf, real, labels, seeds=(1,))
    assert spread([0.2, 0.4]) == pytest.approx(0.1) and spread([3.0]) == 0.0


def test_plot_tradeoff(tmp_path):
    pytest.importorskip("matplotlib")
    from diffcr.app.demo.plots import plot_tradeoff

    rows = {"dense": {"kind": "dense", "speedup_vs_dense": 1.0, "class_accuracy": 0.95,
                      "classifier_fid": 10.0, "class_accuracy_per_seed": [0.94, 0.96],
                      "classifier_fid_per_seed": [9.0, 11.0]},
            "FBC 0.1": {"kind": "cache", "speedup_vs_dense": 1.7, "class_accuracy": 0.9,
                        "classifier_fid": 14.0},
            "DiffCR-LT + FBC 0.1": {"kind": "diffcr+cache", "speedup_vs_dense": 2.1,
                                    "class_accuracy": 0.88, "classifier_fid": 16.0}}
    p = plot_tradeoff(rows, tmp_path / "t.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_tradeoff({}, tmp_path / "u.png")


def test_v_prediction_loss_target():
    """The v-prediction loss is the MSE to sqrt(a) noise - sqrt(1 - a) x0."""
    sched = scheduler("v_prediction")
    x0 = torch.randn(2, 4, 8, 8)
    noise = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = a.sqrt() * noise - (1 - a).sqrt() * x0

    class Echo(torch.nn.Module):  # predicts exactly v: loss 0
        def forward(self, xt, timestep, class_labels):
            return type("O", (), {"sample": v})()

    assert diffusion_loss(Echo(), sched, x0, None, t=t, noise=noise).item() < 1e-10
    eps = scheduler("epsilon")
    assert diffusion_loss(Echo(), eps, x0, None, t=t, noise=noise).item() == pytest.approx(
        torch.mean((v - noise) ** 2).item(), rel=1e-5)


def test_lr_factor_and_ema():
    assert lr_factor(0, 100, 0) == 1.0 and lr_factor(99, 100, 0) == 1.0
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, 100, 10) == pytest.approx(0.0)
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.detach().clone()
    ema_update(a, b, decay=0.999, step=0)      # warm-up: d = min(0.999, 1/10) = 0.1
    assert torch.allclose(a.weight, 0.1 * before + 0.9 * b.weight)
    ema_update(a, b, decay=0.5, step=1000)     # d = 0.5
    w = a.weight.detach().clone()
    ema_update(a, b, decay=0.5, step=1000)
    assert torch.allclose(a.weight, 0.5 * w + 0.5 * b.weight)


def test_init_dit_weights_is_adaln_zero():
    """After the DiT paper's initialisation every block is the identity and the output is 0;
    the linears are xavier-uniform, the label and timestep embeddings at std 0.02."""
    from diffcr.app.demo.run import init_dit_weights_

    torch.manual_seed(0)
    m = tiny_dit(num_classes=NCLS)
    init_dit_weights_(m)
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([10, 900]), torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.count_nonzero(m(x, timestep=t, class_labels=y).sample) == 0
        h = m.pos_embed(x)
        b = m.transformer_blocks[0]
        assert torch.equal(b(h, timestep=t, class_labels=y), h)
    w = b.attn1.to_q.weight
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    emb = b.norm1.emb.class_embedder.embedding_table.weight
    assert 0.01 < emb.std() < 0.03


def test_frontier_keeps_the_rows_no_other_row_dominates():
    from diffcr.app.demo.compare import frontier

    rows = {"dense": {"class_accuracy": 0.95, "speedup_vs_dense": 1.0},
            "fast": {"class_accuracy": 0.80, "speedup_vs_dense": 3.0},
            "worse": {"class_accuracy": 0.79, "speedup_vs_dense": 2.0},  # below "fast"
            "middle": {"class_accuracy": 0.90, "speedup_vs_dense": 2.0},
            "tie": {"class_accuracy": 0.90, "speedup_vs_dense": 2.0}}  # equal: both stay
    assert frontier(rows) == ["dense", "fast", "middle", "tie"]


def _tiny_dit_batch():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=3,
                              out_channels=3, num_layers=2, sample_size=8, patch_size=2,
                              num_embeds_ada_norm=3)
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return m, x0, torch.tensor([0, 1, 2, 0])


def test_step_loss_is_the_diffusion_loss_without_options_and_with_a_teacher_equal_to_it():
    import copy

    from diffcr.app.ddpm import step_loss
    from diffcr.app.options import TrainConfig

    torch.set_num_threads(1)
    m, x0, y = _tiny_dit_batch()
    m.eval()
    sched = scheduler("v_prediction")
    plain = diffusion_loss(m, sched, x0, y, torch.Generator().manual_seed(5))
    same = step_loss(m, m, sched, x0, y, torch.Generator().manual_seed(5), TrainConfig())
    assert torch.equal(plain, same)
    # the teacher term is the distance to the teacher: zero for the model itself
    taught = step_loss(m, m, sched, x0, y, torch.Generator().manual_seed(5),
                       TrainConfig(distill=2.0), teacher=copy.deepcopy(m))
    torch.testing.assert_close(taught, plain)
    # against another teacher it adds a positive term
    other = copy.deepcopy(m)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05)
    assert step_loss(m, m, sched, x0, y, torch.Generator().manual_seed(5),
                     TrainConfig(distill=2.0), teacher=other) > plain
    # cache-aware: the token cache is filled at a noisier timestep first, then routed
    diffcr.convert(m, diffcr.DiffCRConfig(target_kept_ratio=0.5))
    tc = diffcr.enable_token_cache(m, diffcr.TokenCacheConfig(refresh_every=3))
    m.train()
    loss = step_loss(m, m, sched, x0, y, torch.Generator().manual_seed(5),
                     TrainConfig(cache_refresh=3))
    loss.backward()
    assert tc.step == 1 and tc.entries
    assert {r.last_path for r in diffcr.routing_state(m).blocks.values()} <= {"fused", "compat"}
    assert all(p.grad is not None for p in diffcr.ratio_parameters(m))
