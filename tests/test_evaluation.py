import itertools
import json
import math

import numpy as np
import pytest

from nnunet_weak.errors import UserInputError
from nnunet_weak.evaluation import (background_share, confusion_matrix, dice_score, score_cases, score_segmentation,
                                    summarise, surface_distances, wsl4mis_scores)
from nnunet_weak.raw_dataset import write_volume


def reference_surface(mask):
    """Voxels of the mask with a face neighbour outside it or outside the array, by explicit loops."""
    out = np.zeros_like(mask)
    for idx in itertools.product(*[range(s) for s in mask.shape]):
        if not mask[idx]:
            continue
        for axis in range(mask.ndim):
            for step in (-1, 1):
                n = list(idx)
                n[axis] += step
                if n[axis] < 0 or n[axis] >= mask.shape[axis] or not mask[tuple(n)]:
                    out[idx] = True
    return out


def reference_directed_distances(a, b, spacing):
    """Brute force: from each surface voxel centre of a, the distance to the nearest surface voxel centre of b."""
    pa = np.argwhere(reference_surface(a)) * np.asarray(spacing)
    pb = np.argwhere(reference_surface(b)) * np.asarray(spacing)
    return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(1)


def reference_hd95(a, b, spacing):
    """The 95th percentile of both directions' distances pooled (MedPy's definition)."""
    return np.percentile(np.concatenate([reference_directed_distances(a, b, spacing),
                                         reference_directed_distances(b, a, spacing)]), 95)


def reference_assd(a, b, spacing):
    """The mean of both directions' distances pooled (MedPy's definition)."""
    return np.concatenate([reference_directed_distances(a, b, spacing), reference_directed_distances(b, a, spacing)]).mean()


def test_dice_against_counting():
    rng = np.random.default_rng(0)
    a, b = rng.random((5, 6, 7)) > 0.6, rng.random((5, 6, 7)) > 0.5
    tp = sum(1 for i in np.ndindex(a.shape) if a[i] and b[i])
    assert dice_score(a, b) == pytest.approx(2 * tp / (a.sum() + b.sum()))
    assert math.isnan(dice_score(np.zeros((3, 3), bool), np.zeros((3, 3), bool)))
    assert dice_score(a, np.zeros_like(a)) == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_surface_distances_against_brute_force_anisotropic(seed):
    rng = np.random.default_rng(seed)
    shape = (4, 9, 8) if seed % 2 else (10, 12)
    spacing = (7.5, 1.25, 1.5)[-len(shape):]
    a = rng.random(shape) > 0.7
    b = rng.random(shape) > 0.6
    scores = surface_distances(a, b, spacing)
    assert scores["HD95"] == pytest.approx(reference_hd95(a, b, spacing), rel=1e-6)
    assert scores["ASSD"] == pytest.approx(reference_assd(a, b, spacing), rel=1e-6)


def test_surface_distance_empty_conventions():
    empty = np.zeros((3, 4, 5), bool)
    some = empty.copy()
    some[1, 2, 2] = True
    assert all(math.isnan(v) for v in surface_distances(empty, empty, (2.0, 1.0, 1.0)).values())
    diagonal = np.sqrt(6 ** 2 + 4 ** 2 + 5 ** 2)
    assert surface_distances(some, empty, (2.0, 1.0, 1.0)) == pytest.approx({"HD95": diagonal, "ASSD": diagonal})
    assert surface_distances(empty, some, (2.0, 1.0, 1.0)) == pytest.approx({"HD95": diagonal, "ASSD": diagonal})
    assert surface_distances(some, some, (2.0, 1.0, 1.0)) == {"HD95": 0.0, "ASSD": 0.0}
    with pytest.raises(ValueError, match="shape mismatch"):
        surface_distances(some, some, (1.0, 1.0))


def test_surface_distances_of_a_shifted_cube_are_the_shift_in_mm():
    a = np.zeros((6, 20, 20), bool)
    a[1:5, 5:12, 5:12] = True
    b = np.roll(a, 3, axis=2)
    scores = surface_distances(a, b, (5.0, 1.0, 2.0))
    assert scores["HD95"] == pytest.approx(6.0)
    assert 0 < scores["ASSD"] < 6.0


def test_wsl4mis_convention_voxel_units_and_empty_prediction():
    a = np.zeros((6, 20, 20), bool)
    a[1:5, 5:12, 5:12] = True
    b = np.roll(a, 3, axis=2)
    scores = wsl4mis_scores(b, a)
    assert scores["HD95"] == pytest.approx(3.0)  # voxels: the spacing is not used
    assert scores["ASD"] == pytest.approx(reference_directed_distances(b, a, (1.0, 1.0, 1.0)).mean())
    assert scores["Dice"] == pytest.approx(dice_score(a, b))
    empty = np.zeros_like(a)
    assert wsl4mis_scores(empty, a) == {"Dice": 0.0, "HD95": 0.0, "ASD": 0.0}
    assert wsl4mis_scores(empty, empty) == {"Dice": 0.0, "HD95": 0.0, "ASD": 0.0}
    absent = wsl4mis_scores(a, empty)
    assert absent["Dice"] == 0.0 and math.isnan(absent["HD95"]) and math.isnan(absent["ASD"])


