"""Per-family recipes of captioned fine-tuning (``diffcr train --model PIPELINE``): how a
pipeline folder's text encoders turn captions into the transformer's conditioning, how images
become latents, the training loss, and how the pipeline draws from prompts. One class per
pipeline family, registered by the transformer class it trains (as the model families are).

- :class:`PixArtRecipe`: T5 embeddings + mask, DDPM epsilon (or v) loss.
- :class:`FluxRecipe`: CLIP pooled + T5 embeddings (the pipeline's own ``encode_prompt``),
  flow matching (``x_t = (1 - s) x0 + s e``, target ``e - x0``, ``s`` uniform then shifted as
  the pipeline's scheduler shifts), packed 2x2 latents with their position ids, guidance 3.5
  for guidance-distilled models.
- :class:`SD3Recipe`: two CLIPs + T5 through the pipeline's ``encode_prompt`` (sequence and
  pooled embeddings), flow matching on the latents, timesteps ``sigma * 1000``.
- :class:`WanRecipe`: UMT5 through the pipeline's ``encode_prompt``, images as one-frame
  videos, the Wan VAE's normalised latents, flow matching with the scheduler's
  ``flow_shift``; a two-expert Wan 2.2 one expert per run on its noise levels
  (:func:`expert_of`).
- :class:`QwenImageRecipe`: Qwen2.5-VL through the pipeline's ``encode_prompt``, embeddings
  with their padding mask (:class:`MaskedTextRecipe`), packed 2x2 latents, flow matching with
  the pipeline's resolution-dependent shift.
- :class:`HunyuanVideoRecipe`: Llama (masked) + CLIP pooled through the pipeline's
  ``encode_prompt``, images as one-frame videos, flow matching with the scheduler's
  ``shift``, distilled guidance 6.
"""
from __future__ import annotations

import gc
import json
import math
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from .train import TrainError, _Progress

__all__ = ["Recipe", "recipe_for", "RECIPES"]

RECIPES: Dict[str, "Recipe"] = {}


def _register(cls):
    RECIPES[cls.model_class] = cls()
    return cls


def recipe_for(model_class: str, folder) -> "Recipe":
    if model_class not in RECIPES:
        raise TrainError(f"--model {folder}: captioned fine-tuning of {model_class} is not in "
                         f"`diffcr train` yet (supported: {', '.join(RECIPES)}); use the Python "
                         "API (diffcr.convert, diffcr.add_lora, your training loop)")
    return RECIPES[model_class]


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


#: the experts of a two-expert pipeline: sub-folder, and whether it serves the noise levels at
#: or above the pipeline's ``boundary_ratio`` (True) or below it
EXPERTS = {"high": ("transformer", True), "low": ("transformer_2", False)}


def expert_of(folder: Path, index: dict, expert) -> Tuple[str, Tuple[float, float]]:
    """``(transformer sub-folder, (lo, hi) noise levels)`` that ``expert`` (None, ``"high"``
    or ``"low"``) trains in the pipeline ``folder``. A two-expert pipeline (Wan 2.2 A14B:
    ``transformer_2`` and ``boundary_ratio`` b in ``model_index.json``) runs ``transformer``
    at timesteps ``t >= b * 1000`` (noise level ``t / 1000`` in ``[b, 1]``) and
    ``transformer_2`` below: each expert is fine-tuned in its own run, on its levels only."""
    two = (index.get("transformer_2") or [None, None])[1] is not None
    if not two:
        if expert is not None:
            raise TrainError(f"--expert {expert}: --model {folder} has one transformer (no "
                             "transformer_2)")
        return "transformer", (0.0, 1.0)
    b = index.get("boundary_ratio")
    if not isinstance(b, (int, float)) or not 0.0 < b < 1.0:
        raise TrainError(f"--model {folder}: a two-expert pipeline (transformer_2) needs a "
                         f"boundary_ratio in (0, 1) in model_index.json, got {b!r}")
    if expert is None:
        raise TrainError(f"--model {folder}: a two-expert pipeline (transformer_2, boundary "
                         f"{b}): pass --expert high (transformer, noise levels >= {b}) or "
                         f"--expert low (transformer_2, below {b}), one run per expert")
    part, upper = EXPERTS[expert]
    return part, ((float(b), 1.0) if upper else (0.0, float(b)))


