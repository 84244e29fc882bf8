"""The shared pieces of semi-supervised training, on their own: ramp-up, batch split, two-stream
batches, EMA teacher, training-only modules beside the inference network."""
import math

import numpy as np
import pytest
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from torch import nn

from nnunet_weak.errors import UserInputError
from nnunet_weak.losses.mutual_consistency import sharpen, sharpened_cross_consistency_loss
from nnunet_weak.networks.ema_teacher import EMATeacher
from nnunet_weak.networks.training_network import TRAINING_WEIGHTS_KEY, TrainingNetwork
from nnunet_weak.training.schedules import sigmoid_rampup
from nnunet_weak.training.two_stream import TwoStreamDataLoader, split_batch


@pytest.mark.parametrize("step, length", [(0, 10), (3, 10), (9.5, 10), (10, 10), (25, 10), (7, 0), (0, 0)])
def test_sigmoid_rampup_is_the_formula(step, length):
    expected = 1.0 if length == 0 else math.exp(-5 * (1 - min(max(step / length, 0), 1)) ** 2)
    assert sigmoid_rampup(step, length) == pytest.approx(expected, rel=1e-12)


def test_sigmoid_rampup_rises_monotonically_to_one_and_refuses_negative_input():
    values = [sigmoid_rampup(t, 40) for t in range(60)]
    assert values[0] == pytest.approx(math.exp(-5)) and values[40] == 1.0 and values[-1] == 1.0
    assert all(a < b for a, b in zip(values[:40], values[1:41]))
    with pytest.raises(ValueError):
        sigmoid_rampup(-1, 10)


@pytest.mark.parametrize("batch_size, labelled_per_batch, expected", [(2, 0, (1, 1)), (5, 0, (3, 2)), (4, 0, (2, 2)),
                                                                       (4, 1, (1, 3)), (4, 3, (3, 1)),
                                                                       (8, 0.75, (6, 2)), (5, 0.5, (3, 2)),
                                                                       (2, 0.75, (1, 1)), (8, 0.01, (1, 7)),
                                                                       (4, 1.0, (1, 3))])
def test_split_batch(batch_size, labelled_per_batch, expected):
    assert split_batch(batch_size, labelled_per_batch) == expected


@pytest.mark.parametrize("batch_size, labelled_per_batch, message", [(1, 0, "at least 2"), (4, 4, "between 1 and 3"),
                                                                     (4, 1.5, "whole number"),
                                                                     (4, -0.5, "whole number")])
def test_split_batch_refuses_a_batch_without_both_kinds(batch_size, labelled_per_batch, message):
    with pytest.raises(UserInputError, match=message):
        split_batch(batch_size, labelled_per_batch)


class InMemoryCases:
    """The part of nnU-Net's dataset interface its loader uses: 2D cases of 1×12×12 voxels, whose
    image value is the case number; labelled cases have foreground (label 1) only in one corner voxel."""

    def __init__(self, identifiers, labelled, ignore_label=2):
        self.identifiers = list(identifiers)
        self.labelled = labelled
        self.ignore_label = ignore_label

    def load_case(self, identifier):
        number = int(identifier.split("_")[1])
        data = np.full((1, 1, 12, 12), number, np.float32)
        if self.labelled:
            seg = np.zeros((1, 1, 12, 12), np.int16)
            seg[0, 0, 0, 0] = 1
            locations = {1: np.array([[0, 0, 0, 0]]), (-1, 0, 1): np.argwhere(seg >= 0)}
        else:
            seg = np.full((1, 1, 12, 12), self.ignore_label, np.int16)
            locations = {1: np.zeros((0, 4), int), (-1, 0, 1): np.zeros((0, 4), int)}
        return data, seg, None, {"class_locations": locations}


class _LabelManager:
    all_labels = [0, 1]
    has_ignore_label = True


