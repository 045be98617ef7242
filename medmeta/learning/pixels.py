"""The classical baseline on flattened pixels: MedMNIST v1/v2's auto-sklearn row, replaced.

The papers ran auto-sklearn (an hour of model search with ensembling) on flattened pixels; it
does not install on current Python. This is the stand-in: a small, fixed model search with
scikit-learn, every candidate fitted on the training split and the one with the best
validation AUROC scored on the test split. Candidates (pixels scaled to [0, 1]):

* ``logreg-C0.01`` and ``logreg-C1``: standardised pixels, L2 logistic regression;
* ``hgb``: histogram gradient boosting (200 iterations, early stopping on 10% of the training data),
  left out (with a printed line, and named in the result) when it would not fit in the memory
  available (``hgb_bytes``: its histograms and copies of the data, large on wide inputs);
* ``forest``: a random forest of 200 trees.

Multi-label tasks fit one model per label (one-vs-rest). Scores are turned into logits for
``TaskType.evaluate``. The difference to auto-sklearn: four fixed candidates instead of a
Bayesian search over dozens of pipelines and an ensemble, so expect lower figures.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from sklearn.base import clone
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..data.tasks import MedMNISTTask
from ..tasktype import TaskType
from .runtime import available_memory


def candidates(seed: int) -> dict[str, Any]:
    """The fixed model search on flattened pixels (the stand-in for auto-sklearn), by name."""
    return {
        "logreg-C0.01": make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=300)),
        "logreg-C1": make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=300)),
        "hgb": HistGradientBoostingClassifier(max_iter=200, early_stopping=True, random_state=seed),
        "forest": RandomForestClassifier(n_estimators=200, n_jobs=-1, random_state=seed),
    }


def hgb_bytes(samples: int, features: int) -> int:
    """Peak memory of the gradient-boosting candidate fitted on ``samples`` x ``features``, from
    scikit-learn's layout and the candidate's own settings: per feature, a histogram of 256 bins x
    20 bytes for every node that can still be split (at most ``max_leaf_nodes``, each holding at
    least 2 x ``min_samples_leaf`` of the samples left after the early-stopping split), and copies
    of the data (float64, that split, the binned values: 17 bytes a sample); and 100 MB for the
    rest of a fit (gradients, sample partitions, what a first fit imports). A multi-class fit
    grows its trees one after another. Above every peak ``benchmarks/hgb_memory.py`` measures
    (docs/results/benchmarks/hgb_memory.txt); adrenal at 64³ (262,144 features) was killed for
    memory at 25.0 GB before this check."""
    hgb = candidates(0)["hgb"]
    nodes = min(hgb.max_leaf_nodes, samples * (1 - hgb.validation_fraction) / (2 * hgb.min_samples_leaf))
    return int(features * (nodes * (hgb.max_bins + 1) * 20 + 17 * samples) + 100e6)


def unfit_candidates(split_sizes: Mapping[str, int], features: int) -> dict[str, str]:
    """Candidates that would not fit in the memory available now, beside the float32 pixels of
    every split (``split_sizes``: images per split), each with the reason; none when the memory is
    unknown. Asked before any pixel is read, so that a search and its cache decide alike."""
    need, pixels = hgb_bytes(split_sizes["train"], features), 4 * sum(split_sizes.values()) * features
    free = available_memory()
    if free is None or need + pixels <= free:
        return {}
    return {"hgb": f"gradient boosting needs about {need / 1e9:.1f} GB for {split_sizes['train']:,} x {features:,} "
                   f"pixels beside the {pixels / 1e9:.1f} GB they take as float32, {free / 1e9:.1f} GB are available"}


def _pixels(ds: MedMNISTTask) -> np.ndarray:
    x = ds.raw_images(np.arange(len(ds))).reshape(len(ds), -1).astype(np.float32)
    x /= 255.0  # in place: one float32 copy of the split at a time
    return x


def _logits(model: Any, x: np.ndarray, task_type: TaskType) -> torch.Tensor:
    p = torch.from_numpy(np.asarray(model.predict_proba(x), dtype=np.float64))
    if task_type.binary:
        p = p[:, 1]
    return task_type.logits_from_probabilities(p)


def pixel_baseline(train: MedMNISTTask, val: MedMNISTTask, test: MedMNISTTask, seed: int = 0,
                   left_out: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Fit every candidate but those ``left_out`` (name: reason; None: those that would not fit in
    memory now, ``{}``: every one), keep the best on validation AUROC, score it on test."""
    task_type = train.task.task_type
    models = candidates(seed)
    if left_out is None:
        sizes = {"train": len(train), "val": len(val), "test": len(test)}
        left_out = unfit_candidates(sizes, train.raw_images([0]).size)
    unknown = sorted(set(left_out) - set(models))
    if unknown:
        raise ValueError(f"left_out names {unknown}, which are not pixel-search candidates; use some of {sorted(models)}")
    for name, why in left_out.items():
        print(f"{train.task.task_id}: pixel search without {name}: {why}")
        del models[name]
    xs = {name: _pixels(ds) for name, ds in (("train", train), ("val", val), ("test", test))}
    scores: dict[str, float] = {}
    fitted: dict[str, Any] = {}
    for name, model in models.items():
        model = OneVsRestClassifier(clone(model)) if task_type.multilabel else model
        model.fit(xs["train"], train.labels)
        fitted[name] = model
        scores[name] = task_type.evaluate(val.labels, _logits(model, xs["val"], task_type))["auroc"]
    best = max(scores, key=lambda n: scores[n])
    test_scores = task_type.evaluate(test.labels, _logits(fitted[best], xs["test"], task_type))
    return {"model": best, "val_auroc": scores[best], "val_auroc_by_model": scores, "left_out": dict(left_out),
            "test_auroc": test_scores["auroc"], "test_acc": test_scores["acc"]}
