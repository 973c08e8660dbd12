"""Qwen-Image (``QwenImageTransformer2DModel``): double-stream ``QwenImageTransformerBlock`` in
``transformer_blocks``.

Routed: the image tokens (``hidden_states``, including the condition-image tokens that the
edit models append); the text stream stays dense and attends to the kept image tokens
(:mod:`._joint`). A routed call runs the block's own diffusers forward on [every text token;
the kept image tokens] with the image rotary rows of exactly those positions (the model's
image rotary table ``[N, head_dim / 2]`` has no batch dim, so one call per segment) and the
text rotary rows unchanged. Gathered with the tokens as well: the edit models' per-token
``modulate_index`` (``zero_cond_t``: 0 for the target image, 1 for condition images), whose
doubled ``temb`` (``[2B, D]``: the timestep's and a zero timestep's) is selected per half. The
text padding mask (``encoder_hidden_states_mask``) is per sample and selected with it. The
router gates the image feed-forward (``img_mlp``); ``txt_mlp`` is dense.

Timesteps: the pipelines pass ``t / 1000`` in [0, 1] (flow matching: the sigma), which is the
noise level.

Paths: the fused forward (:func:`fused_qwenimage_block`, both training bins in one packed pass)
over the joint layout ``[segment rows; its sample's text]`` (:class:`._joint.JointLayout`):
the kept rows gathered, normalised and modulated in one pass (per token with
``modulate_index``), one GEMM per projection, the complex rotary rows of exactly the kept
positions, the text padding mask as a key mask (as the installed diffusers applies it:
diffusers 0.35-0.36 ignore ``encoder_hidden_states_mask`` in the attention, 0.37-0.41 pass the
model's joint mask ``[B, L + N]`` in ``joint_attention_kwargs["attention_mask"]``, 0.42 builds
it from ``encoder_hidden_states_mask`` in the processor), and the gated scatter-back. Blocks with another attention processor or fused projections, and calls
with ``joint_attention_kwargs``, run compat.
"""
import torch

import diffcr_kernels as dk

from ._joint import (JointFamily, JointLayout, Rotary, fused_joint_attention, heads,
                     shared_positions, text_stream_update)
from .base import take_samples
from .common import row_layout, rows_modulate, rows_times, shared_rows
from .registry import register_family


