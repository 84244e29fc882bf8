"""A user's own folders: images, dense labels and/or scribbles."""
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_weak.cli import main
from nnunet_weak.raw_dataset import load_raw_dataset

CASES = [f"subject{i}" for i in range(7)]


def _write(array, path, spacing=(1.0, 1.0, 3.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


@pytest.fixture
def own_data(tmp_path):
    for sub in ("images", "labels", "scribbles"):
        (tmp_path / sub).mkdir()
    rng = np.random.default_rng(0)
    for i, case in enumerate(CASES):
        label = np.zeros((3, 12, 12), np.uint8)
        label[:, 2:6, 2:6] = 1
        label[:, 7:10, 6:11] = 2
        _write(rng.normal(0, 1, label.shape).astype(np.float32), tmp_path / "images" / f"{case}_0000.nii.gz")
        _write(rng.normal(5, 1, label.shape).astype(np.float32), tmp_path / "images" / f"{case}_0001.nii.gz")
        _write(label, tmp_path / "labels" / f"{case}.nii.gz")
        if i % 2 == 0:  # the user's scribbles: 9 = not annotated
            scribble = np.full(label.shape, 9, np.uint8)
            scribble[:, 3, 3:5] = 1
            scribble[:, 8, 7:10] = 2
            scribble[:, 0, :] = 0
            _write(scribble, tmp_path / "scribbles" / f"{case}.nii.gz")
    return tmp_path


def _args(root, *extra):
    return ["convert", "folders", "--images", str(root / "images"), "--classes", "organ", "lesion",
            "--channel_names", "T1", "T2", "--name", "Mine", "--id", "501", *extra]


def test_with_labels_and_some_scribbles(own_data, nnunet_folders):
    assert main(_args(own_data, "--labels", str(own_data / "labels"), "--scribbles", str(own_data / "scribbles"),
                      "--scribble_ignore", "9", "--dense_id", "601", "--test_cases", "2")) == 0
    weak, dense = load_raw_dataset(501), load_raw_dataset(601)
    assert weak.dataset_json["labels"] == {"background": 0, "organ": 1, "lesion": 2, "ignore": 3}
    assert weak.dataset_json["channel_names"] == {"0": "T1", "1": "T2"}
    assert len(weak.training_cases) == 5 and len(weak.test_cases()) == 2
    for case, entry in weak.manifest.cases.items():
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(weak.folder / "labelsTr" / f"{case}.nii.gz")))
        if CASES.index(case) % 2 == 0:
            assert entry.provenance == {"source": "hand-drawn"}
            assert set(np.unique(label).tolist()) == {0, 1, 2, 3}  # 9 became the ignore label 3
        else:
            assert entry.provenance["generator"] == "scribble"
    assert dense.manifest.cases_with("dense") == dense.training_cases


def test_scribbles_only(own_data, nnunet_folders):
    assert main(_args(own_data, "--scribbles", str(own_data / "scribbles"), "--scribble_ignore", "9")) == 0
    dataset = load_raw_dataset(501)
    assert dataset.manifest.cases_with("sparse") == sorted(CASES[0::2])
    assert dataset.manifest.cases_with("unlabelled") == sorted(CASES[1::2])
    assert all(e.dense_label is None for e in dataset.manifest.cases.values())


def test_errors(own_data, nnunet_folders, capsys):
    assert main(_args(own_data, "--labels", str(own_data / "labels"))) == 2
    assert "--dense_id" in capsys.readouterr().err
    assert main(_args(own_data, "--scribbles", str(own_data / "scribbles"))) == 2
    assert "[9]" in capsys.readouterr().err  # 9 is not the default ignore value (3)
    (own_data / "labels" / "ghost.nii.gz").write_bytes((own_data / "labels" / "subject0.nii.gz").read_bytes())
    assert main(_args(own_data, "--labels", str(own_data / "labels"), "--dense_id", "601")) == 2
    assert "without an image" in capsys.readouterr().err
    (own_data / "labels" / "ghost.nii.gz").unlink()
    _write(np.full((3, 12, 12), 5, np.uint8), own_data / "labels" / "subject3.nii.gz")
    assert main(_args(own_data, "--labels", str(own_data / "labels"), "--dense_id", "601")) == 2
    assert "must lie in 0..2" in capsys.readouterr().err
    _write(np.zeros((3, 10, 12), np.uint8), own_data / "labels" / "subject3.nii.gz")
    assert main(_args(own_data, "--labels", str(own_data / "labels"), "--dense_id", "601")) == 2
    assert "differ in shape" in capsys.readouterr().err
    assert not any(nnunet_folders["nnUNet_raw"].iterdir())


