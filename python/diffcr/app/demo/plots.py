"""Figures for the DiffCR demo: the learned compression heatmap (the paper's headline figure),
router score maps, and side-by-side samples of model variants.

matplotlib is optional (``pip install "diffcr[plot]"``) and imported only when a function runs.
The figures are drawn with matplotlib's object-oriented API on an explicit Agg canvas: no
``pyplot``, so no global figure registry, no display, and no change to the caller's backend.
Every function creates the parent folder of ``path``, writes a PNG and returns ``path`` as a
:class:`~pathlib.Path`.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

PathLike = Union[str, os.PathLike]
_MAX_PIXELS = 2400          # cap on the longer side of a figure, to keep files well under 1 MB


def _new_figure(width: float, height: float):
    """A matplotlib Figure on an Agg canvas, with the install hint if matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('plotting needs matplotlib: pip install "diffcr[plot]"') from e
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: PathLike, dpi: float) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = fig.get_size_inches()
    dpi = min(dpi, _MAX_PIXELS / max(w, h))
    try:
        fig.savefig(path, dpi=dpi, format="png", bbox_inches="tight", pad_inches=0.05)
    finally:
        fig.clear()          # release the artists; the Figure is not registered anywhere else
    return path


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _image(x: Tensor) -> np.ndarray:
    """``[C, H, W]`` in [-1, 1] -> ``[H, W, C]`` (or ``[H, W]`` for C = 1) in [0, 1]."""
    a = (np.clip(_to_numpy(x), -1.0, 1.0) + 1.0) / 2.0
    if a.ndim != 3:
        raise ValueError(f"expected an image [C, H, W], got shape {a.shape}")
    return a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))


def _show(ax, img: np.ndarray) -> None:
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def region_labels(num_regions: int, num_train_timesteps: int = 1000) -> list:
    """Labels ``"t 0-250"``... of the timestep regions (region r covers ``[r T/R, (r+1) T/R)``)."""
    T, R = num_train_timesteps, num_regions
    return [f"t {r * T / R:g}-{(r + 1) * T / R:g}" for r in range(R)]


# ------------------------------------------------------------------ compression heatmap
def plot_ratio_heatmap(table, block_indices: Sequence[int], path: PathLike,
                       num_train_timesteps: int = 1000,
                       title: str = "DiffCR learned token compression", dpi: int = 150) -> Path:
    """Heatmap of the learned compression per block and timestep region.

    Args:
        table: ``[blocks, regions]`` KEPT ratios in [0, 1] (tensor, array or nested lists; e.g.
            the second value of :func:`diffcr.ratio_table`).
        block_indices: the block index of each row.
        path: PNG file to write.
        num_train_timesteps: T of the scheduler; region r covers ``[r T/R, (r+1) T/R)``,
            region 0 being the least noisy.
        title: first title line; a second line gives the mean compression.

    Shows compression ``100 (1 - kept)`` percent: rows = blocks, columns = regions labelled with
    their t ranges, every cell annotated, with a colour bar. Returns ``path``.
    """
    kept = _to_numpy(table).astype(np.float64)
    if kept.ndim == 1:
        kept = kept[None]
    if kept.ndim != 2:
        raise ValueError(f"table must be [blocks, regions], got shape {kept.shape}")
    B, R = kept.shape
    if len(block_indices) != B:
        raise ValueError(f"{len(block_indices)} block indices for a table with {B} rows")
    comp = 100.0 * (1.0 - kept)
    mean = float(comp.mean()) if comp.size else 0.0
    fig = _new_figure(1.6 + 0.95 * max(R, 2) + 1.0, 1.4 + 0.36 * max(B, 3))
    ax = fig.add_subplot(1, 1, 1)
    vmax = max(float(comp.max()) if comp.size else 0.0, 1.0)
    im = ax.imshow(comp, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto",
                   interpolation="nearest")
    ax.set_xticks(range(R))
    ax.set_xticklabels(region_labels(R, num_train_timesteps), fontsize=8)
    ax.set_yticks(range(B))
    ax.set_yticklabels([str(i) for i in block_indices], fontsize=8)
    ax.set_xlabel("timestep region (left = least noisy)")
    ax.set_ylabel("block")
    fs = 8 if B * R <= 80 else 6
    for i in range(B):
        for j in range(R):
            v = comp[i, j]
            ax.text(j, i, f"{v:.0f}%" if R > 8 else f"{v:.1f}%", ha="center", va="center",
                    fontsize=fs, color="black" if v / vmax > 0.6 else "white")
    cb = fig.colorbar(im, ax=ax, fraction=0.06, pad=0.03)
    cb.set_label("compression (1 - kept) %")
    ax.set_title(f"{title}\nmean compression {mean:.1f}%", fontsize=10)
    return _save(fig, path, dpi)


