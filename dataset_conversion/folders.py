"""A user's own data: folders of images, optional dense labels, optional scribbles.

Layout: ``--images`` holds ``<case>.nii.gz`` (one channel) or ``<case>_0000.nii.gz``,
``<case>_0001.nii.gz``, ... (several channels, nnU-Net's naming); ``--labels`` and ``--scribbles``
hold ``<case>.nii.gz``. Any format SimpleITK reads works (``--file_ending``).

- With dense labels for every case: a dataset with the chosen supervision (``--supervision``; real
  scribbles are used where given) and its dense twin, a seeded held-out test set and shared splits,
  as for the public datasets.
- Without dense labels: one dataset; cases with scribbles are sparse, the others unlabelled; no
  test set (nothing to score against). Scribbles mark un-annotated voxels with
  ``--scribble_ignore`` (default: number of classes + 1, the ignore label).
"""
from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Mapping

import numpy as np

from nnunet_weak.dataset_conversion.twins import (LoadedCase, case_record, held_out, output_roots, write_datasets,
                                                 write_test_only, write_twins)
from nnunet_weak.errors import UserInputError
from nnunet_weak.raw_dataset import CaseRecord, check_same_grid, integer_labels, read_volume, write_raw_dataset
from nnunet_weak.supervision_choice import choice_from_args


def find_images(folder: Path, ending: str) -> dict[str, list[Path]]:
    """Case id to its channel files, for single-channel ``<case>`` or nnU-Net ``<case>_XXXX`` names."""
    files = sorted(f for f in folder.iterdir() if f.name.endswith(ending))
    if not files:
        raise UserInputError(f"{folder} holds no '*{ending}' images.")
    stems = [f.name[: -len(ending)] for f in files]
    channel = re.compile(r"^(.+)_(\d{4})$")
    if all(channel.match(s) for s in stems):
        cases: dict[str, list[Path]] = {}
        for f, stem in zip(files, stems):
            cases.setdefault(channel.match(stem).group(1), []).append(f)
        counts = {len(v) for v in cases.values()}
        if len(counts) != 1:
            raise UserInputError(f"Cases in {folder} have different numbers of channels ({sorted(counts)}).")
        for case, channels in cases.items():
            expected = [folder / f"{case}_{c:04d}{ending}" for c in range(len(channels))]
            if channels != expected:
                raise UserInputError(f"Case '{case}' in {folder}: channels must be numbered _0000, _0001, ... "
                                     f"without gaps.")
        return cases
    with_channel = [f.name for f, s in zip(files, stems) if channel.match(s)]
    if with_channel:
        plain = next(f.name for f, s in zip(files, stems) if not channel.match(s))
        raise UserInputError(f"{folder} mixes nnU-Net channel names (<case>_0000{ending}, e.g. {with_channel[0]}) with "
                             f"plain case names (<case>{ending}, e.g. {plain}): {len(with_channel)} of {len(files)} "
                             f"files have a channel suffix. Name every image one way.")
    return {s: [f] for f, s in zip(files, stems)}


def load_own_case(images: list[Path], label: Path | None, scribble: Path | None, num_classes: int,
                  scribble_ignore: int) -> LoadedCase:
    """Channels, spacing, geometry, dense label (zeros if none) and the scribble mapped to ignore = classes + 1."""
    volumes = [read_volume(p) for p in images]
    for v, p in zip(volumes[1:], images[1:]):
        check_same_grid(volumes[0], v, p.name)
    dense = np.zeros(volumes[0][0].shape, np.uint8)
    if label is not None:
        label_volume = read_volume(label)
        check_same_grid(volumes[0], label_volume, label.name)
        label_map = integer_labels(label_volume[0], str(label))
        values = sorted(set(np.unique(label_map).tolist()))
        if values[0] < 0 or values[-1] > num_classes:
            raise UserInputError(f"{label} has values {values}; with {num_classes} classes they must lie in "
                                 f"0..{num_classes}.")
        dense = label_map.astype(np.uint8)
    real_weak = None
    if scribble is not None:
        scribble_volume = read_volume(scribble)
        check_same_grid(volumes[0], scribble_volume, scribble.name)
        scribble_map = integer_labels(scribble_volume[0], str(scribble))
        values = set(np.unique(scribble_map).tolist())
        unexpected = sorted(values - set(range(num_classes + 1)) - {scribble_ignore})
        if unexpected:
            raise UserInputError(f"{scribble} has values {unexpected}; scribbles use 0..{num_classes} and "
                                 f"{scribble_ignore} for un-annotated voxels.")
        real_weak = np.where(scribble_map == scribble_ignore, num_classes + 1, scribble_map).astype(np.uint8)
    return LoadedCase([v[0].astype(np.float32) for v in volumes], volumes[0][1], dense, real_weak, volumes[0][2])


def sparse_or_unlabelled_case(load, case: str, ignore_label: int) -> CaseRecord:
    """A case without dense label: its own scribble (sparse) or nothing (unlabelled)."""
    loaded = load()
    if loaded.real_weak is not None:
        return CaseRecord(case, list(loaded.channels), loaded.spacing, loaded.real_weak, supervision="sparse",
                          weak_label="scribble", provenance={"source": "user scribbles"}, geometry=loaded.geometry)
    return CaseRecord(case, list(loaded.channels), loaded.spacing, np.full(loaded.dense.shape, ignore_label, np.uint8),
                      supervision="unlabelled", geometry=loaded.geometry)


