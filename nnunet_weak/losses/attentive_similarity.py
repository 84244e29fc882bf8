"""Attentive similarity loss of AttenScribble (Tian, Yang, Gao, arXiv 2312.06614, Eq. 3–5).

From the attention logits of the self-attention block, ``A_raw = Q Kᵀ`` (no 1/√C scale)::

    A = softmax_rows(Q Kᵀ)                              (Eq. 3)
    K_att = sigmoid(w · (A + Aᵀ) + b)                   (Eq. 4)  symmetric, learnable scalars w, b
    L_att = Σ_b Σ_{i≠j} K_att,ij · G_ij · v_i v_j · (1 - ⟨y_i, y_j⟩) / Σ_b Σ_i v_i        (Eq. 5)

with ``y`` the soft-max prediction resized (area interpolation) to the ``N`` positions of the
attention grid and ``G`` a Gaussian window (radius 5, σ 6, zero diagonal). ``v_i`` is 1 for a grid
position inside the image and 0 for one in nnU-Net's padding or augmentation border (deviation from
the paper, whose whole resized slices have none; without it every ``v_i`` is 1 and the denominator
is ``N · B``, as in Eq. 5). Gradients reach ``y``, ``Q``, ``K`` and ``w, b``.

Because of ``G`` only the pairs inside the window matter, plus each row's softmax normaliser
``log Z_i = logsumexp_j(q_i · k_j)``. :func:`attentive_similarity_loss` computes ``log Z`` in row
chunks and the pair terms a tile of positions at a time (``nnunet_weak.losses.local_window``), both
with their backward passes written out, recomputing one chunk or tile at a time: memory linear in
``N``. (``torch.utils.checkpoint`` per chunk was not: on torch 2.15 CPU the resident memory grew with
every checkpointed chunk, and a 3D ACDC grid of 35,840 positions ran out of 24 GiB.) Where one
sample's ``N × N`` matrix fits the memory budget (2D grids of up to a few thousand positions) it takes the whole grid of one
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

from nnunet_weak.losses.local_window import (DEFAULT_TILE_ELEMENTS, LocalWindow, WindowTile,
                                             at_least_single_precision, in_single_precision, partition_windows,
                                             window_tiles)


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


class _AttentionLogNormaliser(torch.autograd.Function):
    """``log Z_i = logsumexp_j(q_i · k_j)`` a chunk of rows at a time, backward written out.

    Inputs ``q``, ``k`` ``(B, N, C)``; output ``(B, N)``. With ``A_ij = exp(q_i · k_j - log Z_i)``:
    ``∂log Z_i/∂q_i = Σ_j A_ij k_j`` and ``∂log Z_i/∂k_j = A_ij q_i``; the backward pass recomputes
    ``A`` one chunk of rows at a time.
    """

    @staticmethod
    @in_single_precision
    def forward(ctx, q, k, rows):
        log_z = torch.cat([torch.logsumexp(q[:, start:start + rows] @ k.transpose(1, 2), dim=-1)
                           for start in range(0, q.shape[1], rows)], dim=1)
        ctx.save_for_backward(q, k, log_z)
        ctx.rows = rows
        return log_z

    @staticmethod
    def backward(ctx, grad_log_z):
        q, k, log_z = ctx.saved_tensors
        grad_q, grad_k = torch.zeros_like(q), torch.zeros_like(k)
        for start in range(0, q.shape[1], ctx.rows):
            rows = slice(start, start + ctx.rows)
            weighted = (q[:, rows] @ k.transpose(1, 2)).sub_(log_z[:, rows, None]).exp_().mul_(grad_log_z[:, rows, None])
            grad_q[:, rows] = weighted @ k
            grad_k += weighted.transpose(1, 2) @ q[:, rows]
        return grad_q, grad_k, None


def attention_log_normaliser(queries: torch.Tensor, keys: torch.Tensor,
                             max_elements: float = DEFAULT_TILE_ELEMENTS) -> torch.Tensor:
    """``log Z_i = logsumexp_j(q_i · k_j)`` for every position, without the ``N×N`` matrix.

    Shapes: queries, keys ``(B, C, *grid)`` → ``(B, *grid)``. ``max_elements`` bounds one chunk's
    ``B × rows × N`` logits.
    """
    batch, _, *grid = queries.shape
    q = queries.flatten(2).transpose(1, 2)
    k = keys.flatten(2).transpose(1, 2)
    rows = max(1, int(max_elements // max(1, batch * q.shape[1])))
    return _AttentionLogNormaliser.apply(q, k, rows).reshape(batch, *grid)


class _TiledAttentiveEnergy(torch.autograd.Function):
    """``E = Σ_b Σ_(i,j in window) K_ij G_ij (1 - ⟨y_i, y_j⟩)`` a tile at a time, backward written out.

    Inputs: ``q``, ``k`` ``(B, N, C)``, ``log Z`` ``(B, N)``, ``y`` ``(B, N, L)``, scalars ``w``, ``b``,
    ``v`` ``(B, N)`` (1 inside the image), the tiles; ``G_ij`` below stands for ``G_ij v_i v_j``. For ``i`` in a tile and ``j`` in its band, ``A_ij = exp(q_i·k_j - log Z_i)`` and
    ``A_ji = exp(q_j·k_i - log Z_j)``. With ``E'_ij = G_ij (1 - ⟨y_i, y_j⟩) K_ij (1 - K_ij)`` and
    ``H = w E'``: ``∂E/∂w = Σ E' (A_ij + A_ji)``, ``∂E/∂b = Σ E'``; ``H ⊙ A_ij`` is the gradient of the
    logit ``q_i·k_j`` (and ``-Σ_j`` of it that of ``log Z_i``), ``H ⊙ A_ji`` that of ``q_j·k_i`` (and of
    ``log Z_j``); ``∂E/∂y_i = -Σ_j K_ij G_ij y_j``, ``∂E/∂y_j = -Σ_i K_ij G_ij y_i``. Each tile's
    ``B × tile × band`` blocks are recomputed in the backward pass; nothing is kept per tile.
    """

    @staticmethod
    def _tile_matrices(tile: WindowTile, q, k, log_z, y, w, b, inside):
        attention_ij = torch.exp(tile.pair_products(q, k) - tile.own_values(log_z))
        attention_ji = torch.exp(tile.pair_products(k, q) - tile.band_values(log_z))
        symmetric = attention_ij + attention_ji
        affinity = torch.sigmoid(w * symmetric + b)
        gated = affinity * tile.weights() * tile.own_values(inside) * tile.band_values(inside)
        dissimilarity = 1 - tile.pair_products(y, y)
        return attention_ij, attention_ji, symmetric, affinity, gated, dissimilarity

    @staticmethod
    @in_single_precision
    def forward(ctx, q, k, log_z, y, w, b, inside, tiles):
        ctx.save_for_backward(q, k, log_z, y, w, b, inside)
        ctx.tiles = tiles
        total = q.new_zeros(())
        for tile in tiles:
            *_, gated, dissimilarity = _TiledAttentiveEnergy._tile_matrices(tile, q, k, log_z, y, w, b, inside)
            total += (gated * dissimilarity).sum()
        return total

    @staticmethod
    def backward(ctx, grad_output):
        q, k, log_z, y, w, b, inside = ctx.saved_tensors
        grad_q, grad_k, grad_log_z, grad_y = (torch.zeros_like(t) for t in (q, k, log_z, y))
        grad_w, grad_b = torch.zeros_like(w), torch.zeros_like(b)
        for tile in ctx.tiles:
            attention_ij, attention_ji, symmetric, affinity, gated, dissimilarity = \
                _TiledAttentiveEnergy._tile_matrices(tile, q, k, log_z, y, w, b, inside)
            own, band = tile.positions, tile.band
            grad_z = (1 - affinity).mul_(gated).mul_(dissimilarity)
            grad_w += (grad_z * symmetric).sum()
            grad_b += grad_z.sum()
            grad_ij = grad_z * w * attention_ij  # of the logit q_i·k_j
            grad_ji = grad_z.mul_(w).mul_(attention_ji)  # of the logit q_j·k_i
            grad_q.index_add_(1, own, grad_ij @ k[:, band])
            grad_k.index_add_(1, band, grad_ij.transpose(1, 2) @ q[:, own])
            grad_k.index_add_(1, own, grad_ji @ q[:, band])
            grad_q.index_add_(1, band, grad_ji.transpose(1, 2) @ k[:, own])
            grad_log_z.index_add_(1, own, -grad_ij.sum(2))
            grad_log_z.index_add_(1, band, -grad_ji.sum(1))
            grad_y.index_add_(1, own, -(gated @ y[:, band]))
            grad_y.index_add_(1, band, -(gated.transpose(1, 2) @ y[:, own]))
        return (grad_q * grad_output, grad_k * grad_output, grad_log_z * grad_output, grad_y * grad_output,
                grad_w * grad_output, grad_b * grad_output, None, None)


class _WholeGridAttentiveEnergy(torch.autograd.Function):
    """``E = Σ_b Σ_ij K_ij G_ij (1 - ⟨y_i, y_j⟩)`` over whole grids, one sample at a time, backward written out.

    Inputs: ``y`` ``(B, N, L)``, ``q``, ``k`` ``(B, N, C)``, scalars ``w``, ``b``, ``G`` ``(N, N)``, ``v``
    ``(B, N)`` (1 inside the image); ``G`` below stands for one sample's ``G ⊙ v vᵀ``.
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
        """``1 - y yᵀ`` of one sample, ``(N, L)`` → ``(N, N)``."""
        return torch.mm(y, y.transpose(0, 1)).neg_().add_(1)

    @staticmethod
    def _sample_window(gaussian, inside_sample):
        """``G ⊙ v vᵀ`` of one sample."""
        return gaussian * inside_sample[:, None] * inside_sample[None, :]

    @staticmethod
    @in_single_precision
    def forward(ctx, y, q, k, w, b, gaussian, inside):
        ctx.save_for_backward(y, q, k, w, b, gaussian, inside)
        total = y.new_zeros(())
        for s in range(y.shape[0]):
            affinity = _WholeGridAttentiveEnergy._sample_matrices(q[s], k[s], w, b)[2]
            window = _WholeGridAttentiveEnergy._sample_window(gaussian, inside[s])
            total += affinity.mul_(window).mul_(_WholeGridAttentiveEnergy._dissimilarity(y[s])).sum()
        return total

    @staticmethod
    def backward(ctx, grad_output):
        y, q, k, w, b, gaussian, inside = ctx.saved_tensors
        grad_y, grad_q, grad_k = torch.zeros_like(y), torch.zeros_like(q), torch.zeros_like(k)
        grad_w, grad_b = torch.zeros_like(w), torch.zeros_like(b)
        # in place where a matrix is no longer needed: fresh N×N buffers are what costs time on the CPU
        for s in range(y.shape[0]):
            attention, symmetric, affinity = _WholeGridAttentiveEnergy._sample_matrices(q[s], k[s], w, b)
            gated = affinity * _WholeGridAttentiveEnergy._sample_window(gaussian, inside[s])
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
                grad_b * grad_output, None, None)


