"""The suite still collects where diffusers is missing (the GPU image has none unless its wheel
is carried): modules that need it are skipped, nothing errors, and the op tests remain."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_suite_collects_without_diffusers(tmp_path):
    stub = tmp_path / "stub" / "diffusers"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'diffusers' (blocked)\", name='diffusers')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(stub.parent), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                        "-p", "no:cacheprovider", "-rs", str(ROOT / "tests")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert not re.search(r"\b\d+ errors?\b", out), out[-3000:]
    assert "ERROR collecting" not in out, out[-3000:]
    assert "diffusers is not installed" in out  # the converted-model modules were skipped
    assert "tests/kernels/test_ops.py::" in out and "tests/kernels/test_triton.py::" in out
