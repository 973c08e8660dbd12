"""The executable spec: a pure-torch definition of every op on DiffCR's data path.

Every compiled or Triton kernel in this package is tested against these functions. They favour
clarity over speed, but they are vectorised (no Python loop over tokens or samples, except the
per-segment attention loop, which is only the last-resort attention path) and autograd works
through all of them: the router scores, the per-segment bin weights, the modulation vectors and
the values all receive gradients.

Data path of one routed block (docs/method.md §7):

1. :func:`router_scores`   s = sigmoid(x . w) for every image token.
2. :func:`select_topk`     per segment, the k highest-scoring tokens of its sample, packed.
3. :func:`gather_norm_modulate`  LN(x[idx]) * (1 + scale[b]) + shift[b] on the packed rows.
4. block body on packed rows; :func:`varlen_attention` for self- and cross-attention.
5. :func:`scatter_back`    out = x;  out[idx] += w_seg * (attn_update + s * gate[b] * mlp_out).
6. :func:`apply_token_cache_` (token cache on, inference): skipped rows += their cached update,
   the selected rows' new updates written into the cache, in one pass.

Conventions
-----------
* ``x`` is the residual stream ``[B, N, D]``; packed rows are addressed by *flat* row indices
  ``idx = b * N + n`` into ``x.reshape(B * N, D)``, so the sample of a packed row is ``idx // N``.
* A *segment* is one sample's selection for one kept ratio. Segments are **sample-major**:
  with ``P`` segments per sample (1 at inference, 2 for the two-bin training pass) segment
  ``b * P + p`` belongs to sample ``b``. ``cu_seqlens`` (int32, ``[S + 1]``) delimits the packed
  rows of each segment, as in FlashAttention's varlen API.
* Within a segment, indices are ascending (sequential memory access; the block is
  permutation-equivariant so the order does not change the result).
* Scores, segment weights, means and rstds use the *accumulation dtype*: float64 for float64
  data, float32 otherwise.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "Selection",
    "acc_dtype",
    "check_cu_seqlens",
    "host_index",
    "kept_count",
    "router_scores",
    "select_topk",
    "gather_rows",
    "gather_norm_modulate",
    "scatter_back",
    "apply_token_cache_",
    "varlen_attention",
    "pack_text",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for data of ``dtype``: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kept_count(kappa: float, n: int) -> int:
    """Number of tokens a block keeps: ``k = min(N, max(1, ceil(kappa * N)))`` (method §1).

    ``kappa * N`` is computed in float64 and nudged down by a relative 1e-9 before the ceiling so
    that ratios which are exact decimals (0.7 * 10 = 7.000000000000001 in binary) give the
    intended count. ``kappa`` must lie in (0, 1].
    """
    kappa = float(kappa)
    if not (0.0 < kappa <= 1.0) or math.isnan(kappa):
        raise ValueError(f"kept ratio kappa must be in (0, 1], got {kappa}")
    if n < 1:
        raise ValueError(f"number of tokens N must be >= 1, got {n}")
    prod = kappa * n
    return min(n, max(1, math.ceil(prod - 1e-9 * max(1.0, prod))))


@dataclass(frozen=True)
class Selection:
    """A packed, ragged selection of tokens: the layout every kernel after the router consumes.

    Attributes
    ----------
    indices:     int64 ``[T]`` flat row indices ``b * N + n``, ascending within each segment.
    cu_seqlens:  int32 ``[S + 1]`` segment boundaries in the packed rows.
    max_seqlen:  largest segment length (a host int: FlashAttention and the kernels' grids need it).
    scores:      ``[T]`` router scores of the selected rows (acc dtype; differentiable).
    seg_weight:  ``[S]`` weight of each segment's contribution (bin weight w_a / w_b; 1 at
                 inference); acc dtype, differentiable.
    seg_sample:  int64 ``[S]`` sample of each segment.
    num_tokens:  N, tokens per sample in the source tensor.
    segs_per_sample: P, segments per sample (sample-major order: segment ``b * P + p``).
    uniform:     True when every segment has the same length (then ``max_seqlen == T // S`` and a
                 dense ``[S, k, D]`` view of the packed rows is valid).
    seqlens:     host tuple of the segment lengths (the same numbers as ``cu_seqlens``, without
                 a device sync).
    checked:     True when :func:`select_topk` made it: its indices are in range and distinct
                 within a segment and its ``cu_seqlens`` is consistent by construction, so the
                 ops that take a Selection skip their host-side content checks (a Selection built
                 by hand is checked like raw tensors; do not modify a checked one in place).
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    scores: torch.Tensor
    seg_weight: torch.Tensor
    seg_sample: torch.Tensor
    num_tokens: int
    segs_per_sample: int
    uniform: bool
    seqlens: Tuple[int, ...] = ()
    checked: bool = False

    @property
    def num_segments(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def total(self) -> int:
        return self.indices.numel()

    def row_segment(self) -> torch.Tensor:
        """int64 ``[T]``: the segment of each packed row."""
        dev = self.indices.device
        if self.seqlens:
            return torch.repeat_interleave(torch.arange(self.num_segments, device=dev),
                                           host_index(self.seqlens, dev),
                                           output_size=self.total)
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.num_segments, device=dev), lengths,
                                       output_size=self.total)

    def row_sample(self) -> torch.Tensor:
        """int64 ``[T]``: the sample of each packed row (``indices // N``)."""
        return torch.div(self.indices, self.num_tokens, rounding_mode="floor")

    def shared_rows(self) -> Optional[Tuple["Selection", torch.Tensor]]:
        """The rows that a selection with several segments per sample holds more than once.

        :func:`select_topk` cuts every segment of a sample from one ranking, so a smaller
        segment is a subset of a larger one (the two bins of training, method §2): the same
        token of the same sample appears in both. Work on a packed row that depends only on
        its token and its sample (gather, norm, modulation, the Q/K/V and other projections
        before attention, rotary) can run once per such token and be copied to the other
        segment's row, with the same values.

        Returns ``(union, src)``: ``union``, a selection of the largest segment of every sample
        (``[U]`` rows, one segment per sample), and ``src`` int64 ``[T]``, the union row of
        every packed row (``t_union.index_select(0, src)`` is the per-row tensor of this
        selection). None when no row repeats (one segment per sample) or the selection was not
        made by :func:`select_topk` (nesting not known). Static shapes, no device sync."""
        P = self.segs_per_sample
        if P == 1 or not self.checked or not self.seqlens:
            return None
        lens = self.seqlens
        B = len(lens) // P
        dev = self.indices.device
        rows, keep, cu, ulens = _shared_rows_tables(lens, P, dev)
        uidx = self.indices.index_select(0, rows)
        union = Selection(
            indices=uidx,
            cu_seqlens=cu,
            max_seqlen=max(ulens),
            scores=self.scores.index_select(0, rows),
            seg_weight=self.seg_weight.index_select(0, keep),
            seg_sample=host_index(list(range(B)), dev),
            num_tokens=self.num_tokens,
            segs_per_sample=1,
            uniform=len(set(ulens)) == 1,
            seqlens=tuple(ulens),
            checked=True,
        )
        # the union row of every token: a [B * N] map written at the union's tokens, read at
        # every packed row's (each packed token is in its sample's largest segment)
        pos = torch.empty(B * self.num_tokens, dtype=torch.int64, device=dev)
        pos.index_copy_(0, uidx, torch.arange(uidx.numel(), device=dev))
        return union, pos.index_select(0, self.indices)


