"""Training loops: supervised training, multi-domain multi-task pretraining (mm-PT) and mm-MAML.

Both read batches straight from ``MedMNISTTask.get_batch`` (one gather per batch), score with
MedMNIST evaluator semantics (``metrics.evaluate``), log to TensorBoard and keep the model
that did best on validation AUROC.

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
"""
from __future__ import annotations

import copy
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from .adaptation import task_loss
from .episodes import MultiTaskEpisodeSampler, task_probabilities
from .maml import MAML, MetaEpisode
from .files import atomic_path
from .metrics import evaluate
from .models import MultiHeadModel, batchnorm_restored, reestimate_batchnorm
from .tasks import MedMNISTTask


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available; use --device auto or cpu")
    return torch.device(device)


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, then rename into place (no half-written checkpoints)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _autocast(device: torch.device):
    """bfloat16 autocast on CUDA (mixed precision), a no-op on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def predict(forward: Callable[[torch.Tensor], torch.Tensor], dataset: MedMNISTTask, device: torch.device,
            batch_size: int = 256, indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels for a split (or the given indices), in eval mode, batch by batch."""
    idx = np.arange(len(dataset)) if indices is None else indices
    logits, labels = [], []
    for start in range(0, len(idx), batch_size):
        x, y = _to_device(*dataset.get_batch(idx[start:start + batch_size]), device)
        with _autocast(device):
            logits.append(forward(x).float().cpu())
        labels.append(y.cpu())
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def evaluate_split(forward: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, dataset: MedMNISTTask,
                   device: torch.device, indices: np.ndarray | None = None) -> dict[str, float]:
    """AUROC and accuracy of ``forward`` on a dataset split, with ``module`` in eval mode."""
    was_training = module.training
    module.eval()
    logits, labels = predict(forward, dataset, device, indices=indices)
    module.train(was_training)
    return evaluate(dataset.task.task_type, labels, logits)


RESUMABLE_CHANGES = ("steps", "checkpoint_every")
"""Config keys a checkpoint may be resumed under with another value: training more steps
continues the same run exactly, and the checkpoint cadence does not change the result."""


def checkpoint_identity(config: Any, **context: Any) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the config (minus ``RESUMABLE_CHANGES``) and context."""
    fields = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}
    return {**fields, **context}


def check_identity(path: Path, stored: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> None:
    """Refuse to resume a checkpoint written under another config, naming the differences."""
    stored = dict(stored or {})
    diff = [f"{k}: {stored.get(k, '<missing>')!r} in the checkpoint, {wanted[k]!r} now"
            for k in sorted(set(stored) | set(wanted)) if stored.get(k, "<missing>") != wanted.get(k, "<missing>")]
    if diff:
        raise ValueError(f"checkpoint {path} was written under another training config ({'; '.join(diff)}); "
                         "use another --out folder or delete the checkpoint")


@dataclass
class SupervisedConfig:
    """MedMNIST v2 recipe: Adam lr 1e-3, lr x0.1 at 50% and 75% of the epochs, batch 128."""

    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    milestones: tuple[float, float] = (0.5, 0.75)
    seed: int = 0


def train_supervised(model: nn.Module, train: MedMNISTTask, val: MedMNISTTask, config: SupervisedConfig,
                     device: torch.device, writer: SummaryWriter | None = None) -> dict[str, Any]:
    """Train ``model`` (images -> logits) on one task; keep the epoch with the best validation AUROC."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)
    steps_per_epoch = -(-len(train) // config.batch_size)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, [int(m * config.epochs) * steps_per_epoch for m in config.milestones], gamma=0.1)
    best: dict[str, Any] = {"val_auroc": -1.0}
    history = []
    for epoch in tqdm(range(config.epochs), desc=f"supervised {train.task.task_id}", unit="epoch"):
        model.train()
        order = rng.permutation(len(train))
        losses = []
        for start in range(0, len(order), config.batch_size):
            x, y = _to_device(*train.get_batch(np.sort(order[start:start + config.batch_size])), device)
            with _autocast(device):
                loss = task_loss(train.task.task_type, model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        scores = evaluate_split(model, model, val, device)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), **{f"val_{k}": v for k, v in scores.items()}})
        if writer is not None:
            writer.add_scalar("train/loss", history[-1]["loss"], epoch + 1)
            writer.add_scalar("val/auroc", scores["auroc"], epoch + 1)
            writer.add_scalar("val/acc", scores["acc"], epoch + 1)
        if scores["auroc"] > best["val_auroc"]:
            best = {"val_auroc": scores["auroc"], "val_acc": scores["acc"], "epoch": epoch + 1,
                    "state": copy.deepcopy(model.state_dict())}
    model.load_state_dict(best.pop("state"))
    return {**best, "history": history}


