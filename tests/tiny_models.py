"""Tiny random diffusers models shared by the tests (2 layers, 2 heads x 8, 8x8 latents,
patch 2 -> 16 tokens). No downloads.

A test module that imports this one is skipped as a whole when diffusers is not installed (the
GPU image has no diffusers unless its wheel is carried), instead of breaking collection."""
import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is not installed (tests of converted models)")
from diffusers import (DiTTransformer2DModel, FluxTransformer2DModel,  # noqa: E402
                       HunyuanVideoTransformer3DModel, PixArtTransformer2DModel, QwenImageTransformer2DModel,
                       SD3Transformer2DModel, WanTransformer3DModel)

import diffcr  # noqa: E402


def tiny_pixart(layers=2, seed=0):
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=layers, sample_size=8, patch_size=2, cross_attention_dim=16,
        caption_channels=32, norm_type="ada_norm_single", use_additional_conditions=False).eval()


def tiny_dit(layers=2, seed=0, num_classes=10):
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes).eval()


def tiny_sd3(layers=3, seed=0, channels=4):
    """SD3.5-style: dual attention in block 0, qk RMS-norm, the last block context_pre_only."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=channels, num_layers=layers,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        caption_projection_dim=16, pooled_projection_dim=8, out_channels=channels,
        pos_embed_max_size=8,
        dual_attention_layers=(0,), qk_norm="rms_norm").eval()


def tiny_flux(layers=2, single_layers=2, seed=0, heads=2):
    """Flux.1-style: double- and single-stream blocks, 3-axis rotary, no guidance embedding.
    ``heads``: 4 for Ulysses over 4 ranks (it splits the heads)."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=16, num_attention_heads=heads, joint_attention_dim=32,
        pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)).eval()


def tiny_wan(layers=2, seed=0, heads=2):
    """Wan-style video DiT: 3-D rotary (head dim 12 = 4 + 4 + 4), qk RMS-norm, 2 frames of
    8x8 latents, patch (1, 2, 2) -> 32 tokens."""
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=12, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()


def tiny_qwenimage(layers=2, seed=0, zero_cond_t=False, heads=2):
    """Qwen-Image-style double-stream model: packed 2x2 latents of 4 channels (in_channels 16),
    2-D rotary over (frame, height, width) = 4 + 6 + 6 = head dim 16. ``zero_cond_t``: the
    edit models' per-token modulation (needs diffusers >= 0.36)."""
    torch.manual_seed(seed)
    kw = dict(zero_cond_t=True) if zero_cond_t else {}
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=layers, attention_head_dim=16,
        num_attention_heads=heads, joint_attention_dim=32, axes_dims_rope=(4, 6, 6), **kw).eval()


def qwenimage_inputs(t, images=1, side=4, text=5, seed=0):
    """Inputs of the tiny Qwen-Image model for timesteps ``t`` (already / 1000, as the
    pipelines pass them); ``images`` > 1: condition images appended (edit models)."""
    import inspect

    g = torch.Generator().manual_seed(seed)
    B = len(t)
    kw = dict(hidden_states=torch.randn(B, images * side * side, 16, generator=g),
              encoder_hidden_states=torch.randn(B, text, 32, generator=g),
              encoder_hidden_states_mask=torch.ones(B, text, dtype=torch.long),
              timestep=torch.tensor(t, dtype=torch.float32),
              img_shapes=[[(1, side, side)] * images] * B)
    if "txt_seq_lens" in inspect.signature(QwenImageTransformer2DModel.forward).parameters:
        kw["txt_seq_lens"] = [text] * B  # diffusers < 0.36
    return kw


def tiny_hunyuanvideo(layers=2, single_layers=2, seed=0):
    """HunyuanVideo-style: double- and single-stream blocks, 3-D rotary (head dim 12 =
    4 + 4 + 4), guidance embedding, 2 frames of 8x8 latents, patch (1, 2, 2) -> 32 tokens."""
    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
        num_layers=layers, num_single_layers=single_layers, num_refiner_layers=1, patch_size=2,
        patch_size_t=1, guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(4, 4, 4)).eval()


def hunyuanvideo_inputs(t, text=5, seed=0):
    """Inputs of the tiny HunyuanVideo model for timesteps ``t``; the last sample's text is
    padded (mask 0 after 3 tokens) when there are several."""
    g = torch.Generator().manual_seed(seed)
    B = len(t)
    mask = torch.ones(B, text)
    if B > 1:
        mask[-1, 3:] = 0
    return dict(hidden_states=torch.randn(B, 4, 2, 8, 8, generator=g),
                timestep=torch.tensor(t), encoder_hidden_states=torch.randn(B, text, 16, generator=g),
                encoder_attention_mask=mask, pooled_projections=torch.randn(B, 8, generator=g),
                guidance=torch.full((B,), 3.5))


