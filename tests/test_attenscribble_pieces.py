"""AttenScribble's pieces on their own: window, losses (against explicit loops), attention block,
encoder attachment, sparse deep-supervision targets, trainer options."""
import itertools
import math

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

from nnunet_weak.errors import UserInputError
from nnunet_weak.losses.attentive_similarity import (attention_log_normaliser, attentive_affinity_matrix,
                                                     attentive_similarity_loss, dense_attentive_similarity_loss)
from nnunet_weak.losses.gated_crf import ct_intensity_windows, masked_gated_crf_loss
from nnunet_weak.losses.local_window import (LocalWindow, largest_divisors_at_most, merge_windows, partition_windows,
                                             window_tiles)
from nnunet_weak.networks.encoder_stages import (StageWithBlock, attach_after_encoder_stage, attached_blocks,
                                                 cumulative_stage_strides, stage_channels, stage_index_for_stride)
from nnunet_weak.networks.spatial_self_attention import SpatialSelfAttentionBlock
from nnunet_weak.training.options import parse_trainer_options
from nnunet_weak.transforms.sparse_downsampling import (SparsePreservingDownsampleSegForDSTransform,
                                                        sparse_preserving_downsample)

from conftest import small_unet


def positions(shape):
    return list(itertools.product(*(range(s) for s in shape)))


def explicit_window_weight(p, q, radius, sigma, spacing):
    """G between two positions, straight from the definition (0 outside the box or on the diagonal)."""
    finest = min(spacing)
    if p == q:
        return 0.0
    for a, b, s in zip(p, q, spacing):
        if abs(a - b) > math.floor(radius * finest / s + 1e-6):
            return 0.0
    distance2 = sum(((a - b) * s / finest) ** 2 for a, b, s in zip(p, q, spacing))
    return math.exp(-distance2 / (2 * sigma ** 2))


# ---- window -------------------------------------------------------------------------------------

def test_window_is_the_box_with_gaussian_weights():
    window = LocalWindow.gaussian(5, 6.0, (1.0, 1.0))
    assert window.radii == (5, 5)
    weights = dict(zip(window.offsets, window.weights))
    assert len(weights) == 11 * 11 - 1 and (0, 0) not in weights
    assert weights[(3, -4)] == pytest.approx(math.exp(-25 / 72)) == weights[(-3, 4)]


def test_window_shrinks_along_coarse_axes():
    window = LocalWindow.gaussian(5, 6.0, (10.0, 1.5, 1.5))
    assert window.radii == (0, 5, 5)
    window = LocalWindow.gaussian(5, 6.0, (5.0, 2.5, 2.5))
    assert window.radii == (2, 5, 5)
    assert dict(zip(window.offsets, window.weights))[(1, 0, 0)] == pytest.approx(math.exp(-4 / 72))


@pytest.mark.parametrize("grid, spacing", [((9, 7), (1.0, 1.0)), ((4, 6, 5), (2.0, 1.0, 1.0))])
def test_tiles_visit_every_window_pair_once(grid, spacing):
    window = LocalWindow.gaussian(2, 1.5, spacing)
    # a budget so small that the grid is cut into many tiles
    tiles = window_tiles(window, grid, 1, max_elements=60)
    assert len(tiles) > 2
    visited = {}
    for tile in tiles:
        band = tile.band.tolist()
        for row, i in enumerate(tile.positions.tolist()):
            for column, weight in enumerate(tile.weights()[row].tolist()):
                if weight:
                    assert (i, band[column]) not in visited
                    visited[(i, band[column])] = weight
    cells = positions(grid)
    expected = {(a, b): explicit_window_weight(p, q, 2, 1.5, spacing)
                for a, p in enumerate(cells) for b, q in enumerate(cells)}
    expected = {pair: w for pair, w in expected.items() if w}
    assert visited.keys() == expected.keys()
    assert all(visited[pair] == pytest.approx(expected[pair]) for pair in expected)


# ---- gated CRF ----------------------------------------------------------------------------------

def explicit_rescaled(image, inside, windows=None):
    """Per sample and channel, rescaled to [0, 1] by the minimum and maximum over the inside positions, or by the
    channel's fixed window ``(low, high)``."""
    out = torch.empty_like(image)
    for b in range(image.shape[0]):
        for c in range(image.shape[1]):
            values = image[b, c][inside[b]]
            low, high = (values.min(), values.max()) if windows is None or windows[c] is None else windows[c]
            out[b, c] = (image[b, c] - low) / (high - low)
    return out