@register_family
class QwenImageFamily(JointFamily):
    name = "qwenimage"
    model_classes = ("QwenImageTransformer2DModel",)
    block_lists = ("transformer_blocks",)
    per_segment_calls = True  # the image rotary table has no batch dim
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                    "to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                    "txt_mlp.net.2")

    def block_classes(self):
        from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

        return (QwenImageTransformerBlock,)

    def lora_targets_of(self, block, last=False):
        if last:  # the model reads only the image stream after the last block
            dead = ("add_q_proj", "to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")
            return tuple(t for t in self.lora_targets if t not in dead)
        return self.lora_targets

    def mlp_module(self, block):
        return block.img_mlp

    def noise_level(self, t, config):
        return float(t)

    def gathered_call(self, block, call, samp, tok):
        x = call["hidden_states"]
        B, N = x.shape[:2]
        special = ("temb", "modulate_index", "image_rotary_emb")
        out = super().gathered_call(block, {k: v for k, v in call.items() if k not in special},
                                    samp, tok)
        temb = call.get("temb")
        if getattr(block, "zero_cond_t", False) and torch.is_tensor(temb) \
                and temb.shape[0] == 2 * B:  # [temb(t); temb(0)]: keep the halves' order
            out["temb"] = torch.cat([temb[samp], temb[B + samp]])
        else:
            out["temb"] = take_samples(temb, samp, B)
        if "modulate_index" in call:
            index = call["modulate_index"]
            if torch.is_tensor(index):
                if index.shape[-1] != N:
                    raise ValueError(f"diffcr: modulate_index has {index.shape[-1]} tokens but "
                                     f"the block input has {N}")
                index = index.expand(B, N)[samp[:, None], tok]
            out["modulate_index"] = index
        jak = call.get("joint_attention_kwargs") or {}
        joint = jak.get("attention_mask")
        if torch.is_tensor(joint) and joint.dim() == 2:  # diffusers 0.37-0.41: [B, L + N]
            L = call["encoder_hidden_states"].shape[1]
            if joint.shape[-1] != L + N:
                raise ValueError(f"diffcr: the joint attention mask has {joint.shape[-1]} "
                                 f"columns but the block has {L} text + {N} image tokens")
            cols = torch.cat([torch.arange(L, device=tok.device),
                              L + shared_positions(tok, "Qwen-Image")])
            out["joint_attention_kwargs"] = dict(
                jak, attention_mask=take_samples(joint, samp, B).index_select(-1, cols))
        rope = call.get("image_rotary_emb")
        if rope is not None:
            img, txt = rope
            if img.shape[0] != N:
                raise ValueError(f"diffcr: the image rotary table has {img.shape[0]} rows but "
                                 f"the block input has {N} image tokens")
            out["image_rotary_emb"] = (img.index_select(0, shared_positions(tok, "Qwen-Image")),
                                       txt)
        else:
            out["image_rotary_emb"] = None
        return out

    has_fused = True

    fused_processor = ("diffusers.models.transformers.transformer_qwenimage",
                       "QwenDoubleStreamAttnProcessor2_0")

    def call_fused_reason(self, block, call):
        jak = dict(call.get("joint_attention_kwargs") or {})
        joint_mask = jak.pop("attention_mask", None)
        if jak:
            return f"joint_attention_kwargs {sorted(jak)}"
        if joint_mask is not None and not (torch.is_tensor(joint_mask) and joint_mask.dim() == 2):
            return "an attention mask that is not the model's joint key mask [B, L + N]"
        if joint_mask is not None and joint_mask.is_floating_point():  # additive biases
            return "a float (additive) attention mask"
        rope = call.get("image_rotary_emb")
        if not (isinstance(rope, (tuple, list)) and len(rope) == 2
                and all(torch.is_tensor(r) and r.is_complex() for r in rope)):
            return "rotary embeddings not given as complex (image, text) tables"
        index = call.get("modulate_index")
        if index is not None and not torch.is_tensor(index):
            return "modulate_index not given as a tensor"
        return self.fused_unsupported_reason(block)

    def fused_forward(self, block, call, sel, gate_scores, *, inplace_residual=False):
        x, ctx = call["hidden_states"], call["encoder_hidden_states"]
        img_valid, txt_valid = self._key_mask(block, call, sel.indices, x.shape[1], ctx.shape[1])
        return fused_qwenimage_block(
            block, x, sel, gate_scores, ctx, call["temb"], call["image_rotary_emb"],
            call.get("modulate_index"), img_valid=img_valid, txt_valid=txt_valid,
            inplace_residual=inplace_residual)

    def _key_mask(self, block, call, indices, N, L):
        """``(img_valid [T] or None, txt_valid [B, L] or None)``: the keys the block's own
        attention masks, read where the installed diffusers passes them."""
        joint = (call.get("joint_attention_kwargs") or {}).get("attention_mask")
        if joint is not None:  # diffusers 0.37-0.41: [B, L + N], text columns first
            if joint.shape[-1] != L + N:
                raise ValueError(f"diffcr: the joint attention mask has {joint.shape[-1]} "
                                 f"columns but the block has {L} text + {N} image tokens")
            joint = joint.bool().expand(call["hidden_states"].shape[0], L + N)
            return joint[:, L:].reshape(-1).index_select(0, indices), joint[:, :L]
        mask = call.get("encoder_hidden_states_mask")
        if mask is None or not _reads(type(block.attn.processor).__call__,
                                      "encoder_hidden_states_mask"):
            return None, None  # (diffusers 0.35-0.36: the processor ignores the mask)
        return None, mask.bool()


def _reads(fn, name) -> bool:
    """Whether the code of ``fn`` reads its local ``name`` (a processor that takes an argument
    and ignores it, as diffusers 0.35's Qwen-Image processor does the text mask)."""
    import dis

    key = (fn, name)
    hit = _READS.get(key)
    if hit is None:
        hit = _READS[key] = any(
            ins.opname.startswith("LOAD_FAST") and (
                ins.argval == name or (isinstance(ins.argval, tuple) and name in ins.argval))
            for ins in dis.get_instructions(fn))
    return hit


_READS = {}


