"""Turning a diffusers DiT into a token-routed DiffCR model in place, and back.

:func:`convert` finds the model's family (:mod:`diffcr.models`), swaps the class of every routed
block to its routed subclass (:func:`diffcr.routing.routed_class`: same weights, same
state-dict keys, the diffusers class as base) and adds two modules per routed block: ``router``
(:class:`~diffcr.modules.Router`) and ``ratio`` (:class:`~diffcr.modules.DifferentiableRatio`).
A forward pre-hook on the model captures the raw timestep of each forward and maps each
sample to its noise level and region (a host copy). ``torch.compile(model)`` and
``model.compile()`` keep that copy outside the compiled graph by construction
(:class:`_HostTimestepCall`, :func:`compile_model`). :func:`revert` undoes all of it exactly.

Order with diffusers hooks (caches, offloading, layerwise casting): convert first, then apply
them; remove them before :func:`revert`. Hooks that sit inside blocks (attention-level caches,
layerwise casting of the linears) may also be present before convert.
"""
from __future__ import annotations

import functools

from typing import Dict, List

import torch
from torch import nn

from .config import DiffCRConfig
from .models import ModelFamily, display_name, families, family_for, warn_once
from .modules import DifferentiableRatio, Router
from .routing import (BlockRouting, RoutingState, attach_block, attach_state, base_class,
                      detach_block, detach_state, find_routing_state, routed_class,
                      routing_state, static_ratios)

__all__ = ["convert", "convert_pipeline", "revert", "freeze", "unfreeze", "is_converted",
           "routed_blocks",
           "set_timestep", "compile_model", "routing_state", "SUPPORTED_MODELS"]

SUPPORTED_MODELS = tuple(c for f in families().values() for c in f.model_classes)


# ------------------------------------------------------------------------ timestep capture
def _capture_timestep(model, args, kwargs):
    st: RoutingState = routing_state(model)
    if st.timestep_held:  # recorded before the compiled region (_HostTimestepCall)
        return None
    t = st.family.timestep_of_call(model, args, kwargs)
    if t is None:
        st.clear_timesteps()
        return None
    set_timestep(model, t)
    return None


def set_timestep(model: nn.Module, t) -> None:
    """Record the raw timestep(s) of the next forward (the model's pre-hook does this itself;
    use it only to call converted blocks directly). ``t``: number, or tensor ``[B]`` / scalar."""
    st = routing_state(model)
    if torch.is_tensor(t):
        vals = t.detach().reshape(-1).double().cpu().tolist()  # one host copy per forward
    elif isinstance(t, (int, float)):
        vals = [float(t)]
    else:
        vals = [float(v) for v in t]
    st.set_timesteps(vals)


@torch.compiler.disable  # host bookkeeping: called from eager frames, never traced
def _eager_first(st: RoutingState, args, kwargs, call):
    """``call()`` outside any compiled graph when this call must run so, else None: the first
    call of each (call slot, input shape) with the token cache on allocates the cache entries,
    and the first call of each input shape under :func:`diffcr.mask_routing` pools the mask to
    every block's token count (host work, kept per mask; in a graph it would be
    data-dependent)."""
    tc, keep = st.token_cache, st.keep_mask
    if tc is None and keep is None:
        return None
    x = kwargs.get("hidden_states", args[0] if args else None)
    shape = tuple(x.shape) if torch.is_tensor(x) else None
    cache_key = None if tc is None else (tc.slot, shape)
    first_cache = tc is not None and cache_key not in tc.allocated
    first_mask = keep is not None and shape not in keep.planned
    if not (first_cache or first_mask):
        return None
    out = call()
    if first_cache:
        tc.allocated.add(cache_key)
    if first_mask:
        keep.planned.add(shape)
    return out


