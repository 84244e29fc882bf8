"""Simulating scribbles from dense labels.

For every slice (along axis 0, the through-plane axis of short-axis stacks) and every foreground
class present in it, one interior stroke: a random arc of the medial axis of the class mask (or,
for a compact blob whose medial axis is nearly a point, a chord through it, kept off the border). Background gets a stroke on a band around the structures. Strokes are one voxel wide; all
other voxels get the ignore label. The simulation is fully determined by the seed.

This is a first simulator (enough for a trainer to learn from); a later version is refined against
the real hand-drawn ACDC scribbles.
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
        stroke = _arc_of(skeleton, rng, 0.5, 0.9)
        if stroke.sum() >= min_length // 2:
            return stroke
    core = mask
    for m in range(margin, 0, -1):
        eroded = ndimage.binary_erosion(mask, iterations=m)
        if eroded.sum() >= min_length:
            core = eroded
            break
    return _chord(core, rng)


def simulate_scribbles(label: np.ndarray, ignore_label: int, seed: int, margin: int = 2,
                       background_distance: tuple[int, int] = (3, 7)) -> np.ndarray:
    """Scribbles for a dense (z, y, x) label map; un-annotated voxels get ``ignore_label``.

    Args:
        label: dense label map, background 0, classes 1..ignore_label-1.
        ignore_label: value for un-annotated voxels (nnU-Net's ignore label).
        seed: random seed.
        margin: distance in voxels the interior strokes keep from class borders.
        background_distance: the background stroke lies on a band this many voxels (min, max)
            outside the union of the foreground classes.

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
            if mask.sum() >= 4:
                scribble[z][interior_stroke(mask, rng, margin)] = c
        foreground = sl > 0
        near, far = background_distance
        if foreground.any():
            band = (ndimage.binary_dilation(foreground, iterations=far)
                    & ~ndimage.binary_dilation(foreground, iterations=near))
            ring = skeletonize(band)
            if ring.any():
                scribble[z][_arc_of(ring, rng, 0.4, 0.8) & (sl == 0)] = 0
        else:
            background = ndimage.binary_erosion(sl == 0, iterations=near)
            if background.any():
                scribble[z][_chord(background, rng)] = 0
    return scribble
