"""The options of ``diffcr train``, in sections, each written once.

Every field of :class:`TrainConfig` is declared with :func:`option`: its section, its help, the
training modes it applies to and, where it has one, its command-line flag. From that one
declaration come

* the ``diffcr train`` arguments and their help (:func:`add_arguments`, grouped by section),
* the config of a parsed command line (:func:`from_args`),
* the refusal of an option given to a mode that does not use it
  (:meth:`TrainConfig.refuse_unused`), so that nothing a user passes is silently ignored.

The modes (:data:`MODES`) are chosen once, by the command line (:func:`mode_of`); each mode has
its own runner (:mod:`~diffcr.app.demo.run`, :mod:`~diffcr.app.classcond`,
:mod:`~diffcr.app.captioned`).

A new option is one :func:`option` field here (plus its check in :meth:`TrainConfig.validate`
when its values are constrained) and its use in the runner.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..config import DEFAULT_BINS, DiffCRConfig

__all__ = ["TrainConfig", "TrainError", "MODES", "SECTIONS", "option", "add_arguments",
           "from_args", "mode_of", "is_pipeline_folder", "has_captions"]


class TrainError(ValueError):
    """A problem with the user's arguments or files (reported as one line by the CLI)."""


#: the training modes and what each is, as the refusals name them
MODES: Dict[str, str] = {
    "demo": "the embedded demo (no --model/--data)",
    "class": "class-conditional training of a DiT on an image folder",
    "captioned": "captioned fine-tuning of a pipeline folder",
}
ALL = tuple(MODES)
TRAINING = ("class", "captioned")

#: the sections of the config, in the order ``diffcr train --help`` shows them
SECTIONS: Dict[str, str] = {
    "run": "run: what to train, on what, where the outputs go",
    "optimisation": "optimisation",
    "routing": "routing (DiffCR)",
    "parallelism": "parallelism",
    "captioned": "captioned fine-tuning (a pipeline folder and captioned data)",
    "demo": "demo (no --model/--data)",
}


