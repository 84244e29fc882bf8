"""The strong view of ACTION's fine-tuning: CutMix between the samples of a batch, image and label map cut by the
same box, and intensity jitter.

Sample ``b`` keeps its own content outside a random box and takes sample ``π(b)``'s inside it, ``π`` a random
permutation of the batch; the box is applied to the images and to their (pseudo-)label maps alike, so that
the student's target moves with its input. Box rule of UniMatch (Yang et al., CVPR 2023), which ACTION's
fine-tuning follows: with probability ``p`` a box whose area is a uniform fraction in ``[area_min,
area_max]`` of the patch, aspect ratio log-uniform in ``[ratio, 1/ratio]`` on the last two axes (the whole
extent on a leading third axis in 3D), placed uniformly; otherwise no box.
"""
from __future__ import annotations

import math

import torch


def cutmix_boxes(batch_size: int, spatial_shape: tuple[int, ...], probability: float = 0.5,
                 area_min: float = 0.02, area_max: float = 0.4, ratio: float = 0.3,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``(B, *spatial)`` bool masks, ``True`` inside each sample's box (all ``False`` where it has none)."""
    if len(spatial_shape) not in (2, 3):
        raise ValueError(f"spatial_shape must be 2D or 3D, got {spatial_shape}")
    if not (0 < area_min <= area_max <= 1 and 0 < ratio <= 1):
        raise ValueError("need 0 < area_min <= area_max <= 1 and 0 < ratio <= 1")
    height, width = spatial_shape[-2:]
    masks = torch.zeros((batch_size, *spatial_shape), dtype=torch.bool)

    def uniform() -> float:
        return float(torch.rand((), generator=generator))

    for b in range(batch_size):
        if uniform() >= probability:
            continue
        area = (area_min + (area_max - area_min) * uniform()) * height * width
        aspect = math.exp(math.log(ratio) + (-2 * math.log(ratio)) * uniform())
        box_h = max(1, min(height, round(math.sqrt(area * aspect))))
        box_w = max(1, min(width, round(math.sqrt(area / aspect))))
        top = int(uniform() * (height - box_h + 1))
        left = int(uniform() * (width - box_w + 1))
        masks[b, ..., top:top + box_h, left:left + box_w] = True
    return masks


def cutmix(images: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor, permutation: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix ``images`` ``(B, C, *spatial)`` and ``labels`` ``(B, *spatial)`` or ``(B, L, *spatial)`` (label maps or
    probabilities): sample ``b`` takes sample ``permutation[b]`` inside ``boxes[b]`` (``(B, *spatial)`` bool)."""
    spatial = images.shape[2:]
    if (boxes.shape != (images.shape[0], *spatial) or labels.shape[0] != images.shape[0]
            or labels.shape[-len(spatial):] != spatial):
        raise ValueError(f"images {tuple(images.shape)}, labels {tuple(labels.shape)} and boxes {tuple(boxes.shape)} "
                         f"do not match")
    boxes = boxes.to(images.device)
    mixed_images = torch.where(boxes[:, None], images[permutation], images)
    box_for_labels = boxes if labels.dim() == boxes.dim() else boxes[:, None]
    return mixed_images, torch.where(box_for_labels, labels[permutation], labels)


def intensity_jitter(images: torch.Tensor, strength: float = 0.2, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """Random contrast and brightness per sample and channel: ``x · (1 + s·u₁) + s·u₂ · std(x)`` with ``u₁, u₂``
    uniform in ``[-1, 1]`` (the colour jitter of ACTION's strong view, for single-channel medical images).

    Args:
        images: ``(B, C, *spatial)``.
        strength: ``s`` in ``[0, 1)``.
    """
    if not 0 <= strength < 1:
        raise ValueError(f"strength must be in [0, 1), got {strength}")
    shape = (*images.shape[:2], *[1] * (images.dim() - 2))
    contrast = 1 + strength * (2 * torch.rand(shape, generator=generator) - 1)
    brightness = strength * (2 * torch.rand(shape, generator=generator) - 1)
    spread = images.detach().flatten(2).std(2).view(shape)
    return images * contrast.to(images) + brightness.to(images) * spread
