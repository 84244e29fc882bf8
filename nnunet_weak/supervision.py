"""The supervision manifest: which kind of label every training case carries.

One JSON file, ``supervision.json``, sits beside ``dataset.json`` in the raw dataset folder. It is
the only place the project learns whether a case's label map in ``labelsTr`` is

- ``dense``: a full annotation, used as is;
- ``sparse``: a weak label (scribble, eroded mask, box, disc, ...) whose un-annotated voxels carry
  nnU-Net's ignore label;
- ``unlabelled``: no annotation at all (the label map is ignore everywhere); such a case must never
  reach a supervised loss.

and where the case's dense label is when one exists for evaluation (a path relative to the raw
dataset folder, or ``null``). A dense case of a mixed dataset also names its weak label
(``weak_label_file``, made like the sparse cases' ones), so that a method can train on both.
Converters write the manifest; trainers, samplers and the evaluation read it; nothing guesses
supervision from label values.

Example::

    {
      "format": "nnunet-weak supervision manifest",
      "version": 1,
      "cases": {
        "case_000": {"supervision": "sparse", "weak_label": "scribble",
                     "dense_label": "labelsTr_dense/case_000.nii.gz"},
        "case_001": {"supervision": "unlabelled", "dense_label": null}
      }
    }
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from nnunet_weak.atomic import write_json_atomic
from nnunet_weak.errors import UserInputError

MANIFEST_FILENAME = "supervision.json"
MANIFEST_FORMAT = "nnunet-weak supervision manifest"
MANIFEST_VERSION = 1
SUPERVISION_KINDS = ("dense", "sparse", "unlabelled")


@dataclass(frozen=True)
class CaseSupervision:
    """What one training case carries.

    Attributes:
        supervision: one of ``SUPERVISION_KINDS``.
        dense_label: path of the dense label relative to the raw dataset folder, or ``None`` when
            the case has no dense label to score against.
        weak_label: for sparse cases, what kind of weak label (``"scribble"``, ``"erosion"``, ...).
        provenance: free-form, JSON-serialisable record of how the label was made (generator,
            seed, parameters), so that a dataset can be reproduced.
        weak_label_file: for a dense case of a mixed dataset, its weak label of kind ``weak_label``
            (path relative to the raw dataset folder, e.g. ``labelsTr_weak/case.nii.gz``), or ``None``.
    """

    supervision: str
    dense_label: str | None = None
    weak_label: str | None = None
    provenance: Mapping = field(default_factory=dict)
    weak_label_file: str | None = None

    @property
    def is_labelled(self) -> bool:
        """True when the case may enter a supervised loss (dense or sparse)."""
        return self.supervision != "unlabelled"


@dataclass(frozen=True)
class SupervisionManifest:
    """The per-case supervision of one raw dataset (see the module docstring)."""

    cases: Mapping[str, CaseSupervision]

    def cases_with(self, supervision: str) -> list[str]:
        """Identifiers of the cases with the given supervision kind, sorted."""
        _check_kind(supervision, "argument")
        return sorted(k for k, c in self.cases.items() if c.supervision == supervision)

    def labelled_cases(self) -> list[str]:
        """Identifiers of the cases that may enter a supervised loss, sorted."""
        return sorted(k for k, c in self.cases.items() if c.is_labelled)

    def dense_label_path(self, raw_dataset_folder: str | os.PathLike, case: str) -> Path | None:
        """Absolute path of the dense label of ``case``, or ``None`` if it has none."""
        entry = self.cases[case]
        return None if entry.dense_label is None else Path(raw_dataset_folder) / entry.dense_label

    def weak_label_path(self, raw_dataset_folder: str | os.PathLike, case: str) -> Path | None:
        """Absolute path of the weak label a dense case carries beside its dense one, or ``None``."""
        entry = self.cases[case]
        return None if entry.weak_label_file is None else Path(raw_dataset_folder) / entry.weak_label_file

    def to_json(self) -> dict:
        cases = {}
        for k in sorted(self.cases):
            c = self.cases[k]
            entry = {"supervision": c.supervision, "dense_label": c.dense_label}
            if c.weak_label is not None:
                entry["weak_label"] = c.weak_label
            if c.weak_label_file is not None:
                entry["weak_label_file"] = c.weak_label_file
            if c.provenance:
                entry["provenance"] = dict(c.provenance)
            cases[k] = entry
        return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "cases": cases}

    def save(self, raw_dataset_folder: str | os.PathLike) -> Path:
        path = Path(raw_dataset_folder) / MANIFEST_FILENAME
        write_json_atomic(self.to_json(), path)
        return path


def _check_kind(kind: str, where: str) -> None:
    if kind not in SUPERVISION_KINDS:
        raise UserInputError(
            f"{where}: unknown supervision '{kind}'. Use one of {', '.join(SUPERVISION_KINDS)}."
        )


def manifest_from_json(data: dict, source: str = "manifest") -> SupervisionManifest:
    """Parse the JSON form of a manifest, checking its structure (not the files it names)."""
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise UserInputError(
            f"{source} is not a supervision manifest (expected \"format\": \"{MANIFEST_FORMAT}\")."
        )
    if data.get("version") != MANIFEST_VERSION:
        raise UserInputError(
            f"{source} has manifest version {data.get('version')!r}; this nnunet-weak reads "
            f"version {MANIFEST_VERSION}. Re-create it with `nnunet-weak convert`."
        )
    raw_cases = data.get("cases")
    if not isinstance(raw_cases, dict) or not raw_cases:
        raise UserInputError(f"{source} lists no cases (\"cases\" must be a non-empty object).")
    cases = {}
    for case, entry in raw_cases.items():
        where = f"{source}, case '{case}'"
        if not isinstance(entry, dict) or "supervision" not in entry:
            raise UserInputError(f"{where}: each case needs an object with a \"supervision\" key.")
        _check_kind(entry["supervision"], where)
        for key in ("dense_label", "weak_label_file"):
            value = entry.get(key)
            if value is not None and (not isinstance(value, str) or os.path.isabs(value)):
                raise UserInputError(
                    f"{where}: \"{key}\" must be a path relative to the dataset folder or null, got {value!r}."
                )
        if entry.get("weak_label_file") is not None and entry["supervision"] != "dense":
            raise UserInputError(f"{where}: only a dense case names a \"weak_label_file\" (a sparse case's weak label "
                                 f"is its labelsTr map).")
        cases[case] = CaseSupervision(
            supervision=entry["supervision"],
            dense_label=entry.get("dense_label"),
            weak_label=entry.get("weak_label"),
            provenance=entry.get("provenance", {}),
            weak_label_file=entry.get("weak_label_file"),
        )
    return SupervisionManifest(cases)


def read_manifest(raw_dataset_folder: str | os.PathLike) -> SupervisionManifest | None:
    """Read the manifest beside ``dataset.json``; ``None`` if the dataset has none.

    Only the structure is checked here; ``validate_manifest`` checks it against the dataset.
    """
    path = Path(raw_dataset_folder) / MANIFEST_FILENAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserInputError(f"{path} is not valid JSON ({e}). Re-create it with `nnunet-weak convert`.")
    return manifest_from_json(data, source=str(path))


def validate_manifest(manifest: SupervisionManifest, raw_dataset_folder: str | os.PathLike,
                      training_cases: list[str], has_ignore_label: bool) -> None:
    """Check the manifest against the dataset it describes.

    Args:
        manifest: the parsed manifest.
        raw_dataset_folder: the folder holding ``dataset.json``.
        training_cases: the identifiers of the dataset's training cases (``labelsTr``).
        has_ignore_label: whether ``dataset.json`` declares an ``"ignore"`` label.

    Raises:
        UserInputError: a training case missing from the manifest or a manifest case that is not
            a training case, a dense label file that does not exist, or sparse/unlabelled cases in a
            dataset without an ignore label.
    """
    folder = Path(raw_dataset_folder)
    listed, present = set(manifest.cases), set(training_cases)
    if present - listed:
        missing = sorted(present - listed)
        raise UserInputError(
            f"{folder / MANIFEST_FILENAME} does not list {len(missing)} training case(s) of "
            f"labelsTr, e.g. {missing[:3]}. Every training case needs an entry; re-create the "
            f"manifest with `nnunet-weak convert` or add the entries."
        )
    if listed - present:
        extra = sorted(listed - present)
        raise UserInputError(
            f"{folder / MANIFEST_FILENAME} names {len(extra)} case(s) that are not training cases "
            f"of the dataset (no image/label in imagesTr/labelsTr), e.g. {extra[:3]}. Remove those "
            f"entries or add the missing files."
        )
    for case in sorted(listed):
        for what, path in (("dense label", manifest.dense_label_path(folder, case)),
                           ("weak label", manifest.weak_label_path(folder, case))):
            if path is not None and not path.is_file():
                raise UserInputError(
                    f"{folder / MANIFEST_FILENAME}, case '{case}': {what} {path} does not exist. "
                    f"Fix the path or set it to null."
                )
    weak = [k for k, c in manifest.cases.items() if c.supervision != "dense"]
    if weak and not has_ignore_label:
        raise UserInputError(
            f"{folder / 'dataset.json'} declares no \"ignore\" label, but the manifest marks "
            f"{len(weak)} case(s) as sparse or unlabelled (e.g. '{sorted(weak)[0]}'). Sparse and "
            f"missing labels use nnU-Net's ignore label: add \"ignore\": <highest label + 1> to "
            f"\"labels\"."
        )
