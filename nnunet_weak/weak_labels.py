"""Weak labels made from dense ones, as label maps with nnU-Net's ignore label.

Every generator takes a dense (z, y, x) label map (background 0, classes 1..ignore-1) and returns a
map of the same shape in which voxels whose class the weak label does not tell carry
``ignore_label``. All work slice by slice along axis 0 (the through-plane axis of the stacks this
project converts), as annotators would.

- ``eroded_labels``: each class mask eroded ``iterations`` times (Kervadec et al.'s weak labels for
  mixed supervision); only the remaining interior voxels are labelled, background included.
- ``bounding_box_labels``: voxels outside every class's (slice-wise) bounding box are background;
  everything inside a box is unknown.
- ``centroid_disc_labels``: a disc of radius ``radius`` around the most interior point of each class
  in each slice, labelled with the class; everything else unknown.
- scribbles: ``nnunet_weak.scribbles.simulate_scribbles``.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def _check(label: np.ndarray, ignore_label: int) -> None:
    if label.ndim != 3:
        raise ValueError(f"expected a (z, y, x) label map, got shape {label.shape}")
    if label.size and label.max() >= ignore_label:
        raise ValueError(f"label values must be below the ignore label {ignore_label}, found {label.max()}")


def eroded_labels(label: np.ndarray, ignore_label: int, iterations: int = 5) -> np.ndarray:
    """Per slice and class (background included), the mask eroded ``iterations`` times (4-connected).

    A class that erodes away entirely in a slice leaves no label there.
    """
    _check(label, ignore_label)
    out = np.full(label.shape, ignore_label, dtype=np.uint8)
    structure = ndimage.generate_binary_structure(2, 1)
    for z in range(label.shape[0]):
        for c in np.unique(label[z]):
            core = ndimage.binary_erosion(label[z] == c, structure=structure, iterations=iterations,
                                          border_value=1)
            out[z][core] = c
    return out


def bounding_box_labels(label: np.ndarray, ignore_label: int, margin: int = 0) -> np.ndarray:
    """Background outside every class's slice-wise bounding box (grown by ``margin``), unknown inside."""
    _check(label, ignore_label)
    out = np.zeros(label.shape, dtype=np.uint8)
    for z in range(label.shape[0]):
        for c in np.unique(label[z]):
            if c == 0:
                continue
            ys, xs = np.nonzero(label[z] == c)
            out[z, max(ys.min() - margin, 0): ys.max() + margin + 1,
                max(xs.min() - margin, 0): xs.max() + margin + 1] = ignore_label
    return out


def centroid_disc_labels(label: np.ndarray, ignore_label: int, radius: int = 2) -> np.ndarray:
    """A disc around the most interior point of each class in each slice; everything else unknown.

    The most interior point (maximum of the distance to the class border) lies inside the class even
    when its centroid does not (a ring); the disc is clipped to the class.
    """
    _check(label, ignore_label)
    out = np.full(label.shape, ignore_label, dtype=np.uint8)
    yy, xx = np.mgrid[0:label.shape[1], 0:label.shape[2]]
    for z in range(label.shape[0]):
        for c in np.unique(label[z]):
            if c == 0:
                continue
            mask = label[z] == c
            distance = ndimage.distance_transform_edt(mask)
            cy, cx = np.unravel_index(np.argmax(distance), distance.shape)
            disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2) & mask
            out[z][disc] = c
    return out
