"""ACTION's contrastive distillation with soft negatives (You et al., IPMI 2023, stage A; ``../shared/METHODS.md`` §3).

A student embedding ``q`` and the EMA teacher's embedding ``k`` of the same image are each compared, by
cosine similarity, with a queue ``Q`` of past teacher embeddings. Instead of one positive and binary
negatives, the teacher's similarity distribution over the queue is the soft target of the student's:

    L = (1/N) Σ_n KL( softmax(cos(k_n, Q) / T_t) ‖ softmax(cos(q_n, Q) / T_s) )

with a sharper teacher (``T_t`` = 0.01 on ACDC, 0.6 on LA) than student (``T_s`` = 0.1). The teacher side
carries no gradient. :func:`soft_negative_kl` is ``L`` on global embeddings (pooled bottleneck, ``L_lat``);
:func:`local_window_embeddings` cuts a ``(B, C, *spatial)`` map into non-overlapping windows and averages
each, so that the same loss on the windows of the output map gives ``L_out``.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def soft_negative_kl(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor,
                     student_temperature: float = 0.1, teacher_temperature: float = 0.01) -> torch.Tensor:
    """``KL(softmax(cos(k, Q)/T_t) ‖ softmax(cos(q, Q)/T_s))``, averaged over the ``N`` embeddings.

    Args:
        student: ``(N, D)`` student embeddings ``q`` (normalised here).
        teacher: ``(N, D)`` teacher embeddings ``k`` of the same samples (normalised here, detached).
        queue: ``(M, D)`` past teacher embeddings (normalised here, detached), ``M ≥ 1``.
        student_temperature, teacher_temperature: ``T_s``, ``T_t`` > 0.

    Returns:
        A scalar ≥ 0.
    """
    if student.dim() != 2 or teacher.shape != student.shape:
        raise ValueError(f"student and teacher must both be (N, D), got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    if queue.dim() != 2 or queue.shape[1] != student.shape[1] or queue.shape[0] == 0:
        raise ValueError(f"queue must be (M, {student.shape[1]}) with M >= 1, got {tuple(queue.shape)}")
    if student_temperature <= 0 or teacher_temperature <= 0:
        raise ValueError("temperatures must be > 0")
    queue = F.normalize(queue.detach(), dim=1)
    student_log_p = F.log_softmax(F.normalize(student, dim=1) @ queue.T / student_temperature, dim=1)
    teacher_log_p = F.log_softmax(F.normalize(teacher.detach(), dim=1) @ queue.T / teacher_temperature, dim=1)
    return (teacher_log_p.exp() * (teacher_log_p - student_log_p)).sum(1).mean()


def local_window_embeddings(feature_map: torch.Tensor, window: int | tuple[int, ...]) -> torch.Tensor:
    """The mean feature of each non-overlapping window: ``(B, C, *spatial)`` → ``(B · n_windows, C)``.

    Args:
        feature_map: ``(B, C, H, W)`` or ``(B, C, D, H, W)``.
        window: window size per spatial axis (one int for all); each must divide the map's size.

    Rows are ordered sample by sample, windows in row-major order within a sample.
    """
    spatial = feature_map.shape[2:]
    if len(spatial) not in (2, 3):
        raise ValueError(f"feature_map must be (B, C, H, W) or (B, C, D, H, W), got {tuple(feature_map.shape)}")
    window = (window,) * len(spatial) if isinstance(window, int) else tuple(window)
    if len(window) != len(spatial) or any(w < 1 or s % w for s, w in zip(spatial, window)):
        raise ValueError(f"window {window} does not divide the map's spatial size {tuple(spatial)}")
    pool = F.avg_pool2d if len(spatial) == 2 else F.avg_pool3d
    pooled = pool(feature_map, kernel_size=window, stride=window)
    return pooled.flatten(2).transpose(1, 2).reshape(-1, feature_map.shape[1])
