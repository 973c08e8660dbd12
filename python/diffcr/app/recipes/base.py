"""What every captioned fine-tuning recipe shares: the :class:`Recipe` base and its
flow-matching, video and masked-text variants, the registry (:func:`register`,
:func:`recipe_for`), the batch a loss takes (:class:`Batch`), the pipeline folder's parts
(:func:`pipeline_parts`) and experts (:func:`expert_of`), and the configuration checks."""
from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from ..core import Progress
from ..options import TrainError

__all__ = ["Recipe", "FlowRecipe", "VideoPipeline", "MaskedTextRecipe", "Batch", "RECIPES",
           "register", "recipe_for", "expert_of", "pipeline_parts", "read_json",
           "check_width", "check_vae_channels", "native_pixels", "normalised_latents",
           "unpack_2x2"]

RECIPES: Dict[str, "Recipe"] = {}


@dataclass
class Batch:
    """One micro-batch of captioned fine-tuning, as :meth:`Recipe.loss` takes it.

    Attributes:
        net: the module the loop calls (wrapped by DDP / accelerate, or sharded).
        model: the converted model itself (its config, e.g. ``guidance_embeds``).
        sched: the pipeline's scheduler (:meth:`Recipe.scheduler`).
        x0: the cached latents of the batch, on ``device``.
        cond: the recipe's conditioning tensors of the batch (:meth:`Recipe.encode`), on the
            CPU; caption dropout already applied.
        gen: the data generator (timesteps and noise are drawn from it).
        device: the training device.
        levels: the noise levels ``[lo, hi)`` this run trains (one expert's share of a
            two-expert pipeline; ``(0, 1)`` otherwise).
        cache_refresh: ``--cache-refresh`` R (cache-aware fine-tuning; the token cache is on
            ``model``), 0: off.
        cache_spacing: ``--cache-spacing``: timesteps between two sampler steps.
        inpaint: ``--inpaint``: a random box mask per sample (:func:`diffcr.keep_mask.
            random_box_masks`, at the latents' resolution), routed with
            :func:`diffcr.mask_routing`, the loss over the box only.
    """

    net: torch.nn.Module
    model: torch.nn.Module
    sched: object
    x0: torch.Tensor
    cond: Dict[str, torch.Tensor]
    gen: torch.Generator
    device: torch.device
    levels: Tuple[float, float] = (0.0, 1.0)
    cache_refresh: int = 0
    cache_spacing: int = 50
    inpaint: bool = False


def register(cls):
    """Class decorator: the recipe of the transformer class ``cls.model_class``."""
    RECIPES[cls.model_class] = cls()
    return cls


def recipe_for(model_class: str, folder) -> "Recipe":
    """The recipe that fine-tunes ``model_class``; :class:`TrainError` naming the supported
    ones otherwise (``folder``: the pipeline folder, for the message)."""
    if model_class not in RECIPES:
        raise TrainError(f"--model {folder}: captioned fine-tuning of {model_class} is not in "
                         f"`diffcr train` yet (supported: {', '.join(RECIPES)}); use the Python "
                         "API (diffcr.convert, diffcr.add_lora, your training loop)")
    return RECIPES[model_class]


def read_json(path: Path) -> dict:
    """The JSON object in ``path`` (``{}`` when there is no such file)."""
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


def pipeline_parts(folder: Path, part: str = "transformer"):
    """``(model_index, transformer config, recipe)`` of a pipeline folder (``part``: the
    transformer sub-folder, ``transformer_2`` for the low-noise expert of Wan 2.2); TrainError
    if it is not one ``diffcr train`` can fine-tune with captions (missing parts, mismatched
    encoders)."""
    index = json.loads((folder / "model_index.json").read_text())
    tconf_file = folder / part / "config.json"
    if not tconf_file.is_file():
        raise TrainError(f"--model {folder}: no {part}/config.json")
    tconf = json.loads(tconf_file.read_text())
    recipe = recipe_for(tconf.get("_class_name"), folder)
    recipe.check(folder, tconf)
    return index, tconf, recipe


