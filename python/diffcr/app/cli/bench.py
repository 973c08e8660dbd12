"""``diffcr bench``: dense vs routed block: time, speedup, ideal (method §6), peak memory."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import List

from ..bench_kinds import DESCRIPTIONS, KINDS, VIDEO_KINDS

NAME = "bench"
HELP = "dense vs routed block: time, speedup, ideal, memory"


def _kappas(text: str) -> List[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--kappas must be comma-separated numbers, got {text!r}")
    if not vals or any(not (0 < v <= 1) for v in vals):
        raise argparse.ArgumentTypeError(f"--kappas must lie in (0, 1], got {text!r}")
    return vals


def add_parser(sub) -> None:
    p_b = sub.add_parser(NAME, help=HELP)
    p_b.add_argument("--model", choices=KINDS, default="pixart",
                     help="block kind (default pixart): " + "; ".join(
                         f"{k}: {d}" for k, d in DESCRIPTIONS.items()))
    p_b.add_argument("--tokens", type=int, default=None,
                     help="image tokens N (a square; video kinds: 4 frames of a square or a "
                          "multiple of 1560, 480p frames; default 1024 on CPU, 4096 on GPU)")
    p_b.add_argument("--batch", type=int, default=None, help="batch (default 1 CPU, 8 GPU)")
    p_b.add_argument("--lora-rank", type=int, default=0,
                     help="training step with peft LoRA of this rank on both blocks (base "
                          "weights frozen, as the paper fine-tunes; default 0: full weights)")
    p_b.add_argument("--kappas", type=_kappas, default=[1.0, 0.8, 0.5, 0.3],
                     help="kept ratios, comma-separated (default 1.0,0.8,0.5,0.3)")
    p_b.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p_b.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                     help="default fp32 on CPU or with --autocast, bf16 on GPU")
    p_b.add_argument("--autocast", choices=("bf16", "fp16"), default=None,
                     help="run every timed call (dense, routed, naive, training step) under "
                          "torch.autocast in this dtype, weights in fp32: what "
                          "--mixed-precision does in diffcr train (needs --dtype fp32)")
    p_b.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p_b.add_argument("--rounds", type=int, default=6,
                     help="interleaved timed rounds per point (median; default 6)")
    p_b.add_argument("--prepack", action=argparse.BooleanOptionalAction, default=None,
                     help="MKL-prepacked linear weights for dense, routed and naive alike "
                          "(default: on for CPU when MKL is available)")
    p_b.add_argument("--token-cache", action="store_true",
                     help="also time the routed block with the token cache (steady state: "
                          "skipped rows get their cached update)")
    p_b.add_argument("--masked", action="store_true",
                     help="also time mask-aware routing (diffcr.mask_routing, inpainting): a "
                          "centred box of 10 / 25 / 50 %% of the tokens always computed, plus "
                          "0.3 / 0.5 of the rest (image kinds)")
    p_b.add_argument("--compile", action="store_true",
                     help="compile the dense and the routed block with torch.compile("
                          "fullgraph=True), as diffusers' regional compile "
                          "(compile_repeated_blocks) does; inference rows only (no prepacking, "
                          "no naive control)")
    p_b.add_argument("--no-naive", action="store_true",
                     help="skip the plain-torch gather -> block -> scatter control")
    p_b.add_argument("--no-overhead", action="store_true", help="skip the overhead measurement")
    p_b.add_argument("--no-training", action="store_true", help="skip the training step")
    p_b.add_argument("--training-only", action="store_true",
                     help="time the training step alone (no inference rows, overhead or "
                          "weight casts)")
    p_b.add_argument("--json", action="store_true", help="machine-readable output")


def run(args, parser) -> int:
    import torch

    gpu = torch.cuda.is_available() if args.device is None else args.device == "cuda"
    args.device = args.device or ("cuda" if gpu else "cpu")
    args.tokens = args.tokens or (4096 if gpu else 1024)
    args.batch = args.batch or (8 if gpu else 1)
    args.dtype = args.dtype or ("bf16" if gpu and not args.autocast else "fp32")
    for name in ("tokens", "batch", "threads", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return _bench(args)


def _bench(args) -> int:
    import torch

    from .. import bench

    if args.prepack and args.device != "cpu":
        print("diffcr bench: --prepack is for CPU runs (MKL-packed weights)", file=sys.stderr)
        return 2
    if args.prepack:
        from ...cpu import prepack_available

        if not prepack_available():
            print("diffcr bench: --prepack needs a torch build with MKL", file=sys.stderr)
            return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("diffcr bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.lora_rank < 0:
        print(f"diffcr bench: --lora-rank must be >= 0, got {args.lora_rank}", file=sys.stderr)
        return 2
    if args.training_only and args.no_training:
        print("diffcr bench: --training-only and --no-training leave nothing to time",
              file=sys.stderr)
        return 2
    if args.lora_rank and args.no_training:
        print("diffcr bench: --lora-rank applies to the training step (drop --no-training)",
              file=sys.stderr)
        return 2
    video = args.model in VIDEO_KINDS
    if args.masked and video:
        print(f"diffcr bench: --masked is for image blocks; {args.model} is a video block",
              file=sys.stderr)
        return 2
    side = int(round(args.tokens ** 0.5))
    if video:
        try:
            bench.video_shape(args.tokens)
        except ValueError as e:
            print(f"diffcr bench: --tokens: {e}", file=sys.stderr)
            return 2
    elif side * side != args.tokens:
        print(f"diffcr bench: --tokens must be a square number, got {args.tokens}",
              file=sys.stderr)
        return 2
    if args.autocast and args.prepack:
        print("diffcr bench: --prepack packs fp32 weights, which torch.autocast does not use "
              "(drop --prepack)", file=sys.stderr)
        return 2
    if args.autocast:
        args.prepack = False  # autocast casts the fp32 weights at every call instead
    if args.autocast and args.dtype != "fp32":
        print(f"diffcr bench: --autocast {args.autocast} runs over fp32 weights; got --dtype "
              f"{args.dtype} (drop it or pass --dtype fp32)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = dtypes[args.dtype]
    return _measure(args, dtype, dtypes[args.autocast] if args.autocast else None)


def _measure(args, dtype, low) -> int:
    """The benches of ``args``; under ``--autocast`` (``low``) the inference calls run in one
    autocast region and every training step in its own (:func:`~diffcr.app.bench.bench_training`)."""
    import torch

    from .. import bench

    common = dict(kind=args.model, N=args.tokens, B=args.batch, device=args.device, dtype=dtype)
    out = {"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
           "threads": args.threads, "torch": torch.__version__, "config": vars(args).copy()}
    out["config"].pop("func", None)
    with torch.autocast(args.device, dtype=low, enabled=low is not None):
        _measure_inference(args, common, out)
    if not args.no_training:
        out["training"] = bench.bench_training(rounds=max(3, args.rounds - 1),
                                               lora_rank=args.lora_rank, autocast=low, **common)
    return _report(args, out)


def _measure_inference(args, common, out) -> None:
    import torch

    from .. import bench

    out["blocks"] = [] if args.training_only else bench.bench_blocks(
        kappas=args.kappas, rounds=args.rounds, prepack=args.prepack, naive=not args.no_naive,
        token_cache=args.token_cache, compile=args.compile, **common)
    if args.masked and not args.training_only:
        out["masked"] = bench.bench_masked(rounds=args.rounds, prepack=args.prepack, **common)
    if not (args.no_overhead or args.training_only):
        out["overhead"] = bench.bench_overhead(rounds=max(3, args.rounds), **common)
    if args.autocast and not args.training_only:
        casts = out["autocast_weight_casts"] = bench.bench_weight_casts(
            args.model, args.device, torch.get_autocast_dtype(args.device))
        for r in out["blocks"]:  # the ideal with the casts as a fixed cost of both blocks
            # (method §6), per round and the median, as the flop-only fraction
            c = casts["cast_ms"]
            r["fraction_of_ideal_casts_fixed"] = statistics.median(
                (min(c, d) + (d - min(c, d)) / r["ideal_speedup"]) / t
                for d, t in zip(r["dense_rounds_ms"], r["routed_rounds_ms"]))


def _report(args, out) -> int:
    from .. import bench

    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    routed = [r for r in out["blocks"] if r["kappa"] < 1] or out["blocks"] \
        or [out["training"]]
    print(f"diffcr bench: {bench.DESCRIPTIONS[args.model]}, {routed[0]['path']} path, "
          f"N={args.tokens}, B={args.batch}, {args.dtype}"
          + (f" weights under {args.autocast} autocast" if args.autocast else "")
          + f", {out['device']}"
          + (f", {args.threads} thread(s)" if args.device == "cpu" else ""))
    blocks = out["blocks"]
    if blocks and blocks[0].get("compiled"):
        print("dense and routed blocks compiled with torch.compile(fullgraph=True) (regional "
              "compile)")
    if blocks and blocks[0]["prepacked"]:
        print("linear layers: MKL-prepacked weights in the dense, routed and naive blocks alike "
              "(--prepack off to compare without)")
    naive = bool(blocks) and "naive_ms" in blocks[0]
    hdr = f"{'kappa':>6} {'k':>6} {'dense ms':>10} {'routed ms':>10} {'speedup':>8} " \
          f"{'ideal':>7} {'of ideal':>9} {'peak MB':>8}"
    if naive:
        hdr += f" {'naive ms':>9} {'naive of ideal':>15}"
    cache = any("token_cache_ms" in r for r in blocks)
    if cache:
        hdr += f" {'cache ms':>9} {'cache/routed':>13}"
    casts_fixed = bool(blocks) and "fraction_of_ideal_casts_fixed" in blocks[0]
    if casts_fixed:
        hdr += f" {'casts fixed':>12}"
    if blocks:
        print(hdr)
    for r in blocks:
        mem = "-" if r["peak_mem_MB"] is None else f"{r['peak_mem_MB']:.0f}"
        line = (f"{r['kappa']:>6.2f} {r['k']:>6d} {r['dense_ms']:>10.2f} {r['routed_ms']:>10.2f} "
                f"{r['speedup']:>8.2f} {r['ideal_speedup']:>7.2f} "
                f"{100 * r['fraction_of_ideal']:>8.1f}% {mem:>8}")
        if naive:
            line += f" {r['naive_ms']:>9.2f} {100 * r['naive_fraction_of_ideal']:>14.1f}%"
        if cache and "token_cache_ms" in r:
            line += f" {r['token_cache_ms']:>9.2f} {r['token_cache_vs_routed']:>12.2f}x"
        if casts_fixed:
            line += f" {100 * r['fraction_of_ideal_casts_fixed']:>11.1f}%"
        print(line)
    if blocks:
        print(f"(speedup and fraction of ideal: median over {args.rounds} interleaved rounds "
              "of dense/routed; naive = gather -> diffusers block -> scatter in plain torch)")
    if cache:
        print("cache = the routed block with the token cache (skipped rows get their cached "
              "update); cache/routed: its time over the plain routed block's")
    if "masked" in out:
        print("mask-aware routing (a centred box always computed, plus a share of the rest):")
        print(f"{'mask':>6} {'context':>8} {'k':>6} {'dense ms':>10} {'routed ms':>10} "
              f"{'speedup':>8} {'ideal':>7} {'of ideal':>9}")
        for r in out["masked"]:
            print(f"{100 * r['mask_fraction']:>5.0f}% {r['context_kept_ratio']:>8.2f} "
                  f"{r['k']:>6d} {r['dense_ms']:>10.2f} {r['routed_ms']:>10.2f} "
                  f"{r['speedup']:>8.2f} {r['ideal_speedup']:>7.2f} "
                  f"{100 * r['fraction_of_ideal']:>8.1f}%")
    if "overhead" in out:
        o = out["overhead"]
        print(f"routing overhead (score+select+gather+scatter, kappa {o['kappa']}): "
              f"{o['routing_ms']:.2f} ms = {100 * o['overhead_fraction']:.2f} % of the dense block")
    if "autocast_weight_casts" in out:
        c = out["autocast_weight_casts"]
        print(f"autocast weight casts: {c['cast_ms']:.1f} ms per block call "
              f"({c['weights'] / 1e6:.1f} M linear weights to {args.autocast}), paid by the "
              "dense and the routed block alike and not in the flop ideal (inference; a "
              "training step's trained weights are cast once per step, below); 'casts fixed': "
              "the fraction of ideal when the ideal counts them as a fixed cost (method §6; "
              "median over rounds, as 'of ideal')")
    if "training" in out:
        t = out["training"]
        how = "fused, in one pass" if t["path"] == "fused" else "compat, one diffusers call per bin"
        if t["lora_rank"]:
            how += f", LoRA rank {t['lora_rank']} on frozen base weights"
        print(f"training step (fwd+bwd, two bins {t['bins'][0]:.2f}/{t['bins'][1]:.2f} {how}): "
              f"dense {t['dense_ms']:.1f} ms, DiffCR {t['routed_ms']:.1f} ms, "
              f"{100 * t['fraction_of_ideal']:.1f} % of the ideal {t['ideal_speedup']:.3f}x "
              "for both branches (their shared work counted once, method §6)")
        fr = [d / r / t["ideal_speedup"]
              for d, r in zip(t["dense_rounds_ms"], t["routed_rounds_ms"])]
        print(f"  median of {len(fr)} interleaved rounds; single rounds "
              f"{100 * min(fr):.1f}-{100 * max(fr):.1f} %")
        if "fraction_of_ideal_casts_fixed" in t:
            print(f"  each step in its own {args.autocast} autocast region: weight casts "
                  f"(forward, and trained weights' gradients back) {t['casts_ms']:.1f} ms per "
                  f"step, alike in both; with them as a fixed cost: "
                  f"{100 * t['fraction_of_ideal_casts_fixed']:.1f} % of the ideal ('casts "
                  "fixed', method §6)")
    return 0
