"""Training batches of neighbouring 2D slices that know where they lie in their volume (KAF pre-training).

nnU-Net's 2D loader draws each sample from a random case and slice and forgets both: a positional
contrastive loss needs each slice's relative position in its volume, and KAF's local correspondence loss
needs pairs of neighbouring slices of one volume seen under the *same* spatial augmentation (the distance
bound on keypoint matches is in pixels). :class:`NeighbourSliceDataLoader` is nnU-Net's loader with that
added:

- a batch of ``B`` samples holds ``P = B // 2`` pairs: anchors ``0 .. P-1``, then their neighbours ``P .. 2P-1``;
- an anchor is a uniformly drawn slice ``z`` of a uniformly drawn training case (no foreground oversampling:
  the labels are not used), its neighbour slice ``z + 1`` or ``z - 1`` (drawn; the only valid one at either
  end; itself in a one-slice volume), cropped with the same in-plane box;
- anchor and neighbour go through nnU-Net's augmentation *together*, stacked as channels, so every spatial
  transform (rotation, scaling, elastic, mirroring) is the same for both; intensity transforms may differ;
- ``batch["slice_position"]`` ``(2P,)``: ``z / (Z - 1)`` in ``[0, 1]`` (0 for a one-slice volume);
  ``batch["neighbour"]`` ``(2P,)`` long: the index of each sample's partner in the batch.
"""
from __future__ import annotations

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from threadpoolctl import threadpool_limits

from nnunet_weak.errors import UserInputError


def neighbour_slice(z: int, depth: int, rng: np.random.Generator | np.random.RandomState) -> int:
    """A slice next to ``z`` in a volume of ``depth`` slices: ``z ± 1``, drawn where both exist."""
    candidates = [n for n in (z - 1, z + 1) if 0 <= n < depth]
    return int(candidates[rng.randint(len(candidates))]) if candidates else z


class NeighbourSliceDataLoader(nnUNetDataLoader):
    """nnU-Net's 2D loader, drawing pairs of neighbouring slices (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.patch_size_was_2d:
            raise UserInputError("Neighbouring-slice batches are made from 2D slices: train a 2D configuration.")
        if self.batch_size < 2:
            raise UserInputError(f"A batch of neighbouring-slice pairs needs at least 2 samples per GPU; the batch "
                                 f"size is {self.batch_size}. Use plans with a batch size of at least 2.")
        self.pairs = self.batch_size // 2
        # uniform crops: nnU-Net would centre crops of ignore-label datasets on annotated voxels, reading labels
        self.oversample_foreground_percent = 0.0
        self.has_ignore = False

    def generate_train_batch(self) -> dict:
        cases = [self.indices[i] for i in np.random.randint(len(self.indices), size=self.pairs)]
        anchors, neighbours = [], []
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for case in cases:
                data, seg, _, _ = self._data.load_case(case)
                depth = data.shape[1]
                bbox_lbs, bbox_ubs = self.get_bbox(data.shape[1:], False, None)
                z = int(np.clip(bbox_lbs[0], 0, depth - 1))
                n = neighbour_slice(z, depth, np.random)
                crops = []
                for array, pad in ((data, 0), (seg, -1)):
                    slices = [crop_and_pad_nd(array, [[s, s + 1], *([int(lb), int(ub)] for lb, ub in zip(bbox_lbs[1:], bbox_ubs[1:]))], pad)[:, 0]
                              for s in (z, n)]
                    crops.append(torch.from_numpy(np.concatenate(slices)))
                image, segmentation = crops[0].float(), crops[1].to(torch.int16)
                if self.transforms is not None:
                    transformed = self.transforms(image=image, segmentation=segmentation)
                    image, segmentation = transformed["image"], transformed["segmentation"]
                channels = image.shape[0] // 2
                anchors.append((image[:channels], _first_of_pair(segmentation), case, _position(z, depth)))
                neighbours.append((image[channels:], _second_of_pair(segmentation), case, _position(n, depth)))
        samples = anchors + neighbours
        data = torch.stack([s[0] for s in samples])
        if isinstance(samples[0][1], list):
            target = [torch.stack([s[1][scale] for s in samples]) for scale in range(len(samples[0][1]))]
        else:
            target = torch.stack([s[1] for s in samples])
        partner = torch.cat((torch.arange(self.pairs, 2 * self.pairs), torch.arange(self.pairs)))
        return {"data": data, "target": target, "keys": [s[2] for s in samples],
                "slice_position": torch.tensor([s[3] for s in samples], dtype=torch.float32), "neighbour": partner}


def _position(z: int, depth: int) -> float:
    return z / (depth - 1) if depth > 1 else 0.0


def _first_of_pair(segmentation):
    return [s[:1] for s in segmentation] if isinstance(segmentation, list) else segmentation[:1]


def _second_of_pair(segmentation):
    return [s[1:2] for s in segmentation] if isinstance(segmentation, list) else segmentation[1:2]
