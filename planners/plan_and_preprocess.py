"""``nnunet-weak plan_and_preprocess``: nnU-Net's planning API with an ignore-aware fingerprint.

nnU-Net has no hook for external fingerprint extractors or planners (``-fpe``/``-pl`` are looked up
inside ``nnunetv2.experiment_planning`` only), so this module calls the planning API with class
objects. The plans it writes name ``DefaultPreprocessor`` and nnU-Net's own networks, so the stock
``nnUNetv2_train`` / ``nnUNetv2_predict`` use them unchanged.

``--plans_from SOURCE`` instead gives a dataset the plans and splits of another one with the same
cases (a scribble dataset and its dense twin), for like-for-like comparisons: the same architecture,
patch, spacing, batch and folds. Its intensity statistics (``foreground_intensity_properties_per_channel``)
are its own, from its own annotations (ignore-aware fingerprint): the twin's come from dense labels that a
user of the sparse dataset would not have. Only CT normalisation reads them (clipping percentiles, mean,
std); nnU-Net's z-scoring of MRI uses each image's own mean and std, so on MRI the preprocessed data are
the twin's exactly.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import nnunetv2
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                   plan_experiment_dataset,
                                                                   preprocess_dataset)
from nnunetv2.utilities.crossval_split import generate_crossval_split
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_weak.atomic import write_json_atomic
from nnunet_weak.environment import required_folder
from nnunet_weak.errors import UserInputError
from nnunet_weak.planners.cpu_planner import nnUNetPlannerCPU
from nnunet_weak.planners.ignore_aware_fingerprint import IgnoreAwareFingerprintExtractor
from nnunet_weak.raw_dataset import load_raw_dataset

FINGERPRINT_EXTRACTORS = {
    "ignore_aware": IgnoreAwareFingerprintExtractor,
    "nnunet": DatasetFingerprintExtractor,
}


PROJECT_PLANNERS = {"nnUNetPlannerCPU": nnUNetPlannerCPU}


def find_planner(name: str):
    """A planner class by name: the project's (``PROJECT_PLANNERS``) or nnU-Net's (as ``-pl``)."""
    if name in PROJECT_PLANNERS:
        return PROJECT_PLANNERS[name]
    planner = recursive_find_python_class(str(Path(nnunetv2.__path__[0]) / "experiment_planning"), name,
                                          current_module="nnunetv2.experiment_planning")
    if planner is None:
        raise UserInputError(
            f"Unknown experiment planner '{name}'. Use one of nnU-Net's planners (e.g. ExperimentPlanner, "
            f"nnUNetPlannerResEncM, nnUNetPlannerResEncL) or the project's: {', '.join(PROJECT_PLANNERS)}."
        )
    return planner


def _splits_for(dataset_name: str) -> Path:
    return required_folder("nnUNet_preprocessed") / dataset_name / "splits_final.json"


def ensure_splits(dataset_name: str, case_identifiers: Sequence[str]) -> list:
    """The dataset's ``splits_final.json``, created as nnU-Net's trainer would if missing."""
    path = _splits_for(dataset_name)
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    if len(case_identifiers) < 5:
        raise UserInputError(
            f"{dataset_name} has {len(case_identifiers)} training cases; nnU-Net's 5-fold split needs at "
            f"least 5. Write your own {path}."
        )
    splits = generate_crossval_split(sorted(case_identifiers), seed=12345, n_splits=5)
    write_json_atomic(splits, path)
    return splits


# what a sparse dataset's plans hold of their own, where they differ from its twin's (module docstring)
TWIN_OWN_PLAN_KEYS = ("dataset_name", "foreground_intensity_properties_per_channel")


def copy_plans(source: int | str, target: int | str, plans_identifier: str = "nnUNetPlans",
               num_processes: int = 8) -> str:
    """Give ``target`` the plans and splits of ``source``, with the intensity statistics of its own
    ignore-aware fingerprint (module docstring); return the target's name.

    Both datasets must have the same training case identifiers and file ending (a dense dataset and
    its sparse twin). The source must have been planned.
    """
    src, dst = load_raw_dataset(source), load_raw_dataset(target)
    if set(src.training_cases) != set(dst.training_cases):
        only_src = sorted(set(src.training_cases) - set(dst.training_cases))
        only_dst = sorted(set(dst.training_cases) - set(src.training_cases))
        raise UserInputError(
            f"{src.name} and {dst.name} do not have the same training cases (only in the first: "
            f"{only_src[:3]}, only in the second: {only_dst[:3]}); plans and splits can only be shared "
            f"between twins of one dataset."
        )
    if src.file_ending != dst.file_ending:
        raise UserInputError(f"{src.name} uses '{src.file_ending}' files, {dst.name} '{dst.file_ending}'.")
    preprocessed = required_folder("nnUNet_preprocessed")
    source_plans = preprocessed / src.name / f"{plans_identifier}.json"
    if not source_plans.is_file():
        raise UserInputError(
            f"{source_plans} does not exist: plan the source dataset first "
            f"(`nnunet-weak plan_and_preprocess -d {src.name[7:10]}`)."
        )
    plans = json.loads(source_plans.read_text(encoding="utf-8"))
    plans["dataset_name"] = dst.name
    target_folder = preprocessed / dst.name
    target_folder.mkdir(parents=True, exist_ok=True)
    fingerprint = IgnoreAwareFingerprintExtractor(int(dst.name[7:10]), num_processes).run(overwrite_existing=True)
    plans["foreground_intensity_properties_per_channel"] = fingerprint["foreground_intensity_properties_per_channel"]
    write_json_atomic(plans, target_folder / f"{plans_identifier}.json")
    # nnU-Net's planner copies the raw dataset.json beside the plans; the preprocessor reads it there
    write_json_atomic(dict(dst.dataset_json), target_folder / "dataset.json")
    write_json_atomic(ensure_splits(src.name, src.training_cases), target_folder / "splits_final.json")
    return dst.name


def plan_and_preprocess(datasets: Sequence[int | str], fingerprint_extractor: str = "ignore_aware",
                        planner: str = "ExperimentPlanner", gpu_memory_target: float | None = None,
                        preprocessor: str = "DefaultPreprocessor",
                        overwrite_target_spacing: Sequence[float] | None = None,
                        overwrite_plans_name: str | None = None,
                        configurations: Sequence[str] = ("2d", "3d_fullres", "3d_lowres"),
                        num_processes_fingerprint: int = 8, num_processes: Sequence[int] | None = None,
                        verify_dataset_integrity: bool = False, no_pp: bool = False, clean: bool = False,
                        verbose: bool = False, plans_from: int | str | None = None) -> None:
    """Fingerprint, plan and preprocess each dataset (see the module docstring).

    Arguments mirror ``nnUNetv2_plan_and_preprocess``; ``fingerprint_extractor`` picks
    ``ignore_aware`` (default) or ``nnunet``; ``plans_from`` copies plans/splits from a twin.
    """
    if fingerprint_extractor not in FINGERPRINT_EXTRACTORS:
        raise UserInputError(
            f"Unknown fingerprint extractor '{fingerprint_extractor}'; use one of "
            f"{', '.join(FINGERPRINT_EXTRACTORS)}."
        )
    planner_class = find_planner(planner) if plans_from is None else None
    if plans_from is not None and len(datasets) != 1:
        raise UserInputError("--plans_from takes exactly one target dataset (-d).")
    raw = [load_raw_dataset(d) for d in datasets]
    if num_processes is None:
        defaults = {"2d": 8, "3d_fullres": 4, "3d_lowres": 8}
        num_processes = [defaults.get(c, 4) for c in configurations]
    elif len(num_processes) == 1:
        num_processes = list(num_processes) * len(configurations)
    if len(num_processes) != len(configurations):
        raise UserInputError(
            f"-np needs one number or one per configuration ({len(configurations)}), got {len(num_processes)}."
        )

    for dataset in raw:
        dataset_id = int(dataset.name[7:10])
        if verify_dataset_integrity:
            from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity as verify
            try:
                verify(str(dataset.folder), num_processes_fingerprint)
            except (AssertionError, RuntimeError) as e:
                raise UserInputError(f"{dataset.name} failed nnU-Net's dataset integrity check: {e}")
        if plans_from is not None:
            copy_plans(plans_from, dataset.name, overwrite_plans_name or "nnUNetPlans", num_processes_fingerprint)
            plans_identifier = overwrite_plans_name or "nnUNetPlans"
            print(f"{dataset.name}: plans and splits copied from dataset {plans_from}, intensity statistics from "
                  f"its own annotations")
        else:
            extract_fingerprint_dataset(dataset_id, FINGERPRINT_EXTRACTORS[fingerprint_extractor],
                                        num_processes_fingerprint, check_dataset_integrity=False,
                                        clean=clean, verbose=verbose)
            _, plans_identifier = plan_experiment_dataset(
                dataset_id, planner_class, gpu_memory_target, preprocessor,
                overwrite_target_spacing, overwrite_plans_name)
        if not no_pp:
            _preprocess(dataset_id, dataset.name, plans_identifier, configurations, num_processes, verbose)


def _preprocess(dataset_id: int, dataset_name: str, plans_identifier: str, configurations: Sequence[str],
                num_processes: Sequence[int], verbose: bool) -> None:
    """nnU-Net's preprocessing; a configuration whose preprocessing fails is removed, not left half-written."""
    preprocessed = required_folder("nnUNet_preprocessed") / dataset_name
    plans = PlansManager(str(preprocessed / f"{plans_identifier}.json"))
    for configuration, n in zip(configurations, num_processes):
        if configuration not in plans.available_configurations:
            print(f"{dataset_name}: configuration {configuration} is not in the plans; skipped "
                  f"(available: {', '.join(plans.available_configurations)}).")
            continue
        output = preprocessed / plans.get_configuration(configuration).data_identifier
        try:
            preprocess_dataset(dataset_id, plans_identifier, [configuration], [n], verbose=verbose)
        except BaseException:
            shutil.rmtree(output, ignore_errors=True)
            raise
