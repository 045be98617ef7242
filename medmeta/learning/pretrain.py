"""Multi-domain multi-task pretraining (mm-PT).

Batches come from ``MedMNISTTask.get_batch`` (one gather per batch), drawn, gathered and
pinned by a loader thread while the previous step runs (``runtime.prefetch``); scores use
MedMNIST evaluator semantics (``TaskType.evaluate``); progress goes to TensorBoard and the
model that did best on validation AUROC is kept.

mm-PT (MedIMeta, reference section 2): a shared backbone with one linear head per source
task; every batch comes from a single task; the task is drawn with probability proportional
to its training-set size (``sampling="proportional"``), uniformly, or tempered
(size ** (1 / temperature)); the loss fits the task type; ``reweight`` scales each task's
loss by (1 / n_tasks) / p(task) so small tasks are not drowned by large ones. Validation is
the mean AUROC over all source tasks; training stops early when it has not improved for
``patience`` evaluations.

BatchNorm at validation: every batch is single-task, so the running statistics mostly come
from whichever task was trained last, and validating another task with them misjudges it
(0.73 instead of 0.86 AUROC on BreastMNIST). Each task is therefore validated with running
statistics re-estimated on ``bn_batches`` of its own training batches (weights unchanged, the
training statistics restored afterwards), so model selection measures the features.

Checkpoints hold the model, optimiser, every random state, the step and the training
config (minus ``steps``); a resumed run continues exactly as if it had never stopped, and a
checkpoint written under another config or other sources is refused, naming what differs.

The loader thread changes nothing in what is trained: it draws from a copy of the random state
and each step takes over the state its batch was drawn with, so the batches, their order and a
checkpoint's random state are those of reading each batch in the step. It runs between
evaluations and checkpoints, never beside them: the validation reads the same HDF5 files, and
h5py reads one handle from one thread at a time.
"""
from __future__ import annotations

import copy
import time
import zlib
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from .. import distributed
from ..data.tasks import MedMNISTTask, to_device
from ..episodes.sampling import TEMPERATURE, TaskWeighting, task_probabilities
from ..errors import ConfigError
from ..files import torch_save_atomic
from ..settings import Settings, setting
from .backbones import Start
from .models import MultiHeadModel, batchnorm_restored, reestimate_batchnorm
from .runtime import Precision, autocast, check_identity, check_steps, checkpoint_identity, evaluate_split, prefetch


LOSS_READ_EVERY = 25
"""Training losses are read from the device (for the progress bar and TensorBoard) this many steps at a time."""


@dataclass
class PretrainConfig(Settings):
    """mm-PT settings (see the module docstring). The defaults fit a 2-core CPU; the ``paper``
    profile has MedIMeta's budget."""

    init: Start = "scratch"
    """Where the backbone starts: random, or the architecture's published weights (``model.weights``
    for a file), as MedIMeta's mm-PT starts from ImageNet."""
    steps: int = setting(1500, min=1)
    batch_size: int = setting(64, min=1)
    lr: float = setting(1e-3, above=0)
    sampling: TaskWeighting = "proportional"
    temperature: float = setting(TEMPERATURE, above=0)
    reweight: bool = False
    eval_every: int = setting(250, min=1)
    patience: int = setting(4, min=1)
    """Evaluations without improvement of the mean validation AUROC before stopping."""
    val_max: int = setting(500, min=1)
    """Validation images per source task (a fixed random subset)."""
    bn_batches: int = setting(8, min=1)
    """Training batches per task that give its BatchNorm statistics at validation."""
    checkpoint_every: int = setting(250, min=1)
    precision: Precision = "auto"
    """bf16 autocast on CUDA by default (see ``runtime.Precision``)."""
    channels_last: bool = False
    """Train in channels-last memory format (faster convolutions on recent GPUs; 2D only)."""


