"""diffusers ``BasicTransformerBlock`` (PixArt-α/Σ, DiT): the compat path over gathered tokens
and DiffCR's fused forward over the packed layout, using the block's existing parameters.

Fused forward, per routed block (docs/method.md §7):

1. adaLN modulation vectors of every sample (PixArt: ``scale_shift_table + t_emb``; DiT: the
   block's ``norm1.emb`` + ``norm1.linear``), ``[B, D]`` each, broadcast per sample (expanded
   per row only when samples keep different numbers of rows);
2. ``gather_norm_modulate``: packed rows ``LN(x[idx]) * (1 + scale) + shift`` in one pass;
   with the two training bins, once per token of each sample's larger bin (the smaller bin's
   tokens are a subset: :func:`.common.shared_rows`), and so the Q/K/V projections below;
3. one GEMM per projection for all segments of all samples (both training bins included),
   self-attention over the segments (:func:`diffcr_kernels.selection_attention`: batched SDPA when
   uniform, FlashAttention varlen on GPU, split-view SDPA per slot or per group otherwise),
   cross-attention of each segment's queries over its sample's text with the text mask as
   diffusers applies it;
4. the MLP on the packed rows (without autograd: GELU and the residual updates in place, on
   buffers this path made);
5. ``scatter_back``: ``out[idx] = x[idx] + w_seg * (attn_update + s * g_mlp * mlp_out)`` with
   the router score gating the MLP branch only, the two-bin weights, and the residual add fused.

The compat path (the block's own diffusers forward on gathered tokens, one call per group of
segments with equal k) stays available for verification; the two are tested equal
(``tests/models/test_family_conformance.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

import diffcr_kernels as dk

from ..modules import MlpGate
from .base import ModelFamily, take_samples
from .common import cross_attention, rows_self_attention, scatter_pieces, segment_groups
from .common import shared_rows
from .common import apply_layout as _apply, per_row as _per_row, row_layout as _row_layout

__all__ = ["BasicBlockFamily", "fused_unsupported_reason", "fused_block_forward"]

SUPPORTED_NORMS = ("ada_norm_single", "ada_norm_zero")


def _plain_attention(attn) -> Optional[str]:
    """None if ``attn`` is a plain diffusers Attention the fused path reproduces, else why not."""
    if attn is None:
        return None
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    proc = getattr(attn, "processor", None)
    if type(proc) not in (AttnProcessor2_0, AttnProcessor):
        return f"attention processor {type(proc).__name__}"
    for name in ("spatial_norm", "group_norm", "norm_q", "norm_k", "norm_cross"):
        if getattr(attn, name, None) not in (None, False):
            return f"attention with {name}"
    if getattr(attn, "residual_connection", False) or getattr(attn, "rescale_output_factor",
                                                              1.0) != 1.0:
        return "attention with residual connection / output rescale"
    return None


def fused_unsupported_reason(block) -> Optional[str]:
    """None when the fused path can run ``block`` exactly; otherwise the reason it cannot."""
    if block.norm_type not in SUPPORTED_NORMS:
        return f"norm_type {block.norm_type}"
    if getattr(block, "pos_embed", None) is not None:
        return "block positional embedding"
    if getattr(block, "only_cross_attention", False):
        return "only_cross_attention"
    if getattr(block, "fuser", None) is not None:
        return "GLIGEN fuser"
    for attn in (block.attn1, getattr(block, "attn2", None)):
        why = _plain_attention(attn)
        if why:
            return why
    if getattr(block, "_chunk_size", None) is not None:
        return "feed-forward chunking"
    return None


def _modulation(block, x, timestep, class_labels):
    """(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each [B, D]."""
    B = x.shape[0]
    if block.norm_type == "ada_norm_single":
        mods = block.scale_shift_table[None] + timestep.reshape(B, 6, -1)
        return mods.unbind(1)
    emb = block.norm1.emb(timestep, class_labels, hidden_dtype=x.dtype)
    emb = block.norm1.linear(block.norm1.silu(emb))
    return emb.chunk(6, dim=1)


def _ln_params(norm):
    return norm.weight, norm.bias, norm.eps


def _self_attention(attn, h, sel, expand):
    """Self-attention of each segment; ``h`` holds the rows that :func:`shared_rows` computes
    once, ``expand`` copies the projections to every packed row of ``sel``."""
    T = sel.total
    q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
    H = attn.heads
    U, Dh = q.shape[0], k.shape[-1] // H
    o = rows_self_attention(q.view(U, H, Dh), k.view(U, H, Dh), v.view(U, H, Dh), sel, expand)
    o = o.reshape(T, H * Dh).to(q.dtype)
    return attn.to_out[1](attn.to_out[0](o))


def _plain_gelu_ff(ff) -> bool:
    """Whether ``ff`` is diffusers' FeedForward with a GELU first layer and no hooks other than
    diffcr's (inactive) gate, so :func:`_feed_forward` may run it step by step."""
    from diffusers.models.activations import GELU

    net = getattr(ff, "net", None)
    if net is None or len(net) < 3 or type(net[0]) is not GELU or ff._forward_pre_hooks:
        return False
    if any(not isinstance(h, MlpGate) or h.scale is not None
           for h in ff._forward_hooks.values()):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in net)


