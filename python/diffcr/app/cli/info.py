"""``diffcr info``: versions, device, which kernel backends loaded (and why not)."""
from __future__ import annotations

import importlib
import json
import platform

from ..._version import __version__

NAME = "info"
HELP = "versions, device, and which kernel backends loaded"


def _version_of(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - report, never crash
        return f"not importable ({type(e).__name__})"
    return str(getattr(mod, "__version__", "unknown"))


def info_dict() -> dict:
    """Versions, device, and kernel backends (what loaded, and why not)."""
    import torch

    import diffcr_kernels

    if torch.cuda.is_available():
        dev = {"type": "cuda", "name": torch.cuda.get_device_name(),
               "capability": ".".join(map(str, torch.cuda.get_device_capability()))}
    else:
        dev = {"type": "cpu", "name": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads()}
    return {
        "diffcr": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version_of("triton"),
        "diffusers": _version_of("diffusers"),
        "flash_attn": _version_of("flash_attn"),
        "device": dev,
        "extension": diffcr_kernels.extension_info(),
        "kernel_backends": diffcr_kernels.available_backends(),
        "attention_backends": diffcr_kernels.available_attention_backends(),
        "selected_backend": diffcr_kernels.current_backend(),
    }


def _print_info(d: dict) -> None:
    print(f"diffcr {d['diffcr']}  (python {d['python']})")
    print(f"torch {d['torch']} (cuda {d['torch_cuda']}), triton {d['triton']}, "
          f"diffusers {d['diffusers']}, flash-attn {d['flash_attn']}")
    dev = d["device"]
    extra = f"sm_{dev['capability'].replace('.', '')}" if dev["type"] == "cuda" else \
        f"{dev['threads']} threads"
    print(f"device: {dev['type']} {dev['name']} ({extra})")
    print(f"kernel backends (selected: {d['selected_backend']}):")
    for name, v in d["kernel_backends"].items():
        print(f"  {name:<10} {v['status']:<12} {v['detail']}")
    print("attention backends:")
    for name, v in d["attention_backends"].items():
        print(f"  {name:<14} {v}")


def add_parser(sub) -> None:
    p = sub.add_parser(NAME, help=HELP)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args, parser) -> int:
    d = info_dict()
    if args.json:
        print(json.dumps(d, indent=2, default=str))
    else:
        _print_info(d)
    return 0
