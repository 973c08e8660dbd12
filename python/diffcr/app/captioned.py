"""Text-conditioned DiffCR fine-tuning (``diffcr train --model PIPELINE --data CAPTIONED``).

- **Data**: an image folder with captions in the diffusers / ``datasets`` ImageFolder
  convention: ``metadata.jsonl``, one JSON object per line with ``file_name`` (relative to the
  folder) and ``text``. Images of any size are converted to RGB, resized so the shorter side is
  the model's pixel size (bicubic) and center-cropped to a square. The video pipelines also
  take a folder of clips (:mod:`.video`): the first ``--frames`` frames of each, every frame
  treated as an image is.
- **Model**: a diffusers pipeline folder (``model_index.json``, ``transformer/``, its text
  encoders and tokenizers, ``vae/``, ``scheduler/``). Supported now: PixArt-α/Σ, SD3/SD3.5,
  Flux.1, Qwen-Image, HunyuanVideo and Wan 2.1/2.2 (a two-expert Wan 2.2 A14B one expert per
  run, ``--expert``);
  what differs per pipeline (encoding, latents, loss, sampling arguments) is its recipe in
  :mod:`.recipes` (one file per pipeline family).
- **Caches**: the captions are encoded once with the pipeline's own text encoders and written
  to ``OUT/cache/text-<hash>.safetensors`` (the recipe's tensors, and under ``null.`` those of
  the empty caption for caption dropout); the images are encoded once with the VAE into
  ``OUT/cache/latents-<hash>.safetensors``. The text encoder and VAE leave memory before
  training starts. A rerun with the same data and encoders reuses the caches (the hash covers
  the captions, the file list and sizes, the encoder configs and the resolution).
- **LoRA** (``--lora-rank``, the paper's recipe: rank 32): peft LoRA on the routed blocks'
  attention and feed-forward layers, base weights frozen, routers and ratios fully trained;
  the adapter is saved in peft's format in ``OUT/lora`` beside the DiffCR checkpoints.
  Without it the base weights are trained in full and saved in ``OUT/model``.
- **Processes**: one strategy (:mod:`.parallel`): DDP under ``torchrun`` or ``accelerate
  launch --multi_gpu`` (accelerate wraps the model), or with ``--fsdp`` FSDP2 (every
  transformer block and the model sharded; accelerate then only runs the loop).
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .core import (BadSteps, Progress, atomic_file, claim_out, commit_folder, find_resume,
                   param_groups, prune_states, write_checkpoints)
from .image_folder import load_image
from .options import TrainConfig, TrainError
from .parallel import strategy_for
from .recipes import Batch, expert_of, pipeline_parts
from .video import frame_count, is_video, load_clip

__all__ = ["read_captions", "run_captioned_train"]


def read_captions(root) -> List[Tuple[Path, str]]:
    """``[(image path, caption)]`` from ``root/metadata.jsonl``; :class:`TrainError` naming the
    file and line for anything malformed, missing or duplicated."""
    root = Path(root)
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise TrainError(f"--data {root}: no metadata.jsonl (captioned data: one JSON object per "
                         'line, {"file_name": "a.png", "text": "a caption"})')
    out, seen = [], set()
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise TrainError(f"{meta}:{n}: not valid JSON ({e})") from e
        if not isinstance(row, dict):
            raise TrainError(f"{meta}:{n}: expected a JSON object, got {type(row).__name__}")
        name, text = row.get("file_name"), row.get("text")
        if not isinstance(name, str) or not name:
            raise TrainError(f"{meta}:{n}: no \"file_name\" string")
        if not isinstance(text, str):
            raise TrainError(f"{meta}:{n}: no \"text\" string for {name}")
        path = (root / name)
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise TrainError(f"{meta}:{n}: file_name {name!r} must be relative to the folder")
        if not path.is_file():
            raise TrainError(f"{meta}:{n}: caption for a missing file {name!r}")
        if name in seen:
            raise TrainError(f"{meta}:{n}: {name!r} is listed twice")
        seen.add(name)
        out.append((path, text))
    if not out:
        raise TrainError(f"{meta}: no captions")
    return out


def _check_images(paths) -> None:
    """Every image opens (before any cache is written): TrainError naming the first that
    does not."""
    from PIL import Image

    for p in paths:
        try:
            with Image.open(p) as im:
                im.verify()
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise TrainError(f"cannot read image {str(p)!r}: {e}") from e


def _quiet_loaders() -> None:
    """No loading bars from transformers / diffusers (``--no-progress``)."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def _hash(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _encode_text(recipe, folder: Path, captions: List[str], max_length: int, dev,
                 progress: bool):
    """The recipe's conditioning of every caption, and under ``null.<name>`` of the empty
    caption (caption dropout)."""
    out = recipe.encode(folder, list(captions) + [""], dev, max_length, progress)
    text = {k: v[:-1] for k, v in out.items()}
    text.update({f"null.{k}": v[-1:] for k, v in out.items()})
    return text


