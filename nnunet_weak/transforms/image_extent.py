"""Where the image is, carried through nnU-Net's augmentation as a last segmentation channel.

nnU-Net pads patches that reach past the image, and its spatial augmentation fills what rotation and
scaling bring in from outside, with the segmentation value -1 (and 0 in the image). A later
``RemoveLabelTransform`` turns -1 into background or the ignore label, after which "outside the image"
cannot be told from "background" or "not annotated". Losses that couple voxels (a CRF, an affinity)
must not couple a voxel with padding: on z-scored MRI the padding value 0 is the mean intensity,
which on ACDC is the myocardium's (median z 0.04), so padding looks like a flat myocardium.

:class:`AppendImageExtentChannel` runs first in the training pipeline and appends a channel that is
``1`` inside the image and ``-1`` outside; every spatial transform then moves and pads it with the
segmentation, and whatever ``RemoveLabelTransform`` makes of -1, the voxels inside the image are those
where the channel is ``1`` (:func:`split_image_extent`).
"""
from __future__ import annotations

import torch
from batchgeneratorsv2.transforms.base.basic_transform import SegOnlyTransform

INSIDE_IMAGE = 1
OUTSIDE_IMAGE = -1


class AppendImageExtentChannel(SegOnlyTransform):
    """``(C, *patch)`` segmentation → ``(C + 1, *patch)``: the last channel is 1 inside the image, -1 outside
    (where the first channel is nnU-Net's -1)."""

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params) -> torch.Tensor:
        extent = torch.where(segmentation[:1] == OUTSIDE_IMAGE, OUTSIDE_IMAGE, INSIDE_IMAGE).to(segmentation.dtype)
        return torch.cat((segmentation, extent))


def split_image_extent(target):
    """nnU-Net's targets (a tensor or a list per deep-supervision scale, ``(B, C + 1, *spatial)``) without their
    last channel, and the full-resolution ``(B, *spatial)`` bool mask of the voxels inside the image."""
    full_resolution = target[0] if isinstance(target, list) else target
    inside_image = full_resolution[:, -1] == INSIDE_IMAGE
    stripped = [t[:, :-1] for t in target] if isinstance(target, list) else target[:, :-1]
    return stripped, inside_image
