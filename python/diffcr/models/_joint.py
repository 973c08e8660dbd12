"""Shared by the joint-attention families (SD3, Flux, Qwen-Image, HunyuanVideo): blocks that
take the image tokens as ``hidden_states`` and the text as ``encoder_hidden_states`` and return
both streams (``(encoder_hidden_states, hidden_states)``, or the other way round:
:attr:`JointFamily.image_first`).

Only image tokens are routed. A routed call runs the block's own diffusers forward on
[every text token; the kept image tokens] (the family says how its calls are split and which
per-token inputs are gathered, :meth:`JointFamily.calls`). The text stream's update depends
on which image tokens it attended to, so with two bins per sample (training) the text update
is the bin-weighted sum of the two calls' updates, like the image tokens'
(``ctx + w_a * d_a + w_b * d_b``); with one segment per sample (eval, frozen) it is the call's
text output itself.
"""
import importlib

import torch

import diffcr_kernels as dk

from .base import ModelFamily
from .common import (plain_weight, rotate_interleaved, row_layout, rows_modulate,
                     rows_self_attention, rows_times, scatter_pieces, segment_groups,
                     shared_rows, split_linear)


class JointFamily(ModelFamily):
    """Base of the joint-attention families: the compat path (a family may add a fused forward:
    SD3)."""

    def hidden_size(self, block):
        return block.attn.to_q.in_features

    #: the blocks return ``(hidden_states, encoder_hidden_states)`` (HunyuanVideo) instead of
    #: ``(encoder_hidden_states, hidden_states)`` (SD3, Flux, Qwen-Image)
    image_first: bool = False

    def hidden_states_of(self, output):
        return output[0] if self.image_first else output[1]

    def text_of(self, output):
        return self._streams(output)[0]

    def with_hidden_states(self, output, hidden_states):
        i = 0 if self.image_first else 1
        return tuple(hidden_states if j == i else v for j, v in enumerate(output))

    def _streams(self, output):
        """``(text, image)`` of a block's output."""
        return (output[1], output[0]) if self.image_first else (output[0], output[1])

    def _output(self, ctx, x):
        return (x, ctx) if self.image_first else (ctx, x)

    #: ``(module, class name)`` of the attention processor that the family's fused forward
    #: reproduces; a block with another processor runs compat (None: no fused forward)
    fused_processor = None

    def fused_unsupported_reason(self, block):
        if self.fused_processor is None:
            return f"no fused forward for {type(block).__mro__[0].__name__} yet (compat runs)"
        attn = block.attn
        if type(attn.processor) is not self._fused_processor_class():
            return f"attn processor {type(attn.processor).__name__}"
        if getattr(attn, "fused_projections", False):
            return "fused QKV projections (fuse_projections)"
        return None

    def _fused_processor_class(self):
        # imported once, eagerly (convert asks for every block's reason), so that a compiled
        # forward only reads the cached class (Dynamo does not trace importlib)
        cls = self.__dict__.get("_fused_processor_cls")
        if cls is None:
            module, name = self.fused_processor
            cls = self.__dict__["_fused_processor_cls"] = getattr(
                importlib.import_module(module), name)
        return cls

    @staticmethod
    def attention_kwargs_reason(call):
        """Why a call with ``joint_attention_kwargs`` (IP-Adapter and the like) runs compat,
        None without them."""
        if call.get("joint_attention_kwargs"):
            return f"joint_attention_kwargs {sorted(call['joint_attention_kwargs'])}"
        return None

    def call_fused_reason(self, block, call):
        return self.fused_unsupported_reason(block)

    #: one diffusers call per segment instead of per group of equal-length segments: for
    #: families whose rotary table is shared by the batch (``[positions, ...]`` without a batch
    #: dim), so that each call can carry the rotary rows of its own kept positions
    per_segment_calls: bool = False

    def calls(self, block, call, sel, ks):
        """Yields ``(rows [G, k], samp [G], segs, gathered call)``: one diffusers call per
        group of equal-length segments, or per segment (:attr:`per_segment_calls`)."""
        x = call["hidden_states"]
        N = x.shape[1]
        for rows, idx, samp, segs in segment_groups(sel, ks, x.device):
            if not self.per_segment_calls:
                yield rows, samp, segs, self.gathered_call(block, call, samp,
                                                           idx - samp[:, None] * N)
                continue
            for j, s in enumerate(segs):
                yield (rows[j:j + 1], samp[j:j + 1], [s],
                       self.gathered_call(block, call, samp[j:j + 1], idx[j:j + 1] - samp[j] * N))

    def compat_forward(self, block, base_forward, call, sel, ks, gate, mlp_gate, *,
                       inplace_residual=False):
        x = call["hidden_states"]
        ctx = call["encoder_hidden_states"]
        pieces, text = [], []
        for rows, samp, segs, gcall in self.calls(block, call, sel, ks):
            xg = gcall["hidden_states"]
            with mlp_gate.scaled(self.gate_scale(block, gate[rows], gcall)):
                ctx_out, out = self._streams(base_forward(**gcall))
            pieces.append((rows, out - xg))
            text.append((segs, samp, ctx_out))
        new_x = scatter_pieces(x, sel, pieces, inplace_residual)
        if text[0][2] is None:  # context_pre_only: the last SD3 block returns no text
            return self._output(None, new_x)
        if sel.segs_per_sample == 1:  # one call per sample: its text output is the block's
            # (in its dtype: under autocast a block can return a wider one than it took)
            new_ctx = ctx.new_empty(ctx.shape, dtype=text[0][2].dtype)
            for segs, samp, ctx_out in text:
                new_ctx = new_ctx.index_copy(0, samp, ctx_out)
            return self._output(new_ctx, new_x)
        new_ctx = ctx.to(text[0][2].dtype)
        w = sel.seg_weight
        for segs, samp, ctx_out in text:
            seg = torch.tensor(segs, device=x.device)
            upd = (ctx_out - ctx.index_select(0, samp).to(ctx_out.dtype)) * w.index_select(
                0, seg).to(ctx_out.dtype)[:, None, None]
            new_ctx = new_ctx.index_add(0, samp, upd)
        return self._output(new_ctx, new_x)


