"""The training core every ``diffcr train`` runner uses: progress bars, parameter groups, the
learning-rate schedule, the EMA, the one checkpoint writer, atomic folders and files, finding
the checkpoint to resume, and the cross-process check.

It imports the library's public API and :mod:`.options` only; the runners
(:mod:`~diffcr.app.demo.run`, :mod:`~diffcr.app.classcond`, :mod:`~diffcr.app.captioned`)
import it, never each other.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import torch

from ..io import atomic_file, fsync_path
from .options import TrainConfig, TrainError

__all__ = ["Progress", "param_groups", "lr_factor", "ema_update", "BadSteps", "write_checkpoints",
           "identical_across_ranks", "atomic_folder", "commit_folder", "atomic_file", "find_resume",
           "prune_states", "claim_out", "LOCK_NAME"]


class Progress:
    """A tqdm bar over ``total`` steps when ``enabled`` (else nothing); :meth:`update` advances
    it by one and shows the given values."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, **post):
        if self.bar is not None:
            self.bar.update(1)
            if post:
                self.bar.set_postfix({k: (f"{v:.4f}" if isinstance(v, float) else v)
                                      for k, v in post.items()}, refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def param_groups(model, cfg: TrainConfig, train_base: bool = True) -> List[dict]:
    """AdamW parameter groups: ``base`` (every other trainable parameter, at ``cfg.lr``; left
    out without ``train_base``), ``router`` (``cfg.lr_router``) and ``ratio``
    (``cfg.lr_ratio``), the last two without weight decay."""
    import diffcr

    converted = diffcr.is_converted(model)
    routers = [p for p in diffcr.router_parameters(model) if p.requires_grad] if converted else []
    ratios = [p for p in diffcr.ratio_parameters(model) if p.requires_grad] if converted else []
    routed = set(map(id, diffcr.router_parameters(model) + diffcr.ratio_parameters(model))) \
        if converted else set()
    base = [p for p in model.parameters() if id(p) not in routed and p.requires_grad]
    groups = []
    if train_base and base and cfg.lr > 0:
        groups.append({"params": base, "lr": cfg.lr, "name": "base"})
    if routers:
        groups.append({"params": routers, "lr": cfg.lr_router, "weight_decay": 0.0,
                       "name": "router"})
    if ratios:
        groups.append({"params": ratios, "lr": cfg.lr_ratio, "weight_decay": 0.0,
                       "name": "ratio"})
    return groups


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Learning-rate multiplier at ``step``: 1 without warm-up; else linear warm-up over
    ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if warmup <= 0:
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """``ema = d ema + (1 - d) model`` over the parameters, with the usual warm-up
    ``d = min(decay, (1 + step) / (10 + step))`` so early steps are not dominated by the
    initialisation; buffers are copied."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p.detach().to(pe.dtype), 1.0 - d)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


class BadSteps:
    """The divergence guard of every training loop (``--max-bad-steps``): a step whose loss or
    gradients are not finite is skipped (nothing is applied from it), with a warning; after
    ``limit`` such steps in a row the run stops with :class:`TrainError`, the checkpoints
    written so far left intact. ``skipped`` counts every skipped step of the run."""

    def __init__(self, limit: int):
        self.limit, self.skipped, self.in_row = limit, 0, 0

    def check(self, bad: bool, step: int) -> bool:
        """Whether step ``step`` (1-based) is skipped: ``bad`` says its loss or gradients were
        not finite (decided alike on every process)."""
        if not bad:
            self.in_row = 0
            return False
        self.skipped += 1
        self.in_row += 1
        warnings.warn(f"diffcr train: step {step}: the loss or a gradient is not finite; the "
                      f"step is skipped ({self.in_row} in a row)", stacklevel=3)
        if self.in_row >= self.limit:
            raise TrainError(
                f"stopped at step {step}: the loss or gradients were not finite for "
                f"{self.in_row} steps in a row (lower --lr, or raise --max-bad-steps); the "
                "checkpoints written so far are intact")
        return True


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """A folder that is complete or absent: yields a hidden temporary sibling to write into;
    when the block ends without error its files are synced to disk and it is renamed to
    ``path`` (an existing ``path`` is replaced only then); on an error it is removed. A kill at
    any moment leaves either the old folder or the new one under ``path`` (and at worst a
    hidden ``.NAME.tmp-PID`` / ``.NAME.old-PID`` sibling, which nothing reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        commit_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit_folder(tmp: Path, path: Path) -> None:
    """The end of :func:`atomic_folder`: syncs every file of the written folder ``tmp`` to
    disk, then renames it to ``path`` (an existing ``path`` is replaced only then). For a
    folder several processes write into (each its part, then the main process commits)."""
    tmp, path = Path(tmp), Path(path)
    for root, _, files in os.walk(tmp):
        for f in files:
            fsync_path(Path(root) / f)
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_path(path.parent)


_STEP = re.compile(r"^step-(\d+)$")


def _states(folder: Path, marker: str) -> List[tuple]:
    """``[(N, folder/step-N)]`` of the complete states (holding ``marker``), oldest first."""
    found = []
    for p in folder.iterdir() if folder.is_dir() else ():
        m = _STEP.match(p.name)
        if m and p.is_dir() and (p / marker).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_resume(resume: Optional[str], out: Path, marker: str) -> Optional[Path]:
    """The folder ``--resume`` names: ``latest`` is the run folder ``out``; a folder holding
    ``marker`` (what makes it a complete state) is itself; a run folder is its newest complete
    ``step-N`` (or itself when it has none but holds ``marker``). :class:`TrainError` (one
    line) for a folder that holds neither."""
    if resume is None:
        return None
    folder = Path(out) if resume == "latest" else Path(resume)
    if resume != "latest" and (folder / marker).is_file() and _STEP.match(folder.name):
        return folder
    states = _states(folder, marker)
    if (folder / marker).is_file():  # a run folder that holds its final state: by its step
        try:
            import json

            states.append((int(json.loads((folder / marker).read_text())["step"]), folder))
        except (ValueError, KeyError, TypeError):
            states.append((-1, folder))
        states.sort(key=lambda s: s[0])
    if states:
        return states[-1][1]
    if resume == "latest":
        raise TrainError(f"--resume latest: no complete checkpoint under --out {out} (no "
                         f"step-N folder with {marker})")
    if _STEP.match(folder.name):
        raise TrainError(f"--resume {folder}: not a complete checkpoint ({marker} is missing: "
                         "the run was stopped while writing it); resume from an earlier "
                         "step-N or with --resume latest")
    raise TrainError(f"--resume {folder}: not a checkpoint folder ({marker} is missing) and "
                     "no complete step-N folder under it")


def prune_states(out: Path, marker: str, keep: int) -> None:
    """``--keep-last K``: remove all but the K newest complete ``step-N`` states of ``out``
    (0 keeps every state)."""
    if keep <= 0:
        return
    for _, p in _states(Path(out), marker)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


#: the lock file of a run folder while a run writes to it (pid and host inside)
LOCK_NAME = ".diffcr-train.lock"
# what a previous run leaves in its --out folder
_OUTPUTS = ("metrics.json", "diffcr", "lora", "model", "diffcr-frozen")


def _used_by(out: Path) -> List[str]:
    """The previous run's outputs in ``out`` (names, sorted)."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir()
                  if p.name in _OUTPUTS or (_STEP.match(p.name) and p.is_dir()))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


_HIDDEN = re.compile(r"^\.(.+)\.(tmp|old)-\d+$")


def _tidy(out: Path) -> None:
    """What killed runs left in ``out`` (the lock is held): hidden ``.NAME.tmp-PID`` siblings
    of :func:`atomic_folder` / :func:`atomic_file` are removed; a ``.NAME.old-PID`` whose
    ``NAME`` is absent (killed between the two renames of a replacement) is put back, as the
    complete previous version, and removed otherwise."""
    for p in sorted(out.iterdir()):
        m = _HIDDEN.match(p.name)
        if m is None:
            continue
        if m.group(2) == "old" and not (out / m.group(1)).exists():
            os.replace(p, out / m.group(1))
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def claim_out(cfg: TrainConfig) -> Iterator[None]:
    """The run folder ``cfg.out`` for one training run, held for the duration.

    * A folder that holds a previous run's outputs (``metrics.json``, ``diffcr/``, ``lora/``,
      ``model/``, ``step-N/``) is refused (:class:`TrainError`, one line) unless ``--resume``
      continues it or ``--overwrite`` replaces it; ``--overwrite`` removes the old ``step-N``
      states and ``metrics.json`` first (so ``--resume latest`` can never pick up the old run),
      and the old final outputs are replaced only once the new ones are complete.
    * The main process (``RANK`` 0) holds ``OUT/.diffcr-train.lock`` (created exclusively,
      with its pid and host) until the run ends: a second run on the same folder is refused
      while the first is alive. A lock left by a killed run (its pid gone on this host) is
      taken over with a warning, and the hidden temporary siblings killed runs left are
      tidied (:func:`_tidy`). A folder this call created is removed again if the run
      leaves it empty (refused before it wrote anything)."""
    out = Path(cfg.out)
    main = int(os.environ.get("RANK", "0")) == 0
    if cfg.resume is not None and cfg.overwrite:
        raise TrainError("--resume and --overwrite contradict each other: --resume continues "
                         "the run in --out, --overwrite replaces it")
    used = _used_by(out)
    if used and cfg.resume is None and not cfg.overwrite:
        raise TrainError(f"--out {out} holds a previous run's outputs ({', '.join(used[:4])}"
                         f"{', ...' if len(used) > 4 else ''}): pass --resume latest to "
                         "continue it, --overwrite to replace it, or another --out")
    if not main:
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_NAME
    host = os.uname().nodename
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                pid_s, _, owner = lock.read_text().strip().partition(" ")
                pid = int(pid_s)
            except (OSError, ValueError):  # half-written by a run killed right then
                pid, owner = -1, host
            if owner != host or (pid > 0 and _alive(pid)):
                raise TrainError(f"--out {out} is in use by another diffcr train (pid {pid} "
                                 f"on {owner}; lock file {lock}): wait for it to finish, or "
                                 "delete the lock file if that run is gone") from None
            warnings.warn(f"diffcr train: taking over {lock}, left by a run that was killed "
                          f"(pid {pid} is gone)", stacklevel=2)
            lock.unlink(missing_ok=True)
    else:
        raise TrainError(f"--out {out}: could not create the lock file {lock}")
    try:
        os.write(fd, f"{os.getpid()} {host}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        _tidy(out)
        if used and cfg.overwrite:
            for p in out.iterdir():
                if p.name == "metrics.json" or (_STEP.match(p.name) and p.is_dir()):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        yield
    finally:
        lock.unlink(missing_ok=True)
        if created and not any(out.iterdir()):  # a run refused before it wrote anything
            out.rmdir()


def write_checkpoints(model, out: Path, *, lora: bool = False, frozen: bool = False) -> None:
    """The checkpoints a user loads, of a converted ``model`` (left as it is):

    * ``out/diffcr``: the DiffCR checkpoint (routers, ratios, config; :func:`diffcr.save`);
    * ``out/lora``: the peft LoRA adapter (``lora``), else ``out/model``: the base model in
      diffusers' format (a reverted copy);
    * ``out/diffcr-frozen`` (``frozen``): the DiffCR checkpoint of a frozen copy (fixed k per
      block and region, for inference)."""
    import diffcr

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # each folder complete or absent; an existing one is replaced once the new one is complete
    with atomic_folder(out / "diffcr") as tmp:
        diffcr.save(model, tmp)
    if lora:
        with atomic_folder(out / "lora") as tmp:
            diffcr.save_lora(model, tmp)
    else:
        base = copy.deepcopy(model)
        diffcr.revert(base)
        with atomic_folder(out / "model") as tmp:
            base.save_pretrained(tmp)
    if frozen:
        copy_ = copy.deepcopy(model)
        diffcr.freeze(copy_)
        with atomic_folder(out / "diffcr-frozen") as tmp:
            diffcr.save(copy_, tmp)


def identical_across_ranks(params: List[torch.Tensor],
                           gather: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether ``params`` hold the same values on every process: ``gather`` maps this
    process's ``[1, n]`` float64 row to the ``[world, n]`` rows of all (e.g. accelerate's
    ``Accelerator.gather``)."""
    flat = torch.cat([p.detach().flatten().double() for p in params])[None]
    rows = gather(flat).cpu()
    return all(torch.equal(rows[0], r) for r in rows[1:])