def explicit_gated_crf(probabilities, image, unannotated, radius, sigma, intensity_sigma, spacing, inside=None,
                       windows=None):
    batch, _, *shape = probabilities.shape
    inside = torch.ones_like(unannotated) if inside is None else inside
    rescaled = explicit_rescaled(image, inside, windows)
    total, count = 0.0, 0
    for b in range(batch):
        for p in positions(shape):
            if not unannotated[(b, *p)] or not inside[(b, *p)]:
                continue
            count += 1
            for q in positions(shape):
                g = explicit_window_weight(p, q, radius, sigma, spacing)
                if g == 0 or not inside[(b, *q)]:
                    continue
                difference = ((rescaled[(b, slice(None), *p)] - rescaled[(b, slice(None), *q)]) ** 2).sum()
                kernel = g * torch.exp(-difference / (2 * intensity_sigma ** 2))
                total = total + kernel * (1 - (probabilities[(b, slice(None), *p)] * probabilities[(b, slice(None), *q)]).sum())
    return total / count


@pytest.mark.parametrize("with_padding", [False, True], ids=["whole-image", "padded"])
@pytest.mark.parametrize("shape, spacing", [((5, 6), (1.0, 1.0)), ((3, 4, 4), (2.0, 1.0, 1.0))])
def test_gated_crf_matches_explicit_loops(shape, spacing, with_padding):
    torch.manual_seed(0)
    probabilities = torch.softmax(torch.randn(2, 3, *shape, dtype=torch.float64), 1)
    image = torch.randn(2, 2, *shape, dtype=torch.float64)
    unannotated = torch.rand(2, *shape) > 0.3
    inside = torch.rand(2, *shape) > 0.25 if with_padding else None
    if with_padding:
        image[~inside[:, None].expand_as(image)] = 100.0  # padding far outside the image's range must not set the rescaling
    window = LocalWindow.gaussian(2, 1.5, spacing)
    fast = masked_gated_crf_loss(probabilities, image, unannotated, window, intensity_sigma=0.5, inside=inside)
    slow = explicit_gated_crf(probabilities, image, unannotated, 2, 1.5, 0.5, spacing, inside)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-10)
    if with_padding:
        # what is predicted outside the image does not matter
        changed = probabilities.movedim(1, -1).clone()
        changed[~inside] = torch.softmax(torch.randn(int((~inside).sum()), 3, dtype=torch.float64), 1)
        again = masked_gated_crf_loss(changed.movedim(-1, 1), image, unannotated, window, intensity_sigma=0.5,
                                      inside=inside)
        assert again.item() == pytest.approx(fast.item(), rel=1e-12)


def test_gated_crf_ignores_annotated_sources_and_gradcheck():
    torch.manual_seed(1)
    logits = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    image = torch.randn(1, 1, 4, 5, dtype=torch.float64)
    unannotated = torch.rand(1, 4, 5) > 0.4
    window = LocalWindow.gaussian(2, 2.0, (1.0, 1.0))
    assert torch.autograd.gradcheck(
        lambda x: masked_gated_crf_loss(torch.softmax(x, 1), image, unannotated, window, 0.3), (logits,))
    inside = torch.rand(1, 4, 5) > 0.3
    assert torch.autograd.gradcheck(
        lambda x: masked_gated_crf_loss(torch.softmax(x, 1), image, unannotated, window, 0.3, inside), (logits,))
    # no un-annotated voxel: no energy at all
    assert masked_gated_crf_loss(torch.softmax(logits, 1), image, torch.zeros(1, 4, 5, dtype=torch.bool),
                                 window).item() == 0


def test_gated_crf_rejects_mismatched_shapes():
    window = LocalWindow.gaussian(2, 2.0, (1.0, 1.0))
    with pytest.raises(ValueError, match="unannotated must be"):
        masked_gated_crf_loss(torch.rand(1, 2, 4, 4), torch.rand(1, 1, 4, 4), torch.ones(1, 4, 5, dtype=torch.bool),
                              window)


# ---- attentive similarity -------------------------------------------------------------------------

