"""What a diffusers user tries first to make a DiT cheaper: the training-free caches.

:class:`CacheSetting` names one diffusers cache at one setting and applies it to a model, dense
or converted with DiffCR (convert first, then apply the cache: the cache then skips whole routed
blocks, see ``diffcr.convert``). :func:`diffcr.app.ddpm.start_cache_run` resets the cache
state and opens the cache context before a sampling loop, as a diffusers pipeline with
``CacheMixin`` would.

Supported here, for the demo's class-conditional ``DiTTransformer2DModel``:

* ``fbc`` -- FirstBlockCache (``diffusers.hooks.apply_first_block_cache``): the first block
  always runs; if its residual changed by less than ``threshold`` (relative mean absolute
  difference) since the last full step, the other blocks are skipped and their cached residual
  is reused.
* ``taylorseer`` -- TaylorSeer (``diffusers.hooks.apply_taylorseer_cache``, diffusers >= 0.36):
  every block's output is computed in full every ``interval`` steps (and in the first three) and
  predicted by a first-order Taylor expansion in between. On DiT we cache whole blocks
  (``transformer_blocks.N``): diffusers' default hooks only the attention modules, which leaves
  the feed-forward running every step, and its "lite" mode needs a ``proj_out`` module that
  DiT does not have.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CacheSetting", "cache_available"]

_KINDS = {"fbc": ("apply_first_block_cache", "FirstBlockCache"),
          "taylorseer": ("apply_taylorseer_cache", "TaylorSeer")}


def cache_available(kind: str) -> bool:
    """Whether the installed diffusers ships the cache ``kind`` (``"fbc"`` or ``"taylorseer"``)."""
    if kind not in _KINDS:
        raise ValueError(f"unknown cache kind {kind!r}; expected one of {sorted(_KINDS)}")
    try:
        from diffusers import hooks
    except ImportError:
        return False
    return hasattr(hooks, _KINDS[kind][0])


@dataclass(frozen=True)
class CacheSetting:
    """One diffusers cache at one setting.

    Args:
        kind: ``"fbc"`` (FirstBlockCache; ``value`` is its threshold, > 0) or ``"taylorseer"``
            (``value`` is the cache interval in steps, an integer >= 2).
        value: the setting (see ``kind``).
    """

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"unknown cache kind {self.kind!r}; expected one of "
                             f"{sorted(_KINDS)}")
        if self.kind == "fbc" and not (self.value > 0):
            raise ValueError(f"FirstBlockCache threshold must be > 0, got {self.value}")
        if self.kind == "taylorseer" and (self.value != int(self.value) or self.value < 2):
            raise ValueError(f"TaylorSeer interval must be an integer >= 2, got {self.value}")

    @property
    def label(self) -> str:
        """Short name for tables and plots, e.g. ``FBC 0.1`` or ``TaylorSeer /3``."""
        if self.kind == "fbc":
            return f"FBC {self.value:g}"
        return f"TaylorSeer /{int(self.value)}"

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Attach the cache hooks to ``model`` (in place; returns it). Raises ``RuntimeError``
        when the installed diffusers lacks this cache."""
        if not cache_available(self.kind):
            import diffusers

            raise RuntimeError(f"{_KINDS[self.kind][1]} needs a newer diffusers than the "
                               f"installed {diffusers.__version__} "
                               f"(diffusers.hooks.{_KINDS[self.kind][0]} is missing)")
        from diffusers import hooks

        if self.kind == "fbc":
            hooks.apply_first_block_cache(model, hooks.FirstBlockCacheConfig(
                threshold=float(self.value)))
        else:
            hooks.apply_taylorseer_cache(model, hooks.TaylorSeerCacheConfig(
                cache_interval=int(self.value), disable_cache_before_step=3, max_order=1,
                taylor_factors_dtype=torch.float32,
                cache_identifiers=[r"transformer_blocks\.\d+"]))
        return model
