"""``diffcr train``: DiffCR fine-tuning of class-conditional DiTs, and the embedded demo.

Two entry points:

* :func:`run_demo` (``diffcr train`` with no model/data): a procedurally generated shape data set,
  a small pixel-space DiT trained dense first, then DiffCR-LT (timestep regions), DiffCR-L (one
  region), uniform MoD and random token selection fine-tuned from it at the same target
  compression, compared by held-out denoising loss, classifier-FID and class accuracy of samples,
  with plots (learned ratios, router maps, samples) and the measured speedup of the frozen model.
* :func:`run_train` (``--model``/``--data``): DiffCR fine-tuning of a diffusers
  ``DiTTransformer2DModel`` (folder or config JSON) on an image folder (one subfolder per class),
  pixel space or through a VAE, resumable, single process or under ``torchrun`` (DDP).
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ..config import DEFAULT_BINS, DiffCRConfig

__all__ = ["TrainConfig", "run_demo", "run_train", "diffusion_loss", "sample_images",
           "TrainError"]


class TrainError(ValueError):
    """A problem with the user's arguments or files (reported as one line by the CLI)."""


@dataclass
class TrainConfig:
    out: str = "diffcr-out"
    model: Optional[str] = None
    data: Optional[str] = None
    vae: Optional[str] = None
    compression: float = 0.5
    regions: int = 4
    bins: Optional[List[float]] = None
    lam: float = 0.3
    lr: float = 1e-4
    lr_router: float = 1e-3
    lr_ratio: float = 1e-2
    steps: Optional[int] = None
    batch: int = 32
    image_size: int = 32
    mixed_precision: str = "no"
    grad_ckpt: bool = False
    resume: Optional[str] = None
    seed: int = 0
    save_every: int = 0
    threads: Optional[int] = None
    quick: bool = False
    progress: bool = True
    #: captioned fine-tuning: LoRA rank on the base weights (0: train them in full)
    lora_rank: int = 0
    #: captioned fine-tuning: share of captions replaced by the empty one (for guidance)
    caption_dropout: float = 0.1
    #: captioned fine-tuning: training resolution in pixels (None: the model's)
    resolution: Optional[int] = None
    #: captioned fine-tuning: micro-batches per optimizer step (accelerate)
    grad_accum: int = 1
    #: captioned fine-tuning: shard every transformer block and the model with FSDP2
    #: (``torch.distributed.fsdp.fully_shard``) across the processes instead of DDP
    fsdp: bool = False
    #: captioned fine-tuning on video clips: frames taken from the start of each clip (None:
    #: the pipeline's default, 81 for Wan, 129 for HunyuanVideo)
    frames: Optional[int] = None
    #: captioned fine-tuning of a two-expert pipeline (Wan 2.2 A14B): which expert this run
    #: trains, ``"high"`` (``transformer``) or ``"low"`` (``transformer_2``)
    expert: Optional[str] = None
    #: captioned fine-tuning: tokens per caption (None: 300 above 512 px, else 120, as PixArt)
    max_length: Optional[int] = None
    #: class-conditional training: what the model predicts, "epsilon" or "v_prediction"
    prediction_type: str = "epsilon"
    #: decay of an exponential moving average of the trained weights (0: none); the EMA copy
    #: is what the demo samples from and saves
    ema_decay: float = 0.0
    #: learning-rate schedule: linear warm-up over this many steps, then cosine decay to 0
    #: (0: constant learning rate)
    warmup: int = 0
    #: clip the gradient norm to this (0: no clipping)
    grad_clip: float = 0.0
    #: demo: train the dense model here instead of loading the shipped checkpoint
    from_scratch: bool = False
    #: demo: only train the dense model (``--steps`` of them) and write it to OUT/dense
    pretrain_only: bool = False
    #: demo with ``pretrain_only``: continue training this dense DiT folder (one written by
    #: ``--pretrain-only``) with :data:`DEMO_CONTINUE` instead of starting from scratch
    continue_from: Optional[str] = None
    extra: Dict = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        for name in ("compression", "lr", "lr_router", "lr_ratio", "lam"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise TrainError(f"--{name.replace('_', '-')} must be a finite number, got {v!r}")
        if not (0.0 <= self.compression < 1.0):
            raise TrainError(f"--compression must be in [0, 1), got {self.compression}")
        if self.regions < 1:
            raise TrainError(f"--regions must be >= 1, got {self.regions}")
        if self.steps is not None and self.steps < 1:
            raise TrainError(f"--steps must be >= 1, got {self.steps}")
        if self.batch < 1:
            raise TrainError(f"--batch must be >= 1, got {self.batch}")
        for name in ("lr", "lr_router", "lr_ratio", "lam"):
            if getattr(self, name) < 0:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 0")
        if self.save_every < 0:
            raise TrainError(f"--save-every must be >= 0 (0: only at the end), got "
                             f"{self.save_every}")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) \
                or self.lora_rank < 0:
            raise TrainError(f"--lora-rank must be an integer >= 0 (0: no LoRA), got "
                             f"{self.lora_rank!r}")
        if not (isinstance(self.caption_dropout, (int, float)) and
                0.0 <= self.caption_dropout <= 1.0):
            raise TrainError(f"--caption-dropout must be in [0, 1], got {self.caption_dropout!r}")
        if self.resolution is not None and (self.resolution < 16 or self.resolution % 16):
            raise TrainError(f"--resolution must be a multiple of 16, got {self.resolution}")
        if self.grad_accum < 1:
            raise TrainError(f"--grad-accum must be >= 1, got {self.grad_accum}")
        if self.max_length is not None and self.max_length < 1:
            raise TrainError(f"--max-length must be >= 1, got {self.max_length}")
        if self.threads is not None and self.threads < 1:
            raise TrainError(f"--threads must be >= 1, got {self.threads}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise TrainError(f"--out {self.out} exists and is not a folder")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise TrainError(f"prediction type must be epsilon or v_prediction, got "
                             f"{self.prediction_type!r}")
        if not (0.0 <= self.ema_decay < 1.0):
            raise TrainError(f"EMA decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup < 0:
            raise TrainError(f"warm-up steps must be >= 0, got {self.warmup}")
        if self.pretrain_only and (self.model is not None or self.data is not None):
            raise TrainError("--pretrain-only trains the demo's dense model: it takes no "
                             "--model/--data")
        if self.continue_from is not None:
            if not self.pretrain_only or self.from_scratch:
                raise TrainError("--continue-from goes with --pretrain-only (and not with "
                                 "--from-scratch)")
            if not (Path(self.continue_from) / "config.json").is_file():
                raise TrainError(f"--continue-from {self.continue_from}: not a dense DiT "
                                 "folder (no config.json)")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise TrainError("--mixed-precision must be no, bf16 or fp16")
        if self.frames is not None and (isinstance(self.frames, bool) or self.frames < 1):
            raise TrainError(f"--frames must be >= 1, got {self.frames!r}")
        if self.expert not in (None, "high", "low"):
            raise TrainError(f"--expert must be high or low, got {self.expert!r}")
        if self.fsdp and self.mixed_precision == "fp16":
            raise TrainError("--fsdp with --mixed-precision fp16: the gradient scaler does not "
                             "take sharded gradients; use bf16")
        if self.data is not None and not Path(self.data).is_dir():
            raise TrainError(f"--data {self.data}: no such folder")
        if self.model is not None and not Path(self.model).exists():
            raise TrainError(f"--model {self.model}: no such folder or file")
        if self.resume is not None and not Path(self.resume).is_dir():
            raise TrainError(f"--resume {self.resume}: no such checkpoint folder")
        try:
            self.diffcr_config()
        except ValueError as e:
            raise TrainError(str(e)) from e
        return self

    def diffcr_config(self, regions: Optional[int] = None, kept: Optional[float] = None,
                      **kw) -> DiffCRConfig:
        """The DiffCR config of this run (``regions``/``kept``: other region count or target
        kept ratio)."""
        kept = 1.0 - self.compression if kept is None else kept
        return DiffCRConfig(bins=self.bins or DEFAULT_BINS,
                            num_regions=self.regions if regions is None else regions,
                            target_kept_ratio=round(kept, 6), lam=self.lam,
                            num_train_timesteps=1000, **kw)


# ------------------------------------------------------------------------------ basics
def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type=prediction_type)


