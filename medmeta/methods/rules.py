"""Built-in adaptation rules; each works on any initialisation and every task type.

============ ======================================================================================
name         what it does with an episode
============ ======================================================================================
finetune     MedIMeta's rule: a fresh linear head and the whole network trained with Adam on the
             support set (50 steps, lr 1e-3), query predicted in eval mode.
linear       Linear probe (MedMNIST+'s "linear probing"): frozen backbone, L2-regularised logistic
             regression on its features, solved with L-BFGS (scikit-learn's objective: mean loss
             + ||W||^2 / (2 C n), per label for multi-label).
knn          k-nearest neighbours on frozen features: each of the k nearest support images votes for
             its label with weight 1 / (distance + 1e-8); a class's score is its share of the votes.
             k = 5 by default, the number of shots, so that in a perfect feature space the whole
             neighbourhood is one class (MedMNIST+'s k = 11 exceeds a 5-shot binary support's
             classes). Euclidean (MedMNIST+'s released code) or cosine distance.
proto        Prototypes (ProtoNet's nearest class mean, no meta-training): logits are minus the
             squared Euclidean (or cosine) distance to each class mean. Binary: one logit,
             d(negative mean) - d(positive mean). Multi-label: per label, a positive and a
             negative prototype, logit d(negative) - d(positive).
lpft         LP-FT: the linear probe's head, then full fine-tuning from it (keeps pretrained
             features better than fine-tuning from a random head).
inner        MAML's test-time rule: SGD from a zero head with BatchNorm in train mode on the query
             (transductive); the ``maml`` method's rule, usable on any initialisation.
============ ======================================================================================

Frozen-feature rules (linear, knn, proto, and lpft's probe) take the backbone's BatchNorm
statistics as their ``bn`` setting says (``learning.finetune.frozen_features``): ``own``,
``support``, ``transductive`` or ``sources``; ``auto`` (the default) is the initialisation's
``frozen_bn`` (scratch: own, mmpt: sources, maml: support, pretrained weights: own).
k-NN's vote shares become logits with ``TaskType.logits_from_probabilities``.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..episodes import Episode
from ..errors import MethodError
from ..learning.finetune import BNMode, HeadState, WorkingCopy, fine_tune, fine_tune_episodes, frozen_features
from ..learning.maml import MAMLConfig
from ..learning.maml import adapt_and_predict as maml_adapt_and_predict
from ..settings import Settings, setting
from ..tasktype import TaskType
from .base import AdaptationRule, Initialisation

Metric = Literal["euclidean", "cosine"]


@dataclass
class FineTune(Settings, AdaptationRule):
    """Full fine-tuning from a fresh head (vmapped over episodes on CUDA, one by one on CPU)."""

    name: ClassVar[str] = "finetune"
    steps: int = setting(50, min=1)
    lr: float = setting(1e-3, above=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocast for the training steps (fast on GPUs and CPUs with AVX-512 BF16 or AMX; it
    changes the numbers, so compare it with paired differences before using it)."""

    def predict(self, backbone: nn.Module, episode: Episode, seed: int) -> Tensor:
        return self.predict_many(backbone, [episode], [seed])[0]

    def predict_many(self, backbone: nn.Module, episodes: Sequence[Episode], seeds: Sequence[int]) -> list[Tensor]:
        return fine_tune_episodes(backbone, episodes, self.steps, self.lr, list(seeds), bf16=self.precision == "bf16")


BNSetting = Literal["auto", "own", "support", "transductive", "sources"]
def default_bn(init: Initialisation) -> BNMode:
    """The ``bn`` mode ``auto`` stands for after ``init`` (its ``frozen_bn``)."""
    mode = init.frozen_bn
    if mode not in get_args(BNMode) or (mode == "sources" and not init.needs_sources):
        raise MethodError(f"initialisation {type(init).__name__}: frozen_bn {mode!r} is not one of "
                          f"{get_args(BNMode)} (sources only for an initialisation trained on the sources)")
    return mode  # type: ignore[return-value]


@dataclass
class FrozenFeatureRule(AdaptationRule):
    """A rule that reads frozen features: override ``scores(support_features, support_y,
    query_features, episode)``. ``bn`` says where the backbone's BatchNorm statistics come from
    (``learning.finetune.frozen_features``); ``auto`` is the initialisation's ``frozen_bn``."""

    bn: BNSetting = field(default="auto", kw_only=True)
    """Keyword-only, so a subclass's own fields keep their positions (``LinearProbe(0.5)`` is C)."""

    def scores(self, support: Tensor, support_y: Tensor, query: Tensor, episode: Episode) -> Tensor:
        raise NotImplementedError

    def for_initialisation(self, init: Initialisation) -> FrozenFeatureRule:
        if self.bn != "auto":
            return self
        rule = copy.copy(self)
        rule.bn = default_bn(init)
        return rule

    @property
    def bn_mode(self) -> BNMode:
        if self.bn == "auto":
            raise ValueError(f"{type(self).__name__}: bn='auto' is resolved by for_initialisation (Method does it)")
        return self.bn

    def predict(self, backbone: nn.Module, episode: Episode, seed: int) -> Tensor:
        return self.predict_many(backbone, [episode], [seed])[0]

    def predict_many(self, backbone: nn.Module, episodes: Sequence[Episode], seeds: Sequence[int]) -> list[Tensor]:
        work = WorkingCopy(backbone)
        out = []
        for episode in episodes:
            support, query = frozen_features(work.reset(), episode, self.bn_mode)
            out.append(self.scores(support, episode.support_y.to(support.device), query, episode))
        return out


