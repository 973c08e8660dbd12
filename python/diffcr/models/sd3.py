"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``): MMDiT ``JointTransformerBlock`` in
``transformer_blocks``.

Routed: the image tokens (``hidden_states``); the text stream (``encoder_hidden_states``) is
never routed. Joint attention of a routed block runs over [every text token; the kept image
tokens], which is the block's own diffusers forward called on the gathered image tokens, so
the compat path covers SD3.5's dual attention (``attn2`` over the kept image tokens), qk-norm
and the last block's ``context_pre_only``. Positions are embedded before the blocks: nothing
positional is gathered. The router gates the image feed-forward (``ff``) only; the text
feed-forward (``ff_context``) is dense.

Text stream of a routed block: its update depends on which image tokens it attended to, so in
training (two bins per sample) the text update is the bin-weighted sum of the two calls'
updates, like the image tokens' (``ctx + w_a * d_a + w_b * d_b``); with one segment per
sample (eval, frozen) it is the call's text output itself.

Timesteps: the flow-matching pipeline passes ``sigma * 1000`` (1000 = pure noise), so the
noise level is ``t / T`` with ``T = 1000``, as for the DDPM families. There is no fused path
yet: ``path="auto"`` runs compat, ``path="fused"`` is refused.
"""
import torch

import diffcr_kernels as dk

from . import ModelFamily, register_family
from ._basic_block import _take, packed_rows, segment_groups


@register_family
class SD3Family(ModelFamily):
    name = "sd3"
    model_classes = ("SD3Transformer2DModel",)
    block_lists = ("transformer_blocks",)

    def block_classes(self):
        from diffusers.models.attention import JointTransformerBlock

        return (JointTransformerBlock,)

    def check_block(self, name, block):
        super().check_block(name, block)
        if getattr(block, "_chunk_size", None) is not None:
            raise ValueError(f"diffcr: {name} uses feed-forward chunking; call "
                             "model.disable_forward_chunking() before converting")

    def hidden_size(self, block):
        return block.attn.to_q.in_features

    def hidden_states_of(self, output):
        return output[1]  # (encoder_hidden_states, hidden_states)

    def fused_unsupported_reason(self, block):
        return "no fused forward for JointTransformerBlock yet (the compat path runs)"

    def call_fused_reason(self, block, call):
        return self.fused_unsupported_reason(block)

    def compat_forward(self, block, base_forward, call, sel, ks, gate, mlp_gate, *,
                       inplace_residual=False):
        x = call["hidden_states"]
        ctx = call["encoder_hidden_states"]
        args = {k: v for k, v in call.items() if k != "hidden_states"}
        B, N, D = x.shape
        P = sel.segs_per_sample
        pieces, text = [], []
        xf = x.reshape(B * N, D)  # one view: its gradient is accumulated in one place
        for rows, idx, samp, segs in segment_groups(sel, ks, x.device):
            xg = xf[idx]  # [G, k, D]
            gargs = {name: _take(v, samp, B) for name, v in args.items()}
            with mlp_gate.scaled(gate[rows].unsqueeze(-1)):
                ctx_out, out = base_forward(hidden_states=xg, **gargs)
            pieces.append((rows, out - xg))
            text.append((segs, samp, ctx_out))
        delta = packed_rows(pieces, sel.total, x)
        new_x = dk.scatter_back_selection(x, sel, delta, use_scores=False,
                                          inplace=inplace_residual)
        if text[0][2] is None:  # context_pre_only: the last block returns no text
            return None, new_x
        if P == 1:  # one call per sample: its text output is the block's
            new_ctx = torch.empty_like(ctx)
            for segs, samp, ctx_out in text:
                new_ctx = new_ctx.index_copy(0, samp, ctx_out)
            return new_ctx, new_x
        new_ctx = ctx
        w = sel.seg_weight
        for segs, samp, ctx_out in text:
            seg = torch.tensor(segs, device=x.device)
            upd = (ctx_out - ctx.index_select(0, samp)) * w.index_select(0, seg).to(
                ctx.dtype)[:, None, None]
            new_ctx = new_ctx.index_add(0, samp, upd)
        return new_ctx, new_x
