"""Variable-length attention over packed segments, dispatched to the fastest available path.

Order for each call (first that applies):

1. ``flash3``   FlashAttention 3 (``flash_attn_interface``), CUDA, fp16/bf16, Hopper (sm_90);
2. ``flash2``   FlashAttention 2 (``flash_attn``), CUDA, fp16/bf16;
3. ``torch_varlen``  :func:`torch.nn.attention.varlen.varlen_attn` (torch >= 2.10), CUDA,
   fp16/bf16; its signature changed after 2.10, so its first seven arguments are passed
   positionally;
4. ``sdpa_uniform``  every segment has the same query and key length (``uniform=True``, e.g. a
   uniform-k selection at inference): one batched
   :func:`torch.nn.functional.scaled_dot_product_attention` on a ``[S, H, L, Dh]`` view;
5. ``sdpa_grouped``  host segment lengths given (``seqlens_q``/``seqlens_k``): when the lengths
   repeat per sample (:func:`slot_period`, e.g. two training bins shared by the batch), one
   batched SDPA per slot on split views; otherwise one batched SDPA per group of equal-length
   segments (ragged selections on CPU); no device sync;
6. ``sdpa_segments`` one SDPA call per segment (reads cu_seqlens on the host);
7. ``reference``     :func:`diffcr_kernels.reference.varlen_attention` (forced only).

``DIFFCR_ATTENTION=<name>`` or the ``backend=`` argument forces a path; a forced path that cannot
run raises an error that says why.
"""
from __future__ import annotations

import importlib
import numbers
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from . import autocast as _ac
from . import reference as ref

__all__ = ["ATTENTION_BACKENDS", "available_attention_backends", "varlen_attention",
           "selection_attention", "nested_attention", "shared_bins_attention", "nested_plan",
           "nested_tables", "nested_pays"]

ATTENTION_BACKENDS = ("flash3", "flash2", "torch_varlen", "sdpa_uniform", "sdpa_grouped",
                      "sdpa_segments", "reference")


def _try_import(name: str):
    try:
        return importlib.import_module(name), None
    except Exception as e:  # noqa: BLE001 - an optional dependency may fail in many ways
        return None, f"{type(e).__name__}: {e}"


_fa3, _fa3_err = _try_import("flash_attn_interface")
_fa2, _fa2_err = _try_import("flash_attn")
try:
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen  # type: ignore
    _torch_varlen_err = None
except Exception as e:  # noqa: BLE001
    _torch_varlen, _torch_varlen_err = None, f"{type(e).__name__}: {e}"


def available_attention_backends() -> Dict[str, str]:
    """``{name: "available" | reason it is not}`` for every attention path."""
    cuda = torch.cuda.is_available()
    hopper = cuda and torch.cuda.get_device_capability()[0] == 9
    out = {}
    out["flash3"] = ("available" if _fa3 is not None and hopper else
                     (_fa3_err or "needs a Hopper (sm_90) GPU"))
    out["flash2"] = ("available" if _fa2 is not None and cuda else
                     (_fa2_err or "needs a CUDA GPU"))
    out["torch_varlen"] = ("available" if _torch_varlen is not None and cuda else
                           (_torch_varlen_err or "needs a CUDA GPU"))
    out["sdpa_uniform"] = "available (uniform segments only)"
    out["sdpa_grouped"] = "available (host segment lengths given)"
    out["sdpa_segments"] = "available"
    out["reference"] = "available"
    return out


