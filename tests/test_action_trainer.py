"""ACTION's two trainers inside nnU-Net on a tiny semi-supervised phantom: every term acts, the EMA teacher
moves once per step, queues fill, unlabelled label maps never read, exact resume, the pre-training checkpoint
loaded by the fine-tuning trainer through -pretrained_weights with its teacher reset to the loaded student,
DDP (gloo, two processes), stock train → predict with the student alone."""
import json
import subprocess
import sys

import numpy as np
import pytest


from conftest import (PROBE, assert_predictor_reproduces_validation, copy_workspace, planned_phantom_semi, probe,
                      scramble_preprocessed_labels, stock_pretrain_then_finetune, subprocess_env)

SEMI = "Dataset962_PhantomSemi"
PRETRAIN = "ACTIONPretrainTrainer"
FINETUNE = "ACTIONTrainer"
#: a threshold the first steps' predictions straddle, so that every class has confident and hard voxels
STRADDLED = "confidence_threshold=0.3"
LABELLED = {"phantom_0000", "phantom_0001"}


def test_the_la_pretraining_variant_differs_in_the_teacher_temperature_only():
    from nnunet_weak.compare import trainer_defaults
    assert trainer_defaults(f"{PRETRAIN}_teacherTemperature06") == {**trainer_defaults(PRETRAIN), "teacher_temperature": 0.6}


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


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_finetuning_terms_act_and_the_teacher_follows_once_per_step(workspace, configuration):
    _, env = workspace
    # a 3D batch (one labelled, one unlabelled crop) may hold a single class with confident voxels: more steps
    steps = 2 if configuration == "2d" else 4
    result = probe(dict(env, NNUNET_WEAK_TRAINER_OPTIONS=STRADDLED), "steps", "962", configuration, FINETUNE,
                   str(steps))
    assert result["after_optimizer_step_calls"] == steps
    for composition in result["batches"]:
        assert [key in LABELLED for key in composition["keys"]] == composition["labelled"]
    for step in result["losses"]:
        assert step["supervised"] > 0 and step["pseudo_label"] > 0 and step["anatomical_contrast"] >= 0
        assert step["loss"] == pytest.approx(step["supervised"] + step["pseudo_label"]
                                             + 0.01 * step["anatomical_contrast"], rel=1e-5)
    contrasted = [step["anatomical_contrast"] > 0 for step in result["losses"]]
    assert all(contrasted) if configuration == "2d" else any(contrasted)
    gradients = result["parameters"]
    assert (gradients["representation_head.0.weight"][1] > 0) == contrasted[-1]  # the last step's gradient
    assert all(g is None for name, (_, g) in gradients.items() if name.startswith("teacher"))


@pytest.mark.parametrize("trainer", [PRETRAIN, FINETUNE])
def test_unlabelled_label_maps_are_never_read(workspace, tmp_path, trainer):
    folders, _ = workspace
    copies = copy_workspace(folders, tmp_path)
    options = "unsupervised_fraction=0" if trainer == PRETRAIN else STRADDLED
    env = subprocess_env(copies, NNUNET_WEAK_BUDGET="smoke", nnUNet_n_proc_DA="0", NNUNET_WEAK_TRAINER_OPTIONS=options)
    before = probe(env, "steps", "962", "2d", trainer, "3")
    manifest = json.loads((copies["nnUNet_raw"] / SEMI / "supervision.json").read_text(encoding="utf-8"))["cases"]
    unlabelled = [case for case, entry in manifest.items() if entry["supervision"] == "unlabelled"]
    scramble_preprocessed_labels(copies["nnUNet_preprocessed"] / SEMI / "nnUNetPlans_2d", unlabelled,
                                 np.random.default_rng(0))
    assert probe(env, "steps", "962", "2d", trainer, "3") == before


@pytest.mark.parametrize("trainer", [PRETRAIN, FINETUNE])
def test_resume_restores_teacher_heads_and_queues_exactly(workspace, trainer):
    _, env = workspace
    result = probe(env, "resume", "962", "2d", trainer, "3")
    assert result["same_keys"] and result["same_state"] and result["same_after_step"]


def test_the_pretraining_checkpoint_loads_and_the_teacher_restarts_from_the_loaded_student(workspace, tmp_path):
    _, env = workspace
    checkpoint = tmp_path / "pretrained.pth"
    probe(env, "checkpoint", "962", "2d", PRETRAIN, str(checkpoint))
    again = probe(env, "pretrained", "962", "2d", PRETRAIN, str(checkpoint))
    assert {"global_head", "local_predictor", "global_queue"} <= set(again["record"]["training_modules"])
    assert again["teachers_equal_students"] == [True, True, True]
    # stage B from stage A: the planned network (segmentation layers excepted), the EMA teacher reset to it
    finetune = probe(env, "pretrained", "962", "2d", FINETUNE, str(checkpoint))
    assert finetune["different_planned"] and all(".seg_layers." in k for k in finetune["different_planned"])
    assert finetune["record"]["training_modules"] == ["teacher"] and finetune["record"]["trainer"] == PRETRAIN
    assert finetune["teachers_equal_students"] == [True]


@pytest.mark.parametrize("trainer", [PRETRAIN, FINETUNE])
def test_ddp_keeps_student_teacher_heads_and_queues_identical(workspace, trainer):
    _, env = workspace
    # several steps: the queues fill from both ranks and the teacher follows the synchronised student
    result = probe(dict(env, NNUNET_WEAK_TRAINER_OPTIONS="" if trainer == PRETRAIN else STRADDLED), "ddp", "962",
                   "2d", trainer, "3")
    assert result["modules_with_parameters_outside_network"] == []
    assert result["different"] == []
    assert [loss["labelled"] for loss in result["losses"]] == [[True, True, False]] * 2


@pytest.mark.slow
def test_stock_pretrain_then_finetune_then_predict_uses_the_student_alone(workspace, tmp_path):
    folders, env = workspace
    env = dict(env, nnUNet_n_proc_DA="1")
    fold = stock_pretrain_then_finetune(folders, env, "962", SEMI, PRETRAIN, FINETUNE)
    assert (fold / "validation" / "summary_dense.json").is_file()

    assert_predictor_reproduces_validation(folders, env, SEMI, FINETUNE, tmp_path)


def test_a_mixed_supervision_trainer_refuses_a_dataset_without_weak_cases(workspace):
    _, env = workspace
    refused = subprocess.run([sys.executable, PROBE, "steps", "962", "2d", "ConfKDTrainer", "1"], env=env,
                             capture_output=True, encoding="utf-8", errors="replace")
    assert refused.returncode != 0
    assert "has no weak training case, so its batches cannot mix strong and weak samples" in refused.stderr
    assert "--supervision mixed" in refused.stderr
