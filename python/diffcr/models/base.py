"""What a model family is: :class:`ModelFamily`, the base class of the adapters that tell
:func:`diffcr.convert` about one diffusers model class, and the helpers every family and the
converter share (per-sample argument selection, block names for messages, the diffusers version
gate, one-time warnings). Nothing here knows a particular family or the routing runtime.

A family says, as data where it can and as code where it must:

- ``model_classes``: the diffusers model class names it handles;
- ``block_lists``: the module lists that hold its routable blocks, and :meth:`block_classes`
  the block classes it can route (:meth:`check_block` refuses the rest);
- which tokens are routable: every token of the block's ``hidden_states`` (the image tokens;
  text tokens of joint-attention blocks arrive in ``encoder_hidden_states`` and are never
  routed) unless a family overrides :meth:`routable_tokens`;
- :meth:`compat_forward`: the block's own diffusers forward on a gathered subset, with the
  per-token side inputs (masks, rotary embeddings, per-token modulation) gathered with the
  tokens; :meth:`fused_forward`: an optional forward over the packed layout;
- :meth:`noise_level`: where the timestep is and how it maps to a noise level in [0, 1] (the
  regions are defined on that: method §3);
- ``tested_diffusers``: the diffusers versions it was tested with. Outside that range
  ``path="auto"`` runs the compat path and warns once; ``path="fused"`` refuses.
"""
from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from torch import nn

__all__ = ["ModelFamily", "ForwardParams", "TESTED_DIFFUSERS", "take_samples", "display_name",
           "warn_once"]

#: the diffusers releases every built-in family is tested with (major.minor, inclusive)
TESTED_DIFFUSERS = ("0.35", "0.42")

_REQUIRED = inspect.Parameter.empty


