"""The spatial self-attention block of AttenScribble (Tian, Yang, Gao, arXiv 2312.06614, §3.2).

Applied to the ``N = prod(spatial)`` positions of one encoder stage, treated as tokens of width
``C`` (the stage's channels)::

    x ← x + W_o · softmax_rows(Q Kᵀ / √C) V,   Q = W_q LN(x), K = W_k LN(x), V = W_v LN(x)   (single head)
    x ← x + MixFFN(LN(x)),                MixFFN = Linear(C→rC) → depth-wise 3^d conv → GELU → Linear(rC→C)
    x ← LN(x)

The attention itself runs through ``torch.nn.functional.scaled_dot_product_attention``, a fused kernel
that never materialises the ``N×N`` matrix, in float32.

With ``window_size`` the attention is **windowed** (a variant for 3D grids, where attention over all
positions costs ``N²``; not in the paper): the grid is cut into non-overlapping windows
(``largest_divisors_at_most``: per axis the largest divisor of the extent that is at most ``window_size``, so
no padding is needed) and each position attends to the positions of its own window
only. Everything else (projections, Mix-FFN over the whole map, norms) is unchanged and has the same
parameters, so a checkpoint of either form loads into the other. In training mode the block keeps ``Q`` and ``K``
(with their autograd history) so that the attentive similarity loss can be computed from them
(``nnunet_weak.losses.attentive_similarity``): its ``A = softmax_rows(Q Kᵀ)`` takes the logits
*without* the 1/√C scale, as the authors' code does (their forward pass scales, their affinity does
not). ``affinity_weight`` and ``affinity_bias`` are the learnable scalars ``w, b`` of
``K = sigmoid(w·(A + Aᵀ) + b)``. They live in the block so that they are part of
the network: optimised, clipped, synchronised under DDP and checkpointed like every other weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_weak.losses.local_window import (at_least_single_precision, largest_divisors_at_most, merge_windows,
                                             partition_windows)


class SpatialSelfAttentionBlock(nn.Module):
    """Single-head self-attention over all positions of a 2D or 3D feature map, shape-preserving.

    Args:
        channels: feature channels ``C`` of the stage (the embedding width).
        spatial_dims: 2 or 3.
        mlp_ratio: hidden width of the Mix-FFN relative to ``C``.
        window_size: ``None`` (attention over all positions, the paper's) or the largest window extent per
            axis, in grid positions, for windowed attention.

    Shapes:
        input and output ``(B, C, *spatial)``; after a training-mode forward, ``last_queries`` and
        ``last_keys`` are ``(B, C, *spatial)`` (the projections of each position) and ``last_window`` the
        window shape the attention used (``None``: all positions).
    """

    def __init__(self, channels: int, spatial_dims: int, mlp_ratio: int = 4, window_size: int | None = None):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if window_size is not None and window_size < 1:
            raise ValueError(f"window_size must be None (global attention) or >= 1, got {window_size}")
        self.channels = channels
        self.spatial_dims = spatial_dims
        self.window_size = window_size
        self.attention_norm = nn.LayerNorm(channels)
        self.query = nn.Linear(channels, channels, bias=False)
        self.key = nn.Linear(channels, channels, bias=False)
        self.value = nn.Linear(channels, channels, bias=False)
        self.output_projection = nn.Linear(channels, channels)
        self.mlp_norm = nn.LayerNorm(channels)
        hidden = channels * mlp_ratio
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.mlp_in = nn.Linear(channels, hidden)
        self.mlp_depthwise = conv(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.mlp_out = nn.Linear(hidden, channels)
        self.final_norm = nn.LayerNorm(channels)
        # w and b of K = sigmoid(w·(A + Aᵀ) + b)
        self.affinity_weight = nn.Parameter(torch.ones(()))
        self.affinity_bias = nn.Parameter(torch.zeros(()))
        self.last_queries: torch.Tensor | None = None
        self.last_keys: torch.Tensor | None = None
        self.last_window: tuple[int, ...] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.channels:
            raise ValueError(f"expected (B, {self.channels}, *{self.spatial_dims} spatial dims), got {tuple(x.shape)}")
        batch, channels, *spatial = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        normed = self.attention_norm(tokens)
        queries, keys, values = self.query(normed), self.key(normed), self.value(normed)
        window = None if self.window_size is None else largest_divisors_at_most(tuple(spatial), self.window_size)
        sequences = (queries, keys, values) if window is None else \
            tuple(_token_windows(t, tuple(spatial), window) for t in (queries, keys, values))
        # the attention runs in float32 even under autocast
        with torch.autocast(device_type=x.device.type, enabled=False):
            attended = F.scaled_dot_product_attention(
                *(at_least_single_precision(t)[:, None] for t in sequences))[:, 0]
        if window is not None:
            attended = _tokens_from_windows(attended, batch, tuple(spatial), window)
        attended = attended.to(values.dtype)
        tokens = tokens + self.output_projection(attended)

        hidden = self.mlp_in(self.mlp_norm(tokens))
        hidden_map = hidden.transpose(1, 2).reshape(batch, -1, *spatial)
        hidden = F.gelu(self.mlp_depthwise(hidden_map)).flatten(2).transpose(1, 2)
        tokens = self.final_norm(tokens + self.mlp_out(hidden))

        if self.training:
            self.last_queries = queries.transpose(1, 2).reshape(batch, channels, *spatial)
            self.last_keys = keys.transpose(1, 2).reshape(batch, channels, *spatial)
            self.last_window = window
        else:
            self.last_queries = self.last_keys = self.last_window = None
        return tokens.transpose(1, 2).reshape(batch, channels, *spatial)


def _token_windows(tokens: torch.Tensor, grid: tuple[int, ...], window: tuple[int, ...]) -> torch.Tensor:
    """``(B, N, C)`` tokens of a grid → ``(B · n_windows, N_window, C)``."""
    batch, _, channels = tokens.shape
    windows = partition_windows(tokens.transpose(1, 2).reshape(batch, channels, *grid), window)
    return windows.flatten(2).transpose(1, 2)


def _tokens_from_windows(tokens: torch.Tensor, batch: int, grid: tuple[int, ...], window: tuple[int, ...]) -> torch.Tensor:
    """The inverse of :func:`_token_windows`."""
    channels = tokens.shape[-1]
    windows = tokens.transpose(1, 2).reshape(-1, channels, *window)
    return merge_windows(windows, batch, grid).flatten(2).transpose(1, 2)
