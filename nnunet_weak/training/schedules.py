"""Loss-weight schedules shared by the method trainers.

One ramp-up for every method that delays a term until the network's predictions mean something
(``../shared/METHODS.md``, "Ramp-up"; Laine and Aila 2017, Tarvainen and Valpola 2017):

    w(t) = w_max · exp(-5 · (1 - clip(t / T, 0, 1))²)

It starts at ``exp(-5) ≈ 0.0067 · w_max`` and reaches ``w_max`` at ``t = T``. ``T = 0`` means no
ramp: ``w(t) = w_max`` from the first step.
"""
from __future__ import annotations

import math


def sigmoid_rampup(step: float, rampup_length: float) -> float:
    """The ramp-up factor ``exp(-5 · (1 - clip(step / rampup_length, 0, 1))²)`` in ``(0, 1]``.

    Args:
        step: where training is (epochs or iterations, in the same unit as ``rampup_length``), ``>= 0``.
        rampup_length: ``T``, where the factor reaches 1; ``0`` gives 1 everywhere.
    """
    if step < 0 or rampup_length < 0:
        raise ValueError(f"step and rampup_length must be >= 0, got {step} and {rampup_length}")
    if rampup_length == 0:
        return 1.0
    progress = min(step / rampup_length, 1.0)
    return math.exp(-5.0 * (1.0 - progress) ** 2)