def shared_positions(tok, family):
    """The kept positions ``tok[0]`` when every gathered sample keeps the same ones (a rotary
    table shared by the batch can then be gathered once); ValueError otherwise."""
    if tok.shape[0] > 1 and not bool((tok == tok[:1]).all()):
        raise ValueError(f"diffcr: {family} rotary rows differ between the gathered samples; "
                         "gather one sample at a time")
    return tok[0]


# ------------------------------------------------------------------ fused double-stream path
class JointLayout:
    """The packed joint layout of a selection ``sel`` with ``L`` text tokens per sample: for
    every segment s, ``[its kept rows; its sample's L text rows]``, segments one after another
    (``J = T + S * L`` rows), built on the device with no host loop over rows. Packed row t of
    segment s sits at ``t + s * L``; the text of segment s at ``cu[s + 1] + s * L + [0, L)``.

    Attributes: ``img_pos`` int64 ``[T]``, ``txt_pos`` int64 ``[S * L]`` (row positions in the
    layout), ``cu`` int32 ``[S + 1]`` (cumulative joint segment lengths), ``seqlens`` (host
    tuple), ``seg`` (sample of every segment, ``sel.seg_sample``), ``S``, ``L``, ``J``."""

    def __init__(self, sel, L: int):
        lens = sel.seqlens
        S = len(lens)
        T = sel.total
        dev = sel.indices.device
        seg_of_row = torch.repeat_interleave(torch.arange(S, device=dev),
                                             dk.host_index(lens, dev), output_size=T)
        self.img_pos = torch.arange(T, device=dev) + seg_of_row * L
        seg_l = torch.arange(S, device=dev) * L
        self.txt_pos = ((sel.cu_seqlens[1:].long() + seg_l)[:, None]
                        + torch.arange(L, device=dev)[None]).reshape(-1)
        self.seg = sel.seg_sample
        self.S, self.L, self.J = S, L, T + S * L
        self.seqlens = tuple(n + L for n in lens)
        self.cu = sel.cu_seqlens + torch.cat([seg_l.new_zeros(1), seg_l + L]).to(torch.int32)

    def pack(self, img, txt, per_segment: bool = False):
        """``img`` ``[T, ...]`` and the text rows -> ``[J, ...]``. ``txt``: ``[B, L, ...]`` per
        sample (each segment takes its sample's), ``[S, L, ...]`` per segment
        (``per_segment=True``) or ``[L, ...]`` shared by every sample."""
        if not per_segment:
            txt = (txt.unsqueeze(0).expand(self.S, *txt.shape) if txt.dim() == img.dim()
                   else txt.index_select(0, self.seg))
        # in place into one fresh buffer: each row written once (out-of-place index_copy
        # would copy the whole [J, ...] buffer twice first)
        out = img.new_empty(self.J, *img.shape[1:])
        out.index_copy_(0, self.img_pos, img)
        out.index_copy_(0, self.txt_pos, txt.reshape(-1, *img.shape[1:]).to(img.dtype))
        return out

    def attention(self, q, k, v, img_valid=None, txt_valid=None):
        """Attention over every joint segment: ``[J, H, Dh]`` each -> ``[J, H, Dh]``.

        Without a key mask: one varlen call (FlashAttention's varlen kernels on a GPU). With
        one (``img_valid`` bool ``[T]`` for the packed image rows, ``txt_valid`` bool ``[B, L]``
        for each sample's text, either may be None = all valid): every query of a segment
        attends to the segment's valid keys, as diffusers' joint attention with its boolean
        mask ``[B, 1, 1, N + L]`` does, through one SDPA call per segment length (one call
        at inference, where every sample has one segment of the same length; one per bin
        length in training), never padded. No host sync either way."""
        m = max(self.seqlens)
        uniform = len(set(self.seqlens)) == 1
        if img_valid is None and txt_valid is None:
            return dk.varlen_attention(q, k, v, self.cu, self.cu, m, m, uniform=uniform,
                                       seqlens_q=self.seqlens, seqlens_k=self.seqlens)
        dev = q.device
        T = self.J - self.S * self.L
        if img_valid is None:
            img_valid = torch.ones(T, dtype=torch.bool, device=dev)
        if txt_valid is None:
            txt_valid = torch.ones(self.L, dtype=torch.bool, device=dev)
        valid = self.pack(img_valid.bool(), txt_valid.bool())  # [J]
        S, H = self.S, q.shape[1]
        if uniform:
            def seg(t):
                return t.view(S, m, *t.shape[1:])
            o = torch.nn.functional.scaled_dot_product_attention(
                seg(q).transpose(1, 2), seg(k).transpose(1, 2), seg(v).transpose(1, 2),
                attn_mask=seg(valid)[:, None, None, :]).transpose(1, 2)  # [S, m, H, Dv]
            return o.reshape(S * m, H, o.shape[-1])
        # ragged (both training bins): one SDPA call per segment length, over the segments of
        # that length gathered as [G, length] (no padding, so no attention work is wasted)
        starts, groups = [0], {}
        for s_, n in enumerate(self.seqlens):
            groups.setdefault(n, []).append(s_)
            starts.append(starts[-1] + n)
        out = None
        for n, segs in groups.items():
            idx = (dk.host_index([starts[s_] for s_ in segs], dev)[:, None]
                   + torch.arange(n, device=dev)[None]).reshape(-1)  # [G * n]

            def seg(t):
                return t.index_select(0, idx).view(len(segs), n, *t.shape[1:])
            o = torch.nn.functional.scaled_dot_product_attention(
                seg(q).transpose(1, 2), seg(k).transpose(1, 2), seg(v).transpose(1, 2),
                attn_mask=seg(valid)[:, None, None, :]).transpose(1, 2)  # [G, n, H, Dv]
            if out is None:
                out = o.new_empty(self.J, H, o.shape[-1])
            out.index_copy_(0, idx, o.reshape(len(segs) * n, H, o.shape[-1]))
        return out

    def shared_attention(self, sel, union, src, q, k, v, tq, tk, tv):
        """:meth:`attention` without a key mask for the two training bins, from the image
        rows of each sample's larger bin only (``union``, ``src`` from
        :func:`.common.shared_rows`: ``q``, ``k``, ``v`` ``[U, H, Dh]``) and the text rows
        ``tq``, ``tk``, ``tv`` ``[B, L, H, Dh]``: the larger bin's joint segment holds the
        smaller one's rows (its image rows and the same text), so
        :func:`diffcr_kernels.nested_attention` computes both (on CPU the smaller segment's
        attention forward is not computed twice). Returns ``[J, H, Dv]`` in this layout's
        order, equal to :meth:`attention` over the rows expanded to both bins."""
        lay_u = JointLayout(union, self.L)
        B = union.num_segments
        # the union joint row of every row of this layout: image rows through src, text rows
        # to their sample's text in the union layout
        jsrc = self.pack(lay_u.img_pos.index_select(0, src), lay_u.txt_pos.view(B, self.L))
        lo_rows, lo_lens, out_map = dk.nested_tables(self.seqlens, q.device)
        return dk.nested_attention(lay_u.pack(q, tq), lay_u.pack(k, tk), lay_u.pack(v, tv),
                                   lay_u.seqlens, jsrc.index_select(0, lo_rows), lo_lens,
                                   out_map, self.seqlens)

    def image(self, o):
        """The image rows ``[T, ...]`` of a joint tensor ``o`` ``[J, ...]``."""
        return o.index_select(0, self.img_pos)

    def text(self, o):
        """The text rows ``[S, L, ...]`` of a joint tensor ``o`` ``[J, ...]``."""
        return o.index_select(0, self.txt_pos).view(self.S, self.L, *o.shape[1:])


