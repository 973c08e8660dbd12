"""The one table of the compiled ops' contracts: name -> schema.

Both kernel families are registered from it: ``torch.ops.diffcr.*`` (the C++ CPU and CUDA
kernels of ``diffcr_kernels._C``, which only *implement* these ops: ``csrc/`` holds
``TORCH_LIBRARY_IMPL`` blocks, no schema) and ``torch.ops.diffcr_triton.*`` (the Triton
launchers). Fake kernels and the one autograd registration shared by both live in
:mod:`diffcr_kernels.ops`; what each argument means, with shapes and dtypes, is in the
launchers' docstrings (:mod:`diffcr_kernels.triton.kernels`) and ``csrc/kernels/diffcr_cuda.h``.

Adding an op: one line here, its kernels (C++/CUDA ``m.impl`` and a Triton launcher of the same
name), its fake kernel in ``ops.py``. ``tests/kernels/test_ops.py`` opchecks every op of this table.
"""
from __future__ import annotations

from typing import Dict

SCHEMAS: Dict[str, str] = {
    "gather_norm_modulate": "(Tensor x, Tensor idx, Tensor? shift, Tensor? scale, Tensor? weight, "
    "Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)",
    "gather_norm_modulate_backward": "(Tensor grad_y, Tensor x, Tensor idx, Tensor mean, "
    "Tensor rstd, Tensor? scale, Tensor? weight) -> Tensor",
    "scatter_back": "(Tensor x, Tensor idx, Tensor cu_seqlens, int max_seqlen, "
    "int segs_per_sample, Tensor seg_weight, Tensor attn_update, Tensor? mlp_out, "
    "Tensor? scores, Tensor? gate) -> Tensor",
    "scatter_back_": "(Tensor(a!) x, Tensor idx, Tensor cu_seqlens, int max_seqlen, "
    "int segs_per_sample, Tensor seg_weight, Tensor attn_update, Tensor? mlp_out, "
    "Tensor? scores, Tensor? gate) -> ()",
    "scatter_back_backward": "(Tensor grad_out, Tensor idx, Tensor cu_seqlens, int max_seqlen, "
    "Tensor seg_weight, Tensor attn_update, Tensor? mlp_out, Tensor? scores, "
    "Tensor? gate) -> (Tensor, Tensor, Tensor, Tensor)",
    "apply_token_cache_": "(Tensor(a!) out, Tensor(b!) cache, Tensor slot, Tensor x_rows, "
    "Tensor? miss) -> ()",
}


def mutated_args(name: str) -> tuple:
    """Arguments an op writes into (``Tensor(a!)`` in its schema)."""
    args = SCHEMAS[name].split(") ->")[0].lstrip("(").split(", ")
    return tuple(a.split()[-1] for a in args if "!)" in a.split()[0])
