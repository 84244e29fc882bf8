"""``nnunet-weak demo``: the whole workflow on the synthetic phantom, on a CPU, in minutes.

1. generate the phantom and write a dense dataset and its scribble twin (``convert phantom``);
2. plan and preprocess the dense dataset (2d) with the ignore-aware fingerprint, and give the
   scribble dataset the same plans and splits (``plan_and_preprocess --plans_from``);
3. compare dense nnU-Net (upper bound) with nnU-Net + partial loss and ``ScribbleAttentionTrainer`` on
   the scribbles (or the trainers asked for), scored on the dense labels of held-out test cases, with
   the validation scores, the paired statistics and the figures (``compare``).

Every step reuses what a previous demo run already finished.
"""
from __future__ import annotations

import json
import os
import time

from nnunet_weak.compare import Comparison
from nnunet_weak.dataset_conversion.phantom import convert_phantom, phantom_dataset_names
from nnunet_weak.environment import required_folder
from nnunet_weak.errors import UserInputError
from nnunet_weak.planners.plan_and_preprocess import plan_and_preprocess

CONFIGURATION = "2d"


def _check_ids_free_or_ours(dataset_id: int, expected_name: str) -> None:
    from nnunetv2.utilities.dataset_name_id_conversion import find_candidate_datasets
    others = [n for n in find_candidate_datasets(dataset_id) if n != expected_name]
    if others:
        raise UserInputError(f"Dataset id {dataset_id} is already used by {others}; choose other ids for the demo "
                             f"(--dense_id / --id).")


def _phantom_matches(folder, num_train: int, seed: int) -> bool:
    dataset_json = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    return dataset_json.get("phantom_seed") == seed and dataset_json.get("numTraining") == num_train


def run_demo(args) -> list[dict]:
    started = time.time()
    raw = required_folder("nnUNet_raw")
    preprocessed = required_folder("nnUNet_preprocessed")
    required_folder("nnUNet_results")
    dense_name, sparse_name = phantom_dataset_names(args.dense_id, args.id)
    _check_ids_free_or_ours(args.dense_id, dense_name)
    _check_ids_free_or_ours(args.id, sparse_name)

    n = int(os.environ.get("nnUNet_def_n_proc", os.cpu_count() or 1))
    print("[1/3] Phantom datasets")
    existing = [(raw / n).is_dir() for n in (dense_name, sparse_name)]
    if all(existing):
        for name in (dense_name, sparse_name):
            if not _phantom_matches(raw / name, args.num_train, args.seed):
                raise UserInputError(f"{raw / name} was made with other settings (seed or number of cases); "
                                     f"delete it or use other ids (--dense_id / --id).")
        print(f"  reusing {dense_name} and {sparse_name}")
    else:
        convert_phantom(raw, preprocessed, args.dense_id, args.id, args.num_train, args.test_count, args.seed,
                        overwrite=any(existing), num_processes=n)

    print("[2/3] Planning and preprocessing (2d)")
    if not (preprocessed / dense_name / "nnUNetPlans_2d").is_dir():
        plan_and_preprocess([dense_name], configurations=[CONFIGURATION], num_processes_fingerprint=n,
                            num_processes=[n])
    if not (preprocessed / sparse_name / "nnUNetPlans_2d").is_dir():
        plan_and_preprocess([sparse_name], configurations=[CONFIGURATION], num_processes=[n], plans_from=dense_name)

    print("[3/3] Comparison")
    comparison = Comparison(dense_name, sparse_name, args.trainers, args.budget, CONFIGURATION, ["0"],
                            device=args.device)
    rows = comparison.run()
    print(f"Demo finished in {time.time() - started:.0f} s.")
    return rows
