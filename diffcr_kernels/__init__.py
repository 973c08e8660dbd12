"""diffcr_kernels: the low-level ops of DiffCR's token-routing data path.

No model knowledge lives here. Public ops dispatch to the best available backend (compiled CUDA
kernels, compiled C++ CPU kernels, or the pure-torch reference that defines them):

* :func:`router_scores`          sigmoid(x . w) per token
* :func:`select_topk`            ragged per-segment top-k into the packed layout (:class:`Selection`)
* :func:`gather_rows`            packed rows of the residual stream
* :func:`gather_norm_modulate`   gather + LayerNorm + adaLN modulate
* :func:`varlen_attention`       self/cross attention over packed segments
  (:func:`selection_attention`: self-attention in each segment of a :class:`Selection`;
  :func:`shared_bins_attention`: the same for the two nested training bins, from the larger
  bin's rows)
* :func:`scatter_back`           gated, bin-weighted scatter-back into the residual stream
  (:func:`scatter_back_`: the same, in place, for inference)
* :func:`apply_token_cache_`     the token cache of a routed block: skipped rows receive their
  cached update, selected rows' new updates go into the cache (one pass, inference)

:func:`available_backends` reports what loaded and why not.
"""
from __future__ import annotations

from typing import Dict

import torch

from . import _ext, reference
from ._schemas import SCHEMAS
from .attention import (available_attention_backends, nested_attention, nested_pays,
                        nested_plan, nested_tables, selection_attention,
                        shared_bins_attention, varlen_attention)
from .ops import (
    apply_token_cache_,
    current_backend,
    gather_norm_modulate,
    gather_rows,
    resolve_backend,
    router_scores,
    scatter_back,
    scatter_back_,
    scatter_back_selection,
    select_topk,
    token_cache_slots,
    use_backend,
)
from .reference import Selection, host_index, kept_count, pack_text

__all__ = [
    "Selection",
    "apply_token_cache_",
    "available_attention_backends",
    "available_backends",
    "current_backend",
    "extension_info",
    "gather_norm_modulate",
    "gather_rows",
    "host_index",
    "kept_count",
    "pack_text",
    "reference",
    "resolve_backend",
    "router_scores",
    "scatter_back",
    "scatter_back_",
    "scatter_back_selection",
    "select_topk",
    "selection_attention",
    "shared_bins_attention",
    "nested_attention",
    "nested_plan",
    "nested_tables",
    "nested_pays",
    "token_cache_slots",
    "use_backend",
    "varlen_attention",
]

#: the ops the compiled extension implements (:data:`diffcr_kernels._schemas.SCHEMAS`)
COMPILED_OPS = tuple(SCHEMAS)


def extension_info() -> Dict[str, object]:
    """The compiled extension: ``{"path": its file or None, "build": what setup.py recorded
    (``_build_info.json``), "error": why it did not load, or None}``."""
    return {"path": _ext.LIBRARY_PATH, "build": _ext.BUILD_INFO, "error": _ext.LOAD_ERROR}


def available_backends() -> Dict[str, Dict[str, str]]:
    """What each kernel backend can do here: ``{backend: {"status": ..., "detail": ...}}``.

    status is ``"loaded"`` (usable now), ``"compiled"`` (built, but no device to run it) or
    ``"unavailable"``; detail says why.
    """
    out: Dict[str, Dict[str, str]] = {
        "reference": {"status": "loaded", "detail": "pure torch, always available"}}
    from . import ops as _ops
    from . import triton as _tr

    if not _tr.AVAILABLE or _ops.TRITON_ERROR:
        out["triton"] = {"status": "unavailable",
                         "detail": _ops.TRITON_ERROR or str(_tr.IMPORT_ERROR)}
    elif torch.cuda.is_available():
        out["triton"] = {"status": "loaded", "detail": f"{len(_ops.SCHEMAS)} ops (CUDA)"}
    elif _tr.INTERPRETED:
        out["triton"] = {"status": "loaded", "detail": f"{len(_ops.SCHEMAS)} ops, interpreter "
                                                       "(TRITON_INTERPRET=1)"}
    else:
        out["triton"] = {"status": "compiled",
                         "detail": f"{len(_ops.SCHEMAS)} ops; no CUDA device here "
                                   "(TRITON_INTERPRET=1 runs them on CPU, slowly)"}
    info = _ext.BUILD_INFO
    if not _ext.LOADED:
        why = _ext.LOAD_ERROR or "extension not loaded"
        out["cpu"] = {"status": "unavailable", "detail": why}
        out["cuda"] = {"status": "unavailable", "detail": why}
        return out
    cpu_ops = [op for op in COMPILED_OPS if _ext.has_kernel(op, "CPU")]
    out["cpu"] = ({"status": "loaded", "detail": f"{len(cpu_ops)} ops from {_ext.LIBRARY_PATH}"}
                  if cpu_ops else {"status": "unavailable", "detail": "no CPU kernels registered"})
    cuda_ops = [op for op in COMPILED_OPS if _ext.has_kernel(op, "CUDA")]
    if not cuda_ops:
        why = info.get("why_no_cuda") or "extension built without CUDA kernels"
        out["cuda"] = {"status": "unavailable", "detail": why}
    elif torch.cuda.is_available():
        out["cuda"] = {"status": "loaded",
                       "detail": f"{len(cuda_ops)} ops, archs {info.get('cuda_archs')}"}
    else:
        out["cuda"] = {"status": "compiled",
                       "detail": f"{len(cuda_ops)} ops for archs {info.get('cuda_archs')}; "
                                 "no CUDA device here to run them"}
    return out
