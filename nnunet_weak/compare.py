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
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from nnunet_weak.atomic import staged_directory, write_text_atomic
from nnunet_weak.budget import BUDGET_ENV, Budget, parse_budget
from nnunet_weak.environment import (check_trainer_exists, environment_with_trainers, nnunet_command,
                                     required_folder)
from nnunet_weak.errors import StepFailed, UserInputError
from nnunet_weak.evaluation import score_cases
from nnunet_weak.raw_dataset import RawDataset, load_raw_dataset
from nnunet_weak.training.weak_trainer import RUN_RECORD

BASE_TRAINER = "nnUNetWeakTrainer"


@dataclass(frozen=True)
class Run:
    """One row of the comparison: a trainer trained on one dataset."""

    method: str
    trainer: str
    dataset: RawDataset

    @property
    def key(self) -> str:
        return f"{self.dataset.name}__{self.trainer}"


def method_name(trainer: str, dataset: RawDataset, dense: bool) -> str:
    """The row name: what the base trainer is on this dataset, the trainer's name otherwise."""
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
    """The two datasets must share plans (up to the dataset name) and splits."""
    preprocessed = required_folder("nnUNet_preprocessed")
    fix = (f"Plan the dense dataset, then give the sparse one its plans: `nnunet-weak plan_and_preprocess "
           f"-d {sparse.name} --plans_from {dense.name}`.")
    loaded = []
    for dataset in (dense, sparse):
        plans_file = preprocessed / dataset.name / f"{plans}.json"
        if not plans_file.is_file():
            raise UserInputError(f"{plans_file} does not exist. {fix}")
        content = json.loads(plans_file.read_text())
        content.pop("dataset_name", None)
        splits_file = preprocessed / dataset.name / "splits_final.json"
        if not splits_file.is_file():
            raise UserInputError(f"{splits_file} does not exist. {fix}")
        loaded.append((content, json.loads(splits_file.read_text())))
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


