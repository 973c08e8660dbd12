"""The training core every ``diffcr train`` runner uses: progress bars, parameter groups, the
learning-rate schedule, the EMA, the one checkpoint writer and the cross-process check.

It imports the library's public API and :mod:`.options` only; the runners
(:mod:`~diffcr.app.demo.run`, :mod:`~diffcr.app.classcond`, :mod:`~diffcr.app.captioned`)
import it, never each other.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable, List

import torch

from .options import TrainConfig

__all__ = ["Progress", "param_groups", "lr_factor", "ema_update", "write_checkpoints",
           "identical_across_ranks"]


class Progress:
    """A tqdm bar over ``total`` steps when ``enabled`` (else nothing); :meth:`update` advances
    it by one and shows the given values."""

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


def param_groups(model, cfg: TrainConfig, train_base: bool = True) -> List[dict]:
    """AdamW parameter groups: ``base`` (every other trainable parameter, at ``cfg.lr``; left
    out without ``train_base``), ``router`` (``cfg.lr_router``) and ``ratio``
    (``cfg.lr_ratio``), the last two without weight decay."""
    import diffcr

    converted = diffcr.is_converted(model)
    routers = [p for p in diffcr.router_parameters(model) if p.requires_grad] if converted else []
    ratios = [p for p in diffcr.ratio_parameters(model) if p.requires_grad] if converted else []
    routed = set(map(id, diffcr.router_parameters(model) + diffcr.ratio_parameters(model))) \
        if converted else set()
    base = [p for p in model.parameters() if id(p) not in routed and p.requires_grad]
    groups = []
    if train_base and base and cfg.lr > 0:
        groups.append({"params": base, "lr": cfg.lr, "name": "base"})
    if routers:
        groups.append({"params": routers, "lr": cfg.lr_router, "weight_decay": 0.0,
                       "name": "router"})
    if ratios:
        groups.append({"params": ratios, "lr": cfg.lr_ratio, "weight_decay": 0.0,
                       "name": "ratio"})
    return groups


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Learning-rate multiplier at ``step``: 1 without warm-up; else linear warm-up over
    ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if warmup <= 0:
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """``ema = d ema + (1 - d) model`` over the parameters, with the usual warm-up
    ``d = min(decay, (1 + step) / (10 + step))`` so early steps are not dominated by the
    initialisation; buffers are copied."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p.detach().to(pe.dtype), 1.0 - d)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


def write_checkpoints(model, out: Path, *, lora: bool = False, frozen: bool = False) -> None:
    """The checkpoints a user loads, of a converted ``model`` (left as it is):

    * ``out/diffcr``: the DiffCR checkpoint (routers, ratios, config; :func:`diffcr.save`);
    * ``out/lora``: the peft LoRA adapter (``lora``), else ``out/model``: the base model in
      diffusers' format (a reverted copy);
    * ``out/diffcr-frozen`` (``frozen``): the DiffCR checkpoint of a frozen copy (fixed k per
      block and region, for inference)."""
    import diffcr

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    diffcr.save(model, out / "diffcr")
    if lora:
        diffcr.save_lora(model, out / "lora")
    else:
        base = copy.deepcopy(model)
        diffcr.revert(base)
        base.save_pretrained(out / "model")
    if frozen:
        copy_ = copy.deepcopy(model)
        diffcr.freeze(copy_)
        diffcr.save(copy_, out / "diffcr-frozen")


def identical_across_ranks(params: List[torch.Tensor],
                           gather: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether ``params`` hold the same values on every process: ``gather`` maps this
    process's ``[1, n]`` float64 row to the ``[world, n]`` rows of all (e.g. accelerate's
    ``Accelerator.gather``)."""
    flat = torch.cat([p.detach().flatten().double() for p in params])[None]
    rows = gather(flat).cpu()
    return all(torch.equal(rows[0], r) for r in rows[1:])