def attentive_similarity_loss(probabilities: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor,
                              affinity_weight: torch.Tensor, affinity_bias: torch.Tensor,
                              window: LocalWindow, max_elements: float = DEFAULT_TILE_ELEMENTS,
                              inside: torch.Tensor | None = None,
                              attention_window: tuple[int, ...] | None = None) -> torch.Tensor:
    """Eq. 5, with memory bounded by ``max_elements`` per block (linear in the number of positions on large grids).

    Args:
        probabilities: ``(B, L, *spatial)`` soft-max prediction (any resolution; area-resized to the grid).
        queries, keys: ``(B, C, *grid)`` attention projections of the block (``A_raw = Q Kᵀ``).
        affinity_weight, affinity_bias: the scalars ``w, b`` of Eq. 4.
        window: the Gaussian window ``G`` on the attention grid.
        max_elements: bound on the elements of one ``B × tile × band`` block. When one sample's
            ``N × N`` matrix fits in it (2D grids), the whole grid is taken one sample at a time
            (:class:`_WholeGridAttentiveEnergy`): cheaper, and its memory is a few such matrices.
        inside: ``(B, *grid)`` bool, True for grid positions inside the image (``None``: all). Pairs with an
            end outside contribute nothing, and outside positions are not counted.
        attention_window: the window shape of a windowed attention block
            (``SpatialSelfAttentionBlock.last_window``): ``A``'s rows are normalised over the position's own
            window and only pairs in one window count, the neighbourhood the block attends to. ``None``:
            the whole grid, as in the paper.

    Returns:
        the scalar loss, a mean over the positions inside the image of every sample (``/(N·B)`` without
        ``inside``; 0 when no position is inside).
    """
    _check_inputs(probabilities, queries, keys, window)
    batch, _, *grid = queries.shape
    if inside is not None and tuple(inside.shape) != (batch, *grid):
        raise ValueError(f"inside must be (B, *grid) = {(batch, *grid)}, got {tuple(inside.shape)}")
    queries, keys = at_least_single_precision(queries), at_least_single_precision(keys)
    y = resize_to_grid(at_least_single_precision(probabilities), tuple(grid))
    valid = (torch.ones((batch, *grid), dtype=y.dtype, device=y.device) if inside is None
             else inside.to(y.dtype))
    if attention_window is not None:
        # each window is a grid of its own: its pairs and its soft-max rows stay inside it
        queries, keys, y = (partition_windows(t, tuple(attention_window)) for t in (queries, keys, y))
        valid = partition_windows(valid[:, None], tuple(attention_window))[:, 0]
        batch, grid = queries.shape[0], list(attention_window)
    valid = valid.flatten(1)
    count = valid.sum()
    if count == 0:
        return (probabilities.sum() + queries.sum() + keys.sum() + affinity_weight + affinity_bias) * 0
    if len(window_tiles(window, tuple(grid), 1, max_elements)) == 1:
        flat = [t.flatten(2).transpose(1, 2) for t in (y, queries, keys)]
        gaussian = window_matrix(window, tuple(grid), y.device, y.dtype)
        total = _WholeGridAttentiveEnergy.apply(*flat, affinity_weight, affinity_bias, gaussian, valid)
        return total / count
    log_z = attention_log_normaliser(queries, keys, max_elements).flatten(1)
    flat = [t.flatten(2).transpose(1, 2) for t in (queries, keys, y)]
    tiles = window_tiles(window, tuple(grid), batch, max_elements, y.device, y.dtype)
    total = _TiledAttentiveEnergy.apply(*flat[:2], log_z, flat[2], affinity_weight, affinity_bias, valid, tiles)
    return total / count


