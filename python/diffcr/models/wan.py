"""Wan 2.1 / 2.2 video (``WanTransformer3DModel``): ``WanTransformerBlock`` in ``blocks``.

Routed: every video token of the block (self-attention with 3-D rotary embeddings,
cross-attention to the text, and to the image embedding of I2V models, which the model
concatenates into ``encoder_hidden_states`` before the blocks; FFN with ``scale_shift_table``
modulation and fp32 norms). Gathered with the tokens: the rotary rows of the kept positions,
and Wan 2.2 TI2V's **per-token** timestep embedding (``temb`` ``[B, N, 6, D]``); a ``temb``
whose N does not match the tokens is refused. The router gates ``ffn``.

Timesteps: the pipelines pass the scheduler's ``t`` in [0, 1000) (``T = 1000``, noise level
``t / T``). Wan 2.2 TI2V passes one timestep per token (``[B, N]``, the conditioning frame at
0); a sample's noise level is its largest. Wan 2.2 A14B pipelines hold two transformers
(``transformer``: high noise, ``transformer_2``: low noise): convert both, each gets its own
routers and ratios (:func:`diffcr.convert_pipeline`).

Paths: the fused forward (:func:`_fused_wan_block`, both training bins in one packed pass) for
T2V and I2V blocks with ``(cos, sin)`` rotary tables, with a per-sample ``temb`` (modulation
fused into the gather) or Wan 2.2 TI2V's per-token one (each kept row's shift, scale and gates
gathered with it); in I2V blocks the packed queries attend to their sample's text and image
K/V, as ``WanAttnProcessor`` (the last 512 context tokens are the text). The compat path for
fused QKV projections, other attention processors and rotary embeddings not given as
``(cos, sin)`` (``path="auto"`` picks per block and call).
"""
import torch

import diffcr_kernels as dk

from .base import ModelFamily
from .common import (cross_attention, rotate_interleaved, row_layout, rows_modulate, rows_times,
                     rows_self_attention, scatter_pieces, segment_groups, shared_rows)
from .registry import register_family

#: diffusers' ``WanAttnProcessor``: in an I2V block the last 512 tokens of
#: ``encoder_hidden_states`` are the text (the text encoder's context length, hardcoded there),
#: the tokens before them the image embedding
_TEXT_LEN = 512


def _split_image_context(block, context):
    """``(image, text)`` of an I2V block's ``encoder_hidden_states`` as ``WanAttnProcessor``
    splits them; ``(None, context)`` for a T2V block."""
    if block.attn2.add_k_proj is None:
        return None, context
    L = context.shape[1]
    if L < _TEXT_LEN:
        raise ValueError(f"diffcr: an image-to-video Wan block (attn2.add_k_proj) takes the "
                         f"image embedding followed by {_TEXT_LEN} text tokens in "
                         f"encoder_hidden_states, got {L} tokens (fewer than the "
                         f"{_TEXT_LEN} text tokens diffusers' WanAttnProcessor splits off)")
    return context[:, :L - _TEXT_LEN], context[:, L - _TEXT_LEN:]


def _gather_rows(t, tok, N):
    """Rows ``tok`` ``[G, k]`` of a table shared by the batch (leading dim 1) whose sequence
    dim is the first non-last dim of size N -> the same layout with ``[G, ..., k, ...]``."""
    d = next(i for i in range(1, t.dim() - 1) if t.shape[i] == N)
    rows = t.movedim(d, 1)[0][tok]  # [G, k, ...]
    return rows.movedim(1, d)


