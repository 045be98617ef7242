"""MAML: meta-gradients against plain-autograd references (one by one and same-shaped episodes
adapted together), training, resume, BN buffers."""
from __future__ import annotations

import copy
import dataclasses
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.episodes import Episode
from medmeta.learning import maml as maml_module
from medmeta.learning.maml import MAML, inner_adapt, maml_loss, shape_groups
from medmeta.methods import MAMLInner
from medmeta.tasktype import TaskType


def task_loss(task_type: TaskType, logits: Tensor, y: Tensor) -> Tensor:
    return task_type.loss(logits, y)


def meta_episode(task_type: str, num_outputs: int, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Episode:
    tt = TaskType(task_type)
    return Episode(sx, sy, qx, qy, tt, (0, 1) if tt.binary else tuple(range(num_outputs)))


class SmallNet(nn.Module):
    """conv -> [BN] -> ReLU -> global mean pool -> linear; features (B, 6)."""

    out_features = 6

    def __init__(self, bn: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=not bn)
        self.bn = nn.BatchNorm2d(4) if bn else None
        self.fc = nn.Linear(4, 6)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        if self.bn is not None:
            h = self.bn(h)
        return self.fc(F.relu(h).mean((2, 3)))


def ref_features(p: dict[str, Tensor], x: Tensor) -> Tensor:
    """SmallNet's forward written by hand (BN with batch statistics), for the references."""
    h = F.conv2d(x, p["conv.weight"], p.get("conv.bias"), padding=1)
    if "bn.weight" in p:
        h = F.batch_norm(h, None, None, p["bn.weight"], p["bn.bias"], training=True)
    return F.linear(F.relu(h).mean((2, 3)), p["fc.weight"], p["fc.bias"])


def ref_inner(p: dict[str, Tensor], ep: Episode, steps: int, lr: dict[str, Tensor] | float,
              create_graph: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Unrolled inner SGD with torch.autograd.grad from a zero head."""
    fast = dict(p)
    head = {"weight": torch.zeros(ep.num_outputs, 6, dtype=torch.float64, requires_grad=True),
            "bias": torch.zeros(ep.num_outputs, dtype=torch.float64, requires_grad=True)}
    lr_of = (lambda k: lr) if isinstance(lr, float) else (lambda k: lr[k])
    for _ in range(steps):
        feats = ref_features(fast, ep.support_x)
        loss = task_loss(ep.task_type, F.linear(feats, head["weight"], head["bias"]), ep.support_y)
        keys = list(fast) + [f"head.{k}" for k in head]
        grads = dict(zip(keys, torch.autograd.grad(loss, list(fast.values()) + list(head.values()),
                                                   create_graph=create_graph)))
        fast = {k: v - lr_of(k) * grads[k] for k, v in fast.items()}
        head = {k: v - lr_of(f"head.{k}") * grads[f"head.{k}"] for k, v in head.items()}
    return fast, head


def ref_query_loss(fast: dict[str, Tensor], head: dict[str, Tensor], ep: Episode) -> Tensor:
    logits = F.linear(ref_features(fast, ep.query_x), head["weight"], head["bias"])
    return task_loss(ep.task_type, logits, ep.query_y)


def make_episode(task_type: str, n: int, shots: int, gen: torch.Generator,
                 dtype: torch.dtype = torch.float64, size: int = 4) -> Episode:
    """Random episode: n classes (labels for multi-label), ``shots`` support and 3 queries per class."""
    def labels(count: int) -> Tensor:
        if task_type == "multi-label":
            return torch.randint(0, 2, (count, n), generator=gen).float()
        classes = 2 if task_type == "binary" else n
        return torch.arange(classes).repeat_interleave(count // classes)

    ns, nq = shots * n, 3 * n
    # Small, high-variance images so pooled features differ and meta-gradients are not ~0.
    return meta_episode(task_type, 1 if task_type == "binary" else n,
                       2 * torch.randn(ns, 1, size, size, generator=gen, dtype=dtype), labels(ns),
                       2 * torch.randn(nq, 1, size, size, generator=gen, dtype=dtype), labels(nq))


def episodes_pair(seed: int = 0) -> list[Episode]:
    gen = torch.Generator().manual_seed(seed)
    return [make_episode("multi-class", 3, 2, gen), make_episode("multi-class", 5, 1, gen)]


def mixed_episodes(seed: int = 0) -> list[Episode]:
    gen = torch.Generator().manual_seed(seed)
    return [make_episode("binary", 2, 3, gen), make_episode("multi-label", 3, 2, gen),
            make_episode("ordinal", 4, 2, gen)]


def grads_of(net: nn.Module) -> dict[str, Tensor]:
    return {k: v.grad.clone() for k, v in net.named_parameters()}


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("make", [episodes_pair, mixed_episodes])
def test_second_order_meta_gradient_matches_unrolled_autograd(bn: bool, make) -> None:
    torch.manual_seed(0)
    net = SmallNet(bn).double()
    eps = make()
    loss = maml_loss(net, eps, inner_steps=3, inner_lr=1.0, first_order=False)
    loss.backward()
    ours = grads_of(net)

    params = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    ref = torch.stack([ref_query_loss(*ref_inner(params, ep, 3, 1.0, create_graph=True), ep)
                       for ep in eps]).mean()
    ref_grads = dict(zip(params, torch.autograd.grad(ref, list(params.values()))))
    assert torch.allclose(loss, ref, atol=1e-12)
    assert_close(ours, ref_grads)


def assert_close(ours: dict[str, Tensor], ref: dict[str, Tensor]) -> None:
    """Within 1e-5 absolute, and (float64) within 1e-6 relative, on gradients that are not all ~0."""
    assert max(v.abs().max() for v in ref.values()) > 1e-3
    for k, expected in ref.items():
        assert torch.allclose(ours[k], expected, atol=1e-5, rtol=0), k
        assert torch.allclose(ours[k], expected, atol=1e-12, rtol=1e-6), k


@pytest.mark.parametrize("bn", [False, True])
def test_first_order_meta_gradient_is_query_gradient_at_adapted_params(bn: bool) -> None:
    torch.manual_seed(1)
    net = SmallNet(bn).double()
    eps = episodes_pair(1)
    maml_loss(net, eps, inner_steps=3, inner_lr=1.0, first_order=True).backward()
    ours = grads_of(net)

    params = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for ep in eps:
        fast, head = ref_inner(params, ep, 3, 1.0, create_graph=False)
        leaves = {k: v.detach().requires_grad_(True) for k, v in fast.items()}
        g = torch.autograd.grad(ref_query_loss(leaves, {k: v.detach() for k, v in head.items()}, ep),
                                list(leaves.values()))
        for k, gi in zip(leaves, g):
            total[k] += gi / len(eps)
    assert_close(ours, total)


def test_meta_sgd_gradients_match_unrolled_autograd() -> None:
    torch.manual_seed(2)
    net = SmallNet(bn=True).double()
    maml = MAML(net, inner_steps=2, inner_lr=1.0, meta_sgd=True)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # make the per-element rates differ
        for v in maml.inner_lrs.values():
            v.mul_(torch.rand(v.shape, generator=gen, dtype=v.dtype) + 0.5)
    eps = episodes_pair(2)
    maml_loss(net, eps, 2, maml.inner_lrs, first_order=False).backward()

    params = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    lrs = {k: v.detach().clone().requires_grad_(True) for k, v in maml.inner_lrs.items()}
    ref = torch.stack([ref_query_loss(*ref_inner(params, ep, 2, lrs, create_graph=True), ep) for ep in eps]).mean()
    leaves = list(params.values()) + list(lrs.values())
    ref_grads = dict(zip(list(params) + [f"lr:{k}" for k in lrs], torch.autograd.grad(ref, leaves)))
    ours = grads_of(net) | {f"lr:{k}": v.grad for k, v in maml.inner_lrs.items()}
    assert_close(ours, ref_grads)


def test_inner_adapt_zero_head_and_first_order_detaches() -> None:
    net = SmallNet(bn=True).double()
    ep = episodes_pair()[0]
    params = dict(net.named_parameters())
    buffers = dict(net.named_buffers())
    _, head = inner_adapt(net, params, buffers, ep.task_type, ep.num_outputs, ep.support_x, ep.support_y,
                          steps=0, inner_lr=0.1, first_order=False)
    assert head["weight"].shape == (3, 6) and not head["weight"].any() and not head["bias"].any()
    fo, _ = inner_adapt(net, params, buffers, ep.task_type, ep.num_outputs, ep.support_x, ep.support_y,
                        steps=2, inner_lr=0.1, first_order=True)
    so, _ = inner_adapt(net, params, buffers, ep.task_type, ep.num_outputs, ep.support_x, ep.support_y,
                        steps=2, inner_lr=0.1, first_order=False)
    for k in params:  # same values; only the graph differs
        assert torch.allclose(fo[k], so[k], atol=1e-12)
    # First order: d(adapted)/d(params) is the identity.
    k = "conv.weight"
    (g,) = torch.autograd.grad(fo[k].sum(), params[k])
    assert torch.equal(g, torch.ones_like(g))


def grouped_episodes(seed: int = 0) -> list[Episode]:
    """Eight episodes of four shapes and every task type, interleaved: groups of 3, 2, 2 and 1."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [("multi-class", 3, 2), ("binary", 2, 3), ("multi-class", 3, 2), ("multi-label", 3, 2),
              ("binary", 2, 3), ("ordinal", 4, 1), ("multi-class", 3, 2), ("multi-label", 3, 2)]
    return [make_episode(t, n, k, gen) for t, n, k in shapes]


def reference_meta_gradient(params: dict[str, Tensor], lrs: dict[str, Tensor] | float, eps: list[Episode],
                            steps: int, first_order: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean query loss and its meta-gradient, episode by episode with plain autograd (``ref_inner``).
    First order: the query gradient at the adapted parameters (no gradient for the rates)."""
    leaves = list(params.values()) + (list(lrs.values()) if isinstance(lrs, dict) else [])
    names = list(params) + ([f"lr:{k}" for k in lrs] if isinstance(lrs, dict) else [])
    total, loss = {k: torch.zeros_like(v) for k, v in zip(names, leaves)}, torch.zeros((), dtype=torch.float64)
    for ep in eps:
        fast, head = ref_inner(params, ep, steps, lrs, create_graph=not first_order)
        if first_order:
            fast = {k: v.detach().requires_grad_(True) for k, v in fast.items()}
            head = {k: v.detach() for k, v in head.items()}
        q = ref_query_loss(fast, head, ep) / len(eps)
        wrt = list(fast.values()) if first_order else leaves
        for k, g in zip(names, torch.autograd.grad(q, wrt)):
            total[k] += g
        loss += q.detach()
    return loss, total


@pytest.mark.parametrize("bn", ["train", "eval", "none"])
@pytest.mark.parametrize("first_order", [True, False])
def test_grouped_meta_gradient_equals_one_by_one(bn: str, first_order: bool) -> None:
    """``meta_step`` adapts same-shaped episodes together (vmap); its meta-gradient and loss equal
    those of the same episodes one by one (``maml_loss(batched=False)``) and, with BatchNorm in train
    mode or without it, of plain autograd (``reference_meta_gradient``)."""
    torch.manual_seed(6)
    net = SmallNet(bn != "none").double()
    if bn == "eval":
        with torch.no_grad():
            net.bn.running_mean.uniform_(-1, 1)
            net.bn.running_var.uniform_(0.5, 2)
    eps = grouped_episodes(6)
    assert [len(g) for g in shape_groups(eps)] == [3, 2, 2, 1]
    bn_train = bn != "eval"
    params = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}  # before the step
    maml_loss(net, eps, 3, 1.0, first_order, bn_train, batched=False).backward()
    one_by_one = grads_of(net)
    net.zero_grad()
    maml = MAML(net, inner_steps=3, inner_lr=1.0, first_order=first_order, bn_train=bn_train, batched=True)
    loss = maml.meta_step(eps)
    assert_close(grads_of(net), one_by_one)
    if bn_train:
        ref_loss, ref_grads = reference_meta_gradient(params, 1.0, eps, 3, first_order)
        assert math.isclose(loss, ref_loss.item(), rel_tol=1e-6)  # meta_step sums the loss in float32
        assert_close(one_by_one, ref_grads)
        assert_close(grads_of(net), ref_grads)


@pytest.mark.parametrize(("batched", "sizes"), [(None, [1, 1, 1]), (False, [1, 1, 1]), (True, [3])])
def test_meta_step_groups_as_asked(monkeypatch: pytest.MonkeyPatch, batched: bool | None, sizes: list[int]) -> None:
    """``batched=None`` adapts one by one on a CPU (``default_batched``); True groups same shapes."""
    seen: list[int] = []
    real = maml_module.group_loss
    monkeypatch.setattr(maml_module, "group_loss",
                        lambda net, group, *a: seen.append(len(group)) or real(net, group, *a))
    gen = torch.Generator().manual_seed(10)
    MAML(ToyNet(), inner_steps=1, batched=batched).meta_step([quadrant_episode(gen) for _ in range(3)])
    assert seen == sizes


class NormNet(nn.Module):
    """conv -> InstanceNorm (affine) -> LayerNorm over (C, H, W) -> ReLU -> mean pool: the other
    norms whose vmapped second-order gradients ``AffineApart`` corrects."""

    out_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.lnorm = nn.LayerNorm((4, 4, 4))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.lnorm(self.inorm(self.conv(x)))).mean((2, 3))


def test_grouped_second_order_with_instance_and_layer_norm() -> None:
    torch.manual_seed(9)
    net = NormNet().double()
    with torch.no_grad():  # affine parameters away from (1, 0), so that a wrong broadcast shows
        for m in (net.inorm, net.lnorm):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    eps = grouped_episodes(9)
    maml_loss(net, eps, 2, 1.0, first_order=False, batched=False).backward()
    one_by_one = grads_of(net)
    net.zero_grad()
    maml_loss(net, eps, 2, 1.0, first_order=False).backward()
    assert_close(grads_of(net), one_by_one)


def test_grouped_meta_sgd_gradients_equal_one_by_one() -> None:
    """Second-order Meta-SGD on the mixed meta-batch: the rates' meta-gradients too."""
    torch.manual_seed(7)
    net = SmallNet(bn=True).double()
    maml = MAML(net, inner_steps=2, inner_lr=1.0, first_order=False, meta_sgd=True, batched=True)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for v in maml.inner_lrs.values():
            v.mul_(torch.rand(v.shape, generator=gen, dtype=v.dtype) + 0.5)
    eps = grouped_episodes(7)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    lrs = {k: v.detach().clone().requires_grad_(True) for k, v in maml.inner_lrs.items()}
    _, ref_grads = reference_meta_gradient(params, lrs, eps, 2, first_order=False)
    maml.meta_step(eps)
    assert_close(grads_of(net) | {f"lr:{k}": v.grad for k, v in maml.inner_lrs.items()}, ref_grads)


def test_grouped_meta_step_keeps_running_stats_and_runs_dropout() -> None:
    """A vmapped group leaves running statistics, their counters, the BN flags and the modes as they
    were; dropout in train mode draws under vmap (a mask per episode)."""
    net = nn.Sequential(ToyNet(), nn.Dropout(0.5))
    net.out_features = ToyNet.out_features
    net.eval()
    before = copy.deepcopy(net.state_dict())
    gen = torch.Generator().manual_seed(8)
    eps = [quadrant_episode(gen) for _ in range(3)]
    assert len(shape_groups(eps)) == 1
    assert math.isfinite(MAML(net, inner_steps=2, batched=True).meta_step(eps))
    assert not any(m.training for m in net.modules())
    assert all(m.track_running_stats for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    for k, v in net.state_dict().items():
        if "running" in k or "num_batches" in k:
            assert torch.equal(v, before[k]), k


def quadrant_episode(gen: torch.Generator, n: int = 3, shots: int = 2, queries: int = 4) -> Episode:
    """Toy task: class c lights quadrant perm[c]; the class-to-quadrant map changes per episode."""
    perm = torch.randperm(4, generator=gen)[:n]

    def draw(count: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(n).repeat_interleave(count)
        x = 0.3 * torch.rand(len(y), 1, 8, 8, generator=gen)
        for i, c in enumerate(y.tolist()):
            q = int(perm[c])
            x[i, 0, (q // 2) * 4:(q // 2) * 4 + 4, (q % 2) * 4:(q % 2) * 4 + 4] += 0.7
        return x, y

    sx, sy = draw(shots)
    qx, qy = draw(queries)
    return meta_episode("multi-class", n, sx, sy, qx, qy)


class ToyNet(nn.Module):
    out_features = 16

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 16))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def test_meta_training_lowers_query_loss() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    held_out = [quadrant_episode(gen) for _ in range(8)]
    maml = MAML(ToyNet(), inner_steps=2, inner_lr=0.5, outer_lr=1e-2)
    before = maml_loss(maml.backbone, held_out, 2, 0.5).item()
    for _ in range(6):
        maml.meta_step([quadrant_episode(gen) for _ in range(2)])
    after = maml_loss(maml.backbone, held_out, 2, 0.5).item()
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("meta_sgd", [False, True])
def test_state_dict_resume_is_bit_identical(meta_sgd: bool, batched: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    batches = [[quadrant_episode(gen) for _ in range(2)] for _ in range(3)]
    torch.manual_seed(0)
    a = MAML(ToyNet(), inner_steps=2, inner_lr=0.3, meta_sgd=meta_sgd, batched=batched)
    a.meta_step(batches[0])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    losses_a = [a.meta_step(b) for b in batches[1:]]

    torch.manual_seed(123)  # a different initialisation, overwritten by the load
    b = MAML(ToyNet(), inner_steps=2, inner_lr=0.3, meta_sgd=meta_sgd, batched=batched)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    losses_b = [b.meta_step(bt) for bt in batches[1:]]
    assert losses_a == losses_b
    for (k, va), vb in zip(a.backbone.state_dict().items(), b.backbone.state_dict().values()):
        assert torch.equal(va, vb), k
    for k in a.inner_lrs:
        assert torch.equal(a.inner_lrs[k], b.inner_lrs[k]), k


def test_meta_step_takes_uint8_pixel_episodes_as_their_float_images() -> None:
    gen = torch.Generator().manual_seed(5)
    raw = [quadrant_episode(gen) for _ in range(2)]
    pixels = [dataclasses.replace(ep, support_x=(ep.support_x.clamp(0, 1) * 255).to(torch.uint8),
                                  query_x=(ep.query_x.clamp(0, 1) * 255).to(torch.uint8)) for ep in raw]
    # float images made here, not by Episode.as_float: x / 255 in float32, correctly rounded
    floats = [dataclasses.replace(ep, support_x=torch.from_numpy(ep.support_x.numpy() / np.float32(255)),
                                  query_x=torch.from_numpy(ep.query_x.numpy() / np.float32(255))) for ep in pixels]
    assert floats[0].support_x.dtype == torch.float32
    losses, states = [], []
    for batch in (pixels, floats):
        torch.manual_seed(0)
        maml = MAML(ToyNet(), inner_steps=2, inner_lr=0.3)
        losses.append([maml.meta_step(batch) for _ in range(2)])
        states.append(maml.backbone.state_dict())
    assert pixels[0].support_x.dtype == torch.uint8 and losses[0] == losses[1]
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_meta_step_keeps_running_stats_and_mode() -> None:
    net = ToyNet().eval()
    stats = copy.deepcopy({k: v for k, v in net.state_dict().items() if "running" in k or "num_batches" in k})
    maml = MAML(net, inner_steps=1)
    maml.meta_step([quadrant_episode(torch.Generator().manual_seed(0))])
    assert not net.training and not any(m.training for m in net.modules())
    for k, v in stats.items():
        assert torch.equal(net.state_dict()[k], v), k


@pytest.mark.parametrize("bn_train", [True, False])
def test_maml_adapt_and_predict(bn_train: bool) -> None:
    torch.manual_seed(0)
    net = ToyNet()
    before = copy.deepcopy(net.state_dict())
    maml = MAML(net, bn_train=bn_train, test_steps=8)
    ep = quadrant_episode(torch.Generator().manual_seed(4))
    logits = maml.adapt_and_predict(ep)
    assert logits.shape == (len(ep.query_y), 3) and not logits.requires_grad
    again = maml.adapt_and_predict(ep)
    assert torch.equal(logits, again)
    zero_steps = maml.adapt_and_predict(ep, steps=0)
    assert not zero_steps.any()  # zero head
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def ref_inner_rule(p: dict[str, Tensor], running: tuple[Tensor, Tensor] | None, ep: Episode, steps: int,
                   lr: float) -> Tensor:
    """The inner rule by hand: SmallNet written out, ``steps`` SGD steps with torch.autograd.grad
    on the support loss from a zero head (every tensor at rate ``lr``), then the query's logits.
    BatchNorm normalises with the statistics of the batch at hand (support, then query) when
    ``running`` is None, else with the running (mean, var)."""
    def forward(q: dict[str, Tensor], x: Tensor) -> Tensor:
        h = F.conv2d(x, q["conv.weight"], q.get("conv.bias"), padding=1)
        if "bn.weight" in q:
            mean, var = running if running is not None else (None, None)
            h = F.batch_norm(h, mean, var, q["bn.weight"], q["bn.bias"], training=running is None, eps=1e-5)
        feats = F.linear(F.relu(h).mean((2, 3)), q["fc.weight"], q["fc.bias"])
        return F.linear(feats, q["head.weight"], q["head.bias"])

    q = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
    q["head.weight"] = torch.zeros(ep.num_outputs, 6, dtype=torch.float64, requires_grad=True)
    q["head.bias"] = torch.zeros(ep.num_outputs, dtype=torch.float64, requires_grad=True)
    for _ in range(steps):
        loss = task_loss(ep.task_type, forward(q, ep.support_x), ep.support_y)
        grads = torch.autograd.grad(loss, list(q.values()))
        q = {k: (v - lr * g).detach().requires_grad_(True) for (k, v), g in zip(q.items(), grads)}
    with torch.no_grad():
        return forward(q, ep.query_x)


@pytest.mark.parametrize(("bn", "bn_train"), [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("make", [episodes_pair, mixed_episodes])
def test_inner_rule_matches_hand_unrolled_sgd(bn: bool, bn_train: bool, make) -> None:
    """MAMLInner (``maml.adapt_and_predict``) against ``ref_inner_rule`` in float64, on every task
    type; the running statistics are moved off (0, 1) so that the two BatchNorm modes differ."""
    torch.manual_seed(4)
    net = SmallNet(bn).double()
    if bn:
        with torch.no_grad():
            net.bn.running_mean.uniform_(-1, 1)
            net.bn.running_var.uniform_(0.5, 2)
    running = (net.bn.running_mean.clone(), net.bn.running_var.clone()) if bn and not bn_train else None
    before = copy.deepcopy(net.state_dict())
    for ep in make(5):
        ours = MAMLInner(steps=4, lr=0.5, bn_train=bn_train).predict(net, ep, seed=0)
        ref = ref_inner_rule(dict(net.named_parameters()), running, ep, steps=4, lr=0.5)
        assert ref.abs().max() > 1e-3  # the head moved away from zero
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-10)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_resnet18_meta_step_runs() -> None:
    models = pytest.importorskip("medmeta.learning.models")
    torch.manual_seed(0)
    maml = MAML(models.build_backbone("resnet18", stem="cifar"), inner_steps=1)
    gen = torch.Generator().manual_seed(0)
    ep = meta_episode("binary", 1, torch.rand(2, 1, 28, 28, generator=gen), torch.tensor([0, 1]),
                     torch.rand(2, 1, 28, 28, generator=gen), torch.tensor([0, 1]))
    w0 = maml.backbone.conv1.weight.detach().clone()
    assert math.isfinite(maml.meta_step([ep]))
    assert not torch.equal(w0, maml.backbone.conv1.weight)
    logits = maml.adapt_and_predict(ep, steps=2)
    assert logits.shape == (2, 1)
