"""One way to reach into the encoder of an auto-planned nnU-Net network.

nnU-Net's networks (``PlainConvUNet``, ``ResidualEncoderUNet`` and their relatives from
``dynamic_network_architectures``) keep their encoder stages in ``network.encoder.stages`` (an
``nn.Sequential``) and run them in order; the decoder takes each stage's output as its skip. A method
that needs a module *after* a stage (the spatial self-attention of AttenScribble, later the
cross-sample attention of CAML) therefore wraps that stage: :func:`attach_after_encoder_stage`
replaces ``stages[i]`` by :class:`StageWithBlock`, whose output is ``block(stage(x))``. The skip of that
stage and every deeper stage then see the block's output, and the block's parameters belong to the
network, so nnU-Net's optimiser, gradient clipping, DDP wrapper and checkpoints cover them unchanged.

The wrapping is done in the trainer's ``build_network_architecture``, which ``nnUNetv2_predict`` calls
as well, so the network rebuilt for inference has the same blocks and loads the checkpoint strictly.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from torch import nn


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain network inside a DDP wrapper and/or a ``torch.compile`` wrapper."""
    if isinstance(network, nn.parallel.DistributedDataParallel):
        network = network.module
    return getattr(network, "_orig_mod", network)


def encoder_of(network: nn.Module) -> nn.Module:
    """The encoder of an nnU-Net network: the module whose ``stages`` are run in order."""
    encoder = getattr(unwrap_network(network), "encoder", None)
    if encoder is None or not isinstance(getattr(encoder, "stages", None), nn.Sequential):
        raise TypeError(f"{type(unwrap_network(network)).__name__} has no 'encoder.stages': only the encoder-decoder "
                        f"networks of dynamic_network_architectures (PlainConvUNet, ResidualEncoderUNet, ...) "
                        f"can take blocks after an encoder stage.")
    return encoder


def cumulative_stage_strides(network: nn.Module) -> list[tuple[int, ...]]:
    """For each encoder stage, the stride of its output relative to the input, per spatial axis."""
    strides = np.cumprod(np.array(encoder_of(network).strides, dtype=int), axis=0)
    return [tuple(int(s) for s in row) for row in strides]


def stage_index_for_stride(network: nn.Module, stride: int) -> int:
    """The first encoder stage whose output is down-sampled ``stride`` times along its finest axis.

    "Finest axis" is the one with the largest cumulative stride: on anisotropic 3D plans the
    through-plane axis is pooled later, and the paper's "stride 4" refers to the in-plane resolution.
    """
    strides = cumulative_stage_strides(network)
    for index, stage_stride in enumerate(strides):
        if max(stage_stride) == stride:
            return index
    raise ValueError(f"No encoder stage has stride {stride}; the planned network's stages have strides "
                     f"{[max(s) for s in strides]}. Choose one of those.")


class StageWithBlock(nn.Module):
    """An encoder stage followed by a block whose output replaces the stage's output."""

    def __init__(self, stage: nn.Module, block: nn.Module):
        super().__init__()
        self.stage = stage
        self.block = block

    def forward(self, x):
        return self.block(self.stage(x))


def attach_after_encoder_stage(network: nn.Module, stage_index: int, block: nn.Module) -> nn.Module:
    """Insert ``block`` after encoder stage ``stage_index`` of ``network`` (in place); returns ``block``.

    ``block`` must map a ``(B, C_stage, *spatial)`` tensor to one of the same shape.
    """
    stages = encoder_of(network).stages
    if not 0 <= stage_index < len(stages):
        raise ValueError(f"Encoder stage {stage_index} does not exist: the network has {len(stages)} stages.")
    if isinstance(stages[stage_index], StageWithBlock):
        raise ValueError(f"Encoder stage {stage_index} already has a block attached.")
    stages[stage_index] = StageWithBlock(stages[stage_index], block)
    return block


def attached_blocks(network: nn.Module) -> dict[int, nn.Module]:
    """The blocks attached to the network's encoder, by stage index."""
    return {index: stage.block for index, stage in enumerate(encoder_of(network).stages)
            if isinstance(stage, StageWithBlock)}


def stage_channels(network: nn.Module, stage_index: int) -> int:
    """Number of feature channels output by encoder stage ``stage_index``."""
    channels: Sequence[int] = encoder_of(network).output_channels
    return int(channels[stage_index])
