import numpy as np
import pytest

from nnunet_weak.phantom import PHANTOM_LABELS, generate_case
from nnunet_weak.scribbles import interior_stroke, simulate_scribbles

IGNORE = 4


def test_phantom_is_deterministic_and_varies_with_seed():
    a, b, c = generate_case(5), generate_case(5), generate_case(6)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.spacing == b.spacing
    assert a.label.shape != c.label.shape or not np.array_equal(a.label, c.label)


@pytest.mark.parametrize("seed", range(5))
def test_phantom_anatomy(seed):
    case = generate_case(seed)
    assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
    assert case.image.shape == case.label.shape and case.label.ndim == 3
    assert case.spacing[0] > 2 * case.spacing[1]  # thick slices
    assert set(np.unique(case.label)) == set(PHANTOM_LABELS.values())
    lv, myo = case.label == PHANTOM_LABELS["LV"], case.label == PHANTOM_LABELS["MYO"]
    # the blood pool is brighter than the muscle around it
    assert case.image[lv].mean() > 2 * case.image[myo].mean()
    # the LV cavity tapers from base to apex
    area = lv.sum(axis=(1, 2))
    assert area[0] > area[-1]


@pytest.mark.parametrize("seed", range(5))
def test_scribbles_are_sparse_and_consistent_with_dense(seed):
    case = generate_case(seed)
    scribble = simulate_scribbles(case.label, IGNORE, seed)
    annotated = scribble != IGNORE
    np.testing.assert_array_equal(scribble[annotated], case.label[annotated])
    assert 0.005 < annotated.mean() < 0.15
    for z in range(case.label.shape[0]):
        for c in (1, 2, 3):
            if (case.label[z] == c).sum() >= 4:
                assert (scribble[z] == c).any(), f"slice {z} class {c} has no stroke"
        assert (scribble[z] == 0).any(), f"slice {z} has no background stroke"


def test_scribbles_are_seeded():
    label = generate_case(1).label
    np.testing.assert_array_equal(simulate_scribbles(label, IGNORE, 3), simulate_scribbles(label, IGNORE, 3))
    assert not np.array_equal(simulate_scribbles(label, IGNORE, 3), simulate_scribbles(label, IGNORE, 4))


def test_interior_stroke_stays_inside():
    mask = np.zeros((30, 30), bool)
    mask[8:22, 5:25] = True
    stroke = interior_stroke(mask, np.random.default_rng(0), margin=2)
    assert stroke.any() and not (stroke & ~mask).any()


def test_scribbles_refuse_labels_at_or_above_ignore():
    with pytest.raises(ValueError, match="ignore label"):
        simulate_scribbles(np.full((2, 5, 5), 4, np.uint8), IGNORE, 0)


def test_scribble_statistics_against_counting():
    from nnunet_weak.scribble_statistics import statistics_of
    dense = np.zeros((1, 6, 8), np.uint8)
    dense[0, 1:5, 1:7] = 1
    scribble = np.full(dense.shape, IGNORE, np.uint8)
    scribble[0, 2, 2:5] = 1       # 3 voxels of class 1, each 2 voxels (x spacing 1.5 -> y 2.0 mm) from the border
    scribble[0, 0, 0] = 0         # one background voxel, 1 voxel from class 1
    scribble[0, 5, 7] = 1         # a wrong stroke voxel (background in the dense label)
    stats = statistics_of([(scribble, dense, (5.0, 2.0, 1.5))], [0, 1], IGNORE)
    assert stats[1]["annotated_fraction"] == pytest.approx(3 / 24)
    assert stats[1]["wrong_fraction"] == pytest.approx(1 / 4)
    # distance of (2, 2), (2, 3), (2, 4) to the nearest class-0 voxel: row 0 is 2 rows away (4 mm),
    # column 0 is 2 columns away for x=2 (3 mm): min(4, 3) = 3, then 4, 4
    assert stats[1]["boundary_distance_mm"] == pytest.approx((3 + 4 + 4) / 3)
    assert stats[0]["annotated_fraction"] == pytest.approx(1 / 24)
    assert stats[1]["slice_coverage"] == 1.0
    # 4 voxels labelled 1 (3 right, 1 wrong) and 1 labelled 0: the shares a partial loss sees
    assert stats[1]["labelled_share"] == pytest.approx(4 / 5)
    assert stats[0]["labelled_share"] == pytest.approx(1 / 5)
