"""CHAOS abdominal MRI (liver, right kidney, left kidney, spleen; Kavur et al., MedIA 2021).

Sources:

- the official release: per subject ``<ID>/T2SPIR/DICOM_anon/*.dcm`` with ``<ID>/T2SPIR/Ground/*.png``,
  or ``<ID>/T1DUAL/DICOM_anon/{InPhase,OutPhase}/*.dcm`` with ``<ID>/T1DUAL/Ground/*.png`` (two
  channels); ground-truth PNG slices with liver 63, right kidney 126, left kidney 189, spleen 252,
  each named like its DICOM slice;
- the pre-processed NIfTI layout: ``image_<id>.nii.gz`` and ``label_<id>.nii.gz`` (labels 0..4).

No scribbles exist for CHAOS: weak labels are generated (``--weak_label``). Output: the dataset with
the chosen supervision and its dense twin, with held-out test subjects and shared splits.
"""
from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_weak.dataset_conversion.twins import LoadedCase, held_out, output_roots, write_twins
from nnunet_weak.errors import UserInputError
from nnunet_weak.raw_dataset import Geometry, check_same_grid, integer_labels, read_volume
from nnunet_weak.supervision_choice import choice_from_args

CHAOS_LABELS = {"background": 0, "liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
TEST_SUBJECTS = 4  # held out unless --test_count or --test_list says otherwise
PNG_VALUES = {0: 0, 63: 1, 126: 2, 189: 3, 252: 4}


def _dicom_series(folder: Path) -> tuple[list[str], sitk.Image]:
    """The slices of the DICOM series in ``folder``, in geometric order, and the series as an image."""
    if not folder.is_dir():
        raise UserInputError(f"{folder} is missing (official CHAOS layout).")
    reader = sitk.ImageSeriesReader()
    files = list(reader.GetGDCMSeriesFileNames(str(folder)))
    if not files:
        raise UserInputError(f"{folder} holds no readable DICOM series.")
    reader.SetFileNames(files)
    try:
        return files, reader.Execute()
    except RuntimeError as e:
        raise UserInputError(f"The DICOM series in {folder} cannot be read ({str(e).strip().splitlines()[-1]}).")


def _ground_truth(files: list[str], ground: Path, shape_yx: tuple[int, int]) -> np.ndarray:
    """The PNG ground truth stacked in the order of the DICOM slices it is named after."""
    from PIL import Image
    slices = []
    for f in files:
        png = ground / (Path(f).stem + ".png")
        if not png.is_file():
            raise UserInputError(f"{png} is missing: every DICOM slice needs its ground-truth PNG.")
        try:
            values = np.asarray(Image.open(png).convert("L"))
        except OSError:
            raise UserInputError(f"{png} is not a readable PNG.")
        if values.shape != shape_yx:
            raise UserInputError(f"{png} is {values.shape}, its DICOM slice {shape_yx}.")
        unknown = sorted(set(np.unique(values).tolist()) - set(PNG_VALUES))
        if unknown:
            raise UserInputError(f"{png} has values {unknown}; CHAOS ground truth uses 0, 63, 126, 189, 252.")
        slices.append(np.vectorize(PNG_VALUES.get, otypes=[np.uint8])(values))
    return np.stack(slices)


def load_official_subject(folder: Path, modality: str) -> LoadedCase:
    base = folder / modality
    if modality == "T2SPIR":
        files, image = _dicom_series(base / "DICOM_anon")
        images = [image]
    else:
        files, in_phase = _dicom_series(base / "DICOM_anon" / "InPhase")
        _, out_phase = _dicom_series(base / "DICOM_anon" / "OutPhase")
        if in_phase.GetSize() != out_phase.GetSize():
            raise UserInputError(f"{folder.name}: in-phase {in_phase.GetSize()} and out-phase "
                                 f"{out_phase.GetSize()} series differ in size.")
        images = [in_phase, out_phase]
    channels = [sitk.GetArrayFromImage(i).astype(np.float32) for i in images]
    label = _ground_truth(files, base / "Ground", channels[0].shape[1:])
    return LoadedCase(channels, tuple(float(s) for s in reversed(images[0].GetSpacing())), label,
                      geometry=Geometry.of(images[0]))


def load_nifti_subject(image_file: Path, label_file: Path) -> LoadedCase:
    image, label = read_volume(image_file), read_volume(label_file)
    check_same_grid(image, label, image_file.name)
    label_map = integer_labels(label[0], str(label_file))
    values = set(np.unique(label_map).tolist())
    if not values <= set(CHAOS_LABELS.values()):
        raise UserInputError(f"{label_file} has values {sorted(values)} outside 0..4.")
    return LoadedCase([image[0].astype(np.float32)], image[1], label_map.astype(np.uint8), geometry=image[2])


def modality(args) -> str:
    """The sequence converted: ``--modality`` of the official layout (default T2SPIR); the NIfTI layout's one."""
    if args.nifti is not None and args.modality is not None:
        raise UserInputError("--modality chooses a sequence of the --official layout; the --nifti layout holds one "
                             "(written as T2SPIR).")
    return args.modality or "T2SPIR"


def find_subjects(args) -> tuple[dict, dict[str, str]]:
    """Case id to loader, and the channel names, for the layout given on the command line."""
    if (args.official is None) == (args.nifti is None):
        raise UserInputError("Give exactly one source: --official DIR (<ID>/T2SPIR or T1DUAL) or --nifti DIR.")
    source = Path(args.official or args.nifti)
    if not source.is_dir():
        raise UserInputError(f"{source} does not exist.")
    if args.nifti is not None:
        loaders = {}
        for image in sorted(source.glob("image_*.nii.gz")):
            subject = re.match(r"^image_(.+)\.nii\.gz$", image.name).group(1)
            label = source / f"label_{subject}.nii.gz"
            if not label.is_file():
                raise UserInputError(f"{label} is missing for {image.name}.")
            loaders[f"chaos_{subject}"] = partial(load_nifti_subject, image, label)
        orphans = sorted(p.name for p in source.glob("label_*.nii.gz")
                         if not (source / p.name.replace("label_", "image_", 1)).is_file())
        if orphans:
            raise UserInputError(f"Label file(s) without an image: {orphans[:3]} in {source}.")
        channels = {"0": "T2SPIR"}
    else:
        subjects = sorted(p for p in source.iterdir() if (p / modality(args)).is_dir())
        loaders = {f"chaos_{p.name}": partial(load_official_subject, p, modality(args)) for p in subjects}
        channels = {"0": "T2SPIR"} if modality(args) == "T2SPIR" else {"0": "T1_in_phase", "1": "T1_out_phase"}
    if not loaders:
        raise UserInputError(f"{source} holds no CHAOS subjects in the {'NIfTI' if args.nifti else 'official'} layout.")
    return loaders, channels


def convert_from_args(args) -> tuple[Path, Path]:
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    raw, preprocessed = output_roots(args)
    loaders, channels = find_subjects(args)
    choice = choice_from_args(args)
    train, test = held_out(sorted(loaders), args.test_count, TEST_SUBJECTS, args.test_list, choice.seed)
    return write_twins(
        raw, preprocessed, (f"Dataset{args.id:03d}_CHAOS", f"Dataset{args.dense_id:03d}_CHAOSDense"), channels,
        CHAOS_LABELS, choice, training={s: loaders[s] for s in train}, test={s: loaders[s] for s in test},
        splits=generate_crossval_split(train, seed=12345, n_splits=5), overwrite=args.overwrite,
        num_processes=args.np,
        extra_json={"description": f"CHAOS MRI {modality(args)} (Kavur et al., MedIA 2021)"})
