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
    #: captioned fine-tuning: tokens per caption (None: 300 above 512 px, else 120, as PixArt)
    max_length: Optional[int] = None
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
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise TrainError("--mixed-precision must be no, bf16 or fp16")
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

    def diffcr_config(self, regions: Optional[int] = None, **kw) -> DiffCRConfig:
        return DiffCRConfig(bins=self.bins or DEFAULT_BINS,
                            num_regions=self.regions if regions is None else regions,
                            target_kept_ratio=round(1.0 - self.compression, 6), lam=self.lam,
                            num_train_timesteps=1000, **kw)


# ------------------------------------------------------------------------------ basics
def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def diffusion_loss(model, sched, x0, labels, gen: Optional[torch.Generator] = None,
                   t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None):
    """Epsilon-prediction MSE at uniformly drawn timesteps (or the given ``t``/``noise``)."""
    B = x0.shape[0]
    if t is None:
        t = torch.randint(0, sched.config.num_train_timesteps, (B,), generator=gen,
                          device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    xt = sched.add_noise(x0, noise, t)
    pred = model(xt, timestep=t, class_labels=labels).sample[:, : x0.shape[1]]
    return F.mse_loss(pred.float(), noise.float())


@torch.no_grad()
def sample_images(model, labels, num_classes: int, channels: int, size: int, steps: int = 25,
                  guidance: float = 2.0, seed: int = 0, batch: int = 128) -> torch.Tensor:
    """DDIM sampling with classifier-free guidance (null class = ``num_classes``)."""
    from diffusers import DDIMScheduler

    dev = next(model.parameters()).device
    out = []
    for i in range(0, labels.numel(), batch):
        lab = labels[i:i + batch].to(dev)
        n = lab.numel()
        sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              clip_sample=True)
        sched.set_timesteps(steps)
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


def _train(model, x_all, y_all, steps: int, cfg: TrainConfig, desc: str, ratio_loss: bool,
           train_base: bool = True, gen_seed: int = 0, ddp=None, opt=None, start_step: int = 0,
           on_step=None):
    """The training loop shared by the demo and real use. Returns (optimizer, last losses)."""
    import diffcr

    sched = _scheduler()
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
    for step in range(start_step, steps):
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
        scaler.step(opt)
        scaler.update()
        last = {"loss": loss.item()}
        if (ratio_loss and diffcr.is_converted(module)
                and not diffcr.routing_state(module).frozen):
            last["kept"] = diffcr.mean_kept_ratio(module).item()
        bar.update(**last)
        if on_step is not None:
            on_step(step + 1, opt)
    bar.close()
    return opt, last


@torch.no_grad()
def heldout_loss(model, x0, labels, seed: int = 123, batch: int = 256) -> float:
    """Denoising loss on a fixed held-out set of (image, timestep, noise) triplets."""
    sched = _scheduler()
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
                                 sample_size=size, patch_size=4,
                                 num_embeds_ada_norm=num_classes)


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