def _flash_ok(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _pick(q: torch.Tensor, uniform: bool, forced: Optional[str], grouped: bool) -> str:
    if forced:
        if forced not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, "
                             f"got {forced!r}")
        needs_flash = forced in ("flash3", "flash2", "torch_varlen")
        mod = {"flash3": _fa3, "flash2": _fa2, "torch_varlen": _torch_varlen}.get(forced)
        if needs_flash and (mod is None or not _flash_ok(q)):
            raise RuntimeError(
                f"diffcr: attention backend {forced!r} cannot run here: "
                f"{available_attention_backends()[forced]} (needs CUDA fp16/bf16 tensors)")
        if forced == "sdpa_uniform" and not uniform:
            raise RuntimeError("diffcr: attention backend 'sdpa_uniform' needs uniform=True")
        if forced == "sdpa_grouped" and not grouped:
            raise RuntimeError("diffcr: attention backend 'sdpa_grouped' needs seqlens_q and "
                               "seqlens_k")
        return forced
    if _flash_ok(q):
        if _fa3 is not None and torch.cuda.get_device_capability(q.device)[0] == 9:
            return "flash3"
        if _fa2 is not None:
            return "flash2"
        if _torch_varlen is not None:
            return "torch_varlen"
    if uniform:
        return "sdpa_uniform"
    return "sdpa_grouped" if grouped else "sdpa_segments"


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: Optional[float] = None,
    *,
    uniform: bool = False,
    backend: Optional[str] = None,
    seqlens_q: Optional[Sequence[int]] = None,
    seqlens_k: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Attention of each packed query segment over its own key segment.

    q ``[Tq, H, Dh]``, k/v ``[Tk, H, Dh]``, cu_seqlens int32 ``[S + 1]`` (as FlashAttention's
    varlen API). ``uniform=True`` promises that every segment has ``Tq / S`` queries and
    ``Tk / S`` keys (known on the host for a uniform-k selection), which enables the batched
    SDPA path without a device sync. ``seqlens_q`` / ``seqlens_k`` (host lists, the same
    numbers as the cu_seqlens) let the CPU path batch equal-length segments without reading
    cu_seqlens back from the device. Same semantics as
    :func:`diffcr_kernels.reference.varlen_attention`.
    """
    low = _ac.autocast_dtype(q.device)
    if low is not None:  # as F.scaled_dot_product_attention under autocast
        q, k, v = (_ac.cast(t, low) for t in (q, k, v))
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, uniform,
                  seqlens_q, seqlens_k)
    forced = backend or os.environ.get("DIFFCR_ATTENTION") or None
    grouped = seqlens_q is not None and seqlens_k is not None and len(seqlens_q) > 0
    path = _pick(q, uniform, forced, grouped)
    S = cu_seqlens_q.numel() - 1
    if path == "flash3":
        out = _fa3.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                          max_seqlen_k, softmax_scale=softmax_scale)
        return out[0] if isinstance(out, tuple) else out
    if path == "flash2":
        return _fa2.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                           max_seqlen_k, softmax_scale=softmax_scale)
    if path == "torch_varlen":
        kw = {} if softmax_scale is None else {"scale": softmax_scale}
        return _torch_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             **kw)
    if path == "reference":
        return ref.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, softmax_scale)
    if path == "sdpa_uniform":
        Tq, H, Dh = q.shape
        Tk = k.shape[0]
        if S == 0 or Tq % S or Tk % S:
            raise ValueError(f"uniform=True but Tq={Tq} / Tk={Tk} rows do not split evenly into "
                             f"{S} segments")
        qs = q.view(S, Tq // S, H, Dh).transpose(1, 2)
        ks = k.view(S, Tk // S, H, k.shape[-1]).transpose(1, 2)
        vs = v.view(S, Tk // S, H, v.shape[-1]).transpose(1, 2)
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=softmax_scale)
        return _nan_queries(q, o.transpose(1, 2).reshape(Tq, H, v.shape[-1]))
    if path == "sdpa_grouped":
        return _nan_queries(q, _grouped(q, k, v, list(seqlens_q), list(seqlens_k),
                                        softmax_scale))
    # sdpa_segments
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    lq = [cq[i + 1] - cq[i] for i in range(S)]
    lk = [ck[i + 1] - ck[i] for i in range(S)]
    if cq[-1] != q.shape[0] or ck[-1] != k.shape[0] or min(lq + lk, default=0) < 0:
        raise ValueError(f"cu_seqlens end at {cq[-1]} queries / {ck[-1]} keys but q has "
                         f"{q.shape[0]} rows and k has {k.shape[0]}")
    qs, ks, vs = torch.split(q, lq), torch.split(k, lk), torch.split(v, lk)
    outs = [_sdpa_one(qs[i].unsqueeze(0), ks[i].unsqueeze(0), vs[i].unsqueeze(0),
                      softmax_scale)[0] for i in range(S)]
    if not outs:
        return q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    return _nan_queries(q, torch.cat(outs, 0))


def selection_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: "ref.Selection",
    softmax_scale: Optional[float] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Self-attention of every segment of a selection over its own rows: the packed rows of
    segment s attend to the packed rows of segment s only (:func:`varlen_attention` with the
    selection's ``cu_seqlens``, ``max_seqlen``, ``uniform`` flag and host ``seqlens`` for
    queries and keys alike, so no path reads the device).

    Arguments:

    * ``q``, ``k``, ``v``: ``[T, H, Dh]`` (``v``: ``[T, H, Dv]``) with ``T = sel.total``, the
      projections of the packed rows in ``sel``'s order; float32, float64, float16 or bfloat16,
      all the same dtype and on ``sel``'s device;
    * ``sel``: the :class:`~diffcr_kernels.Selection` of :func:`~diffcr_kernels.select_topk`
      (int32 ``cu_seqlens`` ``[S + 1]``, host ``seqlens``);
    * ``softmax_scale``: the score scale (None: ``1 / sqrt(Dh)``);
    * ``backend``: force an attention path (:data:`ATTENTION_BACKENDS`), as for
      :func:`varlen_attention`.

    Returns ``[T, H, Dv]`` in ``q``'s dtype.
    """
    return varlen_attention(q, k, v, sel.cu_seqlens, sel.cu_seqlens, sel.max_seqlen,
                            sel.max_seqlen, softmax_scale, uniform=sel.uniform, backend=backend,
                            seqlens_q=sel.seqlens, seqlens_k=sel.seqlens)


