"""AUROC and accuracy with the official MedMNIST evaluator's semantics, per task type.

Inputs are model logits and true labels (torch tensors or numpy arrays):

* binary: logits (N,) or (N, 1), one logit per sample; y_true (N,) in {0, 1}.
  AUROC on the positive-class score; ACC at sigmoid 0.5 (logit > 0).
* multi-class and ordinal: logits (N, C); y_true (N,) class indices.
  AUROC = unweighted mean over classes of one-vs-rest AUCs of the softmax scores;
  ACC = argmax accuracy. (Ordinal is scored as multi-class, as MedMNIST does.)
* multi-label: logits (N, L); y_true (N, L) in {0, 1}.
  AUROC = mean of per-label AUCs; ACC = mean per-label accuracy at sigmoid 0.5.

Differences from ``medmnist.Evaluator`` (``getAUC``/``getACC``), which fail instead:
a class or label whose y_true column holds a single value has no defined AUC, so it is
left out of the mean; if no class/label has one, AUROC is ``nan``. AUCs are computed on
logits (binary, multi-label) and on the log-odds of the softmax probabilities
(multi-class): monotonic in the probabilities, so the value is the same, without the
ties that probabilities rounded to 1.0 in floating point would create. Non-finite logits raise ``ValueError``.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from .manifest import TASK_TYPES

ArrayLike = torch.Tensor | np.ndarray


def _numpy(x: ArrayLike | Iterable[float]) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return x.double().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x)


def _check(task_type: str, y_true: ArrayLike, logits: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes and values; return (y_true, logits) in the canonical shapes above."""
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
    y, z = _numpy(y_true), _numpy(logits).astype(np.float64)
    if z.ndim == 0 or z.shape[0] == 0:
        raise ValueError("cannot evaluate an empty set of predictions")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or infinite values")
    n = z.shape[0]
    if task_type == "binary":
        if not (z.ndim == 1 or (z.ndim == 2 and z.shape[1] == 1)):
            raise ValueError(f"binary logits must be (N,) or (N, 1) (one logit), got {z.shape}")
        z = z.reshape(-1)
        y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
        expected = (n,)
    elif task_type == "multi-label":
        if z.ndim != 2:
            raise ValueError(f"multi-label logits must be (N, L), got {z.shape}")
        expected = z.shape
    else:
        if z.ndim != 2 or z.shape[1] < 2:
            raise ValueError(f"{task_type} logits must be (N, C) with C >= 2, got {z.shape}")
        y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
        expected = (n,)
    if y.shape != expected:
        raise ValueError(f"{task_type} y_true must have shape {expected} for logits {z.shape}, got {y.shape}")
    if task_type in ("binary", "multi-label"):
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"{task_type} y_true must hold only 0 and 1")
    elif not (np.equal(np.mod(y, 1), 0).all() and (y >= 0).all() and (y < z.shape[1]).all()):
        raise ValueError(f"{task_type} y_true must hold class indices in [0, {z.shape[1]})")
    return y.astype(np.int64), z


def _mean_defined_auc(y_cols: np.ndarray, score_cols: np.ndarray) -> float:
    """Mean ROC AUC over columns, skipping columns whose truth holds a single value."""
    aucs = [roc_auc_score(y_cols[:, j], score_cols[:, j])
            for j in range(y_cols.shape[1]) if np.unique(y_cols[:, j]).size == 2]
    return float(np.mean(aucs)) if aucs else float("nan")


def auroc(task_type: str, y_true: ArrayLike, logits: ArrayLike) -> float:
    """Area under the ROC curve with MedMNIST semantics (see module docstring); nan if undefined."""
    return _auroc(task_type, *_check(task_type, y_true, logits))


def accuracy(task_type: str, y_true: ArrayLike, logits: ArrayLike) -> float:
    """Accuracy with MedMNIST semantics: threshold sigmoid 0.5 (binary, per label) or argmax."""
    return _accuracy(task_type, *_check(task_type, y_true, logits))


def evaluate(task_type: str, y_true: ArrayLike, logits: ArrayLike) -> dict[str, float]:
    """Both metrics: ``{"auroc": ..., "acc": ...}``."""
    y, z = _check(task_type, y_true, logits)
    return {"auroc": _auroc(task_type, y, z), "acc": _accuracy(task_type, y, z)}


def _auroc(task_type: str, y: np.ndarray, z: np.ndarray) -> float:
    if task_type == "binary":
        return _mean_defined_auc(y[:, None], z[:, None])
    if task_type == "multi-label":
        return _mean_defined_auc(y, z)
    c = z.shape[1]
    one_hot = (y[:, None] == np.arange(c)[None, :]).astype(np.int64)
    return _mean_defined_auc(one_hot, _softmax_log_odds(z))


def _softmax_log_odds(z: np.ndarray) -> np.ndarray:
    """log(p_k / (1 - p_k)) of the softmax probabilities, computed without rounding p_k to 1.

    Equals z_k - logsumexp(z_j for j != k); monotonic in p_k, so AUCs are those of p_k.
    """
    c = z.shape[1]
    others = np.where(np.eye(c, dtype=bool)[None, :, :], -np.inf, z[:, None, :])  # (N, k, j), j != k
    top = others.max(axis=2, keepdims=True)  # finite: C >= 2
    return z - (top + np.log(np.exp(others - top).sum(axis=2, keepdims=True)))[:, :, 0]


def _accuracy(task_type: str, y: np.ndarray, z: np.ndarray) -> float:
    if task_type in ("binary", "multi-label"):
        # For multi-label every label has N samples, so the mean of per-label accuracies
        # equals the mean over all (sample, label) entries.
        return float(np.mean((z > 0) == (y == 1)))
    return float(np.mean(z.argmax(axis=1) == y))


def mean_ci(values: ArrayLike | Iterable[float]) -> tuple[float, float]:
    """Mean and 95% half-width 1.96 x SEM (SEM = sample std (ddof=1) / sqrt(n)).

    NaNs (e.g. episodes with an undefined AUROC) are ignored. One value gives a half-width
    of 0.0; no values give (nan, nan).
    """
    v = _numpy(values).astype(np.float64).reshape(-1)
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
    a = _numpy(values).astype(np.float64).reshape(-1)
    b = _numpy(reference).astype(np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired difference needs values per episode for both methods, got {a.size} and {b.size}")
    both = ~(np.isnan(a) | np.isnan(b))
    mean, ci = mean_ci(a[both] - b[both])
    return {"mean": mean, "ci95": ci, "episodes": int(both.sum()),
            "identical": bool(both.any() and np.array_equal(a[both], b[both]))}
