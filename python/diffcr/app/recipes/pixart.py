"""The captioned fine-tuning recipe of PixArt-α/Σ pipelines."""
from __future__ import annotations

import gc

import torch

from ..core import Progress
from ..options import TrainError
from .base import (Recipe, check_vae_channels, check_width, native_pixels, read_json,
                   register)


@register
class PixArtRecipe(Recipe):
    model_class = "PixArtTransformer2DModel"
    family = "PixArt"
    parts = ("text_encoder", "tokenizer", "vae")

    def check(self, folder, tconf):
        super().check(folder, tconf)
        econf = read_json(folder / "text_encoder" / "config.json")
        width = econf.get("d_model", econf.get("hidden_size"))
        check_width(folder, "text encoder's width", width, tconf, "caption_channels")
        check_vae_channels(folder, tconf)

    def pixels(self, folder, tconf, requested):
        native = native_pixels(folder, tconf)
        if requested and requested != native:
            raise TrainError(f"--resolution {requested}: this PixArt transformer trains at "
                             f"{native} px")
        return native

    def max_length(self, pixels, requested):
        return int(requested or (300 if pixels > 512 else 120))

    @torch.no_grad()
    def encode(self, folder, texts, dev, max_length, progress):
        from transformers import AutoTokenizer, T5EncoderModel

        tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
        enc = T5EncoderModel.from_pretrained(str(folder / "text_encoder")).to(dev).eval()
        embs, masks = [], []
        bar = Progress((len(texts) + 15) // 16, "encoding captions", progress)
        for i in range(0, len(texts), 16):
            t = tok(texts[i:i + 16], padding="max_length", max_length=max_length,
                    truncation=True, add_special_tokens=True, return_tensors="pt")
            ids, mask = t.input_ids.to(dev), t.attention_mask.to(dev)
            embs.append(enc(ids, attention_mask=mask)[0].float().cpu())
            masks.append(mask.cpu())
            bar.update()
        bar.close()
        del enc
        gc.collect()
        return {"emb": torch.cat(embs), "mask": torch.cat(masks)}

    def scheduler(self, folder):
        from diffusers import DDPMScheduler

        d = folder / "scheduler"
        return DDPMScheduler.from_pretrained(str(d)) if d.is_dir() else DDPMScheduler()

    def draw(self, b):
        sched, g = b.sched, b.gen
        t = torch.randint(0, sched.config.num_train_timesteps, (b.x0.shape[0],),
                          generator=g).to(b.device)
        noise = torch.randn(b.x0.shape, generator=g).to(b.device)
        return t, noise, self.noised(b, noise, t)

    def noised(self, b, noise, level):
        return b.sched.add_noise(b.x0, noise, level)

    def noisier(self, b, level, steps):
        return (level + steps * b.cache_spacing).clamp(
            max=b.sched.config.num_train_timesteps - 1)

    def target(self, b, noise, level):
        sched = b.sched
        return noise if sched.config.prediction_type == "epsilon" \
            else sched.get_velocity(b.x0, noise, level)

    def inputs(self, b, x_t, level):
        kw = dict(hidden_states=x_t, encoder_hidden_states=b.cond["emb"].to(b.device),
                  encoder_attention_mask=b.cond["mask"].to(b.device), timestep=level)
        if b.model.config.use_additional_conditions:
            kw["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        return kw

    def prediction(self, b, out):
        return out.sample[:, :b.x0.shape[1]]  # a learned-sigma model's variance channels off

    def pipeline_kwargs(self, pixels, max_length):
        return dict(height=pixels, width=pixels, use_resolution_binning=False,
                    clean_caption=False, max_sequence_length=self.max_length(pixels, max_length))
