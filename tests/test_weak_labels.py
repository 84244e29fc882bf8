import numpy as np
import pytest

from nnunet_weak.phantom import generate_case
from nnunet_weak.weak_labels import bounding_box_labels, centroid_disc_labels, eroded_labels

IGNORE = 4


def reference_erosion_2d(mask, iterations):
    """Explicit loops: a pixel survives one step if it and its 4 neighbours are in (border counts in)."""
    for _ in range(iterations):
        padded = np.pad(mask, 1, constant_values=True)
        nxt = np.zeros_like(mask)
        for y in range(mask.shape[0]):
            for x in range(mask.shape[1]):
                py, px = y + 1, x + 1
                nxt[y, x] = (padded[py, px] and padded[py - 1, px] and padded[py + 1, px]
                             and padded[py, px - 1] and padded[py, px + 1])
        mask = nxt
    return mask


@pytest.fixture(scope="module")
def dense():
    return generate_case(2, shape_yx=(32, 32)).label


def test_erosion_against_loops(dense):
    weak = eroded_labels(dense, IGNORE, iterations=2)
    for z in range(dense.shape[0]):
        for c in np.unique(dense[z]):
            np.testing.assert_array_equal(weak[z] == c, reference_erosion_2d(dense[z] == c, 2))
    annotated = weak != IGNORE
    np.testing.assert_array_equal(weak[annotated], dense[annotated])
    assert (eroded_labels(dense, IGNORE, 5) != IGNORE).sum() < annotated.sum()


def test_bounding_boxes_against_loops(dense):
    weak = bounding_box_labels(dense, IGNORE, margin=1)
    for z in range(dense.shape[0]):
        boxes = []
        for c in set(dense[z].ravel().tolist()) - {0}:
            ys, xs = np.nonzero(dense[z] == c)
            boxes.append((ys.min() - 1, ys.max() + 1, xs.min() - 1, xs.max() + 1))
        for y in range(dense.shape[1]):
            for x in range(dense.shape[2]):
                inside = any(y0 <= y <= y1 and x0 <= x <= x1 for y0, y1, x0, x1 in boxes)
                assert weak[z, y, x] == (IGNORE if inside else 0)


def test_centroid_discs(dense):
    weak = centroid_disc_labels(dense, IGNORE, radius=1)
    annotated = weak != IGNORE
    np.testing.assert_array_equal(weak[annotated], dense[annotated])
    for z in range(dense.shape[0]):
        for c in np.unique(dense[z]):
            if c:
                assert (weak[z] == c).any(), f"slice {z} class {c} has no disc"
    assert 0 not in np.unique(weak)


def test_generators_refuse_the_ignore_value():
    with pytest.raises(ValueError, match="ignore label"):
        eroded_labels(np.full((1, 3, 3), IGNORE, np.uint8), IGNORE)
