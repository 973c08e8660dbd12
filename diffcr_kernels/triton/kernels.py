"""The Triton launchers of every op, in one namespace (one file per op: :mod:`.gather_norm`,
:mod:`.scatter`, :mod:`.token_cache`, :mod:`.router`, :mod:`.select`; shared sizes and checks in
:mod:`._common`).

The launchers mirror the compiled ``torch.ops.diffcr.*`` operators (one schema table for both:
``diffcr_kernels/_schemas.py``) argument for argument and output for output, and the kernels
follow the CUDA kernels of ``csrc/kernels/*.cu`` (same formulas, same order of operations where
it matters, same deterministic slot-by-slot scatter). They do no ``torch.library``
registration: dispatch is wired in :mod:`diffcr_kernels.ops`.
"""
from ._common import INTERPRETED, MAX_BLOCK_D, MAX_BLOCK_R  # noqa: F401
from .gather_norm import gather_norm_modulate, gather_norm_modulate_backward
from .router import router_scores
from .scatter import scatter_back, scatter_back_, scatter_back_backward
from .token_cache import apply_token_cache_

__all__ = [
    "INTERPRETED",
    "apply_token_cache_",
    "MAX_BLOCK_D",
    "MAX_BLOCK_R",
    "gather_norm_modulate",
    "gather_norm_modulate_backward",
    "scatter_back",
    "scatter_back_",
    "scatter_back_backward",
    "router_scores",
]