def test_scribbles_for_training_dense_labels_for_testing(own_data, nnunet_folders, tmp_path):
    """A scribble release: training scans with scribbles only, test scans labelled densely."""
    for sub in ("test_images", "test_labels"):
        (tmp_path / sub).mkdir()
    for case in CASES[:2]:
        for channel in ("0000", "0001"):
            (own_data / "images" / f"{case}_{channel}.nii.gz").rename(tmp_path / "test_images" / f"{case}_{channel}.nii.gz")
        (own_data / "labels" / f"{case}.nii.gz").rename(tmp_path / "test_labels" / f"{case}.nii.gz")
        (own_data / "scribbles" / f"{case}.nii.gz").unlink(missing_ok=True)
    assert main(_args(own_data, "--scribbles", str(own_data / "scribbles"), "--scribble_ignore", "9",
                      "--test_images", str(tmp_path / "test_images"), "--test_labels", str(tmp_path / "test_labels"))) == 0
    dataset = load_raw_dataset(501)
    assert sorted(dataset.test_cases()) == CASES[:2] and sorted(dataset.training_cases) == CASES[2:]
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset.folder / "labelsTs" / f"{CASES[0]}.nii.gz")))
    assert set(np.unique(label).tolist()) == {0, 1, 2}  # dense, no ignore label
    supervision = {dataset.manifest.cases[c].supervision for c in dataset.training_cases}
    assert supervision == {"sparse", "unlabelled"}


def test_test_cases_pinned_by_list(own_data, nnunet_folders, tmp_path):
    (tmp_path / "test.list").write_text(f"{CASES[1]}\n{CASES[4]}\n", encoding="utf-8")
    assert main(_args(own_data, "--labels", str(own_data / "labels"), "--dense_id", "601",
                      "--test_list", str(tmp_path / "test.list"))) == 0
    assert sorted(load_raw_dataset(501).test_cases()) == sorted(load_raw_dataset(601).test_cases()) == [CASES[1], CASES[4]]


def test_a_test_only_dataset_for_prediction_and_scoring(own_data, nnunet_folders, tmp_path, capsys):
    assert main(_args(own_data, "--labels", str(own_data / "labels"), "--test_only", "--id", "777")) == 0
    dataset = load_raw_dataset(777)
    assert dataset.training_cases == [] and sorted(dataset.test_cases()) == CASES
    assert dataset.dataset_json["numTraining"] == 0
    assert not (nnunet_folders["nnUNet_preprocessed"] / dataset.name).exists()
    # its test cases are scored like any others
    predictions = tmp_path / "pred"
    predictions.mkdir()
    for case in CASES:
        (predictions / f"{case}.nii.gz").write_bytes((dataset.folder / "labelsTs" / f"{case}.nii.gz").read_bytes())
    assert main(["evaluate", "-d", "777", "-i", str(predictions)]) == 0
    assert "Dice 1.0000" in capsys.readouterr().out
    assert main(_args(own_data, "--labels", str(own_data / "labels"), "--test_only", "--id", "778",
                      "--dense_id", "779")) == 2
    assert "leave --dense_id out" in capsys.readouterr().err


@pytest.mark.parametrize("weak_label", ["erosion", "scribble"])
def test_mixed_strong_cases_carry_their_weak_label_too(own_data, nnunet_folders, weak_label):
    """ConfKD trains a student on every case's weak label: a strong case's is written beside its dense one,
    made by the same generator and per-case seed as a weak case's would be."""
    from nnunet_weak.supervision_choice import SupervisionChoice
    assert main(_args(own_data, "--labels", str(own_data / "labels"), "--dense_id", "601", "--supervision", "mixed",
                      "--weak_label", weak_label, "--labelled_count", "3", "--simulate_scribbles")) == 0
    dataset = load_raw_dataset(501)
    strong = dataset.manifest.cases_with("dense")
    assert len(strong) == 3
    choice = SupervisionChoice("weak", weak_label, seed=0)  # the same generator and per-case seed
    for case in dataset.training_cases:
        entry = dataset.manifest.cases[case]
        dense = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset.dense_label_path(case))))
        expected, _ = choice.weak_label_of(case, dense, dataset.ignore_label)
        if case in strong:
            assert entry.weak_label == weak_label and entry.weak_label_file == f"labelsTr_weak/{case}.nii.gz"
            weak = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset.manifest.weak_label_path(dataset.folder, case))))
            label = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset.folder / "labelsTr" / f"{case}.nii.gz")))
            np.testing.assert_array_equal(label, dense)
        else:
            assert entry.weak_label_file is None
            weak = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset.folder / "labelsTr" / f"{case}.nii.gz")))
        np.testing.assert_array_equal(weak, expected)
    assert not (load_raw_dataset(601).folder / "labelsTr_weak").exists()  # the dense twin has none