class Comparison:
    """Everything one ``compare`` call needs; ``run()`` does the work and returns the table rows."""

    def __init__(self, dense: int | str | None, sparse: int | str, trainers: Sequence[str], budget: str,
                 configuration: str = "2d", folds: Sequence[str] = ("0",), plans: str = "nnUNetPlans",
                 device: str | None = None, disable_tta: bool = False, retrain: bool = False,
                 output: str | os.PathLike | None = None):
        self.budget: Budget = parse_budget(budget)
        for trainer in dict.fromkeys(trainers):
            check_trainer_exists(trainer)
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
        self.configuration, self.plans = configuration, plans
        self.folds = [str(f) for f in dict.fromkeys(folds)]
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.disable_tta, self.retrain = disable_tta, retrain
        self.output = Path(output) if output else (
            required_folder("nnUNet_results") / "nnunet_weak_compare" /
            f"{self.sparse.name}__{configuration}__fold{'-'.join(self.folds)}__{self.budget.name}")
        self.runs = ([Run(method_name(BASE_TRAINER, self.dense, True), BASE_TRAINER, self.dense)] if self.dense else [])
        self.runs += [Run(method_name(t, self.sparse, False), t, self.sparse) for t in dict.fromkeys(trainers)]
        self.env = environment_with_trainers()
        self.env[BUDGET_ENV] = self.budget.name

    def fold_folder(self, run: Run, fold: str) -> Path:
        return (required_folder("nnUNet_results") / run.dataset.name /
                f"{run.trainer}__{self.plans}__{self.configuration}" / f"fold_{fold}")

    def train(self, run: Run, fold: str) -> bool:
        """Train (or reuse, or continue) one fold of a run; return True if training happened."""
        folder = self.fold_folder(run, fold)
        record = folder / RUN_RECORD
        recorded = json.loads(record.read_text())["budget"]["name"] if record.is_file() else None
        finished = (folder / "checkpoint_final.pth").is_file()
        same_budget = recorded is not None and parse_budget(recorded) == self.budget
        if finished and not self.retrain:
            if same_budget:
                print(f"{run.method}: reusing the finished run in {folder}")
                return False
            raise UserInputError(
                f"{folder} holds a finished run with budget '{recorded}', not '{self.budget.name}'. "
                f"Pass --retrain to replace it, or ask for budget '{recorded}'."
            )
        command = [nnunet_command("nnUNetv2_train"), run.dataset.name, self.configuration, fold,
                   "-tr", run.trainer, "-p", self.plans, "-device", self.device]
        resumable = (folder / "checkpoint_latest.pth").is_file() and same_budget and not self.retrain
        if resumable:
            command.append("--c")
        elif folder.exists():
            shutil.rmtree(folder)
        run_logged(command, self.env, self.output / "logs" / f"{run.key}__fold{fold}__train.log",
                   f"{run.method}: training fold {fold} ({self.budget.describe()})", self.budget.num_epochs)
        return True

    def predict(self, run: Run, retrained: bool) -> Path:
        """Predict the test images with the stock predictor (reused unless the model changed)."""
        target = self.output / "predictions" / run.key
        if target.is_dir() and not retrained:
            return target
        images = self.sparse.folder / "imagesTs"
        with staged_directory(target, overwrite=True) as stage:
            command = [nnunet_command("nnUNetv2_predict"), "-i", str(images), "-o", str(stage), "-d", run.dataset.name,
                       "-c", self.configuration, "-f", *self.folds, "-tr", run.trainer, "-p", self.plans,
                       "-chk", "checkpoint_final.pth", "-device", self.device, "-npp", "1", "-nps", "1"]
            if self.disable_tta:
                command.append("--disable_tta")
            run_logged(command, self.env, self.output / "logs" / f"{run.key}__predict.log",
                       f"{run.method}: predicting {len(self.test_cases)} test cases")
        return target

    def score(self, run: Run, predictions: Path) -> dict:
        ending = self.sparse.file_ending
        pairs = {case: (predictions / f"{case}{ending}", label) for case, (_, label) in self.test_cases.items()}
        return score_cases(pairs, self.sparse.class_labels, self.output / "scores" / f"{run.key}.json",
                           ignore_label=self.sparse.ignore_label,
                           description=f"{run.method}: scoring on dense labels",
                           extra={"method": run.method, "trainer": run.trainer, "dataset": run.dataset.name,
                                  "budget": self.budget.to_json(), "configuration": self.configuration,
                                  "folds": self.folds})

    def run(self) -> list[dict]:
        rows = []
        for run in self.runs:
            started = time.time()
            retrained = any([self.train(run, fold) for fold in self.folds])
            summary = self.score(run, self.predict(run, retrained))
            row = {"method": run.method, "trainer": run.trainer, "dataset": run.dataset.name}
            row.update({f"Dice {name}": v["Dice"] for name, v in summary["mean"].items()})
            row["Dice mean"] = summary["foreground_mean"]["Dice"]
            row["HD95 mean (mm)"] = summary["foreground_mean"]["HD95"]
            # a class flooding the background far from the anatomy shows here before it shows in Dice
            row["background as one class, worst (%)"] = 100 * max(v["BackgroundShare"] for v in summary["mean"].values())
            rows.append(row)
            print(f"{run.method}: mean Dice {row['Dice mean']:.4f} ({time.time() - started:.0f} s)")
        self.write_outputs(rows)
        return rows

    # ---- outputs -------------------------------------------------------------------------------

    def caption(self) -> str:
        return (f"{len(self.test_cases)} held-out test cases of {self.sparse.name}, scored on dense labels; "
                f"configuration {self.configuration}, fold(s) {', '.join(self.folds)} (ensembled when several), "
                f"plans {self.plans}, budget "
                f"{self.budget.describe()}, device {self.device}.")

    def write_outputs(self, rows: list[dict]) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        markdown = format_markdown(rows, self.caption())
        write_text_atomic(markdown, self.output / "comparison.md")
        write_text_atomic(format_csv(rows), self.output / "comparison.csv")
        plot_dice_chart(rows, self.sparse.class_labels, self.output / "comparison_dice.png", self.caption())
        print("\n" + markdown)
        print(f"Wrote {self.output / 'comparison.md'}, comparison.csv and comparison_dice.png")


def _columns(rows: list[dict]) -> list[str]:
    return list(rows[0].keys())


def format_markdown(rows: list[dict], caption: str) -> str:
    columns = [c for c in _columns(rows) if c not in ("trainer",)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c])
                                       for c in columns) + " |")
    return "\n".join(lines) + f"\n\n{caption}\n"


def format_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_columns(rows))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot_dice_chart(rows: list[dict], class_labels: dict, path: Path, caption: str) -> None:
    """Grouped bar chart: per-class and mean Dice, one bar per method."""
    import numpy as np

    from nnunet_weak.plots import plt, save_figure_atomic
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
    ax.set_title("\n".join(textwrap.wrap(caption, 110)), fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path)


def compare_from_args(args) -> list[dict]:
    if args.dense is None and not args.no_dense:
        raise UserInputError("Give the dense twin with --dense (the upper bound), or pass --no_dense.")
    comparison = Comparison(None if args.no_dense else args.dense, args.sparse, args.trainers, args.budget,
                            args.configuration, args.folds, args.plans, args.device, args.disable_tta,
                            args.retrain, args.output)
    return comparison.run()
