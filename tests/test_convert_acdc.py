"""ACDC converter on small files reproducing both layouts; on the real data when NNUNET_WEAK_DATA is set."""
import filecmp
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_weak.cli import main
from nnunet_weak.dataset_conversion.acdc import patient_grouped_splits
from nnunet_weak.phantom import generate_case
from nnunet_weak.raw_dataset import load_raw_dataset
from nnunet_weak.scribbles import simulate_scribbles

PATIENTS = [f"patient{i:03d}" for i in (1, 2, 3, 4, 5, 6, 7)]


def _write_nifti(array, spacing_zyx, path):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(reversed(spacing_zyx)))
    sitk.WriteImage(image, str(path))


def _frames(patient_index):
    """Two frames (ED, ES) of a fake patient: phantom images and labels."""
    ed, es = 1, 8 + patient_index
    cases = {}
    for number, seed in ((ed, patient_index * 2), (es, patient_index * 2 + 1)):
        c = generate_case(seed, shape_yx=(24, 24), num_slices=(3, 4))
        cases[number] = c
    return cases


@pytest.fixture
def official_layout(tmp_path):
    root = tmp_path / "training"
    scribbles = tmp_path / "scribbles"
    scribbles.mkdir()
    for i, patient in enumerate(PATIENTS):
        folder = root / patient
        folder.mkdir(parents=True)
        frames = _frames(i)
        ed, es = sorted(frames)
        (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 180\nNbFrame: 30\nWeight: 80\n")
        for number, c in frames.items():
            _write_nifti(c.image, c.spacing, folder / f"{patient}_frame{number:02d}.nii.gz")
            _write_nifti(c.label, c.spacing, folder / f"{patient}_frame{number:02d}_gt.nii.gz")
            if i < 3:  # hand-drawn scribbles for some patients only
                _write_nifti(simulate_scribbles(c.label, 4, 99).astype(np.uint16), c.spacing,
                             scribbles / f"{patient}_frame{number:02d}_scribble.nii.gz")
        _write_nifti(np.zeros((2, 3, 24, 24), np.float32), (1.0, 10.0, 1.5, 1.5), folder / f"{patient}_4d.nii.gz")
    return root, scribbles


@pytest.fixture
def h5_layout(tmp_path):
    volumes = tmp_path / "acdc" / "volumes"
    volumes.mkdir(parents=True)
    rows = ["case,spacing_x_mm,spacing_y_mm,spacing_z_mm,h5_axis_order"]
    for i, patient in enumerate(PATIENTS):
        for number, c in _frames(i).items():
            case = f"{patient}_frame{number:02d}"
            with h5py.File(volumes / f"{case}.h5", "w") as f:
                f["image"] = c.image
                f["label"] = c.label
                f["scribble"] = simulate_scribbles(c.label, 4, 7).astype(np.uint16)
            rows.append(f"{case},{c.spacing[2]},{c.spacing[1]},{c.spacing[0]},zyx")
    (tmp_path / "acdc" / "spacing.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "acdc"


def _convert(argv, capsys=None):
    return main(["convert", "acdc", "--test_patients", "2", "-np", "1"] + argv)


def test_official_layout(official_layout, nnunet_folders):
    root, scribbles = official_layout
    assert _convert(["--official", str(root), "--scribbles", str(scribbles)]) == 0
    sparse, dense = load_raw_dataset(27), load_raw_dataset(127)
    assert sparse.ignore_label == 4 and dense.ignore_label is None
    assert len(sparse.training_cases) == 10 and sparse.training_cases == dense.training_cases
    assert sorted(sparse.test_cases()) == sorted(dense.test_cases())
    test_patients = {c[:10] for c in sparse.test_cases()}
    assert len(test_patients) == 2 and not test_patients & {c[:10] for c in sparse.training_cases}
    provenance = {c: e.provenance for c, e in sparse.manifest.cases.items()}
    for case, p in provenance.items():
        hand_drawn = case[:10] in PATIENTS[:3]
        assert ("source" in p) == hand_drawn, case
    # hand-drawn scribbles are copied as given
    case = next(c for c in sparse.training_cases if c[:10] in PATIENTS[:3])
    given = sitk.GetArrayFromImage(sitk.ReadImage(str(scribbles / f"{case}_scribble.nii.gz")))
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(sparse.folder / "labelsTr" / f"{case}.nii.gz")))
    np.testing.assert_array_equal(given, written)
    # the image keeps its spacing
    original = sitk.ReadImage(str(root / case[:10] / f"{case}.nii.gz"))
    converted = sitk.ReadImage(str(sparse.folder / "imagesTr" / f"{case}_0000.nii.gz"))
    assert converted.GetSpacing() == pytest.approx(original.GetSpacing())
    splits = [json.loads((nnunet_folders["nnUNet_preprocessed"] / d / "splits_final.json").read_text(encoding="utf-8"))
              for d in (sparse.name, dense.name)]
    assert splits[0] == splits[1] and len(splits[0]) == 5
    for fold in splits[0]:
        assert not {c[:10] for c in fold["train"]} & {c[:10] for c in fold["val"]}
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    for dataset in (sparse, dense):
        verify_dataset_integrity(str(dataset.folder), 1)


