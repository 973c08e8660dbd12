"""The demo's inpainting task on a tiny setting (seconds): the sampler's blend, the masked
error, the inpainting regions, the computed-share counter, and compare_methods' context and
extra scores."""

import pytest
import torch

import diffcr
import diffcr_kernels as dk
from diffcr.app.ddpm import sample_images
from diffcr.app.demo.compare import Method, compare_methods
from diffcr.app.demo.inpaint import (ComputedShare, inpaint_regions, masked_error,
                                     masked_inputs)

from tiny_models import _randomise_weights, frozen_at, tiny_dit

NCLS, STEPS, C, S = 3, 5, 4, 8


def _model():
    return _randomise_weights(tiny_dit(num_classes=NCLS)).eval()


def _box(n, top, left, h, w):
    m = torch.zeros(n, S, S, dtype=torch.bool)
    m[:, top:top + h, left:left + w] = True
    return m


def _inpaint(model, labels, init, mask, seed=3):
    return sample_images(model, labels, NCLS, C, S, steps=STEPS, seed=seed,
                         prediction_type="v_prediction", init=init, mask=mask)


def test_inpainting_keeps_every_pixel_outside_the_mask_and_draws_inside():
    torch.manual_seed(0)
    model = _model()
    labels = torch.tensor([0, 1, 2, 0])
    init = torch.rand(4, C, S, S) * 2 - 1
    mask = _box(4, 2, 2, 4, 3)
    out = _inpaint(model, labels, init, mask)
    outside = ~mask[:, None].expand_as(init)
    assert torch.equal(out[outside], init.clamp(-1, 1)[outside])
    assert not torch.allclose(out[~outside], init[~outside], atol=1e-3)
    # the blend is deterministic per seed and depends on it
    assert torch.equal(out, _inpaint(model, labels, init, mask))
    assert not torch.equal(out, _inpaint(model, labels, init, mask, seed=4))
    # the model's prediction outside the mask is unused: a different outside gives the same
    # outside back and a different inside (the context matters)
    other = init.clone()
    other[outside] = -other[outside]
    out2 = _inpaint(model, labels, other, mask)
    assert torch.equal(out2[outside], other.clamp(-1, 1)[outside])
    assert not torch.equal(out2[~outside], out[~outside])


def test_inpainting_arguments_are_checked():
    model = _model()
    labels = torch.tensor([0, 1])
    init = torch.zeros(2, C, S, S)
    mask = _box(2, 0, 0, 2, 2)
    with pytest.raises(ValueError, match="needs both init and mask"):
        _inpaint(model, labels, init, None)
    with pytest.raises(ValueError, match="init must be"):
        _inpaint(model, labels, init[:1], mask)
    with pytest.raises(ValueError, match="init must be"):
        _inpaint(model, labels, init, mask[:, :4])


def test_masked_error_and_inputs():
    orig = torch.zeros(2, 3, 4, 4)
    imgs = orig.clone()
    imgs[0, :, 0, 0] = 1.0       # inside sample 0's region
    imgs[1, :, 3, 3] = 2.0       # outside sample 1's region: not counted
    regions = torch.zeros(2, 4, 4, dtype=torch.bool)
    regions[0, :2, :2] = True    # 4 pixels
    regions[1, 0, 0] = True      # 1 pixel
    # sample 0: 3 channels x 1 pixel of error 1 over 3 x 4 pixel-channels; sample 1: 0
    assert masked_error(imgs, orig, regions) == pytest.approx((1 / 4 + 0) / 2)
    with pytest.raises(ValueError, match="do not match"):
        masked_error(imgs[:1], orig, regions)
    with pytest.raises(ValueError, match="empty"):
        masked_error(imgs, orig, torch.zeros_like(regions))
    shown = masked_inputs(imgs, regions)
    assert torch.equal(shown[0, :, :2, :2], torch.zeros(3, 2, 2))
    assert torch.equal(shown[1, :, 3, 3], imgs[1, :, 3, 3])


