"""Few-shot fine-tuning and frozen features: the building blocks of the adaptation rules.

Fine-tuning (MedIMeta's adaptation, reference section 2): a copy of the backbone plus a linear
head (fresh, or given), trained together with Adam on the full support batch, then the query
is predicted. Two implementations give the same logits:

* ``fine_tune``: one episode at a time, ordinary modules and ``torch.optim.Adam``. Many
  episodes reuse one working copy of the backbone (its state is reloaded per episode, no
  ``deepcopy`` each time).
* ``fine_tune_many``: many same-shaped episodes at once, ``torch.func.vmap`` over stacked
  copies of the parameters and buffers, with Adam written out on the stacked tensors.

``fine_tune_episodes`` is the front door: it picks the faster path for the device.

BatchNorm (the same in both paths): fine-tuning steps run in train mode, so BN normalises with
support-batch statistics and updates its running statistics (momentum as set on each layer);
the query is then predicted in eval mode with those updated running statistics. Query
predictions are therefore inductive: a query image's logits do not depend on the other query
images.

``frozen_features``: the backbone's weights are frozen and its BatchNorm statistics are taken
as ``bn`` says (``BNMode``): ``own``, its running statistics (eval mode, untouched); ``support``,
re-estimated on the episode's support set (``models.reestimate_batchnorm``); ``transductive``,
on support and query together (the query's statistics are used: transductive, labelled so in
results); ``sources``, the running statistics ``source_statistics`` recomputed once on a balanced
sample of the sources' training images (the protocol hands over that backbone; the features are
then read as with ``own``). Which to use is an empirical question: a pretrained backbone's own
statistics fit its features, but mm-PT's follow the source task it trained last, and a random
backbone's mean nothing; 10 support images give each channel 10 numbers at 28px's 1x1 maps.
The rules resolve ``bn="auto"`` by the initialisation (``Initialisation.frozen_bn``).

Heads: ``nn.Linear``'s default initialisation (weight kaiming-uniform with a=sqrt(5), i.e.
U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias the same bound), drawn from a ``torch.Generator``
seeded with the episode's seed on the CPU, so a seed gives the same head on every device.
"""
from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

import numpy as np

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ..data.tasks import MedMNISTTask
from ..episodes import Episode
from .models import reestimate_batchnorm, train_mode

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
HeadState = dict[str, Tensor]
"""A linear head as ``{"weight": (out, in), "bias": (out,)}``."""


def feature_dim(backbone: nn.Module, example: Tensor) -> int:
    """Width of the backbone's features: ``out_features`` if set, else one eval-mode forward."""
    width = getattr(backbone, "out_features", None)
    if width is not None:
        return int(width)
    with train_mode(backbone, False), torch.no_grad():
        return int(backbone(example[:1]).shape[-1])