def _check_width(folder: Path, what: str, width, tconf: dict, key: str) -> None:
    """TrainError unless ``width`` (``what``: e.g. "T5 text encoder's width"; None: not in
    the encoder's config) is the transformer config's ``key``."""
    if width is not None and width != tconf.get(key):
        raise TrainError(f"--model {folder}: the {what} ({width}) does not match the "
                         f"transformer's {key} ({tconf.get(key)})")


def _check_vae_channels(folder: Path, tconf: dict, key: str = "latent_channels") -> None:
    """TrainError unless the VAE's latent channels (its config's ``key``) are the
    transformer's ``in_channels``."""
    vconf = _json(folder / "vae" / "config.json")
    want = tconf.get("in_channels")
    if vconf.get(key, want) != want:
        raise TrainError(f"--model {folder}: the VAE makes {vconf[key]} latent "
                         f"channels but the transformer takes {want}")


def _native_pixels(folder: Path, tconf: dict) -> int:
    """The transformer's ``sample_size`` (latent side) times the VAE's downsampling."""
    blocks = _json(folder / "vae" / "config.json").get("block_out_channels", [0])
    return tconf.get("sample_size", 128) * 2 ** (len(blocks) - 1)


class Recipe:
    model_class = ""
    #: pipeline sub-folders that must exist
    parts = ("text_encoder", "tokenizer", "vae", "scheduler")
    #: default training resolution in pixels when the transformer config does not fix it
    default_pixels = 1024
    #: the pipeline call's argument for images per prompt
    per_prompt_arg = "num_images_per_prompt"
    #: video pipelines: trains on clips as well as on images (one-frame videos), and the clip
    #: length in frames when ``--frames`` is not given (the pipeline's default)
    video = False
    default_frames = 1

    def frame_step(self, folder: Path) -> int:
        """The VAE's temporal compression: clips hold ``1 + frame_step * k`` frames."""
        return 1

    def videos_of(self, output) -> list:
        """The frames (PIL images) of each video of a pipeline call's output."""
        return [list(v) for v in output.frames]

    def check(self, folder: Path, tconf: dict) -> None:
        for part in self.parts:
            if not (folder / part).is_dir():
                raise TrainError(f"--model {folder}: no {part}/ folder")

    def pixels(self, folder: Path, tconf: dict, requested) -> int:
        return int(requested or self.default_pixels)

    def max_length(self, pixels: int, requested) -> int:
        return int(requested or 512)

    def encode(self, folder: Path, texts: List[str], dev, max_length: int,
               progress: bool) -> Dict[str, torch.Tensor]:
        """``{name: [M, ...]}`` per caption of ``texts``, float32 on the CPU."""
        raise NotImplementedError

    def vae(self, folder: Path):
        import diffusers

        index = _json(folder / "model_index.json")
        cls = (index.get("vae") or ["diffusers", "AutoencoderKL"])[1]
        return getattr(diffusers, cls).from_pretrained(str(folder / "vae"))

    @torch.no_grad()
    def latents(self, vae, x, gen) -> torch.Tensor:
        lat = vae.encode(x).latent_dist.sample(generator=gen)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (lat - shift) * vae.config.scaling_factor

    def scheduler(self, folder: Path):
        raise NotImplementedError

    def loss(self, net, model, sched, x0, cond: Dict[str, torch.Tensor], g, dev):
        raise NotImplementedError

    def pipeline_kwargs(self, pixels: int, max_length) -> dict:
        return dict(height=pixels, width=pixels)

    def guidance_kwargs(self, guidance: float) -> dict:
        """The pipeline call's arguments for classifier-free guidance ``guidance``."""
        return dict(guidance_scale=guidance)

    def images_of(self, output) -> list:
        """The PIL images of a pipeline call's output."""
        return output.images


