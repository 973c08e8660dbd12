"""The class-conditional DiTs' training core (the demo's and ``diffcr train --model DIT``):
the DDPM training scheduler, the diffusion loss (with the dense teacher and cache-aware
fine-tuning: :func:`step_loss`), the training loop (:func:`train_loop`), the held-out loss,
loading a DiT (:func:`load_model`) and DDIM sampling with classifier-free guidance, which
resets the diffusers caches and the token cache attached to a model at the start of every
sampling loop (:func:`start_cache_run`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .core import BadSteps, Progress, ema_update, lr_factor, param_groups
from .options import TrainConfig, TrainError

__all__ = ["scheduler", "diffusion_loss", "step_loss", "heldout_loss", "sample_images",
           "start_cache_run", "train_loop", "load_model"]


def scheduler(prediction_type: str = "epsilon"):
    """The DDPM training scheduler of the class-conditional DiTs (cosine schedule)."""
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
def heldout_loss(model, x0, labels, seed: int = 123, batch: int = 256,
                 prediction_type: str = "epsilon") -> float:
    """Denoising loss on a fixed held-out set of (image, timestep, noise) triplets."""
    sched = scheduler(prediction_type)
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


@torch.no_grad()
def sample_images(model, labels, num_classes: int, channels: int, size: int, steps: int = 25,
                  guidance: float = 2.0, seed: int = 0, batch: int = 128,
                  prediction_type: str = "epsilon", init: Optional[torch.Tensor] = None,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DDIM sampling with classifier-free guidance (null class = ``num_classes``).

    ``labels`` int64 ``[n]``; returns float32 ``[n, channels, size, size]`` in [-1, 1]. Each
    batch of ``batch`` samples is one sampling loop (conditional and unconditional halves in
    one forward): diffusers caches attached to ``model`` are reset and their cache context
    opened at its start (:func:`start_cache_run`).

    Inpainting: with ``init`` (float ``[n, channels, size, size]`` in [-1, 1], the images) and
    ``mask`` (``[n, size, size]``, true / 1 = to inpaint), the loop blends as diffusers'
    inpaint pipelines do: after every step the pixels outside the mask are replaced by
    ``init`` noised to the next timestep (with one fixed noise per sample), and the result is
    ``init`` there exactly (``mask * x + (1 - mask) * init``)."""
    from diffusers import DDIMScheduler

    if (init is None) != (mask is None):
        raise ValueError("sample_images: inpainting needs both init and mask")
    if init is not None:
        want = (labels.numel(), channels, size, size)
        if tuple(init.shape) != want or tuple(mask.shape) != (want[0], size, size):
            raise ValueError(f"sample_images: init must be {list(want)} and mask "
                             f"{[want[0], size, size]}, got {list(init.shape)} and "
                             f"{list(mask.shape)}")
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
        if init is not None:
            x0 = init[i:i + batch].float().to(dev)
            keep = mask[i:i + batch].to(dev, torch.float32)[:, None]
            fixed = torch.randn(x0.shape, generator=g).to(dev)
        null = torch.full_like(lab, num_classes)
        ts = sched.timesteps
        for j, t in enumerate(ts):
            inp = torch.cat([x, x])
            tt = torch.full((2 * n,), int(t), device=dev)
            eps = model(inp, timestep=tt, class_labels=torch.cat([lab, null])).sample
            eps = eps[:, :channels]
            e_c, e_u = eps.chunk(2)
            x = sched.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
            if init is not None:
                known = x0 if j + 1 == len(ts) else sched.add_noise(x0, fixed, ts[j + 1:j + 2])
                x = keep * x + (1 - keep) * known
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)


