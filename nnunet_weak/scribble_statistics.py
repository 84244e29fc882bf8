"""How scribbles look, measured against the dense labels they were drawn on.

Per class c (background included), over a set of volumes:

- ``annotated_fraction``: scribbled voxels of class c / voxels of class c in the dense labels;
- ``boundary_distance_mm``: mean in-plane distance (mm) from a scribbled voxel of class c to the
  nearest voxel of another class (0 would be on the border; the medial axis is as far as it goes);
- ``slice_coverage``: fraction of the slices containing class c that carry a stroke of class c;
- ``wrong_fraction``: scribbled voxels whose class disagrees with the dense label;
- ``labelled_share``: voxels the scribble map labels c / voxels it labels with any class: the class
  balance a partial loss (a mean over labelled voxels) sees.

Used to compare simulated scribbles with hand-drawn ones (``benchmarks/scribble_realism.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage


@dataclass
class ScribbleStatistics:
    """Accumulates the statistics of the module docstring over volumes (``add``), per class."""

    classes: Sequence[int]
    _counts: dict = field(default_factory=dict)

    def __post_init__(self):
        self._counts = {c: {"class_voxels": 0, "scribbled": 0, "distance_sum": 0.0, "slices": 0,
                            "slices_with_stroke": 0, "wrong": 0} for c in self.classes}

    def add(self, scribble: np.ndarray, dense: np.ndarray, ignore_label: int, spacing_yx: Sequence[float]) -> None:
        """Add one (z, y, x) volume: its scribble map (``ignore_label`` = not annotated) and dense label."""
        if scribble.shape != dense.shape:
            raise ValueError(f"scribble {scribble.shape} and dense {dense.shape} differ in shape")
        for z in range(dense.shape[0]):
            for c in self.classes:
                inside = dense[z] == c
                stroke = scribble[z] == c
                counts = self._counts[c]
                counts["class_voxels"] += int(inside.sum())
                counts["wrong"] += int((stroke & ~inside).sum())
                correct = stroke & inside
                counts["scribbled"] += int(correct.sum())
                if inside.any():
                    counts["slices"] += 1
                    counts["slices_with_stroke"] += int(correct.any())
                if correct.any():
                    distance = ndimage.distance_transform_edt(inside, sampling=spacing_yx)
                    counts["distance_sum"] += float(distance[correct].sum())

    def summary(self) -> dict[int, dict[str, float]]:
        out = {}
        labelled_total = max(sum(k["scribbled"] + k["wrong"] for k in self._counts.values()), 1)
        for c, k in self._counts.items():
            scribbled = max(k["scribbled"], 1)
            out[c] = {
                "annotated_fraction": k["scribbled"] / max(k["class_voxels"], 1),
                "boundary_distance_mm": k["distance_sum"] / scribbled,
                "slice_coverage": k["slices_with_stroke"] / max(k["slices"], 1),
                "wrong_fraction": k["wrong"] / max(k["scribbled"] + k["wrong"], 1),
                "labelled_share": (k["scribbled"] + k["wrong"]) / labelled_total,
            }
        return out


def statistics_of(pairs: Iterable[tuple[np.ndarray, np.ndarray, Sequence[float]]], classes: Sequence[int],
                  ignore_label: int) -> dict[int, dict[str, float]]:
    """Statistics over (scribble, dense, (z, y, x) spacing) triples."""
    stats = ScribbleStatistics(classes)
    for scribble, dense, spacing in pairs:
        stats.add(scribble, dense, ignore_label, spacing[1:])
    return stats.summary()
