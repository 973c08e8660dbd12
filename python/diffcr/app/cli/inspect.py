"""``diffcr inspect``: the learned ratio table of a DiffCR checkpoint."""
from __future__ import annotations

import sys

NAME = "inspect"
HELP = "print the ratio table of a DiffCR checkpoint"


def add_parser(sub) -> None:
    p_i = sub.add_parser(NAME, help=HELP)
    p_i.add_argument("checkpoint", help="folder written by diffcr.save / diffcr train")
    p_i.add_argument("--compression", action="store_true", help="print 1 - kept ratio")


def run(args, parser) -> int:
    from pathlib import Path

    from ...io import CheckpointError, block_names, read_checkpoint

    try:
        meta, cfg, tensors = read_checkpoint(Path(args.checkpoint))
        names = block_names(meta, tensors)
        kept = {i: tensors[f"{n}.ratio.kept"].tolist() for i, n in names.items()}
    except CheckpointError as e:
        print(f"diffcr inspect: error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"diffcr inspect: error: {args.checkpoint} has no tensor {e}", file=sys.stderr)
        return 2
    frozen = meta.get("frozen_bins")
    sig = meta.get("model") or {}
    print(f"DiffCR checkpoint {args.checkpoint}: {sig.get('model_class', '?')}, "
          f"{sig.get('num_blocks', '?')} blocks, hidden {sig.get('hidden_size', '?')}, "
          f"{cfg.num_regions} regions, gate {cfg.gate}, target kept {cfg.target_kept_ratio}"
          f"{', frozen' if frozen else ''}")
    R, T = cfg.num_regions, cfg.timesteps
    head = ["block"] + [f"t<{(r + 1) * T / R:g}" if r < R - 1 else f"t>={r * T / R:g}"
                        for r in range(R)]
    what = "compression (1 - kept)" if args.compression else "kept ratio"
    print(f"{what} per block and timestep region" + (" (frozen bins)" if frozen else ""))
    print("  ".join(f"{h:>8}" for h in head))
    vals = []
    for i, row in kept.items():
        row = frozen[str(i)] if frozen else [min(max(v, cfg.min_bin), cfg.max_bin) for v in row]
        if args.compression:
            row = [1 - v for v in row]
        vals += row
        print("  ".join([f"{i:>8}"] + [f"{v:>8.3f}" for v in row]))
    print(f"mean {what}: {sum(vals) / max(1, len(vals)):.3f}")
    return 0