def run_demo(cfg: TrainConfig) -> dict:
    """The embedded end-to-end demo; writes the outputs to ``cfg.out`` and returns metrics."""
    import diffcr
    from .demo import (class_accuracy, classifier_fid, make_shapes, train_classifier,
                       plot_ratio_heatmap, plot_router_maps, plot_samples)
    from .demo.data import CLASS_NAMES, NUM_CLASSES

    t_start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    quick = cfg.quick
    size = 32
    n_train = 2000 if quick else 8000
    dense_steps = 30 if quick else (cfg.steps or 1400)
    ft_steps = 10 if quick else max(50, (cfg.steps or 1400) // 4)
    n_gen = 24 if quick else 240
    sample_steps = 4 if quick else 20
    timings = {}

    def log(msg):
        if cfg.progress:
            print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)

    # 1. data and the evaluation classifier
    x_tr, y_tr = make_shapes(n_train, size=size, seed=cfg.seed)
    x_te, y_te, m_te = make_shapes(512 if not quick else 96, size=size, seed=cfg.seed + 1,
                                   return_masks=True)
    t0 = time.time()
    clf = train_classifier(x_tr, y_tr, NUM_CLASSES, steps=40 if quick else 300, seed=cfg.seed)
    timings["classifier_s"] = time.time() - t0
    clf_acc = class_accuracy(clf, x_te, y_te)
    log(f"data: {n_train} shapes ({NUM_CLASSES} classes); evaluation classifier held-out "
        f"accuracy {clf_acc:.3f}")

    # 2. dense pre-training
    dense = _demo_model(size, NUM_CLASSES)
    t0 = time.time()
    _train(dense, x_tr, y_tr, dense_steps, dataclass_replace(cfg, lr=1e-3),
           "dense pre-training", ratio_loss=False, gen_seed=cfg.seed)
    timings["dense_pretrain_s"] = time.time() - t0
    log(f"dense DiT ({sum(p.numel() for p in dense.parameters()) / 1e6:.2f} M params, "
        f"{(size // 4) ** 2} tokens) trained {dense_steps} steps")

    # 3. variants at the same target compression, fine-tuned from the dense model
    kept = 1.0 - cfg.compression
    variants = {}
    ft_cfg = dataclass_replace(cfg, lr=3e-4)

    def finetune(name, conv_cfg, fixed: Optional[float], ratio: bool):
        m = copy.deepcopy(dense)
        if conv_cfg is not None:
            diffcr.convert(m, conv_cfg)
            if fixed is not None:
                with torch.no_grad():
                    for b in diffcr.routed_blocks(m).values():
                        b.ratio.kept.fill_(fixed)
                diffcr.freeze(m)
        t0 = time.time()
        _train(m, x_tr, y_tr, ft_steps, ft_cfg, f"fine-tune {name}", ratio_loss=ratio,
               gen_seed=cfg.seed + 11)
        timings[f"finetune_{name}_s"] = time.time() - t0
        if conv_cfg is not None and not diffcr.routing_state(m).frozen:
            diffcr.freeze(m)
        variants[name] = m
        log(f"fine-tuned {name} ({ft_steps} steps)")

    finetune("dense", None, None, False)
    finetune("DiffCR-LT", cfg.diffcr_config(), None, True)
    finetune("DiffCR-L", cfg.diffcr_config(regions=1), None, True)
    mod_bin = min(DiffCRConfig().bins, key=lambda b: abs(b - kept))
    finetune("MoD", cfg.diffcr_config(regions=1), mod_bin, False)
    finetune("random", cfg.diffcr_config(regions=1, selection="random"), mod_bin, False)

    # 4. evaluation
    metrics = {"target_compression": cfg.compression, "classifier_heldout_accuracy": clf_acc,
               "variants": {}}
    labels = torch.arange(NUM_CLASSES).repeat_interleave(max(1, n_gen // NUM_CLASSES))
    samples = {}
    x_speed = x_te[:64]
    y_speed = y_te[:64]
    t_dense = _speed(variants["dense"], x_speed, y_speed)
    for name, m in variants.items():
        row = {"heldout_denoising_loss": heldout_loss(m, x_te, y_te)}
        if diffcr.is_converted(m):
            idx, table = diffcr.ratio_table(m)
            frozen = torch.tensor([r.frozen_bins for r in
                                   diffcr.routing_state(m).blocks.values()])
            row["mean_kept_ratio"] = float(frozen.mean())
            row["mean_compression"] = 1 - float(frozen.mean())
            row["learned_kept_ratio_table"] = frozen.tolist()
            t = _speed(m, x_speed, y_speed)
            row["forward_ms_batch64"] = t * 1e3
            row["speedup_vs_dense"] = t_dense / t
        else:
            row["mean_kept_ratio"] = 1.0
            row["mean_compression"] = 0.0
            row["forward_ms_batch64"] = t_dense * 1e3
        imgs = sample_images(m, labels, NUM_CLASSES, 3, size, steps=sample_steps,
                             seed=cfg.seed + 99)
        samples[name] = imgs
        row["classifier_fid"] = classifier_fid(clf, x_te, imgs)
        row["class_accuracy"] = class_accuracy(clf, imgs, labels)
        metrics["variants"][name] = row
        log(f"evaluated {name}: loss {row['heldout_denoising_loss']:.4f}, "
            f"FID {row['classifier_fid']:.2f}, acc {row['class_accuracy']:.3f}")
    lt = variants["DiffCR-LT"]
    metrics["achieved_vs_target"] = {
        "target_kept_ratio": kept, "DiffCR-LT_kept_ratio":
            metrics["variants"]["DiffCR-LT"]["mean_kept_ratio"],
        "DiffCR-L_kept_ratio": metrics["variants"]["DiffCR-L"]["mean_kept_ratio"]}
    metrics["router_object_focus"] = {
        "DiffCR-LT": _object_focus(lt, x_te[:64], y_te[:64], m_te[:64]),
        "object_token_share": float(F.avg_pool2d(m_te[:64].float().unsqueeze(1), 4)
                                    .gt(0.25).float().mean())}

    # 5. outputs
    diffcr.save(lt, out / "diffcr")
    base = copy.deepcopy(lt)
    diffcr.revert(base)
    base.save_pretrained(out / "model")
    idx, table = diffcr.ratio_table(lt)
    frozen = torch.tensor([r.frozen_bins for r in diffcr.routing_state(lt).blocks.values()])
    plot_ratio_heatmap(frozen, idx, out / "ratios.png", 1000,
                       title="DiffCR-LT learned compression per block and timestep region")
    blocks = [0, len(idx) // 2, len(idx) - 1]
    maps = _router_maps(lt, x_te[:4], y_te[:4], blocks, [100, 500, 900])
    plot_router_maps(x_te[:4], maps, out / "router.png", [f"block {b}" for b in blocks],
                     ["t=100", "t=500", "t=900"])
    cols = torch.arange(NUM_CLASSES).repeat_interleave(2)
    pick = torch.cat([torch.nonzero(labels == c).flatten()[:2] for c in range(NUM_CLASSES)])
    plot_samples({k: samples[k][pick] for k in ("dense", "DiffCR-LT", "MoD", "random")},
                 out / "samples.png", class_names=CLASS_NAMES, labels=cols)
    timings["total_s"] = time.time() - t_start
    metrics["timings_s"] = timings
    metrics["settings"] = {"dense_steps": dense_steps, "finetune_steps": ft_steps,
                           "train_images": n_train, "image_size": size, "tokens": (size // 4) ** 2,
                           "generated_per_variant": int(labels.numel()),
                           "sampling_steps": sample_steps, "threads": torch.get_num_threads(),
                           "quick": quick}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def dataclass_replace(cfg: TrainConfig, **kw) -> TrainConfig:
    d = asdict(cfg)
    d.update(kw)
    return TrainConfig(**d)


def format_summary(metrics: dict) -> str:
    """The table printed at the end of ``diffcr train``."""
    lines = [f"{'variant':<11} {'kept':>6} {'compr.':>7} {'heldout loss':>13} {'cls-FID':>8} "
             f"{'class acc':>9} {'speedup':>8}"]
    for name, r in metrics["variants"].items():
        sp = r.get("speedup_vs_dense")
        lines.append(f"{name:<11} {r['mean_kept_ratio']:>6.3f} {100 * r['mean_compression']:>6.1f}% "
                     f"{r['heldout_denoising_loss']:>13.4f} {r['classifier_fid']:>8.2f} "
                     f"{r['class_accuracy']:>9.3f} {('%.2fx' % sp) if sp else '-':>8}")
    a = metrics["achieved_vs_target"]
    lines.append(f"target kept ratio {a['target_kept_ratio']:.3f}; achieved DiffCR-LT "
                 f"{a['DiffCR-LT_kept_ratio']:.3f}, DiffCR-L {a['DiffCR-L_kept_ratio']:.3f}")
    f = metrics.get("router_object_focus")
    if f:
        lines.append(f"router focus: {100 * f['DiffCR-LT']:.1f} % of the top tokens of block 0 "
                     f"lie on the object (object share of the image: "
                     f"{100 * f['object_token_share']:.1f} %)")
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