def convert_from_args(args) -> list[Path]:
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    raw, preprocessed = output_roots(args)
    ending = args.file_ending
    folders = {}
    for name in ("images", "labels", "scribbles", "test_images", "test_labels"):
        value = getattr(args, name)
        if value is not None and not Path(value).is_dir():
            raise UserInputError(f"--{name} folder {value} does not exist.")
        folders[name] = Path(value) if value is not None else None
    if folders["labels"] is not None and (args.dense_id is None) != args.test_only:
        raise UserInputError("--test_only writes one dataset: leave --dense_id out." if args.test_only else
                             "With --labels a dense twin is written too: give its id with --dense_id.")
    if folders["labels"] is None and folders["scribbles"] is None:
        raise UserInputError("Give dense labels (--labels), scribbles (--scribbles) or both.")
    if folders["labels"] is None and (args.test_count is not None or args.test_list or args.dense_id is not None):
        raise UserInputError("--test_count, --test_list and --dense_id need --labels: test cases drawn from --images "
                             "are scored on their dense labels, and the dense twin is made of them. Held-out test "
                             "cases of a scribble-only dataset go in --test_images and --test_labels.")
    if folders["scribbles"] is None and args.scribble_ignore is not None:
        raise UserInputError("--scribble_ignore is the un-annotated value of --scribbles; give the scribbles too.")
    if (folders["test_images"] is None) != (folders["test_labels"] is None):
        raise UserInputError("--test_images and --test_labels go together: held-out test cases are scored on dense "
                             "labels.")
    if folders["test_images"] is not None and (args.test_count is not None or args.test_list is not None):
        raise UserInputError("Choose the held-out test cases one way: --test_count, --test_list or --test_images.")
    images = find_images(folders["images"], ending)
    test_images = find_images(folders["test_images"], ending) if folders["test_images"] is not None else {}
    if set(test_images) & set(images):
        raise UserInputError(f"Case(s) {sorted(set(test_images) & set(images))[:3]} are in both --images and "
                             f"--test_images; a case is either for training or for testing.")
    channel_counts = {len(v) for v in [*images.values(), *test_images.values()]}
    if len(channel_counts) != 1:
        raise UserInputError(f"--images and --test_images have different numbers of channels ({sorted(channel_counts)}).")
    num_channels = channel_counts.pop()
    if args.channel_names and len(args.channel_names) != num_channels:
        raise UserInputError(f"{len(args.channel_names)} channel names for {num_channels} channels.")
    channel_names = {str(i): n for i, n in enumerate(args.channel_names or ["image"] * num_channels)}
    classes = {"background": 0, **{name: i + 1 for i, name in enumerate(args.classes)}}
    num_classes = len(args.classes)
    scribble_ignore = args.scribble_ignore if args.scribble_ignore is not None else num_classes + 1

    def files_in(folder: Path | None, cases: Mapping[str, list[Path]], option: str) -> dict[str, Path]:
        if folder is None:
            return {}
        found = {f.name[: -len(ending)]: f for f in folder.iterdir() if f.name.endswith(ending)}
        orphans = sorted(set(found) - set(cases))
        if orphans:
            raise UserInputError(f"{folder} has file(s) for case(s) without an image in {option}: {orphans[:3]}.")
        return found

    labels = files_in(folders["labels"], images, "--images")
    scribbles = files_in(folders["scribbles"], images, "--images")
    test_labels = files_in(folders["test_labels"], test_images, "--test_images")
    for cases, found, option in ((images, labels, "--labels"), (test_images, test_labels, "--test_labels")):
        missing = sorted(set(cases) - set(found)) if (found or option == "--test_labels") else []
        if missing:
            raise UserInputError(f"Case(s) {missing[:3]} have no dense label in {option}; every case there needs one"
                                 + (", or leave --labels out (scribbles only)." if option == "--labels" else "."))
    loaders = {c: partial(load_own_case, images[c], labels.get(c), scribbles.get(c), num_classes, scribble_ignore)
               for c in images}
    test_loaders = {c: partial(load_own_case, test_images[c], test_labels[c], None, num_classes, scribble_ignore)
                    for c in test_images}
    name = f"Dataset{args.id:03d}_{args.name}"
    if args.test_only:
        if folders["labels"] is None or folders["scribbles"] is not None or test_images or \
                args.test_count is not None or args.test_list is not None:
            raise UserInputError("--test_only writes every case of --images with its dense label from --labels as a "
                                 "held-out test case; --scribbles, --test_images, --test_count and --test_list do "
                                 "not apply.")
        return list(write_test_only(raw, preprocessed, name, channel_names, classes, loaders, args.overwrite, args.np))
    if folders["labels"] is not None:
        choice = choice_from_args(args)
        train, test = held_out(sorted(images), args.test_count, 0, args.test_list, choice.seed)
        test_loaders.update({c: loaders[c] for c in test})
        return list(write_twins(raw, preprocessed, (name, f"Dataset{args.dense_id:03d}_{args.name}Dense"),
                                channel_names, classes, choice, {c: loaders[c] for c in train}, test_loaders,
                                generate_crossval_split(train, seed=12345, n_splits=5), args.overwrite, args.np))
    ignore = num_classes + 1

    def write(root: Path, dataset: str) -> Path:
        return write_raw_dataset(root, dataset, channel_names, dict(classes, ignore=ignore),
                                 [partial(sparse_or_unlabelled_case, loaders[c], c, ignore) for c in sorted(images)],
                                 test=[partial(case_record, test_loaders[c], c, None, False, ignore)
                                       for c in sorted(test_loaders)],
                                 file_ending=".nii.gz", num_processes=args.np)

    return list(write_datasets(raw, preprocessed, (name,), write, overwrite=args.overwrite))