@register_family
class WanFamily(ModelFamily):
    name = "wan"
    model_classes = ("WanTransformer3DModel",)
    block_lists = ("blocks",)
    #: LoRA targets: self- and cross-attention (I2V's image K/V too) and the FFN
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj",
                    "ffn.net.0.proj", "ffn.net.2")

    def block_classes(self):
        from diffusers.models.transformers.transformer_wan import WanTransformerBlock

        return (WanTransformerBlock,)

    def hidden_size(self, block):
        return block.attn1.to_q.in_features

    def mlp_module(self, block):
        return block.ffn

    def timestep_of_call(self, model, args, kwargs):
        t = super().timestep_of_call(model, args, kwargs)
        if torch.is_tensor(t) and t.dim() == 2:  # Wan 2.2 TI2V: one timestep per token
            return t.amax(dim=1)
        return t

    has_fused = True

    def fused_unsupported_reason(self, block):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        for name in ("attn1", "attn2"):
            attn = getattr(block, name)
            if type(attn.processor) is not WanAttnProcessor:
                return f"{name} processor {type(attn.processor).__name__}"
            if getattr(attn, "fused_projections", False):
                return f"{name} has fused projections (call unfuse_qkv_projections())"
        return None

    def call_fused_reason(self, block, call):
        rope = call.get("rotary_emb")
        if not (isinstance(rope, (tuple, list)) and len(rope) == 2):
            return "rotary embeddings not given as (cos, sin)"
        return None

    def fused_forward(self, block, call, sel, gate_scores, *, inplace_residual=False):
        self._check_temb(call)
        return _fused_wan_block(block, call["hidden_states"], sel, gate_scores,
                                call["encoder_hidden_states"], call["temb"], call["rotary_emb"],
                                inplace_residual=inplace_residual)

    def _check_temb(self, call):
        temb, x = call.get("temb"), call["hidden_states"]
        if torch.is_tensor(temb) and temb.dim() == 4 and temb.shape[1] != x.shape[1]:
            raise ValueError(f"diffcr: a per-token temb has {temb.shape[1]} tokens but the block "
                             f"input has {x.shape[1]} (Wan 2.2 TI2V: temb [B, N, 6, D])")

    def gathered_call(self, block, call, samp, tok):
        self._check_temb(call)
        x = call["hidden_states"]
        B, N = x.shape[:2]
        out = super().gathered_call(block, {k: v for k, v in call.items()
                                            if k not in ("temb", "rotary_emb")}, samp, tok)
        temb = call.get("temb")
        if torch.is_tensor(temb) and temb.dim() == 4:  # per token: [B, N, 6, D]
            out["temb"] = temb[samp[:, None], tok]
        else:
            out["temb"] = temb if temb is None else temb[samp] if temb.shape[0] == B else temb
        rope = call.get("rotary_emb")
        if rope is not None:
            out["rotary_emb"] = (tuple(_gather_rows(r, tok, N) for r in rope)
                                 if isinstance(rope, (tuple, list)) else _gather_rows(rope, tok, N))
        return out

    def compat_forward(self, block, base_forward, call, sel, ks, gate, mlp_gate, *,
                       inplace_residual=False):
        self._check_temb(call)
        _split_image_context(block, call["encoder_hidden_states"])  # (refuses a short context)
        x = call["hidden_states"]
        N = x.shape[1]
        pieces = []
        for rows, idx, samp, _ in segment_groups(sel, ks, x.device):
            gcall = self.gathered_call(block, call, samp, idx - samp[:, None] * N)
            with mlp_gate.scaled(self.gate_scale(block, gate[rows], gcall)):
                out = base_forward(**gcall)
            pieces.append((rows, out - gcall["hidden_states"]))
        return scatter_pieces(x, sel, pieces, inplace_residual)


