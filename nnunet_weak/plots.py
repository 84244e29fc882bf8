"""Figures written next to results: saved atomically, drawn with the non-interactive Agg backend."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402


def save_figure_atomic(fig, path: Path, dpi: int = 120) -> None:
    """Save ``fig`` to ``path`` through a temporary name, then close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    fig.savefig(partial, dpi=dpi)
    plt.close(fig)
    os.replace(partial, path)


def own_style():
    """Matplotlib's default style: nnU-Net's progress plot sets seaborn's (font scale 2.5) process-wide."""
    return plt.style.context("default")


def plot_loss_components(curves: dict[str, list[float]], path: Path) -> None:
    """One curve per training-loss component, by epoch."""
    with own_style():
        _plot_loss_components(curves, path)


def _plot_loss_components(curves: dict[str, list[float]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in curves.items():
        ax.plot(range(len(values)), values, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (epoch mean)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path)


def plot_dense_monitor(class_names: list[str], dense_dice: list[list[float]], background_as: list[list[float]],
                       pseudo_dice: list[list[float]], path: Path) -> None:
    """Per epoch and class: Dice on dense labels beside nnU-Net's pseudo-Dice (left), and the share of the
    true background predicted as the class (right)."""
    with own_style():
        _plot_dense_monitor(class_names, dense_dice, background_as, pseudo_dice, path)


def _plot_dense_monitor(class_names, dense_dice, background_as, pseudo_dice, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for index, name in enumerate(class_names):
        colour = f"C{index}"
        left.plot(range(len(dense_dice)), [d[index] for d in dense_dice], color=colour, label=f"{name} dense")
        left.plot(range(len(pseudo_dice)), [d[index] for d in pseudo_dice], color=colour, linestyle="--",
                  label=f"{name} pseudo (nnU-Net)")
        right.plot(range(len(background_as)), [100 * b[index] for b in background_as], color=colour, label=name)
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("epoch")
    left.set_ylabel("Dice")
    left.set_ylim(0, 1)
    left.set_title("validation Dice: dense labels vs nnU-Net's pseudo-Dice", fontsize=9)
    left.legend(fontsize=7)
    right.set_xlabel("epoch")
    right.set_ylabel("% of true background")
    right.set_title("true background predicted as each class (dense labels)", fontsize=9)
    right.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path)
