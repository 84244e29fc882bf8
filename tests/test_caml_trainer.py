"""CAMLTrainer inside nnU-Net on a tiny semi-supervised phantom: two-stream batches, every loss term,
unlabelled label maps never read, exact resume, DDP (gloo, two processes), stock train → predict."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest


from conftest import (BIN, PROBE, assert_predictor_reproduces_validation, copy_workspace, planned_phantom_semi, probe,
                      run_checked, scramble_preprocessed_labels, subprocess_env)

SEMI = "Dataset982_PhantomSemi"
TRAINER = "CAMLTrainer"
LABELLED = {"phantom_0000", "phantom_0001"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folders, env = planned_phantom_semi(tmp_path_factory.mktemp("caml"), 980, 982, ("2d", "3d_fullres"))
    return folders, dict(env, nnUNet_n_proc_DA="0")


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_batches_mix_labelled_and_unlabelled_cases_and_every_term_acts(workspace, configuration):
    _, env = workspace
    result = probe(env, "steps", "982", configuration, TRAINER, "2")
    for composition in result["batches"]:
        labelled = composition["labelled"]
        # nnU-Net's planned batch (3 in 2D, 2 in 3D), three quarters labelled, rounded up, one left unlabelled
        assert labelled == ([True, True, False] if configuration == "2d" else [True, False])
        for key, is_labelled in zip(composition["keys"], labelled):
            assert (key in LABELLED) == is_labelled
    ramp = math.exp(-5)  # epoch 0 of the ramp-up
    for step in result["losses"]:
        assert all(np.isfinite(v) for v in step.values())
        assert step["supervised"] > 0 and step["cross_consistency"] > 0 and step["omni_correlation"] > 0
        assert step["loss"] == pytest.approx(step["supervised"] + ramp * step["cross_consistency"]
                                             + 0.05 * ramp * step["omni_correlation"], rel=1e-5)
    assert result["after_optimizer_step_calls"] == 2
    gradients = result["parameters"]
    assert any(name.startswith("second_network.") and "block.cross_sample" in name and g[1] > 0
               for name, g in gradients.items())


def test_the_omni_correlation_term_alone_trains_the_first_networks_heads(workspace):
    _, env = workspace
    # the first network's heads embed the queries, which only L_omni uses (bank entries carry no gradient)
    heads = ("first_projection.0.weight", "first_projection.3.weight", "first_prediction.0.weight",
             "first_prediction.3.weight")
    for lambda_omni in (0.05, 0):
        result = probe(dict(env, NNUNET_WEAK_TRAINER_OPTIONS=f"lambda_omni={lambda_omni}"), "steps", "982", "2d",
                       TRAINER, "1")
        assert result["losses"][0]["omni_correlation"] > 0
        assert all((result["parameters"][name][1] > 0) == (lambda_omni > 0) for name in heads)


def test_pretrained_weights_reach_the_planned_network_and_the_shared_training_modules(workspace, tmp_path):
    _, env = workspace
    caml, plain, three_d = (tmp_path / f"{name}.pth" for name in ("caml", "plain", "3d"))
    probe(env, "checkpoint", "982", "2d", TRAINER, str(caml))
    probe(env, "checkpoint", "982", "2d", "nnUNetWeakTrainer", str(plain))
    probe(env, "checkpoint", "982", "3d_fullres", TRAINER, str(three_d))

    # from a CAML run: everything but the segmentation layers (nnU-Net's rule), heads and second network included
    result = probe(env, "pretrained", "982", "2d", TRAINER, str(caml))
    assert result["different_planned"] and all(".seg_layers." in k for k in result["different_planned"])
    assert result["same_planned"] == result["planned_keys"] - len(result["different_planned"])
    assert result["same_training"] == result["training_keys"] > 0
    assert result["record"]["file"] == str(caml) and result["record"]["trainer"] == TRAINER
    assert {"second_network", "first_projection", "memory_bank"} <= set(result["record"]["training_modules"])
    # from nnU-Net's network alone: the planned network; the training-only modules keep their initialisation
    result = probe(env, "pretrained", "982", "2d", TRAINER, str(plain))
    assert all(".seg_layers." in k for k in result["different_planned"]) and result["same_training"] == 0
    assert result["record"]["training_modules"] == []
    # another architecture: refused, naming the key
    refused = subprocess.run([sys.executable, PROBE, "pretrained", "982", "2d", TRAINER, str(three_d)], env=env,
                             capture_output=True, encoding="utf-8", errors="replace")
    assert refused.returncode != 0
    assert "do not fit the planned network" in refused.stderr and "shape" in refused.stderr


def test_unlabelled_label_maps_are_never_read(workspace, tmp_path):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    folders, env = workspace
    copies = copy_workspace(folders, tmp_path)
    env = subprocess_env(copies, NNUNET_WEAK_BUDGET="smoke", nnUNet_n_proc_DA="0")
    before = probe(env, "steps", "982", "2d", TRAINER, "3")

    rng = np.random.default_rng(0)
    preprocessed = copies["nnUNet_preprocessed"] / SEMI / "nnUNetPlans_2d"
    manifest = json.loads((copies["nnUNet_raw"] / SEMI / "supervision.json").read_text(encoding="utf-8"))["cases"]
    unlabelled = [case for case, entry in manifest.items() if entry["supervision"] == "unlabelled"]
    assert len(unlabelled) == 4
    dataset = nnUNetDatasetBlosc2(str(preprocessed), unlabelled)
    assert all((np.asarray(dataset.load_case(case)[1]) == 4).all() for case in unlabelled)  # all ignore
    scramble_preprocessed_labels(preprocessed, unlabelled, rng)
    assert not (np.asarray(nnUNetDatasetBlosc2(str(preprocessed), unlabelled).load_case(unlabelled[0])[1]) == 4).all()
    after = probe(env, "steps", "982", "2d", TRAINER, "3")
    assert after == before


def test_resume_restores_both_networks_heads_and_bank(workspace):
    _, env = workspace
    result = probe(env, "resume", "982", "2d", TRAINER, "2")
    assert result["same_keys"] and result["same_state"] and result["same_after_step"]


def test_ddp_with_sync_batch_norm_keeps_networks_heads_and_bank_in_sync_when_one_rank_selects_nothing(workspace):
    _, env = workspace
    # nnU-Net's DDP set-up makes the heads' BatchNorm a SyncBatchNorm: a rank that skipped a head call would leave
    # the ranks' collectives unmatched; rank 1 selects no unlabelled voxel, at every one of three steps
    result = probe(dict(env, PROBE_NO_SELECTED_VOXELS_ON_RANK="1"), "ddp", "982", "2d", TRAINER, "3")
    assert result["batch_norms"] == ["SyncBatchNorm"]
    assert result["modules_with_parameters_outside_network"] == []
    assert result["different"] == []  # parameters, memory bank and the synchronised BatchNorm statistics
    assert [loss["labelled"] for loss in result["losses"]] == [[True, True, False]] * 2
    assert result["losses"][0]["omni_correlation"] > 0 and result["losses"][1]["omni_correlation"] == 0


@pytest.mark.slow
def test_stock_train_then_predict_uses_the_first_network_only(workspace, tmp_path):
    folders, env = workspace
    env = dict(env, nnUNet_n_proc_DA="1", NNUNET_WEAK_TRAINER_OPTIONS="lambda_omni=0.1")
    run_checked([BIN / "nnUNetv2_train", "982", "2d", "0", "-tr", TRAINER, "-device", "cpu"], env)
    fold = folders["nnUNet_results"] / SEMI / f"{TRAINER}__nnUNetPlans__2d" / "fold_0"
    assert json.loads((fold / "nnunet_weak_run.json").read_text(encoding="utf-8"))["options"]["lambda_omni"] == 0.1
    assert (fold / "validation" / "summary_dense.json").is_file()

    assert_predictor_reproduces_validation(folders, env, SEMI, TRAINER, tmp_path)