def option(default, help: str, section: str, modes: Sequence[str] = ALL, *, flag=True,
           type=None, choices=None, metavar=None, negate: Optional[str] = None,
           refusal: str = ""):
    """One field of :class:`TrainConfig`.

    ``modes``: the modes that use it (a value other than the default elsewhere is refused);
    ``flag``: False for a field with no command-line flag (set by a mode's recipe);
    ``type``/``choices``/``metavar``: as argparse's; ``negate``: the flag of a boolean that
    defaults to True (``--no-progress`` sets ``progress`` False); ``refusal``: said after the
    generated refusal (why the other modes do not take it)."""
    assert section in SECTIONS, section
    meta = dict(help=help, section=section, modes=tuple(modes), flag=flag, type=type,
                choices=choices, metavar=metavar, negate=negate, refusal=refusal)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _floats(text: str) -> List[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


@dataclass
class TrainConfig:
    """Everything ``diffcr train`` takes; see each field's help (``diffcr train --help``)."""

    # ------------------------------------------------------------------------------ run
    out: str = option("diffcr-out", "output folder (default diffcr-out)", "run")
    model: Optional[str] = option(
        None, "diffusers DiT model folder, or its config JSON (random init); or a diffusers "
        "pipeline folder of a family named above, for captioned fine-tuning", "run", TRAINING)
    data: Optional[str] = option(
        None, "image folder, one subfolder per class; or with captions: metadata.jsonl lines "
        '{"file_name": ..., "text": ...}', "run", TRAINING)
    vae: Optional[str] = option(None, "AutoencoderKL folder for latent-space models", "run",
                                ("class",), refusal="a pipeline folder brings its own vae/")
    steps: Optional[int] = option(
        None, "training steps (demo: fine-tuning steps of each variant, default 170; with "
        "--pretrain-only: dense pre-training steps)", "run", type=int)
    batch: int = option(32, "batch size per process", "run", type=int)
    seed: int = option(0, "random seed", "run", type=int)
    threads: Optional[int] = option(None, "CPU threads (default: all)", "run", type=int)
    resume: Optional[str] = option(
        None, "continue a previous run: a checkpoint folder (OUT/step-N), a run folder (its "
        "newest complete step-N), or 'latest' (the newest complete step-N under --out)", "run",
        TRAINING)
    overwrite: bool = option(
        False, "replace the previous run in --out (its step-N states and metrics.json are "
        "removed at the start; its final checkpoints once the new ones are complete); without "
        "it or --resume, an --out that holds a run's outputs is refused", "run", TRAINING)
    save_every: int = option(0, "checkpoint every N steps", "run", TRAINING, type=int)
    keep_last: int = option(0, "keep only the K newest step-N checkpoints (each removed only "
                            "after a newer one is complete; 0: keep all)", "run", TRAINING,
                            type=int)
    progress: bool = option(True, "no progress bars", "run", negate="--no-progress")

    # ------------------------------------------------------------------------------ optimisation
    lr: float = option(1e-4, "learning rate of the base weights (the demo uses its own "
                       "recipe)", "optimisation", TRAINING, type=float)
    max_bad_steps: int = option(
        5, "a step whose loss or gradient is not finite (NaN/inf) is skipped with a warning; "
        "stop the run after this many such steps in a row, before anything is written from "
        "them", "optimisation", ("demo", "class", "captioned"), type=int)
    lr_router: float = option(1e-3, "learning rate of the routers", "optimisation", type=float)
    lr_ratio: float = option(1e-2, "learning rate of the ratios (the demo uses its own recipe)",
                             "optimisation", TRAINING, type=float)
    mixed_precision: str = option("no", "autocast dtype of the training step", "optimisation",
                                  choices=("no", "bf16", "fp16"))
    grad_ckpt: bool = option(False, "gradient checkpointing", "optimisation", TRAINING)
    #: class-conditional training: what the model predicts, "epsilon" or "v_prediction"
    prediction_type: str = option("epsilon", "what the model predicts", "optimisation",
                                  flag=False)
    ema_decay: float = option(0.0, "decay of an exponential moving average of the trained "
                              "weights (0: none); the EMA copy is what the demo samples from "
                              "and saves", "optimisation", flag=False)
    warmup: int = option(0, "learning-rate schedule: linear warm-up over this many steps, then "
                         "cosine decay to 0 (0: constant)", "optimisation", flag=False)
    grad_clip: float = option(0.0, "clip the gradient norm to this (0: no clipping)",
                              "optimisation", flag=False)

    # ------------------------------------------------------------------------------ routing
    compression: float = option(0.5, "target compression = 1 - mean kept ratio (default 0.5)",
                                "routing", type=float)
    regions: int = option(4, "timestep regions R (default 4)", "routing", type=int)
    bins: Optional[List[float]] = option(None, "kept-ratio bins, comma-separated (default "
                                         "0.1,...,1.0)", "routing", type=_floats)
    lam: float = option(0.3, "ratio-loss weight (default 0.3)", "routing", type=float)
    distill: float = option(0.0, "weight of a dense teacher: adds the mean squared distance "
                            "between the routed model's prediction and the dense model's on "
                            "the same noisy input and condition (with --lora-rank the same "
                            "weights with the adapters off and every block dense, no second "
                            "copy; with full weights a frozen copy from before conversion; "
                            "0: off)", "routing", ("class", "captioned"), type=float)
    cache_refresh: int = option(
        0, "cache-aware fine-tuning: the token cache in the loop, for sampling with a refresh "
        "every R steps (diffcr.TokenCacheConfig(refresh_every=R)): each batch first fills the "
        "cache at a noisier timestep, 1 to R-1 sampler steps back, without gradient (0: off)",
        "routing", ("class", "captioned"), type=int)
    inpaint: bool = option(
        False, "inpainting fine-tuning: each sample gets a random box mask (10-50 %% of the "
        "image); every routed block computes its tokens (diffcr.mask_routing) and spends its "
        "kept ratio on the context, and the loss counts the box only, the region an inpaint "
        "pipeline that blends latents keeps (image pipelines)", "routing", ("captioned",))
    cache_spacing: int = option(50, "with --cache-refresh: timesteps between two sampler "
                                "steps (1000 / sampling steps; default 50)", "routing",
                                ("class", "captioned"), type=int)

    # ------------------------------------------------------------------------------ parallelism
    fsdp: bool = option(
        False, "shard every transformer block (routers, ratios and LoRA included) and the "
        "model with FSDP2 across the processes instead of DDP; launch with torchrun or "
        "accelerate launch --multi_gpu", "parallelism", ("captioned",),
        refusal="the class-conditional DiTs this path trains fit one device: use DDP")

    # ------------------------------------------------------------------------------ captioned
    lora_rank: int = option(0, "peft LoRA of this rank on the base weights (the paper: 32; "
                            "default 0 trains them in full)", "captioned", ("captioned",),
                            type=int)
    caption_dropout: float = option(0.1, "share of empty captions (default 0.1)", "captioned",
                                    ("captioned",), type=float)
    resolution: Optional[int] = option(None, "image size in pixels (default: the model's; Flux "
                                       "1024)", "captioned", ("captioned",), type=int)
    grad_accum: int = option(1, "micro-batches per optimizer step (default 1)", "captioned",
                             ("captioned",), type=int)
    frames: Optional[int] = option(None, "video clips (Wan, HunyuanVideo): frames from the "
                                   "start of each clip, 1 + 4k (default: the pipeline's, "
                                   "81 / 129)", "captioned", ("captioned",), type=int)
    expert: Optional[str] = option(None, "a two-expert Wan 2.2 pipeline: train transformer "
                                   "(high: noise levels from its boundary_ratio up) or "
                                   "transformer_2 (low), one run each", "captioned",
                                   ("captioned",), choices=("high", "low"))
    max_length: Optional[int] = option(None, "tokens per caption (default 300 above 512 px, "
                                       "else 120)", "captioned", ("captioned",), type=int)

    # ------------------------------------------------------------------------------ demo
    quick: bool = option(False, "tiny settings (seconds), for smoke tests", "demo", ("demo",))
    from_scratch: bool = option(False, "train the dense DiT here (both stages of the shipped "
                                "checkpoint) instead of starting from it (about 50 min more "
                                "on 2 CPU cores)", "demo", ("demo",))
    pretrain_only: bool = option(False, "train the dense DiT (--steps of them, default the "
                                 "shipped checkpoint's) and write it to OUT/dense; nothing "
                                 "else", "demo", ("demo",))
    continue_from: Optional[str] = option(
        None, "with --pretrain-only: continue training this dense DiT folder (one that "
        "--pretrain-only wrote) with the second-stage recipe instead of starting from scratch "
        "(--steps default 6000)", "demo", ("demo",), metavar="FOLDER")

    # ------------------------------------------------------------------------------ checks
    def validate(self) -> "TrainConfig":
        """Every value in its range and the files named exist; :class:`TrainError` naming the
        flag otherwise. Mode-independent (see :meth:`refuse_unused` for the modes)."""
        for name in ("compression", "lr", "lr_router", "lr_ratio", "lam", "distill"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise TrainError(f"{flag_of(name)} must be a finite number, got {v!r}")
        if not (0.0 <= self.compression < 1.0):
            raise TrainError(f"--compression must be in [0, 1), got {self.compression}")
        for name in ("lr", "lr_router", "lr_ratio", "lam", "distill"):
            if getattr(self, name) < 0:
                raise TrainError(f"{flag_of(name)} must be >= 0")
        for name, low in (("regions", 1), ("steps", 1), ("batch", 1), ("save_every", 0),
                          ("keep_last", 0), ("max_bad_steps", 1),
                          ("grad_accum", 1), ("max_length", 1), ("threads", 1),
                          ("frames", 1), ("warmup", 0), ("cache_refresh", 0),
                          ("cache_spacing", 1)):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise TrainError(f"{flag_of(name)} must be an integer, got {v!r}")
            if v < low:
                hint = " (0: only at the end)" if name == "save_every" else ""
                raise TrainError(f"{flag_of(name)} must be >= {low}{hint}, got {v}")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) \
                or self.lora_rank < 0:
            raise TrainError(f"--lora-rank must be an integer >= 0 (0: no LoRA), got "
                             f"{self.lora_rank!r}")
        if not (isinstance(self.caption_dropout, (int, float)) and
                0.0 <= self.caption_dropout <= 1.0):
            raise TrainError(f"--caption-dropout must be in [0, 1], got {self.caption_dropout!r}")
        if self.cache_refresh == 1:
            raise TrainError("--cache-refresh must be >= 2 (a refresh every R steps) or 0")
        if self.resolution is not None and (self.resolution < 16 or self.resolution % 16):
            raise TrainError(f"--resolution must be a multiple of 16, got {self.resolution}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise TrainError(f"--out {self.out} exists and is not a folder")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise TrainError(f"prediction type must be epsilon or v_prediction, got "
                             f"{self.prediction_type!r}")
        if not (0.0 <= self.ema_decay < 1.0):
            raise TrainError(f"EMA decay must be in [0, 1), got {self.ema_decay}")
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
        if self.expert not in (None, "high", "low"):
            raise TrainError(f"--expert must be high or low, got {self.expert!r}")
        if self.fsdp and self.mixed_precision == "fp16":
            raise TrainError("--fsdp with --mixed-precision fp16: the gradient scaler does not "
                             "take sharded gradients; use bf16")
        if self.data is not None and not Path(self.data).is_dir():
            raise TrainError(f"--data {self.data}: no such folder")
        if self.model is not None and not Path(self.model).exists():
            raise TrainError(f"--model {self.model}: no such folder or file")
        if self.resume not in (None, "latest") and not Path(self.resume).is_dir():
            raise TrainError(f"--resume {self.resume}: no such checkpoint folder")
        try:
            self.diffcr_config()
        except ValueError as e:
            raise TrainError(str(e)) from e
        return self

    def refuse_unused(self, mode: str) -> "TrainConfig":
        """:class:`TrainError` for the first option set (other than its default) that ``mode``
        does not use, naming the modes that do."""
        for f in fields(self):
            if mode in f.metadata["modes"] or getattr(self, f.name) == _default(f):
                continue
            users = " or ".join(MODES[m] for m in f.metadata["modes"])
            why = f.metadata["refusal"]
            raise TrainError(f"{flag_of(f.name)} is for {users}" + (f" ({why})" if why else ""))
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

    def replace(self, **kw) -> "TrainConfig":
        """A copy with the fields in ``kw`` changed (a mode's recipe over the user's options)."""
        from dataclasses import replace

        return replace(self, **kw)


def _default(f):
    return f.default_factory() if f.default is MISSING else f.default


def flag_of(name: str) -> str:
    """The command-line flag of a :class:`TrainConfig` field (its name for a field without
    one)."""
    f = next(f for f in fields(TrainConfig) if f.name == name)
    if f.metadata["negate"]:
        return f.metadata["negate"]
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``diffcr train`` arguments, one group per section, from :class:`TrainConfig`."""
    groups = {s: parser.add_argument_group(title) for s, title in SECTIONS.items()}
    for f in fields(TrainConfig):
        m = f.metadata
        if not m["flag"]:
            continue
        g = groups[m["section"]]
        modes = m["modes"]
        help_ = m["help"] if modes == ALL else \
            f"{m['help']} [{', '.join(modes)}]"
        if m["negate"]:
            g.add_argument(m["negate"], dest=f.name, action="store_false", help=help_)
        elif f.type in (bool, "bool"):  # a switch
            g.add_argument(flag_of(f.name), dest=f.name, action="store_true", help=help_)
        else:
            kw = {k: m[k] for k in ("type", "choices", "metavar") if m[k] is not None}
            g.add_argument(flag_of(f.name), dest=f.name, default=_default(f), help=help_, **kw)


def from_args(args: argparse.Namespace) -> TrainConfig:
    """The config of parsed ``diffcr train`` arguments."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)
                          if f.metadata["flag"]})


def is_pipeline_folder(path) -> bool:
    """Whether ``path`` is a diffusers pipeline folder (``model_index.json``)."""
    return path is not None and (Path(path) / "model_index.json").is_file()


def has_captions(path) -> bool:
    """Whether ``path`` is a captioned data folder (``metadata.jsonl``)."""
    return path is not None and (Path(path) / "metadata.jsonl").is_file()


def mode_of(cfg: TrainConfig) -> str:
    """The training mode of a config: ``"demo"`` (no model or data), ``"captioned"`` (a
    pipeline folder) or ``"class"``; :class:`TrainError` for a model without data (or the
    reverse) and for captioned data given to a class-conditional model."""
    if cfg.model is None and cfg.data is None:
        return "demo"
    if cfg.model is None or cfg.data is None:
        raise TrainError("real training needs both --model and --data (run `diffcr train` "
                         "without them for the embedded demo)")
    if is_pipeline_folder(cfg.model):
        return "captioned"
    if has_captions(cfg.data):
        raise TrainError(f"--data {cfg.data} has captions (metadata.jsonl): --model must be a "
                         "diffusers pipeline folder (model_index.json, transformer/, "
                         "text_encoder/, tokenizer/, vae/)")
    return "class"
