"""The tests MedMNIST+ reports (reference section 5), for its grid and for the few-shot protocol.

* ``friedman(matrix)``: Friedman's test over k treatments (columns) in n blocks (rows), with
  scipy's correction for ties, and Kendall's W = chi2 / (n (k - 1)), the agreement of the blocks'
  rankings (0: none, 1: every block ranks the treatments alike).
* ``wilcoxon(a, b)``: Wilcoxon's signed-rank test of paired values. The p-value is exact for at
  most 50 pairs without ties or zero differences, else the normal approximation (tie-corrected);
  Z is always the normal approximation (tie-corrected, no continuity correction), as MedMNIST+
  reports it, and the effect size is r = |Z| / sqrt(n) over the n pairs, read with Cohen's
  thresholds (``effect_size``).
* ``posthoc(matrix, levels)``: every pair of columns by ``wilcoxon``, with Bonferroni's
  correction (each p multiplied by the number of pairs, capped at 1; significant below alpha).

In the grid, a factor (image size, training scheme or architecture) is tested with datasets as
blocks, each dataset's value for a level being its metric averaged over the other factors'
levels (``factor_matrix``).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

COHEN = ((0.5, "large"), (0.3, "medium"), (0.1, "small"))


def effect_size(r: float) -> str:
    """Cohen's reading of a correlation-like effect size: large >= 0.5, medium >= 0.3, small >= 0.1."""
    return next((label for bound, label in COHEN if abs(r) >= bound), "negligible")


def friedman(matrix: Sequence[Sequence[float]]) -> dict[str, float]:
    """Friedman's chi-square over the columns of ``matrix`` (blocks x treatments, k >= 3), its
    p-value (dof k - 1) and Kendall's W."""
    m = np.asarray(matrix, dtype=float)
    n, k = m.shape
    if k < 3 or n < 2:
        raise ValueError(f"Friedman's test needs at least 3 treatments in 2 blocks, got {k} in {n}")
    chi2, p = stats.friedmanchisquare(*m.T)
    return {"chi2": float(chi2), "dof": k - 1, "p": float(p), "kendall_w": float(chi2 / (n * (k - 1))),
            "blocks": n, "treatments": k}


def wilcoxon(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Wilcoxon's signed-rank test of ``a - b`` (see the module docstring); n counts the pairs."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n = len(x)
    d = x - y
    if n == 0 or not np.any(d):
        return {"statistic": 0.0, "p": 1.0, "z": 0.0, "r": 0.0, "effect": "negligible", "n": n, "method": "none"}
    approx = stats.wilcoxon(x, y, method="approx")
    exact = _exact_applies(d)
    p = float(stats.wilcoxon(x, y, method="exact").pvalue if exact else approx.pvalue)
    z = float(approx.zstatistic)
    r = abs(z) / math.sqrt(n)
    return {"statistic": float(approx.statistic), "p": p, "z": z, "r": r, "effect": effect_size(r), "n": n,
            "method": "exact" if exact else "normal approximation"}


def _exact_applies(d: np.ndarray) -> bool:
    """The exact distribution for at most 50 differences without zeros or ties; else the normal
    approximation (with the tie correction), so that every p-value here can be checked by hand."""
    return len(d) <= 50 and np.all(d != 0) and len(np.unique(np.abs(d))) == len(d)


def posthoc(matrix: Sequence[Sequence[float]], levels: Sequence[Any], alpha: float = 0.05) -> list[dict[str, Any]]:
    """Every pair of columns by Wilcoxon's test, Bonferroni-corrected over the pairs."""
    m = np.asarray(matrix, dtype=float)
    pairs = list(itertools.combinations(range(m.shape[1]), 2))
    out = []
    for i, j in pairs:
        w = wilcoxon(m[:, i], m[:, j])
        p_adjusted = min(1.0, w["p"] * len(pairs))
        out.append({"a": levels[i], "b": levels[j], "mean_difference": float(np.mean(m[:, i] - m[:, j])), **w,
                    "p_bonferroni": p_adjusted, "alpha": alpha / len(pairs), "significant": p_adjusted < alpha})
    return out


def factor_matrix(rows: Sequence[Mapping[str, Any]], factor: str, metric: str, block: str = "dataset"
                  ) -> tuple[list[Any], list[Any], np.ndarray]:
    """(blocks, levels, matrix): per block (dataset) and level of ``factor``, ``metric`` averaged
    over the rows of that block and level (the other factors' levels). Blocks that lack a level
    are left out, so every row of the matrix is complete."""
    levels = sorted({r[factor] for r in rows}, key=_order)
    values: dict[tuple[Any, Any], list[float]] = {}
    for r in rows:
        values.setdefault((r[block], r[factor]), []).append(float(r[metric]))
    blocks = sorted({r[block] for r in rows if all((r[block], level) in values for level in levels)}, key=str)
    matrix = np.array([[np.mean(values[b, level]) for level in levels] for b in blocks]).reshape(len(blocks),
                                                                                                  len(levels))
    return blocks, levels, matrix


def _order(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))


def factor_tests(rows: Sequence[Mapping[str, Any]], factors: Sequence[str], metric: str,
                 alpha: float = 0.05) -> list[dict[str, Any]]:
    """For each factor with two or more levels: Friedman's test (three or more levels) and the
    Bonferroni-corrected Wilcoxon pairs, datasets as blocks."""
    out = []
    for factor in factors:
        blocks, levels, matrix = factor_matrix(rows, factor, metric)
        if len(levels) < 2 or len(blocks) < 2:
            continue
        test: dict[str, Any] = {"factor": factor, "metric": metric, "levels": levels, "blocks": blocks,
                                "means": [float(v) for v in matrix.mean(axis=0)]}
        if len(levels) >= 3:
            test["friedman"] = friedman(matrix)
        test["pairs"] = posthoc(matrix, levels, alpha)
        out.append(test)
    return out


def format_tests(tests: Sequence[Mapping[str, Any]]) -> str:
    """The factor tests as markdown: Friedman per factor, then the post-hoc pairs."""
    lines = ["| factor | metric | levels (mean) | blocks | Friedman chi2 (dof) | p | Kendall's W |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for t in tests:
        levels = ", ".join(f"{level} ({mean:.3f})" for level, mean in zip(t["levels"], t["means"]))
        f = t.get("friedman")
        cells = (f"{f['chi2']:.2f} ({f['dof']}) | {f['p']:.3g} | {f['kendall_w']:.2f}" if f else "- | - | -")
        lines.append(f"| {t['factor']} | {t['metric']} | {levels} | {len(t['blocks'])} | {cells} |")
    lines += ["", "| factor | metric | pair | mean Δ | Wilcoxon W | Z | p | p (Bonferroni) | r (effect) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t in tests:
        for p in t["pairs"]:
            mark = " *" if p["significant"] else ""
            lines.append(f"| {t['factor']} | {t['metric']} | {p['a']} vs {p['b']} | {p['mean_difference']:+.3f} "
                         f"| {p['statistic']:.1f} | {p['z']:.2f} | {p['p']:.3g} | {p['p_bonferroni']:.3g}{mark} "
                         f"| {p['r']:.2f} ({p['effect']}) |")
    return "\n".join(lines)
