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
routers and ratios (:func:`diffcr.convert_pipeline`). No fused path yet: ``path="auto"`` runs
compat.
"""
import torch

import diffcr_kernels as dk

from . import ModelFamily, register_family
from ._basic_block import packed_rows, segment_groups


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

    def fused_unsupported_reason(self, block):
        return "no fused forward for WanTransformerBlock yet (compat runs)"

    def call_fused_reason(self, block, call):
        return self.fused_unsupported_reason(block)

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
        x = call["hidden_states"]
        B, N, _ = x.shape
        pieces = []
        for rows, idx, samp, _ in segment_groups(sel, ks, x.device):
            gcall = self.gathered_call(block, call, samp, idx - samp[:, None] * N)
            with mlp_gate.scaled(self.gate_scale(block, gate[rows], gcall)):
                out = base_forward(**gcall)
            pieces.append((rows, out - gcall["hidden_states"]))
        delta = packed_rows(pieces, sel.total, x)
        return dk.scatter_back_selection(x, sel, delta, use_scores=False,
                                         inplace=inplace_residual)
