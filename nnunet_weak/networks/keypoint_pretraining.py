"""What KAF's self-supervised pre-training trains beside the network (Yang et al., NeurIPS 2023, §3.2–3.3;
``../shared/METHODS.md`` §4).

:class:`KeypointPretrainingNetwork` is a ``TrainingNetwork`` around the planned 2D network with keypoint fusion
layers after its encoder stages (``attach_keypoint_fusion``). A training forward pass runs the **encoder only**
(pre-training trains no segmentation; the decoder is frozen so that DDP does not wait for its gradients) and
returns, per slice:

- ``bottleneck_embedding`` ``(B, E)``: the global average of the bottleneck (after its fusion layer) through
  ``bottleneck_head``, for the global CNN term;
- ``keypoint_embedding`` ``(B, E)``: the mean over keypoints of the deepest fusion layer's tokens through
  ``keypoint_head``, for the global keypoint term;
- ``matching_features`` ``(B, K, dim)``: the shallowest (full-resolution) fusion layer's tokens through
  ``match_projection`` (SuperGlue's final projection), for the local correspondence term, with ``dustbin``,
  the learned score of leaving a keypoint unmatched;
- ``keypoints``: where they are (``Keypoints``).

Features are read with ``FeatureTap`` (the project's one way to read features out of the planned network).
The heads, projection and dustbin are training-only: ``nnUNetv2_predict`` never sees them.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from nnunet_weak.networks.contrastive_distillation import global_average
from nnunet_weak.networks.decoder_stages import FeatureTap, bottleneck_features, decoder_of
from nnunet_weak.networks.embedding_head import EmbeddingHead
from nnunet_weak.networks.encoder_stages import encoder_of, stage_channels, unwrap_network
from nnunet_weak.networks.keypoint_fusion import KeypointFusion
from nnunet_weak.networks.keypoints import Keypoints
from nnunet_weak.networks.training_network import TrainingNetwork


class KeypointPretrainingOutput(NamedTuple):
    bottleneck_embedding: torch.Tensor
    keypoint_embedding: torch.Tensor
    matching_features: torch.Tensor
    dustbin: torch.Tensor
    keypoints: Keypoints


class KeypointPretrainingNetwork(TrainingNetwork):
    """The planned network with KAF layers, plus the pre-training heads.

    Args:
        network: the planned 2D network, keypoint fusion layers attached.
        embedding_size: width ``E`` of the global embeddings.
    """

    def __init__(self, network: nn.Module, embedding_size: int = 128):
        super().__init__(network)
        stages = encoder_of(network).stages
        fusions = [stage.block for stage in stages if isinstance(getattr(stage, "block", None), KeypointFusion)]
        if len(fusions) != len(stages):
            raise TypeError("KeypointPretrainingNetwork needs a keypoint fusion layer after every encoder stage "
                            "(attach_keypoint_fusion).")
        dim = fusions[0].project.out_features
        self.bottleneck = bottleneck_features(network)
        self.shallowest_tokens = FeatureTap(fusions[0].attention)
        self.deepest_tokens = FeatureTap(fusions[-1].attention)
        self.found_keypoints = FeatureTap(stages[0].input_context)
        self.bottleneck_head = EmbeddingHead(stage_channels(network, len(stages) - 1), embedding_size)
        self.keypoint_head = EmbeddingHead(dim, embedding_size)
        self.match_projection = nn.Linear(dim, dim)
        self.dustbin = nn.Parameter(torch.tensor(1.0))
        for name, parameter in decoder_of(network).named_parameters():
            if not name.startswith("encoder."):  # nnU-Net's decoder holds a reference to the encoder
                parameter.requires_grad_(False)

    def training_forward(self, x, **training_arguments) -> KeypointPretrainingOutput:
        unwrap_network(self.inference_network).encoder(x)
        return KeypointPretrainingOutput(
            self.bottleneck_head(global_average(self.bottleneck.features)),
            self.keypoint_head(self.deepest_tokens.features.mean(1)),
            self.match_projection(self.shallowest_tokens.features),
            self.dustbin, self.found_keypoints.features)
