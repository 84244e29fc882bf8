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


def test_rows_are_paired_against_the_chosen_baseline():
    """Each sparse row minus the baseline's scores, case by case: the partial loss by default, any row on request."""
    from types import SimpleNamespace

    from nnunet_weak.compare import Run, RunScores, paired_against_baseline

    labels = {"A": 1}
    sparse, dense = SimpleNamespace(name="Dataset951_Sparse"), SimpleNamespace(name="Dataset950_Dense")

    def scores(trainer, dice, dataset=sparse, pretraining=""):
        cases = {f"case{i}": {"A": {"Dice": d, "HD95": 10 * d}} for i, d in enumerate(dice)}
        test = {"metric_per_case": [{"case": c, "metrics": m} for c, m in cases.items()]}
        return RunScores(Run(trainer, trainer, dataset, pretraining=pretraining), {0: cases}, {0: test})

    partial = scores("nnUNetWeakTrainer", [0.5, 0.6, 0.7])
    full = scores("ScribbleAttentionTrainer", [0.8, 0.8, 0.9])
    ablation = scores("ScribbleAttentionTrainer_noCRF", [0.7, 0.8, 0.6])
    upper = scores("nnUNetWeakTrainer", [0.9, 0.9, 0.9], dataset=dense)
    results = [upper, partial, full, ablation]

    def mean_differences(rows):
        return {(r["method"], r["baseline"]): r["mean difference"] for r in rows
                if r["split"] == "validation" and r["score"] == "Dice A"}

    default = mean_differences(paired_against_baseline(results, labels, sparse.name))
    assert default == pytest.approx({("ScribbleAttentionTrainer", "nnUNetWeakTrainer"): 0.7 / 3,
                                     ("ScribbleAttentionTrainer_noCRF", "nnUNetWeakTrainer"): 0.3 / 3})
    against_full = mean_differences(paired_against_baseline(results, labels, sparse.name,
                                                            ("", "ScribbleAttentionTrainer")))
    assert against_full == pytest.approx({("nnUNetWeakTrainer", "ScribbleAttentionTrainer"): -0.7 / 3,
                                          ("ScribbleAttentionTrainer_noCRF", "ScribbleAttentionTrainer"): -0.4 / 3})
    # a chain is its own row: the fine-tuned trainer alone is not the pre-trained one
    assert paired_against_baseline(results, labels, sparse.name, ("KAFPretrainTrainer", "ScribbleAttentionTrainer")) == []
