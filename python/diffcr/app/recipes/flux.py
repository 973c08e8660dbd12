"""The captioned fine-tuning recipe of Flux.1 pipelines."""
from __future__ import annotations

import torch

from ..options import TrainError
from .base import FlowRecipe, check_width, read_json, register, unpack_2x2


@register
class FluxRecipe(FlowRecipe):
    model_class = "FluxTransformer2DModel"
    family = "Flux.1"
    parts = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae", "scheduler")
    pipeline_class = "FluxPipeline"
    guidance = 3.5

    def check(self, folder, tconf):
        super().check(folder, tconf)
        t5 = read_json(folder / "text_encoder_2" / "config.json")
        clip = read_json(folder / "text_encoder" / "config.json")
        width = t5.get("d_model")
        check_width(folder, "T5 text encoder's width", width, tconf, "joint_attention_dim")
        pooled = clip.get("projection_dim") if clip.get("architectures", [""])[0].endswith(
            "WithProjection") else clip.get("hidden_size")
        check_width(folder, "CLIP text encoder's pooled width", pooled, tconf,
                     "pooled_projection_dim")
        vconf = read_json(folder / "vae" / "config.json")
        if 4 * vconf.get("latent_channels", 16) != tconf.get("in_channels", 64):
            raise TrainError(f"--model {folder}: the VAE makes {vconf.get('latent_channels')} "
                             f"latent channels; packed 2x2 that is not the transformer's "
                             f"{tconf.get('in_channels')}")

    def _encode_batch(self, pipe, texts, dev, max_length):
        e, p, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, device=dev,
                                     max_sequence_length=max_length)
        return e, p

    def inputs(self, b, x_t, level):
        from diffusers import FluxPipeline

        dev = b.device
        B, C, H, W = x_t.shape
        emb = b.cond["emb"].to(dev)
        guidance = (torch.full((B,), self.guidance, device=dev)
                    if b.model.config.guidance_embeds else None)
        return dict(hidden_states=FluxPipeline._pack_latents(x_t, B, C, H, W), timestep=level,
                    guidance=guidance, pooled_projections=b.cond["pooled"].to(dev),
                    encoder_hidden_states=emb,
                    txt_ids=torch.zeros(emb.shape[1], 3, device=dev, dtype=x_t.dtype),
                    img_ids=FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, dev,
                                                                   x_t.dtype))

    def prediction(self, b, out):
        return unpack_2x2(out.sample, *b.x0.shape)

    def pipeline_kwargs(self, pixels, max_length):
        return dict(height=pixels, width=pixels, max_sequence_length=int(max_length or 512))