def two_stream_loader(num_labelled, num_unlabelled, oversample):
    labelled = nnUNetDataLoader(InMemoryCases([f"case_{i}" for i in range(3)], True), num_labelled, (4, 4), (4, 4),
                                _LabelManager(), oversample_foreground_percent=oversample)
    unlabelled = nnUNetDataLoader(InMemoryCases([f"case_{i}" for i in range(10, 16)], False), num_unlabelled, (4, 4),
                                  (4, 4), _LabelManager(), oversample_foreground_percent=oversample)
    return TwoStreamDataLoader(labelled, unlabelled)


def test_two_stream_batch_puts_labelled_samples_first_and_marks_them():
    np.random.seed(0)
    loader = two_stream_loader(2, 3, 0.33)
    for _ in range(20):
        batch = loader.generate_train_batch()
        assert batch["data"].shape == (5, 1, 4, 4) and batch["target"].shape == (5, 1, 4, 4)
        assert batch["labelled"].tolist() == [True, True, False, False, False]
        numbers = [int(k.split("_")[1]) for k in batch["keys"]]
        assert all(n < 10 for n in numbers[:2]) and all(n >= 10 for n in numbers[2:])
        # each sample's image is its own case (crops of labelled cases may reach into zero padding)
        assert [float(batch["data"][i].max()) for i in range(5)] == numbers
        assert (batch["target"][2:] == 2).all()


def test_oversampling_centres_labelled_samples_only_and_unlabelled_crops_are_uniform():
    np.random.seed(0)
    # all labelled samples oversampled: each patch must contain the one foreground voxel
    loader = two_stream_loader(2, 2, 1.0)
    for _ in range(30):
        batch = loader.generate_train_batch()
        assert all((batch["target"][i] == 1).any() for i in range(2))
    # unlabelled crops cover the whole image, not only where labelled cases have foreground
    unlabelled = loader.second
    origins = {tuple(unlabelled.get_bbox(np.array((1, 12, 12)), False, None)[0]) for _ in range(200)}
    assert len(origins) > 20 and unlabelled.oversample_foreground_percent == 0 and not unlabelled.has_ignore


def test_a_labelled_stream_of_one_sample_still_oversamples_a_third_of_the_time():
    # nnU-Net's rule, round(B * (1 - 0.33)) samples first without oversampling, leaves none for B = 1
    np.random.seed(0)
    labelled = two_stream_loader(1, 2, 0.33).first
    assert np.mean([labelled.get_do_oversample(0) for _ in range(3000)]) == pytest.approx(0.33, abs=0.03)
    # streams where the rule oversamples some samples keep it: the last round(0.33 B)
    for size, expected in ((2, [False, True]), (6, [False] * 4 + [True] * 2)):
        stream = two_stream_loader(size, 2, 0.33).first
        assert [stream.get_do_oversample(i) for i in range(size)] == expected


def test_a_second_annotated_stream_keeps_oversampling_and_names_the_mask():
    """Mixed supervision: dense cases first, weakly labelled ones second, both centred on annotations."""
    np.random.seed(0)
    strong = nnUNetDataLoader(InMemoryCases([f"case_{i}" for i in range(3)], True), 1, (4, 4), (4, 4),
                              _LabelManager(), oversample_foreground_percent=1.0)
    weak = nnUNetDataLoader(InMemoryCases([f"case_{i}" for i in range(10, 16)], True), 2, (4, 4), (4, 4),
                            _LabelManager(), oversample_foreground_percent=1.0)
    loader = TwoStreamDataLoader(strong, weak, mask_name="strong", second_unannotated=False)
    assert weak.oversample_foreground_percent == 1.0 and weak.has_ignore
    for _ in range(20):
        batch = loader.generate_train_batch()
        assert batch["strong"].tolist() == [True, False, False] and "labelled" not in batch
        assert all((batch["target"][i] == 1).any() for i in range(3))  # every sample centred on its annotation


