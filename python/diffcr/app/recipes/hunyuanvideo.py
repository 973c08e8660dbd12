"""The captioned fine-tuning recipe of HunyuanVideo pipelines."""
from __future__ import annotations

import torch

from .base import (MaskedTextRecipe, VideoPipeline, check_vae_channels, check_width,
                   read_json, register)


@register
class HunyuanVideoRecipe(VideoPipeline, MaskedTextRecipe):
    """HunyuanVideo text-to-video, fine-tuned on images as one-frame videos: the pipeline's own
    ``encode_prompt`` (its Llama's hidden states of the prompt in the default template, cropped
    as the pipeline crops it, with the mask; CLIP's pooled vector), the VAE's latents scaled by
    its ``scaling_factor``, flow matching with the scheduler's ``shift``, timesteps
    ``sigma * 1000``, the distilled guidance the pipeline passes by default (6, times 1000)."""
    model_class = "HunyuanVideoTransformer3DModel"
    family = "HunyuanVideo"
    pipeline_class = "HunyuanVideoPipeline"
    parts = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae", "scheduler")
    guidance = 6.0
    default_frames = 129
    default_max_length = 256  # the pipeline's default

    def frame_step(self, folder):
        return int(read_json(folder / "vae" / "config.json").get("temporal_compression_ratio", 4))

    def check(self, folder, tconf):
        super().check(folder, tconf)
        width = read_json(folder / "text_encoder" / "config.json").get("hidden_size")
        check_width(folder, "Llama text encoder's width", width, tconf, "text_embed_dim")
        pooled = read_json(folder / "text_encoder_2" / "config.json").get("hidden_size")
        check_width(folder, "CLIP text encoder's width", pooled, tconf, "pooled_projection_dim")
        check_vae_channels(folder, tconf)

    def pixels(self, folder, tconf, requested):
        return int(requested or 720)

    def _encode_batch(self, pipe, texts, dev, max_length):
        e, p, m = pipe.encode_prompt(prompt=texts, device=dev, max_sequence_length=max_length)
        return e, m, p

    @torch.no_grad()
    def latents(self, vae, x, gen):
        x = x if x.dim() == 5 else x.unsqueeze(2)  # an image is a one-frame video
        return vae.encode(x).latent_dist.sample(generator=gen) * vae.config.scaling_factor

    def inputs(self, b, x_t, level):
        dev = b.device
        kw = dict(hidden_states=x_t, timestep=level * 1000,
                  encoder_hidden_states=b.cond["emb"].to(dev),
                  encoder_attention_mask=b.cond["mask"].to(dev).long(),
                  pooled_projections=b.cond["pooled"].to(dev))
        if b.model.config.guidance_embeds:
            kw["guidance"] = torch.full((x_t.shape[0],), self.guidance * 1000.0, device=dev)
        return kw
