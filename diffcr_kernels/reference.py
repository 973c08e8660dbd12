"""The executable spec: a pure-torch definition of every op on DiffCR's data path.

Every compiled or Triton kernel in this package is tested against these functions. They favour
clarity over speed, but they are vectorised (no Python loop over tokens or samples, except the
per-segment attention loop, which is only the last-resort attention path) and autograd works
through all of them: the router scores, the per-segment bin weights, the modulation vectors and
the values all receive gradients.

Data path of one routed block (see DESIGN.md):

1. :func:`router_scores`   s = sigmoid(x . w) for every image token.
2. :func:`select_topk`     per segment, the k highest-scoring tokens of its sample, packed.
3. :func:`gather_norm_modulate`  LN(x[idx]) * (1 + scale[b]) + shift[b] on the packed rows.
4. block body on packed rows; :func:`varlen_attention` for self- and cross-attention.
5. :func:`scatter_back`    out = x;  out[idx] += w_seg * (d1 + s * gate[b] * d2).

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
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = [
    "Selection",
    "acc_dtype",
    "kept_count",
    "router_scores",
    "select_topk",
    "gather_rows",
    "gather_norm_modulate",
    "scatter_back",
    "varlen_attention",
    "pack_text",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for data of ``dtype``: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kept_count(kappa: float, n: int) -> int:
    """Number of tokens a block keeps: ``k = min(N, max(1, ceil(kappa * N)))`` (SPEC §1).

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

    @property
    def num_segments(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def total(self) -> int:
        return self.indices.numel()

    def row_segment(self) -> torch.Tensor:
        """int64 ``[T]``: the segment of each packed row."""
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        return torch.repeat_interleave(
            torch.arange(self.num_segments, device=self.indices.device), lengths,
            output_size=self.total)

    def row_sample(self) -> torch.Tensor:
        """int64 ``[T]``: the sample of each packed row (``indices // N``)."""
        return torch.div(self.indices, self.num_tokens, rounding_mode="floor")


def router_scores(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router scores ``s = sigmoid(x . w)`` (SPEC §1: a linear map to one logit, no bias).

    x: ``[B, N, D]`` hidden states (any float dtype); weight: ``[D]``.
    Returns ``[B, N]`` scores in the accumulation dtype (float32, or float64 for float64 input),
    so that near-ties are not decided by bfloat16 rounding.
    """
    a = acc_dtype(x.dtype)
    return torch.sigmoid(torch.matmul(x.to(a), weight.to(a)))


def _as_segment_table(value, B: int, name: str, dtype, device) -> torch.Tensor:
    t = torch.as_tensor(value, device=device)
    if t.dim() == 0:
        t = t.expand(B)
    if t.dim() == 1:
        t = t.reshape(B, 1) if t.numel() == B else t
    if t.dim() != 2 or t.shape[0] != B:
        raise ValueError(f"{name} must be a scalar, [B] or [B, P] with B = {B}, got shape "
                         f"{tuple(t.shape)}")
    return t.to(dtype)


def select_topk(
    scores: torch.Tensor,
    k: Union[int, Sequence[int], torch.Tensor],
    seg_weight: Optional[Union[float, torch.Tensor]] = None,
) -> Selection:
    """Per-segment top-k selection into the packed layout.

    scores:     ``[B, N]`` router scores.
    k:          tokens per segment: an int (same for every sample), ``[B]`` (one segment per
                sample) or ``[B, P]`` (P segments per sample, e.g. the two bins of training).
                Every entry must lie in [1, N].
    seg_weight: weight per segment with the same broadcasting as ``k`` (default 1).

    Selection rule: the k highest scores of the segment's sample; ties go to the lower token
    index (a stable descending sort). NaN scores rank below every number, so they are chosen
    only when k exceeds the number of non-NaN scores. Selected indices are returned ascending
    within each segment; since every segment of a sample is cut from the same ranking, a segment
    with a smaller k is a subset of one with a larger k (SPEC §2).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, N], got shape {tuple(scores.shape)}")
    B, N = scores.shape
    if B == 0 or N == 0:
        raise ValueError(f"scores must have B >= 1 and N >= 1, got shape {tuple(scores.shape)}")
    device = scores.device
    ks = _as_segment_table(k, B, "k", torch.int64, device)
    P = ks.shape[1]
    a = acc_dtype(scores.dtype) if scores.dtype.is_floating_point else torch.float32
    if seg_weight is None:
        ws = torch.ones(B, P, dtype=a, device=device)
    else:
        ws = _as_segment_table(seg_weight, B, "seg_weight", a, device)
        if ws.shape != ks.shape:
            ws = ws.expand(B, P) if ws.shape[1] == 1 else ws
        if ws.shape != ks.shape:
            raise ValueError(f"seg_weight shape {tuple(ws.shape)} does not match k shape "
                             f"{tuple(ks.shape)}")
    k_cpu = ks.cpu() if not isinstance(k, int) else None
    if k_cpu is not None:
        kmin, kmax = int(k_cpu.min()), int(k_cpu.max())
        if kmin < 1 or kmax > N:
            raise ValueError(f"every k must be in [1, N={N}], got min {kmin}, max {kmax}")
        uniform = kmin == kmax
        max_seqlen = kmax
        total = int(k_cpu.sum())
    else:
        if not 1 <= k <= N:
            raise ValueError(f"k must be in [1, N={N}], got {k}")
        uniform, max_seqlen, total = True, int(k), int(k) * B * P

    s = torch.nan_to_num(scores.detach(), nan=-math.inf)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices  # [B, N]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(N, device=device).expand(B, N))
    mask = rank.unsqueeze(1) < ks.unsqueeze(2)  # [B, P, N]
    seg, n = mask.reshape(B * P, N).nonzero(as_tuple=True)  # row-major: ascending n per segment
    if seg.numel() != total:  # pragma: no cover - internal invariant
        raise RuntimeError("select_topk: selection size mismatch")
    sample = torch.div(seg, P, rounding_mode="floor")
    indices = sample * N + n
    cu = torch.zeros(B * P + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(ks.reshape(-1), 0).to(torch.int32)
    sel_scores = scores.reshape(-1)[indices].to(a)
    return Selection(
        indices=indices,
        cu_seqlens=cu,
        max_seqlen=max_seqlen,
        scores=sel_scores,
        seg_weight=ws.reshape(-1),
        seg_sample=torch.arange(B, device=device).repeat_interleave(P),
        num_tokens=N,
        segs_per_sample=P,
        uniform=uniform,
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
    d1: torch.Tensor,
    d2: Optional[torch.Tensor] = None,
    scores: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gated, bin-weighted scatter-back into the residual stream.

    ``out = x``; for every packed row r of segment j:
    ``out[idx[r]] += seg_weight[j] * (d1[r] + scores[r] * gate[b] * d2[r])``, ``b = idx[r] // N``.

    In a routed block, d1 is the packed residual update of the attention branches
    (``h - x[idx]``) and d2 the MLP output before its adaLN gate; the router score multiplies the
    MLP branch only (SPEC §1). A token selected in several segments (both bins of a sample)
    receives the sum of their contributions; rows never selected are returned unchanged.
    Accumulated in the acc dtype and rounded once. Shapes: x ``[B, N, D]``; d1, d2 ``[T, D]``;
    scores ``[T]``; gate ``[B, D]``; seg_weight ``[S]``; cu_seqlens int32 ``[S + 1]``.
    """
    B, N, D = x.shape
    a = acc_dtype(x.dtype)
    T = idx.numel()
    S = cu_seqlens.numel() - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    row_seg = torch.repeat_interleave(torch.arange(S, device=x.device), lengths, output_size=T)
    c = d1.to(a)
    if d2 is not None:
        m = d2.to(a)
        if gate is not None:
            m = m * gate.to(a)[torch.div(idx, N, rounding_mode="floor")]
        if scores is not None:
            m = m * scores.to(a).unsqueeze(1)
        c = c + m
    c = c * seg_weight.to(a)[row_seg].unsqueeze(1)
    out = x.reshape(B * N, D).to(a).index_add(0, idx, c)
    return out.to(x.dtype).reshape(B, N, D)


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
