"""diffcr: DiffCR (arXiv 2412.16822) for Diffusion Transformers.

A per-block router scores image tokens, only the top-k tokens run through the block, and k comes
from a compression ratio learned per block and timestep region through a differentiable two-bin
interpolation. The low-level ops live in :mod:`diffcr_kernels`.

Typical use::

    import diffcr
    diffcr.convert(model, diffcr.DiffCRConfig(target_kept_ratio=0.8, num_regions=4))
    loss = diffusion_loss + diffcr.ratio_loss(model)      # training
    diffcr.freeze(model)                                   # inference: fixed k per block/region
    diffcr.save(model, "out/diffcr")                       # routers + ratios + config only
    diffcr.enable_token_cache(model, diffcr.TokenCacheConfig(refresh_every=3))
                                           # skipped tokens reuse their last update
"""
from diffcr_kernels import available_backends

from ._version import __version__
from .config import DiffCRConfig
from .cpu import prepack_linears, unpack_linears
from .convert import (compile_model, convert, convert_pipeline, freeze, is_converted, revert,
                      routed_blocks, set_timestep, unfreeze)
from .models import ModelFamily, families, family_for, register_family
from .routing import BlockRouting, RoutingState, routing_state
from .io import CheckpointError, load, save
from .lora import LoraError, add_lora, load_lora, lora_parameters, save_lora
from .modules import DifferentiableRatio, Router
from .cache_control import (dense_teacher, disable_token_cache, enable_token_cache,
                            fill_token_cache, kept_ratio_override, mask_routing,
                            reset_token_cache, shard_routing, token_cache_of)
from .token_cache import TokenCacheConfig, token_cache_bytes
from .training import (attach_ratio_projection, format_ratio_table, mean_kept_ratio,
                       project_ratios, ratio_loss, ratio_parameters, ratio_table,
                       router_parameters)

__all__ = [
    "BlockRouting", "CheckpointError", "DiffCRConfig", "DifferentiableRatio", "LoraError",
    "ModelFamily", "add_lora", "load_lora", "lora_parameters", "save_lora",
    "Router", "RoutingState", "__version__", "attach_ratio_projection", "available_backends",
    "compile_model", "convert", "convert_pipeline", "families", "family_for",
    "format_ratio_table", "freeze",
    "is_converted", "load", "mean_kept_ratio", "prepack_linears", "project_ratios", "ratio_loss",
    "ratio_parameters", "ratio_table", "register_family", "revert", "routed_blocks",
    "router_parameters", "routing_state", "save", "set_timestep", "unfreeze", "unpack_linears",
    "TokenCacheConfig", "enable_token_cache", "disable_token_cache", "reset_token_cache",
    "fill_token_cache", "kept_ratio_override", "dense_teacher", "token_cache_bytes",
    "token_cache_of", "shard_routing", "mask_routing",
]
