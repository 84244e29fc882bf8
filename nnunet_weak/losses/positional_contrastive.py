"""Positional contrastive loss (Zeng et al., "Positional contrastive learning for volumetric medical image
segmentation", MICCAI 2021), KAF's global objective (``../shared/METHODS.md`` §4).

Slices at similar relative positions of their volumes show similar anatomy, so their embeddings are pulled
together without any label. For ``N`` embeddings ``z`` (L2-normalised here) with relative slice positions
``p ∈ [0, 1]``, the positives of anchor ``i`` are ``P(i) = {j ≠ i : |p_i − p_j| ≤ δ}`` and

    ℓ_i = −1/|P(i)| · Σ_{j ∈ P(i)} log( exp(z_i·z_j / τ) / Σ_{k ≠ i} exp(z_i·z_k / τ) )

(the supervised-contrastive form PCL uses), averaged over the anchors that have a positive. Nothing but the
positions decides what is positive.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from nnunet_weak.losses.local_window import at_least_single_precision


def positional_contrastive_loss(embeddings: torch.Tensor, positions: torch.Tensor, threshold: float = 0.1,
                                temperature: float = 0.1) -> torch.Tensor:
    """Mean ``ℓ_i`` over the anchors with a positive; 0 (with a graph) when none has one.

    Args:
        embeddings: ``(N, D)``, not necessarily normalised.
        positions: ``(N,)`` relative slice positions in ``[0, 1]``.
        threshold: ``δ``, the largest position difference of a positive pair.
        temperature: ``τ``.
    """
    if embeddings.dim() != 2 or positions.shape != embeddings.shape[:1]:
        raise ValueError(f"expected embeddings (N, D) and positions (N,), got {tuple(embeddings.shape)} and "
                         f"{tuple(positions.shape)}")
    count = embeddings.shape[0]
    z = F.normalize(at_least_single_precision(embeddings), dim=1)
    logits = z @ z.t() / temperature
    itself = torch.eye(count, dtype=torch.bool, device=z.device)
    log_probability = logits - torch.logsumexp(logits.masked_fill(itself, float("-inf")), dim=1, keepdim=True)
    positive = ((positions[:, None] - positions[None, :]).abs() <= threshold) & ~itself
    has_positive = positive.any(1)
    if not has_positive.any():
        return embeddings.sum() * 0.0
    per_anchor = -(log_probability * positive).sum(1)[has_positive] / positive.sum(1)[has_positive]
    return per_anchor.mean()
