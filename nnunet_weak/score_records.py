"""Score records: what a finished run scored, kept apart from its checkpoints and predictions.

A comparison over seeds and ablations is many CPU-hours of training; its evidence is small (per case,
a few scores). A record keeps that evidence, so that ``compare`` and ``tune`` can rebuild a table, and
add rows and seeds to it, on a machine that no longer holds the runs (a new checkout, a colleague's
machine, the next session of a long measurement). ``compare --records DIR`` and ``tune --records DIR``
read a run's record from ``DIR`` instead of training it again, and write one for every run they score.

One JSON file per run and seed, named by :func:`record_name`, holds

- ``identity``: everything that decides what was trained: dataset, trainer, pre-training, every option
  value (not only the non-default ones: a record made before a default changed is not the new default's
  run), plans, configuration, folds, budget and seed. A record is used only for the same identity.
- ``validation``: per fold, each validation case's scores on its dense labels (the fold's
  ``summary_dense.json``), checked against the fold's cases in ``splits_final.json`` when it is read;
- ``test``: the test cases' summary (``nnunet_weak.evaluation.score_cases``) and whether test-time
  mirroring was on, or ``None`` for a run only ``tune`` scored (it never predicts the test set).

A record says nothing of the code that trained the run beyond the package version it records: delete
it (or pass ``--retrain``) to train a run again after a change of the method.
"""
from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from nnunet_weak.atomic import write_json_atomic
from nnunet_weak.environment import required_folder
from nnunet_weak.errors import UserInputError

RECORD_FORMAT = 1


def package_version() -> str:
    try:
        return version("nnunet-weak")
    except PackageNotFoundError:
        return "unknown"


def record_name(run_key: str, plans: str, configuration: str, folds: list[str], budget: str, seed: int | None) -> str:
    """The file name of one run's record: its ``compare`` key, plans, configuration, folds, budget and seed."""
    seed_text = "unseeded" if seed is None else f"seed{seed}"
    return f"{run_key}__{plans}__{configuration}__fold{'-'.join(folds)}__{budget}__{seed_text}.json"


def fold_validation_cases(dataset: str, fold: str) -> set[str] | None:
    """The validation cases of ``fold`` in the dataset's ``splits_final.json`` (fold ``all``: every case of the
    splits), ``None`` when there is no splits file to check against."""
    splits_file = required_folder("nnUNet_preprocessed") / dataset / "splits_final.json"
    if not splits_file.is_file():
        return None
    splits = json.loads(splits_file.read_text(encoding="utf-8"))
    if fold == "all":
        return {case for split in splits for case in split["val"]}
    return set(splits[int(fold)]["val"]) if int(fold) < len(splits) else None


def recorded_test_summary(record: dict | None, mirroring: bool, test_cases) -> dict | None:
    """The record's test summary if it scored exactly ``test_cases`` with (``mirroring`` True) or without
    test-time mirroring; ``None`` otherwise (no record, a record of ``tune``, other test cases or mirroring)."""
    test = record["test"] if record is not None else None
    if test is None or test["mirroring"] != mirroring:
        return None
    return test["summary"] if {c["case"] for c in test["summary"]["metric_per_case"]} == set(test_cases) else None


class ScoreRecords:
    """A folder of score records: ``read`` one for an identity, ``write`` one after a run is scored."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise UserInputError(f"--records {self.folder} is a file: give a folder (it is created if missing).")

    def path(self, name: str) -> Path:
        return self.folder / name

    def read(self, name: str, identity: dict) -> dict | None:
        """The record ``name`` if it exists and was made with ``identity``; its validation cases are checked
        against the folds' splits (another split is an error, not a silently different table)."""
        path = self.path(name)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise UserInputError(f"Score record {path} is not valid JSON ({error}): delete it to train the run "
                                 f"again.") from error
        if record.get("format") != RECORD_FORMAT or record.get("identity") != identity:
            differences = sorted(k for k in identity if record.get("identity", {}).get(k) != identity[k])
            print(f"Score record {path} is not this run's (it differs in: {', '.join(differences) or 'format'}); "
                  f"not used")
            return None
        for fold, cases in record["validation"].items():
            expected = fold_validation_cases(identity["dataset"], fold)
            if expected is not None and set(cases) != expected:
                raise UserInputError(
                    f"Score record {path} holds validation cases of fold {fold} that are not that fold's in "
                    f"{identity['dataset']}'s splits_final.json: the splits changed since it was written. Move the "
                    f"record away to train the run on these splits.")
        return record

    def write(self, name: str, identity: dict, validation: dict[str, dict], test: dict | None) -> None:
        """Write (atomically) the record of a scored run. ``validation``: fold -> {case: scores}; ``test``:
        ``{"mirroring": bool, "summary": ...}`` or ``None``. A record of the same identity and validation scores
        (the same trained model) keeps the test scores it had when none are given."""
        path = self.path(name)
        if test is None and path.is_file():
            previous = json.loads(path.read_text(encoding="utf-8"))
            # as JSON text: a NaN score (an absent class) is not equal to itself
            same_model = (previous.get("identity") == identity
                          and json.dumps(previous.get("validation"), sort_keys=True) == json.dumps(validation, sort_keys=True))
            if same_model:
                test = previous.get("test")
        if test is not None:
            # per case its scores only: the prediction and label files are this machine's paths
            summary = {**test["summary"], "metric_per_case": [{"case": c["case"], "metrics": c["metrics"]}
                                                              for c in test["summary"]["metric_per_case"]]}
            test = {**test, "summary": summary}
        write_json_atomic({"format": RECORD_FORMAT, "nnunet_weak_version": package_version(), "identity": identity,
                           "validation": validation, "test": test}, path, indent=None)
