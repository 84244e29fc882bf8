"""CAML's two networks and heads, as one ``TrainingNetwork`` (Gao et al., MICCAI 2023, §2.1–2.3).

- ``inference_network``: nnU-Net's planned network ("V" in the authors' code), what
  ``nnUNetv2_predict`` rebuilds and what validation predicts with.
- ``second_network``: a second instance of the same plans, separately initialised, whose decoder
  up-samples by linear interpolation + 1×1 convolution instead of transposed convolutions, and whose
  encoder stage of stride ``attention_stride`` (8) is followed by cross-sample mutual attention
  ("A"). Training only.
- four heads (projection then prediction, per network) embedding the last decoder features of each
  voxel; and the per-class memory bank of labelled-voxel embeddings.

In training, ``forward(x)`` returns :class:`MutualLearningOutput`; in ``eval()`` it is the inference
network.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from nnunet_weak.networks.cross_sample_attention import CrossSampleMutualAttention
from nnunet_weak.networks.decoder_stages import last_decoder_features, per_scale, use_interpolating_upsampling
from nnunet_weak.networks.embedding_head import EmbeddingHead
from nnunet_weak.networks.encoder_stages import attach_after_encoder_stage, stage_channels, stage_index_for_stride
from nnunet_weak.networks.training_network import TrainingNetwork
from nnunet_weak.training.memory_bank import ClassMemoryBank


class MutualLearningOutput(NamedTuple):
    """One training forward pass of both networks.

    ``first_logits`` / ``second_logits``: nnU-Net's outputs (a list per deep-supervision scale, full
    resolution first). ``first_features`` / ``second_features``: ``(B, C_0, *patch)`` last decoder
    features.
    """

    first_logits: list
    second_logits: list
    first_features: torch.Tensor
    second_features: torch.Tensor


class MutualLearningNetworks(TrainingNetwork):
    """The planned network, CAML's second network, their heads and the memory bank.

    Args:
        first: the planned network (built by the trainer's ``build_network_architecture``).
        second: another network built from the same plans; modified here (up-sampling, attention).
        num_classes: segmentation classes (background included), for the memory bank.
        attention_stride: stride of the encoder stage that cross-sample attention follows (8 in CAML).
        embedding_dim: width of the heads (32 in the authors' code).
        memory_per_class: memory bank entries per class (256).
        memory_entries_per_step: entries per class added to the bank per step (over all ranks).
    """

    def __init__(self, first: nn.Module, second: nn.Module, num_classes: int, attention_stride: int = 8,
                 embedding_dim: int = 32, memory_per_class: int = 256, memory_entries_per_step: int = 64):
        super().__init__(first)
        use_interpolating_upsampling(second, "linear")
        stage = stage_index_for_stride(second, attention_stride)
        attach_after_encoder_stage(second, stage, CrossSampleMutualAttention(stage_channels(second, stage)))
        self.second_network = second
        feature_channels = stage_channels(first, 0)
        self.first_projection = EmbeddingHead(feature_channels, embedding_dim)
        self.first_prediction = EmbeddingHead(embedding_dim, embedding_dim)
        self.second_projection = EmbeddingHead(feature_channels, embedding_dim)
        self.second_prediction = EmbeddingHead(embedding_dim, embedding_dim)
        self.memory_bank = ClassMemoryBank(num_classes, embedding_dim, memory_per_class, memory_entries_per_step)
        self._first_features = last_decoder_features(first)
        self._second_features = last_decoder_features(second)

    def training_forward(self, x: torch.Tensor) -> MutualLearningOutput:
        first_logits, second_logits = self.inference_network(x), self.second_network(x)
        return MutualLearningOutput(per_scale(first_logits), per_scale(second_logits), self._first_features.features,
                                    self._second_features.features)

    def heads(self) -> list[nn.Module]:
        return [self.first_projection, self.first_prediction, self.second_projection, self.second_prediction]
