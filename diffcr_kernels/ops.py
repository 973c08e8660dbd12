"""Public ops of the data path, with backend dispatch, fake (meta) kernels and autograd.

Backends, tried in order for each call (``auto``):

* ``cuda``      compiled CUDA kernels of ``diffcr_kernels._C`` (CUDA tensors);
* ``triton``    Triton kernels (:mod:`diffcr_kernels.triton`; CUDA tensors, or CPU tensors under
                the Triton interpreter when forced);
* ``cpu``       compiled C++ CPU kernels of ``diffcr_kernels._C`` (CPU tensors);
* ``reference`` pure torch (:mod:`diffcr_kernels.reference`), always available.

``DIFFCR_BACKEND=reference|cpu|cuda|triton`` (or :func:`use_backend`) forces one; forcing a
backend that cannot run the given tensors raises an error that says why instead of silently
falling back. Selection runs the reference (torch's stable sort, static shapes, no sync) on
every backend but a forced ``triton``, where one Triton program per segment ranks the scores
and the reference builds the :class:`Selection` around its indices (float64 scores and rows
longer than :data:`diffcr_kernels.triton.select.MAX_TOKENS` keep the torch sort); router
scores run torch's GEMV + sigmoid unless Triton is forced for inference.

The compiled ops are ``torch.library`` operators (``torch.ops.diffcr.*``) with fake kernels, so
``torch.compile`` traces them, and with autograd registered here, so gradients reach the values,
the modulation vectors, the router scores and the per-segment (bin) weights.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, Optional, Union

import torch

from . import _ext
from . import autocast as _ac
from . import reference as ref
from ._schemas import SCHEMAS, mutated_args
from . import triton as _triton

if _triton.AVAILABLE:
    from .triton import select as _triton_select
else:  # pragma: no cover - triton missing
    _triton_select = None
from .reference import Selection, acc_dtype

__all__ = [
    "BACKENDS",
    "current_backend",
    "use_backend",
    "resolve_backend",
    "router_scores",
    "select_topk",
    "gather_rows",
    "gather_norm_modulate",
    "scatter_back",
    "scatter_back_",
    "scatter_back_selection",
    "apply_token_cache_",
    "token_cache_slots",
]

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
_override: Optional[str] = None


def current_backend() -> str:
    """The requested backend: :func:`use_backend` if active, else ``$DIFFCR_BACKEND``, else auto."""
    req = _override or os.environ.get("DIFFCR_BACKEND", "auto") or "auto"
    if req not in BACKENDS:
        raise ValueError(f"DIFFCR_BACKEND must be one of {BACKENDS}, got {req!r}")
    return req


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block (tests, benchmarks)."""
    global _override
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    old, _override = _override, name
    try:
        yield
    finally:
        _override = old


def _triton_ok(device: torch.device) -> Optional[str]:
    """None if the Triton ops can run tensors on ``device``, else why not."""
    if not _triton.AVAILABLE:
        return f"triton is not importable ({_triton.IMPORT_ERROR})"
    if TRITON_ERROR:
        return f"Triton ops failed to register ({TRITON_ERROR})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _triton.INTERPRETED:
        return None
    return (f"Triton kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got "
            f"{device}")


def resolve_backend(op: str, device: torch.device) -> str:
    """The backend that will run compiled op ``op`` for tensors on ``device``."""
    req = current_backend()
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    available = key is not None and _ext.has_kernel(op, key)
    if req == "reference":
        return "reference"
    if req == "auto":
        if available:
            return device.type
        if device.type == "cuda" and _triton_ok(device) is None:
            return "triton"
        return "reference"
    if req == "triton":
        why = _triton_ok(device)
        if why:
            raise RuntimeError(f"diffcr: backend 'triton' was requested but cannot run: {why}")
        return "triton"
    if req != device.type:
        raise RuntimeError(f"diffcr: backend {req!r} was requested but the tensors are on "
                           f"{device}")
    if not available:
        why = _ext.LOAD_ERROR or f"the extension has no {key} kernel for diffcr::{op}"
        raise RuntimeError(f"diffcr: backend {req!r} was requested but is not available: {why}")
    return req


