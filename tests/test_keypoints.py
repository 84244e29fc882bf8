"""KAF's in-network keypoints (the corners of a synthetic image, a fixed budget per slice, independent of the
batch, moving with the image under flips, rotations and scaling) and its keypoint fusion layer."""
import pytest
import torch

from nnunet_weak.networks.keypoints import Keypoints, detect_keypoints

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


def fusion_inputs(seed=0):
    from nnunet_weak.networks.keypoint_fusion import KeypointFusion
    torch.manual_seed(seed)
    fusion = KeypointFusion(in_channels=6, out_channels=5, dim=16, heads=4, layers=2).eval()
    features = torch.randn(3, 6, 8, 8)
    keypoints = torch.randint(0, SIZE, (3, 10, 2))
    return fusion, features, keypoints


def test_fusion_concatenates_a_keypoint_map_that_is_zero_away_from_the_keypoints():
    fusion, features, keypoints = fusion_inputs()
    captured = {}
    fusion.refine.register_forward_pre_hook(lambda module, inputs: captured.setdefault("map", inputs[0]))
    output = fusion(features, Keypoints(keypoints, (SIZE, SIZE)))
    assert output.shape == (3, 11, 8, 8)
    assert torch.equal(output[:, :6], features)
    occupied = captured["map"].abs().sum(1) > 0  # (B, 8, 8)
    for b in range(3):
        cells = {(int(y) * 8 // SIZE, int(x) * 8 // SIZE) for y, x in keypoints[b]}
        assert {tuple(c) for c in torch.nonzero(occupied[b]).tolist()} == cells


def test_fusion_ignores_keypoint_order_and_the_rest_of_the_batch():
    fusion, features, keypoints = fusion_inputs(1)
    with torch.no_grad():
        output = fusion(features, Keypoints(keypoints, (SIZE, SIZE)))
        shuffled = fusion(features, Keypoints(keypoints[:, torch.randperm(10)], (SIZE, SIZE)))
        alone = fusion(features[1:2], Keypoints(keypoints[1:2], (SIZE, SIZE)))
    torch.testing.assert_close(shuffled, output, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone[0], output[1], rtol=1e-5, atol=1e-6)


def test_fusion_refuses_mismatched_inputs():
    fusion, features, keypoints = fusion_inputs()
    with pytest.raises(ValueError, match="keypoints"):
        fusion(features, Keypoints(keypoints[:2], (SIZE, SIZE)))


@pytest.mark.parametrize("kind", ["plain", "residual"])
def test_a_kaf_network_predicts_a_slice_alone_as_inside_a_batch(kind):
    from nnunet_weak.networks.encoder_stages import stage_channels
    from nnunet_weak.networks.keypoint_fusion import attach_keypoint_fusion
    from conftest import small_unet
    torch.manual_seed(0)
    network = small_unet(kind, 2)
    channels = [stage_channels(network, s) for s in range(4)]
    layers = attach_keypoint_fusion(network, keypoint_count=12, channel_fraction=0.5, dim=16, heads=2, layers=1)
    assert len(layers) == 4
    assert [stage_channels(network, s) for s in range(4)] == [c + (c + 1) // 2 for c in channels]
    network.eval()
    batch = torch.cat((rectangles_image()[..., :32, :32], torch.rand(2, 1, 32, 32)))
    with torch.no_grad():
        together = network(batch)[0]
        for i in range(3):
            torch.testing.assert_close(network(batch[i:i + 1])[0][0], together[i], rtol=1e-4, atol=1e-5)
    network.train()
    network(batch)[0].sum().backward()
    assert all(p.grad is not None for layer in layers for p in layer.parameters())


def test_kaf_refuses_a_3d_network():
    from nnunet_weak.networks.keypoint_fusion import attach_keypoint_fusion
    from conftest import small_unet
    with pytest.raises(ValueError, match="2D"):
        attach_keypoint_fusion(small_unet("plain", 3), keypoint_count=8, channel_fraction=0.5)


def gaussian_blobs(size=64, flip=False):
    y, x = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    image = torch.zeros(size, size)
    for cy, cx, sigma in ((16, 20, 2.5), (40, 44, 4.0), (48, 14, 3.0)):
        image += torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma ** 2))
    image = image.flip(-1) if flip else image
    return image[None, None]


def test_the_sift_detector_finds_blob_centres_and_follows_a_flip():
    from nnunet_weak.networks.keypoints import KeypointDetector, detect_blob_keypoints
    positions, strength = detect_blob_keypoints(gaussian_blobs(), 8)
    assert positions.shape == (1, 8, 2) and torch.all(strength[0, :-1] >= strength[0, 1:])
    found = positions[0][strength[0] > 0].float()
    for centre in ((16, 20), (40, 44), (48, 14)):
        assert (found - torch.tensor(centre)).norm(dim=1).min() <= 1.5
    flipped, flipped_strength = detect_blob_keypoints(gaussian_blobs(flip=True), 8)
    moved = flipped[0][flipped_strength[0] > 0]
    moved[:, 1] = 63 - moved[:, 1]
    assert torch.cdist(moved.float(), found).min(1).values.max() <= 1
    # a fixed budget per slice, found from the slice alone
    batch = torch.cat((gaussian_blobs(), torch.rand(1, 1, 64, 64)))
    together = KeypointDetector(8, method="dog")(batch).positions
    assert torch.equal(together[0], KeypointDetector(8, method="dog")(batch[:1]).positions[0])
    with pytest.raises(ValueError, match="method"):
        KeypointDetector(8, method="sift")