def _check_media(recipe, folder: Path, data: Path, paths, frames):
    """Before anything is written: every image opens, or (video data) every clip is long
    enough for the clip length, which the VAE can compress. Returns the clip length in frames
    (None for images)."""
    clips = [p for p in paths if is_video(p)]
    if not clips:
        if frames is not None:
            raise TrainError(f"--frames {frames}: --data {data} holds images; --frames is for "
                             "video clips")
        _check_images(paths)
        return None
    if len(clips) != len(paths):
        image = next(p for p in paths if not is_video(p))
        raise TrainError(f"--data {data}: mixes video clips ({clips[0].name}) and images "
                         f"({image.name}); one kind per folder")
    if not recipe.video:
        raise TrainError(f"--data {data}: video clips, but {recipe.model_class} is an image "
                         "model (clips train the video pipelines: Wan, HunyuanVideo)")
    frames = frames or recipe.default_frames
    step = recipe.frame_step(folder)
    if (frames - 1) % step:
        k = max(1, round((frames - 1) / step))
        raise TrainError(f"--frames {frames}: the VAE compresses time {step}x, so a clip is "
                         f"1 + {step}k frames (e.g. {1 + step * k})")
    for p in clips:
        n = frame_count(p)
        if n < frames:
            raise TrainError(f"video {p.name} has {n} frames; training takes the first "
                             f"{frames} of each clip (--frames)")
    return frames


