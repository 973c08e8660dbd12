"""The captioned fine-tuning recipe of Qwen-Image pipelines."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..options import TrainError
from .base import (Batch, MaskedTextRecipe, check_width, normalised_latents, read_json, register,
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

    def loss(self, b: Batch):
        import inspect

        from diffusers import QwenImagePipeline

        net, model, sched, x0, cond, dev = b.net, b.model, b.sched, b.x0, b.cond, b.device
        B, C, H, W = x0.shape
        sigma, noise, xt = self.noisy(b, shift=self.dynamic_shift(sched, (H // 2) * (W // 2)))
        packed = QwenImagePipeline._pack_latents(xt, B, C, H, W)
        mask = cond["mask"].to(dev).long()
        kw = dict(hidden_states=packed, timestep=sigma, encoder_hidden_states=cond["emb"].to(dev),
                  encoder_hidden_states_mask=mask, img_shapes=[[(1, H // 2, W // 2)]] * B)
        if model.config.guidance_embeds:
            kw["guidance"] = torch.full((B,), 1.0, device=dev)
        if "txt_seq_lens" in inspect.signature(type(model).forward).parameters:
            kw["txt_seq_lens"] = mask.sum(1).tolist()  # diffusers < 0.36
        pred = net(**kw).sample
        pred = unpack_2x2(pred, B, C, H, W)
        return F.mse_loss(pred.float(), (noise - x0).float())

    def pipeline_kwargs(self, pixels, max_length):
        return dict(height=pixels, width=pixels, max_sequence_length=int(max_length or 1024))

    def guidance_kwargs(self, guidance):
        # true classifier-free guidance (the pipeline's guidance_scale is for distilled models)
        return dict(true_cfg_scale=guidance, negative_prompt=" ") if guidance > 1 else {}
