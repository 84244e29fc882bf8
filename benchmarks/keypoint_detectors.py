"""KAF's keypoint detectors on real slices: Shi-Tomasi corners (the default) against SIFT's difference of
Gaussians (the authors'), as ``KeypointDetector`` runs them inside the network.

For slices of a preprocessed 2D dataset (the network's input, after nnU-Net's normalisation), each
detector's keypoints are found on the slice and on a randomly rotated (±30°) and scaled (0.8-1.2) copy
(``kornia.geometry.transform.warp_affine``, bilinear); a keypoint of the copy is *repeated* when, mapped
back, it lies within ``--radius`` pixels of a keypoint of the slice. Fillers (a slice with fewer responses
than the budget gets the rest at the image corner with strength 0) are not counted. Printed per detector:
repeatability, the share of the budget with a positive response, and the time per slice (one CPU
thread), with the ratio of the DoG's time to the corners'.

    eval "$(nnunet-weak env --root /work/nnunet_data)"
    python benchmarks/keypoint_detectors.py -d 127 -p nnUNetPlansCPU --slices 60
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch
from kornia.geometry.transform import get_rotation_matrix2d, warp_affine

from nnunet_weak.networks.keypoints import detect_blob_keypoints, detect_keypoints


def load_slices(dataset: str, plans: str, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` random slices ``(1, 1, H, W)`` of the 2D preprocessed data of ``dataset``'s training cases."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunet_weak.environment import required_folder
    folder = required_folder("nnUNet_preprocessed") / maybe_convert_to_dataset_name(dataset) / f"{plans}_2d"
    if not folder.is_dir():
        raise SystemExit(f"{folder} does not exist: preprocess the dataset's 2d configuration with plans {plans}.")
    dataset_class = infer_dataset_class(str(folder))
    identifiers = dataset_class.get_identifiers(str(folder))
    data = dataset_class(str(folder), identifiers)
    rng = np.random.default_rng(seed)
    slices = []
    for case in rng.choice(identifiers, size=count):
        image = np.asarray(data.load_case(case)[0])[0]  # (Z, H, W), first channel
        slices.append(torch.from_numpy(image[rng.integers(image.shape[0])].astype(np.float32))[None, None])
    return slices


def random_warp(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A rotation by ±30° and a scaling by 0.8-1.2 about the centre: the ``(1, 2, 3)`` matrix."""
    height, width = image.shape[2:]
    centre = torch.tensor([[(width - 1) / 2, (height - 1) / 2]])
    scale = float(rng.uniform(0.8, 1.2))
    return get_rotation_matrix2d(centre, torch.tensor([float(rng.uniform(-30, 30))]), torch.tensor([[scale, scale]]))


def repeatability(found: torch.Tensor, strength: torch.Tensor, warped: torch.Tensor, warped_strength: torch.Tensor,
                  matrix: torch.Tensor, radius: float) -> float:
    """Share of the warped image's keypoints (positive response) that map back within ``radius`` of a keypoint."""
    real, warped_real = found[strength > 0].float(), warped[warped_strength > 0].float()
    if len(real) == 0 or len(warped_real) == 0:
        return float("nan")
    full = torch.cat((matrix[0], torch.tensor([[0.0, 0.0, 1.0]])))
    inverse = torch.linalg.inv(full)[:2]
    xy = warped_real.flip(-1)  # (y, x) -> (x, y)
    back = (xy @ inverse[:, :2].T + inverse[:, 2]).flip(-1)
    return float((torch.cdist(back, real).min(1).values <= radius).float().mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", required=True, help="dataset id or name (2d configuration preprocessed)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("--slices", type=int, default=60, help="random slices (default: 60)")
    parser.add_argument("--count", type=int, default=64, help="keypoints per slice (default: 64, KAFTrainer's)")
    parser.add_argument("--radius", type=float, default=2.0, help="repeatability radius in pixels (default: 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    slices = load_slices(args.d, args.p, args.slices, args.seed)
    detectors = {"corners (Shi-Tomasi)": lambda image: detect_keypoints(image, args.count),
                 "DoG (SIFT's)": lambda image: detect_blob_keypoints(image, args.count)}
    results = {name: {"repeated": [], "responding": [], "seconds": []} for name in detectors}
    for image in slices:
        matrix = random_warp(image, rng)
        warped_image = warp_affine(image, matrix, image.shape[2:])
        for name, detect in detectors.items():
            started = time.perf_counter()
            found, strength = detect(image)
            results[name]["seconds"].append(time.perf_counter() - started)
            warped, warped_strength = detect(warped_image)
            results[name]["repeated"].append(repeatability(found[0], strength[0], warped[0], warped_strength[0],
                                                           matrix, args.radius))
            results[name]["responding"].append(float((strength[0] > 0).float().mean()))
    shape = "x".join(map(str, slices[0].shape[2:]))
    print(f"Dataset {args.d}, plans {args.p}: {args.slices} random training slices ({shape} for the first), "
          f"{args.count} keypoints per slice, repeatability within {args.radius:g} px under a random rotation "
          f"(±30°) and scaling (0.8-1.2), one CPU thread.\n")
    print("| detector | repeatability (mean) | budget with a response | ms per slice |")
    print("|---|---|---|---|")
    times = {}
    for name, values in results.items():
        times[name] = 1000 * float(np.median(values["seconds"]))
        print(f"| {name} | {np.nanmean(values['repeated']):.2f} | {np.mean(values['responding']):.2f} | "
              f"{times[name]:.1f} |")
    corners, dog = times.values()
    print(f"\nDoG time / corners time: {dog / corners:.1f}x" if math.isfinite(dog / corners) else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
