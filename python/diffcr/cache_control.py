"""Turning the token cache of a converted model on and off (:mod:`diffcr.token_cache` has
how it works), starting a new generation, filling it for cache-aware fine-tuning, a per-call
override of the kept ratio, mask-aware routing (tokens every block computes: an inpainting
region), and the dense teacher of fine-tuning (the model as before conversion, from the same
weights)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional, Tuple

import torch
from torch import nn

from .keep_mask import KeepMask
from .routing import routing_state
from .token_cache import TokenCache, TokenCacheConfig

__all__ = ["enable_token_cache", "disable_token_cache", "reset_token_cache", "fill_token_cache",
           "token_cache_of", "kept_ratio_override", "dense_teacher", "shard_routing", "mask_routing"]


def token_cache_of(model: nn.Module) -> Optional[TokenCache]:
    """The :class:`TokenCache` of a converted model (None when it is off)."""
    return routing_state(model).token_cache


def enable_token_cache(model: nn.Module, config: Optional[TokenCacheConfig] = None
                       ) -> TokenCache:
    """Turn the token cache on for a converted model: a fresh, empty cache with ``config``
    (default :class:`~diffcr.TokenCacheConfig()`; how it works: :mod:`diffcr.token_cache`).
    Returns it."""
    st = routing_state(model)
    cfg = config if config is not None else TokenCacheConfig()
    if not isinstance(cfg, TokenCacheConfig):
        raise TypeError(f"config must be a diffcr.TokenCacheConfig, got {type(cfg).__name__}")
    if st.config.selection == "random" and cfg.staleness:
        raise ValueError("TokenCacheConfig.staleness needs router scores (selection='router')")
    st.token_cache = TokenCache(cfg)
    return st.token_cache


def disable_token_cache(model: nn.Module) -> None:
    """Turn the token cache off (skipped tokens get no update again) and free it."""
    routing_state(model).token_cache = None


def reset_token_cache(model: nn.Module) -> None:
    """Start a new generation: forget every cached update (the next forward is a refresh).
    A no-op when the token cache is off."""
    tc = token_cache_of(model)
    if tc is not None:
        tc.reset()


@torch.no_grad()
def fill_token_cache(model: nn.Module, *args, **kwargs) -> None:
    """Cache-aware fine-tuning: start a new generation and run ``model(*args, **kwargs)``
    without gradient as its refresh step (every token's update cached), so that the next
    forward (the training forward, at a lower noise level) routes with the skipped tokens'
    forecast, as a sampler's next step would."""
    tc = token_cache_of(model)
    if tc is None:
        raise ValueError("diffcr: the token cache is off (diffcr.enable_token_cache first)")
    tc.reset()
    model(*args, **kwargs)


@contextmanager
def kept_ratio_override(model: nn.Module, kappa: Optional[float]):
    """Every routed block of ``model`` keeps ``kappa`` of its tokens inside the context (one
    segment, no two-bin interpolation), whatever its learned or frozen ratio (``kappa`` 1: a
    full step; None: no override). The frozen bins are left as they are."""
    if kappa is not None and not (0.0 < float(kappa) <= 1.0):
        raise ValueError(f"kept ratio must be in (0, 1], got {kappa!r}")
    st = routing_state(model)
    before = st.kept_override
    st.kept_override = kappa
    try:
        yield
    finally:
        st.kept_override = before


@contextmanager
def shard_routing(model: nn.Module, shards: int):
    """Inside the context, every routed block of ``model`` routes each of ``shards`` equal,
    contiguous slices of its tokens on its own: the top ``k`` of each slice, ``k`` the block's
    kept count for one slice, and the block then runs on all the kept tokens together.

    That is what routing computes under diffusers' context parallelism over ``shards`` ranks
    (``enable_parallelism(config=ContextParallelConfig(ulysses_degree=shards))``, or ring):
    each rank routes its local shard, and attention spans the kept tokens of every rank. This
    context computes it on one process, as the reference the multi-process result is tested
    against (docs/ecosystem.md, "Several GPUs"). Inference only (one kept count per sample:
    eval mode or :func:`diffcr.freeze`); the token count must divide by ``shards``. With the
    token cache on, each slice is ranked with its staleness term too, as each rank ranks its
    own shard's cached tokens."""
    shards = int(shards)
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    st = routing_state(model)
    before = st.shards
    st.shards = shards
    try:
        yield model
    finally:
        st.shards = before


@contextmanager
def dense_teacher(model: nn.Module, adapters: bool = False):
    """Inside the context, ``model`` computes what it computed before :func:`diffcr.convert`:
    every routed block runs its own diffusers forward on every token, without the router gate,
    and (``adapters=False``, the default) its peft LoRA adapters are switched off. With LoRA
    fine-tuning of frozen base weights that is the dense teacher of the same weights, with no
    second copy in memory (``diffcr train --distill``). The token cache is not touched.

    Call it under ``torch.no_grad()`` for a teacher prediction; nesting is allowed."""
    st = routing_state(model)
    layers = []
    if not adapters:
        try:
            from peft.tuners.tuners_utils import BaseTunerLayer
        except ImportError:  # no peft: no adapters to switch off
            BaseTunerLayer = ()
        layers = [m for m in model.modules() if BaseTunerLayer and isinstance(m, BaseTunerLayer)
                  and not m.disable_adapters]
    before, tc = st.plain, st.token_cache
    st.plain, st.token_cache = True, None
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)
        st.plain, st.token_cache = before, tc


