"""The routing runtime: the state a converted model carries and the forward of a routed block.

One :class:`RoutingState` per converted model (``diffcr.routing_state(model)``) holds the
config, the model family, the noise levels and regions of the current forward, the frozen
flag and one :class:`BlockRouting` per routed block. A routed block keeps its diffusers class
as a base: :func:`routed_class` makes one subclass per block class (``Routed<Name>``) whose
``forward`` hands the call to :meth:`BlockRouting.forward`, which runs the family's fused
forward or the block's own diffusers forward on the selected tokens (method §1-§3, §7).

Why a class swap rather than a diffusers ``ModelHook`` (the other way to wrap a forward):
diffusers hooks live in closures and ``functools.partial`` objects on the module, which
``copy.deepcopy`` shares with the original (the copy silently runs the original's forward)
and ``pickle`` refuses. Converted models are deep-copied for EMA and checkpoints, so the
routed forward lives in a class. The routed class is registered in diffusers'
``TransformerBlockRegistry`` with its base's metadata, so block-level caches
(``apply_first_block_cache``, ``apply_mag_cache``) and offloading applied *after*
:func:`diffcr.convert` wrap the routed forward like any other block forward.

Per block, exactly one attribute is added besides the ``router`` and ``ratio`` submodules
(which give the state-dict keys ``…router.weight`` and ``…ratio.kept``): ``_diffcr``, its
:class:`BlockRouting` (set and removed through :func:`attach_block` / :func:`detach_block`;
the model's :class:`RoutingState` likewise, :func:`attach_state`). The router gate reaches the
feed-forward through a :class:`~diffcr.modules.MlpGate` forward hook owned by that object (no
attribute is set on the feed-forward module).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import diffcr_kernels as dk

from .config import DiffCRConfig
from .models.base import ForwardParams
# MlpGate lived here before diffcr.modules; converted models pickled then name it here
from .modules import MlpGate
from .keep_mask import KeepMask
from .token_cache import TokenCache, apply_token_cache

__all__ = ["RoutingState", "BlockRouting", "static_ratios", "routed_class", "base_class", "routing_state",
           "find_routing_state", "attach_state", "detach_state", "attach_block", "detach_block"]


class _Transient:
    """Holds a per-forward value (the ratios used, with their autograd graph). Dropped by
    deepcopy and pickling, so a model can be copied right after a training forward (EMA,
    checkpoints)."""

    __slots__ = ("value",)

    def __init__(self, value=None):
        self.value = value

    def __deepcopy__(self, memo):
        return _Transient(None)

    def __getstate__(self):
        return None

    def __setstate__(self, state):
        self.value = None


@dataclass
class BlockRouting:
    """Routing of one block. Public fields:

    ``name``: the block's qualified name (``"transformer_blocks.3"``); ``index``: its index in
    the model's routable blocks (the numbering of ``DiffCRConfig.routed_blocks``);
    ``frozen_bins``: per region, the kept ratio fixed by :func:`diffcr.freeze` (None when not
    frozen; a list of floats, held as a tuple that compiled code reads as constants, see
    :func:`static_ratios`: each read returns a new list, so change the ratios by assigning a
    list, not by mutating the one read); ``fused_reason``: why the fused path cannot run this block (None:
    it can);
    ``last_kappa``: the kept ratios the last forward used, ``[B]`` (differentiable in training,
    None before the first forward); ``last_path``: the path the last forward took (None before
    the first): ``"dense"`` (every token kept: the block's own forward on all tokens, the router
    gating the MLP branch), ``"fused"`` (the family's fused forward over the packed selection)
    or ``"compat"`` (the block's own forward on the gathered tokens), and with the token cache
    on ``"refresh"`` (a refresh step: every token computed and its update cached);
    ``last_compat_reason``: why the last routed forward took the compat path rather than the
    fused one (``"path='compat'"``, ``"context parallelism is active ..."``, a diffusers hook,
    ...; None when it took the fused path or computed every token);
    ``last_selection``: the :class:`~diffcr_kernels.Selection` the last forward routed with
    (None when it computed every token).
    """

    name: str
    index: int
    state: "RoutingState"
    fused_reason: Optional[str] = None
    _frozen: Optional[Tuple[float, ...]] = None
    last_path: Optional[str] = None
    last_compat_reason: Optional[str] = None
    mlp_gate: MlpGate = field(default_factory=MlpGate)
    _kappa: _Transient = field(default_factory=_Transient)
    _sel: _Transient = field(default_factory=_Transient)

    @property
    def frozen_bins(self) -> Optional[List[float]]:
        return None if self._frozen is None else list(self._frozen)

    @frozen_bins.setter
    def frozen_bins(self, values: Optional[Sequence[float]]) -> None:
        self._frozen = static_ratios(values)

    @property
    def last_kappa(self) -> Optional[torch.Tensor]:
        return self._kappa.value

    @property
    def last_selection(self):
        return self._sel.value

    # ------------------------------------------------------------------ planning
    def plan(self, block: nn.Module, B: int, N: int):
        """Kept counts ``[B][P]`` (host), two-bin weights ``[B, 2]`` or None, ratios ``[B]``."""
        st = self.state
        if st.regions is None:
            raise RuntimeError(
                "diffcr: no timestep was captured for this forward. Call the converted "
                "model itself (its forward pre-hook records the timestep), or set one with "
                "diffcr.set_timestep(model, t) before calling a block directly.")
        if len(st.regions) != B:
            if len(st.regions) == 1:
                regions = st.regions * B
            else:
                raise RuntimeError(f"diffcr: captured {len(st.regions)} timesteps for a "
                                   f"batch of {B}")
        else:
            regions = st.regions
        ratio = block.ratio
        # the tuples, not the public list views: Dynamo keeps their floats constant
        # (static_ratios)
        if st._kept_override:
            kappa = st._kept_override[0]
            return [[dk.kept_count(kappa, N)]] * B, None, torch.full((B,), kappa)
        if st.frozen:
            bins = self._frozen
            ks = [[dk.kept_count(bins[r], N)] for r in regions]
            return ks, None, torch.tensor([bins[r] for r in regions])
        if block.training:
            plan = ratio.two_bin(regions, N)
            return plan.k, plan.weights, plan.kappa
        nearest = ratio.nearest_bins()
        ks = [[dk.kept_count(nearest[r], N)] for r in regions]
        return ks, None, torch.tensor([nearest[r] for r in regions])

    def gate(self, block: nn.Module, scores: torch.Tensor) -> torch.Tensor:
        """Factor on the MLP branch of each token: the router gate, or 1 for random
        selection."""
        if self.state.config.selection == "random":
            return torch.ones_like(scores)
        return block.router.gate_factor(scores)

    def use_fused(self, block: nn.Module, call: dict, inner_hooks) -> bool:
        """Whether this call runs the family's fused forward (path and block permitting); when
        not, the reason is in ``last_compat_reason``."""
        why = self._compat_reason(block, call, inner_hooks)
        self.last_compat_reason = why
        return why is None

    def _compat_reason(self, block: nn.Module, call: dict, inner_hooks) -> Optional[str]:
        st = self.state
        mode = st.config.path
        if mode == "compat":
            return "path='compat'"
        why = self.fused_reason or st.family.call_fused_reason(block, call)
        if why is None:
            # the fused path runs its own attention over the local tokens: under diffusers'
            # context parallelism (Ulysses / ring) that would attend to this rank's shard only,
            # while the block's own attention processor takes part in the collective
            why = context_parallel_reason(block)
        # (autocast runs fused: the ops cast their inputs as the block's eager code would meet
        # them, diffcr_kernels.autocast)
        if why is None:
            other = [(name, h) for name, h, _ in inner_hooks if h not in _FUSED_SAFE_HOOKS]
            if other:
                # the fused path calls the block's linears itself, never its attention or
                # feed-forward modules: hooks on those would be bypassed
                why = f"diffusers hook {other[0][1]!r} on {other[0][0]}"
        if why is not None and mode == "fused":
            raise RuntimeError(f"diffcr: path='fused' cannot run this call of {self.name} "
                               f"({why}); use path='auto' or 'compat'")
        return why

    # ------------------------------------------------------------------ forward
    def forward(self, block: nn.Module, base_forward: Callable, args, kwargs):
        """The routed forward of ``block``; ``base_forward`` is its diffusers forward."""
        st = self.state
        family = st.family
        call = family.bind(block, args, kwargs)
        x = call["hidden_states"]
        if x.dim() != 3:
            raise ValueError(f"diffcr: block input must be [B, N, D], got {tuple(x.shape)}")
        B, N, D = x.shape
        if st.plain:  # the block as before conversion (a dense teacher)
            self.last_path = "dense"
            self.last_compat_reason = None
            self._sel = _Transient(None)
            with family.call_context(block, call):
                return base_forward(**call)
        shards = st.shards
        if shards > 1:  # diffcr.shard_routing: k of each slice, as each rank under CP
            if N % shards:
                raise ValueError(f"diffcr.shard_routing: {N} tokens do not split into "
                                 f"{shards} equal shards")
            ks, weights, kappa = self.plan(block, B, N // shards)
            if weights is not None or any(len(k) != 1 for k in ks):
                raise RuntimeError("diffcr.shard_routing is for inference: put the model in "
                                   "eval mode or freeze it")
            ks = [[k[0] * shards] for k in ks]
        else:
            ks, weights, kappa = self.plan(block, B, N)
        cache = data_dependent_cache(block)  # one dict lookup; the rest only with a cache
        if cache is not None and context_parallel_reason(block) is not None and not (
                len(ks[0]) == 1 and all(k[0] == N for k in ks)):
            # each rank would decide from its own shard's residual: ranks could skip
            # different steps (a desync, or a result that depends on the split)
            raise RuntimeError(
                f"diffcr: {cache} on {self.name} decides from each rank's own tokens "
                "whether to skip; under context parallelism with routing that decision "
                "is not made collectively. Remove the cache, or the parallelism, or "
                "route at kept ratio 1 (the token cache works under context parallelism)")
        keep = st.keep_mask
        mask = None
        if keep is not None:  # mask-aware routing: the masked tokens first, then the context
            if shards > 1 or context_parallel_reason(block) is not None:
                raise ValueError("diffcr.mask_routing does not combine with context "
                                 "parallelism or diffcr.shard_routing yet")
            mask, ks = keep.plan(ks, N, x.device)
        self._kappa = _Transient(kappa)
        self._sel = _Transient(None)
        if st.config.selection == "random":
            # baseline: k uniformly random tokens per sample; no router, no gating
            scores = torch.rand(B, N, device=x.device)
        elif st.scorer is not None:
            scores = st.scorer(block, x)
        else:
            scores = block.router(x)  # [B, N] float32
        tc = st.token_cache
        entry = None
        if tc is not None:
            entry = tc.entry(self.index, B, N, D, x.dtype, x.device, create=False)
        with family.call_context(block, call):
            refresh = tc is not None and (entry is None or tc.is_refresh())
            if refresh or (len(ks[0]) == 1 and all(k[0] == N for k in ks)):
                # every token kept: the dense block, with the router gating the MLP branch
                # (a token-cache refresh: the same, or the plain block, and every update cached)
                self.last_path = "refresh" if refresh else "dense"
                self.last_compat_reason = None
                if refresh and tc.config.plain_refresh:
                    out = base_forward(**call)
                else:
                    with self.mlp_gate.scaled(family.gate_scale(block, self.gate(block, scores),
                                                                call)):
                        out = base_forward(**call)
                if tc is not None:
                    e = tc.entry(self.index, B, N, D, x.dtype, x.device, create=True,
                                 num_blocks=len(st.blocks))
                    e.write(None, (family.hidden_states_of(out) - x).reshape(B * N, D),
                            e.step_t)
                return out
            inner_hooks = _inner_hooks(block)
            for name, hook, stateful in inner_hooks:
                if stateful:
                    raise RuntimeError(
                        f"diffcr: {self.name}.{name} carries the diffusers hook {hook!r}, which "
                        "reuses outputs across steps by token position; routing changes which "
                        "tokens a block processes at every step. With kept ratios below 1 use "
                        "a block-level cache (FirstBlockCache, MagCache), applied after "
                        "diffcr.convert.")
            rank = scores  # what the selection ranks by; the gate keeps the router's score
            if entry is not None and tc.config.staleness:
                # a token not computed for long is chosen
                stale = (entry.step_t - entry.s1).view(B, N).to(scores.dtype)
                rank = scores + tc.config.staleness * stale
            if mask is not None:
                rank = KeepMask.ranking(rank, mask)
            if shards > 1:
                # rank within the slice as the score: the top k * shards are the top k of
                # every slice (each rank level holds one token per slice); the ranking
                # includes the token cache's staleness term, as each rank's would
                r = rank.view(B, shards, N // shards).argsort(dim=-1, descending=True,
                                                               stable=True).argsort(dim=-1)
                sel = dk.select_topk(-r.reshape(B, N).to(scores.dtype), ks, weights)
                sel = dataclasses.replace(sel, scores=scores.reshape(-1).index_select(
                    0, sel.indices))
            elif rank is not scores:
                sel = dk.select_topk(rank, ks, weights)
                sel = dataclasses.replace(sel, scores=scores.reshape(-1).index_select(
                    0, sel.indices))
            else:
                sel = dk.select_topk(scores, ks, weights)
            self._sel = _Transient(sel)
            # frozen with inplace_residual: the block's input receives the update (no copy
            # of the residual stream); only without autograd
            inplace = (st.inplace_residual and not torch.is_grad_enabled()
                       and x.is_contiguous())
            # the token cache writes the new updates of the selected rows: their inputs first
            # (an in-place forward overwrites them); one segment per sample (inference)
            x_rows = x.reshape(B * N, D).index_select(0, sel.indices) \
                if entry is not None and sel.segs_per_sample == 1 else None
            if self.use_fused(block, call, inner_hooks):
                self.last_path = "fused"
                out = family.fused_forward(block, call, sel, self.gate(block, sel.scores),
                                           inplace_residual=inplace)
            else:
                self.last_path = "compat"
                out = family.compat_forward(block, base_forward, call, sel, ks,
                                            self.gate(block, sel.scores), self.mlp_gate,
                                            inplace_residual=inplace)
            if entry is None:
                return out
            return apply_token_cache(family, out, entry, sel, x_rows, entry.step_t,
                                     unit_weights=weights is None)


def context_parallel_reason(block: nn.Module) -> Optional[str]:
    """Why ``block`` must not run the fused path under diffusers' context parallelism, or
    None: an attention module of the block carries an active context-parallel config
    (``model.enable_parallelism(config=ContextParallelConfig(...))`` gives every attention
    processor one). The compat path then runs the block's own attention, which does the
    Ulysses all-to-all / ring exchange over the kept tokens of every rank."""
    for child in block._modules.values():
        proc = getattr(child, "processor", None) if child is not None else None
        cfg = getattr(proc, "_parallel_config", None)
        if cfg is not None and getattr(cfg, "context_parallel_config", None) is not None:
            return ("context parallelism is active (enable_parallelism): the fused attention "
                    "would see this rank's tokens only")
    return None


#: diffusers block-level caches whose skip decision depends on the data (a residual's change
#: against a threshold): prefixes of their hook names on a block
_DATA_DEPENDENT_CACHES = {"fbc_": "FirstBlockCache", "mag_cache_": "MagCache"}


def data_dependent_cache(block: nn.Module) -> Optional[str]:
    """The name of a diffusers cache on ``block`` that decides from the data whether to run
    the blocks (FirstBlockCache, MagCache), or None."""
    reg = block.__dict__.get("_diffusers_hook")
    for hname in (reg.hooks if reg is not None else ()):
        for prefix, cache in _DATA_DEPENDENT_CACHES.items():
            if hname.startswith(prefix):
                return cache
    return None


def _inner_hooks(block: nn.Module):
    """``[(module name, hook name, stateful)]`` of the diffusers hooks on the modules inside
    ``block`` (attention-level caches, layerwise casting of the linears, ...).

    Runs on every routed block call, so it walks ``_modules`` directly and builds a name only
    for a module that carries a registry (``named_modules`` costs about 3x as much here:
    ~30 us per PixArt-XL block)."""
    out = []
    stack = [("", block)]
    while stack:
        prefix, mod = stack.pop()
        for key, child in mod._modules.items():
            if child is None:
                continue
            name = f"{prefix}.{key}" if prefix else key
            reg = child.__dict__.get("_diffusers_hook")
            if reg is not None:
                for hname, hook in reg.hooks.items():
                    out.append((name, hname, bool(getattr(hook, "_is_stateful", False))))
            stack.append((name, child))
    return out


def static_ratios(values: Optional[Sequence[float]]) -> Optional[Tuple[float, ...]]:
    """``values`` as a tuple of plain floats (None stays None): kept ratios that compiled code
    reads as constants.

    The routing plan computes the host-side kept count ``ceil(kappa * N)`` from a frozen (or
    overriding) ratio, so ``torch.compile(fullgraph=True)`` needs that ratio as a constant,
    not a symbolic float. Dynamo traces a plain ``float`` attribute symbolically once its
    value has changed between compilations of the same code, which regional compilation
    (``compile_repeated_blocks``: one block class for blocks whose frozen ratios differ)
    does at its second block. A *tuple* of plain floats reached from an ``nn.Module`` is
    guarded by value and its items kept constant (Dynamo's rule for immutable module
    attributes such as a convolution's strides; tested on torch 2.10, 2.11, 2.13 and 2.14):
    one graph per distinct set of ratios, as for the timestep regions. (The float subclass
    used before was constant on torch 2.13 and 2.14, but torch 2.11 cannot trace ``float()``
    of it.)"""
    if values is None:
        return None
    return tuple(float(v) for v in values)


_FUSED_SAFE_HOOKS = ("layerwise_casting", "peft_autocast_disable")


@dataclass
class RoutingState:
    """Everything a converted model carries for routing (``diffcr.routing_state(model)``).

    ``config``: the :class:`~diffcr.DiffCRConfig` in use; ``family``: the model family adapter
    (:mod:`diffcr.models`); ``blocks``: ``{routed index: BlockRouting}``; ``frozen`` /
    ``inplace_residual``: set by :func:`diffcr.freeze`; ``timesteps``, ``noise_levels``,
    ``regions``: what the current forward was called with, one per sample (host values);
    ``token_cache``: the :class:`~diffcr.token_cache.TokenCache` (None: off,
    :func:`diffcr.enable_token_cache`); ``kept_override``: a kept ratio every routed block uses
    instead of its own (None: their own; :func:`diffcr.kept_ratio_override`); ``scorer``: a
    token scorer ``scorer(block, x) -> [B, N]`` used instead of the block's router for the
    selection and the gate (None: the router; ``selection="random"`` draws scores at random);
    ``plain``: every routed block runs its own diffusers forward on every token, without the
    router gate, i.e. the model as it was before conversion (:func:`diffcr.dense_teacher`);
    ``shards``: routing picks the top-k of each of this many equal slices of the tokens on its
    own (1: of all tokens; :func:`diffcr.shard_routing`, the one-process reference of context
    parallelism); ``keep_mask``: the :class:`~diffcr.keep_mask.KeepMask` of mask-aware
    routing, tokens every routed block computes (None: off; :func:`diffcr.mask_routing`);
    ``timestep_held``: True while a call of the model recorded its timestep before entering
    a compiled region (``torch.compile(model)``: the model's pre-hook then does nothing).
    """

    config: DiffCRConfig
    family: object
    blocks: Dict[int, BlockRouting] = field(default_factory=dict)
    timesteps: Optional[List[float]] = None
    noise_levels: Optional[List[float]] = None
    regions: Optional[List[int]] = None
    frozen: bool = False
    inplace_residual: bool = False
    token_cache: Optional[TokenCache] = None
    _kept_override: Tuple[float, ...] = ()
    scorer: Optional[Callable] = None
    plain: bool = False
    shards: int = 1
    keep_mask: Optional[KeepMask] = None
    timestep_held: bool = False

    @property
    def kept_override(self) -> Optional[float]:
        return self._kept_override[0] if self._kept_override else None

    @kept_override.setter
    def kept_override(self, kappa: Optional[float]) -> None:
        self._kept_override = () if kappa is None else static_ratios([kappa])

    def set_timesteps(self, vals: List[float]) -> None:
        """Record the raw timesteps of the next forward and map them to regions through the
        family's noise level (method §3)."""
        for v in vals:
            if math.isnan(v):
                raise ValueError("diffcr: timestep is NaN")
            if math.isinf(v):
                raise ValueError(f"diffcr: timestep is {v} (it must be finite)")
        levels = [self.family.noise_level(v, self.config) for v in vals]
        self.timesteps = vals
        self.noise_levels = levels
        self.regions = [self.config.region_of_level(u) for u in levels]
        if self.token_cache is not None:
            self.token_cache.next_forward(vals, levels)

    def clear_timesteps(self) -> None:
        self.timesteps = self.noise_levels = self.regions = None


def find_routing_state(model: nn.Module) -> Optional[RoutingState]:
    """The :class:`RoutingState` of a converted model, None if it is not converted."""
    return model.__dict__.get("_diffcr_state")


def routing_state(model: nn.Module) -> RoutingState:
    """The :class:`RoutingState` of a converted model (ValueError if it is not converted)."""
    st = find_routing_state(model)
    if st is None:
        raise ValueError(f"diffcr: {type(model).__name__} is not converted (call "
                         "diffcr.convert(model, config) first)")
    return st


def attach_state(model: nn.Module, state: RoutingState) -> None:
    """Make ``state`` the routing state of ``model`` (:func:`diffcr.convert`)."""
    model._diffcr_state = state


def detach_state(model: nn.Module) -> None:
    """Remove the routing state of ``model`` (:func:`diffcr.revert`)."""
    del model._diffcr_state


def attach_block(block: nn.Module, routing: BlockRouting) -> None:
    """Give a block of a routed class the :class:`BlockRouting` its forward runs with."""
    block._diffcr = routing


def detach_block(block: nn.Module) -> None:
    """Remove what :func:`attach_block` added to ``block``."""
    block.__dict__.pop("_diffcr", None)


# ---------------------------------------------------------------------- routed classes
_ROUTED: Dict[type, type] = {}


def routed_class(base: type) -> type:
    """The routed subclass of a diffusers block class (made once, importable by name from this
    module so converted models pickle, and registered with diffusers' block metadata so its
    block-level caches recognise it). It carries ``diffcr_forward_params``, the
    :class:`~diffcr.models.base.ForwardParams` of the base's forward, which
    :meth:`~diffcr.models.base.ModelFamily.bind` binds each call with."""
    cls = _ROUTED.get(base)
    if cls is not None:
        return cls

    def forward(self, *args, **kwargs):
        return self._diffcr.forward(self, super(cls, self).forward, args, kwargs)

    name = f"Routed{base.__name__}"
    cls = type(name, (base,), {
        "forward": forward, "diffcr_forward_params": ForwardParams.of(base.forward),
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"A diffusers ``{base.__name__}`` whose forward processes only its "
                   "router's top-k tokens (made by :func:`diffcr.convert`; same signature, "
                   "weights and state-dict keys as the base, plus ``router`` and ``ratio``)."})
    forward.__qualname__ = f"{name}.forward"
    # the base's signature (diffusers' block metadata finds hidden_states by position in it)
    forward.__signature__ = inspect.signature(base.forward)
    forward.__doc__ = base.forward.__doc__
    _ROUTED[base] = cls
    setattr(sys.modules[__name__], name, cls)
    _register_block_metadata(base, cls)
    return cls


def base_class(cls: type) -> type:
    """The diffusers class a routed class was made from (``cls`` itself if not routed)."""
    for base, routed in _ROUTED.items():
        if routed is cls:
            return base
    return cls


def _register_block_metadata(base: type, cls: type) -> None:
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry
    except ImportError:  # older diffusers: no block-level caches to serve
        return
    try:
        meta = TransformerBlockRegistry.get(base)
    except ValueError:
        return
    # a copy: register() stores the class on the metadata it is given
    TransformerBlockRegistry.register(model_class=cls, metadata=dataclasses.replace(
        meta, _cls=None, _cached_parameter_indices=None))


def __getattr__(name):
    """Unpickling a converted model looks its routed classes up here; make them on demand."""
    if name.startswith("Routed"):
        from .models import known_block_classes

        for base in known_block_classes():
            if f"Routed{base.__name__}" == name:
                return routed_class(base)
    raise AttributeError(name)
