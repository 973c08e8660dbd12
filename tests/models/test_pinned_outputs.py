"""A converted tiny PixArt / DiT computes exactly what it computed when the pins were written
(``tests/models/pins.py``): outputs of eval, frozen and two-bin training forwards on both execution
paths, and the router and ratio gradients, within float32 rounding (``RTOL``/``ATOL``).

Not bitwise: the same torch on two CPUs that both report AVX-512 rounds differently (oneDNN and
MKL choose kernels by the CPU model, not only by the capability torch reports); pins written on
one CI machine differed by 4e-6 on the next. The tolerance is far below what any change to
routing moves (``test_pins_exercise_routing`` checks that the modes differ by more than it)."""
import pytest
import torch

from pins import PIN_FILE, compute_pins

RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def pins():
    return torch.load(PIN_FILE, weights_only=True)


@pytest.fixture(scope="module")
def current():
    return compute_pins()


def test_pinned_outputs(pins, current):
    expected = {k: v for k, v in pins.items() if not k.startswith("_")}
    assert sorted(current) == sorted(expected)
    differ = []
    for key, want in expected.items():
        got = current[key]
        assert got.shape == want.shape and got.dtype == want.dtype, key
        if not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
            differ.append(f"{key}: max |diff| {(got - want).abs().max().item():.3g}")
    assert not differ, "pinned outputs changed:\n" + "\n".join(differ)


def test_pins_exercise_routing(pins):
    """The pins would catch a change: paths and modes give different values, gradients flow."""
    for kind in ("pixart", "dit"):
        for a, b in (("kappa1/eval", "fused/eval"), ("fused/eval", "fused/train")):
            assert not torch.allclose(pins[f"{kind}/{a}"], pins[f"{kind}/{b}"], rtol=RTOL,
                                      atol=ATOL), (kind, a, b)
        for path in ("fused", "compat"):
            assert pins[f"{kind}/{path}/grad/router0"].abs().sum() > 0
            assert pins[f"{kind}/{path}/grad/ratio1"].abs().sum() > 0