def _nan_queries(q: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """A query holding NaN (or inf) gives a NaN output row on every path, as in the reference.

    torch's CPU flash SDPA kernel returns zeros for such a row (its row maximum skips NaN);
    the reference and the math kernel return NaN. On CPU, add ``0 * sum(q)`` per row and head
    (NaN exactly where q is not finite): one small reduction next to the attention itself."""
    if q.device.type != "cpu" or q.numel() == 0:
        return o
    return o + (q.sum(-1, keepdim=True) * 0).to(o.dtype)


_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_varlen(q, k, v, cu_q, cu_k, max_q, max_k, uniform, seqlens_q, seqlens_k) -> None:
    """The checks every path of :func:`varlen_attention` relies on, before any of them runs
    (ValueError naming the argument). Segment contents are checked on the host where that is
    free: from ``seqlens_q`` / ``seqlens_k`` when given, from CPU ``cu_seqlens``, and from CUDA
    ones with ``DIFFCR_VALIDATE=1`` (a device sync)."""
    op = "varlen_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not torch.is_tensor(t) or t.dim() != 3:
            raise ValueError(f"{op}: {name} must be a [T, H, Dh] tensor, got "
                             f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise ValueError(f"{op}: {name} must be float32, float64, float16 or bfloat16, got "
                             f"{t.dtype}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{op}: {name} is {t.dtype} on {t.device} but q is {q.dtype} on "
                             f"{q.device}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"{op}: k has {k.shape[0]} rows but v has {v.shape[0]}")
    if not (q.shape[1] == k.shape[1] == v.shape[1]):
        raise ValueError(f"{op}: q, k and v must have the same number of heads (no grouped-query "
                         f"attention), got {q.shape[1]}, {k.shape[1]}, {v.shape[1]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: q and k must have the same head dim, got {q.shape[2]} and "
                         f"{k.shape[2]}")
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        ref.check_cu_seqlens(op, cu, q.device, "q", name)
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must describe the same segments, "
                         f"got shapes {tuple(cu_q.shape)} and {tuple(cu_k.shape)}")
    S = cu_q.numel() - 1
    for name, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 0:
            raise ValueError(f"{op}: {name} must be an int >= 0, got {m!r}")
    if uniform and S and (q.shape[0] % S or k.shape[0] % S):
        raise ValueError(f"{op}: uniform=True but Tq={q.shape[0]} / Tk={k.shape[0]} rows do "
                         f"not split evenly into {S} segments")
    if torch.compiler.is_compiling():
        return
    for side, cu, lens, T, mx in (("q", cu_q, seqlens_q, q.shape[0], max_q),
                                  ("k", cu_k, seqlens_k, k.shape[0], max_k)):
        if lens is None:
            if cu.device.type != "cpu" and os.environ.get("DIFFCR_VALIDATE", "0") != "1":
                continue
            c = cu.tolist()
            if c[0] != 0:
                raise ValueError(f"{op}: cu_seqlens_{side}[0] must be 0, got {c[0]}")
            lens = [b - a for a, b in zip(c[:-1], c[1:])]
        lens = list(lens)
        if len(lens) != S:
            raise ValueError(f"{op}: seqlens_{side} has {len(lens)} segments but cu_seqlens_"
                             f"{side} describes {S}")
        if lens and min(lens) < 0:
            raise ValueError(f"{op}: cu_seqlens_{side} must be non-decreasing")
        if sum(lens) != T:
            raise ValueError(f"{op}: the segments cover {sum(lens)} rows but {side} has {T} "
                             "(cu_seqlens must end at the number of rows)")
        if lens and max(lens) > mx:
            raise ValueError(f"{op}: a segment has {max(lens)} rows but max_seqlen_{side} = {mx}")


def _sdpa_one(qg, kg, vg, scale):
    """SDPA on ``[G, n, H, Dh]`` groups (token-major), output ``[G, n, H, Dv]``; no keys give
    zeros."""
    G, nq, H, _ = qg.shape
    if kg.shape[1] == 0 or nq == 0:
        return qg.new_zeros(G, nq, H, vg.shape[-1])
    o = F.scaled_dot_product_attention(qg.transpose(1, 2), kg.transpose(1, 2),
                                       vg.transpose(1, 2), scale=scale)
    return o.transpose(1, 2)


def slot_period(lq: Sequence[int], lk: Optional[Sequence[int]] = None) -> Optional[int]:
    """The smallest P < S such that segment lengths repeat every P segments (``lq[i] ==
    lq[i - P]``, same for ``lk``): S / P samples with the same P slot lengths each, e.g. the
    two bins of a batch whose samples share a timestep region. None if there is none."""
    S = len(lq)
    for P in range(1, S):
        if S % P:
            continue
        if all(lq[i] == lq[i - P] for i in range(P, S)) and (
                lk is None or all(lk[i] == lk[i - P] for i in range(P, S))):
            return P
    return None


def _periodic(q, k, v, lq: List[int], lk: List[int], P: int, scale):
    """Segments repeating every P: view the packed rows as [S/P, rows per sample, H, Dh] and
    split the P slots along dim 1 (views; the backward is one concatenation per input); one
    batched SDPA per slot; one concatenation of the outputs."""
    S = len(lq)
    Bp = S // P
    H = q.shape[1]
    q4 = q.view(Bp, sum(lq[:P]), H, q.shape[-1])
    k4 = k.view(Bp, sum(lk[:P]), H, k.shape[-1])
    v4 = v.view(Bp, sum(lk[:P]), H, v.shape[-1])
    outs = [_sdpa_one(a, b, c, scale) for a, b, c in zip(
        q4.split(lq[:P], dim=1), k4.split(lk[:P], dim=1), v4.split(lk[:P], dim=1))]
    return torch.cat(outs, 1).view(q.shape[0], H, v.shape[-1])


def _grouped(q, k, v, lq: List[int], lk: List[int], scale):
    """One batched SDPA per group of segments with equal (query, key) lengths."""
    S = len(lq)
    if len(lk) != S:
        raise ValueError(f"seqlens_q has {S} segments but seqlens_k has {len(lk)}")
    H = q.shape[1]
    sq, sk = [0], [0]
    for a, b in zip(lq, lk):
        sq.append(sq[-1] + a)
        sk.append(sk[-1] + b)
    if sq[-1] != q.shape[0] or sk[-1] != k.shape[0]:
        raise ValueError(f"seqlens sum to {sq[-1]} queries / {sk[-1]} keys but q has "
                         f"{q.shape[0]} rows and k has {k.shape[0]}")
    P = slot_period(lq, lk)
    if P is not None:
        return _periodic(q, k, v, lq, lk, P, scale)
    groups: Dict[tuple, List[int]] = {}
    for s in range(S):
        groups.setdefault((lq[s], lk[s]), []).append(s)
    # Segments are contiguous row ranges: torch.split gives views, and its backward is one
    # concatenation (no index gathers, no zero-filled gradient per slice); only groups of
    # several equal-length segments are stacked into a batch (one copy).
    qs, ks, vs = torch.split(q, lq), torch.split(k, lk), torch.split(v, lk)
    outs: List[Optional[torch.Tensor]] = [None] * S
    for segs in groups.values():
        if len(segs) == 1:
            s = segs[0]
            outs[s] = _sdpa_one(qs[s].unsqueeze(0), ks[s].unsqueeze(0), vs[s].unsqueeze(0),
                                scale)[0]
            continue
        o = _sdpa_one(torch.stack([qs[s] for s in segs]), torch.stack([ks[s] for s in segs]),
                      torch.stack([vs[s] for s in segs]), scale)
        for s, os_ in zip(segs, o.unbind(0)):
            outs[s] = os_
    if S == 0:
        return q.new_zeros(q.shape[0], H, v.shape[-1])
    return torch.cat(outs, 0)


# ------------------------------------------------------------------ nested segments (training)
def nested_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    union_lens: Sequence[int],
    lo_idx: torch.Tensor,
    lo_lens: Sequence[int],
    out_map: torch.Tensor,
    out_lens: Sequence[int],
    softmax_scale: Optional[float] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Self-attention of two nested segments per sample, from the rows of the larger one.

    The two bins of a training pass (method §2) hold, per sample, a larger segment and a
    smaller one whose rows are a subset of it. This computes both segments' self-attention
    from the projections of the larger segments' rows only, as :func:`varlen_attention` over
    the rows expanded to both segments would. On CPU (no backend forced) the smaller segment's
    attention is not computed twice: the larger segment's attention runs over two key blocks,
    the smaller segment's keys and the rest, merged by log-sum-exp, and the first block's
    rows of the smaller segment's queries are that segment's own attention (one attention
    forward of the larger segment in all). The backward runs the two key blocks with each
    segment's final output and log-sum-exp, both segments' queries stacked over the smaller
    segment's keys (FlashAttention's backward over a split of the keys). Elsewhere (another
    device, fewer than :data:`NESTED_MIN_ROWS` rows in a sample's two segments, a value head
    dim other than the query's, under ``torch.compile``) and with a forced backend:
    :func:`varlen_attention` on the expanded rows.

    Arguments:

    * ``q``, ``k``, ``v``: ``[U, H, Dh]`` (``v``: ``[U, H, Dv]``), the rows of every sample's
      larger segment, sample after sample (``union_lens``: host lengths, one per sample);
      float32, float64, float16 or bfloat16, one dtype and device;
    * ``lo_idx``: int64 ``[A]``, the row of ``q`` of every row of the smaller segments, in
      that segment's order, sample after sample (``lo_lens``: host lengths); within a sample,
      distinct rows of that sample's larger segment;
    * ``out_map``: int64 ``[A + U]``, a permutation: output row t is row ``out_map[t]`` of
      ``[smaller segments' rows; larger segments' rows]`` (the packed order of the caller's
      two-segment layout);
    * ``out_lens``: host lengths of the output's segments in order (each a smaller or a larger
      segment of one sample);
    * ``softmax_scale``: None for ``1 / sqrt(Dh)``; ``backend``: as :func:`varlen_attention`.

    Returns ``[A + U, H, Dv]`` in ``q``'s dtype (the autocast dtype under autocast)."""
    low = _ac.autocast_dtype(q.device)
    if low is not None:  # as F.scaled_dot_product_attention under autocast
        q, k, v = (_ac.cast(t, low) for t in (q, k, v))
    union_lens, lo_lens, out_lens = list(union_lens), list(lo_lens), list(out_lens)
    _check_nested(q, k, v, union_lens, lo_idx, lo_lens, out_map, out_lens)
    forced = backend or os.environ.get("DIFFCR_ATTENTION") or None
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if forced is None and q.device.type == "cpu" and q.numel() and \
            v.shape[-1] == q.shape[-1] and not torch.compiler.is_compiling() and \
            min(a + u for a, u in zip(lo_lens, union_lens)) >= NESTED_MIN_ROWS:
        plan = _NestedPlan(union_lens, lo_lens, lo_idx, q.device)
        with torch.autocast("cpu", enabled=False):
            o = _NestedAttention.apply(q, k, v, plan, scale)
        o = o.index_select(0, out_map)
        qrow = torch.cat([lo_idx, torch.arange(q.shape[0], device=q.device)]).index_select(
            0, out_map)
        return o + (q.sum(-1, keepdim=True) * 0).index_select(0, qrow).to(o.dtype)
    rows = torch.cat([lo_idx, torch.arange(q.shape[0], device=q.device)]).index_select(
        0, out_map)
    cu = ref.host_index([0] + _cumsum(out_lens), q.device, torch.int32)
    m = max(out_lens, default=0)
    return varlen_attention(q.index_select(0, rows), k.index_select(0, rows),
                            v.index_select(0, rows), cu, cu, m, m, softmax_scale,
                            backend=forced, seqlens_q=out_lens, seqlens_k=out_lens)


#: :func:`nested_attention` runs nested on CPU when every sample's two segments hold at least
#: this many rows together (the stacked backward's queries). torch's CPU flash kernels cut the
#: queries into blocks of 256 rows from 768 rows on and of 64 below, and their backward over
#: a key block of few keys costs about as much per query row as over many: below 768 stacked
#: rows the extra calls cost more than the shared forward saves (measured, DiT's 16 heads of
#: 72, B = 1, bf16, forward + backward against the expanded rows: 0.80x at 512 + 615 rows,
#: 0.91x at 384 + 461, 1.09x at 308 + 410, 1.09x at 256 + 308; fp32 0.96x and 1.01x at the
#: first two). Tests set it to 0 to run the nested kernels on small shapes.
NESTED_MIN_ROWS = 768


def nested_pays(device, seqlens: Sequence[int]) -> bool:
    """Whether :func:`nested_attention` runs nested for a two-segments-per-sample layout with
    host segment lengths ``seqlens`` on ``device`` (CPU, no ``DIFFCR_ATTENTION``, not under
    ``torch.compile``, every sample's two segments at least :data:`NESTED_MIN_ROWS` rows), so
    a caller can keep the expanded rows it would otherwise build (no index tables at all
    elsewhere)."""
    lens = list(seqlens)
    return torch.device(device).type == "cpu" and not os.environ.get("DIFFCR_ATTENTION") \
        and not torch.compiler.is_compiling() and len(lens) >= 2 and not len(lens) % 2 and \
        min(lens[i] + lens[i + 1] for i in range(0, len(lens), 2)) >= NESTED_MIN_ROWS


def _cumsum(xs):
    out, s = [], 0
    for x in xs:
        s += x
        out.append(s)
    return out


def _check_nested(q, k, v, union_lens, lo_idx, lo_lens, out_map, out_lens) -> None:
    op = "nested_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not torch.is_tensor(t) or t.dim() != 3 or t.dtype not in _FLOATS:
            raise ValueError(f"{op}: {name} must be a float [U, H, Dh] tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} "
                             f"{tuple(getattr(t, 'shape', ()))}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{op}: {name} is {t.dtype} on {t.device} but q is {q.dtype} on "
                             f"{q.device}")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0] or q.shape[1:] != k.shape[1:] \
            or v.shape[1] != q.shape[1]:
        raise ValueError(f"{op}: q {tuple(q.shape)}, k {tuple(k.shape)} and v "
                         f"{tuple(v.shape)} must have the same rows, heads and (q, k) head dim")
    U = q.shape[0]
    for name, t, n in (("lo_idx", lo_idx, sum(lo_lens)), ("out_map", out_map, U + sum(lo_lens))):
        if not torch.is_tensor(t) or t.dim() != 1 or t.dtype != torch.int64 or \
                t.device != q.device or t.numel() != n:
            raise ValueError(f"{op}: {name} must be an int64 [{n}] tensor on {q.device}, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} "
                             f"{tuple(getattr(t, 'shape', ()))}")
    if sum(union_lens) != U:
        raise ValueError(f"{op}: union_lens sum to {sum(union_lens)} but q has {U} rows")
    if len(lo_lens) != len(union_lens) or any(a > u or a < 0 for a, u in
                                               zip(lo_lens, union_lens)):
        raise ValueError(f"{op}: lo_lens {lo_lens} must give one length per sample, each at "
                         f"most that sample's union length {union_lens}")
    if sum(out_lens) != U + sum(lo_lens) or min(out_lens, default=0) < 0:
        raise ValueError(f"{op}: out_lens sum to {sum(out_lens)}, not the {U + sum(lo_lens)} "
                         "output rows")