@torch.no_grad()
def _encode_images(recipe, folder: Path, paths, pixels: int, dev, progress: bool,
                   frames=None):
    """The cached latents of the images (batches of 8) or, with ``frames``, of the first
    ``frames`` frames of each clip (one clip at a time)."""
    vae = recipe.vae(folder).to(dev).eval()
    # one draw from each latent distribution, seeded: the cache is the same whoever makes it
    gen = torch.Generator(dev).manual_seed(0)
    out = []
    per = 1 if frames else 8
    bar = Progress((len(paths) + per - 1) // per, "encoding clips" if frames else
                    "encoding images", progress)
    for i in range(0, len(paths), per):
        try:
            x = torch.stack([load_clip(p, frames, pixels) if frames else load_image(p, pixels)
                             for p in paths[i:i + per]]).to(dev)
        except ValueError as e:
            raise TrainError(str(e)) from e
        out.append(recipe.latents(vae, x, gen).float().cpu())
        bar.update()
    bar.close()
    del vae
    gc.collect()
    return torch.cat(out)


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _cached(path: Path, make):
    """The tensors in ``path``, made by ``make()`` and written there first if it is missing."""
    from safetensors.torch import load_file, save_file

    if path.is_file() or make is None:
        return load_file(str(path))
    tensors = {k: v.contiguous() for k, v in make().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    return tensors


#: the file that makes a folder a complete resumable state (written last, after the
#: strategy's state and the user-facing checkpoints)
STATE_MARKER = "loop_state.json"


class _Teacher:
    """``--distill``: records every call of the model inside a recipe's loss (a forward hook
    on the model, which DDP and FSDP2 call too) and gives the mean squared distance between
    those predictions and the dense teacher's on the same inputs. The teacher is the model
    itself inside :func:`diffcr.dense_teacher` (LoRA: the same frozen base weights with the
    adapters off, every block dense) or, with ``frozen``, a frozen copy from before
    conversion (full fine-tuning)."""

    def __init__(self, model, frozen=None):
        self.model, self.frozen, self.calls = model, frozen, []
        self._on = False
        self.handle = model.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output):
        if self._on and torch.is_grad_enabled():  # not the token cache's fill
            self.calls.append((args, kwargs, output))

    @staticmethod
    def _pred(out) -> torch.Tensor:
        return out.sample if hasattr(out, "sample") else out[0]

    def loss_of(self, recipe, batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(recipe loss, distance to the teacher)`` of one micro-batch."""
        import diffcr
        import torch.nn.functional as F

        self.calls.clear()
        self._on = True
        try:
            loss = recipe.loss(batch)
        finally:
            self._on = False
        if not self.calls:
            raise TrainError("--distill: the recipe's loss did not call the model")
        refs = []
        with torch.no_grad():  # the teacher's predictions on the same inputs
            for args, kwargs, _ in self.calls:
                if self.frozen is not None:
                    refs.append(self._pred(self.frozen(*args, **kwargs)).float())
                else:
                    with diffcr.dense_teacher(self.model):
                        refs.append(self._pred(self.model(*args, **kwargs)).float())
        dist = sum(F.mse_loss(self._pred(out).float(), ref)
                   for (_, _, out), ref in zip(self.calls, refs)) / len(refs)
        self.calls.clear()
        return loss, dist


class _LoopState:
    """What accelerate's checkpoint does not hold: the step and the data generator (so a
    resumed run draws the same batches, timesteps and noise as an uninterrupted one)."""

    def __init__(self, seed: int):
        self.step = 0
        self.world = 1
        self.gen = torch.Generator().manual_seed(seed)

    def state_dict(self):
        return {"step": self.step, "world": self.world, "gen": self.gen.get_state()}

    def load_state_dict(self, state):
        self.step, self.world = int(state["step"]), int(state["world"])
        self.gen.set_state(state["gen"])


def _write_outputs(model, out: Path, lora_rank: int, state: Optional[str],
                   expert: Optional[str] = None) -> None:
    """The main process's part of a save: the DiffCR checkpoints (training and frozen form),
    the LoRA adapter or the base model; with ``state`` (the strategy's ``state_kind``: how the
    resumable state was written) the marker of a resumable folder."""
    write_checkpoints(model, out, lora=bool(lora_rank), frozen=True)
    if state:  # last: the marker that makes the folder a complete state
        atomic_file(out / STATE_MARKER, lambda tmp: tmp.write_text(json.dumps(
            {"written_by": "diffcr train", "state": state, "expert": expert})))


def run_captioned_train(cfg: TrainConfig, return_model: bool = False):
    """Captioned DiffCR fine-tuning of a diffusers pipeline's transformer (see the module
    docstring). Returns the metrics (also written to ``OUT/metrics.json``), and the trained
    (unfrozen) model with ``return_model``."""
    cfg.validate().refuse_unused("captioned")
    with claim_out(cfg):
        return _run_captioned_train(cfg, return_model)


def _run_captioned_train(cfg: TrainConfig, return_model: bool = False):
    import diffcr
    import diffusers

    folder, data, out = Path(cfg.model), Path(cfg.data), Path(cfg.out)
    part, levels = expert_of(folder, _json(folder / "model_index.json"), cfg.expert)
    index, tconf, recipe = pipeline_parts(folder, part)
    if cfg.inpaint and recipe.video:
        raise TrainError(f"--inpaint is for image pipelines; {recipe.family} is a video "
                         "pipeline (mask-aware routing needs one image grid)")
    strategy_class = strategy_for(cfg)
    resume = find_resume(cfg.resume, out, STATE_MARKER)
    if resume is not None:
        saved = _json(resume / STATE_MARKER)
        if saved.get("state", "accelerate") != strategy_class.state_kind:
            raise TrainError(f"--resume {resume}: saved " + (
                "with --fsdp: resume with --fsdp" if not cfg.fsdp else
                "without --fsdp: resume without it"))
        if saved.get("expert") != cfg.expert:
            raise TrainError(f"--resume {resume}: saved by a run of --expert "
                             f"{saved.get('expert')}, resumed with --expert {cfg.expert}")
    pairs = read_captions(data)
    frames = _check_media(recipe, folder, data, [p for p, _ in pairs], cfg.frames)
    try:
        from accelerate import Accelerator
    except ImportError as e:
        raise TrainError("captioned fine-tuning needs accelerate: pip install "
                         "'diffcr[train]'") from e
    if not cfg.progress:
        _quiet_loaders()
    # one process, or several under `accelerate launch` or `torchrun` (accelerate reads
    # either's environment)
    try:
        acc = Accelerator(mixed_precision=cfg.mixed_precision,
                          gradient_accumulation_steps=cfg.grad_accum,
                          cpu=not torch.cuda.is_available())
    except (ValueError, RuntimeError) as e:  # e.g. fp16 without a GPU
        raise TrainError(f"accelerate: {e}") from e
    dev, rank, world = acc.device, acc.process_index, acc.num_processes
    strategy = strategy_class(acc)
    pixels = recipe.pixels(folder, tconf, cfg.resolution)
    max_length = recipe.max_length(pixels, cfg.max_length)
    files = [(str(p.relative_to(data)), p.stat().st_size) for p, _ in pairs]
    enc_conf = {part: _json(folder / part / "config.json") for part in recipe.parts}
    cache = out / "cache"
    text_key = _hash(recipe.model_class, [t for _, t in pairs], enc_conf, max_length)
    text_file = cache / f"text-{text_key}.safetensors"
    lat_file = cache / f"latents-{_hash(files, enc_conf.get('vae'), pixels, frames)}.safetensors"
    if acc.is_main_process:  # the main process builds the caches, the others then read them
        _cached(text_file, lambda: _encode_text(recipe, folder, [t for _, t in pairs],
                                                max_length, dev, cfg.progress))
        _cached(lat_file, lambda: {"latents": _encode_images(
            recipe, folder, [p for p, _ in pairs], pixels, dev, cfg.progress, frames)})
    acc.wait_for_everyone()
    text, lat = _cached(text_file, None), _cached(lat_file, None)
    latents = lat["latents"]
    cond = {k: v for k, v in text.items() if not k.startswith("null.")}
    null = {k: text[f"null.{k}"] for k in cond}

    torch.manual_seed(cfg.seed)
    tdir = folder / part
    klass = getattr(diffusers, recipe.model_class)
    conv = cfg.diffcr_config()
    lora_rank = cfg.lora_rank

    def build(weights: bool = False):
        """The converted model (with its LoRA adapter), the pipeline's weights or (for an
        unsharded copy that a state dict will fill) random ones."""
        saved = weights and (any(tdir.glob("*.safetensors")) or any(tdir.glob("*.bin")))
        m = klass.from_pretrained(str(tdir)) if saved else klass.from_config(tconf)
        diffcr.convert(m, conv)
        if lora_rank:
            try:
                diffcr.add_lora(m, rank=lora_rank)
            except diffcr.LoraError as e:
                raise TrainError(str(e)) from e
        return m

    model = build(True).to(dev)
    if cfg.grad_ckpt:
        model.enable_gradient_checkpointing()
    if cfg.cache_refresh:  # cache-aware fine-tuning: the token cache in the loop
        diffcr.enable_token_cache(model, diffcr.TokenCacheConfig(refresh_every=cfg.cache_refresh))
    strategy.shard(model)
    sched = recipe.scheduler(folder)
    if world > 1:  # each process trains on its slice of the data
        shard = slice(rank, None, world)
        latents = latents[shard]
        cond = {k: v[shard] for k, v in cond.items()}
    opt = torch.optim.AdamW(param_groups(model, cfg), weight_decay=0.0)
    diffcr.attach_ratio_projection(opt, model)
    loop = _LoopState(cfg.seed + rank)
    net, opt = strategy.prepare(model, opt, loop)

    def save(where: Path, state: bool) -> None:
        final = where
        if state:  # complete or absent: every process writes into a hidden sibling, which
            # the main process renames into place once all of it is on disk
            where = where.parent / f".{where.name}.tmp"
            if acc.is_main_process:
                shutil.rmtree(where, ignore_errors=True)  # a killed run's leftover
                where.mkdir(parents=True)
            acc.wait_for_everyone()
            strategy.save_state(where, model, opt, loop)
        whole = strategy.whole_model(model, build)
        if acc.is_main_process:
            _write_outputs(whole, where, lora_rank, strategy.state_kind if state else None,
                           cfg.expert)
            if state:
                commit_folder(where, final)
        acc.wait_for_everyone()

    if resume is not None:
        strategy.load_state(resume, model, opt, loop)
        if loop.world != world:
            raise TrainError(f"--resume {resume}: saved by {loop.world} processes, resumed by "
                             f"{world}")
    teacher = None
    if cfg.distill:
        frozen = None
        if not lora_rank:  # full fine-tuning: a frozen copy of the weights before conversion
            saved = any(tdir.glob("*.safetensors")) or any(tdir.glob("*.bin"))
            frozen = (klass.from_pretrained(str(tdir)) if saved else klass.from_config(tconf))
            frozen = frozen.to(dev).eval().requires_grad_(False)
        teacher = _Teacher(model, frozen)
    steps = cfg.steps or 1000
    drop = float(cfg.caption_dropout)
    g = loop.gen
    bar = Progress(steps - loop.step, "DiffCR fine-tuning" + (
        f" (LoRA r={lora_rank})" if lora_rank else ""), cfg.progress and acc.is_main_process)
    net.train()
    last = {}
    guard = BadSteps(cfg.max_bad_steps)
    bad = False
    loop.world = world
    while loop.step < steps:
        for _ in range(cfg.grad_accum):  # one optimizer step
            idx = torch.randint(0, latents.shape[0], (cfg.batch,), generator=g)
            x0 = latents[idx].to(dev)
            dropped = torch.rand(cfg.batch, generator=g) < drop
            c = {}
            for k, v in cond.items():
                c[k] = v[idx].clone()
                c[k][dropped] = null[k].to(v.dtype)
            batch = Batch(net=net, model=model, sched=sched, x0=x0, cond=c, gen=g, device=dev,
                          levels=levels, cache_refresh=cfg.cache_refresh,
                          cache_spacing=cfg.cache_spacing, inpaint=cfg.inpaint)
            with acc.accumulate(net), acc.autocast():
                if teacher is None:
                    loss = recipe.loss(batch)
                    total = loss
                else:
                    loss, dist = teacher.loss_of(recipe, batch)
                    total = loss + cfg.distill * dist
                acc.backward(total + diffcr.ratio_loss(model))
                bad = bad or not math.isfinite(float(total.detach()))
                skip = False
                if acc.sync_gradients:  # every process decides alike (one gather per step)
                    skip = bool(acc.gather(torch.tensor([float(bad)], device=dev)).max() > 0)
                if not skip:
                    opt.step()
                opt.zero_grad(set_to_none=True)
        loop.step += 1
        guard.check(skip, loop.step)  # nothing was applied from a skipped step
        bad = False
        last = {"loss": loss.item(), "kept": diffcr.mean_kept_ratio(model).item(),
                "skipped_steps": guard.skipped}
        if teacher is not None:
            last["distill"] = float(dist.detach())
        bar.update(**last)
        if cfg.save_every and loop.step % cfg.save_every == 0 and loop.step < steps:
            save(out / f"step-{loop.step}", state=True)
            if acc.is_main_process:
                prune_states(out, STATE_MARKER, cfg.keep_last)
            acc.wait_for_everyone()
    bar.close()
    # the timestep regions this run's noise levels fall in (all but for one expert of two);
    # the others keep their initial ratios and are left out of the mean
    R = conv.num_regions
    served = list(range(conv.region_of_level(levels[0]),
                        min(R, math.ceil(levels[1] * R - 1e-9)) if levels[1] < 1.0 else R))
    metrics = {"steps": steps, "last": last, "world_size": world, "lora_rank": lora_rank,
               "frames": frames or 1, "mixed_precision": acc.mixed_precision,
               "parallel": strategy.name, "grad_accum": cfg.grad_accum, "images": len(pairs),
               "distill": cfg.distill, "cache_refresh": cfg.cache_refresh,
               "inpaint": cfg.inpaint, "teacher": None if teacher is None else (
                   "frozen copy" if teacher.frozen is not None else "adapters off, dense"),
               "mean_kept_ratio": float(diffcr.ratio_table(model)[1][:, served].mean()),
               "expert": cfg.expert, "noise_levels": list(levels), "regions_trained": served,
               "target_kept_ratio": conv.target_kept_ratio,
               "trainable_parameters": sum(p.numel() for p in model.parameters()
                                           if p.requires_grad)}
    if strategy.replicated():
        metrics["ddp_params_identical_across_ranks"] = strategy.identical(
            diffcr.router_parameters(model) + diffcr.ratio_parameters(model)
            + diffcr.lora_parameters(model))
    save(out, state=False)
    if acc.is_main_process:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    acc.wait_for_everyone()
    acc.end_training()
    return (metrics, model) if return_model else metrics
