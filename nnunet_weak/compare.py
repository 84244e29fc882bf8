"""``nnunet-weak compare``: trainers side by side, same plans, folds and budget, scored on dense labels.

For a dense dataset and its sparse twin (same images, same cases, same plans and splits; see
``nnunet-weak plan_and_preprocess --plans_from``), each run

1. trains each requested fold with the stock ``nnUNetv2_train`` (``NNUNET_WEAK_BUDGET`` set to the
   budget), reusing a finished run of the same budget and continuing an unfinished one with ``--c``;
2. predicts the held-out test cases (``imagesTs``) with the stock ``nnUNetv2_predict`` (the
   ensemble of the folds when there are several, as nnU-Net does);
3. scores them against the dense ``labelsTs`` (``nnunet_weak.evaluation``).

The runs are: ``nnUNetWeakTrainer`` on the dense dataset (upper bound, unless ``--no_dense``), then
each requested trainer on the sparse dataset (``nnUNetWeakTrainer`` there is the partial-loss
baseline). The result is a table (markdown and CSV) and a per-class Dice chart (PNG).

Validation and test are kept apart: every row reports the score of the folds' validation cases on
their dense labels (``validation/summary_dense.json``, pooled over the folds: cross-validated when
all five ran), on which choices are made, beside the test score, which is for the final report.
With ``--seeds N`` every run is trained N times (``NNUNET_WEAK_SEED`` 0 … N-1, each seed in its own
``$nnUNet_results/nnunet_weak_seeds/seed_K``), and rows give mean ± sd over the seeds. Options set in
``NNUNET_WEAK_TRAINER_OPTIONS`` that differ from a trainer's defaults name the row and put its runs in
``$nnUNet_results/nnunet_weak_options/<options>`` (``FoldTraining``), so that runs with other option values
are never mixed up. Every sparse
row is compared with the partial-loss baseline case by case (per-case scores averaged over seeds):
the mean difference, its bootstrap 95 % interval and the Wilcoxon signed-rank p-value
(``nnunet_weak.statistics``), on the validation cases and on the test cases. With ``--records DIR`` each
run's per-case scores are kept in ``DIR`` and a run not held here is scored from its record
(``nnunet_weak.score_records``).
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from nnunet_weak.atomic import staged_directory, write_text_atomic
from nnunet_weak.budget import BUDGET_ENV, Budget, parse_budget
from nnunet_weak.environment import environment_with_trainers, find_trainer_class, nnunet_command, required_folder
from nnunet_weak.errors import StepFailed, UserInputError
from nnunet_weak.evaluation import score_cases, summarise
from nnunet_weak.planners.plan_and_preprocess import TWIN_OWN_PLAN_KEYS
from nnunet_weak.raw_dataset import RawDataset, load_raw_dataset, read_volume
from nnunet_weak.score_records import ScoreRecords, record_name, recorded_test_summary
from nnunet_weak.statistics import paired_difference
from nnunet_weak.training.options import OPTIONS_ENV, parse_trainer_options
from nnunet_weak.training.weak_trainer import DENSE_SUMMARY, RUN_RECORD, SEED_ENV

BASE_TRAINER = "nnUNetWeakTrainer"
#: in a folder of test predictions: the checkpoints they were predicted with
PREDICTED_FROM = "nnunet_weak_predicted_from.json"


@dataclass(frozen=True)
class Run:
    """One row of a table: a trainer trained on one dataset with one set of options."""

    method: str
    trainer: str
    dataset: RawDataset
    # NNUNET_WEAK_TRAINER_OPTIONS text of the values that differ from the trainer's defaults ("": its defaults)
    options: str = ""
    # the trainer whose final checkpoint (same dataset, fold, seed; its default options) starts this run through
    # -pretrained_weights ("": none)
    pretraining: str = ""

    @property
    def key(self) -> str:
        key = f"{self.dataset.name}__{self.trainer}"
        key = f"{self.dataset.name}__{self.pretraining}+{self.trainer}" if self.pretraining else key
        return f"{key}__{self.options}" if self.options else key

    def pretraining_run(self) -> "Run":
        """The run that pre-trains this one."""
        return Run(f"{self.pretraining} (pre-training)", self.pretraining, self.dataset)


def parse_trainer_chain(text: str) -> tuple[str, str]:
    """``"PRETRAINER:TRAINER"`` (``TRAINER`` fine-tuned from ``PRETRAINER``'s checkpoint) or ``"TRAINER"`` →
    ``(pretraining, trainer)``, ``pretraining`` ``""`` for none."""
    parts = text.split(":")
    if len(parts) > 2 or not all(parts):
        raise UserInputError(f"'{text}' is not a trainer: give TRAINER, or PRETRAINER:TRAINER for TRAINER started "
                             f"from PRETRAINER's final checkpoint (e.g. KAFPretrainTrainer:KAFTrainer).")
    return ("", parts[0]) if len(parts) == 1 else (parts[0], parts[1])


@functools.lru_cache(maxsize=None)
def trainer_defaults(trainer: str) -> dict[str, float]:
    """A trainer's options with their defaults (its ``tunable_options``; none for nnU-Net's own trainers)."""
    return dict(getattr(find_trainer_class(trainer), "tunable_options", {}))


def _number(value: float) -> str:
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def non_default_options(options: dict[str, float], defaults: dict[str, float]) -> str:
    """The ``NNUNET_WEAK_TRAINER_OPTIONS`` text of the values that differ from ``defaults``, names sorted."""
    return ",".join(f"{name}={_number(options[name])}" for name in sorted(options) if options[name] != defaults[name])


def options_from_environment(trainer: str) -> str:
    """The non-default options ``NNUNET_WEAK_TRAINER_OPTIONS`` gives ``trainer`` (a clear error for unknown ones)."""
    defaults = trainer_defaults(trainer)
    return non_default_options(parse_trainer_options(os.environ.get(OPTIONS_ENV, ""), defaults, trainer), defaults)


def method_name(trainer: str, dataset: RawDataset, dense: bool) -> str:
    """The row name: what the base trainer is on this dataset, the trainer's name otherwise."""
    if trainer == f"{BASE_TRAINER}_denseCasesOnly":
        return "nnU-Net, dense cases only"
    if trainer != BASE_TRAINER:
        return trainer
    if dense:
        return "nnU-Net dense (upper bound)"
    manifest = dataset.manifest
    if manifest is not None and not manifest.cases_with("sparse") and manifest.cases_with("unlabelled"):
        # the base trainer leaves unlabelled cases out of training
        return "nnU-Net, labelled cases only"
    return "nnU-Net + partial loss"


