"""Figures: sample grids and per-round curves (matplotlib, headless).

matplotlib is imported when the first figure is drawn, not with this module: importing
fedgen (``fedgen --help``, the ServerApp) writes no matplotlib cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


def _plt() -> Any:
    """``matplotlib.pyplot`` on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sample_grid(x: torch.Tensor | np.ndarray, nrow: int = 10, pad: int = 1) -> np.ndarray:
    """Tile images ``[N, C, H, W]`` in [0, 1] into one ``[H', W']`` or ``[H', W', 3]`` array."""
    x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    if x.ndim == 2:  # vectors: show as 1-row images
        x = x[:, None, None, :]
    n, c, h, w = x.shape
    ncol = max(1, min(nrow, n))
    rows = int(np.ceil(n / ncol))
    grid = np.ones((c, rows * (h + pad) + pad, ncol * (w + pad) + pad), dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    grid = np.clip(grid, 0, 1)
    return grid[0] if c == 1 else np.transpose(grid[:3], (1, 2, 0))


def rows_by_class(x: torch.Tensor, labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """Reorder labelled samples class-major: the first ``per_class`` samples of the lowest
    label, then of the next, ... -- tiled with ``nrow=per_class`` each class is one row."""
    order = torch.cat([torch.nonzero(labels.cpu() == c).flatten()[:per_class] for c in labels.unique(sorted=True).cpu()])
    return x[order]


def save_sample_grid(x: torch.Tensor | np.ndarray, path: Path, nrow: int = 10) -> Path:
    """Write a PNG grid of samples, ``nrow`` per row (see :func:`rows_by_class`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = sample_grid(x, nrow=nrow)
    scale = max(1, 480 // max(grid.shape[:2]))
    grid = np.kron(grid, np.ones((scale, scale))) if grid.ndim == 2 else grid.repeat(scale, 0).repeat(scale, 1)
    plt = _plt()
    plt.imsave(path, grid, cmap="gray", vmin=0, vmax=1)
    return path


def plot_curves(rows: list[dict], keys: list[str], path: Path, title: str = "") -> Path | None:
    """One small panel per metric key vs round; skips keys never reported."""
    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    if not keys:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3)
        ax.set_xlabel("round")
        ax.set_title(key, fontsize=10)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_bars(values: list[float], path: Path, *, xlabel: str = "", ylabel: str = "") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 2.6))
    ax.bar(range(len(values)), values, color="#4477aa")
    ax.set_xticks(range(len(values)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    return _save(fig, path)


def plot_overlaid(series: dict[str, list[tuple[float, float]]], title: str, path: Path) -> Path | None:
    """One line per run (``{run name: [(round, value), ...]}``); ``None`` if all empty."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
    ax.set_xlabel("round")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt = _plt()
    plt.close(fig)
    return path
