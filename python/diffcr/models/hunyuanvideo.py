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
1000``): noise level ``t / T`` with ``T = 1000``.

Paths: fused forwards for both block kinds over the packed joint layout ``[segment rows; its
sample's text]`` (:class:`._joint.JointLayout`; the order of rows inside a segment does not
change attention), through :func:`._joint.fused_double_stream_block` and
:func:`._joint.fused_single_stream_block`, with the rotary rows of exactly the kept video
positions (the text is not rotated) and the joint attention mask as a key mask: the columns of
the kept video tokens and every text token. Blocks with another attention processor or fused
projections run compat.
"""
import torch

from ._joint import (JointFamily, Rotary, fused_double_stream_block, fused_single_stream_block,
                     shared_positions)
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

    has_fused = True

    fused_processor = ("diffusers.models.transformers.transformer_hunyuan_video",
                       "HunyuanVideoAttnProcessor2_0")

    def call_fused_reason(self, block, call):
        rope = call.get(self._rope_name(block))
        if rope is not None and not (isinstance(rope, (tuple, list)) and len(rope) == 2):
            return "rotary embeddings not given as (cos, sin)"
        mask = call.get("attention_mask")
        if mask is not None and not (torch.is_tensor(mask) and mask.dim() == 4
                                     and mask.shape[1] == mask.shape[2] == 1):
            return "an attention mask that is not a key mask [B, 1, 1, N + L]"
        if mask is not None and mask.is_floating_point():  # additive biases, not keep/drop
            return "a float (additive) attention mask"
        return self.fused_unsupported_reason(block)

    def fused_forward(self, block, call, sel, gate_scores, *, inplace_residual=False):
        x, ctx = call["hidden_states"], call["encoder_hidden_states"]
        N, L = x.shape[1], ctx.shape[1]
        rope = call.get(self._rope_name(block))
        rotary = None
        if rope is not None:
            if rope[0].shape[0] != N:
                raise ValueError(f"diffcr: the rotary table has {rope[0].shape[0]} rows but the "
                                 f"block input has {N} video tokens")
            def rotary(p):  # the rows the fused forward rotates (shared_rows)
                return Rotary.image_table(rope, p)
        img_valid = txt_valid = None
        mask = call.get("attention_mask")
        if mask is not None:
            if mask.shape[-1] != N + L:
                raise ValueError(f"diffcr: the attention mask has {mask.shape[-1]} columns but "
                                 f"the block has {N} video + {L} text tokens")
            keys = mask.reshape(mask.shape[0], N + L).bool()  # [B or 1, N + L]
            keys = keys.expand(x.shape[0], N + L)
            img_valid = keys[:, :N].reshape(-1).index_select(0, sel.indices)  # [T]
            txt_valid = keys[:, N:]
        fn = fused_single_stream_block if self._single(block) else fused_double_stream_block
        new_x, new_ctx = fn(block, x, sel, gate_scores, ctx, call["temb"], None,
                            inplace_residual=inplace_residual, rotary=rotary,
                            img_valid=img_valid, txt_valid=txt_valid)[::-1]
        return new_x, new_ctx
