"""One way to reach into the encoder of an auto-planned nnU-Net network.

nnU-Net's networks (``PlainConvUNet``, ``ResidualEncoderUNet`` and their relatives from
``dynamic_network_architectures``) keep their encoder stages in ``network.encoder.stages`` (an
``nn.Sequential``) and run them in order; the decoder takes each stage's output as its skip. A method
that needs a module *after* a stage (the spatial self-attention of AttenScribble, later the
cross-sample attention of CAML) therefore wraps that stage: :func:`attach_after_encoder_stage`
replaces ``stages[i]`` by :class:`StageWithBlock`, whose output is ``block(stage(x))``. The skip of that
stage and every deeper stage then see the block's output, and the block's parameters belong to the
network, so nnU-Net's optimiser, gradient clipping, DDP wrapper and checkpoints cover them unchanged.

Two extensions of the same wrapping (KAF's keypoint fusion needs both):

- **a block that sees the network's input**: ``attach_after_encoder_stage(..., input_context=f)`` calls the
  block as ``block(stage(x), f(network_input))``. ``f`` (e.g. a keypoint detector) runs once per forward pass of
  the encoder however many blocks share it, from a forward pre-hook on the encoder; the input is the one the
  whole network received (before a stem), so what ``f`` finds follows every augmentation and exists at
  inference.
- **a block that widens the stage**: ``added_channels=k`` declares that the block outputs ``C_stage + k``
  channels, new ones last. Every consumer of that output is widened to match, keeping its trained
  weights for the old channels: the first convolution of the next encoder stage (and the projection of a
  residual block's skip, which gains one if it had none, as the block itself does when its channels
  differ), and in the decoder either the first convolution of the stage that concatenates this skip or, for
  the bottleneck, the first transposed convolution. The decoder keeps its own width.

The wrapping is done in the trainer's ``build_network_architecture``, which ``nnUNetv2_predict`` calls
as well, so the network rebuilt for inference has the same blocks and loads the checkpoint strictly.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD, StackedResidualBlocks
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU, StackedConvBlocks
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
    """An encoder stage followed by a block whose output replaces the stage's output.

    With an ``input_context``, the block is called as ``block(stage(x), context)``, where ``context`` is
    ``input_context(network_input)``, set by the encoder's forward pre-hook (:func:`attach_after_encoder_stage`).
    """

    def __init__(self, stage: nn.Module, block: nn.Module, input_context: Callable | None = None):
        super().__init__()
        self.stage = stage
        self.block = block
        self.input_context = input_context
        self.context = None

    def forward(self, x):
        if self.input_context is None:
            return self.block(self.stage(x))
        if self.context is None:
            raise RuntimeError("This encoder stage's block needs the network's input: run the whole encoder, not the "
                               "stage alone.")
        return self.block(self.stage(x), self.context)


def _share_input_context(encoder: nn.Module, args) -> None:
    """Encoder forward pre-hook: each distinct ``input_context`` of the encoder's blocks runs once on the input."""
    contexts = {}
    for stage in encoder.stages:
        if isinstance(stage, StageWithBlock) and stage.input_context is not None:
            key = id(stage.input_context)
            if key not in contexts:
                contexts[key] = stage.input_context(args[0])
            stage.context = contexts[key]


def _forget_input_context(encoder: nn.Module, args, output) -> None:
    """Encoder forward hook: the contexts are not kept beyond the forward pass that made them."""
    for stage in encoder.stages:
        if isinstance(stage, StageWithBlock):
            stage.context = None


def attach_after_encoder_stage(network: nn.Module, stage_index: int, block: nn.Module,
                               input_context: Callable | None = None, added_channels: int = 0) -> nn.Module:
    """Insert ``block`` after encoder stage ``stage_index`` of ``network`` (in place); returns ``block``.

    Args:
        network: an encoder-decoder network of dynamic_network_architectures.
        stage_index: the encoder stage whose output ``(B, C_stage, *spatial)`` the block transforms.
        block: maps the stage's output (and, with ``input_context``, the context) to
            ``(B, C_stage + added_channels, *spatial)``.
        input_context: run on the network's input ``(B, C_in, *patch)`` once per forward pass; its result is the
            block's second argument. A module here is shared by every block given the same one.
        added_channels: channels the block appends; the consumers of the stage's output are widened to match.
    """
    encoder = encoder_of(network)
    stages = encoder.stages
    if not 0 <= stage_index < len(stages):
        raise ValueError(f"Encoder stage {stage_index} does not exist: the network has {len(stages)} stages.")
    if isinstance(stages[stage_index], StageWithBlock):
        raise ValueError(f"Encoder stage {stage_index} already has a block attached.")
    if added_channels < 0:
        raise ValueError(f"added_channels must be >= 0, got {added_channels}")
    stages[stage_index] = StageWithBlock(stages[stage_index], block, input_context)
    if input_context is not None and not getattr(encoder, "shares_input_context", False):
        encoder.register_forward_pre_hook(_share_input_context)
        encoder.register_forward_hook(_forget_input_context)
        encoder.shares_input_context = True
    if added_channels:
        _widen_stage_output(unwrap_network(network), stage_index, added_channels)
    return block


