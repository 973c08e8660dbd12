"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): double-stream
``HunyuanVideoTransformerBlock`` in ``transformer_blocks`` and single-stream
``HunyuanVideoSingleTransformerBlock`` in ``single_transformer_blocks`` (the routed-block
numbering runs through both lists, double blocks first).

Routed: the video tokens (``hidden_states``); the text tokens are never routed. The blocks put
the video tokens first (``[video; text]``, and they return ``(hidden_states,
encoder_hidden_states)``). A routed call runs the block's own diffusers forward on [the kept
video tokens; every text token] with, gathered with the tokens:

- the rotary rows of the kept positions (the model's table ``[N, head_dim]`` covers the video
  tokens only and has no batch dim, so one call per segment);
- the joint attention mask (``[B, 1, 1, N + L]``: every video token and the sample's valid
  text tokens): the columns of the kept video tokens and of every text token.

The text-stream update follows :mod:`._joint`. The router gates the video MLP branch only: the
double block's ``ff``; in the single block the video rows of the MLP activation (``act_mlp``)
that enters the fused output projection. The token-replace blocks of the I2V model
(``image_condition_type="token_replace"``) are not routed (convert refuses them).

Timesteps: the pipeline passes the scheduler's ``t`` in [0, 1000] (flow matching, ``sigma *
1000``): noise level ``t / T`` with ``T = 1000``. There is no fused path yet: ``path="auto"``
runs compat.
"""
import torch

from ._joint import JointFamily, shared_positions
from .registry import register_family


@register_family
class HunyuanVideoFamily(JointFamily):
    name = "hunyuanvideo"
    model_classes = ("HunyuanVideoTransformer3DModel",)
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    per_segment_calls = True  # the rotary table has no batch dim
    image_first = True
    #: LoRA targets: as Flux (the single block's ``proj_out`` shares the model's name)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                    "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2", "proj_mlp")
    # the model passes token_replace_emb and first_frame_num_tokens to every block; the plain
    # blocks take them as *args and ignore them
    ignores_extra_args = True

    def block_classes(self):
        from diffusers.models.transformers.transformer_hunyuan_video import (
            HunyuanVideoSingleTransformerBlock, HunyuanVideoTransformerBlock)

        return (HunyuanVideoTransformerBlock, HunyuanVideoSingleTransformerBlock)

    def _single(self, block):
        return hasattr(block, "proj_mlp")

    def mlp_module(self, block):
        return block.act_mlp if self._single(block) else block.ff

    def gate_scale(self, block, gate_rows, call):
        scale = gate_rows.unsqueeze(-1)  # [G, k, 1]
        if self._single(block):  # act_mlp sees [video; text] rows: text ungated
            L = call["encoder_hidden_states"].shape[1]
            scale = torch.cat([scale, scale.new_ones(scale.shape[0], L, 1)], 1)
        return scale

    def _rope_name(self, block):
        return "image_rotary_emb" if self._single(block) else "freqs_cis"

    def gathered_call(self, block, call, samp, tok):
        x = call["hidden_states"]
        N = x.shape[1]
        rope_name = self._rope_name(block)
        out = super().gathered_call(block, {k: v for k, v in call.items() if k != rope_name},
                                    samp, tok)
        if rope_name in call:
            rope = call[rope_name]
            if rope is not None:
                pos = shared_positions(tok, "HunyuanVideo")
                if rope[0].shape[0] != N:
                    raise ValueError(f"diffcr: the rotary table has {rope[0].shape[0]} rows "
                                     f"but the block input has {N} video tokens")
                rope = tuple(r.index_select(0, pos) for r in rope)
            out[rope_name] = rope
        mask = out.get("attention_mask")
        if torch.is_tensor(mask):
            L = call["encoder_hidden_states"].shape[1]
            if mask.shape[-1] != N + L:
                raise ValueError(f"diffcr: the attention mask has {mask.shape[-1]} columns but "
                                 f"the block has {N} video + {L} text tokens")
            cols = torch.cat([shared_positions(tok, "HunyuanVideo"),
                              torch.arange(N, N + L, device=tok.device)])
            out["attention_mask"] = mask.index_select(-1, cols)
        return out
