"""Trainers on mixed supervision: a few densely labelled ("strong") cases and many weakly labelled ones.

A mixed dataset (``nnunet-weak convert ... --supervision mixed``) carries in ``labelsTr`` the dense label
of each strong case and the weak label (scribble, eroded mask, box, ...; the ignore label elsewhere) of
each weak case; the supervision manifest marks them ``dense`` and ``sparse``, and names each strong
case's own weak label (``labelsTr_weak``). A mixed-supervision method (ConfKD) trains one branch on the
dense labels and another on the weak labels of *all* cases, so a strong sample needs both maps, and they
must stay voxel-aligned through nnU-Net's augmentation.

**Two aligned targets, one pipeline.** nnU-Net's loader already appends a second map to a case's
segmentation: the cascade's previous-stage segmentation, read from
``folder_with_segs_from_previous_stage/<case>`` and cropped with the same box. With the cascade's
one-hot move turned off (``is_cascaded=False`` in the transforms), every spatial transform, the
``-1`` removal and the deep-supervision down-sampling treat it as one more segmentation channel, so one
random augmentation moves both maps. :func:`write_weak_target_maps` writes that folder per training run:
for a strong case its weak label, preprocessed exactly as nnU-Net preprocessed the case (same crop,
resampling and nonzero mask, with the plans' preprocessor); for a weak case its ``labelsTr`` map (the
weak label) as preprocessed. A training sample's target is then ``(labelsTr map, weak map)``; the weak
channel's deep-supervision targets follow the sparse-preserving rule
(``nnunet_weak.transforms.sparse_downsampling``, a majority vote on a dense map).

**Batches by supervision kind.** ``MixedSupervisionTrainer`` is a ``TwoStreamTrainer`` with streams
``strong`` (nnU-Net's oversampling) and ``weak`` (annotated, so nnU-Net's crops centred on annotated
voxels); ``compute_training_loss`` receives ``strong``, the ``(B,)`` mask of strong samples, and
``weak_target``, the weak maps in the form of ``target`` (a list per deep-supervision scale). Option
``strong_per_batch`` (a count, a share between 0 and 1, or 0: half the batch, rounded up; ``split_batch``).
Cases marked ``unlabelled`` are left out.

The dense label of a weak case (``labelsTr_dense``, for scoring) is never read here: nothing a loss
receives comes from it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch.distributed as dist

from nnunet_weak.errors import UserInputError
from nnunet_weak.training.semi_supervised import TwoStreamTrainer

#: folder of a run's weak maps, beside its checkpoints
WEAK_TARGETS_FOLDER = "weak_target_maps"


def write_weak_target_maps(folder: str | os.PathLike, strong_cases: dict[str, tuple[list[Path], Path]],
                           weak_cases: list[str], preprocessed_folder: str | os.PathLike, dataset_class,
                           plans_manager, configuration_manager, dataset_json: dict) -> Path:
    """Write the weak map of every training case where nnU-Net's loader reads a previous stage's segmentation.

    Args:
        folder: the folder to (re)create; written as ``<folder>.partial`` and renamed when complete.
        strong_cases: strong case → (its channel images, its weak label file) in the raw dataset.
        weak_cases: weak cases, whose preprocessed ``labelsTr`` map is their weak map.
        preprocessed_folder: the configuration's preprocessed cases.
        dataset_class: nnU-Net's dataset class of that folder (``nnUNetDatasetBlosc2`` or ``...Numpy``).
        plans_manager, configuration_manager, dataset_json: the run's, for the plans' preprocessor.

    Each map is ``(*spatial)`` integer labels on the preprocessed case's grid, saved with
    ``dataset_class.save_seg`` as nnU-Net saves a previous stage's segmentation.

    Raises:
        UserInputError: a weak label file is missing, or is not on its image's grid.
    """
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    preprocessed = dataset_class(str(preprocessed_folder), sorted(weak_cases))
    for case in weak_cases:
        seg = np.asarray(preprocessed.load_case(case)[1])
        dataset_class.save_seg(np.ascontiguousarray(seg[0]), str(partial / case))
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    reader = plans_manager.image_reader_writer_class()
    for case, (images, weak_label) in strong_cases.items():
        if not weak_label.is_file():
            shutil.rmtree(partial)
            raise UserInputError(f"The weak label of strong case {case} is missing: {weak_label}. Convert the dataset "
                                 f"again with 'nnunet-weak convert ... --supervision mixed', which writes it.")
        data, properties = reader.read_images([str(i) for i in images])
        seg, _ = reader.read_seg(str(weak_label))
        if seg.shape[1:] != data.shape[1:]:
            shutil.rmtree(partial)
            raise UserInputError(f"The weak label of strong case {case} ({weak_label}) has shape {seg.shape[1:]}, its "
                                 f"image {data.shape[1:]}: the weak label is not on the image's grid. Convert the "
                                 f"dataset again.")
        _, seg, _ = preprocessor.run_case_npy(data, seg, properties, plans_manager, configuration_manager, dataset_json)
        dataset_class.save_seg(np.ascontiguousarray(seg[0].astype(np.int16)), str(partial / case))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder


def split_weak_target(target):
    """nnU-Net's targets (a tensor or a list per deep-supervision scale, ``(B, 2, *spatial)``: ``labelsTr`` map,
    weak map) as ``(labelsTr targets, weak targets)``, each ``(B, 1, *spatial)`` in the same form."""
    if isinstance(target, list):
        return [t[:, :1] for t in target], [t[:, 1:2] for t in target]
    return target[:, :1], target[:, 1:2]


class MixedSupervisionTrainer(TwoStreamTrainer):
    """nnU-Net on strong + weak batches whose targets carry each sample's weak map beside its ``labelsTr`` map."""

    streams = ("strong", "weak")
    stream_supervision = (("dense",), ("sparse",))
    conversion_hint = "--supervision mixed --labelled_count N"
    second_stream_unannotated = False
    tunable_options = {"strong_per_batch": 0.0}

    def first_stream_per_batch(self) -> float:
        return self.strong_per_batch

    def training_target_folder(self, first_keys: list[str], second_keys: list[str]) -> str:
        """Write this run's weak maps (rank 0; the other ranks wait) and return their folder."""
        if self.is_cascaded:
            raise UserInputError(f"{self.__class__.__name__} carries each case's weak map where the cascade carries "
                                 f"the previous stage's segmentation: train it on a configuration that is not a cascade "
                                 f"stage ('{self.configuration_name}' is).")
        folder = Path(self.output_folder) / WEAK_TARGETS_FOLDER
        if self.local_rank == 0:
            strong, weak = first_keys, second_keys
            raw = self.raw_dataset
            strong_cases = {}
            for case in strong:
                weak_label = raw.manifest.weak_label_path(raw.folder, case)
                if weak_label is None:
                    raise UserInputError(
                        f"Strong case {case} of {raw.name} names no weak label (weak_label_file) in its supervision "
                        f"manifest. Convert the dataset again with 'nnunet-weak convert ... --supervision mixed'.")
                strong_cases[case] = (raw.training_images(case), weak_label)
            self.print_to_log_file(f"Writing the weak maps of {len(strong_cases)} strong and {len(weak)} weak training "
                                   f"cases to {folder}")
            write_weak_target_maps(folder, strong_cases, weak, self.preprocessed_dataset_folder, self.dataset_class,
                                   self.plans_manager, self.configuration_manager, self.dataset_json)
        if self.is_ddp:
            dist.barrier()
        return str(folder)

    def split_target(self, target):
        target, extras = super().split_target(target)
        target, extras["weak_target"] = split_weak_target(target)
        return target, extras
