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

BatchNorm: with ``bn_train=True`` (default, as in MedIMeta) the backbone runs in train mode in
the inner loop and on the query, so BN normalises with the statistics of the batch at hand
(support, then query: transductive). MAML never changes the backbone's running statistics:
the running-stat update of a train-mode forward goes to a throw-away copy of the buffers.
With ``bn_train=False`` the backbone runs in eval mode and BN uses its existing running
statistics (frozen; meaningful for a pretrained backbone only).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad
from torch.utils.tensorboard import SummaryWriter

from .. import distributed
from ..data.tasks import MedMNISTTask
from ..episodes import Episode, MultiTaskEpisodeSampler
from ..files import torch_save_atomic
from ..settings import Settings, setting
from ..tasktype import TaskType
from .backbones import Start
from .finetune import feature_dim
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


def _logits(backbone: nn.Module, params: Params, buffers: Params, head: Params, x: Tensor) -> Tensor:
    """Functional forward of backbone plus head; buffers are copied so BN cannot write to them."""
    buffers = {k: v.clone() for k, v in buffers.items()} if backbone.training else buffers
    feats = functional_call(backbone, (params, buffers), (x,))
    return F.linear(feats, head["weight"], head["bias"])


def zero_head(width: int, num_outputs: int, like: Tensor) -> Params:
    """A zero linear head (weight (num_outputs, width), bias (num_outputs,)) on ``like``'s device/dtype."""
    return {"weight": like.new_zeros(num_outputs, width), "bias": like.new_zeros(num_outputs)}


def inner_adapt(backbone: nn.Module, params: Params, buffers: Params, task_type: TaskType, num_outputs: int,
                support_x: Tensor, support_y: Tensor, steps: int,
                inner_lr: float | Mapping[str, Tensor], first_order: bool,
                bn_train: bool = MAMLConfig.bn_train) -> tuple[Params, Params]:
    """SGD on the support loss from ``params`` and a zero head; returns (adapted params, head).

    ``inner_lr`` is a float or, for Meta-SGD, a mapping from parameter name (and
    ``head.weight``/``head.bias``) to a learning-rate tensor broadcastable to it.
    Second order keeps the inner gradients on the autograd graph; first order detaches them.
    """
    width = feature_dim(backbone, support_x)
    head = zero_head(width, num_outputs, next(iter(params.values())))

    def support_loss(p: Params, h: Params) -> Tensor:
        return task_type.loss(_logits(backbone, p, buffers, h, support_x), support_y)

    grad_fn = grad(support_loss, argnums=(0, 1))

    def lr_of(name: str) -> float | Tensor:
        return inner_lr if isinstance(inner_lr, (int, float)) else inner_lr[name]

    with train_mode(backbone, bn_train):
        for _ in range(steps):
            if first_order:
                gp, gh = grad_fn({k: v.detach() for k, v in params.items()},
                                 {k: v.detach() for k, v in head.items()})
            else:
                gp, gh = grad_fn(params, head)
            params = {k: v - lr_of(k) * gp[k] for k, v in params.items()}
            head = {k: v - lr_of(f"head.{k}") * gh[k] for k, v in head.items()}
    return params, head


def maml_loss(backbone: nn.Module, episodes: Sequence[Episode], inner_steps: int = MAMLConfig.inner_steps,
              inner_lr: float | Mapping[str, Tensor] = MAMLConfig.inner_lr, first_order: bool = MAMLConfig.first_order,
              bn_train: bool = MAMLConfig.bn_train) -> Tensor:
    """Mean query loss after inner adaptation, differentiable w.r.t. the backbone's parameters.

    Episodes are handled one after the other, so each may have its own way, shot and task type.
    """
    params = dict(backbone.named_parameters())
    buffers = dict(backbone.named_buffers())
    losses = []
    for ep in episodes:
        adapted, head = inner_adapt(backbone, params, buffers, ep.task_type, ep.num_outputs,
                                    ep.support_x, ep.support_y, inner_steps, inner_lr, first_order, bn_train)
        with train_mode(backbone, bn_train):
            logits = _logits(backbone, adapted, buffers, head, ep.query_x)
        losses.append(ep.task_type.loss(logits, ep.query_y))
    return torch.stack(losses).mean()


class MAML:
    """Meta-trainer: backbone, outer Adam, inner-loop settings and optional Meta-SGD rates.

    ``meta_step`` back-propagates episode by episode (the graph of one episode is freed before
    the next is built), which gives the gradient of the mean query loss with the peak memory of
    a single episode.
    """

    def __init__(self, backbone: nn.Module, inner_steps: int = MAMLConfig.inner_steps,
                 inner_lr: float = MAMLConfig.inner_lr, first_order: bool = MAMLConfig.first_order,
                 meta_sgd: bool = False, outer_lr: float = MAMLConfig.outer_lr, bn_train: bool = MAMLConfig.bn_train,
                 test_steps: int = MAMLConfig.test_steps) -> None:
        self.backbone = backbone
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
        for ep in episodes:
            loss = maml_loss(self.backbone, [ep.to(self.device).as_float()], self.inner_steps, self._lr(),
                             self.first_order, self.bn_train) / count
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
        with train_mode(backbone, bn_train):
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
