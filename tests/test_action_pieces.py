"""ACTION's pieces on their own: soft-negative KL, local windows, anatomical contrast with active negative
sampling, confidence-weighted pseudo-label CE, CutMix; against explicit references."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from nnunet_weak.losses.anatomical_contrast import (anatomical_contrast_loss, negative_class_probabilities,
                                                    sample_negative_classes)
from nnunet_weak.losses.contrastive_distillation import local_window_embeddings, soft_negative_kl
from nnunet_weak.losses.pseudo_label import confidence_weighted_pseudo_label_ce
from nnunet_weak.transforms.strong_view import cutmix, cutmix_boxes, intensity_jitter


def cosine(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def soft_negative_kl_by_loops(q, k, queue, ts, tt):
    total = 0.0
    for n in range(len(q)):
        s = [cosine(q[n], e) / ts for e in queue]
        t = [cosine(k[n], e) / tt for e in queue]
        log_ps = np.array(s) - math.log(sum(math.exp(v) for v in s))
        log_pt = np.array(t) - math.log(sum(math.exp(v) for v in t))
        total += sum(math.exp(log_pt[j]) * (log_pt[j] - log_ps[j]) for j in range(len(queue)))
    return total / len(q)


def test_soft_negative_kl_against_explicit_loops_and_its_gradient():
    torch.manual_seed(0)
    q, k, queue = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64), torch.randn(7, 4)
    expected = soft_negative_kl_by_loops(q.numpy(), k.numpy(), queue.double().numpy(), 0.1, 0.6)
    assert float(soft_negative_kl(q, k, queue.double(), 0.1, 0.6)) == pytest.approx(expected, rel=1e-9)
    q.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: soft_negative_kl(x, k, queue.double(), 0.1, 0.6), (q,))
    # the teacher and the queue carry no gradient
    k.requires_grad_(True)
    soft_negative_kl(q, k, queue.double()).backward()
    assert k.grad is None


def test_soft_negative_kl_temperatures():
    torch.manual_seed(1)
    q, queue = torch.randn(6, 8), torch.randn(10, 8)
    # same embedding, same temperature: nothing to learn
    assert float(soft_negative_kl(q, q, queue, 0.2, 0.2)) == pytest.approx(0.0, abs=1e-6)
    # a very sharp teacher is a one-hot target on its nearest queue entry: the KL becomes that entry's CE
    k = torch.randn(6, 8)
    nearest = (torch.nn.functional.normalize(k, dim=1) @ torch.nn.functional.normalize(queue, dim=1).T).argmax(1)
    student_log_p = torch.log_softmax(torch.nn.functional.normalize(q, dim=1)
                                      @ torch.nn.functional.normalize(queue, dim=1).T / 0.1, 1)
    cross_entropy = -student_log_p[torch.arange(6), nearest].mean()
    assert float(soft_negative_kl(q, k, queue, 0.1, 1e-5)) == pytest.approx(float(cross_entropy), rel=1e-4)
    # a flatter teacher asks less of the student than a sharp one that disagrees with it
    assert float(soft_negative_kl(q, k, queue, 0.1, 10.0)) < float(soft_negative_kl(q, k, queue, 0.1, 0.01))


@pytest.mark.parametrize("shape, window", [((2, 3, 4, 6), 2), ((1, 2, 4, 4, 6), (2, 2, 3))])
def test_local_window_embeddings_against_loops(shape, window):
    torch.manual_seed(2)
    x = torch.randn(shape)
    got = local_window_embeddings(x, window)
    w = (window,) * (x.dim() - 2) if isinstance(window, int) else window
    rows = []
    for b in range(shape[0]):
        for start in np.ndindex(*[s // ww for s, ww in zip(shape[2:], w)]):
            region = tuple(slice(i * ww, (i + 1) * ww) for i, ww in zip(start, w))
            rows.append(x[(b, slice(None), *region)].reshape(shape[1], -1).mean(1))
    torch.testing.assert_close(got, torch.stack(rows))
    with pytest.raises(ValueError, match="does not divide"):
        local_window_embeddings(x, 5)


def test_negative_class_probabilities_are_the_softmax_of_prototype_similarity_over_other_present_classes():
    torch.manual_seed(3)
    prototypes = torch.randn(4, 5)
    present = torch.tensor([True, True, False, True])
    got = negative_class_probabilities(prototypes, present, 0.5)
    for c in range(4):
        if not present[c]:
            assert not got[c].any()
            continue
        others = [j for j in range(4) if j != c and present[j]]
        logits = np.array([cosine(prototypes[c].numpy(), prototypes[j].numpy()) / 0.5 for j in others])
        expected = np.exp(logits) / np.exp(logits).sum()
        np.testing.assert_allclose(got[c, others].numpy(), expected, rtol=1e-5)
        assert got[c, c] == 0 and got[c, 2] == 0


def test_active_negatives_follow_the_prototype_softmax():
    probabilities = torch.tensor([0.0, 0.6, 0.3, 0.1])
    draws = sample_negative_classes(probabilities, 20000, torch.Generator().manual_seed(0))
    observed = np.bincount(draws.numpy(), minlength=4)
    assert observed[0] == 0
    assert chisquare(observed[1:], 20000 * probabilities[1:].numpy()).pvalue > 1e-3
    # the test has the power to see another distribution
    assert chisquare(observed[1:], [20000 / 3] * 3).pvalue < 1e-6


def test_anatomical_contrast_against_an_explicit_reference():
    torch.manual_seed(4)
    # class 0: voxel 0 confident, voxels 1 and 2 hard; class 1: voxel 3 alone, confident (so every negative of a
    # class-0 query is voxel 3, and class 1 has no query)
    queries, keys = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1])
    confidence = torch.tensor([0.99, 0.5, 0.8, 0.98], dtype=torch.float64)
    m, tau = 7, 0.5
    expected = 0.0
    for v in (1, 2):
        positive = math.exp(cosine(queries[v].numpy(), keys[0].numpy()) / tau)
        negative = m * math.exp(cosine(queries[v].numpy(), keys[3].numpy()) / tau)
        expected += -math.log(positive / (positive + negative)) / 2
    loss = anatomical_contrast_loss(queries, keys, labels, confidence, 2, negatives_per_query=m, temperature=tau,
                                    generator=torch.Generator().manual_seed(0))
    assert float(loss) == pytest.approx(expected, rel=1e-9)
    queries.requires_grad_(True)
    keys.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: anatomical_contrast_loss(x, keys, labels, confidence, 2, negatives_per_query=m,
                                           generator=torch.Generator().manual_seed(0)), (queries,))
    anatomical_contrast_loss(queries, keys, labels, confidence, 2).backward()
    assert keys.grad is None


def test_anatomical_contrast_draws_hard_queries_and_is_zero_without_two_prototypes():
    torch.manual_seed(5)
    queries, keys = torch.randn(300, 8), torch.randn(300, 8)
    labels = torch.randint(0, 3, (300,))
    confidence = torch.rand(300)
    loss = anatomical_contrast_loss(queries, keys, labels, confidence, 3, confidence_threshold=0.5,
                                    queries_per_class=10, negatives_per_query=20,
                                    generator=torch.Generator().manual_seed(0))
    assert loss > 0 and torch.isfinite(loss)
    # confident queries only, i.e. no hard voxel, or a single class with prototypes: nothing to contrast
    assert float(anatomical_contrast_loss(queries, keys, labels, torch.ones(300), 3)) == 0.0
    assert float(anatomical_contrast_loss(queries, keys, torch.zeros(300, dtype=torch.long), confidence, 3)) == 0.0


def test_confidence_weighted_pseudo_label_ce_against_loops():
    torch.manual_seed(6)
    student = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    teacher = torch.softmax(torch.randn(2, 3, 4, 5, dtype=torch.float64) * 4, 1)
    expected = 0.0
    for b in range(2):
        confident, ce = 0, 0.0
        for y in range(4):
            for x in range(5):
                t = teacher[b, :, y, x].numpy()
                confident += t.max() >= 0.9
                s = student[b, :, y, x].numpy()
                ce += -(s[t.argmax()] - math.log(np.exp(s).sum()))
        expected += (confident / 20) * (ce / 20) / 2
    assert float(confidence_weighted_pseudo_label_ce(student, teacher, 0.9)) == pytest.approx(expected, rel=1e-9)
    assert float(confidence_weighted_pseudo_label_ce(student, teacher, 1.01)) == 0.0


@pytest.mark.parametrize("spatial", [(16, 20), (4, 16, 20)])
def test_cutmix_moves_image_and_label_with_the_same_box(spatial):
    generator = torch.Generator().manual_seed(7)
    boxes = cutmix_boxes(64, spatial, probability=0.5, generator=generator)
    with_box = boxes.flatten(1).any(1)
    assert 16 < int(with_box.sum()) < 48  # about half the samples get a box
    areas = boxes[with_box].flatten(1).float().mean(1) if len(spatial) == 2 else boxes[with_box][:, 0].flatten(1).float().mean(1)
    assert float(areas.min()) >= 0.01 and float(areas.max()) <= 0.45
    if len(spatial) == 3:  # the whole extent of the leading axis
        assert torch.equal(boxes[:, :1].expand_as(boxes), boxes)
    images = torch.arange(64, dtype=torch.float32).view(64, 1, *[1] * len(spatial)).expand(64, 2, *spatial)
    labels = torch.arange(64).view(64, *[1] * len(spatial)).expand(64, *spatial)
    permutation = torch.randperm(64, generator=generator)
    mixed_images, mixed_labels = cutmix(images, labels, boxes, permutation)
    # every voxel of image and label comes from the same sample: the box moved both
    assert torch.equal(mixed_images[:, 0].long(), mixed_labels) and torch.equal(mixed_images[:, 1].long(), mixed_labels)
    expected = torch.where(boxes, permutation.view(64, *[1] * len(spatial)), torch.arange(64).view(64, *[1] * len(spatial)))
    assert torch.equal(mixed_labels, expected)


def test_intensity_jitter_is_an_affine_change_per_sample_and_channel_within_its_strength():
    torch.manual_seed(8)
    images = torch.randn(16, 2, 8, 8) * 3 + 1
    jittered = intensity_jitter(images, 0.2, torch.Generator().manual_seed(0))
    contrasts, offsets = [], []
    for b in range(16):
        for c in range(2):
            x, y = images[b, c].flatten().double(), jittered[b, c].flatten().double()
            contrast = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
            offset = float(y.mean() - contrast * x.mean())
            torch.testing.assert_close(y, contrast * x + offset)  # affine
            contrasts.append(contrast)
            offsets.append(offset / float(x.std()))
    assert 0.8 <= min(contrasts) and max(contrasts) <= 1.2 and max(abs(o) for o in offsets) <= 0.2 + 1e-6
    assert np.std(contrasts) > 0.02 and np.std(offsets) > 0.02  # random per sample and channel
    with pytest.raises(ValueError):
        intensity_jitter(images, 1.5)
