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
import torch

import diffcr_kernels as dk

from . import ModelFamily
from ._basic_block import packed_rows, segment_groups


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

    def _streams(self, output):
        """``(text, image)`` of a block's output."""
        return (output[1], output[0]) if self.image_first else (output[0], output[1])

    def _output(self, ctx, x):
        return (x, ctx) if self.image_first else (ctx, x)

    def fused_unsupported_reason(self, block):
        return f"no fused forward for {type(block).__mro__[0].__name__} yet (compat runs)"

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
        delta = packed_rows(pieces, sel.total, x)
        new_x = dk.scatter_back_selection(x, sel, delta, use_scores=False,
                                          inplace=inplace_residual)
        if text[0][2] is None:  # context_pre_only: the last SD3 block returns no text
            return self._output(None, new_x)
        if sel.segs_per_sample == 1:  # one call per sample: its text output is the block's
            new_ctx = torch.empty_like(ctx)
            for segs, samp, ctx_out in text:
                new_ctx = new_ctx.index_copy(0, samp, ctx_out)
            return self._output(new_ctx, new_x)
        new_ctx = ctx
        w = sel.seg_weight
        for segs, samp, ctx_out in text:
            seg = torch.tensor(segs, device=x.device)
            upd = (ctx_out - ctx.index_select(0, samp)) * w.index_select(0, seg).to(
                ctx.dtype)[:, None, None]
            new_ctx = new_ctx.index_add(0, samp, upd)
        return self._output(new_ctx, new_x)


def shared_positions(tok, family):
    """The kept positions ``tok[0]`` when every gathered sample keeps the same ones (a rotary
    table shared by the batch can then be gathered once); ValueError otherwise."""
    if tok.shape[0] > 1 and not bool((tok == tok[:1]).all()):
        raise ValueError(f"diffcr: {family} rotary rows differ between the gathered samples; "
                         "gather one sample at a time")
    return tok[0]
