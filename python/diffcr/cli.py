"""The ``diffcr`` command line: ``info`` (versions, device, kernel backends) and ``bench``
(dense vs routed block timings against the ideal of SPEC §6)."""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
from typing import List, Optional

from ._version import __version__


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
    from diffcr_kernels import _ext

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
        "extension": {"path": _ext.LIBRARY_PATH, "build": _ext.BUILD_INFO,
                      "error": _ext.LOAD_ERROR},
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


def _kappas(text: str) -> List[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--kappas must be comma-separated numbers, got {text!r}")
    if not vals or any(not (0 < v <= 1) for v in vals):
        raise argparse.ArgumentTypeError(f"--kappas must lie in (0, 1], got {text!r}")
    return vals


def _bench(args) -> int:
    import torch

    from . import bench

    if args.device == "cuda" and not torch.cuda.is_available():
        print("diffcr bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    side = int(round(args.tokens ** 0.5))
    if side * side != args.tokens:
        print(f"diffcr bench: --tokens must be a square number, got {args.tokens}",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    common = dict(kind=args.model, N=args.tokens, B=args.batch, device=args.device, dtype=dtype)
    out = {"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
           "threads": args.threads, "torch": torch.__version__, "config": vars(args).copy()}
    out["config"].pop("func", None)
    out["blocks"] = bench.bench_blocks(kappas=args.kappas, rounds=args.rounds, **common)
    if not args.no_overhead:
        out["overhead"] = bench.bench_overhead(rounds=max(3, args.rounds), **common)
    if not args.no_training:
        out["training"] = bench.bench_training(rounds=max(1, args.rounds - 1), **common)
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    print(f"diffcr bench: {args.model} block (D=1152, 16x72), N={args.tokens}, B={args.batch}, "
          f"{args.dtype}, {out['device']}" + (f", {args.threads} thread(s)"
                                              if args.device == "cpu" else ""))
    hdr = f"{'kappa':>6} {'k':>6} {'dense ms':>10} {'routed ms':>10} {'speedup':>8} " \
          f"{'ideal':>7} {'of ideal':>9} {'peak MB':>8}"
    print(hdr)
    for r in out["blocks"]:
        mem = "-" if r["peak_mem_MB"] is None else f"{r['peak_mem_MB']:.0f}"
        print(f"{r['kappa']:>6.2f} {r['k']:>6d} {r['dense_ms']:>10.2f} {r['routed_ms']:>10.2f} "
              f"{r['speedup']:>8.2f} {r['ideal_speedup']:>7.2f} "
              f"{100 * r['fraction_of_ideal']:>8.1f}% {mem:>8}")
    if "overhead" in out:
        o = out["overhead"]
        print(f"routing overhead (score+select+gather+scatter, kappa {o['kappa']}): "
              f"{o['routing_ms']:.2f} ms = {100 * o['overhead_fraction']:.2f} % of the dense block")
    if "training" in out:
        t = out["training"]
        print(f"training step (fwd+bwd, two bins {t['bins'][0]:.2f}/{t['bins'][1]:.2f} in one "
              f"pass): dense {t['dense_ms']:.1f} ms, DiffCR {t['routed_ms']:.1f} ms, "
              f"{100 * t['fraction_of_ideal']:.1f} % of the ideal for both branches")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="diffcr", description=__doc__)
    parser.add_argument("--version", action="version", version=f"diffcr {__version__}")
    sub = parser.add_subparsers(dest="command")
    p_info = sub.add_parser("info", help="versions, device, and which kernel backends loaded")
    p_info.add_argument("--json", action="store_true", help="machine-readable output")
    p_b = sub.add_parser("bench", help="dense vs routed block: time, speedup, ideal, memory")
    p_b.add_argument("--model", choices=("pixart", "dit"), default="pixart",
                     help="block kind: PixArt-Sigma-XL (cross-attention) or DiT-XL/2")
    p_b.add_argument("--tokens", type=int, default=None,
                     help="image tokens N (a square; default 1024 on CPU, 4096 on GPU)")
    p_b.add_argument("--batch", type=int, default=None, help="batch (default 1 CPU, 8 GPU)")
    p_b.add_argument("--kappas", type=_kappas, default=[1.0, 0.8, 0.5, 0.3],
                     help="kept ratios, comma-separated (default 1.0,0.8,0.5,0.3)")
    p_b.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p_b.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                     help="default fp32 on CPU, bf16 on GPU")
    p_b.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p_b.add_argument("--rounds", type=int, default=3, help="timed rounds per point (median)")
    p_b.add_argument("--no-overhead", action="store_true", help="skip the overhead measurement")
    p_b.add_argument("--no-training", action="store_true", help="skip the training step")
    p_b.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    if args.command == "info":
        d = info_dict()
        if args.json:
            print(json.dumps(d, indent=2, default=str))
        else:
            _print_info(d)
        return 0
    if args.command == "bench":
        import torch

        gpu = torch.cuda.is_available() if args.device is None else args.device == "cuda"
        args.device = args.device or ("cuda" if gpu else "cpu")
        args.tokens = args.tokens or (4096 if gpu else 1024)
        args.batch = args.batch or (8 if gpu else 1)
        args.dtype = args.dtype or ("bf16" if gpu else "fp32")
        for name in ("tokens", "batch", "threads", "rounds"):
            if getattr(args, name) < 1:
                parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
        return _bench(args)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
