"""Turning a diffusers DiT into a token-routed DiffCR model in place, and back.

:func:`convert` swaps the class of every routed ``BasicTransformerBlock`` to
:class:`DiffCRBlock` (same weights, same state-dict keys, ``.norm1`` kept) and adds two modules
per routed block: ``router`` (:class:`~diffcr.modules.Router`) and ``ratio``
(:class:`~diffcr.modules.DifferentiableRatio`). A forward pre-hook on the model captures the raw
timestep of each forward (PixArt blocks only see the adaLN embedding) and maps each sample to its
timestep region. :func:`revert` undoes all of it exactly.

Execution (the *compat path*): the block's own diffusers forward runs on the gathered tokens of
each group of segments that share a kept count (one group when k is uniform, e.g. at inference
with CFG), the router score multiplies the feed-forward output of each selected token, and the
packed update is written back with :func:`diffcr_kernels.scatter_back`, which also applies the
two-bin weights in training. Skipped tokens pass through unchanged.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

import diffcr_kernels as dk

from .config import DiffCRConfig
from .fused import fused_block_forward, fused_unsupported_reason
from .modules import DifferentiableRatio, Router

__all__ = ["DiffCRBlock", "convert", "revert", "freeze", "unfreeze", "is_converted",
           "routed_blocks", "set_timestep", "compile_model", "SUPPORTED_MODELS"]

SUPPORTED_MODELS = ("PixArtTransformer2DModel", "DiTTransformer2DModel")
_SUPPORTED_NORMS = ("ada_norm_single", "ada_norm_zero")


def _basic_block_cls():
    from diffusers.models.attention import BasicTransformerBlock

    return BasicTransformerBlock


@dataclass
class _RoutingState:
    """Shared by the model and its routed blocks: what the last forward was called with."""

    config: DiffCRConfig
    timesteps: Optional[List[float]] = None  # host copy, one per sample
    regions: Optional[List[int]] = None
    frozen: bool = False
    inplace_residual: bool = False  # freeze(..., inplace_residual=True)


def _make_block_class():
    Basic = _basic_block_cls()

    class DiffCRBlock(Basic):
        """A diffusers ``BasicTransformerBlock`` that processes only its router's top-k tokens.

        Same ``forward`` signature (and positional order, which gradient checkpointing relies
        on) as the original block. Attributes added by :func:`convert`: ``router``, ``ratio``
        and the private routing state.
        """

        # ---------------------------------------------------------------- planning
        def _diffcr_plan(self, B: int, N: int):
            st: _RoutingState = self._diffcr_state
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
            ratio: DifferentiableRatio = self.ratio
            if st.frozen:
                bins = self._diffcr_frozen_bins
                ks = [[dk.kept_count(bins[r], N)] for r in regions]
                kappa = torch.tensor([bins[r] for r in regions])
                return ks, None, kappa
            if self.training:
                plan = ratio.two_bin(regions, N)
                return plan.k, plan.weights, plan.kappa
            nearest = ratio.nearest_bins()
            ks = [[dk.kept_count(nearest[r], N)] for r in regions]
            kappa = torch.tensor([nearest[r] for r in regions])
            return ks, None, kappa

        # ---------------------------------------------------------------- forward
        def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                    encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None,
                    class_labels=None, added_cond_kwargs=None):
            x = hidden_states
            if x.dim() != 3:
                raise ValueError(f"diffcr: block input must be [B, N, D], got {tuple(x.shape)}")
            B, N, D = x.shape
            ks, weights, kappa = self._diffcr_plan(B, N)
            self._diffcr_last_kappa = _Transient(kappa)
            router: Router = self.router
            if self._diffcr_state.config.selection == "random":
                # baseline: k uniformly random tokens per sample; no router, no gating
                scores = torch.rand(B, N, device=x.device)
            else:
                scores = router(x)  # [B, N] float32
            class_labels, label_dropout = self._diffcr_drop_labels(class_labels)
            try:
                return self._diffcr_forward(x, B, N, ks, weights, scores, attention_mask,
                                            encoder_hidden_states, encoder_attention_mask,
                                            timestep, cross_attention_kwargs, class_labels,
                                            added_cond_kwargs)
            finally:
                if label_dropout is not None:
                    label_dropout.train(True)

        def _diffcr_drop_labels(self, class_labels):
            """DiT blocks drop class labels at random in train mode (classifier-free guidance),
            inside each block. A routed block may call the diffusers forward more than once
            (one call per group of equal-k segments, two bins per sample), which would draw a
            different drop for each call. Draw it once here, exactly as the dense block would,
            and switch the label embedding's dropout off for the calls."""
            if self.norm_type != "ada_norm_zero" or class_labels is None:
                return class_labels, None
            ce = getattr(getattr(self.norm1, "emb", None), "class_embedder", None)
            if ce is None or not ce.training or not getattr(ce, "dropout_prob", 0) > 0:
                return class_labels, None
            dropped = ce.token_drop(class_labels)
            ce.train(False)
            return dropped, ce

        def _diffcr_forward(self, x, B, N, ks, weights, scores, attention_mask,
                            encoder_hidden_states, encoder_attention_mask, timestep,
                            cross_attention_kwargs, class_labels, added_cond_kwargs):
            router: Router = self.router
            base = super().forward
            args = dict(encoder_hidden_states=encoder_hidden_states,
                        encoder_attention_mask=encoder_attention_mask, timestep=timestep,
                        cross_attention_kwargs=cross_attention_kwargs,
                        class_labels=class_labels, added_cond_kwargs=added_cond_kwargs)
            P = len(ks[0])
            if P == 1 and all(k[0] == N for k in ks):
                # every token kept: the dense block, with the router gating the MLP branch
                self.ff._diffcr_scale = self._diffcr_gate(scores).unsqueeze(-1)
                try:
                    return base(x, attention_mask, **args)
                finally:
                    self.ff._diffcr_scale = None
            sel = dk.select_topk(scores, ks, weights)
            # frozen with inplace_residual: the block's input receives the update (no copy
            # of the residual stream); only without autograd
            inplace = (self._diffcr_state.inplace_residual and not torch.is_grad_enabled()
                       and x.is_contiguous())
            if self._diffcr_use_fused(attention_mask, cross_attention_kwargs):
                return fused_block_forward(self, x, sel, self._diffcr_gate(sel.scores),
                                           encoder_hidden_states, encoder_attention_mask,
                                           timestep, class_labels, inplace_residual=inplace)
            delta = self._diffcr_run_groups(x, sel, ks, attention_mask, args)
            return dk.scatter_back_selection(x, sel, delta, use_scores=False, inplace=inplace)

        def _diffcr_gate(self, scores):
            """Factor on the MLP branch of each token: the router gate, or 1 for random
            selection."""
            if self._diffcr_state.config.selection == "random":
                return torch.ones_like(scores)
            return self.router.gate_factor(scores)

        def _diffcr_use_fused(self, attention_mask, cross_attention_kwargs) -> bool:
            mode = self._diffcr_state.config.path
            if mode == "compat":
                return False
            why = self._diffcr_fused_why
            if why is None and attention_mask is not None:
                why = "a self-attention mask"
            if why is None and cross_attention_kwargs:
                why = f"cross_attention_kwargs {sorted(cross_attention_kwargs)}"
            if why is None:
                return True
            if mode == "fused":
                raise RuntimeError(f"diffcr: path='fused' cannot run this block call ({why}); "
                                   "use path='auto' or 'compat'")
            return False

        def _diffcr_run_groups(self, x, sel, ks, attention_mask, args):
            """Run the diffusers block on each group of equal-length segments; return the packed
            residual update ``[T, D]``."""
            B, N, D = x.shape
            flat_k = [k for row in ks for k in row]
            S = len(flat_k)
            starts = [0]
            for k in flat_k:
                starts.append(starts[-1] + k)
            groups: Dict[int, List[int]] = {}
            for s, k in enumerate(flat_k):
                groups.setdefault(k, []).append(s)
            gate = self._diffcr_gate(sel.scores)
            xf = x.reshape(B * N, D)
            P = sel.segs_per_sample
            T = sel.total
            pieces = []
            base = super().forward
            for k, segs in groups.items():
                if len(groups) == 1:
                    rows = torch.arange(T, device=x.device).view(S, k)
                else:
                    st = torch.tensor([starts[s] for s in segs], device=x.device)
                    rows = st[:, None] + torch.arange(k, device=x.device)[None]
                idx = sel.indices[rows]  # [G, k]
                samp = torch.tensor([s // P for s in segs], device=x.device)
                xg = xf[idx]  # [G, k, D]
                gargs = {name: _take(v, samp, B) for name, v in args.items()}
                mask_g = None
                if attention_mask is not None:
                    mask_g = _take_token_mask(attention_mask, samp, idx % N, B, N)
                self.ff._diffcr_scale = gate[rows].unsqueeze(-1)
                try:
                    out = base(xg, mask_g, **gargs)
                finally:
                    self.ff._diffcr_scale = None
                pieces.append((rows, out - xg))
            if len(pieces) == 1:
                return pieces[0][1].reshape(T, D)
            delta = x.new_empty(T, D)
            for rows, d in pieces:
                delta = delta.index_put((rows.reshape(-1),), d.reshape(-1, D))
            return delta

    DiffCRBlock.__name__ = "DiffCRBlock"
    DiffCRBlock.__qualname__ = "DiffCRBlock"
    return DiffCRBlock


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


def _take(v, samp, B):
    """Select the samples ``samp`` of a per-sample argument (tensors with a leading batch dim;
    dicts recursively); anything else passes through."""
    if torch.is_tensor(v) and v.dim() >= 1:
        if v.shape[0] == B:
            return v[samp]
        if v.shape[0] == 1:
            return v.expand(samp.numel(), *v.shape[1:])
        return v
    if isinstance(v, dict):
        return {k: _take(x, samp, B) for k, x in v.items()}
    return v


def _take_token_mask(mask, samp, tok, B, N):
    """Self-attention mask ``[B, 1, N]`` / ``[B, N]`` -> the selected keys of each segment."""
    m = mask[samp] if mask.shape[0] == B else mask.expand(samp.numel(), *mask.shape[1:])
    if m.shape[-1] != N:
        raise ValueError(f"diffcr: self-attention mask has {m.shape[-1]} keys for {N} tokens")
    if m.dim() == 3:
        return torch.gather(m, 2, tok.unsqueeze(1).expand(-1, m.shape[1], -1))
    return torch.gather(m, 1, tok)


_BLOCK_CLS = None


def _block_cls():
    global _BLOCK_CLS
    if _BLOCK_CLS is None:
        _BLOCK_CLS = _make_block_class()
    return _BLOCK_CLS


def __getattr__(name):  # DiffCRBlock is built lazily (diffusers import)
    if name == "DiffCRBlock":
        return _block_cls()
    raise AttributeError(name)


# ------------------------------------------------------------------------ hooks
def _ff_hook(module, inputs, output):
    """Forward hook on a routed block's feed-forward: multiplies its output by the router gate
    of each token (method §1: the score gates the MLP branch only). Inactive when no scale is set."""
    scale = module.__dict__.get("_diffcr_scale")
    if scale is None:
        return output
    return output * scale.to(output.dtype)


def _timestep_arg(model, args, kwargs):
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    except TypeError:
        return kwargs.get("timestep")
    return bound.arguments.get("timestep")


def _capture_timestep(model, args, kwargs):
    st: _RoutingState = model._diffcr_state
    t = _timestep_arg(model, args, kwargs)
    if t is None:
        st.timesteps = None
        st.regions = None
        return None
    set_timestep(model, t)
    return None


def set_timestep(model: nn.Module, t) -> None:
    """Record the raw timestep(s) of the next forward (the model's pre-hook does this itself;
    use it only to call converted blocks directly). ``t``: number, or tensor ``[B]`` / scalar."""
    st: _RoutingState = _state(model)
    if torch.is_tensor(t):
        vals = t.detach().reshape(-1).double().cpu().tolist()  # one host copy per forward
    elif isinstance(t, (int, float)):
        vals = [float(t)]
    else:
        vals = [float(v) for v in t]
    for v in vals:
        if math.isnan(v):
            raise ValueError("diffcr: timestep is NaN")
    st.timesteps = vals
    st.regions = [st.config.region_of(v) for v in vals]


# ------------------------------------------------------------------------ public API
def is_converted(model: nn.Module) -> bool:
    return getattr(model, "_diffcr_state", None) is not None


def _state(model: nn.Module) -> _RoutingState:
    st = getattr(model, "_diffcr_state", None)
    if st is None:
        raise ValueError(f"diffcr: {type(model).__name__} is not converted (call "
                         "diffcr.convert(model, config) first)")
    return st


def routed_blocks(model: nn.Module) -> Dict[int, nn.Module]:
    """``{block index: block}`` of the routed blocks of a converted model."""
    _state(model)
    cls = _block_cls()
    return {i: b for i, b in enumerate(model.transformer_blocks) if isinstance(b, cls)}


def _find_diffusers_hooks(model: nn.Module) -> List[str]:
    return [name or "<model>" for name, m in model.named_modules()
            if getattr(m, "_diffusers_hook", None) is not None]


def _infer_timesteps(model: nn.Module) -> Optional[float]:
    cfg = getattr(model, "config", None)
    for key in ("num_train_timesteps", "num_timesteps"):
        v = getattr(cfg, key, None) if cfg is not None else None
        if v:
            return float(v)
    return None


def convert(model: nn.Module, config: Optional[DiffCRConfig] = None) -> nn.Module:
    """Make ``model`` (a diffusers ``PixArtTransformer2DModel`` or ``DiTTransformer2DModel``)
    token-routed, in place; returns the same model.

    Adds ``transformer_blocks.{i}.router.weight`` and ``transformer_blocks.{i}.ratio.kept`` per
    routed block; every existing parameter, buffer and state-dict key is unchanged. Refuses
    (``TypeError`` / ``ValueError`` naming the problem, model untouched) unsupported model
    classes, blocks of another kind or norm type, feed-forward chunking, already converted
    models, and models that carry diffusers hooks (their cached forwards would bypass routing:
    convert before enabling offloading/caching hooks).
    """
    config = DiffCRConfig() if config is None else config
    if not isinstance(config, DiffCRConfig):
        raise TypeError(f"config must be a DiffCRConfig, got {type(config).__name__}")
    config.validate()
    name = type(model).__name__
    if name not in SUPPORTED_MODELS:
        raise TypeError(f"diffcr.convert supports {', '.join(SUPPORTED_MODELS)}; got {name}")
    if is_converted(model):
        raise ValueError(f"diffcr: this {name} is already converted (diffcr.revert it first)")
    hooked = _find_diffusers_hooks(model)
    if hooked:
        raise ValueError(
            f"diffcr: {name} carries diffusers hooks on {hooked[:5]} (offloading, caching or "
            "layerwise casting). They cache the bound forward and would silently bypass "
            "routing: convert the model before enabling them.")
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is None or len(blocks) == 0:
        raise TypeError(f"diffcr: {name} has no transformer_blocks to route")
    Basic = _basic_block_cls()
    idx = config.routed_indices(len(blocks))
    for i in idx:
        b = blocks[i]
        if type(b) is not Basic:
            raise TypeError(f"diffcr: transformer_blocks[{i}] is a {type(b).__name__}, not a "
                            "diffusers BasicTransformerBlock; it cannot be routed")
        if b.norm_type not in _SUPPORTED_NORMS:
            raise TypeError(f"diffcr: transformer_blocks[{i}] uses norm_type {b.norm_type!r}; "
                            f"supported: {_SUPPORTED_NORMS}")
        if getattr(b, "_chunk_size", None) is not None:
            raise ValueError(f"diffcr: transformer_blocks[{i}] uses feed-forward chunking; call "
                             "model.disable_forward_chunking() before converting")
    fused_why = {i: fused_unsupported_reason(blocks[i]) for i in idx}
    if config.path == "fused":
        bad = {i: w for i, w in fused_why.items() if w is not None}
        if bad:
            raise ValueError(f"diffcr: path='fused' cannot run these blocks: {bad}; use "
                             "path='auto' (fused where possible) or 'compat'")
    if config.num_train_timesteps is None:
        inferred = _infer_timesteps(model)
        if inferred is not None:
            config = DiffCRConfig.from_dict({**config.to_dict(), "num_train_timesteps": inferred})
    state = _RoutingState(config=config)
    cls = _block_cls()
    dtype = config.torch_dtype()
    for i in idx:
        b = blocks[i]
        p = next(b.parameters())
        dim = b.attn1.to_q.in_features
        b.__class__ = cls
        b.router = Router(dim, config.gate, config.router_init_std, dtype=dtype,
                          device=p.device)
        b.ratio = DifferentiableRatio(config.num_regions, config.bins, config.init_kept_ratio,
                                      dtype=dtype, device=p.device)
        b._diffcr_state = state
        b._diffcr_last_kappa = None
        b._diffcr_frozen_bins = None
        b._diffcr_fused_why = fused_why[i]
        b.ff._diffcr_scale = None
        b.ff.register_forward_hook(_ff_hook)
    model._diffcr_state = state
    model.register_forward_pre_hook(_capture_timestep, with_kwargs=True)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert` exactly: original block classes, no router/ratio modules, no hooks."""
    _state(model)
    Basic = _basic_block_cls()
    _remove_hook(model._forward_pre_hooks, _capture_timestep, model)
    for b in model.transformer_blocks:
        if isinstance(b, _block_cls()):
            _remove_hook(b.ff._forward_hooks, _ff_hook, b.ff)
            del b.router
            del b.ratio
            for attr in ("_diffcr_state", "_diffcr_last_kappa", "_diffcr_frozen_bins",
                         "_diffcr_fused_why"):
                b.__dict__.pop(attr, None)
            b.ff.__dict__.pop("_diffcr_scale", None)
            b.__class__ = Basic
    if model.__dict__.get("_diffcr_compiled", False):
        model.__dict__.pop("forward", None)
        model.__dict__.pop("_diffcr_compiled", None)
    del model._diffcr_state
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
    its input, or your own code calling blocks directly)."""
    st = _state(model)
    if not isinstance(inplace_residual, bool):
        raise ValueError(f"inplace_residual must be True or False, got {inplace_residual!r}")
    for b in routed_blocks(model).values():
        b._diffcr_frozen_bins = b.ratio.nearest_bins()
        b.ratio.kept.requires_grad_(False)  # not used while frozen (e.g. MoD training, DDP)
    st.frozen = True
    st.inplace_residual = inplace_residual
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    st = _state(model)
    for b in routed_blocks(model).values():
        b._diffcr_frozen_bins = None
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
    """
    _state(model)
    compile_kwargs.setdefault("fullgraph", True)
    forward = type(model).forward.__get__(model)
    model.forward = torch.compile(forward, **compile_kwargs)
    model._diffcr_compiled = True
    return model
