"""The per-epoch dense-label monitor: its counts and scores against explicit loops, and its input checks."""
import math

import numpy as np
import pytest
import torch

from nnunet_weak.training.dense_monitor import DenseValidationMonitor, scores_from_confusion


def reference_scores(pairs, num_classes):
    """Pooled Dice per foreground class and background shares, by counting voxel by voxel."""
    tp, predicted, truth = [0] * num_classes, [0] * num_classes, [0] * num_classes
    background, background_as = 0, [0] * num_classes
    for dense, prediction in pairs:
        for index in np.ndindex(dense.shape):
            t, p = int(dense[index]), int(prediction[index])
            if t < 0:
                continue
            truth[t] += 1
            predicted[p] += 1
            tp[t] += t == p
            if t == 0:
                background += 1
                background_as[p] += 1
    dice = [2 * tp[c] / (truth[c] + predicted[c]) if truth[c] + predicted[c] else math.nan
            for c in range(1, num_classes)]
    return dice, [background_as[c] / background for c in range(1, num_classes)]


def test_monitor_scores_match_counting():
    rng = np.random.default_rng(0)
    cases, predictions = {}, {}
    for index, shape in enumerate([(3, 9, 8), (2, 7, 10)]):
        dense = rng.integers(0, 3, shape).astype(np.int16)
        dense[0, 0, :3] = -1  # outside the image: not scored
        data = rng.random((1, *shape)).astype(np.float32)
        data[0, 0, 0, 0] = index  # tells the fake predictor which case it sees
        cases[f"case{index}"] = (data, dense)
        predictions[index] = rng.integers(0, 3, shape)

    def predict_logits(data: torch.Tensor) -> torch.Tensor:
        labels = torch.from_numpy(predictions[int(data[0, 0, 0, 0])])
        return torch.nn.functional.one_hot(labels.long(), 3).movedim(-1, 0).float()

    scores = DenseValidationMonitor(cases, num_classes=3).measure(predict_logits)
    dice, background_as = reference_scores([(cases[f"case{i}"][1], predictions[i]) for i in range(2)], 3)
    assert scores.dice == pytest.approx(dice)
    assert scores.background_as == pytest.approx(background_as)


def test_scores_without_background_or_class():
    counts = np.array([[0, 0, 0], [0, 5, 1], [0, 0, 0]])
    scores = scores_from_confusion(counts)
    assert scores.dice == pytest.approx([10 / 11, 0.0])
    counts = np.array([[4, 0, 0], [0, 5, 0], [0, 0, 0]])
    assert math.isnan(scores_from_confusion(counts).dice[1])
    assert all(math.isnan(v) for v in scores.background_as)


def test_monitor_refuses_mismatched_or_out_of_range_labels():
    data = np.zeros((1, 4, 5), np.float32)
    with pytest.raises(ValueError, match="spatial shape"):
        DenseValidationMonitor({"a": (data, np.zeros((4, 6), np.int16))}, 3)
    with pytest.raises(ValueError, match="not below the number of classes 3"):
        DenseValidationMonitor({"a": (data, np.full((4, 5), 3, np.int16))}, 3)
    with pytest.raises(ValueError, match="at least one case"):
        DenseValidationMonitor({}, 3)


def test_a_checkpoint_without_the_monitor_keys_gets_them_padded_to_its_epochs():
    from types import SimpleNamespace

    from nnunet_weak.training.weak_trainer import nnUNetWeakTrainer

    logged = {"train_losses": [0.9, 0.8, 0.7], "loss_a": [1.0, 2.0, 3.0]}
    state = SimpleNamespace(logger=SimpleNamespace(local_logger=SimpleNamespace(my_fantastic_logging=logged)),
                            training_loss_components=("loss_a", "loss_b"), current_epoch=3,
                            label_manager=SimpleNamespace(num_segmentation_heads=4))
    nnUNetWeakTrainer._register_logged_keys(state)
    assert logged["loss_a"] == [1.0, 2.0, 3.0]
    assert len(logged["loss_b"]) == 3 and all(math.isnan(v) for v in logged["loss_b"])
    for key in ("dense_dice_per_class", "dense_background_as_class"):
        assert len(logged[key]) == 3 and all(len(v) == 3 and all(math.isnan(x) for x in v) for v in logged[key])