@_register
class PixArtRecipe(Recipe):
    model_class = "PixArtTransformer2DModel"
    parts = ("text_encoder", "tokenizer", "vae")

    def check(self, folder, tconf):
        super().check(folder, tconf)
        econf = _json(folder / "text_encoder" / "config.json")
        width = econf.get("d_model", econf.get("hidden_size"))
        _check_width(folder, "text encoder's width", width, tconf, "caption_channels")
        _check_vae_channels(folder, tconf)

    def pixels(self, folder, tconf, requested):
        native = _native_pixels(folder, tconf)
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
        bar = _Progress((len(texts) + 15) // 16, "encoding captions", progress)
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

    def loss(self, net, model, sched, x0, cond, g, dev):
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


class FlowRecipe(Recipe):
    """Flow-matching pipelines whose own ``encode_prompt`` gives sequence embeddings and a
    pooled vector (SD3, Flux): the shared encoding loop, scheduler and noising."""
    #: the diffusers pipeline class that encodes the prompts
    pipeline_class = ""

    def _encode_batch(self, pipe, texts, dev, max_length):
        """``(embeddings [n, L, D], pooled [n, P] or None)`` of ``texts``."""
        raise NotImplementedError

    @torch.no_grad()
    def _encoded_batches(self, folder, texts, dev, max_length, progress):
        """:meth:`_encode_batch` of every 16 captions, the pipeline's text encoders loaded
        once and freed after the last."""
        import diffusers

        pipe = getattr(diffusers, self.pipeline_class).from_pretrained(
            str(folder), transformer=None, vae=None).to(dev)
        bar = _Progress((len(texts) + 15) // 16, "encoding captions", progress)
        try:
            for i in range(0, len(texts), 16):
                yield self._encode_batch(pipe, texts[i:i + 16], dev, max_length)
                bar.update()
        finally:
            bar.close()
            del pipe
            gc.collect()

    @torch.no_grad()
    def encode(self, folder, texts, dev, max_length, progress):
        embs, pooled = [], []
        for e, p in self._encoded_batches(folder, texts, dev, max_length, progress):
            embs.append(e.float().cpu())
            if p is not None:
                pooled.append(p.float().cpu())
        out = {"emb": torch.cat(embs)}
        if pooled:
            out["pooled"] = torch.cat(pooled)
        return out

    def scheduler(self, folder):
        import diffusers

        index = _json(folder / "model_index.json")
        cls = (index.get("scheduler") or ["diffusers", "FlowMatchEulerDiscreteScheduler"])[1]
        return getattr(diffusers, cls).from_pretrained(str(folder / "scheduler"))

    @staticmethod
    def noisy(sched, x0, g, dev, levels=(0.0, 1.0), shift=None):
        """``(sigma [B], noise, x_t)``: ``sigma`` uniform, then shifted as the scheduler
        shifts (``shift``, or ``flow_shift`` for UniPC); ``x_t = (1 - sigma) x0 + sigma noise``
        (the target is ``noise - x0``). ``levels``: the range ``[lo, hi)`` of shifted
        ``sigma`` to draw from (one expert's share of a two-expert pipeline): the uniform
        draw is taken from the preimage of that range under the shift. ``shift``: the shift to
        use instead of the scheduler's fixed one (a dynamic shift at the image's size)."""
        B = x0.shape[0]
        shift = float(shift or getattr(sched.config, "shift", None)
                      or getattr(sched.config, "flow_shift", None) or 1.0)
        lo, hi = (float(v) / (shift - (shift - 1) * float(v)) for v in levels)  # unshifted
        u = torch.rand(B, generator=g)
        if (lo, hi) != (0.0, 1.0):
            u = lo + (hi - lo) * u
        sigma = (shift * u / (1 + (shift - 1) * u)).to(dev)
        noise = torch.randn(x0.shape, generator=g).to(dev)
        s = sigma.view(B, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return sigma, noise, (1 - s) * x0 + s * noise


@_register
class FluxRecipe(FlowRecipe):
    model_class = "FluxTransformer2DModel"
    parts = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae", "scheduler")
    pipeline_class = "FluxPipeline"
    guidance = 3.5

    def check(self, folder, tconf):
        super().check(folder, tconf)
        t5 = _json(folder / "text_encoder_2" / "config.json")
        clip = _json(folder / "text_encoder" / "config.json")
        width = t5.get("d_model")
        _check_width(folder, "T5 text encoder's width", width, tconf, "joint_attention_dim")
        pooled = clip.get("projection_dim") if clip.get("architectures", [""])[0].endswith(
            "WithProjection") else clip.get("hidden_size")
        _check_width(folder, "CLIP text encoder's pooled width", pooled, tconf,
                     "pooled_projection_dim")
        vconf = _json(folder / "vae" / "config.json")
        if 4 * vconf.get("latent_channels", 16) != tconf.get("in_channels", 64):
            raise TrainError(f"--model {folder}: the VAE makes {vconf.get('latent_channels')} "
                             f"latent channels; packed 2x2 that is not the transformer's "
                             f"{tconf.get('in_channels')}")

    def _encode_batch(self, pipe, texts, dev, max_length):
        e, p, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, device=dev,
                                     max_sequence_length=max_length)
        return e, p

    def loss(self, net, model, sched, x0, cond, g, dev):
        from diffusers import FluxPipeline

        B, C, H, W = x0.shape
        sigma, noise, xt = self.noisy(sched, x0, g, dev)
        packed = FluxPipeline._pack_latents(xt, B, C, H, W)
        img_ids = FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, dev, x0.dtype)
        emb = cond["emb"].to(dev)
        txt_ids = torch.zeros(emb.shape[1], 3, device=dev, dtype=x0.dtype)
        guidance = (torch.full((B,), self.guidance, device=dev)
                    if model.config.guidance_embeds else None)
        pred = net(hidden_states=packed, timestep=sigma, guidance=guidance,
                   pooled_projections=cond["pooled"].to(dev), encoder_hidden_states=emb,
                   txt_ids=txt_ids, img_ids=img_ids).sample
        pred = pred.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
            B, C, H, W)
        return F.mse_loss(pred.float(), (noise - x0).float())

    def pipeline_kwargs(self, pixels, max_length):
        return dict(height=pixels, width=pixels, max_sequence_length=int(max_length or 512))