class _HostTimestepCall:
    """The converted model's ``__call__`` as an attribute (``model.__call__``; calling
    ``model(...)`` still goes through the class): what ``torch.compile(model)`` compiles.
    It records the timestep on the host in its own frame, which dynamo skips
    (``torch._dynamo.decorators.skip``: that frame runs eagerly, the frames it calls are
    compiled), and then calls the module, whose frames dynamo compiles (with ``fullgraph=True``
    too): the pre-hook sees ``timestep_held`` and does nothing, so the graph holds no host
    copy. On a torch without that decorator the capture is traced as before (a graph break,
    or an error under ``fullgraph``), never skipped. Routing then reads the host regions as guards,
    as under :func:`compile_model`. A deep copy or pickle of the model carries its own."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        model = self.model
        st = find_routing_state(model)
        if st is None or st.timestep_held:  # reverted, or re-entered: the plain call
            return nn.Module.__call__(model, *args, **kwargs)
        _capture_eagerly(model, args, kwargs)
        st.timestep_held = True
        try:
            out = _eager_first(st, args, kwargs, lambda: _eager_call(model, *args, **kwargs))
            return out if out is not None else nn.Module.__call__(model, *args, **kwargs)
        finally:
            st.timestep_held = False


def _module_call(model, *args, **kwargs):
    return nn.Module.__call__(model, *args, **kwargs)


import torch._dynamo.decorators  # noqa: E402  (diffusers imports dynamo anyway)

# the frames a skipped frame calls are compiled: what must stay on the host is disabled
_eager_call = torch.compiler.disable(_module_call)
_capture_eagerly = torch.compiler.disable(_capture_timestep)
_skip = getattr(torch._dynamo.decorators, "skip", None)  # private API: absent -> traced as before
if _skip is not None:
    _skip(_HostTimestepCall.__call__)  # its frame eager, callees compiled


class _CompileModel:
    """The converted model's ``compile`` (``model.compile(**kw)``): :func:`compile_model`,
    whose compiled forward leaves the timestep capture outside the graph (``nn.Module.compile``
    would compile the pre-hook with it). ``fullgraph`` defaults to False, as in
    ``nn.Module.compile``."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, **compile_kwargs):
        compile_kwargs.setdefault("fullgraph", False)
        compile_model(self.model, **compile_kwargs)


# ------------------------------------------------------------------------ public API
def is_converted(model: nn.Module) -> bool:
    return find_routing_state(model) is not None


def routed_blocks(model: nn.Module) -> Dict[int, nn.Module]:
    """``{block index: block}`` of the routed blocks of a converted model (the index is the
    block's number in ``DiffCRConfig.routed_blocks``)."""
    st = routing_state(model)
    return {i: model.get_submodule(r.name) for i, r in st.blocks.items()}


def _active_hooks(module: nn.Module) -> List[str]:
    reg = module.__dict__.get("_diffusers_hook")
    return list(reg.hooks) if reg is not None else []


def _hooked(modules) -> List[str]:
    return [f"{name or '<model>'} ({', '.join(_active_hooks(m))})" for name, m in modules
            if _active_hooks(m)]


def convert(model: nn.Module, config: DiffCRConfig = None) -> nn.Module:
    """Make ``model`` token-routed, in place; returns the same model.

    ``model``: a diffusers model of a registered family (:mod:`diffcr.models`: the families
    are ``diffcr.families()``, their model classes :data:`SUPPORTED_MODELS`). Adds
    ``transformer_blocks.{i}.router.weight`` and ``transformer_blocks.{i}.ratio.kept`` per
    routed block; every existing parameter, buffer and state-dict key is unchanged. Refuses
    (``TypeError`` / ``ValueError`` naming the problem, model untouched) unsupported model
    classes, blocks of another kind or norm type, feed-forward chunking, already converted
    models, and diffusers hooks on the model or on a block to route (their stored forward
    would bypass routing: apply caches, offloading and layerwise casting *after* convert).
    Outside the diffusers versions the family was tested with, ``path="auto"`` runs the
    compat path (with one warning) and ``path="fused"`` is refused.
    """
    config = DiffCRConfig() if config is None else config
    if not isinstance(config, DiffCRConfig):
        raise TypeError(f"config must be a DiffCRConfig, got {type(config).__name__}")
    config.validate()
    family: ModelFamily = family_for(model)
    name = type(model).__name__
    if is_converted(model):
        raise ValueError(f"diffcr: this {name} is already converted (diffcr.revert it first)")
    positions = family.blocks(model)
    if not positions:
        raise TypeError(f"diffcr: {name} has no {' / '.join(family.block_lists)} to route")
    idx = config.routed_indices(len(positions))
    hooked = _hooked([("", model)] + [positions[i] for i in idx])
    if hooked:
        raise ValueError(
            f"diffcr: {name} carries diffusers hooks on {hooked[:5]} (a cache, offloading or "
            "layerwise casting applied to the model or its blocks). Their stored forward would "
            "bypass routing. Remove them (e.g. model.disable_cache(), or "
            "HookRegistry.remove_hook), call diffcr.convert, then apply them again.")
    for i in idx:
        family.check_block(display_name(positions[i][0]), positions[i][1])
    version_why = family.diffusers_tested()
    if version_why is not None and config.path == "fused":
        raise ValueError(f"diffcr: path='fused' refused: {version_why}; use path='auto' "
                         "(runs the compat path there) or 'compat'")
    fused_why = {i: version_why or family.fused_unsupported_reason(positions[i][1])
                 for i in idx}
    if config.path == "fused":
        bad = {i: w for i, w in fused_why.items() if w is not None}
        if bad:
            raise ValueError(f"diffcr: path='fused' cannot run these blocks: {bad}; use "
                             "path='auto' (fused where possible) or 'compat'")
    if version_why is not None and config.path == "auto":
        warn_once(("diffusers", family.name),
                  f"diffcr: {version_why}; path='auto' runs the compat path only")
    if config.num_train_timesteps is None:
        inferred = family.default_num_train_timesteps(model)
        if inferred is not None:
            config = DiffCRConfig.from_dict({**config.to_dict(), "num_train_timesteps": inferred})
    state = RoutingState(config=config, family=family)
    dtype = config.torch_dtype()
    for i in idx:
        qual, b = positions[i]
        p = next(b.parameters())
        dim = family.hidden_size(b)
        b.__class__ = routed_class(type(b))
        b.router = Router(dim, config.gate, config.router_init_std, dtype=dtype,
                          device=p.device)
        b.ratio = DifferentiableRatio(config.num_regions, config.bins, config.init_kept_ratio,
                                      dtype=dtype, device=p.device)
        routing = BlockRouting(name=qual, index=i, state=state, fused_reason=fused_why[i])
        attach_block(b, routing)
        family.mlp_module(b).register_forward_hook(routing.mlp_gate)
        state.blocks[i] = routing
    attach_state(model, state)
    _declare_routed_classes(model, {type(positions[i][1]) for i in idx})
    model.register_forward_pre_hook(_capture_timestep, with_kwargs=True)
    # bound methods: what torch.compile wraps must be a function (it traces a callable object
    # from a frame of its own, which would inline the capture), and a deep copy of the model
    # gets methods of its own copy
    model.__dict__["__call__"] = _HostTimestepCall(model).__call__
    model.__dict__["compile"] = _CompileModel(model).__call__
    return model


