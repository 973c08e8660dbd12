"""``diffcr train``: the training mode is chosen here, once, and its runner called.

* no ``--model``/``--data``: the embedded demo (:func:`diffcr.app.demo.run.run_demo`);
* ``--model`` a diffusers pipeline folder: captioned fine-tuning
  (:func:`diffcr.app.captioned.run_captioned_train`);
* ``--model`` a class-conditional DiT: :func:`diffcr.app.classcond.run_class_train`.

The arguments come from :class:`diffcr.app.options.TrainConfig` (:func:`~diffcr.app.options
.add_arguments`); an option the chosen mode does not use is refused, naming the modes that do.
"""
from __future__ import annotations

import os
import sys

from ..options import TrainError, add_arguments, from_args, mode_of
from ..recipes import RECIPES

NAME = "train"
HELP = "embedded demo (no args) or fine-tuning (--model/--data)"


def add_parser(sub) -> None:
    pipelines = ", ".join(r.family for r in RECIPES.values())
    p = sub.add_parser(NAME, help=HELP, description=(
        "Without --model/--data: the embedded end-to-end demo (procedural shapes, small DiT "
        "trained dense, then DiffCR-LT, DiffCR-L, MoD and random selection compared with "
        "diffusers' caches). With them: DiffCR fine-tuning of a diffusers "
        "DiTTransformer2DModel on an image folder (one subfolder per class), or captioned "
        f"fine-tuning of a {pipelines} pipeline folder (text embeddings and latents cached, "
        "optional peft LoRA); run under torchrun or accelerate launch for several processes "
        "(DDP, or FSDP2 with --fsdp). Options marked [demo], [class] or [captioned] apply "
        "to those modes only."))
    add_arguments(p)


def run(args, parser) -> int:
    import torch

    cfg = from_args(args)
    try:
        cfg.validate()
        mode = mode_of(cfg)
        cfg.refuse_unused(mode)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if mode == "demo":
            return _demo(cfg)
        if mode == "captioned":
            from ..captioned import run_captioned_train

            metrics = run_captioned_train(cfg)
        else:
            from ..classcond import run_class_train

            metrics = run_class_train(cfg)
    except TrainError as e:
        print(f"diffcr train: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {metrics['steps']} steps; mean kept ratio "
              f"{metrics['mean_kept_ratio']:.3f} (target {metrics['target_kept_ratio']:.3f}); "
              f"checkpoint in {cfg.out}")
    return 0


def _demo(cfg) -> int:
    from ..demo.run import format_summary, run_demo

    metrics = run_demo(cfg)
    if metrics.get("pretrain_only"):
        print(f"dense DiT trained {metrics['steps']} steps in {metrics['seconds']:.0f} s: "
              f"{metrics['out']}")
        return 0
    print(format_summary(metrics))
    print(f"outputs in {cfg.out}: diffcr/ (checkpoint), model/, ratios.png, router.png, "
          "samples.png, tradeoff.png, inpaint.png, metrics.json, comparison.md")
    return 0
