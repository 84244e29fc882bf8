"""Training budgets: how many epochs and iterations a project trainer runs.

nnU-Net's trainer constructor cannot take extra arguments, and the stock ``nnUNetv2_train`` passes
none, so the budget is chosen through the environment variable ``NNUNET_WEAK_BUDGET``: a name from
``NAMED_BUDGETS`` or ``<epochs>x<iterations>`` (e.g. ``40x50``). Unset means nnU-Net's own schedule.
Every reported number must name the budget it was measured under.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass

from nnunet_weak.errors import UserInputError

BUDGET_ENV = "NNUNET_WEAK_BUDGET"


@dataclass(frozen=True)
class Budget:
    """A training schedule.

    Attributes:
        name: how the budget was asked for (``demo``, ``40x50``, ...).
        num_epochs: epochs of training.
        iterations_per_epoch: training iterations per epoch.
        val_iterations_per_epoch: validation iterations per epoch (nnU-Net's pseudo-Dice).
    """

    name: str
    num_epochs: int
    iterations_per_epoch: int
    val_iterations_per_epoch: int

    @property
    def total_iterations(self) -> int:
        return self.num_epochs * self.iterations_per_epoch

    def describe(self) -> str:
        return (f"{self.name}: {self.num_epochs} epochs x {self.iterations_per_epoch} iterations "
                f"= {self.total_iterations} iterations")

    def to_json(self) -> dict:
        return asdict(self)


NAMED_BUDGETS = {
    # end-to-end tests: proves the pipeline runs, learns nothing
    "smoke": Budget("smoke", 2, 3, 1),
    # `nnunet-weak demo` on 2 CPU cores
    "demo": Budget("demo", 12, 25, 5),
    # the CPU budget of ../shared/NNUNET_NOTES.md that gives meaningful ACDC numbers
    "cpu": Budget("cpu", 40, 50, 10),
    # nnU-Net's own schedule (GPU)
    "nnunet": Budget("nnunet", 1000, 250, 50),
}
DEFAULT_BUDGET = "nnunet"
_CUSTOM = re.compile(r"^(\d+)x(\d+)$")


def parse_budget(text: str) -> Budget:
    """A budget from its name or from ``<epochs>x<iterations>``; clear error otherwise."""
    text = text.strip()
    if text in NAMED_BUDGETS:
        return NAMED_BUDGETS[text]
    m = _CUSTOM.match(text)
    if m and int(m.group(1)) > 0 and int(m.group(2)) > 0:
        epochs, iterations = int(m.group(1)), int(m.group(2))
        return Budget(text, epochs, iterations, max(1, iterations // 5))
    raise UserInputError(
        f"Unknown budget '{text}'. Use one of {', '.join(NAMED_BUDGETS)} or <epochs>x<iterations> "
        f"with positive numbers (e.g. 40x50)."
    )


def budget_from_environment() -> Budget:
    """The budget named by ``NNUNET_WEAK_BUDGET`` (nnU-Net's schedule when unset)."""
    return parse_budget(os.environ.get(BUDGET_ENV) or DEFAULT_BUDGET)
