"""Reading and writing nnU-Net raw datasets (``nnUNet_raw/DatasetXXX_Name``), with their manifest.

``load_raw_dataset`` is the single entry point that checks a dataset before anything else touches
it (``dataset.json`` present and sane, ignore label the highest, manifest consistent). ``write_raw_dataset``
is what every converter uses to produce one: it writes into a temporary folder and moves it into
place only when complete.
"""
from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, Union

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunet_weak.atomic import staged_directory, write_json_atomic
from nnunet_weak.environment import required_folder
from nnunet_weak.errors import UserInputError
from nnunet_weak.supervision import (CaseSupervision, SupervisionManifest, read_manifest,
                                     validate_manifest)

DATASET_NAME_PATTERN = re.compile(r"^Dataset(\d{3})_[A-Za-z0-9_\-]+$")


def dataset_name_from_id(dataset: int | str) -> str:
    """``DatasetXXX_Name`` for an id (``27``, ``"027"``) or a full name, found in nnU-Net's folders."""
    text = str(dataset)
    if DATASET_NAME_PATTERN.match(text):
        return text
    if not text.isdigit():
        raise UserInputError(
            f"'{dataset}' is neither a dataset id (e.g. 27) nor a dataset name (e.g. Dataset027_ACDC)."
        )
    from nnunetv2.utilities.dataset_name_id_conversion import find_candidate_datasets
    candidates = sorted(find_candidate_datasets(int(text)))
    if not candidates:
        raise UserInputError(
            f"No dataset with id {int(text)} in nnUNet_raw ({os.environ.get('nnUNet_raw')}), "
            f"nnUNet_preprocessed or nnUNet_results. Convert one first (`nnunet-weak convert ...`) "
            f"or check the environment (`nnunet-weak env`)."
        )
    if len(candidates) > 1:
        raise UserInputError(
            f"Dataset id {int(text)} is used by several datasets: {candidates}. Give each dataset "
            f"its own id."
        )
    return str(candidates[0])


@dataclass(frozen=True)
class RawDataset:
    """A checked raw dataset: its folder, ``dataset.json``, training cases and manifest."""

    folder: Path
    dataset_json: Mapping
    training_cases: Sequence[str]
    manifest: SupervisionManifest | None

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def file_ending(self) -> str:
        return self.dataset_json["file_ending"]

    @property
    def ignore_label(self) -> int | None:
        return self.dataset_json["labels"].get("ignore")

    @property
    def class_labels(self) -> dict[str, int]:
        """Foreground classes, name to value (no background, no ignore label)."""
        return {k: int(v) for k, v in self.dataset_json["labels"].items()
                if k not in ("background", "ignore")}

    def training_images(self, case: str) -> list[Path]:
        """The channel images of a training case in ``imagesTr``, in channel order."""
        return [self.folder / "imagesTr" / f"{case}_{c:04d}{self.file_ending}"
                for c in range(len(self.dataset_json["channel_names"]))]

    def dense_label_path(self, case: str) -> Path | None:
        """Where the dense label of a training case is, or ``None`` when it has none.

        With a manifest, the manifest says. Without one, a dataset without ignore label has dense
        ``labelsTr``; a dataset with one has no dense labels.
        """
        if self.manifest is not None:
            return self.manifest.dense_label_path(self.folder, case)
        if self.ignore_label is None:
            return self.folder / "labelsTr" / f"{case}{self.file_ending}"
        return None

    def test_cases(self) -> dict[str, tuple[list[Path], Path | None]]:
        """Test cases: identifier to (channel images in imagesTs, dense label in labelsTs or None)."""
        images_ts = self.folder / "imagesTs"
        if not images_ts.is_dir():
            return {}
        channels = len(self.dataset_json["channel_names"])
        ending = self.file_ending
        cases = {}
        for f in sorted(images_ts.iterdir()):
            m = re.match(rf"^(.+)_0000{re.escape(ending)}$", f.name)
            if m is None:
                continue
            case = m.group(1)
            images = [images_ts / f"{case}_{c:04d}{ending}" for c in range(channels)]
            label = self.folder / "labelsTs" / f"{case}{ending}"
            cases[case] = (images, label if label.is_file() else None)
        return cases


