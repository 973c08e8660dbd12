"""Test setup: single-threaded torch, Triton interpreted only where no GPU is present,
backend/device parametrisation.

Triton: with a CUDA device the Triton tests run the compiled kernels (TRITON_INTERPRET is
forced to 0: the interpreter is ~300x slower and, with triton 3.6, crashes under numpy >= 2.4);
without one, TRITON_INTERPRET=1 is set (unless the environment says otherwise) so that the
Triton kernels run on CPU tensors. Either way it is decided before any kernel is imported.

DIFFCR_REQUIRE_EXT=1 (set by .ci/run) turns a missing compiled extension into a test failure
instead of a skip, so CI cannot pass by silently testing only the reference.
"""
import os

import torch

if torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "0"
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton kernel import

import pytest  # noqa: E402

torch.set_num_threads(1)

from diffcr_kernels import _ext  # noqa: E402

REQUIRE_EXT = os.environ.get("DIFFCR_REQUIRE_EXT", "0") == "1"
HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    if REQUIRE_EXT and not _ext.LOADED:
        raise pytest.UsageError(
            f"DIFFCR_REQUIRE_EXT=1 but the compiled extension did not load: {_ext.LOAD_ERROR}")


def _device_params():
    return [pytest.param("cpu", id="cpu"),
            pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
                not HAS_CUDA, reason="needs a CUDA device")])]


@pytest.fixture(params=_device_params())
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=["ext", "triton"])
def ext_backend(request, device):
    """A kernel backend for ``device``: the compiled extension ("cpu" / "cuda") or Triton
    (compiled on CUDA, interpreted on CPU). A missing extension skips, and fails under
    DIFFCR_REQUIRE_EXT=1; Triton is a hard dependency on Linux, so its absence fails."""
    if request.param == "triton":
        from diffcr_kernels import ops

        why = ops._triton_ok(device)
        if why:
            pytest.fail(f"Triton backend unavailable: {why}")
        return "triton"
    key = "CUDA" if device.type == "cuda" else "CPU"
    if not _ext.has_kernel("scatter_back", key):
        msg = f"compiled {key} kernels not available: {_ext.LOAD_ERROR or 'not built'}"
        if REQUIRE_EXT:
            pytest.fail(msg)
        pytest.skip(msg)
    return device.type


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
