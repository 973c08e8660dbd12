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

Paths: the fused forward (:func:`._joint.fused_double_stream_block`) runs joint attention over
``[segment rows; its sample's text]`` for every segment in one varlen call, both training bins
in one packed pass, SD3.5's ``attn2`` over the segment rows; blocks with other attention
processors or norms, and calls with ``joint_attention_kwargs``, run compat.
"""
from ._joint import JointFamily, fused_double_stream_block
from .registry import register_family


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
        return fused_double_stream_block(block, call["hidden_states"], sel, gate_scores,
                                         call["encoder_hidden_states"], call["temb"],
                                         inplace_residual=inplace_residual)

    def lora_targets_of(self, block, last=False):
        if getattr(block, "context_pre_only", False):
            # the last block returns no text: its text query projection feeds nothing
            return tuple(t for t in self.lora_targets if t != "add_q_proj")
        return self.lora_targets
