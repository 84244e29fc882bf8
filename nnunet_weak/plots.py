"""Figures written next to results: saved atomically, drawn with the non-interactive Agg backend."""
from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np

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


@dataclass
class CaseOverlay:
    """One row of ``case_overlay_figure``: a 2D slice of a case, its dense truth and each method's prediction.

    ``image`` is ``(y, x)`` intensities; ``truth`` and every ``predictions`` value are ``(y, x)`` label maps.
    """

    title: str
    image: np.ndarray
    truth: np.ndarray
    predictions: dict[str, np.ndarray]


def class_colours(class_labels: dict[str, int]) -> dict[str, str]:
    return {name: f"C{index}" for index, name in enumerate(class_labels)}


def case_overlay_figure(cases: list[CaseOverlay], class_labels: dict[str, int]):
    """Rows of cases; columns: the image, the dense truth and each method's prediction over it, one class legend."""
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Patch
    methods = list(cases[0].predictions)
    colours = class_colours(class_labels)
    columns = ["image", "dense truth", *methods]
    fig, axes = plt.subplots(len(cases), len(columns), figsize=(2.4 * len(columns), 2.6 * len(cases) + 0.8),
                             squeeze=False)
    lookup = np.zeros((max(class_labels.values()) + 1, 4))
    for name, value in class_labels.items():
        lookup[value] = to_rgba(colours[name], 0.55)
    for row, case in zip(axes, cases):
        for axis, column in zip(row, columns):
            axis.imshow(case.image, cmap="gray")
            if column != "image":
                labels = case.truth if column == "dense truth" else case.predictions[column]
                axis.imshow(lookup[np.clip(labels, 0, len(lookup) - 1)], interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title("\n".join(textwrap.wrap(column, 24, break_long_words=False)), fontsize=8)
        row[0].set_ylabel("\n".join(textwrap.wrap(case.title, 30, break_long_words=False)), fontsize=7)
    fig.legend(handles=[Patch(color=colours[name], label=name) for name in class_labels], loc="lower center",
               ncol=len(class_labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def paired_difference_figure(differences: dict[str, dict[str, list[float]]], score: str, baseline: str):
    """Per split (a panel), per method: each case's ``score`` minus the baseline's, as a box and its points."""
    splits = list(differences)
    fig, axes = plt.subplots(1, len(splits), figsize=(4.5 * len(splits), 4), squeeze=False)
    rng = np.random.default_rng(0)
    for axis, split in zip(axes[0], splits):
        methods = list(differences[split])
        values = [np.asarray(differences[split][m], dtype=float) for m in methods]
        values = [v[~np.isnan(v)] for v in values]
        axis.boxplot(values, showfliers=False)
        for position, points in enumerate(values, start=1):
            axis.scatter(position + rng.uniform(-0.12, 0.12, len(points)), points, s=10, alpha=0.6)
        axis.axhline(0, color="grey", linewidth=0.8)
        axis.set_xticks(range(1, len(methods) + 1), ["\n".join(textwrap.wrap(m, 18, break_long_words=False)) for m in methods], fontsize=7)
        axis.set_ylabel(f"{score}: method − baseline", fontsize=8)
        axis.set_title(f"{split} cases", fontsize=9)
    fig.suptitle("\n".join(textwrap.wrap(f"Per case, minus {baseline}", 80)), fontsize=9)
    fig.tight_layout()
    return fig
