"""PNG plots of workload statistics (matplotlib, Agg backend, imported only when plotting).

Legend: L = MoE layers, E = routed experts per layer, C = E + 1 cache sizes (0..E).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

__all__ = ["plot_hit_rate_curves", "plot_frequency_heatmap"]


def _pyplot():
    # Agg before pyplot is imported: no display needed, same pixels everywhere
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_hit_rate_curves(curves: Mapping[str, np.ndarray], path: str | Path, *, title: str = "",
                         cache_sizes: Sequence[int] = ()) -> Path:
    """Hit rate vs cache slots, mean over layers (line) and layer range (band), per policy.

    Args:
        curves: policy -> ``[L, E + 1]`` hit rates.
        path: the PNG to write.
        title: figure title.
        cache_sizes: slots to mark with vertical lines.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for policy, curve in curves.items():
        c = np.arange(curve.shape[1])
        line, = ax.plot(c, curve.mean(axis=0), label=policy)
        ax.fill_between(c, curve.min(axis=0), curve.max(axis=0), color=line.get_color(), alpha=0.15, linewidth=0)
    for size in cache_sizes:
        ax.axvline(size, color="0.6", linewidth=0.8, linestyle=":")
    ax.set_xlabel("cache slots per layer")
    ax.set_ylabel("hit rate (mean over layers; band = min..max)")
    ax.set_ylim(0, 1)
    ax.set_xlim(0, max(curve.shape[1] - 1 for curve in curves.values()) if curves else 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(plt, fig, ax, path, title)


def plot_frequency_heatmap(frequency: np.ndarray, path: str | Path, *, title: str = "",
                           layer_labels: Sequence[int] | None = None) -> Path:
    """Heat map of each layer's load share per expert (rows: layers, columns: experts).

    Args:
        frequency: ``[L, E]`` selection counts.
        path: the PNG to write.
        title: figure title.
        layer_labels: ``[L]`` label of each row (default 0..L-1).
    """
    plt = _pyplot()
    f = np.asarray(frequency, np.float64)
    total = f.sum(axis=1, keepdims=True)
    share = np.divide(f, total, out=np.zeros_like(f), where=total > 0)
    L, E = share.shape
    fig, ax = plt.subplots(figsize=(min(16, 4 + E * 0.12), min(12, 2 + L * 0.25)), dpi=120)
    im = ax.imshow(share, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer" if layer_labels is None else "layer (label = hidden-layer index)")
    if layer_labels is not None and L <= 64:
        ax.set_yticks(range(L))
        ax.set_yticklabels([str(x) for x in layer_labels], fontsize=6)
    fig.colorbar(im, ax=ax, label="share of the layer's selections")
    return _save(plt, fig, ax, path, title)


def _save(plt, fig, ax, path: str | Path, title: str) -> Path:
    """Title, tight layout, write the PNG (creating its folder), close the figure."""
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
