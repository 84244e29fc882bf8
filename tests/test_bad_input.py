"""Inputs that used to pass silently and corrupt a label or a score: each is now a clear error."""
import gzip
import json
import os
import shlex
import stat
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_weak.cli import main
from nnunet_weak.errors import UserInputError
from nnunet_weak.evaluation import score_cases
from nnunet_weak.raw_dataset import Geometry, check_same_grid, integer_labels, read_volume, write_volume


def label_volume():
    label = np.zeros((6, 16, 16), np.uint8)
    label[1:5, 4:12, 4:12] = 1
    label[2:4, 6:10, 6:10] = 2
    return label


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
@pytest.mark.parametrize("keep", [0.5, 0.97, "header"])
def test_truncated_nifti_is_refused(tmp_path, ending, keep):
    intact = tmp_path / f"intact{ending}"
    write_volume(label_volume(), (5.0, 1.0, 1.0), intact)
    np.testing.assert_array_equal(read_volume(intact)[0], label_volume())
    data = intact.read_bytes()
    if keep == "header":
        raw = gzip.decompress(data) if ending == ".nii.gz" else data
        cut = gzip.compress(raw[:352]) if ending == ".nii.gz" else raw[:352]
    else:
        cut = data[:int(len(data) * keep)]
    truncated = tmp_path / f"truncated{ending}"
    truncated.write_bytes(cut)
    if ending == ".nii.gz":  # the fast path takes the intact file on its trailer, never the cut one
        from nnunet_weak.raw_dataset import _gzip_trailer_matches_header
        assert _gzip_trailer_matches_header(intact) and not _gzip_trailer_matches_header(truncated)
    with pytest.raises(UserInputError, match="cut short|incomplete or corrupt") as error:
        read_volume(truncated)
    assert str(truncated) in str(error.value) and "intact copy" in str(error.value)