def check_same_plans_and_splits(dense: RawDataset, sparse: RawDataset, plans: str) -> None:
    """The two datasets must share plans (but for what each holds of its own: its name, its intensity statistics)
    and splits."""
    preprocessed = required_folder("nnUNet_preprocessed")
    fix = (f"Plan the dense dataset, then give the sparse one its plans: `nnunet-weak plan_and_preprocess "
           f"-d {sparse.name} --plans_from {dense.name}`.")
    loaded = []
    for dataset in (dense, sparse):
        plans_file = preprocessed / dataset.name / f"{plans}.json"
        if not plans_file.is_file():
            raise UserInputError(f"{plans_file} does not exist. {fix}")
        content = json.loads(plans_file.read_text(encoding="utf-8"))
        for key in TWIN_OWN_PLAN_KEYS:
            content.pop(key, None)
        splits_file = preprocessed / dataset.name / "splits_final.json"
        if not splits_file.is_file():
            raise UserInputError(f"{splits_file} does not exist. {fix}")
        loaded.append((content, json.loads(splits_file.read_text(encoding="utf-8"))))
    if loaded[0][0] != loaded[1][0]:
        raise UserInputError(f"{dense.name} and {sparse.name} have different plans '{plans}'. {fix}")
    if loaded[0][1] != loaded[1][1]:
        raise UserInputError(f"{dense.name} and {sparse.name} have different splits_final.json. {fix}")


