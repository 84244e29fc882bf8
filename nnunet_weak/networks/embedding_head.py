"""The projection / prediction head of the contrastive and correlation methods (CAML, ACTION).

``Linear → BatchNorm1d → ReLU → Linear`` on feature vectors: ``(M, in_features)`` → ``(M, out_features)``,
the two-layer MLP head of SimCLR/BYOL-style methods. CAML's heads are 32 wide (the authors' code, no L2
normalisation); ACTION's global heads normalise their output in the loss.
"""
from __future__ import annotations

from torch import nn


class EmbeddingHead(nn.Sequential):
    """Two-layer MLP head.

    Args:
        in_features: width of the input vectors.
        out_features: width of the embeddings.
        hidden_features: width of the hidden layer (default: ``out_features``).
    """

    def __init__(self, in_features: int, out_features: int = 32, hidden_features: int | None = None):
        hidden = out_features if hidden_features is None else hidden_features
        super().__init__(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_features))
