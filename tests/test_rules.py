"""Adaptation rules: k-NN, prototypes and the linear probe against hand computations and
scikit-learn on tiny cases; LP-FT and MAML's inner loop on every task type."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import nn

from medmeta.episodes import Episode
from medmeta.learning.finetune import WorkingCopy, fine_tune, frozen_features
from medmeta.methods import KNN, LPFT, FineTune, LinearProbe, MAMLInner, Prototypes
from medmeta.methods.rules import distances
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
    scores = KNN(bn="support", k=3).predict(identity_backbone(), binary_episode(), seed=0)
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
    scores = KNN(bn="support", k=2).predict(identity_backbone(), mc, seed=0)
    # Nearest two: (0,0) and (0,2), both at distance 1: half the vote each; class 2 gets none.
    np.testing.assert_allclose(torch.softmax(scores, 1).numpy(), [[0.5, 0.5, 0.0]], atol=1e-5)
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    ml = Episode(support, y, query, None, TaskType.MULTI_LABEL, (0, 1))
    scores = KNN(bn="support", k=2).predict(identity_backbone(), ml, seed=0)
    # Label 0: both neighbours positive; label 1: one of two.
    np.testing.assert_allclose(torch.sigmoid(scores).numpy(), [[1 - 1e-6, 0.5]], atol=1e-5)
    cosine = KNN(bn="support", k=1, metric="cosine").predict(identity_backbone(), mc, seed=0)
    assert cosine.argmax().item() == 1  # (0, 1) points the way of (0, 2)


def test_prototypes_hand_computed() -> None:
    scores = Prototypes(bn="support").predict(identity_backbone(), binary_episode(), seed=0)
    # Means (0, .5) and (3, .5); query (1, 0): squared distances 1.25 and 4.25.
    assert scores[0, 0].item() == pytest.approx(1.25 - 4.25)
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    ml = Episode(support, y, torch.tensor([[1.0, 1.0]]), None, TaskType.MULTI_LABEL, (0, 1))
    scores = Prototypes(bn="support").predict(identity_backbone(), ml, seed=0)
    # Label 0: positive mean (1, 0), negative (0, 4): d^2 = 1 and 10 -> 10 - 1 = 9.
    # Label 1: positive mean (1, 2), negative (0, 0): d^2 = 1 and 2 -> 2 - 1 = 1.
    np.testing.assert_allclose(scores.numpy(), [[9.0, 1.0]], atol=1e-5)
    mc = Episode(support, torch.tensor([0, 1, 2]), torch.tensor([[1.0, 1.0]]), None, TaskType.ORDINAL, (0, 1, 2))
    np.testing.assert_allclose(Prototypes(bn="support").predict(identity_backbone(), mc, seed=0).numpy(), [[-2.0, -2.0, -10.0]])


def parallel_float32_vector() -> torch.Tensor:
    """A float32 vector ``a`` with 1 - cos(a, a) below 0 and 1 - cos(a, 3a) exactly 0 when computed
    as ``distances`` computes cosine distance (the rounding is the platform's, so it is searched)."""
    for a in torch.rand(1000, 2, generator=torch.Generator().manual_seed(0)):
        raw = 1.0 - F.normalize(a[None], dim=1) @ F.normalize(torch.stack([a, 3 * a]), dim=1).T
        if raw[0, 0] < 0 and raw[0, 1] == 0:
            return a
    pytest.fail("no float32 vector found whose 1 - cos(a, a) rounds below 0")


def test_knn_cosine_splits_the_vote_between_exactly_parallel_float32_features() -> None:
    """a and 3a are both at cosine distance 0 from the query a: half the vote each. Unclamped, the
    rounded -1.2e-7 gave a the weight 1 / (-1.2e-7 + 1e-8) < 0 and its class the share 1e-6."""
    a = parallel_float32_vector()
    support = torch.stack([a, 3 * a])
    ep = Episode(support, torch.tensor([1, 0]), a[None], None, TaskType.BINARY, (0, 1))
    scores = KNN(bn="support", k=2, metric="cosine").predict(identity_backbone(), ep, seed=0)
    assert torch.sigmoid(scores).item() == pytest.approx(0.5, abs=1e-6)
    assert torch.equal(distances(a[None], support, "cosine"), torch.zeros(1, 2))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("task_type", [TaskType.BINARY, TaskType.MULTI_CLASS, TaskType.MULTI_LABEL])
def test_knn_query_identical_to_a_support_image_gets_its_labels(dtype: torch.dtype, metric: str,
                                                                task_type: TaskType) -> None:
    """Zero distance: weight 1e8 against neighbours at distance ~1, so every query that repeats a
    support image gets that image's labels with all but ~1e-6 of the vote (the clip), and finite logits."""
    gen = torch.Generator().manual_seed(0)
    support = torch.randn(12, 8, generator=gen, dtype=dtype)
    y = torch.arange(12) % (2 if task_type.binary else 3)
    if task_type.multilabel:
        y = torch.randint(0, 2, (12, 3), generator=gen)
    ep = Episode(support, y, support.clone(), None, task_type, (0, 1) if task_type.binary else (0, 1, 2))
    scores = KNN(bn="support", metric=metric).predict(identity_backbone(8).to(dtype), ep, seed=0)
    assert torch.isfinite(scores).all()
    if task_type.choose_classes:
        own = torch.softmax(scores.double(), 1)[torch.arange(12), y]
    else:
        p = torch.sigmoid(scores.double()).reshape(12, -1)
        own = torch.where(y.reshape(12, -1).bool(), p, 1 - p)
    assert own.min().item() > 1 - 1e-5


def test_knn_duplicates_among_many_float32_rows_still_vote_for_their_class() -> None:
    """Beyond 25 rows cdist uses a matrix product: in float32 a duplicate's distance comes out as
    about sqrt(eps) * |x| (here ~0.01 for features offset by 10) instead of 0, so its share is
    ~0.98 rather than 1 - 1e-6 (noted, not changed: exact cdist is 6-13x slower); it still decides."""
    gen = torch.Generator().manual_seed(0)
    support = torch.randn(60, 8, generator=gen) + 10
    y = torch.arange(60) % 3
    ep = Episode(support, y, support.clone(), None, TaskType.MULTI_CLASS, (0, 1, 2))
    scores = KNN(bn="support").predict(identity_backbone(8), ep, seed=0)
    assert torch.isfinite(scores).all() and torch.equal(scores.argmax(1), y)
    assert torch.softmax(scores, 1)[torch.arange(60), y].min() > 0.9


@pytest.mark.parametrize("task_type", [TaskType.BINARY, TaskType.MULTI_CLASS])
def test_linear_probe_solves_scikit_learns_logistic_regression(task_type: TaskType) -> None:
    rng = np.random.default_rng(0)
    n_classes = 2 if task_type.binary else 3
    y = np.repeat(np.arange(n_classes), 6)
    x = rng.normal(size=(len(y), 4)) + y[:, None] * 0.8
    ep = Episode(torch.tensor(x, dtype=torch.float64), torch.tensor(y), torch.tensor(x[:5], dtype=torch.float64),
                 None, task_type, tuple(range(n_classes)))
    net = identity_backbone(4).double()
    scores = LinearProbe(bn="support", c=0.5, max_iter=500).predict(net, ep, seed=0)
    reference = LogisticRegression(C=0.5, tol=1e-10, max_iter=10000).fit(x, y).decision_function(x[:5])
    if task_type.binary:
        np.testing.assert_allclose(scores[:, 0].numpy(), reference, atol=1e-4)
    else:  # multinomial logits are defined up to a constant per sample
        got = scores.numpy() - scores.numpy().mean(1, keepdims=True)
        np.testing.assert_allclose(got, reference - reference.mean(1, keepdims=True), atol=1e-4)


def probe_scores(x: np.ndarray, y: np.ndarray, task_type: TaskType, dtype: torch.dtype, **settings) -> np.ndarray:
    """LinearProbe's logits on its own support features ``x`` (an identity backbone)."""
    n_out = 1 if task_type.binary else (y.shape[1] if task_type.multilabel else int(y.max()) + 1)
    ep = Episode(torch.tensor(x, dtype=dtype), torch.tensor(y), torch.tensor(x, dtype=dtype), None, task_type,
                 tuple(range(2 if task_type.binary else n_out)))
    return LinearProbe(**{"bn": "support", **settings}).predict(identity_backbone(x.shape[1]).to(dtype), ep, seed=0).double().numpy()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("task_type", [TaskType.BINARY, TaskType.MULTI_CLASS])
def test_linear_probe_defaults_solve_offset_features(task_type: TaskType, dtype: torch.dtype) -> None:
    """Features with a common offset of 10 (post-ReLU features are all positive), the default
    settings: within 1e-4 of scikit-learn (before the fix, binary 2e-4 in float64 and 4e-3 in
    float32, 3-way about 2 away; ``fit_linear_head`` says why)."""
    rng = np.random.default_rng(0)
    n_classes = 2 if task_type.binary else 3
    y = np.repeat(np.arange(n_classes), 8)
    x = (rng.normal(size=(len(y), 32)) + y[:, None] * 0.8 + 10).astype(np.float32).astype(np.float64)
    scores = probe_scores(x, y, task_type, dtype)
    reference = LogisticRegression(C=1.0, tol=1e-10, max_iter=10000).fit(x, y).decision_function(x)
    if task_type.binary:
        np.testing.assert_allclose(scores[:, 0], reference, atol=1e-4)
    else:
        np.testing.assert_allclose(scores - scores.mean(1, keepdims=True),
                                   reference - reference.mean(1, keepdims=True), atol=1e-4)


def test_multilabel_linear_probe_is_one_scikit_learn_fit_per_label() -> None:
    """The joint penalty ||W||^2 / (2 C n L) next to the mean BCE over n * L terms is 1/L times
    the sum of the per-label objectives: each label's logits are scikit-learn's with the same C."""
    rng = np.random.default_rng(1)
    y = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1], [1, 1, 1], [0, 0, 0]] * 2)
    x = rng.normal(size=(len(y), 16)) + y @ rng.normal(size=(3, 16)) + 10
    scores = probe_scores(x, y, TaskType.MULTI_LABEL, torch.float64, c=0.5)
    for j in range(3):
        reference = LogisticRegression(C=0.5, tol=1e-10, max_iter=10000).fit(x, y[:, j]).decision_function(x)
        np.testing.assert_allclose(scores[:, j], reference, atol=1e-4, err_msg=f"label {j}")


