"""Saving and loading only what DiffCR adds: router weights, ratio parameters, the config.

Format: a directory with ``diffcr.safetensors`` (tensors) and ``diffcr.json`` (config, a
signature of the model it came from, and the SHA-256 of the tensor file). Never pickle.
:func:`load` validates everything against the model before it copies a single value; a failed
load leaves the model unchanged and raises :class:`CheckpointError`.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Union

import torch
from torch import nn

from ._version import __version__
from .config import DiffCRConfig
from .convert import convert, is_converted, routed_blocks
from .models import family_for
from .routing import routing_state, static_ratios

__all__ = ["save", "load", "read_checkpoint", "block_names", "CheckpointError", "atomic_file"]

TENSORS = "diffcr.safetensors"
META = "diffcr.json"
FORMAT = 1


class CheckpointError(ValueError):
    """A DiffCR checkpoint that cannot be loaded into this model (says what differs)."""


def _signature(model: nn.Module) -> dict:
    positions = family_for(model).blocks(model)
    if not positions:
        raise CheckpointError(f"{type(model).__name__} has no blocks to route")
    return {"model_class": type(model).__name__, "num_blocks": len(positions),
            "hidden_size": family_for(model).hidden_size(positions[0][1])}


def _block_names(model: nn.Module):
    """Qualified name of every routable block position (the checkpoint's key prefixes)."""
    return [name for name, _ in family_for(model).blocks(model)]


def fsync_path(path: Union[str, Path]) -> None:
    """Flush a file (or a directory's entries) to disk."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_file(path: Union[str, Path], write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a hidden sibling of ``path``, flushed to disk, then renamed over
    ``path``: a kill at any moment leaves the old file or the new one, never a part of it."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save(model: nn.Module, path: Union[str, Path]) -> Path:
    """Write the router/ratio parameters and config of a converted ``model`` to directory
    ``path`` (created if needed). Returns the directory.

    Each file is written to a temporary sibling and renamed into place, the JSON (which holds
    the tensor file's checksum) last: a run killed while saving leaves the previous
    checkpoint, or one that :func:`load` refuses with a checksum error, never a silently
    mixed one."""
    from safetensors.torch import save_file

    st = routing_state(model)
    names = _block_names(model)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    frozen = {}
    for i, b in routed_blocks(model).items():
        tensors[f"{names[i]}.router.weight"] = b.router.weight.detach().cpu().contiguous()
        tensors[f"{names[i]}.ratio.kept"] = b.ratio.kept.detach().cpu().contiguous()
        if st.blocks[i].frozen_bins is not None:
            frozen[str(i)] = list(st.blocks[i].frozen_bins)
    meta = {"format": FORMAT, "diffcr_version": __version__, "config": st.config.to_dict(),
            "model": _signature(model), "frozen_bins": frozen if st.frozen else None,
            "block_names": {str(i): names[i] for i in routed_blocks(model)}}
    atomic_file(out / TENSORS, lambda tmp: save_file(
        tensors, str(tmp), metadata={"format": "diffcr", "version": str(FORMAT)}))
    # a checksum of the tensor file: corruption that keeps every value in range is detected too
    meta["tensors_sha256"] = _sha256(out / TENSORS)
    atomic_file(out / META, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_meta_contents(where: Path, meta: dict, cfg: DiffCRConfig) -> None:
    """The model signature, routed block names and frozen bins of the JSON: present fields
    must have the right types and agree with the config (CheckpointError otherwise)."""
    sig = meta.get("model")
    if sig is not None:
        for key, kind in (("model_class", str), ("num_blocks", int), ("hidden_size", int)):
            v = sig.get(key)
            if not isinstance(v, kind) or isinstance(v, bool) or (kind is int and v < 1):
                raise CheckpointError(f"{where}: model.{key} is missing or invalid ({v!r})")
        try:
            idx = cfg.routed_indices(sig["num_blocks"])
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from e
    else:
        idx = None
    names = meta.get("block_names")
    if names is not None and (
            (idx is not None and set(names) != {str(i) for i in idx})
            or not all(isinstance(v, str) and v for v in names.values())):
        raise CheckpointError(f"{where}: block_names do not match the routed blocks")
    frozen = meta.get("frozen_bins")
    if frozen is not None:
        R = cfg.num_regions
        ok = (idx is None or set(frozen) == {str(i) for i in idx}) and all(
            isinstance(v, list) and len(v) == R
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and b in cfg.bins
                    for b in v)
            for v in frozen.values())
        if not ok:
            raise CheckpointError(f"{where}: frozen_bins do not match its config")


def block_names(meta: dict, tensors: dict) -> dict:
    """``{routed index: block name}`` of a checkpoint (:func:`read_checkpoint`): from its JSON,
    or, for checkpoints written before names were recorded, from ``transformer_blocks.{i}``
    tensor names."""
    if meta.get("block_names") is not None:
        return {int(i): n for i, n in meta["block_names"].items()}
    out = {}
    for key in tensors:
        head, _, tail = key.rpartition(".ratio.kept")[0].rpartition(".")
        if key.endswith(".ratio.kept") and tail.isdigit():
            out[int(tail)] = f"{head}.{tail}"
    return dict(sorted(out.items()))


def read_checkpoint(path: Union[str, Path]):
    """Read a checkpoint written by :func:`save` without applying it: ``(meta, config,
    tensors)`` (the JSON metadata, the :class:`DiffCRConfig`, the tensors by name). Raises
    :class:`CheckpointError` for a missing, malformed or corrupt checkpoint."""
    from safetensors import SafetensorError

    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a DiffCR checkpoint directory (expected {TENSORS} "
                              f"and {META} inside)")
    for f in (TENSORS, META):
        if not (path / f).is_file():
            raise CheckpointError(f"{path} has no {f}")
    try:
        meta = json.loads((path / META).read_text())
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise CheckpointError(f"{path / META} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / META}: unknown checkpoint format "
                              f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
    for key, kind in (("config", dict), ("model", dict), ("frozen_bins", (dict, type(None))),
                      ("tensors_sha256", (str, type(None))), ("block_names", dict)):
        if key in meta and not isinstance(meta[key], kind):
            raise CheckpointError(f"{path / META}: {key!r} has the wrong type "
                                  f"({type(meta[key]).__name__})")
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path / META}: no 'config' object")
    try:
        cfg = DiffCRConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{path / META}: invalid config: {e}") from e
    _check_meta_contents(path / META, meta, cfg)
    try:
        tensors = load_file(str(path / TENSORS))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path / TENSORS} is truncated or corrupt: {e}") from e
    want = meta.get("tensors_sha256")
    if want is not None and _sha256(path / TENSORS) != want:
        raise CheckpointError(f"{path / TENSORS} does not match the checksum recorded in "
                              f"{META}: the file is corrupt or was changed")
    return meta, cfg, tensors


def load(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Load a checkpoint written by :func:`save` into ``model``.

    An unconverted model is converted with the checkpoint's config first; a converted one must
    have the same config (regions, bins, gate, routed blocks). Model class, block count and
    hidden size must match. Every check runs before any value is copied, so a failed load
    (:class:`CheckpointError` saying what differs) leaves the model unchanged.
    """
    path = Path(path)
    meta, cfg, tensors = read_checkpoint(path)
    sig, want = _signature(model), meta.get("model") or {}
    names = _block_names(model)
    diffs = [f"{k}: checkpoint {want.get(k)!r}, model {sig[k]!r}" for k in sig
             if want.get(k) != sig[k]]
    if diffs:
        raise CheckpointError("checkpoint does not fit this model: " + "; ".join(diffs))
    if is_converted(model):
        have = routing_state(model).config
        keys = ("bins", "num_regions", "gate", "routed_blocks", "num_train_timesteps")
        cd = [f"{k}: checkpoint {getattr(cfg, k)!r}, model {getattr(have, k)!r}" for k in keys
              if getattr(cfg, k) != getattr(have, k)]
        if cd:
            raise CheckpointError("checkpoint config differs from the model's conversion: "
                                  + "; ".join(cd))
    idx = cfg.routed_indices(sig["num_blocks"])
    D, R = sig["hidden_size"], cfg.num_regions
    expect = {}
    for i in idx:
        expect[f"{names[i]}.router.weight"] = (D,)
        expect[f"{names[i]}.ratio.kept"] = (R,)
    missing = sorted(set(expect) - set(tensors))
    extra = sorted(set(tensors) - set(expect))
    if missing or extra:
        raise CheckpointError(f"checkpoint tensors do not match: missing {missing[:4]}, "
                              f"unexpected {extra[:4]}")
    # the dtype each value will have in the model: a value finite in the file's dtype may
    # overflow the parameter's (float64 1e300 -> float32 inf), so check after the cast
    if is_converted(model):
        have = routed_blocks(model)
        target = {}
        for i in idx:
            if i in have:
                target[f"{names[i]}.router.weight"] = have[i].router.weight.dtype
                target[f"{names[i]}.ratio.kept"] = have[i].ratio.kept.dtype
    else:
        target = dict.fromkeys(expect, getattr(torch, cfg.param_dtype))
    for k, shape in expect.items():
        t = tensors[k]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{k} has shape {tuple(t.shape)}, expected {shape}")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise CheckpointError(f"{k} is not a finite floating-point tensor")
        dt = target.get(k, t.dtype)
        if dt != t.dtype and not torch.isfinite(t.to(dt)).all():
            raise CheckpointError(f"{k} has values that are not finite in the model's {dt} "
                                  f"(the file holds {t.dtype})")
    lo, hi = cfg.min_bin, cfg.max_bin
    for i in idx:
        kept = tensors[f"{names[i]}.ratio.kept"]
        if (kept < lo - 1e-6).any() or (kept > hi + 1e-6).any():
            raise CheckpointError(f"{names[i]}.ratio.kept has values outside the "
                                  f"bin range [{lo}, {hi}]")
    frozen = meta.get("frozen_bins")
    if frozen is not None:
        try:
            ok = set(frozen) == {str(i) for i in idx} and all(
                isinstance(v, list) and len(v) == R and all(b in cfg.bins for b in v)
                for v in frozen.values())
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError("frozen_bins in the checkpoint do not match its config")
    # ---- everything checked: now change the model
    if not is_converted(model):
        convert(model, cfg)
    blocks = routed_blocks(model)
    with torch.no_grad():
        for i in idx:
            b = blocks[i]
            b.router.weight.copy_(tensors[f"{names[i]}.router.weight"])
            b.ratio.kept.copy_(tensors[f"{names[i]}.ratio.kept"])
    st = routing_state(model)
    if frozen is not None:
        for i in idx:
            st.blocks[i].frozen_bins = static_ratios(float(v) for v in frozen[str(i)])
            blocks[i].ratio.kept.requires_grad_(False)
        st.frozen = True
    return model
