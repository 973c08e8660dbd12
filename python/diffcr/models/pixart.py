"""PixArt-α / PixArt-Σ (``PixArtTransformer2DModel``): ``BasicTransformerBlock`` with
``ada_norm_single`` and text cross-attention; DDPM timesteps ``t`` in ``[0, T)``, noise level
``t / T`` (``T`` = 1000 unless the config says otherwise)."""
from ._basic_block import BasicBlockFamily
from .registry import register_family


@register_family
class PixArtFamily(BasicBlockFamily):
    name = "pixart"
    model_classes = ("PixArtTransformer2DModel",)
    block_lists = ("transformer_blocks",)
