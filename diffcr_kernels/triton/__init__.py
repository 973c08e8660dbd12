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

__all__ = ["AVAILABLE", "IMPORT_ERROR"]

try:
    from .kernels import *  # noqa: F401,F403  (the launchers, :mod:`.kernels`'s __all__)
    from .kernels import __all__ as _launchers
except ImportError as e:  # triton missing or broken
    IMPORT_ERROR = f"{type(e).__name__}: {e}"
else:
    AVAILABLE = True
    __all__ += _launchers
