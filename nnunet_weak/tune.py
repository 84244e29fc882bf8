"""``nnunet-weak tune``: choose a trainer's option values on validation cases, never on the test set.

A default (a loss weight, a ramp length) is a choice, and a choice made on the test set inflates the
number reported on it. This command trains one trainer for every combination of the option values
given (``--grid lambda_crf=0.05,0.1,0.2 crf_rampup=0,0.5``), each with ``--seeds N`` seeds, with the
stock ``nnUNetv2_train`` (``compare``'s ``FoldTraining``: same results layout, finished runs reused), and
scores each combination on the dense labels of the folds' validation cases (``summary_dense.json``). It
never predicts, opens or scores ``imagesTs``/``labelsTs``.

The trainer's current default of every option on the grid is always part of the grid, so that the
default is measured beside its alternatives. Given several datasets (``-d 327 427``), every combination is
trained on each, and the choice is the combination with the highest mean over datasets of its mean
validation Dice (each dataset weighs the same, whatever its number of cases): a default meant for more
than one kind of data is chosen on more than one. The table gives each combination's validation scores
(mean ± sd over seeds); every combination is compared with the defaults case by case (scores averaged
over seeds: mean difference, bootstrap 95 % interval, Wilcoxon signed-rank p;
``nnunet_weak.statistics``), within each dataset. The combination with the highest mean validation Dice
is named, with whether its difference from the defaults is distinguishable from noise (p < 0.05) on
these cases, dataset by dataset.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nnunet_weak.atomic import write_text_atomic
from nnunet_weak.compare import (SCORE_COLUMNS, SD_SUFFIX, FoldTraining, Run, RunScores, format_csv, markdown_table,
                                 non_default_options, paired_against, paired_lines, plot_dice_chart, scores_row,
                                 trainer_defaults)
from nnunet_weak.environment import required_folder
from nnunet_weak.errors import UserInputError
from nnunet_weak.evaluation import summarise
from nnunet_weak.raw_dataset import RawDataset, load_raw_dataset
from nnunet_weak.training.options import parse_trainer_options

DEFAULTS_LABEL = "defaults"
SIGNIFICANCE = 0.05


def parse_grid(items: Sequence[str], trainer: str) -> dict[str, list[float]]:
    """``["name=v1,v2", ...]`` to ``{name: [values]}``, each option of ``trainer`` and its default included."""
    defaults = trainer_defaults(trainer)
    grid: dict[str, list[float]] = {}
    for item in items:
        name, separator, values = item.partition("=")
        name = name.strip()
        if not separator or not values.strip():
            raise UserInputError(f"--grid: '{item}' is not name=value,value,...; e.g. --grid crf_rampup=0,0.25,0.5.")
        if name in grid:
            raise UserInputError(f"--grid: option {name} is given twice; list all its values once.")
        # the trainer's own parser checks the name and each value (a clear error for a typo)
        numbers = [parse_trainer_options(f"{name}={v}", defaults, trainer)[name] for v in values.split(",")]
        grid[name] = sorted(set(numbers) | {defaults[name]})
    if not grid:
        raise UserInputError("--grid needs at least one option, e.g. --grid crf_rampup=0,0.25,0.5.")
    return grid


@dataclass
class DatasetTuning:
    """One dataset's part of a tuning: a row per combination, and each combination minus the defaults."""

    dataset: RawDataset
    rows: list[dict]
    paired: list[dict]

    def mean_dice(self, method: str) -> float:
        return next(r["Dice mean"] for r in self.rows if r["method"] == method)

    def against_defaults(self, method: str) -> dict:
        return next(p for p in self.paired if p["method"] == method and p["score"] == "Dice mean")


def mean_over_datasets(tables: list[DatasetTuning]) -> dict[str, float]:
    """Each combination's mean validation Dice averaged over the datasets, each dataset weighing the same."""
    return {r["method"]: sum(t.mean_dice(r["method"]) for t in tables) / len(tables) for r in tables[0].rows}


