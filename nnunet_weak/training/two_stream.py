"""Two-stream training batches: labelled and unlabelled samples in every batch.

nnU-Net draws every training sample from one pool and crops it around annotated voxels; it has no
notion of unlabelled data. A semi-supervised method needs each batch to hold a fixed number of
labelled samples (for the supervised loss) and of unlabelled ones (for the consistency losses), on
every DDP rank. :class:`TwoStreamDataLoader` composes such a batch from two of nnU-Net's own loaders:

- the **labelled stream** is an ``nnUNetDataLoader`` over the labelled cases, with nnU-Net's
  foreground oversampling (a fraction of its samples centred on a foreground voxel);
- the **unlabelled stream** is an ``nnUNetDataLoader`` over the unlabelled cases, without
  oversampling and with uniform random crops: an unlabelled case has no annotated voxel to centre on.

Both streams go through the same augmentation pipeline (the ``transforms`` nnU-Net hands its loader),
so an unlabelled sample is augmented exactly as a labelled one. The batch is the labelled samples
followed by the unlabelled ones, with ``batch["labelled"]``, a boolean ``(B,)`` tensor, saying which is
which. An unlabelled sample's target is the ignore label everywhere, so nnU-Net's loss already skips
it; the mask lets a method leave it out of the supervised loss explicitly.
"""
from __future__ import annotations

import math

import torch
from batchgenerators.dataloading.data_loader import DataLoader
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunet_weak.errors import UserInputError


def split_batch(batch_size: int, labelled_per_batch: int = 0) -> tuple[int, int]:
    """How many labelled and unlabelled samples a batch of ``batch_size`` holds.

    Args:
        batch_size: samples per batch on one rank (nnU-Net's planned batch size, divided over ranks).
        labelled_per_batch: labelled samples per batch; ``0`` means half the batch, rounded up.

    Raises:
        UserInputError: if the batch cannot hold at least one sample of each kind.
    """
    if batch_size < 2:
        raise UserInputError(
            f"A semi-supervised batch needs at least one labelled and one unlabelled sample, but the batch size per "
            f"GPU is {batch_size}. Use plans with a batch size of at least 2 per GPU (edit 'batch_size' in the "
            f"plans' configuration, or train on fewer GPUs).")
    if labelled_per_batch != int(labelled_per_batch):
        raise UserInputError(f"labelled_per_batch must be a whole number, got {labelled_per_batch}.")
    labelled = math.ceil(batch_size / 2) if labelled_per_batch == 0 else int(labelled_per_batch)
    if not 1 <= labelled <= batch_size - 1:
        raise UserInputError(
            f"labelled_per_batch={labelled} leaves no room for both kinds in a batch of {batch_size} per GPU: "
            f"choose between 1 and {batch_size - 1} (0 = half the batch).")
    return labelled, batch_size - labelled


class TwoStreamDataLoader(DataLoader):
    """Batches of ``labelled.batch_size`` labelled then ``unlabelled.batch_size`` unlabelled samples.

    Args:
        labelled: nnU-Net loader over the labelled training cases (with its oversampling).
        unlabelled: nnU-Net loader over the unlabelled training cases; its oversampling is turned off
            and its crops made uniform here.

    A batch is nnU-Net's batch dictionary (``data`` ``(B, C, *patch)``, ``target`` a tensor or a list
    per deep-supervision scale, ``keys``) plus ``labelled``, a ``(B,)`` bool tensor, ``True`` for the
    first ``labelled.batch_size`` entries.
    """

    def __init__(self, labelled: nnUNetDataLoader, unlabelled: nnUNetDataLoader):
        super().__init__((labelled, unlabelled), labelled.batch_size + unlabelled.batch_size, 1, None, True,
                         False, True)
        unlabelled.oversample_foreground_percent = 0.0
        # nnU-Net centres crops of ignore-label datasets on annotated voxels; an unlabelled case has none,
        # so it gets the uniform crops nnU-Net uses for datasets without an ignore label
        unlabelled.has_ignore = False
        self.labelled, self.unlabelled = labelled, unlabelled

    def generate_train_batch(self) -> dict:
        first, second = self.labelled.generate_train_batch(), self.unlabelled.generate_train_batch()
        if isinstance(first["target"], list):
            target = [torch.cat(pair) for pair in zip(first["target"], second["target"])]
        else:
            target = torch.cat((first["target"], second["target"]))
        labelled = torch.zeros(self.batch_size, dtype=torch.bool)
        labelled[:self.labelled.batch_size] = True
        return {"data": torch.cat((first["data"], second["data"])), "target": target,
                "keys": list(first["keys"]) + list(second["keys"]), "labelled": labelled}