@_register
class SD3Recipe(FlowRecipe):
    """SD3 / SD3.5: the pipeline's own ``encode_prompt`` (two CLIPs with projection + T5:
    sequence embeddings and the pooled CLIP vectors), flow matching on the unpacked latents,
    timesteps ``sigma * 1000`` as the pipeline passes them."""
    model_class = "SD3Transformer2DModel"
    pipeline_class = "StableDiffusion3Pipeline"
    parts = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
             "tokenizer_3", "vae", "scheduler")

    def check(self, folder, tconf):
        super().check(folder, tconf)
        t5 = _json(folder / "text_encoder_3" / "config.json").get("d_model")
        _check_width(folder, "T5 text encoder's width", t5, tconf, "joint_attention_dim")
        pooled = sum(_json(folder / p / "config.json").get("projection_dim", 0)
                     for p in ("text_encoder", "text_encoder_2"))
        if pooled and pooled != tconf.get("pooled_projection_dim"):
            raise TrainError(f"--model {folder}: the CLIP text encoders' pooled widths add up to "
                             f"{pooled}, not the transformer's pooled_projection_dim "
                             f"({tconf.get('pooled_projection_dim')})")
        _check_vae_channels(folder, tconf)

    def pixels(self, folder, tconf, requested):
        return int(requested or _native_pixels(folder, tconf))

    def max_length(self, pixels, requested):
        return int(requested or 256)

    def _encode_batch(self, pipe, texts, dev, max_length):
        e, _, p, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, prompt_3=None, device=dev,
                                        do_classifier_free_guidance=False,
                                        max_sequence_length=max_length)
        return e, p

    def loss(self, net, model, sched, x0, cond, g, dev):
        sigma, noise, xt = self.noisy(sched, x0, g, dev)
        pred = net(hidden_states=xt, timestep=sigma * 1000,
                   encoder_hidden_states=cond["emb"].to(dev),
                   pooled_projections=cond["pooled"].to(dev)).sample
        return F.mse_loss(pred.float(), (noise - x0).float())

    def pipeline_kwargs(self, pixels, max_length):
        return dict(height=pixels, width=pixels, max_sequence_length=int(max_length or 256))


