"""The EMA teacher shared by the methods that distil from a moving average of the student.

Mean teacher (Tarvainen and Valpola, NeurIPS 2017): after every optimiser step of the student,

    θ_teacher ← m · θ_teacher + (1 − m) · θ_student

for every parameter; buffers (normalisation statistics) are copied from the student. The teacher
receives no gradient. Keep it inside the method's :class:`~nnunet_weak.networks.training_network.TrainingNetwork`
so that it is checkpointed and resumed with the rest of the training state, updated exactly once after
every optimiser step (``TrainingNetwork.after_optimizer_step``, which the base trainer calls) and reset to
the student when pre-trained weights are loaded (``TrainingNetwork.after_weights_loaded``).
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMATeacher(nn.Module):
    """A frozen copy of ``student`` updated as the exponential moving average of its weights.

    Args:
        student: the network to follow; the teacher starts as an exact copy of it. It is referenced, not
            registered: its parameters stay its owner's, trained, checkpointed and synchronised once.
        momentum: ``m`` in ``[0, 1)``; 0.99 in mean teacher and ACTION.

    ``forward(x)`` runs the teacher without building a graph. Its train/eval mode follows its parent's.
    """

    def __init__(self, student: nn.Module, momentum: float = 0.99):
        super().__init__()
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.network = copy.deepcopy(student)
        self.network.requires_grad_(False)
        self.__dict__["student"] = student

    @torch.no_grad()
    def update(self, student: nn.Module | None = None) -> None:
        """One EMA step towards ``student`` (default: the one it was made from); call after the optimiser step."""
        student = self.student if student is None else student
        student_parameters = dict(student.named_parameters())
        teacher_parameters = dict(self.network.named_parameters())
        if student_parameters.keys() != teacher_parameters.keys():
            raise ValueError("The student's parameters are not those the teacher was copied from.")
        for name, teacher_parameter in teacher_parameters.items():
            teacher_parameter.mul_(self.momentum).add_(student_parameters[name].detach(), alpha=1 - self.momentum)
        student_buffers = dict(student.named_buffers())
        for name, teacher_buffer in self.network.named_buffers():
            teacher_buffer.copy_(student_buffers[name])

    @torch.no_grad()
    def reset(self) -> None:
        """Make the teacher an exact copy of its student again (after the student's weights were replaced)."""
        self.network.load_state_dict(self.student.state_dict())

    def forward(self, x):
        with torch.no_grad():
            return self.network(x)
