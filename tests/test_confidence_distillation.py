"""ConfKD's KL and entropy terms against explicit loops, their gradients, and the collapse they guard against."""
import math

import pytest
import torch

from nnunet_weak.losses.confidence_distillation import prediction_entropy, teacher_student_kl


def softmax_at(logits, b, index):
    values = [logits[(b, k, *index)].item() for k in range(logits.shape[1])]
    total = sum(math.exp(v) for v in values)
    return [math.exp(v) / total for v in values]


def loop_reference(student, teacher, samples, term):
    values = []
    for b in range(student.shape[0]):
        if not samples[b]:
            continue
        for index in torch.cartesian_prod(*[torch.arange(s) for s in student.shape[2:]]).tolist():
            index = index if isinstance(index, list) else [index]
            p_s, p_t = softmax_at(student, b, index), softmax_at(teacher, b, index)
            if term == "kl":
                values.append(sum(t * (math.log(t) - math.log(s)) for t, s in zip(p_t, p_s)))
            else:
                values.append(-sum(s * math.log(s) for s in p_s))
    return sum(values) / len(values)


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 3, 2, 3, 4)])
def test_terms_against_loops(shape):
    torch.manual_seed(0)
    student, teacher = torch.randn(shape) * 2, torch.randn(shape) * 2
    samples = torch.tensor([True, False, True][: shape[0]])
    assert teacher_student_kl(student, teacher, samples).item() == pytest.approx(
        loop_reference(student, teacher, samples, "kl"), rel=1e-5)
    assert prediction_entropy(student, samples).item() == pytest.approx(
        loop_reference(student, teacher, samples, "entropy"), rel=1e-5)
    assert teacher_student_kl(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_gradients_and_the_detached_teacher():
    torch.manual_seed(1)
    student = torch.randn(2, 3, 4, 4, dtype=torch.double, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4, dtype=torch.double, requires_grad=True)
    samples = torch.tensor([True, False])
    assert torch.autograd.gradcheck(lambda s, t: teacher_student_kl(s, t, samples, detach_teacher=False),
                                    (student, teacher))
    assert torch.autograd.gradcheck(lambda s: prediction_entropy(s, samples), (student,))
    teacher_student_kl(student, teacher, samples).backward()
    assert teacher.grad is None and student.grad[1].abs().sum() == 0 and student.grad[0].abs().sum() > 0


def test_no_selected_sample_gives_zero_in_the_graph():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    none = torch.zeros(2, dtype=torch.bool)
    for value in (prediction_entropy(logits, none), teacher_student_kl(logits, logits.detach() + 1, none)):
        assert value.item() == 0.0
        value.backward()


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="differ in shape"):
        teacher_student_kl(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        prediction_entropy(torch.zeros(2, 2, 3, 3), torch.ones(3, dtype=torch.bool))


def test_entropy_alone_collapses_and_the_teacher_holds_it():
    """Minimising entropy alone drives every voxel to a one-hot prediction; with the KL term towards a
    teacher that is unsure on half of the voxels, the student stays unsure there (the paper's argument)."""
    torch.manual_seed(2)
    teacher = torch.zeros(1, 3, 8, 8)
    teacher[:, 0, :4] = 4.0  # confident class 0 on the top half, uniform on the bottom half

    def optimise(lambda_kl):
        logits = (torch.randn(1, 3, 8, 8) * 0.1).requires_grad_()
        optimiser = torch.optim.Adam([logits], lr=0.1)
        for _ in range(300):
            optimiser.zero_grad()
            loss = 0.1 * prediction_entropy(logits) + lambda_kl * teacher_student_kl(logits, teacher)
            loss.backward()
            optimiser.step()
        return torch.softmax(logits.detach(), dim=1).amax(dim=1)

    assert optimise(0.0).min() > 0.99  # one-hot everywhere
    held = optimise(1.0)
    assert held[0, :4].min() > 0.9 and held[0, 4:].max() < 0.6  # confident where the teacher is, not elsewhere
