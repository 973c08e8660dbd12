"""Flux.1 (``FluxTransformer2DModel``): double-stream ``FluxTransformerBlock`` in
``transformer_blocks`` and single-stream ``FluxSingleTransformerBlock`` in
``single_transformer_blocks`` (the routed-block numbering runs through both lists, double
blocks first).

Routed: the image tokens (``hidden_states``) of both kinds; the text tokens are never routed.
A routed call runs the block's own diffusers forward on [every text token; the kept image
tokens] with the rotary rows of exactly those positions (the model's rotary table is
``[text; image]``), one call per segment since each segment keeps other positions; the
text-stream update follows :mod:`._joint`. The router gates the image MLP branch only: the
double block's ``ff``; in the single block the image rows of the MLP activation
(``act_mlp``) that enters the fused output projection.

Timesteps: the Flux pipelines pass ``t / 1000`` in [0, 1] (the model multiplies by 1000), which
is already the noise level.

Paths: fused forwards for both block kinds over the packed joint layout
``[segment rows; its sample's text]`` (:class:`._joint.JointLayout`), every segment in one
varlen call, with the rotary rows of exactly those positions: the double block through
:func:`._joint.fused_double_stream_block`, the single block through
:func:`_fused_flux_single_block` (its fused output projection is split into the attention and
MLP columns so that the router gates the image MLP part alone; a ``proj_out`` whose weight
cannot be cut, quantized or a peft LoRA layer, is called as a module on ``[attention; router
gate x MLP]`` instead). Blocks with other attention processors or fused QKV projections, and
calls with ``joint_attention_kwargs`` (IP-Adapter), run compat.
"""
import torch

import diffcr_kernels as dk

from ._joint import (JointFamily, JointLayout, fused_double_stream_block, heads,
                     shared_positions, text_stream_out)
from .common import plain_weight, rotate_interleaved
from .registry import register_family


@register_family
class FluxFamily(JointFamily):
    name = "flux"
    model_classes = ("FluxTransformer2DModel",)
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    per_segment_calls = True  # the rotary table [text; image] has no batch dim
    #: LoRA targets: attention of both streams, both feed-forwards, the single block's MLP
    #: input (its fused output projection shares the model's ``proj_out`` name: not adapted)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                    "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2", "proj_mlp")

    def block_classes(self):
        from diffusers.models.transformers.transformer_flux import (FluxSingleTransformerBlock,
                                                                    FluxTransformerBlock)

        return (FluxTransformerBlock, FluxSingleTransformerBlock)

    def _single(self, block):
        return hasattr(block, "proj_mlp")

    def mlp_module(self, block):
        return block.act_mlp if self._single(block) else block.ff

    def noise_level(self, t, config):
        return float(t)

    def gate_scale(self, block, gate_rows, call):
        scale = gate_rows.unsqueeze(-1)  # [G, k, 1]
        if self._single(block):  # act_mlp sees [text; image] rows: text ungated
            L = call["encoder_hidden_states"].shape[1]
            scale = torch.cat([scale.new_ones(scale.shape[0], L, 1), scale], 1)
        return scale

    def gathered_call(self, block, call, samp, tok):
        out = super().gathered_call(block, call, samp, tok)
        rope = call.get("image_rotary_emb")
        if rope is not None:
            L = call["encoder_hidden_states"].shape[1]
            rows = torch.cat([torch.arange(L, device=tok.device),
                              L + shared_positions(tok, "Flux")])
            out["image_rotary_emb"] = tuple(r.index_select(0, rows) for r in rope)
        return out

    has_fused = True

    def fused_unsupported_reason(self, block):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        attn = block.attn
        if type(attn.processor) is not FluxAttnProcessor:
            return f"attn processor {type(attn.processor).__name__}"
        if getattr(attn, "fused_projections", False):
            return "fused QKV projections (fuse_projections)"
        # (a proj_out that is not a plain linear, e.g. quantized or a peft LoRA layer, is run as
        # a module by the single block's fused forward: common.plain_weight)
        return None

    def call_fused_reason(self, block, call):
        if call.get("joint_attention_kwargs"):
            return f"joint_attention_kwargs {sorted(call['joint_attention_kwargs'])}"
        rope = call.get("image_rotary_emb")
        if rope is None or not (isinstance(rope, (tuple, list)) and len(rope) == 2):
            return "rotary embeddings not given as (cos, sin)"
        return self.fused_unsupported_reason(block)

    def fused_forward(self, block, call, sel, gate_scores, *, inplace_residual=False):
        fn = _fused_flux_single_block if self._single(block) else fused_double_stream_block
        return fn(block, call["hidden_states"], sel, gate_scores, call["encoder_hidden_states"],
                  call["temb"], tuple(call["image_rotary_emb"]),
                  inplace_residual=inplace_residual)


