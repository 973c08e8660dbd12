"""CI check of the installed extension: the CPU kernels load, and the CUDA kernels were compiled
for every requested architecture (machine code for sm_XX inside the library's fat binary).
Exits non-zero with a message otherwise."""
import os
import sys

import diffcr_kernels as dk
from diffcr_kernels import _ext

want_cuda = os.environ.get("EXPECT_CUDA", "1") == "1"
archs = [a for a in os.environ.get("DIFFCR_CUDA_ARCHS", "80;90").split(";") if a]

rep = dk.available_backends()
for name, v in rep.items():
    print(f"  {name:<10} {v['status']:<12} {v['detail']}")
errors = []
if rep["cpu"]["status"] != "loaded":
    errors.append(f"CPU kernels not loaded: {rep['cpu']['detail']}")
if want_cuda:
    if rep["cuda"]["status"] not in ("loaded", "compiled"):
        errors.append(f"CUDA kernels not compiled: {rep['cuda']['detail']}")
    else:
        blob = open(_ext.LIBRARY_PATH, "rb").read()
        if b".nv_fatbin" not in blob:
            errors.append("no .nv_fatbin section in the library")
        for a in archs:
            sm = "".join(ch for ch in a if ch.isdigit())
            if f"-arch sm_{sm}".encode() not in blob:
                errors.append(f"no sm_{sm} machine code in {_ext.LIBRARY_PATH}")
            else:
                print(f"  sm_{sm} machine code present")
if errors:
    print("BUILD CHECK FAILED:\n  " + "\n  ".join(errors))
    sys.exit(1)
print("build check ok")