@contextmanager
def mask_routing(target, mask, margin: int = 1, context_kept_ratio: Optional[float] = None,
                 bucket: float = 1 / 32, grid: Optional[Tuple[int, int]] = None):
    """Mask-aware routing (inpainting): inside the context, every routed block of ``target`` (a
    converted model, or a pipeline whose ``transformer`` / ``transformer_2`` are converted)
    computes every token ``mask`` marks, and keeps its learned ratio of the other (context)
    tokens, as its router ranks them (:mod:`diffcr.keep_mask`).

    Args:
        mask: the inpainting mask at any resolution with the image's aspect ratio, e.g. the
            pipeline's own ``mask_image`` (PIL image, numpy array, or tensor ``[H, W]`` /
            ``[M, H, W]`` / ``[M, 1, H, W]``; white / above half its range = to inpaint), one
            for the whole batch or one per sample (``M`` = the batch the transformer sees:
            with classifier-free guidance in one batch, twice the prompts). A token is masked
            when any pixel of its patch is.
        margin: dilation of the mask by this many tokens (the context at its edge).
        context_kept_ratio: kept ratio of the context tokens in every block (None: each
            block's own learned or frozen ratio).
        bucket: the masked count is rounded up to a multiple of ``ceil(bucket * N)`` tokens
            (more tokens computed, fewer distinct kept counts: static shapes for compiled
            and CUDA-graph runs across masks of about the same size).
        grid: ``(rows, columns)`` of the image tokens the mask covers when they are not all
            of a block's tokens: an edit model (``FluxKontextPipeline``, Qwen-Image-Edit)
            appends its condition image's tokens after the generated image's, so
            ``grid=(h, w)`` of the generated image (Flux, Qwen-Image: height // 16, width //
            16) with an all-ones mask computes every generated token and routes the
            condition tokens as context. None: the grid of all the tokens, from the mask's
            aspect ratio.

    Without ``context_kept_ratio``, a block at kept ratio 1 stays dense; with it, every routed
    block keeps that share of the context, whatever its own ratio. ``last_kappa`` reports the
    block's own ratio. Not with context parallelism or :func:`shard_routing` (refused);
    videos are not supported (one mask per image grid)."""
    keep = KeepMask(mask, margin=margin, context_kept_ratio=context_kept_ratio, bucket=bucket,
                    grid=grid)
    models = [target] if isinstance(target, nn.Module) else [
        m for m in (getattr(target, "transformer", None), getattr(target, "transformer_2", None))
        if m is not None]
    states = [routing_state(m) for m in models]
    if not states:
        raise ValueError(f"diffcr.mask_routing: {type(target).__name__} is neither a converted "
                         "model nor a pipeline with a transformer")
    before = [st.keep_mask for st in states]
    for st in states:
        st.keep_mask = keep
    try:
        yield target
    finally:
        for st, b in zip(states, before):
            st.keep_mask = b