def normalised_latents(vae, lat: torch.Tensor) -> torch.Tensor:
    """``(lat - mean) / std`` with the VAE's per-channel ``latents_mean`` / ``latents_std``
    (the Wan and Qwen-Image VAEs), for 5-D latents ``[B, z, T, H, W]``."""
    z = lat.shape[1]
    mean = torch.tensor(vae.config.latents_mean, device=lat.device).view(1, z, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=lat.device).view(1, z, 1, 1, 1)
    return (lat - mean) / std


def unpack_2x2(pred: torch.Tensor, B: int, C: int, H: int, W: int) -> torch.Tensor:
    """A prediction over packed 2x2 latent tokens ``[B, H/2 * W/2, 4C]`` (Flux, Qwen-Image)
    back to ``[B, C, H, W]``."""
    return pred.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def check_width(folder: Path, what: str, width, tconf: dict, key: str) -> None:
    """TrainError unless ``width`` (``what``: e.g. "T5 text encoder's width"; None: not in
    the encoder's config) is the transformer config's ``key``."""
    if width is not None and width != tconf.get(key):
        raise TrainError(f"--model {folder}: the {what} ({width}) does not match the "
                         f"transformer's {key} ({tconf.get(key)})")


def check_vae_channels(folder: Path, tconf: dict, key: str = "latent_channels") -> None:
    """TrainError unless the VAE's latent channels (its config's ``key``) are the
    transformer's ``in_channels``."""
    vconf = read_json(folder / "vae" / "config.json")
    want = tconf.get("in_channels")
    if vconf.get(key, want) != want:
        raise TrainError(f"--model {folder}: the VAE makes {vconf[key]} latent "
                         f"channels but the transformer takes {want}")


def native_pixels(folder: Path, tconf: dict) -> int:
    """The transformer's ``sample_size`` (latent side) times the VAE's downsampling."""
    blocks = read_json(folder / "vae" / "config.json").get("block_out_channels", [0])
    return tconf.get("sample_size", 128) * 2 ** (len(blocks) - 1)


