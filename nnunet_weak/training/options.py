"""Hyper-parameters of a method trainer, set without leaving ``nnUNetv2_train``.

nnU-Net's trainers take no extra constructor arguments, so options come from the environment, like
the budget: ``NNUNET_WEAK_TRAINER_OPTIONS="lambda_crf=0.2,lambda_attentive=0.05"``. A trainer lists
the names it accepts, with their defaults, in its class attribute ``tunable_options``; only those are
accepted, so that a typo is an error rather than a silently ignored setting. Options that change the
network (which ``nnUNetv2_predict`` rebuilds from the trainer's name alone) are not tunable this way:
they are class attributes, changed by a subclass (a trainer variant), as in nnU-Net.
"""
from __future__ import annotations

import math
import os

from nnunet_weak.errors import UserInputError

OPTIONS_ENV = "NNUNET_WEAK_TRAINER_OPTIONS"


def parse_trainer_options(text: str, defaults: dict[str, float], trainer_name: str) -> dict[str, float]:
    """``defaults`` updated from ``name=value`` pairs separated by commas; clear error otherwise."""
    options = dict(defaults)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, separator, value = item.partition("=")
        name = name.strip()
        if not separator or name not in defaults:
            known = ", ".join(f"{k}={v}" for k, v in defaults.items()) or "none"
            raise UserInputError(f"{OPTIONS_ENV}: '{item}' is not an option of {trainer_name}. Its options "
                                 f"(with defaults) are: {known}. Write them as name=value,name=value.")
        try:
            number = float(value)
        except ValueError:
            raise UserInputError(f"{OPTIONS_ENV}: {name} must be a number, got '{value.strip()}'.") from None
        if not math.isfinite(number) or number < 0:
            raise UserInputError(f"{OPTIONS_ENV}: {name} must be a finite number >= 0, got {value.strip()}.")
        options[name] = number
    return options


def trainer_options_from_environment(defaults: dict[str, float], trainer_name: str) -> dict[str, float]:
    """The trainer's options: its defaults, overridden by ``NNUNET_WEAK_TRAINER_OPTIONS``."""
    return parse_trainer_options(os.environ.get(OPTIONS_ENV, ""), defaults, trainer_name)