def test_conventions_differ_only_where_they_say():
    ref = np.zeros((3, 12, 12), np.int32)
    ref[:, 2:6, 2:6] = 1
    ref[:, 7:10, 7:10] = 2
    pred = np.roll(ref, 1, axis=1)
    pred[pred == 2] = 0
    spacing = (10.0, 2.0, 2.0)
    project = score_segmentation(pred, ref, spacing, {"a": 1, "b": 2})
    published = score_segmentation(pred, ref, spacing, {"a": 1, "b": 2}, convention="wsl4mis")
    assert project["a"]["Dice"] == published["a"]["Dice"]
    assert project["a"]["HD95"] == pytest.approx(2.0) and published["a"]["HD95"] == pytest.approx(1.0)
    assert project["b"]["Dice"] == 0.0 and project["b"]["HD95"] == pytest.approx(np.linalg.norm([30, 24, 24]))
    assert published["b"] == {"Dice": 0.0, "HD95": 0.0, "ASD": 0.0, "BackgroundShare": 0.0}
    with pytest.raises(UserInputError, match="Unknown metric convention"):
        score_segmentation(pred, ref, spacing, {"a": 1}, convention="medpy")


def test_summarise_means_the_metrics_the_cases_hold():
    per_case = {"x": {"a": {"Dice": 0.5, "HD95": 2.0, "BackgroundShare": 0.1}},
                "y": {"a": {"Dice": 1.0, "HD95": float("nan"), "ASSD": 4.0, "BackgroundShare": 0.3}}}
    summary = summarise(per_case, {"a": 1})
    assert summary["mean"]["a"] == pytest.approx({"Dice": 0.75, "HD95": 2.0, "BackgroundShare": 0.2, "ASSD": 4.0})
    assert set(summary["foreground_mean"]) == {"Dice", "HD95", "ASSD"}


def test_score_segmentation_per_class():
    ref = np.zeros((2, 6, 6), np.int32)
    ref[:, 1:3, 1:3] = 1
    ref[:, 3:5, 3:5] = 2
    pred = ref.copy()
    pred[pred == 2] = 0
    scores = score_segmentation(pred, ref, (1.0, 1.0, 1.0), {"a": 1, "b": 2})
    assert scores["a"]["Dice"] == 1.0 and scores["a"]["HD95"] == 0.0
    assert scores["b"]["Dice"] == 0.0


def test_score_cases_writes_json_and_refuses_sparse_reference(tmp_path):
    ref = np.zeros((3, 8, 8), np.uint8)
    ref[:, 2:6, 2:6] = 1
    pred = np.zeros_like(ref)
    pred[:, 2:6, 2:4] = 1
    write_volume(ref, (5.0, 1.0, 1.0), tmp_path / "ref.nii.gz")
    write_volume(pred, (5.0, 1.0, 1.0), tmp_path / "pred.nii.gz")
    out = tmp_path / "summary.json"
    summary = score_cases({"c": (tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz")}, {"fg": 1}, out)
    assert json.loads(out.read_text(encoding="utf-8"))["mean"]["fg"]["Dice"] == pytest.approx(2 * 24 / (24 + 48))
    assert summary["foreground_mean"]["Dice"] == pytest.approx(2 / 3)
    assert summary["convention"] == "nnunet-weak" and summary["foreground_mean"]["ASSD"] > 0
    published = score_cases({"c": (tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz")}, {"fg": 1},
                            tmp_path / "published.json", convention="wsl4mis")
    assert published["convention"] == "wsl4mis" and "ASD" in published["foreground_mean"]
    with pytest.raises(UserInputError, match="Unknown metric convention"):
        score_cases({"c": (tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz")}, {"fg": 1}, tmp_path / "z.json",
                    convention="monai")

    sparse = ref.copy()
    sparse[0] = 2
    write_volume(sparse, (5.0, 1.0, 1.0), tmp_path / "sparse.nii.gz")
    with pytest.raises(UserInputError, match="ignore label"):
        score_cases({"c": (tmp_path / "pred.nii.gz", tmp_path / "sparse.nii.gz")}, {"fg": 1},
                    tmp_path / "x.json", ignore_label=2)
    with pytest.raises(UserInputError, match="does not exist"):
        score_cases({"c": (tmp_path / "missing.nii.gz", tmp_path / "ref.nii.gz")}, {"fg": 1}, tmp_path / "y.json")


def test_confusion_matrix_against_loops():
    rng = np.random.default_rng(3)
    truth, predicted = rng.integers(0, 4, (5, 7, 6)), rng.integers(0, 4, (5, 7, 6))
    valid = rng.random(truth.shape) > 0.3
    expected = np.zeros((4, 4), int)
    for index in np.ndindex(truth.shape):
        if valid[index]:
            expected[truth[index], predicted[index]] += 1
    np.testing.assert_array_equal(confusion_matrix(truth, predicted, 4, valid=valid), expected)
    with pytest.raises(ValueError, match="outside 0..3"):
        confusion_matrix(truth, predicted + 1, 4)
    with pytest.raises(ValueError, match="shape mismatch"):
        confusion_matrix(truth, predicted[:1], 4)


def test_background_share_counts_background_predicted_as_each_class():
    ref = np.zeros((4, 5), int)
    ref[1:3, 1:3] = 1  # 4 foreground voxels, 16 background
    pred = np.zeros_like(ref)
    pred[0, :] = 2      # 5 background voxels called class 2
    pred[1:3, 1:3] = 1
    pred[3, 0] = 1      # 1 background voxel called class 1
    scores = score_segmentation(pred, ref, (1.0, 1.0), {"a": 1, "b": 2})
    assert scores["a"]["BackgroundShare"] == pytest.approx(1 / 16)
    assert scores["b"]["BackgroundShare"] == pytest.approx(5 / 16)
    assert math.isnan(background_share(pred == 1, np.zeros_like(ref, bool)))
