"""ScribbleAttentionTrainer inside nnU-Net: 2D and 3D training steps, no dense label read, exact
resume, DDP (gloo, two processes), and the stock train → predict round trip on a tiny phantom."""
import json
import math
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTransform

from nnunet_weak.trainers.nnUNetWeakTrainer import nnUNetWeakTrainer, nnUNetWeakTrainer_nearestDSTargets
from nnunet_weak.trainers.ScribbleAttentionTrainer import ScribbleAttentionTrainer
from nnunet_weak.transforms.image_extent import AppendImageExtentChannel, split_image_extent
from nnunet_weak.transforms.sparse_downsampling import SparsePreservingDownsampleSegForDSTransform

from conftest import (BIN, copy_workspace, planned_phantom_twins, probe, run_checked, scramble_preprocessed_labels,
                      subprocess_env)

DENSE, SPARSE = "Dataset960_PhantomDense", "Dataset961_PhantomScribble"
TRAINER = "ScribbleAttentionTrainer"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folders, env = planned_phantom_twins(tmp_path_factory.mktemp("attenscribble"), 960, 961, ("2d", "3d_fullres"),
                                         num_test=1)
    # the probes run nnU-Net's data pipeline in-process (0 workers: deterministic); planning cannot
    return folders, dict(env, nnUNet_n_proc_DA="0")


@pytest.mark.parametrize("configuration, trainer, stage", [
    ("2d", TRAINER, 2), ("3d_fullres", TRAINER, 2),
    ("3d_fullres", "ScribbleAttentionTrainer_stride8", 3), ("3d_fullres", "ScribbleAttentionTrainer_window8", 2)])
def test_training_steps_use_every_term(workspace, configuration, trainer, stage):
    _, env = workspace
    result = probe(env, "steps", "961", configuration, trainer, "2")
    for step in result["losses"]:
        assert all(np.isfinite(v) for v in step.values())
        assert step["partial_ce_dice"] != 0 and step["gated_crf"] > 0 and step["attentive_similarity"] > 0
        # epoch 0 of the ramp-ups of λ_crf and λ_att
        assert step["loss"] == pytest.approx(step["partial_ce_dice"] + 0.1 * math.exp(-5) * step["gated_crf"]
                                             + 0.1 * math.exp(-5) * step["attentive_similarity"], rel=1e-5)
    gradients = result["parameters"]
    assert [name for name in gradients if name.endswith("block.affinity_bias")] == \
        [f"encoder.stages.{stage}.block.affinity_bias"]
    assert gradients[f"encoder.stages.{stage}.block.affinity_bias"][1] > 0
    assert gradients[f"encoder.stages.{stage}.block.query.weight"][1] > 0


def test_losses_never_read_dense_labels(workspace, tmp_path):
    """Every dense label on disk is scrambled: the scribble dataset's labelsTr_dense, the dense twin's raw labelsTr,
    its preprocessed gt_segmentations and its preprocessed label arrays; three training steps do not change."""
    folders, env = workspace
    copies = copy_workspace(folders, tmp_path)
    env = subprocess_env(copies, NNUNET_WEAK_BUDGET="smoke", nnUNet_n_proc_DA="0")
    before = probe(env, "steps", "961", "2d", TRAINER, "3")

    rng = np.random.default_rng(0)
    dense_files = (list((copies["nnUNet_raw"] / SPARSE / "labelsTr_dense").glob("*.nii.gz"))
                   + list((copies["nnUNet_raw"] / DENSE / "labelsTr").glob("*.nii.gz"))
                   + list((copies["nnUNet_preprocessed"] / DENSE / "gt_segmentations").glob("*.nii.gz")))
    assert len(dense_files) >= 15
    for path in dense_files:
        image = sitk.ReadImage(str(path))
        scrambled = sitk.GetImageFromArray(rng.integers(0, 4, sitk.GetArrayFromImage(image).shape).astype(np.uint8))
        scrambled.CopyInformation(image)
        sitk.WriteImage(scrambled, str(path))
    preprocessed = [folder for folder in (copies["nnUNet_preprocessed"] / DENSE).glob("nnUNetPlans_*")
                    if folder.is_dir()]
    cases = [f.name[:-len("_seg.b2nd")] for f in preprocessed[0].glob("*_seg.b2nd")]
    assert preprocessed and len(cases) >= 5
    for folder in preprocessed:
        scramble_preprocessed_labels(folder, cases, rng)
    after = probe(env, "steps", "961", "2d", TRAINER, "3")
    assert after == before
    assert any(step["gated_crf"] > 0 for step in after["losses"])


def test_resume_restores_every_weight_and_the_next_step(workspace):
    _, env = workspace
    result = probe(env, "resume", "961", "2d", TRAINER, "2")
    assert result["same_keys"] and result["same_state"] and result["same_after_step"]
    assert result["losses"][0] == result["losses"][1]
    assert {"encoder.stages.2.block.affinity_weight", "encoder.stages.2.block.affinity_bias"} <= set(result["keys"])


@pytest.mark.parametrize("trainer", [TRAINER, "ScribbleAttentionTrainer_noAttentiveLoss"])
def test_ddp_keeps_every_parameter_in_sync(workspace, trainer):
    _, env = workspace
    result = probe(env, "ddp", "961", "2d", trainer)
    assert result["modules_with_parameters_outside_network"] == []
    assert result["different"] == []
    assert result["losses"][0]["loss"] != result["losses"][1]["loss"]  # the ranks saw different batches


