"""Adaptation rules: k-NN, prototypes and the linear probe against hand computations and
scikit-learn on tiny cases; LP-FT and MAML's inner loop on every task type."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from medmeta.episodes import Episode
from medmeta.learning.finetune import WorkingCopy, fine_tune, frozen_features
from medmeta.methods import KNN, LPFT, FineTune, LinearProbe, MAMLInner, Prototypes
from medmeta.tasktype import TaskType


def identity_backbone(dims: int = 2) -> nn.Module:
    """Features = inputs: a Linear layer fixed to the identity (no BatchNorm to re-estimate)."""
    net = nn.Linear(dims, dims)
    with torch.no_grad():
        net.weight.copy_(torch.eye(dims))
        net.bias.zero_()
    net.out_features = dims
    return net


SUPPORT = torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0], [3.0, 1.0]])
QUERY = torch.tensor([[1.0, 0.0], [2.5, 0.5]])


def binary_episode() -> Episode:
    return Episode(SUPPORT, torch.tensor([0, 0, 1, 1]), QUERY, None, TaskType.BINARY, (0, 1))


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_knn_binary_is_the_distance_weighted_vote_share() -> None:
    scores = KNN(k=3).predict(identity_backbone(), binary_episode(), seed=0)
    # Query (1, 0): nearest are (0,0) d=1, (0,1) d=sqrt(2) (negatives), (3,0) d=2 (positive).
    w = [1 / 1, 1 / math.sqrt(2), 1 / 2]
    share = w[2] / sum(w)
    assert scores.shape == (2, 1)
    assert scores[0, 0].item() == pytest.approx(logit(share), rel=1e-5)
    # Query (2.5, 0.5): (3,0) and (3,1) at sqrt(0.5) (positives), then (0,0) and (0,1) tie at sqrt(6.5).
    assert scores[1, 0].item() > 0


def test_knn_multiclass_and_multilabel_hand_computed() -> None:
    support = torch.tensor([[0.0, 0.0], [0.0, 2.0], [4.0, 0.0]])
    query = torch.tensor([[0.0, 1.0]])
    mc = Episode(support, torch.tensor([0, 1, 2]), query, None, TaskType.MULTI_CLASS, (0, 1, 2))
    scores = KNN(k=2).predict(identity_backbone(), mc, seed=0)
    # Nearest two: (0,0) and (0,2), both at distance 1: half the vote each; class 2 gets none.
    np.testing.assert_allclose(torch.softmax(scores, 1).numpy(), [[0.5, 0.5, 0.0]], atol=1e-5)
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    ml = Episode(support, y, query, None, TaskType.MULTI_LABEL, (0, 1))
    scores = KNN(k=2).predict(identity_backbone(), ml, seed=0)
    # Label 0: both neighbours positive; label 1: one of two.
    np.testing.assert_allclose(torch.sigmoid(scores).numpy(), [[1 - 1e-6, 0.5]], atol=1e-5)
    cosine = KNN(k=1, metric="cosine").predict(identity_backbone(), mc, seed=0)
    assert cosine.argmax().item() == 1  # (0, 1) points the way of (0, 2)


def test_prototypes_hand_computed() -> None:
    scores = Prototypes().predict(identity_backbone(), binary_episode(), seed=0)
    # Means (0, .5) and (3, .5); query (1, 0): squared distances 1.25 and 4.25.
    assert scores[0, 0].item() == pytest.approx(1.25 - 4.25)
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    ml = Episode(support, y, torch.tensor([[1.0, 1.0]]), None, TaskType.MULTI_LABEL, (0, 1))
    scores = Prototypes().predict(identity_backbone(), ml, seed=0)
    # Label 0: positive mean (1, 0), negative (0, 4): d^2 = 1 and 10 -> 10 - 1 = 9.
    # Label 1: positive mean (1, 2), negative (0, 0): d^2 = 1 and 2 -> 2 - 1 = 1.
    np.testing.assert_allclose(scores.numpy(), [[9.0, 1.0]], atol=1e-5)
    mc = Episode(support, torch.tensor([0, 1, 2]), torch.tensor([[1.0, 1.0]]), None, TaskType.ORDINAL, (0, 1, 2))
    np.testing.assert_allclose(Prototypes().predict(identity_backbone(), mc, seed=0).numpy(), [[-2.0, -2.0, -10.0]])


@pytest.mark.parametrize("task_type", [TaskType.BINARY, TaskType.MULTI_CLASS])
def test_linear_probe_solves_scikit_learns_logistic_regression(task_type: TaskType) -> None:
    rng = np.random.default_rng(0)
    n_classes = 2 if task_type.binary else 3
    y = np.repeat(np.arange(n_classes), 6)
    x = rng.normal(size=(len(y), 4)) + y[:, None] * 0.8
    ep = Episode(torch.tensor(x, dtype=torch.float64), torch.tensor(y), torch.tensor(x[:5], dtype=torch.float64),
                 None, task_type, tuple(range(n_classes)))
    net = identity_backbone(4).double()
    scores = LinearProbe(c=0.5, max_iter=500).predict(net, ep, seed=0)
    reference = LogisticRegression(C=0.5, tol=1e-10, max_iter=10000).fit(x, y).decision_function(x[:5])
    if task_type.binary:
        np.testing.assert_allclose(scores[:, 0].numpy(), reference, atol=1e-4)
    else:  # multinomial logits are defined up to a constant per sample
        got = scores.numpy() - scores.numpy().mean(1, keepdims=True)
        np.testing.assert_allclose(got, reference - reference.mean(1, keepdims=True), atol=1e-4)


class SmallBN(nn.Module):
    out_features = 6

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def random_episode(task_type: TaskType, gen: torch.Generator, n: int = 3) -> Episode:
    classes = 2 if task_type.binary else n
    sy = torch.arange(classes).repeat(3)
    if task_type.multilabel:
        sy = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1]], dtype=torch.float32)
    return Episode(torch.rand(len(sy), 1, 8, 8, generator=gen), sy, torch.rand(5, 1, 8, 8, generator=gen), None,
                   task_type, (0, 1) if task_type.binary else tuple(range(n)))


@pytest.mark.parametrize("task_type", list(TaskType))
@pytest.mark.parametrize("rule", [FineTune(steps=3), LinearProbe(), KNN(), Prototypes(), LPFT(), MAMLInner(steps=3)],
                         ids=lambda r: r.name)
def test_every_rule_on_every_task_type_leaves_the_backbone_alone(task_type: TaskType, rule) -> None:
    torch.manual_seed(0)
    net = SmallBN()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ep = random_episode(task_type, torch.Generator().manual_seed(1))
    scores = rule.predict_many(net, [ep, ep], [5, 5])
    assert all(s.shape == (5, ep.num_outputs) and torch.isfinite(s).all() for s in scores)
    torch.testing.assert_close(scores[0], scores[1])  # deterministic, and independent of the previous episode
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_lpft_starts_fine_tuning_from_the_probe_head() -> None:
    torch.manual_seed(0)
    net = SmallBN()
    ep = random_episode(TaskType.MULTI_CLASS, torch.Generator().manual_seed(2))
    rule = LPFT(finetune=FineTune(steps=1, lr=1e-12))
    lpft = rule.predict(net, ep, seed=0)
    work = WorkingCopy(net)
    support, _ = frozen_features(work.reset(), ep)
    head = LinearProbe().head(support, ep.support_y, ep)
    assert head["weight"].abs().sum() > 0
    torch.testing.assert_close(lpft, fine_tune(work, ep, steps=1, lr=1e-12, seed=0, head=head))
    fresh = fine_tune(work, ep, steps=1, lr=1e-12, seed=0)
    assert not torch.allclose(lpft, fresh, atol=1e-3)
