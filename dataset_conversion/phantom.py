"""The synthetic cardiac phantom as a pair of nnU-Net datasets: a dense one and its scribble twin.

Both hold the same images and the same held-out test cases (``imagesTs``/``labelsTs``, dense).
The dense dataset has the dense labels in ``labelsTr``; the scribble dataset has simulated
scribbles there (un-annotated voxels = ignore label), keeps the dense labels in ``labelsTr_dense``
for scoring, and its manifest marks every training case as sparse.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from nnunet_weak.dataset_conversion.twins import output_roots, write_datasets
from nnunet_weak.phantom import PHANTOM_LABELS, generate_case
from nnunet_weak.raw_dataset import CaseRecord, write_raw_dataset
from nnunet_weak.scribbles import simulate_scribbles

IGNORE_LABEL = max(PHANTOM_LABELS.values()) + 1


def phantom_dataset_names(dense_id: int, sparse_id: int) -> tuple[str, str]:
    return f"Dataset{dense_id:03d}_PhantomDense", f"Dataset{sparse_id:03d}_PhantomScribble"


def phantom_case(seed: int, scribbles: bool, training: bool, shape_yx: tuple[int, int]) -> CaseRecord:
    """Generate one phantom case; a training case of the scribble dataset gets simulated scribbles."""
    case = generate_case(seed, shape_yx=shape_yx)
    identifier = f"phantom_{seed:04d}"
    if not training or not scribbles:
        return CaseRecord(identifier, [case.image], case.spacing, case.label, supervision="dense",
                          provenance={"generator": "nnunet_weak.phantom.generate_case", "seed": seed})
    scribble_seed = 10_000 + seed
    return CaseRecord(
        identifier, [case.image], case.spacing,
        label=simulate_scribbles(case.label, IGNORE_LABEL, scribble_seed),
        dense_label=case.label, supervision="sparse", weak_label="scribble",
        provenance={"generator": "nnunet_weak.scribbles.simulate_scribbles", "seed": scribble_seed,
                    "image_seed": seed})


def convert_phantom(raw_root: str | os.PathLike, preprocessed_root: str | os.PathLike, dense_id: int, sparse_id: int,
                    num_train: int = 20, num_test: int = 8, seed: int = 0, shape_yx: tuple[int, int] = (48, 48),
                    overwrite: bool = False, num_processes: int = 1) -> tuple[Path, Path]:
    """Write the dense phantom dataset and its scribble twin under ``raw_root`` (``write_datasets``).

    Args:
        raw_root, preprocessed_root: nnU-Net's folders (a replaced dataset's preprocessed data is removed).
        dense_id, sparse_id: dataset ids of the dense and the scribble dataset.
        num_train, num_test: number of training and held-out test cases.
        seed: base seed; case ``i`` uses image seed ``seed * 1000 + i``.
        shape_yx: in-plane size of the volumes.
        overwrite: replace existing datasets of the same name.
        num_processes: worker processes.

    Returns:
        The folders of the dense and the scribble dataset.
    """
    dense_name, sparse_name = phantom_dataset_names(dense_id, sparse_id)
    train_seeds = [seed * 1000 + i for i in range(num_train)]
    test_seeds = [seed * 1000 + num_train + i for i in range(num_test)]
    scribbled = {dense_name: False, sparse_name: True}

    def write(root: Path, name: str) -> Path:
        labels = dict(PHANTOM_LABELS, **({"ignore": IGNORE_LABEL} if scribbled[name] else {}))
        return write_raw_dataset(
            root, name, {"0": "MRI"}, labels,
            training=[partial(phantom_case, s, scribbled[name], True, shape_yx) for s in train_seeds],
            test=[partial(phantom_case, s, scribbled[name], False, shape_yx) for s in test_seeds],
            num_processes=num_processes,
            extra_json={"description": "nnunet-weak synthetic short-axis cardiac phantom", "phantom_seed": seed})

    return write_datasets(Path(raw_root), Path(preprocessed_root), (dense_name, sparse_name), write,
                              overwrite=overwrite)


def convert_from_args(args) -> tuple[Path, Path]:
    raw, preprocessed = output_roots(args)
    return convert_phantom(raw, preprocessed, args.dense_id, args.id, args.num_train, args.test_count, args.seed,
                           (args.size, args.size), overwrite=args.overwrite, num_processes=args.np)
