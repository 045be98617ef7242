"""``TaskType``: the kind of prediction a task asks for, and everything that depends on it.

One enum, used by every layer (manifest, tasks, samplers, losses, adaptation rules, metrics);
nothing else compares task types. What each type means:

========== =========================== =================== ============ ==============================
type       labels                      outputs (logits)    loss         AUROC / ACC (MedMNIST evaluator)
========== =========================== =================== ============ ==============================
binary     int64 in {0, 1}             1                   BCE          AUROC of the logit; ACC at 0
multi-class int64 class index          one per class       CE           mean one-vs-rest AUROC of the
                                                                        softmax; argmax ACC
ordinal    int64 grade                 one per grade       CE           as multi-class (MedMNIST and
                                                                        MedIMeta score it so)
multi-label float32 0/1, one per label one per label       BCE per label mean per-label AUROC; mean
                                                                        per-label ACC at 0
========== =========================== =================== ============ ==============================

Differences from ``medmnist.Evaluator`` (``getAUC``/``getACC``), which fail instead: a class or
label whose truth holds a single value has no defined AUC and is left out of the mean; with none
defined, AUROC is ``nan``. Multi-class AUCs are computed on the log-odds of the softmax
probabilities, which order samples as the probabilities do without the ties that probabilities
rounded to 1.0 would create. Non-finite logits raise ``ValueError``.
"""
from __future__ import annotations

from enum import Enum

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

ArrayLike = torch.Tensor | np.ndarray


