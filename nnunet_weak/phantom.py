"""A synthetic short-axis cardiac MRI phantom: the project's own data for the demo and the tests.

Each volume is a stack of short-axis slices (z, y, x) through a left ventricle: an LV blood pool
(label 3) inside a myocardial ring (label 2), with a crescent-shaped right ventricle (label 1) beside
it on the basal and mid slices, the same label convention as ACDC. Shapes vary per case and deform
along the long axis (the ventricle tapers towards the apex; contours carry low-order harmonic
wobbles); the image has blood-bright / muscle-dark bSSFP-like contrast, a body outline with a
bright fat rim, smooth tissue texture, a multiplicative bias field, partial-volume blur, Rician
noise, and anisotropic spacing (thick slices).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

PHANTOM_LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}


@dataclass(frozen=True)
class PhantomCase:
    """One generated case: image (z, y, x) float32, dense label (z, y, x) uint8, spacing (z, y, x) mm."""

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]


def _wobbly_ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float,
                    angle: float, harmonics: np.ndarray) -> np.ndarray:
    """Mask of an ellipse whose radius is modulated by sum_k a_k cos(k*phi + p_k), k = 2, 3."""
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u, v = c * dx + s * dy, -s * dx + c * dy
    phi = np.arctan2(v / ry, u / rx)
    modulation = 1.0 + sum(a * np.cos(k * phi + p) for k, (a, p) in zip((2, 3), harmonics))
    return (u / rx) ** 2 + (v / ry) ** 2 <= modulation ** 2


def generate_case(seed: int, shape_yx: tuple[int, int] = (48, 48), num_slices: tuple[int, int] = (8, 12),
                  noise: float = 0.05) -> PhantomCase:
    """Generate one phantom volume, fully determined by ``seed``.

    Args:
        seed: random seed; the same seed gives the same case.
        shape_yx: in-plane size in voxels.
        num_slices: inclusive range of the number of short-axis slices.
        noise: standard deviation of the Rician noise relative to blood intensity.
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape_yx
    nz = int(rng.integers(num_slices[0], num_slices[1] + 1))
    # a field of view of about 100 mm whatever the matrix size, as in cardiac MRI
    in_plane = float(rng.uniform(1.4, 1.9)) * 64 / max(ny, nx)
    spacing = (float(rng.uniform(7.0, 10.0)), in_plane, in_plane)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)

    # case-level anatomy, in mm then voxels
    lv_radius = rng.uniform(13.0, 21.0) / in_plane
    wall = rng.uniform(5.0, 9.0) / in_plane
    ellipticity = rng.uniform(0.85, 1.0)
    angle = rng.uniform(0, np.pi)
    centre = np.array([ny / 2, nx / 2]) + rng.uniform(-4, 4, size=2)
    drift = rng.uniform(-0.5, 0.5, size=2)
    rv_direction = rng.uniform(0.8, 1.3) * np.pi
    rv_extent = rng.uniform(0.65, 0.85)
    body = _wobbly_ellipse(yy, xx, ny / 2, nx / 2, ny * rng.uniform(0.40, 0.46), nx * rng.uniform(0.44, 0.49),
                           rng.uniform(-0.2, 0.2), np.zeros((2, 2)))
    body_inner = ndimage.binary_erosion(body, iterations=2)

    label = np.zeros((nz, ny, nx), dtype=np.uint8)
    for z in range(nz):
        t = z / max(nz - 1, 1)  # 0 = base, 1 = apex
        taper = 1.0 - 0.65 * t ** 1.5
        cy, cx = centre + drift * z
        harmonics = np.stack([rng.normal(0, 0.04, 2), rng.uniform(0, 2 * np.pi, 2)], axis=1)
        r_in = lv_radius * taper
        r_out = r_in + wall * (1.0 + 0.15 * t)
        outer = _wobbly_ellipse(yy, xx, cy, cx, r_out * ellipticity, r_out, angle, harmonics)
        cavity = _wobbly_ellipse(yy, xx, cy, cx, r_in * ellipticity, r_in, angle, harmonics)
        if t > 0.9:
            cavity &= False  # the apex cap is all muscle
        if t < rv_extent:
            ry = r_out * rng.uniform(1.15, 1.35)
            offset = r_out * 0.85
            rv = _wobbly_ellipse(yy, xx, cy + offset * np.sin(rv_direction), cx + offset * np.cos(rv_direction),
                                 ry * 0.8 * (1 - 0.6 * t / rv_extent), ry, rv_direction, harmonics * 0.5)
            rv &= ~ndimage.binary_dilation(outer, iterations=1)
            label[z][rv] = PHANTOM_LABELS["RV"]
        label[z][outer] = PHANTOM_LABELS["MYO"]
        label[z][cavity] = PHANTOM_LABELS["LV"]
    label[:, ~body_inner] = 0

    # bSSFP-like contrast: blood bright, muscle dark, textured tissue, bright fat rim, dark air
    texture = ndimage.gaussian_filter(rng.normal(0, 1, (nz, ny, nx)), sigma=(0.5, 3, 3))
    image = np.where(body, 0.35 + 0.06 * texture, 0.02)
    image = np.where(body & ~body_inner, 0.75, image)
    image = np.where(label == PHANTOM_LABELS["MYO"], 0.22, image)
    image = np.where(label == PHANTOM_LABELS["LV"], 0.95, image)
    image = np.where(label == PHANTOM_LABELS["RV"], 0.85, image)
    image = ndimage.gaussian_filter(image, sigma=(0.3, 0.8, 0.8))
    bias_y, bias_x = rng.uniform(-0.35, 0.35, 2)
    bias = np.exp(bias_y * (yy / ny - 0.5) + bias_x * (xx / nx - 0.5))[None]
    image = image * bias
    real = image + rng.normal(0, noise, image.shape)
    imaginary = rng.normal(0, noise, image.shape)
    image = np.sqrt(real ** 2 + imaginary ** 2) * rng.uniform(400, 900)
    return PhantomCase(image.astype(np.float32), label, spacing)