def run_logged(command: Sequence[str], env: dict, log_file: Path, description: str,
               total_epochs: int | None = None) -> None:
    """Run a command, its output going to ``log_file``; show an epoch progress bar when training."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    epoch_line = re.compile(r"Epoch (\d+)\s*$")
    with open(log_file, "w", encoding="utf-8") as log, tqdm(total=total_epochs, desc=description, unit="epoch" if total_epochs else "it",
                                          bar_format=None if total_epochs else "{desc}: {elapsed}") as bar:
        log.write("$ " + " ".join(command) + "\n")
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   encoding="utf-8", errors="replace")
        for line in process.stdout:
            log.write(line)
            match = epoch_line.search(line)
            if total_epochs and match:
                bar.n = int(match.group(1))
                bar.refresh()
        code = process.wait()
        if total_epochs and code == 0:
            bar.n = total_epochs
            bar.refresh()
    if code != 0:
        tail = "".join(log_file.read_text(encoding="utf-8").splitlines(keepends=True)[-15:])
        raise StepFailed(f"`{Path(command[0]).name} {command[1]} ...` exited with status {code}. Last lines:\n{tail}\n"
                         f"Full log: {log_file}")


class FoldTraining:
    """Runs of the stock ``nnUNetv2_train``, one results folder per option set and seed, reused when finished.

    Where a run goes: ``$nnUNet_results`` itself for a trainer's default options without a seed;
    ``$nnUNet_results/nnunet_weak_options/<options>`` for other option values (``Run.options``); and
    ``.../nnunet_weak_seeds/seed_K`` under either for seed K (``NNUNET_WEAK_SEED``). A finished run is
    reused only when its ``nnunet_weak_run.json`` records the same budget, seed and options, and an
    unfinished one is continued (``--c``) only then; otherwise it is an error, or retrained with ``retrain``.
    """

    output: Path  # set by a subclass; training logs go under output/logs

    def __init__(self, budget: str, configuration: str, folds: Sequence[str], plans: str, device: str | None,
                 retrain: bool, seeds: int, records: str | os.PathLike | None = None):
        self.budget: Budget = parse_budget(budget)
        if seeds < 0:
            raise UserInputError(f"--seeds must be 0 (unseeded runs) or a positive number of seeds, got {seeds}.")
        # None: one run as nnU-Net trains it, unseeded
        self.seeds: list[int | None] = list(range(seeds)) if seeds else [None]
        self.configuration, self.plans = configuration, plans
        self.folds = [str(f) for f in dict.fromkeys(folds)]
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.retrain = retrain
        self.env = environment_with_trainers()
        self.env[BUDGET_ENV] = self.budget.name
        self.records = ScoreRecords(records) if records is not None else None

    @property
    def validation_is_held_out(self) -> bool:
        """False with fold ``all``: nnU-Net then validates on the cases it trained on."""
        return "all" not in self.folds

    @staticmethod
    def results_root(run: Run, seed: int | None) -> Path:
        """The ``nnUNet_results`` of one run and seed."""
        root = required_folder("nnUNet_results")
        if run.pretraining:
            # apart from the same trainer started from scratch
            root = root / "nnunet_weak_pretrained" / run.pretraining
        if run.options:
            root = root / "nnunet_weak_options" / run.options
        return root if seed is None else root / "nnunet_weak_seeds" / f"seed_{seed}"

    def environment(self, run: Run, seed: int | None) -> dict:
        """The environment of the nnU-Net commands of one run and seed."""
        env = {**self.env, "nnUNet_results": str(self.results_root(run, seed)), OPTIONS_ENV: run.options}
        if seed is not None:
            env[SEED_ENV] = str(seed)
        return env

    @staticmethod
    def seed_key(run: Run, seed: int | None) -> str:
        return run.key if seed is None else f"{run.key}__seed{seed}"

    def label(self, run: Run) -> str:
        """How progress messages name a run."""
        return run.method

    def fold_folder(self, run: Run, fold: str, seed: int | None = None) -> Path:
        return (self.results_root(run, seed) / run.dataset.name /
                f"{run.trainer}__{self.plans}__{self.configuration}" / f"fold_{fold}")

    def train(self, run: Run, fold: str, seed: int | None = None) -> bool:
        """Train (or reuse, or continue) one fold of a run, after its pre-training if it has one; return True if
        training happened."""
        pretrained = None
        if run.pretraining:
            pretraining = run.pretraining_run()
            pretrained_anew = self.train(pretraining, fold, seed)
            pretrained = (self.fold_folder(pretraining, fold, seed) / "checkpoint_final.pth").resolve()
        folder = self.fold_folder(run, fold, seed)
        record_file = folder / RUN_RECORD
        record = json.loads(record_file.read_text(encoding="utf-8")) if record_file.is_file() else None
        recorded = record["budget"]["name"] if record else None
        finished = (folder / "checkpoint_final.pth").is_file()
        same_budget = recorded is not None and parse_budget(recorded) == self.budget
        same_seed = seed is None or (record is not None and record.get("seed") == seed)
        options = parse_trainer_options(run.options, trainer_defaults(run.trainer), run.trainer)
        same_options = record is not None and record.get("options", {}) == options
        if pretrained is not None:
            # a new pre-training makes the run that started from the old one stale
            same_options = (same_options and not pretrained_anew
                            and (record.get("pretrained_weights") or {}).get("file") == str(pretrained))
        command = [nnunet_command("nnUNetv2_train"), run.dataset.name, self.configuration, fold,
                   "-tr", run.trainer, "-p", self.plans, "-device", self.device]
        seed_text = "" if seed is None else f", seed {seed}"
        log_file = self.output / "logs" / f"{self.seed_key(run, seed)}__fold{fold}__train.log"
        if finished and not self.retrain:
            if same_budget and same_seed and same_options:
                if not (folder / "validation" / DENSE_SUMMARY).is_file():
                    # trained to the end, then stopped during its validation: validate, do not retrain
                    run_logged(command + ["--val"], self.environment(run, seed), log_file,
                               f"{self.label(run)}: validating the finished run of fold {fold}{seed_text}")
                    return False
                print(f"{self.label(run)}: reusing the finished run in {folder}")
                return False
            if not same_budget:
                raise UserInputError(
                    f"{folder} holds a finished run with budget '{recorded}', not '{self.budget.name}'. "
                    f"Pass --retrain to replace it, or ask for budget '{recorded}'."
                )
            if not same_seed:
                raise UserInputError(f"{folder} holds a finished run with seed {record.get('seed')}, not {seed}. "
                                     f"Pass --retrain to replace it.")
            if pretrained is not None:
                print(f"{self.label(run)}: its pre-training changed, training it again")
            else:
                raise UserInputError(f"{folder} holds a finished run with options {record.get('options')}, not "
                                     f"{options}. Pass --retrain to replace it.")
        resumable = ((folder / "checkpoint_latest.pth").is_file() and same_budget and same_seed and same_options
                     and not self.retrain)
        if resumable:
            command.append("--c")  # the checkpoint holds the pre-trained start already
        else:
            if folder.exists():
                shutil.rmtree(folder)
            if pretrained is not None:
                command += ["-pretrained_weights", str(pretrained)]
        run_logged(command, self.environment(run, seed), log_file,
                   f"{self.label(run)}: training fold {fold}{seed_text} ({self.budget.describe()})",
                   self.budget.num_epochs)
        return True

    def fold_validation_scores(self, run: Run, seed: int | None) -> dict[str, dict[str, dict]]:
        """Per fold, per validation case, its scores on dense labels from the fold's ``summary_dense.json``."""
        per_fold = {}
        for fold in self.folds:
            summary_file = self.fold_folder(run, fold, seed) / "validation" / DENSE_SUMMARY
            if not summary_file.is_file():
                raise UserInputError(f"{summary_file} does not exist: the run did not finish its validation. Run "
                                     f"`nnUNetv2_train ... --val` for it, or retrain with --retrain.")
            per_fold[fold] = {c["case"]: c["metrics"]
                              for c in json.loads(summary_file.read_text(encoding="utf-8"))["metric_per_case"]}
        return per_fold

    @staticmethod
    def pooled(per_fold: dict[str, dict[str, dict]]) -> dict[str, dict]:
        """The validation cases of all folds in one ``{case: scores}``."""
        return {case: scores for cases in per_fold.values() for case, scores in cases.items()}

    # ---- score records (nnunet_weak.score_records) -------------------------------------------------

    def identity(self, run: Run, seed: int | None) -> dict:
        """What decides a run's scores, as its score record states it."""
        return {"dataset": run.dataset.name, "trainer": run.trainer, "pretraining": run.pretraining,
                "options": parse_trainer_options(run.options, trainer_defaults(run.trainer), run.trainer),
                "plans": self.plans, "configuration": self.configuration, "folds": self.folds,
                "budget": self.budget.to_json(), "seed": seed}

    def has_usable_record(self, run: Run, seed: int | None) -> bool:
        """True when ``recorded`` holds the seed's scores, so that it needs no training."""
        return self.recorded(run, seed) is not None

    def needs_training(self, run: Run, seed: int | None) -> bool:
        """False when the seed has a usable record or every fold (and its pre-training) finished here."""
        if self.has_usable_record(run, seed):
            return False
        trained = [run, run.pretraining_run()] if run.pretraining else [run]
        return self.retrain or not all((self.fold_folder(r, fold, seed) / "checkpoint_final.pth").is_file()
                                       for r in trained for fold in self.folds)

    def scoring_order(self) -> list[tuple[int, int | None]]:
        """Every (index in ``self.runs``, seed), those that need no training first: a call stopped during a long
        training has then scored and recorded all this machine held (a session's machine is not the next one's)."""
        pairs = [(index, seed) for index in range(len(self.runs)) for seed in self.seeds]
        return sorted(pairs, key=lambda pair: self.needs_training(self.runs[pair[0]], pair[1]))

    def record_name(self, run: Run, seed: int | None) -> str:
        return record_name(run.key, self.plans, self.configuration, self.folds, self.budget.name, seed)

    def recorded(self, run: Run, seed: int | None) -> dict | None:
        """The score record of a run that this machine does not hold finished (a finished run here is scored
        from its own files), ``None`` without one."""
        if self.records is None or self.retrain:
            return None
        if all((self.fold_folder(run, fold, seed) / "checkpoint_final.pth").is_file() for fold in self.folds):
            return None
        return self.records.read(self.record_name(run, seed), self.identity(run, seed))

    def validation_from_record(self, run: Run, seed: int | None, record: dict) -> dict[str, dict]:
        """A record's validation scores, pooled over the folds, saying where they come from."""
        print(f"{self.label(run)}: seed {seed} scored from its record {self.records.path(self.record_name(run, seed))}")
        return self.pooled(record["validation"])

    def write_record(self, run: Run, seed: int | None, per_fold: dict[str, dict[str, dict]],
                     test: dict | None = None) -> None:
        """Record a scored run (nothing without ``--records``): ``per_fold`` from ``fold_validation_scores``,
        ``test`` ``{"mirroring": ..., "summary": ...}``."""
        if self.records is not None:
            self.records.write(self.record_name(run, seed), self.identity(run, seed), per_fold, test)