def _widen_stage_output(network: nn.Module, stage_index: int, added: int) -> None:
    encoder, decoder = network.encoder, network.decoder
    last = len(encoder.stages) - 1
    if stage_index < last:
        _widen_stage_input(_inner_stage(encoder.stages[stage_index + 1]), added)
    if stage_index == last:
        decoder.transpconvs[0] = _widened_conv(decoder.transpconvs[0], added)
    else:
        # decoder stage ``s`` concatenates the up-sampled features with the skip of encoder stage ``last - 1 - s``
        _widen_stage_input(decoder.stages[last - 1 - stage_index], added)
    # a new list: the encoder's is the plans' ``features_per_stage``, which the next network built from them must not see
    encoder.output_channels = [int(c) + (added if i == stage_index else 0)
                               for i, c in enumerate(encoder.output_channels)]


def _inner_stage(stage: nn.Module) -> nn.Module:
    return stage.stage if isinstance(stage, StageWithBlock) else stage


def _widen_stage_input(stage: nn.Module, added: int) -> None:
    """Widen the input of a planned stage by ``added`` channels, appended after the existing ones."""
    if isinstance(stage, nn.Sequential) and isinstance(stage[-1], StackedConvBlocks):
        stage = stage[-1]  # a PlainConvEncoder stage: (pooling,) convolutions
    if isinstance(stage, StackedConvBlocks):
        _widen_conv_block(stage.convs[0], added)
    elif isinstance(stage, StackedResidualBlocks) and isinstance(stage.blocks[0], (BasicBlockD, BottleneckD)):
        block = stage.blocks[0]
        _widen_conv_block(block.conv1, added)
        projection = [m for m in block.skip.children() if isinstance(m, ConvDropoutNormReLU)] \
            if isinstance(block.skip, nn.Sequential) else []
        if projection:
            _widen_conv_block(projection[0], added)
        else:
            conv = block.conv1.conv
            pooling = list(block.skip.children()) if isinstance(block.skip, nn.Sequential) else []
            norm = block.conv1.norm
            block.skip = nn.Sequential(*pooling, ConvDropoutNormReLU(
                type(conv), conv.in_channels, block.output_channels, 1, 1, False, type(norm) if norm else None,
                _norm_kwargs(norm), None, None, None, None))
    else:
        raise TypeError(f"Cannot widen the input of a {type(stage).__name__}: only the stages of PlainConvUNet and "
                        f"ResidualEncoderUNet (StackedConvBlocks, StackedResidualBlocks) are supported.")


def _norm_kwargs(norm: nn.Module | None) -> dict | None:
    if norm is None:
        return None
    return {"eps": norm.eps, "affine": norm.affine}


def _widen_conv_block(block: ConvDropoutNormReLU, added: int) -> None:
    widened = _widened_conv(block.conv, added)
    block.all_modules[list(block.all_modules).index(block.conv)] = widened
    block.conv = widened
    block.input_channels = widened.in_channels


def _widened_conv(conv: nn.Module, added: int) -> nn.Module:
    """A copy of ``conv`` taking ``added`` more input channels: its weights for the old ones, He-initialised weights
    (as nnU-Net initialises its networks) for the new ones."""
    if conv.groups != 1:
        raise TypeError("Cannot widen a grouped convolution.")
    transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
    widened = type(conv)(conv.in_channels + added, conv.out_channels, conv.kernel_size, conv.stride,
                         padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None)
    nn.init.kaiming_normal_(widened.weight, a=1e-2)
    with torch.no_grad():
        if transposed:  # weight (in, out, *kernel)
            widened.weight[:conv.in_channels] = conv.weight
        else:  # weight (out, in, *kernel)
            widened.weight[:, :conv.in_channels] = conv.weight
        if conv.bias is not None:
            widened.bias.copy_(conv.bias)
    return widened.to(conv.weight.device)


def attached_blocks(network: nn.Module) -> dict[int, nn.Module]:
    """The blocks attached to the network's encoder, by stage index."""
    return {index: stage.block for index, stage in enumerate(encoder_of(network).stages)
            if isinstance(stage, StageWithBlock)}


def stage_channels(network: nn.Module, stage_index: int) -> int:
    """Number of feature channels output by encoder stage ``stage_index``."""
    channels: Sequence[int] = encoder_of(network).output_channels
    return int(channels[stage_index])
