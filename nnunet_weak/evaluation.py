"""Scoring segmentations against dense labels: per-class Dice, HD95 and ASSD, computed by MedPy.

Every number this project reports comes from here, computed against *dense* labels. nnU-Net's own
``summary.json`` on a sparse dataset scores the sparse labels (ignored voxels excluded) and must
never be reported as accuracy.

The overlap and surface-distance computations are MedPy's (``medpy.metric.binary``: ``dc``, ``hd95``,
``assd``, ``asd``), the library whose ``hd95`` the published scribble tables on ACDC use. Surfaces are
the voxels of a set with a face-neighbour outside it (the array border counts as outside). From each
surface voxel the distance to the nearest surface voxel of the other set is taken, in both directions;
HD95 is the 95th percentile of the two directions' distances pooled, ASSD their mean (MedPy ≥ 0.5).
Until 2026-11-29 this project computed HD95 by hand as the larger of the two directed 95th
percentiles, which is never smaller; tables measured before then say so. MedPy refuses empty sets;
what an empty prediction or an absent class scores is the convention, one of ``METRIC_CONVENTIONS``:

``nnunet-weak`` (the default; every table of this project)
    Distances in mm (the voxel spacing). Dice ``NaN`` when prediction and reference are both empty
    (left out of means, as nnU-Net does); HD95 and ASSD ``NaN`` then too, and the diagonal of the
    volume in mm (the largest distance possible) when exactly one is empty, so that a missed or
    hallucinated structure is penalised, not skipped.
``wsl4mis``
    The convention of the WSL4MIS tables (Luo et al., MICCAI 2022; ``code/test_2D_fully.py`` and
    ``code/val_2D.py``), to set numbers beside them: distances in voxels (no spacing), ``ASD`` (MedPy's
    one-sided average surface distance, prediction to reference) in place of ASSD, and an empty
    prediction scores Dice 0, HD95 0, ASD 0. A prediction of a class the reference lacks has Dice 0
    and ``NaN`` distances (MedPy raises there; ACDC's volumes always hold all three classes).

``BackgroundShare`` = |P ∖ R_fg| / |R_bg|, in both conventions: the share of the reference's
background voxels predicted as class c (``NaN`` when the reference has no background). A class that
floods the background far from the anatomy barely moves Dice's denominator on small structures'
cases but shows here.
"""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from medpy.metric import binary as medpy_binary
from tqdm import tqdm

from nnunet_weak.atomic import write_json_atomic
from nnunet_weak.errors import UserInputError
from nnunet_weak.raw_dataset import check_same_grid, integer_labels, read_volume

METRIC_CONVENTIONS = ("nnunet-weak", "wsl4mis")
DEFAULT_CONVENTION = "nnunet-weak"
NOT_AVERAGED_OVER_CLASSES = ("BackgroundShare",)


def check_convention(convention: str) -> None:
    """Refuse a convention that is not one of ``METRIC_CONVENTIONS``."""
    if convention not in METRIC_CONVENTIONS:
        raise UserInputError(f"Unknown metric convention '{convention}'; choose one of {', '.join(METRIC_CONVENTIONS)}.")