def test_truncated_prediction_is_not_scored(tmp_path):
    write_volume(label_volume(), (5.0, 1.0, 1.0), tmp_path / "ref.nii.gz")
    write_volume(label_volume(), (5.0, 1.0, 1.0), tmp_path / "pred.nii.gz")
    data = (tmp_path / "pred.nii.gz").read_bytes()
    (tmp_path / "pred.nii.gz").write_bytes(data[:len(data) * 2 // 3])
    with pytest.raises(UserInputError, match="incomplete or corrupt|cut short"):
        score_cases({"c": (tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz")}, {"a": 1, "b": 2}, tmp_path / "s.json")
    assert not (tmp_path / "s.json").exists()


def test_fractional_label_values_are_refused():
    with pytest.raises(UserInputError, match=r"non-integer values, e.g. \[0.75, 1.5\]"):
        integer_labels(np.array([0.0, 0.75, 1.5, 1.0]), "label.nii.gz")
    np.testing.assert_array_equal(integer_labels(np.array([0.0, 1.0, 2.0], np.float32), "x"), [0, 1, 2])
    assert integer_labels(np.array([0, 3], np.uint8), "x").dtype == np.int64


def _volume(array, spacing=(3.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    return array, spacing, Geometry(origin, tuple(float(d) for d in direction))


def test_label_geometry_must_match_its_image():
    image = np.zeros((4, 8, 8))
    check_same_grid(_volume(image), _volume(image, origin=(0.001, 0.0, 0.0)), "case")  # float noise passes
    with pytest.raises(UserInputError, match="origin .* differs from the image's"):
        check_same_grid(_volume(image), _volume(image, origin=(0.0, 5.0, 0.0)), "case")
    with pytest.raises(UserInputError, match="mirrored"):
        check_same_grid(_volume(image), _volume(image, direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1)), "case")
    with pytest.raises(UserInputError, match="shape or spacing"):
        check_same_grid(_volume(image), _volume(image, spacing=(3.0, 1.2, 1.0)), "case")


def _own_folders(root, label_writer):
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    for i in range(6):
        label = np.zeros((3, 12, 12), np.uint8)
        label[:, 2:6, 2:6] = 1
        image = sitk.GetImageFromArray(np.random.default_rng(i).normal(0, 1, label.shape).astype(np.float32))
        sitk.WriteImage(image, str(root / "images" / f"s{i}_0000.nii.gz"))
        sitk.WriteImage(label_writer(i, label), str(root / "labels" / f"s{i}.nii.gz"))
    return ["convert", "folders", "--images", str(root / "images"), "--labels", str(root / "labels"),
            "--classes", "organ", "--name", "Mine", "--id", "501", "--dense_id", "601"]


def test_convert_refuses_fractional_and_mirrored_labels(tmp_path, nnunet_folders, capsys):
    def fractional(i, label):
        return sitk.GetImageFromArray(label.astype(np.float32) * (0.75 if i == 3 else 1.0))

    assert main(_own_folders(tmp_path / "fractional", fractional)) == 2
    assert "non-integer values, e.g. [0.75]" in capsys.readouterr().err
    assert not any(nnunet_folders["nnUNet_raw"].iterdir())

    def mirrored(i, label):
        image = sitk.GetImageFromArray(label)
        if i == 2:
            image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
        return image

    assert main(_own_folders(tmp_path / "mirrored", mirrored)) == 2
    assert "mirrored" in capsys.readouterr().err
    assert not any(nnunet_folders["nnUNet_raw"].iterdir())


def _plain(i, label):
    return sitk.GetImageFromArray(label)


def test_a_taken_twin_id_stops_the_conversion_before_anything_is_written(tmp_path, nnunet_folders, capsys):
    raw, pre = nnunet_folders["nnUNet_raw"], nnunet_folders["nnUNet_preprocessed"]
    (raw / "Dataset601_Other").mkdir()
    assert main(_own_folders(tmp_path, _plain)) == 2
    assert "Id 601 is taken by Dataset601_Other" in capsys.readouterr().err
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset601_Other"] and not any(pre.iterdir())

    (raw / "Dataset601_Other").rmdir()
    args = _own_folders(tmp_path / "same", _plain)
    args[args.index("--dense_id") + 1] = "501"
    assert main(args) == 2
    assert "would share the id 501" in capsys.readouterr().err
    assert not any(raw.iterdir()) and not any(pre.iterdir())


def test_output_folders_isolate_the_conversion(tmp_path, nnunet_folders, capsys):
    args = _own_folders(tmp_path, _plain)
    assert main(args) == 0
    real_splits = nnunet_folders["nnUNet_preprocessed"] / "Dataset501_Mine" / "splits_final.json"
    before = real_splits.read_bytes()
    real_splits.write_bytes(before + b" ")

    assert main(args + ["--output", str(tmp_path / "scratch_raw")]) == 2
    assert "--preprocessed_output" in capsys.readouterr().err
    assert main(args + ["--output", str(tmp_path / "scratch_raw"), "--preprocessed_output", str(tmp_path / "scratch_pre")]) == 0
    assert real_splits.read_bytes() == before + b" "  # the real nnUNet_preprocessed is untouched
    for name in ("Dataset501_Mine", "Dataset601_MineDense"):
        assert (tmp_path / "scratch_raw" / name / "dataset.json").is_file()
        assert (tmp_path / "scratch_pre" / name / "splits_final.json").read_bytes() == before


def test_overwrite_removes_the_stale_preprocessed_data_and_says_so(tmp_path, nnunet_folders, capsys):
    args = _own_folders(tmp_path, _plain)
    assert main(args) == 0
    pre = nnunet_folders["nnUNet_preprocessed"] / "Dataset501_Mine"
    (pre / "nnUNetPlans.json").write_text("{}", encoding="utf-8")
    (pre / "nnUNetPlans_2d").mkdir()
    capsys.readouterr()
    assert main(args) == 2
    assert "already exists. Pass --overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "Removed the preprocessed data of the replaced Dataset501_Mine (nnUNetPlans.json, nnUNetPlans_2d, " \
           "splits_final.json)" in out
    assert sorted(p.name for p in pre.iterdir()) == ["splits_final.json"]


def test_mixed_image_names_are_refused(tmp_path, nnunet_folders, capsys):
    args = _own_folders(tmp_path, _plain)
    stray = tmp_path / "images" / "s0.nii.gz"
    stray.write_bytes((tmp_path / "images" / "s0_0000.nii.gz").read_bytes())
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "mixes nnU-Net channel names" in err and "s0.nii.gz" in err and "6 of 7 files" in err
    assert not any(nnunet_folders["nnUNet_raw"].iterdir())


def _prediction_folders(root, cases=("a", "b", "c")):
    for sub in ("pred", "ref"):
        (root / sub).mkdir()
    for i, case in enumerate(cases):
        reference = label_volume()
        write_volume(reference, (5.0, 1.0, 1.0), root / "ref" / f"{case}.nii.gz")
        write_volume(np.roll(reference, i, axis=2), (5.0, 1.0, 1.0), root / "pred" / f"{case}.nii.gz")
    return root / "pred", root / "ref"


def test_evaluate_a_folder_against_a_folder_of_references(tmp_path, capsys):
    predictions, references = _prediction_folders(tmp_path)
    output = tmp_path / "summary.json"
    assert main(["evaluate", "-i", str(predictions), "--labels", str(references), "--classes", "outer", "inner",
                 "-o", str(output)]) == 0
    summary = json.loads(output.read_text(encoding="utf-8"))
    assert summary["class_labels"] == {"outer": 1, "inner": 2}
    assert summary["cases_scored"] == summary["cases_with_reference"] == 3 and summary["cases_missing"] == []
    case_a = next(c for c in summary["metric_per_case"] if c["case"] == "a")
    assert case_a["metrics"]["outer"]["Dice"] == 1.0  # no shift for the first case
    assert main(["evaluate", "-i", str(predictions), "--labels", str(references), "-o", str(output)]) == 0
    assert json.loads(output.read_text(encoding="utf-8"))["class_labels"] == {"1": 1, "2": 2}


def test_evaluate_refuses_a_partial_prediction_set_unless_allowed(tmp_path, capsys):
    predictions, references = _prediction_folders(tmp_path)
    (predictions / "c.nii.gz").unlink()
    output = tmp_path / "summary.json"
    assert main(["evaluate", "-i", str(predictions), "--labels", str(references), "-o", str(output)]) == 2
    assert "1 of the 3 cases" in capsys.readouterr().err and not output.exists()
    assert main(["evaluate", "-i", str(predictions), "--labels", str(references), "-o", str(output),
                 "--allow_missing"]) == 0
    assert "2 of 3 cases" in capsys.readouterr().out
    summary = json.loads(output.read_text(encoding="utf-8"))
    assert (summary["cases_scored"], summary["cases_with_reference"], summary["cases_missing"]) == (2, 3, ["c"])


def test_evaluate_refuses_a_prediction_on_another_grid(tmp_path, capsys):
    predictions, references = _prediction_folders(tmp_path)
    write_volume(label_volume(), (5.0, 1.0, 1.0), predictions / "b.nii.gz", Geometry((0.0, 0.0, 7.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    assert main(["evaluate", "-i", str(predictions), "--labels", str(references), "-o", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert "b.nii.gz" in err and "the prediction's origin" in err


def test_options_the_chosen_supervision_would_ignore_are_refused(tmp_path, nnunet_folders, capsys):
    args = _own_folders(tmp_path, _plain)
    for extra, message in [(["--labelled_count", "2"], "--supervision weak has none"),
                           (["--supervision", "semi", "--labelled_count", "2", "--weak_label", "box"],
                            "--weak_label is for weak or mixed"),
                           (["--erosion_iterations", "2"], "--erosion_iterations is for --weak_label erosion")]:
        assert main(args + extra) == 2
        assert message in capsys.readouterr().err
    scribbles_only = [a for a in args if a not in ("--labels", str(tmp_path / "labels"), "--dense_id", "601")]
    assert main(scribbles_only + ["--scribbles", str(tmp_path / "labels"), "--test_count", "1"]) == 2
    assert "--test_count, --test_list and --dense_id need --labels" in capsys.readouterr().err
    assert main(args + ["--scribble_ignore", "9"]) == 2
    assert "--scribble_ignore is the un-annotated value of --scribbles" in capsys.readouterr().err
    assert not any(nnunet_folders["nnUNet_raw"].iterdir())


def test_env_lines_survive_eval_with_a_space_in_the_root(tmp_path):
    root = tmp_path / "my data"
    script = f'eval "$({sys.executable} -m nnunet_weak.cli env --root {shlex.quote(str(root))})"; echo "$nnUNet_raw"'
    result = subprocess.run(["bash", "-c", script], capture_output=True, encoding="utf-8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(root.resolve() / "nnUNet_raw")


def test_written_datasets_follow_the_umask(tmp_path, nnunet_folders):
    previous = os.umask(0o022)
    try:
        assert main(_own_folders(tmp_path, _plain)) == 0
    finally:
        os.umask(previous)
    dataset = nnunet_folders["nnUNet_raw"] / "Dataset501_Mine"
    modes = {p.relative_to(dataset).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [dataset, *dataset.rglob("*")]}
    assert modes["."] == modes["imagesTr"] == 0o755
    assert modes["dataset.json"] == modes["supervision.json"] == 0o644
    splits = nnunet_folders["nnUNet_preprocessed"] / "Dataset501_Mine" / "splits_final.json"
    assert stat.S_IMODE(splits.stat().st_mode) == 0o644
