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
:func:`._joint.fused_single_stream_block` (its fused output projection is split into the attention and
MLP columns so that the router gates the image MLP part alone; a ``proj_out`` whose weight
cannot be cut, quantized or a peft LoRA layer, is called as a module on ``[attention; router
gate x MLP]`` instead). Blocks with other attention processors or fused QKV projections, and
calls with ``joint_attention_kwargs`` (IP-Adapter), run compat.
"""
import torch

from ._joint import (JointFamily, fused_double_stream_block, fused_single_stream_block,
                     shared_positions)
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

    # (a proj_out that is not a plain linear, e.g. quantized or a peft LoRA layer, is run as a
    # module by the single block's fused forward: common.plain_weight)
    fused_processor = ("diffusers.models.transformers.transformer_flux", "FluxAttnProcessor")

    def call_fused_reason(self, block, call):
        why = self.attention_kwargs_reason(call)
        if why:
            return why
        rope = call.get("image_rotary_emb")
        if rope is None or not (isinstance(rope, (tuple, list)) and len(rope) == 2):
            return "rotary embeddings not given as (cos, sin)"
        return self.fused_unsupported_reason(block)

    def fused_forward(self, block, call, sel, gate_scores, *, inplace_residual=False):
        fn = fused_single_stream_block if self._single(block) else fused_double_stream_block
        return fn(block, call["hidden_states"], sel, gate_scores, call["encoder_hidden_states"],
                  call["temb"], tuple(call["image_rotary_emb"]),
                  inplace_residual=inplace_residual)
