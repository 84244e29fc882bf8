"""``-tr nnUNetWeakTrainer``: nnU-Net with a short, configurable budget, manifest-aware training and
final validation scored on dense labels (see ``nnunet_weak.training.weak_trainer``).

On a dense dataset it is the fully supervised upper bound; on a scribble dataset, whose un-annotated
voxels carry the ignore label, nnU-Net's loss becomes the partial loss: the "nnU-Net + partial
loss" baseline (Gotkowski et al., MICCAI 2025) that every method must beat.
"""
from nnunet_weak.training.weak_trainer import nnUNetWeakTrainer

__all__ = ["nnUNetWeakTrainer"]
