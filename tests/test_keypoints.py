"""KAF's in-network keypoints: the corners of a synthetic image, a fixed budget per slice, independent of the
batch, and moving with the image under flips, rotations and scaling."""
import pytest
import torch

from nnunet_weak.networks.keypoints import detect_keypoints

SIZE = 64
# two rectangles, rows × columns; their 8 corner pixels are the image's only corners
RECTANGLES = [((10, 20), (12, 30), 1.0), ((40, 55), (35, 45), 0.7)]


def rectangles_image() -> torch.Tensor:
    image = torch.zeros(1, 1, SIZE, SIZE)
    for (top, bottom), (left, right), value in RECTANGLES:
        image[..., top:bottom, left:right] = value
    return image


def as_set(positions: torch.Tensor) -> set:
    return {tuple(p) for p in positions.tolist()}


def test_the_keypoints_are_the_corners():
    positions, strength = detect_keypoints(rectangles_image(), 8)
    corners = [(y, x) for (top, bottom), (left, right), _ in RECTANGLES
               for y in (top, bottom - 1) for x in (left, right - 1)]
    for corner in corners:
        assert min(max(abs(y - corner[0]), abs(x - corner[1])) for y, x in positions[0].tolist()) <= 1
    assert torch.all(strength[0, :-1] >= strength[0, 1:]) and strength[0, -1] > 0


@pytest.mark.parametrize("transform, inverse", [
    (lambda im: torch.flip(im, dims=[-1]), lambda y, x: (y, SIZE - 1 - x)),
    (lambda im: torch.flip(im, dims=[-2]), lambda y, x: (SIZE - 1 - y, x)),
    # rot90 (k=1) moves pixel (y, x) to (SIZE - 1 - x, y)
    (lambda im: torch.rot90(im, 1, dims=(-2, -1)), lambda y, x: (x, SIZE - 1 - y)),
])
def test_keypoints_move_with_flips_and_rotations(transform, inverse):
    original = as_set(detect_keypoints(rectangles_image(), 8)[0][0])
    moved = detect_keypoints(transform(rectangles_image()), 8)[0][0]
    assert {inverse(y, x) for y, x in moved.tolist()} == original


def test_keypoints_scale_with_the_image():
    original = detect_keypoints(rectangles_image(), 8)[0][0].float()
    doubled = rectangles_image().repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    scaled = detect_keypoints(doubled, 8, smoothing_sigma=2.0, nms_size=9)[0][0].float()
    # every keypoint of the doubled image lies near twice a keypoint of the original
    distance = torch.cdist(scaled, 2 * original).min(1).values
    assert distance.max() <= 3


def test_a_fixed_budget_per_slice_independent_of_the_batch():
    torch.manual_seed(0)
    batch = torch.cat((rectangles_image(), torch.rand(1, 1, SIZE, SIZE), torch.zeros(1, 1, SIZE, SIZE)))
    positions, strength = detect_keypoints(batch, 16)
    assert positions.shape == (3, 16, 2) and strength.shape == (3, 16)
    for i in range(3):
        alone, alone_strength = detect_keypoints(batch[i:i + 1], 16)
        assert torch.equal(alone[0], positions[i]) and torch.allclose(alone_strength[0], strength[i])
    # a flat slice still gets its 16 keypoints, the same every time
    assert torch.equal(positions[2], detect_keypoints(torch.zeros(1, 1, SIZE, SIZE), 16)[0][0])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="count"):
        detect_keypoints(rectangles_image(), 0)
    with pytest.raises(ValueError, match="odd"):
        detect_keypoints(rectangles_image(), 4, nms_size=4)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        detect_keypoints(torch.zeros(1, SIZE, SIZE), 4)