@pytest.mark.slow
def test_stock_train_then_predict_reproduces_validation(workspace, tmp_path):
    folders, env = workspace
    env = dict(env, nnUNet_n_proc_DA="1", NNUNET_WEAK_TRAINER_OPTIONS="lambda_crf=0.2")
    train = [BIN / "nnUNetv2_train", "961", "2d", "0", "-tr", TRAINER, "-device", "cpu"]
    run_checked(train, env)
    fold = folders["nnUNet_results"] / SPARSE / f"{TRAINER}__nnUNetPlans__2d" / "fold_0"
    record = json.loads((fold / "nnunet_weak_run.json").read_text(encoding="utf-8"))
    assert record["options"] == {"lambda_crf": 0.2, "lambda_attentive": 0.1, "crf_rampup": 0.5,
                                 "attentive_rampup": 0.5}
    assert (fold / "loss_components.png").stat().st_size > 0
    assert (fold / "validation" / "summary_dense.json").is_file()

    refused = subprocess.run([str(c) for c in train + ["--c"]], env=dict(env, NNUNET_WEAK_TRAINER_OPTIONS=""),
                             capture_output=True, encoding="utf-8", errors="replace")
    assert refused.returncode != 0 and "was started with options" in refused.stdout + refused.stderr

    validation_cases = json.loads((folders["nnUNet_preprocessed"] / SPARSE / "splits_final.json").read_text(encoding="utf-8"))[0]["val"]
    images = tmp_path / "images"
    images.mkdir()
    for case in validation_cases:
        shutil.copy(folders["nnUNet_raw"] / SPARSE / "imagesTr" / f"{case}_0000.nii.gz", images)
    predictions = tmp_path / "predictions"
    run_checked([BIN / "nnUNetv2_predict", "-i", images, "-o", predictions, "-d", "961", "-c", "2d", "-f", "0", "-tr", TRAINER,
         "-chk", "checkpoint_final.pth", "-device", "cpu", "-npp", "1", "-nps", "1"], env)
    for case in validation_cases:
        predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / f"{case}.nii.gz")))
        validated = sitk.GetArrayFromImage(sitk.ReadImage(str(fold / "validation" / f"{case}.nii.gz")))
        np.testing.assert_array_equal(predicted, validated)


def test_sparse_datasets_get_sparse_preserving_targets_and_padding_rule():
    def deep_supervision_transforms(trainer, ignore_label):
        transforms = trainer.get_training_transforms(
            (32, 32), None, [[1, 1], [0.5, 0.5]], (0, 1), False, foreground_labels=[1, 2, 3], ignore_label=ignore_label)
        return [type(t) for t in transforms.transforms if "Downsample" in type(t).__name__]

    assert deep_supervision_transforms(nnUNetWeakTrainer, 4) == [SparsePreservingDownsampleSegForDSTransform]
    assert deep_supervision_transforms(nnUNetWeakTrainer, None) == [DownsampleSegForDSTransform]
    assert deep_supervision_transforms(nnUNetWeakTrainer_nearestDSTargets, 4) == [DownsampleSegForDSTransform]

    def outside_image_value(trainer):
        transforms = trainer.get_training_transforms(
            (32, 32), None, [[1, 1], [0.5, 0.5]], (0, 1), False, foreground_labels=[1, 2, 3], ignore_label=4)
        (rule,) = [t for t in transforms.transforms if isinstance(t, RemoveLabelTransform) and t.label_value == -1]
        return rule.set_to

    assert outside_image_value(nnUNetWeakTrainer) == 0  # nnU-Net's: annotated background
    assert outside_image_value(ScribbleAttentionTrainer) == 4  # un-annotated


def test_image_extent_travels_with_the_segmentation_through_augmentation():
    torch.manual_seed(0)
    transforms = ScribbleAttentionTrainer.get_training_transforms(
        (32, 32), (-math.pi, math.pi), [[1, 1], [0.5, 0.5]], (0, 1), False, foreground_labels=[1, 2, 3],
        ignore_label=4)
    assert isinstance(transforms.transforms[0], AppendImageExtentChannel)
    image = torch.rand(1, 40, 40)
    segmentation = torch.full((1, 40, 40), 4, dtype=torch.int16)
    segmentation[0, 10:30, 15:25] = 2  # a scribble
    segmentation[0, :, :12] = -1       # nnU-Net's padding
    seen_outside = seen_inside = 0
    for _ in range(20):
        result = transforms(image=image.clone(), segmentation=segmentation.clone())
        target = [t[None] for t in result["segmentation"]]
        assert [tuple(t.shape) for t in target] == [(1, 2, 32, 32), (1, 2, 16, 16)]
        labels, inside = split_image_extent(target)
        assert [tuple(t.shape) for t in labels] == [(1, 1, 32, 32), (1, 1, 16, 16)]
        assert set(target[0][:, 1].unique().tolist()) <= {1, 4}
        # outside the image is un-annotated for pCE, and every annotated voxel is inside the image
        assert (labels[0][:, 0][~inside] == 4).all()
        assert inside[labels[0][:, 0] != 4].all()
        seen_outside += int((~inside).sum())
        seen_inside += int(inside.sum())
    assert seen_outside > 0 and seen_inside > 0
