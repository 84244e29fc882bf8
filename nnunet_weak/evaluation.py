"""Scoring segmentations against dense labels: per-class Dice and HD95 in millimetres.

Every number this project reports comes from here, computed against *dense* labels. nnU-Net's own
``summary.json`` on a sparse dataset scores the sparse labels (ignored voxels excluded) and must
never be reported as accuracy.

Conventions (per case and class c, prediction P and reference R as voxel sets):

- Dice = 2|P ∩ R| / (|P| + |R|); ``NaN`` when both are empty (left out of means, as nnU-Net does).
- BackgroundShare = |P ∖ R_fg| / |R_bg|: the share of the reference's background voxels predicted as
  class c (``NaN`` when the reference has no background). A class that floods the background far from
  the anatomy barely moves Dice's denominator on small structures' cases but shows here.
- HD95 = max(q95(d(∂P, ∂R)), q95(d(∂R, ∂P))), the larger of the two directed 95th percentiles of
  distances (mm, using the voxel spacing) from each surface voxel of one set to the nearest surface
  voxel of the other; surfaces are the voxels of a set with a 6-connected (4 in 2D) neighbour
  outside it. ``NaN`` when both are empty; when exactly one is empty, the diagonal of the volume in
  mm (the largest distance possible), so that a missed structure is penalised, not skipped.
"""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from nnunet_weak.atomic import write_json_atomic
from nnunet_weak.errors import UserInputError


