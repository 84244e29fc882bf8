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

With ``n`` up to 12,800 voxels per class and ``m`` = 1,024 memory entries the ``n × m`` correlation
matrices would be the largest tensors of a 2D training step, and autograd would keep several of them
for the backward pass. :class:`OmniCorrelationFunction` never holds more than ``rows_per_chunk`` rows of
them: it computes the loss chunk by chunk and, in the backward pass, recomputes each chunk's
correlations and applies the closed-form gradients (with ``a = r¹Mᵀ/τ``, ``b = r²Mᵀ/τ``,
``p = softmax(a)``, ``q = softmax(b)``, ``ℓ_i = −Σ_j q_ij log p_ij``):

    ∂L/∂a_i = (p_i − q_i) / n            ∂L/∂b_i = −q_i ⊙ (log p_i + ℓ_i) / n
    ∂L/∂r¹_i = (∂L/∂a_i) · M / τ          ∂L/∂r²_i = (∂L/∂b_i) · M / τ
"""
from __future__ import annotations

import torch

from nnunet_weak.losses.local_window import in_single_precision


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
                          temperature: float = 0.1, rows_per_chunk: int | None = None) -> torch.Tensor:
    """``L_omni`` (module docstring), a scalar; zero (with gradient) for no voxel or an empty memory.

    Args:
        first_embeddings: ``(n, D)`` embeddings of the chosen voxels by the first network's heads.
        second_embeddings: ``(n, D)`` the same voxels by the second network's heads (the target).
        memory: ``(m, D)`` labelled-voxel embeddings (every class), without gradient.
        temperature: ``τ``.
        rows_per_chunk: rows of the correlation matrices computed at once (default: about 2 M entries).
            Changes memory and speed, not the result.

    Returns:
        the scalar loss, in float32 at least (float64 for float64 embeddings).
    """
    if first_embeddings.shape != second_embeddings.shape or first_embeddings.dim() != 2:
        raise ValueError(f"expected two (n, D) embedding matrices of one shape, got {tuple(first_embeddings.shape)} "
                         f"and {tuple(second_embeddings.shape)}")
    if memory.dim() != 2 or memory.shape[1] != first_embeddings.shape[1]:
        raise ValueError(f"memory must be (m, {first_embeddings.shape[1]}), got {tuple(memory.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if rows_per_chunk is not None and rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
    if len(first_embeddings) == 0 or len(memory) == 0:
        return (first_embeddings.sum() + second_embeddings.sum()) * 0
    dtype = torch.promote_types(first_embeddings.dtype, torch.float32)
    scaled_memory = memory.detach().to(dtype) / temperature
    return OmniCorrelationFunction.apply(first_embeddings.to(dtype), second_embeddings.to(dtype), scaled_memory,
                                         rows_per_chunk or max(1, 2 ** 21 // len(memory)))


def _correlations(first: torch.Tensor, second: torch.Tensor, scaled_memory: torch.Tensor):
    """``log p`` and ``q`` (module docstring) for some rows."""
    return (torch.log_softmax(first @ scaled_memory.T, dim=1), torch.softmax(second @ scaled_memory.T, dim=1))


class OmniCorrelationFunction(torch.autograd.Function):
    """``L_omni`` of ``(n, D)`` embeddings against ``(m, D)`` memory already divided by ``τ``, computed
    ``rows_per_chunk`` rows at a time with the closed-form gradients of the module docstring (none for the
    memory). Under autocast it runs in float32: the softmax over 1,024 sharp logits needs it."""

    @staticmethod
    @in_single_precision
    def forward(ctx, first, second, scaled_memory, rows_per_chunk: int):
        per_row = first.new_empty(len(first))
        for start in range(0, len(first), rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            log_p, q = _correlations(first[rows], second[rows], scaled_memory)
            per_row[rows] = -(q * log_p).sum(dim=1)
        ctx.save_for_backward(first, second, scaled_memory, per_row)
        ctx.rows_per_chunk = rows_per_chunk
        return per_row.mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        first, second, scaled_memory, per_row = ctx.saved_tensors
        scale = grad_loss / len(first)
        grad_first, grad_second = torch.empty_like(first), torch.empty_like(second)
        for start in range(0, len(first), ctx.rows_per_chunk):
            rows = slice(start, start + ctx.rows_per_chunk)
            log_p, q = _correlations(first[rows], second[rows], scaled_memory)
            grad_first[rows] = ((log_p.exp() - q) * scale) @ scaled_memory
            grad_second[rows] = (-q * (log_p + per_row[rows, None]) * scale) @ scaled_memory
        return grad_first, grad_second, None, None
