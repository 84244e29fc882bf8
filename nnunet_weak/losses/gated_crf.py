"""Masked gated CRF loss (Obukhov et al., arXiv 1906.04651), as used by AttenScribble (Eq. 6).

For every *un-annotated* position ``i`` and every neighbour ``j`` inside a box window (radius 5)::

    k_ij  = exp(-|p_i - p_j|² / (2 σ_xy²) - |I_i - I_j|² / (2 σ_I²))       σ_xy = 6 voxels, σ_I = 0.1
    L_crf = Σ_i m_i Σ_j k_ij (1 - ⟨y_i, y_j⟩) / Σ_i m_i

``m_i = 1`` where position ``i`` carries no annotation: annotated positions receive no CRF energy
(their label comes from the partial cross-entropy), but they still act as neighbours. Positions
outside the image (nnU-Net's padding and augmentation borders, ``inside`` False) are neither: the
authors train on whole resized slices, which have none, and on z-scored MRI the padding value is the
mean intensity, which on ACDC is the myocardium's, so a CRF through padding ties tissue of that
intensity to whatever is predicted in the padding. ``I`` is the network input with each channel
rescaled to [0, 1], the range that σ_I = 0.1 refers to in the authors' code (nnU-Net's own
normalisation, z-scores for MRI, would make the intensity kernel ten times narrower): per sample,
min–max over the positions inside the image, or by a fixed window per channel (``intensity_windows``).
The per-sample rescaling suits MRI, whose intensities have no absolute meaning; on CT it would make σ_I
depend on what the augmented patch happens to hold (air or bone), so there the window is fixed: the
clipping range of nnU-Net's CT normalisation (:func:`ct_intensity_windows`). Positions are in voxels of
the finest axis; with anisotropic 3D spacing the window and the distance are physical
(``nnunet_weak.losses.local_window``).

Gradients reach ``y`` only (computed with the energy in one pass, checked by ``gradcheck``). Memory is
linear in the number of voxels: one window offset at a time, nothing kept per offset.
"""
from __future__ import annotations

import torch

from nnunet_weak.losses.local_window import LocalWindow, at_least_single_precision, in_single_precision, pair_slices


def min_max_rescaled(image: torch.Tensor, inside: torch.Tensor | None = None) -> torch.Tensor:
    """Each channel of each sample of ``(B, C, *spatial)`` rescaled to [0, 1] (constant channels → 0), with the
    minimum and maximum taken over the positions where ``inside`` ``(B, *spatial)`` is True (all if ``None``;
    a sample without such position keeps its whole range)."""
    flat = image.flatten(2)
    if inside is None:
        low, high = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    else:
        mask = inside.flatten(1)[:, None]
        mask = mask | ~mask.any(-1, keepdim=True)
        low = flat.masked_fill(~mask, torch.inf).min(-1, keepdim=True).values
        high = flat.masked_fill(~mask, -torch.inf).max(-1, keepdim=True).values
    span = (high - low).clamp_min(1e-8)
    return ((flat - low) / span).reshape(image.shape)


def rescaled_intensities(image: torch.Tensor, inside: torch.Tensor | None = None, windows=None) -> torch.Tensor:
    """``(B, C, *spatial)`` with each channel mapped to [0, 1]: linearly from its fixed window ``windows[c] =
    (low, high)`` (values outside the window stay outside [0, 1]), or, where the window is ``None`` (or
    ``windows`` is), by :func:`min_max_rescaled` per sample."""
    if windows is None:
        return min_max_rescaled(image, inside)
    if len(windows) != image.shape[1]:
        raise ValueError(f"one intensity window (or None) per input channel: {image.shape[1]} channels, "
                         f"{len(windows)} windows")
    per_sample = min_max_rescaled(image, inside) if None in windows else None
    channels = []
    for c, window in enumerate(windows):
        if window is None:
            channels.append(per_sample[:, c])
            continue
        low, high = window
        if not high > low:
            raise ValueError(f"intensity window of channel {c} is ({low}, {high}): it needs low < high")
        channels.append((image[:, c] - low) / (high - low))
    return torch.stack(channels, 1)


def ct_intensity_windows(normalization_schemes, intensity_properties: dict) -> list:
    """Per input channel, the window in network-input units that nnU-Net's ``CTNormalization`` clips to:
    ``((p0.5 - mean) / std, (p99.5 - mean) / std)`` from the dataset fingerprint's foreground intensity
    statistics; ``None`` for channels with any other normalisation.

    Args:
        normalization_schemes: the configuration's ``normalization_schemes``, one name per channel.
        intensity_properties: the plans' ``foreground_intensity_properties_per_channel`` (keys ``"0"``, ``"1"``...).
    """
    windows = []
    for c, scheme in enumerate(normalization_schemes):
        if scheme != "CTNormalization":
            windows.append(None)
            continue
        properties = intensity_properties[str(c)]
        std = max(float(properties["std"]), 1e-8)  # as CTNormalization divides
        windows.append(((float(properties["percentile_00_5"]) - float(properties["mean"])) / std,
                        (float(properties["percentile_99_5"]) - float(properties["mean"])) / std))
    return windows