def explicit_attentive_similarity(probabilities, queries, keys, w, b, radius, sigma, spacing, inside=None,
                                  attention_window=None):
    """Eq. 3–5 by loops over positions, with the softmax rows written out; pairs with an end outside the
    image left out, and the mean taken over the positions inside. With ``attention_window``, a position's
    partners (in the soft-max and in the pairs) are the positions of its own window only."""
    batch, _, *grid = queries.shape
    cells = positions(grid)
    inside = torch.ones(batch, *grid, dtype=torch.bool) if inside is None else inside

    def partners(p):
        if attention_window is None:
            return cells
        return [q for q in cells if all(a // n == c // n for a, c, n in zip(p, q, attention_window))]

    total = 0.0
    for s in range(batch):
        logits = {(p, q): (queries[(s, slice(None), *p)] * keys[(s, slice(None), *q)]).sum() for p in cells for q in cells}
        normaliser = {p: sum(torch.exp(logits[(p, q)]) for q in partners(p)) for p in cells}
        for p in cells:
            for q in partners(p):
                g = explicit_window_weight(p, q, radius, sigma, spacing)
                if g == 0 or not inside[(s, *p)] or not inside[(s, *q)]:
                    continue
                a_pq = torch.exp(logits[(p, q)]) / normaliser[p]
                a_qp = torch.exp(logits[(q, p)]) / normaliser[q]
                affinity = torch.sigmoid(w * (a_pq + a_qp) + b)
                similarity = (probabilities[(s, slice(None), *p)] * probabilities[(s, slice(None), *q)]).sum()
                total = total + affinity * g * (1 - similarity)
    return total / inside.sum()


def random_attention_inputs(grid, seed=0, channels=4, classes=3, batch=2):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, channels, *grid, dtype=torch.float64, generator=generator)
    keys = torch.randn(batch, channels, *grid, dtype=torch.float64, generator=generator)
    probabilities = torch.softmax(torch.randn(batch, classes, *grid, dtype=torch.float64, generator=generator), 1)
    w = torch.tensor(1.3, dtype=torch.float64)
    b = torch.tensor(-0.4, dtype=torch.float64)
    return probabilities, queries, keys, w, b


@pytest.mark.parametrize("max_elements", [100, 1 << 20], ids=["tiled", "whole-grid"])
@pytest.mark.parametrize("grid, spacing", [((4, 5), (1.0, 1.0)), ((2, 3, 3), (2.0, 1.0, 1.0))])
def test_attentive_similarity_matches_explicit_loops_and_dense_path(grid, spacing, max_elements):
    probabilities, queries, keys, w, b = random_attention_inputs(grid)
    window = LocalWindow.gaussian(2, 1.5, spacing)
    fast = attentive_similarity_loss(probabilities, queries, keys, w, b, window, max_elements=max_elements)
    dense = dense_attentive_similarity_loss(probabilities, queries, keys, w, b, window)
    slow = explicit_attentive_similarity(probabilities, queries, keys, w, b, 2, 1.5, spacing)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-10)
    assert dense.item() == pytest.approx(slow.item(), rel=1e-10)


@pytest.mark.parametrize("max_elements, tiles", [(5000, "several"), (1 << 20, "one")],
                         ids=["tiles", "whole-grid-explicit-backward"])
def test_attentive_similarity_paths_equal_dense_on_larger_grid_with_gradients(max_elements, tiles):
    probabilities, queries, keys, w, b = random_attention_inputs((12, 10), seed=3, channels=8)
    window = LocalWindow.gaussian(5, 6.0, (1.0, 1.0))
    assert (len(window_tiles(window, (12, 10), 1, max_elements)) > 1) == (tiles == "several")
    inputs = [t.clone().requires_grad_(True) for t in (probabilities, queries, keys, w, b)]
    twins = [t.clone().requires_grad_(True) for t in (probabilities, queries, keys, w, b)]
    fast = attentive_similarity_loss(*inputs, window, max_elements=max_elements)
    dense = dense_attentive_similarity_loss(*twins, window)
    fast.backward()
    dense.backward()
    assert fast.item() == pytest.approx(dense.item(), rel=1e-10)
    for a, c in zip(inputs, twins):
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-9, atol=1e-12)


