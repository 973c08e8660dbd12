"""The captioned fine-tuning recipe of PixArt-α/Σ pipelines."""
from __future__ import annotations

import gc

import torch
import torch.nn.functional as F

from ..core import Progress
from ..options import TrainError
from .base import (Batch, Recipe, check_vae_channels, check_width, native_pixels, read_json,
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

    def loss(self, b: Batch):
        net, model, sched, x0, cond = b.net, b.model, b.sched, b.x0, b.cond
        g, dev = b.gen, b.device
        B = x0.shape[0]
        t = torch.randint(0, sched.config.num_train_timesteps, (B,), generator=g).to(dev)
        noise = torch.randn(x0.shape, generator=g).to(dev)
        xt = sched.add_noise(x0, noise, t)
        target = noise if sched.config.prediction_type == "epsilon" \
            else sched.get_velocity(x0, noise, t)
        extra = {}
        if model.config.use_additional_conditions:
            extra = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
        pred = net(xt, encoder_hidden_states=cond["emb"].to(dev),
                   encoder_attention_mask=cond["mask"].to(dev), timestep=t,
                   **extra).sample[:, :x0.shape[1]]
        return F.mse_loss(pred.float(), target.float())

    def pipeline_kwargs(self, pixels, max_length):
        return dict(height=pixels, width=pixels, use_resolution_binning=False,
                    clean_caption=False, max_sequence_length=self.max_length(pixels, max_length))
