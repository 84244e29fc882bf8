"""What supervision a converter produces, for every dataset the same way.

A ``SupervisionChoice`` turns each training case's dense label (and the real weak label when the
source has one, e.g. hand-drawn scribbles) into the label map written to ``labelsTr`` and its
manifest entry:

- ``dense``: the dense label (no ignore label in the dataset);
- ``weak``: a weak label for every case: the real one when given and ``weak_label`` is
  ``scribble``, else generated (``scribble``, ``erosion``, ``box``, ``disc``);
- ``semi``: the selected cases keep their dense label, the others are unlabelled (all ignore);
- ``mixed``: the selected cases keep their dense label, the others get a weak label.

Which cases are selected: the first ``count`` of an ordered list (the community's standard list,
e.g. LA's first 4 / 8 / 16), an explicit list of case ids, or a seeded random fraction. Everything
is reproducible from ``seed`` and recorded in the manifest's ``provenance``.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from nnunet_weak.errors import UserInputError
from nnunet_weak.scribbles import simulate_scribbles
from nnunet_weak.weak_labels import bounding_box_labels, centroid_disc_labels, eroded_labels

MODES = ("dense", "weak", "semi", "mixed")
WEAK_LABELS = ("scribble", "erosion", "box", "disc")


@dataclass(frozen=True)
class LabelledSelection:
    """Which training cases keep their dense label (``semi`` and ``mixed`` modes); give exactly one.

    Attributes:
        count: keep the first ``count`` cases of ``order`` (or of the sorted case ids).
        order: an ordered list of case ids for ``count`` (e.g. a dataset's standard list).
        cases: an explicit list of case ids.
        fraction: a seeded random fraction of the cases (at least one case).
    """

    count: int | None = None
    order: Sequence[str] | None = None
    cases: Sequence[str] | None = None
    fraction: float | None = None

    def select(self, available: Sequence[str], seed: int) -> list[str]:
        given = [x is not None for x in (self.count, self.cases, self.fraction)]
        if sum(given) != 1:
            raise UserInputError("Say which cases keep labels with exactly one of: a count (--labelled_count), "
                                 "a list of cases (--labelled_cases) or a fraction (--labelled_fraction).")
        available = sorted(available)
        if self.cases is not None:
            unknown = sorted(set(self.cases) - set(available))
            if unknown:
                raise UserInputError(f"Labelled case(s) {unknown[:3]} are not training cases of the dataset.")
            return sorted(set(self.cases))
        if self.count is not None:
            order = [c for c in (self.order or available) if c in set(available)]
            if not 0 < self.count <= len(order):
                raise UserInputError(f"{self.count} labelled cases requested, but the dataset has {len(order)} "
                                     f"training cases{' in the given order' if self.order else ''}.")
            return sorted(order[: self.count])
        if not 0 < self.fraction <= 1:
            raise UserInputError(f"The labelled fraction must be in (0, 1], got {self.fraction}.")
        n = max(1, int(round(self.fraction * len(available))))
        return sorted(np.random.RandomState(seed).choice(available, n, replace=False).tolist())


@dataclass(frozen=True)
class SupervisionChoice:
    """What to write into ``labelsTr`` (see the module docstring).

    Attributes:
        mode: one of ``MODES``.
        weak_label: one of ``WEAK_LABELS`` (``weak`` and ``mixed`` modes).
        selection: which cases keep dense labels (``semi`` and ``mixed`` modes).
        seed: seed of the selection and of generated weak labels.
        erosion_iterations, disc_radius, box_margin: generator parameters.
        use_real_scribbles: use hand-drawn scribbles where the source has them (False: simulate
            them anyway, to compare simulated with real).
    """

    mode: str = "weak"
    weak_label: str = "scribble"
    selection: LabelledSelection | None = None
    seed: int = 0
    erosion_iterations: int = 5
    disc_radius: int = 2
    box_margin: int = 0
    use_real_scribbles: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserInputError(f"Unknown supervision '{self.mode}'; use one of {', '.join(MODES)}.")
        if self.weak_label not in WEAK_LABELS:
            raise UserInputError(f"Unknown weak label '{self.weak_label}'; use one of {', '.join(WEAK_LABELS)}.")
        if self.mode in ("semi", "mixed") and self.selection is None:
            raise UserInputError(f"Supervision '{self.mode}' needs to know which cases keep labels "
                                 f"(--labelled_count, --labelled_cases or --labelled_fraction).")

    @property
    def needs_ignore_label(self) -> bool:
        return self.mode != "dense"

    def cases_keeping_dense_labels(self, training_cases: Sequence[str]) -> list[str]:
        """The training cases whose ``labelsTr`` map is their dense label."""
        if self.mode == "dense":
            return sorted(training_cases)
        if self.mode == "weak":
            return []
        return self.selection.select(training_cases, self.seed)

    def describe(self) -> dict:
        """A JSON summary for ``dataset.json``."""
        out = {"mode": self.mode, "seed": self.seed}
        if self.mode in ("weak", "mixed"):
            out["weak_label"] = self.weak_label
        return out

    def case_seed(self, case: str) -> int:
        """A per-case seed that does not depend on the order or the set of cases converted."""
        return (self.seed * 1_000_003 + zlib.crc32(case.encode())) % (2 ** 31)

    def make_label(self, case: str, dense: np.ndarray, ignore_label: int, keeps_dense_label: bool,
                   real_weak: np.ndarray | None = None) -> tuple[np.ndarray, str, str | None, dict]:
        """The ``labelsTr`` map of one case and its manifest fields.

        Args:
            case: case id.
            dense: dense (z, y, x) label map.
            ignore_label: the dataset's ignore label.
            keeps_dense_label: whether the case is in ``cases_keeping_dense_labels``.
            real_weak: a real weak label of the case (hand-drawn scribbles), used in place of a
                generated scribble.

        Returns:
            (label map, supervision, weak_label, provenance).
        """
        if keeps_dense_label:
            return dense, "dense", None, {"choice": self.mode}
        if self.mode == "semi":
            return (np.full(dense.shape, ignore_label, np.uint8), "unlabelled", None,
                    {"choice": "semi", "seed": self.seed})
        weak, provenance = self.weak_label_of(case, dense, ignore_label, real_weak)
        return weak, "sparse", self.weak_label, provenance

    def weak_label_of(self, case: str, dense: np.ndarray, ignore_label: int,
                      real_weak: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        """The weak label of kind ``weak_label`` of one case (real scribbles where given) and its provenance:
        what a sparse case carries in ``labelsTr``, and a dense case of a mixed dataset beside its dense label."""
        if self.weak_label == "scribble" and real_weak is not None and self.use_real_scribbles:
            return real_weak.astype(np.uint8), {"source": "hand-drawn"}
        seed = self.case_seed(case)
        if self.weak_label == "scribble":
            return simulate_scribbles(dense, ignore_label, seed), {"generator": "scribble", "seed": seed}
        if self.weak_label == "erosion":
            return (eroded_labels(dense, ignore_label, self.erosion_iterations),
                    {"generator": "erosion", "iterations": self.erosion_iterations})
        if self.weak_label == "box":
            return bounding_box_labels(dense, ignore_label, self.box_margin), {"generator": "box", "margin": self.box_margin}
        return (centroid_disc_labels(dense, ignore_label, self.disc_radius),
                {"generator": "disc", "radius": self.disc_radius})


def add_supervision_arguments(parser, default_mode: str = "weak") -> None:
    """The supervision options shared by every ``nnunet-weak convert`` sub-command."""
    parser.add_argument("--supervision", choices=MODES, default=default_mode,
                        help=f"what labelsTr holds (default: {default_mode})")
    parser.add_argument("--weak_label", choices=WEAK_LABELS, default=None,
                        help="weak label for weak/mixed supervision (default: scribble; real ones when given)")
    parser.add_argument("--labelled_count", type=int, default=None,
                        help="semi/mixed: keep labels for the first N cases (of the standard list if any; ACDC's "
                             "cases are frames, two per patient)")
    parser.add_argument("--labelled_cases", nargs="+", default=None, help="semi/mixed: these case ids keep labels")
    parser.add_argument("--labelled_fraction", type=float, default=None,
                        help="semi/mixed: a seeded random fraction of the cases keeps labels")
    parser.add_argument("--erosion_iterations", type=int, default=None,
                        help="erosion weak labels: iterations (default 5)")
    parser.add_argument("--simulate_scribbles", action="store_true",
                        help="simulate scribbles even where hand-drawn ones are given (to compare the two)")
    parser.add_argument("--seed", type=int, default=0, help="seed of selections and generated labels (default 0)")


def choice_from_args(args, order: Sequence[str] | None = None) -> SupervisionChoice:
    """The supervision the ``convert`` options ask for; an option the chosen supervision would ignore is an error."""
    given = any(x is not None for x in (args.labelled_count, args.labelled_cases, args.labelled_fraction))
    if given and args.supervision not in ("semi", "mixed"):
        raise UserInputError(f"--labelled_count/--labelled_cases/--labelled_fraction choose the densely labelled cases "
                             f"of semi or mixed supervision; --supervision {args.supervision} has none.")
    if args.weak_label is not None and args.supervision not in ("weak", "mixed"):
        raise UserInputError(f"--weak_label is for weak or mixed supervision; --supervision {args.supervision} writes "
                             f"no weak labels.")
    weak_label = args.weak_label or "scribble"
    if args.erosion_iterations is not None and weak_label != "erosion":
        raise UserInputError(f"--erosion_iterations is for --weak_label erosion, not {weak_label}.")
    selection = LabelledSelection(args.labelled_count, order, args.labelled_cases,
                                  args.labelled_fraction) if given else None
    return SupervisionChoice(args.supervision, weak_label, selection, args.seed,
                             erosion_iterations=args.erosion_iterations or 5,
                             use_real_scribbles=not args.simulate_scribbles)