def check_inside_the_image_against_loops_and_dense_path(grid, spacing, max_elements, seed, inside_seed, inside_share,
                                                        attention_window=None):
    """The fast loss against explicit loops and the dense path (values and gradients), on random inputs with
    some grid positions outside the image; returns the inputs, the mask and the fast path's inputs after backward."""
    probabilities, queries, keys, w, b = random_attention_inputs(grid, seed=seed)
    inside = torch.rand(2, *grid, generator=torch.Generator().manual_seed(inside_seed)) > inside_share
    window = LocalWindow.gaussian(2, 1.5, spacing)
    inputs = [t.clone().requires_grad_(True) for t in (probabilities, queries, keys, w, b)]
    twins = [t.clone().requires_grad_(True) for t in (probabilities, queries, keys, w, b)]
    fast = attentive_similarity_loss(*inputs, window, max_elements=max_elements, inside=inside,
                                     attention_window=attention_window)
    dense = dense_attentive_similarity_loss(*twins, window, inside=inside, attention_window=attention_window)
    slow = explicit_attentive_similarity(probabilities, queries, keys, w, b, 2, 1.5, spacing, inside, attention_window)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-10)
    assert dense.item() == pytest.approx(slow.item(), rel=1e-10)
    fast.backward()
    dense.backward()
    for a, c in zip(inputs, twins):
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-9, atol=1e-12)
    return (probabilities, queries, keys, w, b), window, inside, fast, inputs


@pytest.mark.parametrize("max_elements", [60, 1 << 20], ids=["tiled", "whole-grid"])
@pytest.mark.parametrize("grid, spacing", [((4, 5), (1.0, 1.0)), ((2, 3, 3), (2.0, 1.0, 1.0))])
def test_attentive_similarity_inside_the_image_matches_loops_and_gradients(grid, spacing, max_elements):
    (probabilities, queries, keys, w, b), window, inside, _, inputs = \
        check_inside_the_image_against_loops_and_dense_path(grid, spacing, max_elements, seed=11, inside_seed=4,
                                                            inside_share=0.3)
    # nothing outside the image receives a gradient through the prediction
    outside = ~inside.flatten(1)
    assert inputs[0].grad.flatten(2).transpose(1, 2)[outside].abs().max() == 0
    nothing = torch.zeros_like(inside)
    assert attentive_similarity_loss(probabilities, queries, keys, w, b, window, inside=nothing).item() == 0


@pytest.mark.parametrize("max_elements", [40, 1 << 20], ids=["tiled", "whole-window"])
@pytest.mark.parametrize("grid, spacing, attention_window", [((4, 6), (1.0, 1.0), (2, 3)),
                                                             ((2, 4, 6), (2.0, 1.0, 1.0), (2, 2, 3))])
def test_windowed_attentive_similarity_matches_loops_and_masked_dense_path(grid, spacing, attention_window,
                                                                           max_elements):
    (probabilities, queries, keys, w, b), window, inside, fast, _ = check_inside_the_image_against_loops_and_dense_path(
        grid, spacing, max_elements, seed=13, inside_seed=2, inside_share=0.2, attention_window=attention_window)
    # the windows change the loss: it is not the global one
    assert fast.item() != pytest.approx(attentive_similarity_loss(probabilities, queries, keys, w, b, window,
                                                                  inside=inside).item(), rel=1e-3)
    small = [t[:1, :2].clone().requires_grad_(True) for t in (queries, keys)]
    assert torch.autograd.gradcheck(
        lambda q, k, ww, bb: attentive_similarity_loss(probabilities[:1], q, k, ww, bb, window, max_elements,
                                                       attention_window=attention_window),
        (*small, w.clone().requires_grad_(True), b.clone().requires_grad_(True)))


def test_attentive_similarity_gradcheck_and_resizing():
    probabilities, queries, keys, w, b = random_attention_inputs((3, 4), seed=5, channels=3, classes=2, batch=1)
    window = LocalWindow.gaussian(2, 1.5, (1.0, 1.0))
    full_res_logits = torch.randn(1, 2, 6, 8, dtype=torch.float64, requires_grad=True)
    tensors = [t.requires_grad_(True) for t in (queries, keys, w, b)]
    for max_elements in (30, 1 << 20):
        assert torch.autograd.gradcheck(
            lambda x, q, k, ww, bb: attentive_similarity_loss(torch.softmax(x, 1), q, k, ww, bb, window, max_elements),
            (full_res_logits, *tensors))