# ------------------------------------------------------------------ router maps
def plot_router_maps(images: Tensor, maps: Tensor, path: PathLike,
                     block_labels: Optional[Sequence] = None,
                     timestep_labels: Optional[Sequence] = None,
                     cmap: str = "magma", dpi: int = 120) -> Path:
    """Router score maps next to their images.

    Args:
        images: ``[n, 3, H, W]`` in [-1, 1].
        maps: ``[n, n_blocks, n_timesteps, h, w]`` router scores on the token grid (a flat
            ``[n, n_blocks, n_timesteps, h*w]`` with a square grid is accepted too).
        path: PNG file to write.
        block_labels: ``n_blocks`` labels (default ``block 0``...); ints print as ``block i``.
        timestep_labels: ``n_timesteps`` labels (default ``t 0``...); ints print as ``t=i``.

    One row per image: the image, then one map per (block, timestep), block-major, titled with
    both labels in the first row. Each map is min-max normalised on its own (router scores of
    different blocks are on different scales); a constant map shows as uniform. Returns ``path``.
    """
    m = _to_numpy(maps)
    if m.ndim == 4:
        side = int(round(m.shape[-1] ** 0.5))
        if side * side != m.shape[-1]:
            raise ValueError(f"flat maps need a square token grid, got {m.shape[-1]} tokens")
        m = m.reshape(*m.shape[:3], side, side)
    if m.ndim != 5:
        raise ValueError(f"maps must be [n, blocks, timesteps, h, w], got shape {m.shape}")
    n, nb, nt = m.shape[:3]
    if images.shape[0] != n:
        raise ValueError(f"{images.shape[0]} images but maps for {n}")
    bl = [f"block {b}" if isinstance(b, (int, np.integer)) else str(b)
          for b in (block_labels if block_labels is not None else range(nb))]
    tl = [f"t={t}" if isinstance(t, (int, np.integer)) else str(t)
          for t in (timestep_labels if timestep_labels is not None else range(nt))]
    if len(bl) != nb or len(tl) != nt:
        raise ValueError(f"need {nb} block labels and {nt} timestep labels, got {len(bl)} "
                         f"and {len(tl)}")
    cols = 1 + nb * nt
    cell = 1.25
    fig = _new_figure(cell * cols, cell * n + 0.45)
    axes = fig.subplots(n, cols, squeeze=False)
    lo = m.min(axis=(-2, -1), keepdims=True)
    span = m.max(axis=(-2, -1), keepdims=True) - lo
    norm = np.where(span > 0, (m - lo) / np.where(span > 0, span, 1.0), 0.5)
    for i in range(n):
        _show(axes[i, 0], _image(images[i]))
        if i == 0:
            axes[i, 0].set_title("image", fontsize=8)
        for b in range(nb):
            for t in range(nt):
                ax = axes[i, 1 + b * nt + t]
                ax.imshow(norm[i, b, t], cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"{bl[b]}\n{tl[t]}", fontsize=8)
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    return _save(fig, path, dpi)


# ------------------------------------------------------------------ samples
def plot_samples(rows: Mapping[str, Tensor], path: PathLike,
                 class_names: Optional[Sequence[str]] = None,
                 labels: Optional[Sequence[int]] = None, dpi: int = 120) -> Path:
    """Samples of several model variants, one row per variant.

    Args:
        rows: name (e.g. ``"dense"``, ``"DiffCR-LT"``) -> images ``[n, 3, H, W]`` in [-1, 1];
            column j of every row should come from the same seed and class. Rows may have
            different n (missing cells stay blank).
        path: PNG file to write.
        class_names: names of the classes; with ``labels`` the columns are titled
            ``class_names[labels[j]]``; without ``labels``, a list of one name per column is used
            as the titles directly.
        labels: ``[n]`` class of each column (titled ``class k`` without ``class_names``).

    Returns ``path``.
    """
    rows: Dict[str, Tensor] = dict(rows)
    if not rows:
        raise ValueError("rows is empty: nothing to plot")
    for name, x in rows.items():
        if x.dim() != 4:
            raise ValueError(f"row {name!r}: images must be [n, C, H, W], got {tuple(x.shape)}")
    ncols = max(int(x.shape[0]) for x in rows.values())
    titles = None
    if labels is not None:
        lab = [int(v) for v in torch.as_tensor(labels).flatten().tolist()]
        titles = [class_names[k] if class_names is not None and 0 <= k < len(class_names)
                  else f"class {k}" for k in lab]
    elif class_names is not None and len(class_names) == ncols:
        titles = [str(c) for c in class_names]
    cell = 1.0
    fig = _new_figure(cell * max(ncols, 1) + 1.0, cell * len(rows) + (0.3 if titles else 0.1))
    axes = fig.subplots(len(rows), max(ncols, 1), squeeze=False)
    for r, (name, x) in enumerate(rows.items()):
        for j in range(ncols):
            ax = axes[r, j]
            if j < x.shape[0]:
                _show(ax, _image(x[j]))
            else:
                ax.set_xticks([])
                ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(j < x.shape[0])
            if r == 0 and titles is not None and j < len(titles):
                ax.set_title(titles[j], fontsize=8)
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.subplots_adjust(wspace=0.04, hspace=0.04)
    return _save(fig, path, dpi)


