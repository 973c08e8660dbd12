"""Sample-quality metrics for the demo: a Frechet distance in the feature space of the demo's
:class:`~diffcr.app.demo.classifier.ShapeClassifier` ("classifier FID") and class accuracy of
class-conditional samples."""
from __future__ import annotations

from typing import Union

import numpy as np
import torch
from torch import Tensor

from .classifier import ShapeClassifier, accuracy, features

ArrayLike = Union[Tensor, np.ndarray]


def _as_f64(x: ArrayLike, name: str) -> Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if t.dim() != 2:
        raise ValueError(f"{name} must be [n, d] features, got shape {tuple(t.shape)}")
    if t.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples for a covariance, got {t.shape[0]}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} has non-finite values")
    return t


def _sym_sqrt(c: Tensor) -> Tensor:
    """Square root of a symmetric PSD matrix via eigh (tiny negative eigenvalues clamped)."""
    w, v = torch.linalg.eigh((c + c.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[n_a, d]`` and ``[n_b, d]``.

    ``||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)``, the FID formula, with
    unbiased covariances, computed in float64. Both square roots are symmetric eigen-decomposition
    roots with tiny negative eigenvalues clamped to 0, so rank-deficient covariances (fewer
    samples than dimensions, dead features) are fine and no complex values or warnings arise.
    Needs n >= 2 per set; the result is clamped at 0 (it is ~1e-12 for identical sets).
    """
    a, b = _as_f64(feats_a, "feats_a"), _as_f64(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    d = a.shape[1]
    ca, cb = torch.cov(a.T).reshape(d, d), torch.cov(b.T).reshape(d, d)   # d = 1 gives a scalar
    sa = _sym_sqrt(ca)
    m = sa @ cb @ sa
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    fd = ((mu_a - mu_b) ** 2).sum() + ca.trace() + cb.trace() - 2 * tr_covmean
    return max(float(fd), 0.0)


def classifier_fid(model: ShapeClassifier, real_images: Tensor, fake_images: Tensor,
                   batch: int = 256) -> float:
    """Frechet distance between the :func:`~diffcr.app.demo.classifier.features` of real and
    generated images (``[n, 3, H, W]`` in [-1, 1]); lower is better. Only comparable between runs
    that use the same classifier and similar sample counts (the estimate is biased upwards for
    small n)."""
    return frechet_distance(features(model, real_images, batch),
                            features(model, fake_images, batch))


def class_accuracy(model: ShapeClassifier, images: Tensor, labels: Tensor,
                   batch: int = 256) -> float:
    """Fraction of generated ``images`` that the classifier assigns to their conditioning class
    ``labels``; higher is better."""
    return accuracy(model, images, labels, batch)
