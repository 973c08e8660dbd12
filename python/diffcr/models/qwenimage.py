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
noise level. There is no fused path yet: ``path="auto"`` runs compat.
"""
import torch

from ._joint import JointFamily, shared_positions
from .base import take_samples
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
