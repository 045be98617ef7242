"""mm-MAML with ``torch.func``: a meta-learned backbone and a zero-initialised head per episode.

Only the backbone is meta-learned. Each episode gets a linear head of zeros sized to its own
``num_outputs``, which exists only inside the inner loop, so episodes of different way (and
task type) can share a meta-batch. The inner loop takes SGD steps with gradients from
``torch.func.grad`` on a functional loss (``functional_call``):

* second order: the inner gradients stay on the outer autograd graph (create_graph semantics),
  so ``loss.backward()`` differentiates through the whole inner loop;
* first order: the inner gradients are computed on detached values and enter the adapted
  parameters as constants, so the meta-gradient is the query gradient at the adapted
  parameters (the Jacobian of the inner loop is taken as the identity).

Meta-SGD (``meta_sgd=True``) learns one inner learning rate per backbone parameter element and
one per head tensor (weight, bias: scalars, because head sizes vary between episodes).

Batched meta-batches (``batched=True``; ``MAML`` decides by device and image size): episodes of
one shape (task type, way, shot and query counts: the same tensor shapes) adapt together,
``torch.func.vmap`` running the inner loop and the query loss of the whole group at once (fewer,
larger kernels, for a GPU that small images leave launch-bound); the groups' losses are summed,
so a meta-batch may still mix task types and sizes, and a group of one runs without ``vmap``. The
meta-gradient is the one-by-one meta-gradient up to float rounding (tests: float64, first and
second order, mixed task types). Second order under ``vmap`` applies the affine part of batch,
instance and layer norm outside the norm (``_AffineApart``): PyTorch's batching rules give
wrong double-backward gradients for per-episode norm weights. Training episodes draw their way
and shot each (``train_maml``), so a meta-batch of 4 rarely holds two of one shape.

BatchNorm: with ``bn_train=True`` (default, as in MedIMeta) the backbone runs in train mode in
the inner loop and on the query, so BN normalises with the statistics of the batch at hand
(support, then query: transductive). MAML never changes the backbone's running statistics:
while it runs the backbone, every BatchNorm layer's ``track_running_stats`` is off (as
``torch.func.replace_all_batch_norm_modules_`` does, undone afterwards), so train-mode forwards
use batch statistics and update nothing, which ``vmap`` also needs (it refuses an in-place
update of shared running statistics by per-episode values). With ``bn_train=False`` the
backbone runs in eval mode and BN uses its existing running statistics (frozen; meaningful for a
pretrained backbone only).
"""
from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.overrides import TorchFunctionMode
from torch.utils.tensorboard import SummaryWriter

from .. import distributed
from ..data.tasks import MedMNISTTask
from ..episodes import Episode, MultiTaskEpisodeSampler
from ..files import torch_save_atomic
from ..settings import Settings, setting
from ..tasktype import TaskType
from .backbones import Start
from .finetune import default_batched, feature_dim
from .models import train_mode
from .runtime import check_identity, check_steps, checkpoint_identity

Params = dict[str, Tensor]
HEAD_KEYS = ("head.weight", "head.bias")


@dataclass
class MAMLConfig(Settings):
    """mm-MAML settings (MedIMeta: 4 inner SGD steps at lr 0.1 in training, 32 at test, outer Adam
    1e-3). The defaults fit a 2-core CPU (first order, 200 meta-steps); the ``paper`` profile
    has MedIMeta's budget.

    Training episodes: a source task drawn in proportion to its size, N uniform in 2..all
    classes, K uniform in 1..``max_shot``, ``n_query`` queries per class. ``test_steps``,
    ``inner_lr`` and ``bn_train`` also set the ``maml`` method's test-time rule. (Meta-SGD is
    available from ``MAML(meta_sgd=True)`` for code of your own; the protocol does not use it.)
    """

    init: Start = "scratch"
    """Where the backbone starts: random, or the architecture's published weights (``model.weights``)."""
    steps: int = setting(200, min=1)
    meta_batch: int = setting(4, min=1)
    inner_steps: int = setting(4, min=1)
    inner_lr: float = setting(0.1, above=0)
    test_steps: int = setting(32, min=1)
    outer_lr: float = setting(1e-3, above=0)
    first_order: bool = True
    """Second order is exact but about 3x the cost."""
    bn_train: bool = True
    """BatchNorm in train mode on the query (transductive, as MedIMeta)."""
    max_shot: int = setting(10, min=1)
    n_query: int = setting(10, min=1)
    checkpoint_every: int = setting(50, min=1)


