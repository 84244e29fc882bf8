"""Figures written next to results: saved atomically, drawn with the non-interactive Agg backend."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def save_figure_atomic(fig, path: Path, dpi: int = 120) -> None:
    """Save ``fig`` to ``path`` through a temporary name, then close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    fig.savefig(partial, dpi=dpi)
    plt.close(fig)
    os.replace(partial, path)


def plot_loss_components(curves: dict[str, list[float]], path: Path) -> None:
    """One curve per training-loss component, by epoch."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in curves.items():
        ax.plot(range(len(values)), values, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (epoch mean)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path)
