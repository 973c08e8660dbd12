"""Memory safety of the compiled ops without the Python layer: ``torch.ops.diffcr.*`` called
directly, and through ``torch.compile``, with arbitrary shapes, dtypes, values, strides and
storage offsets (hypothesis, derandomized), in a subprocess so that a crash fails the test
instead of killing the run. The worker (``fuzz_raw_ops_worker.py``) also checks that no call
writes outside its output tensor or into an input it does not own."""
import os
import re
import subprocess
import sys

import pytest

import diffcr_kernels as dk

pytestmark = pytest.mark.skipif(dk.available_backends()["cpu"]["status"] != "loaded",
                                reason="the compiled CPU ops (diffcr_kernels._C) are not built")

WORKER = os.path.join(os.path.dirname(__file__), "fuzz_raw_ops_worker.py")


def _run(*args, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, WORKER, *args], capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, (f"worker exited with {r.returncode} (negative: killed by a "
                               f"signal, i.e. a crash)\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    m = re.search(r"fuzz: (\d+) calls, (\d+) ran, (\d+) refused", r.stdout)
    assert m, r.stdout + r.stderr[-3000:]
    calls, ran, refused = map(int, m.groups())
    # both outcomes must be exercised, or the fuzzing proves little
    assert ran >= calls // 20 and refused >= calls // 20, m.group(0)
    return calls


def test_raw_ops_never_crash_or_write_out_of_bounds():
    assert _run("300") == 6 * 300


def test_raw_ops_under_torch_compile_never_crash():
    assert _run("25", "--compile") == 6 * 25