def fused_joint_attention(lay, sel, rows_in, expand, q, k, v, tq, tk, tv, img_valid, txt_valid):
    """The joint attention of a fused block from the image rows its projections were computed
    on (``rows_in``, ``expand`` from :func:`.common.shared_rows`) and the text rows: with the
    two training bins and no key mask, :meth:`JointLayout.shared_attention`; otherwise
    :meth:`JointLayout.attention` over the expanded rows. ``[J, H, Dv]``."""
    src = getattr(expand, "src", None)
    if src is not None and sel.segs_per_sample == 2 and img_valid is None and \
            txt_valid is None and dk.nested_pays(q.device, lay.seqlens):
        return lay.shared_attention(sel, rows_in, src, q, k, v, tq, tk, tv)
    return lay.attention(lay.pack(expand(q), tq), lay.pack(expand(k), tk),
                         lay.pack(expand(v), tv), img_valid, txt_valid)


def heads(t, norm, n_heads):
    """``t`` ``[..., H * Dh]`` -> ``[..., H, Dh]``, with the attention's per-head norm."""
    t = t.unflatten(-1, (n_heads, -1))
    return norm(t) if norm is not None else t


def text_stream_out(ctx, c_out, lay, sel):
    """The text output of a routed joint block from each segment's ``c_out`` ``[S, L, D]``:
    the segment's own with one segment per sample, else the bin-weighted sum of the segments'
    updates (as the compat path)."""
    if sel.segs_per_sample == 1:
        return c_out  # segments are sample-major: segment b is sample b
    upd = (c_out - ctx.index_select(0, lay.seg)) * sel.seg_weight.to(ctx.dtype)[:, None, None]
    return ctx.index_add(0, lay.seg, upd)


