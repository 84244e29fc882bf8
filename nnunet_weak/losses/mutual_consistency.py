"""Sharpened cross-consistency between two networks (MC-Net+, Wu et al. 2022; CAML, Gao et al. 2023).

Each network's probabilities are pulled towards the *sharpened* probabilities of the other, which act
as soft pseudo-labels and receive no gradient:

    sharpen(p)_c = p_c^(1/T) / Σ_k p_k^(1/T)                                           (MC-Net+ Eq. 4)
    L_cons = mean((p¹ − sharpen(p²))²) + mean((p² − sharpen(p¹))²)                    (MC-Net+ Eq. 5)

with the means over every voxel, class and sample (labelled and unlabelled alike); T = 0.1.
"""
from __future__ import annotations

import torch


def sharpen(probabilities: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """``p^(1/T) / Σ_c p_c^(1/T)`` over the class axis (dim 1).

    Args:
        probabilities: ``(B, C, *spatial)`` class probabilities (each voxel sums to 1).
        temperature: ``T > 0``; below 1 it sharpens, 1 leaves ``p`` unchanged.

    Computed as ``softmax(log p / T)``, which is the same quantity without overflow for small ``T``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if probabilities.dim() < 3:
        raise ValueError(f"probabilities must be (B, C, *spatial), got shape {tuple(probabilities.shape)}")
    return torch.softmax(torch.log(probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny)) / temperature,
                         dim=1)


def sharpened_cross_consistency_loss(first: torch.Tensor, second: torch.Tensor, temperature: float = 0.1,
                                     reduction: str = "mean") -> torch.Tensor:
    """``L_cons`` between the probabilities of two networks.

    Args:
        first, second: ``(B, C, *spatial)`` probabilities of the two networks for the same batch.
        temperature: sharpening temperature ``T`` of the pseudo-labels.
        reduction: ``"mean"`` (a scalar, the sum of the two mean squared errors) or ``"none"`` (the
            ``(B, C, *spatial)`` sum of the two squared errors).

    Gradients reach ``first`` and ``second`` only through the side that is not sharpened.
    """
    if first.shape != second.shape:
        raise ValueError(f"the two networks' probabilities differ in shape: {tuple(first.shape)} and "
                         f"{tuple(second.shape)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    squared = ((first - sharpen(second.detach(), temperature)) ** 2
               + (second - sharpen(first.detach(), temperature)) ** 2)
    return squared.mean() if reduction == "mean" else squared
