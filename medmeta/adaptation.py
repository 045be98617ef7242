"""Few-shot fine-tuning for the evaluation protocol (MedIMeta section 2 of the reference notes).

Every episode gets a copy of the backbone plus a fresh linear head, fine-tuned with Adam on the
full support batch, then predicts the query. Two implementations give the same logits:

* ``adapt_and_predict``: one episode at a time, ordinary modules and ``torch.optim.Adam``.
* ``adapt_many``: many same-shaped episodes at once, ``torch.func.vmap`` over stacked copies of
  the parameters and buffers, with Adam written out on the stacked tensors.

``adapt_episodes`` is the front door: it picks the faster path for the backbone's device.

BatchNorm (the same in both paths): fine-tuning steps run in train mode, so BN normalises with
support-batch statistics and updates its running statistics (momentum as set on each layer);
the query is then predicted in eval mode with those updated running statistics. Query
predictions are therefore inductive: a query image's logits do not depend on the other query
images. With ``head_only=True`` (a linear probe) the backbone's weights are frozen and only the
head is trained, on features computed once in eval mode. Its BatchNorm running statistics are
first re-estimated on the support set (``models.reestimate_batchnorm``): a pretrained
backbone's own statistics belong to its pretraining data (for mm-PT, mostly to the source task
trained last), and mm-PT's validation uses the same rule, per source task.

Heads: ``nn.Linear``'s default initialisation (weight kaiming-uniform with a=sqrt(5), i.e.
U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias the same bound), drawn from a ``torch.Generator``
seeded with the episode's seed on the CPU, so a seed gives the same head on every device.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .manifest import TASK_TYPES
from .models import reestimate_batchnorm


Episode = tuple[Tensor, Tensor, Tensor]

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def task_loss(task_type: str, logits: Tensor, y: Tensor) -> Tensor:
    """Mean loss by task type: BCE on one logit (binary), CE (multi-class, ordinal), BCE per label."""
    if task_type == "binary":
        return F.binary_cross_entropy_with_logits(logits.reshape(-1), y.reshape(-1).to(logits.dtype))
    if task_type in ("multi-class", "ordinal"):
        return F.cross_entropy(logits, y)
    if task_type == "multi-label":
        return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))
    raise ValueError(f"unknown task type {task_type!r}; expected one of {TASK_TYPES}")


def feature_dim(backbone: nn.Module, example: Tensor) -> int:
    """Width of the backbone's features: ``out_features`` if set, else one eval-mode forward."""
    width = getattr(backbone, "out_features", None)
    if width is not None:
        return int(width)
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        width = backbone(example[:1]).shape[-1]
    backbone.train(was_training)
    return int(width)


