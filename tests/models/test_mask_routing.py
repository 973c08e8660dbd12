"""Mask-aware routing (diffcr.mask_routing): every routed block computes every masked token and
spends its kept ratio on the context, per image family, on the fused and compat paths, frozen
and in two-bin training, with the token cache; at kept ratio 1 it changes nothing; in
diffusers' inpaint pipelines the latents outside the mask are the pipeline's own."""
import pytest
import torch

import diffcr
import diffcr_kernels as dk
from diffcr import DiffCRConfig
from diffcr.keep_mask import KeepMask, token_grid

from tiny_models import FAMILY_CASES, FUSED_FAMILIES, set_ratios

IMAGE_FAMILIES = ["dit", "flux", "pixart", "qwenimage", "sd3"]  # 16 image tokens, a 4x4 grid
CASES = [(f, p) for f in IMAGE_FAMILIES for p in (("fused", "compat") if f in FUSED_FAMILIES
                                                 else ("compat",))]
# sample 0 inpaints the top-left 2x2 tokens, sample 1 the bottom row and one more (kept counts
# differ per sample)
MASK = torch.zeros(2, 4, 4, dtype=torch.bool)
MASK[0, :2, :2] = True
MASK[1, 3, :] = True
MASK[1, 2, 0] = True


def _model(name, kappa, path, frozen=True):
    factory, inputs = FAMILY_CASES[name]
    m = factory()
    diffcr.convert(m, DiffCRConfig(target_kept_ratio=0.5, path=path))
    set_ratios(m, kappa)
    if frozen:
        diffcr.freeze(m)
    return m, inputs


