"""A small CNN that classifies demo images; its penultimate features drive the demo's FID.

The Inception network of the usual FID would need a download and is far too slow on a CPU, so the
demo trains this ~70k-parameter classifier on the real images in a few seconds and measures
sample quality in its 64-d feature space (:mod:`diffcr.app.demo.metrics`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEATURE_DIM = 64


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class ShapeClassifier(nn.Module):
    """Small CNN for demo images: conv blocks of 16, 32 and 64 channels (3x3 conv, batch norm,
    ReLU; 2x2 max-pooling after the first two, a second 64-channel conv after the last), global
    average AND max pooling (concatenated: max-pooling keeps a small object's evidence from being
    averaged away by the background), a 64-d feature layer (linear + ReLU) and a linear head.

    Takes ``[n, C, H, W]`` images in [-1, 1] (C = ``in_channels``, 3 by default); any H, W
    divisible by 4 works (e.g. 16, 32, 64). ``forward`` returns logits ``[n, num_classes]``,
    :meth:`features` the 64-d penultimate features.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.num_classes = int(num_classes)
        self.body = nn.Sequential(
            _block(in_channels, 16), nn.MaxPool2d(2),
            _block(16, 32), nn.MaxPool2d(2),
            _block(32, 64), _block(64, 64))
        self.feat = nn.Sequential(nn.Linear(128, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate ``[n, feature_dim]`` features (with autograd; see :func:`features`)."""
        h = self.body(x)
        return self.feat(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train_classifier(images: Tensor, labels: Tensor, num_classes: int, steps: int = 300,
                     batch: int = 64, seed: int = 0, lr: float = 3e-3,
                     weight_decay: float = 1e-4, flip: bool = True,
                     verbose: bool = False) -> ShapeClassifier:
    """Train a :class:`ShapeClassifier` on ``images`` ``[n, 3, H, W]`` in [-1, 1] and int
    ``labels`` ``[n]``.

    AdamW with a short linear warm-up and cosine decay, ``steps`` minibatches of ``batch``
    images drawn with a private generator seeded by ``seed`` (deterministic; the global RNG is
    untouched), random horizontal flips when ``flip`` (all demo shapes are mirror-symmetric
    classes). Trains on the device of ``images``. Returns the model in eval mode.
    """
    if images.dim() != 4 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"need images [n, C, H, W] and labels [n], got {tuple(images.shape)} "
                         f"and {tuple(labels.shape)}")
    if images.shape[0] == 0:
        raise ValueError("no training images")
    device = images.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ShapeClassifier(num_classes, in_channels=images.shape[1]).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    labels = labels.to(device=device, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, steps // 20)

    def lr_at(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    n = images.shape[0]
    for step in range(steps):
        idx = torch.randint(0, n, (min(batch, n),), generator=g)
        x = images[idx.to(device)]
        if flip:
            f = (torch.rand(x.shape[0], generator=g) < 0.5).to(device)
            x = torch.where(f.view(-1, 1, 1, 1), x.flip(3), x)
        loss = F.cross_entropy(model(x), labels[idx.to(device)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if verbose and (step % 50 == 0 or step == steps - 1):
            print(f"classifier step {step:4d}  loss {loss.item():.4f}")
    return model.eval()


@torch.no_grad()
def _batched(model: ShapeClassifier, images: Tensor, batch: int, fn, width: int) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        outs = [fn(images[i:i + batch].to(dev, torch.float32)).float().cpu()
                for i in range(0, images.shape[0], batch)]
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0, width)


def features(model: ShapeClassifier, images: Tensor, batch: int = 256) -> Tensor:
    """Penultimate features ``[n, 64]`` (float32, CPU) of ``images``, in eval mode, no grad."""
    return _batched(model, images, batch, model.features, model.head.in_features)


def predict(model: ShapeClassifier, images: Tensor, batch: int = 256) -> Tensor:
    """Predicted labels int64 ``[n]`` (CPU) of ``images``, in eval mode, no grad."""
    return _batched(model, images, batch, model, model.num_classes).argmax(1)


def accuracy(model: ShapeClassifier, images: Tensor, labels: Tensor,
             batch: int = 256) -> float:
    """Fraction of ``images`` whose predicted label equals ``labels``."""
    labels = torch.as_tensor(labels).flatten().long().cpu()
    if labels.numel() != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.numel()} labels")
    if labels.numel() == 0:
        raise ValueError("accuracy of an empty set")
    return (predict(model, images, batch) == labels).float().mean().item()
