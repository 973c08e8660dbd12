"""A converted tiny PixArt / DiT computes exactly what it computed when the pins were written
(``tests/models/pins.py``): outputs of eval, frozen and two-bin training forwards on both execution
paths, and the router and ratio gradients. Bitwise under the torch version that wrote them
(the one CI's main stage installs) on a CPU with the same vector capability (torch's CPU
kernels pick their code by it: AVX2 and AVX-512 round differently); within float32 rounding
otherwise."""
import pytest
import torch

from pins import PIN_FILE, compute_pins


@pytest.fixture(scope="module")
def pins():
    return torch.load(PIN_FILE, weights_only=True)


@pytest.fixture(scope="module")
def current():
    return compute_pins()


def test_pinned_outputs(pins, current):
    same_torch = (pins["_torch_version"] == str(torch.__version__)
                  and pins.get("_cpu_capability") == torch.backends.cpu.get_cpu_capability())
    expected = {k: v for k, v in pins.items() if not k.startswith("_")}
    assert sorted(current) == sorted(expected)
    differ = []
    for key, want in expected.items():
        got = current[key]
        assert got.shape == want.shape and got.dtype == want.dtype, key
        ok = torch.equal(got, want) if same_torch else torch.allclose(got, want, rtol=1e-4,
                                                                       atol=1e-5)
        if not ok:
            differ.append(f"{key}: max |diff| {(got - want).abs().max().item():.3g}")
    assert not differ, "pinned outputs changed:\n" + "\n".join(differ)


def test_pins_exercise_routing(pins):
    """The pins would catch a change: paths and modes give different values, gradients flow."""
    for kind in ("pixart", "dit"):
        assert not torch.equal(pins[f"{kind}/kappa1/eval"], pins[f"{kind}/fused/eval"])
        assert not torch.equal(pins[f"{kind}/fused/eval"], pins[f"{kind}/fused/train"])
        for path in ("fused", "compat"):
            assert pins[f"{kind}/{path}/grad/router0"].abs().sum() > 0
            assert pins[f"{kind}/{path}/grad/ratio1"].abs().sum() > 0
