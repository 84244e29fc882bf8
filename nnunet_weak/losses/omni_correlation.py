"""Omni-correlation consistency of CAML (Gao et al., MICCAI 2023, §2.3; ``../shared/METHODS.md`` §5).

Unlabelled voxels on which the two networks agree are embedded by each network's heads; each
embedding ``r`` is compared with every entry of a memory ``M`` of labelled-voxel embeddings, giving a
correlation distribution ``softmax(r·Mᵀ / τ)`` over the memory (Eq. 6). The two networks' distributions
must match (Eq. 7), with the second network's as the target, as in the authors' code:

    L_omni = −(1/n) Σ_i Σ_j softmax(r²_i·Mᵀ/τ)_j · log softmax(r¹_i·Mᵀ/τ)_j

``τ = 0.1``. The target is not detached (the authors' code lets both networks move); the memory is
constant. :func:`agreeing_confident_voxels` chooses the voxels: those where both networks predict the
same class, at most ``max_per_class`` per class (12,800 in CAML), the most confident first by the first
network's probability.
"""
from __future__ import annotations

import torch


def agreeing_confident_voxels(first: torch.Tensor, second: torch.Tensor, max_per_class: int = 12800) -> torch.Tensor:
    """Flat indices of the voxels to compare, sorted by class then by decreasing confidence.

    Args:
        first, second: ``(M, C)`` class probabilities of the two networks for the same ``M`` voxels.
        max_per_class: the most voxels kept per class (of the first network's argmax).

    Returns:
        ``(n,)`` long tensor of indices into ``M``; empty if the networks agree nowhere.
    """
    if first.shape != second.shape or first.dim() != 2:
        raise ValueError(f"expected two (M, C) probability matrices of one shape, got {tuple(first.shape)} and "
                         f"{tuple(second.shape)}")
    confidence, label = first.max(dim=1)
    agreeing = label == second.argmax(dim=1)
    chosen = []
    for c in range(first.shape[1]):
        candidates = torch.nonzero(agreeing & (label == c)).flatten()
        order = torch.argsort(confidence[candidates], descending=True, stable=True)
        chosen.append(candidates[order[:max_per_class]])
    return torch.cat(chosen)


def omni_correlation_loss(first_embeddings: torch.Tensor, second_embeddings: torch.Tensor, memory: torch.Tensor,
                          temperature: float = 0.1) -> torch.Tensor:
    """``L_omni`` (module docstring), a scalar; zero (with gradient) for no voxel or an empty memory.

    Args:
        first_embeddings: ``(n, D)`` embeddings of the chosen voxels by the first network's heads.
        second_embeddings: ``(n, D)`` the same voxels by the second network's heads (the target).
        memory: ``(m, D)`` labelled-voxel embeddings (every class), without gradient.
        temperature: ``τ``.
    """
    if first_embeddings.shape != second_embeddings.shape or first_embeddings.dim() != 2:
        raise ValueError(f"expected two (n, D) embedding matrices of one shape, got {tuple(first_embeddings.shape)} "
                         f"and {tuple(second_embeddings.shape)}")
    if memory.dim() != 2 or memory.shape[1] != first_embeddings.shape[1]:
        raise ValueError(f"memory must be (m, {first_embeddings.shape[1]}), got {tuple(memory.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if len(first_embeddings) == 0 or len(memory) == 0:
        return (first_embeddings.sum() + second_embeddings.sum()) * 0
    memory = memory.detach().to(first_embeddings.dtype)
    log_correlation_first = torch.log_softmax(first_embeddings @ memory.T / temperature, dim=1)
    correlation_second = torch.softmax(second_embeddings @ memory.T / temperature, dim=1)
    return -(correlation_second * log_correlation_first).sum(dim=1).mean()
