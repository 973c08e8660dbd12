"""The registry of model families: :func:`register_family` (a class decorator every family
module applies to its :class:`~diffcr.models.base.ModelFamily` subclass) and the lookups
:func:`families`, :func:`family_for` and :func:`known_block_classes`."""
from __future__ import annotations

from typing import Dict, List, Type

from torch import nn

from .base import ModelFamily

__all__ = ["register_family", "families", "family_for", "known_block_classes"]

_FAMILIES: Dict[str, ModelFamily] = {}


def register_family(cls: Type[ModelFamily]) -> Type[ModelFamily]:
    """Class decorator: register a :class:`ModelFamily` subclass (one instance) by its
    ``model_classes``. A model class may belong to one family only."""
    fam = cls()
    if not fam.name or not fam.model_classes:
        raise ValueError(f"{cls.__name__}: a family needs a name and model_classes")
    for other in _FAMILIES.values():
        clash = set(other.model_classes) & set(fam.model_classes)
        if clash and other.name != fam.name:
            raise ValueError(f"{cls.__name__}: {sorted(clash)} already belong to family "
                             f"{other.name!r}")
    _FAMILIES[fam.name] = fam
    return cls


def families() -> Dict[str, ModelFamily]:
    """``{name: family}`` of every registered family."""
    return dict(_FAMILIES)


def family_for(model: nn.Module) -> ModelFamily:
    """The family of ``model`` (by its class or a base class); TypeError naming the supported
    classes when there is none."""
    for klass in type(model).__mro__:
        for fam in _FAMILIES.values():
            if klass.__name__ in fam.model_classes:
                return fam
    supported = [f"{c} ({f.name})" for f in _FAMILIES.values() for c in f.model_classes]
    raise TypeError(f"diffcr.convert supports {', '.join(supported)}; got "
                    f"{type(model).__name__} (a new family is one file in diffcr/models/)")


def known_block_classes() -> List[type]:
    """Every block class some registered family routes (each once, in registration order)."""
    out = []
    for fam in _FAMILIES.values():
        for c in fam.block_classes():
            if c not in out:
                out.append(c)
    return out