_SHARED_CACHE: dict = {}


def _shared_rows_tables(lens, P: int, device):
    """For :meth:`Selection.shared_rows`: the packed rows of each sample's largest segment
    (int64 ``[U]``), those segments (int64 ``[B]``), the union's ``cu_seqlens`` (int32) and
    its host lengths, cached by the segment lengths (a training step asks for the same tables
    in every block: built once, not a U-long host list per call)."""
    key = (tuple(lens), P, str(device))
    got = None if torch.compiler.is_compiling() else _SHARED_CACHE.get(key)
    if got is not None:
        return got
    B = len(lens) // P
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    keep = [max(range(b * P, b * P + P), key=lambda s: lens[s]) for b in range(B)]
    ulens = [lens[s] for s in keep]
    cu = [0]
    for n in ulens:
        cu.append(cu[-1] + n)
    got = (host_index([r for s in keep for r in range(starts[s], starts[s] + lens[s])], device),
           host_index(keep, device), host_index(cu, device, torch.int32), tuple(ulens))
    if not torch.compiler.is_compiling():
        if len(_SHARED_CACHE) >= _INDEX_CACHE_MAX:
            _SHARED_CACHE.clear()
        _SHARED_CACHE[key] = got
    return got


def router_scores(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router scores ``s = sigmoid(x . w)`` (method §1: a linear map to one logit, no bias).

    x: ``[B, N, D]`` hidden states (any float dtype); weight: ``[D]``.
    Returns ``[B, N]`` scores in the accumulation dtype (float32, or float64 for float64 input),
    so that near-ties are not decided by bfloat16 rounding.
    """
    a = acc_dtype(x.dtype)
    return torch.sigmoid(torch.matmul(x.to(a), weight.to(a)))


def check_cu_seqlens(op: str, cu, device: torch.device, against: str = "x",
                     name: str = "cu_seqlens") -> int:
    """The argument check every op taking segment offsets runs (the reference itself, the
    compiled and Triton launchers, varlen attention): ``cu`` must be a 1-D int32 tensor
    ``[S + 1]`` on ``device`` (the device of the argument named ``against``). Returns S;
    ValueError naming ``op`` and the argument otherwise. The contents are not read (no
    device sync)."""
    if not torch.is_tensor(cu) or cu.dim() != 1 or cu.numel() < 1 or cu.dtype != torch.int32:
        raise ValueError(f"{op}: {name} must be a 1-D int32 tensor [S + 1], got "
                         f"{getattr(cu, 'dtype', type(cu).__name__)} "
                         f"{tuple(getattr(cu, 'shape', ()))}")
    if cu.device != device:
        raise ValueError(f"{op}: {name} is on {cu.device} but {against} is on {device}")
    return cu.numel() - 1


_INDEX_CACHE: dict = {}
_INDEX_CACHE_MAX = 512


def host_index(values: Sequence[int], device, dtype=torch.int64) -> torch.Tensor:
    """A device tensor of host-known integers, cached by value: the index tables that follow
    from host-side kept counts are copied to the device once, not at every call, so a routed
    forward replays inside a CUDA graph (no host-to-device copy during capture). Under
    ``torch.compile`` the tensor is built in the graph instead (constants)."""
    key = (tuple(values), str(device), dtype)
    if torch.compiler.is_compiling():
        return torch.tensor(key[0], device=device, dtype=dtype)
    t = _INDEX_CACHE.get(key)
    if t is None:
        if len(_INDEX_CACHE) >= _INDEX_CACHE_MAX:
            _INDEX_CACHE.clear()
        t = torch.tensor(key[0], device=device, dtype=dtype)
        _INDEX_CACHE[key] = t
    return t


def _whole_k(v) -> int:
    """One kept count: a whole number (an int, or a float with no fraction); never truncated."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"k must be whole numbers of tokens (int, [B] or [B, P]), got {v!r}")
    if isinstance(v, numbers.Integral):
        return int(v)
    if not math.isfinite(v) or not float(v).is_integer():
        raise ValueError(f"k must be whole numbers of tokens, got {v!r} (use "
                         "diffcr_kernels.kept_count(kappa, N) to turn a ratio into k)")
    return int(v)


def _host_k_table(k, B: int) -> List[List[int]]:
    """k as a host list ``[B][P]`` of ints (a tensor is copied to the host: pass Python ints on
    hot paths to avoid the device sync)."""
    if torch.is_tensor(k):
        k = k.tolist()
    if not isinstance(k, (list, tuple)):
        return [[_whole_k(k)] for _ in range(B)]
    rows = list(k)
    if len(rows) != B:
        raise ValueError(f"k must be an int, [B] or [B, P] with B = {B}, got {len(rows)} rows")
    table = [[_whole_k(v)] if not isinstance(v, (list, tuple)) else [_whole_k(x) for x in v]
             for v in rows]
    P = len(table[0])
    if P < 1 or any(len(r) != P for r in table):
        raise ValueError("k must have the same number of segments (P >= 1) for every sample")
    return table


def _seg_weight_table(seg_weight, B: int, P: int, dtype, device) -> torch.Tensor:
    if seg_weight is None:
        return torch.ones(B * P, dtype=dtype, device=device)
    w = torch.as_tensor(seg_weight, device=device)
    if w.dim() == 0:
        w = w.expand(B, P)
    elif w.dim() == 1 and w.numel() == B and P == 1:
        w = w.view(B, 1)
    elif w.dim() == 1 and w.numel() == B * P:
        w = w.view(B, P)
    if w.shape != (B, P):
        raise ValueError(f"seg_weight must be a scalar, [B], [B*P] or [B, P] = [{B}, {P}], got "
                         f"shape {tuple(w.shape)}")
    return w.to(dtype).reshape(B * P)


def select_topk(
    scores: torch.Tensor,
    k: Union[int, Sequence, torch.Tensor],
    seg_weight: Optional[Union[float, torch.Tensor]] = None,
    *,
    indices_kernel=None,
) -> Selection:
    """Per-segment top-k selection into the packed layout.

    scores:     ``[B, N]`` router scores.
    k:          tokens per segment: an int (same for every sample), ``[B]`` (one segment per
                sample) or ``[B][P]`` (P segments per sample, e.g. the two bins of training),
                as Python ints (a tensor works but costs a device-to-host copy). Every entry
                must lie in [1, N].
    seg_weight: weight per segment: scalar, ``[B]`` (P = 1), ``[B * P]`` or ``[B, P]`` tensor
                (default 1); stays on the device and keeps its autograd graph.
    indices_kernel: None (torch's sort, below), or a kernel that computes the packed indices by
                the same rule, called as ``(scores, k int32 [S], cu_seqlens int32 [S + 1], P,
                T)`` -> int64 ``[T]`` (:func:`diffcr_kernels.triton.select.select_indices`).

    Selection rule: the k highest scores of the segment's sample; ties go to the lower token
    index (a stable descending sort). NaN scores rank below every number, so they are chosen
    only when k exceeds the number of non-NaN scores. Selected indices are returned ascending
    within each segment; since every segment of a sample is cut from the same ranking, a segment
    with a smaller k is a subset of one with a larger k (method §2).

    All shapes follow from the host-side k, so the selection has static shapes (no
    data-dependent ``nonzero``, no device sync): it traces under ``torch.compile`` and captures
    into CUDA graphs.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, N], got shape {tuple(scores.shape)}")
    B, N = scores.shape
    if B == 0 or N == 0:
        raise ValueError(f"scores must have B >= 1 and N >= 1, got shape {tuple(scores.shape)}")
    device = scores.device
    ks = _host_k_table(k, B)
    P = len(ks[0])
    flat_k = [v for row in ks for v in row]
    kmin, kmax = min(flat_k), max(flat_k)
    if kmin < 1 or kmax > N:
        raise ValueError(f"every k must be in [1, N={N}], got min {kmin}, max {kmax}")
    a = acc_dtype(scores.dtype) if scores.dtype.is_floating_point else torch.float32
    ws = _seg_weight_table(seg_weight, B, P, a, device)
    S = B * P

    cu_host = [0]
    for kv in flat_k:
        cu_host.append(cu_host[-1] + kv)
    cu = host_index(cu_host, device, torch.int32)
    if indices_kernel is not None:  # a kernel computes the packed indices (same rule)
        indices = indices_kernel(scores.detach(), host_index(flat_k, device, torch.int32), cu,
                                 P, cu_host[-1])
        return _selection(scores, indices, cu, ws, a, kmin, kmax, N, P, B, flat_k)
    s = torch.nan_to_num(scores.detach(), nan=-math.inf)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices  # [B, N]
    if kmin == kmax:  # uniform: one sort of a [S, k] block
        top = order[:, :kmax] if P == 1 else order.repeat_interleave(P, dim=0)[:, :kmax]
        base = (torch.arange(S, device=device) // P) * N
        indices = (top.sort(dim=1).values + base[:, None]).reshape(-1)
    else:  # ragged: one sort per group of equal k, then a static permutation to segment order
        groups: dict = {}
        for seg, kv in enumerate(flat_k):
            groups.setdefault(kv, []).append(seg)
        pieces, seg_order = [], []
        for kv, segs in groups.items():
            samp = host_index([sg // P for sg in segs], device)
            top = order.index_select(0, samp)[:, :kv].sort(dim=1).values + samp[:, None] * N
            pieces.append(top.reshape(-1))
            seg_order += segs
        starts, pos = {}, 0
        for sg in seg_order:
            starts[sg] = pos
            pos += flat_k[sg]
        perm = [starts[sg] + j for sg in range(S) for j in range(flat_k[sg])]
        indices = torch.cat(pieces).index_select(0, host_index(perm, device))
    return _selection(scores, indices, cu, ws, a, kmin, kmax, N, P, B, flat_k)


def _selection(scores, indices, cu, ws, a, kmin, kmax, N, P, B, flat_k) -> Selection:
    device = scores.device
    sel_scores = scores.reshape(-1)[indices].to(a)
    return Selection(
        indices=indices,
        cu_seqlens=cu,
        max_seqlen=kmax,
        scores=sel_scores,
        seg_weight=ws,
        seg_sample=torch.arange(B, device=device).repeat_interleave(P),
        num_tokens=N,
        segs_per_sample=P,
        uniform=kmin == kmax,
        seqlens=tuple(flat_k),
        checked=True,
    )


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Packed rows ``x.reshape(B * N, D)[idx]`` -> ``[T, D]``."""
    return x.reshape(-1, x.shape[-1]).index_select(0, idx)


def gather_norm_modulate(
    x: torch.Tensor,
    idx: torch.Tensor,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Gather fused with LayerNorm and adaLN modulation.

    ``y[r] = (LN(x[idx[r]]) * weight + bias) * (1 + scale[b]) + shift[b]``, ``b = idx[r] // N``.

    x: ``[B, N, D]``; idx: int64 ``[T]`` flat rows; shift, scale: ``[B, D]`` or None;
    weight, bias: ``[D]`` (LayerNorm affine) or None; LayerNorm uses the biased variance and
    ``eps`` inside the square root. Computed in the accumulation dtype, returned in x's dtype.
    """
    B, N, D = x.shape
    a = acc_dtype(x.dtype)
    rows = gather_rows(x, idx).to(a)
    y = F.layer_norm(rows, (D,), None if weight is None else weight.to(a),
                     None if bias is None else bias.to(a), eps)
    b = torch.div(idx, N, rounding_mode="floor")
    if scale is not None:
        y = y * (1 + scale.to(a)[b])
    if shift is not None:
        y = y + shift.to(a)[b]
    return y.to(x.dtype)


def scatter_back(
    x: torch.Tensor,
    idx: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seg_weight: torch.Tensor,
    attn_update: torch.Tensor,
    mlp_out: Optional[torch.Tensor] = None,
    scores: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gated, bin-weighted scatter-back into the residual stream.

    ``out = x``; for every packed row r of segment j:
    ``out[idx[r]] += seg_weight[j] * (attn_update[r] + scores[r] * gate[b] * mlp_out[r])``,
    ``b = idx[r] // N``.

    In a routed block, attn_update is the packed residual update of the attention branches
    (``h - x[idx]``) and mlp_out the MLP output before its adaLN gate; the router score
    multiplies the MLP branch only (method §1). A token selected in several segments (both bins
    of a sample) receives the sum of their contributions; rows never selected are returned
    unchanged. Accumulated in the acc dtype and rounded once. Shapes: x ``[B, N, D]``;
    attn_update, mlp_out ``[T, D]``; scores ``[T]``; gate ``[B, D]``; seg_weight ``[S]``;
    cu_seqlens int32 ``[S + 1]``.
    """
    B, N, D = x.shape
    a = acc_dtype(x.dtype)
    T = idx.numel()
    S = cu_seqlens.numel() - 1
    if S < 1 and T:
        raise ValueError(f"scatter_back: cu_seqlens {cu_seqlens.tolist()} has no segment but "
                         f"idx has {T} rows (cu_seqlens is [S + 1], S >= 1)")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    row_seg = torch.repeat_interleave(torch.arange(S, device=x.device), lengths, output_size=T)
    c = attn_update.to(a)
    if mlp_out is not None:
        m = mlp_out.to(a)
        if gate is not None:
            m = m * gate.to(a)[torch.div(idx, N, rounding_mode="floor")]
        if scores is not None:
            m = m * scores.to(a).unsqueeze(1)
        c = c + m
    c = c * seg_weight.to(a)[row_seg].unsqueeze(1)
    out = x.reshape(B * N, D).to(a).index_add(0, idx, c)
    return out.to(x.dtype).reshape(B, N, D)


def apply_token_cache_(
    out: torch.Tensor,
    cache: torch.Tensor,
    slot: torch.Tensor,
    x_rows: torch.Tensor,
    miss: Optional[torch.Tensor] = None,
) -> None:
    """The token cache of one routed block applied to its output, in place (inference).

    ``out`` is the block's output ``[B, N, D]`` (selected rows: ``x + update``; skipped rows:
    ``x``), ``cache`` ``[B * N, D]`` the update each row last received (any float dtype: it may
    be stored in lower precision than the residual stream). ``slot`` int32 ``[B * N]`` says for
    each row where its input is in ``x_rows`` ``[T, D]`` (the selected rows' inputs, gathered
    before the block ran; out's dtype), or -1 for a row the block skipped. ``miss`` ``[B * N]``
    (acc dtype) is the weight with which a row misses the block, ``1 - coverage`` (two bins:
    fractional for a row in one bin only); None: 1 for a skipped row, 0 for a selected one.

    For every row r, in the acc dtype, with ``m = miss[r]``:

    * if ``m != 0``: ``out[r] = round(out[r] + m * cache[r])`` (rows with ``m == 0`` are left
      untouched, bit for bit);
    * if ``slot[r] >= 0``: ``cache[r] = round_cache(out[r] - x_rows[slot[r]])``, from the
      rounded new ``out[r]``: the update the row received at this step.

    A skipped row's cache entry is unchanged. Returns None (``out`` and ``cache`` are written).
    """
    B, N, D = out.shape
    R = B * N
    a = acc_dtype(out.dtype)
    o = out.view(R, D)
    m = (slot < 0).to(a) if miss is None else miss.to(a)
    hit = m != 0
    new = torch.where(hit.unsqueeze(1), (o.to(a) + m.unsqueeze(1) * cache.to(a)).to(out.dtype),
                      o)
    rows = torch.nonzero(slot >= 0).squeeze(1)
    upd = (new.index_select(0, rows).to(a)
           - x_rows.index_select(0, slot.index_select(0, rows).long()).to(a)).to(cache.dtype)
    o.copy_(new)
    cache.index_copy_(0, rows, upd)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    softmax_scale: Optional[float] = None,
) -> torch.Tensor:
    """Variable-length multi-head attention over packed segments (FlashAttention's varlen API).

    q: ``[Tq, H, Dh]``, k/v: ``[Tk, H, Dh]``; segment i's queries
    ``q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]`` attend to its keys
    ``k[cu_seqlens_k[i]:cu_seqlens_k[i+1]]`` only (no causal mask). Self-attention passes the
    same cu_seqlens twice; cross-attention passes per-segment text keys (see :func:`pack_text`).
    A segment with no keys produces zeros. Softmax in the acc dtype; returns ``[Tq, H, Dh]`` in
    q's dtype. ``max_seqlen_*`` are accepted for API parity and unused here.
    """
    del max_seqlen_q, max_seqlen_k
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("q, k, v must be [T, H, Dh]")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    a = acc_dtype(q.dtype)
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k describe {len(cq) - 1} and "
                         f"{len(ck) - 1} segments")
    outs = []
    for i in range(len(cq) - 1):
        qi = q[cq[i]:cq[i + 1]].to(a).transpose(0, 1)  # [H, Lq, Dh]
        if ck[i + 1] == ck[i]:
            outs.append(torch.zeros_like(q[cq[i]:cq[i + 1]]))
            continue
        ki = k[ck[i]:ck[i + 1]].to(a).transpose(0, 1)
        vi = v[ck[i]:ck[i + 1]].to(a).transpose(0, 1)
        p = torch.softmax((qi @ ki.transpose(-1, -2)) * scale, dim=-1)
        outs.append((p @ vi).transpose(0, 1).to(q.dtype))
    if not outs:
        return q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    return torch.cat(outs, 0)


