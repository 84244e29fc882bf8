"""Shared fixtures: isolated nnU-Net folders, tiny phantom datasets."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from nnunet_weak.environment import NNUNET_FOLDERS


@pytest.fixture
def nnunet_folders(tmp_path, monkeypatch) -> dict[str, Path]:
    """Fresh nnUNet_raw / _preprocessed / _results under tmp_path, set in the environment."""
    folders = {}
    for name in NNUNET_FOLDERS:
        folders[name] = tmp_path / name
        folders[name].mkdir()
        monkeypatch.setenv(name, str(folders[name]))
    monkeypatch.delenv("NNUNET_WEAK_BUDGET", raising=False)
    return folders


def subprocess_env(folders: dict[str, Path], **extra: str) -> dict[str, str]:
    """Environment for stock nnU-Net commands run as subprocesses on 2 CPU cores."""
    from nnunet_weak.environment import environment_with_trainers
    env = environment_with_trainers()
    env.update({k: str(v) for k, v in folders.items()})
    env.update({"nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "2", "OMP_NUM_THREADS": "2"})
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def repository_root() -> Path:
    return Path(__file__).resolve().parents[1]



BIN = Path(sys.executable).parent


PROBE = Path(__file__).with_name("trainer_probe.py")


def probe(env, *arguments) -> dict:
    """Run ``tests/trainer_probe.py`` with ``arguments``; its JSON result."""
    output = run_checked([sys.executable, PROBE, *arguments], env).stdout
    return json.loads(output.strip().splitlines()[-1])


def run_checked(command, env, cwd=None) -> subprocess.CompletedProcess:
    """Run a command; fail the test with the end of its output if it fails."""
    result = subprocess.run([str(c) for c in command], env=env, cwd=cwd, capture_output=True, encoding="utf-8",
                            errors="replace")
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def planned_phantom_twins(root: Path, dense_id: int, sparse_id: int, configurations=("2d",), num_train: int = 5,
                          num_test: int = 2, **env_extra: str):
    """A 32×32 phantom dense dataset planned by nnU-Net and its scribble twin on the same plans."""
    folders = {name: root / name for name in NNUNET_FOLDERS}
    env = subprocess_env(folders, NNUNET_WEAK_BUDGET="smoke", **env_extra)
    run_checked([BIN / "nnunet-weak", "convert", "phantom", "--dense_id", str(dense_id), "--sparse_id",
                 str(sparse_id), "--num_train", str(num_train), "--num_test", str(num_test), "--size", "32"], env)
    run_checked([BIN / "nnUNetv2_plan_and_preprocess", "-d", str(dense_id), "-c", *configurations, "-np", "2",
                 "-npfp", "2"], env)
    run_checked([BIN / "nnunet-weak", "plan_and_preprocess", "-d", str(sparse_id), "-c", *configurations, "-np", "2",
                 "--plans_from", str(dense_id)], env)
    return folders, env


def planned_phantom_semi(root: Path, dense_id: int, semi_id: int, configurations=("2d",), num_train: int = 6,
                         labelled_count: int = 2, supervision: str = "semi", name: str = "PhantomSemi",
                         **env_extra: str):
    """A 32×32 phantom dense dataset planned by nnU-Net, and a semi-supervised copy of it (the first
    ``labelled_count`` cases labelled, the rest unlabelled; with ``supervision="mixed"``, the rest weakly
    labelled with scribbles) converted through ``convert folders`` and preprocessed on the same plans."""
    folders = {name: root / name for name in NNUNET_FOLDERS}
    env = subprocess_env(folders, NNUNET_WEAK_BUDGET="smoke", **env_extra)
    run_checked([BIN / "nnunet-weak", "convert", "phantom", "--dense_id", str(dense_id), "--sparse_id",
                 str(dense_id + 1), "--num_train", str(num_train), "--num_test", "1", "--size", "32"], env)
    dense = next((folders["nnUNet_raw"]).glob(f"Dataset{dense_id:03d}_*"))
    run_checked([BIN / "nnunet-weak", "convert", "folders", "--images", dense / "imagesTr", "--labels",
                 dense / "labelsTr", "--classes", "RV", "MYO", "LV", "--name", name, "--id", str(semi_id),
                 "--dense_id", str(semi_id + 1), "--supervision", supervision, "--labelled_count",
                 str(labelled_count)], env)
    run_checked([BIN / "nnUNetv2_plan_and_preprocess", "-d", str(dense_id), "-c", *configurations, "-np", "2",
                 "-npfp", "2"], env)
    run_checked([BIN / "nnunet-weak", "plan_and_preprocess", "-d", str(semi_id), "-c", *configurations, "-np", "2",
                 "--plans_from", str(dense_id)], env)
    return folders, env


def copy_workspace(folders: dict[str, Path], destination: Path) -> dict[str, Path]:
    """A copy of nnU-Net's three folders under ``destination``, for a test that alters files."""
    copies = {name: destination / name for name in NNUNET_FOLDERS}
    for name in NNUNET_FOLDERS:
        shutil.copytree(folders[name], copies[name]) if folders[name].is_dir() else copies[name].mkdir()
    return copies


