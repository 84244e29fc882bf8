"""Simulated versus hand-drawn scribbles on the real ACDC data.

Reads the WSL4MIS HDF5 volumes of ACDC (``$NNUNET_WEAK_DATA/acdc``), measures the hand-drawn
scribbles of Valvano et al. and the simulator's scribbles made from the same dense labels
(``nnunet_weak.scribble_statistics``), and prints a table per class and the ratio simulated / real.
``--erosion K ...`` adds a column per erosion depth for the eroded weak labels of mixed supervision
(``nnunet_weak.weak_labels.eroded_labels``), measured the same way: how much of each class they keep.

    NNUNET_WEAK_DATA=../shared/data python benchmarks/scribble_realism.py [--limit N] [--erosion 5 ...]
"""
import argparse
import csv
import os
import sys
from pathlib import Path

import h5py
from tqdm import tqdm

from nnunet_weak.scribble_statistics import statistics_of
from nnunet_weak.scribbles import simulate_scribbles
from nnunet_weak.weak_labels import eroded_labels

NAMES = {0: "background", 1: "RV", 2: "MYO", 3: "LV"}
METRICS = ("annotated_fraction", "boundary_distance_mm", "slice_coverage", "wrong_fraction", "labelled_share")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="use only the first N volumes")
    parser.add_argument("--erosion", type=int, nargs="*", default=[], metavar="K",
                        help="also measure eroded weak labels, K erosions deep (the converter's default is 5)")
    args = parser.parse_args()
    data = os.environ.get("NNUNET_WEAK_DATA")
    if not data or not (Path(data) / "acdc" / "volumes").is_dir():
        print("Set NNUNET_WEAK_DATA to the folder holding acdc/volumes.", file=sys.stderr)
        return 2
    acdc = Path(data) / "acdc"
    with open(acdc / "spacing.csv", newline="") as f:
        spacing = {r["case"]: (float(r["spacing_z_mm"]), float(r["spacing_y_mm"]), float(r["spacing_x_mm"]))
                   for r in csv.DictReader(f)}
    files = sorted((acdc / "volumes").glob("*.h5"))[: args.limit]
    eroded = {f"eroded {k}x": k for k in args.erosion}
    volumes = {name: [] for name in ("real", "simulated", *eroded)}
    for i, path in enumerate(tqdm(files, desc="ACDC volumes")):
        with h5py.File(path) as f:
            dense, scribble = f["label"][:], f["scribble"][:]
        volumes["real"].append((scribble, dense, spacing[path.stem]))
        volumes["simulated"].append((simulate_scribbles(dense, 4, i), dense, spacing[path.stem]))
        for name, k in eroded.items():
            volumes[name].append((eroded_labels(dense, 4, k), dense, spacing[path.stem]))
    results = {name: statistics_of(v, list(NAMES), 4) for name, v in volumes.items()}
    print(f"\n{len(files)} ACDC volumes; hand-drawn (Valvano et al.) vs simulated from the same dense labels\n")
    print("| class | metric | real | simulated | simulated / real |" + "".join(f" {n} |" for n in eroded))
    print("|---|---|---|---|---|" + "---|" * len(eroded))
    for c, name in NAMES.items():
        for m in METRICS:
            r, s = results["real"][c][m], results["simulated"][c][m]
            ratio = f"{s / r:.2f}" if r else "-"
            eroded_cells = "".join(f" {results[n][c][m]:.4f} |" for n in eroded)
            print(f"| {name} | {m} | {r:.4f} | {s:.4f} | {ratio} |" + eroded_cells)
    return 0


if __name__ == "__main__":
    sys.exit(main())
