"""The ``diffcr`` command line.

  diffcr info       versions, device, which kernel backends loaded (and why not)
  diffcr bench      dense vs routed block: time, speedup, ideal (method §6), peak memory
  diffcr train      the embedded end-to-end demo (no arguments), or DiffCR fine-tuning of a
                    diffusers DiT on an image folder (--model, --data); works under torchrun
  diffcr inspect    the learned ratio table of a DiffCR checkpoint
  diffcr generate   images from a DiT + DiffCR checkpoint
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
from typing import List, Optional

from .._version import __version__


def _version_of(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - report, never crash
        return f"not importable ({type(e).__name__})"
    return str(getattr(mod, "__version__", "unknown"))


def info_dict() -> dict:
    """Versions, device, and kernel backends (what loaded, and why not)."""
    import torch

    import diffcr_kernels
    from diffcr_kernels import _ext

    if torch.cuda.is_available():
        dev = {"type": "cuda", "name": torch.cuda.get_device_name(),
               "capability": ".".join(map(str, torch.cuda.get_device_capability()))}
    else:
        dev = {"type": "cpu", "name": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads()}
    return {
        "diffcr": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version_of("triton"),
        "diffusers": _version_of("diffusers"),
        "flash_attn": _version_of("flash_attn"),
        "device": dev,
        "extension": {"path": _ext.LIBRARY_PATH, "build": _ext.BUILD_INFO,
                      "error": _ext.LOAD_ERROR},
        "kernel_backends": diffcr_kernels.available_backends(),
        "attention_backends": diffcr_kernels.available_attention_backends(),
        "selected_backend": diffcr_kernels.current_backend(),
    }


def _print_info(d: dict) -> None:
    print(f"diffcr {d['diffcr']}  (python {d['python']})")
    print(f"torch {d['torch']} (cuda {d['torch_cuda']}), triton {d['triton']}, "
          f"diffusers {d['diffusers']}, flash-attn {d['flash_attn']}")
    dev = d["device"]
    extra = f"sm_{dev['capability'].replace('.', '')}" if dev["type"] == "cuda" else \
        f"{dev['threads']} threads"
    print(f"device: {dev['type']} {dev['name']} ({extra})")
    print(f"kernel backends (selected: {d['selected_backend']}):")
    for name, v in d["kernel_backends"].items():
        print(f"  {name:<10} {v['status']:<12} {v['detail']}")
    print("attention backends:")
    for name, v in d["attention_backends"].items():
        print(f"  {name:<14} {v}")


def _kappas(text: str) -> List[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--kappas must be comma-separated numbers, got {text!r}")
    if not vals or any(not (0 < v <= 1) for v in vals):
        raise argparse.ArgumentTypeError(f"--kappas must lie in (0, 1], got {text!r}")
    return vals


#: ``diffcr bench --model`` choices (``bench.KINDS``; spelled out here so that the parser does
#: not import torch)
BENCH_KINDS = ("pixart", "dit", "sd3", "flux", "flux-single", "wan", "wan-14b", "qwenimage",
               "hunyuanvideo")
#: the kinds whose N is video tokens: 4 latent frames of a square or whole 480p frames
#: (``bench.VIDEO_KINDS``)
BENCH_VIDEO_KINDS = ("wan", "wan-14b", "hunyuanvideo")


def _bench(args) -> int:
    import torch

    from . import bench

    if args.prepack and args.device != "cpu":
        print("diffcr bench: --prepack is for CPU runs (MKL-packed weights)", file=sys.stderr)
        return 2
    if args.prepack:
        from ..cpu import prepack_available

        if not prepack_available():
            print("diffcr bench: --prepack needs a torch build with MKL", file=sys.stderr)
            return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("diffcr bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.lora_rank < 0:
        print(f"diffcr bench: --lora-rank must be >= 0, got {args.lora_rank}", file=sys.stderr)
        return 2
    if args.lora_rank and args.no_training:
        print("diffcr bench: --lora-rank applies to the training step (drop --no-training)",
              file=sys.stderr)
        return 2
    video = args.model in BENCH_VIDEO_KINDS
    side = int(round(args.tokens ** 0.5))
    if video:
        try:
            bench._video_shape(args.tokens)
        except ValueError as e:
            print(f"diffcr bench: --tokens: {e}", file=sys.stderr)
            return 2
    elif side * side != args.tokens:
        print(f"diffcr bench: --tokens must be a square number, got {args.tokens}",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    common = dict(kind=args.model, N=args.tokens, B=args.batch, device=args.device, dtype=dtype)
    out = {"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
           "threads": args.threads, "torch": torch.__version__, "config": vars(args).copy()}
    out["config"].pop("func", None)
    out["blocks"] = bench.bench_blocks(kappas=args.kappas, rounds=args.rounds,
                                       prepack=args.prepack, naive=not args.no_naive, **common)
    if not args.no_overhead:
        out["overhead"] = bench.bench_overhead(rounds=max(3, args.rounds), **common)
    if not args.no_training:
        out["training"] = bench.bench_training(rounds=max(3, args.rounds - 1),
                                               lora_rank=args.lora_rank, **common)
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    print(f"diffcr bench: {bench.DESCRIPTIONS[args.model]}, {out['blocks'][0]['path']} path, "
          f"N={args.tokens}, B={args.batch}, {args.dtype}, {out['device']}"
          + (f", {args.threads} thread(s)" if args.device == "cpu" else ""))
    blocks = out["blocks"]
    if blocks and blocks[0]["prepacked"]:
        print("linear layers: MKL-prepacked weights in the dense, routed and naive blocks alike "
              "(--prepack off to compare without)")
    naive = bool(blocks) and "naive_ms" in blocks[0]
    hdr = f"{'kappa':>6} {'k':>6} {'dense ms':>10} {'routed ms':>10} {'speedup':>8} " \
          f"{'ideal':>7} {'of ideal':>9} {'peak MB':>8}"
    if naive:
        hdr += f" {'naive ms':>9} {'naive of ideal':>15}"
    print(hdr)
    for r in blocks:
        mem = "-" if r["peak_mem_MB"] is None else f"{r['peak_mem_MB']:.0f}"
        line = (f"{r['kappa']:>6.2f} {r['k']:>6d} {r['dense_ms']:>10.2f} {r['routed_ms']:>10.2f} "
                f"{r['speedup']:>8.2f} {r['ideal_speedup']:>7.2f} "
                f"{100 * r['fraction_of_ideal']:>8.1f}% {mem:>8}")
        if naive:
            line += f" {r['naive_ms']:>9.2f} {100 * r['naive_fraction_of_ideal']:>14.1f}%"
        print(line)
    print(f"(speedup and fraction of ideal: median over {args.rounds} interleaved rounds of "
          "dense/routed; naive = gather -> diffusers block -> scatter in plain torch)")
    if "overhead" in out:
        o = out["overhead"]
        print(f"routing overhead (score+select+gather+scatter, kappa {o['kappa']}): "
              f"{o['routing_ms']:.2f} ms = {100 * o['overhead_fraction']:.2f} % of the dense block")
    if "training" in out:
        t = out["training"]
        how = "fused, in one pass" if t["path"] == "fused" else "compat, one diffusers call per bin"
        if t["lora_rank"]:
            how += f", LoRA rank {t['lora_rank']} on frozen base weights"
        print(f"training step (fwd+bwd, two bins {t['bins'][0]:.2f}/{t['bins'][1]:.2f} {how}): "
              f"dense {t['dense_ms']:.1f} ms, DiffCR {t['routed_ms']:.1f} ms, "
              f"{100 * t['fraction_of_ideal']:.1f} % of the ideal for both branches")
    return 0


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (no usage dump) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _floats(text: str) -> List[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def _add_train(sub):
    p = sub.add_parser("train", help="embedded demo (no args) or fine-tuning (--model/--data)",
                       description="Without --model/--data: the embedded end-to-end demo "
                       "(procedural shapes, small DiT trained dense, then DiffCR-LT, DiffCR-L, "
                       "MoD and random selection compared). With them: DiffCR fine-tuning of "
                       "a diffusers DiTTransformer2DModel on an image folder (one subfolder per "
                       "class), or captioned fine-tuning of a PixArt, SD3, Flux.1, Qwen-Image, "
                       "Wan or HunyuanVideo pipeline folder (text embeddings and latents "
                       "cached, optional peft LoRA); run under torchrun or accelerate launch "
                       "for several processes (DDP, or FSDP2 with --fsdp).")
    p.add_argument("--model", help="diffusers DiT model folder, or its config JSON (random "
                   "init); or a diffusers pipeline folder (PixArt, SD3, Flux.1, Qwen-Image, "
                   "Wan, HunyuanVideo) for captioned fine-tuning")
    p.add_argument("--data", help="image folder, one subfolder per class; or with captions: "
                   "metadata.jsonl lines {\"file_name\": ..., \"text\": ...}")
    p.add_argument("--vae", help="AutoencoderKL folder for latent-space models")
    p.add_argument("--out", default="diffcr-out", help="output folder (default diffcr-out)")
    p.add_argument("--compression", type=float, default=0.5,
                   help="target compression = 1 - mean kept ratio (default 0.5)")
    p.add_argument("--regions", type=int, default=4, help="timestep regions R (default 4)")
    p.add_argument("--bins", type=_floats, default=None,
                   help="kept-ratio bins, comma-separated (default 0.1,...,1.0)")
    p.add_argument("--lam", type=float, default=0.3, help="ratio-loss weight (default 0.3)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of the base weights")
    p.add_argument("--lr-router", type=float, default=1e-3, help="learning rate of the routers")
    p.add_argument("--lr-ratio", type=float, default=1e-2, help="learning rate of the ratios")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (demo: fine-tuning steps of each variant, default 170; "
                        "with --pretrain-only: dense pre-training steps)")
    p.add_argument("--batch", type=int, default=32, help="batch size per process")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    p.add_argument("--resume", help="checkpoint folder written by a previous run")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="captioned fine-tuning: peft LoRA of this rank on the base weights "
                        "(the paper: 32; default 0 trains them in full)")
    p.add_argument("--caption-dropout", type=float, default=0.1,
                   help="captioned fine-tuning: share of empty captions (default 0.1)")
    p.add_argument("--resolution", type=int, default=None,
                   help="captioned fine-tuning: image size in pixels (default: the model's; "
                        "Flux 1024)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="captioned fine-tuning: micro-batches per optimizer step (default 1)")
    p.add_argument("--fsdp", action="store_true",
                   help="captioned fine-tuning: shard every transformer block (routers, ratios "
                        "and LoRA included) and the model with FSDP2 across the processes "
                        "instead of DDP; launch with torchrun or accelerate launch --multi_gpu")
    p.add_argument("--frames", type=int, default=None,
                   help="captioned fine-tuning on video clips (Wan, HunyuanVideo): frames from "
                        "the start of each clip, 1 + 4k (default: the pipeline's, 81 / 129)")
    p.add_argument("--expert", choices=("high", "low"), default=None,
                   help="captioned fine-tuning of a two-expert Wan 2.2 pipeline: train "
                        "transformer (high: noise levels from its boundary_ratio up) or "
                        "transformer_2 (low), one run each")
    p.add_argument("--max-length", type=int, default=None,
                   help="captioned fine-tuning: tokens per caption (default 300 above 512 px, "
                        "else 120)")
    p.add_argument("--quick", action="store_true",
                   help="demo only: tiny settings (seconds), for smoke tests")
    p.add_argument("--from-scratch", action="store_true",
                   help="demo only: train the dense DiT here (both stages of the shipped "
                        "checkpoint) instead of starting from it (about 50 min more on 2 CPU "
                        "cores)")
    p.add_argument("--pretrain-only", action="store_true",
                   help="demo only: train the dense DiT (--steps of them, default the shipped "
                        "checkpoint's) and write it to OUT/dense; nothing else")
    p.add_argument("--continue-from", metavar="FOLDER",
                   help="demo, with --pretrain-only: continue training this dense DiT folder "
                        "(one that --pretrain-only wrote) with the second-stage recipe instead "
                        "of starting from scratch (--steps default 6000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _train_cmd(args) -> int:
    import torch

    from .train import TrainConfig, TrainError, format_summary, run_demo, run_train

    cfg = TrainConfig(out=args.out, model=args.model, data=args.data, vae=args.vae,
                      compression=args.compression, regions=args.regions, bins=args.bins,
                      lam=args.lam, lr=args.lr, lr_router=args.lr_router,
                      lr_ratio=args.lr_ratio, steps=args.steps, batch=args.batch,
                      mixed_precision=args.mixed_precision, grad_ckpt=args.grad_ckpt,
                      resume=args.resume, seed=args.seed, save_every=args.save_every,
                      threads=args.threads, quick=args.quick, progress=not args.no_progress,
                      lora_rank=args.lora_rank, caption_dropout=args.caption_dropout,
                      max_length=args.max_length, grad_accum=args.grad_accum,
                      fsdp=args.fsdp, expert=args.expert, frames=args.frames,
                      resolution=args.resolution, from_scratch=args.from_scratch,
                      pretrain_only=args.pretrain_only, continue_from=args.continue_from)
    try:
        cfg.validate()
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.model is None and args.data is None:
            if args.resume or args.vae or args.fsdp or args.expert or args.frames:
                raise TrainError("--resume/--vae/--fsdp/--expert/--frames apply to real "
                                 "training (--model and --data)")
            metrics = run_demo(cfg)
            if metrics.get("pretrain_only"):
                print(f"dense DiT trained {metrics['steps']} steps in "
                      f"{metrics['seconds']:.0f} s: {metrics['out']}")
                return 0
            print(format_summary(metrics))
            print(f"outputs in {args.out}: diffcr/ (checkpoint), model/, ratios.png, "
                  "router.png, samples.png, tradeoff.png, metrics.json, comparison.md")
        else:
            metrics = run_train(cfg)
            if int(__import__("os").environ.get("RANK", "0")) == 0:
                print(f"trained {metrics['steps']} steps; mean kept ratio "
                      f"{metrics['mean_kept_ratio']:.3f} (target "
                      f"{metrics['target_kept_ratio']:.3f}); checkpoint in {args.out}")
    except TrainError as e:
        print(f"diffcr train: error: {e}", file=sys.stderr)
        return 2
    return 0


def _inspect_cmd(args) -> int:
    from pathlib import Path

    from ..io import CheckpointError, block_names, read_checkpoint

    try:
        meta, cfg, tensors = read_checkpoint(Path(args.checkpoint))
        names = block_names(meta, tensors)
        kept = {i: tensors[f"{n}.ratio.kept"].tolist() for i, n in names.items()}
    except CheckpointError as e:
        print(f"diffcr inspect: error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"diffcr inspect: error: {args.checkpoint} has no tensor {e}", file=sys.stderr)
        return 2
    frozen = meta.get("frozen_bins")
    sig = meta.get("model") or {}
    print(f"DiffCR checkpoint {args.checkpoint}: {sig.get('model_class', '?')}, "
          f"{sig.get('num_blocks', '?')} blocks, hidden {sig.get('hidden_size', '?')}, "
          f"{cfg.num_regions} regions, gate {cfg.gate}, target kept {cfg.target_kept_ratio}"
          f"{', frozen' if frozen else ''}")
    R, T = cfg.num_regions, cfg.timesteps
    head = ["block"] + [f"t<{(r + 1) * T / R:g}" if r < R - 1 else f"t>={r * T / R:g}"
                        for r in range(R)]
    what = "compression (1 - kept)" if args.compression else "kept ratio"
    print(f"{what} per block and timestep region" + (" (frozen bins)" if frozen else ""))
    print("  ".join(f"{h:>8}" for h in head))
    vals = []
    for i, row in kept.items():
        row = frozen[str(i)] if frozen else [min(max(v, cfg.min_bin), cfg.max_bin) for v in row]
        if args.compression:
            row = [1 - v for v in row]
        vals += row
        print("  ".join([f"{i:>8}"] + [f"{v:>8.3f}" for v in row]))
    print(f"mean {what}: {sum(vals) / max(1, len(vals)):.3f}")
    return 0


def _generate_arg_error(args) -> Optional[str]:
    """What is wrong with the arguments of ``diffcr generate`` (None: nothing), checked before
    any model is loaded or file written."""
    import math
    from pathlib import Path

    if args.per_class < 1:
        return f"--per-class must be >= 1, got {args.per_class}"
    if args.steps < 1:
        return f"--steps must be >= 1, got {args.steps}"
    if not math.isfinite(args.guidance) or args.guidance < 0:
        return f"--guidance must be a finite number >= 0, got {args.guidance}"
    if args.classes is not None and not args.classes:
        return "--classes is empty"
    if Path(args.out).exists() and not Path(args.out).is_dir():
        return f"--out {args.out} exists and is not a folder"
    from .text_train import is_pipeline_folder

    pipeline = is_pipeline_folder(args.model)
    if pipeline and not args.prompt:
        return "--model is a pipeline folder: give one or more --prompt"
    second = args.diffcr_2 or args.lora_2 or args.transformer_2
    if not pipeline and (args.prompt or args.lora or args.transformer or args.resolution
                         or second):
        return ("--prompt/--lora/--transformer/--resolution/--*-2 need --model to be a "
                "pipeline folder")
    if args.frames is not None and (args.frames < 1 or not pipeline):
        return "--frames must be >= 1, with a video pipeline folder (Wan, HunyuanVideo)"
    if second and not args.diffcr_2:
        return "--lora-2/--transformer-2 go with --diffcr-2 (the low-noise expert's checkpoint)"
    if args.prompt is not None and not all(p.strip() for p in args.prompt):
        return "--prompt is empty"
    for name in ("model", "diffcr", "vae", "lora", "transformer", "diffcr_2", "lora_2",
                 "transformer_2"):
        p = getattr(args, name)
        if p is not None and not Path(p).exists():
            return f"--{name.replace('_', '-')} {p}: no such folder or file"
    return None


def _class_ids(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class ids, got {text!r}")


def _prediction_type(model_path) -> str:
    """The prediction type of the ``scheduler_config.json`` saved next to a model (the demo
    writes one), else ``"epsilon"`` (diffusers' DiT)."""
    import json
    from pathlib import Path

    f = Path(model_path) / "scheduler_config.json"
    if f.is_file():
        try:
            return json.loads(f.read_text()).get("prediction_type", "epsilon")
        except ValueError:
            pass
    return "epsilon"


def _generate_cmd(args) -> int:
    from pathlib import Path

    import torch

    from .. import load
    from ..io import CheckpointError
    from .train import TrainError, load_model, sample_images

    bad = _generate_arg_error(args)
    if bad:
        print(f"diffcr generate: error: {bad}", file=sys.stderr)
        return 2
    if args.prompt:
        from .text_train import generate_from_pipeline

        try:
            paths = generate_from_pipeline(
                args.model, args.diffcr, args.prompt, args.out, lora=args.lora,
                transformer=args.transformer, diffcr_ckpt_2=args.diffcr_2, lora_2=args.lora_2,
                transformer_2=args.transformer_2, per_prompt=args.per_class, steps=args.steps,
                frames=args.frames,
                guidance=args.guidance, seed=args.seed, resolution=args.resolution)
        except TrainError as e:
            print(f"diffcr generate: error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {len(paths)} {'videos' if args.frames and args.frames > 1 else 'images'} "
              f"to {args.out}")
        return 0
    try:
        model = load_model(args.model)
        load(model, args.diffcr)
    except (TrainError, CheckpointError) as e:
        print(f"diffcr generate: error: {e}", file=sys.stderr)
        return 2
    from .. import freeze, routing_state
    if not routing_state(model).frozen:
        freeze(model)
    model.eval()
    ncls = model.config.num_embeds_ada_norm
    if ncls is None:
        print("diffcr generate: error: the model is not class-conditional", file=sys.stderr)
        return 2
    classes = args.classes if args.classes is not None else list(range(ncls))
    bad = [c for c in classes if not 0 <= c < ncls]
    if bad:
        print(f"diffcr generate: error: --classes {bad} out of range [0, {ncls})",
              file=sys.stderr)
        return 2
    labels = torch.tensor(classes).repeat_interleave(args.per_class)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.vae:
        from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

        pipe = DiTPipeline(transformer=model, vae=AutoencoderKL.from_pretrained(args.vae),
                           scheduler=DDIMScheduler(num_train_timesteps=1000))
        imgs = pipe(class_labels=labels.tolist(), num_inference_steps=args.steps,
                    guidance_scale=args.guidance,
                    generator=torch.Generator().manual_seed(args.seed), output_type="pt").images
        imgs = imgs * 2 - 1
    else:
        imgs = sample_images(model, labels, ncls, model.config.in_channels,
                             model.config.sample_size, steps=args.steps,
                             guidance=args.guidance, seed=args.seed,
                             prediction_type=_prediction_type(args.model))
    from PIL import Image

    arr = ((imgs.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    for i, (a, c) in enumerate(zip(arr, labels.tolist())):
        Image.fromarray(a).save(out / f"class{c}_{i:04d}.png")
    print(f"wrote {len(arr)} images to {out}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = _Parser(prog="diffcr", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"diffcr {__version__}")
    sub = parser.add_subparsers(dest="command")
    p_info = sub.add_parser("info", help="versions, device, and which kernel backends loaded")
    p_info.add_argument("--json", action="store_true", help="machine-readable output")
    _add_train(sub)
    p_i = sub.add_parser("inspect", help="print the ratio table of a DiffCR checkpoint")
    p_i.add_argument("checkpoint", help="folder written by diffcr.save / diffcr train")
    p_i.add_argument("--compression", action="store_true", help="print 1 - kept ratio")
    p_g = sub.add_parser("generate", help="images from a DiT + DiffCR checkpoint, or from a "
                         "pipeline (PixArt, SD3, Flux, Qwen-Image, Wan, HunyuanVideo) + DiffCR "
                         "checkpoint (+ LoRA) and prompts")
    p_g.add_argument("--model", required=True, help="diffusers DiT folder (e.g. OUT/model), or "
                     "a pipeline folder (with --prompt)")
    p_g.add_argument("--diffcr", required=True, help="DiffCR checkpoint (e.g. OUT/diffcr)")
    p_g.add_argument("--vae", help="AutoencoderKL folder for latent-space models")
    p_g.add_argument("--out", default="diffcr-samples", help="output folder")
    p_g.add_argument("--classes", type=_class_ids, default=None,
                     help="class ids, comma-separated (default: all)")
    p_g.add_argument("--per-class", type=int, default=4,
                     help="images per class (per prompt for pipeline models)")
    p_g.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p_g.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance")
    p_g.add_argument("--seed", type=int, default=0)
    p_g.add_argument("--prompt", action="append", default=None,
                     help="pipeline models: a prompt (repeat for several)")
    p_g.add_argument("--lora", help="pipeline models: LoRA adapter folder (e.g. OUT/lora)")
    p_g.add_argument("--transformer", help="pipeline models: transformer folder replacing the "
                     "pipeline's (e.g. OUT/model of a full fine-tune)")
    p_g.add_argument("--resolution", type=int, default=None,
                     help="pipeline models: image size in pixels (default: the model's)")
    p_g.add_argument("--frames", type=int, default=None,
                     help="video pipelines (Wan, HunyuanVideo): frames per video, written as "
                          "an animated GIF (default: one frame, a PNG)")
    p_g.add_argument("--diffcr-2", help="two-expert pipelines (Wan 2.2 A14B): DiffCR "
                     "checkpoint of transformer_2, the low-noise expert (--expert low; without "
                     "it transformer_2 runs dense)")
    p_g.add_argument("--lora-2", help="two-expert pipelines: LoRA adapter of transformer_2")
    p_g.add_argument("--transformer-2", help="two-expert pipelines: folder replacing "
                     "transformer_2 (OUT/model of a full fine-tune with --expert low)")
    p_b = sub.add_parser("bench", help="dense vs routed block: time, speedup, ideal, memory")
    p_b.add_argument("--model", choices=BENCH_KINDS, default="pixart",
                     help="block kind: PixArt-Sigma-XL, DiT-XL/2, SD3.5-Large, Flux.1 (double "
                          "stream; flux-single: single stream), Wan 2.1 1.3B, Qwen-Image or "
                          "HunyuanVideo (default pixart)")
    p_b.add_argument("--tokens", type=int, default=None,
                     help="image tokens N (a square; video kinds: 4 frames of a square or a "
                          "multiple of 1560, 480p frames; default 1024 on CPU, 4096 on GPU)")
    p_b.add_argument("--batch", type=int, default=None, help="batch (default 1 CPU, 8 GPU)")
    p_b.add_argument("--lora-rank", type=int, default=0,
                     help="training step with peft LoRA of this rank on both blocks (base "
                          "weights frozen, as the paper fine-tunes; default 0: full weights)")
    p_b.add_argument("--kappas", type=_kappas, default=[1.0, 0.8, 0.5, 0.3],
                     help="kept ratios, comma-separated (default 1.0,0.8,0.5,0.3)")
    p_b.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p_b.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                     help="default fp32 on CPU, bf16 on GPU")
    p_b.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p_b.add_argument("--rounds", type=int, default=6,
                     help="interleaved timed rounds per point (median; default 6)")
    p_b.add_argument("--prepack", action=argparse.BooleanOptionalAction, default=None,
                     help="MKL-prepacked linear weights for dense, routed and naive alike "
                          "(default: on for CPU when MKL is available)")
    p_b.add_argument("--no-naive", action="store_true",
                     help="skip the plain-torch gather -> block -> scatter control")
    p_b.add_argument("--no-overhead", action="store_true", help="skip the overhead measurement")
    p_b.add_argument("--no-training", action="store_true", help="skip the training step")
    p_b.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    if args.command == "info":
        d = info_dict()
        if args.json:
            print(json.dumps(d, indent=2, default=str))
        else:
            _print_info(d)
        return 0
    if args.command == "bench":
        import torch

        gpu = torch.cuda.is_available() if args.device is None else args.device == "cuda"
        args.device = args.device or ("cuda" if gpu else "cpu")
        args.tokens = args.tokens or (4096 if gpu else 1024)
        args.batch = args.batch or (8 if gpu else 1)
        args.dtype = args.dtype or ("bf16" if gpu else "fp32")
        for name in ("tokens", "batch", "threads", "rounds"):
            if getattr(args, name) < 1:
                parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
        return _bench(args)
    if args.command == "train":
        return _train_cmd(args)
    if args.command == "inspect":
        return _inspect_cmd(args)
    if args.command == "generate":
        return _generate_cmd(args)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
