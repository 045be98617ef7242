"""Supervised training on one task (the MedMNIST baselines), with the two published recipes.

``SupervisedConfig``'s defaults are MedMNIST v2's recipe: Adam lr 1e-3, 100 epochs, learning
rate x0.1 at 50% and 75% of the epochs, batch 128, the epoch with the best validation AUROC
kept. MedMNIST+'s recipe (``experiments/configs/supervised_plus.yaml``): AdamW lr 1e-4, cosine
schedule, up to 100 epochs, batch 64, early stopping after 5 epochs without a lower validation
loss, the epoch with the lowest validation loss kept.

The trainer checkpoints after every epoch (model, optimiser, schedule, random state, history,
the best state so far, the config) and resumes exactly; a checkpoint of another config is
refused. Batches are read with ``MedMNISTTask.get_batch`` (one gather per batch; a dataset's
``transform``, e.g. MedMNIST+'s zero-padding, applies per image) by a loader thread while the
previous step runs (``runtime.prefetch``; the epoch's order is drawn before, so the batches are
those of reading each in its step, and the thread ends with the epoch, before validation reads
the files); the data pipeline's share of the training time (what the steps waited for their
batches) is recorded.
"""
from __future__ import annotations

import copy
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from .. import distributed
from ..data.tasks import MedMNISTTask, to_device
from ..files import torch_save_atomic
from ..settings import Settings, setting
from .models import train_mode
from .runtime import Precision, autocast, check_identity, checkpoint_identity, predict, prefetch


@dataclass
class SupervisedConfig(Settings):
    """A supervised training recipe (defaults: MedMNIST v2's, see the module docstring)."""

    epochs: int = setting(100, min=1)
    batch_size: int = setting(128, min=1)
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = setting(1e-3, above=0)
    weight_decay: float = setting(0.0, min=0)
    schedule: Literal["multistep", "cosine"] = "multistep"
    milestones: tuple[float, float] = (0.5, 0.75)
    """Fractions of the epochs where a multistep schedule divides the learning rate by 10."""
    select: Literal["val_auroc", "val_loss"] = "val_auroc"
    """Which validation score picks the epoch that is kept."""
    patience: int | None = setting(None, min=1)
    """Stop after this many epochs without a better ``select`` score; None trains every epoch."""
    precision: Precision = "auto"


def epoch_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """``order`` in consecutive batches of ``batch_size``; a last batch of one sample joins the one
    before it (BatchNorm cannot train on a single sample with 1x1 features: 34,561 OrganA images
    in batches of 128 leave one)."""
    starts = list(range(0, len(order), batch_size))
    if len(starts) > 1 and len(order) - starts[-1] == 1:
        starts.pop()
    return [order[a:b] for a, b in zip(starts, starts[1:] + [len(order)])]


def _better(select: str, score: float, best: float | None) -> bool:
    if best is None:
        return True
    return score > best if select == "val_auroc" else score < best


