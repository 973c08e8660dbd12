"""Helpers of the routed forwards that no family owns: the compat path's grouping of segments
and its scatter-back (:func:`segment_groups`, :func:`scatter_pieces`), and the fused paths'
cross-attention of packed rows over their sample's text (:func:`cross_attention`) and
interleaved rotary embedding (:func:`rotate_interleaved`). Families import these; nothing here
knows a family.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import diffcr_kernels as dk

__all__ = ["segment_groups", "packed_rows", "scatter_pieces", "cross_attention",
           "rotate_interleaved", "plain_weight", "shared_rows", "row_layout", "per_row",
           "apply_layout", "rows_times", "rows_modulate", "split_linear"]


def plain_weight(lin) -> bool:
    """Whether a fused forward may read ``lin.weight`` / ``lin.bias`` itself (cut them, cast
    them as layerwise casting's hook would, call ``F.linear``): an ``nn.Linear`` whose weight
    and bias are plain tensors. False for quantized weights (bitsandbytes ``Params4bit`` /
    ``Int8Params``, torchao tensor subclasses, GGUF parameters), DTensors and wrappers that are
    not ``nn.Linear`` (a peft LoRA layer): those are computed by calling the module."""
    plain = (torch.Tensor, torch.nn.Parameter)
    return (isinstance(lin, torch.nn.Linear) and type(lin.weight) in plain
            and (lin.bias is None or type(lin.bias) in plain))


class _SplitLinear(torch.autograd.Function):
    """``(a @ W[:, :Da]^T + bias, m @ W[:, Da:]^T)``: one linear over ``[a; m]`` columns,
    each half on its own rows, computed in ``dtype``. Casting to ``dtype`` (autocast's, or
    the compute dtype of a weight stored in another) makes each half contiguous at no extra
    cost. The backward writes the weight's gradient once, in the weight's dtype, as the two
    column blocks of one tensor, where cutting ``W`` by columns in autograd would write a
    zero-filled weight-sized gradient per cut and sum them."""

    @staticmethod
    def forward(ctx, a, m, weight, bias, dtype):
        da = a.shape[-1]
        wa, wm = weight[:, :da].to(dtype), weight[:, da:].to(dtype)
        b = None if bias is None else bias.to(dtype)
        ctx.save_for_backward(a, m, wa, wm)
        ctx.w_meta = (weight.shape, weight.dtype)
        ctx.b_dtype = None if bias is None else bias.dtype
        return F.linear(a, wa, b), F.linear(m, wm)

    @staticmethod
    def backward(ctx, ga, gm):
        a, m, wa, wm = ctx.saved_tensors
        da = a.shape[-1]
        if ga is None:
            ga = torch.zeros(*a.shape[:-1], wa.shape[0], dtype=a.dtype, device=a.device)
        if gm is None:
            gm = torch.zeros(*m.shape[:-1], wm.shape[0], dtype=m.dtype, device=m.device)
        ga2, gm2 = ga.reshape(-1, ga.shape[-1]), gm.reshape(-1, gm.shape[-1])
        grad_a = grad_m = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = (ga2 @ wa).view(a.shape)
        if ctx.needs_input_grad[1]:
            grad_m = (gm2 @ wm).view(m.shape)
        if ctx.needs_input_grad[2]:
            shape, dtype = ctx.w_meta
            grad_w = torch.empty(shape, dtype=dtype, device=a.device)
            grad_w[:, :da].copy_(ga2.t() @ a.reshape(-1, da))
            grad_w[:, da:].copy_(gm2.t() @ m.reshape(-1, m.shape[-1]))
        if ctx.b_dtype is not None and ctx.needs_input_grad[3]:
            grad_b = ga2.sum(0).to(ctx.b_dtype)
        return grad_a, grad_m, grad_w, grad_b, None


def split_linear(a, m, weight, bias=None):
    """The linear ``y = [a, m] @ weight^T + bias`` computed as its two column halves on
    different rows: returns ``(a @ weight[:, :Da]^T + bias, m @ weight[:, Da:]^T)``.

    Flux's single-stream blocks project ``[attention; MLP]`` with one weight; in a training
    pass the MLP half of a token shared by both bins is the same in both, so it runs once per
    token (``m``: ``[U, Dm]`` rows) while the attention half runs per bin (``a``: ``[T, Da]``
    rows).

    Args:
        a: ``[..., Da]`` rows of the first ``Da`` input columns.
        m: ``[..., Dm]`` rows of the other ``Dm`` columns (any row count).
        weight: ``[Dout, Da + Dm]``, a plain tensor (:func:`plain_weight`), in any dtype.
        bias: ``[Dout]`` or None, added to the first output.

    Computed in autocast's dtype under ``torch.autocast`` (as ``F.linear`` would be), else in
    ``a``'s dtype (a weight stored in another dtype, as layerwise casting stores it, is cast
    as its hook would cast it). Gradients come back in each operand's own dtype; the weight's
    is one ``[Dout, Da + Dm]`` tensor (see :class:`_SplitLinear`)."""
    dev = a.device.type
    if torch.is_autocast_enabled(dev):
        low = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return _SplitLinear.apply(a.to(low), m.to(low), weight, bias, low)
    return _SplitLinear.apply(a, m.to(a.dtype), weight, bias, a.dtype)


def shared_rows(sel):
    """``(rows, expand)`` for the per-row work before attention in a fused forward: with two
    segments per sample (the training bins) the smaller is a subset of the larger
    (:meth:`~diffcr_kernels.Selection.shared_rows`), so the gather, norm, modulation, Q/K/V
    (and the other input projections) and rotary of a token run once, on ``rows`` (a
    selection of each sample's largest segment), and ``expand(t)`` copies a ``[U, ...]``
    result to every packed row ``[T, ...]`` of ``sel`` (the gradients of both copies summed
    by autograd). With one segment per sample: ``(sel, identity)``. The values are those of
    computing every packed row (method §7)."""
    sh = sel.shared_rows()
    if sh is None:
        return sel, _same
    union, src = sh
    return union, _Expand(src)


class _Expand:
    """``t[U, ...]`` -> ``t.index_select(0, src)`` (:func:`shared_rows`); ``src`` int64
    ``[T]``, the union row of every packed row."""

    def __init__(self, src):
        self.src = src

    def __call__(self, t):
        return t.index_select(0, self.src)


def _same(t):
    return t


def rows_self_attention(q, k, v, sel, expand):
    """Self-attention of every segment of ``sel`` from ``[U, H, Dh]`` projections of the rows
    :func:`shared_rows` computes once (``expand`` from it; or of every packed row, with
    ``expand`` the identity): from the rows of the two training bins' larger one,
    :func:`diffcr_kernels.shared_bins_attention` (on CPU the smaller bin's attention forward
    is not computed twice); otherwise :func:`diffcr_kernels.selection_attention` on the
    expanded rows. ``[T, H, Dv]``, the same values either way."""
    if sel.segs_per_sample == 2 and q.shape[0] != sel.total and \
            dk.nested_pays(q.device, sel.seqlens):
        return dk.shared_bins_attention(q, k, v, sel)
    return dk.selection_attention(expand(q), expand(k), expand(v), sel)


def row_layout(sel):
    """How a ``[B, D]`` per-sample vector reaches the packed rows: ``(S, rows)`` when every
    segment has the same length (uniform), ``(B, rows)`` when every sample has the same row
    total (a sample's rows are contiguous, sample-major), else None (expanded per row)."""
    if sel.uniform:
        return sel.num_segments, sel.max_seqlen
    P = sel.segs_per_sample
    lens = sel.seqlens
    totals = {sum(lens[i:i + P]) for i in range(0, len(lens), P)}
    if len(totals) == 1:
        return len(lens) // P, totals.pop()
    return None


def per_row(v, sel, layout):
    """[B, D] -> per packed row for ``layout`` (:func:`row_layout`): a broadcastable
    ``[S or B, 1, D]`` view, or ``[T, D]`` materialised when samples differ in row count."""
    if layout is None:
        return v.index_select(0, sel.row_sample())
    if sel.uniform:
        return v.index_select(0, sel.seg_sample).unsqueeze(1)
    return v.unsqueeze(1)


def apply_layout(t, shape):
    """[T, D] -> [S or B, rows, D] for a :func:`row_layout` (None: unchanged)."""
    return t.view(shape[0], shape[1], -1) if shape is not None else t


def rows_times(t, v, sel, layout):
    """``t`` ``[T, D]`` times the ``[B, D]`` vector ``v`` of each row's sample, broadcast per
    :func:`row_layout` ``layout`` (no ``[T, D]`` copy of ``v`` unless samples differ in row
    count) -> ``[T, D]``."""
    return (apply_layout(t, layout) * per_row(v, sel, layout)).reshape(t.shape)


def rows_modulate(t, scale, shift, sel, layout):
    """adaLN modulation ``t * (1 + scale) + shift`` of packed rows ``t`` ``[T, D]`` with the
    ``[B, D]`` vectors of each row's sample, broadcast as :func:`rows_times` -> ``[T, D]``."""
    return (apply_layout(t, layout) * (1 + per_row(scale, sel, layout))
            + per_row(shift, sel, layout)).reshape(t.shape)


def segment_groups(sel, ks, device):
    """The segments of a selection grouped by length, for one diffusers call per group:
    yields ``(rows [G, k], idx [G, k], samp [G], segs)`` with ``rows`` the packed row numbers,
    ``idx`` the flat token indices, ``samp`` each segment's sample and ``segs`` the segment
    numbers (host list)."""
    flat_k = [k for row in ks for k in row]
    S = len(flat_k)
    starts = [0]
    for k in flat_k:
        starts.append(starts[-1] + k)
    groups = {}
    for s, k in enumerate(flat_k):
        groups.setdefault(k, []).append(s)
    P = sel.segs_per_sample
    for k, segs in groups.items():
        if len(groups) == 1:
            rows = torch.arange(sel.total, device=device).view(S, k)
        else:
            st = torch.tensor([starts[s] for s in segs], device=device)
            rows = st[:, None] + torch.arange(k, device=device)[None]
        samp = torch.tensor([s // P for s in segs], device=device)
        yield rows, sel.indices[rows], samp, segs


def packed_rows(pieces, T, like):
    """``[(rows [G, k], values [G, k, D])]`` -> the packed ``[T, D]`` tensor (``like``'s
    dtype)."""
    D = like.shape[-1]
    if len(pieces) == 1:
        return pieces[0][1].reshape(T, D).to(like.dtype)
    out = like.new_empty(T, D)
    for rows, d in pieces:
        out = out.index_put((rows.reshape(-1),), d.reshape(-1, D).to(like.dtype))
    return out


def scatter_pieces(x, sel, pieces, inplace=False):
    """``x`` with each kept row plus its update from ``pieces`` (compat path: the update is
    the block's output minus its gathered input). Under autocast a block can return a wider
    dtype than it took (bf16 in, float32 out where float32 modulation promotes): the result
    then has that dtype, as the dense block's output has, unselected rows exactly ``x``'s."""
    dt = x.dtype
    for _, d in pieces:
        dt = torch.promote_types(dt, d.dtype)
    if dt != x.dtype:
        x, inplace = x.to(dt), False
    delta = packed_rows(pieces, sel.total, x)
    return dk.scatter_back_selection(x, sel, delta, use_scores=False, inplace=inplace)


def cross_attention(attn, h, sel, text, text_bias, qk_norm=False, *, image_context=None):
    """Queries: the packed rows; keys/values: the text of each segment's sample, with
    diffusers' additive text mask (bias [B, 1, L] or None). ``qk_norm``: the attention's
    ``norm_q`` / ``norm_k`` follow the projections (Wan). ``image_context`` ``[B, L_img, C]``
    (Wan I2V; None otherwise): the same queries also attend, without a mask, to their sample's
    image keys ``norm_added_k(add_k_proj(image_context))`` and values
    ``add_v_proj(image_context)``; the two attention outputs, each in the queries' dtype, are
    summed before ``to_out``, as diffusers' ``WanAttnProcessor`` does."""
    T = h.shape[0]
    H = attn.heads
    q = attn.to_q(h)
    kt, vt = attn.to_k(text), attn.to_v(text)  # [B, L, D] once per sample
    if qk_norm:
        q, kt = attn.norm_q(q), attn.norm_k(kt)
    lens = list(sel.seqlens)
    P = sel.segs_per_sample
    B = len(lens) // P if P else 0

    def attend(kt, vt, bias):
        # the packed queries over the keys/values [B, L, H * Dh] of each segment's sample
        # -> [T, H * Dh] in q's dtype (before the output projection)
        Dh = kt.shape[-1] // H
        L = kt.shape[1]
        if (not sel.uniform and B == kt.shape[0] and B * P == len(lens)
                and all(lens[i] == lens[i - P] for i in range(P, len(lens)))):
            # every sample has the same P slot lengths: its rows are contiguous, and every
            # row of a sample attends to the same keys (its text) whatever its segment, so
            # one call over [B, rows per sample, H, Dh] (a view), keys/values the sample's own
            q4 = q.view(B, sum(lens[:P]), H, Dh)
            kg = kt.view(B, L, H, Dh).transpose(1, 2)
            vg = vt.view(B, L, H, Dh).transpose(1, 2)
            mask = None if bias is None else bias.view(B, 1, -1, L).to(q.dtype)
            o = F.scaled_dot_product_attention(q4.transpose(1, 2), kg, vg, attn_mask=mask)
            return o.transpose(1, 2).reshape(T, H * Dh).to(q.dtype)
        groups = {}
        for s, n in enumerate(lens):
            groups.setdefault(n, []).append(s)
        # segments are contiguous row ranges: split views (backward: one concatenation), stack
        # only groups of several equal-length segments, concatenate the outputs once
        qs = None if len(groups) == 1 else torch.split(q, lens)
        outs = [None] * len(lens)
        for n, segs in groups.items():
            G = len(segs)
            if qs is None:
                samp = sel.seg_sample
                qg = q.view(G, n, H, Dh)
            else:
                samp = dk.host_index([s // P for s in segs], q.device)
                qg = (qs[segs[0]].unsqueeze(0) if G == 1 else
                      torch.stack([qs[s] for s in segs])).view(G, n, H, Dh)
            kg = kt.index_select(0, samp).view(G, L, H, Dh).transpose(1, 2)
            vg = vt.index_select(0, samp).view(G, L, H, Dh).transpose(1, 2)
            mask = None
            if bias is not None:
                mask = bias.index_select(0, samp).view(G, 1, -1, L).to(qg.dtype)
            o = F.scaled_dot_product_attention(qg.transpose(1, 2), kg, vg, attn_mask=mask)
            o = o.transpose(1, 2)  # [G, n, H, Dh]
            if qs is None:
                out = o.reshape(-1, H * Dh)
            else:
                for s, os_ in zip(segs, o.unbind(0)):
                    outs[s] = os_.reshape(n, H * Dh)
        if qs is not None:
            out = torch.cat(outs, 0)
        return out.to(q.dtype)

    out = attend(kt, vt, text_bias)
    if image_context is not None:
        ki = attn.norm_added_k(attn.add_k_proj(image_context))  # [B, L_img, D], no mask
        out = out + attend(ki, attn.add_v_proj(image_context), None)
    return attn.to_out[1](attn.to_out[0](out))


def rotate_interleaved(t, cos, sin, compute_dtype=None):
    """diffusers' rotary embedding with real ``(cos, sin)`` tables and interleaved pairs
    (``(t[2i], t[2i + 1])`` rotated by the angle of pair i).

    ``t`` ``[R, H, Dh]`` (or ``[B, R, H, Dh]``); ``cos`` / ``sin`` ``[R, Dh]`` (one table row
    per row of ``t``, the same for every head), with each pair's value repeated as diffusers
    builds them (``repeat_interleave_real``): the pair's cosine is read at its even and its
    sine at its odd position, as Wan's ``WanAttnProcessor`` does, and each output is computed
    once per pair on half-width tensors (half the traffic of rotating the whole width).
    Returns ``t``'s shape and dtype. Computed in ``compute_dtype``: ``torch.float32`` as Flux's
    ``apply_rotary_emb`` (the same products and sums, so the same numbers); None, the
    promoted dtype of ``t`` and the tables, as Wan's processor."""
    x1, x2 = t.unflatten(-1, (-1, 2)).unbind(-1)  # [..., Dh / 2] strided views
    if compute_dtype is not None:
        x1, x2 = x1.to(compute_dtype), x2.to(compute_dtype)
    c, s = cos[..., 0::2].unsqueeze(1), sin[..., 1::2].unsqueeze(1)
    out = torch.empty_like(t)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out
