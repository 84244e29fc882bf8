"""KAF's pre-training pieces against explicit references: the positional contrastive loss, SuperGlue's
optimal transport with a dustbin, the correspondence loss and matches, and the neighbouring-slice batches."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nnunet_weak.losses.keypoint_correspondence import (correspondence_loss, correspondences, image_descriptors,
                                                        log_optimal_transport)
from nnunet_weak.losses.positional_contrastive import positional_contrastive_loss
from nnunet_weak.training.neighbour_slices import NeighbourSliceDataLoader, neighbour_slice


def explicit_positional_contrastive(embeddings, positions, threshold, temperature):
    z = [[v / math.sqrt(sum(w ** 2 for w in e)) for v in e] for e in embeddings.tolist()]
    n = len(z)
    similarity = [[sum(a * b for a, b in zip(z[i], z[j])) / temperature for j in range(n)] for i in range(n)]
    losses = []
    for i in range(n):
        positives = [j for j in range(n) if j != i and abs(float(positions[i]) - float(positions[j])) <= threshold]
        if not positives:
            continue
        denominator = sum(math.exp(similarity[i][k]) for k in range(n) if k != i)
        losses.append(-sum(math.log(math.exp(similarity[i][j]) / denominator) for j in positives) / len(positives))
    return sum(losses) / len(losses)


def test_positional_contrastive_loss_matches_explicit_loops():
    torch.manual_seed(0)
    embeddings = torch.randn(7, 5, dtype=torch.float64)
    positions = torch.tensor([0.0, 0.05, 0.5, 0.52, 0.9, 1.0, 0.3], dtype=torch.float64)
    value = positional_contrastive_loss(embeddings, positions, threshold=0.1, temperature=0.5)
    assert value.item() == pytest.approx(explicit_positional_contrastive(embeddings, positions, 0.1, 0.5), rel=1e-9)


def test_positional_contrastive_positives_come_from_positions_only():
    torch.manual_seed(1)
    embeddings = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([0.0, 0.1, 0.4, 0.45, 0.8, 0.85], dtype=torch.float64)
    value = positional_contrastive_loss(embeddings, positions, 0.1, 0.1)
    # the same samples in another order (their case names, pairing and order are not inputs): the same loss
    order = torch.randperm(6)
    assert positional_contrastive_loss(embeddings[order], positions[order], 0.1, 0.1).item() == pytest.approx(
        value.item(), rel=1e-12)
    # other positions make other positives
    assert positional_contrastive_loss(embeddings, positions.flip(0) * 0.3, 0.1, 0.1).item() != pytest.approx(
        value.item())
    # no pair close enough: nothing to pull together, a zero with a graph
    far = positional_contrastive_loss(embeddings, torch.arange(6, dtype=torch.float64), 0.1, 0.1)
    assert far.item() == 0 and far.requires_grad
    assert torch.autograd.gradcheck(lambda e: positional_contrastive_loss(e, positions, 0.1, 0.5), (embeddings,))


def explicit_sinkhorn(scores, alpha, iterations):
    m, n = scores.shape
    coupling = np.full((m + 1, n + 1), alpha, dtype=np.float64)
    coupling[:m, :n] = scores
    mu = np.array([1.0] * m + [n]) / (m + n)
    nu = np.array([1.0] * n + [m]) / (m + n)
    kernel = np.exp(coupling)
    u, v = np.ones(m + 1), np.ones(n + 1)
    for _ in range(iterations):
        u = mu / (kernel @ v)
        v = nu / (kernel.T @ u)
    return np.log(u[:, None] * kernel * v[None, :] * (m + n))


def test_log_optimal_transport_matches_explicit_sinkhorn():
    torch.manual_seed(2)
    scores = torch.randn(2, 4, 6, dtype=torch.float64)
    alpha = torch.tensor(0.7, dtype=torch.float64)
    log_assignment = log_optimal_transport(scores, alpha, iterations=30)
    for b in range(2):
        np.testing.assert_allclose(log_assignment[b].numpy(), explicit_sinkhorn(scores[b].numpy(), 0.7, 30),
                                   rtol=1e-9, atol=1e-9)
    # converged marginals: every real keypoint distributes one unit
    converged = log_optimal_transport(scores, alpha, iterations=500).exp()
    torch.testing.assert_close(converged[:, :4].sum(2), torch.ones(2, 4, dtype=torch.float64))
    torch.testing.assert_close(converged[:, :, :6].sum(1), torch.ones(2, 6, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda s, a: log_optimal_transport(s, a, 5), (scores.requires_grad_(),
                                                                                 alpha.requires_grad_()))


def test_log_optimal_transport_gradient_is_autograds_through_the_unrolled_iterations():
    torch.manual_seed(4)
    scores = (3 * torch.randn(2, 16, 12)).requires_grad_()
    alpha = torch.tensor(1.0, requires_grad=True)
    weights = torch.randn(2, 17, 13)

    def unrolled(scores, alpha, iterations=100):  # SuperGlue's loop, left to autograd
        batch, m, n = scores.shape
        a = alpha.expand(batch, 1, 1)
        couplings = torch.cat((torch.cat((scores, a.expand(batch, m, 1)), 2),
                               torch.cat((a.expand(batch, 1, n), a), 2)), 1)
        norm = -math.log(m + n)
        log_mu = torch.tensor([norm] * m + [math.log(n) + norm])
        log_nu = torch.tensor([norm] * n + [math.log(m) + norm])
        u, v = torch.zeros(batch, m + 1), torch.zeros(batch, n + 1)
        for _ in range(iterations):
            u = log_mu - torch.logsumexp(couplings + v[:, None, :], dim=2)
            v = log_nu - torch.logsumexp(couplings + u[:, :, None], dim=1)
        return couplings + u[:, :, None] + v[:, None, :] - norm

    ours = torch.autograd.grad((log_optimal_transport(scores, alpha) * weights).sum(), (scores, alpha))
    expected = torch.autograd.grad((unrolled(scores, alpha) * weights).sum(), (scores, alpha))
    torch.testing.assert_close(log_optimal_transport(scores, alpha), unrolled(scores, alpha))
    for gradient, reference in zip(ours, expected):
        torch.testing.assert_close(gradient, reference, rtol=1e-4, atol=1e-5)


def test_correspondence_loss_matches_explicit_terms():
    torch.manual_seed(3)
    log_assignment = torch.randn(4, 5, dtype=torch.float64)  # M = 3, N = 4
    matches = torch.tensor([[0, 2], [2, 1]])
    terms = [log_assignment[0, 2], log_assignment[2, 1], log_assignment[1, 4],  # matched, then a's unmatched 1
             log_assignment[3, 0], log_assignment[3, 3]]  # b's unmatched 0 and 3
    assert correspondence_loss(log_assignment, matches).item() == pytest.approx(-sum(terms).item() / 5)
    none = correspondence_loss(log_assignment, torch.zeros(0, 2, dtype=torch.long))
    assert none.item() == pytest.approx(-(log_assignment[:3, 4].sum() + log_assignment[3, :4].sum()).item() / 7)


def blobs_image(shift=(0, 0)):
    image = torch.zeros(1, 1, 64, 64)
    for (y, x, size, value) in [(12, 10, 6, 1.0), (30, 40, 10, 0.6), (45, 15, 4, 0.8)]:
        image[..., y + shift[0]:y + shift[0] + size, x + shift[1]:x + shift[1] + 2 * size] = value
    return image


def test_correspondences_follow_the_shift_between_two_slices():
    from nnunet_weak.networks.keypoints import detect_keypoints
    first, second = blobs_image(), blobs_image(shift=(3, 2))
    positions_a, _ = detect_keypoints(first, 12)
    positions_b, _ = detect_keypoints(second, 12)
    descriptors = image_descriptors(torch.cat((first, second)), torch.cat((positions_a, positions_b)))
    assert descriptors.shape == (2, 12, 128)
    pairs = correspondences(descriptors[0], descriptors[1], positions_a[0], positions_b[0], max_distance=30)
    assert len(pairs) >= 6
    offsets = positions_b[0][pairs[:, 1]] - positions_a[0][pairs[:, 0]]
    # most matched corners moved with the image
    assert (offsets == torch.tensor([3, 2])).all(1).float().mean() >= 0.75
    # within one pixel only the fillers of the budget in the flat corner (the same place in both) still match
    close = correspondences(descriptors[0], descriptors[1], positions_a[0], positions_b[0], max_distance=1)
    assert torch.equal(positions_a[0][close[:, 0]], positions_b[0][close[:, 1]])
    assert (positions_a[0][close[:, 0]] <= 2).all()


# ---- neighbouring-slice batches ------------------------------------------------------------------------

class SliceIndexDataset:
    """Volumes whose voxels hold ``1000·case + 10·z + y / 100``: a crop tells which case, slice and rows it came from."""

    def __init__(self, depths):
        self.identifiers = [f"case{i}" for i in range(len(depths))]
        self.depths = depths

    def load_case(self, key):
        case = self.identifiers.index(key)
        z, y, _ = np.meshgrid(np.arange(self.depths[case]), np.arange(24), np.arange(24), indexing="ij")
        data = (1000 * case + 10 * z + y / 100)[None].astype(np.float32)
        return data, np.zeros_like(data, dtype=np.int16), None, {"class_locations": None}


def slice_pairs(depths, transforms=None, batch_size=6):
    labels = SimpleNamespace(all_labels=[0, 1], has_ignore_label=False)
    loader = NeighbourSliceDataLoader(SliceIndexDataset(depths), batch_size, (16, 16), (16, 16), labels,
                                      oversample_foreground_percent=1.0, transforms=transforms)
    return loader, loader.generate_train_batch()


def test_neighbour_slice_is_next_to_the_slice():
    rng = np.random.RandomState(0)
    assert {neighbour_slice(0, 5, rng) for _ in range(20)} == {1}
    assert {neighbour_slice(4, 5, rng) for _ in range(20)} == {3}
    assert {neighbour_slice(2, 5, rng) for _ in range(50)} == {1, 3}
    assert neighbour_slice(0, 1, rng) == 0


def test_batches_pair_neighbouring_slices_of_one_volume_with_their_positions():
    np.random.seed(0)
    loader, batch = slice_pairs([5, 9, 1])
    assert loader.oversample_foreground_percent == 0
    data, positions, partner = batch["data"], batch["slice_position"], batch["neighbour"]
    assert data.shape == (6, 1, 16, 16) and batch["target"].shape == (6, 1, 16, 16)
    assert partner.tolist() == [3, 4, 5, 0, 1, 2]
    for i in range(3):
        j = int(partner[i])
        case, z_a, z_b = (int(data[i, 0, 0, 0] // 1000), int(data[i, 0, 0, 0] % 1000 // 10),
                          int(data[j, 0, 0, 0] % 1000 // 10))
        assert batch["keys"][i] == batch["keys"][j] == f"case{case}"
        depth = [5, 9, 1][case]
        assert abs(z_a - z_b) == (1 if depth > 1 else 0)
        for k, z in ((i, z_a), (j, z_b)):
            assert positions[k].item() == pytest.approx(z / (depth - 1) if depth > 1 else 0.0)
        # the same in-plane crop for both slices
        torch.testing.assert_close(data[i] - data[i, 0, 0, 0], data[j] - data[j, 0, 0, 0], rtol=0, atol=1e-3)


def test_anchor_and_neighbour_share_the_spatial_augmentation():
    def random_flip(image, segmentation):
        return {"image": image.flip(-2) if np.random.rand() < 0.5 else image, "segmentation": segmentation}

    np.random.seed(1)
    _, batch = slice_pairs([6, 6, 6], transforms=random_flip, batch_size=8)
    data, partner = batch["data"], batch["neighbour"]
    for i in range(4):
        # rows ascend or descend together
        assert torch.sign(data[i, 0, -1, 0] - data[i, 0, 0, 0]) == torch.sign(
            data[partner[i], 0, -1, 0] - data[partner[i], 0, 0, 0])


def test_neighbouring_slices_need_a_2d_patch_and_a_batch_of_two():
    from nnunet_weak.errors import UserInputError
    labels = SimpleNamespace(all_labels=[0, 1], has_ignore_label=False)
    with pytest.raises(UserInputError, match="2D"):
        NeighbourSliceDataLoader(SliceIndexDataset([4]), 4, (4, 16, 16), (4, 16, 16), labels)
    with pytest.raises(UserInputError, match="at least 2"):
        NeighbourSliceDataLoader(SliceIndexDataset([4]), 1, (16, 16), (16, 16), labels)


def test_the_pretraining_loss_takes_positives_from_slice_positions_only():
    from nnunet_weak.networks.keypoints import Keypoints
    from nnunet_weak.networks.keypoint_pretraining import KeypointPretrainingOutput
    from nnunet_weak.trainers.KAFTrainer import KAFPretrainTrainer
    torch.manual_seed(4)
    trainer = SimpleNamespace(position_threshold=0.35, temperature=0.1, lambda_cnn=1.0, lambda_keypoint=1.0,
                              lambda_correspondence=0.0, _keypoint_correspondence=lambda *args: torch.tensor(0.0))
    output = KeypointPretrainingOutput(torch.randn(6, 8), torch.randn(6, 8), torch.randn(6, 4, 16), torch.tensor(1.0),
                                       Keypoints(torch.zeros(6, 4, 2, dtype=torch.long), (16, 16)))
    positions = torch.tensor([0.1, 0.5, 0.9, 0.2, 0.6, 1.0])
    pairs = torch.tensor([3, 4, 5, 0, 1, 2])

    def global_terms(**batch):
        _, terms = KAFPretrainTrainer.compute_training_loss(trainer, None, None, output, **batch)
        return terms["global_cnn"].item(), terms["global_keypoint"].item()

    reference = global_terms(slice_position=positions, neighbour=pairs)
    # other pairing and other case names: the same positives, the same loss
    assert global_terms(slice_position=positions, neighbour=pairs.flip(0), keys=[f"case{i}" for i in range(6)]) == \
        pytest.approx(reference, rel=1e-6)
    other_positions = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.5, 0.5])
    assert global_terms(slice_position=other_positions, neighbour=pairs) != pytest.approx(reference)
