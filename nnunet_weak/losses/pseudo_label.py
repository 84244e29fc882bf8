"""Confidence-weighted pseudo-label cross-entropy (ACTION fine-tuning, ``L_unsup``; ``../shared/METHODS.md`` §3).

The EMA teacher's prediction on an unlabelled image gives a hard pseudo-label per voxel; the student, seeing
the image strongly augmented, is trained on it with cross-entropy weighted per image by how much of the
teacher's prediction is confident:

    L_unsup = (1/B) Σ_b w_b · mean_v CE(s_bv, argmax_k t_bvk),   w_b = mean_v [max_k t_bvk ≥ θ]

with ``θ`` = 0.97. The weight and the pseudo-labels carry no gradient.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def confidence_weighted_pseudo_label_ce(student_logits: torch.Tensor, teacher_probabilities: torch.Tensor,
                                        threshold: float = 0.97) -> torch.Tensor:
    """``L_unsup`` of the module docstring.

    Args:
        student_logits: ``(B, K, *spatial)``.
        teacher_probabilities: ``(B, K, *spatial)``, softmax probabilities (detached here).
        threshold: ``θ`` in ``[0, 1]``.
    """
    if student_logits.shape != teacher_probabilities.shape or student_logits.dim() < 3:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher probabilities "
                         f"{tuple(teacher_probabilities.shape)} must both be (B, K, *spatial)")
    confidence, pseudo_label = teacher_probabilities.detach().max(1)
    cross_entropy = F.cross_entropy(student_logits, pseudo_label, reduction="none").flatten(1).mean(1)
    weight = (confidence >= threshold).flatten(1).to(cross_entropy.dtype).mean(1)
    return (weight * cross_entropy).mean()