def _feed_forward(ff, h, inplace):
    """``ff(h)``; at inference the GELU is applied in place on the projection's output, which
    saves one ``[T, 4D]`` buffer (on CPU each buffer above 32 MB is a fresh mmap whose pages
    fault in on first touch: at B = 8 that allocation cost more than the GELU itself)."""
    if not (inplace and _plain_gelu_ff(ff)):
        return ff(h)
    act = ff.net[0]
    y = act.proj(h)
    if y.device.type == "mps":
        y = act.gelu(y)
    else:
        torch.ops.aten.gelu_(y, approximate=act.approximate)
    for m in ff.net[1:]:
        y = m(y)
    return y


def fused_block_forward(block, x, sel, gate_scores, encoder_hidden_states,
                        encoder_attention_mask, timestep, class_labels, *,
                        inplace_residual=False):
    """One routed block over a packed :class:`~diffcr_kernels.Selection` (any number of
    segments per sample, ragged lengths). ``gate_scores`` ``[T]`` multiply the MLP branch of
    each packed row. Returns the new residual stream ``[B, N, D]``.

    Without autograd the intermediate updates are done in place on buffers this function
    made (never on ``x`` or any other input): fewer large allocations, same values. With
    ``inplace_residual`` (only without autograd, x contiguous: the caller checks) the final
    scatter-back writes into ``x`` itself and returns it."""
    B, N, D = x.shape
    inplace = not torch.is_grad_enabled()
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(
        block, x, timestep, class_labels)
    idx = sel.indices
    norm1 = block.norm1 if block.norm_type == "ada_norm_single" else block.norm1.norm
    w1, b1, eps1 = _ln_params(norm1)
    rows_in, expand = shared_rows(sel)  # training: each token of both bins normalised once
    h_in = dk.gather_norm_modulate(x, rows_in, shift_msa, scale_msa, w1, b1, eps1)
    xp = dk.gather_rows(x, idx)
    a = _self_attention(block.attn1, h_in, sel, expand)
    shape = _row_layout(sel)
    g = _per_row(gate_msa, sel, shape)
    if inplace:  # a, xp, c, n2 below are fresh outputs of this function's own calls
        attn_update = _apply(a, shape).mul_(g).reshape(-1, D)
        h = xp.add_(attn_update)
    else:
        attn_update = (_apply(a, shape) * g).reshape(-1, D)
        h = xp + attn_update
    if getattr(block, "attn2", None) is not None:
        if block.norm_type == "ada_norm_single":
            cross_in = h  # PixArt applies no norm before cross-attention
        else:
            cross_in = block.norm2(h)
        c = cross_attention(block.attn2, cross_in, sel, encoder_hidden_states,
                            encoder_attention_mask)
        if inplace:
            attn_update.add_(c)
            h.add_(c)
        else:
            attn_update = attn_update + c
            h = h + c
    norm2 = block.norm2 if block.norm_type == "ada_norm_single" else block.norm3
    w2, b2, eps2 = _ln_params(norm2)
    sc = _per_row(scale_mlp, sel, shape)
    sh = _per_row(shift_mlp, sel, shape)
    n2 = F.layer_norm(_apply(h, shape), (D,), w2, b2, eps2)
    if inplace:
        n2 = n2.mul_(1 + sc).add_(sh).reshape(-1, D)
    else:
        n2 = (n2 * (1 + sc) + sh).reshape(-1, D)
    mlp_out = _feed_forward(block.ff, n2, inplace)
    return dk.scatter_back_selection(x, sel, attn_update, mlp_out, gate_mlp, scores=gate_scores,
                                     inplace=inplace and inplace_residual)


