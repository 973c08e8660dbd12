"""benchmarks/gpu_check.sh on a CPU machine: its preflight refuses to start without a GPU and
says why, its global deadline cuts and skips steps, a TERM still leaves a summary, and every
exit writes steps.tsv + summary.md under $OUT. (The GPU steps themselves are replaced by
sleeps: GPU_CHECK_DRY_RUN=1.)"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["build", "gpu_tests", "triton_tests", "memcheck", "bench_b8", "bench_b1",
         "bench_autocast", "bench_compile", "bench_families", "suites"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _fake_smi(tmp_path: Path, gpus: int = 1) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    smi = d / "nvidia-smi"
    smi.write_text("#!/bin/sh\n"
                   "case \"$*\" in\n"
                   "  *compute_cap*) echo 9.0 ;;\n"
                   f"  *name*) for i in $(seq {gpus}); do echo 'NVIDIA H100 80GB HBM3'; done ;;\n"
                   "  *) echo 'fake nvidia-smi' ;;\n"
                   "esac\n")
    smi.chmod(0o755)
    return d


def _env(tmp_path, **kw):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "OUT"))}
    env.update(OUT=str(tmp_path / "out"), SITE=str(tmp_path / "site"), PYTHON=sys.executable)
    env.update({k: str(v) for k, v in kw.items()})
    return env


def _steps(out: Path):
    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()[1:]]
    return {r[0]: r[1] for r in rows}, [r[0] for r in rows]


def test_preflight_stops_without_a_gpu_and_names_it(tmp_path):
    env = _env(tmp_path, NVIDIA_SMI=str(tmp_path / "no-such-nvidia-smi"))
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                       timeout=300)
    out = tmp_path / "out"
    assert r.returncode == 2, r.stdout + r.stderr
    status, order = _steps(out)
    assert order == ["preflight"], order  # nothing after a failed preflight
    assert "a GPU: nvidia-smi reports none" in status["preflight"]
    pre = (out / "preflight.txt").read_text()
    assert "MISSING: a GPU" in pre and "torch " in pre and "numpy " in pre
    summary = (out / "summary.md").read_text()
    assert "| preflight | failed" in summary


def test_deadline_cuts_the_running_step_and_skips_the_rest(tmp_path):
    env = _env(tmp_path, PATH=f"{_fake_smi(tmp_path)}:{os.environ['PATH']}",
               GPU_CHECK_DRY_RUN=1, GPU_CHECK_DRY_STEP_S=60, GPU_CHECK_DEADLINE=20,
               GPU_CHECK_RESERVE=2)
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                       timeout=120)
    out = tmp_path / "out"
    status, order = _steps(out)
    assert order == ["preflight"] + STEPS, (order, r.stdout)
    # the 60 s step was cut to the time left before the 20 s deadline, the rest skipped
    assert status["build"].startswith("timeout after"), status
    assert int(status["build"].split()[2].rstrip("s")) < 20, status
    assert all(status[s] == "skipped (deadline)" for s in STEPS[1:]), status
    assert r.returncode == 1
    assert "compute capability: 90" in (out / "preflight.txt").read_text()
    summary = (out / "summary.md").read_text()
    assert "| build | timeout after" in summary and "| suites | skipped (deadline)" in summary


def test_steps_that_fit_run_in_order(tmp_path):
    env = _env(tmp_path, PATH=f"{_fake_smi(tmp_path)}:{os.environ['PATH']}",
               GPU_CHECK_DRY_RUN=1, GPU_CHECK_DRY_STEP_S=0, GPU_CHECK_DEADLINE=300)
    r = subprocess.run(["bash", str(SCRIPT), "quick"], env=env, capture_output=True,
                       text=True, timeout=280)
    status, order = _steps(tmp_path / "out")
    assert order == ["preflight"] + STEPS, (order, r.stdout)
    assert all(status[s] == "ok" for s in STEPS), status
    assert r.returncode == 0, r.stdout + r.stderr


def test_several_gpus_add_the_context_parallel_step(tmp_path):
    """With more than one GPU the script also times routing under context parallelism
    (benchmarks/cp_block_time.py over every GPU), before the benchmark suites."""
    env = _env(tmp_path, PATH=f"{_fake_smi(tmp_path, gpus=2)}:{os.environ['PATH']}",
               GPU_CHECK_DRY_RUN=1, GPU_CHECK_DRY_STEP_S=0, GPU_CHECK_DEADLINE=300)
    r = subprocess.run(["bash", str(SCRIPT), "quick"], env=env, capture_output=True,
                       text=True, timeout=280)
    status, order = _steps(tmp_path / "out")
    assert order == ["preflight"] + STEPS[:-1] + ["cp_multi_gpu", "suites"], (order, r.stdout)
    assert status["cp_multi_gpu"] == "ok" and r.returncode == 0, r.stdout + r.stderr


def test_term_still_writes_the_summary(tmp_path):
    env = _env(tmp_path, PATH=f"{_fake_smi(tmp_path)}:{os.environ['PATH']}",
               GPU_CHECK_DRY_RUN=1, GPU_CHECK_DRY_STEP_S=120, GPU_CHECK_DEADLINE=500)
    p = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = tmp_path / "out"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:  # wait until the first step is running
        if (out / "log.txt").exists() and "build (timeout" in (out / "log.txt").read_text():
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    try:
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert rc == 3, p.stdout.read()
    status, order = _steps(out)
    assert "interrupted" in order
    assert (out / "summary.md").exists()


def test_sanitizer_workload_runs_on_cpu(tmp_path):
    """The workload gpu_check.sh runs under compute-sanitizer (every op, in-place included,
    vector and scalar widths, four dtypes) runs here on the CPU kernels."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sanitize_ops.py"),
                        "--device", "cpu"], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(": ok") == 8, r.stdout
