"""How much of the scribbles reaches each deep-supervision output: nnU-Net's nearest-neighbour
down-sampling against ``SparsePreservingDownsampleSegForDSTransform``.

For every training case of a preprocessed sparse dataset, the segmentation (whole slices for 2D
configurations, whole volumes for 3D ones, padded with the ignore label to whole blocks) is
down-sampled to each deep-supervision scale of the plans by both rules. For each class and scale
the table gives the share of coarse voxels whose block holds an annotation of that class that
carry that class after down-sampling (100 % = nothing of that class lost at that scale).

    eval "$(nnunet-weak env --root /tmp/acdc)"
    python benchmarks/deep_supervision_targets.py -d 27 -p nnUNetPlansCPU -c 2d
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from tqdm import tqdm

from nnunet_weak.atomic import write_text_atomic
from nnunet_weak.environment import required_folder
from nnunet_weak.raw_dataset import dataset_name_from_id
from nnunet_weak.transforms.sparse_downsampling import SparsePreservingDownsampleSegForDSTransform


def deep_supervision_scales(configuration: dict) -> list[list[float]]:
    pools = np.cumprod(np.vstack(configuration["architecture"]["arch_kwargs"]["strides"]), axis=0)
    return [list(1 / p) for p in pools][:-1]


def padded(segmentation: torch.Tensor, block: np.ndarray, ignore: int) -> torch.Tensor:
    pad = []
    for size, b in zip(reversed(segmentation.shape[1:]), reversed(block)):
        pad += [0, int(-size % b)]
    return F.pad(segmentation, pad, value=ignore)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", required=True, help="sparse dataset id or name (preprocessed)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("-c", default="2d", help="configuration (default: 2d)")
    parser.add_argument("-o", default=None, help="also write the table (markdown) here")
    args = parser.parse_args()
    name = dataset_name_from_id(args.d)
    folder = required_folder("nnUNet_preprocessed") / name
    plans = json.loads((folder / f"{args.p}.json").read_text(encoding="utf-8"))
    labels = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))["labels"]
    if "ignore" not in labels:
        print(f"{name} has no ignore label: it is not a sparse dataset.", file=sys.stderr)
        return 2
    ignore = labels["ignore"]
    classes = {v: k for k, v in labels.items() if k != "ignore"}
    configuration = plans["configurations"][args.c]
    scales = deep_supervision_scales(configuration)
    block = np.round(1 / np.array(scales[-1])).astype(int)
    data_folder = folder / configuration["data_identifier"]
    dataset = infer_dataset_class(str(data_folder))(str(data_folder))
    rules = {"nearest (nnU-Net)": DownsampleSegForDSTransform(scales),
             "sparse-preserving": SparsePreservingDownsampleSegForDSTransform(scales, ignore)}
    kept = {rule: np.zeros((len(scales), len(classes))) for rule in rules}
    present = np.zeros((len(scales), len(classes)))
    for key in tqdm(dataset.identifiers, desc="cases"):
        _, seg, _, _ = dataset.load_case(key)
        seg = torch.from_numpy(np.asarray(seg)).to(torch.int16)
        seg[seg < 0] = ignore
        pieces = [seg[:, z] for z in range(seg.shape[1])] if args.c == "2d" else [seg]
        for piece in pieces:
            piece = padded(piece, block, ignore)
            for s, scale in enumerate(scales):
                factors = tuple(int(round(1 / f)) for f in scale)
                pool = F.max_pool2d if piece.ndim == 3 else F.max_pool3d
                for c in classes:
                    present[s, c] += pool((piece == c).float()[None], factors, factors).sum().item()
            for rule, transform in rules.items():
                for s, target in enumerate(transform(segmentation=piece.clone())["segmentation"]):
                    for c in classes:
                        kept[rule][s, c] += (target == c).sum().item()
    lines = [f"{name}, {args.p} {args.c}, {len(dataset.identifiers)} training cases: share of the coarse voxels "
             f"whose block holds an annotation of the class that keep it.", "",
             "| scale | rule | " + " | ".join(classes.values()) + " |",
             "|---|---|" + "---|" * len(classes)]
    for s, scale in enumerate(scales):
        for rule in rules:
            shares = [f"{100 * kept[rule][s, c] / present[s, c]:.1f} %" if present[s, c] else "-" for c in classes]
            lines.append(f"| 1/{int(round(1 / scale[-1]))} | {rule} | " + " | ".join(shares) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.o:
        write_text_atomic(table, args.o)
    return 0


if __name__ == "__main__":
    sys.exit(main())