def dice_score(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice (MedPy's ``dc``) of two boolean masks of equal shape; ``NaN`` when both are empty."""
    if not pred.any() and not ref.any():
        return float("nan")
    return float(medpy_binary.dc(pred, ref))


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


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """HD95 and ASSD in mm (MedPy), with the ``nnunet-weak`` convention for empty sets (module docstring).

    Args:
        pred, ref: boolean masks of the same shape (2D or 3D).
        spacing: voxel size per axis, in the order of the array axes, in mm.

    Returns:
        ``{"HD95": float, "ASSD": float}``.
    """
    if pred.shape != ref.shape or len(spacing) != pred.ndim:
        raise ValueError(f"shape mismatch: pred {pred.shape}, ref {ref.shape}, spacing {tuple(spacing)}")
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return {"HD95": float("nan"), "ASSD": float("nan")}
    if has_pred != has_ref:
        diagonal = float(np.linalg.norm(np.array(pred.shape) * np.asarray(spacing, dtype=float)))
        return {"HD95": diagonal, "ASSD": diagonal}
    spacing = tuple(float(s) for s in spacing)
    return {"HD95": float(medpy_binary.hd95(pred, ref, voxelspacing=spacing)),
            "ASSD": float(medpy_binary.assd(pred, ref, voxelspacing=spacing))}


def wsl4mis_scores(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Dice, HD95 and ASD of one class as the WSL4MIS tables compute them (voxel units; module docstring)."""
    if pred.shape != ref.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape}, ref {ref.shape}")
    if not pred.any():
        return {"Dice": 0.0, "HD95": 0.0, "ASD": 0.0}
    if not ref.any():
        return {"Dice": 0.0, "HD95": float("nan"), "ASD": float("nan")}
    return {"Dice": float(medpy_binary.dc(pred, ref)), "HD95": float(medpy_binary.hd95(pred, ref)),
            "ASD": float(medpy_binary.asd(pred, ref))}


def score_segmentation(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                       class_labels: Mapping[str, int], convention: str = DEFAULT_CONVENTION
                       ) -> dict[str, dict[str, float]]:
    """Scores per class for one case, in one of ``METRIC_CONVENTIONS`` (module docstring).

    Args:
        pred, ref: integer label maps of the same shape.
        spacing: voxel size per array axis, in mm.
        class_labels: foreground class name to label value.
        convention: ``nnunet-weak`` or ``wsl4mis``.

    Returns:
        ``{class_name: {"Dice", "HD95", "ASSD", "BackgroundShare"}}`` (``nnunet-weak``; distances in mm) or
        ``{class_name: {"Dice", "HD95", "ASD", "BackgroundShare"}}`` (``wsl4mis``; distances in voxels).
    """
    check_convention(convention)
    if pred.shape != ref.shape:
        raise UserInputError(f"Prediction shape {pred.shape} differs from reference shape {ref.shape}.")
    background = ref == 0
    scores = {}
    for name, value in class_labels.items():
        predicted, reference = pred == value, ref == value
        if convention == "wsl4mis":
            scores[name] = wsl4mis_scores(predicted, reference)
        else:
            scores[name] = {"Dice": dice_score(predicted, reference), **surface_distances(predicted, reference, spacing)}
        scores[name]["BackgroundShare"] = background_share(predicted, background)
    return scores


def _score_case(pred_file: Path, ref_file: Path, class_labels: Mapping[str, int],
                ignore_label: int | None, convention: str) -> dict:
    prediction, reference = read_volume(pred_file), read_volume(ref_file)
    check_same_grid(reference, prediction, f"Prediction {pred_file} against {ref_file}",
                    names=("reference", "prediction"))
    pred = integer_labels(prediction[0], f"Prediction {pred_file}")
    ref = integer_labels(reference[0], f"Reference {ref_file}")
    if ignore_label is not None and np.any(ref == ignore_label):
        raise UserInputError(
            f"Reference {ref_file} contains the ignore label {ignore_label}: it is a sparse label, "
            f"not a dense one. Score against dense labels only."
        )
    return score_segmentation(pred, ref, reference[1], class_labels, convention)


def _score_case_star(arguments):
    return _score_case(*arguments)


def summarise(per_case: Mapping[str, Mapping[str, Mapping[str, float]]],
              class_labels: Mapping[str, int]) -> dict:
    """Means over cases per class (NaN-aware) and, but for ``BackgroundShare``, the mean over classes.

    The metrics are those the cases hold (a convention's set); one missing from some cases (a summary
    written before it existed) is ``NaN`` there.
    """
    metrics = list(dict.fromkeys(m for case in per_case.values() for scores in case.values() for m in scores))
    mean = {name: {metric: _nanmean([per_case[c][name].get(metric, float("nan")) for c in per_case])
                   for metric in metrics}
            for name in class_labels}
    foreground = {metric: _nanmean([mean[n][metric] for n in class_labels])
                  for metric in metrics if metric not in NOT_AVERAGED_OVER_CLASSES}
    return {"mean": mean, "foreground_mean": foreground}


def _nanmean(values: Sequence[float]) -> float:
    values = np.asarray(values, dtype=float)
    return float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")


def reference_labels(folder: Path, ending: str) -> dict[str, Path]:
    """Case id to reference label map, for a folder of ``<case><ending>`` files."""
    if not folder.is_dir():
        raise UserInputError(f"Reference folder {folder} does not exist.")
    references = {f.name[: -len(ending)]: f for f in sorted(folder.iterdir()) if f.name.endswith(ending)}
    if not references:
        raise UserInputError(f"{folder} holds no '*{ending}' label maps (set --file_ending for other formats).")
    return references


def classes_found(references: Sequence[Path]) -> dict[str, int]:
    """Every foreground value the reference label maps hold, each named by its value."""
    values = set()
    for path in references:
        values |= set(np.unique(integer_labels(read_volume(path)[0], f"Reference {path}")).tolist())
    if not values - {0}:
        raise UserInputError("The references hold no foreground value: nothing to score.")
    return {str(v): int(v) for v in sorted(values - {0})}


def score_cases(pairs: Mapping[str, tuple[Path, Path]], class_labels: Mapping[str, int] | None,
                output_file: str | os.PathLike, ignore_label: int | None = None,
                num_processes: int = 1, description: str = "Scoring on dense labels",
                extra: Mapping | None = None, convention: str = DEFAULT_CONVENTION) -> dict:
    """Score predictions against dense references and write the result as JSON.

    Args:
        pairs: case id to (prediction file, dense reference file).
        class_labels: foreground class name to label value (``None``: every value the references hold,
            ``classes_found``).
        output_file: where the JSON goes (written atomically).
        ignore_label: the dataset's ignore label; a reference containing it is refused.
        num_processes: worker processes.
        extra: additional top-level entries for the JSON (e.g. which cases had no dense label).
        convention: one of ``METRIC_CONVENTIONS`` (module docstring), recorded in the JSON.

    Returns:
        The written summary: ``metric_per_case``, ``mean`` (per class), ``foreground_mean``.
    """
    check_convention(convention)
    if not pairs:
        raise UserInputError("Nothing to score: no case has both a prediction and a dense label.")
    for case, (pred, ref) in pairs.items():
        for f in (pred, ref):
            if not Path(f).is_file():
                raise UserInputError(f"Case '{case}': {f} does not exist.")
    cases = sorted(pairs)
    if class_labels is None:
        class_labels = classes_found([Path(pairs[c][1]) for c in cases])
    args = [(Path(pairs[c][0]), Path(pairs[c][1]), dict(class_labels), ignore_label, convention)
            for c in cases]
    if num_processes > 1:
        with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
            results = list(tqdm(pool.imap(_score_case_star, args), total=len(args), desc=description))
    else:
        results = [_score_case(*a) for a in tqdm(args, desc=description)]
    per_case = dict(zip(cases, results))
    summary = {
        "reference": "dense labels",
        "convention": convention,
        "class_labels": dict(class_labels),
        **summarise(per_case, class_labels),
        "metric_per_case": [{"case": c, "prediction": str(pairs[c][0]), "reference": str(pairs[c][1]),
                             "metrics": per_case[c]} for c in cases],
        **(extra or {}),
    }
    write_json_atomic(summary, output_file)
    return summary