class Rotary:
    """A rotary embedding of the fused joint forwards, as the family's attention processor
    applies it: :meth:`image` rotates the packed image rows ``[T, H, Dh]``, :meth:`text` the
    text rows ``[B, L, H, Dh]`` (unchanged where the family rotates the image tokens only).
    Build one with :meth:`joint_table` (Flux: a real ``(cos, sin)`` table ``[text; image]``),
    :meth:`image_table` (HunyuanVideo: a real table of the image tokens only) or
    :meth:`complex_tables` (Qwen-Image: complex image and text tables)."""

    def __init__(self, image, text=None):
        self._image, self._text = image, text

    def image(self, t):
        return self._image(t)

    def text(self, t):
        return t if self._text is None else self._text(t)

    @classmethod
    def joint_table(cls, rope, pos, L):
        """``rope`` = ``(cos, sin)`` ``[L + N, Dh]`` (text rows first), interleaved pairs,
        computed in float32 as diffusers' ``apply_rotary_emb``; ``pos`` the kept positions
        ``[T]``."""
        cos, sin = rope
        ci, si = cos.index_select(0, L + pos), sin.index_select(0, L + pos)
        f32 = torch.float32
        return cls(lambda t: rotate_interleaved(t, ci, si, f32),
                   lambda t: rotate_interleaved(t, cos[:L], sin[:L], f32))

    @classmethod
    def image_table(cls, rope, pos):
        """``rope`` = ``(cos, sin)`` ``[N, Dh]`` of the image tokens; the text is not
        rotated."""
        ci, si = (r.index_select(0, pos) for r in rope)
        return cls(lambda t: rotate_interleaved(t, ci, si, torch.float32))

    @classmethod
    def complex_tables(cls, img_freqs, txt_freqs, pos):
        """Complex ``img_freqs`` ``[N, Dh / 2]`` and ``txt_freqs`` ``[L, Dh / 2]``
        (``apply_rotary_emb_qwen(..., use_real=False)``: pairs as complex numbers, float32)."""
        fi = img_freqs.index_select(0, pos)
        return cls(lambda t: _rotate_complex(t, fi), lambda t: _rotate_complex(t, txt_freqs))