class SupervisedTrainer:
    """Trains ``model`` (images -> logits) on one task's train split, selecting on its val split."""

    def __init__(self, model: nn.Module, train: MedMNISTTask, val: MedMNISTTask, config: SupervisedConfig,
                 device: torch.device, seed: int = 0, checkpoint: Path | None = None,
                 writer: SummaryWriter | None = None, context: dict[str, Any] | None = None,
                 prefetch_batches: bool = True) -> None:
        """``context``: what else the model depends on (architecture, input size...), bound into
        the checkpoint's identity with the recipe, so a changed setting never resumes another's model.
        ``prefetch_batches=False`` reads each batch in its step (the same batches; for benchmarks
        that compare)."""
        self.model, self.train, self.val, self.config, self.device, self.seed = model.to(device), train, val, config, device, seed
        self.prefetch_batches = prefetch_batches
        self.context = dict(context or {})
        self.checkpoint, self.writer = checkpoint, writer
        torch.manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        params = model.parameters()
        self.opt = (torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay) if config.optimizer == "adam"
                    else torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay))
        steps = len(epoch_batches(np.arange(len(train)), config.batch_size)) * config.epochs
        self.sched: torch.optim.lr_scheduler.LRScheduler = (
            torch.optim.lr_scheduler.MultiStepLR(self.opt, [int(m * steps) for m in config.milestones], gamma=0.1)
            if config.schedule == "multistep" else torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=steps))
        self.epoch, self.bad_epochs, self.seconds, self.data_seconds = 0, 0, 0.0, 0.0
        self.best: dict[str, Any] = {}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, float]] = []
        if checkpoint is not None and checkpoint.is_file():
            self.load(checkpoint)

    @property
    def identity(self) -> dict[str, Any]:
        return checkpoint_identity(self.config, self.device, task=self.train.task.task_id, size=self.train.task.size,
                                   seed=self.seed, **self.context)

    def run(self, on_epoch: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Train until the last epoch or early stopping; load the selected epoch's weights; return
        its validation scores, the history and the times."""
        cfg = self.config
        with distributed.progress(total=cfg.epochs, initial=self.epoch, desc=f"train {self.train.task.task_id}",
                                  unit="epoch") as bar:
            while self.epoch < cfg.epochs and (cfg.patience is None or self.bad_epochs < cfg.patience):
                self._epoch()
                bar.update(1)
                bar.set_postfix(loss=f"{self.history[-1]['loss']:.3f}", val_auroc=f"{self.history[-1]['val_auroc']:.3f}")
                if self.checkpoint is not None:
                    torch_save_atomic(self.state_dict(), self.checkpoint)
                if on_epoch is not None:
                    on_epoch(self.epoch)
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return {**self.best, "history": self.history, "seconds": self.seconds,
                "data_share": self.data_seconds / max(self.seconds, 1e-9)}

    def _epoch(self) -> None:
        cfg, task_type = self.config, self.train.task.task_type
        clock = time.perf_counter()
        self.model.train()
        order = self.rng.permutation(len(self.train))
        losses = []
        batches = epoch_batches(order, cfg.batch_size)
        gathered = (self.train.host_batch(np.sort(batch), self.device) for batch in batches)
        with closing(prefetch(gathered) if self.prefetch_batches else gathered) as source:
            for _ in batches:
                data_clock = time.perf_counter()
                x, y = to_device(next(source), self.device)
                self.data_seconds += time.perf_counter() - data_clock
                with autocast(self.device, cfg.precision):
                    loss = task_type.loss(self.model(x).float(), y)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                self.sched.step()
                losses.append(loss.item())
        self.epoch += 1
        with train_mode(self.model, False):
            logits, labels = predict(self.model, self.val, self.device, precision=cfg.precision)
        scores = task_type.evaluate(labels, logits)
        val_loss = float(task_type.loss(torch.from_numpy(logits).float(), torch.from_numpy(labels).to(task_type.label_dtype)))
        record = {"epoch": self.epoch, "loss": float(np.mean(losses)), "val_loss": val_loss,
                  "val_auroc": scores["auroc"], "val_acc": scores["acc"]}
        self.history.append(record)
        if self.writer is not None:
            for key in ("loss", "val_loss", "val_auroc", "val_acc"):
                self.writer.add_scalar(f"supervised/{key}", record[key], self.epoch)
        if _better(cfg.select, record[cfg.select], self.best.get(cfg.select)):
            self.best, self.bad_epochs = dict(record), 0
            self.best_state = copy.deepcopy(self.model.state_dict())
        else:
            self.bad_epochs += 1
        self.seconds += time.perf_counter() - clock

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "epoch": self.epoch, "bad_epochs": self.bad_epochs, "best": self.best, "best_state": self.best_state,
                "history": self.history, "rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                "seconds": self.seconds, "data_seconds": self.data_seconds, "identity": self.identity}

    def load(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        check_identity(path, state.get("identity"), self.identity)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.epoch, self.bad_epochs, self.best = state["epoch"], state["bad_epochs"], state["best"]
        self.best_state, self.history = state["best_state"], state["history"]
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        self.seconds, self.data_seconds = state["seconds"], state["data_seconds"]


def train_supervised(model: nn.Module, train: MedMNISTTask, val: MedMNISTTask, config: SupervisedConfig,
                     device: torch.device, seed: int = 0, checkpoint: Path | None = None,
                     writer: SummaryWriter | None = None, context: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train and keep the selected epoch (see ``SupervisedTrainer``)."""
    return SupervisedTrainer(model, train, val, config, device, seed, checkpoint, writer, context).run()