class Comparison(FoldTraining):
    """Everything one ``compare`` call needs; ``run()`` does the work and returns the table rows."""

    def __init__(self, dense: int | str | None, sparse: int | str, trainers: Sequence[str], budget: str,
                 configuration: str = "2d", folds: Sequence[str] = ("0",), plans: str = "nnUNetPlans",
                 device: str | None = None, disable_tta: bool = False, retrain: bool = False,
                 output: str | os.PathLike | None = None, seeds: int = 0, baseline: str | None = None,
                 records: str | os.PathLike | None = None):
        super().__init__(budget, configuration, folds, plans, device, retrain, seeds, records)
        # unknown trainers and options are refused before anything is read
        dense_trainers = [BASE_TRAINER] if dense is not None else []
        chains = [parse_trainer_chain(t) for t in dict.fromkeys(trainers)]
        # without a baseline among the rows (and none asked for) the table has no paired differences
        self.baseline = parse_trainer_chain(baseline or BASE_TRAINER)
        if baseline is not None and self.baseline not in chains:
            raise UserInputError(f"The baseline '{baseline}' is not one of the trainers ({' '.join(trainers)}): every "
                                 f"row is paired against it, so add it to --trainers or choose one of them.")
        options = {t: options_from_environment(t) for t in dict.fromkeys(dense_trainers + [t for _, t in chains])}
        for pretraining in {p for p, _ in chains if p}:
            trainer_defaults(pretraining)
        self.sparse = load_raw_dataset(sparse)
        self.dense = load_raw_dataset(dense) if dense is not None else None
        if self.dense is not None:
            check_same_plans_and_splits(self.dense, self.sparse, plans)
        self.test_cases = self.sparse.test_cases()
        unlabelled = [c for c, (_, label) in self.test_cases.items() if label is None]
        if not self.test_cases:
            raise UserInputError(f"{self.sparse.folder} has no imagesTs: compare scores held-out test cases.")
        if unlabelled:
            raise UserInputError(f"Test case(s) {unlabelled[:3]} of {self.sparse.name} have no dense label in "
                                 f"labelsTs; every test case needs one to be scored.")
        self.disable_tta = disable_tta
        self.output = Path(output) if output else (
            required_folder("nnUNet_results") / "nnunet_weak_compare" /
            f"{self.sparse.name}__{configuration}__fold{'-'.join(self.folds)}__{self.budget.name}")
        self.runs = []
        for dataset, (pretraining, trainer) in ([(self.dense, ("", t)) for t in dense_trainers]
                                                + [(self.sparse, chain) for chain in chains]):
            method = method_name(trainer, dataset, dataset is self.dense)
            method = f"{method} pre-trained by {pretraining}" if pretraining else method
            name = f"{method} ({options[trainer]})" if options[trainer] else method
            self.runs.append(Run(name, trainer, dataset, options[trainer], pretraining))

    def checkpoints_used(self, run: Run, seed: int | None) -> dict[str, str]:
        """Per fold, the SHA-256 of the final checkpoint that ``nnUNetv2_predict`` loads."""
        digests = {}
        for fold in self.folds:
            digest = hashlib.sha256()
            with open(self.fold_folder(run, fold, seed) / "checkpoint_final.pth", "rb") as checkpoint:
                for block in iter(lambda: checkpoint.read(1 << 20), b""):
                    digest.update(block)
            digests[fold] = digest.hexdigest()
        return digests

    def predict(self, run: Run, retrained: bool, seed: int | None = None) -> Path:
        """Predict the test images with the stock predictor; predictions made with the same checkpoints are
        reused (a run retrained elsewhere, by ``tune`` or after a default changed, is predicted again)."""
        target = self.output / "predictions" / self.seed_key(run, seed)
        checkpoints = self.checkpoints_used(run, seed)
        marker = target / PREDICTED_FROM
        if not retrained and marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == checkpoints:
            return target
        images = self.sparse.folder / "imagesTs"
        with staged_directory(target, overwrite=True) as stage:
            command = [nnunet_command("nnUNetv2_predict"), "-i", str(images), "-o", str(stage), "-d", run.dataset.name,
                       "-c", self.configuration, "-f", *self.folds, "-tr", run.trainer, "-p", self.plans,
                       "-chk", "checkpoint_final.pth", "-device", self.device, "-npp", "1", "-nps", "1"]
            if self.disable_tta:
                command.append("--disable_tta")
            run_logged(command, self.environment(run, seed), self.output / "logs" / f"{self.seed_key(run, seed)}__predict.log",
                       f"{run.method}: predicting {len(self.test_cases)} test cases")
            (stage / PREDICTED_FROM).write_text(json.dumps(checkpoints), encoding="utf-8")
        return target

    def score(self, run: Run, predictions: Path, seed: int | None = None) -> dict:
        ending = self.sparse.file_ending
        pairs = {case: (predictions / f"{case}{ending}", label) for case, (_, label) in self.test_cases.items()}
        return score_cases(pairs, self.sparse.class_labels,
                           self.output / "scores" / f"{self.seed_key(run, seed)}.json",
                           ignore_label=self.sparse.ignore_label,
                           description=f"{run.method}: scoring on dense labels",
                           extra={"method": run.method, "trainer": run.trainer, "dataset": run.dataset.name,
                                  "budget": self.budget.to_json(), "configuration": self.configuration,
                                  "folds": self.folds, "seed": seed})

    def has_usable_record(self, run: Run, seed: int | None) -> bool:
        """True when ``recorded`` holds everything ``run()`` reports for the seed, so that it needs no training."""
        return recorded_test_summary(self.recorded(run, seed), not self.disable_tta, self.test_cases) is not None

    def score_seed(self, run: Run, seed: int | None) -> tuple[dict, dict]:
        """One seed of one row, from its record or trained (or reused) and scored; ``(validation, test)``."""
        record = self.recorded(run, seed)
        recorded_test = recorded_test_summary(record, not self.disable_tta, self.test_cases)
        if recorded_test is not None:
            return self.validation_from_record(run, seed, record), recorded_test
        retrained = any([self.train(run, fold, seed) for fold in self.folds])
        test = self.score(run, self.predict(run, retrained, seed), seed)
        per_fold = self.fold_validation_scores(run, seed)
        self.write_record(run, seed, per_fold, {"mirroring": not self.disable_tta, "summary": test})
        return self.pooled(per_fold), test

    def run(self) -> list[dict]:
        scored = {pair: self.score_seed(self.runs[pair[0]], pair[1]) for pair in self.scoring_order()}
        results = []
        for index, run in enumerate(self.runs):
            validation = {seed: scored[index, seed][0] for seed in self.seeds}
            test = {seed: scored[index, seed][1] for seed in self.seeds}
            results.append(RunScores(run, validation, test))
            row = results[-1].row(self.sparse.class_labels)
            print(f"{run.method}: mean Dice {row['Dice mean']:.4f} (test), {row['validation Dice mean']:.4f} "
                  f"(validation)")
        rows = [r.row(self.sparse.class_labels) for r in results]
        paired = paired_against_baseline(results, self.sparse.class_labels, self.sparse.name, self.baseline)
        self.write_outputs(rows, held_out_pairs(paired, self.validation_is_held_out))
        self.write_figures(results)
        return rows

    # ---- outputs -------------------------------------------------------------------------------

    def caption(self) -> str:
        seeds = ("one unseeded run each" if self.seeds == [None] else "seed 0 only" if self.seeds == [0] else
                 f"{len(self.seeds)} seeds each ({', '.join(map(str, self.seeds))}), mean ± sd over seeds")
        return (f"{len(self.test_cases)} held-out test cases of {self.sparse.name}, scored on dense labels; "
                f"configuration {self.configuration}, fold(s) {', '.join(self.folds)} (ensembled when several), "
                f"plans {self.plans}, budget "
                f"{self.budget.describe()}, device {self.device}; {seeds}.")

    def write_outputs(self, rows: list[dict], paired: list[dict]) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        markdown = format_markdown(rows, paired, self.caption(), self.validation_is_held_out)
        write_text_atomic(markdown, self.output / "comparison.md")
        write_text_atomic(format_csv(rows), self.output / "comparison.csv")
        if paired:
            write_text_atomic(format_csv(paired), self.output / "comparison_paired.csv")
        plot_dice_chart(rows, self.sparse.class_labels, self.output / "comparison_dice.png", self.caption())
        print("\n" + markdown)
        print(f"Wrote {self.output / 'comparison.md'}, comparison.csv and comparison_dice.png")

    def write_figures(self, results: list[RunScores]) -> None:
        """``comparison_cases.png``: the test cases where the baseline (the partial loss unless ``--baseline``) has its
        median and its lowest mean Dice, on the slice with the most dense foreground, every row's prediction
        (its first seed) over the image; ``comparison_paired.png``: per case, each sparse row's mean Dice minus
        the baseline's, on validation (unless fold all) and test cases."""
        from nnunet_weak.plots import (CaseOverlay, case_overlay_figure, own_style, paired_difference_figure,
                                       save_figure_atomic)
        labels = self.sparse.class_labels
        baseline = baseline_scores(results, self.sparse.name, self.baseline)
        reference = baseline or results[0]
        per_case = reference.per_case("test", labels)
        ranked = sorted(per_case, key=lambda case: (np.nan_to_num(per_case[case]["Dice mean"], nan=-1.0), case))
        cases = []
        for case, rank in {ranked[len(ranked) // 2]: "median", ranked[0]: "lowest"}.items():
            images, label = self.test_cases[case]
            image, truth = as_slices(read_volume(images[0])[0]), as_slices(read_volume(label)[0])
            index = int(np.argmax((truth > 0).reshape(len(truth), -1).sum(1)))
            predictions = {}
            for result in results:
                folder = self.predictions_to_show(result.run)
                if folder is not None:
                    predictions[result.run.method] = as_slices(
                        read_volume(folder / f"{case}{self.sparse.file_ending}")[0])[index]
            cases.append(CaseOverlay(f"{case} slice {index}: {reference.run.method}'s {rank} mean Dice "
                                     f"({per_case[case]['Dice mean']:.2f})", image[index], truth[index], predictions))
        unseen = [r.run.method for r in results if self.predictions_to_show(r.run) is None]
        if unseen:
            print(f"comparison_cases.png leaves out {', '.join(unseen)}: scored from records, no predictions here")
        figures = {"comparison_cases.png": lambda: case_overlay_figure(cases, labels)}
        others = [r for r in results if r is not baseline and r.run.dataset is self.sparse]
        if baseline is not None and others:
            differences = {}
            for split in paired_splits(self.validation_is_held_out):
                base = baseline.per_case(split, labels)
                differences[split] = {}
                for result in others:
                    scores = result.per_case(split, labels)
                    differences[split][result.run.method] = [scores[c]["Dice mean"] - base[c]["Dice mean"]
                                                             for c in sorted(set(scores) & set(base))]
            figures["comparison_paired.png"] = lambda: paired_difference_figure(differences, "mean Dice",
                                                                                baseline.run.method)
        with own_style():
            for name, draw in figures.items():
                save_figure_atomic(draw(), self.output / name)
        print(f"Wrote {', '.join(figures)}")

    def predictions_to_show(self, run: Run) -> Path | None:
        """The test predictions of a run's first seed that has them here (``None``: every seed came from a score
        record)."""
        folders = [self.output / "predictions" / self.seed_key(run, seed) for seed in self.seeds]
        return next((folder for folder in folders if folder.is_dir()), None)


def as_slices(volume: np.ndarray) -> np.ndarray:
    """A ``(z, y, x)`` volume as it is, a 2D ``(y, x)`` image as one slice."""
    return volume[None] if volume.ndim == 2 else volume


SCORE_COLUMNS = ("HD95 mean (mm)", "background as one class, worst (%)")


def paired_scores(class_labels: dict) -> list[str]:
    """The per-case scores compared between methods: Dice and HD95, per class and over the classes."""
    return ([f"Dice {n}" for n in class_labels] + ["Dice mean"] + [f"HD95 {n} (mm)" for n in class_labels]
            + ["HD95 mean (mm)"])


SD_SUFFIX = " sd"


def scores_row(summaries: Sequence[dict], class_labels: dict, prefix: str) -> dict:
    """Mean (and sd over seeds, with two or more) of the table's scores over per-seed summaries."""
    values = {f"Dice {name}": [s["mean"][name]["Dice"] for s in summaries] for name in class_labels}
    values["Dice mean"] = [s["foreground_mean"]["Dice"] for s in summaries]
    values["HD95 mean (mm)"] = [s["foreground_mean"]["HD95"] for s in summaries]
    # a class flooding the background far from the anatomy shows here before it shows in Dice
    values["background as one class, worst (%)"] = [
        100 * _nanmax([v["BackgroundShare"] for v in s["mean"].values()]) for s in summaries]
    row = {}
    for name, numbers in values.items():
        row[prefix + name] = float(np.mean(numbers))
        if len(numbers) > 1:
            row[prefix + name + SD_SUFFIX] = float(np.std(numbers, ddof=1))
    return row


@dataclass
class RunScores:
    """A run's scores per seed: validation per case (from the folds), test summaries."""

    run: Run
    validation: dict  # seed -> {case: {class: {metric: value}}}
    test: dict  # seed -> score_cases summary

    def row(self, class_labels: dict) -> dict:
        row = {"method": self.run.method, "trainer": self.run.trainer, "dataset": self.run.dataset.name}
        row.update(scores_row(list(self.test.values()), class_labels, ""))
        row.update(scores_row([summarise(v, class_labels) for v in self.validation.values()], class_labels,
                              "validation "))
        row["seeds"] = len(self.test)
        return row

    def per_case(self, split: str, class_labels: dict) -> dict[str, dict[str, float]]:
        """Per case: Dice and HD95 of each class and over the classes (``paired_scores``), averaged over seeds."""
        seeds = (self.validation if split == "validation" else
                 {s: {c["case"]: c["metrics"] for c in summary["metric_per_case"]} for s, summary in self.test.items()})
        cases = sorted(set.intersection(*(set(v) for v in seeds.values())))
        result = {}
        for case in cases:
            scores = {f"Dice {n}": [seeds[s][case][n]["Dice"] for s in seeds] for n in class_labels}
            scores["Dice mean"] = [_nanmean([seeds[s][case][n]["Dice"] for n in class_labels]) for s in seeds]
            scores["HD95 mean (mm)"] = [_nanmean([seeds[s][case][n]["HD95"] for n in class_labels]) for s in seeds]
            scores.update({f"HD95 {n} (mm)": [seeds[s][case][n]["HD95"] for s in seeds] for n in class_labels})
            result[case] = {k: _nanmean(v) for k, v in scores.items()}
        return result


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=float)
    return float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")


def _nanmax(values) -> float:
    values = np.asarray(values, dtype=float)
    return float(np.nanmax(values)) if np.any(~np.isnan(values)) else float("nan")


def paired_against(baseline: RunScores, others: Sequence[RunScores], class_labels: dict,
                   splits: Sequence[str] = ("validation", "test")) -> list[dict]:
    """Each of ``others`` minus ``baseline``, case by case (scores averaged over seeds), per split and score."""
    rows = []
    for split in splits:
        reference = baseline.per_case(split, class_labels)
        for result in others:
            scores = result.per_case(split, class_labels)
            cases = sorted(set(scores) & set(reference))
            for score in paired_scores(class_labels):
                difference = paired_difference([scores[c][score] for c in cases], [reference[c][score] for c in cases])
                rows.append({"split": split, "method": result.run.method, "baseline": baseline.run.method,
                             "score": score, "mean difference": difference.mean, "ci low": difference.ci_low,
                             "ci high": difference.ci_high, "Wilcoxon p": difference.p_value,
                             "cases": difference.cases})
    return rows


def baseline_scores(results: list[RunScores], sparse_dataset: str,
                    baseline: tuple[str, str] = ("", BASE_TRAINER)) -> RunScores | None:
    """The run of the ``(pretraining, trainer)`` chain ``baseline`` on the sparse dataset, ``None`` if there is none."""
    return next((r for r in results if (r.run.pretraining, r.run.trainer) == baseline
                 and r.run.dataset.name == sparse_dataset), None)


def paired_against_baseline(results: list[RunScores], class_labels: dict, sparse_dataset: str,
                            baseline: tuple[str, str] = ("", BASE_TRAINER)) -> list[dict]:
    """Each sparse run minus the baseline's (by default the partial loss: ``nnUNetWeakTrainer``) on the sparse
    dataset, on validation and test cases; nothing without that baseline."""
    baseline = baseline_scores(results, sparse_dataset, baseline)
    if baseline is None:
        return []
    others = [r for r in results if r is not baseline and r.run.dataset.name == sparse_dataset]
    return paired_against(baseline, others, class_labels)


def paired_splits(validation_is_held_out: bool) -> tuple[str, ...]:
    """The splits whose paired differences are evidence: not the validation split when it is the training cases
    (fold all)."""
    return ("validation", "test") if validation_is_held_out else ("test",)


def held_out_pairs(paired: list[dict], validation_is_held_out: bool) -> list[dict]:
    """The paired rows of :func:`paired_splits`."""
    return [row for row in paired if row["split"] in paired_splits(validation_is_held_out)]


def _cell(row: dict, column: str) -> str:
    value = row[column]
    if not isinstance(value, float):
        return str(value)
    sd = row.get(column + SD_SUFFIX)
    return f"{value:.3f}" if sd is None else f"{value:.3f} ± {sd:.3f}"


def markdown_table(rows: list[dict], columns: list[str], titles: list[str]) -> list[str]:
    lines = ["| " + " | ".join(titles) + " |", "|" + "|".join("---" for _ in titles) + "|"]
    lines += ["| " + " | ".join(_cell(row, c) for c in columns) + " |" for row in rows]
    return lines


def format_markdown(rows: list[dict], paired: list[dict], caption: str, validation_is_held_out: bool = True) -> str:
    scores = [c for c in rows[0] if c.startswith("Dice ") or c in SCORE_COLUMNS]
    scores = [c for c in scores if not c.endswith(SD_SUFFIX)]
    lines = ["Validation: dense labels of the folds' validation cases (choices are made on these)."
             if validation_is_held_out else
             "Validation of fold all: the training cases themselves, nothing held out (choose nothing on these).", ""]
    lines += markdown_table(rows, ["method", "dataset", "seeds"] + [f"validation {c}" for c in scores],
                    ["method", "dataset", "seeds"] + scores)
    lines += ["", "Test: held-out cases (for the final report only).", ""]
    lines += markdown_table(rows, ["method", "dataset", "seeds"] + scores, ["method", "dataset", "seeds"] + scores)
    lines += paired_lines(paired)
    return "\n".join(lines) + f"\n\n{caption}\n"


def paired_lines(paired: list[dict]) -> list[str]:
    """The markdown table of paired differences (none for no rows), headed by its baseline."""
    if not paired:
        return []
    lines = ["", f"Paired differences, method minus {paired[0]['baseline']}, per case (scores averaged over "
                 f"seeds): mean, bootstrap 95 % interval, Wilcoxon signed-rank p.", "",
             "| split | method | score | mean difference [95 % CI] | Wilcoxon p | cases |", "|---|---|---|---|---|---|"]
    for row in paired:
        lines.append(f"| {row['split']} | {row['method']} | {row['score']} | {row['mean difference']:+.3f} "
                     f"[{row['ci low']:+.3f}, {row['ci high']:+.3f}] | {row['Wilcoxon p']:.3g} | {row['cases']} |")
    return lines


def _columns(rows: list[dict]) -> list[str]:
    return list(rows[0].keys())


def format_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_columns(rows))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def dice_chart_figure(rows: list[dict], class_labels: dict, caption: str):
    """Grouped bar chart: per-class and mean Dice, one bar per method, the caption wrapped inside the figure."""
    from nnunet_weak.plots import plt
    groups = list(class_labels) + ["mean"]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * max(1, len(rows) / 2)), 4.5))
    x = np.arange(len(groups))
    for i, row in enumerate(rows):
        values = [row[f"Dice {g}"] for g in groups]
        bars = ax.bar(x + (i - (len(rows) - 1) / 2) * width, values, width, label=row["method"])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, groups)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Dice (dense labels)")
    ax.legend(loc="lower right", fontsize=8)
    # about 14 characters of 8-point text per inch of figure width
    ax.set_title("\n".join(textwrap.wrap(caption, int(12 * fig.get_figwidth()))), fontsize=8)
    fig.tight_layout()
    return fig


def plot_dice_chart(rows: list[dict], class_labels: dict, path: Path, caption: str) -> None:
    from nnunet_weak.plots import save_figure_atomic
    save_figure_atomic(dice_chart_figure(rows, class_labels, caption), path)


def compare_from_args(args) -> list[dict]:
    if args.dense is None and not args.no_dense:
        raise UserInputError("Give the dense twin with --dense (the upper bound), or pass --no_dense.")
    comparison = Comparison(None if args.no_dense else args.dense, args.sparse, args.trainers, args.budget,
                            args.configuration, args.folds, args.plans, args.device, args.disable_tta,
                            args.retrain, args.output, args.seeds, args.baseline, args.records)
    return comparison.run()
