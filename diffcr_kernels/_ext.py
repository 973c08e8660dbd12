"""Loading of the compiled extension ``diffcr_kernels._C`` and the record of why it did (not).

The extension is a plain shared library of ``TORCH_LIBRARY_IMPL(diffcr, CPU|CUDA, ...)`` kernel
registrations loaded with :func:`torch.ops.load_library`; the ops themselves (their schemas)
are defined here first, from :data:`diffcr_kernels._schemas.SCHEMAS`. If it is missing or fails to load, every public op still
works through :mod:`diffcr_kernels.reference`; :func:`available_backends` says why.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from ._schemas import SCHEMAS

_HERE = Path(__file__).resolve().parent
LOADED: bool = False
LOAD_ERROR: Optional[str] = None
LIBRARY_PATH: Optional[str] = None
BUILD_INFO: dict = {}
_KERNELS: dict = {}  # (op, dispatch key) -> bool, filled once at load (a dict lookup traces)
_OPS = tuple(SCHEMAS)
_LIB: Optional[torch.library.Library] = None  # keeps the diffcr:: definitions alive


def _define_ops() -> None:
    """Define ``diffcr::<op>`` for every op of the table (the .so only implements them)."""
    global _LIB
    if _LIB is None:
        _LIB = torch.library.Library("diffcr", "DEF")
        for name, schema in SCHEMAS.items():
            _LIB.define(name + schema)


def _load() -> None:
    global LOADED, LOAD_ERROR, LIBRARY_PATH, BUILD_INFO
    info = _HERE / "_build_info.json"
    if info.exists():
        try:
            BUILD_INFO = json.loads(info.read_text())
        except ValueError as e:
            BUILD_INFO = {"error": f"unreadable _build_info.json: {e}"}
    if os.environ.get("DIFFCR_DISABLE_EXT", "0") == "1":
        LOAD_ERROR = "disabled by DIFFCR_DISABLE_EXT=1"
        return
    cands = sorted(_HERE.glob("_C*.so")) + sorted(_HERE.glob("_C*.pyd"))
    if not cands:
        if (_HERE.parent / "setup.py").exists():
            LOAD_ERROR = (f"imported from the source tree {_HERE} (no compiled extension there): "
                          "run from another directory to use the installed package, or build "
                          "in place with `pip install --no-build-isolation -e .`")
        else:
            LOAD_ERROR = ("no compiled extension in the installed package (it was installed "
                          "with DIFFCR_SKIP_EXT=1)")
        return
    LIBRARY_PATH = str(cands[0])
    try:
        _define_ops()
        torch.ops.load_library(LIBRARY_PATH)
    except Exception as e:  # noqa: BLE001 - any load failure must leave the library usable
        built = BUILD_INFO.get("torch")
        hint = (f" (built against torch {built}, running torch {torch.__version__})"
                if built and built != torch.__version__ else "")
        LOAD_ERROR = f"{type(e).__name__}: {e}{hint}".strip()
        return
    LOADED = True
    for op in _OPS:
        for key in ("CPU", "CUDA"):
            try:
                _KERNELS[(op, key)] = bool(
                    torch._C._dispatch_has_kernel_for_dispatch_key(f"diffcr::{op}", key))
            except RuntimeError:
                _KERNELS[(op, key)] = False


_load()


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``diffcr::<op>`` has a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    return _KERNELS.get((op, dispatch_key), False)