def _fused_wan_block(block, x, sel, gate_scores, context, temb, rope, *, inplace_residual=False):
    """One routed ``WanTransformerBlock`` over a packed selection (docs/method.md §7, as the
    PixArt block): gather + LayerNorm + modulate of the kept rows, one GEMM per projection for
    every segment (both training bins included), qk RMS-norm, the rotary rows of the kept
    positions, self-attention over each segment, cross-attention of each segment over its
    sample's text (and image, I2V), the FFN, and the gated scatter-back. ``temb``: ``[B, 6, D]``
    (one modulation per sample) or ``[B, N, 6, D]`` (Wan 2.2 TI2V, one per token: the kept
    rows' own). Returns the new ``[B, N, D]``."""
    B, N = x.shape[:2]
    T = sel.total
    dt = x.dtype
    norm1 = block.norm1
    per_token = temb.dim() == 4
    if per_token:
        # [B, N, 6, D] -> the kept rows' [T, 6, D] (flat rows b * N + n), then diffusers'
        # scale_shift_table + temb.float() on those rows: every modulation is per row
        mods = block.scale_shift_table + temb.reshape(B * N, *temb.shape[2:]).index_select(
            0, sel.indices).float()
        shift, scale, gate, c_shift, c_scale, c_gate = mods.unbind(1)  # [T, D], float32
        xp = dk.gather_rows(x, sel.indices)
        h = (norm1(xp.float()) * (1 + scale) + shift).type_as(x)  # as diffusers, per row
        rows_in, expand = sel, (lambda t: t)

        def mul(t, v):  # v is already one row per packed row
            return t * v

        def modulate(t, sc, sh):
            return t * (1 + sc) + sh
    else:
        mods = block.scale_shift_table + temb.float()  # [B, 6, D], float32 as diffusers
        shift, scale, gate, c_shift, c_scale, c_gate = mods.unbind(1)
        # training: each token of both bins normalised, projected and rotated once
        rows_in, expand = shared_rows(sel)
        h = dk.gather_norm_modulate(x, rows_in, shift.to(dt), scale.to(dt), norm1.weight,
                                    norm1.bias, norm1.eps)
        xp = None  # gathered after the self-attention
        # a sample's [B, D] vector broadcast over its rows, materialised per row only when
        # samples keep different numbers of rows (as the PixArt block)
        shape = row_layout(sel)

        def mul(t, v):
            return rows_times(t, v, sel, shape)

        def modulate(t, sc, sh):
            return rows_modulate(t, sc, sh, sel, shape)
    # 1. self-attention over each segment, with the rotary rows of the kept positions
    attn = block.attn1
    H = attn.heads
    q, k, v = attn.norm_q(attn.to_q(h)), attn.norm_k(attn.to_k(h)), attn.to_v(h)
    U = q.shape[0]
    Dh = q.shape[-1] // H
    q, k, v = q.view(U, H, Dh), k.view(U, H, Dh), v.view(U, H, Dh)
    pos = rows_in.indices % N
    cos, sin = (r.reshape(r.shape[1], -1)[pos] for r in rope)  # [U, Dh]
    q, k = rotate_interleaved(q, cos, sin), rotate_interleaved(k, cos, sin)  # as WanAttnProcessor
    o = rows_self_attention(q, k, v, sel, expand)
    a = attn.to_out[1](attn.to_out[0](o.reshape(T, H * Dh).type_as(q)))
    if xp is None:
        xp = dk.gather_rows(x, sel.indices)
    ga = mul(a, gate)  # [T, D], float32 as diffusers (the table is float32)
    attn_update = ga.type_as(x)
    hid = (xp.float() + ga).type_as(x)
    # 2. cross-attention of each segment over its sample's text (and its image, I2V)
    image, text = _split_image_context(block, context)
    n2 = block.norm2(hid.float()).type_as(hid)
    c = cross_attention(block.attn2, n2, sel, text, None, qk_norm=True, image_context=image)
    attn_update = attn_update + c
    hid = hid + c
    # 3. feed-forward on the modulated rows
    n3 = modulate(block.norm3(hid.float()), c_scale, c_shift).type_as(hid)
    mlp_out = block.ffn(n3)
    inplace = not torch.is_grad_enabled() and inplace_residual
    if per_token:
        # the per-row gate on the MLP output here; the scatter-back adds the router's factor
        mlp_out = (mlp_out.float() * c_gate).type_as(x)
        return dk.scatter_back_selection(x, sel, attn_update, mlp_out, None, scores=gate_scores,
                                         inplace=inplace)
    return dk.scatter_back_selection(x, sel, attn_update, mlp_out, c_gate.to(dt),
                                     scores=gate_scores, inplace=inplace)
