"""``diffcr train`` with no model or data: the embedded end-to-end demo (:func:`run_demo`).

A procedurally generated shape data set, a small pixel-space DiT (the shipped dense checkpoint,
or trained here), then DiffCR-LT (timestep regions), DiffCR-L (one region), uniform MoD and
random token selection fine-tuned from it at the same target compression, compared with the
diffusers caches by held-out denoising loss, classifier-FID and class accuracy of samples and
the measured speedup of each sampling loop, then an inpainting task with mask-aware routing,
with plots (learned ratios, router maps, samples, the trade-off, inpainting).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

from ...config import DiffCRConfig
from ..core import Progress, write_checkpoints
from ..ddpm import heldout_loss, sample_images, scheduler, train_loop
from ..options import TrainConfig
from .classifier import train_classifier
from .compare import Method, compare_methods, frontier, spread
from .data import CLASS_NAMES, NUM_CLASSES, make_shapes
from .metrics import class_accuracy
from .peers import CacheSetting, cache_available
from .plots import plot_ratio_heatmap, plot_router_maps, plot_samples, plot_tradeoff

__all__ = ["run_demo", "format_summary", "format_markdown", "shipped_dense_path",
           "load_shipped_dense", "init_dit_weights_", "pretrain_dense", "continue_dense"]


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

    sched = scheduler()
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


#: the demo's recipe (why each choice: docs/demo.md, "How the dense DiT was made to draw")
DEMO_RECIPE = dict(prediction_type="v_prediction", grad_clip=1.0)
DEMO_PRETRAIN = dict(lr=1e-3, warmup=100, ema_decay=0.999)
#: fine-tuning: a short warm-up then cosine decay to 0 over the fine-tuning steps, and the
#: ratios' learning rate high enough that they travel from 1 to their target within the
#: 100 steps (the measurements behind it: docs/demo.md)
DEMO_FINETUNE = dict(lr=2e-4, warmup=10, ema_decay=0.99, lr_ratio=6e-2)
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
DEMO_FINETUNE_STEPS = 100
#: samples per class and sampling seed of the comparison
DEMO_PER_CLASS = 14
#: DDIM steps and guidance scale of every demo sampling loop
DEMO_SAMPLING = dict(steps=20, guidance=2.0)
#: the diffusers caches of the comparison (FirstBlockCache thresholds, TaylorSeer intervals)
DEMO_CACHES = (("fbc", 0.2), ("taylorseer", 3))
#: DiffCR-LT stacked with these caches
DEMO_STACKS = (("taylorseer", 3),)
#: weight of the dense teacher (``--distill``) of the "+teacher" variant
DEMO_DISTILL = 1.0
#: the token-cache variants: their target compression (below DiffCR-LT's: the cache makes up
#: for the skipped tokens), the refresh interval they are fine-tuned for and the intervals
#: they are sampled with (the operating points), and the cache (order 0, the plain block at
#: refresh steps)
DEMO_TC_COMPRESSION = 0.7
DEMO_TC_REFRESH = 4
DEMO_TC_POINTS = (4, 8)
DEMO_TC_CACHE = dict(order=0, plain_refresh=True)
#: the names of the variants
DEMO_LT, DEMO_TEACHER = "DiffCR-LT", "DiffCR-LT +teacher"
DEMO_LOW = f"DiffCR-LT kept {1 - DEMO_TC_COMPRESSION:.1f}"
DEMO_TC = f"DiffCR-LT-TC kept {1 - DEMO_TC_COMPRESSION:.1f}"
#: the inpainting task: held-out images (their shapes erased), the context kept ratios of
#: DiffCR-LT with mask-aware routing, and the token-dilation of the routing mask
DEMO_INPAINT_IMAGES = 48
DEMO_INPAINT_CONTEXT = (None, 0.25)
DEMO_INPAINT_MARGIN = 0


def shipped_dense_path() -> Path:
    """Folder of the dense demo DiT shipped with diffcr (diffusers format + ``training.json``,
    which says how it was trained)."""
    return Path(__file__).parent / "dense_dit"


def pretrain_dense(cfg: TrainConfig, x_tr, y_tr, steps: int):
    """Train the demo's dense DiT from scratch with the demo recipe; returns the EMA copy
    (trainable, train mode)."""
    torch.manual_seed(cfg.seed)
    dense = _demo_model(x_tr.shape[-1], NUM_CLASSES)
    init_dit_weights_(dense)
    ema = copy.deepcopy(dense).requires_grad_(False)
    train_loop(dense, x_tr, y_tr, steps, cfg.replace(**DEMO_RECIPE, **DEMO_PRETRAIN),
           "dense pre-training", ratio_loss=False, gen_seed=cfg.seed, ema=ema)
    return ema.requires_grad_(True).train()


def continue_dense(cfg: TrainConfig, dense, x_tr, y_tr, steps: int):
    """A further pre-training stage of ``dense`` with :data:`DEMO_CONTINUE`; returns the EMA
    copy (started from ``dense``), trainable and in train mode."""
    dense = dense.float().train().requires_grad_(True)
    ema = copy.deepcopy(dense).requires_grad_(False)
    train_loop(dense, x_tr, y_tr, steps, cfg.replace(**DEMO_RECIPE, **DEMO_CONTINUE),
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
    # low_cpu_mem_usage=False: diffusers would otherwise warn that accelerate is missing
    return DiTTransformer2DModel.from_pretrained(str(p), low_cpu_mem_usage=False).float().train()


def _demo_sampler(quick: bool):
    steps = 4 if quick else DEMO_SAMPLING["steps"]

    def sampler(model, labels, seed: int, init=None, mask=None):
        return sample_images(model, labels, NUM_CLASSES, 3, DEMO_SIZE, steps=steps,
                             guidance=DEMO_SAMPLING["guidance"], seed=seed, batch=256,
                             prediction_type=DEMO_RECIPE["prediction_type"], init=init,
                             mask=mask)
    return sampler


def run_demo(cfg: TrainConfig) -> dict:
    """The embedded end-to-end demo; writes the outputs to ``cfg.out`` and returns metrics.

    1. data (procedural shapes) and the evaluation classifier;
    2. the dense DiT: the shipped checkpoint, or trained here with ``cfg.from_scratch``
       (``cfg.pretrain_only`` stops after it and writes it to ``OUT/dense``);
    3. fine-tuned from it for the same number of steps with the same recipe (the dense model
       itself is compared as it is): DiffCR-LT at the target, the same with a dense teacher
       (:data:`DEMO_DISTILL`), DiffCR-LT at the lower kept ratio of the token-cache variants
       (:data:`DEMO_TC_COMPRESSION`) and the same fine-tuned with the token cache in the loop
       (cache-aware, :data:`DEMO_TC_REFRESH`), and uniform MoD;
    4. one comparison on the same seeds and sampler: the dense model and the variants, the
       low-kept DiffCR-LT with the token cache bolted on and the cache-aware variant at the
       refresh intervals :data:`DEMO_TC_POINTS`, the diffusers caches on the dense model
       (:data:`DEMO_CACHES`) and DiffCR stacked with a cache (:data:`DEMO_STACKS`), each with
       the measured speedup of its sampling loop, class accuracy and classifier-FID per seed
       (:func:`~diffcr.app.demo.compare.compare_methods`), and which rows are on the
       quality-vs-speed frontier;
    5. inpainting (:func:`_inpainting`): held-out images with their shape erased, drawn again
       by the dense model, DiffCR-LT with and without mask-aware routing, the cache-aware
       variant with it, and the caches; class accuracy, masked-region error, speedup;
    6. ``metrics.json``, ``comparison.md``, ``ratios.png``, ``router.png``, ``samples.png``,
       ``tradeoff.png``, ``inpaint.png``.
    """
    import diffcr

    cfg.validate().refuse_unused("demo")
    t_start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    quick = cfg.quick
    size = DEMO_SIZE
    n_train = 2000 if quick else 8000
    ft_steps = 8 if quick else (cfg.steps or DEMO_FINETUNE_STEPS)
    per_class = 2 if quick else DEMO_PER_CLASS
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
    ft_cfg = cfg.replace(**DEMO_RECIPE, **DEMO_FINETUNE)

    def finetune(name, conv_cfg, fixed: Optional[float], ratio: bool, distill: float = 0.0,
                 cache_refresh: int = 0):
        m = copy.deepcopy(dense)
        if conv_cfg is not None:
            diffcr.convert(m, conv_cfg)
            if fixed is not None:
                with torch.no_grad():
                    for b in diffcr.routed_blocks(m).values():
                        b.ratio.kept.fill_(fixed)
                diffcr.freeze(m)
        if cache_refresh:  # cache-aware: the token cache in the loop
            diffcr.enable_token_cache(m, diffcr.TokenCacheConfig(refresh_every=cache_refresh,
                                                                 **DEMO_TC_CACHE))
        ema = copy.deepcopy(m).requires_grad_(False)
        t0 = time.time()
        train_loop(m, x_tr, y_tr, ft_steps, ft_cfg.replace(distill=distill,
                                                           cache_refresh=cache_refresh),
                   f"fine-tune {name}", ratio_loss=ratio, gen_seed=cfg.seed + 11, ema=ema,
                   teacher=dense if distill else None)
        timings[f"finetune_{name}_s"] = time.time() - t0
        if conv_cfg is not None and not diffcr.routing_state(ema).frozen:
            diffcr.freeze(ema)
        variants[name] = ema.eval()
        log(f"fine-tuned {name} ({ft_steps} steps)")

    finetune(DEMO_LT, cfg.diffcr_config(), None, True)
    finetune(DEMO_TEACHER, cfg.diffcr_config(), None, True, distill=DEMO_DISTILL)
    low = cfg.diffcr_config(kept=1 - DEMO_TC_COMPRESSION)
    finetune(DEMO_LOW, low, None, True)
    finetune(DEMO_TC, low, None, True, cache_refresh=DEMO_TC_REFRESH)
    mod_bin = min(DiffCRConfig().bins, key=lambda b: abs(b - kept))
    finetune("MoD", cfg.diffcr_config(regions=1), mod_bin, False)

    # 4. one comparison: trained variants, caches on dense, DiffCR + cache
    def kept_of(m):
        return float(torch.tensor([r.frozen_bins for r in
                                   diffcr.routing_state(m).blocks.values()]).mean())

    methods = {}
    for name, m in variants.items():
        if name == DEMO_TC:
            continue  # sampled with its cache below
        kr = kept_of(m) if diffcr.is_converted(m) else 1.0
        methods[name] = Method(m, "dense" if name == "dense" else "diffcr", kr,
                               heldout_loss(m, x_te, y_te, prediction_type=pred))

    def with_token_cache(m, refresh, **extra):
        m = copy.deepcopy(m)
        diffcr.enable_token_cache(m, diffcr.TokenCacheConfig(
            refresh_every=refresh, **{**DEMO_TC_CACHE, **extra}))
        return m

    # the same cache bolted onto the low-kept DiffCR-LT (fine-tuned without it), and the
    # cache-aware variant at each refresh interval
    first = DEMO_TC_POINTS[0]
    methods[f"{DEMO_LOW} + token cache /{first}"] = Method(
        with_token_cache(variants[DEMO_LOW], first), "diffcr+tokencache",
        kept_of(variants[DEMO_LOW]))
    for refresh in DEMO_TC_POINTS[:1] if quick else DEMO_TC_POINTS:
        methods[f"{DEMO_TC} /{refresh}"] = Method(
            with_token_cache(variants[DEMO_TC], refresh), "diffcr+tokencache",
            kept_of(variants[DEMO_TC]))
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
        methods[f"{DEMO_LT} + {s.label}"] = Method(
            s.apply(copy.deepcopy(variants[DEMO_LT])), "diffcr+cache",
            methods[DEMO_LT].kept_ratio)
    if skipped:
        log(f"not in this diffusers, left out of the comparison: {sorted(set(skipped))}")
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    t0 = time.time()
    bar = Progress(len(methods) * len(seeds), "sampling every method", cfg.progress)
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
    for name in frontier(rows):
        rows[name]["on_frontier"] = True
    metrics = {"target_compression": cfg.compression, "classifier_heldout_accuracy": clf_acc,
               "dense_model": dense_source, "methods": rows}
    metrics["achieved_vs_target"] = {
        "target_kept_ratio": kept, "DiffCR-LT_kept_ratio": rows[DEMO_LT]["mean_kept_ratio"],
        "token_cache_target_kept_ratio": round(1 - DEMO_TC_COMPRESSION, 6),
        "token_cache_kept_ratio": kept_of(variants[DEMO_TC])}
    lt = variants[DEMO_LT]
    t0 = time.time()
    n_inp = 8 if quick else DEMO_INPAINT_IMAGES
    inpaint_rows, inpaint_samples = _inpainting(
        dense, variants, lt, x_te[:n_inp], y_te[:n_inp], m_te[:n_inp], clf, seeds, quick,
        with_token_cache, cfg.progress)
    timings["inpainting_s"] = time.time() - t0
    metrics["inpainting"] = {"images": n_inp, "methods": inpaint_rows,
                             "context_kept_ratios": list(DEMO_INPAINT_CONTEXT),
                             "margin_tokens": DEMO_INPAINT_MARGIN}
    metrics["router_object_focus"] = {
        "DiffCR-LT": _object_focus(lt, x_te[:64], y_te[:64], m_te[:64]),
        "object_token_share": float(F.avg_pool2d(m_te[:64].float().unsqueeze(1), DEMO_PATCH)
                                    .gt(0.25).float().mean())}

    # 6. outputs
    write_checkpoints(lt, out)
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
    shown = ["dense", DEMO_LT, DEMO_TEACHER, DEMO_LOW, f"{DEMO_TC} /{first}", "MoD"] + [
        n for n in ("FBC 0.1", "TaylorSeer /3", "DiffCR-LT + TaylorSeer /3") if n in samples]
    plot_samples({k: samples[k][pick] for k in shown}, out / "samples.png",
                 class_names=CLASS_NAMES, labels=labels[pick])
    plot_tradeoff(rows, out / "tradeoff.png")
    plot_samples(inpaint_samples, out / "inpaint.png", class_names=CLASS_NAMES,
                 labels=y_te[:min(n_inp, 10)])
    timings["total_s"] = time.time() - t_start
    metrics["timings_s"] = timings
    metrics["settings"] = {"finetune_steps": ft_steps, "train_images": n_train,
                           "image_size": size, "tokens": (size // DEMO_PATCH) ** 2,
                           "samples_per_seed": int(labels.numel()), "seeds": list(seeds),
                           "sampling_steps": 4 if quick else DEMO_SAMPLING["steps"],
                           "guidance": DEMO_SAMPLING["guidance"], "sampler": "DDIM",
                           "recipe": {**DEMO_RECIPE, "finetune": DEMO_FINETUNE,
                                      "distill": DEMO_DISTILL,
                                      "token_cache": {"compression": DEMO_TC_COMPRESSION,
                                                      "trained_refresh": DEMO_TC_REFRESH,
                                                      "refresh_points": list(DEMO_TC_POINTS),
                                                      **DEMO_TC_CACHE}},
                           "threads": torch.get_num_threads(), "quick": quick}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "comparison.md").write_text(format_markdown(metrics) + "\n")
    return metrics


def _inpainting(dense, variants, lt, images, labels, shapes, clf, seeds, quick,
                with_token_cache, progress: bool):
    """The inpainting comparison (:mod:`~diffcr.app.demo.inpaint`): each held-out image's
    shape erased and drawn again, by the dense model, DiffCR-LT with its own routing and with
    mask-aware routing at each of :data:`DEMO_INPAINT_CONTEXT`, the cache-aware token-cache
    variant with mask-aware routing, and the diffusers caches on the dense model. Returns
    (rows, picture rows)."""
    import contextlib

    import diffcr

    from .inpaint import ComputedShare, inpaint_regions, masked_error, masked_inputs

    regions = inpaint_regions(shapes)
    cfg_mask = torch.cat([regions, regions])  # the conditional and unconditional halves
    shares = {}

    def routed(name, model, masked=False, context=None):
        def ctx():
            stack = contextlib.ExitStack()
            if masked:
                stack.enter_context(diffcr.mask_routing(
                    model, cfg_mask, margin=DEMO_INPAINT_MARGIN, context_kept_ratio=context))
            shares.setdefault(name, []).append(
                stack.enter_context(ComputedShare(model, required=cfg_mask)))
            return stack
        return ctx

    methods = {"dense": Method(dense, "dense")}
    methods[DEMO_LT] = Method(lt, "diffcr", context=routed(DEMO_LT, lt))
    for r in DEMO_INPAINT_CONTEXT[-1:] if quick else DEMO_INPAINT_CONTEXT:
        name = f"{DEMO_LT} + mask" + ("" if r is None else f", context {r:g}")
        methods[name] = Method(lt, "diffcr", context=routed(name, lt, True, r))
    tc = with_token_cache(variants[DEMO_TC], DEMO_TC_POINTS[0])
    name = f"{DEMO_TC} /{DEMO_TC_POINTS[0]} + mask"
    methods[name] = Method(tc, "diffcr+tokencache", context=routed(name, tc, True))
    for kind, value in DEMO_CACHES:
        if cache_available(kind):
            s = CacheSetting(kind, value)
            methods[s.label] = Method(s.apply(copy.deepcopy(dense)), "cache")
    base = _demo_sampler(quick)

    def sampler(model, labs, seed):
        return base(model, labs, seed, init=images, mask=regions)

    bar = Progress(len(methods) * len(seeds), "inpainting", progress)
    rows = compare_methods(methods, sampler, clf, images, labels, seeds,
                           progress=lambda name, seed, dt: bar.update(method=name),
                           scores={"masked_error": lambda x: masked_error(x, images,
                                                                          regions)})
    bar.close()
    show = min(images.shape[0], 10)
    pictures = {"original": images[:show], "to inpaint": masked_inputs(images, regions)[:show]}
    for name, r in rows.items():
        pictures[name] = r.pop("samples")[:show]
        if name in shares:  # the share of token-blocks computed, over both seeds
            r["mean_kept_ratio"] = (sum(c.computed for c in shares[name])
                                    / sum(c.total for c in shares[name]))
            # the share of the masked token-blocks a routed block skipped (0 with the mask)
            r["masked_tokens_skipped"] = (sum(c.missed for c in shares[name])
                                          / sum(c.required for c in shares[name]))
    for name in frontier(rows):
        rows[name]["on_frontier"] = True
    return rows, pictures


def _save_sampling_config(folder: Path, prediction_type: str) -> None:
    """Write the DDIM scheduler the model samples with next to it (``scheduler_config.json``),
    so that ``diffcr generate`` uses the right prediction type."""
    from diffusers import DDIMScheduler

    DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                  clip_sample=True, prediction_type=prediction_type).save_config(str(folder))


def format_summary(metrics: dict) -> str:
    """The table printed at the end of ``diffcr train`` (one row per method of the comparison;
    ``+-`` is half the range over the sampling seeds; ``*``: on the quality-vs-speed
    frontier)."""
    width = max(26, *(len(n) + 2 for n in metrics["methods"]))
    lines = [f"{'method':<{width}} {'kept':>5} {'heldout loss':>12} {'class acc':>13} "
             f"{'cls-FID':>13} {'speedup':>8}"]
    for name, r in metrics["methods"].items():
        hl = r.get("heldout_denoising_loss")
        acc = f"{r['class_accuracy']:.3f}+-{spread(r['class_accuracy_per_seed']):.3f}"
        fid = f"{r['classifier_fid']:.1f}+-{spread(r['classifier_fid_per_seed']):.1f}"
        mark = "* " if r.get("on_frontier") else "  "
        lines.append(f"{mark + name:<{width}} {r['mean_kept_ratio']:>5.3f} "
                     f"{('%.4f' % hl) if hl is not None else '-':>12} {acc:>13} {fid:>13} "
                     f"{r['speedup_vs_dense']:>7.2f}x")
    lines.append("* = on the frontier: no other row is both as accurate and as fast")
    inp = metrics.get("inpainting")
    if inp:
        lines.append("")
        lines.append(f"inpainting ({inp['images']} held-out images, each shape erased and "
                     "drawn again; kept = share of token-blocks computed, mask skipped = share "
                     "of the masked ones skipped)")
        lines.append(f"{'method':<{width}} {'kept':>5} {'mask skipped':>12} {'class acc':>13} "
                     f"{'masked MSE':>13} {'speedup':>8}")
        for name, r in inp["methods"].items():
            acc = f"{r['class_accuracy']:.3f}+-{spread(r['class_accuracy_per_seed']):.3f}"
            err = f"{r['masked_error']:.3f}+-{spread(r['masked_error_per_seed']):.3f}"
            mark = "* " if r.get("on_frontier") else "  "
            skip = r.get("masked_tokens_skipped")
            skip = "-" if skip is None else f"{100 * skip:.1f} %"
            lines.append(f"{mark + name:<{width}} {r['mean_kept_ratio']:>5.3f} {skip:>12} "
                         f"{acc:>13} {err:>13} {r['speedup_vs_dense']:>7.2f}x")
        lines.append("")
    a = metrics["achieved_vs_target"]
    lines.append(f"target kept ratio {a['target_kept_ratio']:.3f}, achieved by DiffCR-LT "
                 f"{a['DiffCR-LT_kept_ratio']:.3f}; token-cache variants: target "
                 f"{a['token_cache_target_kept_ratio']:.3f}, achieved "
                 f"{a['token_cache_kept_ratio']:.3f}")
    f = metrics.get("router_object_focus")
    if f:
        lines.append(f"router focus: {100 * f['DiffCR-LT']:.1f} % of the top tokens of block 0 "
                     f"lie on the object (object share of the image: "
                     f"{100 * f['object_token_share']:.1f} %)")
    return "\n".join(lines)


def _markdown_table(methods: dict, columns) -> List[str]:
    """A Markdown table of one row per method (``methods``: name -> its record); ``columns``:
    ``(header, cell)`` pairs, ``cell(record)`` the cell's text. The columns every table of the
    demo shares come first (kept ratio) and last (:data:`_TIMING_COLUMNS`)."""
    columns = [("kept ratio", lambda r: f"{r['mean_kept_ratio']:.3f}"), *columns,
               *_TIMING_COLUMNS]
    lines = ["| method | " + " | ".join(h for h, _ in columns) + " |",
             "|" + "---|" * (len(columns) + 1)]
    for name, r in methods.items():
        lines.append(f"| {name} | " + " | ".join(cell(r) for _, cell in columns) + " |")
    return lines


def _spread_cell(key: str, fmt: str):
    """A quality cell: the mean +- half the range over the sampling seeds."""
    return lambda r: f"{r[key]:{fmt}} ± {spread(r[key + '_per_seed']):{fmt}}"


_TIMING_COLUMNS = [
    ("sampling loop", lambda r: f"{r['sampling_s_total']:.1f} s"),
    ("speedup vs dense", lambda r: f"{r['speedup_vs_dense']:.2f}×"),
    ("on the frontier", lambda r: "yes" if r.get("on_frontier") else ""),
]


def format_markdown(metrics: dict) -> str:
    """The comparison as a Markdown table (written to ``comparison.md`` by the demo): one row
    per method, quality as mean +- half the range over the sampling seeds."""
    st = metrics.get("settings", {})

    def heldout(r):
        hl = r.get("heldout_denoising_loss")
        return "-" if hl is None else f"{hl:.4f}"

    lines = _markdown_table(metrics["methods"], [
        ("held-out loss", heldout), ("class accuracy", _spread_cell("class_accuracy", ".3f")),
        ("classifier-FID", _spread_cell("classifier_fid", ".1f"))])
    if st:
        lines.append("")
        lines.append(f"{st.get('samples_per_seed')} samples per seed, seeds {st.get('seeds')}, "
                     f"{st.get('sampling_steps')} {st.get('sampler')} steps, guidance "
                     f"{st.get('guidance')}; sampling loop = total wall-clock time of both "
                     f"seeds on {st.get('threads')} thread(s). On the frontier: no other row "
                     "has both a class accuracy and a speedup at least as high (one of them "
                     "higher).")
    inp = metrics.get("inpainting")
    if inp:
        def skipped(r):
            skip = r.get("masked_tokens_skipped")
            return "" if skip is None else f"{100 * skip:.1f} %"

        lines += ["", f"Inpainting: {inp['images']} held-out images per seed, each image's "
                  "shape erased (its mask dilated by one pixel) and drawn again; quality "
                  "inside the mask. Kept ratio: the share of token-blocks the routed blocks "
                  "computed; masked skipped: the share of the masked token-blocks they "
                  "skipped.", ""]
        lines += _markdown_table(inp["methods"], [
            ("masked skipped", skipped),
            ("class accuracy", _spread_cell("class_accuracy", ".3f")),
            ("masked-region MSE", _spread_cell("masked_error", ".3f"))])
    return "\n".join(lines)