def flux_ids(side=4, text=5):
    """(img_ids [side*side, 3], txt_ids [text, 3]) as the Flux pipelines build them."""
    img = torch.zeros(side * side, 3)
    img[:, 1] = torch.arange(side * side) // side
    img[:, 2] = torch.arange(side * side) % side
    return img, torch.zeros(text, 3)


def _randomise_weights(model, scale=0.1):
    """Diffusers zero-inits some output layers; give every parameter a non-trivial value so that
    routing visibly changes the output (scale 0.1 keeps the residual stream at |x| ~ 10-50, the
    range of real checkpoints, so fp32 comparisons at 1e-5 are meaningful)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def make(kind, **kw):
    factory = {"pixart": tiny_pixart, "dit": tiny_dit, "sd3": tiny_sd3, "flux": tiny_flux,
               "wan": tiny_wan, "qwenimage": tiny_qwenimage,
               "hunyuanvideo": tiny_hunyuanvideo}[kind]
    return _randomise_weights(factory(**kw))


def set_ratios(model, values):
    """values: float or per-region list, same for every routed block."""
    with torch.no_grad():
        for b in diffcr.routed_blocks(model).values():
            b.ratio.kept.copy_(torch.as_tensor(values, dtype=b.ratio.kept.dtype)
                               .expand_as(b.ratio.kept))


def frozen_at(model, kept=0.5):
    """A converted copy of ``model`` (two regions, the 2·sigmoid gate), every routed block at
    kept ratio ``kept``, frozen, in eval mode (``model`` itself is left as it is)."""
    import copy

    m = copy.deepcopy(model)
    diffcr.convert(m, diffcr.DiffCRConfig(num_regions=2, gate="sigmoid2x"))
    set_ratios(m, kept)
    diffcr.freeze(m)
    return m.eval()


# ---- one case per registered family: a tiny model and its inputs for timesteps t ----

def _pixart_inputs(t):
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(len(t), 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(len(t), 5, 32, generator=g),
                timestep=torch.tensor(t))


def _dit_inputs(t):
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(len(t), 4, 8, 8, generator=g),
                timestep=torch.tensor(t), class_labels=torch.tensor([1, 3, 5, 7][:len(t)]))


def _sd3_inputs(t):
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(len(t), 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(len(t), 5, 16, generator=g),
                pooled_projections=torch.randn(len(t), 8, generator=g),
                timestep=torch.tensor(t, dtype=torch.float32))


def _flux_inputs(t):
    g = torch.Generator().manual_seed(0)
    img_ids, txt_ids = flux_ids(4, 5)
    return dict(hidden_states=torch.randn(len(t), 16, 4, generator=g),
                encoder_hidden_states=torch.randn(len(t), 5, 32, generator=g),
                pooled_projections=torch.randn(len(t), 32, generator=g),
                timestep=torch.tensor(t, dtype=torch.float32) / 1000,  # as the pipeline
                img_ids=img_ids, txt_ids=txt_ids)


def _wan_inputs(t):
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(len(t), 4, 2, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(len(t), 5, 16, generator=g),
                timestep=torch.tensor(t))


# family name -> (tiny model factory, inputs for timesteps t)
FAMILY_CASES = {
    "pixart": (lambda: make("pixart"), _pixart_inputs),
    "dit": (lambda: make("dit"), _dit_inputs),
    "sd3": (lambda: make("sd3"), _sd3_inputs),
    "flux": (lambda: make("flux"), _flux_inputs),
    "wan": (lambda: make("wan"), _wan_inputs),
    "qwenimage": (lambda: make("qwenimage"),
                  lambda t: qwenimage_inputs([v / 1000 for v in t])),  # as the pipeline
    "hunyuanvideo": (lambda: make("hunyuanvideo"), hunyuanvideo_inputs),
}

FAMILIES = sorted(diffcr.families())
# the fused == compat tests run on the families that have a fused forward
FUSED_FAMILIES = sorted(n for n, f in diffcr.families().items() if f.has_fused)


def write_tiny_dit_folder(root, images=18):
    """``root/dit.json`` (a tiny DiT config: 8x8 RGB, patch 2, 3 classes) and ``root/data``
    (an image folder of procedural shapes, one subfolder per class); returns ``root``."""
    import json

    from diffcr.app.demo.data import make_shapes, save_image_folder

    conf = {"_class_name": "DiTTransformer2DModel", "num_attention_heads": 2,
            "attention_head_dim": 8, "in_channels": 3, "out_channels": 3, "num_layers": 2,
            "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 3}
    (root / "dit.json").write_text(json.dumps(conf))
    imgs, labels = make_shapes(images, size=8, seed=0, num_classes=3)
    save_image_folder(imgs, labels, root / "data")
    return root


def run_model(model, kw, seed=3):
    """``model(**kw).sample`` with the torch seed fixed (DiT drops class labels at random in
    training)."""
    torch.manual_seed(seed)
    return model(**kw).sample


def fused_and_compat(factory, kw, ratios, train, dtype=None, weights=False, **config):
    """The model from ``factory()`` converted twice, ``path="fused"`` and ``"compat"``, with
    the same random routers (the zero init ties every score) and kept ratios ``ratios``, run
    on ``kw`` in train or eval mode: ``{path: (output, grads, last_path of every block)}``,
    ``grads`` the router and ratio gradients of ``output² + ratio_loss`` in training
    (``weights=True``: and every other parameter's gradient, keyed ``"param <name>"``, as a
    full fine-tune computes them; None where a parameter got none).
    ``dtype``: model, parameters of the routing and floating inputs in that dtype."""
    out = {}
    for path in ("fused", "compat"):
        model = factory()
        inputs = kw
        if dtype is not None:
            model = model.to(dtype)
            config = dict(config, param_dtype=str(dtype).replace("torch.", ""))
            inputs = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
                      for k, v in kw.items()}
        diffcr.convert(model, diffcr.DiffCRConfig(**{"num_regions": 4, **config}, path=path))
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for b in diffcr.routed_blocks(model).values():
                b.router.weight.copy_(torch.randn(b.router.weight.shape, generator=g))
        set_ratios(model, ratios)
        model.train(train)
        y = run_model(model, inputs)
        grads = {}
        if train:
            (y.square().mean() + diffcr.ratio_loss(model)).backward()
            for i, b in diffcr.routed_blocks(model).items():
                grads[f"router{i}"] = b.router.weight.grad
                grads[f"ratio{i}"] = b.ratio.kept.grad
            if weights:
                grads.update({f"param {n}": p.grad for n, p in model.named_parameters()
                              if ".router." not in n and ".ratio." not in n})
        paths = [r.last_path for r in diffcr.routing_state(model).blocks.values()]
        out[path] = (y.detach(), grads, paths)
    return out


# ---- a tiny DiT pipeline (shared by the pipeline and cache tests) ----

def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,),
                         layers_per_block=1, latent_channels=4, norm_num_groups=8,
                         sample_size=8).eval()


def dit_pipe():
    from diffusers import DDIMScheduler, DiTPipeline

    # DiTPipeline's guidance uses the null class 1000: an ImageNet-sized label table
    return DiTPipeline(transformer=_randomise_weights(tiny_dit(num_classes=1000)), vae=tiny_vae(),
                       scheduler=DDIMScheduler(num_train_timesteps=1000))


def dit_call(pipe):
    return pipe(class_labels=[1, 3], guidance_scale=4.0, num_inference_steps=4,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def sd3_pipe(channels=4):
    """A tiny StableDiffusion3Pipeline (``channels``: latent channels; the inpaint pipeline
    takes 16)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,),
                        layers_per_block=1, latent_channels=channels, norm_num_groups=8,
                        sample_size=8, shift_factor=0.0609, scaling_factor=1.5035).eval()
    # prompt embeddings are passed in: no text encoders needed
    return StableDiffusion3Pipeline(transformer=make("sd3", channels=channels), vae=vae,
                                    scheduler=FlowMatchEulerDiscreteScheduler(),
                                    text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)


def flux_pipe():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(0)
    # one latent channel: the pipeline packs 2x2 patches into the transformer's 4 channels
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,),
                        layers_per_block=1, latent_channels=1, norm_num_groups=8,
                        sample_size=8, shift_factor=0.1159, scaling_factor=0.3611,
                        use_quant_conv=False, use_post_quant_conv=False).eval()
    return FluxPipeline(transformer=make("flux"), vae=vae,
                        scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None)


def qwenimage_pipe():
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4).eval()
    # prompt embeddings are passed in: no Qwen2.5-VL text encoder (its tokenizer would need a
    # download)
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                             text_encoder=None, tokenizer=None, transformer=make("qwenimage"))
