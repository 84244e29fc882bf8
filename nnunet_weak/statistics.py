"""Paired statistics for comparing two methods on the same cases.

A comparison between trainers is a comparison of per-case scores on the same cases, so the test is
paired: for each case ``d_i = method_i - baseline_i``; the table reports the mean difference, a
bootstrap 95 % confidence interval of that mean (percentile method, ``scipy.stats.bootstrap``) and
the two-sided Wilcoxon signed-rank p-value (``scipy.stats.wilcoxon``). Cases where either score is
NaN (a class absent from prediction and label) are left out and counted.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class PairedDifference:
    """``method - baseline`` over paired cases.

    Attributes:
        mean: mean difference (``NaN`` without a usable case).
        ci_low, ci_high: bootstrap 95 % confidence interval of the mean (``NaN`` with fewer than 2 cases).
        p_value: two-sided Wilcoxon signed-rank p-value (1 when every difference is 0; ``NaN`` with fewer
            than 2 cases).
        cases: cases used; ``left_out``: cases with a NaN on either side.
    """

    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    cases: int
    left_out: int


def paired_difference(method: Sequence[float], baseline: Sequence[float], resamples: int = 10_000,
                      seed: int = 0) -> PairedDifference:
    """Mean of ``method - baseline`` with its bootstrap 95 % interval and the Wilcoxon signed-rank p-value.

    Args:
        method, baseline: scores of the same cases, in the same order.
        resamples: bootstrap resamples.
        seed: seed of the bootstrap, so that a table is reproducible.
    """
    method, baseline = np.asarray(method, dtype=float), np.asarray(baseline, dtype=float)
    if method.shape != baseline.shape or method.ndim != 1:
        raise ValueError(f"method and baseline must be 1D and paired, got shapes {method.shape} and {baseline.shape}")
    usable = ~(np.isnan(method) | np.isnan(baseline))
    differences = method[usable] - baseline[usable]
    left_out = int((~usable).sum())
    if differences.size == 0:
        return PairedDifference(float("nan"), float("nan"), float("nan"), float("nan"), 0, left_out)
    mean = float(differences.mean())
    if differences.size < 2:
        return PairedDifference(mean, float("nan"), float("nan"), float("nan"), 1, left_out)
    if np.all(differences == differences[0]):
        # no spread: the interval is the value itself, and a test of a zero median has nothing to rank
        return PairedDifference(mean, mean, mean, 1.0 if mean == 0 else float("nan"), int(differences.size), left_out)
    interval = stats.bootstrap((differences,), np.mean, confidence_level=0.95, n_resamples=resamples,
                               method="percentile", random_state=seed).confidence_interval
    with warnings.catch_warnings():
        # scipy warns when every difference is zero but one; the p-value it returns is still defined
        warnings.simplefilter("ignore", RuntimeWarning)
        p_value = float(stats.wilcoxon(differences).pvalue) if np.any(differences != 0) else 1.0
    return PairedDifference(mean, float(interval.low), float(interval.high), p_value, int(differences.size), left_out)
