"""What the public ops do under ``torch.autocast`` (mixed precision).

The compiled ops take one floating dtype per call (the dtype of ``x``), so under autocast,
where a block's tensors arrive in mixed dtypes (bf16 linear outputs, float32 norm weights and
router scores), each public op first casts its inputs as the block's own eager code would meet
them, so that the routed (fused) forward under autocast follows the dense block's autocast
semantics:

* :func:`~diffcr_kernels.gather_norm_modulate` (``LN(x) * (1 + scale) + shift``): the
  LayerNorm runs as ``F.layer_norm`` under autocast does (float32 on CUDA and every other
  device whose autocast lists ``layer_norm`` as float32; the input's dtype on CPU), then the
  modulation promotes as eager arithmetic does;
* the scatter-backs (``x + w · (update + s · gate · mlp)``): the widest dtype of x, the
  updates, the gate and the scores that multiply the MLP branch, as eager promotion gives
  (the in-place one keeps x's dtype, as ``x += ...`` does);
* :func:`~diffcr_kernels.varlen_attention`: q, k and v in autocast's dtype, as
  ``F.scaled_dot_product_attention`` under autocast.

Outside autocast nothing is cast: the ops refuse mixed dtypes with an error that names them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["autocast_dtype", "norm_dtype", "promoted", "cast"]

#: device types whose autocast runs ``layer_norm`` in its input dtype (CPU autocast has no
#: float32 list entry for it); every other device's autocast runs it in float32
_NORM_IN_INPUT_DTYPE = ("cpu",)


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The low-precision dtype of autocast on ``device``'s type, None when autocast is off."""
    kind = device.type
    if not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def norm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.layer_norm(x)`` returns under the active autocast (x's when off)."""
    if autocast_dtype(x.device) is None or x.device.type in _NORM_IN_INPUT_DTYPE:
        return x.dtype
    return torch.promote_types(x.dtype, torch.float32)


def promoted(first: torch.dtype, tensors: Sequence[Optional[torch.Tensor]]) -> torch.dtype:
    """``first`` promoted with the floating dtype of every given tensor (None skipped)."""
    dt = first
    for t in tensors:
        if t is not None:
            dt = torch.promote_types(dt, t.dtype)
    return dt


def cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``t`` in ``dtype`` (None stays None; no copy when it already is)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)