class _NestedPlan:
    """Host and index tables of one :func:`nested_attention` call: samples grouped by
    (larger, smaller) length; per group the row ranges of the union, of the smaller segments'
    rows in ``lo_idx`` and of the remaining ("extra") rows, and the extra rows themselves
    (the complement of ``lo_idx`` within each sample, in ascending order)."""

    def __init__(self, ulens, alens, lo_idx, device):
        U = sum(ulens)
        keep = torch.ones(U, dtype=torch.bool, device=device)
        keep[lo_idx] = False
        self.ex_idx = keep.nonzero().squeeze(1)   # CPU only: no device sync to pay
        self.lo_idx = lo_idx
        self.ulens, self.alens = ulens, alens
        self.elens = [u - a for u, a in zip(ulens, alens)]
        if self.ex_idx.numel() != sum(self.elens):
            raise ValueError("nested_attention: lo_idx repeats a row of its sample's larger "
                             "segment")
        ends = ref.host_index(_cumsum(ulens), device)
        sample = torch.repeat_interleave(torch.arange(len(ulens), device=device),
                                         ref.host_index(alens, device), output_size=len(lo_idx))
        if not torch.equal(torch.bucketize(lo_idx, ends, right=True), sample):
            raise ValueError("nested_attention: a row of lo_idx lies outside its sample's larger "
                             "segment (lo_idx holds each sample's rows, sample after sample)")
        groups: Dict[tuple, List[int]] = {}
        for b, (u, a) in enumerate(zip(ulens, alens)):
            groups.setdefault((u, a), []).append(b)
        self.groups = list(groups.items())
        self.U, self.A = U, sum(alens)