def test_ema_teacher_follows_the_explicit_average():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    teacher = EMATeacher(student, momentum=0.9)
    assert all(not p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.network.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()
    student(torch.randn(4, 1, 5, 5))  # moves the BatchNorm statistics
    teacher.update(student)
    student_state = student.state_dict()
    for name, _ in student.named_parameters():
        expected = 0.9 * before[name] + 0.1 * student_state[name]
        torch.testing.assert_close(teacher.network.state_dict()[name], expected)
    for name, _ in student.named_buffers():
        torch.testing.assert_close(teacher.network.state_dict()[name], student_state[name])
    x = torch.randn(2, 1, 5, 5, requires_grad=True)
    assert not teacher(x).requires_grad


class _MeanTeacher(TrainingNetwork):
    def __init__(self):
        super().__init__(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)))
        self.teacher = EMATeacher(self.inference_network, momentum=0.5)

    def training_forward(self, x):
        return self.inference_network(x), self.teacher(x)


def test_ema_teacher_is_checkpointed_with_the_training_state():
    torch.manual_seed(0)
    network = _MeanTeacher().train()
    with torch.no_grad():
        network.inference_network[0].weight.add_(1)
    network(torch.randn(3, 1, 4, 4))
    network.teacher.update(network.inference_network)
    state = network.training_state_dict()
    assert {"teacher.network.0.weight", "teacher.network.1.running_mean"} <= set(state)

    restored = _MeanTeacher()
    restored.inference_network.load_state_dict(network.inference_network.state_dict())
    restored.load_training_state_dict(state)
    for (name, got), (_, want) in zip(restored.teacher.state_dict().items(), network.teacher.state_dict().items()):
        assert torch.equal(got, want), name
    assert not torch.equal(restored.teacher.network[0].weight, _MeanTeacher().teacher.network[0].weight)


def test_one_optimizer_step_hook_is_one_ema_step_and_loaded_weights_reset_the_teacher():
    from nnunet_weak.training.pretrained_weights import load_pretrained_state
    torch.manual_seed(0)
    network = _MeanTeacher().train()
    before = {k: v.clone() for k, v in network.teacher.network.state_dict().items()}
    with torch.no_grad():
        network.inference_network[0].weight.add_(1)
    network.after_optimizer_step()
    torch.testing.assert_close(network.teacher.network[0].weight,
                               0.5 * before["0.weight"] + 0.5 * network.inference_network[0].weight)

    source = _MeanTeacher()
    with torch.no_grad():
        source.inference_network[0].weight.mul_(-3)
    checkpoint = {"network_weights": source.inference_network.state_dict(),
                  TRAINING_WEIGHTS_KEY: source.training_state_dict()}
    loaded = load_pretrained_state(network, checkpoint, "a test checkpoint")
    assert loaded == {"network": 7, "training_modules": ["teacher"]}
    for (name, student), teacher in zip(network.inference_network.state_dict().items(),
                                        network.teacher.network.state_dict().values()):
        assert torch.equal(student, source.inference_network.state_dict()[name]) and torch.equal(teacher, student)


def test_pretrained_weights_that_do_not_fit_are_refused_naming_the_key():
    from nnunet_weak.training.pretrained_weights import load_pretrained_state
    network = _MeanTeacher()
    weights = network.inference_network.state_dict()
    with pytest.raises(UserInputError, match="'0.weight' has shape \\(3, 1, 1, 1\\) there and \\(2, 1, 1, 1\\) here"):
        load_pretrained_state(network, {"network_weights": {**weights, "0.weight": torch.zeros(3, 1, 1, 1)}}, "x.pth")
    with pytest.raises(UserInputError, match="it has no '1.running_var'"):
        load_pretrained_state(network, {"network_weights": {k: v for k, v in weights.items() if k != "1.running_var"}},
                              "x.pth")
    with pytest.raises(UserInputError, match="not an nnU-Net checkpoint"):
        load_pretrained_state(network, {"state_dict": weights}, "x.pth")


class _TwoHeads(TrainingNetwork):
    def __init__(self):
        super().__init__(nn.Conv2d(1, 2, 1))
        self.second = nn.Conv2d(1, 2, 1)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def training_forward(self, x):
        return self.inference_network(x), self.second(x)


