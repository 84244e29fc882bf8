"""Ignore-aware fingerprint and plan sharing between twins."""
import json

import numpy as np
import pytest
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

from nnunet_weak.errors import UserInputError
from nnunet_weak.planners.ignore_aware_fingerprint import (IgnoreAwareFingerprintExtractor,
                                                           annotated_foreground_intensities)
from nnunet_weak.planners.plan_and_preprocess import copy_plans, plan_and_preprocess
from nnunet_weak.raw_dataset import CaseRecord, write_raw_dataset

CT_LABELS = {"background": 0, "organ": 1, "ignore": 2}


def _ct_case(identifier, seed):
    """Organ voxels at ~100 HU (labelled 1), un-annotated body at ~1000 HU (ignore), air (background)."""
    rng = np.random.default_rng(seed)
    image = np.full((3, 12, 12), -1000.0, np.float32)
    label = np.zeros(image.shape, np.uint8)
    image[:, 2:10, 2:10] = 1000 + rng.normal(0, 5, (3, 8, 8))
    label[:, 2:10, 2:10] = 2
    image[:, 4:6, 4:6] = 100 + rng.normal(0, 5, (3, 2, 2))
    label[:, 4:6, 4:6] = 1
    dense = np.where(label == 2, 0, label).astype(np.uint8)
    return CaseRecord(identifier, [image], (3.0, 1.0, 1.0), label, dense_label=dense, supervision="sparse",
                      weak_label="scribble")


def test_annotated_foreground_excludes_ignore_and_background():
    seg = np.array([[[0, 1, 2, 2]]])[None]
    img = np.array([[[5.0, 10.0, 99.0, 99.0]]])[None]
    (values,) = annotated_foreground_intensities(seg, img, ignore_label=2, num_samples=50)
    assert set(values.tolist()) == {10.0}
    (values,) = annotated_foreground_intensities(seg, img, ignore_label=None, num_samples=50)
    assert set(values.tolist()) == {10.0, 99.0}


def test_ignore_aware_fingerprint_statistics(nnunet_folders):
    write_raw_dataset(nnunet_folders["nnUNet_raw"], "Dataset601_CT", {"0": "CT"}, CT_LABELS,
                      [_ct_case(f"c{i}", i) for i in range(3)])
    stock = DatasetFingerprintExtractor(601, num_processes=1).run(overwrite_existing=True)
    ours = IgnoreAwareFingerprintExtractor(601, num_processes=1).run(overwrite_existing=True)
    ours_stats = ours["foreground_intensity_properties_per_channel"][0]
    stock_stats = stock["foreground_intensity_properties_per_channel"][0]
    assert ours_stats["mean"] == pytest.approx(100, abs=3)
    assert ours_stats["percentile_99_5"] < 130
    assert stock_stats["mean"] > 900  # nnU-Net's counts the ignore voxels as foreground
    assert ours["spacings"] == stock["spacings"]
    assert [list(s) for s in ours["shapes_after_crop"]] == [list(s) for s in stock["shapes_after_crop"]]
    written = json.loads((nnunet_folders["nnUNet_preprocessed"] / "Dataset601_CT" / "dataset_fingerprint.json")
                         .read_text(encoding="utf-8"))
    assert written["foreground_intensity_properties_per_channel"]["0"]["mean"] == pytest.approx(ours_stats["mean"])