class MultiTaskPretrainer:
    """mm-PT: shared backbone, one head per source task, single-task batches, exact resume."""

    def __init__(self, backbone: nn.Module, train: Mapping[str, MedMNISTTask], val: Mapping[str, MedMNISTTask],
                 config: PretrainConfig, device: torch.device, seed: int = 0, checkpoint: Path | None = None,
                 writer: SummaryWriter | None = None) -> None:
        if not train:
            raise ConfigError("mm-PT needs at least one source task")
        self.task_ids = sorted(train)
        self.train, self.val, self.config, self.device, self.seed = train, val, config, device, seed
        self.model = MultiHeadModel(backbone, {t: train[t].task.num_outputs for t in self.task_ids}).to(device)
        if config.channels_last and train[self.task_ids[0]].task.dims == 2:
            self.model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=config.lr, fused=True)
        self.probs = task_probabilities([len(train[t]) for t in self.task_ids], config.sampling, config.temperature)
        self.loss_weights = (1.0 / len(self.task_ids)) / self.probs if config.reweight else np.ones(len(self.task_ids))
        self.rng = np.random.default_rng(seed)
        self.val_indices = {t: np.sort(np.random.default_rng(seed).permutation(len(v))[:config.val_max])
                            for t, v in val.items()}
        self.cursors = {t: (np.empty(0, np.int64), 0) for t in self.task_ids}
        self.step = 0
        self.best_score = -1.0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_evals = 0
        self.history: list[dict[str, float]] = []
        self.seconds = 0.0
        """Training time over every session of this run (resumes included)."""
        self.data_seconds = 0.0
        """Of ``seconds``, the time a step waited for its batch: reading it (or taking it from the
        loader thread) and moving it to the device."""
        self.checkpoint, self.writer = checkpoint, writer if distributed.is_main() else None
        torch.manual_seed(seed)
        if checkpoint is not None and checkpoint.is_file():
            self.load(checkpoint)
        # Under torchrun: every rank draws the same global batch and trains on its slice; DDP averages
        # the gradients. Heads of the tasks not in the batch get none, hence find_unused_parameters.
        self.net: nn.Module = (DistributedDataParallel(self.model, find_unused_parameters=True)
                               if distributed.active() else self.model)

    def _draw(self, rng: np.random.Generator, cursors: dict[str, tuple[np.ndarray, int]]) -> tuple[int, np.ndarray]:
        """The next batch: a task by the sampling rule, then its next indices (epochs of shuffled
        indices); advances ``rng`` and ``cursors``."""
        k = int(rng.choice(len(self.task_ids), p=self.probs))
        task_id = self.task_ids[k]
        order, pos = cursors[task_id]
        if pos + self.config.batch_size > len(order):
            order, pos = rng.permutation(len(self.train[task_id])), 0
        cursors[task_id] = (order, pos + self.config.batch_size)
        return k, np.sort(order[pos:pos + self.config.batch_size])

    def _host_batches(self, count: int) -> Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor], dict, dict]]:
        """The next ``count`` batches on the host (``host_batch``), each with the random state and
        cursors after its draw. Drawn from copies, so another thread can run this while the
        pretrainer's own state stays the main thread's."""
        rng, cursors = copy.deepcopy(self.rng), dict(self.cursors)
        for _ in range(count):
            k, indices = self._draw(rng, cursors)
            batch = self.train[self.task_ids[k]].host_batch(indices[distributed.batch_slice(len(indices))],
                                                            self.device)
            yield k, batch, rng.bit_generator.state, dict(cursors)

    def train_steps(self, count: int, prefetch_batches: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """The next ``count`` optimiser steps (see ``train_step``), one (task, loss) per step.

        With ``prefetch_batches`` a loader thread draws, gathers and pins the batches while the
        previous step runs; the batches and the random state after each step are the same
        without it (``False`` is for benchmarks that compare). The HDF5 files must not be read
        elsewhere until the generator ends or is closed (``contextlib.closing``).
        """
        batches = self._host_batches(count)
        with closing(prefetch(batches) if prefetch_batches else batches) as source:
            for _ in range(count):
                clock = time.perf_counter()
                k, batch, rng_state, cursors = next(source)
                x, y = to_device(batch, self.device)
                if self.config.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                self.data_seconds += time.perf_counter() - clock
                self.rng.bit_generator.state, self.cursors = rng_state, cursors
                yield self._optimise(k, x, y)

    def train_step(self) -> tuple[str, torch.Tensor]:
        """One optimiser step on one batch of one task drawn by the sampling rule, read in this
        thread; returns the task and the loss, detached on the device (reading it waits for the device)."""
        with closing(self.train_steps(1, prefetch_batches=False)) as steps:
            return next(steps)

    def _optimise(self, k: int, x: torch.Tensor, y: torch.Tensor) -> tuple[str, torch.Tensor]:
        task_id = self.task_ids[k]
        ds = self.train[task_id]
        self.model.train()
        with autocast(self.device, self.config.precision):
            logits = self.net(x, task_id).float()
        loss = ds.task.task_type.loss(logits, y) * float(self.loss_weights[k])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        return task_id, loss.detach()

    def bn_batches(self, task_id: str) -> list[torch.Tensor]:
        """``bn_batches`` training batches of one task for its BatchNorm statistics at validation.

        Drawn from a generator of their own, seeded by (seed, step, task), so validating never
        changes the training's random streams and a resumed run validates identically.
        """
        ds, size = self.train[task_id], self.config.batch_size
        rng = np.random.default_rng([self.seed, self.step, zlib.crc32(task_id.encode())])
        order = rng.permutation(len(ds))[:self.config.bn_batches * size]
        return [ds.get_batch(np.sort(order[i:i + size]), self.device)[0]
                for i in range(0, len(order), size)]

    def validate(self) -> dict[str, float]:
        """Validation AUROC and accuracy per source task (each with its own BatchNorm statistics,
        see the module docstring) and their mean AUROC."""
        scores: dict[str, float] = {}
        for task_id, ds in self.val.items():
            with batchnorm_restored(self.model.backbone):
                with autocast(self.device, self.config.precision):
                    reestimate_batchnorm(self.model.backbone, self.bn_batches(task_id))
                res = evaluate_split(lambda x, t=task_id: self.model(x, t), self.model, ds, self.device,
                                     self.val_indices[task_id], self.config.precision)
            scores[f"{task_id}/auroc"], scores[f"{task_id}/acc"] = res["auroc"], res["acc"]
        scores["mean_auroc"] = float(np.nanmean([v for k, v in scores.items() if k.endswith("/auroc")]))
        return scores

    def run(self, on_step: Callable[[int], None] | None = None) -> nn.Module:
        """Train until ``steps`` or early stopping; return the backbone with the best validation AUROC."""
        cfg = self.config
        bar = distributed.progress(total=cfg.steps, initial=self.step, desc="mm-PT", unit="step")
        losses: list[tuple[int, str, torch.Tensor]] = []

        def log_losses() -> None:
            """Read the pending losses in one device sync (a read per step would stall a GPU every step)."""
            if not losses:
                return
            values = torch.stack([loss for _, _, loss in losses]).tolist()
            if self.writer is not None:
                for (step, task_id, _), value in zip(losses, values):
                    self.writer.add_scalar(f"pretrain/loss/{task_id}", value, step)
            bar.set_postfix(task=losses[-1][1].split("mnist")[0], loss=f"{values[-1]:.3f}", best=f"{self.best_score:.3f}")
            losses.clear()

        clock = time.perf_counter()

        def count_time() -> None:
            nonlocal clock
            now = time.perf_counter()
            self.seconds += now - clock
            clock = now

        while self.step < cfg.steps and self.bad_evals < cfg.patience:
            # up to the next evaluation or checkpoint: the loader thread ends before they read the files
            end = self._segment_end()
            with closing(self.train_steps(end - self.step)) as steps:
                for task_id, loss in steps:
                    bar.update(1)
                    losses.append((self.step, task_id, loss))
                    if len(losses) == LOSS_READ_EVERY:
                        log_losses()
                    if self.step < end and on_step is not None:
                        count_time()
                        on_step(self.step)
            if self.step % cfg.eval_every == 0:
                log_losses()
                self._evaluate()
            count_time()
            if self.checkpoint is not None and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                log_losses()  # a resumed run starts after the checkpoint: its losses are logged by then
                self.save(self.checkpoint)
            if on_step is not None:
                on_step(self.step)
        log_losses()  # the time is counted up to the last checkpoint: a resumed finished run adds none
        bar.close()
        if self.writer is not None and self.seconds > 0:
            self.writer.add_scalar("pretrain/data_share", self.data_seconds / self.seconds, self.step)
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        # Under DDP the weights agree but each rank's BatchNorm running statistics are its own:
        # every rank takes rank 0's, so the backbone handed on is the one backbone.pt holds.
        distributed.broadcast_module_(self.model)
        return self.model.backbone

    def _segment_end(self) -> int:
        """The next step that evaluates, checkpoints or ends the run."""
        cfg, step = self.config, self.step
        ends = [cfg.steps, (step // cfg.eval_every + 1) * cfg.eval_every]
        if self.checkpoint is not None:
            ends.append((step // cfg.checkpoint_every + 1) * cfg.checkpoint_every)
        return min(ends)

    def _evaluate(self) -> None:
        scores = self.validate()
        self.history.append({"step": self.step, **scores})
        if self.writer is not None:
            for key, value in scores.items():
                self.writer.add_scalar(f"pretrain/val/{key}", value, self.step)
        if scores["mean_auroc"] > self.best_score:
            self.best_score, self.bad_evals = scores["mean_auroc"], 0
            self.best_state = copy.deepcopy(self.model.state_dict())
        else:
            self.bad_evals += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                "rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                "cursors": self.cursors, "best_score": self.best_score, "best_state": self.best_state,
                "bad_evals": self.bad_evals, "history": self.history, "seconds": self.seconds,
                "data_seconds": self.data_seconds, "identity": self.identity}

    @property
    def identity(self) -> dict[str, Any]:
        """What a checkpoint must match to resume this run (see ``checkpoint_identity``)."""
        return checkpoint_identity(self.config, self.device, tasks=self.task_ids, seed=self.seed)

    def save(self, path: Path) -> None:
        """Write a checkpoint (rank 0 only: every rank holds the same state)."""
        if distributed.is_main():
            torch_save_atomic(self.state_dict(), path)

    def load(self, path: Path) -> None:
        """Resume from a checkpoint written by ``save`` for the same source tasks."""
        state = torch.load(path, map_location=self.device, weights_only=False)
        check_identity(path, state.get("identity"), self.identity)
        check_steps(path, state["step"], self.config.steps)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.best_score, self.bad_evals = state["step"], state["best_score"], state["bad_evals"]
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        self.cursors, self.best_state, self.history = state["cursors"], state["best_state"], state["history"]
        self.seconds, self.data_seconds = state["seconds"], state["data_seconds"]
