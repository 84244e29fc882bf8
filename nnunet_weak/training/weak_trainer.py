"""The base of every nnunet-weak trainer.

``nnUNetWeakTrainer`` is nnU-Net's trainer with three changes and nothing else:

1. **Budget.** Epochs and iterations come from ``NNUNET_WEAK_BUDGET`` (``nnunet_weak.budget``), so
   that short CPU runs use the stock ``nnUNetv2_train``; the budget is recorded beside the
   checkpoints (``nnunet_weak_run.json``) and ``--c`` refuses to continue under another budget.
2. **Supervision.** The supervision manifest of the raw dataset is read; cases marked
   ``unlabelled`` are removed from the supervised training stream (they stay in the validation set,
   which is scored on dense labels). Dense and sparse cases train with nnU-Net's loss, which skips
   ignore-label voxels: on a scribble dataset this is the "nnU-Net + partial loss" baseline.
3. **Scoring.** After nnU-Net's final validation (whose ``summary.json`` scores whatever is in
   ``labelsTr``: scribbles, for a scribble dataset), the validation predictions are scored against
   dense labels (Dice and HD95 per class) into ``validation/summary_dense.json``.

On a dataset without manifest and without ignore label it trains exactly as nnU-Net does.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_weak.atomic import write_json_atomic
from nnunet_weak.budget import Budget, budget_from_environment, parse_budget
from nnunet_weak.evaluation import score_cases
from nnunet_weak.raw_dataset import RawDataset, load_raw_dataset
from nnunet_weak.supervision import SupervisionManifest

RUN_RECORD = "nnunet_weak_run.json"
DENSE_SUMMARY = "summary_dense.json"


class nnUNetWeakTrainer(nnUNetTrainer):
    """nnU-Net's trainer with a configurable budget, manifest-aware training and dense scoring."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.budget: Budget = budget_from_environment()
        self.num_epochs = self.budget.num_epochs
        self.num_iterations_per_epoch = self.budget.iterations_per_epoch
        self.num_val_iterations_per_epoch = self.budget.val_iterations_per_epoch
        # nnU-Net checkpoints every 50 epochs; short budgets need checkpoints to resume with --c
        self.save_every = max(1, min(50, self.num_epochs // 5))
        self._raw_dataset: RawDataset | None = None
        self._raw_dataset_loaded = False

    # ---- supervision -------------------------------------------------------------------------

    @property
    def raw_dataset(self) -> RawDataset | None:
        """The checked raw dataset (with its manifest), or ``None`` if nnUNet_raw does not hold it."""
        if not self._raw_dataset_loaded:
            raw_root = os.environ.get("nnUNet_raw")
            folder = Path(raw_root) / self.plans_manager.dataset_name if raw_root else None
            self._raw_dataset = load_raw_dataset(folder) if folder is not None and folder.is_dir() else None
            self._raw_dataset_loaded = True
        return self._raw_dataset

    @property
    def supervision_manifest(self) -> SupervisionManifest | None:
        return None if self.raw_dataset is None else self.raw_dataset.manifest

    def do_split(self):
        """nnU-Net's split, without unlabelled cases in the (supervised) training keys."""
        tr_keys, val_keys = super().do_split()
        manifest = self.supervision_manifest
        if manifest is None:
            return tr_keys, val_keys
        unlabelled = set(manifest.cases_with("unlabelled"))
        supervised = [k for k in tr_keys if k not in unlabelled]
        if len(supervised) < len(tr_keys):
            self.print_to_log_file(f"{len(tr_keys) - len(supervised)} unlabelled case(s) of this fold are "
                                   f"left out of the supervised training stream.")
        if not supervised:
            raise RuntimeError(f"Fold {self.fold} has no labelled training case: every training case is "
                               f"marked unlabelled in the supervision manifest.")
        return supervised, val_keys

    # ---- budget ------------------------------------------------------------------------------

    def on_train_start(self):
        # checked before nnU-Net starts its data-augmentation workers, so that a refusal exits cleanly
        record_file = Path(self.output_folder) / RUN_RECORD
        if self.current_epoch > 0 and record_file.is_file():
            recorded = json.loads(record_file.read_text())["budget"]
            if parse_budget(recorded["name"]) != self.budget:
                raise RuntimeError(
                    f"This run was started with budget '{recorded['name']}' but NNUNET_WEAK_BUDGET is "
                    f"'{self.budget.name}'. Set NNUNET_WEAK_BUDGET={recorded['name']} to continue it, "
                    f"or start a new run without --c."
                )
        super().on_train_start()
        self.print_to_log_file(f"nnunet-weak budget {self.budget.describe()}")
        if self.local_rank == 0:
            write_json_atomic({"trainer": self.__class__.__name__, "dataset": self.plans_manager.dataset_name,
                               "configuration": self.configuration_name, "fold": self.fold,
                               "budget": self.budget.to_json()}, record_file)

    # ---- scoring on dense labels ----------------------------------------------------------------

    def perform_actual_validation(self, save_probabilities: bool = False):
        super().perform_actual_validation(save_probabilities)
        if self.local_rank == 0:
            self.score_validation_on_dense_labels()

    def score_validation_on_dense_labels(self) -> dict | None:
        """Score ``validation/`` against dense labels into ``validation/summary_dense.json``."""
        ignore = self.label_manager.ignore_label
        if ignore is not None:
            self.print_to_log_file("nnU-Net's validation/summary.json scores the sparse labels of labelsTr, "
                                   "not the anatomy: do not report it as accuracy.")
        dataset = self.raw_dataset
        if dataset is None:
            self.print_to_log_file(f"WARNING: no scoring on dense labels: {self.plans_manager.dataset_name} is "
                                   f"not in nnUNet_raw ({os.environ.get('nnUNet_raw')}).")
            return None
        _, val_keys = self.do_split()
        validation_folder = Path(self.output_folder) / "validation"
        pairs, without_dense = {}, []
        for case in sorted(val_keys):
            dense = dataset.dense_label_path(case)
            if dense is None:
                without_dense.append(case)
            else:
                pairs[case] = (validation_folder / f"{case}{dataset.file_ending}", dense)
        if without_dense:
            self.print_to_log_file(f"WARNING: {len(without_dense)} validation case(s) have no dense label and "
                                   f"are not scored: {without_dense}")
        if not pairs:
            self.print_to_log_file("WARNING: no validation case has a dense label; nothing scored.")
            return None
        summary = score_cases(pairs, dataset.class_labels, validation_folder / DENSE_SUMMARY,
                              ignore_label=ignore, extra={"cases_without_dense_label": without_dense,
                                                          "budget": self.budget.to_json()})
        per_class = ", ".join(f"{name} {v['Dice']:.4f}" for name, v in summary["mean"].items())
        self.print_to_log_file(f"Dice on dense labels: mean {summary['foreground_mean']['Dice']:.4f} "
                               f"({per_class}); HD95 {summary['foreground_mean']['HD95']:.2f} mm")
        return summary
