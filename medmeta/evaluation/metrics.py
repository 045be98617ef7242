"""Summary statistics over episodes: mean with a 95% interval, and paired differences.

Per-episode AUROC and accuracy come from ``TaskType.evaluate`` (MedMNIST evaluator semantics).
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from ..tasktype import ArrayLike, as_numpy


def mean_ci(values: ArrayLike | Iterable[float]) -> tuple[float, float]:
    """Mean and 95% half-width 1.96 x SEM (SEM = sample std (ddof=1) / sqrt(n)).

    NaNs (e.g. episodes with an undefined AUROC) are ignored. One value gives a half-width
    of 0.0; no values give (nan, nan).
    """
    v = as_numpy(values).astype(np.float64).reshape(-1)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), 0.0
    return float(v.mean()), float(1.96 * v.std(ddof=1) / math.sqrt(v.size))


def paired_difference(values: ArrayLike | Iterable[float], reference: ArrayLike | Iterable[float]
                      ) -> dict[str, float | int | bool]:
    """Mean per-episode difference ``values - reference`` with its 95% half-width (1.96 x SEM).

    Both methods adapt on the same episodes, so the difference is paired: its interval is far
    tighter than the two methods' own intervals suggest. Episodes where either value is NaN
    are left out (``episodes`` counts the pairs used). ``identical`` is true when every pair is
    exactly equal: the two methods computed the same thing (e.g. weights that were never used),
    which a difference of 0 +- small alone would not reveal.
    """
    a = as_numpy(values).astype(np.float64).reshape(-1)
    b = as_numpy(reference).astype(np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired difference needs values per episode for both methods, got {a.size} and {b.size}")
    both = ~(np.isnan(a) | np.isnan(b))
    mean, ci = mean_ci(a[both] - b[both])
    return {"mean": mean, "ci95": ci, "episodes": int(both.sum()),
            "identical": bool(both.any() and np.array_equal(a[both], b[both]))}