@contextmanager
def _batch_statistics(backbone: nn.Module, bn_train: bool) -> Iterator[None]:
    """Train mode (``bn_train``) or eval mode for a block; in train mode BatchNorm normalises with
    the batch's statistics and its running statistics are neither read nor updated (each layer's
    ``track_running_stats`` is off for the block), so they stay as they were and ``vmap`` can run it."""
    layers = [m for m in backbone.modules()
              if bn_train and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    with train_mode(backbone, bn_train):
        for m in layers:
            m.track_running_stats = False
        try:
            yield
        finally:
            for m in layers:
                m.track_running_stats = True


class _AffineApart(TorchFunctionMode):
    """Batch, instance and layer norm computed without their affine transform, which is then
    applied elementwise: the same values. Second-order MAML needs it under ``vmap``: there,
    PyTorch's batching rules give wrong double-backward gradients when the norm's weight and bias
    differ per episode (adapted ones; 1e-4 to 1e-2 off in float64 checks, torch 2.14; cf. functorch issue 534).
    Only calls through ``torch.nn.functional`` (what ``nn`` modules and timm use) are seen."""

    SIGNATURES = {f: inspect.signature(f) for f in (F.batch_norm, F.instance_norm, F.layer_norm)}

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func not in self.SIGNATURES:
            return func(*args, **(kwargs or {}))
        bound = self.SIGNATURES[func].bind(*args, **(kwargs or {}))
        weight, bias = bound.arguments.get("weight"), bound.arguments.get("bias")
        bound.arguments.update(weight=None, bias=None)
        y = func(*bound.args, **bound.kwargs)
        if func is not F.layer_norm:  # per channel (dim 1); layer norm's broadcast over the trailing dims as they are
            weight, bias = (None if t is None else t.reshape(-1, *(1,) * (y.dim() - 2)) for t in (weight, bias))
        if weight is not None:
            y = y * weight
        if bias is not None:
            y = y + bias
        return y


def _logits(backbone: nn.Module, params: Params, buffers: Params, head: Params, x: Tensor) -> Tensor:
    """Functional forward of backbone plus head (buffers as given: ``_batch_statistics`` keeps
    BatchNorm, the only layer of medmeta's backbones that writes buffers, from writing them)."""
    feats = functional_call(backbone, (params, buffers), (x,))
    return F.linear(feats, head["weight"], head["bias"])


def zero_head(width: int, num_outputs: int, like: Tensor) -> Params:
    """A zero linear head (weight (num_outputs, width), bias (num_outputs,)) on ``like``'s device/dtype."""
    return {"weight": like.new_zeros(num_outputs, width), "bias": like.new_zeros(num_outputs)}


def _sgd(backbone: nn.Module, params: Params, buffers: Params, head: Params, task_type: TaskType,
         support_x: Tensor, support_y: Tensor, steps: int, inner_lr: float | Mapping[str, Tensor],
         first_order: bool) -> tuple[Params, Params]:
    """The inner loop proper (the caller sets the backbone's mode): ``steps`` SGD steps on the support loss."""
    def support_loss(p: Params, h: Params) -> Tensor:
        return task_type.loss(_logits(backbone, p, buffers, h, support_x), support_y)

    grad_fn = grad(support_loss, argnums=(0, 1))

    def lr_of(name: str) -> float | Tensor:
        return inner_lr if isinstance(inner_lr, (int, float)) else inner_lr[name]

    for _ in range(steps):
        if first_order:
            gp, gh = grad_fn({k: v.detach() for k, v in params.items()}, {k: v.detach() for k, v in head.items()})
        else:
            gp, gh = grad_fn(params, head)
        params = {k: v - lr_of(k) * gp[k] for k, v in params.items()}
        head = {k: v - lr_of(f"head.{k}") * gh[k] for k, v in head.items()}
    return params, head


def inner_adapt(backbone: nn.Module, params: Params, buffers: Params, task_type: TaskType, num_outputs: int,
                support_x: Tensor, support_y: Tensor, steps: int,
                inner_lr: float | Mapping[str, Tensor], first_order: bool,
                bn_train: bool = MAMLConfig.bn_train) -> tuple[Params, Params]:
    """SGD on the support loss from ``params`` and a zero head; returns (adapted params, head).

    ``inner_lr`` is a float or, for Meta-SGD, a mapping from parameter name (and
    ``head.weight``/``head.bias``) to a learning-rate tensor broadcastable to it.
    Second order keeps the inner gradients on the autograd graph; first order detaches them.
    """
    head = zero_head(feature_dim(backbone, support_x), num_outputs, next(iter(params.values())))
    with _batch_statistics(backbone, bn_train):
        return _sgd(backbone, params, buffers, head, task_type, support_x, support_y, steps, inner_lr, first_order)


def _shape_key(episode: Episode) -> tuple:
    """Episodes with equal keys can be stacked: task type, head width, each tensor's shape and dtype."""
    tensors = (episode.support_x, episode.support_y, episode.query_x, episode.query_y)
    return (episode.task_type, episode.num_outputs, *((tuple(t.shape), t.dtype) for t in tensors))


def shape_groups(episodes: Sequence[Episode], batched: bool = True) -> list[list[Episode]]:
    """The episodes grouped by shape (task type, head width, each tensor's shape and dtype), groups
    in order of their first episode; with ``batched=False`` one group per episode."""
    if not batched:
        return [[ep] for ep in episodes]
    groups: dict[tuple, list[Episode]] = {}
    for ep in episodes:
        groups.setdefault(_shape_key(ep), []).append(ep)
    return list(groups.values())


def group_loss(backbone: nn.Module, episodes: Sequence[Episode], inner_steps: int,
               inner_lr: float | Mapping[str, Tensor], first_order: bool, bn_train: bool) -> Tensor:
    """Sum of the query losses after inner adaptation of same-shaped episodes, adapted together
    (``vmap`` over the episodes; one episode runs as it is). Differentiable w.r.t. the backbone's
    parameters (and Meta-SGD's rates), shared by every episode."""
    first = episodes[0]
    params = dict(backbone.named_parameters())
    buffers = dict(backbone.named_buffers())
    head = zero_head(feature_dim(backbone, first.support_x), first.num_outputs, next(iter(params.values())))

    def query_loss(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        adapted, h = _sgd(backbone, params, buffers, head, first.task_type, sx, sy, inner_steps, inner_lr, first_order)
        return first.task_type.loss(_logits(backbone, adapted, buffers, h, qx), qy)

    data = [[ep.support_x, ep.support_y, ep.query_x, ep.query_y] for ep in episodes]
    with _batch_statistics(backbone, bn_train):
        if len(episodes) == 1:
            return query_loss(*data[0])
        with nullcontext() if first_order else _AffineApart():
            return vmap(query_loss, randomness="different")(*(torch.stack(ts) for ts in zip(*data))).sum()


def maml_loss(backbone: nn.Module, episodes: Sequence[Episode], inner_steps: int = MAMLConfig.inner_steps,
              inner_lr: float | Mapping[str, Tensor] = MAMLConfig.inner_lr, first_order: bool = MAMLConfig.first_order,
              bn_train: bool = MAMLConfig.bn_train, batched: bool = True) -> Tensor:
    """Mean query loss after inner adaptation, differentiable w.r.t. the backbone's parameters.

    Each episode may have its own way, shot and task type; same-shaped ones adapt together
    (``batched=False``: one after another; the same loss and gradient up to float rounding).
    """
    return sum(group_loss(backbone, g, inner_steps, inner_lr, first_order, bn_train)
               for g in shape_groups(episodes, batched)) / len(episodes)


class MAML:
    """Meta-trainer: backbone, outer Adam, inner-loop settings and optional Meta-SGD rates.

    ``meta_step`` back-propagates group by group (``shape_groups``: the graph of one group of
    same-shaped episodes is freed before the next is built), which gives the gradient of the
    mean query loss with the peak memory of the largest group. ``batched``: whether same-shaped
    episodes adapt together (None: by device and image size, the rule measured for fine-tuning,
    ``finetune.default_batched``: on CUDA up to 64x64 images; one by one on a CPU, where it was
    0.6-0.7x the speed for MAML, and on larger images, where vmap's grouped convolutions were slower).
    """

    def __init__(self, backbone: nn.Module, inner_steps: int = MAMLConfig.inner_steps,
                 inner_lr: float = MAMLConfig.inner_lr, first_order: bool = MAMLConfig.first_order,
                 meta_sgd: bool = False, outer_lr: float = MAMLConfig.outer_lr, bn_train: bool = MAMLConfig.bn_train,
                 test_steps: int = MAMLConfig.test_steps, batched: bool | None = None) -> None:
        self.backbone, self.batched = backbone, batched
        self.inner_steps, self.inner_lr, self.first_order = inner_steps, inner_lr, first_order
        self.bn_train, self.test_steps = bn_train, test_steps
        self.inner_lrs: dict[str, nn.Parameter] = {}
        if meta_sgd:
            for name, p in backbone.named_parameters():
                self.inner_lrs[name] = nn.Parameter(torch.full_like(p, inner_lr))
            for name in HEAD_KEYS:
                self.inner_lrs[name] = nn.Parameter(p.new_tensor(inner_lr))
        self.optimizer = torch.optim.Adam(list(backbone.parameters()) + list(self.inner_lrs.values()),
                                          lr=outer_lr)
        self.seconds = 0.0
        """Meta-training time over every session (resumes included)."""

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def _lr(self) -> float | Mapping[str, Tensor]:
        return self.inner_lrs or self.inner_lr

    def meta_step(self, episodes: Sequence[Episode], meta_batch: int | None = None) -> float:
        """One outer Adam step on the mean query loss of a meta-batch; returns that loss.

        ``episodes`` is the whole meta-batch, or under torchrun this rank's share of a meta-batch
        of ``meta_batch`` episodes: the meta-gradients (and the loss) are then summed across
        ranks, which gives every rank the single-process meta-gradient. Episodes of uint8 pixels
        are moved as they are and converted on the model's device.
        """
        count = meta_batch or len(episodes)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        episodes = [ep.to(self.device).as_float() for ep in episodes]
        batched = (self.batched if self.batched is not None
                   else bool(episodes) and default_batched(self.device, episodes[0].support_x))
        for group in shape_groups(episodes, batched):
            loss = group_loss(self.backbone, group, self.inner_steps, self._lr(), self.first_order,
                              self.bn_train) / count
            loss.backward()
            total += loss.detach()
        params = [*self.backbone.parameters(), *self.inner_lrs.values()]
        if distributed.active():
            for q in params:
                if q.grad is None:
                    q.grad = torch.zeros_like(q)
            distributed.all_reduce_sum_([*(q.grad for q in params), total])
        self.optimizer.step()
        return total.item()

    def adapt_and_predict(self, episode: Episode, steps: int | None = None) -> Tensor:
        """Test time: ``steps`` (default ``test_steps``) inner SGD steps from a zero head; query logits."""
        return adapt_and_predict(self.backbone, episode, self.test_steps if steps is None else steps,
                                 {k: v.detach() for k, v in self.inner_lrs.items()} or self.inner_lr, self.bn_train)

    def state_dict(self) -> dict[str, Any]:
        """Backbone, Meta-SGD rates and outer optimizer state: enough for an exact resume."""
        return {"backbone": self.backbone.state_dict(),
                "inner_lrs": {k: v.detach().clone() for k, v in self.inner_lrs.items()},
                "optimizer": self.optimizer.state_dict(), "seconds": self.seconds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` saved (the MAML must be built with the same settings)."""
        self.backbone.load_state_dict(state["backbone"])
        if set(state["inner_lrs"]) != set(self.inner_lrs):
            raise ValueError("Meta-SGD rates in the state do not match this MAML (meta_sgd setting?)")
        with torch.no_grad():
            for k, v in state["inner_lrs"].items():
                self.inner_lrs[k].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.seconds = state["seconds"]


def adapt_and_predict(backbone: nn.Module, episode: Episode, steps: int, lr: float | Mapping[str, Tensor],
                      bn_train: bool = MAMLConfig.bn_train) -> Tensor:
    """MAML's test-time adaptation: ``steps`` SGD steps on the support from a zero head (no
    second-order terms); query logits. ``lr``: a float or Meta-SGD's learned rates."""
    device = next(backbone.parameters()).device
    support_x, support_y, query_x = (t.to(device) for t in (episode.support_x, episode.support_y, episode.query_x))
    params = {k: v.detach() for k, v in backbone.named_parameters()}
    buffers = dict(backbone.named_buffers())
    with torch.no_grad():
        adapted, head = inner_adapt(backbone, params, buffers, episode.task_type, episode.num_outputs, support_x,
                                    support_y, steps, lr, first_order=True, bn_train=bn_train)
        with _batch_statistics(backbone, bn_train):
            return _logits(backbone, adapted, buffers, head, query_x)


def train_maml(backbone: nn.Module, train: Mapping[str, MedMNISTTask], config: MAMLConfig, device: torch.device,
               seed: int = 0, checkpoint: Path | None = None, writer: SummaryWriter | None = None,
               on_step: Callable[[int], None] | None = None) -> MAML:
    """Meta-train ``backbone`` with MAML on variable-way variable-shot episodes of the source tasks.

    Meta-step s uses episodes s * meta_batch ... (s + 1) * meta_batch - 1 of a seeded
    multi-task sampler, so resuming from the checkpoint replays exactly the same episodes.
    On a GPU, without per-image transforms, they are read as uint8 pixels and converted there (the
    same values as a float read; a quarter of the bytes cross the bus and the host does no float
    work). On a CPU that would only move the conversion, so they are read as float32.
    """
    datasets = [train[t] for t in sorted(train)]
    on_gpu = torch.device(device).type == "cuda"
    pixels = torch.uint8 if on_gpu and all(d.transform is None for d in datasets) else torch.float32
    sampler = MultiTaskEpisodeSampler(datasets, k_shot=config.max_shot, n_query=config.n_query,
                                      n_episodes=config.steps * config.meta_batch, seed=seed,
                                      variable=True, min_class_samples=config.max_shot + config.n_query)
    maml = MAML(backbone.to(device), inner_steps=config.inner_steps, inner_lr=config.inner_lr,
                first_order=config.first_order, outer_lr=config.outer_lr,
                bn_train=config.bn_train, test_steps=config.test_steps)
    step = 0
    identity = checkpoint_identity(config, device, tasks=sorted(train), seed=seed)
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        check_identity(checkpoint, state.get("identity"), identity)
        check_steps(checkpoint, state["step"], config.steps)
        maml.load_state_dict(state["maml"])
        step = state["step"]
    writer = writer if distributed.is_main() else None
    mine = distributed.shard(range(config.meta_batch))  # under torchrun, this rank's episodes of each meta-batch
    with distributed.progress(total=config.steps, initial=step, desc="MAML", unit="meta-step") as bar:
        while step < config.steps:
            clock = time.perf_counter()
            loss = maml.meta_step([sampler.episode(step * config.meta_batch + j, dtype=pixels) for j in mine],
                                  meta_batch=config.meta_batch)
            maml.seconds += time.perf_counter() - clock
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if writer is not None:
                writer.add_scalar("maml/query_loss", loss, step)
            if (checkpoint is not None and distributed.is_main()
                    and (step % config.checkpoint_every == 0 or step == config.steps)):
                torch_save_atomic({"maml": maml.state_dict(), "step": step, "identity": identity}, checkpoint)
            if on_step is not None:
                on_step(step)
    return maml