def _rotate_complex(t, freqs):
    """``t`` ``[..., R, H, Dh]`` times ``freqs`` ``[R, Dh / 2]`` (complex), pairs as complex
    numbers in float32, returned in ``t``'s dtype (as diffusers' ``apply_rotary_emb_qwen``)."""
    c = torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2))
    return torch.view_as_real(c * freqs.unsqueeze(-2)).flatten(-2).type_as(t)


def fused_double_stream_block(block, x, sel, gate_scores, ctx, temb, rope=None, *,
                              inplace_residual=False, rotary=None, img_valid=None,
                              txt_valid=None):
    """One routed MMDiT double-stream block (SD3 / SD3.5 ``JointTransformerBlock``, Flux
    ``FluxTransformerBlock``) over a packed selection (docs/method.md §7).

    The image rows of every segment are gathered, normalised and modulated in one pass and
    projected with one GEMM per projection (with the two training bins, once per token:
    :func:`.common.shared_rows`); the text stream is normalised and projected once
    per sample. Joint attention runs over ``[segment rows; its sample's text]`` for every
    segment in one varlen call (both training bins included) (:class:`JointLayout`), with the
    rotary rows of exactly those positions when ``rope`` = ``(cos, sin)`` ``[L + N, Dh]`` is
    given (Flux: table ``[text; image]``) or as ``rotary`` says (a function of the positions
    ``[U]`` of the rows it rotates, returning a :class:`Rotary`; HunyuanVideo: the image
    tokens only), and the key mask ``img_valid`` ``[T]`` /
    ``txt_valid`` ``[B, L]`` (bool) when one is given (HunyuanVideo's text padding).
    SD3.5's ``attn2`` runs over the segment rows alone.
    The image update is scattered back with the router-gated MLP and the bin weights; the text
    update follows :func:`text_stream_out`. Returns ``(encoder_hidden_states or None,
    hidden_states)`` as the block does."""
    B, N, D = x.shape
    T = sel.total
    dual = getattr(block, "use_dual_attention", False)
    pre_only = getattr(block, "context_pre_only", False)
    mods = block.norm1.linear(block.norm1.silu(temb)).chunk(9 if dual else 6, dim=1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
    ln = block.norm1.norm
    # training: each token of both bins normalised, projected and rotated once
    rows_in, expand = shared_rows(sel)
    h = dk.gather_norm_modulate(x, rows_in, shift_msa, scale_msa, ln.weight, ln.bias, ln.eps)
    if pre_only:
        nctx = block.norm1_context(ctx, temb)
    else:
        nctx, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(
            ctx, emb=temb)
    attn = block.attn
    H, L = attn.heads, ctx.shape[1]
    q = heads(attn.to_q(h), attn.norm_q, H)  # [U, H, Dh]
    k = heads(attn.to_k(h), attn.norm_k, H)
    v = heads(attn.to_v(h), None, H)  # [U, H, Dh]
    tq = heads(attn.add_q_proj(nctx), attn.norm_added_q, H)  # [B, L, H, Dh]
    tk = heads(attn.add_k_proj(nctx), attn.norm_added_k, H)
    tv = heads(attn.add_v_proj(nctx), None, H)
    if rope is not None:
        rotary = Rotary.joint_table(rope, rows_in.indices % N, L)
    elif rotary is not None:
        rotary = rotary(rows_in.indices % N)
    if rotary is not None:
        q, k, tq, tk = rotary.image(q), rotary.image(k), rotary.text(tq), rotary.text(tk)
    lay = JointLayout(sel, L)
    o = fused_joint_attention(lay, sel, rows_in, expand, q, k, v, tq, tk, tv, img_valid, txt_valid)
    o = o.reshape(lay.J, -1).to(q.dtype)
    shape = row_layout(sel)  # per-sample vectors broadcast over their rows
    a = attn.to_out[1](attn.to_out[0](lay.image(o)))
    attn_update = rows_times(a, gate_msa, sel, shape)
    if dual:  # SD3.5: self-attention of each segment's rows alone
        h2 = dk.gather_norm_modulate(x, rows_in, mods[6], mods[7], ln.weight, ln.bias, ln.eps)
        a2n = block.attn2
        q2 = heads(a2n.to_q(h2), a2n.norm_q, H)
        k2 = heads(a2n.to_k(h2), a2n.norm_k, H)
        o2 = rows_self_attention(q2, k2, heads(a2n.to_v(h2), None, H), sel, expand)
        a2 = a2n.to_out[1](a2n.to_out[0](o2.reshape(T, -1).to(q2.dtype)))
        attn_update = attn_update + rows_times(a2, mods[8], sel, shape)
    hid = dk.gather_rows(x, sel.indices) + attn_update
    n2 = rows_modulate(block.norm2(hid), scale_mlp, shift_mlp, sel, shape)
    mlp_out = block.ff(n2)
    new_x = dk.scatter_back_selection(x, sel, attn_update, mlp_out, gate_mlp,
                                      scores=gate_scores,
                                      inplace=not torch.is_grad_enabled() and inplace_residual)
    if pre_only:
        return None, new_x
    return text_stream_update(ctx, attn.to_add_out(lay.text(o)), lay, sel, c_gate_msa,
                              block.norm2_context, c_scale_mlp, c_shift_mlp, c_gate_mlp,
                              block.ff_context), new_x


def text_stream_update(ctx, c_att, lay, sel, gate_msa, norm2, scale_mlp, shift_mlp, gate_mlp,
                       ff):
    """The text stream of a double-stream block after joint attention, per segment (each
    attended to its own rows): ``c_att`` ``[S, L, D]`` the segments' projected attention
    output, the modulation ``[B, D]`` per sample; the residual, norm, modulated feed-forward
    and fp16 clip of the block, combined as :func:`text_stream_out`."""
    seg = lay.seg

    def per_segment(m):
        return m.index_select(0, seg).unsqueeze(1)
    c_in = ctx.index_select(0, seg) + per_segment(gate_msa) * c_att
    nc = norm2(c_in) * (1 + per_segment(scale_mlp)) + per_segment(shift_mlp)
    c_out = c_in + per_segment(gate_mlp) * ff(nc)
    if c_out.dtype == torch.float16:
        c_out = c_out.clip(-65504, 65504)
    return text_stream_out(ctx, c_out, lay, sel)


def fused_single_stream_block(block, x, sel, gate_scores, ctx, temb, rope=None, *,
                              inplace_residual=False, rotary=None, img_valid=None,
                              txt_valid=None):
    """One routed single-stream block (Flux ``FluxSingleTransformerBlock``, HunyuanVideo
    ``HunyuanVideoSingleTransformerBlock``: one attention and one MLP over ``[image; text]``
    rows, a fused output projection) over a packed selection.

    The kept image rows are gathered, normalised and modulated in one pass; the text rows are
    normalised once per sample. Attention (qk RMS-norm, the rotary rows of exactly the kept
    positions and of the text: ``rope`` or ``rotary`` as in :func:`fused_double_stream_block`,
    and its key mask) runs over ``[segment rows; its sample's text]`` for every segment in one
    call. The MLP input projection runs once per token and once per sample's text (in
    training a token of both bins is computed once, :func:`.common.shared_rows`). The output
    projection ``proj_out`` over ``[attention; MLP]`` is split by columns
    (:func:`.common.split_linear`): the attention half (with the bias) on every joint row, the
    MLP half on those once-per-token rows. The image rows take the attention half as their
    attention update and the MLP half as their router-gated MLP output, both scaled by the
    block's gate in the scatter-back; the text rows take both halves (ungated by the router),
    per segment, combined as :func:`._joint.text_stream_out`. A ``proj_out`` that is not a
    plain linear (quantized, a peft layer) is called as a module on ``[attention; MLP]``
    rows instead. Returns ``(text, image)``."""
    B, N, D = x.shape
    L = ctx.shape[1]
    norm = block.norm
    shift, scale, gate = norm.linear(norm.silu(temb)).chunk(3, dim=1)
    ln = norm.norm
    # training: each token of both bins normalised, projected (Q/K/V and the MLP's input
    # projection) and rotated once
    rows_in, expand = shared_rows(sel)
    h = dk.gather_norm_modulate(x, rows_in, shift, scale, ln.weight, ln.bias, ln.eps)  # [U, D]
    nctx = ln(ctx) * (1 + scale[:, None]) + shift[:, None]  # [B, L, D]
    attn = block.attn
    H = attn.heads
    lay = JointLayout(sel, L)
    if rope is not None:
        rotary = Rotary.joint_table(rope, rows_in.indices % N, L)
    elif rotary is not None:
        rotary = rotary(rows_in.indices % N)
    q, k = heads(attn.to_q(h), attn.norm_q, H), heads(attn.to_k(h), attn.norm_k, H)
    tq, tk = heads(attn.to_q(nctx), attn.norm_q, H), heads(attn.to_k(nctx), attn.norm_k, H)
    if rotary is not None:
        q, k, tq, tk = rotary.image(q), rotary.image(k), rotary.text(tq), rotary.text(tk)
    v, tv = heads(attn.to_v(h), None, H), heads(attn.to_v(nctx), None, H)
    o = fused_joint_attention(lay, sel, rows_in, expand, q, k, v, tq, tk, tv, img_valid, txt_valid)
    o = o.reshape(lay.J, -1).to(q.dtype)  # [J, D]
    shape = row_layout(sel)  # the block's gate per sample, broadcast over its rows
    inplace = not torch.is_grad_enabled() and inplace_residual
    # the MLP input projection of each token once (training: once for both bins) and of each
    # sample's text, in one call
    U = h.shape[0]
    act_all = block.act_mlp(block.proj_mlp(torch.cat([h, nctx.reshape(B * L, D).to(h.dtype)])))
    seg = lay.seg
    if plain_weight(block.proj_out):
        # the projection of [attention; MLP] split by columns, in one call: the attention half
        # (with the bias) on every joint row, the MLP half on the rows above (a token of both
        # bins has the same MLP half in both), then copied to the packed rows; the router gate
        # and the block's gate are applied in the scatter-back (the projection is linear: the
        # same value)
        o_attn, o_mlp = split_linear(o, act_all, block.proj_out.weight,
                                     block.proj_out.bias)  # [J, D], [U + B L, D]
        attn_update = rows_times(lay.image(o_attn), gate, sel, shape)  # [T, D]
        new_x = dk.scatter_back_selection(x, sel, attn_update, expand(o_mlp[:U]), gate,
                                          scores=gate_scores, inplace=inplace)
        c_upd = lay.text(o_attn) + o_mlp[U:].view(B, L, D).index_select(0, seg)  # [S, L, D]
    else:
        # a quantized or wrapped proj_out (bitsandbytes, torchao, GGUF, a peft LoRA layer...),
        # whose weight cannot be cut by columns: the module computes the whole projection on
        # every row; the router gate multiplies the MLP half before it (the projection is
        # linear: the same value)
        act, mlp_txt = act_all[:U], act_all[U:].view(B, L, -1)
        upd = rows_times(block.proj_out(torch.cat(
            [lay.image(o), expand(act) * gate_scores.to(act.dtype)[:, None]], dim=-1)), gate,
            sel, shape)  # [T, D]
        new_x = dk.scatter_back_selection(x, sel, upd, use_scores=False, inplace=inplace)
        c_upd = block.proj_out(torch.cat([lay.text(o), mlp_txt.index_select(0, seg)], dim=-1))
    c_out = ctx.index_select(0, seg) + gate.index_select(0, seg).unsqueeze(1) * c_upd
    if c_out.dtype == torch.float16:
        c_out = c_out.clip(-65504, 65504)
    return text_stream_out(ctx, c_out, lay, sel), new_x