def _stack(parts, lens_b: List[int], samples: List[int], splits):
    """The rows of ``samples`` as one ``[G, n, ...]`` batch (a view when the group is every
    sample in order)."""
    if len(samples) == len(lens_b) and all(s == i for i, s in enumerate(samples)):
        t = parts
        return t.view(len(samples), lens_b[0], *t.shape[1:])
    return torch.stack([splits[s] for s in samples])


def _unstack_into(dst, src, samples, offsets):
    """``dst[offsets[s]:offsets[s + 1]] = src[g]`` for the g-th sample s of a group."""
    for g, s in enumerate(samples):
        dst[offsets[s]:offsets[s + 1]] = src[g]


def _bhld(t):
    return t.transpose(1, 2)


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class _NestedAttention(torch.autograd.Function):
    """Forward and backward of :func:`nested_attention` on CPU, over torch's CPU flash kernels
    (``_scaled_dot_product_flash_attention_for_cpu`` and its backward, which takes an output
    and its log-sum-exp: here each segment's final ones). Returns ``[A + U, H, Dv]``: the
    smaller segments' rows, then the larger segments' rows."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        fa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        ul, al, el = plan.ulens, plan.alens, plan.elens
        uoff = [0] + _cumsum(ul)
        kl, vl = k.index_select(0, plan.lo_idx), v.index_select(0, plan.lo_idx)
        ke, ve = k.index_select(0, plan.ex_idx), v.index_select(0, plan.ex_idx)
        sq, skl, svl, ske, sve = (torch.split(t, lens) for t, lens in (
            (q, ul), (kl, al), (vl, al), (ke, el), (ve, el)))
        H, Dv = q.shape[1], v.shape[-1]
        ld = _lse_dtype(q.dtype)
        o_u, l_u = q.new_empty(plan.U, H, Dv), q.new_empty(plan.U, H, dtype=ld)
        oA_u, lA_u = q.new_empty(plan.U, H, Dv), q.new_empty(plan.U, H, dtype=ld)
        for (u, a), samples in plan.groups:
            qg = _bhld(_stack(q, ul, samples, sq))
            oA, lA = fa(qg, _bhld(_stack(kl, al, samples, skl)),
                        _bhld(_stack(vl, al, samples, svl)), scale=scale)  # [G, H, u, Dv]
            _unstack_into(oA_u, oA.transpose(1, 2), samples, uoff)
            _unstack_into(lA_u, lA.transpose(1, 2), samples, uoff)
            if u > a:
                oB, lB = fa(qg, _bhld(_stack(ke, el, samples, ske)),
                            _bhld(_stack(ve, el, samples, sve)), scale=scale)
                lse = torch.logaddexp(lA, lB)
                wA, wB = (lA - lse).exp().unsqueeze(-1), (lB - lse).exp().unsqueeze(-1)
                o = (oA.to(ld) * wA + oB.to(ld) * wB).to(q.dtype)
            else:
                o, lse = oA, lA
            _unstack_into(o_u, o.transpose(1, 2), samples, uoff)
            _unstack_into(l_u, lse.transpose(1, 2), samples, uoff)
        # the smaller segments' own attention: the first key block's rows of their queries
        o_lo = oA_u.index_select(0, plan.lo_idx)
        l_lo = lA_u.index_select(0, plan.lo_idx)
        ctx.plan, ctx.scale = plan, scale
        ctx.save_for_backward(q, k, v, o_u, l_u, o_lo, l_lo)
        return torch.cat([o_lo, o_u])

    @staticmethod
    def backward(ctx, dout):
        fb = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        q, k, v, o_u, l_u, o_lo, l_lo = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        ul, al, el = plan.ulens, plan.alens, plan.elens
        uoff, aoff, eoff = ([0] + _cumsum(ul)), ([0] + _cumsum(al)), ([0] + _cumsum(el))
        dout = dout.to(q.dtype)
        d_lo, d_u = dout[:plan.A], dout[plan.A:]
        q_lo = q.index_select(0, plan.lo_idx)
        kl, vl = k.index_select(0, plan.lo_idx), v.index_select(0, plan.lo_idx)
        ke, ve = k.index_select(0, plan.ex_idx), v.index_select(0, plan.ex_idx)
        S = {name: torch.split(t, lens) for name, t, lens in (
            ("q", q, ul), ("q_lo", q_lo, al), ("kl", kl, al), ("vl", vl, al), ("ke", ke, el),
            ("ve", ve, el), ("d_lo", d_lo, al), ("d_u", d_u, ul), ("o_lo", o_lo, al),
            ("o_u", o_u, ul), ("l_lo", l_lo, al), ("l_u", l_u, ul))}
        src = {"q": q, "q_lo": q_lo, "kl": kl, "vl": vl, "ke": ke, "ve": ve, "d_lo": d_lo,
               "d_u": d_u, "o_lo": o_lo, "o_u": o_u, "l_lo": l_lo, "l_u": l_u}
        lens = {"q": ul, "d_u": ul, "o_u": ul, "l_u": ul, "ke": el, "ve": el}

        def g(name, samples):
            return _stack(src[name], lens.get(name, al), samples, S[name])

        dq_u, dq_lo = torch.empty_like(q), torch.empty_like(q_lo)
        dkl, dvl = torch.empty_like(kl), torch.empty_like(vl)
        dke, dve = torch.empty_like(ke), torch.empty_like(ve)
        for (u, a), samples in plan.groups:
            # key block A (the smaller segment's keys): the queries of both segments stacked,
            # each with its own segment's output and log-sum-exp
            qs = torch.cat([g("q_lo", samples), g("q", samples)], 1)
            dqA, dkA, dvA = fb(
                _bhld(torch.cat([g("d_lo", samples), g("d_u", samples)], 1)), _bhld(qs),
                _bhld(g("kl", samples)), _bhld(g("vl", samples)),
                _bhld(torch.cat([g("o_lo", samples), g("o_u", samples)], 1)),
                torch.cat([g("l_lo", samples), g("l_u", samples)], 1).transpose(1, 2)
                .contiguous(), 0.0, False, scale=scale)
            dqA = dqA.transpose(1, 2)
            _unstack_into(dq_lo, dqA[:, :a], samples, aoff)
            _unstack_into(dkl, dkA.transpose(1, 2), samples, aoff)
            _unstack_into(dvl, dvA.transpose(1, 2), samples, aoff)
            dq = dqA[:, a:]
            if u > a:  # key block B (the larger segment's other keys)
                dqB, dkB, dvB = fb(
                    _bhld(g("d_u", samples)), _bhld(g("q", samples)), _bhld(g("ke", samples)),
                    _bhld(g("ve", samples)), _bhld(g("o_u", samples)),
                    g("l_u", samples).transpose(1, 2).contiguous(), 0.0, False, scale=scale)
                dq = dq + dqB.transpose(1, 2)
                _unstack_into(dke, dkB.transpose(1, 2), samples, eoff)
                _unstack_into(dve, dvB.transpose(1, 2), samples, eoff)
            _unstack_into(dq_u, dq, samples, uoff)
        dq_u.index_add_(0, plan.lo_idx, dq_lo)
        dk = torch.empty_like(k)
        dk.index_copy_(0, plan.lo_idx, dkl)
        dk.index_copy_(0, plan.ex_idx, dke)
        dv = torch.empty_like(v)
        dv.index_copy_(0, plan.lo_idx, dvl)
        dv.index_copy_(0, plan.ex_idx, dve)
        return dq_u, dk, dv, None, None


def shared_bins_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: "ref.Selection",
    softmax_scale: Optional[float] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """:func:`selection_attention` for a selection whose rows repeat (the two bins of a
    training pass, :meth:`~diffcr_kernels.Selection.shared_rows`), from the projections of
    the rows of each sample's larger segment only.

    * ``q``, ``k``, ``v``: ``[U, H, Dh]`` (``v``: ``[U, H, Dv]``), the rows of ``union`` in
      ``(union, src) = sel.shared_rows()``;
    * ``sel``: a :class:`~diffcr_kernels.Selection` with two segments per sample made by
      :func:`~diffcr_kernels.select_topk` (else: ValueError).

    Returns ``[T, H, Dv]``, equal to ``selection_attention(q[src], k[src], v[src], sel)``
    (:func:`nested_attention`: on CPU the smaller bin's attention forward is not computed
    twice)."""
    plan = nested_plan(sel)
    if plan is None:
        raise ValueError("shared_bins_attention: the selection must have two segments per "
                         "sample and come from select_topk")
    src, union_lens, lo_rows, lo_lens, out_map = plan
    return nested_attention(q, k, v, union_lens, src.index_select(0, lo_rows), lo_lens,
                            out_map, sel.seqlens, softmax_scale, backend=backend)


def nested_plan(sel: "ref.Selection"):
    """For a two-segments-per-sample selection from :func:`~diffcr_kernels.select_topk`:
    ``(src, union_lens, lo_rows, lo_lens, out_map)`` where ``src`` is
    :meth:`~diffcr_kernels.Selection.shared_rows`' union row of every packed row, ``lo_rows``
    int64 the packed rows of every sample's smaller segment (so ``src[lo_rows]`` is
    :func:`nested_attention`'s ``lo_idx``), and ``out_map`` the permutation from
    ``[smaller segments' rows; union rows]`` to the packed order of ``sel``. None for any
    other selection."""
    if sel.segs_per_sample != 2:
        return None
    sh = sel.shared_rows()
    if sh is None:
        return None
    union, src = sh
    lo_rows, lo_lens, out_map = nested_tables(sel.seqlens, sel.indices.device)
    return src, list(union.seqlens), lo_rows, lo_lens, out_map


_NESTED_CACHE: dict = {}


def nested_tables(lens: Sequence[int], device):
    """For a packed layout of two segments per sample (host lengths ``lens``, sample-major)
    whose smaller segment is a subset of the larger: ``(lo_rows, lo_lens, out_map)``, the
    packed rows of every sample's smaller segment (int64), their host lengths, and the
    :func:`nested_attention` ``out_map`` from ``[smaller segments' rows; larger segments'
    rows]`` to the packed order. Cached by the lengths (every block of a training step asks
    for the same ones). The larger segment of a sample is the one
    :meth:`Selection.shared_rows` keeps (the first of equal lengths)."""
    lens = tuple(lens)
    if len(lens) % 2:
        raise ValueError(f"nested_tables: two segments per sample, got {len(lens)} segments")
    key = (lens, str(device))
    got = None if torch.compiler.is_compiling() else _NESTED_CACHE.get(key)
    if got is not None:
        return got
    B = len(lens) // 2
    starts = [0] + _cumsum(lens)
    lo_rows, lo_lens, out_map = [], [], []
    A = sum(min(lens[2 * b], lens[2 * b + 1]) for b in range(B))
    a_pos, u_pos = 0, 0
    for b in range(B):
        s0, s1 = 2 * b, 2 * b + 1
        hi = s0 if lens[s0] >= lens[s1] else s1
        lo = s1 if hi == s0 else s0
        lo_rows.extend(range(starts[lo], starts[lo] + lens[lo]))
        lo_lens.append(lens[lo])
        for s in (s0, s1):
            if s == lo:
                out_map.extend(range(a_pos, a_pos + lens[lo]))
            else:
                out_map.extend(range(A + u_pos, A + u_pos + lens[hi]))
        a_pos += lens[lo]
        u_pos += lens[hi]
    got = (ref.host_index(lo_rows, device), lo_lens, ref.host_index(out_map, device))
    if not torch.compiler.is_compiling():
        if len(_NESTED_CACHE) >= 64:
            _NESTED_CACHE.clear()
        _NESTED_CACHE[key] = got
    return got
