"""``nnunet-weak tune``: choose a trainer's option values on validation cases, never on the test set.

A default (a loss weight, a ramp length) is a choice, and a choice made on the test set inflates the
number reported on it. This command trains one trainer for every combination of the option values
given (``--grid lambda_crf=0.05,0.1,0.2 crf_rampup=0,0.5``), each with ``--seeds N`` seeds, with the
stock ``nnUNetv2_train`` (``compare``'s ``FoldTraining``: same results layout, finished runs reused), and
scores each combination on the dense labels of the folds' validation cases (``summary_dense.json``). It
never predicts, opens or scores ``imagesTs``/``labelsTs``.

The trainer's current default of every option on the grid is always part of the grid, so that the
default is measured beside its alternatives. The table gives each combination's validation scores
(mean ± sd over seeds); every combination is compared with the defaults case by case (scores averaged
over seeds: mean difference, bootstrap 95 % interval, Wilcoxon signed-rank p;
``nnunet_weak.statistics``). The combination with the highest mean validation Dice is named, with
whether its difference from the defaults is distinguishable from noise (p < 0.05) on these cases.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Sequence

from nnunet_weak.atomic import write_text_atomic
from nnunet_weak.compare import (SCORE_COLUMNS, SD_SUFFIX, FoldTraining, Run, RunScores, format_csv, markdown_table,
                                 non_default_options, paired_against, paired_lines, plot_dice_chart, scores_row,
                                 trainer_defaults)
from nnunet_weak.environment import required_folder
from nnunet_weak.errors import UserInputError
from nnunet_weak.evaluation import summarise
from nnunet_weak.raw_dataset import load_raw_dataset
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


class Tuning(FoldTraining):
    """One trainer, a grid of option values, scored on validation cases only; ``run()`` writes the table."""

    def __init__(self, dataset: int | str, trainer: str, grid: Sequence[str], budget: str, configuration: str = "2d",
                 folds: Sequence[str] = ("0",), plans: str = "nnUNetPlans", device: str | None = None,
                 retrain: bool = False, output: str | os.PathLike | None = None, seeds: int = 1,
                 records: str | os.PathLike | None = None):
        super().__init__(budget, configuration, folds, plans, device, retrain, seeds, records)
        if not self.validation_is_held_out:
            raise UserInputError("Fold 'all' trains on every training case and validates on the same cases: there is "
                                 "nothing held out to choose on. Tune on folds 0-4 (-f 0, or -f 0 1 2 3 4).")
        self.dataset = load_raw_dataset(dataset)
        self.trainer = trainer
        self.grid = parse_grid(grid, trainer)
        defaults = trainer_defaults(trainer)
        self.output = Path(output) if output else (
            required_folder("nnUNet_results") / "nnunet_weak_tune" /
            f"{self.dataset.name}__{trainer}__{configuration}__fold{'-'.join(self.folds)}__{self.budget.name}")
        self.runs = []
        for values in itertools.product(*self.grid.values()):
            options = non_default_options({**defaults, **dict(zip(self.grid, values))}, defaults)
            self.runs.append(Run(options or DEFAULTS_LABEL, trainer, self.dataset, options))

    def run(self) -> tuple[list[dict], list[dict]]:
        """Train and score every combination; return the table rows and the paired differences."""
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
        for result in results:
            print(f"{result.run.method}: validation mean Dice {self.row(result)['Dice mean']:.4f}")
        rows = [self.row(r) for r in results]
        defaults = next(r for r in results if r.run.method == DEFAULTS_LABEL)
        paired = paired_against(defaults, [r for r in results if r is not defaults], self.dataset.class_labels,
                                splits=("validation",))
        self.write_outputs(rows, paired)
        return rows, paired

    def row(self, result: RunScores) -> dict:
        row = {"method": result.run.method, "trainer": self.trainer, "options": result.run.options}
        row.update(scores_row([summarise(v, self.dataset.class_labels) for v in result.validation.values()],
                              self.dataset.class_labels, ""))
        row["seeds"] = len(result.validation)
        return row

    def choice(self, rows: list[dict], paired: list[dict]) -> str:
        """Which combination validation favours, and whether its gain over the defaults is more than noise."""
        best = max(rows, key=lambda r: r["Dice mean"])
        if best["method"] == DEFAULTS_LABEL:
            return f"Highest mean validation Dice: the defaults ({best['Dice mean']:.3f}); keep them."
        difference = next(p for p in paired if p["method"] == best["method"] and p["score"] == "Dice mean")
        verdict = ("distinguishable from noise on these cases (p < 0.05)" if difference["Wilcoxon p"] < SIGNIFICANCE
                   else "not distinguishable from noise on these cases (p >= 0.05)")
        return (f"Highest mean validation Dice: {best['method']} ({best['Dice mean']:.3f}), "
                f"{difference['mean difference']:+.3f} [{difference['ci low']:+.3f}, {difference['ci high']:+.3f}] "
                f"against the defaults, Wilcoxon p = {difference['Wilcoxon p']:.3g}: {verdict}.")

    def caption(self) -> str:
        seeds = "one unseeded run each" if self.seeds == [None] else f"{len(self.seeds)} seed(s) each, mean ± sd"
        defaults = trainer_defaults(self.trainer)
        return (f"{self.trainer} on {self.dataset.name}, validation cases of fold(s) {', '.join(self.folds)} scored on "
                f"dense labels (no test case used); defaults "
                f"{', '.join(f'{k}={defaults[k]:g}' for k in self.grid)}; configuration {self.configuration}, plans "
                f"{self.plans}, budget {self.budget.describe()}, device {self.device}; {seeds}.")

    def write_outputs(self, rows: list[dict], paired: list[dict]) -> None:
        scores = [c for c in rows[0] if (c.startswith("Dice ") or c in SCORE_COLUMNS) and not c.endswith(SD_SUFFIX)]
        lines = ["Validation cases only: dense labels of the folds' validation cases.", ""]
        lines += markdown_table(rows, ["method", "seeds"] + scores, ["options (non-default)", "seeds"] + scores)
        lines += paired_lines(paired)
        lines += ["", self.choice(rows, paired), "", self.caption()]
        markdown = "\n".join(lines) + "\n"
        write_text_atomic(markdown, self.output / "tuning.md")
        write_text_atomic(format_csv(rows), self.output / "tuning.csv")
        if paired:
            write_text_atomic(format_csv(paired), self.output / "tuning_paired.csv")
        plot_dice_chart(rows, self.dataset.class_labels, self.output / "tuning_dice.png", self.caption())
        print("\n" + markdown)
        print(f"Wrote {self.output / 'tuning.md'}, tuning.csv and tuning_dice.png")


def tune_from_args(args) -> tuple[list[dict], list[dict]]:
    tuning = Tuning(args.d, args.trainer, args.grid, args.budget, args.configuration, args.folds, args.plans,
                    args.device, args.retrain, args.output, args.seeds, args.records)
    return tuning.run()