def _fused_flux_single_block(block, x, sel, gate_scores, ctx, temb, rope, *,
                             inplace_residual=False):
    """One routed ``FluxSingleTransformerBlock`` over a packed selection.

    The kept image rows are gathered, normalised and modulated in one pass; the text rows are
    normalised once per sample. Attention (qk RMS-norm, the rotary rows of exactly the kept
    positions and of the text) runs over ``[segment rows; its sample's text]`` for every
    segment in one varlen call. The output projection ``proj_out`` over ``[attention; MLP]``
    is split by columns: the attention part (with the bias) is the image rows' attention
    update, the MLP part their router-gated MLP output, both scaled by the block's gate in the
    scatter-back. The text rows take the whole projection (ungated by the router), per
    segment, combined as :func:`._joint.text_stream_out`. Returns ``(text, image)``."""
    B, N, D = x.shape
    L = ctx.shape[1]
    norm = block.norm
    shift, scale, gate = norm.linear(norm.silu(temb)).chunk(3, dim=1)
    ln = norm.norm
    h = dk.gather_norm_modulate(x, sel, shift, scale, ln.weight, ln.bias, ln.eps)  # [T, D]
    nctx = ln(ctx) * (1 + scale[:, None]) + shift[:, None]  # [B, L, D]
    attn = block.attn
    H = attn.heads
    lay = JointLayout(sel, L)
    pos = sel.indices % N
    cos, sin = (lay.pack(r.index_select(0, L + pos), r[:L]) for r in rope)  # [J, Dh]
    f32 = torch.float32  # the rotary embedding as Flux's apply_rotary_emb computes it
    q = rotate_interleaved(lay.pack(heads(attn.to_q(h), attn.norm_q, H),
                                    heads(attn.to_q(nctx), attn.norm_q, H)), cos, sin, f32)
    k = rotate_interleaved(lay.pack(heads(attn.to_k(h), attn.norm_k, H),
                                    heads(attn.to_k(nctx), attn.norm_k, H)), cos, sin, f32)
    v = lay.pack(heads(attn.to_v(h), None, H), heads(attn.to_v(nctx), None, H))
    o = lay.attention(q, k, v).reshape(lay.J, -1).to(q.dtype)  # [J, D]
    rows = sel.row_sample()
    g_rows = gate.index_select(0, rows)
    inplace = not torch.is_grad_enabled() and inplace_residual
    act = block.act_mlp(block.proj_mlp(h))  # [T, Dm]
    if plain_weight(block.proj_out):
        W, bias = block.proj_out.weight, block.proj_out.bias
        if W.dtype != o.dtype:  # stored in another dtype (layerwise casting): cast as its hook does
            W = W.to(o.dtype)
            bias = None if bias is None else bias.to(o.dtype)
        Wa, Wm = W[:, :D], W[:, D:]
        attn_update = torch.nn.functional.linear(lay.image(o), Wa, bias) * g_rows  # [T, D]
        mlp_out = torch.nn.functional.linear(act, Wm)  # [T, D]
        new_x = dk.scatter_back_selection(x, sel, attn_update, mlp_out, gate, scores=gate_scores,
                                          inplace=inplace)
    else:
        # a quantized or wrapped proj_out (bitsandbytes, torchao, GGUF, ...): its weight cannot
        # be cut by columns, so the module computes the whole projection; the router gate
        # multiplies the MLP half before it (the projection is linear: the same value)
        upd = block.proj_out(torch.cat([lay.image(o), act * gate_scores.to(act.dtype)[:, None]],
                                       dim=-1)) * g_rows  # [T, D]
        new_x = dk.scatter_back_selection(x, sel, upd, use_scores=False, inplace=inplace)
    seg = lay.seg
    mlp_txt = block.act_mlp(block.proj_mlp(nctx)).index_select(0, seg)  # [S, L, Dm]
    c_upd = block.proj_out(torch.cat([lay.text(o), mlp_txt], dim=-1))
    c_out = ctx.index_select(0, seg) + gate.index_select(0, seg).unsqueeze(1) * c_upd
    if c_out.dtype == torch.float16:
        c_out = c_out.clip(-65504, 65504)
    return text_stream_out(ctx, c_out, lay, sel), new_x