def fresh_head(in_features: int, num_outputs: int, seed: int, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A linear head with ``nn.Linear``'s default init, drawn on the CPU from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(in_features)
    head = nn.Linear(in_features, num_outputs, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.empty(num_outputs, in_features, dtype=dtype).uniform_(-bound, bound, generator=gen))
        head.bias.copy_(torch.empty(num_outputs, dtype=dtype).uniform_(-bound, bound, generator=gen))
    return head.to(device)


def device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of a module's parameters."""
    p = next(module.parameters())
    return p.device, p.dtype


def _on(episode: Episode, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    return episode.support_x.to(device), episode.support_y.to(device), episode.query_x.to(device)


class WorkingCopy:
    """One reusable copy of a backbone: ``reset()`` reloads the original's state in place.

    Rules that change the network per episode use it instead of a ``deepcopy`` per episode.
    """

    def __init__(self, backbone: nn.Module) -> None:
        self.original = backbone
        self.net = copy.deepcopy(backbone).requires_grad_(True)

    def reset(self) -> nn.Module:
        """The working copy in train mode, with the original's parameters and buffers loaded in place."""
        with torch.no_grad():
            for dst, src in zip(self.net.parameters(), self.original.parameters()):
                dst.copy_(src)
            for dst, src in zip(self.net.buffers(), self.original.buffers()):
                dst.copy_(src)
        return self.net.train()


BNMode = Literal["own", "support", "transductive", "sources"]
"""Where frozen features take their BatchNorm statistics from (see the module docstring)."""
SOURCE_STATISTICS_BATCHES = 8
"""Batches of (up to) ``SOURCE_STATISTICS_BATCH`` training images per source that ``source_statistics`` reads."""
SOURCE_STATISTICS_BATCH = 64


@torch.no_grad()
def frozen_features(net: nn.Module, episode: Episode, bn: BNMode) -> tuple[Tensor, Tensor]:
    """Support and query features in eval mode, with BatchNorm statistics taken as ``bn`` says
    (see the module docstring). ``net`` is changed in place (its running statistics): pass a copy."""
    sx, _, qx = _on(episode, device_dtype(net)[0])
    if bn == "support":
        reestimate_batchnorm(net, [sx])
    elif bn == "transductive":
        reestimate_batchnorm(net, [torch.cat([sx, qx])])
    net.eval()
    return net(sx), net(qx)


@torch.no_grad()
def source_statistics(backbone: nn.Module, train: Mapping[str, MedMNISTTask], seed: int) -> nn.Module:
    """A copy of ``backbone`` whose BatchNorm running statistics are those of a balanced sample of
    the sources' training images: ``SOURCE_STATISTICS_BATCHES`` batches of up to
    ``SOURCE_STATISTICS_BATCH`` images from each source, every batch's statistics weighted alike,
    so each source counts the same whatever its size (mm-PT's own statistics follow the task it
    trained last). The sample is drawn from ``seed`` and each task's name."""
    net = copy.deepcopy(backbone)
    device = device_dtype(net)[0]

    def batches() -> Iterator[Tensor]:
        for task_id in sorted(train):
            ds = train[task_id]
            rng = np.random.default_rng([seed, zlib.crc32(task_id.encode())])
            order = rng.permutation(len(ds))[:SOURCE_STATISTICS_BATCHES * SOURCE_STATISTICS_BATCH]
            for part in np.array_split(order, SOURCE_STATISTICS_BATCHES):  # as many batches from each source
                if len(part) > 1:
                    yield ds.get_batch(np.sort(part), device)[0]

    reestimate_batchnorm(net, batches())
    return net.eval()


def fine_tune(work: WorkingCopy, episode: Episode, steps: int, lr: float, seed: int,
              head: HeadState | None = None, bf16: bool = False) -> Tensor:
    """Fine-tune the backbone plus a head (fresh from ``seed``, or ``head``) on the support set;
    return the query logits (Nq, num_outputs). The original backbone is never modified.
    ``bf16``: autocast the training steps to bfloat16 (the query is predicted in float32)."""
    net = work.reset()
    device, dtype = device_dtype(net)
    sx, sy, qx = _on(episode, device)
    linear = fresh_head(feature_dim(net, sx), episode.num_outputs, seed, device, dtype)
    if head is not None:
        linear.load_state_dict(head)
    model = nn.Sequential(net, linear).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=device.type in ("cpu", "cuda"))
    loss_fn = episode.task_type.loss
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(sx)
        loss_fn(logits.to(dtype), sy).backward()
        opt.step()
    model.eval()
    with torch.inference_mode():
        return model(qx)


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


def _shape_key(episode: Episode) -> tuple:
    return (episode.task_type, episode.num_outputs, tuple(episode.support_x.shape), tuple(episode.support_y.shape),
            tuple(episode.query_x.shape))


def fine_tune_many(backbone: nn.Module, episodes: Sequence[Episode], steps: int, lr: float,
                   seeds: Sequence[int], chunk_size: int | None = None,
                   heads: Sequence[HeadState] | None = None) -> list[Tensor]:
    """``fine_tune`` for many same-shaped episodes at once, vmapped over stacked copies.

    Reproduces ``fine_tune``'s logits (up to float rounding). ``chunk_size`` bounds memory: at
    most that many episodes are adapted together.
    """
    if len(seeds) != len(episodes):
        raise ValueError(f"{len(seeds)} seeds for {len(episodes)} episodes")
    if len({_shape_key(e) for e in episodes}) > 1:
        raise ValueError("fine_tune_many needs same-shaped episodes of one task type; use fine_tune_episodes")
    size = chunk_size or max(len(episodes), 1)
    out: list[Tensor] = []
    for a in range(0, len(episodes), size):
        out.extend(_fine_tune_chunk(backbone, episodes[a:a + size], steps, lr, seeds[a:a + size],
                                    None if heads is None else heads[a:a + size]))
    return out


def _fine_tune_chunk(backbone: nn.Module, episodes: Sequence[Episode], steps: int, lr: float,
                     seeds: Sequence[int], heads: Sequence[HeadState] | None) -> list[Tensor]:
    device, dtype = device_dtype(backbone)
    sx = _stack([e.support_x for e in episodes]).to(device)
    sy = _stack([e.support_y for e in episodes]).to(device)
    qx = _stack([e.query_x for e in episodes]).to(device)
    n = sx.shape[0]
    width = feature_dim(backbone, sx[0])
    if heads is None:
        linears = [fresh_head(width, episodes[0].num_outputs, s, device, dtype) for s in seeds]
        heads = [{"weight": h.weight.detach(), "bias": h.bias.detach()} for h in linears]
    model = nn.Sequential(backbone, nn.Linear(width, episodes[0].num_outputs, device=device, dtype=dtype))
    params = {k: _repeat(v, n) for k, v in model.named_parameters() if not k.startswith("1.")}
    params["1.weight"] = _stack([h["weight"].to(device, dtype) for h in heads])
    params["1.bias"] = _stack([h["bias"].to(device, dtype) for h in heads])
    buffers = {k: _repeat(v, n) for k, v in model.named_buffers()}
    loss_fn = episodes[0].task_type.loss

    def support_loss(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor, y: Tensor
                     ) -> tuple[Tensor, dict[str, Tensor]]:
        # BN updates running stats in place; do it on per-call copies and hand them back as aux.
        b = {k: v.clone() for k, v in b.items()}
        return loss_fn(functional_call(model, (p, b), (x,)), y), b

    def predict(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, (p, b), (x,))

    step_fn = vmap(grad(support_loss, has_aux=True))
    opt = StackedAdam(params, lr)
    with train_mode(model, True):
        for _ in range(steps):
            grads, buffers = step_fn(params, buffers, sx, sy)
            opt.step(grads)
    with train_mode(model, False), torch.no_grad():
        return list(vmap(predict)(params, buffers, qx))


BATCHED_MAX_PIXELS = 64 * 64
"""Largest image (pixels per channel) whose episodes are vmapped on CUDA by default."""


def default_batched(device: torch.device, images: Tensor) -> bool:
    """Whether ``fine_tune_episodes`` vmaps episodes of these images on this device: on CUDA,
    for 2D images up to 64x64.

    Measured (benchmarks/gpu.py, docs/results/gpu/): on an H200, vmapping 25 episodes at 28px is
    4.0-4.7x faster than one by one (small kernels: launches dominate), at 224px 0.70-0.76x (the
    kernels are already large; vmap's grouped convolutions are slower). 64px is between the two
    and unmeasured. On 2 CPU cores convolutions are compute-bound and batching only adds copies
    and memory (about 0.5x the speed at 10x the memory).
    """
    return device.type == "cuda" and images.dim() == 4 and images.shape[-1] * images.shape[-2] <= BATCHED_MAX_PIXELS


def fine_tune_episodes(backbone: nn.Module, episodes: Sequence[Episode], steps: int, lr: float,
                       seeds: Sequence[int], batched: bool | None = None, chunk_size: int | None = None,
                       heads: Sequence[HeadState] | None = None, bf16: bool = False) -> list[Tensor]:
    """Query logits for every episode, one by one or vmapped (``batched=None``: by device).

    Episodes may differ in shape; batched mode groups same-shaped episodes. The logits are the
    same either way (up to float rounding). ``bf16`` (one by one only) autocasts the steps.
    """
    if len(seeds) != len(episodes):
        raise ValueError(f"{len(seeds)} seeds for {len(episodes)} episodes")
    if batched is None:
        batched = bool(episodes) and default_batched(device_dtype(backbone)[0], episodes[0].support_x) and not bf16
    if not batched:
        work = WorkingCopy(backbone)
        return [fine_tune(work, e, steps, lr, s, None if heads is None else heads[i], bf16)
                for i, (e, s) in enumerate(zip(episodes, seeds))]
    if bf16:
        raise ValueError("bf16 fine-tuning runs episode by episode; pass batched=False")
    groups: dict[tuple, list[int]] = {}
    for i, e in enumerate(episodes):
        groups.setdefault(_shape_key(e), []).append(i)
    out: list[Tensor | None] = [None] * len(episodes)
    for idx in groups.values():
        logits = fine_tune_many(backbone, [episodes[i] for i in idx], steps, lr, [seeds[i] for i in idx], chunk_size,
                                None if heads is None else [heads[i] for i in idx])
        for i, lg in zip(idx, logits):
            out[i] = lg
    return out  # type: ignore[return-value]