class VideoPipeline:
    """What the video pipelines' recipes share (mixed in before the recipe class): clips or
    images as one-frame videos; a pipeline call draws ``num_frames`` (1 unless ``generate
    --frames``), and an image is a video's first frame."""
    video = True
    per_prompt_arg = "num_videos_per_prompt"
    #: the pipeline's default tokens per prompt
    default_max_length = 512

    def max_length(self, pixels, requested):
        return int(requested or self.default_max_length)

    def pipeline_kwargs(self, pixels, max_length):
        return dict(height=pixels, width=pixels, num_frames=1, output_type="pil",
                    max_sequence_length=self.max_length(pixels, max_length))

    def images_of(self, output):
        return [video[0] for video in output.frames]


@_register
class WanRecipe(VideoPipeline, FlowRecipe):
    """Wan 2.1 / 2.2 text-to-video, fine-tuned on images as one-frame videos: UMT5 embeddings
    through the pipeline's ``encode_prompt``, the Wan VAE's latents normalised by its
    ``latents_mean`` / ``latents_std``, flow matching with the scheduler's ``flow_shift``,
    timesteps ``sigma * 1000``. A two-expert Wan 2.2 pipeline (``transformer_2``) trains one
    expert per run (``--expert``), on the noise levels the pipeline gives it
    (:func:`expert_of`)."""
    model_class = "WanTransformer3DModel"
    pipeline_class = "WanPipeline"
    parts = ("text_encoder", "tokenizer", "vae", "scheduler")
    default_pixels = 480
    default_frames = 81

    def check(self, folder, tconf):
        super().check(folder, tconf)
        width = _json(folder / "text_encoder" / "config.json").get("d_model")
        _check_width(folder, "text encoder's width", width, tconf, "text_dim")
        _check_vae_channels(folder, tconf, "z_dim")

    def _encode_batch(self, pipe, texts, dev, max_length):
        e, _ = pipe.encode_prompt(prompt=texts, do_classifier_free_guidance=False,
                                  max_sequence_length=max_length, device=dev)
        return e, None

    def frame_step(self, folder):
        return 2 ** sum(bool(v) for v in _json(folder / "vae" / "config.json").get(
            "temperal_downsample", [False, True, True]))

    @torch.no_grad()
    def latents(self, vae, x, gen):
        x = x if x.dim() == 5 else x.unsqueeze(2)  # an image is a one-frame video
        lat = vae.encode(x).latent_dist.sample(generator=gen)
        z = lat.shape[1]
        mean = torch.tensor(vae.config.latents_mean, device=lat.device).view(1, z, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=lat.device).view(1, z, 1, 1, 1)
        return (lat - mean) / std

    def loss(self, net, model, sched, x0, cond, g, dev, levels=(0.0, 1.0)):
        sigma, noise, xt = self.noisy(sched, x0, g, dev, levels)
        pred = net(hidden_states=xt, timestep=sigma * 1000,
                   encoder_hidden_states=cond["emb"].to(dev)).sample
        return F.mse_loss(pred.float(), (noise - x0).float())




