"""``diffcr generate``: images from a DiT + DiffCR checkpoint, or from a pipeline + DiffCR
checkpoint (+ LoRA) and prompts."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..options import TrainError, is_pipeline_folder
from ..recipes import RECIPES

NAME = "generate"
HELP = ("images from a DiT + DiffCR checkpoint, or from a pipeline ("
        + ", ".join(r.family for r in RECIPES.values()) + ") + DiffCR checkpoint (+ LoRA) and "
        "prompts")


def add_parser(sub) -> None:
    p_g = sub.add_parser(NAME, help=HELP)
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


def run(args, parser) -> int:
    from pathlib import Path

    import torch

    from ... import freeze, load, routing_state
    from ...io import CheckpointError
    from ..ddpm import load_model, sample_images

    bad = _generate_arg_error(args)
    if bad:
        print(f"diffcr generate: error: {bad}", file=sys.stderr)
        return 2
    if args.prompt:
        from ..generate import generate_from_pipeline

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
