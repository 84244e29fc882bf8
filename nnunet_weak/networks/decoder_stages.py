"""One way to reach into the decoder of an auto-planned nnU-Net network.

nnU-Net's ``UNetDecoder`` (shared by ``PlainConvUNet`` and ``ResidualEncoderUNet``) runs, from the
bottleneck up: ``transpconvs[s]`` (a transposed convolution with kernel = stride) up-samples the
features below, which are concatenated with the skip and merged by ``stages[s]``; ``seg_layers[s]``
(1×1 convolutions) turn them into logits. Two things methods need from it:

- :func:`use_interpolating_upsampling` swaps every transposed convolution for interpolation followed by
  a 1×1 convolution (same channels, same output size), the "different up-sampling" that makes CAML's
  two networks disagree usefully while both stay nnU-Net's planned architecture.
- :class:`FeatureTap` records a module's output at every forward pass: the last decoder stage's
  (:func:`last_decoder_features`, full resolution, what per-voxel heads embed), every decoder stage's, or
  the bottleneck's (the last encoder stage).
"""
from __future__ import annotations

import torch
from torch import nn

from nnunet_weak.networks.encoder_stages import encoder_of, unwrap_network


def decoder_of(network: nn.Module) -> nn.Module:
    """The ``UNetDecoder`` of an nnU-Net network."""
    decoder = getattr(unwrap_network(network), "decoder", None)
    if decoder is None or not all(hasattr(decoder, name) for name in ("stages", "transpconvs", "seg_layers")):
        raise TypeError(f"{type(unwrap_network(network)).__name__} has no nnU-Net decoder (decoder.stages, "
                        f"decoder.transpconvs, decoder.seg_layers): only the encoder-decoder networks of "
                        f"dynamic_network_architectures (PlainConvUNet, ResidualEncoderUNet, ...) are supported.")
    return decoder


class InterpolatingUpsampling(nn.Module):
    """Up-sampling by interpolation (``scale_factor = stride``), then a 1×1 convolution to ``out_channels``.

    Shapes: ``(B, in_channels, *spatial)`` → ``(B, out_channels, *(spatial · stride))``, as the
    transposed convolution it replaces.
    """

    def __init__(self, in_channels: int, out_channels: int, stride, spatial_dims: int, mode: str):
        super().__init__()
        interpolation = {"linear": ("bilinear", "trilinear")[spatial_dims - 2], "nearest": "nearest"}
        if mode not in interpolation:
            raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
        self.scale_factor = tuple(int(s) for s in (stride if isinstance(stride, (list, tuple)) else
                                                   [stride] * spatial_dims))
        self.mode = interpolation[mode]
        convolution = (nn.Conv2d, nn.Conv3d)[spatial_dims - 2]
        self.projection = convolution(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        upsampled = nn.functional.interpolate(x, scale_factor=self.scale_factor, mode=self.mode,
                                              **({} if self.mode == "nearest" else {"align_corners": False}))
        return self.projection(upsampled)


def use_interpolating_upsampling(network: nn.Module, mode: str = "linear") -> nn.Module:
    """Replace every transposed convolution of ``network``'s decoder by :class:`InterpolatingUpsampling`
    (in place); returns ``network``."""
    decoder = decoder_of(network)
    for index, transposed in enumerate(decoder.transpconvs):
        if not isinstance(transposed, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
            raise TypeError(f"decoder.transpconvs[{index}] is a {type(transposed).__name__}, not a transposed "
                            f"convolution: the up-sampling was already replaced.")
        decoder.transpconvs[index] = InterpolatingUpsampling(
            transposed.in_channels, transposed.out_channels, transposed.stride,
            spatial_dims=isinstance(transposed, nn.ConvTranspose3d) + 2, mode=mode)
    return network


def per_scale(output) -> list:
    """An nnU-Net decoder's output (or its targets) as a list per deep-supervision scale, full resolution first:
    the list itself with deep supervision, a one-element list of the single tensor without."""
    return list(output) if isinstance(output, (list, tuple)) else [output]


class FeatureTap:
    """Records the output of one module of a network at every forward pass: the one way methods read features
    out of the auto-planned network (:func:`last_decoder_features`, :func:`decoder_stage_features`,
    :func:`bottleneck_features`).

    ``features`` is the module's latest output, ``None`` before the first pass. The hook stays registered for
    the life of the network; the tensor keeps its graph, so losses on it reach the network.
    """

    def __init__(self, module: nn.Module):
        self.features: torch.Tensor | None = None
        module.register_forward_hook(self._record)

    def _record(self, module, inputs, output):
        self.features = output


def last_decoder_features(network: nn.Module) -> FeatureTap:
    """The last decoder stage's output: ``(B, C_0, *patch)`` (``C_0``: channels of the first encoder stage), the
    input of the full-resolution segmentation layer and what per-voxel heads embed."""
    return FeatureTap(decoder_of(network).stages[-1])


def decoder_stage_features(network: nn.Module) -> list[FeatureTap]:
    """Every decoder stage's output, coarsest first: ``(B, C_s, *spatial_s)``."""
    return [FeatureTap(stage) for stage in decoder_of(network).stages]


def bottleneck_features(network: nn.Module) -> FeatureTap:
    """The last encoder stage's output (after any block attached to it): ``(B, C_bottleneck, *coarsest)``."""
    return FeatureTap(encoder_of(network).stages[-1])
