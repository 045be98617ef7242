"""Few-shot fine-tuning: losses, batched == one-by-one, no mutation, determinism, BN choice."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.adaptation import (
    StackedAdam,
    adapt_and_predict,
    adapt_episodes,
    adapt_many,
    fresh_head,
    task_loss,
)

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


def episode(task_type: str, n: int, gen: torch.Generator, ns: int = 8, nq: int = 6,
            size: int = 12) -> tuple[Tensor, Tensor, Tensor]:
    return (torch.rand(ns, 1, size, size, generator=gen), labels(task_type, n, ns, gen),
            torch.rand(nq, 1, size, size, generator=gen))


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return BNNet()


def test_task_loss_by_type() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1, generator=gen)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    assert torch.allclose(task_loss("binary", logits, y), F.binary_cross_entropy_with_logits(logits[:, 0], y.float()))
    logits = torch.randn(6, 3, generator=gen)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    for tt in ("multi-class", "ordinal"):
        assert torch.allclose(task_loss(tt, logits, y), F.cross_entropy(logits, y))
    y = torch.randint(0, 2, (6, 3), generator=gen).float()
    assert torch.allclose(task_loss("multi-label", logits, y), F.binary_cross_entropy_with_logits(logits, y))
    with pytest.raises(ValueError, match="unknown task type"):
        task_loss("regression", logits, y)


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


@pytest.mark.parametrize("head_only", [False, True])
@pytest.mark.parametrize("task_type,n", TASKS)
def test_batched_equals_sequential(net: nn.Module, task_type: str, n: int, head_only: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    eps = [episode(task_type, n, gen) for _ in range(3)]
    seeds = [7, 8, 9]
    seq = [adapt_and_predict(net, task_type, n, *ep, steps=10, head_only=head_only, seed=s)
           for ep, s in zip(eps, seeds)]
    bat = adapt_many(net, task_type, n, eps, steps=10, head_only=head_only, seeds=seeds)
    for a, b in zip(seq, bat):
        assert a.shape == (6, n)
        assert torch.allclose(a, b, atol=1e-4, rtol=0)
    # The head seed matters, and fine-tuning moved the logits away from the untouched model's.
    assert not torch.allclose(seq[0], adapt_and_predict(net, task_type, n, *eps[0], steps=10,
                                                        head_only=head_only, seed=0), atol=1e-4)


def test_batched_float64_is_exact(net: nn.Module) -> None:
    net = net.double()
    gen = torch.Generator().manual_seed(2)
    eps = [tuple(t.double() if t.is_floating_point() else t for t in episode("multi-class", 3, gen))
           for _ in range(2)]
    seq = [adapt_and_predict(net, "multi-class", 3, *ep, steps=20, lr=1e-2, seed=i) for i, ep in enumerate(eps)]
    bat = adapt_many(net, "multi-class", 3, eps, steps=20, lr=1e-2)
    for a, b in zip(seq, bat):
        assert torch.allclose(a, b, atol=1e-9, rtol=0)


def test_chunking_and_mixed_shapes(net: nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    eps = [episode("multi-class", 3, gen, ns=6 + 3 * (i % 2)) for i in range(5)]
    seq = adapt_episodes(net, "multi-class", 3, eps, steps=5, batched=False)
    bat = adapt_episodes(net, "multi-class", 3, eps, steps=5, batched=True, chunk_size=2)
    for a, b in zip(seq, bat):
        assert torch.allclose(a, b, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="same-shaped"):
        adapt_many(net, "multi-class", 3, eps, steps=1)


def test_no_mutation_and_determinism(net: nn.Module) -> None:
    net.eval()
    net.body[0].weight.requires_grad_(False)
    before = copy.deepcopy(net.state_dict())
    gen = torch.Generator().manual_seed(4)
    ep = episode("multi-label", 5, gen)
    a = adapt_and_predict(net, "multi-label", 5, *ep, steps=5, seed=3)
    b = adapt_and_predict(net, "multi-label", 5, *ep, steps=5, seed=3)
    (c,) = adapt_many(net, "multi-label", 5, [ep], steps=5, seeds=[3])
    (d,) = adapt_many(net, "multi-label", 5, [ep], steps=5, seeds=[3])
    assert torch.equal(a, b) and torch.equal(c, d)
    assert not a.requires_grad and not c.requires_grad
    assert not net.training and not net.body[0].weight.requires_grad
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_query_prediction_is_inductive(net: nn.Module) -> None:
    """Eval-mode BN for the query: an image's logits do not depend on the rest of the query."""
    gen = torch.Generator().manual_seed(5)
    sx, sy, qx = episode("multi-class", 3, gen)
    full = adapt_and_predict(net, "multi-class", 3, sx, sy, qx, steps=5)
    part = adapt_and_predict(net, "multi-class", 3, sx, sy, qx[:2], steps=5)
    assert torch.allclose(full[:2], part, atol=1e-6)
    (bat,) = adapt_many(net, "multi-class", 3, [(sx, sy, qx[:2])], steps=5)
    assert torch.allclose(bat, part, atol=1e-4)


def test_resnet18_batched_equals_sequential() -> None:
    """Smoke test on the real backbone (exactness is checked in float64 above): one step, because
    a random-init float32 ResNet amplifies rounding through Adam's sign-like first steps."""
    models = pytest.importorskip("medmeta.models")
    torch.manual_seed(0)
    backbone = models.build_backbone("resnet18", stem="cifar")
    gen = torch.Generator().manual_seed(0)
    eps = [(torch.rand(2, 1, 28, 28, generator=gen), torch.tensor([0, 1]), torch.rand(2, 1, 28, 28, generator=gen))
           for _ in range(2)]
    seq = adapt_episodes(backbone, "binary", 1, eps, steps=1, batched=False)
    bat = adapt_episodes(backbone, "binary", 1, eps, steps=1, batched=True)
    for a, b in zip(seq, bat):
        assert torch.allclose(a, b, atol=1e-4, rtol=0)


def test_linear_probe_uses_batchnorm_statistics_of_the_support(net: nn.Module) -> None:
    """A frozen backbone's stored running statistics (e.g. mm-PT's, from the task trained last)
    must not decide a linear probe: they are re-estimated on the support set."""
    gen = torch.Generator().manual_seed(3)
    ep = episode("multi-class", 3, gen)
    skewed = copy.deepcopy(net)
    for m in skewed.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(5.0)
            m.running_var.fill_(0.01)
    before = {k: v.clone() for k, v in skewed.state_dict().items()}
    a = adapt_and_predict(net, "multi-class", 3, *ep, steps=5, head_only=True, seed=1)
    b = adapt_and_predict(skewed, "multi-class", 3, *ep, steps=5, head_only=True, seed=1)
    torch.testing.assert_close(a, b)
    batched = adapt_many(skewed, "multi-class", 3, [ep], steps=5, head_only=True, seeds=[1])[0]
    torch.testing.assert_close(batched, a, atol=1e-5, rtol=1e-5)
    for k, v in skewed.state_dict().items():
        assert torch.equal(v, before[k]), k
