"""``diffcr train --model DIT --data IMAGES``: DiffCR fine-tuning of a class-conditional
diffusers ``DiTTransformer2DModel`` (folder or config JSON) on an image folder (one subfolder
per class), pixel space or through a VAE, resumable, single process or under ``torchrun``
(DDP).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import torch

from .core import (atomic_file, atomic_folder, claim_out, find_resume, param_groups,
                   prune_states, write_checkpoints)
from .ddpm import load_model, train_loop
from .image_folder import load_image_folder
from .options import TrainConfig, TrainError
from .parallel import Torchrun

__all__ = ["run_class_train", "save_train_state", "load_train_state", "STATE_MARKER"]

#: the file that makes a folder a complete resumable state (written last)
STATE_MARKER = "train_state.json"
#: the random state of every process, by rank (states written before it have none)
RNG_FILE = "rng.safetensors"


def load_rng_state(path: Path, rank: int, world: int) -> Optional[dict]:
    """This process's random state in the state folder ``path`` (None, with a warning, when
    the state has none for it: written before they were saved, or by another world size)."""
    from safetensors.torch import load_file

    f = path / RNG_FILE
    tensors = load_file(str(f)) if f.is_file() else {}
    ranks = {int(k.split("::")[0]) for k in tensors}
    if len(ranks) != world:
        warnings.warn(f"--resume {path}: no random state for {world} process(es) in it; the "
                      "resumed run draws other batches and noise than an uninterrupted one",
                      stacklevel=2)
        return None
    return {k.split("::")[1]: v for k, v in tensors.items() if k.startswith(f"{rank}::")}


def save_train_state(out: Path, model, opt, step: int, cfg: TrainConfig,
                     frozen: bool = False, rngs: Optional[List[dict]] = None) -> None:
    """A resumable checkpoint in ``out``: the base model (diffusers) and DiffCR parameters
    (:func:`~diffcr.app.core.write_checkpoints`; ``frozen``: also the frozen form), the
    optimizer state, the random state of every process (``rngs``, by rank:
    :func:`~diffcr.app.ddpm.rng_state_of`) and the step (safetensors + JSON, no pickle)."""
    from safetensors.torch import save_file

    write_checkpoints(model, out, frozen=frozen)
    if rngs is not None:
        rng = {f"{r}::{k}": v.contiguous() for r, st in enumerate(rngs) for k, v in st.items()}
        atomic_file(out / RNG_FILE, lambda tmp: save_file(rng, str(tmp)))
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, groups = {}, []
    for gi, g in enumerate(opt.param_groups):
        groups.append({k: v for k, v in g.items() if k != "params"}
                      | {"params": [names[id(p)] for p in g["params"]]})
        for p in g["params"]:
            for k, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v):
                    tensors[f"{names[id(p)]}::{k}"] = v.detach().cpu().contiguous()
    atomic_file(out / "optimizer.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    # last: the marker that makes the folder a complete state
    atomic_file(out / STATE_MARKER, lambda tmp: tmp.write_text(json.dumps(
        {"step": step, "param_groups": groups, "config": asdict(cfg)}, indent=2,
        default=str)))


def load_train_state(path: Path, model, opt) -> int:
    """The optimizer state :func:`save_train_state` wrote into ``opt``; returns its step."""
    from safetensors.torch import load_file

    state = json.loads((path / STATE_MARKER).read_text())
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


def run_class_train(cfg: TrainConfig) -> dict:
    """DiffCR fine-tuning of a class-conditional diffusers DiT (``cfg.model``) on an image
    folder (``cfg.data``, one subfolder per class), single process or one of several under
    ``torchrun`` (DDP). Returns the metrics (also written to ``OUT/metrics.json``)."""
    cfg.validate().refuse_unused("class")
    with claim_out(cfg):
        return _run_class_train(cfg)


def _run_class_train(cfg: TrainConfig) -> dict:
    import diffcr

    procs = Torchrun()
    dev, rank, world = procs.device, procs.rank, procs.world
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
    resume = find_resume(cfg.resume, Path(cfg.out), STATE_MARKER)
    if resume is not None:
        model = load_model(str(resume / "model")).to(dev)
        if cfg.grad_ckpt:
            model.enable_gradient_checkpointing()
        diffcr.load(model, resume / "diffcr")
    else:
        diffcr.convert(model, conv)
    if cfg.cache_refresh:  # cache-aware fine-tuning: the token cache in the loop
        diffcr.enable_token_cache(model, diffcr.TokenCacheConfig(refresh_every=cfg.cache_refresh))
    teacher = None
    if cfg.distill:  # the dense teacher: the model as given, before conversion, frozen
        teacher = load_model(cfg.model).to(dev).eval().requires_grad_(False)
    opt = torch.optim.AdamW(param_groups(model, cfg), weight_decay=0.0)
    net, opt = procs.prepare(model, opt)
    rng = None
    if resume is not None:
        start = load_train_state(resume, model, opt)
        rng = load_rng_state(resume, rank, world)
    steps = cfg.steps or 1000
    out = Path(cfg.out)

    def on_step(step, o, rngs):
        if cfg.save_every and step % cfg.save_every == 0 and step < steps:
            states = procs.gather_objects(rngs())  # every process's random state
            if procs.is_main:
                # complete or absent: written aside, renamed into place (a kill mid-write
                # leaves the previous states as they were)
                with atomic_folder(out / f"step-{step}") as tmp:
                    save_train_state(tmp, model, o, step, cfg, rngs=states)
                prune_states(out, STATE_MARKER, cfg.keep_last)

    opt, last = train_loop(model, images, labels, steps, cfg, "DiffCR fine-tuning",
                           ratio_loss=True, gen_seed=cfg.seed + rank, net=net, opt=opt,
                           start_step=start, on_step=on_step, teacher=teacher,
                           rng_state=rng)
    metrics = {"steps": steps, "last": last, "world_size": world,
               "mean_kept_ratio": float(diffcr.ratio_table(model)[1].mean()),
               "target_kept_ratio": conv.target_kept_ratio}
    if procs.replicated():
        metrics["ddp_params_identical_across_ranks"] = procs.identical(
            diffcr.router_parameters(model) + diffcr.ratio_parameters(model))
    if procs.is_main:
        save_train_state(out, model, opt, steps, cfg, frozen=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    procs.close()
    return metrics