class Tuning(FoldTraining):
    """One trainer, a grid of option values on one or more datasets, scored on validation cases only; ``run()``
    writes the table."""

    def __init__(self, datasets: int | str | os.PathLike | Sequence[int | str | os.PathLike], trainer: str,
                 grid: Sequence[str], budget: str, configuration: str = "2d", folds: Sequence[str] = ("0",),
                 plans: str = "nnUNetPlans", device: str | None = None, retrain: bool = False,
                 output: str | os.PathLike | None = None, seeds: int = 1, records: str | os.PathLike | None = None):
        super().__init__(budget, configuration, folds, plans, device, retrain, seeds, records)
        if not self.validation_is_held_out:
            raise UserInputError("Fold 'all' trains on every training case and validates on the same cases: there is "
                                 "nothing held out to choose on. Tune on folds 0-4 (-f 0, or -f 0 1 2 3 4).")
        if isinstance(datasets, (int, str, os.PathLike)):
            datasets = [datasets]
        self.datasets = [load_raw_dataset(d) for d in datasets]
        names = [d.name for d in self.datasets]
        if len(set(names)) < len(names):
            raise UserInputError(f"-d: a dataset is given twice ({', '.join(names)}); give each once.")
        self.trainer = trainer
        self.grid = parse_grid(grid, trainer)
        defaults = trainer_defaults(trainer)
        self.output = Path(output) if output else (
            required_folder("nnUNet_results") / "nnunet_weak_tune" /
            f"{'+'.join(names)}__{trainer}__{configuration}__fold{'-'.join(self.folds)}__{self.budget.name}")
        self.runs = []
        for dataset in self.datasets:
            for values in itertools.product(*self.grid.values()):
                options = non_default_options({**defaults, **dict(zip(self.grid, values))}, defaults)
                self.runs.append(Run(options or DEFAULTS_LABEL, trainer, dataset, options))

    def label(self, run: Run) -> str:
        return run.method if len(self.datasets) == 1 else f"{run.dataset.name}, {run.method}"

    def run(self) -> tuple[list[dict], list[dict]]:
        """Train and score every combination on every dataset; return the table rows and the paired differences
        (each with its ``dataset``)."""
        validation = {}
        for index, seed in self.scoring_order():
            run = self.runs[index]
            record = self.recorded(run, seed)
            if record is not None:
                validation[index, seed] = self.validation_from_record(run, seed, record)
                continue
            for fold in self.folds:
                self.train(run, fold, seed)
            per_fold = self.fold_validation_scores(run, seed)
            validation[index, seed] = self.pooled(per_fold)
            self.write_record(run, seed, per_fold)
        results = [RunScores(run, {seed: validation[index, seed] for seed in self.seeds}, test={})
                   for index, run in enumerate(self.runs)]
        tables = []
        for dataset in self.datasets:
            mine = [r for r in results if r.run.dataset is dataset]
            rows = [self.row(r) for r in mine]
            for result, row in zip(mine, rows):
                print(f"{self.label(result.run)}: validation mean Dice {row['Dice mean']:.4f}")
            defaults = next(r for r in mine if r.run.method == DEFAULTS_LABEL)
            paired = paired_against(defaults, [r for r in mine if r is not defaults], dataset.class_labels,
                                    splits=("validation",))
            tables.append(DatasetTuning(dataset, rows, [{"dataset": dataset.name, **p} for p in paired]))
        self.write_outputs(tables)
        return [r for t in tables for r in t.rows], [p for t in tables for p in t.paired]

    def row(self, result: RunScores) -> dict:
        class_labels = result.run.dataset.class_labels
        row = {"method": result.run.method, "trainer": self.trainer, "dataset": result.run.dataset.name,
               "options": result.run.options}
        row.update(scores_row([summarise(v, class_labels) for v in result.validation.values()], class_labels, ""))
        row["seeds"] = len(result.validation)
        return row

    @staticmethod
    def choice(tables: list[DatasetTuning]) -> str:
        """Which combination validation favours (highest mean Dice, averaged over the datasets), and whether its
        gain over the defaults is more than noise on each dataset."""
        over_datasets = mean_over_datasets(tables)
        best = max(over_datasets, key=over_datasets.__getitem__)
        where = "" if len(tables) == 1 else (
            f" averaged over {len(tables)} datasets ("
            + ", ".join(f"{t.dataset.name} {t.mean_dice(best):.3f}" for t in tables) + ")")
        if best == DEFAULTS_LABEL:
            return f"Highest mean validation Dice{where}: the defaults ({over_datasets[best]:.3f}); keep them."
        parts, distinguishable = [], 0
        for table in tables:
            difference = table.against_defaults(best)
            distinguishable += difference["Wilcoxon p"] < SIGNIFICANCE
            name = "" if len(tables) == 1 else f"{table.dataset.name}: "
            parts.append(f"{name}{difference['mean difference']:+.3f} [{difference['ci low']:+.3f}, "
                         f"{difference['ci high']:+.3f}], Wilcoxon p = {difference['Wilcoxon p']:.3g}")
        if len(tables) == 1:
            verdict = ("distinguishable from noise on these cases (p < 0.05)" if distinguishable
                       else "not distinguishable from noise on these cases (p >= 0.05)")
        else:
            verdict = f"distinguishable from noise (p < 0.05) on {distinguishable} of {len(tables)} datasets"
        return (f"Highest mean validation Dice{where}: {best} ({over_datasets[best]:.3f}), "
                f"against the defaults {'; '.join(parts)}: {verdict}.")

    def caption(self) -> str:
        seeds = "one unseeded run each" if self.seeds == [None] else f"{len(self.seeds)} seed(s) each, mean ± sd"
        defaults = trainer_defaults(self.trainer)
        return (f"{self.trainer} on {' and '.join(d.name for d in self.datasets)}, validation cases of fold(s) "
                f"{', '.join(self.folds)} scored on dense labels (no test case used); defaults "
                f"{', '.join(f'{k}={defaults[k]:g}' for k in self.grid)}; configuration {self.configuration}, plans "
                f"{self.plans}, budget {self.budget.describe()}, device {self.device}; {seeds}.")

    def chart_path(self, dataset: RawDataset) -> Path:
        return self.output / ("tuning_dice.png" if len(self.datasets) == 1 else f"tuning_dice_{dataset.name}.png")

    def write_outputs(self, tables: list[DatasetTuning]) -> None:
        several = len(tables) > 1
        lines = ["Validation cases only: dense labels of the folds' validation cases."]
        for table in tables:
            rows = table.rows
            scores = [c for c in rows[0] if (c.startswith("Dice ") or c in SCORE_COLUMNS) and not c.endswith(SD_SUFFIX)]
            lines += ["", f"## {table.dataset.name}", ""] if several else [""]
            lines += markdown_table(rows, ["method", "seeds"] + scores, ["options (non-default)", "seeds"] + scores)
            lines += paired_lines(table.paired)
        if several:
            lines += ["", "## Over the datasets", "",
                      "| options (non-default) | " + " | ".join(f"Dice mean {t.dataset.name}" for t in tables)
                      + " | mean over datasets |", "|---|" + "---|" * (len(tables) + 1)]
            for method, mean in mean_over_datasets(tables).items():
                lines.append(f"| {method} | " + " | ".join(f"{t.mean_dice(method):.3f}" for t in tables)
                             + f" | {mean:.3f} |")
        lines += ["", self.choice(tables), "", self.caption()]
        markdown = "\n".join(lines) + "\n"
        write_text_atomic(markdown, self.output / "tuning.md")
        write_text_atomic(format_csv([r for t in tables for r in t.rows]), self.output / "tuning.csv")
        paired = [p for t in tables for p in t.paired]
        if paired:
            write_text_atomic(format_csv(paired), self.output / "tuning_paired.csv")
        for table in tables:
            plot_dice_chart(table.rows, table.dataset.class_labels, self.chart_path(table.dataset),
                            f"{table.dataset.name}: {self.caption()}" if several else self.caption())
        print("\n" + markdown)
        print(f"Wrote {self.output / 'tuning.md'}, tuning.csv and "
              f"{', '.join(self.chart_path(d).name for d in self.datasets)}")


def tune_from_args(args) -> tuple[list[dict], list[dict]]:
    tuning = Tuning(args.d, args.trainer, args.grid, args.budget, args.configuration, args.folds, args.plans,
                    args.device, args.retrain, args.output, args.seeds, args.records)
    return tuning.run()