def _selections(model):
    """After a forward: ``{block: selected token indices per sample (sets)}``."""
    out = {}
    for i, r in diffcr.routing_state(model).blocks.items():
        sel = r.last_selection
        assert sel is not None, f"block {i} computed every token"
        n = 16
        rows = [set() for _ in range(2)]
        for t in sel.indices.tolist():
            rows[t // n].add(t % n)
        out[i] = rows
    return out


@pytest.mark.parametrize("name,path", CASES)
def test_every_masked_token_is_computed_and_the_context_gets_the_kept_ratio(name, path):
    m, inputs = _model(name, 0.25, path)
    want = [set(torch.nonzero(MASK[b].reshape(-1)).flatten().tolist()) for b in range(2)]
    with torch.no_grad():
        plain = m(**inputs([900, 100])).sample
    k = {i: [len(s) for s in rows] for i, rows in _selections(m).items()}  # the kept counts
    with torch.no_grad(), diffcr.mask_routing(m, MASK, margin=0, bucket=1 / 16):
        out = m(**inputs([900, 100])).sample
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    for i, rows in _selections(m).items():
        r = diffcr.routing_state(m).blocks[i]
        assert r.last_path == path
        for b in range(2):
            assert want[b] <= rows[b], (i, b)
            # the block's share k / N of the context, after the masked tokens
            assert len(rows[b]) == len(want[b]) + dk.kept_count(k[i][b] / 16,
                                                                16 - len(want[b]))
    # outside the context the routing is as before
    with torch.no_grad():
        assert torch.equal(m(**inputs([900, 100])).sample, plain)


@pytest.mark.parametrize("name", IMAGE_FAMILIES)
def test_two_bin_training_computes_every_masked_token_in_both_bins(name):
    m, inputs = _model(name, 0.25, "auto", frozen=False)
    m.train()
    with diffcr.mask_routing(m, MASK, margin=0, bucket=1 / 16):
        out = m(**inputs([900, 100])).sample
    out.float().square().mean().backward()
    for i, r in diffcr.routing_state(m).blocks.items():
        sel = r.last_selection
        assert sel.segs_per_sample == 2
        # one segment per (sample, bin), each holding its sample's masked tokens
        bounds = sel.cu_seqlens.tolist()
        for s in range(len(bounds) - 1):
            b = s // 2
            got = {t % 16 for t in sel.indices[bounds[s]:bounds[s + 1]].tolist()}
            want = set(torch.nonzero(MASK[b].reshape(-1)).flatten().tolist())
            assert want <= got, (i, s)
    assert all(b.ratio.kept.grad is not None for b in diffcr.routed_blocks(m).values())


@pytest.mark.parametrize("name", IMAGE_FAMILIES)
def test_at_kept_ratio_one_mask_routing_changes_nothing(name):
    m, inputs = _model(name, 1.0, "auto")
    kw = inputs([900, 100])
    with torch.no_grad():
        plain = m(**kw).sample
        with diffcr.mask_routing(m, MASK):
            masked = m(**kw).sample
    assert torch.equal(plain, masked)


def test_with_the_token_cache_the_masked_tokens_are_computed_at_every_step():
    m, inputs = _model("flux", 0.25, "auto")
    diffcr.enable_token_cache(m, diffcr.TokenCacheConfig(refresh_every=3))
    want = [set(torch.nonzero(MASK[b].reshape(-1)).flatten().tolist()) for b in range(2)]
    paths = []
    with torch.no_grad(), diffcr.mask_routing(m, MASK, margin=0, bucket=1 / 16):
        for t in (900, 700, 500):
            m(**inputs([t, t]))
            paths.append({r.last_path for r in diffcr.routing_state(m).blocks.values()})
            if paths[-1] == {"fused"}:
                for rows in _selections(m).values():
                    assert all(want[b] <= rows[b] for b in range(2))
    assert paths == [{"refresh"}, {"fused"}, {"fused"}]


def test_a_mask_at_pixel_resolution_pools_to_the_token_grid_and_dilates():
    pixels = torch.zeros(64, 64)
    pixels[17:20, 40:42] = 1.0  # one pixel block inside token (1, 2) of a 4x4 grid
    keep = KeepMask(pixels, margin=0)
    want = torch.zeros(4, 4, dtype=torch.bool)
    want[1, 2] = True
    assert torch.equal(keep.tokens(16), want.reshape(1, 16))
    grown = KeepMask(pixels, margin=1).tokens(16).reshape(4, 4)
    assert torch.equal(grown, torch.nn.functional.max_pool2d(
        want[None, None].float(), 3, 1, 1)[0, 0] > 0)
    # PIL and uint8 masks: white is masked
    from PIL import Image

    img = Image.fromarray((pixels.numpy() * 255).astype("uint8"))
    assert torch.equal(KeepMask(img, margin=0).tokens(16), want.reshape(1, 16))
    # non-square images: the grid of the mask's aspect ratio
    assert token_grid(32, 480, 960) == (4, 8) and token_grid(32, 960, 480) == (8, 4)


def test_bucketing_rounds_the_masked_count_up():
    keep = KeepMask(MASK[:1], margin=0, bucket=1 / 2)  # 4 masked of 16: rounded up to 8
    mask, ks = keep.plan([[4]], 16, "cpu")
    assert ks == [[8 + dk.kept_count(4 / 16, 8)]]
    keep = KeepMask(MASK[:1], margin=0, bucket=1 / 16, context_kept_ratio=0.5)
    assert keep.plan([[4], [4]], 16, "cpu")[1] == [[4 + 6], [4 + 6]]


def test_pipelines_and_bad_input():
    m, inputs = _model("sd3", 0.25, "auto")
    kw = inputs([900, 100])
    for bad, msg in ((torch.zeros(2, 2, 2, 2), "must be"), (torch.zeros(3, 4, 4), "3 masks"),
                     (torch.full((4, 4), float("nan")), "non-finite")):
        with pytest.raises(ValueError, match=msg), torch.no_grad(), \
                diffcr.mask_routing(m, bad, margin=0):
            m(**kw)
    for kw_bad, msg in ((dict(margin=-1), "margin"), (dict(context_kept_ratio=0), "context"),
                        (dict(bucket=0), "bucket")):
        with pytest.raises(ValueError, match=msg):
            with diffcr.mask_routing(m, MASK, **kw_bad):
                pass
    assert diffcr.routing_state(m).keep_mask is None  # nothing left behind
    v, vin = _model("wan", 0.25, "auto")  # a video: no image grid
    with pytest.raises(ValueError, match="no grid"), torch.no_grad(), \
            diffcr.mask_routing(v, MASK):
        v(**vin([900, 100]))
    with pytest.raises(ValueError, match="neither a converted model"):
        with diffcr.mask_routing(object(), MASK):
            pass


def _sd3_inpaint(g):
    from diffusers import StableDiffusion3InpaintPipeline

    from tiny_models import sd3_pipe

    # classifier-free guidance in one batch
    return StableDiffusion3InpaintPipeline(**sd3_pipe(channels=16).components), 8, dict(
        prompt_embeds=torch.randn(1, 5, 16, generator=g),
        pooled_prompt_embeds=torch.randn(1, 8, generator=g),
        negative_prompt_embeds=torch.randn(1, 5, 16, generator=g),
        negative_pooled_prompt_embeds=torch.randn(1, 8, generator=g), guidance_scale=4.0)


def _flux_inpaint(g):
    from diffusers import FluxInpaintPipeline

    from tiny_models import flux_pipe

    return FluxInpaintPipeline(**flux_pipe().components), 16, dict(
        prompt_embeds=torch.randn(1, 5, 32, generator=g),
        pooled_prompt_embeds=torch.randn(1, 32, generator=g))


def _qwenimage_inpaint(g):
    from diffusers import QwenImageInpaintPipeline

    from tiny_models import qwenimage_pipe

    mask = torch.ones(1, 5, dtype=torch.long)
    # true classifier-free guidance: separate transformer calls, one mask for both
    return QwenImageInpaintPipeline(**qwenimage_pipe().components), 64, dict(
        prompt_embeds=torch.randn(1, 5, 32, generator=g), prompt_embeds_mask=mask,
        negative_prompt_embeds=torch.randn(1, 5, 32, generator=g),
        negative_prompt_embeds_mask=mask, true_cfg_scale=4.0)


@pytest.mark.parametrize("make_pipe", [_sd3_inpaint, _flux_inpaint, _qwenimage_inpaint],
                         ids=["StableDiffusion3InpaintPipeline", "FluxInpaintPipeline",
                              "QwenImageInpaintPipeline"])
def test_inpaint_pipelines_compute_the_mask_and_keep_the_rest(make_pipe):
    """An inpaint pipeline on tiny components, routed at kept 0.25 inside ``mask_routing(pipe,
    mask_image)``: every routed block computes every masked token at every step, the latents
    outside the mask are the unrouted pipeline's own (its blend), and at kept ratio 1 the
    result is the unconverted pipeline's."""
    g = torch.Generator().manual_seed(2)
    pipe, side, kw = make_pipe(g)
    image = torch.rand(1, 3, side, side, generator=g)
    mask_image = torch.zeros(1, 1, side, side)
    mask_image[..., : side // 2, : side // 2] = 1.0
    kw.update(image=image, mask_image=mask_image, height=side, width=side, strength=1.0,
              num_inference_steps=3, output_type="latent")

    def run():
        with torch.no_grad():
            return pipe(generator=torch.Generator().manual_seed(0), **kw).images

    dense = run()
    diffcr.convert(pipe.transformer, DiffCRConfig(gate="sigmoid2x"))
    with diffcr.mask_routing(pipe, mask_image):
        assert (run() - dense).abs().max() <= 1e-5  # kept ratio 1: the unconverted result
    set_ratios(pipe.transformer, 0.25)
    diffcr.freeze(pipe.transformer)
    seen = []

    def spy(mod, args, kwargs, out):
        r = mod._diffcr
        n = (args[0] if args else kwargs["hidden_states"]).shape[1]
        keep = diffcr.routing_state(pipe.transformer).keep_mask.tokens(n)[0]
        idx = r.last_selection.indices % n
        seen.append(bool(torch.isin(torch.nonzero(keep).flatten(), idx).all()))

    hooks = [b.register_forward_hook(spy, with_kwargs=True)
             for b in diffcr.routed_blocks(pipe.transformer).values()]
    with diffcr.mask_routing(pipe, mask_image, margin=0):
        routed = run()
    for h in hooks:
        h.remove()
    assert seen and all(seen)
    assert not torch.allclose(routed, dense)
    # outside the mask the latents are the pipeline's blend of the image, as without routing
    outside = _latent_outside(pipe, routed, side)
    torch.testing.assert_close(routed[outside], dense[outside], rtol=0, atol=1e-6)


def _latent_outside(pipe, latents, side):
    """Where the (packed or unpacked) latents lie outside the mask's top-left quarter."""
    if latents.dim() == 3:  # Flux: packed 2x2 tokens on an (h/2 x w/2) grid
        n = latents.shape[1]
        g = int(n ** 0.5)
        grid = torch.ones(g, g, dtype=torch.bool)
        grid[: g // 2, : g // 2] = False
        return grid.reshape(1, n, 1).expand_as(latents)
    h = latents.shape[-1]
    grid = torch.ones(h, h, dtype=torch.bool)
    grid[: h // 2, : h // 2] = False
    return grid.expand_as(latents)


def test_an_edit_model_computes_every_generated_token_and_routes_the_condition_tokens():
    """``FluxKontextPipeline`` appends the condition image's tokens after the generated
    image's: ``grid=(h, w)`` of the generated image with an all-ones mask computes every
    generated token in every routed block and routes only the condition tokens."""
    from diffusers import FluxKontextPipeline

    from tiny_models import flux_pipe

    pipe = FluxKontextPipeline(**flux_pipe().components)
    g = torch.Generator().manual_seed(1)
    kw = dict(image=torch.rand(1, 3, 16, 16, generator=g),
              prompt_embeds=torch.randn(1, 5, 32, generator=g),
              pooled_prompt_embeds=torch.randn(1, 32, generator=g), height=16, width=16,
              max_area=16 * 16, _auto_resize=False, num_inference_steps=2, guidance_scale=3.5,
              output_type="latent")

    def run():
        with torch.no_grad():
            return pipe(generator=torch.Generator().manual_seed(0), **kw).images

    dense = run()
    diffcr.convert(pipe.transformer, DiffCRConfig(gate="sigmoid2x"))
    set_ratios(pipe.transformer, 0.25)
    diffcr.freeze(pipe.transformer)
    counts = []

    def spy(mod, args, kwargs, out):
        idx = mod._diffcr.last_selection.indices
        n = (args[0] if args else kwargs["hidden_states"]).shape[1]
        assert n == 128  # 64 generated + 64 condition tokens
        counts.append((int((idx < 64).sum()), int((idx >= 64).sum())))

    hooks = [b.register_forward_hook(spy, with_kwargs=True)
             for b in diffcr.routed_blocks(pipe.transformer).values()]
    with diffcr.mask_routing(pipe, torch.ones(16, 16), margin=0, grid=(8, 8)):
        routed = run()
    for h in hooks:
        h.remove()
    k = dk.kept_count(0.3, 128)  # the frozen bin of kept 0.25 is 0.3
    assert counts and all(c == (64, dk.kept_count(k / 128, 64)) for c in counts), counts
    assert routed.shape == dense.shape and not torch.allclose(routed, dense)
    with pytest.raises(ValueError, match="grid 12x12 has more tokens"), \
            diffcr.mask_routing(pipe, torch.ones(16, 16), grid=(12, 12)):
        run()
    with pytest.raises(ValueError, match="grid must be"):
        diffcr.mask_routing(pipe, torch.ones(4, 4), grid=(0, 4)).__enter__()


@pytest.mark.parametrize("name", ["dit", "flux"])
def test_mask_routing_under_torch_compile_fullgraph(name):
    """``torch.compile(model, fullgraph=True)`` (eager backend: the tracing) with mask-aware
    routing: equal to eager over denoising steps, every masked token computed, and a step
    with the same regions and mask compiles nothing new (the mask's kept counts are host
    values fixed per mask, guarded like the regions). The first call of each input shape runs
    eagerly: it pools the mask to the blocks' token counts (host work)."""
    m, inputs = _model(name, 0.25, "auto")
    steps = [inputs([900, 900]), inputs([300, 300]), inputs([900, 900]), inputs([300, 300])]
    with torch.no_grad(), diffcr.mask_routing(m, MASK, margin=0, bucket=1 / 16):
        want = [m(**kw).sample for kw in steps]
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    before = counters["stats"]["unique_graphs"]
    try:
        compiled = torch.compile(m, fullgraph=True, backend="eager")
        with torch.no_grad(), diffcr.mask_routing(m, MASK, margin=0, bucket=1 / 16):
            got = [compiled(**kw).sample for kw in steps[:3]]
            graphs = counters["stats"]["unique_graphs"] - before
            assert graphs == 2  # one per set of regions (the first call ran eagerly)
            got.append(compiled(**steps[3]).sample)
            assert counters["stats"]["unique_graphs"] - before == graphs
            masked = [set(torch.nonzero(MASK[b].reshape(-1)).flatten().tolist())
                      for b in range(2)]
            for i, rows in _selections(m).items():
                assert all(masked[b] <= rows[b] for b in range(2)), i
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()
