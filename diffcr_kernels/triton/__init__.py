"""Triton kernels of the DiffCR data path (GPU; also runnable on CPU tensors under the Triton
interpreter, ``TRITON_INTERPRET=1``, which must be set before this package is imported).

The launchers mirror the compiled ``torch.ops.diffcr.*`` operators one to one (one file per
op: :mod:`.gather_norm`, :mod:`.scatter`, :mod:`.token_cache`, :mod:`.router`,
:mod:`.select`; all launchers
in :mod:`diffcr_kernels.triton.kernels`); they are plain Python functions with no
``torch.library`` registration. :mod:`.aot` compiles them for sm_80 / sm_90 without a GPU.

:data:`AVAILABLE` is False (and :data:`IMPORT_ERROR` says why) when triton cannot be imported;
the launchers are then absent. :data:`INTERPRETED` is True when the kernels run under the
interpreter (CPU tensors) rather than compiled (CUDA tensors).
"""
from __future__ import annotations

from typing import Optional

AVAILABLE = False
IMPORT_ERROR: Optional[str] = None

__all__ = [
    "AVAILABLE",
    "IMPORT_ERROR",
    "INTERPRETED",
    "apply_token_cache_",
    "gather_norm_modulate",
    "gather_norm_modulate_backward",
    "scatter_back",
    "scatter_back_",
    "scatter_back_backward",
    "router_scores",
]

try:
    from .kernels import (  # noqa: F401
        INTERPRETED,
        apply_token_cache_,
        gather_norm_modulate,
        gather_norm_modulate_backward,
        router_scores,
        scatter_back,
        scatter_back_,
        scatter_back_backward,
    )
except ImportError as e:  # triton missing or broken
    IMPORT_ERROR = f"{type(e).__name__}: {e}"
    __all__ = ["AVAILABLE", "IMPORT_ERROR"]
else:
    AVAILABLE = True