def check_labels(labels: Mapping, source: str) -> None:
    """Check the ``labels`` entry of a ``dataset.json``; raise a clear error when it is unusable."""
    if not isinstance(labels, Mapping) or labels.get("background") != 0:
        raise UserInputError(f"{source}: \"labels\" must map \"background\" to 0.")
    values = {}
    for name, value in labels.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserInputError(
                f"{source}: label '{name}' has value {value!r}; nnunet-weak supports integer labels "
                f"(region-based training is not supported)."
            )
        if value in values:
            raise UserInputError(f"{source}: labels '{values[value]}' and '{name}' share the value {value}.")
        values[value] = name
    ignore = labels.get("ignore")
    if ignore is not None:
        highest = max(v for k, v in labels.items() if k != "ignore")
        if ignore != highest + 1:
            raise UserInputError(
                f"{source}: the ignore label is {ignore} but must be the highest label + 1 "
                f"({highest + 1}), as nnU-Net requires. Relabel the un-annotated voxels to "
                f"{highest + 1} and set \"ignore\": {highest + 1}."
            )


def load_raw_dataset(dataset: int | str | os.PathLike) -> RawDataset:
    """Load and check a raw dataset given by id, name (under ``nnUNet_raw``) or folder path."""
    if isinstance(dataset, os.PathLike) or (isinstance(dataset, str) and os.sep in dataset):
        folder = Path(dataset)
    else:
        folder = required_folder("nnUNet_raw") / dataset_name_from_id(dataset)
    if not folder.is_dir():
        raise UserInputError(f"Dataset folder {folder} does not exist.")
    json_file = folder / "dataset.json"
    if not json_file.is_file():
        raise UserInputError(
            f"{folder} has no dataset.json. An nnU-Net raw dataset needs one (see nnU-Net's "
            f"dataset_format documentation), or convert your data with `nnunet-weak convert`."
        )
    try:
        dataset_json = json.loads(json_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserInputError(f"{json_file} is not valid JSON: {e}.")
    for key in ("channel_names", "labels", "file_ending"):
        if key not in dataset_json:
            raise UserInputError(f"{json_file} has no \"{key}\" entry.")
    check_labels(dataset_json["labels"], str(json_file))

    labels_tr = folder / "labelsTr"
    ending = dataset_json["file_ending"]
    # a test-only dataset (numTraining 0: cases for prediction and scoring, e.g. a release's test set)
    test_only = dataset_json.get("numTraining") == 0 and (folder / "imagesTs").is_dir()
    if not labels_tr.is_dir() and not test_only:
        raise UserInputError(f"{folder} has no labelsTr folder.")
    training_cases = sorted(f.name[: -len(ending)] for f in labels_tr.iterdir() if f.name.endswith(ending)) \
        if labels_tr.is_dir() else []
    if not training_cases and not test_only:
        raise UserInputError(f"{labels_tr} holds no '*{ending}' label files.")
    manifest = read_manifest(folder)
    dataset = RawDataset(folder, dataset_json, training_cases, manifest)
    for case in training_cases:
        for image in dataset.training_images(case):
            if not image.is_file():
                raise UserInputError(f"Training case '{case}' has a label but no image {image}.")
    if manifest is not None:
        validate_manifest(manifest, folder, training_cases, "ignore" in dataset_json["labels"])
    return dataset


@dataclass(frozen=True)
class Geometry:
    """Where a volume lies in the scanner: SimpleITK's origin and direction (x, y, z order)."""

    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(tuple(image.GetOrigin()), tuple(image.GetDirection()))


def _nifti_size_promised(header: bytes) -> int | None:
    """Header plus voxel bytes a NIfTI-1/-2 header promises (``vox_offset + voxels × bitpix / 8``); ``None``
    if ``header`` is not a NIfTI header."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            dims = struct.unpack(endian + "8q", header[16:80])
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    voxels = int(np.prod([max(1, d) for d in dims[1:1 + max(0, min(dims[0], 7))]]))
    return max(offset, 348) + voxels * bitpix // 8


def _gzip_trailer_matches_header(path: Path) -> bool:
    """Whether a ``.nii.gz``'s gzip trailer (ISIZE: uncompressed size mod 2³²) equals its NIfTI header's promise."""
    try:
        with gzip.open(path, "rb") as stream:
            promised = _nifti_size_promised(stream.read(540))
        with open(path, "rb") as raw:
            raw.seek(-4, os.SEEK_END)
            recorded = struct.unpack("<I", raw.read(4))[0]
    except (EOFError, OSError, zlib.error):
        return False
    return promised is not None and recorded == promised % (1 << 32)


def check_file_complete(path: Path) -> None:
    """Refuse a NIfTI file cut short, compressed or not, and a gzip stream that does not end with its checksum.

    SimpleITK reads a truncated ``.nii``/``.nii.gz`` without complaint and fills what is missing with
    zeros; a label read that way loses classes silently. NRRD, DICOM, PNG and HDF5 readers fail on
    their own.

    A ``.nii.gz`` whose gzip trailer records the uncompressed size its NIfTI header promises (modulo 2³²) is
    taken as whole without decompressing it; a cut file's last bytes are compressed data, which match that
    size by chance once in 2³². Any other ``.gz`` is decompressed to its end, which checks its CRC.
    """
    name = path.name.lower()
    if not name.endswith((".gz", ".nii")):
        return
    fix = "Replace it with an intact copy (download or copy it again)."
    if name.endswith(".nii.gz") and _gzip_trailer_matches_header(path):
        return
    if name.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as stream:
                header = stream.read(540)
                size = len(header)
                while chunk := stream.read(1 << 22):
                    size += len(chunk)
        except (EOFError, OSError, zlib.error) as e:
            raise UserInputError(f"{path} is incomplete or corrupt: its gzip stream does not end properly ({e}). "
                                 f"{fix}") from None
    else:
        with open(path, "rb") as stream:
            header = stream.read(540)
        size = path.stat().st_size
    promised = _nifti_size_promised(header) if name.endswith((".nii", ".nii.gz")) else None
    if promised is not None and size < promised:
        raise UserInputError(f"{path} is cut short: its header promises {promised} bytes, the file holds {size}"
                             f"{' after decompression' if name.endswith('.gz') else ''}. {fix}")


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, ...], Geometry]:
    """A (z, y, x) array, its (z, y, x) spacing in mm and its geometry, from any file SimpleITK reads
    (checked complete first: ``check_file_complete``)."""
    if not Path(path).is_file():
        raise UserInputError(f"{path} does not exist.")
    check_file_complete(Path(path))
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise UserInputError(f"{path} cannot be read as an image ({str(e).strip().splitlines()[-1]}). "
                             f"Replace it with an intact copy.")
    return (sitk.GetArrayFromImage(image), tuple(float(s) for s in reversed(image.GetSpacing())),
            Geometry.of(image))


def check_same_grid(image: tuple, label: tuple, what: str, names: tuple[str, str] = ("image", "label")) -> None:
    """Refuse an image and a label (as returned by ``read_volume``) that differ in shape, spacing, origin or
    direction: a label written with its image's geometry would otherwise be shifted or mirrored silently.
    ``names`` says what the two are in the message.

    Tolerances: spacing 0.1 %, origin 1 % of the smallest voxel side, direction cosines 1e-3.
    """
    (image_array, image_spacing, image_geometry), (label_array, label_spacing, label_geometry) = image, label
    first, second = names
    if image_array.shape != label_array.shape or not np.allclose(image_spacing, label_spacing, rtol=1e-3):
        raise UserInputError(f"{what}: {first} {image_array.shape} / {image_spacing} mm and {second} "
                             f"{label_array.shape} / {label_spacing} mm differ in shape or spacing.")
    origin_tolerance = 0.01 * min(image_spacing)
    if not np.allclose(image_geometry.origin, label_geometry.origin, rtol=0, atol=origin_tolerance):
        raise UserInputError(f"{what}: the {second}'s origin {label_geometry.origin} differs from the {first}'s "
                             f"{image_geometry.origin} by more than {origin_tolerance:.3g} mm: it lies elsewhere in "
                             f"the scanner. Resample it onto the {first}'s grid or fix its header.")
    if not np.allclose(image_geometry.direction, label_geometry.direction, rtol=0, atol=1e-3):
        raise UserInputError(f"{what}: the {second}'s direction {label_geometry.direction} differs from the "
                             f"{first}'s {image_geometry.direction}: on the {first}'s grid it would be mirrored or "
                             f"rotated. Resample it onto the {first}'s grid or fix its header.")


def integer_labels(array: np.ndarray, what: str) -> np.ndarray:
    """``array`` as ``int64``, refusing values that are not whole numbers (a cast would merge or drop classes)."""
    if not np.issubdtype(array.dtype, np.integer):
        fractional = np.unique(array[~np.isclose(array, np.round(array), rtol=0, atol=1e-6)])
        if fractional.size:
            raise UserInputError(f"{what} holds non-integer values, e.g. {fractional[:5].tolist()}: a label map holds "
                                 f"whole class numbers. Was it resampled with linear interpolation or saved from an "
                                 f"image? Use nearest-neighbour resampling.")
        array = np.round(array)
    return array.astype(np.int64)


def write_volume(array: np.ndarray, spacing: Sequence[float], path: str | os.PathLike,
                 geometry: Geometry | None = None) -> None:
    """Write a (z, y, x) array with (z, y, x) spacing in mm as an image file (e.g. ``.nii.gz``),
    keeping the source's origin and orientation when ``geometry`` is given."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in reversed(spacing)])
    if geometry is not None:
        image.SetOrigin(geometry.origin)
        image.SetDirection(geometry.direction)
    sitk.WriteImage(image, str(path), useCompression=True)


@dataclass
class CaseRecord:
    """One case to write into a raw dataset.

    Attributes:
        identifier: case id (file stem without channel suffix).
        channels: image channels, each a (z, y, x) array.
        spacing: voxel spacing (z, y, x) in mm.
        label: the label map for ``labelsTr`` / ``labelsTs``, or ``None`` for a test case without one.
        dense_label: for a training case whose ``label`` is not dense, the dense label to keep in
            ``labelsTr_dense`` for scoring (``None`` if there is none).
        supervision: the manifest entry kind (``dense``, ``sparse``, ``unlabelled``).
        weak_label: what kind of weak label ``label`` is, for sparse cases.
        provenance: how the label was made (JSON-serialisable), stored in the manifest.
        geometry: origin and orientation of the source, kept in the written files.
        weak_label_map: for a dense case of a mixed dataset, its weak label of kind ``weak_label``, written to
            ``labelsTr_weak`` and named in the manifest (``None`` otherwise).
    """

    identifier: str
    channels: Sequence[np.ndarray]
    spacing: Sequence[float]
    label: np.ndarray | None
    dense_label: np.ndarray | None = None
    supervision: str = "dense"
    weak_label: str | None = None
    provenance: Mapping = field(default_factory=dict)
    geometry: Geometry | None = None
    weak_label_map: np.ndarray | None = None


CaseSource = Union[CaseRecord, Callable[[], CaseRecord]]


def write_raw_dataset(raw_root: str | os.PathLike, dataset_name: str, channel_names: Mapping[str, str],
                      labels: Mapping[str, int], training: Iterable[CaseSource],
                      test: Iterable[CaseSource] = (), overwrite: bool = False,
                      file_ending: str = ".nii.gz", extra_json: Mapping | None = None,
                      num_processes: int = 1) -> Path:
    """Write a complete raw dataset with its ``supervision.json``; return its folder.

    Layout (ScribbleBench): ``imagesTr``/``labelsTr`` (what training sees: dense, sparse or
    all-ignore), ``labelsTr_dense`` (dense labels of non-dense cases, for scoring),
    ``imagesTs``/``labelsTs`` (held-out test cases with dense labels).
    The dataset is staged in a temporary folder and renamed into place when complete.

    Args:
        training, test: the cases, each a ``CaseRecord`` or a picklable callable returning one (so
            that loading happens in the worker processes).
        num_processes: worker processes for loading and writing cases.
    """
    if not DATASET_NAME_PATTERN.match(dataset_name):
        raise UserInputError(f"'{dataset_name}' is not a dataset name of the form DatasetXXX_Name.")
    check_labels(labels, f"labels of {dataset_name}")
    final = Path(raw_root) / dataset_name
    if final.exists() and not overwrite:
        raise UserInputError(
            f"{final} already exists. Delete it or pass the overwrite flag to replace it."
        )
    jobs = [("train", item) for item in training] + [("test", item) for item in test]
    with staged_directory(final, overwrite=overwrite) as stage:
        arguments = [(stage, split, item, file_ending, dict(labels)) for split, item in jobs]
        if num_processes > 1:
            with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
                results = list(tqdm(pool.imap(_write_case_star, arguments), total=len(jobs), desc=dataset_name))
        else:
            results = [_write_case(*a) for a in tqdm(arguments, desc=dataset_name)]
        seen: set[str] = set()
        entries = {}
        for identifier, entry in results:
            if identifier in seen:
                raise UserInputError(f"Case id '{identifier}' occurs twice; case ids must be unique.")
            seen.add(identifier)
            if entry is not None:
                entries[identifier] = entry
        if not results:
            raise UserInputError(f"{dataset_name}: no cases to write.")
        dataset_json = {
            "channel_names": dict(channel_names),
            "labels": dict(labels),
            "numTraining": len(entries),
            "file_ending": file_ending,
            **(extra_json or {}),
        }
        write_json_atomic(dataset_json, stage / "dataset.json")
        if entries:  # a test-only dataset has no training case to describe
            manifest = SupervisionManifest(entries)
            validate_manifest(manifest, stage, sorted(entries), "ignore" in labels)
            manifest.save(stage)
    return final


def _write_case_star(arguments):
    return _write_case(*arguments)


def _write_case(stage: Path, split: str, source: CaseSource, ending: str,
                labels: Mapping[str, int]) -> tuple[str, CaseSupervision | None]:
    """Write one case into the staged dataset; return its id and (training cases) manifest entry."""
    case = source() if callable(source) else source
    ignore = labels.get("ignore")
    allowed = set(labels.values())
    dense_values = allowed - {ignore}
    image_dir, label_dir = ("imagesTr", "labelsTr") if split == "train" else ("imagesTs", "labelsTs")
    (stage / image_dir).mkdir(exist_ok=True)
    for c, channel in enumerate(case.channels):
        if channel.shape != case.channels[0].shape:
            raise UserInputError(f"Case '{case.identifier}': channel {c} has shape {channel.shape}, channel 0 "
                                 f"{case.channels[0].shape}.")
        write_volume(channel.astype(np.float32), case.spacing, stage / image_dir / f"{case.identifier}_{c:04d}{ending}",
                     case.geometry)
    if case.label is not None:
        _check_label_values(case.label, allowed if split == "train" else dense_values,
                            f"label of case '{case.identifier}'")
        if case.label.shape != case.channels[0].shape:
            raise UserInputError(
                f"Case '{case.identifier}': label shape {case.label.shape} differs from image shape "
                f"{case.channels[0].shape}."
            )
        (stage / label_dir).mkdir(exist_ok=True)
        write_volume(case.label.astype(np.uint8), case.spacing, stage / label_dir / f"{case.identifier}{ending}",
                     case.geometry)
    if split != "train":
        return case.identifier, None
    if case.label is None:
        raise UserInputError(f"Training case '{case.identifier}' has no label map (use an all-ignore map for "
                             f"an unlabelled case).")
    dense_rel = f"labelsTr/{case.identifier}{ending}" if case.supervision == "dense" else None
    if case.dense_label is not None:
        dense_rel = _write_extra_label(stage, "labelsTr_dense", case, case.dense_label, dense_values, "dense label",
                                       ending)
    weak_rel = None
    if case.weak_label_map is not None:
        if case.supervision != "dense":
            raise UserInputError(f"Case '{case.identifier}': only a dense case carries a weak label beside its label.")
        weak_rel = _write_extra_label(stage, "labelsTr_weak", case, case.weak_label_map, allowed, "weak label", ending)
    return case.identifier, CaseSupervision(case.supervision, dense_rel, case.weak_label, dict(case.provenance),
                                            weak_rel)


def _write_extra_label(stage: Path, folder: str, case: CaseRecord, label: np.ndarray, allowed: set[int], what: str,
                       ending: str) -> str:
    """Write a training case's label map beside its ``labelsTr`` one (its dense or its weak label) after the
    same checks; return its path relative to the dataset folder."""
    _check_label_values(label, allowed, f"{what} of case '{case.identifier}'")
    if label.shape != case.label.shape:
        raise UserInputError(f"Case '{case.identifier}': {what} shape {label.shape} differs from label shape "
                             f"{case.label.shape}.")
    (stage / folder).mkdir(exist_ok=True)
    relative = f"{folder}/{case.identifier}{ending}"
    write_volume(label.astype(np.uint8), case.spacing, stage / relative, case.geometry)
    return relative


def _check_label_values(label: np.ndarray, allowed: set[int], what: str) -> None:
    unexpected = sorted(set(np.unique(label).tolist()) - allowed)
    if unexpected:
        raise UserInputError(
            f"The {what} contains value(s) {unexpected} outside the declared labels "
            f"{sorted(allowed)}. Declare them in the class names or fix the label map."
        )
