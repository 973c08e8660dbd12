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
is already the noise level. There is no fused path yet: ``path="auto"`` runs compat.
"""
import torch

from . import register_family
from ._joint import JointFamily, shared_positions


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