def fused_qwenimage_block(block, x, sel, gate_scores, ctx, temb, rope, modulate_index=None, *,
                          img_valid=None, txt_valid=None, inplace_residual=False):
    """One routed ``QwenImageTransformerBlock`` over a packed selection (docs/method.md §7).

    x ``[B, N, D]``; ctx ``[B, L, D]`` (the text stream); ``img_valid`` bool ``[T]`` /
    ``txt_valid`` bool ``[B, L]``: the key mask of the packed image rows and of each sample's
    text (None: every key valid); temb ``[B, D]``, or ``[2B, D]`` with ``modulate_index``
    ``[B, N]`` or ``[1, N]`` (edit models, ``zero_cond_t``: rows of index 1 are modulated by
    the second half); rope ``(img_freqs [N, Dh / 2], txt_freqs [L, Dh / 2])`` complex.

    The image rows of every segment are gathered, normalised and modulated in one pass and
    projected with one GEMM per projection; the text stream is normalised, modulated and
    projected once per sample. Joint attention runs over ``[segment rows; its sample's text]``
    for every segment (both training bins included) with the complex rotary rows of exactly
    those positions and the text mask as a key mask. The image update is scattered back with
    the router-gated ``img_mlp`` and the bin weights; the text update follows
    :func:`._joint.text_stream_out`. Returns ``(encoder_hidden_states, hidden_states)`` as the
    block does."""
    B, N, D = x.shape
    L = ctx.shape[1]
    img_mod1, img_mod2 = block.img_mod(temb).chunk(2, dim=-1)  # [B or 2B, 3D] each
    txt_temb = temb.chunk(2, dim=0)[0] if getattr(block, "zero_cond_t", False) else temb
    txt_mod1, txt_mod2 = block.txt_mod(txt_temb).chunk(2, dim=-1)
    eps = block.img_norm1.eps

    if modulate_index is None:
        # (shift, scale, gate) per sample [B, D], broadcast over each sample's rows
        shape = row_layout(sel)

        def per_row(mod):
            return mod.chunk(3, dim=-1)

        def mul(t, v):
            return rows_times(t, v, sel, shape)

        def modulate(t, scale, shift):
            return rows_modulate(t, scale, shift, sel, shape)
        shift1, scale1, _ = img_mod1.chunk(3, dim=-1)
        # training: each token of both bins normalised, projected and rotated once
        rows_in, expand = shared_rows(sel)
        h = dk.gather_norm_modulate(x, rows_in, shift1, scale1, None, None, eps)
    else:
        if modulate_index.shape[-1] != N:
            raise ValueError(f"diffcr: modulate_index has {modulate_index.shape[-1]} tokens but "
                             f"the block input has {N}")
        second = (modulate_index.expand(B, N).reshape(-1).index_select(0, sel.indices)
                  != 0)[:, None]  # [T, 1]: modulated by temb(0)

        rows = sel.row_sample()

        def per_row(mod):  # (shift, scale, gate) of each packed row: [T, D] each
            return tuple(torch.where(second, m[B:].index_select(0, rows),
                                     m[:B].index_select(0, rows)) for m in mod.chunk(3, dim=-1))

        def mul(t, v):
            return t * v

        def modulate(t, scale, shift):
            return t * (1 + scale) + shift
        shift1, scale1, _ = per_row(img_mod1)
        h = dk.gather_norm_modulate(x, sel, None, None, None, None, eps) * (1 + scale1) + shift1
        rows_in, expand = sel, (lambda t: t)
    _, _, gate1 = per_row(img_mod1)
    shift2, scale2, gate2 = per_row(img_mod2)
    t_shift1, t_scale1, t_gate1 = txt_mod1.chunk(3, dim=-1)  # [B, D] each
    t_shift2, t_scale2, t_gate2 = txt_mod2.chunk(3, dim=-1)
    nctx = block.txt_norm1(ctx) * (1 + t_scale1[:, None]) + t_shift1[:, None]

    attn = block.attn
    H = attn.heads
    q, k = heads(attn.to_q(h), attn.norm_q, H), heads(attn.to_k(h), attn.norm_k, H)
    v = heads(attn.to_v(h), None, H)  # [U, H, Dh]
    tq = heads(attn.add_q_proj(nctx), attn.norm_added_q, H)  # [B, L, H, Dh]
    tk = heads(attn.add_k_proj(nctx), attn.norm_added_k, H)
    tv = heads(attn.add_v_proj(nctx), None, H)
    rot = Rotary.complex_tables(rope[0], rope[1], rows_in.indices % N)
    q, k, tq, tk = rot.image(q), rot.image(k), rot.text(tq), rot.text(tk)
    lay = JointLayout(sel, L)
    o = fused_joint_attention(lay, sel, rows_in, expand, q, k, v, tq, tk, tv, img_valid, txt_valid)
    o = o.reshape(lay.J, -1).to(q.dtype)

    attn_update = mul(attn.to_out[1](attn.to_out[0](lay.image(o))), gate1)  # [T, D]
    hid = dk.gather_rows(x, sel.indices) + attn_update
    mlp_out = block.img_mlp(modulate(block.img_norm2(hid), scale2, shift2))
    inplace = not torch.is_grad_enabled() and inplace_residual
    if modulate_index is None:
        new_x = dk.scatter_back_selection(x, sel, attn_update, mlp_out, img_mod2.chunk(3, -1)[2],
                                          scores=gate_scores, inplace=inplace)
    else:  # per-row gates: applied before the scatter-back, which then gates by 1
        new_x = dk.scatter_back_selection(x, sel, attn_update, mlp_out * gate2,
                                          scores=gate_scores, inplace=inplace)
    if new_x.dtype == torch.float16:
        new_x = new_x.clip(-65504, 65504)

    return text_stream_update(ctx, attn.to_add_out(lay.text(o)), lay, sel, t_gate1,
                              block.txt_norm2, t_scale2, t_shift2, t_gate2, block.txt_mlp), new_x