# ---------------------------------------------------------------------- compat path helpers
def _take_token_mask(mask, samp, tok, B, N):
    """Self-attention mask ``[B, 1, N]`` / ``[B, N]`` -> the selected keys of each segment."""
    m = mask[samp] if mask.shape[0] == B else mask.expand(samp.numel(), *mask.shape[1:])
    if m.shape[-1] != N:
        raise ValueError(f"diffcr: self-attention mask has {m.shape[-1]} keys for {N} tokens")
    if m.dim() == 3:
        return torch.gather(m, 2, tok.unsqueeze(1).expand(-1, m.shape[1], -1))
    return torch.gather(m, 1, tok)


class BasicBlockFamily(ModelFamily):
    """Families whose routable blocks are diffusers ``BasicTransformerBlock`` with adaLN
    (``ada_norm_single``: PixArt; ``ada_norm_zero``: DiT). Per-token side input: the
    self-attention mask (its keys are gathered with the tokens); per-sample inputs (text,
    text mask, timestep embedding, class labels) follow each segment's sample."""

    def block_classes(self):
        from diffusers.models.attention import BasicTransformerBlock

        return (BasicTransformerBlock,)

    def check_block(self, name, block):
        super().check_block(name, block)
        if block.norm_type not in SUPPORTED_NORMS:
            raise TypeError(f"diffcr: {name} uses norm_type {block.norm_type!r}; supported: "
                            f"{SUPPORTED_NORMS}")

    def hidden_size(self, block):
        return block.attn1.to_q.in_features

    def fused_unsupported_reason(self, block):
        return fused_unsupported_reason(block)

    def gathered_call(self, block, call, samp, tok):
        out = super().gathered_call(block, call, samp, tok)
        mask = call.get("attention_mask")
        if mask is not None:
            x = call["hidden_states"]
            out["attention_mask"] = _take_token_mask(mask, samp, tok, x.shape[0], x.shape[1])
        return out

    def call_fused_reason(self, block, call):
        if call.get("attention_mask") is not None:
            return "a self-attention mask"
        if call.get("cross_attention_kwargs"):
            return f"cross_attention_kwargs {sorted(call['cross_attention_kwargs'])}"
        return None

    def fused_forward(self, block, call, sel, gate_scores, *, inplace_residual=False):
        return fused_block_forward(block, call["hidden_states"], sel, gate_scores,
                                   call.get("encoder_hidden_states"),
                                   call.get("encoder_attention_mask"), call.get("timestep"),
                                   call.get("class_labels"), inplace_residual=inplace_residual)

    has_fused = True

    def compat_forward(self, block, base_forward, call, sel, ks, gate, mlp_gate, *,
                       inplace_residual=False):
        x = call["hidden_states"]
        attention_mask = call.get("attention_mask")
        args = {k: v for k, v in call.items() if k not in ("hidden_states", "attention_mask")}
        B, N, D = x.shape
        pieces = []
        xf = x.reshape(B * N, D)  # one view: its gradient is accumulated in one place
        for rows, idx, samp, _ in segment_groups(sel, ks, x.device):
            xg = xf[idx]  # [G, k, D]
            gargs = {name: take_samples(v, samp, B) for name, v in args.items()}
            mask_g = None
            if attention_mask is not None:
                mask_g = _take_token_mask(attention_mask, samp, idx % N, B, N)
            with mlp_gate.scaled(gate[rows].unsqueeze(-1)):
                out = base_forward(xg, mask_g, **gargs)
            pieces.append((rows, out - xg))
        return scatter_pieces(x, sel, pieces, inplace_residual)