def dice_score(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks of equal shape; ``NaN`` when both are empty."""
    denominator = int(pred.sum()) + int(ref.sum())
    if denominator == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(pred, ref).sum()) / denominator


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, num_classes: int,
                     valid: np.ndarray | None = None) -> np.ndarray:
    """Voxel counts ``(num_classes, num_classes)``: row = true class, column = predicted class.

    Args:
        truth, predicted: integer label maps of one shape, values in ``0 .. num_classes - 1`` where valid.
        valid: optional boolean mask of the voxels to count (e.g. inside the image).
    """
    if truth.shape != predicted.shape:
        raise ValueError(f"shape mismatch: truth {truth.shape}, predicted {predicted.shape}")
    if valid is not None:
        truth, predicted = truth[valid], predicted[valid]
    truth, predicted = truth.astype(np.int64).ravel(), predicted.astype(np.int64).ravel()
    for name, values in (("truth", truth), ("predicted", predicted)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} has values outside 0..{num_classes - 1}: {values.min()}..{values.max()}")
    return np.bincount(truth * num_classes + predicted, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def background_share(pred: np.ndarray, ref_background: np.ndarray) -> float:
    """Share of the reference's background voxels that ``pred`` (a boolean mask) covers; ``NaN`` without background."""
    background = int(ref_background.sum())
    if background == 0:
        return float("nan")
    return int(np.logical_and(pred, ref_background).sum()) / background


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one face-neighbour outside it (image border counts as outside)."""
    if not mask.any():
        return np.zeros_like(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~eroded


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm (see module docstring for empty sets).

    Args:
        pred, ref: boolean masks of the same shape (2D or 3D).
        spacing: voxel size per axis, in the order of the array axes, in mm.
    """
    if pred.shape != ref.shape or len(spacing) != pred.ndim:
        raise ValueError(f"shape mismatch: pred {pred.shape}, ref {ref.shape}, spacing {tuple(spacing)}")
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return float("nan")
    if has_pred != has_ref:
        return float(np.linalg.norm(np.array(pred.shape) * np.asarray(spacing, dtype=float)))
    surface_pred, surface_ref = surface_voxels(pred), surface_voxels(ref)
    dist_to_ref = ndimage.distance_transform_edt(~surface_ref, sampling=spacing)
    dist_to_pred = ndimage.distance_transform_edt(~surface_pred, sampling=spacing)
    return float(max(np.percentile(dist_to_ref[surface_pred], 95),
                     np.percentile(dist_to_pred[surface_ref], 95)))


def score_segmentation(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                       class_labels: Mapping[str, int]) -> dict[str, dict[str, float]]:
    """Dice and HD95 per class for one case.

    Args:
        pred, ref: integer label maps of the same shape.
        spacing: voxel size per array axis, in mm.
        class_labels: foreground class name to label value.

    Returns:
        ``{class_name: {"Dice": float, "HD95": float, "BackgroundShare": float}}``.
    """
    if pred.shape != ref.shape:
        raise UserInputError(f"Prediction shape {pred.shape} differs from reference shape {ref.shape}.")
    background = ref == 0
    return {name: {"Dice": dice_score(pred == value, ref == value),
                   "HD95": hd95(pred == value, ref == value, spacing),
                   "BackgroundShare": background_share(pred == value, background)}
            for name, value in class_labels.items()}


def _read_label_map(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending
    if not path.is_file():
        raise UserInputError(f"Label file {path} does not exist.")
    ending = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    reader = determine_reader_writer_from_file_ending(ending, str(path), verbose=False)()
    seg, properties = reader.read_seg(str(path))
    return seg[0].astype(np.int32), tuple(float(s) for s in properties["spacing"])


def _score_case(pred_file: Path, ref_file: Path, class_labels: Mapping[str, int],
                ignore_label: int | None) -> dict:
    pred, _ = _read_label_map(pred_file)
    ref, spacing = _read_label_map(ref_file)
    if ignore_label is not None and np.any(ref == ignore_label):
        raise UserInputError(
            f"Reference {ref_file} contains the ignore label {ignore_label}: it is a sparse label, "
            f"not a dense one. Score against dense labels only."
        )
    if pred.shape != ref.shape:
        raise UserInputError(
            f"Prediction {pred_file} has shape {pred.shape}, reference {ref_file} has {ref.shape}."
        )
    return score_segmentation(pred, ref, spacing, class_labels)


def _score_case_star(arguments):
    return _score_case(*arguments)


def summarise(per_case: Mapping[str, Mapping[str, Mapping[str, float]]],
              class_labels: Mapping[str, int]) -> dict:
    """Means over cases per class (NaN-aware) and the mean over classes."""
    mean = {}
    for name in class_labels:
        # summaries written before BackgroundShare existed lack it
        mean[name] = {metric: _nanmean([per_case[c][name].get(metric, float("nan")) for c in per_case])
                      for metric in ("Dice", "HD95", "BackgroundShare")}
    foreground = {metric: _nanmean([mean[n][metric] for n in class_labels]) for metric in ("Dice", "HD95")}
    return {"mean": mean, "foreground_mean": foreground}


def _nanmean(values: Sequence[float]) -> float:
    values = np.asarray(values, dtype=float)
    return float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")


def score_cases(pairs: Mapping[str, tuple[Path, Path]], class_labels: Mapping[str, int],
                output_file: str | os.PathLike, ignore_label: int | None = None,
                num_processes: int = 1, description: str = "Scoring on dense labels",
                extra: Mapping | None = None) -> dict:
    """Score predictions against dense references and write the result as JSON.

    Args:
        pairs: case id to (prediction file, dense reference file).
        class_labels: foreground class name to label value.
        output_file: where the JSON goes (written atomically).
        ignore_label: the dataset's ignore label; a reference containing it is refused.
        num_processes: worker processes.
        extra: additional top-level entries for the JSON (e.g. which cases had no dense label).

    Returns:
        The written summary: ``metric_per_case``, ``mean`` (per class), ``foreground_mean``.
    """
    if not pairs:
        raise UserInputError("Nothing to score: no case has both a prediction and a dense label.")
    for case, (pred, ref) in pairs.items():
        for f in (pred, ref):
            if not Path(f).is_file():
                raise UserInputError(f"Case '{case}': {f} does not exist.")
    cases = sorted(pairs)
    args = [(Path(pairs[c][0]), Path(pairs[c][1]), dict(class_labels), ignore_label) for c in cases]
    if num_processes > 1:
        with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
            results = list(tqdm(pool.imap(_score_case_star, args), total=len(args), desc=description))
    else:
        results = [_score_case(*a) for a in tqdm(args, desc=description)]
    per_case = dict(zip(cases, results))
    summary = {
        "reference": "dense labels",
        "class_labels": dict(class_labels),
        **summarise(per_case, class_labels),
        "metric_per_case": [{"case": c, "prediction": str(pairs[c][0]), "reference": str(pairs[c][1]),
                             "metrics": per_case[c]} for c in cases],
        **(extra or {}),
    }
    write_json_atomic(summary, output_file)
    return summary
