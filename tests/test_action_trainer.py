"""ACTIONPretrainTrainer inside nnU-Net on a tiny semi-supervised phantom: every term acts, the EMA teacher
moves once per step, queues fill, unlabelled label maps never read, exact resume, the pre-training checkpoint
loaded through -pretrained_weights with the teacher reset to the student, DDP (gloo, two processes)."""
import json
import shutil

import numpy as np
import pytest

from nnunet_weak.environment import NNUNET_FOLDERS

from conftest import planned_phantom_semi, probe, subprocess_env

SEMI = "Dataset962_PhantomSemi"
PRETRAIN = "ACTIONPretrainTrainer"
LABELLED = {"phantom_0000", "phantom_0001"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folders, env = planned_phantom_semi(tmp_path_factory.mktemp("action"), 960, 962, ("2d", "3d_fullres"))
    return folders, dict(env, nnUNet_n_proc_DA="0")


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_pretraining_terms_act_from_the_second_step_and_the_teacher_follows_once_per_step(workspace, configuration):
    _, env = workspace
    result = probe(env, "steps", "962", configuration, PRETRAIN, "3")
    assert result["after_optimizer_step_calls"] == 3
    first, *later = result["losses"]
    # the queues are empty at the first step: nothing to distil against yet
    assert first["global_distillation"] == first["local_distillation"] == 0 and first["supervised"] > 0
    for step in later:
        assert step["global_distillation"] > 0 and step["local_distillation"] > 0
        # the contrastive phase (the first half of the epochs): the supervised loss is logged, not trained on
        assert step["loss"] == pytest.approx(step["global_distillation"] + step["local_distillation"], rel=1e-5)
    gradients = result["parameters"]
    assert gradients["global_predictor.3.weight"][1] > 0 and gradients["local_head.0.weight"][1] > 0
    teacher = [g for name, (_, g) in gradients.items() if name.startswith("teacher")]
    assert teacher and all(g is None for g in teacher)  # the teachers learn by EMA only


def test_supervised_phase_adds_the_supervised_loss(workspace):
    _, env = workspace
    result = probe(dict(env, NNUNET_WEAK_TRAINER_OPTIONS="unsupervised_fraction=0"), "steps", "962", "2d", PRETRAIN, "2")
    for step in result["losses"]:
        assert step["loss"] == pytest.approx(step["supervised"] + step["global_distillation"]
                                             + step["local_distillation"], rel=1e-5)


def test_unlabelled_label_maps_are_never_read(workspace, tmp_path):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    folders, _ = workspace
    copies = {name: tmp_path / name for name in NNUNET_FOLDERS}
    for name in NNUNET_FOLDERS:
        shutil.copytree(folders[name], copies[name]) if folders[name].is_dir() else copies[name].mkdir()
    env = subprocess_env(copies, NNUNET_WEAK_BUDGET="smoke", nnUNet_n_proc_DA="0",
                         NNUNET_WEAK_TRAINER_OPTIONS="unsupervised_fraction=0")
    before = probe(env, "steps", "962", "2d", PRETRAIN, "3")
    rng = np.random.default_rng(0)
    preprocessed = copies["nnUNet_preprocessed"] / SEMI / "nnUNetPlans_2d"
    manifest = json.loads((copies["nnUNet_raw"] / SEMI / "supervision.json").read_text(encoding="utf-8"))["cases"]
    unlabelled = [case for case, entry in manifest.items() if entry["supervision"] == "unlabelled"]
    for case in unlabelled:
        seg = np.asarray(nnUNetDatasetBlosc2(str(preprocessed), [case]).load_case(case)[1])
        nnUNetDatasetBlosc2.save_seg(rng.integers(0, 4, seg.shape).astype(np.int16), str(preprocessed / f"{case}_seg"))
    assert probe(env, "steps", "962", "2d", PRETRAIN, "3") == before


def test_resume_restores_teacher_heads_and_queues_exactly(workspace):
    _, env = workspace
    result = probe(env, "resume", "962", "2d", PRETRAIN, "3")
    assert result["same_keys"] and result["same_state"] and result["same_after_step"]


def test_the_pretraining_checkpoint_loads_and_the_teacher_restarts_from_the_loaded_student(workspace, tmp_path):
    _, env = workspace
    checkpoint = tmp_path / "pretrained.pth"
    probe(env, "checkpoint", "962", "2d", PRETRAIN, str(checkpoint))
    result = probe(env, "pretrained", "962", "2d", PRETRAIN, str(checkpoint))
    assert all(".seg_layers." in k for k in result["different_planned"])
    assert {"global_head", "local_predictor", "global_queue"} <= set(result["record"]["training_modules"])
    assert result["teachers_equal_students"] == [True, True, True]


def test_ddp_keeps_student_teacher_heads_and_queues_identical(workspace):
    _, env = workspace
    result = probe(env, "ddp", "962", "2d", PRETRAIN)
    assert result["modules_with_parameters_outside_network"] == []
    assert result["different"] == []
    assert [loss["labelled"] for loss in result["losses"]] == [[True, True, False]] * 2
