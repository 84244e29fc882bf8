"""CAML's two networks and heads, as one ``TrainingNetwork`` (Gao et al., MICCAI 2023, §2.1–2.3).

- ``inference_network``: nnU-Net's planned network ("V" in the authors' code), what
  ``nnUNetv2_predict`` rebuilds and what validation predicts with.
- ``second_network``: a second instance of the same plans, separately initialised, whose decoder
  up-samples by linear interpolation + 1×1 convolution instead of transposed convolutions, and whose
  encoder stage of stride ``attention_stride`` (8) is followed by cross-sample mutual attention
  ("A"). Training only.
- four heads (projection then prediction, per network) embedding the last decoder features of each
  voxel; and the per-class memory bank of labelled-voxel embeddings.

In training, ``forward(x, labelled)`` returns :class:`MutualLearningOutput`, the heads' embeddings of the
voxels ``L_omni`` compares included; in ``eval()`` it is the inference network.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from nnunet_weak.losses.omni_correlation import agreeing_confident_voxels
from nnunet_weak.networks.cross_sample_attention import CrossSampleMutualAttention
from nnunet_weak.networks.decoder_stages import last_decoder_features, per_scale, use_interpolating_upsampling
from nnunet_weak.networks.embedding_head import EmbeddingHead
from nnunet_weak.networks.encoder_stages import attach_after_encoder_stage, stage_channels, stage_index_for_stride
from nnunet_weak.networks.training_network import TrainingNetwork
from nnunet_weak.training.memory_bank import ClassMemoryBank


def voxel_rows(tensor: torch.Tensor, flat_indices: torch.Tensor) -> torch.Tensor:
    """Rows ``(n, C)`` of ``(B, C, *spatial)`` at flat voxel indices over ``B × prod(spatial)``."""
    per_sample = tensor[0, 0].numel()
    return tensor.flatten(2)[flat_indices // per_sample, :, flat_indices % per_sample]


def all_voxels(tensor: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` as ``(B · prod(spatial), C)``, voxel rows in flat-index order."""
    return tensor.movedim(1, -1).reshape(-1, tensor.shape[1])


class MutualLearningOutput(NamedTuple):
    """One training forward pass of both networks.

    ``first_logits`` / ``second_logits``: nnU-Net's outputs (a list per deep-supervision scale, full
    resolution first). ``first_features`` / ``second_features``: ``(B, C_0, *patch)`` last decoder
    features. ``first_queries`` / ``second_queries``: ``(n, D)`` the heads' embeddings of the unlabelled
    voxels ``L_omni`` compares (:meth:`MutualLearningNetworks.omni_queries`); ``queries_chosen``: whether
    they are such voxels (``False``: the loss must not use them).
    """

    first_logits: list
    second_logits: list
    first_features: torch.Tensor
    second_features: torch.Tensor
    first_queries: torch.Tensor
    second_queries: torch.Tensor
    queries_chosen: bool


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
        omni_voxels_per_class: the most unlabelled voxels per class that ``L_omni`` compares.
    """

    def __init__(self, first: nn.Module, second: nn.Module, num_classes: int, attention_stride: int = 8,
                 embedding_dim: int = 32, memory_per_class: int = 256, memory_entries_per_step: int = 64,
                 omni_voxels_per_class: int = 12800):
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
        self.omni_voxels_per_class = omni_voxels_per_class
        self._first_features = last_decoder_features(first)
        self._second_features = last_decoder_features(second)

    def training_forward(self, x: torch.Tensor, labelled: torch.Tensor) -> MutualLearningOutput:
        """Both networks on ``x`` ``(B, C, *patch)``; ``labelled`` ``(B,)`` marks the labelled samples."""
        first_logits, second_logits = per_scale(self.inference_network(x)), per_scale(self.second_network(x))
        first_features, second_features = self._first_features.features, self._second_features.features
        queries = self.omni_queries(first_logits[0], second_logits[0], first_features, second_features, labelled)
        return MutualLearningOutput(first_logits, second_logits, first_features, second_features, *queries)

    def omni_queries(self, first_logits: torch.Tensor, second_logits: torch.Tensor, first_features: torch.Tensor,
                     second_features: torch.Tensor, labelled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The projection-then-prediction embeddings ``(n, D)`` of the unlabelled voxels where both networks
        agree, the ``omni_voxels_per_class`` most confident per class (``agreeing_confident_voxels``), by each
        network's heads; and whether at least two such voxels exist.

        Every head runs exactly once per call, in training mode, whatever the data: under DDP nnU-Net makes
        their BatchNorm a SyncBatchNorm, whose collectives must match on every rank. Where fewer than two
        voxels qualify (a BatchNorm needs two rows), the heads run on the two voxels of the batch the first
        network is most confident of, and the third value is ``False``: the loss must not use them.

        Args:
            first_logits, second_logits: ``(B, K, *patch)`` full-resolution logits of the two networks.
            first_features, second_features: ``(B, C_0, *patch)`` their last decoder features.
            labelled: ``(B,)`` boolean, the labelled samples.
        """
        unlabelled = ~labelled
        with torch.no_grad():
            first = torch.softmax(first_logits.float(), dim=1)
            second = torch.softmax(second_logits.float(), dim=1)
            voxels = agreeing_confident_voxels(all_voxels(first[unlabelled]), all_voxels(second[unlabelled]),
                                               self.omni_voxels_per_class)
            chosen = len(voxels) >= 2
            if not chosen:
                voxels = torch.topk(first.amax(dim=1).flatten(), 2).indices
        first_rows = voxel_rows(first_features[unlabelled] if chosen else first_features, voxels)
        second_rows = voxel_rows(second_features[unlabelled] if chosen else second_features, voxels)
        return (self.first_prediction(self.first_projection(first_rows)),
                self.second_prediction(self.second_projection(second_rows)), chosen)

    def memory_entries(self, first_rows: torch.Tensor, second_rows: torch.Tensor) -> torch.Tensor:
        """Memory bank entries ``(n, D)`` of ``n`` labelled voxels: the mean of the two projection heads'
        embeddings of their last decoder features (``(n, C_0)`` each), without gradient.

        The heads run in eval mode, as in the authors' code: BatchNorm normalises with its running
        statistics, so any number of rows works, the running statistics stay those of the query voxels,
        and no SyncBatchNorm collective runs (each rank offers its own number of voxels).
        """
        heads = (self.first_projection, self.second_projection)
        modes = [head.training for head in heads]
        try:
            for head in heads:
                head.eval()
            with torch.no_grad():
                return (self.first_projection(first_rows) + self.second_projection(second_rows)) / 2
        finally:
            for head, mode in zip(heads, modes):
                head.train(mode)
