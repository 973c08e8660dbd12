"""Training helpers: the ratio loss (method §4), the ratio table, and keeping ratios in range."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from .convert import routed_blocks
from .modules import full_tensor
from .routing import routing_state

__all__ = ["ratio_loss", "mean_kept_ratio", "ratio_table", "format_ratio_table",
           "project_ratios", "attach_ratio_projection", "router_parameters",
           "ratio_parameters"]


def _used_kappas(model: nn.Module) -> List[torch.Tensor]:
    used = []
    for r in routing_state(model).blocks.values():
        k = r.last_kappa
        if k is None:
            raise RuntimeError("diffcr: no forward has run since conversion; ratio_loss and "
                               "mean_kept_ratio read the ratios used by the last forward")
        used.append(k.reshape(-1))
    return used


def mean_kept_ratio(model: nn.Module) -> torch.Tensor:
    """Mean kept ratio over the ratios used in the last forward: every routed block, and for
    each sample the ratio of its timestep region (differentiable in training)."""
    used = _used_kappas(model)
    dev = next((k.device for k in used if k.requires_grad), used[0].device)
    return torch.cat([k.to(dev, torch.float32) for k in used]).mean()


def ratio_loss(model: nn.Module, target: Optional[float] = None,
               lam: Optional[float] = None) -> torch.Tensor:
    """``lam * (mean_kappa - target) ** 2`` over the ratios used in the last forward (method §4).

    ``target`` and ``lam`` default to the config's ``target_kept_ratio`` and ``lam``. Add it to
    the diffusion loss: ``loss = mse + diffcr.ratio_loss(model)``.
    """
    cfg = routing_state(model).config
    target = cfg.target_kept_ratio if target is None else float(target)
    lam = cfg.lam if lam is None else float(lam)
    if not (0.0 < target <= 1.0):
        raise ValueError(f"target kept ratio must be in (0, 1], got {target}")
    loss = lam * (mean_kept_ratio(model) - target) ** 2
    # Every ratio parameter takes part in the graph (with zero weight where its region was not
    # used in this batch), so DistributedDataParallel sees no unused parameters. Parameters
    # sharded by FSDP2 (DTensors outside forward) are left out: FSDP reduces every gradient
    # anyway, and a DTensor term cannot be added to the loss made from the unsharded values
    # the forward used.
    ratios = [p for p in ratio_parameters(model) if p.requires_grad and not _is_dtensor(p)]
    if ratios and torch.is_grad_enabled():
        loss = loss + 0.0 * torch.stack([p.sum() for p in ratios]).sum().to(loss.dtype)
    return loss


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return False
    return isinstance(t, DTensor)


def ratio_table(model: nn.Module) -> Tuple[List[int], torch.Tensor]:
    """(block indices, ``[blocks, regions]`` tensor of learned kept ratios, clamped to the bins)."""
    blocks = routed_blocks(model)
    idx = list(blocks)
    table = torch.stack([full_tensor(b.ratio.kappa().detach()).float().cpu()
                         for b in blocks.values()])
    return idx, table


def format_ratio_table(model: nn.Module, compression: bool = False) -> str:
    """Pretty table of the learned ratios: one row per routed block, one column per region
    (region 0 = least noisy timesteps). ``compression=True`` prints 1 - kept."""
    idx, table = ratio_table(model)
    if compression:
        table = 1 - table
    cfg = routing_state(model).config
    R, T = table.shape[1], cfg.timesteps
    head = ["block"] + [f"t<{(r + 1) * T / R:g}" if r < R - 1 else f"t>={r * T / R:g}"
                        for r in range(R)]
    lines = ["  ".join(f"{h:>8}" for h in head)]
    for i, row in zip(idx, table.tolist()):
        lines.append("  ".join([f"{i:>8}"] + [f"{v:>8.3f}" for v in row]))
    what = "compression (1 - kept)" if compression else "kept ratio"
    lines.append(f"mean {what}: {table.mean().item():.3f}")
    return "\n".join(lines)


def project_ratios(model: nn.Module) -> None:
    """Clamp every ratio parameter back into the bin range (call after each optimiser step)."""
    for b in routed_blocks(model).values():
        b.ratio.project_()


def attach_ratio_projection(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Run :func:`project_ratios` after every ``optimizer.step()``; returns the hook handle."""
    return optimizer.register_step_post_hook(lambda opt, args, kwargs: project_ratios(model))


def router_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [b.router.weight for b in routed_blocks(model).values()]


def ratio_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [b.ratio.kept for b in routed_blocks(model).values()]
