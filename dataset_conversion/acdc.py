"""ACDC (cine MRI: RV, myocardium, LV cavity) as a scribble dataset and its dense twin.

Sources, in the layouts people download:

- the official challenge layout: ``patientXXX/`` folders with ``Info.cfg`` (``ED:`` and ``ES:`` frame
  numbers), ``patientXXX_frameYY.nii.gz`` and ``patientXXX_frameYY_gt.nii.gz``;
- the WSL4MIS / SSL4MIS HDF5 layout: ``patientXXX_frameYY.h5`` with ``image``, ``label`` and
  ``scribble`` (axes z, y, x; no spacing stored: it comes from a spacing table
  ``case,spacing_x_mm,spacing_y_mm,spacing_z_mm`` or from the scribble NIfTIs, never guessed).

Scribbles: the hand-drawn ones of Valvano et al. (``patientXXX_frameYY_scribble.nii.gz``, or the
``scribble`` array of the HDF5 files; value 4 = not annotated) when given, else simulated from the
dense labels. Output: ``Dataset027_ACDC`` (scribbles in ``labelsTr``, dense labels in
``labelsTr_dense``) and its dense twin (same images, same cases), each with a held-out test set of
whole patients in ``imagesTs``/``labelsTs``, and the same patient-grouped 5-fold split written as
``splits_final.json`` for both (ED and ES of one patient never sit on both sides).
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_weak.errors import UserInputError
from nnunet_weak.raw_dataset import check_same_grid, integer_labels, read_volume
from nnunet_weak.dataset_conversion.twins import LoadedCase, held_out, output_roots, write_test_only, write_twins
from nnunet_weak.supervision_choice import SupervisionChoice, choice_from_args

ACDC_LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
IGNORE_LABEL = 4
TEST_PATIENTS = 20  # whole patients held out unless --test_count or --test_list says otherwise
CASE_PATTERN = re.compile(r"^(patient\d{3})_frame(\d{2})$")


@dataclass(frozen=True)
class AcdcFrame:
    """Where one ACDC frame (ED or ES of a patient) is, in whichever layout.

    Attributes:
        case: ``patientXXX_frameYY``.
        image: the image NIfTI (official layout) or the HDF5 file.
        label: the dense label NIfTI (official layout), ``None`` for HDF5 (label inside the file).
        scribble: the scribble NIfTI, if given.
        spacing: (z, y, x) in mm for HDF5 frames (from the table or the scribble NIfTI); ``None``
            for NIfTI frames (read from the header).
    """

    case: str
    image: Path
    label: Path | None
    scribble: Path | None
    spacing: tuple[float, float, float] | None

    @property
    def patient(self) -> str:
        return CASE_PATTERN.match(self.case).group(1)


def _read_info_cfg(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise UserInputError(f"{path} is missing: the official ACDC layout has an Info.cfg per patient "
                             f"giving the ED and ES frame numbers.")
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, _, value = line.partition(":")
        values[key.strip()] = value.strip()
    try:
        return {"ED": int(values["ED"]), "ES": int(values["ES"])}
    except (KeyError, ValueError):
        raise UserInputError(f"{path} does not give integer 'ED:' and 'ES:' frame numbers.")


def _scribble_file(scribbles: Path | None, case: str) -> Path | None:
    if scribbles is None:
        return None
    path = scribbles / f"{case}_scribble.nii.gz"
    return path if path.is_file() else None


def find_official_frames(folder: Path, scribbles: Path | None = None) -> list[AcdcFrame]:
    """ED and ES frames of every ``patientXXX`` folder of the official layout."""
    patients = sorted(p for p in folder.iterdir() if p.is_dir() and re.match(r"^patient\d{3}$", p.name))
    if not patients:
        raise UserInputError(f"{folder} holds no patientXXX folders (official ACDC layout).")
    frames = []
    for patient in patients:
        info = _read_info_cfg(patient / "Info.cfg")
        for number in sorted(set(info.values())):
            case = f"{patient.name}_frame{number:02d}"
            image, label = patient / f"{case}.nii.gz", patient / f"{case}_gt.nii.gz"
            for path, what in ((image, "image"), (label, "ground truth")):
                if not path.is_file():
                    raise UserInputError(f"{path} is missing: Info.cfg lists frame {number} of {patient.name}, "
                                         f"so its {what} must be there.")
            frames.append(AcdcFrame(case, image, label, _scribble_file(scribbles, case), None))
    return frames


def read_spacing_table(path: Path) -> dict[str, tuple[float, float, float]]:
    """``case,spacing_x_mm,spacing_y_mm,spacing_z_mm`` rows to (z, y, x) spacings."""
    if not path.is_file():
        raise UserInputError(f"Spacing table {path} does not exist.")
    spacings = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                spacings[row["case"]] = (float(row["spacing_z_mm"]), float(row["spacing_y_mm"]),
                                         float(row["spacing_x_mm"]))
            except (KeyError, ValueError):
                raise UserInputError(f"{path}: each row needs case, spacing_x_mm, spacing_y_mm, spacing_z_mm.")
    return spacings


def find_h5_frames(folder: Path, spacing_table: Path | None = None,
                   scribbles: Path | None = None) -> list[AcdcFrame]:
    """HDF5 frames of the WSL4MIS layout (``folder`` or ``folder/volumes``), with their spacing."""
    volumes = folder / "volumes" if (folder / "volumes").is_dir() else folder
    files = sorted(f for f in volumes.glob("*.h5") if CASE_PATTERN.match(f.stem))
    if not files:
        raise UserInputError(f"{volumes} holds no patientXXX_frameYY.h5 files (WSL4MIS layout).")
    table = read_spacing_table(spacing_table) if spacing_table is not None else {}
    frames = []
    for f in files:
        scribble = _scribble_file(scribbles, f.stem)
        if f.stem in table:
            spacing = table[f.stem]
        elif scribble is not None:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(scribble))
            reader.ReadImageInformation()
            spacing = tuple(float(s) for s in reversed(reader.GetSpacing()))
        else:
            raise UserInputError(
                f"No spacing for {f.name}: HDF5 files store none. Give a spacing table (--spacing) with a "
                f"row for {f.stem}, or the scribble NIfTIs (--scribbles), whose headers have it."
            )
        frames.append(AcdcFrame(f.stem, f, None, scribble, spacing))
    return frames


def load_frame(frame: AcdcFrame) -> LoadedCase:
    """Image, dense label, real scribble (or ``None``) and (z, y, x) spacing of one frame."""
    geometry = None
    if frame.label is not None:
        image_volume, label_volume = read_volume(frame.image), read_volume(frame.label)
        check_same_grid(image_volume, label_volume, frame.case)
        (image, spacing, geometry), label = image_volume, label_volume[0]
        scribble = None
    else:
        import h5py
        try:
            with h5py.File(frame.image, "r") as f:
                image, label = f["image"][:], f["label"][:]
                scribble = f["scribble"][:] if "scribble" in f else None
        except (OSError, KeyError) as e:
            raise UserInputError(f"{frame.image} is not a readable WSL4MIS HDF5 volume with 'image' and 'label' "
                                 f"({e}).")
        spacing = frame.spacing
    if frame.scribble is not None:
        scribble_volume = read_volume(frame.scribble)
        if geometry is not None:
            check_same_grid((image, spacing, geometry), scribble_volume, f"{frame.case} scribble")
        scribble = scribble_volume[0]
    for name, array in (("label", label), ("scribble", scribble)):
        if array is not None and array.shape != image.shape:
            raise UserInputError(f"{frame.case}: {name} shape {array.shape} differs from image shape {image.shape}.")
    label = integer_labels(label, f"{frame.case}: the dense label")
    if scribble is not None:
        scribble = integer_labels(scribble, f"{frame.case}: the scribble")
    if label.min() < 0 or label.max() >= IGNORE_LABEL:
        raise UserInputError(f"{frame.case}: dense label values {sorted(np.unique(label).tolist())} are outside "
                             f"0..3 (background, RV, MYO, LV).")
    if scribble is not None and (scribble.min() < 0 or scribble.max() > IGNORE_LABEL):
        raise UserInputError(f"{frame.case}: scribble values {sorted(np.unique(scribble).tolist())} are outside "
                             f"0..4 (4 = not annotated).")
    return LoadedCase([image.astype(np.float32)], spacing, label.astype(np.uint8), scribble, geometry)


def patient_grouped_splits(cases: list[str], seed: int = 12345, n_folds: int = 5) -> list[dict]:
    """nnU-Net-style folds in which all frames of a patient fall on the same side."""
    by_patient: dict[str, list[str]] = {}
    for case in sorted(cases):
        by_patient.setdefault(CASE_PATTERN.match(case).group(1), []).append(case)
    patients = sorted(by_patient)
    if len(patients) < n_folds:
        raise UserInputError(f"{len(patients)} training patients cannot make {n_folds} folds.")
    order = np.random.RandomState(seed).permutation(len(patients))
    folds = [sorted(patients[i] for i in order[k::n_folds]) for k in range(n_folds)]
    return [{"train": sorted(c for p in patients if p not in set(val) for c in by_patient[p]),
             "val": sorted(c for p in val for c in by_patient[p])} for val in folds]


def convert_acdc(frames: list[AcdcFrame], raw_root: Path, preprocessed_root: Path,
                 choice: SupervisionChoice = SupervisionChoice(), scribble_id: int = 27, dense_id: int = 127,
                 num_test_patients: int | None = None, overwrite: bool = False,
                 num_processes: int = 1, test_list: str | None = None) -> tuple[Path, Path]:
    """Write the ACDC dataset with the chosen supervision and its dense twin; return their raw folders.

    Args:
        frames: the frames found by ``find_official_frames`` or ``find_h5_frames``.
        raw_root, preprocessed_root: nnU-Net's folders (the splits go to the preprocessed one).
        choice: the supervision of the first dataset (default: scribbles, hand-drawn when given).
        scribble_id, dense_id: dataset ids.
        num_test_patients: whole patients (chosen with ``choice.seed``) held out in ``imagesTs``/``labelsTs``
            (default ``TEST_PATIENTS``).
        test_list: a file of the patients to hold out instead (e.g. ``patient001``), pinned rather than drawn.
    """
    cases = [f.case for f in frames]
    duplicates = sorted({c for c in cases if cases.count(c) > 1})
    if duplicates:
        raise UserInputError(f"Duplicate case ids: {duplicates[:3]}.")
    _, test_patients = held_out(sorted({f.patient for f in frames}), num_test_patients, TEST_PATIENTS, test_list,
                                choice.seed)
    train_frames = [f for f in frames if f.patient not in test_patients]
    test_frames = [f for f in frames if f.patient in test_patients]
    folders = write_twins(
        raw_root, preprocessed_root, (f"Dataset{scribble_id:03d}_ACDC", f"Dataset{dense_id:03d}_ACDCDense"),
        {"0": "cineMRI"}, ACDC_LABELS, choice,
        training={f.case: partial(load_frame, f) for f in train_frames},
        test={f.case: partial(load_frame, f) for f in test_frames},
        splits=patient_grouped_splits([f.case for f in train_frames]),
        overwrite=overwrite, num_processes=num_processes,
        extra_json={"description": "ACDC (Bernard et al., IEEE TMI 2018); hand-drawn scribbles: Valvano et "
                                   "al., IEEE TMI 2021", "test_patients": test_patients})
    print(f"{len(train_frames)} training frames, {len(test_frames)} test frames of {len(test_patients)} patients; "
          f"the manifests record which scribbles are hand-drawn and which simulated.")
    return folders


def convert_from_args(args) -> tuple[Path, Path]:
    raw, preprocessed = output_roots(args)
    scribbles = Path(args.scribbles) if args.scribbles else None
    if scribbles is not None and not scribbles.is_dir():
        raise UserInputError(f"Scribble folder {scribbles} does not exist.")
    if (args.official is None) == (args.h5 is None):
        raise UserInputError("Give exactly one source: --official DIR (patientXXX folders) or --h5 DIR.")
    if args.official is not None:
        if args.spacing is not None:
            raise UserInputError("--spacing is for --h5 volumes; the official NIfTI files carry their spacing.")
        source = Path(args.official)
        if not source.is_dir():
            raise UserInputError(f"{source} does not exist.")
        frames = find_official_frames(source, scribbles)
    else:
        source = Path(args.h5)
        if not source.is_dir():
            raise UserInputError(f"{source} does not exist.")
        frames = find_h5_frames(source, Path(args.spacing) if args.spacing else None, scribbles)
    if scribbles is not None:
        known = {f.case for f in frames}
        orphans = sorted(p.name for p in scribbles.glob("*_scribble.nii.gz")
                         if p.name[: -len("_scribble.nii.gz")] not in known)
        if orphans:
            raise UserInputError(f"Scribble file(s) without an image: {orphans[:3]} in {scribbles}.")
    if args.test_only:
        if args.test_count is not None or args.test_list is not None:
            raise UserInputError("--test_only holds out every patient; --test_count and --test_list do not apply.")
        return write_test_only(raw, preprocessed, f"Dataset{args.id:03d}_ACDCTest", {"0": "cineMRI"}, ACDC_LABELS,
                               {f.case: partial(load_frame, f) for f in frames}, args.overwrite, args.np,
                               extra_json={"description": "ACDC (Bernard et al., IEEE TMI 2018), held-out cases only"})
    return convert_acdc(frames, raw, preprocessed, choice_from_args(args), args.id, args.dense_id, args.test_count,
                        args.overwrite, args.np, args.test_list)