def test_frozen_features_take_batchnorm_statistics_from_the_support_only() -> None:
    """Changing one query image changes its own features only: not the support's (a BatchNorm
    estimated on support + query would move them) nor the other queries' (inductive)."""
    torch.manual_seed(0)
    net = SmallBN()
    ep = random_episode(TaskType.MULTI_CLASS, torch.Generator().manual_seed(3))
    other = Episode(ep.support_x, ep.support_y, torch.cat([ep.query_x[:1] * 5 + 2, ep.query_x[1:]]), None,
                    ep.task_type, ep.classes)
    work = WorkingCopy(net)
    support, query = frozen_features(work.reset(), ep, "support")
    support2, query2 = frozen_features(work.reset(), other, "support")
    torch.testing.assert_close(support2, support, rtol=0, atol=0)
    torch.testing.assert_close(query2[1:], query[1:], rtol=0, atol=0)
    assert not torch.allclose(query2[0], query[0])
    # ... and so the rules' scores for the unchanged queries
    for rule in (KNN(bn="support"), Prototypes(bn="support"), LinearProbe(bn="support")):
        torch.testing.assert_close(rule.predict(net, other, seed=0)[1:], rule.predict(net, ep, seed=0)[1:],
                                   rtol=0, atol=0)


def cosine_distance(u: tuple[float, ...], v: tuple[float, ...]) -> float:
    """1 - cos(u, v) in plain Python floats."""
    return 1 - sum(a * b for a, b in zip(u, v)) / (math.hypot(*u) * math.hypot(*v))