LBFGS_TOLERANCE_GRAD = 1e-9
"""The linear probe stops when no element of the objective's gradient exceeds this."""
LBFGS_SCALE = 1e8
"""The objective L-BFGS sees is this times the probe's objective (see ``fit_linear_head``)."""


def fit_linear_head(features: Tensor, y: Tensor, task_type: TaskType, num_outputs: int, c: float,
                    max_iter: int) -> HeadState:
    """L2-regularised logistic regression (scikit-learn's objective with inverse strength ``c``) by L-BFGS.

    Objective: mean loss + ||W||^2 / (2 c n); multi-label: the mean BCE over all n * L terms +
    ||W||^2 / (2 c n L), which is 1/L times the sum of L per-label scikit-learn objectives, so
    each label's row is scikit-learn's binary fit with the same ``c``.

    Solved to a gradient of ``LBFGS_TOLERANCE_GRAD`` (at most ``max_iter`` iterations, twice as
    many loss evaluations; few-shot supports of up to 11 classes or 14 labels, 2048 features and
    c from 0.01 to 100 took 6 to 61, their logits then within about 1e-5 of the optimum), because:

    * features are centred on their mean and the bias moved back afterwards (b - W @ mean): the
      bias is not penalised, so this changes the conditioning only. A large common offset (post-
      ReLU features are all positive) makes bias and weights nearly collinear;
    * in float64: a float32 loss cannot resolve such a gradient (the head is returned in the
      features' dtype);
    * the objective is multiplied by ``LBFGS_SCALE``: PyTorch's L-BFGS keeps a curvature pair only
      if y.s > 1e-10, absolute; near this optimum y.s is far smaller, its memory froze and it
      crawled (11-way 10-shot, 2048 features: gradient 9e-9 after 300 iterations; scaled,
      5e-10 after 40). ``tolerance_change`` (1e-9) then means 1e-17 of the objective.

    Before, with PyTorch's defaults on the raw features, 100 iterations stopped up to 6e-3
    (binary) and 4.6 (3-way, 64 features) from scikit-learn's logits on features x + 10.
    """
    x = features.double()
    mean = x.mean(dim=0)
    x = x - mean
    n, d = x.shape
    weight = x.new_zeros(num_outputs, d, requires_grad=True)
    bias = x.new_zeros(num_outputs, requires_grad=True)
    penalty = 1.0 / (2.0 * c * n * (num_outputs if task_type.multilabel else 1))
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter,
                            tolerance_grad=LBFGS_TOLERANCE_GRAD * LBFGS_SCALE, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = LBFGS_SCALE * (task_type.loss(F.linear(x, weight, bias), y) + penalty * weight.pow(2).sum())
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w = weight.detach()
    return {"weight": w.to(features.dtype), "bias": (bias.detach() - w @ mean).to(features.dtype)}


@dataclass
class LinearProbe(Settings, FrozenFeatureRule):
    """Logistic regression on frozen features (see the module docstring)."""

    name: ClassVar[str] = "linear"
    c: float = setting(1.0, above=0)
    """Inverse regularisation strength, as scikit-learn's ``C``."""
    max_iter: int = setting(100, min=1)
    """Most L-BFGS iterations (see ``fit_linear_head`` for what 100 reach)."""

    def head(self, support: Tensor, support_y: Tensor, episode: Episode) -> HeadState:
        return fit_linear_head(support, support_y, episode.task_type, episode.num_outputs, self.c, self.max_iter)

    def scores(self, support: Tensor, support_y: Tensor, query: Tensor, episode: Episode) -> Tensor:
        head = self.head(support, support_y, episode)
        return F.linear(query, head["weight"], head["bias"])


def distances(query: Tensor, points: Tensor, metric: Metric, squared: bool = False) -> Tensor:
    """(n_query, n_points) distances: Euclidean (optionally squared) or cosine (1 - cosine
    similarity; ``squared`` does not apply), clamped at 0.

    The clamp is for cosine: in float32, 1 - cos of parallel vectors can round to -1.2e-7, which
    k-NN's weight 1 / (d + 1e-8) turned into a large negative vote (cdist is never negative).
    Euclidean: beyond 25 rows ``torch.cdist`` uses a matrix product, exact to about eps * |x|^2
    in the squared distance, so in float32 a duplicate's distance is ~sqrt(eps) * |x|, not 0.
    """
    if metric == "cosine":
        d = 1.0 - F.normalize(query, dim=1) @ F.normalize(points, dim=1).T
    else:
        d = torch.cdist(query, points)
        d = d.square() if squared else d
    return d.clamp_min(0.0)


