"""Two-stream training batches: samples of two kinds of case in every batch.

nnU-Net draws every training sample from one pool and crops it around annotated voxels; it has no
notion of kinds of supervision. A semi-supervised method needs each batch to hold a fixed number of
labelled samples (for the supervised loss) and of unlabelled ones (for the consistency losses), on
every DDP rank; a mixed-supervision method (ConfKD) a fixed number of densely labelled ones and of
weakly labelled ones. :class:`TwoStreamDataLoader` composes such a batch from two of nnU-Net's own
loaders. For semi-supervised batches (the defaults):

- the **labelled stream** is an ``nnUNetDataLoader`` over the labelled cases, with nnU-Net's
  foreground oversampling (a fraction of its samples centred on a foreground voxel; in a stream too
  small for nnU-Net's rule to oversample any, each sample with that probability);
- the **unlabelled stream** is an ``nnUNetDataLoader`` over the unlabelled cases, without
  oversampling and with uniform random crops: an unlabelled case has no annotated voxel to centre on.

Both streams go through the same augmentation pipeline (the ``transforms`` nnU-Net hands its loader),
so an unlabelled sample is augmented exactly as a labelled one. The batch is the labelled samples
followed by the unlabelled ones, with ``batch["labelled"]``, a boolean ``(B,)`` tensor, saying which is
which. An unlabelled sample's target is the ignore label everywhere, so nnU-Net's loss already skips
it; the mask lets a method leave it out of the supervised loss explicitly. A second stream of annotated
cases (``second_unannotated=False``, e.g. weak labels) keeps nnU-Net's oversampling and crops, and the
mask is named after the first stream (``mask_name``, e.g. ``strong``).
"""
from __future__ import annotations

import math

import torch
from batchgenerators.dataloading.data_loader import DataLoader
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunet_weak.errors import UserInputError


def split_batch(batch_size: int, first_per_batch: float = 0,
                streams: tuple[str, str] = ("labelled", "unlabelled")) -> tuple[int, int]:
    """How many samples of each stream a batch of ``batch_size`` holds.

    Args:
        batch_size: samples per batch on one rank (nnU-Net's planned batch size, divided over ranks).
        first_per_batch: samples of the first stream per batch. ``0`` means half the batch, rounded up; a
            value strictly between 0 and 1 is a share of the batch, ``ceil(share · batch_size)`` kept
            between 1 and ``batch_size - 1`` (a share fits every planned batch size, where a count fits
            one); a whole number from 1 is a count.
        streams: the names of the two streams, for the messages.

    Raises:
        UserInputError: if the batch cannot hold at least one sample of each kind, or a count is not a
            whole number.
    """
    first, second = streams
    if batch_size < 2:
        raise UserInputError(
            f"A batch of two streams needs at least one {first} and one {second} sample, but the batch size per "
            f"GPU is {batch_size}. Use plans with a batch size of at least 2 per GPU (edit 'batch_size' in the "
            f"plans' configuration, or train on fewer GPUs).")
    if first_per_batch < 0 or (first_per_batch > 1 and first_per_batch != int(first_per_batch)):
        raise UserInputError(f"{first}_per_batch must be 0 (half the batch), a share of the batch between 0 and 1, "
                             f"or a whole number of samples, got {first_per_batch}.")
    if first_per_batch == 0:
        count = math.ceil(batch_size / 2)
    elif first_per_batch < 1:
        count = min(max(math.ceil(first_per_batch * batch_size), 1), batch_size - 1)
    else:
        count = int(first_per_batch)
    if not 1 <= count <= batch_size - 1:
        raise UserInputError(
            f"{first}_per_batch={count} leaves no room for both kinds in a batch of {batch_size} per GPU: "
            f"choose between 1 and {batch_size - 1} samples, or a share of the batch between 0 and 1 (0 = half).")
    return count, batch_size - count


class TwoStreamDataLoader(DataLoader):
    """Batches of ``first.batch_size`` samples of the first stream, then ``second.batch_size`` of the second.

    Args:
        first: nnU-Net loader over the first stream's training cases (with its oversampling).
        second: nnU-Net loader over the second stream's training cases.
        mask_name: the batch entry that marks the first stream's samples.
        second_unannotated: the second stream's cases carry no annotation (unlabelled): its oversampling is
            turned off and its crops made uniform here.

    A batch is nnU-Net's batch dictionary (``data`` ``(B, C, *patch)``, ``target`` a tensor or a list
    per deep-supervision scale, ``keys``) plus ``batch[mask_name]``, a ``(B,)`` bool tensor, ``True`` for
    the first ``first.batch_size`` entries.
    """

    def __init__(self, first: nnUNetDataLoader, second: nnUNetDataLoader, mask_name: str = "labelled",
                 second_unannotated: bool = True):
        super().__init__((first, second), first.batch_size + second.batch_size, 1, None, True, False, True)
        for stream in (first, second):
            if (stream.get_do_oversample == stream._oversample_last_XX_percent
                    and stream.oversample_foreground_percent > 0
                    and not any(stream.get_do_oversample(i) for i in range(stream.batch_size))):
                # nnU-Net oversamples the last round(p·B) samples of a batch: none in a stream of one sample
                # (p = 1/3, the LA set-up), so each sample is oversampled with probability p instead
                stream.get_do_oversample = stream._probabilistic_oversampling
        if second_unannotated:
            second.oversample_foreground_percent = 0.0
            # nnU-Net centres crops of ignore-label datasets on annotated voxels; an unlabelled case has none,
            # so it gets the uniform crops nnU-Net uses for datasets without an ignore label
            second.has_ignore = False
        self.first, self.second, self.mask_name = first, second, mask_name

    def generate_train_batch(self) -> dict:
        first, second = self.first.generate_train_batch(), self.second.generate_train_batch()
        if isinstance(first["target"], list):
            target = [torch.cat(pair) for pair in zip(first["target"], second["target"])]
        else:
            target = torch.cat((first["target"], second["target"]))
        mask = torch.zeros(self.batch_size, dtype=torch.bool)
        mask[:self.first.batch_size] = True
        return {"data": torch.cat((first["data"], second["data"])), "target": target,
                "keys": list(first["keys"]) + list(second["keys"]), self.mask_name: mask}
