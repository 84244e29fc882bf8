"""CHAOS converter on small DICOM + PNG series and NIfTI files; on the real NIfTI data when NNUNET_WEAK_DATA is set."""
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from nnunet_weak.cli import main
from nnunet_weak.raw_dataset import load_raw_dataset

SUBJECTS = ["1", "2", "3", "5", "8", "10", "13"]
PNG = {0: 0, 1: 63, 2: 126, 3: 189, 4: 252}
SPACING_XYZ = (1.5, 1.5, 6.0)


def _subject(seed, depth=4):
    """An image and a label whose slices are told apart by the label's area (slice i: i + 1 rows of liver)."""
    rng = np.random.default_rng(seed)
    label = np.zeros((depth, 16, 20), np.uint8)
    for z in range(depth):
        label[z, 2:3 + z, 2:8] = 1
        label[z, 10:13, 3:6] = 2
        label[z, 10:13, 12:15] = 3
        label[z, 4:7, 14:18] = 4
    image = (rng.normal(200, 20, label.shape) + 100 * label).astype(np.int16)
    return image, label


def _write_dicom_series(volume, folder, reverse_names, uid):
    folder.mkdir(parents=True)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(SPACING_XYZ)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    names = []
    depth = volume.shape[0]
    for z in range(depth):
        number = depth - z if reverse_names else z + 1
        piece = image[:, :, z]
        for tag, value in (("0020|000e", uid), ("0020|0013", str(number)), ("0008|0060", "MR"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0018|0050", str(SPACING_XYZ[2])),
                           ("0020|0032", "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, z))))):
            piece.SetMetaData(tag, value)
        name = f"IMG-0002-{number:05d}"
        writer.SetFileName(str(folder / f"{name}.dcm"))
        writer.Execute(piece)
        names.append(name)
    return names


@pytest.fixture
def official_layout(tmp_path):
    root = tmp_path / "MR"
    for i, subject in enumerate(SUBJECTS):
        image, label = _subject(i)
        t2 = root / subject / "T2SPIR"
        names = _write_dicom_series(image, t2 / "DICOM_anon", reverse_names=True, uid=f"1.2.3.{i}.2")
        (t2 / "Ground").mkdir()
        for z, name in enumerate(names):
            Image.fromarray(np.vectorize(PNG.get)(label[z]).astype(np.uint8)).save(t2 / "Ground" / f"{name}.png")
        t1 = root / subject / "T1DUAL"
        names = _write_dicom_series(image, t1 / "DICOM_anon" / "InPhase", False, f"1.2.3.{i}.3")
        _write_dicom_series((image // 2).astype(np.int16), t1 / "DICOM_anon" / "OutPhase", False, f"1.2.3.{i}.4")
        (t1 / "Ground").mkdir()
        for z, name in enumerate(names):
            Image.fromarray(np.vectorize(PNG.get)(label[z]).astype(np.uint8)).save(t1 / "Ground" / f"{name}.png")
    return root


@pytest.fixture
def nifti_layout(tmp_path):
    root = tmp_path / "chaos_t2"
    root.mkdir()
    for i, subject in enumerate(SUBJECTS):
        image, label = _subject(i)
        for array, name in ((image.astype(np.float32), f"image_{subject}"), (label, f"label_{subject}")):
            itk = sitk.GetImageFromArray(array)
            itk.SetSpacing(SPACING_XYZ)
            itk.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
            sitk.WriteImage(itk, str(root / f"{name}.nii.gz"))
    return root


def test_official_t2spir_orders_png_slices_like_dicom(official_layout, nnunet_folders):
    assert main(["convert", "chaos", "--official", str(official_layout), "--test_subjects", "2"]) == 0
    weak, dense = load_raw_dataset(38), load_raw_dataset(138)
    assert len(weak.training_cases) == 5 and len(weak.test_cases()) == 2
    assert weak.manifest.cases_with("sparse") == weak.training_cases
    case = weak.training_cases[0]
    label = sitk.ReadImage(str(dense.folder / "labelsTr" / f"{case}.nii.gz"))
    array = sitk.GetArrayFromImage(label)
    _, expected = _subject(SUBJECTS.index(case[len("chaos_"):]))
    np.testing.assert_array_equal(array, expected)
    assert label.GetSpacing() == pytest.approx(SPACING_XYZ)


def test_official_t1dual_has_two_channels(official_layout, nnunet_folders):
    assert main(["convert", "chaos", "--official", str(official_layout), "--modality", "T1DUAL",
                 "--test_subjects", "1", "--supervision", "weak", "--weak_label", "erosion",
                 "--erosion_iterations", "1"]) == 0
    weak = load_raw_dataset(38)
    assert weak.dataset_json["channel_names"] == {"0": "T1_in_phase", "1": "T1_out_phase"}
    case = weak.training_cases[0]
    in_phase = sitk.GetArrayFromImage(sitk.ReadImage(str(weak.folder / "imagesTr" / f"{case}_0000.nii.gz")))
    out_phase = sitk.GetArrayFromImage(sitk.ReadImage(str(weak.folder / "imagesTr" / f"{case}_0001.nii.gz")))
    np.testing.assert_allclose(out_phase, (in_phase.astype(np.int16) // 2).astype(np.float32), atol=1)
    assert weak.manifest.cases[case].weak_label == "erosion"


def test_nifti_layout_keeps_geometry(nifti_layout, nnunet_folders):
    assert main(["convert", "chaos", "--nifti", str(nifti_layout), "--test_subjects", "2"]) == 0
    weak = load_raw_dataset(38)
    image = sitk.ReadImage(str(weak.folder / "imagesTr" / f"{weak.training_cases[0]}_0000.nii.gz"))
    assert image.GetDirection() == pytest.approx((1, 0, 0, 0, -1, 0, 0, 0, 1))
    assert image.GetSpacing() == pytest.approx(SPACING_XYZ)


def test_errors(official_layout, nifti_layout, nnunet_folders, capsys):
    png = next((official_layout / "2" / "T2SPIR" / "Ground").glob("*.png"))
    png.unlink()
    assert main(["convert", "chaos", "--official", str(official_layout), "--test_subjects", "1"]) == 2
    assert f"{png.name} is missing" in capsys.readouterr().err
    (nifti_layout / "image_3.nii.gz").unlink()
    assert main(["convert", "chaos", "--nifti", str(nifti_layout), "--test_subjects", "1"]) == 2
    assert "label_3.nii.gz" in capsys.readouterr().err
    assert main(["convert", "chaos", "--official", str(official_layout), "--test_subjects", "3"]) == 2
    assert "lower --test_count" in capsys.readouterr().err
    assert not any(nnunet_folders["nnUNet_raw"].iterdir())


def test_bad_png_values(official_layout, nnunet_folders, capsys):
    png = next((official_layout / "3" / "T2SPIR" / "Ground").glob("*.png"))
    Image.fromarray(np.full((16, 20), 100, np.uint8)).save(png)
    assert main(["convert", "chaos", "--official", str(official_layout), "--test_subjects", "1"]) == 2
    assert "0, 63, 126, 189, 252" in capsys.readouterr().err


@pytest.mark.real_data
def test_real_chaos_nifti(nnunet_folders):
    data = os.environ.get("NNUNET_WEAK_DATA")
    if not data or not (Path(data) / "chaos_t2").is_dir():
        pytest.skip("NNUNET_WEAK_DATA with chaos_t2/ is not available")
    assert main(["convert", "chaos", "--nifti", str(Path(data) / "chaos_t2"), "-np", "2"]) == 0
    weak = load_raw_dataset(38)
    assert len(weak.training_cases) == 10 and len(weak.test_cases()) == 4
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(weak.folder), 2)


def test_test_subjects_pinned_by_list(official_layout, nnunet_folders, tmp_path, capsys):
    subjects = sorted(p.name for p in official_layout.iterdir() if p.is_dir())
    (tmp_path / "test.list").write_text(f"chaos_{subjects[0]}\n", encoding="utf-8")
    assert main(["convert", "chaos", "--official", str(official_layout), "--test_list", str(tmp_path / "test.list")]) == 0
    assert sorted(load_raw_dataset(38).test_cases()) == [f"chaos_{subjects[0]}"]
    assert main(["convert", "chaos", "--official", str(official_layout), "--test_list", str(tmp_path / "test.list"),
                 "--test_count", "1", "--overwrite"]) == 2
    assert "one way" in capsys.readouterr().err
