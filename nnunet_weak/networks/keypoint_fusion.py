"""KAF's keypoint-augmented fusion layer (Yang et al., NeurIPS 2023, §3; ``../shared/METHODS.md`` §4).

After an encoder stage with features ``F`` ``(B, C, h, w)``, for the keypoints ``p`` ``(B, K, 2)`` of the input
slice (``nnunet_weak.networks.keypoints.Keypoints``, in input pixels):

1. scale the keypoints to the stage's grid and gather ``F`` there: ``(B, K, C)``;
2. project to ``dim`` and add a learned encoding of the keypoints' positions (an MLP on their coordinates
   normalised to ``[-1, 1]``);
3. ``layers`` layers of multi-head self-attention among the ``K`` keypoints of each slice (a transformer
   encoder, ``heads`` heads);
4. project the tokens to ``out_channels``, scatter them back onto an ``(B, out_channels, h, w)`` map (zero away
   from keypoints; keypoints that fall on the same cell are averaged) and refine it with a small CNN (two 3×3
   convolutions). Projecting before scattering, not after, keeps the CNN at ``out_channels`` wide: a 256-wide
   map at full resolution doubled the cost of a training step (measured, documentation/KAFTrainer.md);
5. concatenate with ``F``: the output has ``C + out_channels`` channels.

Attention sees only the keypoints of one slice, so a slice's output does not depend on the rest of the batch.

:func:`attach_keypoint_fusion` puts one layer after every encoder stage of an auto-planned 2D network, all
sharing one ``KeypointDetector`` that runs on the network's input (``attach_after_encoder_stage`` with an
``input_context``), each widening its stage by its ``out_channels``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from nnunet_weak.networks.encoder_stages import attach_after_encoder_stage, encoder_of, stage_channels
from nnunet_weak.networks.keypoints import KeypointDetector, Keypoints


class KeypointFusion(nn.Module):
    """``(features (B, C, h, w), Keypoints (positions (B, K, 2), input size (H, W)))`` → ``(B, C + out_channels, h, w)``.

    The keypoint tokens after attention, ``(B, K, dim)``, are the output of ``self.attention`` (a ``FeatureTap``
    there reads them: KAF's keypoint descriptors).

    Args:
        in_channels: ``C``.
        out_channels: channels of the refined keypoint map concatenated to the features.
        dim: width of the keypoint tokens (256 in KAF).
        heads: attention heads (4 in KAF).
        layers: self-attention layers.
    """

    def __init__(self, in_channels: int, out_channels: int, dim: int = 256, heads: int = 4, layers: int = 2):
        super().__init__()
        self.out_channels = out_channels
        self.project = nn.Linear(in_channels, dim)
        self.position = nn.Sequential(nn.Linear(2, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.attention = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.to_map = nn.Linear(dim, out_channels)
        self.refine = nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.LeakyReLU(inplace=True),
                                    nn.Conv2d(out_channels, out_channels, 3, padding=1))

    def forward(self, features: torch.Tensor, keypoints: Keypoints) -> torch.Tensor:
        keypoints, input_size = keypoints
        if (features.dim() != 4 or keypoints.dim() != 3 or keypoints.shape[0] != features.shape[0]
                or keypoints.shape[2] != 2):
            raise ValueError(f"expected features (B, C, h, w) and keypoints (B, K, 2), got {tuple(features.shape)} and "
                             f"{tuple(keypoints.shape)}")
        batch, _, height, width = features.shape
        scale = torch.tensor([height / input_size[0], width / input_size[1]], device=keypoints.device)
        cells = torch.minimum((keypoints.float() * scale).long(),
                              torch.tensor([height - 1, width - 1], device=keypoints.device))
        flat = cells[..., 0] * width + cells[..., 1]  # (B, K)
        gathered = torch.gather(features.flatten(2), 2, flat[:, None, :].expand(-1, features.shape[1], -1))
        normalised = 2 * keypoints.float() / torch.tensor([max(input_size[0] - 1, 1), max(input_size[1] - 1, 1)],
                                                          device=keypoints.device) - 1
        tokens = self.attention(self.project(gathered.transpose(1, 2)) + self.position(normalised))  # (B, K, dim)
        values = self.to_map(tokens)  # (B, K, out_channels)
        summed = values.new_zeros((batch, self.out_channels, height * width))
        summed.scatter_add_(2, flat[:, None, :].expand(-1, self.out_channels, -1), values.transpose(1, 2))
        hits = values.new_zeros((batch, 1, height * width))
        hits.scatter_add_(2, flat[:, None, :], values.new_ones((batch, 1, flat.shape[1])))
        keypoint_map = (summed / hits.clamp_min(1)).view(batch, -1, height, width)
        return torch.cat((features, self.refine(keypoint_map)), 1)


def attach_keypoint_fusion(network: nn.Module, keypoint_count: int, channel_fraction: float, dim: int = 256,
                           heads: int = 4, layers: int = 2, detector: str = "corners") -> list[KeypointFusion]:
    """A :class:`KeypointFusion` after every encoder stage of a 2D ``network`` (in place), appending
    ``ceil(channel_fraction · C_stage)`` channels to stage ``s``, all fed by one ``KeypointDetector`` (``detector``:
    its method); returns the layers, shallowest first."""
    encoder = encoder_of(network)
    if encoder.conv_op is not nn.Conv2d:
        raise ValueError(f"KAF's keypoint fusion works on 2D slices; this network's convolutions are "
                         f"{encoder.conv_op.__name__}. Train a 2D configuration.")
    if channel_fraction <= 0:
        raise ValueError(f"channel_fraction must be > 0, got {channel_fraction}")
    keypoints = KeypointDetector(keypoint_count, method=detector)
    layers_attached = []
    for index in range(len(encoder.stages)):
        channels = stage_channels(network, index)
        fusion = KeypointFusion(channels, math.ceil(channel_fraction * channels), dim, heads, layers)
        attach_after_encoder_stage(network, index, fusion, input_context=keypoints, added_channels=fusion.out_channels)
        layers_attached.append(fusion)
    return layers_attached