def test_copy_plans_between_twins_keeps_the_sparse_datasets_own_ct_statistics(nnunet_folders):
    raw = nnunet_folders["nnUNet_raw"]
    write_raw_dataset(raw, "Dataset602_Sparse", {"0": "CT"}, CT_LABELS, [_ct_case(f"c{i}", i) for i in range(5)])
    write_raw_dataset(raw, "Dataset603_Other", {"0": "CT"}, CT_LABELS, [_ct_case(f"d{i}", i) for i in range(5)])
    # the dense truth: the whole body is organ (~1000 HU), of which the scribbles annotate a ~100 HU part
    dense_cases = [CaseRecord(f"c{i}", r.channels, r.spacing, np.where(r.label == 2, 1, r.label).astype(np.uint8))
                   for i, r in enumerate(_ct_case(f"c{i}", i) for i in range(5))]
    write_raw_dataset(raw, "Dataset604_Dense", {"0": "CT"}, {"background": 0, "organ": 1}, dense_cases)

    with pytest.raises(UserInputError, match="plan the source dataset first"):
        copy_plans(604, 602)
    plan_and_preprocess([604], configurations=["2d"], num_processes_fingerprint=1, num_processes=[1])
    with pytest.raises(UserInputError, match="same training cases"):
        copy_plans(604, 603)
    plan_and_preprocess([602], configurations=["2d"], num_processes_fingerprint=1, num_processes=[1], plans_from=604)

    pre = nnunet_folders["nnUNet_preprocessed"]
    dense_plans = json.loads((pre / "Dataset604_Dense" / "nnUNetPlans.json").read_text(encoding="utf-8"))
    sparse_plans = json.loads((pre / "Dataset602_Sparse" / "nnUNetPlans.json").read_text(encoding="utf-8"))
    own = json.loads((pre / "Dataset602_Sparse" / "dataset_fingerprint.json").read_text(encoding="utf-8"))
    statistics = sparse_plans.pop("foreground_intensity_properties_per_channel")
    assert statistics == own["foreground_intensity_properties_per_channel"]
    assert statistics["0"]["mean"] == pytest.approx(100, abs=3) and statistics["0"]["percentile_99_5"] < 130
    assert dense_plans.pop("foreground_intensity_properties_per_channel")["0"]["mean"] > 900
    # everything else, the architecture, patch, spacing and batch included, is the twin's
    assert sparse_plans.pop("dataset_name") == "Dataset602_Sparse"
    dense_plans.pop("dataset_name")
    assert sparse_plans == dense_plans
    assert ((pre / "Dataset602_Sparse" / "splits_final.json").read_text(encoding="utf-8")
            == (pre / "Dataset604_Dense" / "splits_final.json").read_text(encoding="utf-8"))

    # compare takes them for twins, and refuses plans that differ in anything else
    from nnunet_weak.compare import check_same_plans_and_splits
    from nnunet_weak.raw_dataset import load_raw_dataset
    check_same_plans_and_splits(load_raw_dataset(604), load_raw_dataset(602), "nnUNetPlans")
    plans_file = pre / "Dataset602_Sparse" / "nnUNetPlans.json"
    original = plans_file.read_text(encoding="utf-8")
    altered = json.loads(original)
    altered["configurations"]["2d"]["batch_size"] += 1
    plans_file.write_text(json.dumps(altered), encoding="utf-8")
    with pytest.raises(UserInputError, match="different plans"):
        check_same_plans_and_splits(load_raw_dataset(604), load_raw_dataset(602), "nnUNetPlans")
    plans_file.write_text(original, encoding="utf-8")

    # the preprocessed images are normalised with the sparse dataset's statistics (2D at the raw spacing: nnU-Net's
    # CT normalisation alone, nothing resampled or cropped)
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    image = _ct_case("c0", 0).channels[0]
    data = np.asarray(nnUNetDatasetBlosc2(str(pre / "Dataset602_Sparse" / "nnUNetPlans_2d"), ["c0"]).load_case("c0")[0])
    ct = statistics["0"]
    expected = (np.clip(image, ct["percentile_00_5"], ct["percentile_99_5"]) - ct["mean"]) / ct["std"]
    np.testing.assert_allclose(data[0], expected, rtol=1e-5, atol=1e-4)

    # the scribble trainer's gated CRF reads its intensity window from these statistics (a 12 x 12 image: no room
    # for the attention block)
    import torch
    from nnunet_weak.trainers.ScribbleAttentionTrainer import ScribbleAttentionTrainer_noAttentionBlock
    dataset_json = json.loads((pre / "Dataset602_Sparse" / "dataset.json").read_text(encoding="utf-8"))
    sparse_plans = json.loads((pre / "Dataset602_Sparse" / "nnUNetPlans.json").read_text(encoding="utf-8"))
    sparse_plans["continue_training"] = False  # what nnU-Net's get_trainer_from_args adds
    trainer = ScribbleAttentionTrainer_noAttentionBlock(sparse_plans, "2d", 0, dataset_json, device=torch.device("cpu"))
    trainer.initialize()
    (low, high), = trainer.crf_intensity_windows
    assert low == pytest.approx((ct["percentile_00_5"] - ct["mean"]) / ct["std"])
    assert high == pytest.approx((ct["percentile_99_5"] - ct["mean"]) / ct["std"])


def test_unknown_planner_and_extractor(nnunet_folders):
    with pytest.raises(UserInputError, match="Unknown experiment planner"):
        plan_and_preprocess([1], planner="NoSuchPlanner")
    with pytest.raises(UserInputError, match="Unknown fingerprint extractor"):
        plan_and_preprocess([1], fingerprint_extractor="magic")


def test_cpu_planner_halves_in_plane_resolution_and_caps_batch(nnunet_folders):
    from functools import partial
    from nnunet_weak.dataset_conversion.phantom import phantom_case
    raw = nnunet_folders["nnUNet_raw"]
    cases = [partial(phantom_case, s, False, True, (64, 64)) for s in range(5)]
    write_raw_dataset(raw, "Dataset605_Phantom", {"0": "MRI"}, {"background": 0, "RV": 1, "MYO": 2, "LV": 3}, cases)
    plan_and_preprocess([605], configurations=["2d"], num_processes_fingerprint=1, no_pp=True)
    plan_and_preprocess([605], planner="nnUNetPlannerCPU", no_pp=True)
    pre = nnunet_folders["nnUNet_preprocessed"] / "Dataset605_Phantom"
    stock = json.loads((pre / "nnUNetPlans.json").read_text(encoding="utf-8"))["configurations"]
    cpu = json.loads((pre / "nnUNetPlansCPU.json").read_text(encoding="utf-8"))["configurations"]
    for configuration in ("2d", "3d_fullres"):
        stock_spacing, cpu_spacing = stock[configuration]["spacing"], cpu[configuration]["spacing"]
        assert cpu_spacing[-1] == pytest.approx(2 * stock_spacing[-1])
        assert cpu_spacing[-2] == pytest.approx(2 * stock_spacing[-2])
        assert cpu[configuration]["batch_size"] <= 8
    # the thick slice axis keeps its spacing
    assert cpu["3d_fullres"]["spacing"][0] == pytest.approx(stock["3d_fullres"]["spacing"][0])