def _pairs(window: LocalWindow, spatial_shape, image, unannotated, inside, inverse_two_sigma2):
    """For one offset ``d`` of each ``±d`` pair: the slices of ``i`` and ``j = i + d`` and the pair weight
    ``k_ij (m_i + m_j) v_i v_j`` (the pair counts from each of its un-annotated ends, and only when both ends
    are inside the image), ``(B, *overlap)``."""
    for offset, weight in zip(window.offsets, window.weights):
        if next(o for o in offset if o) < 0:
            continue
        first, second = pair_slices(spatial_shape, offset)
        i, j = (slice(None), slice(None)) + first, (slice(None), slice(None)) + second
        # in place after the first difference: fresh buffers per offset are what costs time on the CPU
        kernel = (image[i] - image[j]).square_().sum(1).mul_(-inverse_two_sigma2).exp_().mul_(weight)
        kernel.mul_(unannotated[i[1:]] + unannotated[j[1:]]).mul_(inside[i[1:]]).mul_(inside[j[1:]])
        yield i, j, kernel


class _MaskedGatedCRFEnergy(torch.autograd.Function):
    """``E = Σ_pairs w_ij (1 - ⟨y_i, y_j⟩)`` and ``∂E/∂y_i = -Σ_j w_ij y_j``, in one pass over the offsets.

    The pair weights (an exponential of intensity differences per pair) are the expensive part and do not
    depend on ``y``, so the forward pass computes them once and accumulates the gradient beside the
    energy; the backward pass only scales it. The energy follows from the gradient, since every pair
    enters it from both ends: ``Σ_pairs w_ij ⟨y_i, y_j⟩ = -½ ⟨y, ∂E/∂y⟩``, so
    ``E = Σ_pairs w_ij + ½ ⟨y, ∂E/∂y⟩`` (both sums in double precision: they nearly cancel where the
    prediction is smooth). Autograd would keep every offset's intermediates; here one gradient buffer is
    kept.
    """

    @staticmethod
    @in_single_precision
    def forward(ctx, probabilities, image, unannotated, inside, window, inverse_two_sigma2):
        grad = torch.zeros_like(probabilities)
        weight_sum = torch.zeros((), dtype=torch.float64, device=probabilities.device)
        for i, j, weight in _pairs(window, probabilities.shape[2:], image, unannotated, inside, inverse_two_sigma2):
            weight_sum += weight.sum(dtype=torch.float64)
            weight = weight.unsqueeze(1)
            grad[i].addcmul_(weight, probabilities[j], value=-1)
            grad[j].addcmul_(weight, probabilities[i], value=-1)
        ctx.save_for_backward(grad)
        energy = weight_sum + 0.5 * (probabilities * grad).sum(dtype=torch.float64)
        return energy.to(probabilities.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None, None, None


def masked_gated_crf_loss(probabilities: torch.Tensor, image: torch.Tensor, unannotated: torch.Tensor,
                          window: LocalWindow, intensity_sigma: float = 0.1,
                          inside: torch.Tensor | None = None, intensity_windows=None) -> torch.Tensor:
    """Eq. 6: the gated CRF energy of the un-annotated positions inside the image, per such position.

    Args:
        probabilities: ``(B, L, *spatial)`` soft-max prediction.
        image: ``(B, C, *spatial)`` network input (rescaled to [0, 1] here).
        unannotated: ``(B, *spatial)`` bool, True where the label is the ignore label.
        window: spatial window and Gaussian (radius 5, σ_xy 6 in the paper).
        intensity_sigma: σ_I of the intensity kernel, on the [0, 1] image.
        inside: ``(B, *spatial)`` bool, True inside the image (``None``: everywhere). Pairs with an end
            outside contribute nothing, and outside positions are not counted.
        intensity_windows: per input channel, a fixed ``(low, high)`` mapped to [0, 1], or ``None`` for the
            per-sample min–max (``None`` instead of the list: min–max for every channel).

    Returns:
        scalar: total energy over the batch divided by the number of un-annotated positions inside the
        image (0 if none).
    """
    if probabilities.shape[0] != image.shape[0] or probabilities.shape[2:] != image.shape[2:]:
        raise ValueError(f"probabilities {tuple(probabilities.shape)} and image {tuple(image.shape)} must share "
                         f"batch size and spatial shape")
    if unannotated.shape != probabilities.shape[:1] + probabilities.shape[2:]:
        raise ValueError(f"unannotated must be (B, *spatial) = {tuple(probabilities.shape[:1] + probabilities.shape[2:])}, "
                         f"got {tuple(unannotated.shape)}")
    if len(window.radii) != probabilities.ndim - 2:
        raise ValueError(f"the window is {len(window.radii)}D but the prediction is {probabilities.ndim - 2}D")
    if inside is not None and inside.shape != unannotated.shape:
        raise ValueError(f"inside must be (B, *spatial) = {tuple(unannotated.shape)}, got {tuple(inside.shape)}")
    probabilities = at_least_single_precision(probabilities)
    valid = torch.ones_like(unannotated, dtype=probabilities.dtype) if inside is None else inside.to(probabilities.dtype)
    gate = unannotated.to(probabilities.dtype) * valid
    count = gate.sum()
    if count == 0:
        return probabilities.sum() * 0
    rescaled = rescaled_intensities(at_least_single_precision(image.detach()), inside, intensity_windows)
    return _MaskedGatedCRFEnergy.apply(probabilities, rescaled, gate, valid, window,
                                       1.0 / (2 * intensity_sigma ** 2)) / count