#: the diffusers class attributes that name block classes or module names, extended per
#: converted model (instance attributes, removed by revert): ``_repeated_blocks``
#: (``compile_repeated_blocks``) and ``_no_split_modules`` (device maps, offloading) match
#: blocks by class name, and the routed classes are renamed ``Routed<Name>``;
#: ``_keep_in_fp32_modules`` gets the router and ratio, so a model loaded or cast to
#: fp16/bf16 keeps them float32 by declaration
_DECLARED = ("_repeated_blocks", "_no_split_modules", "_keep_in_fp32_modules")


def _names(value) -> list:
    """A diffusers name-list attribute as a list (diffusers also accepts one bare string)."""
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def _declare_routed_classes(model: nn.Module, routed: set) -> None:
    renamed = {base_class(c).__name__: c.__name__ for c in routed}
    for attr in _DECLARED[:2]:
        names = _names(getattr(type(model), attr, None))
        if names:
            extra = [renamed[n] for n in names if n in renamed]
            model.__dict__[attr] = names + [n for n in extra if n not in names]
    keep = _names(getattr(type(model), "_keep_in_fp32_modules", None))
    model.__dict__["_keep_in_fp32_modules"] = keep + [n for n in ("router", "ratio")
                                                      if n not in keep]


def convert_pipeline(pipe, config: DiffCRConfig = None) -> List[str]:
    """Convert every transformer of a diffusers pipeline that a registered family handles, each
    with its own routers and ratios; returns the component names converted.

    Wan 2.2 A14B pipelines hold two experts (``transformer`` for high noise, ``transformer_2``
    for low noise): both are converted, and each learns ratios for the regions it serves.
    Components converted before are left as they are, with a warning when that leaves the
    experts in different states (one routed, one dense is rarely intended)."""
    comps = getattr(pipe, "components", None)
    if not isinstance(comps, dict):
        raise TypeError(f"convert_pipeline expects a diffusers pipeline, got "
                        f"{type(pipe).__name__}")
    names = [n for n, m in comps.items()
             if isinstance(m, nn.Module) and n.startswith("transformer")]
    if not names:
        raise ValueError(f"diffcr: {type(pipe).__name__} has no transformer component")
    for n in names:
        family_for(comps[n])  # refuse before anything changes
    before = [n for n in names if is_converted(comps[n])]
    done = []
    for n in names:
        if n not in before:
            convert(comps[n], config)
            done.append(n)
    if before and done:
        import warnings

        warnings.warn(f"diffcr: {before} were already converted and kept their own config; "
                      f"{done} were converted now", stacklevel=2)
    return done


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert` exactly: original block classes, no router/ratio modules, no hooks
    or attributes of diffcr. Refused (``ValueError``, model untouched) while diffusers hooks
    applied after convert still wrap the model or a routed block: remove them first."""
    st = routing_state(model)
    blocks = routed_blocks(model)
    hooked = _hooked([("", model)] + [(st.blocks[i].name, b) for i, b in blocks.items()])
    if hooked:
        raise ValueError(f"diffcr: cannot revert while diffusers hooks wrap {hooked[:5]}; "
                         "remove them first (e.g. model.disable_cache(), or "
                         "HookRegistry.remove_hook), then revert")
    _remove_hook(model._forward_pre_hooks, _capture_timestep, model)
    for i, b in blocks.items():
        routing = st.blocks[i]
        ff = st.family.mlp_module(b)
        _remove_hook(ff._forward_hooks, routing.mlp_gate, ff)
        del b.router
        del b.ratio
        detach_block(b)
        b.__class__ = base_class(type(b))
    if model.__dict__.get("_diffcr_compiled", False):
        model.__dict__.pop("forward", None)
        model.__dict__.pop("_diffcr_compiled", None)
    for attr in _DECLARED + ("__call__", "compile"):
        model.__dict__.pop(attr, None)
    detach_state(model)
    return model


def _remove_hook(table, fn, module) -> None:
    """Remove our hook by identity (no handle is stored, so converted models deep-copy and
    pickle like any module)."""
    for key in [k for k, v in table.items() if v is fn]:
        del table[key]
        for extra in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
                      "_forward_hooks_always_called"):
            getattr(module, extra, {}).pop(key, None)


def freeze(model: nn.Module, *, inplace_residual: bool = False) -> nn.Module:
    """Inference mode of the ratios: each (block, region) uses the bin nearest to its learned
    ratio, fixed, with one branch; k is static per (block, region) and no ratio value is read
    from the device during a forward. Training mode of the model no longer changes the routing;
    :func:`unfreeze` undoes it.

    ``inplace_residual=True``: without autograd, each routed block adds its kept rows into its
    input ``hidden_states`` in place and returns it (:func:`diffcr_kernels.scatter_back_`)
    instead of copying the whole ``[B, N, D]`` residual stream first. Safe inside the model's
    own forward, where a block's input is an intermediate that nothing else reads; leave it
    off when something keeps block inputs (a hook or cache that compares a block's output with
    its input, e.g. diffusers' FirstBlockCache or MagCache, or your own code calling blocks
    directly)."""
    st = routing_state(model)
    if not isinstance(inplace_residual, bool):
        raise ValueError(f"inplace_residual must be True or False, got {inplace_residual!r}")
    for i, b in routed_blocks(model).items():
        st.blocks[i].frozen_bins = static_ratios(b.ratio.nearest_bins())
        b.ratio.kept.requires_grad_(False)  # not used while frozen (e.g. MoD training, DDP)
    st.frozen = True
    st.inplace_residual = inplace_residual
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    st = routing_state(model)
    for i, b in routed_blocks(model).items():
        st.blocks[i].frozen_bins = None
        b.ratio.kept.requires_grad_(True)
    st.frozen = False
    st.inplace_residual = False
    return model


def compile_model(model: nn.Module, **compile_kwargs) -> nn.Module:
    """``torch.compile`` a converted model's ``forward`` (default ``fullgraph=True``) in place.

    Unlike ``model.compile()``, this keeps diffcr's forward pre-hook (which copies the timestep
    to the host and picks each sample's region) outside the compiled graph, so the graph has
    no host sync. Routing is static per (block, region) once :func:`freeze` is applied: each
    distinct set of regions compiles once (guards on the host regions), and the graph is
    CUDA-graph friendly (``mode="reduce-overhead"``). :func:`revert` removes the compiled
    forward. Works inside diffusers pipelines (they call the module, which runs the hook and
    then the compiled forward).

    With the token cache on (:func:`diffcr.enable_token_cache`), the step is read in the graph
    as a device tensor and the refresh decision as a host bool, so denoising steps reuse two
    graphs (refresh and routed) instead of compiling one per step; the first forward of each
    input shape and call slot runs eagerly, because it allocates the cache.
    """
    st = routing_state(model)
    compile_kwargs.setdefault("fullgraph", True)
    forward = type(model).forward.__get__(model)
    compiled = torch.compile(forward, **compile_kwargs)

    @functools.wraps(forward)
    def run(*args, **kwargs):
        out = _eager_first(st, args, kwargs, lambda: forward(*args, **kwargs))
        return out if out is not None else compiled(*args, **kwargs)

    model.forward = run
    model._diffcr_compiled = True
    return model
