"""Every Triton kernel compiles for sm_80 and sm_90 on this GPU-less machine, through the
package's own launchers (python -m diffcr_kernels.triton.aot --quick), without register spills.
A kernel that would not compile on a GPU fails here. ``--quick`` compiles every kernel with
every optional-input combination at six (dtype, hidden size) pairs that reach every dtype and
row-length regime (about 45 s per target instead of 4-5 min); the whole matrix is
``python -m diffcr_kernels.triton.aot`` (results in benchmarks/results/*-triton-aot/).

Runs in a subprocess: this test process has the kernels defined under TRITON_INTERPRET=1, the
compiler needs them as JIT functions. A fresh Triton cache directory makes every kernel really
compile."""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

KERNELS = {"_gnm_fwd_kernel", "_gnm_bwd_kernel", "_scatter_fwd_kernel", "_scatter_bwd_kernel",
           "_token_cache_kernel", "_router_kernel", "_select_kernel"}


def test_every_triton_kernel_compiles_for_sm80_and_sm90(tmp_path):
    # one process per architecture, side by side: compiling is single-threaded, and this is
    # the slowest test of the suite
    procs = {}
    for arch in (80, 90):
        env = dict(os.environ, TRITON_INTERPRET="0",
                   TRITON_CACHE_DIR=str(tmp_path / f"cache{arch}"))
        procs[arch] = subprocess.Popen(
            [sys.executable, "-m", "diffcr_kernels.triton.aot", "--arch", str(arch), "--json",
             str(tmp_path / f"aot{arch}.json"), "-q", "--quick"], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    recs = []
    for arch, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=1500)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            raise
        assert proc.returncode == 0, out[-4000:] + err[-4000:]
        recs += json.loads((tmp_path / f"aot{arch}.json").read_text())["records"]
    assert not [x for x in recs if x["error"]]
    for arch in (80, 90):
        got = {x["kernel"] for x in recs if x["arch"] == arch}
        assert got == KERNELS, (arch, got)
    # resource figures came from the cubins (cuobjdump ships with triton): none spills, and
    # the launchers' tiles keep registers within what one SM gives a program
    assert all(x["registers"] is not None for x in recs)
    from diffcr_kernels.triton.aot import FP64_CALL_SPILL_BYTES

    spills = [x for x in recs if x["spill_bytes"] and not (
        " fp64 " in f" {x['spec']} " and x["spill_bytes"] <= FP64_CALL_SPILL_BYTES)]
    assert not spills, spills  # fp32/fp16/bf16: no spill at all
    assert all(x["registers"] * 32 * x["num_warps"] <= 65536 for x in recs)
    print(out.strip().splitlines()[-1])