def start_cache_run(model: torch.nn.Module, name: str = "cond") -> None:
    """Before a sampling loop: reset the token cache of a converted model
    (:func:`diffcr.reset_token_cache`) and every stateful diffusers hook of ``model``, and open
    the cache context ``name`` (what ``CacheMixin.cache_context`` does in a pipeline;
    ``DiTTransformer2DModel`` has no ``CacheMixin``). A no-op on a model without either."""
    import diffcr

    if diffcr.is_converted(model):
        diffcr.reset_token_cache(model)
    if not any("_diffusers_hook" in m.__dict__ for m in model.modules()):
        return
    from diffusers.hooks import hooks as H

    # the caches hook blocks, not always the model itself: the model's registry reaches them
    H.HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)
    if hasattr(H, "_set_cache_context") and hasattr(H, "CacheContext"):
        H._set_cache_context(model, H.CacheContext(name))
        return
    for m in model.modules():  # diffusers < 0.36: the context is a name
        r = m.__dict__.get("_diffusers_hook")
        for hook in (r.hooks.values() if r is not None else ()):
            for attr in vars(hook).values():
                if isinstance(attr, H.StateManager):
                    attr.set_context(name)


def step_loss(net, module, sched, x0, labels, gen: torch.Generator, cfg: TrainConfig,
              teacher: Optional[torch.nn.Module] = None) -> torch.Tensor:
    """The loss of one class-conditional batch: :func:`diffusion_loss`, plus

    * with ``cfg.distill`` and a ``teacher``: ``cfg.distill`` times the mean squared distance
      between the prediction and the teacher's on the same noisy input (the teacher without
      gradient);
    * with ``cfg.cache_refresh`` R (cache-aware fine-tuning, the token cache on ``module``):
      first, without gradient, the model at a noisier timestep of the same sample and noise,
      ``g * cfg.cache_spacing`` timesteps back (``g`` uniform in 1..R-1, the sampler steps
      since a refresh), fills the token cache as a refresh step (:func:`diffcr.fill_token_cache`),
      so the loss sees the skipped tokens' forecast.

    ``net`` is what is called for the loss (DDP-wrapped or not), ``module`` the model itself.
    Without either option this is exactly :func:`diffusion_loss` (same draws from ``gen``)."""
    if not ((cfg.distill and teacher is not None) or cfg.cache_refresh):
        return diffusion_loss(net, sched, x0, labels, gen)
    import diffcr

    B, T = x0.shape[0], sched.config.num_train_timesteps
    t = torch.randint(0, T, (B,), generator=gen, device=x0.device)
    noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    if cfg.cache_refresh:
        back = torch.randint(1, cfg.cache_refresh, (B,), generator=gen).to(x0.device)
        t_prev = (t + back * cfg.cache_spacing).clamp(max=T - 1)
        diffcr.fill_token_cache(module, sched.add_noise(x0, noise, t_prev), timestep=t_prev,
                                class_labels=labels)
    xt = sched.add_noise(x0, noise, t)
    pred = net(xt, timestep=t, class_labels=labels).sample[:, : x0.shape[1]]
    target = noise if sched.config.prediction_type == "epsilon" else \
        sched.get_velocity(x0, noise, t)
    loss = F.mse_loss(pred.float(), target.float())
    if cfg.distill and teacher is not None:
        with torch.no_grad():
            ref = teacher(xt, timestep=t, class_labels=labels).sample[:, : x0.shape[1]]
        loss = loss + cfg.distill * F.mse_loss(pred.float(), ref.float())
    return loss


