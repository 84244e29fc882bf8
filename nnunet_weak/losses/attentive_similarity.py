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
(``nnunet_weak.losses.local_window``): memory linear in ``N``. Below a memory budget (small 2D grids)
it uses the dense formulation, which is then both bounded and faster. :func:`dense_attentive_similarity_loss`
materialises the ``N × N`` matrices as the authors' code does; it is the reference the efficient
path is tested against, and the baseline of the memory benchmark.
"""
from __future__ import annotations

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
    """Eq. 5, memory linear in the number of attention positions.

    Args:
        probabilities: ``(B, L, *spatial)`` soft-max prediction (any resolution; area-resized to the grid).
        queries, keys: ``(B, C, *grid)`` attention projections of the block (``A_raw = Q Kᵀ``).
        affinity_weight, affinity_bias: the scalars ``w, b`` of Eq. 4.
        window: the Gaussian window ``G`` on the attention grid.
        max_elements: bound on the elements of one ``B × tile × band`` block. When the whole
            ``B × N × N`` matrix fits in it (small 2D grids), the dense formulation is used: it is
            the cheapest and its memory is bounded by the same number.

    Returns:
        the scalar loss, a mean over positions and batch (``/(N·B)``).
    """
    _check_inputs(probabilities, queries, keys, window)
    batch, _, *grid = queries.shape
    if len(window_tiles(window, tuple(grid), batch, max_elements)) == 1:
        return dense_attentive_similarity_loss(probabilities, queries, keys, affinity_weight, affinity_bias, window)
    queries, keys = at_least_single_precision(queries), at_least_single_precision(keys)
    y = resize_to_grid(at_least_single_precision(probabilities), tuple(grid))
    log_z = attention_log_normaliser(queries, keys).flatten(1)
    flat = [t.flatten(2).transpose(1, 2) for t in (queries, keys, y)]
    total = sum_over_tiles(_attentive_tile_energy, window, tuple(grid),
                           (*flat[:2], log_z, flat[2], affinity_weight, affinity_bias), max_elements)
    return total / (log_z.shape[1] * batch)


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
    gaussian = window_matrix(window, tuple(grid), device=y.device).to(y.dtype)
    return (affinity * gaussian * dissimilarity).sum() / (y.shape[1] * batch)


def attentive_affinity_matrix(queries: torch.Tensor, keys: torch.Tensor, affinity_weight: torch.Tensor,
                              affinity_bias: torch.Tensor) -> torch.Tensor:
    """Eq. 3–4 materialised: ``K = sigmoid(w·(A + Aᵀ) + b)``, ``(B, C, *grid)`` → ``(B, N, N)``."""
    q = at_least_single_precision(queries).flatten(2).transpose(1, 2)
    k = at_least_single_precision(keys).flatten(2).transpose(1, 2)
    attention = torch.softmax(q @ k.transpose(1, 2), dim=-1)
    return torch.sigmoid(affinity_weight * (attention + attention.transpose(1, 2)) + affinity_bias)


def window_matrix(window: LocalWindow, grid: tuple[int, ...], device=None) -> torch.Tensor:
    """The ``N × N`` matrix ``G`` of a window on a grid (zero diagonal, zero outside the window)."""
    (whole_grid,) = window_tiles(window, grid, batch=1, max_elements=math.inf, device=device, dtype=torch.float64)
    return whole_grid.weights()
