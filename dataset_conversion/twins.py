"""What every dataset converter writes: a dataset with the chosen supervision and its dense twin.

Both have the same images, the same training and test cases (dense ``labelsTs``) and the same
``splits_final.json`` (in ``nnUNet_preprocessed``), so that a weak model and its fully supervised
upper bound are trained and scored like for like. A converter only has to say how to load a case
(``LoadedCase``) and which cases go where.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from nnunet_weak.atomic import write_json_atomic
from nnunet_weak.errors import UserInputError
from nnunet_weak.raw_dataset import CaseRecord, Geometry, write_raw_dataset
from nnunet_weak.supervision_choice import SupervisionChoice


@dataclass(frozen=True)
class LoadedCase:
    """One case as read from its source: channels and dense label (z, y, x), spacing (z, y, x) mm,
    the real weak label when the source has one (hand-drawn scribbles, ignore = highest + 1), and
    the source's origin and orientation when it has them."""

    channels: Sequence[np.ndarray]
    spacing: tuple[float, ...]
    dense: np.ndarray
    real_weak: np.ndarray | None = None
    geometry: Geometry | None = None


def hold_out(units: Sequence[str], count: int, seed: int, option: str) -> tuple[list[str], list[str]]:
    """Split ``units`` (cases, subjects or patients) into training and a seeded choice of ``count``
    test units, keeping the 5 training units nnU-Net's folds need."""
    units = sorted(units)
    if not 0 <= count <= len(units) - 5:
        raise UserInputError(f"{count} test units of {len(units)} leave fewer than the 5 training units nnU-Net's "
                             f"folds need; lower {option}.")
    test = set(np.random.RandomState(seed).choice(units, count, replace=False).tolist()) if count else set()
    return [u for u in units if u not in test], sorted(test)


def case_record(load: Callable[[], LoadedCase], case: str, choice: SupervisionChoice | None,
                keeps_dense_label: bool, ignore_label: int) -> CaseRecord:
    """The record of one case: dense when ``choice`` is ``None`` (test cases, the dense twin)."""
    loaded = load()
    if choice is None:
        return CaseRecord(case, list(loaded.channels), loaded.spacing, loaded.dense, supervision="dense",
                          geometry=loaded.geometry)
    label, supervision, weak_label, provenance = choice.make_label(case, loaded.dense, ignore_label,
                                                                  keeps_dense_label, loaded.real_weak)
    return CaseRecord(case, list(loaded.channels), loaded.spacing, label, dense_label=loaded.dense,
                      supervision=supervision, weak_label=weak_label, provenance=provenance,
                      geometry=loaded.geometry)


def write_twins(raw_root: Path, preprocessed_root: Path, names: tuple[str, str], channel_names: Mapping[str, str],
                classes: Mapping[str, int], choice: SupervisionChoice,
                training: Mapping[str, Callable[[], LoadedCase]], test: Mapping[str, Callable[[], LoadedCase]],
                splits: list[dict], overwrite: bool = False, num_processes: int = 1,
                extra_json: Mapping | None = None) -> tuple[Path, Path]:
    """Write the dataset with supervision ``choice`` (``names[0]``) and its dense twin (``names[1]``).

    Args:
        classes: label name to value, background included, no ignore label.
        training, test: case id to a picklable loader.
        splits: the cross-validation folds over the training cases, written for both datasets.
    """
    ignore_label = max(classes.values()) + 1
    keep_dense = set(choice.cases_keeping_dense_labels(sorted(training)))
    folders = []
    for name, twin_choice in ((names[0], choice), (names[1], None)):
        weak = twin_choice is not None and twin_choice.needs_ignore_label
        labels = dict(classes, **({"ignore": ignore_label} if weak else {}))
        folders.append(write_raw_dataset(
            raw_root, name, channel_names, labels,
            training=[partial(case_record, load, case, twin_choice, case in keep_dense, ignore_label)
                      for case, load in sorted(training.items())],
            test=[partial(case_record, load, case, None, False, ignore_label) for case, load in sorted(test.items())],
            overwrite=overwrite, num_processes=num_processes,
            extra_json={**(extra_json or {}),
                        "supervision": (twin_choice or SupervisionChoice("dense")).describe()}))
        write_json_atomic(splits, preprocessed_root / name / "splits_final.json")
    return folders[0], folders[1]
