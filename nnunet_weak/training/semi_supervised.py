"""Trainers on two-stream batches: the base of every semi-supervised (and mixed-supervision) trainer.

``TwoStreamTrainer`` trains on batches composed from two streams of training cases
(``nnunet_weak.training.two_stream``): on every DDP rank, each batch holds a fixed number of the first
stream's samples followed by the second stream's, all through nnU-Net's augmentation, and
``compute_training_loss`` receives the ``(B,)`` mask named after the first stream. A subclass says
which cases form each stream (``stream_keys``) and how many of the first a batch holds, and may append a
per-case map to the training samples' segmentation (``training_target_folder``, through nnU-Net's loader).

``SemiSupervisedTrainer`` keeps the cases that the supervision manifest marks ``unlabelled`` in the
training keys: ``labelled_per_batch`` labelled samples (nnU-Net's foreground oversampling applies to
them only), then unlabelled ones; the mask is ``labelled``.

nnU-Net's planned batch size is kept; option ``labelled_per_batch`` (``NNUNET_WEAK_TRAINER_OPTIONS``)
sets the split: a count of samples, a share of the batch between 0 and 1, or 0, half the batch rounded
up (``two_stream.split_batch``; 0 is the default here, a method may set its own). Validation is
nnU-Net's; its per-epoch pseudo-Dice uses the labelled validation cases.
"""
from __future__ import annotations


from nnunet_weak.errors import UserInputError
from nnunet_weak.training.two_stream import TwoStreamDataLoader, split_batch
from nnunet_weak.training.weak_trainer import nnUNetWeakTrainer


class TwoStreamTrainer(nnUNetWeakTrainer):
    """nnU-Net on two-stream batches; the loss is nnU-Net's until a method overrides ``compute_training_loss``."""

    streams: tuple[str, str] = ("labelled", "unlabelled")
    second_stream_unannotated = True  # unlabelled cases: uniform crops, no foreground oversampling

    #: the manifest's supervision kinds of the first and of the second stream's cases
    stream_supervision: tuple[tuple[str, ...], tuple[str, ...]] = (("dense", "sparse"), ("unlabelled",))
    #: the ``nnunet-weak convert`` option that makes a dataset with both kinds, for the error messages
    conversion_hint = "--supervision semi --labelled_count N"

    def stream_keys(self, training_keys: list[str]) -> tuple[list[str], list[str]]:
        """This fold's training cases of the first and of the second stream (``stream_supervision``, from the
        supervision manifest)."""
        manifest = self.supervision_manifest
        if manifest is None:
            raise UserInputError(
                f"{self.__class__.__name__} needs the supervision manifest of {self.plans_manager.dataset_name} in "
                f"nnUNet_raw to tell {self.streams[0]} from {self.streams[1]} cases, and it was not found. Convert "
                f"the dataset with 'nnunet-weak convert ... {self.conversion_hint}' and keep its raw folder in "
                f"nnUNet_raw.")
        streams = [[k for k in training_keys if manifest.cases[k].supervision in kinds]
                   for kinds in self.stream_supervision]
        for name, keys in zip(self.streams, streams):
            if not keys:
                raise UserInputError(
                    f"Fold {self.fold} of {self.plans_manager.dataset_name} has no {name} training case, so its batches "
                    f"cannot mix {self.streams[0]} and {self.streams[1]} samples. Check the supervision manifest "
                    f"('nnunet-weak convert ... {self.conversion_hint}') and the split (splits_final.json).")
        return streams[0], streams[1]

    def first_stream_per_batch(self) -> float:
        """Samples of the first stream per batch, as ``split_batch`` reads it: a count, a share of the batch
        between 0 and 1, or 0 (half the batch, rounded up)."""
        raise NotImplementedError

    def training_target_folder(self, first_keys: list[str], second_keys: list[str]) -> str | None:
        """The folder of per-case maps that nnU-Net's loader appends to every training sample's segmentation as
        its last channel (nnU-Net's previous-stage segmentations; ``None``: nothing appended), for the training
        cases of both streams."""
        return self.folder_with_segs_from_previous_stage

    def training_data_loader(self, make_loader, initial_patch_size, transforms, training_keys):
        """The two-stream training loader (``nnUNetWeakTrainer.training_data_loader``)."""
        first_count, second_count = split_batch(self.batch_size, self.first_stream_per_batch(), self.streams)
        first_keys, second_keys = self.stream_keys(training_keys)
        self.print_to_log_file(f"Two-stream batches: {first_count} {self.streams[0]} (of {len(first_keys)} cases) + "
                               f"{second_count} {self.streams[1]} (of {len(second_keys)} cases) per GPU.")
        appended_segs = self.training_target_folder(first_keys, second_keys)
        return TwoStreamDataLoader(
            make_loader(first_keys, first_count, initial_patch_size, transforms, appended_segs),
            make_loader(second_keys, second_count, initial_patch_size, transforms, appended_segs),
            mask_name=self.streams[0], second_unannotated=self.second_stream_unannotated)

    def pseudo_dice_validation_keys(self, validation_keys):
        # nnU-Net's per-epoch pseudo-Dice can only count annotated voxels: unlabelled validation cases
        # (scored on their dense labels after training) have none, and are used only when there is nothing else
        annotated = [k for k in validation_keys if self.supervision_manifest.cases[k].is_labelled]
        return (annotated, True) if annotated else (validation_keys, False)


class SemiSupervisedTrainer(TwoStreamTrainer):
    """nnU-Net on two-stream (labelled + unlabelled) batches; the loss is nnU-Net's until a method
    overrides ``compute_training_loss``."""

    trains_on_unlabelled_cases = True
    tunable_options = {"labelled_per_batch": 0.0}

    def first_stream_per_batch(self) -> float:
        return self.labelled_per_batch
