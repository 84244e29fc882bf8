"""Paired statistics against exact values worked out by hand."""
import itertools
import math

import numpy as np
import pytest

from nnunet_weak.statistics import paired_difference


def exact_wilcoxon_two_sided(differences):
    """Exact two-sided signed-rank p-value by enumerating every sign pattern (no zeros, no ties)."""
    ranks = np.argsort(np.argsort(np.abs(differences))) + 1
    observed = ranks[differences > 0].sum()
    total = ranks.sum()
    statistics = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(ranks))]
    extreme = min(observed, total - observed)
    return min(1.0, 2 * sum(s <= extreme for s in statistics) / len(statistics))


def test_differences_mean_interval_and_exact_p_value():
    rng = np.random.default_rng(1)
    baseline = rng.random(9)
    differences = np.array([0.31, -0.05, 0.12, 0.4, 0.22, -0.11, 0.18, 0.27, 0.09])
    result = paired_difference(baseline + differences, baseline)
    assert result.mean == pytest.approx(differences.mean())
    assert result.ci_low < result.mean < result.ci_high
    assert differences.min() < result.ci_low and result.ci_high < differences.max()
    assert result.p_value == pytest.approx(exact_wilcoxon_two_sided(differences))
    assert (result.cases, result.left_out) == (9, 0)


def test_nan_cases_are_left_out_and_counted():
    result = paired_difference([0.5, math.nan, 0.7, 0.9], [0.4, 0.2, math.nan, 0.6])
    assert (result.cases, result.left_out) == (2, 2)
    assert result.mean == pytest.approx((0.1 + 0.3) / 2)


def test_degenerate_inputs():
    same = paired_difference([0.3, 0.4, 0.5], [0.3, 0.4, 0.5])
    assert (same.mean, same.ci_low, same.ci_high, same.p_value) == (0, 0, 0, 1.0)
    one = paired_difference([0.9], [0.5])
    assert one.mean == pytest.approx(0.4) and math.isnan(one.p_value) and math.isnan(one.ci_low)
    assert math.isnan(paired_difference([math.nan], [0.2]).mean)
    with pytest.raises(ValueError, match="paired"):
        paired_difference([0.1, 0.2], [0.1])
