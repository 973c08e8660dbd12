"""One comparison, one run, equal footing: DiffCR variants, diffusers caches and their stack.

:func:`compare_methods` samples every method with the same sampler, seeds and labels, and
reports for each the measured wall-clock time of its sampling loop (and the speedup against the
dense model in the same run), the class accuracy of its samples and the classifier-FID, both per
seed so that the spread is visible next to the gaps. Seeds form the outer loop and methods the
inner one, so slow drift of the machine spreads over every method instead of favouring one.

A *method* is a model (dense or converted and frozen) plus an optional
:class:`~diffcr.app.demo.peers.CacheSetting` already applied to it (:class:`Method`).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
import contextlib
from typing import Callable, ContextManager, Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .metrics import class_accuracy, classifier_fid

__all__ = ["Method", "compare_methods"]


@dataclass
class Method:
    """One row of the comparison.

    Args:
        model: the denoiser (``model(x, timestep=t, class_labels=y).sample``), in eval mode;
            caches (if any) already attached.
        kind: ``"dense"``, ``"diffcr"`` (a DiffCR variant or a routing baseline), ``"cache"``,
            ``"diffcr+tokencache"`` (DiffCR with its token cache) or ``"diffcr+cache"``; used
            for the plot markers.
        kept_ratio: mean kept ratio of the routed blocks (1 for dense and caches).
        heldout_loss: held-out denoising loss, where it applies (None for caches: they change
            the sampling loop, not the denoiser).
        extra: anything else to carry into the metrics row.
        context: optional ``context() -> context manager`` entered around every sampling
            loop of this method (inside the timing), e.g. ``diffcr.mask_routing`` for
            mask-aware routing.
    """

    model: torch.nn.Module
    kind: str = "dense"
    kept_ratio: float = 1.0
    heldout_loss: Optional[float] = None
    extra: Dict = field(default_factory=dict)
    context: Optional[Callable[[], ContextManager]] = None


def compare_methods(methods: Mapping[str, Method], sampler: Callable[..., Tensor], clf,
                    real_images: Tensor, labels: Tensor, seeds: Sequence[int],
                    baseline: str = "dense", progress=None,
                    scores: Optional[Mapping[str, Callable[[Tensor], float]]] = None
                    ) -> Dict[str, dict]:
    """Sample every method at every seed and measure speed and quality.

    Args:
        methods: name -> :class:`Method`; must contain ``baseline``.
        sampler: ``sampler(model, labels, seed=seed) -> images [n, C, H, W]`` in [-1, 1]
            (the whole sampling loop; it must reset the model's cache state itself).
        clf: the evaluation classifier (:class:`~diffcr.app.demo.classifier.ShapeClassifier`).
        real_images: ``[m, C, H, W]`` held-out real images for the classifier-FID.
        labels: int64 ``[n]`` class of every sample (the same for every seed and method).
        seeds: sampling seeds (two or more give a spread).
        baseline: the method the speedups are measured against.
        progress: optional callable ``progress(name, seed, seconds)`` called after each sampling.
        scores: optional further quality scores, name -> ``score(images) -> float`` (lower or
            higher is better as the caller says), each reported like the class accuracy
            (``name`` the mean over seeds, ``name_per_seed`` the list).

    Returns:
        name -> row with ``sampling_s`` (per seed), ``sampling_s_total``,
        ``speedup_vs_dense`` (baseline total time / this total), ``class_accuracy`` and
        ``classifier_fid`` (means over seeds) with ``..._per_seed`` lists, ``kind``,
        ``mean_kept_ratio``, ``heldout_denoising_loss`` (or None) and ``samples`` (the images
        of the first seed, a tensor; drop it before writing JSON).
    """
    if baseline not in methods:
        raise ValueError(f"baseline {baseline!r} is not among the methods {list(methods)}")
    if not seeds:
        raise ValueError("need at least one seed")
    scores = dict(scores or {})
    rows: Dict[str, dict] = {name: {"sampling_s": [], "class_accuracy_per_seed": [],
                                    "classifier_fid_per_seed": [],
                                    **{f"{k}_per_seed": [] for k in scores}}
                             for name in methods}
    first: Dict[str, Tensor] = {}
    for seed in seeds:
        for name, m in methods.items():
            ctx = m.context() if m.context is not None else contextlib.nullcontext()
            t0 = time.perf_counter()
            with ctx:
                imgs = sampler(m.model, labels, seed=seed)
            dt = time.perf_counter() - t0
            r = rows[name]
            for k, fn in scores.items():
                r[f"{k}_per_seed"].append(float(fn(imgs)))
            r["sampling_s"].append(dt)
            r["class_accuracy_per_seed"].append(class_accuracy(clf, imgs, labels))
            r["classifier_fid_per_seed"].append(classifier_fid(clf, real_images, imgs))
            if name not in first:
                first[name] = imgs
            if progress is not None:
                progress(name, seed, dt)
    base_t = sum(rows[baseline]["sampling_s"])
    out = {}
    for name, m in methods.items():
        r = rows[name]
        tot = sum(r["sampling_s"])
        acc, fid = r["class_accuracy_per_seed"], r["classifier_fid_per_seed"]
        out[name] = {
            "kind": m.kind, "mean_kept_ratio": float(m.kept_ratio),
            "heldout_denoising_loss": m.heldout_loss,
            "sampling_s": r["sampling_s"], "sampling_s_total": tot,
            "speedup_vs_dense": base_t / tot if tot > 0 else float("nan"),
            "class_accuracy": statistics.fmean(acc), "class_accuracy_per_seed": acc,
            "classifier_fid": statistics.fmean(fid), "classifier_fid_per_seed": fid,
            **{k: statistics.fmean(r[f"{k}_per_seed"]) for k in scores},
            **{f"{k}_per_seed": r[f"{k}_per_seed"] for k in scores},
            "samples": first[name], **m.extra}
    return out


def frontier(rows: Mapping[str, Mapping], quality: str = "class_accuracy",
             speed: str = "speedup_vs_dense") -> list:
    """The names of the rows on the quality-vs-speed frontier: those no other row dominates
    (at least as good on both ``quality`` and ``speed``, better on one), in ``rows`` order."""
    def dominates(a, b):
        return (a[quality] >= b[quality] and a[speed] >= b[speed]
                and (a[quality] > b[quality] or a[speed] > b[speed]))

    return [n for n, r in rows.items()
            if not any(dominates(o, r) for m, o in rows.items() if m != n)]


def spread(values: Sequence[float]) -> float:
    """Half the range of per-seed values (0 for one seed): the +- printed next to a mean."""
    return (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
