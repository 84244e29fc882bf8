"""LA (left atrium, 2018 Atrial Segmentation Challenge; Xiong et al., MedIA 2021), semi-supervised by default.

Sources:

- the official layout: ``<ID>/lgemri.nrrd`` and ``<ID>/laendo.nrrd`` (atrium = 255);
- the UA-MT HDF5 layout used by most semi-supervised papers: ``<ID>/mri_norm2.h5`` with ``image``
  (x, y, z, z-scored, cropped) and ``label`` ({0, 1}); no spacing stored, so ``--spacing`` must be
  given (the originals are 0.625 mm isotropic).

The community's protocol: an ordered training list (UA-MT's ``train.list``; ``available.list`` in
this project's shared data) whose first N cases (4, 8 or 16) are labelled, the rest unlabelled, and
a test list. Output: the semi-supervised dataset and its dense twin, same cases and splits.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from nnunet_weak.errors import UserInputError
from nnunet_weak.raw_dataset import check_same_grid, integer_labels, read_volume
from nnunet_weak.dataset_conversion.twins import LoadedCase, output_roots, read_case_list, write_twins
from nnunet_weak.supervision_choice import choice_from_args

LA_LABELS = {"background": 0, "left_atrium": 1}


def load_official(folder: Path) -> LoadedCase:
    image_file, label_file = folder / "lgemri.nrrd", folder / "laendo.nrrd"
    for path in (image_file, label_file):
        if not path.is_file():
            raise UserInputError(f"{path} is missing (official LA layout: <ID>/lgemri.nrrd and <ID>/laendo.nrrd).")
    image, label = read_volume(image_file), read_volume(label_file)
    check_same_grid(image, label, folder.name)
    label_map = integer_labels(label[0], str(label_file))
    values = set(np.unique(label_map).tolist())
    if not values <= {0, 255}:
        raise UserInputError(f"{label_file} has values {sorted(values)}; the LA label uses 0 and 255.")
    return LoadedCase([image[0].astype(np.float32)], image[1], (label_map == 255).astype(np.uint8),
                      geometry=image[2])


def load_h5(path: Path, spacing_xyz: tuple[float, float, float]) -> LoadedCase:
    import h5py
    try:
        with h5py.File(path, "r") as f:
            image, label = f["image"][:], f["label"][:]
    except (OSError, KeyError) as e:
        raise UserInputError(f"{path} is not a readable UA-MT HDF5 volume with 'image' and 'label' ({e}).")
    if image.shape != label.shape:
        raise UserInputError(f"{path}: image {image.shape} and label {label.shape} differ in shape.")
    values = set(np.unique(label).tolist())
    if not values <= {0, 1}:
        raise UserInputError(f"{path}: label values {sorted(values)} are outside {{0, 1}}.")
    # stored (x, y, z); nnU-Net writes (z, y, x)
    return LoadedCase([np.ascontiguousarray(image.transpose(2, 1, 0)).astype(np.float32)],
                      tuple(reversed(spacing_xyz)), np.ascontiguousarray(label.transpose(2, 1, 0)).astype(np.uint8))


def convert_from_args(args) -> tuple[Path, Path]:
    raw, preprocessed = output_roots(args)
    if (args.official is None) == (args.h5 is None):
        raise UserInputError("Give exactly one source: --official DIR (<ID>/lgemri.nrrd) or --h5 DIR (<ID>/mri_norm2.h5).")
    source = Path(args.official or args.h5)
    if not source.is_dir():
        raise UserInputError(f"{source} does not exist.")
    if args.h5 is not None and args.spacing is None:
        raise UserInputError("UA-MT HDF5 files store no spacing: give it with --spacing X Y Z "
                             "(the LA originals are 0.625 0.625 0.625).")
    present = sorted(p.name for p in source.iterdir() if p.is_dir())
    order = read_case_list(Path(args.train_list)) if args.train_list else present
    test = read_case_list(Path(args.test_list)) if args.test_list else []
    missing = sorted(set(order + test) - set(present))
    if missing:
        raise UserInputError(f"Case(s) {missing[:3]} of the lists have no folder in {source}.")
    overlap = sorted(set(order) & set(test))
    if overlap:
        raise UserInputError(f"Case(s) {overlap[:3]} are in both the training and the test list.")

    def loader(case: str):
        if args.h5 is not None:
            return partial(load_h5, source / case / "mri_norm2.h5", tuple(args.spacing))
        return partial(load_official, source / case)

    from nnunetv2.utilities.crossval_split import generate_crossval_split
    if len(order) < 5:
        raise UserInputError(f"{len(order)} training cases cannot make nnU-Net's 5 folds.")
    choice = choice_from_args(args, order=order)
    return write_twins(
        raw, preprocessed, (f"Dataset{args.id:03d}_LA", f"Dataset{args.dense_id:03d}_LADense"), {"0": "LGE-MRI"},
        LA_LABELS, choice, training={c: loader(c) for c in order}, test={c: loader(c) for c in test},
        splits=generate_crossval_split(sorted(order), seed=12345, n_splits=5), overwrite=args.overwrite,
        num_processes=args.np,
        extra_json={"description": "Left atrium, 2018 Atrial Segmentation Challenge (Xiong et al., MedIA 2021)",
                    "training_list_order": order})
