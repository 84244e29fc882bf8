"""Simulating scribbles from dense labels.

Per slice (along axis 0, the through-plane axis of short-axis stacks) and per class present in it:

- an **interior stroke**: a random arc of the medial axis of the class mask (or, for a compact blob
  whose medial axis is nearly a point, a chord through it), thickened to ``stroke_width`` voxels and
  kept inside the class;
- a **partial boundary stroke**: an arc of the contour ``boundary_depth`` voxels inside the class
  border, as annotators trace part of an outline;
- **background**: a thick arc on a band around the structures, and a chord on a fraction
  (``empty_slice_probability``) of the slices without structures.

All other voxels get the ignore label. The simulation is fully determined by the seed. The defaults
were set by measuring against the hand-drawn ACDC scribbles of Valvano et al.
(``benchmarks/scribble_realism.py``; the README gives the numbers).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize


def _arc_of(stroke: np.ndarray, rng: np.random.Generator, min_fraction: float, max_fraction: float) -> np.ndarray:
    """Keep the part of ``stroke`` inside a random angular sector around its centroid."""
    ys, xs = np.nonzero(stroke)
    angles = np.arctan2(ys - ys.mean(), xs - xs.mean())
    start = rng.uniform(-np.pi, np.pi)
    width = 2 * np.pi * rng.uniform(min_fraction, max_fraction)
    keep = np.mod(angles - start, 2 * np.pi) <= width
    out = np.zeros_like(stroke)
    out[ys[keep], xs[keep]] = True
    return out


def _chord(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A straight stroke through the centroid of ``mask`` in a random direction, clipped to it."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    direction = rng.uniform(0, np.pi)
    half = max(mask.shape)
    t = np.linspace(-half, half, 4 * half)
    py = np.round(cy + t * np.sin(direction)).astype(int)
    px = np.round(cx + t * np.cos(direction)).astype(int)
    inside = (py >= 0) & (py < mask.shape[0]) & (px >= 0) & (px < mask.shape[1])
    out = np.zeros_like(mask)
    out[py[inside], px[inside]] = True
    return out & mask


def interior_stroke(mask: np.ndarray, rng: np.random.Generator, margin: int = 2,
                    min_length: int = 6) -> np.ndarray:
    """One stroke inside a 2D mask: an arc of its medial axis, or a chord for compact blobs.

    The medial axis is as far from the border as the shape allows; the chord fallback is drawn in
    the mask shrunk by up to ``margin`` voxels.
    """
    skeleton = skeletonize(mask)
    if skeleton.sum() >= min_length:
        stroke = _arc_of(skeleton, rng, 0.3, 0.6)
        if stroke.sum() >= min_length // 2:
            return stroke
    core = mask
    for m in range(margin, 0, -1):
        eroded = ndimage.binary_erosion(mask, iterations=m)
        if eroded.sum() >= min_length:
            core = eroded
            break
    return _chord(core, rng)


def _thicken(stroke: np.ndarray, width: int, inside: np.ndarray) -> np.ndarray:
    """Grow a one-voxel stroke to about ``width`` voxels, never leaving ``inside``."""
    if width > 1:
        stroke = ndimage.binary_dilation(stroke, structure=np.ones((3, 3), bool), iterations=(width - 1) // 2)
    return stroke & inside


def boundary_stroke(mask: np.ndarray, rng: np.random.Generator, depth: int = 2) -> np.ndarray:
    """An arc of the contour ``depth`` voxels inside the border of a 2D mask (empty if too thin)."""
    outer = ndimage.binary_erosion(mask, iterations=depth) if depth else mask
    contour = outer & ~ndimage.binary_erosion(outer)
    if contour.sum() < 4:
        return np.zeros_like(mask)
    return _arc_of(contour, rng, 0.1, 0.3)


def simulate_scribbles(label: np.ndarray, ignore_label: int, seed: int, margin: int = 2,
                       stroke_width: int = 3, boundary_depth: int = 2,
                       background_distance: tuple[int, int] = (12, 30), empty_slice_probability: float = 0.5
                       ) -> np.ndarray:
    """Scribbles for a dense (z, y, x) label map; un-annotated voxels get ``ignore_label``.

    Args:
        label: dense label map, background 0, classes 1..ignore_label-1.
        ignore_label: value for un-annotated voxels (nnU-Net's ignore label).
        seed: random seed.
        margin: how far (voxels) a chord keeps from the class border.
        stroke_width: width (voxels) of interior and background strokes.
        boundary_depth: distance (voxels) of the partial boundary stroke inside the class border.
        background_distance: the background stroke lies on a band this many voxels (min, max)
            outside the union of the foreground classes.
        empty_slice_probability: chance that a slice without structures gets a background stroke.

    Returns:
        A uint8 map of the same shape: scribbled voxels carry their class, others ``ignore_label``.
    """
    if label.ndim != 3:
        raise ValueError(f"expected a (z, y, x) label map, got shape {label.shape}")
    if label.max(initial=0) >= ignore_label:
        raise ValueError(f"label values must be below the ignore label {ignore_label}, found {label.max()}")
    rng = np.random.default_rng(seed)
    scribble = np.full(label.shape, ignore_label, dtype=np.uint8)
    classes = [int(c) for c in np.unique(label) if c != 0]
    for z in range(label.shape[0]):
        sl = label[z]
        for c in classes:
            mask = sl == c
            if mask.sum() < 4:
                continue
            # thick strokes keep off the border: thin structures (a myocardium) get thin strokes
            core = ndimage.binary_erosion(mask, iterations=margin)
            thin = interior_stroke(mask, rng, margin)
            stroke = thin | _thicken(thin, stroke_width, core)
            scribble[z][stroke | boundary_stroke(mask, rng, boundary_depth)] = c
        background = sl == 0
        near, far = background_distance
        if (~background).any():
            ring = np.zeros_like(background)
            while not ring.any() and far > near >= 1:
                # a band that leaves the image is empty: move it closer to the structures
                band = (ndimage.binary_dilation(~background, iterations=far)
                        & ~ndimage.binary_dilation(~background, iterations=near))
                ring = skeletonize(band)
                near, far = near // 2, far // 2
            if ring.any():
                scribble[z][_thicken(_arc_of(ring, rng, 0.25, 0.5), stroke_width, background)] = 0
        elif rng.random() < empty_slice_probability:
            inner = ndimage.binary_erosion(background, iterations=margin)
            if inner.any():
                scribble[z][_thicken(_chord(inner, rng), stroke_width, background)] = 0
    return scribble
