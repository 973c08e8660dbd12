"""``diffcr generate``: images (or videos) from a converted model and a DiffCR checkpoint.

* :func:`generate_from_pipeline`: a diffusers pipeline folder whose transformer (or two, Wan
  2.2 A14B) a DiffCR checkpoint converts, with its LoRA adapter when given, drawn from prompts
  with the pipeline's own sampler;
* class-conditional DiTs are drawn with :func:`diffcr.app.ddpm.sample_images` (or diffusers'
  ``DiTPipeline`` for a latent-space model), see :mod:`diffcr.app.cli.generate`.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

import torch

from .options import TrainError
from .recipes import pipeline_parts
from .video import save_gif

__all__ = ["generate_from_pipeline", "apply_checkpoint"]


def generate_from_pipeline(folder, diffcr_ckpt, prompts: List[str], out, lora=None,
                           transformer=None, per_prompt: int = 1, steps: int = 25,
                           guidance: float = 4.5, seed: int = 0, max_length=None,
                           resolution=None, progress: bool = True, diffcr_ckpt_2=None,
                           lora_2=None, transformer_2=None, frames=None) -> List[Path]:
    """Images for ``prompts`` from a pipeline folder with its transformer (or ``transformer``,
    e.g. ``OUT/model`` of a full fine-tune) converted by the DiffCR checkpoint ``diffcr_ckpt``
    and, when given, the LoRA adapter ``lora`` (``OUT/lora``). In a two-expert pipeline
    (Wan 2.2 A14B) those are the high-noise expert's, and ``diffcr_ckpt_2`` / ``lora_2`` /
    ``transformer_2`` the low-noise expert's (``transformer_2``; dense without
    ``diffcr_ckpt_2``). Writes ``out/prompt<i>-<j>.png``, or with ``frames`` > 1 (video
    pipelines) ``out/prompt<i>-<j>.gif`` of that many frames, and returns the paths."""
    import diffusers

    folder = Path(folder)
    index, tconf, recipe = pipeline_parts(folder)
    two = (index.get("transformer_2") or [None, None])[1] is not None
    if diffcr_ckpt_2 is not None and not two:
        raise TrainError(f"--diffcr-2: --model {folder} has one transformer (no "
                         "transformer_2)")
    video = frames is not None and frames > 1
    if video:
        if not recipe.video:
            raise TrainError(f"--frames {frames}: {recipe.model_class} is an image model")
        step = recipe.frame_step(folder)
        if (frames - 1) % step:
            raise TrainError(f"--frames {frames}: the VAE compresses time {step}x, so a video "
                             f"is 1 + {step}k frames")
    klass = getattr(diffusers, recipe.model_class)

    def routed(tdir, ckpt, adapter):
        model = klass.from_pretrained(str(tdir))
        if ckpt is not None:
            apply_checkpoint(model, ckpt, adapter)
        return model.eval()

    parts = {"transformer": routed(transformer or folder / "transformer", diffcr_ckpt, lora)}
    if two:
        parts["transformer_2"] = routed(transformer_2 or folder / "transformer_2",
                                        diffcr_ckpt_2, lora_2)
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), **parts)
    pipe.set_progress_bar_config(disable=not progress)
    pixels = recipe.pixels(folder, tconf, resolution)
    kwargs = recipe.pipeline_kwargs(pixels, max_length)
    if video:
        kwargs["num_frames"] = frames
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            output = pipe(prompt, **{recipe.per_prompt_arg: per_prompt},
                          num_inference_steps=steps, **recipe.guidance_kwargs(guidance),
                          **kwargs, generator=torch.Generator().manual_seed(seed + i))
            if video:
                for j, clip in enumerate(recipe.videos_of(output)):
                    paths.append(out / f"prompt{i}-{j}.gif")
                    save_gif(clip, paths[-1])
                continue
            for j, im in enumerate(recipe.images_of(output)):
                paths.append(out / f"prompt{i}-{j}.png")
                im.save(paths[-1])
    return paths


def apply_checkpoint(model, ckpt, lora) -> None:
    """``model`` converted by the DiffCR checkpoint ``ckpt`` (frozen for inference), with the
    LoRA adapter ``lora`` when given."""
    import diffcr

    try:
        diffcr.load(model, ckpt)
        if lora:
            diffcr.load_lora(model, lora)
    except (diffcr.CheckpointError, diffcr.LoraError) as e:
        raise TrainError(str(e)) from e
    if not diffcr.routing_state(model).frozen:
        diffcr.freeze(model)
