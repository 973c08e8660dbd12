"""diffcr: DiffCR (arXiv 2412.16822) for Diffusion Transformers.

A per-block router scores image tokens, only the top-k tokens run through the block, and k comes
from a compression ratio learned per block and timestep region through a differentiable two-bin
interpolation. The low-level ops live in :mod:`diffcr_kernels`.
"""
from ._version import __version__
from diffcr_kernels import available_backends

__all__ = ["__version__", "available_backends"]