def test_inpaint_regions_dilate_the_shape():
    shapes = torch.zeros(1, 6, 6, dtype=torch.bool)
    shapes[0, 2:4, 2:4] = True
    r0, r1 = inpaint_regions(shapes, dilate=0), inpaint_regions(shapes)
    assert torch.equal(r0, shapes)
    assert int(r1.sum()) == 16 and bool(r1[0, 1:5, 1:5].all())
    with pytest.raises(ValueError, match=r"\[n, H, W\]"):
        inpaint_regions(shapes[0])


def test_computed_share_counts_the_routed_rows_with_and_without_a_mask():
    torch.manual_seed(0)
    conv = frozen_at(_model(), kept=0.5)
    n_tok = (S // conv.config.patch_size) ** 2
    nblocks = len(diffcr.routed_blocks(conv))
    labels = torch.tensor([0, 1])
    with ComputedShare(conv) as share:
        sample_images(conv, labels, NCLS, C, S, steps=2, prediction_type="v_prediction")
    k = dk.kept_count(0.5, n_tok)
    assert share.total == 2 * 2 * 2 * n_tok * nblocks  # steps x CFG halves x samples
    assert share.share == pytest.approx(k / n_tok)
    # hooks are off after exit
    before = share.computed
    sample_images(conv, labels, NCLS, C, S, steps=1, prediction_type="v_prediction")
    assert share.computed == before
    # mask-aware routing: the masked tokens and a quarter of the context
    mask = _box(1, 0, 0, 4, 8)  # the top half: 8 of the 16 tokens
    with diffcr.mask_routing(conv, mask, margin=0, context_kept_ratio=0.25, bucket=1 / 16):
        with ComputedShare(conv) as share:
            sample_images(conv, labels, NCLS, C, S, steps=2, prediction_type="v_prediction")
    masked = n_tok // 2
    assert share.share == pytest.approx((masked + dk.kept_count(0.25, n_tok - masked)) / n_tok)
    # `required`: every masked token-block counted, none skipped under mask-aware routing ...
    # (the bottom half: a fresh router scores every token alike and keeps the first ones)
    mask = _box(1, S // 2, 0, S // 2, S)
    rows = mask.expand(4, S, S)  # the two samples' CFG halves
    with diffcr.mask_routing(conv, mask, margin=0, bucket=1 / 16):
        with ComputedShare(conv, required=rows) as share:
            sample_images(conv, labels, NCLS, C, S, steps=2, prediction_type="v_prediction")
    assert share.required == 2 * 4 * masked * nblocks and share.missed == 0
    # ... and some skipped by the router alone (half of the tokens kept)
    with ComputedShare(conv, required=rows) as share:
        sample_images(conv, labels, NCLS, C, S, steps=2, prediction_type="v_prediction")
    assert share.required == 2 * 4 * masked * nblocks and share.missed > 0
    with pytest.raises(ValueError, match="required has 1 rows, the block ran 4"):
        with ComputedShare(conv, required=mask):
            sample_images(conv, labels, NCLS, C, S, steps=1, prediction_type="v_prediction")


def test_compare_methods_enters_the_context_and_reports_extra_scores():
    from diffcr.app.demo.classifier import ShapeClassifier

    torch.manual_seed(0)
    base = _model()
    clf = ShapeClassifier(NCLS, in_channels=C).eval()
    entered = []

    class Ctx:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc):
            return False

    methods = {"dense": Method(base), "ctx": Method(base, context=Ctx)}
    labels = torch.arange(NCLS)
    real = torch.rand(6, C, S, S) * 2 - 1

    def sampler(model, labs, seed):
        return sample_images(model, labs, NCLS, C, S, steps=2, seed=seed,
                             prediction_type="v_prediction")

    calls = []
    rows = compare_methods(methods, sampler, clf, real, labels, seeds=(1, 2),
                           scores={"mean": lambda x: calls.append(1) or float(x.mean())})
    assert len(entered) == 2 and len(calls) == 4
    for r in rows.values():
        assert len(r["mean_per_seed"]) == 2
        assert r["mean"] == pytest.approx(sum(r["mean_per_seed"]) / 2)
    assert rows["dense"]["mean_per_seed"] == rows["ctx"]["mean_per_seed"]