def fresh_head(in_features: int, num_outputs: int, seed: int,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A linear head with ``nn.Linear``'s default init, drawn on the CPU from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(in_features)
    head = nn.Linear(in_features, num_outputs, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.empty(num_outputs, in_features, dtype=dtype).uniform_(-bound, bound, generator=gen))
        head.bias.copy_(torch.empty(num_outputs, dtype=dtype).uniform_(-bound, bound, generator=gen))
    return head.to(device)


def _device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def adapt_and_predict(backbone: nn.Module, task_type: str, num_outputs: int,
                      support_x: Tensor, support_y: Tensor, query_x: Tensor,
                      steps: int = 50, lr: float = 1e-3, head_only: bool = False,
                      seed: int = 0) -> Tensor:
    """Fine-tune a copy of ``backbone`` plus a fresh head on the support set; query logits (Nq, num_outputs).

    The caller's backbone is never modified. Deterministic given ``seed`` (which seeds the head).
    """
    device, dtype = _device_dtype(backbone)
    sx, sy, qx = support_x.to(device), support_y.to(device), query_x.to(device)
    net = copy.deepcopy(backbone).requires_grad_(True)
    head = fresh_head(feature_dim(net, sx), num_outputs, seed, device, dtype)
    if head_only:
        support_feats, query_feats = _frozen_features(net, sx, qx)
        opt = torch.optim.Adam(head.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            task_loss(task_type, head(support_feats), sy).backward()
            opt.step()
        with torch.no_grad():
            return head(query_feats)
    model = nn.Sequential(net, head).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        task_loss(task_type, model(sx), sy).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return model(qx)


def _frozen_features(net: nn.Module, support_x: Tensor, query_x: Tensor) -> tuple[Tensor, Tensor]:
    """Support and query features of ``net`` (changed in place: pass a copy) in eval mode, with
    BatchNorm statistics re-estimated on the support set."""
    reestimate_batchnorm(net, [support_x])
    net.eval()
    with torch.no_grad():
        return net(support_x), net(query_x)


class StackedAdam:
    """``torch.optim.Adam`` (default betas and eps, no weight decay) on a dict of stacked tensors.

    Element-wise identical to the single-tensor ``torch.optim.Adam`` update, so each slice of a
    stacked parameter follows exactly the trajectory its own optimizer would.
    """

    def __init__(self, params: dict[str, Tensor], lr: float) -> None:
        self.params, self.lr, self.t = params, lr, 0
        self.exp_avg = {k: torch.zeros_like(v) for k, v in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(v) for k, v in params.items()}

    @torch.no_grad()
    def step(self, grads: dict[str, Tensor]) -> None:
        """One Adam update of ``self.params`` in place from ``grads``."""
        beta1, beta2 = ADAM_BETAS
        self.t += 1
        step_size = self.lr / (1 - beta1 ** self.t)
        bias_correction2_sqrt = (1 - beta2 ** self.t) ** 0.5
        for k, p in self.params.items():
            g, m, v = grads[k], self.exp_avg[k], self.exp_avg_sq[k]
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            p.addcdiv_(m, (v.sqrt() / bias_correction2_sqrt).add_(ADAM_EPS), value=-step_size)


def _stack(tensors: Sequence[Tensor]) -> Tensor:
    return torch.stack(list(tensors)).contiguous()


def _repeat(t: Tensor, n: int) -> Tensor:
    return t.detach().unsqueeze(0).expand(n, *t.shape).clone()


def adapt_many(backbone: nn.Module, task_type: str, num_outputs: int, episodes: Sequence[Episode],
               steps: int = 50, lr: float = 1e-3, head_only: bool = False,
               seeds: Sequence[int] | None = None, chunk_size: int | None = None) -> list[Tensor]:
    """``adapt_and_predict`` for many same-shaped episodes at once, vmapped over stacked copies.

    ``episodes`` are (support_x, support_y, query_x) tuples with identical shapes; ``seeds``
    (default 0..E-1) seed the heads as in ``adapt_and_predict``, whose logits this reproduces.
    ``chunk_size`` bounds memory: at most that many episodes are adapted together.
    """
    seeds = list(range(len(episodes))) if seeds is None else list(seeds)
    if len(seeds) != len(episodes):
        raise ValueError(f"{len(seeds)} seeds for {len(episodes)} episodes")
    shapes = {tuple(t.shape for t in ep) for ep in episodes}
    if len(shapes) > 1:
        raise ValueError(f"adapt_many needs same-shaped episodes, got {len(shapes)} shapes; use adapt_episodes")
    size = chunk_size or max(len(episodes), 1)
    out: list[Tensor] = []
    for start in range(0, len(episodes), size):
        out.extend(_adapt_chunk(backbone, task_type, num_outputs, episodes[start:start + size],
                                steps, lr, head_only, seeds[start:start + size]))
    return out


def _adapt_chunk(backbone: nn.Module, task_type: str, num_outputs: int, episodes: Sequence[Episode],
                 steps: int, lr: float, head_only: bool, seeds: Sequence[int]) -> list[Tensor]:
    """Adapt one chunk of episodes together; see ``adapt_many``."""
    device, dtype = _device_dtype(backbone)
    sx = _stack([ep[0] for ep in episodes]).to(device)
    sy = _stack([ep[1] for ep in episodes]).to(device)
    qx = _stack([ep[2] for ep in episodes]).to(device)
    n = sx.shape[0]
    net = copy.deepcopy(backbone)
    width = feature_dim(net, sx[0])
    heads = [fresh_head(width, num_outputs, s, device, dtype) for s in seeds]

    if head_only:
        feats = [_frozen_features(copy.deepcopy(backbone), s, q) for s, q in zip(sx, qx)]
        support_feats = _stack([f[0] for f in feats])
        query_feats = _stack([f[1] for f in feats])
        params = {"weight": _stack([h.weight.detach() for h in heads]),
                  "bias": _stack([h.bias.detach() for h in heads])}

        def head_loss(p: dict[str, Tensor], feats: Tensor, y: Tensor) -> Tensor:
            return task_loss(task_type, F.linear(feats, p["weight"], p["bias"]), y)

        step_fn: Callable = vmap(grad(head_loss))
        opt = StackedAdam(params, lr)
        for _ in range(steps):
            opt.step(step_fn(params, support_feats, sy))
        with torch.no_grad():
            return list(torch.baddbmm(params["bias"].unsqueeze(1), query_feats, params["weight"].transpose(1, 2)))

    model = nn.Sequential(net, heads[0])
    params = {k: _repeat(v, n) for k, v in model.named_parameters()}
    params["1.weight"] = _stack([h.weight.detach() for h in heads])
    params["1.bias"] = _stack([h.bias.detach() for h in heads])
    buffers = {k: _repeat(v, n) for k, v in model.named_buffers()}

    def support_loss(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor, y: Tensor
                     ) -> tuple[Tensor, dict[str, Tensor]]:
        # BN updates running stats in place; do it on per-call copies and hand them back as aux.
        b = {k: v.clone() for k, v in b.items()}
        return task_loss(task_type, functional_call(model, (p, b), (x,)), y), b

    def predict(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, (p, b), (x,))

    step_fn = vmap(grad(support_loss, has_aux=True))
    opt = StackedAdam(params, lr)
    model.train()
    for _ in range(steps):
        grads, buffers = step_fn(params, buffers, sx, sy)
        opt.step(grads)
    model.eval()
    with torch.no_grad():
        return list(vmap(predict)(params, buffers, qx))


def default_batched(device: torch.device) -> bool:
    """Whether ``adapt_episodes`` vmaps on this device: on CUDA only.

    Measured with benchmarks/maml.py on 2 CPU cores (ResNet-18, cifar stem, 28px, 3-way
    3-shot, 8 episodes x 5 steps): one-by-one 8.4 s / 0.29 GiB peak, vmapped 13.9 s / 2.7 GiB.
    CPU convolutions are already compute-bound, so batching only adds copies and memory.
    On CUDA, vmapping turns many small kernel launches into few large ones.
    """
    return device.type == "cuda"


def adapt_episodes(backbone: nn.Module, task_type: str, num_outputs: int, episodes: Sequence[Episode],
                   steps: int = 50, lr: float = 1e-3, head_only: bool = False,
                   seeds: Sequence[int] | None = None, batched: bool | None = None,
                   chunk_size: int | None = None) -> list[Tensor]:
    """Query logits for every episode, one-by-one or vmapped (``batched=None``: by device).

    Episodes may differ in shape; batched mode groups same-shaped episodes. The logits are the
    same either way (up to float rounding), and the same as ``adapt_and_predict`` per episode.
    """
    seeds = list(range(len(episodes))) if seeds is None else list(seeds)
    if len(seeds) != len(episodes):
        raise ValueError(f"{len(seeds)} seeds for {len(episodes)} episodes")
    if batched is None:
        batched = default_batched(_device_dtype(backbone)[0])
    if not batched:
        return [adapt_and_predict(backbone, task_type, num_outputs, *ep, steps=steps, lr=lr,
                                  head_only=head_only, seed=s) for ep, s in zip(episodes, seeds)]
    groups: dict[tuple, list[int]] = {}
    for i, ep in enumerate(episodes):
        groups.setdefault(tuple(t.shape for t in ep), []).append(i)
    out: list[Tensor | None] = [None] * len(episodes)
    for idx in groups.values():
        logits = adapt_many(backbone, task_type, num_outputs, [episodes[i] for i in idx], steps, lr,
                            head_only, [seeds[i] for i in idx], chunk_size)
        for i, lg in zip(idx, logits):
            out[i] = lg
    return out  # type: ignore[return-value]