class MaskedTextRecipe(FlowRecipe):
    """Flow-matching pipelines whose text embeddings come with a padding mask (Qwen-Image,
    HunyuanVideo): each caption's tokens (where its mask is set) are kept at their own length
    and padded with zeros to the longest caption of the data, the mask stored beside them
    (``mask``), so the cache holds no padding to the pipeline's maximum length."""

    def _encode_batch(self, pipe, texts, dev, max_length):
        """``(embeddings [n, L, D], mask [n, L] or None (all set), pooled [n, P] or None)``."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, folder, texts, dev, max_length, progress):
        rows, pooled = [], []
        for e, m, p in self._encoded_batches(folder, texts, dev, max_length, progress):
            m = torch.ones(e.shape[:2], dtype=torch.bool, device=e.device) if m is None \
                else m.bool()
            rows += [row[keep].float().cpu() for row, keep in zip(e, m)]
            if p is not None:
                pooled.append(p.float().cpu())
        empty = [i for i, r in enumerate(rows) if r.shape[0] == 0]
        if empty:
            which = "the empty caption" if empty[0] == len(texts) - 1 else \
                f"caption {empty[0]} ({texts[empty[0]]!r})"
            raise TrainError(f"{which} encodes to no text tokens (after the pipeline's "
                             "prompt template is cropped)")
        L = max(r.shape[0] for r in rows)
        emb = torch.zeros(len(rows), L, rows[0].shape[1])
        mask = torch.zeros(len(rows), L)
        for i, r in enumerate(rows):
            emb[i, :r.shape[0]] = r
            mask[i, :r.shape[0]] = 1
        out = {"emb": emb, "mask": mask}
        if pooled:
            out["pooled"] = torch.cat(pooled)
        return out


@_register
class QwenImageRecipe(MaskedTextRecipe):
    """Qwen-Image text-to-image: the pipeline's own ``encode_prompt`` (Qwen2.5-VL's last hidden
    states of the prompt in its template, the template's tokens dropped) with its mask; the
    Qwen-Image VAE's latents (one frame) normalised by its ``latents_mean`` /
    ``latents_std``, packed 2x2; flow matching with the shift the pipeline uses at that image
    size (``exp(mu)``, ``mu`` from the token count as in ``calculate_shift``), timesteps
    ``sigma`` (the pipeline passes ``t / 1000``)."""
    model_class = "QwenImageTransformer2DModel"
    pipeline_class = "QwenImagePipeline"
    parts = ("text_encoder", "tokenizer", "vae", "scheduler")
    per_prompt_arg = "num_images_per_prompt"

    def check(self, folder, tconf):
        super().check(folder, tconf)
        enc = _json(folder / "text_encoder" / "config.json")
        width = (enc.get("text_config") or {}).get("hidden_size", enc.get("hidden_size"))
        _check_width(folder, "text encoder's width", width, tconf, "joint_attention_dim")
        z = _json(folder / "vae" / "config.json").get("z_dim")
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
        z = lat.shape[1]
        mean = torch.tensor(vae.config.latents_mean, device=lat.device).view(1, z, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=lat.device).view(1, z, 1, 1, 1)
        return ((lat - mean) / std)[:, :, 0]

    @staticmethod
    def dynamic_shift(sched, tokens: int):
        """The pipeline's shift at ``tokens`` image tokens (None: the scheduler's own)."""
        c = sched.config
        if not getattr(c, "use_dynamic_shifting", False):
            return None
        m = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        mu = tokens * m + c.base_shift - m * c.base_image_seq_len
        return math.exp(mu)

    def loss(self, net, model, sched, x0, cond, g, dev):
        import inspect

        from diffusers import QwenImagePipeline

        B, C, H, W = x0.shape
        sigma, noise, xt = self.noisy(sched, x0, g, dev,
                                      shift=self.dynamic_shift(sched, (H // 2) * (W // 2)))
        packed = QwenImagePipeline._pack_latents(xt, B, C, H, W)
        mask = cond["mask"].to(dev).long()
        kw = dict(hidden_states=packed, timestep=sigma, encoder_hidden_states=cond["emb"].to(dev),
                  encoder_hidden_states_mask=mask, img_shapes=[[(1, H // 2, W // 2)]] * B)
        if model.config.guidance_embeds:
            kw["guidance"] = torch.full((B,), 1.0, device=dev)
        if "txt_seq_lens" in inspect.signature(type(model).forward).parameters:
            kw["txt_seq_lens"] = mask.sum(1).tolist()  # diffusers < 0.36
        pred = net(**kw).sample
        pred = pred.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
            B, C, H, W)
        return F.mse_loss(pred.float(), (noise - x0).float())

    def pipeline_kwargs(self, pixels, max_length):
        return dict(height=pixels, width=pixels, max_sequence_length=int(max_length or 1024))

    def guidance_kwargs(self, guidance):
        # true classifier-free guidance (the pipeline's guidance_scale is for distilled models)
        return dict(true_cfg_scale=guidance, negative_prompt=" ") if guidance > 1 else {}


@_register
class HunyuanVideoRecipe(VideoPipeline, MaskedTextRecipe):
    """HunyuanVideo text-to-video, fine-tuned on images as one-frame videos: the pipeline's own
    ``encode_prompt`` (its Llama's hidden states of the prompt in the default template, cropped
    as the pipeline crops it, with the mask; CLIP's pooled vector), the VAE's latents scaled by
    its ``scaling_factor``, flow matching with the scheduler's ``shift``, timesteps
    ``sigma * 1000``, the distilled guidance the pipeline passes by default (6, times 1000)."""
    model_class = "HunyuanVideoTransformer3DModel"
    pipeline_class = "HunyuanVideoPipeline"
    parts = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae", "scheduler")
    guidance = 6.0
    default_frames = 129
    default_max_length = 256  # the pipeline's default

    def frame_step(self, folder):
        return int(_json(folder / "vae" / "config.json").get("temporal_compression_ratio", 4))

    def check(self, folder, tconf):
        super().check(folder, tconf)
        width = _json(folder / "text_encoder" / "config.json").get("hidden_size")
        _check_width(folder, "Llama text encoder's width", width, tconf, "text_embed_dim")
        pooled = _json(folder / "text_encoder_2" / "config.json").get("hidden_size")
        _check_width(folder, "CLIP text encoder's width", pooled, tconf, "pooled_projection_dim")
        _check_vae_channels(folder, tconf)

    def pixels(self, folder, tconf, requested):
        return int(requested or 720)

    def _encode_batch(self, pipe, texts, dev, max_length):
        e, p, m = pipe.encode_prompt(prompt=texts, device=dev, max_sequence_length=max_length)
        return e, m, p

    @torch.no_grad()
    def latents(self, vae, x, gen):
        x = x if x.dim() == 5 else x.unsqueeze(2)  # an image is a one-frame video
        return vae.encode(x).latent_dist.sample(generator=gen) * vae.config.scaling_factor

    def loss(self, net, model, sched, x0, cond, g, dev):
        B = x0.shape[0]
        sigma, noise, xt = self.noisy(sched, x0, g, dev)
        kw = dict(hidden_states=xt, timestep=sigma * 1000,
                  encoder_hidden_states=cond["emb"].to(dev),
                  encoder_attention_mask=cond["mask"].to(dev).long(),
                  pooled_projections=cond["pooled"].to(dev))
        if model.config.guidance_embeds:
            kw["guidance"] = torch.full((B,), self.guidance * 1000.0, device=dev)
        pred = net(**kw).sample
        return F.mse_loss(pred.float(), (noise - x0).float())

