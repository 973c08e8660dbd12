"""Model families: what :func:`diffcr.convert` needs to know about one diffusers model class.

This package's face: it re-exports the public names and imports the built-in family modules,
which registers them. Inside, imports point one way, from families down to helpers (nothing
here imports :mod:`diffcr.routing`):

- :mod:`.base`: :class:`ModelFamily` (what a family says, as data where it can and as code
  where it must) and the helpers every family and the converter share;
- :mod:`.registry`: :func:`register_family`, :func:`families`, :func:`family_for`,
  :func:`known_block_classes`;
- :mod:`.common`: helpers of the routed forwards that no family owns (the compat path's
  segment groups and scatter-back, the fused paths' cross-attention over the text and
  interleaved rotary embedding);
- ``_basic_block.py`` (diffusers ``BasicTransformerBlock``: PixArt, DiT) and ``_joint.py``
  (joint-attention blocks: SD3, Flux, Qwen-Image, HunyuanVideo): the compat and fused forwards
  their families share;
- one file per family (``pixart.py``, ``dit.py``, ``sd3.py``, ``flux.py``, ``wan.py``,
  ``qwenimage.py``, ``hunyuanvideo.py``), each registering a :class:`ModelFamily` subclass
  with :func:`register_family`.

Adding a built-in family means its file here, its import at the end of this module (which
registers it), and its case in ``FAMILY_CASES`` of ``tests/tiny_models.py``: a tiny random model
of the family and its inputs. ``tests/models/test_family_conformance.py`` holds every registered
family to the same contract and fails for a family without a case. A family defined
outside this package only needs :func:`register_family`.
"""
from .base import (TESTED_DIFFUSERS, ForwardParams, ModelFamily, display_name, take_samples,
                   warn_once)
from .registry import families, family_for, known_block_classes, register_family

__all__ = ["ModelFamily", "register_family", "family_for", "families", "known_block_classes",
           "TESTED_DIFFUSERS", "ForwardParams", "take_samples", "display_name", "warn_once"]

from . import pixart, dit, sd3, flux, wan, qwenimage, hunyuanvideo  # noqa: E402,F401  (register the built-in families)
