"""What every dataset converter writes: a dataset with the chosen supervision and its dense twin.

Both have the same images, the same training and test cases (dense ``labelsTs``) and the same
``splits_final.json`` (in ``nnUNet_preprocessed``), so that a weak model and its fully supervised
upper bound are trained and scored like for like. A converter only has to say how to load a case
(``LoadedCase``) and which cases go where.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from nnunet_weak.atomic import write_json_atomic
from nnunet_weak.environment import required_folder
from nnunet_weak.errors import UserInputError
from nnunet_weak.raw_dataset import DATASET_NAME_PATTERN, CaseRecord, Geometry, write_raw_dataset
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


def read_case_list(path: Path) -> list[str]:
    """Case ids, one per line (blank lines ignored; a path after the id, e.g. LA's ``/mri_norm2.h5``, is dropped)."""
    if not path.is_file():
        raise UserInputError(f"Case list {path} does not exist.")
    cases = [line.strip().split("/")[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    duplicates = sorted({c for c in cases if cases.count(c) > 1})
    if duplicates:
        raise UserInputError(f"{path} lists case(s) {duplicates[:3]} more than once.")
    return cases


def hold_out(units: Sequence[str], count: int, seed: int, option: str) -> tuple[list[str], list[str]]:
    """Split ``units`` (cases, subjects or patients) into training and a seeded choice of ``count``
    test units, keeping the 5 training units nnU-Net's folds need."""
    units = sorted(units)
    if not 0 <= count <= len(units) - 5:
        raise UserInputError(f"{count} test units of {len(units)} leave fewer than the 5 training units nnU-Net's "
                             f"folds need; lower {option}.")
    test = set(np.random.RandomState(seed).choice(units, count, replace=False).tolist()) if count else set()
    return [u for u in units if u not in test], sorted(test)


def held_out(units: Sequence[str], count: int | None, default_count: int, test_list: str | None,
             seed: int) -> tuple[list[str], list[str]]:
    """Training and test units: the ids of a file (``--test_list``, pinned) or a seeded draw of ``count``
    (``--test_count``, ``default_count`` when not given), never both; 5 training units must remain."""
    if test_list is None:
        return hold_out(units, default_count if count is None else count, seed, "--test_count")
    if count is not None:
        raise UserInputError("Choose the held-out test cases one way: --test_count (a seeded draw) or --test_list.")
    listed = set(read_case_list(Path(test_list)))
    unknown = sorted(listed - set(units))
    if unknown:
        raise UserInputError(f"{test_list} names {unknown[:3]}, which are not among the {len(units)} found here "
                             f"(e.g. {sorted(units)[:2]}).")
    train = sorted(u for u in units if u not in listed)
    if len(train) < 5:
        raise UserInputError(f"{test_list} leaves {len(train)} training units; nnU-Net's folds need 5.")
    return train, sorted(listed)


def case_record(load: Callable[[], LoadedCase], case: str, choice: SupervisionChoice | None,
                keeps_dense_label: bool, ignore_label: int) -> CaseRecord:
    """The record of one case: dense when ``choice`` is ``None`` (test cases, the dense twin)."""
    loaded = load()
    if choice is None:
        return CaseRecord(case, list(loaded.channels), loaded.spacing, loaded.dense, supervision="dense",
                          geometry=loaded.geometry)
    label, supervision, weak_label, provenance = choice.make_label(case, loaded.dense, ignore_label,
                                                                  keeps_dense_label, loaded.real_weak)
    weak_label_map = None
    if choice.mode == "mixed" and keeps_dense_label:
        # a method trained on both kinds (ConfKD) needs the strong case's weak label too, made like the others
        weak_label_map, weak_provenance = choice.weak_label_of(case, loaded.dense, ignore_label, loaded.real_weak)
        weak_label, provenance = choice.weak_label, {**provenance, "weak_label": weak_provenance}
    return CaseRecord(case, list(loaded.channels), loaded.spacing, label, dense_label=loaded.dense,
                      supervision=supervision, weak_label=weak_label, provenance=provenance,
                      geometry=loaded.geometry, weak_label_map=weak_label_map)


def output_roots(args) -> tuple[Path, Path]:
    """Where a converter writes: ``--output`` and ``--preprocessed_output`` together, else nnU-Net's folders.

    Never a mix: a converter writing raw data to a scratch folder must not touch the real
    ``nnUNet_preprocessed`` (it writes ``splits_final.json`` there).
    """
    if args.output is None and args.preprocessed_output is None:
        return required_folder("nnUNet_raw"), required_folder("nnUNet_preprocessed")
    if args.output is None or args.preprocessed_output is None:
        raise UserInputError("--output (raw data) and --preprocessed_output (where splits_final.json goes) go "
                             "together; give both, or neither to write into $nnUNet_raw and $nnUNet_preprocessed.")
    return Path(args.output), Path(args.preprocessed_output)


def check_new_datasets(raw_root: Path, preprocessed_root: Path, names: Sequence[str], overwrite: bool) -> None:
    """Refuse, before anything is written, datasets whose ids collide with each other or with another dataset
    in the given roots, or that exist already without ``overwrite``."""
    ids = [int(DATASET_NAME_PATTERN.match(name).group(1)) for name in names]
    if len(set(ids)) < len(ids):
        raise UserInputError(f"{' and '.join(names)} would share the id {ids[0]:03d}: give the two datasets "
                             f"different ids.")
    for name, dataset_id in zip(names, ids):
        for root in (raw_root, preprocessed_root):
            others = sorted(p.name for p in root.glob(f"Dataset{dataset_id:03d}_*") if p.name != name) if root.is_dir() else []
            if others:
                raise UserInputError(f"Id {dataset_id:03d} is taken by {others[0]} in {root}: nnU-Net finds datasets by id, "
                                     f"so {name} would be ambiguous. Choose another id.")
        if (raw_root / name).exists() and not overwrite:
            raise UserInputError(f"{raw_root / name} already exists. Pass --overwrite to replace it (its preprocessed "
                                 f"data and plans are removed with it), or choose another id.")


def remove_stale_preprocessed(preprocessed_root: Path, name: str) -> list[str]:
    """Delete what nnU-Net derived from a dataset that is being replaced (fingerprint, plans, arrays, splits),
    which would no longer match it; return what was removed."""
    folder = preprocessed_root / name
    if not folder.is_dir():
        return []
    removed = sorted(p.name for p in folder.iterdir())
    shutil.rmtree(folder)
    return removed


def write_datasets(raw_root: Path, preprocessed_root: Path, names: tuple[str, ...],
                   write: Callable[[Path, str], Path], splits: list[dict] | None = None,
                   overwrite: bool = False) -> tuple[Path, ...]:
    """Write datasets (usually a dataset and its twin) with ``write(raw_root, name)`` into a staging folder,
    then move them all into place and write their ``splits_final.json``: never one of a pair without the other.

    Every target is checked first (``check_new_datasets``); replacing a dataset also removes its stale
    preprocessed data (``remove_stale_preprocessed``), and says so.
    """
    raw_root, preprocessed_root = Path(raw_root), Path(preprocessed_root)
    check_new_datasets(raw_root, preprocessed_root, names, overwrite)
    raw_root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".nnunet_weak_conversion.", suffix=".partial", dir=raw_root))
    try:
        for name in names:
            write(stage, name)
        for name in names:
            final = raw_root / name
            if final.exists():
                os.replace(final, stage / f"{name}.old")
            os.replace(stage / name, final)
            removed = remove_stale_preprocessed(preprocessed_root, name)
            if removed:
                print(f"Removed the preprocessed data of the replaced {name} ({', '.join(removed)}) from "
                      f"{preprocessed_root}: plan and preprocess it again.")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if splits is not None:
        for name in names:
            write_json_atomic(splits, preprocessed_root / name / "splits_final.json")
    return tuple(raw_root / name for name in names)


def write_test_only(raw_root: Path, preprocessed_root: Path, name: str, channel_names: Mapping[str, str],
                    classes: Mapping[str, int], test: Mapping[str, Callable[[], LoadedCase]], overwrite: bool = False,
                    num_processes: int = 1, extra_json: Mapping | None = None) -> tuple[Path, ...]:
    """Write a dataset of held-out cases only (``imagesTs``/``labelsTs``, dense; no training cases, no twin, no
    splits), for prediction and scoring: e.g. a release's separate test set."""
    def write(root: Path, dataset: str) -> Path:
        return write_raw_dataset(root, dataset, channel_names, classes, training=[],
                                 test=[partial(case_record, load, case, None, False, 0) for case, load in sorted(test.items())],
                                 num_processes=num_processes,
                                 extra_json={**(extra_json or {}), "supervision": {"mode": "test only"}})

    return write_datasets(raw_root, preprocessed_root, (name,), write, overwrite=overwrite)


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

    def write(root: Path, name: str) -> Path:
        twin_choice = choice if name == names[0] else None
        weak = twin_choice is not None and twin_choice.needs_ignore_label
        labels = dict(classes, **({"ignore": ignore_label} if weak else {}))
        return write_raw_dataset(
            root, name, channel_names, labels,
            training=[partial(case_record, load, case, twin_choice, case in keep_dense, ignore_label)
                      for case, load in sorted(training.items())],
            test=[partial(case_record, load, case, None, False, ignore_label) for case, load in sorted(test.items())],
            num_processes=num_processes,
            extra_json={**(extra_json or {}),
                        "supervision": (twin_choice or SupervisionChoice("dense")).describe()})

    return write_datasets(raw_root, preprocessed_root, names, write, splits, overwrite)
