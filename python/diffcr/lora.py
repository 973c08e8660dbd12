"""LoRA on the base weights through peft, as the paper fine-tunes (rank 32 on the base weights,
full training of routers and ratios).

:func:`add_lora` injects a peft LoRA adapter into the linear layers of the model's routable
blocks (the family's :attr:`~diffcr.ModelFamily.lora_targets`), freezes every base weight and
leaves the LoRA weights, the routers and the ratios trainable. :func:`save_lora` writes the
adapter in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``, loadable by
``peft``/diffusers as well), :func:`load_lora` reads it back. It works before or after
:func:`diffcr.convert`; the routed paths run the peft layers as they are (fused and compat
agree with LoRA, tested).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Sequence, Union

from torch import nn

__all__ = ["add_lora", "save_lora", "load_lora", "lora_parameters", "LoraError"]

ADAPTER = "default"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class LoraError(ValueError):
    """A LoRA request that cannot be met (missing peft, no target modules, a bad adapter)."""


def _peft():
    try:
        import peft
    except ImportError as e:  # pragma: no cover - peft is a dependency of the lora extra
        raise LoraError("LoRA needs peft: pip install 'diffcr[train]' (or pip install peft)") \
            from e
    return peft


def lora_target_names(model: nn.Module, targets: Optional[Sequence[str]] = None):
    """Full names of the linear layers in the model's routable blocks whose names end in one of
    ``targets`` (default: the family's :attr:`~diffcr.ModelFamily.lora_targets`)."""
    from .models import family_for

    fam = family_for(model)
    names = []
    blocks = fam.blocks(model)
    for i, (block_name, block) in enumerate(blocks):
        wanted = tuple(targets if targets is not None
                       else fam.lora_targets_of(block, last=i == len(blocks) - 1))
        for name, mod in block.named_modules():
            if not name or not isinstance(mod, nn.Linear):
                continue
            if any(name == t or name.endswith("." + t) for t in wanted):
                names.append(f"{block_name}.{name}")
    if not names:
        shown = list(targets if targets is not None else fam.lora_targets)
        raise LoraError(f"{type(model).__name__} has no linear layer named like {shown} "
                        f"in its {fam.name} blocks: nothing to put LoRA on")
    return names


def add_lora(model: nn.Module, rank: int = 32, alpha: Optional[float] = None,
             targets: Optional[Sequence[str]] = None, dropout: float = 0.0) -> nn.Module:
    """Inject a LoRA adapter of ``rank`` (scale ``alpha / rank``; ``alpha`` defaults to ``rank``)
    into the routable blocks' linear layers named by ``targets`` (default: the family's), freeze
    the base weights, keep LoRA, routers and ratios trainable. Returns ``model``.

    Raises :class:`LoraError` when the model has no such layers or already holds an adapter.
    """
    peft = _peft()
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoraError(f"LoRA rank must be a positive integer, got {rank!r}")
    if has_lora(model):
        raise LoraError("the model already holds a LoRA adapter")
    names = lora_target_names(model, targets)
    # one regex of the exact names: a list would be shortened by peft to suffixes ("2",
    # "0.proj") that could match layers outside the blocks when the adapter is loaded
    pattern = "(" + "|".join(re.escape(n) for n in names) + ")"
    cfg = peft.LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else rank),
                          lora_dropout=dropout, target_modules=pattern, init_lora_weights=True)
    peft.inject_adapter_in_model(cfg, model, adapter_name=ADAPTER)
    model._diffcr_lora_config = cfg
    _freeze_base(model)
    return model


def has_lora(model: nn.Module) -> bool:
    return any("lora_A" in n for n, _ in model.named_parameters())


def lora_parameters(model: nn.Module):
    """The LoRA weights of the model (a list of parameters)."""
    return [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def _freeze_base(model: nn.Module) -> None:
    from .convert import is_converted
    from .training import ratio_parameters, router_parameters

    keep = set(map(id, lora_parameters(model)))
    if is_converted(model):
        keep |= set(map(id, router_parameters(model) + ratio_parameters(model)))
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def save_lora(model: nn.Module, path: Union[str, Path]) -> Path:
    """Write the model's LoRA adapter to the folder ``path`` in peft's format."""
    peft = _peft()
    from safetensors.torch import save_file

    cfg = getattr(model, "_diffcr_lora_config", None)
    if cfg is None or not has_lora(model):
        raise LoraError("the model holds no LoRA adapter added by diffcr.add_lora/load_lora")
    import tempfile

    from .io import atomic_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = peft.get_peft_model_state_dict(model, adapter_name=ADAPTER)
    # each file written aside and renamed into place (a kill leaves the old file or the new)
    atomic_file(path / WEIGHTS_FILE, lambda tmp: save_file(
        {k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp)))
    with tempfile.TemporaryDirectory(dir=path) as aside:
        cfg.save_pretrained(aside)
        for f in Path(aside).iterdir():
            atomic_file(path / f.name, lambda tmp, f=f: tmp.write_bytes(f.read_bytes()))
    return path


def load_lora(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Inject the adapter saved in ``path`` (by :func:`save_lora`, or any peft LoRA adapter
    of this model's layer names) into ``model`` and load its weights. Every check runs before
    the model changes: a missing or malformed folder, or weights that do not fit, raise
    :class:`LoraError` and leave the model as it was."""
    peft = _peft()
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise LoraError(f"{path}: not a LoRA adapter folder (needs {CONFIG_FILE} and "
                        f"{WEIGHTS_FILE})")
    try:
        raw = json.loads((path / CONFIG_FILE).read_text())
        cfg = peft.LoraConfig.from_pretrained(str(path))
    except (ValueError, TypeError) as e:
        raise LoraError(f"{path / CONFIG_FILE}: not a LoRA config ({e})") from e
    if raw.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{path}: a {raw.get('peft_type')} adapter, not LoRA")
    if has_lora(model):
        raise LoraError("the model already holds a LoRA adapter")
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except Exception as e:  # safetensors raises its own error types
        raise LoraError(f"{path / WEIGHTS_FILE}: cannot read ({e})") from e
    modules = dict(model.named_modules())
    targets = cfg.target_modules
    if isinstance(targets, str):  # peft: a regex matched against the full name
        hit = {n for n in modules if re.fullmatch(targets, n)}
    else:  # peft: names matched as suffixes
        hit = {n for n in modules for t in targets if n == t or n.endswith("." + t)}
    hit = {n for n in hit if isinstance(modules[n], nn.Linear)}
    if not hit:
        raise LoraError(f"{path}: the adapter targets no linear layer of this model")
    for key, v in state.items():  # lora_A [r, in], lora_B [out, r]
        name = key.rsplit(".lora_", 1)[0]
        mod = modules.get(name)
        if name not in hit:
            raise LoraError(f"{path}: weight {key} has no targeted linear layer in this model")
        want = (cfg.r, mod.in_features) if ".lora_A." in key else (mod.out_features, cfg.r)
        if tuple(v.shape) != want:
            raise LoraError(f"{path}: {key} has shape {tuple(v.shape)}, this model needs {want}")
    peft.inject_adapter_in_model(cfg, model, adapter_name=ADAPTER)
    result = peft.set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise LoraError(f"{path}: weights the adapter could not place: {unexpected[:3]}")
    model._diffcr_lora_config = cfg
    _freeze_base(model)
    return model