def scramble_preprocessed_labels(preprocessed: Path, cases, rng: np.random.Generator) -> None:
    """Overwrite the preprocessed label maps of ``cases`` with random labels 0-3: a trainer that never reads them
    must train exactly as before."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    for case in cases:
        seg = np.asarray(nnUNetDatasetBlosc2(str(preprocessed), [case]).load_case(case)[1])
        nnUNetDatasetBlosc2.save_seg(rng.integers(0, 4, seg.shape).astype(np.int16), str(preprocessed / f"{case}_seg"))


def stock_pretrain_then_finetune(folders: dict, env: dict, dataset_id: str, dataset: str, pretrain: str,
                                 finetune: str) -> Path:
    """``nnUNetv2_train`` of ``pretrain``, then of ``finetune`` with ``-pretrained_weights`` on its final checkpoint
    (2d, fold 0); checks that the fine-tuning recorded that checkpoint and returns the fine-tuning's fold folder."""
    results = folders["nnUNet_results"] / dataset
    run_checked([BIN / "nnUNetv2_train", dataset_id, "2d", "0", "-tr", pretrain, "-device", "cpu"], env)
    pretrained = results / f"{pretrain}__nnUNetPlans__2d" / "fold_0" / "checkpoint_final.pth"
    run_checked([BIN / "nnUNetv2_train", dataset_id, "2d", "0", "-tr", finetune, "-device", "cpu",
                 "-pretrained_weights", pretrained], env)
    fold = results / f"{finetune}__nnUNetPlans__2d" / "fold_0"
    record = json.loads((fold / "nnunet_weak_run.json").read_text(encoding="utf-8"))
    assert record["pretrained_weights"]["file"] == str(pretrained.resolve())
    return fold


def assert_predictor_reproduces_validation(folders: dict, env: dict, dataset: str, trainer: str, work: Path,
                                           device: str = "cpu") -> None:
    """``nnUNetv2_predict`` of fold 0's validation cases (2d, final checkpoint, on ``device``, where the trainer
    validated) gives exactly the predictions of the trainer's own validation: the rebuilt network is the one that
    was validated."""
    dataset_id = dataset[len("Dataset"):len("Dataset") + 3]
    fold = folders["nnUNet_results"] / dataset / f"{trainer}__nnUNetPlans__2d" / "fold_0"
    validation_cases = json.loads((folders["nnUNet_preprocessed"] / dataset / "splits_final.json")
                                  .read_text(encoding="utf-8"))[0]["val"]
    images = work / "images"
    images.mkdir()
    for case in validation_cases:
        shutil.copy(folders["nnUNet_raw"] / dataset / "imagesTr" / f"{case}_0000.nii.gz", images)
    predictions = work / "predictions"
    run_checked([BIN / "nnUNetv2_predict", "-i", images, "-o", predictions, "-d", dataset_id, "-c", "2d", "-f", "0",
                 "-tr", trainer, "-chk", "checkpoint_final.pth", "-device", device, "-npp", "1", "-nps", "1"], env)
    for case in validation_cases:
        predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / f"{case}.nii.gz")))
        validated = sitk.GetArrayFromImage(sitk.ReadImage(str(fold / "validation" / f"{case}.nii.gz")))
        np.testing.assert_array_equal(predicted, validated)


def small_unet(kind, dims):
    """A 4-stage nnU-Net network (PlainConvUNet or ResidualEncoderUNet), 2D or 3D, 3 classes, deep supervision."""
    conv = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
    norm = torch.nn.InstanceNorm2d if dims == 2 else torch.nn.InstanceNorm3d
    strides = [1, 2, 2, 2] if dims == 2 else [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    common = dict(input_channels=1, n_stages=4, features_per_stage=[4, 8, 16, 16], conv_op=conv, kernel_sizes=3,
                  strides=strides, num_classes=3, norm_op=norm, norm_op_kwargs={"affine": True},
                  nonlin=torch.nn.LeakyReLU, deep_supervision=True)
    if kind == "plain":
        return PlainConvUNet(n_conv_per_stage=2, n_conv_per_stage_decoder=2, **common)
    return ResidualEncoderUNet(n_blocks_per_stage=[1, 1, 1, 1], n_conv_per_stage_decoder=1, **common)
