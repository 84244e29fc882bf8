"""Where a model's errors are: the voxel confusion matrix against dense labels, and how far its
false-positive foreground lies from the true foreground.

For predictions and dense labels of the same cases (same file names), prints the confusion matrix
(rows: true class, columns: predicted, each row normalised) and, slice by slice in-plane, the share
of false-positive foreground voxels farther than ``--far`` voxels from any true foreground voxel.
Scribble-supervised models typically fail there: no scribble and no local loss term reaches it.

    python benchmarks/false_positives.py -i $nnUNet_results/.../predictions/Dataset027_ACDC__ScribbleAttentionTrainer \\
        -l $nnUNet_raw/Dataset027_ACDC/labelsTs
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from nnunet_weak.evaluation import confusion_matrix


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-i", required=True, type=Path, help="folder of predicted label maps")
    parser.add_argument("-l", required=True, type=Path, help="folder of dense labels with the same file names")
    parser.add_argument("--far", type=float, default=20.0, help="in-plane distance in voxels (default: 20)")
    args = parser.parse_args()
    predictions = sorted(p for p in args.i.glob("*.nii.gz"))
    if not predictions:
        print(f"No .nii.gz predictions in {args.i}.", file=sys.stderr)
        return 2
    missing = [p.name for p in predictions if not (args.l / p.name).is_file()]
    if missing:
        print(f"No dense label in {args.l} for {len(missing)} prediction(s), e.g. {missing[0]}.", file=sys.stderr)
        return 2
    confusion = None
    false_positive, far = 0, 0
    for path in tqdm(predictions, desc="cases"):
        predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.int64)
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(args.l / path.name))).astype(np.int64)
        if predicted.shape != truth.shape:
            print(f"{path.name}: prediction {predicted.shape} and label {truth.shape} differ in shape.", file=sys.stderr)
            return 2
        classes = int(max(predicted.max(), truth.max())) + 1
        counts = confusion_matrix(truth, predicted, classes)
        if confusion is None or confusion.shape[0] < classes:
            grown = np.zeros((classes, classes), np.int64)
            if confusion is not None:
                grown[:confusion.shape[0], :confusion.shape[1]] = confusion
            confusion = grown
        confusion[:classes, :classes] += counts
        for z in range(truth.shape[0]):
            foreground = truth[z] > 0
            wrong = (predicted[z] > 0) & ~foreground
            if not foreground.any() or not wrong.any():
                continue
            false_positive += int(wrong.sum())
            far += int((wrong & (ndimage.distance_transform_edt(~foreground) > args.far)).sum())
    rows = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    print("confusion (rows: true class, columns: predicted class, row-normalised)")
    print("      " + " ".join(f"{c:>7d}" for c in range(rows.shape[1])))
    for c, row in enumerate(rows):
        print(f"{c:>5d} " + " ".join(f"{v:7.3f}" for v in row))
    print(f"false-positive foreground voxels (in slices with foreground): {false_positive}; "
          f"farther than {args.far:g} voxels from the true foreground: {far / max(false_positive, 1):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
