"""A pytest plugin that runs diffusers' own model test suites on converted models.

Loaded with ``-p convert_plugin`` (``run_suites.sh`` does it): every model of the seven
families that a test builds is converted by ``diffcr.convert`` at the end of its
``__init__`` (fresh routers, kept ratio 1, the ``sigmoid2x`` gate: the converted model
computes exactly what the original does), so each test of the suite runs against the
converted model. A model loaded with ``from_pretrained`` is converted once loaded, as a user
does (load, then convert): diffusers loads the checkpoint into the unconverted class (the
router and ratio a converted model saved are not among its keys) with its dtype rules, and the
conversion adds fresh float32 routers.

``DIFFCR_SUITE_KAPPA`` (default 1) sets every block's kept ratio after conversion (below 1
the suites' equality checks against stored outputs are expected to fail; it is there to see
which tests still run)."""
import functools
import os
import threading

import diffcr
import diffusers

FAMILY_CLASSES = ("PixArtTransformer2DModel", "DiTTransformer2DModel", "SD3Transformer2DModel",
                  "FluxTransformer2DModel", "WanTransformer3DModel",
                  "QwenImageTransformer2DModel", "HunyuanVideoTransformer3DModel")
CONVERTED = []
_LOADING = threading.local()


def _convert(model, cls):
    if type(model) is not cls or diffcr.is_converted(model):
        return
    try:
        diffcr.convert(model, diffcr.DiffCRConfig())
    except TypeError as e:  # e.g. HunyuanVideo's token-replace blocks: refused by design
        CONVERTED.append((cls.__name__, f"refused: {str(e)[:80]}"))
        return
    kappa = float(os.environ.get("DIFFCR_SUITE_KAPPA", "1"))
    if kappa < 1:
        import torch

        with torch.no_grad():
            for b in diffcr.routed_blocks(model).values():
                b.ratio.kept.fill_(kappa)
    CONVERTED.append((cls.__name__, "converted"))


def _wrap(cls):
    init = cls.__init__
    load = cls.from_pretrained.__func__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not getattr(_LOADING, "on", False):
            _convert(self, cls)

    @functools.wraps(load)
    def from_pretrained(klass, *args, **kwargs):
        _LOADING.on = True
        try:
            out = load(klass, *args, **kwargs)
        finally:
            _LOADING.on = False
        model = out[0] if isinstance(out, tuple) else out
        _convert(model, cls)
        return out

    cls.__init__ = __init__
    cls.from_pretrained = classmethod(from_pretrained)


def pytest_configure(config):
    for name in FAMILY_CLASSES:
        _wrap(getattr(diffusers, name))


def pytest_terminal_summary(terminalreporter):
    from collections import Counter

    c = Counter(CONVERTED)
    terminalreporter.write_line(f"diffcr convert_plugin: {sum(c.values())} models built; "
                                + ", ".join(f"{n} {s}: {k}" for (n, s), k in sorted(c.items())))