def test_h5_layout_and_byte_identical_reconversion(h5_layout, nnunet_folders, tmp_path):
    args = ["--h5", str(h5_layout), "--spacing", str(h5_layout / "spacing.csv")]
    assert _convert(args) == 0
    first = tmp_path / "first"
    os.rename(nnunet_folders["nnUNet_raw"], first)
    nnunet_folders["nnUNet_raw"].mkdir()
    assert _convert(args) == 0
    comparison = filecmp.dircmp(first / "Dataset027_ACDC", nnunet_folders["nnUNet_raw"] / "Dataset027_ACDC")
    assert not comparison.diff_files and not comparison.left_only and not comparison.right_only
    for sub in ("imagesTr", "labelsTr", "labelsTr_dense"):
        _, mismatch, errors = filecmp.cmpfiles(first / "Dataset027_ACDC" / sub,
                                               nnunet_folders["nnUNet_raw"] / "Dataset027_ACDC" / sub,
                                               os.listdir(first / "Dataset027_ACDC" / sub), shallow=False)
        assert not mismatch and not errors
    sparse = load_raw_dataset(27)
    case = sparse.training_cases[0]
    with h5py.File(h5_layout / "volumes" / f"{case}.h5") as f:
        expected = f["scribble"][:]
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(sparse.folder / "labelsTr" / f"{case}.nii.gz")))
    np.testing.assert_array_equal(written, expected)


def _error(argv, capsys):
    assert _convert(argv) == 2
    return capsys.readouterr().err


def test_h5_without_spacing_is_refused(h5_layout, nnunet_folders, capsys):
    err = _error(["--h5", str(h5_layout)], capsys)
    assert "No spacing" in err and "--spacing" in err
    assert not any(nnunet_folders["nnUNet_raw"].iterdir())


def test_missing_ground_truth(official_layout, nnunet_folders, capsys):
    root, _ = official_layout
    (root / "patient002" / "patient002_frame01_gt.nii.gz").unlink()
    err = _error(["--official", str(root)], capsys)
    assert "patient002_frame01_gt.nii.gz is missing" in err


def test_corrupted_h5(h5_layout, nnunet_folders, capsys):
    (h5_layout / "volumes" / "patient003_frame01.h5").write_bytes(b"not an hdf5 file")
    err = _error(["--h5", str(h5_layout), "--spacing", str(h5_layout / "spacing.csv")], capsys)
    assert "patient003_frame01.h5" in err
    assert not any(nnunet_folders["nnUNet_raw"].iterdir())


def test_scribble_without_image(official_layout, nnunet_folders, capsys):
    root, scribbles = official_layout
    _write_nifti(np.zeros((3, 24, 24), np.uint8), (10.0, 1.5, 1.5), scribbles / "patient099_frame01_scribble.nii.gz")
    err = _error(["--official", str(root), "--scribbles", str(scribbles)], capsys)
    assert "patient099_frame01_scribble.nii.gz" in err


def test_label_out_of_range(official_layout, nnunet_folders, capsys):
    root, _ = official_layout
    gt = root / "patient004" / "patient004_frame01_gt.nii.gz"
    image = sitk.ReadImage(str(gt))
    array = sitk.GetArrayFromImage(image)
    array[0, 0, 0] = 7
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(gt))
    assert "outside 0..3" in _error(["--official", str(root)], capsys)


def test_too_many_test_patients(official_layout, nnunet_folders, capsys):
    root, _ = official_layout
    assert main(["convert", "acdc", "--official", str(root), "--test_patients", "7"]) == 2
    assert "lower --test_count" in capsys.readouterr().err


