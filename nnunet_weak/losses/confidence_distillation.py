"""The two unsupervised terms of ConfKD (Liu et al., MedIA 2023; ``../shared/METHODS.md`` §2).

On the weakly labelled images, the student branch is pulled towards the teacher branch's prediction and
made confident:

    L = … + λ_KL · KL(p_teacher ‖ p_student) + λ_H · H(p_student)

- :func:`teacher_student_kl` is ``KL(p_t ‖ p_s) = Σ_k p_t,k (log p_t,k − log p_s,k)`` per voxel;
- :func:`prediction_entropy` is the Shannon entropy ``H(p) = −Σ_k p_k log p_k`` per voxel.

Both take logits ``(B, K, *spatial)`` (softmax over ``K``) and ``samples``, a ``(B,)`` bool tensor of the
samples the term applies to (the weak cases of a batch), and return the mean over those samples' voxels:
a scalar, ``0`` (still in the graph) when no sample is selected. The paper's argument for using both:
entropy alone is minimised by any confident prediction, including a trivial one; the KL term keeps the
student near what the teacher, trained on dense labels, predicts.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def _check(logits: torch.Tensor, samples: torch.Tensor | None, name: str) -> torch.Tensor:
    if logits.dim() < 3:
        raise ValueError(f"{name} must be (B, K, *spatial), got shape {tuple(logits.shape)}")
    if samples is None:
        return torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    if samples.shape != (logits.shape[0],) or samples.dtype != torch.bool:
        raise ValueError(f"samples must be a bool tensor of shape ({logits.shape[0]},), got {samples.dtype} "
                         f"{tuple(samples.shape)}")
    return samples


def _mean_over_selected(per_voxel: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    if not samples.any():
        return per_voxel.sum() * 0.0
    return per_voxel[samples].mean()


def teacher_student_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       samples: torch.Tensor | None = None, detach_teacher: bool = True) -> torch.Tensor:
    """``KL(p_teacher ‖ p_student)`` per voxel, averaged over the voxels of the selected samples.

    Args:
        student_logits, teacher_logits: ``(B, K, *spatial)``, the same shape.
        samples: ``(B,)`` bool, the samples the term applies to (default: all).
        detach_teacher: stop the gradient into the teacher (the student follows the teacher; the teacher
            learns from dense labels only). ``False`` lets the term move the teacher too.
    """
    samples = _check(student_logits, samples, "student_logits")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher {tuple(teacher_logits.shape)} and student {tuple(student_logits.shape)} logits "
                         f"differ in shape")
    if detach_teacher:
        teacher_logits = teacher_logits.detach()
    teacher_log_p = F.log_softmax(teacher_logits, dim=1)
    per_voxel = (teacher_log_p.exp() * (teacher_log_p - F.log_softmax(student_logits, dim=1))).sum(dim=1)
    return _mean_over_selected(per_voxel, samples)


def prediction_entropy(logits: torch.Tensor, samples: torch.Tensor | None = None) -> torch.Tensor:
    """Shannon entropy of the softmax prediction per voxel (nats), averaged over the selected samples' voxels.

    Args:
        logits: ``(B, K, *spatial)``.
        samples: ``(B,)`` bool, the samples the term applies to (default: all).
    """
    samples = _check(logits, samples, "logits")
    log_p = F.log_softmax(logits, dim=1)
    return _mean_over_selected(-(log_p.exp() * log_p).sum(dim=1), samples)
