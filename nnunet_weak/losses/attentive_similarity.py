"""Attentive similarity loss of AttenScribble (Tian, Yang, Gao, arXiv 2312.06614, Eq. 3–5).

From the attention logits of the self-attention block, ``A_raw = Q Kᵀ`` (no 1/√C scale)::

    A = softmax_rows(Q Kᵀ)                              (Eq. 3)
    K_att = sigmoid(w · (A + Aᵀ) + b)                   (Eq. 4)  symmetric, learnable scalars w, b
    L_att = Σ_b Σ_{i≠j} K_att,ij · G_ij · (1 - ⟨y_i, y_j⟩) / (N · B)        (Eq. 5)

with ``y`` the soft-max prediction resized (area interpolation) to the ``N`` positions of the
attention grid and ``G`` a Gaussian window (radius 5, σ 6, zero diagonal). Gradients reach ``y``,
``Q``, ``K`` and ``w, b``.

Because of ``G`` only the pairs inside the window matter, plus each row's softmax normaliser
``log Z_i = logsumexp_j(q_i · k_j)``. :func:`attentive_similarity_loss` computes ``log Z`` in row
chunks (checkpointed) and the pair terms a tile of positions at a time
(``nnunet_weak.losses.local_window``): memory linear in ``N``. Where one sample's ``N × N`` matrix
fits the memory budget (2D grids of up to a few thousand positions) it takes the whole grid of one
sample at a time instead, with the backward pass written out (:class:`_WholeGridAttentiveEnergy`):
a few ``N × N`` matrices of one sample in flight, nothing kept between the passes, and no gathers.
:func:`dense_attentive_similarity_loss` materialises the ``N × N`` matrices of the whole batch and
leaves the gradients to autograd, as the authors' code does; it is the reference the efficient paths
are tested against, and the baseline of the memory benchmark.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nnunet_weak.losses.local_window import (DEFAULT_TILE_ELEMENTS, LocalWindow, WindowTile,
                                             at_least_single_precision, sum_over_tiles, window_tiles)


def _check_inputs(probabilities: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, window: LocalWindow):
    if queries.shape != keys.shape:
        raise ValueError(f"queries and keys must have the same shape, got {tuple(queries.shape)} and {tuple(keys.shape)}")
    if probabilities.ndim != queries.ndim or probabilities.shape[0] != queries.shape[0]:
        raise ValueError(f"probabilities (B, L, *spatial) must match queries (B, C, *grid) in batch size and "
                         f"dimensionality, got {tuple(probabilities.shape)} and {tuple(queries.shape)}")
    if len(window.radii) != queries.ndim - 2:
        raise ValueError(f"the window is {len(window.radii)}D but the attention grid is {queries.ndim - 2}D")


def resize_to_grid(probabilities: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """Area-interpolate ``(B, L, *spatial)`` probabilities to ``(B, L, *grid)``."""
    if tuple(probabilities.shape[2:]) == tuple(grid):
        return probabilities
    return F.interpolate(probabilities, size=grid, mode="area")


def _row_log_normaliser(query_rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(query_rows @ keys.transpose(1, 2), dim=-1)


def attention_log_normaliser(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``log Z_i = logsumexp_j(q_i · k_j)`` for every position, without the ``N×N`` matrix.

    Shapes: queries, keys ``(B, C, *grid)`` → ``(B, *grid)``.
    """
    batch, _, *grid = queries.shape
    q = queries.flatten(2).transpose(1, 2)
    k = keys.flatten(2).transpose(1, 2)
    n = q.shape[1]
    # the same bound on one chunk's (batch × rows × N) logits as on one tile's block
    rows = max(1, DEFAULT_TILE_ELEMENTS // max(1, batch * n))
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    chunks = []
    for start in range(0, n, rows):
        q_rows = q[:, start:start + rows]
        chunks.append(checkpoint(_row_log_normaliser, q_rows, k, use_reentrant=False) if needs_grad
                      else _row_log_normaliser(q_rows, k))
    return torch.cat(chunks, dim=1).reshape(batch, *grid)


def _attentive_tile_energy(tile: WindowTile, queries, keys, log_normaliser, probabilities, affinity_weight,
                           affinity_bias):
    attention_ij = torch.exp(tile.pair_products(queries, keys) - tile.own_values(log_normaliser))
    attention_ji = torch.exp(tile.pair_products(keys, queries) - tile.band_values(log_normaliser))
    affinity = torch.sigmoid(affinity_weight * (attention_ij + attention_ji) + affinity_bias)
    dissimilarity = 1 - tile.pair_products(probabilities, probabilities)
    return (affinity * tile.weights() * dissimilarity).sum()


def attentive_similarity_loss(probabilities: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor,
                              affinity_weight: torch.Tensor, affinity_bias: torch.Tensor,
                              window: LocalWindow, max_elements: float = DEFAULT_TILE_ELEMENTS) -> torch.Tensor:
    """Eq. 5, with memory bounded by ``max_elements`` per block (linear in the number of positions on large grids).

    Args:
        probabilities: ``(B, L, *spatial)`` soft-max prediction (any resolution; area-resized to the grid).
        queries, keys: ``(B, C, *grid)`` attention projections of the block (``A_raw = Q Kᵀ``).
        affinity_weight, affinity_bias: the scalars ``w, b`` of Eq. 4.
        window: the Gaussian window ``G`` on the attention grid.
        max_elements: bound on the elements of one ``B × tile × band`` block. When one sample's
            ``N × N`` matrix fits in it (2D grids), the whole grid is taken one sample at a time
            (:class:`_WholeGridAttentiveEnergy`): cheaper, and its memory is a few such matrices.

    Returns:
        the scalar loss, a mean over positions and batch (``/(N·B)``).
    """
    _check_inputs(probabilities, queries, keys, window)
    batch, _, *grid = queries.shape
    queries, keys = at_least_single_precision(queries), at_least_single_precision(keys)
    y = resize_to_grid(at_least_single_precision(probabilities), tuple(grid))
    if len(window_tiles(window, tuple(grid), 1, max_elements)) == 1:
        flat = [t.flatten(2).transpose(1, 2) for t in (y, queries, keys)]
        gaussian = window_matrix(window, tuple(grid), y.device, y.dtype)
        total = _WholeGridAttentiveEnergy.apply(*flat, affinity_weight, affinity_bias, gaussian)
        return total / (flat[0].shape[1] * batch)
    log_z = attention_log_normaliser(queries, keys).flatten(1)
    flat = [t.flatten(2).transpose(1, 2) for t in (queries, keys, y)]
    total = sum_over_tiles(_attentive_tile_energy, window, tuple(grid),
                           (*flat[:2], log_z, flat[2], affinity_weight, affinity_bias), max_elements)
    return total / (log_z.shape[1] * batch)


class _WholeGridAttentiveEnergy(torch.autograd.Function):
    """``E = Σ_b Σ_ij K_ij G_ij (1 - ⟨y_i, y_j⟩)`` over whole grids, one sample at a time, backward written out.

    Inputs: ``y`` ``(B, N, L)``, ``q``, ``k`` ``(B, N, C)``, scalars ``w``, ``b``, ``G`` ``(N, N)``.
    With ``M = G ⊙ (1 - y yᵀ)``, ``S = A + Aᵀ`` and ``E' = M ⊙ K ⊙ (1 - K)`` (symmetric, as ``G``, ``M``
    and ``K`` are): ``∂E/∂w = Σ E' ⊙ S``, ``∂E/∂b = Σ E'``, ``∂E/∂A = 2w E'``, through the row soft-max
    ``∂E/∂(qkᵀ) = A ⊙ (∂E/∂A - rowsum(A ⊙ ∂E/∂A))``, and ``∂E/∂y = -2 (K ⊙ G) y``. Autograd would keep a
    dozen ``B × N × N`` intermediates; here the backward pass recomputes one sample's matrices.
    """

    @staticmethod
    def _sample_matrices(q, k, w, b):
        """One sample's ``A``, ``S = A + Aᵀ`` and ``K = sigmoid(w·S + b)``, each ``(N, N)``."""
        attention = torch.softmax(q @ k.transpose(0, 1), dim=-1)
        symmetric = attention + attention.transpose(0, 1)
        return attention, symmetric, torch.sigmoid_(symmetric * w + b)

    @staticmethod
    def _dissimilarity(y):
        return torch.mm(y, y.transpose(0, 1)).neg_().add_(1)

    @staticmethod
    def forward(ctx, y, q, k, w, b, gaussian):
        ctx.save_for_backward(y, q, k, w, b, gaussian)
        total = y.new_zeros(())
        for s in range(y.shape[0]):
            affinity = _WholeGridAttentiveEnergy._sample_matrices(q[s], k[s], w, b)[2]
            total += affinity.mul_(gaussian).mul_(_WholeGridAttentiveEnergy._dissimilarity(y[s])).sum()
        return total

    @staticmethod
    def backward(ctx, grad_output):
        y, q, k, w, b, gaussian = ctx.saved_tensors
        grad_y, grad_q, grad_k = torch.zeros_like(y), torch.zeros_like(q), torch.zeros_like(k)
        grad_w, grad_b = torch.zeros_like(w), torch.zeros_like(b)
        # in place where a matrix is no longer needed: fresh N×N buffers are what costs time on the CPU
        for s in range(y.shape[0]):
            attention, symmetric, affinity = _WholeGridAttentiveEnergy._sample_matrices(q[s], k[s], w, b)
            gated = affinity * gaussian
            grad_y[s] = gated @ y[s]
            grad_z = affinity.neg_().add_(1).mul_(gated).mul_(_WholeGridAttentiveEnergy._dissimilarity(y[s]))
            grad_w += grad_z.flatten() @ symmetric.flatten()
            grad_b += grad_z.sum()
            grad_attention = grad_z.mul_(2 * w)
            row_sums = torch.mul(grad_attention, attention, out=symmetric).sum(-1, keepdim=True)
            grad_logits = grad_attention.sub_(row_sums).mul_(attention)
            grad_q[s] = grad_logits @ k[s]
            grad_k[s] = grad_logits.transpose(0, 1) @ q[s]
        return (grad_y * (-2 * grad_output), grad_q * grad_output, grad_k * grad_output, grad_w * grad_output,
                grad_b * grad_output, None)


def dense_attentive_similarity_loss(probabilities: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor,
                                    affinity_weight: torch.Tensor, affinity_bias: torch.Tensor,
                                    window: LocalWindow) -> torch.Tensor:
    """Eq. 3–5 with the ``N × N`` matrices materialised (the released code's formulation).

    Same arguments and result as :func:`attentive_similarity_loss`; memory quadratic in ``N``.
    """
    _check_inputs(probabilities, queries, keys, window)
    batch, _, *grid = queries.shape
    y = resize_to_grid(at_least_single_precision(probabilities), tuple(grid)).flatten(2).transpose(1, 2)
    affinity = attentive_affinity_matrix(queries, keys, affinity_weight, affinity_bias)
    dissimilarity = 1 - y @ y.transpose(1, 2)
    gaussian = window_matrix(window, tuple(grid), y.device, y.dtype)
    return (affinity * gaussian * dissimilarity).sum() / (y.shape[1] * batch)


def attentive_affinity_matrix(queries: torch.Tensor, keys: torch.Tensor, affinity_weight: torch.Tensor,
                              affinity_bias: torch.Tensor) -> torch.Tensor:
    """Eq. 3–4 materialised: ``K = sigmoid(w·(A + Aᵀ) + b)``, ``(B, C, *grid)`` → ``(B, N, N)``."""
    q = at_least_single_precision(queries).flatten(2).transpose(1, 2)
    k = at_least_single_precision(keys).flatten(2).transpose(1, 2)
    attention = torch.softmax(q @ k.transpose(1, 2), dim=-1)
    return torch.sigmoid(affinity_weight * (attention + attention.transpose(1, 2)) + affinity_bias)


@functools.lru_cache(maxsize=4)
def window_matrix(window: LocalWindow, grid: tuple[int, ...], device=None, dtype=torch.float64) -> torch.Tensor:
    """The ``N × N`` matrix ``G`` of a window on a grid (zero diagonal, zero outside the window).

    Cached: every training step asks for the same one, and building it takes several ``N × N`` temporaries.
    """
    (whole_grid,) = window_tiles(window, grid, batch=1, max_elements=math.inf, device=device, dtype=torch.float64)
    return whole_grid.weights().to(dtype)
