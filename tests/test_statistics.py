"""MedMNIST+'s statistics (issue 27): Friedman with Kendall's W, Wilcoxon with Z, r and Bonferroni,
against values computed by hand (ties and the small-n exact case included)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from medmeta.evaluation.statistics import (effect_size, factor_matrix, factor_tests, format_tests, friedman, posthoc,
                                           wilcoxon)


def test_friedman_without_ties_by_hand() -> None:
    # Rank sums 5, 8, 11 over n = 4 blocks, k = 3: chi2 = 12 / (n k (k + 1)) * sum(R^2) - 3 n (k + 1) = 4.5
    result = friedman([[1, 2, 3], [1, 3, 2], [1, 2, 3], [2, 1, 3]])
    assert result["chi2"] == pytest.approx(4.5) and result["dof"] == 2
    assert result["p"] == pytest.approx(math.exp(-4.5 / 2))  # chi-square with 2 dof
    assert result["kendall_w"] == pytest.approx(4.5 / (4 * 2))


def test_friedman_with_ties_by_hand() -> None:
    # A tie in the first block: ranks 1.5, 1.5, 3. Uncorrected 3.875, divided by 1 - 6 / (4 * 3 * 8).
    result = friedman([[1, 1, 2], [1, 3, 2], [1, 2, 3], [2, 1, 3]])
    assert result["chi2"] == pytest.approx(3.875 / (1 - 6 / 96))
    with pytest.raises(ValueError, match="at least 3 treatments"):
        friedman([[1, 2], [2, 1]])


def test_wilcoxon_small_n_is_exact() -> None:
    result = wilcoxon([1, 2, 3, 4, 5], [0, 0, 0, 0, 0])
    assert result["method"] == "exact" and result["statistic"] == 0
    assert result["p"] == pytest.approx(2 / 2 ** 5)  # every sign positive: 1 of 32 sign patterns each way
    assert result["z"] == pytest.approx(-7.5 / math.sqrt(5 * 6 * 11 / 24))  # (W - n(n+1)/4) / sd
    assert result["r"] == pytest.approx(abs(result["z"]) / math.sqrt(5)) and result["effect"] == "large"


def test_wilcoxon_with_ties_uses_the_corrected_normal_approximation() -> None:
    # |d| = 1, 1, 2, 3: ranks 1.5, 1.5, 3, 4; W- = 4, W+ = 6; variance 4*5*9/24 - (2^3 - 2)/48 = 7.375
    result = wilcoxon([1, 1, 2, -3], [0, 0, 0, 0])
    z = (4 - 5) / math.sqrt(7.375)
    assert result["method"] == "normal approximation" and result["statistic"] == 4
    assert result["z"] == pytest.approx(z) and result["p"] == pytest.approx(math.erfc(abs(z) / math.sqrt(2)))
    assert wilcoxon([1, 2], [1, 2])["p"] == 1.0  # no difference at all


def test_posthoc_is_bonferroni_corrected_and_factors_average_the_others() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(12, 1))
    matrix = np.hstack([base, base + 1 + rng.normal(0, 0.1, (12, 1)), base + rng.normal(0, 0.1, (12, 1))])
    pairs = posthoc(matrix, ["a", "b", "c"])
    assert [(p["a"], p["b"]) for p in pairs] == [("a", "b"), ("a", "c"), ("b", "c")]
    for p in pairs:
        assert p["p_bonferroni"] == pytest.approx(min(1.0, 3 * p["p"])) and p["alpha"] == pytest.approx(0.05 / 3)
    assert pairs[0]["significant"] and not pairs[1]["significant"] and pairs[0]["mean_difference"] < 0
    rows = [{"dataset": d, "size": size, "arch": arch, "acc": acc}
            for d, offset in (("breast", 0.0), ("retina", 0.1))
            for size, arch, acc in ((28, "a", 0.5), (28, "b", 0.7), (64, "a", 0.6), (64, "b", 0.9))
            for acc in [acc + offset]]
    blocks, levels, m = factor_matrix(rows, "size", "acc")
    assert blocks == ["breast", "retina"] and levels == [28, 64]
    np.testing.assert_allclose(m, [[0.6, 0.75], [0.7, 0.85]])  # each dataset's mean over the archs
    tests = factor_tests(rows, ["size", "arch"], "acc")
    assert [t["factor"] for t in tests] == ["size", "arch"] and "friedman" not in tests[0]  # two levels: pairs only
    assert "| size | acc | 28 vs 64 |" in format_tests(tests)
    assert effect_size(0.05) == "negligible" and effect_size(0.3) == "medium"
