"""LA converter on small NRRD and UA-MT HDF5 files; on the real HDF5 data when NNUNET_WEAK_DATA is set."""
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_weak.cli import main
from nnunet_weak.raw_dataset import load_raw_dataset

CASES = [f"CASE{i:02d}XYZ" for i in range(8)]


def _volume(seed):
    rng = np.random.default_rng(seed)
    label = np.zeros((6, 10, 12), np.uint8)  # (z, y, x)
    label[2:5, 3:7, 4:9] = 1
    image = rng.normal(0, 1, label.shape).astype(np.float32) + 2 * label
    return image, label


@pytest.fixture
def official_layout(tmp_path):
    root = tmp_path / "la_official"
    for i, case in enumerate(CASES):
        (root / case).mkdir(parents=True)
        image, label = _volume(i)
        for array, name in ((image, "lgemri.nrrd"), ((label * 255).astype(np.uint8), "laendo.nrrd")):
            itk = sitk.GetImageFromArray(array)
            itk.SetSpacing((0.625, 0.625, 1.25))
            sitk.WriteImage(itk, str(root / case / name))
    (tmp_path / "train.list").write_text("\n".join(CASES[:6]) + "\n")
    (tmp_path / "test.list").write_text("\n".join(CASES[6:]) + "\n")
    return root


@pytest.fixture
def h5_layout(tmp_path):
    root = tmp_path / "la_h5"
    for i, case in enumerate(CASES):
        (root / case).mkdir(parents=True)
        image, label = _volume(i)
        with h5py.File(root / case / "mri_norm2.h5", "w") as f:
            f["image"] = image.transpose(2, 1, 0)  # UA-MT stores (x, y, z)
            f["label"] = label.transpose(2, 1, 0)
    (tmp_path / "train.list").write_text("\n".join(f"{c}/mri_norm2.h5" for c in CASES[:6]) + "\n")
    (tmp_path / "test.list").write_text("\n".join(CASES[6:]) + "\n")
    return root


def _convert(source_flag, root, *extra):
    lists = ["--train_list", str(root.parent / "train.list"), "--test_list", str(root.parent / "test.list")]
    return main(["convert", "la", source_flag, str(root), *lists, *extra])


def test_official_layout_semi_supervised(official_layout, nnunet_folders):
    assert _convert("--official", official_layout, "--labelled_count", "2") == 0
    semi, dense = load_raw_dataset(37), load_raw_dataset(137)
    assert semi.manifest.cases_with("dense") == sorted(CASES[:2])
    assert semi.manifest.cases_with("unlabelled") == sorted(CASES[2:6])
    assert sorted(semi.test_cases()) == sorted(CASES[6:]) == sorted(dense.test_cases())
    label = sitk.ReadImage(str(semi.folder / "labelsTr_dense" / f"{CASES[3]}.nii.gz"))
    assert set(np.unique(sitk.GetArrayFromImage(label)).tolist()) == {0, 1}
    assert label.GetSpacing() == pytest.approx((0.625, 0.625, 1.25))
    unlabelled = sitk.GetArrayFromImage(sitk.ReadImage(str(semi.folder / "labelsTr" / f"{CASES[3]}.nii.gz")))
    assert np.all(unlabelled == 2)
    splits = json.loads((nnunet_folders["nnUNet_preprocessed"] / semi.name / "splits_final.json").read_text(encoding="utf-8"))
    assert sorted(splits[0]["train"] + splits[0]["val"]) == sorted(CASES[:6])


def test_h5_layout_axes_and_spacing(h5_layout, nnunet_folders):
    assert _convert("--h5", h5_layout, "--labelled_count", "3", "--spacing", "0.625", "0.625", "0.625") == 0
    semi = load_raw_dataset(37)
    image = sitk.ReadImage(str(semi.folder / "imagesTr" / f"{CASES[0]}_0000.nii.gz"))
    expected, _ = _volume(0)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), expected)
    assert image.GetSpacing() == pytest.approx((0.625, 0.625, 0.625))
    assert semi.manifest.cases_with("dense") == sorted(CASES[:3])


def test_errors(h5_layout, nnunet_folders, capsys):
    assert _convert("--h5", h5_layout, "--labelled_count", "3") == 2
    assert "--spacing" in capsys.readouterr().err
    spacing = ["--spacing", "1", "1", "1"]
    assert _convert("--h5", h5_layout, "--labelled_count", "7", *spacing) == 2
    assert "7 labelled cases requested" in capsys.readouterr().err
    assert _convert("--h5", h5_layout, *spacing) == 2
    assert "keep labels" in capsys.readouterr().err
    (h5_layout.parent / "test.list").write_text(CASES[0] + "\n")
    assert _convert("--h5", h5_layout, "--labelled_count", "3", *spacing) == 2
    assert "both the training and the test list" in capsys.readouterr().err
    assert not any(nnunet_folders["nnUNet_raw"].iterdir())


def test_bad_nrrd_label_values(official_layout, nnunet_folders, capsys):
    bad = sitk.GetImageFromArray(np.full((6, 10, 12), 7, np.uint8))
    bad.SetSpacing((0.625, 0.625, 1.25))
    sitk.WriteImage(bad, str(official_layout / CASES[1] / "laendo.nrrd"))
    assert _convert("--official", official_layout, "--labelled_count", "2") == 2
    assert "0 and 255" in capsys.readouterr().err


@pytest.mark.real_data
def test_real_la_h5(nnunet_folders, tmp_path):
    data = os.environ.get("NNUNET_WEAK_DATA")
    if not data or not (Path(data) / "la").is_dir():
        pytest.skip("NNUNET_WEAK_DATA with la/ is not available")
    la = Path(data) / "la"
    assert main(["convert", "la", "--h5", str(la), "--spacing", "0.625", "0.625", "0.625", "--train_list",
                 str(la / "available.list"), "--labelled_count", "4", "-np", "2"]) == 0
    semi = load_raw_dataset(37)
    assert len(semi.manifest.cases_with("dense")) == 4 and len(semi.manifest.cases_with("unlabelled")) == 12
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(semi.folder), 2)
