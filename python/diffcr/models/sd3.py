"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``): MMDiT ``JointTransformerBlock`` in
``transformer_blocks``.

Routed: the image tokens (``hidden_states``); the text stream stays dense and attends to the
kept image tokens (:mod:`._joint`). The block's own diffusers forward runs on the gathered
tokens, so SD3.5's dual attention (``attn2`` over the kept image tokens), qk-norm and the last
block's ``context_pre_only`` need nothing special. Positions are embedded before the blocks:
nothing positional is gathered. The router gates the image feed-forward (``ff``) only; the text
feed-forward (``ff_context``) is dense.

Timesteps: the flow-matching pipeline passes ``sigma * 1000`` (1000 = pure noise), so the
noise level is ``t / T`` with ``T = 1000``, as for the DDPM families.

Paths: the fused forward (:func:`_fused_sd3_block`) runs joint attention over
``[segment rows; its sample's text]`` for every segment in one varlen call, both training bins
in one packed pass, SD3.5's ``attn2`` over the segment rows; blocks with other attention
processors or norms, and calls with ``joint_attention_kwargs``, run compat.
"""
import torch

import diffcr_kernels as dk

from . import register_family
from ._joint import JointFamily


@register_family
class SD3Family(JointFamily):
    name = "sd3"
    model_classes = ("SD3Transformer2DModel",)
    block_lists = ("transformer_blocks",)
    #: LoRA targets: attention of both streams, both feed-forwards
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                    "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2")

    def block_classes(self):
        from diffusers.models.attention import JointTransformerBlock

        return (JointTransformerBlock,)

    has_fused = True

    def fused_unsupported_reason(self, block):
        from diffusers.models.attention_processor import JointAttnProcessor2_0
        from diffusers.models.normalization import AdaLayerNormZero, SD35AdaLayerNormZeroX

        for name in ("attn", "attn2"):
            attn = getattr(block, name, None)
            if attn is not None and type(attn.processor) is not JointAttnProcessor2_0:
                return f"{name} processor {type(attn.processor).__name__}"
        if type(block.norm1) not in (AdaLayerNormZero, SD35AdaLayerNormZeroX):
            return f"norm1 {type(block.norm1).__name__}"
        return None

    def call_fused_reason(self, block, call):
        if call.get("joint_attention_kwargs"):
            return f"joint_attention_kwargs {sorted(call['joint_attention_kwargs'])}"
        return None

    def fused_forward(self, block, call, sel, gate_scores, *, inplace_residual=False):
        return _fused_sd3_block(block, call["hidden_states"], sel, gate_scores,
                                call["encoder_hidden_states"], call["temb"],
                                inplace_residual=inplace_residual)

    def lora_targets_of(self, block, last=False):
        if getattr(block, "context_pre_only", False):
            # the last block returns no text: its text query projection feeds nothing
            return tuple(t for t in self.lora_targets if t != "add_q_proj")
        return self.lora_targets


def _heads(attn, t, norm, n_heads):
    """``t`` ``[..., H * Dh]`` -> ``[..., H, Dh]``, with the attention's per-head norm."""
    t = t.unflatten(-1, (n_heads, -1))
    return norm(t) if norm is not None else t


def _fused_sd3_block(block, x, sel, gate_scores, ctx, temb, *, inplace_residual=False):
    """One routed SD3 / SD3.5 ``JointTransformerBlock`` over a packed selection (docs/method.md
    §7). The image rows of every segment are gathered, normalised and modulated in one pass
    and projected with one GEMM per projection; the text stream is normalised and projected
    once per sample. Joint attention runs over ``[segment rows; its sample's text]`` for every
    segment in one varlen call (both training bins included); SD3.5's ``attn2`` runs over the
    segment rows alone. The image update is scattered back with the router-gated MLP and the
    bin weights; the text update is the segment's own (one segment per sample) or their
    bin-weighted sum, as on the compat path. Returns ``(encoder_hidden_states or None,
    hidden_states)`` as the block does."""
    B, N, D = x.shape
    T = sel.total
    dual = block.use_dual_attention
    mods = block.norm1.linear(block.norm1.silu(temb)).chunk(9 if dual else 6, dim=1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
    ln = block.norm1.norm
    h = dk.gather_norm_modulate(x, sel, shift_msa, scale_msa, ln.weight, ln.bias, ln.eps)
    if block.context_pre_only:
        nctx = block.norm1_context(ctx, temb)
    else:
        nctx, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(
            ctx, emb=temb)
    attn = block.attn
    H, L = attn.heads, ctx.shape[1]
    q = _heads(attn, attn.to_q(h), attn.norm_q, H)  # [T, H, Dh]
    k = _heads(attn, attn.to_k(h), attn.norm_k, H)
    v = _heads(attn, attn.to_v(h), None, H)
    tq = _heads(attn, attn.add_q_proj(nctx), attn.norm_added_q, H)  # [B, L, H, Dh]
    tk = _heads(attn, attn.add_k_proj(nctx), attn.norm_added_k, H)
    tv = _heads(attn, attn.add_v_proj(nctx), None, H)
    # the joint layout: segment s = [its rows; its sample's L text rows], built on the device
    # (no host loop over rows): packed row t of segment s sits at t + s * L, the text of
    # segment s at cu[s + 1] + s * L + [0, L)
    lens = sel.seqlens
    S = len(lens)
    dev = x.device
    seg_of_row = torch.repeat_interleave(torch.arange(S, device=dev),
                                         dk.reference.host_index(lens, dev), output_size=T)
    img_pos = torch.arange(T, device=dev) + seg_of_row * L
    seg_l = torch.arange(S, device=dev) * L
    txt_pos = ((sel.cu_seqlens[1:].long() + seg_l)[:, None]
               + torch.arange(L, device=dev)[None]).reshape(-1)
    seg = sel.seg_sample
    J = T + S * L

    def joint(img, txt):  # [T, H, Dh], [B, L, H, Dh] -> [J, H, Dh]
        out = img.new_empty(J, *img.shape[1:])
        out = out.index_copy(0, img_pos, img)
        return out.index_copy(0, txt_pos, txt.index_select(0, seg).flatten(0, 1))

    jlens = tuple(n + L for n in lens)
    cu = (sel.cu_seqlens + torch.cat([seg_l.new_zeros(1), seg_l + L]).to(torch.int32))
    o = dk.varlen_attention(joint(q, tq), joint(k, tk), joint(v, tv), cu, cu, max(jlens),
                            max(jlens), uniform=len(set(jlens)) == 1, seqlens_q=jlens,
                            seqlens_k=jlens)
    o = o.reshape(J, -1).to(q.dtype)
    rows = sel.row_sample()
    a = attn.to_out[1](attn.to_out[0](o.index_select(0, img_pos)))
    attn_update = a * gate_msa.index_select(0, rows)
    if dual:  # SD3.5: self-attention of each segment's rows alone
        h2 = dk.gather_norm_modulate(x, sel, mods[6], mods[7], ln.weight, ln.bias, ln.eps)
        a2n = block.attn2
        q2 = _heads(a2n, a2n.to_q(h2), a2n.norm_q, H)
        k2 = _heads(a2n, a2n.to_k(h2), a2n.norm_k, H)
        v2 = _heads(a2n, a2n.to_v(h2), None, H)
        o2 = dk.varlen_attention(q2, k2, v2, sel.cu_seqlens, sel.cu_seqlens, sel.max_seqlen,
                                 sel.max_seqlen, uniform=sel.uniform, seqlens_q=sel.seqlens,
                                 seqlens_k=sel.seqlens)
        a2 = a2n.to_out[1](a2n.to_out[0](o2.reshape(T, -1).to(q2.dtype)))
        attn_update = attn_update + a2 * mods[8].index_select(0, rows)
    hid = dk.gather_rows(x, sel.indices) + attn_update
    n2 = block.norm2(hid) * (1 + scale_mlp.index_select(0, rows)) + \
        shift_mlp.index_select(0, rows)
    mlp_out = block.ff(n2)
    new_x = dk.scatter_back_selection(x, sel, attn_update, mlp_out, gate_mlp,
                                      scores=gate_scores,
                                      inplace=not torch.is_grad_enabled() and inplace_residual)
    if block.context_pre_only:
        return None, new_x
    # the text stream of each segment (it attended to that segment's rows)
    c_att = attn.to_add_out(o.index_select(0, txt_pos).view(S, L, -1))
    c_in = ctx.index_select(0, seg) + c_gate_msa.index_select(0, seg).unsqueeze(1) * c_att
    nc = block.norm2_context(c_in) * (1 + c_scale_mlp.index_select(0, seg).unsqueeze(1)) + \
        c_shift_mlp.index_select(0, seg).unsqueeze(1)
    c_out = c_in + c_gate_mlp.index_select(0, seg).unsqueeze(1) * block.ff_context(nc)
    if sel.segs_per_sample == 1:
        return c_out, new_x  # segments are sample-major: segment b is sample b
    upd = (c_out - ctx.index_select(0, seg)) * sel.seg_weight.to(ctx.dtype)[:, None, None]
    return ctx.index_add(0, seg, upd), new_x