@dataclass
class PretrainConfig:
    """mm-PT settings (see the module docstring)."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    sampling: str = "proportional"
    temperature: float = 2.0
    reweight: bool = False
    eval_every: int = 250
    patience: int = 4
    val_max: int = 1000
    bn_batches: int = 8
    seed: int = 0
    checkpoint_every: int = 250


class MultiTaskPretrainer:
    """mm-PT: shared backbone, one head per source task, single-task batches, exact resume."""

    def __init__(self, backbone: nn.Module, train: Mapping[str, MedMNISTTask], val: Mapping[str, MedMNISTTask],
                 config: PretrainConfig, device: torch.device, checkpoint: Path | None = None,
                 writer: SummaryWriter | None = None) -> None:
        if not train:
            raise ValueError("mm-PT needs at least one source task")
        self.task_ids = sorted(train)
        self.train, self.val, self.config, self.device = train, val, config, device
        self.model = MultiHeadModel(backbone, {t: train[t].task.num_outputs for t in self.task_ids}).to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=config.lr, fused=True)
        self.probs = task_probabilities([len(train[t]) for t in self.task_ids], config.sampling, config.temperature)
        self.loss_weights = (1.0 / len(self.task_ids)) / self.probs if config.reweight else np.ones(len(self.task_ids))
        self.rng = np.random.default_rng(config.seed)
        self.val_indices = {t: np.sort(np.random.default_rng(config.seed).permutation(len(v))[:config.val_max])
                            for t, v in val.items()}
        self.cursors = {t: (np.empty(0, np.int64), 0) for t in self.task_ids}
        self.step = 0
        self.best_score = -1.0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_evals = 0
        self.history: list[dict[str, float]] = []
        self.checkpoint, self.writer = checkpoint, writer
        torch.manual_seed(config.seed)
        if checkpoint is not None and checkpoint.is_file():
            self.load(checkpoint)

    def _next_indices(self, task_id: str) -> np.ndarray:
        """Next batch of a task: epochs of shuffled indices, drawn from the pretrainer's own RNG."""
        order, pos = self.cursors[task_id]
        if pos + self.config.batch_size > len(order):
            order, pos = self.rng.permutation(len(self.train[task_id])), 0
        batch = order[pos:pos + self.config.batch_size]
        self.cursors[task_id] = (order, pos + self.config.batch_size)
        return np.sort(batch)

    def train_step(self) -> tuple[str, float]:
        """One optimiser step on one batch of one task drawn by the sampling rule."""
        k = int(self.rng.choice(len(self.task_ids), p=self.probs))
        task_id = self.task_ids[k]
        ds = self.train[task_id]
        x, y = _to_device(*ds.get_batch(self._next_indices(task_id)), self.device)
        self.model.train()
        with _autocast(self.device):
            logits = self.model(x, task_id).float()
        loss = task_loss(ds.task.task_type, logits, y) * float(self.loss_weights[k])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        return task_id, loss.item()

    def bn_batches(self, task_id: str) -> list[torch.Tensor]:
        """``bn_batches`` training batches of one task for its BatchNorm statistics at validation.

        Drawn from a generator of their own, seeded by (seed, step, task), so validating never
        changes the training's random streams and a resumed run validates identically.
        """
        ds, size = self.train[task_id], self.config.batch_size
        rng = np.random.default_rng([self.config.seed, self.step, zlib.crc32(task_id.encode())])
        order = rng.permutation(len(ds))[:self.config.bn_batches * size]
        return [_to_device(*ds.get_batch(np.sort(order[i:i + size])), self.device)[0]
                for i in range(0, len(order), size)]

    def validate(self) -> dict[str, float]:
        """Validation AUROC and accuracy per source task (each with its own BatchNorm statistics,
        see the module docstring) and their mean AUROC."""
        scores: dict[str, float] = {}
        for task_id, ds in self.val.items():
            with batchnorm_restored(self.model.backbone):
                with _autocast(self.device):
                    reestimate_batchnorm(self.model.backbone, self.bn_batches(task_id))
                res = evaluate_split(lambda x, t=task_id: self.model(x, t), self.model, ds, self.device,
                                     self.val_indices[task_id])
            scores[f"{task_id}/auroc"], scores[f"{task_id}/acc"] = res["auroc"], res["acc"]
        scores["mean_auroc"] = float(np.nanmean([v for k, v in scores.items() if k.endswith("/auroc")]))
        return scores

    def run(self, on_step: Callable[[int], None] | None = None) -> nn.Module:
        """Train until ``steps`` or early stopping; return the backbone with the best validation AUROC."""
        cfg = self.config
        bar = tqdm(total=cfg.steps, initial=self.step, desc="mm-PT", unit="step")
        while self.step < cfg.steps and self.bad_evals < cfg.patience:
            task_id, loss = self.train_step()
            bar.update(1)
            bar.set_postfix(task=task_id.split("mnist")[0], loss=f"{loss:.3f}", best=f"{self.best_score:.3f}")
            if self.writer is not None:
                self.writer.add_scalar(f"pretrain/loss/{task_id}", loss, self.step)
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                self._evaluate()
            if self.checkpoint is not None and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                self.save(self.checkpoint)
            if on_step is not None:
                on_step(self.step)
        bar.close()
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return self.model.backbone

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
                "bad_evals": self.bad_evals, "history": self.history, "identity": self.identity}

    @property
    def identity(self) -> dict[str, Any]:
        """What a checkpoint must match to resume this run (see ``checkpoint_identity``)."""
        return checkpoint_identity(self.config, tasks=self.task_ids)

    def save(self, path: Path) -> None:
        save_atomic(self.state_dict(), path)

    def load(self, path: Path) -> None:
        """Resume from a checkpoint written by ``save`` for the same source tasks."""
        state = torch.load(path, map_location=self.device, weights_only=False)
        check_identity(path, state.get("identity"), self.identity)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.best_score, self.bad_evals = state["step"], state["best_score"], state["bad_evals"]
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        self.cursors, self.best_state, self.history = state["cursors"], state["best_state"], state["history"]