class Recipe:
    """How one pipeline family is fine-tuned with captions; subclasses set the class attributes
    and override what differs, and register with :func:`register`."""

    #: the transformer class it fine-tunes, and the family's name in help texts
    model_class = ""
    family = ""
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

        index = read_json(folder / "model_index.json")
        cls = (index.get("vae") or ["diffusers", "AutoencoderKL"])[1]
        return getattr(diffusers, cls).from_pretrained(str(folder / "vae"))

    @torch.no_grad()
    def latents(self, vae, x, gen) -> torch.Tensor:
        lat = vae.encode(x).latent_dist.sample(generator=gen)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (lat - shift) * vae.config.scaling_factor

    def scheduler(self, folder: Path):
        raise NotImplementedError

    # -- one training step: what a recipe defines, and the loss every recipe shares ----------

    def draw(self, b: "Batch") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(level [B], noise, x_t)``: each sample's noise level (the recipe's own kind: a
        DDPM timestep, a flow-matching sigma), drawn from ``b.gen`` within ``b.levels``, the
        noise, and ``b.x0`` noised to that level."""
        raise NotImplementedError

    def noised(self, b: "Batch", noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """``b.x0`` with ``noise`` at ``level``."""
        raise NotImplementedError

    def noisier(self, b: "Batch", level: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """The level ``steps`` [B] sampler steps (``b.cache_spacing`` timesteps each) above
        ``level``, at most the top of ``b.levels``."""
        raise NotImplementedError

    def target(self, b: "Batch", noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """What the model is trained to predict."""
        raise NotImplementedError

    def inputs(self, b: "Batch", x_t: torch.Tensor, level: torch.Tensor) -> dict:
        """The transformer's keyword arguments for ``x_t`` at ``level`` (conditioning from
        ``b.cond``)."""
        raise NotImplementedError

    def prediction(self, b: "Batch", out) -> torch.Tensor:
        """The prediction in ``b.x0``'s layout from the transformer's output."""
        return out.sample

    def loss(self, b: "Batch") -> torch.Tensor:
        """The training loss of one micro-batch (a scalar): the mean squared error of the
        prediction at a drawn level. With ``b.cache_refresh`` R (cache-aware fine-tuning), the
        model first runs without gradient at a noisier level of the same sample and noise,
        1 to R-1 sampler steps back, as a refresh step that fills the token cache
        (:func:`diffcr.fill_token_cache`), so the loss sees the skipped tokens' forecast as a
        sampler's later step would. With ``b.inpaint``, each sample gets a random box
        (:func:`diffcr.keep_mask.random_box_masks` at the latents' height and width), the
        training forward runs inside :func:`diffcr.mask_routing` with it (every routed block
        computes the box's tokens and routes the rest as context), and the error is averaged
        over the box only: an inpaint pipeline that blends latents keeps the prediction there
        and nowhere else. Without these options the draws from ``b.gen`` are the same as with
        them switched off entirely."""
        import diffcr

        level, noise, xt = self.draw(b)
        if b.cache_refresh:
            back = torch.randint(1, b.cache_refresh, (b.x0.shape[0],), generator=b.gen)
            prev = self.noisier(b, level, back.to(level.device))
            diffcr.fill_token_cache(b.model, **self.inputs(b, self.noised(b, noise, prev), prev))
        if not b.inpaint:
            pred = self.prediction(b, b.net(**self.inputs(b, xt, level)))
            return F.mse_loss(pred.float(), self.target(b, noise, level).float())
        from diffcr.keep_mask import random_box_masks

        H, W = b.x0.shape[-2:]
        box = random_box_masks(b.x0.shape[0], H, W, b.gen)
        with diffcr.mask_routing(b.model, box, margin=0):
            pred = self.prediction(b, b.net(**self.inputs(b, xt, level)))
        err = (pred.float() - self.target(b, noise, level).float()).square()
        w = box.to(err.device).view(box.shape[0], *([1] * (err.dim() - 3)), H, W).expand_as(err)
        return (err * w).sum() / w.sum()

    def pipeline_kwargs(self, pixels: int, max_length) -> dict:
        return dict(height=pixels, width=pixels)

    def guidance_kwargs(self, guidance: float) -> dict:
        """The pipeline call's arguments for classifier-free guidance ``guidance``."""
        return dict(guidance_scale=guidance)

    def images_of(self, output) -> list:
        """The PIL images of a pipeline call's output."""
        return output.images


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
        bar = Progress((len(texts) + 15) // 16, "encoding captions", progress)
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

        index = read_json(folder / "model_index.json")
        cls = (index.get("scheduler") or ["diffusers", "FlowMatchEulerDiscreteScheduler"])[1]
        return getattr(diffusers, cls).from_pretrained(str(folder / "scheduler"))

    def shift_of(self, b: "Batch") -> float:
        """The shift of the noise levels: the scheduler's ``shift`` (``flow_shift`` for UniPC),
        1 if it has none."""
        sched = b.sched
        return float(getattr(sched.config, "shift", None)
                     or getattr(sched.config, "flow_shift", None) or 1.0)

    def draw(self, b):
        return self.noisy(b, self.shift_of(b))

    def noised(self, b, noise, level):
        s = level.view(-1, *([1] * (b.x0.dim() - 1))).to(b.x0.dtype)
        return (1 - s) * b.x0 + s * noise

    def noisier(self, b, level, steps):
        """In the unshifted levels, where a sampler's steps are evenly spaced."""
        shift = self.shift_of(b)
        u = level / (shift - (shift - 1) * level)
        top = b.levels[1] / (shift - (shift - 1) * b.levels[1])
        u = (u + steps * (b.cache_spacing / 1000.0)).clamp(max=top)
        return shift * u / (1 + (shift - 1) * u)

    def target(self, b, noise, level):
        return noise - b.x0

    @staticmethod
    def noisy(b: "Batch", shift=None):
        """``(sigma [B], noise, x_t)``: ``sigma`` uniform, then shifted as the scheduler
        shifts (``shift``, or ``flow_shift`` for UniPC); ``x_t = (1 - sigma) x0 + sigma noise``
        (the target is ``noise - x0``), for ``b.x0``. ``b.levels``: the range ``[lo, hi)`` of
        shifted ``sigma`` to draw from (one expert's share of a two-expert pipeline): the
        uniform draw is taken from the preimage of that range under the shift. ``shift``: the
        shift to use instead of the scheduler's fixed one (a dynamic shift at the image's
        size)."""
        sched, x0, g, dev, levels = b.sched, b.x0, b.gen, b.device, b.levels
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
