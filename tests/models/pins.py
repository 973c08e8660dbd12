"""Outputs of the tiny converted models, pinned bit for bit
(``tests/models/data/pinned_outputs.pt``).

Refactors of the routing runtime must not change what a converted model computes. This module
computes, for the tiny PixArt and DiT of :mod:`tiny_models`, the outputs of a set of routed
forwards (eval and train, both execution paths, frozen) and the gradients of the router and
ratio parameters; ``tests/models/test_pinned_outputs.py`` compares them with the stored file.

Regenerate (only when a change of results is intended, and say so in the commit)::

    python tests/models/pins.py --write
"""
import os
import sys

import torch

# tests/, where tiny_models lives
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import diffcr  # noqa: E402
from diffcr import DiffCRConfig  # noqa: E402

from tiny_models import make, set_ratios  # noqa: E402

PIN_FILE = os.path.join(os.path.dirname(__file__), "data", "pinned_outputs.pt")
KINDS = ("pixart", "dit")
PATHS = ("fused", "compat")


def _inputs(kind, t=(100, 900)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(t), 4, 8, 8, generator=g)
    tt = torch.tensor(t)
    if kind == "pixart":
        return dict(hidden_states=x, encoder_hidden_states=torch.randn(len(t), 5, 32, generator=g),
                    timestep=tt)
    return dict(hidden_states=x, timestep=tt, class_labels=torch.tensor([1, 3]))


def _model(kind, path, gate="sigmoid2x"):
    m = make(kind)
    diffcr.convert(m, DiffCRConfig(num_regions=4, path=path, gate=gate))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for b in diffcr.routed_blocks(m).values():
            b.router.weight.copy_(torch.randn(b.router.weight.shape, generator=g))
    return m


def compute_pins():
    torch.set_num_threads(1)
    out = {}
    for kind in KINDS:
        kw = _inputs(kind)
        m = _model(kind, "auto")
        set_ratios(m, 1.0)
        with torch.no_grad():
            out[f"{kind}/kappa1/eval"] = m(**kw).sample
        for path in PATHS:
            m = _model(kind, path)
            set_ratios(m, [0.3, 0.5, 0.8, 1.0])
            with torch.no_grad():
                out[f"{kind}/{path}/eval"] = m(**kw).sample
            diffcr.freeze(m)
            with torch.no_grad():
                out[f"{kind}/{path}/frozen"] = m(**kw).sample
            m = _model(kind, path)
            set_ratios(m, [0.35, 0.55, 0.75, 0.95])
            m.train()
            torch.manual_seed(7)
            y = m(**kw).sample
            out[f"{kind}/{path}/train"] = y.detach()
            (y.square().mean() + diffcr.ratio_loss(m)).backward()
            for i, b in diffcr.routed_blocks(m).items():
                out[f"{kind}/{path}/grad/router{i}"] = b.router.weight.grad
                out[f"{kind}/{path}/grad/ratio{i}"] = b.ratio.kept.grad
    return {k: v.detach().clone() for k, v in out.items()}


if __name__ == "__main__":
    if "--write" not in sys.argv:
        sys.exit("usage: python tests/models/pins.py --write")
    pins = compute_pins()
    pins["_torch_version"] = str(torch.__version__)
    pins["_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    torch.save(pins, PIN_FILE)
    print(f"wrote {len(pins) - 1} tensors to {PIN_FILE}")