@dataclass
class MAMLConfig:
    """mm-MAML settings (MedIMeta: 4 inner SGD steps at lr 0.1 in training, 32 at test, outer Adam 1e-3).

    Training episodes: a source task drawn in proportion to its size, N uniform in 2..all
    classes, K uniform in 1..``max_shot``, ``n_query`` queries per class.
    """

    steps: int = 1000
    meta_batch: int = 4
    inner_steps: int = 4
    inner_lr: float = 0.1
    test_steps: int = 32
    outer_lr: float = 1e-3
    first_order: bool = False
    meta_sgd: bool = False
    bn_train: bool = True
    max_shot: int = 10
    n_query: int = 10
    checkpoint_every: int = 100
    seed: int = 0


def train_maml(backbone: nn.Module, train: Mapping[str, MedMNISTTask], config: MAMLConfig, device: torch.device,
               checkpoint: Path | None = None, writer: SummaryWriter | None = None,
               on_step: Callable[[int], None] | None = None) -> MAML:
    """Meta-train ``backbone`` with MAML on variable-way variable-shot episodes of the source tasks.

    Meta-step s uses episodes s * meta_batch ... (s + 1) * meta_batch - 1 of a seeded
    multi-task sampler, so resuming from the checkpoint replays exactly the same episodes.
    """
    datasets = [train[t] for t in sorted(train)]
    sampler = MultiTaskEpisodeSampler(datasets, k_shot=config.max_shot, n_query=config.n_query,
                                      n_episodes=config.steps * config.meta_batch, seed=config.seed,
                                      variable=True, min_class_samples=config.max_shot + config.n_query)
    maml = MAML(backbone.to(device), inner_steps=config.inner_steps, inner_lr=config.inner_lr,
                first_order=config.first_order, meta_sgd=config.meta_sgd, outer_lr=config.outer_lr,
                bn_train=config.bn_train, test_steps=config.test_steps)
    step = 0
    identity = checkpoint_identity(config, tasks=sorted(train))
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        check_identity(checkpoint, state.get("identity"), identity)
        maml.load_state_dict(state["maml"])
        step = state["step"]
    with tqdm(total=config.steps, initial=step, desc="MAML", unit="meta-step") as bar:
        while step < config.steps:
            episodes = [sampler.episode(step * config.meta_batch + j) for j in range(config.meta_batch)]
            loss = maml.meta_step([MetaEpisode(e.task.task_type, e.num_outputs, e.support_x, e.support_y,
                                               e.query_x, e.query_y) for e in episodes])
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if writer is not None:
                writer.add_scalar("maml/query_loss", loss, step)
            if checkpoint is not None and (step % config.checkpoint_every == 0 or step == config.steps):
                save_atomic({"maml": maml.state_dict(), "step": step, "identity": identity}, checkpoint)
            if on_step is not None:
                on_step(step)
    return maml