def test_training_network_is_its_inference_network_in_eval_and_splits_its_state():
    torch.manual_seed(0)
    network = _TwoHeads()
    x = torch.randn(2, 1, 4, 4)
    assert len(network.train()(x)) == 2
    torch.testing.assert_close(network.eval()(x), network.inference_network(x))
    training_state = network.training_state_dict()
    assert set(training_state) == {"second.weight", "second.bias", "steps"}

    restored = _TwoHeads()
    restored.inference_network.load_state_dict(network.inference_network.state_dict())
    restored.load_training_state_dict({k: v + 1 for k, v in training_state.items()})
    torch.testing.assert_close(restored.second.weight, network.second.weight + 1)
    torch.testing.assert_close(restored.inference_network.weight, network.inference_network.weight)
    with pytest.raises(RuntimeError, match="missing"):
        restored.load_training_state_dict({"second.weight": training_state["second.weight"]})


def test_sharpen_against_explicit_loops():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(2, 3, 4, 5, dtype=torch.float64), dim=1)
    expected = torch.empty_like(p)
    for b in range(2):
        for y in range(4):
            for x in range(5):
                powered = [float(p[b, c, y, x]) ** (1 / 0.1) for c in range(3)]
                for c in range(3):
                    expected[b, c, y, x] = powered[c] / sum(powered)
    torch.testing.assert_close(sharpen(p, 0.1), expected)
    torch.testing.assert_close(sharpen(p, 1.0), p)
    # a one-hot voxel stays one-hot, without NaN from log(0)
    one_hot = torch.zeros(1, 3, 1, 1, dtype=torch.float64)
    one_hot[0, 1] = 1
    torch.testing.assert_close(sharpen(one_hot), one_hot)


def test_sharpened_cross_consistency_against_explicit_loops_and_its_gradient():
    torch.manual_seed(0)
    first = torch.softmax(torch.randn(2, 3, 4, dtype=torch.float64), dim=1).requires_grad_()
    second = torch.softmax(torch.randn(2, 3, 4, dtype=torch.float64), dim=1).requires_grad_()
    p1, p2 = first.detach(), second.detach()
    s1, s2 = sharpen(p1), sharpen(p2)
    total = 0.0
    for b in range(2):
        for c in range(3):
            for i in range(4):
                total += (float(p1[b, c, i]) - float(s2[b, c, i])) ** 2 + (float(p2[b, c, i]) - float(s1[b, c, i])) ** 2
    loss = sharpened_cross_consistency_loss(first, second)
    assert loss.item() == pytest.approx(total / 24, rel=1e-12)
    loss.backward()
    # the sharpened side is a fixed pseudo-label: d/dp1 of mean((p1 - s2)^2) only
    torch.testing.assert_close(first.grad, 2 * (p1 - s2) / 24)
    torch.testing.assert_close(second.grad, 2 * (p2 - s1) / 24)
    with pytest.raises(ValueError, match="differ in shape"):
        sharpened_cross_consistency_loss(first, second[:1])


def test_compare_names_the_base_trainer_by_what_it_trains_on():
    from types import SimpleNamespace

    from nnunet_weak.compare import method_name
    from nnunet_weak.supervision import CaseSupervision, SupervisionManifest

    def dataset(*kinds):
        return SimpleNamespace(manifest=SupervisionManifest({f"c{i}": CaseSupervision(k) for i, k in enumerate(kinds)}))

    assert method_name("nnUNetWeakTrainer", dataset("dense", "unlabelled"), False) == "nnU-Net, labelled cases only"
    assert method_name("nnUNetWeakTrainer", dataset("sparse", "sparse"), False) == "nnU-Net + partial loss"
    assert method_name("nnUNetWeakTrainer", dataset("dense", "sparse", "unlabelled"), False) == "nnU-Net + partial loss"
    assert method_name("nnUNetWeakTrainer", dataset("dense"), True) == "nnU-Net dense (upper bound)"
    assert method_name("CAMLTrainer", dataset("dense", "unlabelled"), False) == "CAMLTrainer"
    assert method_name("nnUNetWeakTrainer_denseCasesOnly", dataset("dense", "sparse"), False) == \
        "nnU-Net, dense cases only"
