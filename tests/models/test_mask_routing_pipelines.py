"""Mask-aware routing (diffcr.mask_routing) in more diffusers pipelines on tiny components
(issue #27): FluxFillPipeline (mask and masked image as input channels), FluxKontextInpaintPipeline
(condition-image tokens appended and a mask), QwenImageEditPipeline and QwenImageEditPlusPipeline
(condition-image tokens appended; Edit Plus also with ``zero_cond_t``, the Qwen-Image-Edit-2511
modulation). For each: converted at kept ratio 1 inside ``mask_routing`` the pipeline gives the
unconverted pipeline's output, and routed at kept 0.25 (frozen) every routed block computes every
token the mask requires at every step, spends its own kept count on the rest, and the output
differs from the dense one."""
import contextlib

import pytest
import torch

import diffcr
import diffcr_kernels as dk
from diffcr import DiffCRConfig

from tiny_models import _randomise_weights, flux_pipe, make, qwenimage_pipe, set_ratios

# the masked count is rounded up to a multiple of ceil(BUCKET * N) = 1 token: exact counts
BUCKET = 1 / 1024


@contextlib.contextmanager
def _spy(transformer):
    """Records ``(N, selected token indices, the block's frozen kept count)`` after every routed
    block's forward (batch 1: indices are token positions)."""
    calls = []

    def hook(mod, args, kwargs, out):
        r = mod._diffcr
        n = (args[0] if args else kwargs["hidden_states"]).shape[1]
        assert len(set(r.frozen_bins)) == 1
        sel = r.last_selection
        calls.append((n, None if sel is None else set(sel.indices.tolist()),
                      dk.kept_count(r.frozen_bins[0], n)))

    hooks = [b.register_forward_hook(hook, with_kwargs=True)
             for b in diffcr.routed_blocks(transformer).values()]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def _identity_and_route(pipe, run, **mask_kw):
    """Dense output; asserts the kappa = 1 identity inside ``mask_routing(pipe, **mask_kw)``;
    then freezes at kept 0.25 and returns ``(dense, plain_calls, routed, masked_calls)``: the
    spied selections of a routed run without and with mask routing."""
    dense = run()
    diffcr.convert(pipe.transformer, DiffCRConfig(gate="sigmoid2x"))
    with diffcr.mask_routing(pipe, **mask_kw):
        assert (run() - dense).abs().max() <= 1e-5  # kept ratio 1: the unconverted result
    set_ratios(pipe.transformer, 0.25)
    diffcr.freeze(pipe.transformer)
    # the zero-init router scores every token alike (ties: the first tokens, the generated
    # image's, win); a random one ranks them, so that the mask visibly changes the selection
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for b in diffcr.routed_blocks(pipe.transformer).values():
            b.router.weight.copy_(0.1 * torch.randn(b.router.weight.shape, generator=g))
    with _spy(pipe.transformer) as plain_calls:
        run()
    with _spy(pipe.transformer) as masked_calls, diffcr.mask_routing(pipe, **mask_kw):
        routed = run()
    assert plain_calls and masked_calls
    assert routed.shape == dense.shape and torch.isfinite(routed).all()
    assert not torch.allclose(routed, dense)
    return dense, plain_calls, routed, masked_calls