def dense_attentive_similarity_loss(probabilities: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor,
                                    affinity_weight: torch.Tensor, affinity_bias: torch.Tensor,
                                    window: LocalWindow, inside: torch.Tensor | None = None,
                                    attention_window: tuple[int, ...] | None = None) -> torch.Tensor:
    """Eq. 3–5 with the ``N × N`` matrices materialised (the released code's formulation).

    Same arguments and result as :func:`attentive_similarity_loss`; memory quadratic in ``N``. A windowed
    attention is a mask on the whole grid's matrices here (pairs in different windows: no attention, no
    term), not a cut into windows.
    """
    _check_inputs(probabilities, queries, keys, window)
    batch, _, *grid = queries.shape
    y = resize_to_grid(at_least_single_precision(probabilities), tuple(grid)).flatten(2).transpose(1, 2)
    valid = torch.ones(y.shape[:2], dtype=y.dtype) if inside is None else inside.flatten(1).to(y.dtype)
    same_window = None if attention_window is None else same_window_matrix(tuple(grid), tuple(attention_window))
    affinity = attentive_affinity_matrix(queries, keys, affinity_weight, affinity_bias, same_window)
    dissimilarity = 1 - y @ y.transpose(1, 2)
    gaussian = window_matrix(window, tuple(grid), y.device, y.dtype) * valid[:, :, None] * valid[:, None, :]
    if same_window is not None:
        gaussian = gaussian * same_window
    return (affinity * gaussian * dissimilarity).sum() / valid.sum()


