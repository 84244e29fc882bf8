"""Which finished run compare and tune may reuse, where option sets go, and how a grid is read."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from nnunet_weak import compare
from nnunet_weak.compare import (DENSE_SUMMARY, Comparison, FoldTraining, Run, format_markdown, held_out_pairs,
                                 non_default_options, parse_trainer_chain, trainer_defaults)
from nnunet_weak.errors import UserInputError
from nnunet_weak.tune import Tuning, parse_grid

TRAINER = "ScribbleAttentionTrainer"


def finished_run(training, run, run_seed, **record):
    """A run trained to the end and validated (a run whose validation was interrupted is validated again)."""
    folder = training.fold_folder(run, "0", run_seed)
    (folder / "validation").mkdir(parents=True, exist_ok=True)
    (folder / "checkpoint_final.pth").write_bytes(b"")
    (folder / "validation" / DENSE_SUMMARY).write_text("{}", encoding="utf-8")
    (folder / "nnunet_weak_run.json").write_text(json.dumps(record), encoding="utf-8")
    return folder


def test_option_sets_get_their_own_results_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    training = FoldTraining("smoke", "2d", ["0"], "nnUNetPlans", "cpu", retrain=False, seeds=2)
    dataset = SimpleNamespace(name="Dataset001_X")
    defaults, tuned = Run("a", TRAINER, dataset), Run("b", TRAINER, dataset, "crf_rampup=0")
    assert training.results_root(defaults, None) == tmp_path
    assert training.results_root(defaults, 1) == tmp_path / "nnunet_weak_seeds" / "seed_1"
    assert training.results_root(tuned, 1) == tmp_path / "nnunet_weak_options" / "crf_rampup=0" / "nnunet_weak_seeds" / "seed_1"
    environment = training.environment(tuned, 1)
    assert environment["NNUNET_WEAK_TRAINER_OPTIONS"] == "crf_rampup=0" and environment["NNUNET_WEAK_SEED"] == "1"
    assert training.environment(defaults, 1)["NNUNET_WEAK_TRAINER_OPTIONS"] == ""


def test_a_finished_run_is_reused_only_with_its_options(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    training = FoldTraining("smoke", "2d", ["0"], "nnUNetPlans", "cpu", retrain=False, seeds=1)
    training.output = tmp_path / "out"
    dataset = SimpleNamespace(name="Dataset001_X")
    run = Run("b", TRAINER, dataset, "crf_rampup=0")
    options = {**trainer_defaults(TRAINER), "crf_rampup": 0.0}
    budget = {"name": "smoke"}
    finished_run(training, run, 0, budget=budget, seed=0, options=options)
    assert training.train(run, "0", 0) is False

    other = Run("b", TRAINER, dataset, "crf_rampup=0.25")
    finished_run(training, other, 0, budget=budget, seed=0, options=options)
    with pytest.raises(UserInputError, match="options"):
        training.train(other, "0", 0)


def test_test_predictions_are_reused_only_with_the_checkpoint_they_came_from(tmp_path, monkeypatch):
    """A run retrained outside this comparison (by tune, or at a changed default) is predicted again."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    comparison = Comparison.__new__(Comparison)
    FoldTraining.__init__(comparison, "smoke", "2d", ["0"], "nnUNetPlans", "cpu", retrain=False, seeds=1)
    comparison.output, comparison.disable_tta = tmp_path / "out", True
    comparison.sparse = SimpleNamespace(folder=tmp_path / "raw", name="Dataset001_X")
    comparison.test_cases = {"case_0": (None, None)}
    predicted_with = []

    def nnunet_predict(command, *args, **kwargs):
        checkpoint = training_folder / "checkpoint_final.pth"
        (Path(command[command.index("-o") + 1]) / "case_0.nii.gz").write_bytes(checkpoint.read_bytes())
        predicted_with.append(checkpoint.read_bytes())

    monkeypatch.setattr(compare, "run_logged", nnunet_predict)
    run = Run("m", TRAINER, SimpleNamespace(name="Dataset001_X"))
    training_folder = finished_run(comparison, run, 0)
    (training_folder / "checkpoint_final.pth").write_bytes(b"first model")
    target = comparison.predict(run, retrained=False, seed=0)
    assert comparison.predict(run, retrained=False, seed=0) == target and predicted_with == [b"first model"]
    (training_folder / "checkpoint_final.pth").write_bytes(b"retrained elsewhere")
    assert comparison.predict(run, retrained=False, seed=0) == target
    assert predicted_with == [b"first model", b"retrained elsewhere"]
    assert (target / "case_0.nii.gz").read_bytes() == b"retrained elsewhere"
    comparison.predict(run, retrained=True, seed=0)
    assert len(predicted_with) == 3


