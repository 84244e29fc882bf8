"""Accuracy on dense labels of validation cases, measured every epoch.

On a scribble dataset nnU-Net's per-epoch pseudo-Dice compares predictions with the scribbles of
validation patches, ignored voxels excluded. A class that floods the un-annotated background far
from every scribble adds no false positive there, so the pseudo-Dice stays high while the anatomy
is lost (ACDC, issue 13: pseudo-Dice 0.95 for MYO, dense Dice 0.11). This monitor predicts whole
validation cases (nnU-Net's sliding window, no mirroring) with the network being trained and scores
them against their *dense* labels: per class, the Dice and the share of the true background
predicted as that class. Nothing here enters training: it only reads validation cases.

The cases are preprocessed once with nnU-Net's own preprocessor, the dense label as segmentation, so
that they are scored in the network's voxel grid (cropped and resampled as the network sees them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from nnunet_weak.evaluation import confusion_matrix


@dataclass(frozen=True)
class DenseMonitorScores:
    """One epoch's scores, each a list over the foreground classes in label order.

    Attributes:
        dice: Dice per class, voxels of all monitored cases pooled (``NaN`` where a class is absent
            from prediction and label).
        background_as: share of the true-background voxels predicted as each class.
    """

    dice: list[float]
    background_as: list[float]


def scores_from_confusion(counts: np.ndarray) -> DenseMonitorScores:
    """Pooled Dice and background shares from a ``(L, L)`` confusion matrix (rows: truth, columns: prediction)."""
    counts = np.asarray(counts, dtype=np.float64)
    true_positive = np.diag(counts)[1:]
    denominator = counts[1:].sum(1) + counts[:, 1:].sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(denominator > 0, 2 * true_positive / denominator, np.nan)
    background = counts[0].sum()
    background_as = counts[0, 1:] / background if background > 0 else np.full(counts.shape[0] - 1, np.nan)
    return DenseMonitorScores([float(v) for v in dice], [float(v) for v in background_as])


class DenseValidationMonitor:
    """Scores a network on preprocessed validation cases with dense labels.

    Args:
        cases: case id to ``(data, dense)``: ``data`` ``(C, *spatial)`` float32, the preprocessed input;
            ``dense`` ``(*spatial)`` integer, the dense label in the same grid (negative values, nnU-Net's
            "outside the image", are not scored).
        num_classes: label values ``0 .. num_classes - 1`` (background included).
    """

    def __init__(self, cases: Mapping[str, tuple[np.ndarray, np.ndarray]], num_classes: int):
        if not cases:
            raise ValueError("DenseValidationMonitor needs at least one case")
        for case, (data, dense) in cases.items():
            if data.shape[1:] != dense.shape:
                raise ValueError(f"case {case}: data {data.shape} and dense label {dense.shape} differ in their "
                                 f"spatial shape")
            if dense.max() >= num_classes:
                raise ValueError(f"case {case}: dense label value {int(dense.max())} is not below the number of "
                                 f"classes {num_classes}")
        self.cases = dict(cases)
        self.num_classes = num_classes

    @classmethod
    def from_raw_cases(cls, cases: Mapping[str, tuple[Sequence[str], str]], plans_manager, configuration_manager,
                       dataset_json: dict, num_classes: int) -> "DenseValidationMonitor":
        """Preprocess ``{case: (image files, dense label file)}`` as nnU-Net preprocesses training cases."""
        preprocessor = configuration_manager.preprocessor_class(verbose=False)
        prepared = {}
        for case, (images, dense) in cases.items():
            data, seg, _ = preprocessor.run_case([str(f) for f in images], str(dense), plans_manager,
                                                 configuration_manager, dataset_json)
            prepared[case] = (data.astype(np.float32), seg[0].astype(np.int16))
        return cls(prepared, num_classes)

    def confusion(self, predict_logits) -> np.ndarray:
        """The ``(L, L)`` voxel confusion matrix over all cases; ``predict_logits`` maps a ``(C, *spatial)``
        tensor to ``(L, *spatial)`` logits (e.g. ``nnUNetPredictor.predict_sliding_window_return_logits``)."""
        counts = np.zeros((self.num_classes, self.num_classes), np.int64)
        for data, dense in self.cases.values():
            with torch.no_grad():
                predicted = predict_logits(torch.from_numpy(data)).argmax(0).cpu().numpy()
            counts += confusion_matrix(dense, predicted, self.num_classes, valid=dense >= 0)
        return counts

    def measure(self, predict_logits) -> DenseMonitorScores:
        """Dice and background shares of the predictions made by ``predict_logits``."""
        return scores_from_confusion(self.confusion(predict_logits))
