"""``-tr nnUNetWeakTrainer``: nnU-Net with a short, configurable budget, manifest-aware training and
final validation scored on dense labels (see ``nnunet_weak.training.weak_trainer``).

On a dense dataset it is the fully supervised upper bound; on a scribble dataset, whose un-annotated
voxels carry the ignore label, nnU-Net's loss becomes the partial loss: the "nnU-Net + partial
loss" baseline (Gotkowski et al., MICCAI 2025) that every method must beat.
"""
from nnunet_weak.training.weak_trainer import nnUNetWeakTrainer

__all__ = ["nnUNetWeakTrainer", "nnUNetWeakTrainer_nearestDSTargets", "nnUNetWeakTrainer_denseCasesOnly"]


class nnUNetWeakTrainer_nearestDSTargets(nnUNetWeakTrainer):
    """nnU-Net's nearest-neighbour down-sampling of the deep-supervision targets, even on sparse labels
    (the comparison point of ``sparse_target_downsampling``)."""

    sparse_target_downsampling = "nearest"


class nnUNetWeakTrainer_denseCasesOnly(nnUNetWeakTrainer):
    """nnU-Net on the densely labelled cases alone: on a mixed dataset, the baseline that ignores the weak labels."""

    trains_on_sparse_cases = False