def test_log_normaliser_and_affinity_symmetry():
    _, queries, keys, w, b = random_attention_inputs((5, 6), seed=7)
    logits = queries.flatten(2).transpose(1, 2) @ keys.flatten(2)
    for max_elements in (1 << 20, 100):  # one chunk of rows; chunks of one row
        torch.testing.assert_close(attention_log_normaliser(queries, keys, max_elements).flatten(1),
                                   torch.logsumexp(logits, -1))
    small = [t[:1, :3, :2, :3].clone().requires_grad_(True) for t in (queries, keys)]
    assert torch.autograd.gradcheck(lambda q, k: attention_log_normaliser(q, k, 10), small)
    affinity = attentive_affinity_matrix(queries, keys, w, b)
    torch.testing.assert_close(affinity, affinity.transpose(1, 2))
    assert not torch.allclose(torch.softmax(logits, -1), torch.softmax(logits, -1).transpose(1, 2))


# ---- attention block -----------------------------------------------------------------------------

@pytest.mark.parametrize("spatial, window_size, window", [((6, 5), None, None), ((3, 4, 4), None, None),
                                                          ((6, 5), 3, (3, 1)), ((3, 4, 4), 2, (1, 2, 2))])
def test_block_attention_equals_naive_softmax(spatial, window_size, window):
    torch.manual_seed(0)
    block = SpatialSelfAttentionBlock(8, len(spatial), window_size=window_size).double()
    x = torch.randn(2, 8, *spatial, dtype=torch.float64)
    out = block(x)
    assert out.shape == x.shape and block.last_window == window
    tokens = x.flatten(2).transpose(1, 2)
    normed = block.attention_norm(tokens)
    q, k, v = block.query(normed), block.key(normed), block.value(normed)
    logits = q @ k.transpose(1, 2) / math.sqrt(8)
    if window is not None:  # a position attends to the positions of its own window, by coordinates
        cells = positions(spatial)
        same = torch.tensor([[all(a // n == c // n for a, c, n in zip(p, r, window)) for r in cells] for p in cells])
        logits = logits.masked_fill(~same, float("-inf"))
    attention = torch.softmax(logits, dim=-1)
    tokens = tokens + block.output_projection(attention @ v)
    hidden = block.mlp_in(block.mlp_norm(tokens)).transpose(1, 2).reshape(2, -1, *spatial)
    hidden = torch.nn.functional.gelu(block.mlp_depthwise(hidden)).flatten(2).transpose(1, 2)
    expected = block.final_norm(tokens + block.mlp_out(hidden)).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(block.last_queries.flatten(2).transpose(1, 2), q)
    torch.testing.assert_close(block.last_keys.flatten(2).transpose(1, 2), k)
    block.eval()
    block(x)
    assert block.last_queries is None and block.last_keys is None


def test_block_rejects_wrong_channels():
    with pytest.raises(ValueError, match="expected"):
        SpatialSelfAttentionBlock(8, 2)(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="window_size"):
        SpatialSelfAttentionBlock(8, 2, window_size=0)


@pytest.mark.parametrize("grid, window_size, expected", [((5, 32, 28), 8, (5, 8, 7)), ((16, 12), 8, (8, 6)),
                                                         ((7, 6), 4, (1, 3)), ((3, 3), 8, (3, 3)),
                                                         ((10, 16, 14), 4, (2, 4, 2))])
def test_attention_windows_divide_the_grid_and_partition_round_trips(grid, window_size, expected):
    window = largest_divisors_at_most(grid, window_size)
    assert window == expected
    x = torch.randn(2, 3, *grid)
    windows = partition_windows(x, window)
    counts = [g // w for g, w in zip(grid, window)]
    assert windows.shape == (2 * math.prod(counts), 3, *window)
    for index, corner in enumerate(itertools.product(range(2), *(range(n) for n in counts))):
        sample, *cell = corner
        box = tuple(slice(c * w, (c + 1) * w) for c, w in zip(cell, window))
        assert torch.equal(windows[index], x[(sample, slice(None), *box)])
    assert torch.equal(merge_windows(windows, 2, grid), x)
    with pytest.raises(ValueError, match="does not tile"):
        partition_windows(x, tuple(w + 1 for w in grid))


# ---- attaching to the encoder ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["plain", "residual"])
@pytest.mark.parametrize("dims", [2, 3])
def test_attached_block_replaces_stage_features(kind, dims):
    torch.manual_seed(0)
    network = small_unet(kind, dims)
    stage = stage_index_for_stride(network, 4)
    assert stage == 2 and max(cumulative_stage_strides(network)[stage]) == 4
    block = SpatialSelfAttentionBlock(stage_channels(network, stage), dims)
    attach_after_encoder_stage(network, stage, block)
    assert attached_blocks(network) == {2: block}
    assert isinstance(network.encoder.stages[2], StageWithBlock)
    assert any(k.startswith("encoder.stages.2.block.") for k in network.state_dict())
    x = torch.randn(2, 1, *([4, 16, 16] if dims == 3 else [16, 16]))
    skips = network.encoder(x)
    # the skip of the stage is the block's output
    stage_output = network.encoder.stages[2].stage(network.encoder.stages[1](network.encoder.stages[0](
        network.encoder.stem(x) if getattr(network.encoder, "stem", None) is not None else x)))
    torch.testing.assert_close(skips[2], block(stage_output))
    outputs = network(x)
    assert outputs[0].shape == (2, 3, *x.shape[2:])


def test_attachment_errors_name_the_problem():
    network = small_unet("plain", 2)
    with pytest.raises(ValueError, match="No encoder stage has stride 3"):
        stage_index_for_stride(network, 3)
    attach_after_encoder_stage(network, 1, torch.nn.Identity())
    with pytest.raises(ValueError, match="already has a block"):
        attach_after_encoder_stage(network, 1, torch.nn.Identity())
    with pytest.raises(TypeError, match="encoder.stages"):
        attach_after_encoder_stage(torch.nn.Linear(2, 2), 0, torch.nn.Identity())


# ---- sparse deep-supervision targets ---------------------------------------------------------------

def explicit_block_downsample(segmentation, factor, ignore):
    _, h, w = segmentation.shape
    out = np.full((1, h // factor, w // factor), ignore)
    for i in range(h // factor):
        for j in range(w // factor):
            block = segmentation[0, i * factor:(i + 1) * factor, j * factor:(j + 1) * factor].ravel()
            annotated = block[block != ignore]
            if annotated.size:
                values, counts = np.unique(annotated, return_counts=True)
                out[0, i, j] = values[np.argmax(counts)]  # ties: the lowest label (np.unique sorts)
    return out


def test_sparse_downsampling_matches_explicit_blocks():
    rng = np.random.default_rng(0)
    segmentation = np.where(rng.random((1, 16, 12)) < 0.15, rng.integers(0, 4, (1, 16, 12)), 4)
    for factor in (2, 4):
        fast = sparse_preserving_downsample(torch.from_numpy(segmentation).to(torch.int16), (factor, factor), 4)
        assert fast.dtype == torch.int16
        np.testing.assert_array_equal(fast.numpy(), explicit_block_downsample(segmentation, factor, 4))


def test_thin_scribble_survives_where_nearest_loses_it():
    segmentation = torch.full((1, 32, 32), 3, dtype=torch.int16)
    # one-voxel-wide scribbles on rows/columns that nnU-Net's nearest-exact sampling skips
    segmentation[0, 4, 2:30] = 1
    segmentation[0, 16:26, 8] = 0
    scales = [[1, 1], [0.5, 0.5], [0.25, 0.25]]
    nearest = DownsampleSegForDSTransform(scales)(segmentation=segmentation.clone())["segmentation"]
    preserving = SparsePreservingDownsampleSegForDSTransform(scales, ignore_label=3)(
        segmentation=segmentation.clone())["segmentation"]
    for n, p in zip(nearest[1:], preserving[1:]):
        assert (p == 1).sum() > 0 and (p == 0).sum() > 0
        assert (n != 3).sum() == 0
    torch.testing.assert_close(preserving[0], segmentation)


def test_sparse_downsampling_rejects_bad_input():
    with pytest.raises(ValueError, match="values must lie in 0..3"):
        sparse_preserving_downsample(torch.full((1, 4, 4), 7), (2, 2), 3)
    with pytest.raises(ValueError, match="whole blocks"):
        SparsePreservingDownsampleSegForDSTransform([[1 / 3, 1 / 3]], 3)(segmentation=torch.zeros(1, 8, 8))


# ---- options ---------------------------------------------------------------------------------------

def test_trainer_options_parse_and_reject_typos():
    defaults = {"lambda_crf": 0.1, "lambda_attentive": 0.1}
    assert parse_trainer_options("", defaults, "T") == defaults
    assert parse_trainer_options(" lambda_crf=0.3 ,", defaults, "T") == {"lambda_crf": 0.3, "lambda_attentive": 0.1}
    with pytest.raises(UserInputError, match="'lambda_crff=1' is not an option of T"):
        parse_trainer_options("lambda_crff=1", defaults, "T")
    with pytest.raises(UserInputError, match="must be a number"):
        parse_trainer_options("lambda_crf=abc", defaults, "T")
    with pytest.raises(UserInputError, match=">= 0"):
        parse_trainer_options("lambda_crf=-1", defaults, "T")


@pytest.mark.parametrize("term", ["crf", "attentive"])
def test_pairwise_weights_ramp_up_over_the_given_fraction_of_the_epochs(term):
    from types import SimpleNamespace

    from nnunet_weak.trainers.ScribbleAttentionTrainer import ScribbleAttentionTrainer

    def weight(epoch, rampup):
        state = SimpleNamespace(**{f"lambda_{term}": 0.1, f"{term}_rampup": rampup}, num_epochs=20,
                                current_epoch=epoch)
        return getattr(ScribbleAttentionTrainer, f"{term}_weight")(state)

    assert [weight(e, 0.0) for e in (0, 7, 19)] == [0.1, 0.1, 0.1]
    assert weight(0, 0.5) == pytest.approx(0.1 * math.exp(-5))
    assert weight(5, 0.5) == pytest.approx(0.1 * math.exp(-5 * 0.25))
    assert weight(10, 0.5) == weight(19, 0.5) == pytest.approx(0.1)



def test_gated_crf_on_fixed_windows_matches_loops_and_ignores_intensities_outside_its_window():
    torch.manual_seed(2)
    probabilities = torch.softmax(torch.randn(2, 3, 7, 7, dtype=torch.float64), 1)
    image = torch.randn(2, 2, 7, 7, dtype=torch.float64)
    unannotated = torch.rand(2, 7, 7) > 0.3
    inside = torch.rand(2, 7, 7) > 0.2
    window = LocalWindow.gaussian(1, 1.0, (1.0, 1.0))
    windows = [(-2.0, 3.0), None]  # channel 0 CT, channel 1 min-max per sample
    fast = masked_gated_crf_loss(probabilities, image, unannotated, window, 0.5, inside, intensity_windows=windows)
    slow = explicit_gated_crf(probabilities, image, unannotated, 1, 1.0, 0.5, (1.0, 1.0), inside, windows)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-10)

    # on CT, bone entering a patch far from every un-annotated voxel leaves the loss alone; per-patch min-max does not
    ct = image[:, :1]
    few = torch.zeros(2, 7, 7, dtype=torch.bool)
    few[:, :2, :2] = True
    with_bone = ct.clone()
    with_bone[:, 0, 6, 6] = 40.0
    for windows, same in (([(-2.0, 3.0)], True), (None, False)):
        losses = [masked_gated_crf_loss(probabilities, x, few, window, 0.5, intensity_windows=windows).item()
                  for x in (ct, with_bone)]
        assert (losses[0] == pytest.approx(losses[1], rel=1e-12)) == same


def test_ct_intensity_windows_are_nnunets_clipping_range_in_normalised_units():
    properties = {"0": {"mean": 40.0, "std": 20.0, "percentile_00_5": -960.0, "percentile_99_5": 240.0},
                  "1": {"mean": 0.0, "std": 1.0, "percentile_00_5": -1.0, "percentile_99_5": 1.0}}
    assert ct_intensity_windows(["CTNormalization", "ZScoreNormalization"], properties) == [(-50.0, 10.0), None]
    with pytest.raises(ValueError, match="low < high"):
        masked_gated_crf_loss(torch.rand(1, 2, 4, 4), torch.rand(1, 1, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool),
                              LocalWindow.gaussian(1, 1.0, (1.0, 1.0)), intensity_windows=[(1.0, 1.0)])
    with pytest.raises(ValueError, match="one intensity window"):
        masked_gated_crf_loss(torch.rand(1, 2, 4, 4), torch.rand(1, 1, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool),
                              LocalWindow.gaussian(1, 1.0, (1.0, 1.0)), intensity_windows=[None, None])
