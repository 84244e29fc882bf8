"""The GPU path no CPU test takes: nnU-Net's autocast (float16 forward passes, gradient scaling) and, for the
trainers that allow it, torch.compile. Stock ``nnUNetv2_train -device cuda`` at the smoke budget, then
``nnUNetv2_predict`` on the same device must reproduce the trainer's validation. Skipped without CUDA; nothing
else in the suite depends on these tests."""
import json
import math

import pytest
import torch

from conftest import BIN, assert_predictor_reproduces_validation, planned_phantom_semi, planned_phantom_twins, run_checked

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def scribbles(tmp_path_factory):
    return planned_phantom_twins(tmp_path_factory.mktemp("gpu_scribbles"), 930, 931)


@pytest.fixture(scope="module")
def semi(tmp_path_factory):
    return planned_phantom_semi(tmp_path_factory.mktemp("gpu_semi"), 934, 936)


def train_on_gpu_and_check(folders, env, dataset_id, dataset, trainer, work):
    run_checked([BIN / "nnUNetv2_train", dataset_id, "2d", "0", "-tr", trainer, "-device", "cuda"], env)
    fold = folders["nnUNet_results"] / dataset / f"{trainer}__nnUNetPlans__2d" / "fold_0"
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    losses = checkpoint["logging"]["train_losses"]
    assert losses and all(math.isfinite(v) for v in losses)
    # compiled or not, the planned network's weights load into the network nnUNetv2_predict rebuilds
    assert not any(k.startswith("_orig_mod.") for k in checkpoint["network_weights"])
    summary = json.loads((fold / "validation" / "summary_dense.json").read_text(encoding="utf-8"))
    assert math.isfinite(summary["foreground_mean"]["Dice"])
    assert_predictor_reproduces_validation(folders, env, dataset, trainer, work, device="cuda")


@pytest.mark.parametrize("trainer", ["ScribbleAttentionTrainer", "nnUNetWeakTrainer"])  # the second one compiled
def test_scribble_trainers_on_gpu(scribbles, trainer, tmp_path):
    folders, env = scribbles
    train_on_gpu_and_check(folders, env, "931", "Dataset931_PhantomScribble", trainer, tmp_path)


def test_caml_on_gpu(semi, tmp_path):
    folders, env = semi
    train_on_gpu_and_check(folders, env, "936", "Dataset936_PhantomSemi", "CAMLTrainer", tmp_path)