# ------------------------------------------------------------------ quality vs speed
_KIND_STYLE = {"dense": ("k", "*", "dense"), "diffcr": ("tab:blue", "o", "token routing"),
               "cache": ("tab:orange", "s", "diffusers cache"),
               "diffcr+tokencache": ("tab:purple", "^", "DiffCR + token cache"),
               "diffcr+cache": ("tab:green", "D", "DiffCR + diffusers cache")}


def plot_tradeoff(rows: Mapping[str, Mapping], path: PathLike, dpi: int = 120) -> Path:
    """Quality against measured speedup, one marker per method and setting.

    Args:
        rows: name -> a row of :func:`~diffcr.app.demo.compare.compare_methods` (needs
            ``speedup_vs_dense``, ``class_accuracy``, ``classifier_fid``, ``kind``; the
            ``..._per_seed`` lists, when present, draw the spread over seeds as error bars).
        path: PNG file to write.

    Two panels side by side: class accuracy of the samples (higher is better) and
    classifier-FID (lower is better), both against the speedup of the sampling loop over dense;
    the rows marked ``on_frontier`` are joined by a line on the accuracy panel (the
    quality-vs-speed frontier). Returns ``path``.
    """
    if not rows:
        raise ValueError("rows is empty: nothing to plot")
    fig = _new_figure(11.0, 4.2)
    axes = fig.subplots(1, 2)
    keys = ("class_accuracy", "classifier_fid")
    # FID spans two orders of magnitude between the caches and random selection: log axis
    log_y = {"class_accuracy": False,
             "classifier_fid": all(r["classifier_fid"] > 0 for r in rows.values())}

    def coords(r, key):
        y = r[key]
        return r["speedup_vs_dense"], (math.log10(y) if log_y[key] else y)

    span = {}
    for key in keys:
        xs, ys = zip(*(coords(r, key) for r in rows.values()))
        span[key] = (max(max(xs) - min(xs), 1e-9), max(max(ys) - min(ys), 1e-9))
    # label offsets tried in turn, so that labels of nearby markers do not overlap
    offsets = (((4, 3), "left"), ((4, -9), "left"), ((-4, 3), "right"), ((-4, -9), "right"))
    placed = {key: [] for key in keys}
    seen = set()
    for name, r in rows.items():
        color, marker, legend = _KIND_STYLE.get(r.get("kind", "diffcr"), _KIND_STYLE["diffcr"])
        for ax, key in zip(axes, keys):
            vals = r.get(f"{key}_per_seed") or [r[key]]
            err = (max(vals) - min(vals)) / 2 if len(vals) > 1 else 0.0
            ax.errorbar([r["speedup_vs_dense"]], [r[key]], yerr=[err], fmt=marker, color=color,
                        markersize=9 if marker == "*" else 6, capsize=2,
                        label=None if legend in seen else legend)
            x, y = coords(r, key)
            sx, sy = span[key]
            near = [(px, py, o) for px, py, o in placed[key]
                    if abs(px - x) / sx < 0.12 and abs(py - y) / sy < 0.06]
            used = {o for _, _, o in near}
            choice = next((i for i in range(len(offsets)) if i not in used), 0)
            placed[key].append((x, y, choice))
            xy, ha = offsets[choice]
            ax.annotate(name, (r["speedup_vs_dense"], r[key]), textcoords="offset points",
                        xytext=xy, fontsize=7, ha=ha)
        seen.add(legend)
    front = sorted((r["speedup_vs_dense"], r["class_accuracy"]) for r in rows.values()
                   if r.get("on_frontier"))
    if len(front) > 1:
        axes[0].plot(*zip(*front), color="0.4", linestyle="--", linewidth=1, zorder=0,
                     label="frontier")
    if log_y["classifier_fid"]:
        axes[1].set_yscale("log")
    axes[0].set_ylabel("class accuracy of samples (higher is better)")
    axes[1].set_ylabel("classifier-FID (lower is better)")
    for ax in axes:
        ax.set_xlabel("measured speedup of the sampling loop vs dense")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return _save(fig, path, dpi)