def test_existing_dataset_needs_overwrite(official_layout, nnunet_folders, capsys):
    root, _ = official_layout
    assert _convert(["--official", str(root)]) == 0
    assert "already exists" in _error(["--official", str(root)], capsys)
    assert _convert(["--official", str(root), "--overwrite"]) == 0


def test_semi_supervised_acdc(official_layout, nnunet_folders):
    root, _ = official_layout
    assert _convert(["--official", str(root), "--supervision", "semi", "--labelled_count", "3"]) == 0
    manifest = load_raw_dataset(27).manifest
    dense_cases = manifest.cases_with("dense")
    assert len(dense_cases) == 3 and len(manifest.cases_with("unlabelled")) == 7
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(load_raw_dataset(27).folder / "labelsTr" /
                                                      f"{manifest.cases_with('unlabelled')[0]}.nii.gz")))
    assert np.all(label == 4)


def test_patient_grouped_splits():
    cases = [f"patient{p:03d}_frame{f:02d}" for p in range(1, 11) for f in (1, 12)]
    splits = patient_grouped_splits(cases)
    assert sorted(c for s in splits for c in s["val"]) == sorted(cases)
    for s in splits:
        assert not {c[:10] for c in s["train"]} & {c[:10] for c in s["val"]}
        assert sorted(s["train"] + s["val"]) == sorted(cases)


@pytest.mark.real_data
def test_real_acdc_h5_with_hand_drawn_scribbles(nnunet_folders):
    data = os.environ.get("NNUNET_WEAK_DATA")
    if not data or not (Path(data) / "acdc").is_dir():
        pytest.skip("NNUNET_WEAK_DATA with acdc/ is not available")
    acdc = Path(data) / "acdc"
    assert main(["convert", "acdc", "--h5", str(acdc), "--spacing", str(acdc / "spacing.csv"),
                 "--scribbles", str(acdc / "scribbles"), "-np", "2"]) == 0
    sparse = load_raw_dataset(27)
    assert len(sparse.training_cases) + len(sparse.test_cases()) == 160
    assert all("source" in e.provenance for e in sparse.manifest.cases.values())
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(sparse.folder), 2)
    verify_dataset_integrity(str(load_raw_dataset(127).folder), 2)


def test_test_patients_pinned_by_list(official_layout, nnunet_folders, tmp_path, capsys):
    root, _ = official_layout
    (tmp_path / "test.list").write_text(f"{PATIENTS[0]}\n{PATIENTS[5]}\n", encoding="utf-8")
    assert main(["convert", "acdc", "--official", str(root), "--test_list", str(tmp_path / "test.list")]) == 0
    assert {c[:10] for c in load_raw_dataset(27).test_cases()} == {PATIENTS[0], PATIENTS[5]}
    assert main(["convert", "acdc", "--official", str(root), "--test_list", str(tmp_path / "test.list"),
                 "--test_count", "2", "--overwrite"]) == 2
    assert "one way" in capsys.readouterr().err
    (tmp_path / "unknown.list").write_text("patient999\n", encoding="utf-8")
    assert main(["convert", "acdc", "--official", str(root), "--test_list", str(tmp_path / "unknown.list"),
                 "--overwrite"]) == 2
    assert "patient999" in capsys.readouterr().err


def test_a_release_test_folder_converts_as_test_only(official_layout, nnunet_folders, capsys):
    root, _ = official_layout
    assert main(["convert", "acdc", "--official", str(root), "--test_only", "--id", "527"]) == 0
    dataset = load_raw_dataset(527)
    assert dataset.name == "Dataset527_ACDCTest" and dataset.training_cases == []
    assert {c[:10] for c in dataset.test_cases()} == set(PATIENTS)
    assert all(label is not None for _, label in dataset.test_cases().values())
    assert main(["convert", "acdc", "--official", str(root), "--test_only", "--id", "528", "--test_count", "2"]) == 2
    assert "do not apply" in capsys.readouterr().err
    assert main(["convert", "acdc", "--official", str(root), "--test_only"]) == 0  # id 27 is free here
    assert main(["convert", "acdc", "--official", str(root), "--test_patients", "2"]) == 2
    assert "Id 027 is taken by Dataset027_ACDCTest" in capsys.readouterr().err
