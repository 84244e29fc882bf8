"""Cross-sample mutual attention (CMA) of CAML (Gao et al., MICCAI 2023, §2.2; ``../shared/METHODS.md`` §5).

Two transformer encoder layers on the features ``(B, C, *spatial)`` of one encoder stage, in training
only:

1. **intra-sample**: self-attention among the ``N`` positions of each sample (tokens: positions);
2. **cross-sample**: at each position, attention across the ``B`` samples of the batch (tokens:
   samples), so that what the labelled samples encode reaches the unlabelled ones and back.

Each is a post-norm ``nn.TransformerEncoderLayer`` (``nhead`` heads, feed-forward width ``4·C``,
dropout 0.5, ReLU), as in the authors' code; no positional encoding. In ``eval()`` mode the module
is the identity: a prediction never depends on the other images of a batch.
"""
from __future__ import annotations

import torch
from torch import nn


class CrossSampleMutualAttention(nn.Module):
    """Intra-sample then cross-sample attention on ``(B, C, *spatial)`` features; identity in eval.

    Args:
        channels: ``C``, the features' channels (divisible by ``num_heads``).
        num_heads: attention heads of both layers (4 in CAML).
        dropout: dropout of both layers (0.5 in CAML).
    """

    def __init__(self, channels: int, num_heads: int = 4, dropout: float = 0.5):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.channels = channels

        def layer():
            return nn.TransformerEncoderLayer(channels, num_heads, dim_feedforward=4 * channels, dropout=dropout,
                                              batch_first=True)

        self.intra_sample = layer()
        self.cross_sample = layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[1] != self.channels:
            raise ValueError(f"expected (B, {self.channels}, *spatial) features, got shape {tuple(x.shape)}")
        if not self.training:
            return x
        batch, channels, *spatial = x.shape
        tokens = x.flatten(2).transpose(1, 2)                       # (B, N, C): each sample's positions
        tokens = self.intra_sample(tokens)
        tokens = self.cross_sample(tokens.transpose(0, 1))          # (N, B, C): each position's samples
        return tokens.permute(1, 2, 0).reshape(batch, channels, *spatial)