def test_non_default_options_are_canonical():
    defaults = {"a": 0.1, "b": 0.5}
    assert non_default_options({"a": 0.1, "b": 0.5}, defaults) == ""
    assert non_default_options({"b": 0.25, "a": 0.2}, defaults) == "a=0.2,b=0.25"
    assert non_default_options({"a": 1 / 3, "b": 0.5}, defaults) == f"a={1 / 3!r}"


def test_grid_always_holds_the_default_and_refuses_typos():
    default = trainer_defaults(TRAINER)["crf_rampup"]
    assert parse_grid(["crf_rampup=0,0.25"], TRAINER) == {"crf_rampup": sorted({0.0, 0.25, default})}
    with pytest.raises(UserInputError, match="not an option of ScribbleAttentionTrainer"):
        parse_grid(["crf_ramp=0"], TRAINER)
    with pytest.raises(UserInputError, match="name=value"):
        parse_grid(["crf_rampup"], TRAINER)
    with pytest.raises(UserInputError, match="twice"):
        parse_grid(["crf_rampup=0", "crf_rampup=0.25"], TRAINER)
    with pytest.raises(UserInputError, match="must be a number"):
        parse_grid(["crf_rampup=zero"], TRAINER)


def test_trainer_chains_are_read_and_refused_clearly():
    assert parse_trainer_chain("KAFTrainer") == ("", "KAFTrainer")
    assert parse_trainer_chain("KAFPretrainTrainer:KAFTrainer") == ("KAFPretrainTrainer", "KAFTrainer")
    for bad in ("A:B:C", ":KAFTrainer", "KAFPretrainTrainer:"):
        with pytest.raises(UserInputError, match="PRETRAINER:TRAINER"):
            parse_trainer_chain(bad)


def test_a_pretrained_run_starts_from_its_pretraining_and_follows_it(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    training = FoldTraining("smoke", "2d", ["0"], "nnUNetPlans", "cpu", retrain=False, seeds=1)
    training.output = tmp_path / "out"
    commands = []
    monkeypatch.setattr(compare, "run_logged", lambda command, *args, **kwargs: commands.append(command))
    dataset = SimpleNamespace(name="Dataset001_X")
    run = Run("kaf", "KAFTrainer", dataset, "", "KAFPretrainTrainer")
    scratch = Run("scratch", "KAFTrainer", dataset)
    assert training.fold_folder(run, "0", 0) != training.fold_folder(scratch, "0", 0)
    budget = {"name": "smoke"}
    pretraining = finished_run(training, run.pretraining_run(), 0, budget=budget, seed=0,
                               options=trainer_defaults("KAFPretrainTrainer"))
    checkpoint = str((pretraining / "checkpoint_final.pth").resolve())
    # the pre-training is reused, the fine-tuning starts from its checkpoint
    assert training.train(run, "0", 0) is True
    assert len(commands) == 1 and commands[0][commands[0].index("-tr") + 1] == "KAFTrainer"
    assert commands[0][-2:] == ["-pretrained_weights", checkpoint]
    # finished from that checkpoint: reused
    options = trainer_defaults("KAFTrainer")
    finished_run(training, run, 0, budget=budget, seed=0, options=options, pretrained_weights={"file": checkpoint})
    assert training.train(run, "0", 0) is False and len(commands) == 1
    # finished from another pre-training: trained again from this one
    finished_run(training, run, 0, budget=budget, seed=0, options=options, pretrained_weights={"file": "/elsewhere"})
    assert training.train(run, "0", 0) is True and commands[-1][-2:] == ["-pretrained_weights", checkpoint]


def test_fold_all_is_not_called_held_out(tmp_path, monkeypatch):
    """nnU-Net's fold 'all' validates on the cases it trained on: tune refuses it, compare's table says so."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    assert FoldTraining("smoke", "2d", ["0"], "nnUNetPlans", "cpu", retrain=False, seeds=1).validation_is_held_out
    assert not FoldTraining("smoke", "2d", ["all"], "nnUNetPlans", "cpu", retrain=False, seeds=1).validation_is_held_out
    with pytest.raises(UserInputError, match="nothing held out"):
        Tuning(1, TRAINER, ["crf_rampup=0"], "smoke", folds=["all"])
    rows = [{"method": "m", "dataset": "D", "seeds": 1, "Dice mean": 0.5, "validation Dice mean": 0.6}]
    assert "nothing held out" in format_markdown(rows, [], "caption", validation_is_held_out=False)
    assert "choices are made on these" in format_markdown(rows, [], "caption")
    paired = [{"split": "validation", "score": "Dice mean"}, {"split": "test", "score": "Dice mean"}]
    assert held_out_pairs(paired, validation_is_held_out=False) == paired[1:]
    assert held_out_pairs(paired, validation_is_held_out=True) == paired