@dataclass
class KNN(Settings, FrozenFeatureRule):
    """Distance-weighted k-nearest-neighbour votes on frozen features (see the module docstring)."""

    name: ClassVar[str] = "knn"
    k: int = setting(5, min=1)
    metric: Metric = "euclidean"
    weights: Literal["distance", "uniform"] = "distance"
    """``uniform``: every neighbour's vote counts the same (scikit-learn's default, MedMNIST+'s code)."""

    def scores(self, support: Tensor, support_y: Tensor, query: Tensor, episode: Episode) -> Tensor:
        d = distances(query, support, self.metric)
        nearest, idx = d.topk(min(self.k, len(support)), dim=1, largest=False)
        w = 1.0 / (nearest + 1e-8) if self.weights == "distance" else torch.ones_like(nearest)
        total = w.sum(dim=1, keepdim=True)
        if episode.task_type.multilabel:
            shares = (w.unsqueeze(2) * support_y[idx].to(w.dtype)).sum(dim=1) / total
        elif episode.task_type.binary:
            shares = (w * support_y[idx].to(w.dtype)).sum(dim=1, keepdim=True) / total
        else:
            votes = torch.zeros(len(query), episode.num_outputs, dtype=w.dtype, device=w.device)
            shares = votes.scatter_add_(1, support_y[idx], w) / total
        return episode.task_type.logits_from_probabilities(shares)


def _mean_where(features: Tensor, mask: Tensor) -> Tensor:
    return features[mask].mean(dim=0)


@dataclass
class Prototypes(Settings, FrozenFeatureRule):
    """Nearest class mean on frozen features (see the module docstring)."""

    name: ClassVar[str] = "proto"
    metric: Metric = "euclidean"

    def scores(self, support: Tensor, support_y: Tensor, query: Tensor, episode: Episode) -> Tensor:
        if episode.task_type.multilabel:
            y = support_y.bool()
            pos = torch.stack([_mean_where(support, y[:, j]) for j in range(y.shape[1])])
            neg = torch.stack([_mean_where(support, ~y[:, j]) for j in range(y.shape[1])])
            return self._d(query, neg) - self._d(query, pos)
        classes = 2 if episode.task_type.binary else episode.num_outputs
        protos = torch.stack([_mean_where(support, support_y == c) for c in range(classes)])
        d = self._d(query, protos)
        return (d[:, 0] - d[:, 1]).unsqueeze(1) if episode.task_type.binary else -d

    def _d(self, query: Tensor, protos: Tensor) -> Tensor:
        return distances(query, protos, self.metric, squared=True)


@dataclass
class LPFT(Settings, AdaptationRule):
    """Linear probe, then full fine-tuning from the probe's head."""

    name: ClassVar[str] = "lpft"
    probe: LinearProbe = field(default_factory=LinearProbe)
    finetune: FineTune = field(default_factory=FineTune)

    def for_initialisation(self, init: Initialisation) -> LPFT:
        probe = self.probe.for_initialisation(init)
        return self if probe is self.probe else self.replace(probe=probe)

    @property
    def bn_mode(self) -> BNMode:
        return self.probe.bn_mode

    def predict(self, backbone: nn.Module, episode: Episode, seed: int) -> Tensor:
        return self.predict_many(backbone, [episode], [seed])[0]

    def predict_many(self, backbone: nn.Module, episodes: Sequence[Episode], seeds: Sequence[int]) -> list[Tensor]:
        work = WorkingCopy(backbone)
        out = []
        for episode, seed in zip(episodes, seeds):
            support, _ = frozen_features(work.reset(), episode, self.bn_mode)
            head = self.probe.head(support, episode.support_y.to(support.device), episode)
            out.append(fine_tune(work, episode, self.finetune.steps, self.finetune.lr, seed, head=head,
                                 bf16=self.finetune.precision == "bf16"))
        return out


@dataclass
class MAMLInner(Settings, AdaptationRule):
    """SGD from a zero head, BatchNorm in train mode on the query (MAML's test-time adaptation)."""

    name: ClassVar[str] = "inner"
    steps: int = setting(MAMLConfig.test_steps, min=1)
    lr: float = setting(MAMLConfig.inner_lr, above=0)
    bn_train: bool = MAMLConfig.bn_train

    @property
    def transductive(self) -> bool:
        return self.bn_train

    def predict(self, backbone: nn.Module, episode: Episode, seed: int) -> Tensor:
        return maml_adapt_and_predict(backbone, episode, self.steps, self.lr, self.bn_train)


