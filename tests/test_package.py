"""The installed package: CLI, backend report, and the pure-Python fallback."""
import json
import os
import subprocess
import sys
import tempfile

import torch

import diffcr
import diffcr_kernels as dk
from diffcr_kernels import _ext


def _python(argv, env=None, timeout=120):
    # run outside the repository so that the installed package is imported, not the source tree
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout,
                          cwd=tempfile.gettempdir())


def _run(args, env=None):
    return _python(["-m", "diffcr", *args], env)


def test_version_command():
    r = _run(["--version"])
    assert r.returncode == 0 and r.stdout.strip() == f"diffcr {diffcr.__version__}"


def test_info_json_reports_backends():
    r = _run(["info", "--json"])
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["torch"] == torch.__version__
    assert d["kernel_backends"]["reference"]["status"] == "loaded"
    if _ext.LOADED:
        assert d["kernel_backends"]["cpu"]["status"] == "loaded"
        assert d["extension"]["error"] is None
    else:
        assert d["kernel_backends"]["cpu"]["status"] == "unavailable"
        assert d["kernel_backends"]["cpu"]["detail"]


def test_info_text():
    r = _run(["info"])
    assert r.returncode == 0
    assert "kernel backends" in r.stdout and "reference" in r.stdout


def test_no_command_prints_help_and_fails():
    r = _run([])
    assert r.returncode == 2 and "usage" in r.stderr


def test_cuda_report_matches_build_info():
    rep = dk.available_backends()
    if not _ext.LOADED:
        return
    if _ext.BUILD_INFO.get("cuda_kernels"):
        assert rep["cuda"]["status"] in ("loaded", "compiled")
    else:
        assert rep["cuda"]["status"] == "unavailable" and rep["cuda"]["detail"]


def test_library_works_without_extension():
    """With the extension disabled every public op still runs (reference) and the report says
    why the compiled backends are missing."""
    code = r"""
import torch, diffcr_kernels as dk
rep = dk.available_backends()
assert rep["cpu"]["status"] == "unavailable" and "DIFFCR_DISABLE_EXT" in rep["cpu"]["detail"], rep
x = torch.randn(2, 9, 8)
s = dk.router_scores(x, torch.randn(8))
sel = dk.select_topk(s, torch.tensor([3, 9]))
assert dk.resolve_backend("scatter_back", x.device) == "reference"
y = dk.gather_norm_modulate(x, sel.indices)
out = dk.scatter_back_selection(x, sel, y)
assert out.shape == x.shape and torch.isfinite(out).all()
print("ok")
"""
    r = _python(["-c", code], env={"DIFFCR_DISABLE_EXT": "1"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_one_schema_table_for_both_kernel_families():
    """torch.ops.diffcr (C++/CUDA kernels, which only implement the ops) and
    torch.ops.diffcr_triton are both registered from diffcr_kernels._schemas, and every op of
    the table has its kernels."""
    import torch

    from diffcr_kernels import ops
    from diffcr_kernels._schemas import SCHEMAS

    assert _ext._OPS == tuple(SCHEMAS)
    namespaces = ["diffcr"] if _ext.LOADED else []
    if not ops.TRITON_ERROR and dk.triton.AVAILABLE:
        namespaces.append("diffcr_triton")
    for name, schema in SCHEMAS.items():
        for ns in namespaces:
            op = getattr(getattr(torch.ops, ns), name).default
            assert str(op._schema) == f"{ns}::{name}{schema}"
        if _ext.LOADED:
            assert _ext.has_kernel(name, "CPU"), f"no CPU kernel for diffcr::{name}"
            if _ext.BUILD_INFO.get("cuda_kernels"):
                assert _ext.has_kernel(name, "CUDA"), f"no CUDA kernel for diffcr::{name}"


def test_the_library_never_imports_the_application():
    """diffcr's library modules (and a convert + forward + save/load round) leave diffcr.app —
    the CLI, `diffcr train`, the bench harness, the demo — unimported."""
    code = (
        "import sys, torch, tempfile\n"
        "import diffcr, diffcr.config, diffcr.convert, diffcr.routing, diffcr.models, diffcr.io, diffcr.modules,"
        " diffcr.training, diffcr.cpu, diffcr_kernels\n"
        "from diffusers import DiTTransformer2DModel\n"
        "m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,"
        " out_channels=8, num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)\n"
        "diffcr.convert(m)\n"
        "m(torch.randn(1, 4, 8, 8), timestep=torch.tensor([3]), class_labels=torch.tensor([1]))\n"
        "d = tempfile.mkdtemp(); diffcr.save(m, d); diffcr.load(m, d)\n"
        "bad = sorted(k for k in sys.modules if k.startswith('diffcr.app'))\n"
        "assert not bad, bad\n"
        "print('ok')\n")
    r = _python(["-c", code], timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_installed_package_ships_the_dense_demo_model():
    """The demo's dense DiT travels with the package (package_data), small, and loads."""
    code = ("import json; from diffcr.app.demo.run import shipped_dense_path, load_shipped_dense; "
            "p = shipped_dense_path(); m = load_shipped_dense(); "
            "print(json.dumps({'size': sum(f.stat().st_size for f in p.iterdir()), "
            "'loaded': m is not None, 'steps': json.loads((p / 'training.json').read_text())"
            "['steps']}))")
    r = _python(["-c", code])
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout)
    assert d["loaded"] and d["steps"] >= 1000
    assert d["size"] <= 10 * 2 ** 20
