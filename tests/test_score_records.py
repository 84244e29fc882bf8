"""Score records: a run's scores kept apart from its files, used only for the same run and the same splits."""
import json
from types import SimpleNamespace

import pytest

from nnunet_weak.compare import DENSE_SUMMARY, Comparison, FoldTraining, Run, trainer_defaults
from nnunet_weak.errors import UserInputError
from nnunet_weak.score_records import ScoreRecords, record_name, recorded_test_summary
from nnunet_weak.tune import Tuning

TRAINER = "ScribbleAttentionTrainer"
DATASET = "Dataset001_X"
NAN = float("nan")


def scores(dice):
    return {"RV": {"Dice": dice, "HD95": 3.0}, "MYO": {"Dice": NAN, "HD95": NAN}}


@pytest.fixture
def folders(tmp_path, monkeypatch):
    for name in ("nnUNet_results", "nnUNet_preprocessed"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    splits = [{"train": ["c", "d"], "val": ["a", "b"]}, {"train": ["a", "b"], "val": ["c", "d"]}]
    (tmp_path / "nnUNet_preprocessed" / DATASET).mkdir()
    (tmp_path / "nnUNet_preprocessed" / DATASET / "splits_final.json").write_text(json.dumps(splits), encoding="utf-8")
    return tmp_path


def training(folders, retrain=False):
    fold_training = FoldTraining("smoke", "2d", ["0"], "nnUNetPlans", "cpu", retrain=retrain, seeds=2,
                                 records=folders / "records")
    fold_training.output = folders / "out"
    return fold_training


def same(a, b):
    """Equal as JSON (a NaN score is not equal to itself)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def finish_here(fold_training, run, seed, validation):
    """A run trained and validated on this machine."""
    folder = fold_training.fold_folder(run, "0", seed)
    (folder / "validation").mkdir(parents=True)
    (folder / "checkpoint_final.pth").write_bytes(b"")
    summary = {"metric_per_case": [{"case": case, "metrics": metrics} for case, metrics in validation.items()]}
    (folder / "validation" / DENSE_SUMMARY).write_text(json.dumps(summary), encoding="utf-8")


def test_a_record_is_read_back_only_for_its_own_run(folders):
    run = Run("sa", TRAINER, SimpleNamespace(name=DATASET))
    fold_training = training(folders)
    validation = {"a": scores(0.8), "b": scores(0.6)}
    finish_here(fold_training, run, 1, validation)
    test = {"mirroring": False, "summary": {"metric_per_case": [{"case": "t1", "metrics": scores(0.7)}]}}
    scored_here = {"case": "t1", "prediction": "/here/t1.nii.gz", "reference": "/here/labelsTs/t1.nii.gz",
                   "metrics": scores(0.7)}
    fold_training.write_record(run, 1, fold_training.fold_validation_scores(run, 1),
                               {"mirroring": False, "summary": {"metric_per_case": [scored_here]}})
    name = record_name(run.key, "nnUNetPlans", "2d", ["0"], "smoke", 1)
    record = json.loads((folders / "records" / name).read_text(encoding="utf-8"))
    assert record["identity"]["options"] == trainer_defaults(TRAINER) and record["identity"]["seed"] == 1
    assert same(record["validation"], {"0": validation}) and same(record["test"], test)

    # this machine holds the finished run: its own files are read, not the record
    assert fold_training.recorded(run, 1) is None
    # another machine (no run folders): the record stands for the run, with its test scores if they match
    elsewhere = training(folders)
    (folders / "nnUNet_results").rename(folders / "moved")
    (folders / "nnUNet_results").mkdir()
    recorded = elsewhere.recorded(run, 1)
    assert same(recorded["validation"], record["validation"])
    # its test scores stand only for the same test cases, predicted with the same mirroring
    assert same(recorded_test_summary(recorded, False, ["t1"]), test["summary"])
    assert recorded_test_summary(recorded, True, ["t1"]) is None
    assert recorded_test_summary(recorded, False, ["t1", "t2"]) is None
    assert recorded_test_summary({**recorded, "test": None}, False, ["t1"]) is None
    assert sorted(elsewhere.pooled(record["validation"])) == ["a", "b"]
    # another seed, other options, --retrain: no record stands for them
    assert elsewhere.recorded(run, 0) is None
    assert training(folders, retrain=True).recorded(run, 1) is None


def test_a_record_of_other_options_is_not_used_and_another_split_is_an_error(folders, capsys):
    dataset = SimpleNamespace(name=DATASET)
    run = Run("sa", TRAINER, dataset)
    records = ScoreRecords(folders / "records")
    fold_training = training(folders)
    name = fold_training.record_name(run, 0)
    identity = fold_training.identity(run, 0)
    records.write(name, {**identity, "options": {**identity["options"], "crf_rampup": 0.0}},
                  {"0": {"a": scores(0.8), "b": scores(0.6)}}, None)
    assert fold_training.recorded(run, 0) is None
    assert "differs in: options" in capsys.readouterr().out

    records.write(name, identity, {"0": {"a": scores(0.8), "z": scores(0.6)}}, None)
    with pytest.raises(UserInputError, match="splits changed"):
        fold_training.recorded(run, 0)
    (folders / "records" / name).write_text("{", encoding="utf-8")
    with pytest.raises(UserInputError, match="not valid JSON"):
        fold_training.recorded(run, 0)
    with pytest.raises(UserInputError, match="is a file"):
        ScoreRecords(folders / "records" / name)


def test_validation_only_rewrite_keeps_test_scores_of_the_same_model_only(folders):
    records = ScoreRecords(folders / "records")
    # a dataset without splits_final.json here: its cases are not checked
    identity = {"dataset": "Dataset002_Y", "seed": 0}
    test = {"mirroring": True, "summary": {"metric_per_case": []}}
    validation = {"0": {"a": scores(0.8)}}
    records.write("r.json", identity, validation, test)
    # tune scores the same model again (NaN scores included): compare's test scores stay
    records.write("r.json", identity, json.loads(json.dumps(validation)), None)
    assert records.read("r.json", identity)["test"] == test
    # a retrained model: the old test scores are not its own
    records.write("r.json", identity, {"0": {"a": scores(0.5)}}, None)
    assert records.read("r.json", identity)["test"] is None


def raw_dataset(folders, name: str):
    """A raw dataset of one test case (no training case: what it trains on is in the score records)."""
    raw = folders / "raw" / name
    for sub in ("imagesTs", "labelsTs"):
        (raw / sub).mkdir(parents=True)
    (raw / "imagesTs" / "t1_0000.nii.gz").write_bytes(b"")
    (raw / "labelsTs" / "t1.nii.gz").write_bytes(b"")
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "RV": 1},
                                                  "file_ending": ".nii.gz", "numTraining": 0}), encoding="utf-8")
    return raw


def test_a_stopped_call_has_scored_what_needed_no_training(folders, monkeypatch):
    """compare and tune score (and record) every seed that this machine holds finished or a record holds before
    they train anything, whatever the order of rows and seeds: a call stopped during a long training has lost
    nothing that the machine held (a session's machine is not the next one's)."""
    raw = raw_dataset(folders, DATASET)
    comparison = Comparison(None, raw, ["nnUNetWeakTrainer", TRAINER], "smoke", seeds=2, disable_tta=True,
                            records=folders / "records", output=folders / "out")
    baseline, method = comparison.runs
    # the method's seed 1 finished on this machine; the baseline's seed 0 is recorded with its test scores
    finish_here(comparison, method, 1, {"a": scores(0.8), "b": scores(0.6)})
    test = {"mirroring": False, "summary": {"metric_per_case": [{"case": "t1", "metrics": scores(0.7)}]}}
    comparison.write_record(baseline, 0, {"0": {"a": scores(0.5), "b": scores(0.4)}}, test)
    # a record without test scores (what tune writes) or with mirrored ones does not spare compare a training
    comparison.write_record(method, 0, {"0": {"a": scores(0.5), "b": scores(0.4)}})
    assert [comparison.needs_training(run, seed) for run in (baseline, method) for seed in (0, 1)] == \
        [False, True, True, False]
    comparison.disable_tta = False
    assert comparison.needs_training(baseline, 0) and not comparison.needs_training(method, 1)
    comparison.disable_tta, comparison.retrain = True, True
    assert all(comparison.needs_training(run, seed) for run in (baseline, method) for seed in (0, 1))
    comparison.retrain = False

    def stop_at_first_training(scored, training):
        def score_seed(run, seed):
            if training.needs_training(run, seed):
                raise KeyboardInterrupt
            scored.append((run.key, seed))
            return {}, {}
        return score_seed

    scored = []
    monkeypatch.setattr(comparison, "score_seed", stop_at_first_training(scored, comparison))
    with pytest.raises(KeyboardInterrupt):
        comparison.run()
    assert scored == [(baseline.key, 0), (method.key, 1)]

    # tune: its defaults are the method above (seed 0 recorded, seed 1 finished here), crf_rampup=0's seed 0 is
    # recorded; validation is all tune reads from a record, so a record without test scores serves it
    tuning = Tuning(raw, TRAINER, ["crf_rampup=0"], "smoke", seeds=2, records=folders / "records",
                    output=folders / "tune")
    tuned = next(run for run in tuning.runs if run.options == "crf_rampup=0")
    defaults = next(run for run in tuning.runs if run is not tuned)
    tuning.write_record(tuned, 0, {"0": {"a": scores(0.5), "b": scores(0.4)}})
    order = [(tuning.runs[index].key, seed) for index, seed in tuning.scoring_order()]
    assert sorted(order[:3]) == sorted([(defaults.key, 0), (defaults.key, 1), (tuned.key, 0)])
    assert order[3] == (tuned.key, 1)

    def train(run, fold, seed):
        if tuning.needs_training(run, seed):
            raise KeyboardInterrupt
        return False

    monkeypatch.setattr(tuning, "train", train)
    finished_record = folders / "records" / record_name(defaults.key, "nnUNetPlans", "2d", ["0"], "smoke", 1)
    assert not finished_record.exists()
    with pytest.raises(KeyboardInterrupt):
        tuning.run()
    assert finished_record.is_file()


def test_tune_over_two_datasets_weighs_each_dataset_the_same(folders, monkeypatch, capsys):
    """With several datasets, tune chooses by the mean over datasets of each combination's mean Dice, and tests
    each combination against the defaults within each dataset. Here the datasets disagree and the one with more
    cases would win a pooled mean: the defaults would be chosen over the pooled cases, crf_rampup=0 by the
    datasets' mean."""
    small, large = raw_dataset(folders, "Dataset001_X"), raw_dataset(folders, "Dataset002_Y")
    tuning = Tuning([small, large], TRAINER, ["crf_rampup=0"], "smoke", seeds=1, records=folders / "records",
                    output=folders / "tune")
    assert [(run.dataset.name, run.method) for run in tuning.runs] == [
        ("Dataset001_X", "crf_rampup=0"), ("Dataset001_X", "defaults"),
        ("Dataset002_Y", "crf_rampup=0"), ("Dataset002_Y", "defaults")]
    dice = {("Dataset001_X", "defaults"): 0.6, ("Dataset001_X", "crf_rampup=0"): 0.72,
            ("Dataset002_Y", "defaults"): 0.8, ("Dataset002_Y", "crf_rampup=0"): 0.7}
    cases = {"Dataset001_X": "ab", "Dataset002_Y": "abcd"}
    for run in tuning.runs:
        value = dice[run.dataset.name, run.method]
        metrics = {"RV": {"Dice": value, "HD95": 3.0, "BackgroundShare": 0.0}}
        tuning.write_record(run, 0, {"0": {case: metrics for case in cases[run.dataset.name]}})

    def train(run, fold, seed):
        raise AssertionError(f"{run.key} is recorded: nothing should train")

    monkeypatch.setattr(tuning, "train", train)
    rows, paired = tuning.run()
    # the same combination on two datasets: progress names the dataset
    assert "Dataset002_Y, defaults: seed 0 scored from its record" in capsys.readouterr().out
    assert {(r["dataset"], r["method"]): r["Dice mean"] for r in rows} == pytest.approx(dice)
    differences = {p["dataset"]: p["mean difference"] for p in paired if p["score"] == "Dice mean"}
    assert differences == pytest.approx({"Dataset001_X": 0.12, "Dataset002_Y": -0.1})
    assert {p["dataset"]: p["cases"] for p in paired if p["score"] == "Dice mean"} == {"Dataset001_X": 2,
                                                                                      "Dataset002_Y": 4}
    table = (folders / "tune" / "tuning.md").read_text(encoding="utf-8")
    assert "## Dataset001_X" in table and "## Dataset002_Y" in table
    assert "| crf_rampup=0 | 0.720 | 0.700 | 0.710 |" in table and "| defaults | 0.600 | 0.800 | 0.700 |" in table
    assert "Highest mean validation Dice averaged over 2 datasets (Dataset001_X 0.720, Dataset002_Y 0.700): " \
           "crf_rampup=0 (0.710)" in table
    assert "on 0 of 2 datasets" in table
    for name in ("Dataset001_X", "Dataset002_Y"):
        assert (folders / "tune" / f"tuning_dice_{name}.png").is_file()

    with pytest.raises(UserInputError, match="given twice"):
        Tuning([small, small], TRAINER, ["crf_rampup=0"], "smoke", records=folders / "records")