def test_cosine_prototypes_hand_computed() -> None:
    """Cosine distance (1 - cos, not squared) to the mean of each class's features (not the mean
    of their directions)."""
    support = torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 1.0], [0.0, 3.0], [4.0, 0.0], [0.0, 2.0]])
    query = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    mc = Episode(support, torch.tensor([0, 0, 1, 1, 2, 2]), query, None, TaskType.MULTI_CLASS, (0, 1, 2))
    scores = Prototypes(bn="support", metric="cosine").predict(identity_backbone(), mc, seed=0)
    # Means (3, 0), (0, 2), (2, 1). Query (3, 4): cos 3/5, 4/5 and 10/(5 sqrt 5); query (1, 0): 1, 0, 2/sqrt 5.
    expected = [[-0.4, -0.2, -(1 - 2 / math.sqrt(5))], [0.0, -1.0, -(1 - 2 / math.sqrt(5))]]
    np.testing.assert_allclose(scores.numpy(), expected, atol=1e-6)
    binary = Episode(support[:4], torch.tensor([0, 0, 1, 1]), query, None, TaskType.BINARY, (0, 1))
    scores = Prototypes(bn="support", metric="cosine").predict(identity_backbone(), binary, seed=0)
    # d(negative mean (3, 0)) - d(positive mean (0, 2)).
    np.testing.assert_allclose(scores[:, 0].numpy(), [0.4 - 0.2, 0.0 - 1.0], atol=1e-6)
    y = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0], [1, 0], [0, 1]])
    ml = Episode(support, y, query, None, TaskType.MULTI_LABEL, (0, 1))
    scores = Prototypes(bn="support", metric="cosine").predict(identity_backbone(), ml, seed=0)
    pos = [(10 / 3, 0.0), (4 / 3, 1.0)]  # label 0: rows 0, 1, 4; label 1: rows 1, 2, 5
    neg = [(0.0, 2.0), (2.0, 1.0)]  # label 0: rows 2, 3, 5; label 1: rows 0, 3, 4
    expected = [[cosine_distance(q, neg[j]) - cosine_distance(q, pos[j]) for j in range(2)]
                for q in ((3.0, 4.0), (1.0, 0.0))]
    np.testing.assert_allclose(scores.numpy(), expected, atol=1e-6)


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
@pytest.mark.parametrize("rule", [FineTune(steps=3), LinearProbe(bn="support"), KNN(bn="support"), Prototypes(bn="support"), LPFT(probe=LinearProbe(bn="support")), MAMLInner(steps=3)],
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
    rule = LPFT(probe=LinearProbe(bn="support"), finetune=FineTune(steps=1, lr=1e-12))
    lpft = rule.predict(net, ep, seed=0)
    work = WorkingCopy(net)
    support, _ = frozen_features(work.reset(), ep, "support")
    head = LinearProbe(bn="support").head(support, ep.support_y, ep)
    assert head["weight"].abs().sum() > 0
    torch.testing.assert_close(lpft, fine_tune(work, ep, steps=1, lr=1e-12, seed=0, head=head))
    fresh = fine_tune(work, ep, steps=1, lr=1e-12, seed=0)
    assert not torch.allclose(lpft, fresh, atol=1e-3)