def _quarter_tokens(rows, cols):
    """Token indices of the top-left quarter of a row-major ``rows x cols`` grid."""
    return {r * cols + c for r in range(rows // 2) for c in range(cols // 2)}


def _check_masked_run(plain_calls, masked_calls, n, required):
    """Every call of the masked run computed ``required`` and the block's kept share of the
    rest; the plain routed run (same blocks, no mask) did not compute all of them."""
    for (n_, sel, k) in masked_calls:
        assert n_ == n and sel is not None
        assert required <= sel
        c = len(required)
        assert len(sel) == c + dk.kept_count(k / n, n - c) < n
    assert len(plain_calls) == len(masked_calls)
    assert all(len(sel) == k for _, sel, k in plain_calls)
    assert any(not required <= sel for _, sel, _ in plain_calls)


# ---------------------------------------------------------------- Flux Fill

def _flux_fill_pipe():
    """FluxFillPipeline on flux_pipe's components with a transformer that takes the packed
    latents (4 channels: 1 latent channel x 2x2), the packed masked-image latents (4) and the
    packed mask (vae_scale_factor**2 = 1 channel x 2x2 = 4): in_channels 12, out_channels 4."""
    from diffusers import FluxFillPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = _randomise_weights(FluxTransformer2DModel(
        patch_size=1, in_channels=12, out_channels=4, num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)).eval())
    components = {k: v for k, v in flux_pipe().components.items()
                  if k not in ("image_encoder", "feature_extractor")}
    components["transformer"] = transformer
    return FluxFillPipeline(**components)


def test_flux_fill_computes_every_masked_token():
    """FluxFillPipeline: the mask and the masked image are input channels and every token is
    denoised (no blend); inside ``mask_routing(pipe, mask_image)`` every routed block still
    computes every token under the mask (the top-left quarter of the 8x8 token grid)."""
    pipe = _flux_fill_pipe()
    side = 16  # vae_scale_factor 1, 2x2 packing: an 8x8 token grid
    assert pipe.vae_scale_factor == 1
    g = torch.Generator().manual_seed(2)
    mask_image = torch.zeros(1, 1, side, side)
    mask_image[..., : side // 2, : side // 2] = 1.0
    kw = dict(image=torch.rand(1, 3, side, side, generator=g), mask_image=mask_image,
              prompt_embeds=torch.randn(1, 5, 32, generator=g),
              pooled_prompt_embeds=torch.randn(1, 32, generator=g), height=side, width=side,
              num_inference_steps=3, guidance_scale=30.0, output_type="latent")

    def run():
        with torch.no_grad():
            return pipe(generator=torch.Generator().manual_seed(0), **kw).images

    _, plain_calls, _, masked_calls = _identity_and_route(
        pipe, run, mask=mask_image, margin=0, bucket=BUCKET)
    assert len(masked_calls) == 3 * 4  # 3 steps x 4 routed blocks
    _check_masked_run(plain_calls, masked_calls, 64, _quarter_tokens(8, 8))


# ---------------------------------------------------------------- Flux Kontext inpaint

def test_flux_kontext_inpaint_computes_the_masked_generated_tokens():
    """FluxKontextInpaintPipeline appends the reference image's tokens (here 8x16, a 16x32
    image) after the generated image's 8x8: ``grid=(8, 8)`` with the pipeline's ``mask_image``
    makes every routed block compute the masked generated tokens; the unmasked generated tokens
    and the reference tokens are context, routed; outside the mask the latents are the
    pipeline's blend of the image, as without routing. Without ``grid`` the 192 tokens are no
    grid of the square mask: refused."""
    from diffusers import FluxKontextInpaintPipeline

    pipe = FluxKontextInpaintPipeline(**flux_pipe().components)
    side = 16
    g = torch.Generator().manual_seed(3)
    mask_image = torch.zeros(1, 1, side, side)
    mask_image[..., : side // 2, : side // 2] = 1.0
    kw = dict(image=torch.rand(1, 3, side, side, generator=g),
              image_reference=torch.rand(1, 3, side, 2 * side, generator=g),
              mask_image=mask_image, prompt_embeds=torch.randn(1, 5, 32, generator=g),
              pooled_prompt_embeds=torch.randn(1, 32, generator=g), height=side, width=side,
              max_area=side * side, _auto_resize=False, strength=1.0, num_inference_steps=3,
              guidance_scale=3.5, output_type="latent")

    def run():
        with torch.no_grad():
            return pipe(generator=torch.Generator().manual_seed(0), **kw).images

    dense, plain_calls, routed, masked_calls = _identity_and_route(
        pipe, run, mask=mask_image, margin=0, bucket=BUCKET, grid=(8, 8))
    assert len(masked_calls) == 3 * 4
    required = _quarter_tokens(8, 8)
    _check_masked_run(plain_calls, masked_calls, 64 + 128, required)
    for _, sel, _ in masked_calls:
        # the context share went to both unmasked generated and reference tokens
        assert 0 < len({t for t in sel if t < 64} - required) < 64 - len(required)
        assert 0 < len({t for t in sel if t >= 64}) < 128
    # outside the mask the latents are the pipeline's blend of the image, as without routing
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[:4, :4] = False
    outside = outside.reshape(1, 64, 1).expand_as(routed)
    torch.testing.assert_close(routed[outside], dense[outside], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="no grid"), diffcr.mask_routing(pipe, mask_image):
        run()


# ---------------------------------------------------------------- Qwen-Image-Edit (Plus)

def _pil(width, height, seed):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8)
                           .numpy())


def _check_edit_run(masked_calls, generated, condition):
    """Every generated token computed in every routed block, the condition tokens routed at
    the block's kept share."""
    n = generated + condition
    for n_, sel, k in masked_calls:
        assert n_ == n and sel is not None
        gen = sum(t < generated for t in sel)
        cond = len(sel) - gen
        assert (gen, cond) == (generated, dk.kept_count(k / n, condition))
        assert 0 < cond < condition


def _qwen_edit_case(name, zero_cond_t, monkeypatch):
    """``(pipe, kwargs, generated tokens, condition tokens)``. The pipelines resize the
    condition image to about 1024x1024 (a 4096-token condition and seconds of VAE encoding on
    one CPU thread); the target area is shrunk to the image's own 96x64 here. Prompt embeddings
    are passed in: no Qwen2.5-VL encoder, tokenizer or processor is built (the pipelines call
    them only when ``prompt_embeds`` is None)."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit_mod
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus_mod
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    components = qwenimage_pipe().components
    if zero_cond_t:
        components["transformer"] = make("qwenimage", zero_cond_t=True)
    g = torch.Generator().manual_seed(4)
    kw = dict(prompt_embeds=torch.randn(1, 5, 32, generator=g),
              prompt_embeds_mask=torch.ones(1, 5, dtype=torch.long), height=64, width=64,
              num_inference_steps=2, output_type="latent")
    small = 96 * 64
    if name == "edit":
        orig = edit_mod.calculate_dimensions
        monkeypatch.setattr(edit_mod, "calculate_dimensions",
                            lambda area, ratio: orig(min(area, small), ratio))
        pipe = QwenImageEditPipeline(processor=None, **components)
        kw["image"] = _pil(96, 64, 5)  # 64x96 -> a 4x6 condition grid
        condition = 24
    else:
        monkeypatch.setattr(plus_mod, "VAE_IMAGE_SIZE", small)
        pipe = QwenImageEditPlusPipeline(processor=None, **components)
        # two condition images: 96x64 -> 4x6 tokens, 64x64 (area 6144, rounded to 32) -> 4x4
        kw["image"] = [_pil(96, 64, 5), _pil(64, 64, 6)]
        condition = 24 + 16
    assert pipe.vae_scale_factor == 8  # 64x64 generated: a 4x4 token grid
    return pipe, kw, 16, condition


@pytest.mark.parametrize("name,zero_cond_t", [("edit", False), ("edit_plus", False),
                                              ("edit_plus", True)],
                         ids=["QwenImageEditPipeline", "QwenImageEditPlusPipeline",
                              "QwenImageEditPlusPipeline-zero_cond_t"])
def test_qwen_image_edit_computes_every_generated_token(name, zero_cond_t, monkeypatch):
    """Qwen-Image-Edit appends the condition images' tokens after the generated image's:
    ``grid=(4, 4)`` of the generated image with an all-ones mask computes every generated token
    in every routed block and routes the condition tokens at the block's kept share."""
    pipe, kw, generated, condition = _qwen_edit_case(name, zero_cond_t, monkeypatch)
    assert pipe.transformer.zero_cond_t == zero_cond_t

    def run():
        with torch.no_grad():
            return pipe(generator=torch.Generator().manual_seed(0), **kw).images

    _, plain_calls, _, masked_calls = _identity_and_route(
        pipe, run, mask=torch.ones(64, 64), margin=0, bucket=BUCKET, grid=(4, 4))
    assert len(masked_calls) == 2 * 2  # 2 steps x 2 routed blocks
    _check_edit_run(masked_calls, generated, condition)
    # without mask routing the generated tokens are routed like the others
    assert all(len(sel) == k for _, sel, k in plain_calls)
    assert any(sum(t < generated for t in sel) < generated for _, sel, _ in plain_calls)
