"""Converted models inside real diffusers pipelines, assembled from tiny random components."""
import numpy as np
import pytest
import torch

import diffcr
from diffcr import DiffCRConfig

from tiny_models import (_randomise_weights, dit_call, dit_pipe, flux_pipe, qwenimage_pipe,
                         sd3_pipe, set_ratios, tiny_pixart, tiny_vae)


def pixart_pipe():
    pytest.importorskip("transformers")
    from diffusers import DDIMScheduler, PixArtSigmaPipeline

    return PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(),
                               transformer=_randomise_weights(tiny_pixart()),
                               scheduler=DDIMScheduler(num_train_timesteps=1000))


def pixart_call(pipe):
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(1, 6, 32, generator=g)
    neg = torch.randn(1, 6, 32, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    return pipe(prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt=None,
                negative_prompt_embeds=neg,
                negative_prompt_attention_mask=torch.ones(1, 6, dtype=torch.long),
                height=8, width=8, num_inference_steps=4, guidance_scale=4.5,
                use_resolution_binning=False, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def sd3_call(pipe):
    g = torch.Generator().manual_seed(1)
    emb, pooled = torch.randn(1, 5, 16, generator=g), torch.randn(1, 8, generator=g)
    neg, neg_pooled = torch.randn(1, 5, 16, generator=g), torch.randn(1, 8, generator=g)
    return pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
                negative_pooled_prompt_embeds=neg_pooled, height=8, width=8,
                num_inference_steps=2, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def flux_call(pipe):
    g = torch.Generator().manual_seed(1)
    emb, pooled = torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g)
    return pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, height=16, width=16,
                num_inference_steps=2, guidance_scale=3.5,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def wan_pipe():
    """Wan 2.2 A14B layout: two experts (high noise: transformer, low noise: transformer_2)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    from tiny_models import make

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4).eval()
    sched = UniPCMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction",
                                    use_flow_sigmas=True)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=sched,
                       transformer=make("wan"), transformer_2=make("wan", seed=1),
                       boundary_ratio=0.5)


def wan_call(pipe):
    g = torch.Generator().manual_seed(1)
    emb, neg = torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    return pipe(prompt_embeds=emb, negative_prompt_embeds=neg, height=16, width=16,
                num_frames=5, num_inference_steps=2, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(0), output_type="np").frames


def qwenimage_call(pipe):
    g = torch.Generator().manual_seed(1)
    emb, neg = torch.randn(1, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    mask = torch.ones(1, 5, dtype=torch.long)
    # 64 x 64 pixels -> 8 x 8 latents -> 16 packed image tokens
    return pipe(prompt_embeds=emb, prompt_embeds_mask=mask, negative_prompt_embeds=neg,
                negative_prompt_embeds_mask=mask, true_cfg_scale=4.0, height=64, width=64,
                num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def hunyuanvideo_pipe():
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler,
                           HunyuanVideoPipeline)

    from tiny_models import make

    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 3,
        up_block_types=("HunyuanVideoUpBlock3D",) * 3, block_out_channels=(8, 8, 8),
        layers_per_block=1, norm_num_groups=4, scaling_factor=0.476986,
        spatial_compression_ratio=4, temporal_compression_ratio=4).eval()
    # prompt embeddings are passed in: no Llama / CLIP text encoders
    return HunyuanVideoPipeline(text_encoder=None, tokenizer=None, text_encoder_2=None,
                                tokenizer_2=None, transformer=make("hunyuanvideo"), vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def hunyuanvideo_call(pipe):
    g = torch.Generator().manual_seed(1)
    emb, pooled = torch.randn(1, 5, 16, generator=g), torch.randn(1, 8, generator=g)
    # 5 frames of 32 x 32 pixels -> 2 latent frames of 8 x 8 -> 32 video tokens
    return pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled,
                prompt_attention_mask=torch.ones(1, 5, dtype=torch.long), height=32, width=32,
                num_frames=5, num_inference_steps=2, guidance_scale=6.0,
                generator=torch.Generator().manual_seed(0), output_type="np").frames


def test_wan22_pipeline_converts_both_experts():
    pipe = wan_pipe()
    with torch.no_grad():
        dense = wan_call(pipe)
    assert diffcr.convert_pipeline(pipe, DiffCRConfig(gate="sigmoid2x")) == ["transformer",
                                                                             "transformer_2"]
    assert diffcr.routing_state(pipe.transformer) is not diffcr.routing_state(pipe.transformer_2)
    with torch.no_grad():
        assert np.array_equal(wan_call(pipe), dense)
    for m in (pipe.transformer, pipe.transformer_2):
        set_ratios(m, 0.5)
        diffcr.freeze(m)
    with torch.no_grad():
        routed = wan_call(pipe)
    assert routed.shape == dense.shape and abs(routed - dense).max() > 1e-4
    # one expert converted by hand, the other by convert_pipeline: warned
    pipe = wan_pipe()
    diffcr.convert(pipe.transformer)
    with pytest.warns(UserWarning, match=r"\['transformer'\] were already converted"):
        assert diffcr.convert_pipeline(pipe) == ["transformer_2"]


@pytest.mark.parametrize("make_pipe,call", [(dit_pipe, dit_call), (pixart_pipe, pixart_call),
                                            (sd3_pipe, sd3_call), (flux_pipe, flux_call),
                                            (qwenimage_pipe, qwenimage_call),
                                            (hunyuanvideo_pipe, hunyuanvideo_call)],
                         ids=["DiTPipeline", "PixArtSigmaPipeline", "StableDiffusion3Pipeline",
                              "FluxPipeline", "QwenImagePipeline", "HunyuanVideoPipeline"])
def test_pipeline_identity_at_init_and_routed_run(make_pipe, call):
    pipe = make_pipe()
    with torch.no_grad():
        dense = call(pipe)
    diffcr.convert(pipe.transformer, DiffCRConfig(gate="sigmoid2x"))
    with torch.no_grad():
        converted = call(pipe)
    assert abs(dense - converted).max() <= 1e-5
    # routed: half the tokens, per region; the pipeline runs and the result changes
    set_ratios(pipe.transformer, [0.5, 0.5, 0.7, 0.9])
    diffcr.freeze(pipe.transformer)
    with torch.no_grad():
        routed = call(pipe)
    assert routed.shape == dense.shape and (abs(routed - dense).max() > 1e-4)
    diffcr.revert(pipe.transformer)
    with torch.no_grad():
        assert abs(call(pipe) - dense).max() == 0
