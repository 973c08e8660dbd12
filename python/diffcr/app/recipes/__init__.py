"""Per-family recipes of captioned fine-tuning (``diffcr train --model PIPELINE``): how a
pipeline folder's text encoders turn captions into the transformer's conditioning, how images
become latents, the training loss, and how the pipeline draws from prompts. One file per
pipeline family (this package's modules), each registering its class by the transformer class
it trains (as the model families are); :mod:`.base` holds what they share.

- :class:`PixArtRecipe`: T5 embeddings + mask, DDPM epsilon (or v) loss.
- :class:`FluxRecipe`: CLIP pooled + T5 embeddings (the pipeline's own ``encode_prompt``),
  flow matching (``x_t = (1 - s) x0 + s e``, target ``e - x0``, ``s`` uniform then shifted as
  the pipeline's scheduler shifts), packed 2x2 latents with their position ids, guidance 3.5
  for guidance-distilled models.
- :class:`SD3Recipe`: two CLIPs + T5 through the pipeline's ``encode_prompt`` (sequence and
  pooled embeddings), flow matching on the latents, timesteps ``sigma * 1000``.
- :class:`WanRecipe`: UMT5 through the pipeline's ``encode_prompt``, images as one-frame
  videos, the Wan VAE's normalised latents, flow matching with the scheduler's
  ``flow_shift``; a two-expert Wan 2.2 one expert per run on its noise levels
  (:func:`expert_of`).
- :class:`QwenImageRecipe`: Qwen2.5-VL through the pipeline's ``encode_prompt``, embeddings
  with their padding mask (:class:`MaskedTextRecipe`), packed 2x2 latents, flow matching with
  the pipeline's resolution-dependent shift.
- :class:`HunyuanVideoRecipe`: Llama (masked) + CLIP pooled through the pipeline's
  ``encode_prompt``, images as one-frame videos, flow matching with the scheduler's
  ``shift``, distilled guidance 6.
"""
from .base import (RECIPES, Batch, FlowRecipe, MaskedTextRecipe, Recipe,  # noqa: F401
                   VideoPipeline, expert_of, pipeline_parts, recipe_for, register)
from . import pixart, flux, sd3, wan, qwenimage, hunyuanvideo  # noqa: E402,F401  (register them)

__all__ = ["Recipe", "FlowRecipe", "MaskedTextRecipe", "VideoPipeline", "Batch", "RECIPES",
           "register", "recipe_for", "expert_of", "pipeline_parts"]