class TaskType(str, Enum):
    """The prediction a task asks for; its value is the manifest's spelling."""

    BINARY = "binary"
    MULTI_CLASS = "multi-class"
    ORDINAL = "ordinal"
    MULTI_LABEL = "multi-label"

    def __str__(self) -> str:
        return self.value

    @property
    def multilabel(self) -> bool:
        """One independent yes/no per label (every label is an output, always)."""
        return self is TaskType.MULTI_LABEL

    @property
    def binary(self) -> bool:
        """Two classes scored with one logit; episodes are always K negatives + K positives."""
        return self is TaskType.BINARY

    @property
    def choose_classes(self) -> bool:
        """Whether an episode may use a subset of the classes (N-way): multi-class and ordinal."""
        return self in (TaskType.MULTI_CLASS, TaskType.ORDINAL)

    def num_outputs(self, n_classes: int) -> int:
        """Logits a head needs for ``n_classes`` classes (or labels): 1 for binary."""
        return 1 if self.binary else n_classes

    @property
    def label_dtype(self) -> torch.dtype:
        """Label tensors' dtype: float32 multi-hot for multi-label, int64 class indices otherwise."""
        return torch.float32 if self.multilabel else torch.int64

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss: BCE on one logit (binary), cross-entropy (multi-class, ordinal), BCE per label."""
        if self.binary:
            return F.binary_cross_entropy_with_logits(logits.reshape(-1), y.reshape(-1).to(logits.dtype))
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))
        return F.cross_entropy(logits, y)

    def logits_from_probabilities(self, p: torch.Tensor, clip: float = 1e-6) -> torch.Tensor:
        """Scores that ``evaluate`` reads as these probabilities (shares, votes), clipped to
        [clip, 1 - clip]: ``log p`` for multi-class and ordinal (the softmax gives ``p`` back when
        rows sum to one), ``log(p / (1 - p))`` for binary and multi-label (the sigmoid does)."""
        p = p.clamp(clip, 1 - clip)
        return torch.log(p) if self.choose_classes else torch.log(p) - torch.log1p(-p)

    def evaluate(self, y_true: ArrayLike, logits: ArrayLike) -> dict[str, float]:
        """``{"auroc": ..., "acc": ...}`` with the evaluator semantics of the module docstring."""
        y, z = self._check(y_true, logits)
        return {"auroc": self._auroc(y, z), "acc": self._accuracy(y, z)}

    def auroc(self, y_true: ArrayLike, logits: ArrayLike) -> float:
        """AUROC alone (see ``evaluate``)."""
        return self._auroc(*self._check(y_true, logits))

    def accuracy(self, y_true: ArrayLike, logits: ArrayLike) -> float:
        """Accuracy alone (see ``evaluate``)."""
        return self._accuracy(*self._check(y_true, logits))

    def _check(self, y_true: ArrayLike, logits: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Validate shapes and values; return (y_true, logits) in canonical shapes."""
        y, z = as_numpy(y_true), as_numpy(logits).astype(np.float64)
        if z.ndim == 0 or z.shape[0] == 0:
            raise ValueError("cannot evaluate an empty set of predictions")
        if not np.isfinite(z).all():
            raise ValueError("logits contain NaN or infinite values")
        n = z.shape[0]
        if self.binary:
            if not (z.ndim == 1 or (z.ndim == 2 and z.shape[1] == 1)):
                raise ValueError(f"binary logits must be (N,) or (N, 1) (one logit), got {z.shape}")
            z = z.reshape(-1)
            expected: tuple[int, ...] = (n,)
        elif self.multilabel:
            if z.ndim != 2:
                raise ValueError(f"multi-label logits must be (N, L), got {z.shape}")
            expected = z.shape
        else:
            if z.ndim != 2 or z.shape[1] < 2:
                raise ValueError(f"{self} logits must be (N, C) with C >= 2, got {z.shape}")
            expected = (n,)
        if not self.multilabel and y.ndim == 2 and y.shape[1] == 1:
            y = y.reshape(-1)
        if y.shape != expected:
            raise ValueError(f"{self} y_true must have shape {expected} for logits {z.shape}, got {y.shape}")
        if self.binary or self.multilabel:
            if not np.isin(y, (0, 1)).all():
                raise ValueError(f"{self} y_true must hold only 0 and 1")
        elif not (np.equal(np.mod(y, 1), 0).all() and (y >= 0).all() and (y < z.shape[1]).all()):
            raise ValueError(f"{self} y_true must hold class indices in [0, {z.shape[1]})")
        return y.astype(np.int64), z

    def _auroc(self, y: np.ndarray, z: np.ndarray) -> float:
        if self.binary:
            return _mean_defined_auc(y[:, None], z[:, None])
        if self.multilabel:
            return _mean_defined_auc(y, z)
        one_hot = (y[:, None] == np.arange(z.shape[1])[None, :]).astype(np.int64)
        return _mean_defined_auc(one_hot, _softmax_log_odds(z))

    def _accuracy(self, y: np.ndarray, z: np.ndarray) -> float:
        if self.binary or self.multilabel:
            # Every label has N samples, so the mean of per-label accuracies is the mean over entries.
            return float(np.mean((z > 0) == (y == 1)))
        return float(np.mean(z.argmax(axis=1) == y))


def as_numpy(x: ArrayLike) -> np.ndarray:
    """A tensor or array-like as a NumPy array (float tensors as float64)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return x.double().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x)


def _mean_defined_auc(y_cols: np.ndarray, score_cols: np.ndarray) -> float:
    """Mean ROC AUC over columns, skipping columns whose truth holds a single value."""
    aucs = [roc_auc_score(y_cols[:, j], score_cols[:, j])
            for j in range(y_cols.shape[1]) if np.unique(y_cols[:, j]).size == 2]
    return float(np.mean(aucs)) if aucs else float("nan")


def _softmax_log_odds(z: np.ndarray) -> np.ndarray:
    """log(p_k / (1 - p_k)) of the softmax probabilities, computed without rounding p_k to 1.

    Equals z_k - logsumexp(z_j for j != k); monotonic in p_k, so AUCs are those of p_k.
    """
    c = z.shape[1]
    others = np.where(np.eye(c, dtype=bool)[None, :, :], -np.inf, z[:, None, :])  # (N, k, j), j != k
    top = others.max(axis=2, keepdims=True)  # finite: C >= 2
    return z - (top + np.log(np.exp(others - top).sum(axis=2, keepdims=True)))[:, :, 0]