def attentive_affinity_matrix(queries: torch.Tensor, keys: torch.Tensor, affinity_weight: torch.Tensor,
                              affinity_bias: torch.Tensor, same_window: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 3–4 materialised: ``K = sigmoid(w·(A + Aᵀ) + b)``, ``(B, C, *grid)`` → ``(B, N, N)``.

    ``same_window`` ``(N, N)`` bool: ``A``'s rows are normalised over the True entries only (windowed attention).
    """
    q = at_least_single_precision(queries).flatten(2).transpose(1, 2)
    k = at_least_single_precision(keys).flatten(2).transpose(1, 2)
    logits = q @ k.transpose(1, 2)
    if same_window is not None:
        logits = logits.masked_fill(~same_window, float("-inf"))
    attention = torch.softmax(logits, dim=-1)
    return torch.sigmoid(affinity_weight * (attention + attention.transpose(1, 2)) + affinity_bias)


def same_window_matrix(grid: tuple[int, ...], attention_window: tuple[int, ...]) -> torch.Tensor:
    """``(N, N)`` bool: True where two grid positions lie in the same non-overlapping window."""
    coordinates = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")).flatten(1)
    window_index = coordinates // torch.tensor(attention_window)[:, None]
    return (window_index[:, :, None] == window_index[:, None, :]).all(0)


@functools.lru_cache(maxsize=4)
def window_matrix(window: LocalWindow, grid: tuple[int, ...], device=None, dtype=torch.float64) -> torch.Tensor:
    """The ``N × N`` matrix ``G`` of a window on a grid (zero diagonal, zero outside the window).

    Cached: every training step asks for the same one, and building it takes several ``N × N`` temporaries.
    """
    (whole_grid,) = window_tiles(window, grid, batch=1, max_elements=math.inf, device=device, dtype=torch.float64)
    return whole_grid.weights().to(dtype)
