"""The captioned fine-tuning recipe of Qwen-Image pipelines."""
from __future__ import annotations

import math

import torch

from ..options import TrainError
from .base import (MaskedTextRecipe, check_width, normalised_latents, read_json, register,
                   unpack_2x2)


@register
class QwenImageRecipe(MaskedTextRecipe):
    """Qwen-Image text-to-image: the pipeline's own ``encode_prompt`` (Qwen2.5-VL's last hidden
    states of the prompt in its template, the template's tokens dropped) with its mask; the
    Qwen-Image VAE's latents (one frame) normalised by its ``latents_mean`` /
    ``latents_std``, packed 2x2; flow matching with the shift the pipeline uses at that image
    size (``exp(mu)``, ``mu`` from the token count as in ``calculate_shift``), timesteps
    ``sigma`` (the pipeline passes ``t / 1000``)."""
    model_class = "QwenImageTransformer2DModel"
    family = "Qwen-Image"
    pipeline_class = "QwenImagePipeline"
    parts = ("text_encoder", "tokenizer", "vae", "scheduler")
    per_prompt_arg = "num_images_per_prompt"

    def check(self, folder, tconf):
        super().check(folder, tconf)
        enc = read_json(folder / "text_encoder" / "config.json")
        width = (enc.get("text_config") or {}).get("hidden_size", enc.get("hidden_size"))
        check_width(folder, "text encoder's width", width, tconf, "joint_attention_dim")
        z = read_json(folder / "vae" / "config.json").get("z_dim")
        if z is not None and 4 * z != tconf.get("in_channels"):
            raise TrainError(f"--model {folder}: the VAE makes {z} latent channels; packed 2x2 "
                             f"that is not the transformer's {tconf.get('in_channels')}")

    def pixels(self, folder, tconf, requested):
        return int(requested or 1024)  # the pipeline's default_sample_size 128 x 8

    def max_length(self, pixels, requested):
        return int(requested or 1024)  # the pipeline's tokenizer_max_length

    def _encode_batch(self, pipe, texts, dev, max_length):
        return pipe.encode_prompt(prompt=texts, device=dev, max_sequence_length=max_length) + (
            None,)

    @torch.no_grad()
    def latents(self, vae, x, gen):
        lat = vae.encode(x.unsqueeze(2)).latent_dist.sample(generator=gen)  # one frame
        return normalised_latents(vae, lat)[:, :, 0]

    @staticmethod
    def dynamic_shift(sched, tokens: int):
        """The pipeline's shift at ``tokens`` image tokens (None: the scheduler's own)."""
        c = sched.config
        if not getattr(c, "use_dynamic_shifting", False):
            return None
        m = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        mu = tokens * m + c.base_shift - m * c.base_image_seq_len
        return math.exp(mu)

    def shift_of(self, b):
        """The pipeline's dynamic shift at the batch's image size."""
        H, W = b.x0.shape[-2:]
        return self.dynamic_shift(b.sched, (H // 2) * (W // 2)) or super().shift_of(b)

    def inputs(self, b, x_t, level):
        import inspect

        from diffusers import QwenImagePipeline

        model, dev = b.model, b.device
        B, C, H, W = x_t.shape
        mask = b.cond["mask"].to(dev).long()
        kw = dict(hidden_states=QwenImagePipeline._pack_latents(x_t, B, C, H, W),
                  timestep=level, encoder_hidden_states=b.cond["emb"].to(dev),
                  encoder_hidden_states_mask=mask, img_shapes=[[(1, H // 2, W // 2)]] * B)
        if model.config.guidance_embeds:
            kw["guidance"] = torch.full((B,), 1.0, device=dev)
        if "txt_seq_lens" in inspect.signature(type(model).forward).parameters:
            kw["txt_seq_lens"] = mask.sum(1).tolist()  # diffusers < 0.36
        return kw

    def prediction(self, b, out):
        return unpack_2x2(out.sample, *b.x0.shape)

    def pipeline_kwargs(self, pixels, max_length):
        return dict(height=pixels, width=pixels, max_sequence_length=int(max_length or 1024))

    def guidance_kwargs(self, guidance):
        # true classifier-free guidance (the pipeline's guidance_scale is for distilled models)
        return dict(true_cfg_scale=guidance, negative_prompt=" ") if guidance > 1 else {}