def rng_state_of(gen: torch.Generator) -> dict:
    """The random state of a class-conditional run: its data/noise generator and torch's
    global generators (DiT drops class labels with those), as uint8 tensors by name."""
    out = {"data": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict, gen: torch.Generator) -> None:
    """Restore what :func:`rng_state_of` returned."""
    gen.set_state(state["data"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def train_loop(model, x_all, y_all, steps: int, cfg: TrainConfig, desc: str, ratio_loss: bool,
           train_base: bool = True, gen_seed: int = 0, net=None, opt=None, start_step: int = 0,
           on_step=None, ema: Optional[torch.nn.Module] = None,
           teacher: Optional[torch.nn.Module] = None, rng_state: Optional[dict] = None):
    """The class-conditional training loop (the demo's and ``diffcr train --model DIT``):
    ``steps`` AdamW steps on batches of ``cfg.batch`` drawn from ``x_all``/``y_all`` (from
    ``start_step``), with the diffusion loss plus, with ``ratio_loss`` on a converted, unfrozen
    model, the ratio loss. Returns (optimizer, last losses).

    ``net``: the module the loop calls, ``model`` as its strategy wrapped it
    (:meth:`~diffcr.app.parallel.Strategy.prepare`; default ``model``);
    ``on_step(step, opt, rngs)``: called after every step, ``rngs`` a callable returning the
    random state a resumed run needs (:func:`rng_state_of`); ``rng_state``: such a state to
    continue from (a resumed run: the same draws as the run that was not interrupted).

    ``ema``: a copy of the model (same parameter order) updated after every step with
    ``cfg.ema_decay`` (:func:`ema_update`); ``teacher``: the dense model of ``cfg.distill``
    (:func:`step_loss`, which also runs cache-aware fine-tuning with ``cfg.cache_refresh``)."""
    import diffcr

    sched = scheduler(cfg.prediction_type)
    module = model
    net = model if net is None else net
    if opt is None:
        opt = torch.optim.AdamW(param_groups(module, cfg, train_base), weight_decay=0.0)
    if diffcr.is_converted(module) and any(g.get("name") == "ratio" for g in opt.param_groups):
        diffcr.attach_ratio_projection(opt, module)
    net.train()
    g = torch.Generator().manual_seed(gen_seed)
    if rng_state is not None:
        set_rng_state(rng_state, g)
    n = x_all.shape[0]
    dev = next(module.parameters()).device
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    scaler = torch.amp.GradScaler(dev.type, enabled=cfg.mixed_precision == "fp16")
    bar = Progress(steps - start_step, desc, cfg.progress)
    last = {}
    guard = BadSteps(cfg.max_bad_steps)
    base_lr = [g["lr"] for g in opt.param_groups]
    for step in range(start_step, steps):
        f = lr_factor(step, steps, cfg.warmup)
        for grp, lr in zip(opt.param_groups, base_lr):
            grp["lr"] = lr * f
        idx = torch.randint(0, n, (cfg.batch,), generator=g)
        x0 = x_all[idx].to(dev)
        y = y_all[idx].to(dev)
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            loss = step_loss(net, module, sched, x0, y, g, cfg, teacher)
            total = loss
            if (ratio_loss and diffcr.is_converted(module)
                    and not diffcr.routing_state(module).frozen):
                rl = diffcr.ratio_loss(module)
                total = loss + rl
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        params = [p for g in opt.param_groups for p in g["params"]]
        scaler.unscale_(opt)
        # the gradient norm (clipped with --grad-clip): a non-finite loss or gradient skips
        # the step, so no weight (and no checkpoint) is ever written from it
        norm = torch.nn.utils.clip_grad_norm_(
            params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        bad = not math.isfinite(total.item())
        if not scaler.is_enabled():  # fp16: the scaler skips inf gradients and rescales itself
            bad = bad or not math.isfinite(float(norm))
        if guard.check(bad, step + 1):
            opt.zero_grad(set_to_none=True)
            scaler.update()
            continue
        scaler.step(opt)
        scaler.update()
        if ema is not None:
            ema_update(ema, module, cfg.ema_decay, step)
        last = {"loss": loss.item(), "skipped_steps": guard.skipped}
        if (ratio_loss and diffcr.is_converted(module)
                and not diffcr.routing_state(module).frozen):
            last["kept"] = diffcr.mean_kept_ratio(module).item()
        bar.update(**last)
        if on_step is not None:
            on_step(step + 1, opt, lambda: rng_state_of(g))
    bar.close()
    for grp, lr in zip(opt.param_groups, base_lr):
        grp["lr"] = lr
    return opt, last


def load_model(path: str):
    """A ``DiTTransformer2DModel`` from a diffusers folder (its weights) or a config JSON
    (random init); :class:`TrainError` for anything else."""
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