class ForwardParams(NamedTuple):
    """The parameter list of a diffusers block forward, read once per block class (a routed
    class carries it as ``diffcr_forward_params``) so that :meth:`ModelFamily.bind` binds a
    call without ``inspect``."""

    #: ``(name, default)`` of every positional-or-keyword and keyword-only parameter after
    #: ``self``, in order (``inspect.Parameter.empty``: required)
    params: Tuple[Tuple[str, Any], ...]
    #: how many of them may be passed by position
    npos: int
    #: whether the forward takes ``*args``
    varargs: bool

    @classmethod
    def of(cls, forward: Callable) -> "ForwardParams":
        """The parameters of an unbound ``forward(self, ...)``."""
        sig = list(inspect.signature(forward).parameters.values())[1:]
        params = tuple((p.name, p.default) for p in sig
                       if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        npos = sum(p.kind == p.POSITIONAL_OR_KEYWORD for p in sig)
        varargs = any(p.kind == p.VAR_POSITIONAL for p in sig)
        return cls(params, npos, varargs)


class ModelFamily:
    """Base class of a model family adapter (see the module docstring). Subclasses set the
    class attributes and override the methods that differ."""

    #: registry name, e.g. ``"pixart"``
    name: str = ""
    #: diffusers model class names this family handles
    model_classes: Tuple[str, ...] = ()
    #: names of the module lists that hold the routable blocks, in model order
    block_lists: Tuple[str, ...] = ("transformer_blocks",)
    #: diffusers releases tested, ``(oldest, newest)`` as major.minor, inclusive (CI runs the
    #: family conformance tests on both; ``[tool.diffcr]`` in pyproject.toml says the same)
    tested_diffusers: Tuple[str, str] = TESTED_DIFFUSERS

    # ------------------------------------------------------------------ structure
    def block_classes(self) -> Tuple[type, ...]:
        """The diffusers block classes this family can route."""
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> List[Tuple[str, nn.Module]]:
        """``[(qualified name, block)]`` of every routable block position, in model order
        (``"transformer_blocks.3"``); the list index is the block's number in
        ``DiffCRConfig.routed_blocks``."""
        out = []
        for list_name in self.block_lists:
            mods = getattr(model, list_name, None)
            if mods is None:
                continue
            out.extend((f"{list_name}.{i}", b) for i, b in enumerate(mods))
        return out

    def check_block(self, name: str, block: nn.Module) -> None:
        """Raise (``TypeError`` for a block of another kind, ``ValueError`` for a setting the
        user can change) when ``block`` cannot be routed; ``name`` is its position."""
        if type(block) not in self.block_classes():
            raise TypeError(f"diffcr: {name} is a {type(block).__name__}, not one of "
                            f"{[c.__name__ for c in self.block_classes()]}; it cannot be "
                            "routed")
        if getattr(block, "_chunk_size", None) is not None:
            raise ValueError(f"diffcr: {name} uses feed-forward chunking; call "
                             "model.disable_forward_chunking() before converting")

    def hidden_size(self, block: nn.Module) -> int:
        raise NotImplementedError

    def hidden_states_of(self, output):
        """The image-token part of what a block returns (the block's output itself, unless the
        block returns a tuple)."""
        return output

    def text_of(self, output):
        """The text-stream part of what a block returns (None: the block has no text output)."""
        return None

    def with_hidden_states(self, output, hidden_states):
        """What a block returns, with ``hidden_states`` as its image-token part (the inverse of
        :meth:`hidden_states_of`)."""
        return hidden_states

    def gate_scale(self, block: nn.Module, gate_rows, call: dict):
        """The :class:`~diffcr.modules.MlpGate` scale of one block call: the router gate of
        each image token, ``[G, k, 1]`` (families whose gated module also sees text rows pad
        them with ones)."""
        return gate_rows.unsqueeze(-1)

    def mlp_module(self, block: nn.Module) -> nn.Module:
        """The block's feed-forward, whose output the router gate multiplies (compat path)."""
        return block.ff

    def routable_tokens(self, block: nn.Module, call: dict) -> Optional[Tuple[int, int]]:
        """``(start, stop)`` of the routable tokens in ``call["hidden_states"]``; None: all."""
        return None

    # ------------------------------------------------------------------ timesteps
    def timestep_of_call(self, model: nn.Module, args, kwargs):
        """The model forward's timestep argument (tensor ``[B]``, scalar or number) or None."""
        try:
            bound = _signature(type(model).forward).bind_partial(model, *args, **kwargs)
        except TypeError:
            return kwargs.get("timestep")
        return bound.arguments.get("timestep")

    def default_num_train_timesteps(self, model: nn.Module) -> Optional[float]:
        """T when the model's config says it (else the config default, 1000, is used)."""
        cfg = getattr(model, "config", None)
        for key in ("num_train_timesteps", "num_timesteps"):
            v = getattr(cfg, key, None) if cfg is not None else None
            if v:
                return float(v)
        return None

    def noise_level(self, t: float, config) -> float:
        """Noise level in [0, 1] of the raw timestep ``t`` (DDPM-style: ``t / T``)."""
        return float(t) / config.timesteps

    # ------------------------------------------------------------------ a block call
    def bind(self, block: nn.Module, args, kwargs) -> dict:
        """The block call's arguments by name, positional ones included, defaults filled in
        (from the :class:`ForwardParams` its routed class read once from the diffusers forward,
        ``diffcr_forward_params``: no ``inspect`` per call, so ``torch.compile`` traces it)."""
        fp = type(block).diffcr_forward_params
        params, npos = fp.params, fp.npos
        if len(args) > npos:
            if not (fp.varargs and self.ignores_extra_args):
                raise TypeError(f"{type(block).__name__}.forward takes {npos} positional "
                                f"arguments, got {len(args)}")
            args = args[:npos]
        call = {}
        for (name, _), value in zip(params, args):
            call[name] = value
        for name, value in kwargs.items():
            if name in call:
                raise TypeError(f"{type(block).__name__}.forward got multiple values for "
                                f"{name!r}")
            call[name] = value
        for name, default in params:
            if name not in call:
                if default is _REQUIRED:
                    raise TypeError(f"{type(block).__name__}.forward is missing {name!r}")
                call[name] = default
        return call

    def gathered_call(self, block: nn.Module, call: dict, samp, tok) -> dict:
        """The arguments that run the unrouted block on the gathered tokens ``tok`` ``[G, k]``
        of samples ``samp`` ``[G]``: hidden states gathered, per-sample arguments selected,
        per-token side inputs (masks, rotary rows) gathered by families that have them. The
        conformance test calls the diffusers block with it to check the routed output."""
        x = call["hidden_states"]
        B = x.shape[0]
        out = {name: take_samples(v, samp, B) for name, v in call.items()
               if name != "hidden_states"}
        out["hidden_states"] = x[samp[:, None], tok]
        return out

    @contextmanager
    def call_context(self, block: nn.Module, call: dict):
        """Around one routed block call (e.g. draw a random label drop once for all groups)."""
        yield

    def call_fused_reason(self, block: nn.Module, call: dict) -> Optional[str]:
        """Why the fused path cannot run this particular call (None: it can)."""
        return "this family has no fused forward"

    def fused_unsupported_reason(self, block: nn.Module) -> Optional[str]:
        """Why the fused path can never run ``block`` (None: it can, call permitting)."""
        return "this family has no fused forward"

    #: the family's block forwards take ``*args`` and ignore them (HunyuanVideo's: the model
    #: passes every block the token-replace inputs): :meth:`bind` drops extra positional
    #: arguments instead of refusing them
    ignores_extra_args: bool = False

    #: module names (suffixes, as peft's ``target_modules``) of the routed blocks' linear layers
    #: that :func:`diffcr.add_lora` adapts by default: attention and feed-forward of both streams
    lora_targets: Tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                                     "ff.net.2")

    def lora_targets_of(self, block: nn.Module, last: bool = False) -> Tuple[str, ...]:
        """The :attr:`lora_targets` of one block (``last``: the model's last routable block). A
        family drops the layers whose output the model never uses there (the last block's
        text stream): they would get no gradient, which DDP refuses."""
        return self.lora_targets

    #: whether :meth:`fused_forward` exists (the conformance test compares it with compat)
    has_fused: bool = False

    def compat_forward(self, block, base_forward, call, sel, ks, gate, mlp_gate, *,
                       inplace_residual=False):
        """The routed block's output (what the diffusers block returns) computed by the
        block's own forward on the gathered tokens of each group of equal-k segments
        (``ks``: host kept counts ``[B][P]``), the feed-forward of each call gated per token
        through ``mlp_gate.scaled(gate rows)``; skipped tokens pass through unchanged."""
        raise NotImplementedError

    def fused_forward(self, block, call, sel, gate_scores, *, inplace_residual=False):
        raise NotImplementedError(f"{self.name}: no fused forward")

    # ------------------------------------------------------------------ versions
    def diffusers_tested(self) -> Optional[str]:
        """None when the installed diffusers is in :attr:`tested_diffusers`, else a message."""
        import diffusers

        return _outside_tested(diffusers.__version__, self.tested_diffusers, self.name)