# --------------------------------------------------------------------------------------------
# Ops without a compiled kernel yet: the reference is the implementation.
# --------------------------------------------------------------------------------------------
def router_scores(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sigmoid(x . w)`` for every token: x ``[B, N, D]``, weight ``[D]`` -> ``[B, N]`` (acc
    dtype). See :func:`diffcr_kernels.reference.router_scores`."""
    if x.dim() != 3:
        raise ValueError(f"router_scores: x must be [B, N, D], got shape {tuple(x.shape)}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"router_scores: weight must be [D] = [{x.shape[-1]}], got shape "
                         f"{tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"router_scores: weight is on {weight.device} but x is on "
                         f"{x.device}")
    if current_backend() == "triton" and not (torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad)):
        why = _triton_ok(x.device)
        if why:
            raise RuntimeError(f"diffcr: backend 'triton' was requested but cannot run: {why}")
        return _triton.router_scores(x.contiguous(), weight.to(x.dtype).contiguous())
    return ref.router_scores(x, weight)


def select_topk(scores: torch.Tensor, k, seg_weight=None) -> Selection:
    """Ragged per-segment top-k into the packed layout. See
    :func:`diffcr_kernels.reference.select_topk`. With ``DIFFCR_BACKEND=triton`` one Triton
    program per segment sorts and packs the indices (:mod:`diffcr_kernels.triton.select`);
    otherwise torch's stable sort (CUB segmented radix sort on CUDA) with static shapes. The
    Triton kernel ranks in float32, so float64 scores (which float32 could tie) and more than
    its ``MAX_TOKENS`` tokens take the torch sort: every backend selects the same tokens."""
    if current_backend() == "triton" and _triton_select is not None and torch.is_tensor(scores) \
            and scores.dim() == 2 and scores.dtype != torch.float64 \
            and scores.shape[1] <= _triton_select.MAX_TOKENS:
        why = _triton_ok(scores.device)
        if why:
            raise RuntimeError(f"diffcr: backend 'triton' was requested but cannot run: {why}")
        return ref.select_topk(scores, k, seg_weight,
                               indices_kernel=_triton_select.select_indices)
    return ref.select_topk(scores, k, seg_weight)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Packed rows ``x.reshape(B * N, D)[idx]`` (``index_select``: already a single pass).
    ``idx``: int64 ``[T]`` flat row indices in ``[0, B * N)`` on ``x``'s device (``ValueError``
    naming ``idx`` otherwise; the range is checked on the host for CPU tensors, and for CUDA
    tensors with ``DIFFCR_VALIDATE=1``)."""
    _check_x("gather_rows", x)
    if not torch.is_tensor(idx):
        raise TypeError(f"gather_rows: idx must be a tensor, got {type(idx).__name__}")
    if idx.dim() != 1 or idx.dtype != torch.int64:
        raise ValueError(f"gather_rows: idx must be int64 [T], got {idx.dtype} of shape "
                         f"{tuple(idx.shape)}")
    if idx.device != x.device:
        raise ValueError(f"gather_rows: idx is on {idx.device} but x is on {x.device}")
    rows = x.shape[0] * x.shape[1]
    if idx.numel() and not torch.compiler.is_compiling() and (
            idx.device.type == "cpu" or _validate_contents()):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= rows:
            raise ValueError(f"gather_rows: idx holds {lo if lo < 0 else hi}, outside the "
                             f"{rows} rows of x (B * N)")
    return ref.gather_rows(x, idx)


# --------------------------------------------------------------------------------------------
# argument validation shared by every backend (before any kernel runs)
# --------------------------------------------------------------------------------------------
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INDEX_LIMIT = 2 ** 31 - 1  # cu_seqlens are int32: packed rows must fit


def _validate_contents() -> bool:
    """Content checks (index ranges, cu_seqlens) read tensors on the host: always for CPU
    tensors, for CUDA tensors only with DIFFCR_VALIDATE=1 (it costs a device sync)."""
    return os.environ.get("DIFFCR_VALIDATE", "0") == "1"


def _need(t, op, name, shape, x):
    if t is None:
        return
    if not torch.is_tensor(t):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _check_x(op, x):
    if not torch.is_tensor(x):
        raise TypeError(f"{op}: x must be a tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [B, N, D], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{op}: x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.numel() >= 2 ** 63 // 8:
        raise ValueError(f"{op}: x is too large to index")


def _check_idx(op, x, idx, contents=True):
    if not torch.is_tensor(idx) or idx.dim() != 1 or idx.dtype != torch.int64:
        raise ValueError(f"{op}: idx must be a 1-D int64 tensor [T], got "
                         f"{getattr(idx, 'dtype', type(idx).__name__)} "
                         f"{tuple(getattr(idx, 'shape', ()))}")
    if idx.device != x.device:
        raise ValueError(f"{op}: idx is on {idx.device} but x is on {x.device}")
    if idx.numel() > INDEX_LIMIT:
        raise ValueError(f"{op}: {idx.numel()} packed rows exceed the int32 limit of cu_seqlens")
    rows = x.shape[0] * x.shape[1]
    if contents and idx.numel() and not torch.compiler.is_compiling() and (
            idx.device.type == "cpu" or _validate_contents()):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= rows:
            bad = int(torch.nonzero((idx < 0) | (idx >= rows))[0, 0])
            raise ValueError(f"{op}: idx[{bad}] = {int(idx[bad])} is out of range for x with "
                             f"{rows} rows (B*N)")


def _check_gather(op, x, idx, shift, scale, weight, bias, contents=True, eps=0.0):
    _check_x(op, x)
    _check_idx(op, x, idx, contents)
    B, N, D = x.shape
    for name, t, shape in (("shift", shift, (B, D)), ("scale", scale, (B, D)),
                           ("weight", weight, (D,)), ("bias", bias, (D,))):
        _need(t, op, name, shape, x)
        if t is not None and t.dtype != x.dtype:  # as every compiled backend requires
            raise ValueError(f"{op}: {name} has dtype {t.dtype}, expected {x.dtype} (the dtype "
                             "of x)")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")


def _check_scatter(x, idx, cu, seg_weight, attn_update, mlp_out, scores, gate, max_seqlen, P,
                   contents=True):
    """Validates a scatter-back call; returns ``(max_seqlen, segs_per_sample)``. ``contents``
    False (a checked :class:`Selection`) skips the host-side reads of idx and cu_seqlens."""
    op = "scatter_back"
    _check_x(op, x)
    _check_idx(op, x, idx, contents)
    B, N, D = x.shape
    T = idx.numel()
    S = ref.check_cu_seqlens(op, cu, x.device)
    P, derived = _segs_per_sample(op, S, B, P)
    _need(seg_weight, op, "seg_weight", (S,), x)
    _need(attn_update, op, "attn_update", (T, D), x)
    _need(mlp_out, op, "mlp_out", (T, D), x)
    _need(scores, op, "scores", (T,), x)
    _need(gate, op, "gate", (B, D), x)
    for name, t in (("attn_update", attn_update), ("mlp_out", mlp_out), ("gate", gate)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{op}: {name} has dtype {t.dtype}, expected {x.dtype} (the dtype "
                             "of x)")
    # a layout that is not sample-major (S not a multiple of B) with a derived P is checked on
    # the host even on a GPU: nothing else says its slots are free of races
    if S and not torch.compiler.is_compiling() and (max_seqlen is None or (contents and (
            cu.device.type == "cpu" or _validate_contents() or (derived and B and S % B)))):
        c = cu.tolist()
        if c[0] != 0:
            raise ValueError(f"{op}: cu_seqlens[0] must be 0, got {c[0]}")
        lens = [b - a for a, b in zip(c[:-1], c[1:])]
        if min(lens) < 0:
            s = lens.index(min(lens))
            raise ValueError(f"{op}: cu_seqlens must be non-decreasing, but cu_seqlens[{s + 1}]"
                             f" = {c[s + 1]} < cu_seqlens[{s}] = {c[s]}")
        if c[-1] != T:
            raise ValueError(f"{op}: cu_seqlens[-1] = {c[-1]} must equal the number of rows "
                             f"T = {T}")
        if T and contents:
            _check_slots(op, idx, lens, P, B * N)
        if max_seqlen is None:
            max_seqlen = max(lens)
        elif max_seqlen < max(lens):
            raise ValueError(f"{op}: segment {lens.index(max(lens))} has {max(lens)} rows but "
                             f"max_seqlen = {max_seqlen}")
    return (0 if max_seqlen is None else int(max_seqlen)), P


def _check_slots(op: str, idx: torch.Tensor, lens, P: int, rows: int) -> None:
    """The CUDA/Triton kernels add all segments of one slot (segments s with s % P == p, one
    per sample) concurrently: a row may appear in several slots (the two bins of a sample) but
    only once per slot, or two threads would race on it. A host-side scan: run only for
    user-supplied indices, never for a checked :class:`Selection`."""
    S = len(lens)
    T = idx.numel()
    seg = torch.repeat_interleave(torch.arange(S), torch.tensor(lens))
    key = (seg % P) * rows + idx.cpu()
    if torch.unique(key).numel() != T:
        srt, order = torch.sort(key)
        dup = int(order[1:][srt[1:] == srt[:-1]][0])
        raise ValueError(f"{op}: idx[{dup}] = {int(idx[dup])} appears twice in the "
                         f"segments of slot {int(seg[dup]) % P} (segment {int(seg[dup])});"
                         " a row may appear once per slot (segments s with "
                         "s % segs_per_sample equal are added concurrently)")


def _segs_per_sample(op: str, S: int, B: int, P) -> "tuple[int, bool]":
    """(P, derived): the segments per sample of a scatter-back layout. Every
    :class:`~diffcr_kernels.reference.Selection` is sample-major with the same P segments for
    each of the B samples, so ``S = B * P`` and P follows from the shapes (None: derived). An
    explicit P that contradicts ``S // B`` is refused: with P = 1 for a two-bin layout the
    CUDA/Triton kernels would add a sample's two bins to the same rows concurrently (a race
    that no cheap check on the GPU could see). Layouts whose S is not a multiple of B (custom
    segments) keep P = 1 by default."""
    if P is None:
        return (S // B if B and S and S % B == 0 else 1), True
    if isinstance(P, bool) or not isinstance(P, int) or P < 1 or S % P:
        raise ValueError(f"{op}: the number of segments ({S}) is not a multiple of "
                         f"segs_per_sample ({P})")
    if B and S and S % B == 0 and S // B != P:
        raise ValueError(f"{op}: segs_per_sample = {P} does not match the layout: {S} segments "
                         f"over B = {B} samples is {S // B} per sample (sample-major); leave "
                         "segs_per_sample out to derive it")
    return P, False


# --------------------------------------------------------------------------------------------
# gather + LayerNorm + modulate
# --------------------------------------------------------------------------------------------
def gather_norm_modulate(
    x: torch.Tensor,
    idx: Union[torch.Tensor, Selection],
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``LN(x[idx]) * (1 + scale[b]) + shift[b]`` on packed rows (one read, one write per row).

    x ``[B, N, D]``; idx int64 ``[T]`` flat rows ``b * N + n``, or a
    :class:`~diffcr_kernels.reference.Selection` (its indices; a checked one skips the host-side
    range check); shift/scale ``[B, D]``; weight/bias ``[D]`` (LayerNorm affine, None for
    PixArt/DiT). Returns ``[T, D]`` in x's dtype. Differentiable in x, shift, scale, weight and
    bias.
    """
    contents = True
    if isinstance(idx, Selection):
        contents, idx = not idx.checked, idx.indices
    if _ac.autocast_dtype(x.device) is not None:  # the block's eager dtypes (diffcr_kernels.autocast)
        dt = _ac.promoted(_ac.norm_dtype(x), (shift, scale))
        x, shift, scale, weight, bias = (_ac.cast(t, dt) for t in (x, shift, scale, weight, bias))
    _check_gather("gather_norm_modulate", x, idx, shift, scale, weight, bias, contents, eps)
    backend = resolve_backend("gather_norm_modulate", x.device)
    if backend == "reference":
        return ref.gather_norm_modulate(x, idx, shift, scale, weight, bias, eps)
    return _ns(backend).gather_norm_modulate(x, idx, shift, scale, weight, bias, float(eps))[0]


# --------------------------------------------------------------------------------------------
# gated, weighted scatter-back
# --------------------------------------------------------------------------------------------
def scatter_back(
    x: torch.Tensor,
    idx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seg_weight: torch.Tensor,
    attn_update: torch.Tensor,
    mlp_out: Optional[torch.Tensor] = None,
    scores: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    *,
    max_seqlen: Optional[int] = None,
    segs_per_sample: Optional[int] = None,
) -> torch.Tensor:
    """``out = x; out[idx[r]] += seg_weight[seg(r)] * (attn_update[r] + scores[r] * gate[b] *
    mlp_out[r])``.

    See :func:`diffcr_kernels.reference.scatter_back` for the full definition. ``max_seqlen``
    (the longest segment) is needed by the CUDA grid; it is computed from ``cu_seqlens`` (a
    device sync) when not given. ``segs_per_sample`` is P of the sample-major segment layout:
    it lets the CUDA kernel add the segments of a sample in a fixed order without atomics.
    Leave it out: it is derived from the shapes (``S // B``), and a value that contradicts
    them is refused. Differentiable in x, attn_update, mlp_out, scores, gate and seg_weight.

    These are user-supplied indices: on CPU (and on GPU with ``DIFFCR_VALIDATE=1``) their range,
    ``cu_seqlens`` and the race-freedom of every slot are checked on the host. A
    :class:`~diffcr_kernels.reference.Selection` from :func:`select_topk` needs none of that:
    pass it to :func:`scatter_back_selection`.
    """
    return _scatter(x, idx, cu_seqlens, seg_weight, attn_update, mlp_out, scores, gate, max_seqlen,
                    segs_per_sample, contents=True, inplace=False)


def scatter_back_(
    x: torch.Tensor,
    idx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seg_weight: torch.Tensor,
    attn_update: torch.Tensor,
    mlp_out: Optional[torch.Tensor] = None,
    scores: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    *,
    max_seqlen: Optional[int] = None,
    segs_per_sample: Optional[int] = None,
) -> torch.Tensor:
    """In-place :func:`scatter_back` for inference: ``x[idx[r]] += seg_weight[seg(r)] *
    (attn_update[r] + scores[r] * gate[b] * mlp_out[r])`` written into ``x`` itself, which is
    returned.

    Saves the copy of the whole ``[B, N, D]`` residual stream that :func:`scatter_back` makes
    (a full read and write of it per routed block). Same arguments and checks as
    :func:`scatter_back`; in addition x must be contiguous and share no memory with attn_update,
    mlp_out, gate or idx. Not differentiable: refused when autograd would record it (an input
    requires grad and grad mode is on).
    """
    return _scatter(x, idx, cu_seqlens, seg_weight, attn_update, mlp_out, scores, gate, max_seqlen,
                    segs_per_sample, contents=True, inplace=True)


def scatter_back_selection(
    x: torch.Tensor,
    sel: Selection,
    attn_update: torch.Tensor,
    mlp_out: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    *,
    use_scores: bool = True,
    scores: Optional[torch.Tensor] = None,
    inplace: bool = False,
) -> torch.Tensor:
    """:func:`scatter_back` (``inplace``: :func:`scatter_back_`) with the indices, segments,
    weights and scores of a :class:`~diffcr_kernels.reference.Selection`.

    The router scores ``sel.scores`` gate mlp_out when ``use_scores``; ``scores`` ``[T]`` replaces
    them (e.g. the gate factor γ(s) of the MLP branch). A selection made by
    :func:`select_topk` is correct by construction, so its indices and segments are not
    re-checked on the host (no per-call scan on the hot path)."""
    if scores is None and use_scores:
        scores = sel.scores
    return _scatter(x, sel.indices, sel.cu_seqlens, sel.seg_weight, attn_update, mlp_out, scores,
                    gate, sel.max_seqlen, sel.segs_per_sample, contents=not sel.checked,
                    inplace=inplace)


def _scatter(x, idx, cu_seqlens, seg_weight, attn_update, mlp_out, scores, gate, max_seqlen,
             segs_per_sample, *, contents: bool, inplace: bool) -> torch.Tensor:
    op = "scatter_back_" if inplace else "scatter_back"
    if _ac.autocast_dtype(x.device) is not None:  # eager promotion (diffcr_kernels.autocast)
        dt = x.dtype if inplace else _ac.promoted(
            x.dtype, (attn_update, mlp_out, gate, None if mlp_out is None else scores))
        x, attn_update, mlp_out, gate = (_ac.cast(t, dt) for t in (x, attn_update, mlp_out, gate))
    if inplace:
        tensors = (x, seg_weight, attn_update, mlp_out, scores, gate)
        if torch.is_grad_enabled() and any(torch.is_tensor(t) and t.requires_grad
                                           for t in tensors):
            raise ValueError(f"{op}: the in-place scatter-back is for inference; an input "
                             "requires grad (use scatter_back, or run under torch.no_grad())")
    max_seqlen, segs_per_sample = _check_scatter(x, idx, cu_seqlens, seg_weight, attn_update,
                                                 mlp_out, scores, gate, max_seqlen, segs_per_sample,
                                                 contents)
    if inplace:
        if not x.is_contiguous():
            raise ValueError(f"{op}: x must be contiguous to be updated in place (use "
                             "scatter_back, which returns a new tensor)")
        if not torch.compiler.is_compiling():  # (the compiled ops check it again)
            for name, t in (("attn_update", attn_update), ("mlp_out", mlp_out), ("gate", gate),
                            ("idx", idx)):
                if t is not None and t.untyped_storage().data_ptr() == \
                        x.untyped_storage().data_ptr():
                    raise ValueError(f"{op}: {name} shares memory with x, which is updated in "
                                     "place")
    backend = resolve_backend(op, x.device)
    if backend == "reference":
        out = ref.scatter_back(x, idx, cu_seqlens, seg_weight, attn_update, mlp_out, scores, gate)
        return x.copy_(out) if inplace else out
    a = acc_dtype(x.dtype)
    args = (x, idx, cu_seqlens, int(max_seqlen), int(segs_per_sample), seg_weight.to(a),
            attn_update, mlp_out, None if scores is None else scores.to(a), gate)
    if inplace:
        _ns(backend).scatter_back_(*args)
        return x
    return _ns(backend).scatter_back(*args)


# --------------------------------------------------------------------------------------------
# the token cache applied to a routed block's output (inference)
# --------------------------------------------------------------------------------------------
def token_cache_slots(sel: Selection, rows: int) -> torch.Tensor:
    """int32 ``[rows]``: for every row of the source (``B * N``), the packed row of ``sel`` that
    holds it (-1: not selected), the ``slot`` argument of :func:`apply_token_cache_`. A row
    selected in two segments (both bins) maps to one of them (their inputs are the same)."""
    T = sel.indices.numel()
    slot = torch.full((rows,), -1, dtype=torch.int32, device=sel.indices.device)
    return slot.index_put_((sel.indices,), torch.arange(T, dtype=torch.int32,
                                                        device=slot.device))


def _check_token_cache(out, cache, slot, x_rows, miss, contents=True):
    op = "apply_token_cache_"
    _check_x(op, out)
    B, N, D = out.shape
    R = B * N
    if not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous (it is updated in place)")
    if not torch.is_tensor(cache) or cache.dtype not in _FLOATS:
        raise ValueError(f"{op}: cache must be a float32, float64, float16 or bfloat16 tensor, "
                         f"got {getattr(cache, 'dtype', type(cache).__name__)}")
    _need(cache, op, "cache", (R, D), out)
    if not cache.is_contiguous():
        raise ValueError(f"{op}: cache must be contiguous (it is updated in place)")
    if not torch.is_tensor(slot) or slot.dim() != 1 or slot.dtype != torch.int32:
        raise ValueError(f"{op}: slot must be a 1-D int32 tensor [B*N], got "
                         f"{getattr(slot, 'dtype', type(slot).__name__)} "
                         f"{tuple(getattr(slot, 'shape', ()))}")
    _need(slot, op, "slot", (R,), out)
    if not torch.is_tensor(x_rows) or x_rows.dim() != 2:
        raise ValueError(f"{op}: x_rows must be a [T, D] tensor, got "
                         f"{tuple(getattr(x_rows, 'shape', ()))}")
    _need(x_rows, op, "x_rows", (x_rows.shape[0], D), out)
    if x_rows.dtype != out.dtype:
        raise ValueError(f"{op}: x_rows has dtype {x_rows.dtype}, expected {out.dtype} (the "
                         "dtype of out)")
    if miss is not None:
        _need(miss, op, "miss", (R,), out)
        if miss.dtype != acc_dtype(out.dtype):
            raise ValueError(f"{op}: miss has dtype {miss.dtype}, expected "
                             f"{acc_dtype(out.dtype)} (float64 for float64 data, float32 "
                             "otherwise)")
    if not torch.compiler.is_compiling():
        shared = out.untyped_storage().data_ptr()
        if out.numel() and cache.untyped_storage().data_ptr() == shared:
            raise ValueError(f"{op}: cache shares memory with out; both are updated in place")
        for name, t in (("x_rows", x_rows), ("slot", slot), ("miss", miss)):
            if t is not None and t.numel() and t.untyped_storage().data_ptr() in (
                    shared, cache.untyped_storage().data_ptr()):
                raise ValueError(f"{op}: {name} shares memory with out or cache, which are "
                                 "updated in place")
        T = x_rows.shape[0]
        if contents and R and (slot.device.type == "cpu" or _validate_contents()):
            lo, hi = int(slot.min()), int(slot.max())
            if lo < -1 or hi >= T:
                bad = int(torch.nonzero((slot < -1) | (slot >= T))[0, 0])
                raise ValueError(f"{op}: slot[{bad}] = {int(slot[bad])} is out of range: -1 "
                                 f"(skipped) or a row of x_rows, which has {T}")


def apply_token_cache_(
    out: torch.Tensor,
    cache: torch.Tensor,
    slot: torch.Tensor,
    x_rows: torch.Tensor,
    miss: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One pass over a routed block's output for the token cache (inference, in place): every
    row that missed the block receives its cached update, and every selected row's new update
    goes into the cache. Returns ``out``.

    Args:
        out: ``[B, N, D]`` float, contiguous: the block's output (selected rows ``x + update``,
            skipped rows ``x``); updated in place.
        cache: ``[B * N, D]`` float (any of float32/float64/float16/bfloat16, independent of
            out's dtype), contiguous: each row's last update; the selected rows' entries are
            overwritten.
        slot: int32 ``[B * N]``: the row of ``x_rows`` holding each row's input, -1 for a
            skipped row (:func:`token_cache_slots` builds it from a :class:`Selection`).
        x_rows: ``[T, D]`` in out's dtype: the selected rows' inputs, gathered before the block
            ran (an in-place block overwrites them).
        miss: optional ``[B * N]`` acc dtype (float64 for float64 data, else float32): the
            weight with which each row misses the block (``1 - coverage``); None: 1 for a
            skipped row, 0 for a selected one.

    The exact definition is :func:`diffcr_kernels.reference.apply_token_cache_`. Memory
    traffic: one read of each row of out and cache, one write of one of them, one read of
    x_rows. Not differentiable (the token cache in training uses
    :func:`diffcr.token_cache.apply_token_cache`); refused when autograd would record it.
    """
    op = "apply_token_cache_"
    if torch.is_grad_enabled() and any(torch.is_tensor(t) and t.requires_grad
                                       for t in (out, cache, x_rows, miss)):
        raise ValueError(f"{op}: the token cache pass is for inference; an input requires grad "
                         "(run under torch.no_grad())")
    _check_token_cache(out, cache, slot, x_rows, miss)
    backend = resolve_backend(op, out.device)
    if backend == "reference":
        ref.apply_token_cache_(out, cache, slot, x_rows, miss)
    else:
        _ns(backend).apply_token_cache_(out, cache, slot, x_rows, miss)
    return out


# --------------------------------------------------------------------------------------------
# fake kernels and autograd of the compiled ops
# --------------------------------------------------------------------------------------------
def _ns(backend: str):
    return torch.ops.diffcr_triton if backend == "triton" else torch.ops.diffcr


TRITON_ERROR: Optional[str] = None


def _define_triton_ops() -> None:
    """The Triton launchers as ``torch.library`` custom ops (namespace ``diffcr_triton``) with
    the schemas of :mod:`diffcr_kernels._schemas` (the same as ``torch.ops.diffcr``), for CUDA
    tensors and for CPU tensors under the Triton interpreter."""
    for name, schema in SCHEMAS.items():
        torch.library.custom_op(f"diffcr_triton::{name}", getattr(_triton, name),
                                mutates_args=mutated_args(name),
                                device_types=("cuda", "cpu"), schema=schema)


def _register_family(ns: str) -> None:
    """Fake kernels and autograd for the ops of namespace ``ns`` (``diffcr`` = the C++
    extension, ``diffcr_triton`` = the Triton kernels): both families share the math here."""
    lib = ns + "::"
    ops = getattr(torch.ops, ns)

    @torch.library.register_fake(lib + "gather_norm_modulate")
    def _gnm_fake(x, idx, shift, scale, weight, bias, eps):
        T, D = idx.shape[0], x.shape[2]
        a = acc_dtype(x.dtype)
        return x.new_empty(T, D), x.new_empty(T, dtype=a), x.new_empty(T, dtype=a)

    @torch.library.register_fake(lib + "gather_norm_modulate_backward")
    def _gnm_bwd_fake(grad_y, x, idx, mean, rstd, scale, weight):
        return x.new_empty(idx.shape[0], x.shape[2])

    @torch.library.register_fake(lib + "scatter_back")
    def _sb_fake(x, idx, cu_seqlens, max_seqlen, segs_per_sample, seg_weight, attn_update, mlp_out,
                 scores, gate):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "scatter_back_")
    def _sb_inplace_fake(x, idx, cu_seqlens, max_seqlen, segs_per_sample, seg_weight, attn_update,
                         mlp_out, scores, gate):
        return None

    @torch.library.register_fake(lib + "scatter_back_backward")
    def _sb_bwd_fake(grad_out, idx, cu_seqlens, max_seqlen, seg_weight, attn_update, mlp_out,
                     scores, gate):
        T, D = idx.shape[0], grad_out.shape[2]
        a = seg_weight.dtype
        new = attn_update.new_empty
        return (new(T, D), new(T if mlp_out is not None else 0, D),
                new(T if scores is not None else 0, dtype=a), new(T, dtype=a))

    @torch.library.register_fake(lib + "apply_token_cache_")
    def _tc_fake(out, cache, slot, x_rows, miss):
        return None

    # gather_norm_modulate: inputs (x, idx, shift, scale, weight, bias, eps)
    def _gnm_setup(ctx, inputs, output):
        x, idx, shift, scale, weight, bias, eps = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, idx, mean, rstd, shift, scale, weight, bias)

    def _gnm_backward(ctx, gy, _gmean, _grstd):
        x, idx, mean, rstd, shift, scale, weight, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        B, N, D = x.shape
        a = acc_dtype(x.dtype)
        gy = gy.contiguous()
        grad_x = grad_shift = grad_scale = grad_weight = grad_bias = None
        if need[0]:
            rows = ops.gather_norm_modulate_backward(gy, x, idx, mean, rstd, scale, weight)
            grad_x = torch.zeros(B * N, D, dtype=a, device=x.device).index_add_(
                0, idx, rows.to(a)).to(x.dtype).view(B, N, D)
        b = torch.div(idx, N, rounding_mode="floor")
        g = gy.to(a)
        if need[2] and shift is not None:
            grad_shift = torch.zeros(B, D, dtype=a, device=x.device).index_add_(0, b, g)
            grad_shift = grad_shift.to(shift.dtype)
        need_w = need[4] and weight is not None
        need_b = need[5] and bias is not None
        if (need[3] and scale is not None) or need_w or need_b:
            # xhat and its products are [T, D] temporaries: built in place, one buffer where
            # only the modulation scale needs a gradient (fresh large CPU buffers each cost a
            # page fault per 4 KiB, which dominated this backward at B = 8)
            xhat = x.reshape(B * N, D).index_select(0, idx).to(a)
            xhat.sub_(mean.unsqueeze(1)).mul_(rstd.unsqueeze(1))
            dn = None
            if need_w or need_b:
                dn = g if scale is None else g * (1 + scale.to(a)).index_select(0, b)
                if need_b:
                    grad_bias = dn.sum(0).to(bias.dtype)
                if need_w:
                    grad_weight = (dn * xhat).sum(0).to(weight.dtype)
            if need[3] and scale is not None:
                n = xhat if weight is None else xhat.mul_(weight.to(a))
                if bias is not None:
                    n = n.add_(bias.to(a))
                grad_scale = torch.zeros(B, D, dtype=a, device=x.device).index_add_(
                    0, b, n.mul_(g))
                grad_scale = grad_scale.to(scale.dtype)
        return grad_x, None, grad_shift, grad_scale, grad_weight, grad_bias, None

    torch.library.register_autograd(lib + "gather_norm_modulate", _gnm_backward,
                                    setup_context=_gnm_setup)

    # scatter_back: inputs (x, idx, cu_seqlens, max_seqlen, segs_per_sample, seg_weight,
    # attn_update, mlp_out, scores, gate)
    def _sb_setup(ctx, inputs, output):
        x, idx, cu, max_seqlen, _p, seg_weight, attn_update, mlp_out, scores, gate = inputs
        ctx.max_seqlen = max_seqlen
        ctx.shape = x.shape
        ctx.save_for_backward(idx, cu, seg_weight, attn_update, mlp_out, scores, gate)

    def _sb_backward(ctx, grad_out):
        idx, cu, seg_weight, attn_update, mlp_out, scores, gate = ctx.saved_tensors
        need = ctx.needs_input_grad
        B, N, D = ctx.shape
        a = seg_weight.dtype
        G = grad_out.contiguous()
        g_attn_update, g_mlp_out, gs, dots = ops.scatter_back_backward(
            G, idx, cu, ctx.max_seqlen, seg_weight, attn_update, mlp_out, scores, gate)
        grad_w = grad_gate = None
        if need[5]:
            S = cu.numel() - 1
            lengths = (cu[1:] - cu[:-1]).long()
            row_seg = torch.repeat_interleave(torch.arange(S, device=cu.device), lengths,
                                              output_size=idx.numel())
            grad_w = torch.zeros(S, dtype=a, device=cu.device).index_add_(0, row_seg, dots)
        if need[9] and gate is not None and mlp_out is not None:
            contrib = g_attn_update.to(a) * mlp_out.to(a)  # one [T, D] temporary, scaled in place
            if scores is not None:
                contrib.mul_(scores.unsqueeze(1).to(a))
            b = torch.div(idx, N, rounding_mode="floor")
            grad_gate = torch.zeros(B, D, dtype=a, device=G.device).index_add_(0, b, contrib)
            grad_gate = grad_gate.to(gate.dtype)
        return (G if need[0] else None, None, None, None, None, grad_w,
                g_attn_update if need[6] else None,
                g_mlp_out if (need[7] and mlp_out is not None) else None,
                gs if (need[8] and scores is not None) else None,
                grad_gate)

    torch.library.register_autograd(lib + "scatter_back", _sb_backward, setup_context=_sb_setup)


if _ext.LOADED:
    _register_family("diffcr")
if _triton.AVAILABLE:
    try:
        _define_triton_ops()
        _register_family("diffcr_triton")
    except Exception as e:  # noqa: BLE001 - the other backends must stay usable
        TRITON_ERROR = f"{type(e).__name__}: {e}"