def diffusion_loss(model, sched, x0, labels, gen: Optional[torch.Generator] = None,
                   t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None):
    """MSE of the model's prediction at uniformly drawn timesteps (or the given ``t``/``noise``).

    The target follows ``sched.config.prediction_type``: the noise (``"epsilon"``) or the
    velocity ``sqrt(a) noise - sqrt(1 - a) x0`` (``"v_prediction"``)."""
    B = x0.shape[0]
    if t is None:
        t = torch.randint(0, sched.config.num_train_timesteps, (B,), generator=gen,
                          device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    xt = sched.add_noise(x0, noise, t)
    pred = model(xt, timestep=t, class_labels=labels).sample[:, : x0.shape[1]]
    target = noise if sched.config.prediction_type == "epsilon" else \
        sched.get_velocity(x0, noise, t)
    return F.mse_loss(pred.float(), target.float())


@torch.no_grad()
def sample_images(model, labels, num_classes: int, channels: int, size: int, steps: int = 25,
                  guidance: float = 2.0, seed: int = 0, batch: int = 128,
                  prediction_type: str = "epsilon") -> torch.Tensor:
    """DDIM sampling with classifier-free guidance (null class = ``num_classes``).

    ``labels`` int64 ``[n]``; returns float32 ``[n, channels, size, size]`` in [-1, 1]. Each
    batch of ``batch`` samples is one sampling loop (conditional and unconditional halves in
    one forward): diffusers caches attached to ``model`` are reset and their cache context
    opened at its start (:func:`~diffcr.app.demo.peers.start_cache_run`)."""
    from diffusers import DDIMScheduler

    from .demo.peers import start_cache_run

    dev = next(model.parameters()).device
    out = []
    for i in range(0, labels.numel(), batch):
        lab = labels[i:i + batch].to(dev)
        n = lab.numel()
        sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              clip_sample=True, prediction_type=prediction_type)
        sched.set_timesteps(steps)
        start_cache_run(model)
        g = torch.Generator().manual_seed(seed + i)
        x = torch.randn(n, channels, size, size, generator=g).to(dev)
        null = torch.full_like(lab, num_classes)
        for t in sched.timesteps:
            inp = torch.cat([x, x])
            tt = torch.full((2 * n,), int(t), device=dev)
            eps = model(inp, timestep=tt, class_labels=torch.cat([lab, null])).sample
            eps = eps[:, :channels]
            e_c, e_u = eps.chunk(2)
            x = sched.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)