def take_samples(v, samp, B):
    """Select the samples ``samp`` of a per-sample argument (tensors with a leading batch dim of
    B, or 1: broadcast; dicts recursively); anything else passes through."""
    import torch

    if torch.is_tensor(v) and v.dim() >= 1:
        if v.shape[0] == B:
            return v[samp]
        if v.shape[0] == 1:
            return v.expand(samp.numel(), *v.shape[1:])
        return v
    if isinstance(v, dict):
        return {k: take_samples(x, samp, B) for k, x in v.items()}
    return v


def display_name(name: str) -> str:
    """``"transformer_blocks.3"`` -> ``"transformer_blocks[3]"`` (for messages)."""
    head, _, tail = name.rpartition(".")
    return f"{head}[{tail}]" if head and tail.isdigit() else name


def _outside_tested(version: str, tested: Tuple[str, str], family: str) -> Optional[str]:
    have = _version_tuple(version)[:2]
    lo, hi = tested
    if have < _version_tuple(lo)[:2] or have > _version_tuple(hi)[:2]:
        return (f"diffusers {version} is outside the releases the {family} family was tested "
                f"with ({lo}.x to {hi}.x)")
    return None


def _version_tuple(v: str) -> Tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
        if digits != part:
            break
    return tuple(out)


_SIGS: Dict[Callable, inspect.Signature] = {}


def _signature(fn) -> inspect.Signature:
    sig = _SIGS.get(fn)
    if sig is None:
        sig = _SIGS[fn] = inspect.signature(fn)
    return sig


_WARNED = set()


def warn_once(key, message: str) -> None:
    """``warnings.warn(message)`` the first time ``key`` is seen in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)
