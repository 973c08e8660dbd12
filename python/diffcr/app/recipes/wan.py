"""The captioned fine-tuning recipe of Wan 2.1 / 2.2 pipelines."""
from __future__ import annotations

import torch

from .base import (FlowRecipe, VideoPipeline, check_vae_channels, check_width,
                   normalised_latents, read_json, register)


@register
class WanRecipe(VideoPipeline, FlowRecipe):
    """Wan 2.1 / 2.2 text-to-video, fine-tuned on images as one-frame videos: UMT5 embeddings
    through the pipeline's ``encode_prompt``, the Wan VAE's latents normalised by its
    ``latents_mean`` / ``latents_std``, flow matching with the scheduler's ``flow_shift``,
    timesteps ``sigma * 1000``. A two-expert Wan 2.2 pipeline (``transformer_2``) trains one
    expert per run (``--expert``), on the noise levels the pipeline gives it
    (:func:`expert_of`)."""
    model_class = "WanTransformer3DModel"
    family = "Wan"
    pipeline_class = "WanPipeline"
    parts = ("text_encoder", "tokenizer", "vae", "scheduler")
    default_pixels = 480
    default_frames = 81

    def check(self, folder, tconf):
        super().check(folder, tconf)
        width = read_json(folder / "text_encoder" / "config.json").get("d_model")
        check_width(folder, "text encoder's width", width, tconf, "text_dim")
        check_vae_channels(folder, tconf, "z_dim")

    def _encode_batch(self, pipe, texts, dev, max_length):
        e, _ = pipe.encode_prompt(prompt=texts, do_classifier_free_guidance=False,
                                  max_sequence_length=max_length, device=dev)
        return e, None

    def frame_step(self, folder):
        return 2 ** sum(bool(v) for v in read_json(folder / "vae" / "config.json").get(
            "temperal_downsample", [False, True, True]))

    @torch.no_grad()
    def latents(self, vae, x, gen):
        x = x if x.dim() == 5 else x.unsqueeze(2)  # an image is a one-frame video
        lat = vae.encode(x).latent_dist.sample(generator=gen)
        return normalised_latents(vae, lat)

    def inputs(self, b, x_t, level):
        return dict(hidden_states=x_t, timestep=level * 1000,
                    encoder_hidden_states=b.cond["emb"].to(b.device))