class _Progress:
    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, **post):
        if self.bar is not None:
            self.bar.update(1)
            if post:
                self.bar.set_postfix({k: (f"{v:.4f}" if isinstance(v, float) else v)
                                      for k, v in post.items()}, refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _param_groups(model, cfg: TrainConfig, train_base: bool = True):
    import diffcr

    routers = set(map(id, diffcr.router_parameters(model))) if diffcr.is_converted(model) \
        else set()
    ratios = set(map(id, diffcr.ratio_parameters(model))) if diffcr.is_converted(model) else set()
    base = [p for p in model.parameters() if id(p) not in routers | ratios and p.requires_grad]
    groups = []
    if train_base and base and cfg.lr > 0:
        groups.append({"params": base, "lr": cfg.lr, "name": "base"})
    if routers:
        ps = [p for p in diffcr.router_parameters(model) if p.requires_grad]
        if ps:
            groups.append({"params": ps, "lr": cfg.lr_router, "weight_decay": 0.0,
                           "name": "router"})
    if ratios:
        ps = [p for p in diffcr.ratio_parameters(model) if p.requires_grad]
        if ps:
            groups.append({"params": ps, "lr": cfg.lr_ratio, "weight_decay": 0.0,
                           "name": "ratio"})
    return groups


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Learning-rate multiplier at ``step``: 1 without warm-up; else linear warm-up over
    ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if warmup <= 0:
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """``ema = d ema + (1 - d) model`` over the parameters, with the usual warm-up
    ``d = min(decay, (1 + step) / (10 + step))`` so early steps are not dominated by the
    initialisation; buffers are copied."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p.detach().to(pe.dtype), 1.0 - d)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


def _train(model, x_all, y_all, steps: int, cfg: TrainConfig, desc: str, ratio_loss: bool,
           train_base: bool = True, gen_seed: int = 0, ddp=None, opt=None, start_step: int = 0,
           on_step=None, ema: Optional[torch.nn.Module] = None):
    """The training loop shared by the demo and real use. Returns (optimizer, last losses).

    ``ema``: a copy of the model (same parameter order) updated after every step with
    ``cfg.ema_decay`` (:func:`ema_update`)."""
    import diffcr

    sched = _scheduler(cfg.prediction_type)
    module = ddp.module if ddp is not None else model
    net = ddp if ddp is not None else model
    if opt is None:
        opt = torch.optim.AdamW(_param_groups(module, cfg, train_base), weight_decay=0.0)
    if diffcr.is_converted(module) and any(g.get("name") == "ratio" for g in opt.param_groups):
        diffcr.attach_ratio_projection(opt, module)
    net.train()
    g = torch.Generator().manual_seed(gen_seed)
    n = x_all.shape[0]
    dev = next(module.parameters()).device
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    scaler = torch.amp.GradScaler(dev.type, enabled=cfg.mixed_precision == "fp16")
    bar = _Progress(steps - start_step, desc, cfg.progress)
    last = {}
    base_lr = [g["lr"] for g in opt.param_groups]
    for step in range(start_step, steps):
        f = lr_factor(step, steps, cfg.warmup)
        for grp, lr in zip(opt.param_groups, base_lr):
            grp["lr"] = lr * f
        idx = torch.randint(0, n, (cfg.batch,), generator=g)
        x0 = x_all[idx].to(dev)
        y = y_all[idx].to(dev)
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            loss = diffusion_loss(net, sched, x0, y, g)
            total = loss
            if (ratio_loss and diffcr.is_converted(module)
                    and not diffcr.routing_state(module).frozen):
                rl = diffcr.ratio_loss(module)
                total = loss + rl
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                           cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        if ema is not None:
            ema_update(ema, module, cfg.ema_decay, step)
        last = {"loss": loss.item()}
        if (ratio_loss and diffcr.is_converted(module)
                and not diffcr.routing_state(module).frozen):
            last["kept"] = diffcr.mean_kept_ratio(module).item()
        bar.update(**last)
        if on_step is not None:
            on_step(step + 1, opt)
    bar.close()
    for grp, lr in zip(opt.param_groups, base_lr):
        grp["lr"] = lr
    return opt, last


@torch.no_grad()
def heldout_loss(model, x0, labels, seed: int = 123, batch: int = 256,
                 prediction_type: str = "epsilon") -> float:
    """Denoising loss on a fixed held-out set of (image, timestep, noise) triplets."""
    sched = _scheduler(prediction_type)
    model.eval()
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    tot, cnt = 0.0, 0
    for i in range(0, x0.shape[0], batch):
        xb = x0[i:i + batch].to(dev)
        t = torch.randint(0, 1000, (xb.shape[0],), generator=g).to(dev)
        noise = torch.randn(xb.shape, generator=g).to(dev)
        loss = diffusion_loss(model, sched, xb, labels[i:i + batch].to(dev), t=t, noise=noise)
        tot += float(loss) * xb.shape[0]
        cnt += xb.shape[0]
    return tot / cnt


def _speed(model, x, labels, rounds: int = 5) -> float:
    from .bench import time_fn

    model.eval()
    t = torch.full((x.shape[0],), 500)
    with torch.no_grad():
        return time_fn(lambda: model(x, timestep=t, class_labels=labels), x.device, rounds)


# ------------------------------------------------------------------------------ demo
def _demo_model(size: int, num_classes: int, channels: int = 3):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32,
                                 in_channels=channels, out_channels=channels, num_layers=6,
                                 sample_size=size, patch_size=DEMO_PATCH,
                                 num_embeds_ada_norm=num_classes)


@torch.no_grad()
def init_dit_weights_(model) -> None:
    """The DiT paper's initialisation, in place, for a ``DiTTransformer2DModel`` trained from
    scratch. diffusers builds the model with PyTorch's default initialisation (it is meant for
    loading checkpoints), which leaves out what makes DiT train: adaLN-Zero (every block's
    modulation and the final layer start at zero, so each block starts as the identity),
    xavier-uniform linears, label and timestep embeddings at std 0.02."""
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    w = model.pos_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.pos_embed.proj.bias)
    for b in model.transformer_blocks:
        emb = b.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(b.norm1.linear.weight)
        nn.init.zeros_(b.norm1.linear.bias)
    for lin in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)


def _router_maps(model, images, labels, blocks: List[int], timesteps: List[int]):
    """Router scores [n, len(blocks), len(timesteps), h, w] of a converted model."""
    import diffcr

    sched = _scheduler()
    n = images.shape[0]
    side = images.shape[-1] // model.config.patch_size
    out = torch.zeros(n, len(blocks), len(timesteps), side, side)
    captured = {}
    hooks = []
    rb = diffcr.routed_blocks(model)
    for bi in blocks:
        hooks.append(rb[bi].register_forward_pre_hook(
            lambda mod, args, kw, bi=bi: captured.__setitem__(bi, (args[0] if args else
                                                               kw["hidden_states"]).detach()),
            with_kwargs=True))
    g = torch.Generator().manual_seed(7)
    model.eval()
    with torch.no_grad():
        for j, tv in enumerate(timesteps):
            t = torch.full((n,), tv)
            noise = torch.randn(images.shape, generator=g)
            model(sched.add_noise(images, noise, t), timestep=t, class_labels=labels)
            for i, bi in enumerate(blocks):
                s = rb[bi].router(captured[bi])
                out[:, i, j] = s.view(n, side, side)
    for h in hooks:
        h.remove()
    return out


def _object_focus(model, images, labels, masks, timestep: int = 300) -> float:
    """Fraction of the selected tokens that cover the object (vs its share of the image)."""
    import diffcr

    patch = model.config.patch_size
    n = images.shape[0]
    obj = F.avg_pool2d(masks.float().unsqueeze(1), patch).view(n, -1) > 0.25
    maps = _router_maps(model, images, labels, list(diffcr.routed_blocks(model))[:1],
                        [timestep])[:, 0, 0].reshape(n, -1)
    k = max(1, obj.sum(1).float().mean().round().int().item())
    top = maps.topk(k, dim=1).indices
    hit = obj.gather(1, top).float().mean().item()
    return hit


#: Why the first demo's dense DiT drew noise (samples classified at chance even after 9,000
#: steps), and what the demo does instead (measurements in the README):
#:
#: * eps-prediction: under the cosine schedule the x0 estimate at high noise is the eps error
#:   amplified by sqrt((1 - a) / a) (x 6.4 at t = 900), so the first sampling steps drew noise.
#:   The demo predicts v, which is the blurred mean there.
#: * diffusers builds ``DiTTransformer2DModel`` with PyTorch's default initialisation: no
#:   adaLN-Zero, class embeddings at std 1. :func:`init_dit_weights_` applies the DiT paper's.
#: * samples came from the raw weights at a constant 1e-3: the demo samples an EMA and uses
#:   warm-up + cosine decay and gradient clipping.
#: * not the sampler: one checkpoint gave the same class accuracy (0.22-0.25) at 20 or 50
#:   DDIM steps and guidance 1, 2 or 4.
#: * the data: denoising real images worked (x0 estimates from noised shapes had the right
#:   shape and hue), but from pure noise every 4x4-pixel token chose its own hue and place:
#:   fragments of several colours in several places, with attention near uniform (entropy 4.14
#:   of 4.16 nats). Shapes near the centre (``spread`` 0.3), drawn near-white or near-black
#:   instead of in a random hue, on 16x16 images with 2x2 patches (the same 64 tokens) give
#:   one coherent shape within 500 steps.
DEMO_RECIPE = dict(prediction_type="v_prediction", grad_clip=1.0)
DEMO_PRETRAIN = dict(lr=1e-3, warmup=100, ema_decay=0.999)
#: fine-tuning: a short warm-up then cosine decay to 0 over the fine-tuning steps. Measured on
#: DiffCR-LT, 200 steps, target kept 0.5 (class accuracy over 2 x 150 samples): a constant
#: 2e-4 gave 0.764 at kept 0.583; the cosine schedule 0.847 at kept 0.633 (it compresses a
#: little less, since the ratios' learning rate decays too), with the ratios at 3e-2 instead
#: of 1e-2 0.830 at kept 0.604, and a peak of 5e-4 0.827 at kept 0.617.
DEMO_FINETUNE = dict(lr=2e-4, warmup=10, ema_decay=0.99)
#: recipe of a further pre-training stage (``--pretrain-only --continue-from FOLDER``): a
#: second warm-up + cosine cycle at a lower peak learning rate, EMA started from the weights.
#: The shipped checkpoint had 8000 steps of :data:`DEMO_PRETRAIN` (dense class accuracy
#: 0.893 over 2 x 150 samples) and then 6000 of these (0.940).
DEMO_CONTINUE = dict(lr=3e-4, warmup=100, ema_decay=0.999)
#: the demo's data (:func:`~diffcr.app.demo.data.make_shapes` arguments, see above)
DEMO_DATA = dict(spread=0.3, mono=True, scale=1.6)
#: image side and patch size of the demo DiT
DEMO_SIZE, DEMO_PATCH = 16, 2
#: steps of dense pre-training behind the shipped checkpoint (and ``--from-scratch``): a first
#: stage from scratch, then a second one (:data:`DEMO_CONTINUE`), and the minutes both took
#: on the 2-core development machine
DEMO_PRETRAIN_STEPS = 8000
DEMO_CONTINUE_STEPS = 6000
DEMO_PRETRAIN_MINUTES = 50
#: fine-tuning steps of every variant (the 10-minute budget of the demo sets it)
DEMO_FINETUNE_STEPS = 170
#: DDIM steps and guidance scale of every demo sampling loop
DEMO_SAMPLING = dict(steps=20, guidance=2.0)
#: the diffusers caches of the comparison (FirstBlockCache thresholds, TaylorSeer intervals)
DEMO_CACHES = (("fbc", 0.1), ("fbc", 0.2), ("taylorseer", 2), ("taylorseer", 3),
               ("taylorseer", 4))
#: a second DiffCR-LT at this target kept ratio, in the caches' speed range
DEMO_MILD_KEPT = 0.8
DEMO_MILD_NAME = f"DiffCR-LT kept {DEMO_MILD_KEPT}"
#: DiffCR-LT stacked with these caches
DEMO_STACKS = (("fbc", 0.1), ("taylorseer", 3))


def shipped_dense_path() -> Path:
    """Folder of the dense demo DiT shipped with diffcr (diffusers format + ``training.json``,
    which says how it was trained)."""
    return Path(__file__).parent / "demo" / "dense_dit"


def pretrain_dense(cfg: TrainConfig, x_tr, y_tr, steps: int):
    """Train the demo's dense DiT from scratch with the demo recipe; returns the EMA copy
    (trainable, train mode)."""
    from .demo.data import NUM_CLASSES

    torch.manual_seed(cfg.seed)
    dense = _demo_model(x_tr.shape[-1], NUM_CLASSES)
    init_dit_weights_(dense)
    ema = copy.deepcopy(dense).requires_grad_(False)
    _train(dense, x_tr, y_tr, steps, dataclass_replace(cfg, **DEMO_RECIPE, **DEMO_PRETRAIN),
           "dense pre-training", ratio_loss=False, gen_seed=cfg.seed, ema=ema)
    return ema.requires_grad_(True).train()


def continue_dense(cfg: TrainConfig, dense, x_tr, y_tr, steps: int):
    """A further pre-training stage of ``dense`` with :data:`DEMO_CONTINUE`; returns the EMA
    copy (started from ``dense``), trainable and in train mode."""
    dense = dense.float().train().requires_grad_(True)
    ema = copy.deepcopy(dense).requires_grad_(False)
    _train(dense, x_tr, y_tr, steps, dataclass_replace(cfg, **DEMO_RECIPE, **DEMO_CONTINUE),
           "dense pre-training (continued)", ratio_loss=False, gen_seed=cfg.seed + 1000,
           ema=ema)
    return ema.requires_grad_(True).train()


def _training_stages(folder: Path) -> List[dict]:
    """The training stages recorded in a dense DiT folder's ``training.json`` (oldest first;
    a file from before stages were recorded is one stage)."""
    f = folder / "training.json"
    if not f.is_file():
        return [{"command": "unknown (no training.json)"}]
    info = json.loads(f.read_text())
    return info.get("stages") or [info]


def load_shipped_dense():
    """The shipped dense demo DiT (trainable), or None when the package has none."""
    from diffusers import DiTTransformer2DModel

    p = shipped_dense_path()
    if not (p / "config.json").is_file():
        return None
    return DiTTransformer2DModel.from_pretrained(str(p)).float().train()


def _demo_sampler(quick: bool):
    from .demo.data import NUM_CLASSES

    steps = 4 if quick else DEMO_SAMPLING["steps"]

    def sampler(model, labels, seed: int):
        return sample_images(model, labels, NUM_CLASSES, 3, DEMO_SIZE, steps=steps,
                             guidance=DEMO_SAMPLING["guidance"], seed=seed, batch=256,
                             prediction_type=DEMO_RECIPE["prediction_type"])
    return sampler


def run_demo(cfg: TrainConfig) -> dict:
    """The embedded end-to-end demo; writes the outputs to ``cfg.out`` and returns metrics.

    1. data (procedural shapes) and the evaluation classifier;
    2. the dense DiT: the shipped checkpoint, or trained here with ``cfg.from_scratch``
       (``cfg.pretrain_only`` stops after it and writes it to ``OUT/dense``);
    3. DiffCR-LT (at the target and at :data:`DEMO_MILD_KEPT`), DiffCR-L, uniform MoD and
       random selection fine-tuned from it for the same number of steps with the same recipe
       (the dense model itself is compared as it is);
    4. one comparison on the same seeds and sampler: the dense model and the five fine-tuned
       variants, the diffusers caches on the dense model (:data:`DEMO_CACHES`) and DiffCR-LT
       stacked with a cache
       (:data:`DEMO_STACKS`), each with the measured speedup of its sampling loop, class
       accuracy and classifier-FID per seed (:func:`~diffcr.app.demo.compare.compare_methods`);
    5. ``metrics.json``, ``ratios.png``, ``router.png``, ``samples.png``, ``tradeoff.png``.
    """
    import diffcr
    from .demo import (class_accuracy, make_shapes, train_classifier, plot_ratio_heatmap,
                       plot_router_maps, plot_samples)
    from .demo.compare import Method, compare_methods
    from .demo.data import CLASS_NAMES, NUM_CLASSES
    from .demo.peers import CacheSetting, cache_available
    from .demo.plots import plot_tradeoff

    t_start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    quick = cfg.quick
    size = DEMO_SIZE
    n_train = 2000 if quick else 8000
    ft_steps = 8 if quick else (cfg.steps or DEMO_FINETUNE_STEPS)
    per_class = 2 if quick else 25
    seeds = (cfg.seed + 99, cfg.seed + 199)
    pred = DEMO_RECIPE["prediction_type"]
    timings = {}

    def log(msg):
        if cfg.progress:
            print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)

    # 1. data and the evaluation classifier
    x_tr, y_tr = make_shapes(n_train, size=size, seed=cfg.seed, **DEMO_DATA)
    x_te, y_te, m_te = make_shapes(512 if not quick else 96, size=size, seed=cfg.seed + 1,
                                   return_masks=True, **DEMO_DATA)

    # 2. the dense model
    t0 = time.time()
    dense = None if (cfg.from_scratch or cfg.pretrain_only) else load_shipped_dense()
    if dense is None:
        steps = cfg.steps if cfg.pretrain_only and cfg.steps else \
            (30 if quick else DEMO_CONTINUE_STEPS if cfg.continue_from else DEMO_PRETRAIN_STEPS)
        if cfg.continue_from:
            from diffusers import DiTTransformer2DModel

            log(f"continuing the dense DiT of {cfg.continue_from}: {steps} steps")
            start = DiTTransformer2DModel.from_pretrained(cfg.continue_from)
            dense = continue_dense(cfg, start, x_tr, y_tr, steps)
            recipe = {**DEMO_RECIPE, **DEMO_CONTINUE, "batch": cfg.batch}
            stages = _training_stages(Path(cfg.continue_from))
            flag = f" --continue-from {Path(cfg.continue_from).name}"
        else:
            log(f"training the dense DiT from scratch: {steps} steps (the shipped checkpoint: "
                f"{DEMO_PRETRAIN_STEPS} + {DEMO_CONTINUE_STEPS} steps, "
                f"{DEMO_PRETRAIN_MINUTES} min on 2 CPU cores)")
            dense = pretrain_dense(cfg, x_tr, y_tr, steps)
            recipe = {**DEMO_RECIPE, **DEMO_PRETRAIN, "batch": cfg.batch}
            stages, flag = [], ""
            if not cfg.pretrain_only and not quick:  # both stages of the shipped checkpoint
                dense = continue_dense(cfg, dense, x_tr, y_tr, DEMO_CONTINUE_STEPS)
                steps += DEMO_CONTINUE_STEPS
        dense_source = f"trained here, {steps} steps"
        if cfg.pretrain_only:
            dense.save_pretrained(out / "dense")
            stage = {
                "steps": steps, "seconds": round(time.time() - t0, 1),
                "threads": torch.get_num_threads(), "train_images": n_train, "seed": cfg.seed,
                "recipe": recipe,
                "data": {**DEMO_DATA, "size": DEMO_SIZE, "patch": DEMO_PATCH},
                "init": f"the weights of {Path(cfg.continue_from).name}" if cfg.continue_from
                else "DiT (adaLN-Zero)",
                "command": f"diffcr train --pretrain-only --steps {steps}{flag} --threads "
                           f"{torch.get_num_threads()}"}
            stages = stages + [stage]
            (out / "dense" / "training.json").write_text(json.dumps({
                "steps": sum(st.get("steps", 0) for st in stages),
                "seconds": round(sum(st.get("seconds", 0) for st in stages), 1),
                "stages": stages}, indent=2))
            log(f"dense DiT written to {out / 'dense'}")
            return {"pretrain_only": True, "steps": steps, "out": str(out / "dense"),
                    "seconds": time.time() - t0}
    else:
        dense_source = f"shipped checkpoint ({shipped_dense_path().name})"
    timings["dense_s"] = time.time() - t0
    log(f"dense DiT: {dense_source}, {sum(p.numel() for p in dense.parameters()) / 1e6:.2f} M "
        f"params, {(size // DEMO_PATCH) ** 2} tokens")
    t0 = time.time()
    clf = train_classifier(x_tr, y_tr, NUM_CLASSES, steps=40 if quick else 300, seed=cfg.seed)
    timings["classifier_s"] = time.time() - t0
    clf_acc = class_accuracy(clf, x_te, y_te)
    log(f"data: {n_train} shapes ({NUM_CLASSES} classes); evaluation classifier held-out "
        f"accuracy {clf_acc:.3f}")

    # 3. variants fine-tuned from the dense model (which itself is compared as it is: the
    #    model a user has, and the one the training-free caches are applied to)
    kept = 1.0 - cfg.compression
    variants = {"dense": dense.eval()}
    ft_cfg = dataclass_replace(cfg, **DEMO_RECIPE, **DEMO_FINETUNE)

    def finetune(name, conv_cfg, fixed: Optional[float], ratio: bool):
        m = copy.deepcopy(dense)
        if conv_cfg is not None:
            diffcr.convert(m, conv_cfg)
            if fixed is not None:
                with torch.no_grad():
                    for b in diffcr.routed_blocks(m).values():
                        b.ratio.kept.fill_(fixed)
                diffcr.freeze(m)
        ema = copy.deepcopy(m).requires_grad_(False)
        t0 = time.time()
        _train(m, x_tr, y_tr, ft_steps, ft_cfg, f"fine-tune {name}", ratio_loss=ratio,
               gen_seed=cfg.seed + 11, ema=ema)
        timings[f"finetune_{name}_s"] = time.time() - t0
        if conv_cfg is not None and not diffcr.routing_state(ema).frozen:
            diffcr.freeze(ema)
        variants[name] = ema.eval()
        log(f"fine-tuned {name} ({ft_steps} steps)")

    finetune("DiffCR-LT", cfg.diffcr_config(), None, True)
    # the same at a mild target: quality near dense, the equal-quality point against the caches
    finetune(DEMO_MILD_NAME, cfg.diffcr_config(kept=DEMO_MILD_KEPT), None, True)
    finetune("DiffCR-L", cfg.diffcr_config(regions=1), None, True)
    mod_bin = min(DiffCRConfig().bins, key=lambda b: abs(b - kept))
    finetune("MoD", cfg.diffcr_config(regions=1), mod_bin, False)
    finetune("random", cfg.diffcr_config(regions=1, selection="random"), mod_bin, False)

    # 4. one comparison: trained variants, caches on dense, DiffCR-LT + cache
    methods = {}
    for name, m in variants.items():
        kr = 1.0
        if diffcr.is_converted(m):
            kr = float(torch.tensor([r.frozen_bins for r in
                                     diffcr.routing_state(m).blocks.values()]).mean())
        methods[name] = Method(m, "dense" if name == "dense" else "diffcr", kr,
                               heldout_loss(m, x_te, y_te, prediction_type=pred))
    caches = DEMO_CACHES[::3] if quick else DEMO_CACHES
    skipped = []
    for kind, value in caches:
        if not cache_available(kind):
            skipped.append(kind)
            continue
        s = CacheSetting(kind, value)
        methods[s.label] = Method(s.apply(copy.deepcopy(variants["dense"])), "cache")
    for kind, value in DEMO_STACKS[:1] if quick else DEMO_STACKS:
        if not cache_available(kind):
            skipped.append(kind)
            continue
        s = CacheSetting(kind, value)
        methods[f"DiffCR-LT + {s.label}"] = Method(
            s.apply(copy.deepcopy(variants["DiffCR-LT"])), "diffcr+cache",
            methods["DiffCR-LT"].kept_ratio)
    if skipped:
        log(f"not in this diffusers, left out of the comparison: {sorted(set(skipped))}")
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    t0 = time.time()
    bar = _Progress(len(methods) * len(seeds), "sampling every method", cfg.progress)
    rows = compare_methods(methods, _demo_sampler(quick), clf, x_te, labels, seeds,
                           progress=lambda name, seed, dt: bar.update(method=name))
    bar.close()
    timings["comparison_s"] = time.time() - t0
    samples = {name: r.pop("samples") for name, r in rows.items()}
    for name, r in rows.items():
        m = methods[name].model
        if name in variants and diffcr.is_converted(m):
            r["learned_kept_ratio_table"] = [r_.frozen_bins for r_ in
                                             diffcr.routing_state(m).blocks.values()]
        r["mean_compression"] = 1 - r["mean_kept_ratio"]
    metrics = {"target_compression": cfg.compression, "classifier_heldout_accuracy": clf_acc,
               "dense_model": dense_source, "methods": rows}
    metrics["achieved_vs_target"] = {
        "target_kept_ratio": kept, "DiffCR-LT_kept_ratio": rows["DiffCR-LT"]["mean_kept_ratio"],
        "DiffCR-L_kept_ratio": rows["DiffCR-L"]["mean_kept_ratio"]}
    lt = variants["DiffCR-LT"]
    metrics["router_object_focus"] = {
        "DiffCR-LT": _object_focus(lt, x_te[:64], y_te[:64], m_te[:64]),
        "object_token_share": float(F.avg_pool2d(m_te[:64].float().unsqueeze(1), DEMO_PATCH)
                                    .gt(0.25).float().mean())}

    # 5. outputs
    diffcr.save(lt, out / "diffcr")
    base = copy.deepcopy(lt)
    diffcr.revert(base)
    base.save_pretrained(out / "model")
    _save_sampling_config(out / "model", pred)
    idx, _ = diffcr.ratio_table(lt)
    frozen = torch.tensor([r.frozen_bins for r in diffcr.routing_state(lt).blocks.values()])
    plot_ratio_heatmap(frozen, idx, out / "ratios.png", 1000,
                       title="DiffCR-LT learned compression per block and timestep region")
    blocks = [0, len(idx) // 2, len(idx) - 1]
    maps = _router_maps(lt, x_te[:4], y_te[:4], blocks, [100, 500, 900])
    plot_router_maps(x_te[:4], maps, out / "router.png", [f"block {b}" for b in blocks],
                     ["t=100", "t=500", "t=900"])
    pick = torch.cat([torch.nonzero(labels == c).flatten()[:2] for c in range(NUM_CLASSES)])
    shown = ["dense", "DiffCR-LT", DEMO_MILD_NAME, "MoD", "random"] + [
        n for n in ("FBC 0.1", "TaylorSeer /3", "DiffCR-LT + FBC 0.1") if n in samples]
    plot_samples({k: samples[k][pick] for k in shown}, out / "samples.png",
                 class_names=CLASS_NAMES, labels=labels[pick])
    plot_tradeoff(rows, out / "tradeoff.png")
    timings["total_s"] = time.time() - t_start
    metrics["timings_s"] = timings
    metrics["settings"] = {"finetune_steps": ft_steps, "train_images": n_train,
                           "image_size": size, "tokens": (size // DEMO_PATCH) ** 2,
                           "samples_per_seed": int(labels.numel()), "seeds": list(seeds),
                           "sampling_steps": 4 if quick else DEMO_SAMPLING["steps"],
                           "guidance": DEMO_SAMPLING["guidance"], "sampler": "DDIM",
                           "recipe": {**DEMO_RECIPE, "finetune": DEMO_FINETUNE},
                           "threads": torch.get_num_threads(), "quick": quick}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "comparison.md").write_text(format_markdown(metrics) + "\n")
    return metrics


def _save_sampling_config(folder: Path, prediction_type: str) -> None:
    """Write the DDIM scheduler the model samples with next to it (``scheduler_config.json``),
    so that ``diffcr generate`` uses the right prediction type."""
    from diffusers import DDIMScheduler

    DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                  clip_sample=True, prediction_type=prediction_type).save_config(str(folder))


def dataclass_replace(cfg: TrainConfig, **kw) -> TrainConfig:
    d = asdict(cfg)
    d.update(kw)
    return TrainConfig(**d)


def format_summary(metrics: dict) -> str:
    """The table printed at the end of ``diffcr train`` (one row per method of the comparison;
    ``+-`` is half the range over the sampling seeds)."""
    from .demo.compare import spread

    lines = [f"{'method':<26} {'kept':>5} {'heldout loss':>12} {'class acc':>13} "
             f"{'cls-FID':>13} {'speedup':>8}"]
    for name, r in metrics["methods"].items():
        hl = r.get("heldout_denoising_loss")
        acc = f"{r['class_accuracy']:.3f}+-{spread(r['class_accuracy_per_seed']):.3f}"
        fid = f"{r['classifier_fid']:.1f}+-{spread(r['classifier_fid_per_seed']):.1f}"
        lines.append(f"{name:<26} {r['mean_kept_ratio']:>5.3f} "
                     f"{('%.4f' % hl) if hl is not None else '-':>12} {acc:>13} {fid:>13} "
                     f"{r['speedup_vs_dense']:>7.2f}x")
    a = metrics["achieved_vs_target"]
    lines.append(f"target kept ratio {a['target_kept_ratio']:.3f}; achieved DiffCR-LT "
                 f"{a['DiffCR-LT_kept_ratio']:.3f}, DiffCR-L {a['DiffCR-L_kept_ratio']:.3f}")
    f = metrics.get("router_object_focus")
    if f:
        lines.append(f"router focus: {100 * f['DiffCR-LT']:.1f} % of the top tokens of block 0 "
                     f"lie on the object (object share of the image: "
                     f"{100 * f['object_token_share']:.1f} %)")
    return "\n".join(lines)


def format_markdown(metrics: dict) -> str:
    """The comparison as a Markdown table (written to ``comparison.md`` by the demo): one row
    per method, quality as mean +- half the range over the sampling seeds."""
    from .demo.compare import spread

    st = metrics.get("settings", {})
    lines = ["| method | kept ratio | held-out loss | class accuracy | classifier-FID | "
             "sampling loop | speedup vs dense |", "|---|---|---|---|---|---|---|"]
    for name, r in metrics["methods"].items():
        hl = r.get("heldout_denoising_loss")
        lines.append(
            f"| {name} | {r['mean_kept_ratio']:.3f} | "
            f"{('%.4f' % hl) if hl is not None else '-'} | "
            f"{r['class_accuracy']:.3f} ± {spread(r['class_accuracy_per_seed']):.3f} | "
            f"{r['classifier_fid']:.1f} ± {spread(r['classifier_fid_per_seed']):.1f} | "
            f"{r['sampling_s_total']:.1f} s | {r['speedup_vs_dense']:.2f}× |")
    if st:
        lines.append("")
        lines.append(f"{st.get('samples_per_seed')} samples per seed, seeds {st.get('seeds')}, "
                     f"{st.get('sampling_steps')} {st.get('sampler')} steps, guidance "
                     f"{st.get('guidance')}; sampling loop = total wall-clock time of both "
                     f"seeds on {st.get('threads')} thread(s).")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ real use
def load_model(path: str):
    from diffusers import DiTTransformer2DModel

    p = Path(path)
    cfg_file = p if p.is_file() else p / "config.json"
    if not cfg_file.is_file():
        raise TrainError(f"--model {path}: no config.json (expected a diffusers model folder or "
                         "a config JSON file)")
    try:
        conf = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise TrainError(f"--model {cfg_file}: not valid JSON ({e})") from e
    cls = conf.get("_class_name")
    if cls == "PixArtTransformer2DModel":
        raise TrainError("--model is a PixArt transformer: pass the whole pipeline folder "
                         "(model_index.json, transformer/, text_encoder/, tokenizer/, vae/) "
                         "and a --data folder with captions (metadata.jsonl)")
    if cls not in (None, "DiTTransformer2DModel"):
        raise TrainError(f"--model {path}: {cls} is not supported by `diffcr train` "
                         "(class-conditional DiTTransformer2DModel only)")
    if p.is_file():
        return DiTTransformer2DModel.from_config(conf)
    if any(p.glob("*.safetensors")) or any(p.glob("*.bin")):
        return DiTTransformer2DModel.from_pretrained(str(p))
    return DiTTransformer2DModel.from_config(conf)


def _save_train_state(out: Path, model, opt, step: int, cfg: TrainConfig) -> None:
    """Checkpoint: base model (diffusers), DiffCR parameters, optimizer state (safetensors +
    JSON, no pickle)."""
    import diffcr
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    base = copy.deepcopy(model)
    diffcr.save(base, out / "diffcr")
    diffcr.revert(base)
    base.save_pretrained(out / "model")
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, groups = {}, []
    for gi, g in enumerate(opt.param_groups):
        groups.append({k: v for k, v in g.items() if k != "params"}
                      | {"params": [names[id(p)] for p in g["params"]]})
        for p in g["params"]:
            for k, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v):
                    tensors[f"{names[id(p)]}::{k}"] = v.detach().cpu().contiguous()
    save_file(tensors, str(out / "optimizer.safetensors"))
    (out / "train_state.json").write_text(json.dumps(
        {"step": step, "param_groups": groups, "config": asdict(cfg)}, indent=2, default=str))


def _load_train_state(path: Path, model, opt) -> int:
    from safetensors.torch import load_file

    state = json.loads((path / "train_state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    params = dict(model.named_parameters())
    for g, saved in zip(opt.param_groups, state["param_groups"]):
        for p, name in zip(g["params"], saved["params"]):
            if params.get(name) is not p:
                raise TrainError(f"--resume {path}: optimizer groups do not match the model "
                                 f"({name})")
            st = {}
            for key, v in tensors.items():
                pname, k = key.split("::")
                if pname == name:
                    st[k] = v.to(p.device)
            if st:
                opt.state[p] = st
    return int(state["step"])


def run_train(cfg: TrainConfig) -> dict:
    """DiffCR fine-tuning of a class-conditional diffusers DiT on an image folder."""
    import diffcr
    from .image_folder import load_image_folder

    cfg.validate()
    if cfg.model is None or cfg.data is None:
        raise TrainError("real training needs both --model and --data (run `diffcr train` "
                         "without them for the embedded demo)")
    from .text_train import has_captions, is_pipeline_folder, run_text_train

    if is_pipeline_folder(cfg.model):
        return run_text_train(cfg)
    if has_captions(cfg.data):
        raise TrainError(f"--data {cfg.data} has captions (metadata.jsonl): --model must be a "
                         "diffusers pipeline folder (model_index.json, transformer/, "
                         "text_encoder/, tokenizer/, vae/)")
    if cfg.lora_rank:
        raise TrainError("--lora-rank is for captioned fine-tuning of a pipeline folder")
    if cfg.frames is not None:
        raise TrainError("--frames is for captioned video clips of a video pipeline folder")
    if cfg.expert:
        raise TrainError("--expert is for captioned fine-tuning of a two-expert pipeline "
                         "folder (Wan 2.2 A14B)")
    if cfg.fsdp:
        raise TrainError("--fsdp is for captioned fine-tuning of a pipeline folder (the "
                         "class-conditional DiTs this path trains fit one device: use DDP)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    ddp = None
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) \
        if torch.cuda.is_available() else torch.device("cpu")
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model).to(dev)
    try:
        images, labels, classes = load_image_folder(cfg.data, model.config.sample_size
                                                    * (8 if cfg.vae else 1))
    except (FileNotFoundError, ValueError) as e:
        raise TrainError(str(e)) from e
    if cfg.vae:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(cfg.vae).to(dev).eval()
        with torch.no_grad():
            images = torch.cat([vae.encode(images[i:i + 32].to(dev)).latent_dist.sample()
                                * vae.config.scaling_factor for i in range(0, len(images), 32)])
        images = images.cpu()
    if images.shape[1] != model.config.in_channels:
        raise TrainError(f"--model expects {model.config.in_channels} input channels but the "
                         f"data has {images.shape[1]} (pass --vae for a latent-space model)")
    ncls = model.config.num_embeds_ada_norm
    if ncls is not None and len(classes) > ncls:
        raise TrainError(f"--data has {len(classes)} classes but the model embeds {ncls}")
    if world > 1:  # shard the data: each rank trains on its own slice
        images, labels = images[rank::world], labels[rank::world]
    if cfg.grad_ckpt:
        model.enable_gradient_checkpointing()
    conv = cfg.diffcr_config()
    start = 0
    if cfg.resume:
        model = load_model(str(Path(cfg.resume) / "model")).to(dev)
        if cfg.grad_ckpt:
            model.enable_gradient_checkpointing()
        diffcr.load(model, Path(cfg.resume) / "diffcr")
    else:
        diffcr.convert(model, conv)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda"
                                      else None)
    opt = torch.optim.AdamW(_param_groups(model, cfg), weight_decay=0.0)
    if cfg.resume:
        start = _load_train_state(Path(cfg.resume), model, opt)
    steps = cfg.steps or 1000
    out = Path(cfg.out)

    def on_step(step, o):
        if rank == 0 and cfg.save_every and step % cfg.save_every == 0 and step < steps:
            _save_train_state(out / f"step-{step}", model, o, step, cfg)

    opt, last = _train(model, images, labels, steps, cfg, "DiffCR fine-tuning", ratio_loss=True,
                       gen_seed=cfg.seed + rank, ddp=ddp, opt=opt, start_step=start,
                       on_step=on_step)
    metrics = {"steps": steps, "last": last, "world_size": world,
               "mean_kept_ratio": float(diffcr.ratio_table(model)[1].mean()),
               "target_kept_ratio": conv.target_kept_ratio}
    if world > 1:
        import torch.distributed as dist

        flat = torch.cat([p.detach().flatten().cpu().double() for p in
                          diffcr.router_parameters(model) + diffcr.ratio_parameters(model)])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        metrics["ddp_params_identical_across_ranks"] = all(torch.equal(gathered[0], g)
                                                           for g in gathered[1:])
    if rank == 0:
        _save_train_state(out, model, opt, steps, cfg)
        diffcr.freeze(model)
        diffcr.save(model, out / "diffcr-frozen")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return metrics