def pack_text(
    text: torch.Tensor,
    seg_sample: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
):
    """Pack per-sample text tokens into per-segment varlen keys for cross-attention.

    text: ``[B, L, C]``; seg_sample: int64 ``[S]`` sample of each segment; mask: ``[B, L]``
    (True/1 = keep) or None. Returns ``(packed [Tk, C], cu_seqlens_k int32 [S + 1],
    max_seqlen_k)``. Masked-out text tokens are dropped, which is exactly attention with that
    key mask; two segments of the same sample get the same keys.
    """
    B, L, C = text.shape
    if mask is None:
        keep = torch.ones(B, L, dtype=torch.bool, device=text.device)
    else:
        if mask.shape != (B, L):
            raise ValueError(f"mask must be [B, L] = {(B, L)}, got {tuple(mask.shape)}")
        keep = mask.bool() if mask.dtype == torch.bool else mask > 0.5
    keep_s = keep[seg_sample]  # [S, L]
    lens = keep_s.sum(1)
    seg, pos = keep_s.nonzero(as_tuple=True)
    packed = text[seg_sample[seg], pos]
    cu = torch.zeros(seg_sample.numel() + 1, dtype=torch.int32, device=text.device)
    cu[1:] = torch.cumsum(lens, 0).to(torch.int32)
    return packed, cu, int(lens.max()) if lens.numel() else 0
