"""Deep-supervision targets that keep sparse annotations.

nnU-Net down-samples the segmentation for its deep-supervision outputs by nearest-neighbour
interpolation (``DownsampleSegForDSTransform``): each coarse voxel copies one fine voxel. A scribble
two voxels wide then survives at 1/2 resolution only where it happens to cover the sampled voxel,
and mostly disappears at 1/4 and below, so the coarse outputs are trained on little more than the
ignore label.

:class:`SparsePreservingDownsampleSegForDSTransform` pools instead: a coarse voxel is annotated
whenever any fine voxel of its block is annotated, and takes the label annotated most often in the
block (ties: the lowest label); it carries the ignore label only when its whole block does. On dense
labels (no ignore voxel in the block) this is a majority vote. ``benchmarks/deep_supervision_targets.py``
measures how much annotation each rule keeps at each scale.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.base.basic_transform import SegOnlyTransform


def pooling_factors(spatial_shape: Sequence[int], scale: Sequence[float]) -> tuple[int, ...]:
    """Integer block size per axis for a deep-supervision scale (nnU-Net's scales are 1/2^k)."""
    factors = []
    for size, s in zip(spatial_shape, scale):
        factor = round(1 / s)
        if factor < 1 or abs(factor * s - 1) > 1e-6 or size % factor:
            raise ValueError(f"deep-supervision scale {tuple(scale)} does not divide the patch {tuple(spatial_shape)} "
                             f"into whole blocks")
        factors.append(factor)
    return tuple(factors)


def sparse_preserving_downsample(segmentation: torch.Tensor, factors: Sequence[int], ignore_label: int) -> torch.Tensor:
    """Down-sample ``(C, *spatial)`` integer labels by whole blocks, keeping any annotation of a block.

    Labels ``0 … ignore_label - 1`` are annotations; ``ignore_label`` marks un-annotated voxels.
    """
    if all(f == 1 for f in factors):
        return segmentation
    dims = segmentation.ndim - 1
    pool = F.avg_pool2d if dims == 2 else F.avg_pool3d
    labels = segmentation.long()
    if labels.min() < 0 or labels.max() > ignore_label:
        raise ValueError(f"segmentation values must lie in 0..{ignore_label} (ignore label {ignore_label}), found "
                         f"{int(labels.min())}..{int(labels.max())}")
    one_hot = F.one_hot(labels, ignore_label + 1).movedim(-1, 1).float()  # (C, L+1, *spatial)
    counts = pool(one_hot[:, :ignore_label], kernel_size=tuple(factors), stride=tuple(factors))
    best_count, best_label = counts.max(1)
    pooled = torch.where(best_count > 0, best_label, torch.full_like(best_label, ignore_label))
    return pooled.to(segmentation.dtype)


class SparsePreservingDownsampleSegForDSTransform(SegOnlyTransform):
    """Drop-in replacement of nnU-Net's ``DownsampleSegForDSTransform`` for sparse labels.

    Args:
        ds_scales: nnU-Net's deep-supervision scales (one per output, fractions of the patch size).
        ignore_label: the dataset's ignore label.
    """

    def __init__(self, ds_scales: Sequence, ignore_label: int):
        super().__init__()
        self.ds_scales = ds_scales
        self.ignore_label = ignore_label

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params) -> list[torch.Tensor]:
        results = []
        for scale in self.ds_scales:
            if not isinstance(scale, (tuple, list)):
                scale = [scale] * (segmentation.ndim - 1)
            factors = pooling_factors(segmentation.shape[1:], scale)
            results.append(sparse_preserving_downsample(segmentation, factors, self.ignore_label))
        return results
