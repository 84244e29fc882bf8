"""Manifest, raw dataset writing/loading, budgets: the supervision model and its bad-input errors."""
import json
import shutil

import numpy as np
import pytest

from nnunet_weak.budget import NAMED_BUDGETS, parse_budget
from nnunet_weak.errors import UserInputError
from nnunet_weak.raw_dataset import CaseRecord, load_raw_dataset, write_raw_dataset
from nnunet_weak.supervision import MANIFEST_FILENAME, manifest_from_json, read_manifest

LABELS = {"background": 0, "a": 1, "b": 2, "ignore": 3}


def _case(identifier, supervision="sparse", seed=0):
    rng = np.random.default_rng(seed)
    dense = rng.integers(0, 3, (2, 6, 5)).astype(np.uint8)
    label = np.where(rng.random(dense.shape) < 0.2, dense, 3).astype(np.uint8)
    if supervision == "unlabelled":
        label[:] = 3
    if supervision == "dense":
        label = dense
    return CaseRecord(identifier, [rng.random(dense.shape).astype(np.float32)], (4.0, 1.0, 1.0), label,
                      dense_label=None if supervision == "dense" else dense, supervision=supervision,
                      weak_label="scribble" if supervision == "sparse" else None, provenance={"seed": seed})


@pytest.fixture
def small_dataset(tmp_path):
    cases = [_case("c0", "dense"), _case("c1", "sparse", 1), _case("c2", "unlabelled", 2)]
    test = [CaseRecord("t0", [np.zeros((2, 6, 5), np.float32)], (4.0, 1.0, 1.0), np.zeros((2, 6, 5), np.uint8))]
    return write_raw_dataset(tmp_path, "Dataset501_Small", {"0": "MRI"}, LABELS, cases, test)


def test_written_dataset_has_layout_and_manifest(small_dataset):
    ds = load_raw_dataset(small_dataset)
    assert ds.training_cases == ["c0", "c1", "c2"]
    assert ds.manifest.cases_with("unlabelled") == ["c2"]
    assert ds.manifest.labelled_cases() == ["c0", "c1"]
    assert ds.dense_label_path("c0") == small_dataset / "labelsTr" / "c0.nii.gz"
    assert ds.dense_label_path("c1") == small_dataset / "labelsTr_dense" / "c1.nii.gz"
    assert ds.manifest.cases["c1"].provenance == {"seed": 1}
    assert list(ds.test_cases()) == ["t0"]
    assert ds.class_labels == {"a": 1, "b": 2}
    assert not any(p.name.endswith(".partial") for p in small_dataset.parent.iterdir())


def test_manifest_round_trip(small_dataset):
    manifest = read_manifest(small_dataset)
    assert manifest_from_json(manifest.to_json()) == manifest


def test_existing_dataset_is_not_overwritten(small_dataset):
    with pytest.raises(UserInputError, match="already exists"):
        write_raw_dataset(small_dataset.parent, small_dataset.name, {"0": "MRI"}, LABELS, [_case("x")])


def test_failed_write_leaves_nothing(tmp_path):
    bad = _case("c1")
    bad.label[0, 0, 0] = 7
    with pytest.raises(UserInputError, match=r"value\(s\) \[7\]"):
        write_raw_dataset(tmp_path, "Dataset502_Bad", {"0": "MRI"}, LABELS, [_case("c0"), bad])
    assert list(tmp_path.iterdir()) == []


def test_duplicate_case_ids_are_refused(tmp_path):
    with pytest.raises(UserInputError, match="occurs twice"):
        write_raw_dataset(tmp_path, "Dataset503_Dup", {"0": "MRI"}, LABELS, [_case("c0"), _case("c0")])


def test_shape_mismatch_is_refused(tmp_path):
    bad = _case("c0")
    bad.label = bad.label[:, :4]
    with pytest.raises(UserInputError, match="shape"):
        write_raw_dataset(tmp_path, "Dataset504_Shape", {"0": "MRI"}, LABELS, [bad])


def test_missing_dataset_json(small_dataset):
    (small_dataset / "dataset.json").unlink()
    with pytest.raises(UserInputError, match="no dataset.json"):
        load_raw_dataset(small_dataset)


def test_ignore_label_must_be_highest(small_dataset):
    _edit_json(small_dataset / "dataset.json", lambda d: d["labels"].update(ignore=5))
    with pytest.raises(UserInputError, match="highest label"):
        load_raw_dataset(small_dataset)


def _edit_json(path, edit):
    content = json.loads(path.read_text(encoding="utf-8"))
    edit(content)
    path.write_text(json.dumps(content))


def test_manifest_missing_a_case(small_dataset):
    _edit_json(small_dataset / MANIFEST_FILENAME, lambda m: m["cases"].pop("c1"))
    with pytest.raises(UserInputError, match="does not list 1 training case"):
        load_raw_dataset(small_dataset)


def test_manifest_naming_a_missing_case(small_dataset):
    _edit_json(small_dataset / MANIFEST_FILENAME,
               lambda m: m["cases"].update(ghost={"supervision": "dense", "dense_label": None}))
    with pytest.raises(UserInputError, match="ghost"):
        load_raw_dataset(small_dataset)


def test_manifest_dense_label_missing_on_disk(small_dataset):
    shutil.rmtree(small_dataset / "labelsTr_dense")
    with pytest.raises(UserInputError, match="does not exist"):
        load_raw_dataset(small_dataset)


def test_manifest_unknown_supervision(small_dataset):
    _edit_json(small_dataset / MANIFEST_FILENAME, lambda m: m["cases"]["c0"].update(supervision="scribbled"))
    with pytest.raises(UserInputError, match="unknown supervision 'scribbled'"):
        load_raw_dataset(small_dataset)


def test_sparse_cases_need_an_ignore_label(small_dataset):
    _edit_json(small_dataset / "dataset.json", lambda d: d["labels"].pop("ignore"))
    with pytest.raises(UserInputError, match="no \"ignore\" label"):
        load_raw_dataset(small_dataset)


def test_label_without_image(small_dataset):
    (small_dataset / "imagesTr" / "c1_0000.nii.gz").unlink()
    with pytest.raises(UserInputError, match="no image"):
        load_raw_dataset(small_dataset)


def test_budgets():
    assert parse_budget("demo") == NAMED_BUDGETS["demo"]
    custom = parse_budget("40x50")
    assert (custom.num_epochs, custom.iterations_per_epoch, custom.total_iterations) == (40, 50, 2000)
    for bad in ("fast", "0x10", "10x", "x5"):
        with pytest.raises(UserInputError, match="Unknown budget"):
            parse_budget(bad)


def test_manifest_weak_label_file_only_for_dense_cases_and_on_disk(small_dataset):
    base = {"format": "nnunet-weak supervision manifest", "version": 1}
    sparse_with_file = {"c": {"supervision": "sparse", "dense_label": None, "weak_label_file": "labelsTr_weak/c.nii.gz"}}
    with pytest.raises(UserInputError, match="only a dense case names"):
        manifest_from_json({**base, "cases": sparse_with_file})
    path = small_dataset / MANIFEST_FILENAME
    content = json.loads(path.read_text(encoding="utf-8"))
    case = next(c for c, e in content["cases"].items() if e["supervision"] == "dense")
    content["cases"][case]["weak_label_file"] = f"labelsTr_weak/{case}.nii.gz"
    path.write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(UserInputError, match="weak label .* does not exist"):
        load_raw_dataset(small_dataset)
