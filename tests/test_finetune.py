"""Few-shot fine-tuning: losses, batched == one-by-one, no mutation, determinism, BatchNorm rules."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.episodes import Episode
from medmeta.learning.finetune import (StackedAdam, WorkingCopy, fine_tune, fine_tune_episodes, fine_tune_many,
                                       fresh_head, frozen_features)
from medmeta.tasktype import TaskType

TASKS = [("binary", 1), ("multi-class", 3), ("ordinal", 4), ("multi-label", 5)]


class BNNet(nn.Module):
    """Two conv-BN-ReLU blocks and a pool; convs without bias before BN, as in ResNets.

    (A conv bias before BN has an exactly-zero gradient in theory; Adam rescales its float
    noise into full-size steps, so two correct float32 implementations drift apart there.)
    """

    out_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def labels(task_type: str, n: int, count: int, gen: torch.Generator) -> Tensor:
    if task_type == "multi-label":
        return torch.randint(0, 2, (count, n), generator=gen).float()
    classes = 2 if task_type == "binary" else n
    return torch.arange(count) % classes


def episode(task_type: str, n: int, gen: torch.Generator, ns: int = 8, nq: int = 6, size: int = 12) -> Episode:
    """An episode of random images: n classes (binary: 2, one output; multi-label: n labels)."""
    tt = TaskType(task_type)
    classes = (0, 1) if tt.binary else tuple(range(n))
    return Episode(torch.rand(ns, 1, size, size, generator=gen), labels(task_type, n, ns, gen),
                   torch.rand(nq, 1, size, size, generator=gen), None, tt, classes)


def one(net: nn.Module, ep: Episode, steps: int, seed: int = 0, lr: float = 1e-3) -> Tensor:
    return fine_tune(WorkingCopy(net), ep, steps=steps, lr=lr, seed=seed)


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return BNNet()


def test_task_loss_by_type() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1, generator=gen)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    assert torch.allclose(TaskType.BINARY.loss(logits, y), F.binary_cross_entropy_with_logits(logits[:, 0], y.float()))
    logits = torch.randn(6, 3, generator=gen)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    for tt in (TaskType.MULTI_CLASS, TaskType.ORDINAL):
        assert torch.allclose(tt.loss(logits, y), F.cross_entropy(logits, y))
    y = torch.randint(0, 2, (6, 3), generator=gen).float()
    assert torch.allclose(TaskType.MULTI_LABEL.loss(logits, y), F.binary_cross_entropy_with_logits(logits, y))
    with pytest.raises(ValueError, match="not a valid TaskType"):
        TaskType("regression")


def test_stacked_adam_matches_torch_adam() -> None:
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(3, 4, generator=gen)
    grads = [torch.randn(3, 4, generator=gen) for _ in range(5)]
    ref = [nn.Parameter(p0[i].clone()) for i in range(3)]
    opts = [torch.optim.Adam([r], lr=1e-2) for r in ref]
    stacked = {"w": p0.clone()}
    ours = StackedAdam(stacked, lr=1e-2)
    for g in grads:
        for i, (r, o) in enumerate(zip(ref, opts)):
            r.grad = g[i].clone()
            o.step()
        ours.step({"w": g})
    assert torch.equal(stacked["w"], torch.stack([r.detach() for r in ref]))


def test_fresh_head_is_seeded_default_init() -> None:
    a, b, c = fresh_head(16, 3, seed=1), fresh_head(16, 3, seed=1), fresh_head(16, 3, seed=2)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)
    assert a.weight.abs().max() <= 0.25 and a.bias.abs().max() <= 0.25  # U(-1/sqrt(16), 1/sqrt(16))
    assert fresh_head(16, 3, seed=1, dtype=torch.float64).weight.dtype == torch.float64


@pytest.mark.parametrize("task_type,n", TASKS)
def test_batched_equals_sequential(net: nn.Module, task_type: str, n: int) -> None:
    gen = torch.Generator().manual_seed(1)
    eps = [episode(task_type, n, gen) for _ in range(3)]
    seeds = [7, 8, 9]
    seq = [one(net, ep, 10, s) for ep, s in zip(eps, seeds)]
    bat = fine_tune_many(net, eps, steps=10, lr=1e-3, seeds=seeds)
    for a, b in zip(seq, bat):
        assert a.shape == (6, 1 if task_type == "binary" else n)
        assert torch.allclose(a, b, atol=1e-4, rtol=0)
    # The head seed matters, and fine-tuning moved the logits away from the untouched model's.
    assert not torch.allclose(seq[0], one(net, eps[0], 10, seed=0), atol=1e-4)


def test_batched_float64_is_exact(net: nn.Module) -> None:
    net = net.double()
    gen = torch.Generator().manual_seed(2)
    eps = []
    for _ in range(2):
        e = episode("multi-class", 3, gen)
        eps.append(Episode(e.support_x.double(), e.support_y, e.query_x.double(), None, e.task_type, e.classes))
    seq = [one(net, ep, 20, seed=i, lr=1e-2) for i, ep in enumerate(eps)]
    bat = fine_tune_many(net, eps, steps=20, lr=1e-2, seeds=[0, 1])
    for a, b in zip(seq, bat):
        assert torch.allclose(a, b, atol=1e-9, rtol=0)


def test_chunking_and_mixed_shapes(net: nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    eps = [episode("multi-class", 3, gen, ns=6 + 3 * (i % 2)) for i in range(5)]
    seq = fine_tune_episodes(net, eps, steps=5, lr=1e-3, seeds=list(range(5)), batched=False)
    bat = fine_tune_episodes(net, eps, steps=5, lr=1e-3, seeds=list(range(5)), batched=True, chunk_size=2)
    for a, b in zip(seq, bat):
        assert torch.allclose(a, b, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="same-shaped"):
        fine_tune_many(net, eps, steps=1, lr=1e-3, seeds=list(range(5)))


def test_no_mutation_determinism_and_a_reused_working_copy(net: nn.Module) -> None:
    net.eval()
    net.body[0].weight.requires_grad_(False)
    before = copy.deepcopy(net.state_dict())
    gen = torch.Generator().manual_seed(4)
    ep = episode("multi-label", 5, gen)
    other = episode("multi-label", 5, gen)
    work = WorkingCopy(net)
    a = fine_tune(work, ep, steps=5, lr=1e-3, seed=3)
    fine_tune(work, other, steps=5, lr=1e-3, seed=4)  # the working copy is reset between episodes
    b = fine_tune(work, ep, steps=5, lr=1e-3, seed=3)
    (c,) = fine_tune_many(net, [ep], steps=5, lr=1e-3, seeds=[3])
    (d,) = fine_tune_many(net, [ep], steps=5, lr=1e-3, seeds=[3])
    assert torch.equal(a, b) and torch.equal(c, d)
    assert not a.requires_grad and not c.requires_grad
    assert not net.training and not net.body[0].weight.requires_grad
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_query_prediction_is_inductive(net: nn.Module) -> None:
    """Eval-mode BN for the query: an image's logits do not depend on the rest of the query."""
    gen = torch.Generator().manual_seed(5)
    ep = episode("multi-class", 3, gen)
    part = Episode(ep.support_x, ep.support_y, ep.query_x[:2], None, ep.task_type, ep.classes)
    full = one(net, ep, 5)
    assert torch.allclose(full[:2], one(net, part, 5), atol=1e-6)
    (bat,) = fine_tune_many(net, [part], steps=5, lr=1e-3, seeds=[0])
    assert torch.allclose(bat, full[:2], atol=1e-4)


