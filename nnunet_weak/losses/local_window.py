"""Pairs of nearby positions: the shared machinery of the pairwise losses.

The masked gated CRF loss and the attentive similarity loss both sum an energy over ordered pairs of
positions ``(i, j)`` closer than a radius, weighted by a spatial Gaussian ``G`` (:class:`LocalWindow`).
Materialising all pairs of the grid costs ``N²`` (the authors' formulation). Two ways avoid it, so
that memory stays linear in ``N`` whatever the window:

- one window offset ``d`` at a time, pairing ``i`` with ``i + d`` through two slices of the same
  tensor (:func:`pair_slices`, views). Cheap when the pair energy involves few channels (the CRF: a
  handful of classes and image channels).
- :func:`window_tiles` cuts the grid into tiles; the partners of a tile's positions lie in the tile
  dilated by the window (its *band*), so inner products over many channels (the attention's
  ``q_i · k_j``, 128 or more channels) come from one ``(tile × band)`` matrix product, the fast path of
  every BLAS, weighted by ``G`` (:meth:`WindowTile.weights`). A loss that sums over tiles recomputes
  each tile in its backward pass, so memory is one tile's ``B × tile × band`` block (``max_elements``).

Anisotropic spacing: the radius and the Gaussian's sigma are in voxels of the finest axis; along a
coarser axis the radius shrinks (``floor(radius · s_min / s_axis)``) and distances are measured in
physical units, so that a 3D window covers the same physical neighbourhood as the 2D one.

:func:`partition_windows` / :func:`merge_windows` cut a grid into non-overlapping windows and back: a
windowed attention and its attentive similarity loss treat each window as a grid of its own
(:func:`largest_divisors_at_most` sizes windows that tile a grid).
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import torch

#: bound on the elements of one tile's (batch × tile × band) inner-product block
DEFAULT_TILE_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class LocalWindow:
    """The window of a pairwise loss.

    Attributes:
        offsets: every non-zero offset ``d`` inside the box window (both signs).
        weights: the spatial Gaussian ``exp(-|d|²/(2σ²))`` of each offset, ``|d|`` in finest-axis voxels.
        radii: the radius along each axis, in voxels of that axis.
    """

    offsets: tuple[tuple[int, ...], ...]
    weights: tuple[float, ...]
    radii: tuple[int, ...]

    @classmethod
    def gaussian(cls, radius: int, sigma: float, spacing: Sequence[float]) -> "LocalWindow":
        """The box window of ``radius`` finest-axis voxels with Gaussian weights of ``sigma`` voxels.

        Args:
            radius: window radius in voxels of the finest axis (the paper's 5).
            sigma: Gaussian standard deviation in voxels of the finest axis (the paper's 6).
            spacing: voxel spacing per spatial axis (its length gives the dimensionality).
        """
        if radius < 1 or sigma <= 0:
            raise ValueError(f"radius must be >= 1 and sigma > 0, got radius={radius}, sigma={sigma}")
        if any(s <= 0 for s in spacing):
            raise ValueError(f"spacing must be positive, got {tuple(spacing)}")
        finest = min(spacing)
        scale = [s / finest for s in spacing]
        radii = tuple(int(math.floor(radius / a + 1e-6)) for a in scale)
        offsets, weights = [], []
        for offset in itertools.product(*(range(-r, r + 1) for r in radii)):
            if any(offset):
                distance2 = sum((o * a) ** 2 for o, a in zip(offset, scale))
                offsets.append(tuple(offset))
                weights.append(math.exp(-distance2 / (2 * sigma ** 2)))
        return cls(tuple(offsets), tuple(weights), radii)


def pair_slices(spatial_shape: Sequence[int], offset: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices ``(first, second)`` of the spatial axes such that ``x[first]`` at ``i`` pairs ``x[second]`` at ``i + offset``."""
    first, second = [], []
    for size, o in zip(spatial_shape, offset):
        first.append(slice(max(0, -o), size - max(0, o)))
        second.append(slice(max(0, o), size + min(0, o)))
    return tuple(first), tuple(second)


@dataclass(frozen=True, eq=False)
class WindowTile:
    """A block of grid positions and its band: every position within the window of the block.

    Attributes:
        positions: ``(T,)`` flat grid indices of the tile's positions ``i``.
        band: ``(Nb,)`` flat grid indices of the band's positions ``j``.
        position_coordinates, band_coordinates: ``(T, d)`` and ``(Nb, d)`` grid coordinates.
        axis_weights: per axis, the window's 1D Gaussian at offsets ``-r … r`` (``G`` is their product).
    """

    positions: torch.Tensor
    band: torch.Tensor
    position_coordinates: torch.Tensor
    band_coordinates: torch.Tensor
    axis_weights: tuple[torch.Tensor, ...]

    def weights(self) -> torch.Tensor:
        """``(T, Nb)`` ``G_ij``: the window's Gaussian where ``j - i`` is a window offset, else 0.

        Computed on demand (the box Gaussian is separable) rather than stored: kept for every tile,
        these blocks would take ``N × band`` memory.
        """
        weights = None
        for axis, table in enumerate(self.axis_weights):
            radius = (table.shape[0] - 1) // 2
            offset = self.band_coordinates[None, :, axis] - self.position_coordinates[:, None, axis] + radius
            inside = (offset >= 0) & (offset <= 2 * radius)
            factor = torch.where(inside, table[offset.clamp(0, 2 * radius)], 0)
            weights = factor if weights is None else weights * factor
        return weights * (self.positions[:, None] != self.band[None, :])

    def pair_products(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a_i · b_j`` for ``i`` in the tile, ``j`` in the band: ``(B, N, C)`` twice → ``(B, T, Nb)``."""
        return a[:, self.positions] @ b[:, self.band].transpose(1, 2)

    def own_values(self, values: torch.Tensor) -> torch.Tensor:
        """``v_i``: ``(B, N)`` → ``(B, T, 1)``."""
        return values[:, self.positions, None]

    def band_values(self, values: torch.Tensor) -> torch.Tensor:
        """``v_j``: ``(B, N)`` → ``(B, 1, Nb)``."""
        return values[:, None, self.band]


def _ravel(coordinates: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    index = torch.zeros(coordinates.shape[:-1], dtype=torch.long)
    for axis, size in enumerate(shape):
        index = index * size + coordinates[..., axis]
    return index


def _box(origin: Sequence[int], extent: Sequence[int]) -> torch.Tensor:
    axes = [torch.arange(o, o + e) for o, e in zip(origin, extent)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(origin))


def _axis_weights(window: LocalWindow) -> list[torch.Tensor]:
    """The 1D factors of the window's Gaussian: along axis ``a``, the weight of the offset ``k·e_a``."""
    weights = dict(zip(window.offsets, window.weights))
    tables = []
    for axis, radius in enumerate(window.radii):
        unit = [0] * len(window.radii)
        table = []
        for k in range(-radius, radius + 1):
            unit[axis] = k
            table.append(1.0 if k == 0 else weights[tuple(unit)])
        tables.append(torch.tensor(table, dtype=torch.float64))
    return tables


@functools.lru_cache(maxsize=8)
def window_tiles(window: LocalWindow, grid: tuple[int, ...], batch: int, max_elements: float = DEFAULT_TILE_ELEMENTS,
                 device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32
                 ) -> tuple[WindowTile, ...]:
    """Cut ``grid`` into tiles whose ``batch × tile × band`` block stays under ``max_elements``.

    Tiles split the leading axes (halving the longest until the block fits, down to single rows);
    the last axis is never split.
    """
    if len(grid) != len(window.radii):
        raise ValueError(f"the window is {len(window.radii)}D but the grid {grid} is {len(grid)}D")
    tile = list(grid)

    def block_elements(extent):
        band = [min(g, e + 2 * r) for g, e, r in zip(grid, extent, window.radii)]
        return batch * math.prod(extent) * math.prod(band)

    while block_elements(tile) > max_elements and any(e > 1 for e in tile[:-1]):
        longest = max(range(len(tile) - 1), key=lambda a: tile[a])
        tile[longest] = math.ceil(tile[longest] / 2)

    axis_weights = tuple(t.to(device=device, dtype=dtype) for t in _axis_weights(window))
    grid_size, radii = torch.tensor(grid), torch.tensor(window.radii)
    tiles = []
    for origin in itertools.product(*(range(0, g, e) for g, e in zip(grid, tile))):
        origin_t = torch.tensor(origin)
        extent = torch.minimum(origin_t + torch.tensor(tile), grid_size) - origin_t
        band_origin = torch.clamp(origin_t - radii, min=0)
        band_extent = torch.minimum(origin_t + extent + radii, grid_size) - band_origin
        positions = _box(origin, extent.tolist())
        band = _box(band_origin.tolist(), band_extent.tolist())
        tiles.append(WindowTile(_ravel(positions, grid).to(device), _ravel(band, grid).to(device),
                                positions.to(device), band.to(device), axis_weights))
    return tuple(tiles)


def largest_divisors_at_most(extents: Sequence[int], bound: int) -> tuple[int, ...]:
    """Per axis, the largest divisor of the extent that is at most ``bound``: a window size (or a number of
    windows) that tiles the axis exactly and comes as close to ``bound`` as it can.

    nnU-Net's patch sizes are multiples of the network's total stride, so an encoder grid's extents are
    multiples of the remaining strides and this stays close to ``bound`` (a 32×28 grid with 8: 8×7); a thin
    axis gets fewer (10 slices with 4: 2).
    """
    if bound < 1:
        raise ValueError(f"bound must be at least 1, got {bound}")
    return tuple(max(d for d in range(1, min(extent, bound) + 1) if extent % d == 0) for extent in extents)


def partition_windows(x: torch.Tensor, window: tuple[int, ...]) -> torch.Tensor:
    """Cut ``(B, C, *grid)`` into non-overlapping windows: ``(B · n_windows, C, *window)``.

    Each grid extent must be a multiple of the window's; windows are ordered sample-major.
    """
    batch, channels, *grid = x.shape
    if len(window) != len(grid) or any(g % w for g, w in zip(grid, window)):
        raise ValueError(f"window {window} does not tile the grid {tuple(grid)}")
    counts = [g // w for g, w in zip(grid, window)]
    split = x.reshape(batch, channels, *[n for pair in zip(counts, window) for n in pair])
    dims = len(grid)
    order = [0, *(2 + 2 * a for a in range(dims)), 1, *(3 + 2 * a for a in range(dims))]
    return split.permute(order).reshape(-1, channels, *window)


def merge_windows(windows: torch.Tensor, batch: int, grid: tuple[int, ...]) -> torch.Tensor:
    """The inverse of :func:`partition_windows`: ``(B · n_windows, C, *window)`` → ``(B, C, *grid)``."""
    _, channels, *window = windows.shape
    counts = [g // w for g, w in zip(grid, window)]
    dims = len(grid)
    split = windows.reshape(batch, *counts, channels, *window)
    order = [0, 1 + dims, *(a for pair in zip(range(1, 1 + dims), range(2 + dims, 2 + 2 * dims)) for a in pair)]
    return split.permute(order).reshape(batch, channels, *grid)


def at_least_single_precision(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32, or float64 if it already is (pairwise sums in half precision lose too much)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def in_single_precision(forward):
    """Decorator of a ``torch.autograd.Function.forward``: floating inputs in at least single precision and autocast
    off for their device (CPU or CUDA), so that the forward pass computes in the precision its hand-written backward
    pass recomputes in (autograd runs ``backward`` without autocast), whatever autocast nnU-Net's training step
    has on. Gradients reach the inputs in their own dtype (autograd casts them)."""
    @functools.wraps(forward)
    def single_precision_forward(ctx, *args):
        args = [at_least_single_precision(a) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        device = next(a.device for a in args if torch.is_tensor(a))
        with torch.autocast(device_type=device.type, enabled=False):
            return forward(ctx, *args)
    return single_precision_forward
