"""Build script: drives CMake to build the compiled extension ``diffcr_kernels._C``.

Environment flags
-----------------
DIFFCR_SKIP_EXT=1     build no extension (pure Python; every op falls back to the reference).
DIFFCR_FORCE_CUDA=1   compile the CUDA kernels even if the installed torch is a CPU build
                      (fails if nvcc is missing). Without it, CUDA kernels are compiled whenever
                      torch is a CUDA build (``torch.version.cuda``) and nvcc is found; a GPU need
                      not be present.
DIFFCR_NO_CUDA=1      never compile the CUDA kernels.
DIFFCR_CUDA_ARCHS     CMake CUDA architectures, default "80;90" (sm_80 + sm_90 with PTX).
DIFFCR_CPU_FLAGS      extra flags for the CPU kernels, default "-march=native" for source builds;
                      set it to "" for a portable binary.
DIFFCR_DEBUG=1        bound checks inside the kernels.
MAX_JOBS              parallel compile jobs (default: number of CPUs).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_cuda():
    """(nvcc, toolkit root) or (None, None). The root must hold include/cuda_runtime.h; an nvcc
    on PATH may be a wrapper script, so the toolkit's own bin/nvcc is preferred."""
    roots = [os.environ[v] for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    for cand in filter(None, [os.environ.get("CUDACXX"), shutil.which("nvcc")]):
        roots.append(str(Path(cand).resolve().parent.parent))
    roots.append("/usr/local/cuda")
    for root in map(Path, roots):
        nvcc = root / "bin" / "nvcc"
        if nvcc.exists() and (root / "include" / "cuda_runtime.h").exists():
            return str(nvcc), root
    return None, None


def _nvidia_dirs():
    try:
        import nvidia  # type: ignore

        return [Path(p) for p in nvidia.__path__]
    except ImportError:
        return []


def _find_cuda_lib(cuda_root: Path, stem: str):
    """A CUDA library that torch's CMake config links (e.g. nvrtc) but that a minimal toolkit may
    lack: look in the toolkit first, then in the nvidia-* wheels that came with CUDA torch."""
    cands = []
    for d in (cuda_root / "lib64", cuda_root / "lib"):
        cands += sorted(d.glob(f"lib{stem}.so*"))
    for base in _nvidia_dirs():
        cands += sorted(base.glob(f"*/lib/lib{stem}.so*"))
    return str(cands[0]) if cands else None


def _torch_arch_list(archs: str) -> str:
    """"80;90" -> "8.0;9.0" (TORCH_CUDA_ARCH_LIST, read by torch's CMake config)."""
    out = []
    for a in archs.replace(",", ";").split(";"):
        digits = "".join(ch for ch in a.split("-")[0] if ch.isdigit())
        if len(digits) >= 2:
            out.append(f"{digits[:-1]}.{digits[-1]}")
    return ";".join(out)


def _extra_cuda_includes():
    """Headers that torch's CUDA headers include (cublas, cusparse, ...) may be missing from a
    minimal CUDA toolkit; the pip-installed nvidia-* wheels that come with CUDA torch have them."""
    dirs = []
    for base in _nvidia_dirs():
        for inc in sorted(base.glob("*/include")):
            if (inc / "cublas_v2.h").exists() or (inc / "cusparse.h").exists():
                dirs.append(str(inc))
    return dirs


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        if _flag("DIFFCR_SKIP_EXT"):
            print("diffcr: DIFFCR_SKIP_EXT=1, building no compiled extension")
            return
        super().run()

    def build_extension(self, ext):
        try:
            import torch
        except ImportError as e:  # pragma: no cover - message path
            raise RuntimeError(
                "diffcr: building the extension needs torch installed in this environment. "
                "Install torch first and use `pip install --no-build-isolation .`, "
                "or set DIFFCR_SKIP_EXT=1 for a pure-Python install."
            ) from e
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError(
                "diffcr: cmake not found. `pip install cmake ninja` (or set DIFFCR_SKIP_EXT=1)."
            )
        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = out_path.parent
        out_dir.mkdir(parents=True, exist_ok=True)

        nvcc, cuda_root = _find_cuda()
        with_cuda = False
        why_no_cuda = ""
        if _flag("DIFFCR_NO_CUDA"):
            why_no_cuda = "DIFFCR_NO_CUDA=1"
        elif _flag("DIFFCR_FORCE_CUDA") or torch.version.cuda is not None:
            if nvcc is None:
                if _flag("DIFFCR_FORCE_CUDA"):
                    raise RuntimeError("diffcr: DIFFCR_FORCE_CUDA=1 but nvcc was not found")
                why_no_cuda = "torch is a CUDA build but nvcc was not found"
            else:
                with_cuda = True
        else:
            why_no_cuda = "torch is a CPU build (set DIFFCR_FORCE_CUDA=1 to compile CUDA anyway)"

        archs = os.environ.get("DIFFCR_CUDA_ARCHS", "80;90")
        cpu_flags = os.environ.get("DIFFCR_CPU_FLAGS", "-march=native")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        # One CMake build dir per configuration: a cache configured against another torch (or
        # without CUDA) must never be reused when the environment changes.
        key = hashlib.sha1(repr((torch.__version__, torch.__file__, sys.executable, with_cuda,
                                 archs, cpu_flags, _flag("DIFFCR_DEBUG"))).encode()).hexdigest()
        build_temp = Path(self.build_temp).resolve() / f"cmake-{key[:12]}"
        build_temp.mkdir(parents=True, exist_ok=True)
        args = [
            cmake,
            str(ROOT),
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DDIFFCR_OUTPUT_NAME={out_path.name}",
            f"-DDIFFCR_CPU_FLAGS={cpu_flags}",
            f"-DDIFFCR_DEBUG={'ON' if _flag('DIFFCR_DEBUG') else 'OFF'}",
            f"-DPython_EXECUTABLE={sys.executable}",
        ]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        if with_cuda:
            args += [
                "-DDIFFCR_WITH_CUDA=ON",
                f"-DDIFFCR_CUDA_ARCHS={archs}",
                f"-DCMAKE_CUDA_COMPILER={nvcc}",
                "-DDIFFCR_EXTRA_CUDA_INCLUDES=" + ";".join(_extra_cuda_includes()),
            ]
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _torch_arch_list(archs))
        if torch.version.cuda is not None:
            # A CUDA build of torch: its CMake package looks for the toolkit even when only the
            # CPU kernels are compiled (DIFFCR_NO_CUDA=1), so it gets the same hints.
            if cuda_root is None:
                raise RuntimeError(
                    f"diffcr: torch {torch.__version__} is a CUDA build and no CUDA toolkit was "
                    "found; torch's CMake package needs one even for the CPU kernels. Install "
                    "the toolkit (nvcc), use the CPU build of torch, or set DIFFCR_SKIP_EXT=1.")
            args += [f"-DCUDAToolkit_ROOT={cuda_root}", f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_root}"]
            nvrtc = _find_cuda_lib(cuda_root, "nvrtc")
            if nvrtc:
                args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc}")
        print("diffcr: cmake configure:", " ".join(args), flush=True)
        subprocess.check_call(args, cwd=build_temp)
        subprocess.check_call([cmake, "--build", ".", "-j", jobs], cwd=build_temp)

        info = {
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cuda_kernels": with_cuda,
            "why_no_cuda": why_no_cuda,
            "cuda_archs": archs if with_cuda else None,
            "cpu_flags": cpu_flags,
            "debug": _flag("DIFFCR_DEBUG"),
        }
        (out_dir / "_build_info.json").write_text(json.dumps(info, indent=2))
        print(f"diffcr: built {out_path.name}: cuda kernels: {with_cuda} {why_no_cuda}", flush=True)


packages = find_packages(where="python") + find_packages(include=["diffcr_kernels", "diffcr_kernels.*"])

setup(
    packages=packages,
    package_dir={"diffcr": "python/diffcr", "diffcr_kernels": "diffcr_kernels"},
    package_data={"diffcr_kernels": ["_build_info.json"],
                  "diffcr": ["app/demo/dense_dit/*.json", "app/demo/dense_dit/*.safetensors"]},
    ext_modules=[] if _flag("DIFFCR_SKIP_EXT") else [CMakeExtension("diffcr_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