def test_resnet18_batched_equals_sequential() -> None:
    """Smoke test on the real backbone (exactness is checked in float64 above): one step, because
    a random-init float32 ResNet amplifies rounding through Adam's sign-like first steps."""
    models = pytest.importorskip("medmeta.learning.models")
    torch.manual_seed(0)
    backbone = models.build_backbone("resnet18", stem="cifar")
    gen = torch.Generator().manual_seed(0)
    eps = [Episode(torch.rand(2, 1, 28, 28, generator=gen), torch.tensor([0, 1]),
                   torch.rand(2, 1, 28, 28, generator=gen), None, TaskType.BINARY, (0, 1)) for _ in range(2)]
    seq = fine_tune_episodes(backbone, eps, steps=1, lr=1e-3, seeds=[0, 1], batched=False)
    bat = fine_tune_episodes(backbone, eps, steps=1, lr=1e-3, seeds=[0, 1], batched=True)
    for a, b in zip(seq, bat):
        assert torch.allclose(a, b, atol=1e-4, rtol=0)


def test_frozen_features_use_batchnorm_statistics_of_the_support(net: nn.Module) -> None:
    """A frozen backbone's stored running statistics (e.g. mm-PT's, from the task trained last)
    must not decide frozen features: they are re-estimated on the support set."""
    gen = torch.Generator().manual_seed(3)
    ep = episode("multi-class", 3, gen)
    skewed = copy.deepcopy(net)
    for m in skewed.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(5.0)
            m.running_var.fill_(0.01)
    before = {k: v.clone() for k, v in skewed.state_dict().items()}
    a = frozen_features(WorkingCopy(net).reset(), ep, "support")
    b = frozen_features(WorkingCopy(skewed).reset(), ep, "support")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    for k, v in skewed.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_episodes_are_vmapped_only_on_cuda_and_only_for_small_2d_images() -> None:
    from medmeta.learning.finetune import default_batched

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert default_batched(cuda, torch.zeros(25, 3, 28, 28)) and default_batched(cuda, torch.zeros(2, 1, 64, 64))
    assert not default_batched(cuda, torch.zeros(25, 3, 224, 224))
    assert not default_batched(cuda, torch.zeros(10, 1, 28, 28, 28))
    assert not default_batched(cpu, torch.zeros(25, 3, 28, 28))


def test_deterministic_cudnn_holds_inside_the_block_and_restores_the_setting() -> None:
    from medmeta.learning.runtime import deterministic_cudnn

    before = torch.backends.cudnn.deterministic
    with deterministic_cudnn():
        assert torch.backends.cudnn.deterministic
    assert torch.backends.cudnn.deterministic == before
    with pytest.raises(ZeroDivisionError), deterministic_cudnn():
        1 / 0
    assert torch.backends.cudnn.deterministic == before
