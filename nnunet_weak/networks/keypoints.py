"""Keypoints that the network finds in its own input (KAF, Yang et al., NeurIPS 2023; ``../shared/METHODS.md`` §4).

``nnUNetv2_predict`` hands a network image tensors and nothing else, so the keypoints KAF's layers attend
among are detected inside the forward pass, on the image the network receives: they follow every spatial
augmentation by construction and exist at inference. Each slice gets exactly ``count`` keypoints, found
from that slice alone, so a prediction never depends on the rest of the batch.

Detector: Shi–Tomasi corners (``kornia.feature.gftt_response``, the smaller eigenvalue of the structure
tensor) of the first channel smoothed by a Gaussian, kept where they are the maximum of their
``nms_size`` neighbourhood (``kornia.geometry.subpix.nms2d``), the ``count`` strongest; ties (flat
regions, fewer corners than ``count``) go to the lowest flat index. The authors use SIFT (difference-of-
Gaussian blobs over scales, with descriptors KAF does not use); corners at one scale are cheaper and fire
at the junctions of the same anatomical boundaries. What the change costs in accuracy is to be measured
with the KAF trainers.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from kornia.feature import BlobDoG, ScaleSpaceDetector, gftt_response
from kornia.filters import gaussian_blur2d
from kornia.geometry import ConvQuadInterp3d, ScalePyramid
from kornia.geometry.subpix import nms2d
from torch import nn

#: the detectors :class:`KeypointDetector` offers
DETECTORS = ("corners", "dog")


class Keypoints(NamedTuple):
    """Keypoints of a batch of slices: ``positions`` ``(B, K, 2)`` long ``(y, x)`` pixel indices into the input of
    size ``input_size`` ``(H, W)``."""
    positions: torch.Tensor
    input_size: tuple[int, int]


class KeypointDetector(nn.Module):
    """``images (B, C, H, W)`` → :class:`Keypoints` with ``count`` per slice; no parameters.

    The network's own keypoint finder: attached as the ``input_context`` of its keypoint fusion layers
    (``nnunet_weak.networks.encoder_stages``), it runs once per forward pass on the network's input.
    ``method``: ``"corners"`` (:func:`detect_keypoints`) or ``"dog"`` (:func:`detect_blob_keypoints`, SIFT's
    detector, as the authors; about 0.13 s per 128×112 slice on a CPU core).
    """

    def __init__(self, count: int, smoothing_sigma: float = 1.0, nms_size: int = 5, method: str = "corners"):
        super().__init__()
        if method not in DETECTORS:
            raise ValueError(f"method must be one of {DETECTORS}, got {method!r}")
        self.count, self.smoothing_sigma, self.nms_size, self.method = count, smoothing_sigma, nms_size, method

    def forward(self, images: torch.Tensor) -> Keypoints:
        if images.dim() != 4:
            raise ValueError(f"KAF's keypoints are found on 2D slices (B, C, H, W); got an input of shape "
                             f"{tuple(images.shape)}. KAF supports 2D configurations only.")
        if self.method == "dog":
            positions, _ = detect_blob_keypoints(images, self.count)
        else:
            positions, _ = detect_keypoints(images, self.count, self.smoothing_sigma, self.nms_size)
        return Keypoints(positions, tuple(images.shape[2:]))

    def extra_repr(self) -> str:
        return f"method={self.method}, count={self.count}"


@torch.no_grad()
def detect_keypoints(images: torch.Tensor, count: int, smoothing_sigma: float = 1.0, nms_size: int = 5
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` strongest corners of each slice.

    Args:
        images: ``(B, C, H, W)``; the first channel is searched.
        count: keypoints per slice (the fixed budget).
        smoothing_sigma: σ (pixels) of the Gaussian applied before the corner response.
        nms_size: odd side of the window a corner must be the maximum of.

    Returns:
        ``positions`` ``(B, count, 2)`` long ``(y, x)`` pixel indices and ``strength`` ``(B, count)`` corner
        responses, strongest first.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    height, width = images.shape[2:]
    if not 1 <= count <= height * width:
        raise ValueError(f"count must be in 1..{height * width}, got {count}")
    if nms_size < 1 or nms_size % 2 == 0:
        raise ValueError(f"nms_size must be odd and positive, got {nms_size}")
    # one slice at a time: the same arithmetic for a slice whatever else is in the batch (a batched convolution
    # may sum in another order, and near-equal corner responses would then swap places)
    found = [_strongest_corners(images[i:i + 1, :1].float(), count, smoothing_sigma, nms_size)
             for i in range(images.shape[0])]
    return torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])


def _strongest_corners(image: torch.Tensor, count: int, smoothing_sigma: float, nms_size: int):
    width = image.shape[-1]
    radius = max(1, int(round(3 * smoothing_sigma)))
    smoothed = gaussian_blur2d(image, (2 * radius + 1, 2 * radius + 1), (smoothing_sigma, smoothing_sigma))
    response = gftt_response(smoothed)
    response = response * nms2d(response, (nms_size, nms_size), True)
    # a stable sort: among equal responses the lowest flat index comes first
    strength, flat = torch.sort(response.flatten(1), dim=1, descending=True, stable=True)
    strength, flat = strength[:, :count], flat[:, :count]
    return torch.stack((flat // width, flat % width), dim=-1), strength


@torch.no_grad()
def detect_blob_keypoints(images: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` strongest difference-of-Gaussian extrema of each slice: SIFT's detector
    (``kornia.feature.ScaleSpaceDetector`` with ``BlobDoG``, 3 scales per octave from σ 1.6 on the doubled image,
    sub-pixel refinement, minima and maxima), centres rounded to pixels.

    Args:
        images: ``(B, C, H, W)``; the first channel is searched.
        count: keypoints per slice.

    Returns:
        ``positions`` ``(B, count, 2)`` long ``(y, x)`` and ``strength`` ``(B, count)``, strongest first; a slice
        with fewer extrema than ``count`` gets the rest at ``(0, 0)`` with strength 0.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    detector = ScaleSpaceDetector(count, resp_module=BlobDoG(), scale_pyr_module=ScalePyramid(3, 1.6, 32, True),
                                  subpix_module=ConvQuadInterp3d(10), minima_are_also_good=True,
                                  scale_space_response=True).to(images.device)
    height, width = images.shape[2:]
    positions, strengths = [], []
    for i in range(images.shape[0]):  # one slice at a time, as detect_keypoints
        frames, strength = detector(images[i:i + 1, :1].float())
        centres = frames[0, :, :, 2].round().long()  # (count, 2) as (x, y)
        positions.append(torch.stack((centres[:, 1].clamp(0, height - 1), centres[:, 0].clamp(0, width - 1)), -1))
        strengths.append(strength[0])
    return torch.stack(positions), torch.stack(strengths)
