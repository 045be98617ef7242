"""Supervised training on one task (the MedMNIST baselines): keep the best validation epoch."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from ..data.tasks import MedMNISTTask
from ..settings import Settings, setting
from .runtime import autocast, evaluate_split, to_device


@dataclass
class SupervisedConfig(Settings):
    """MedMNIST v2 recipe: Adam lr 1e-3, lr x0.1 at 50% and 75% of the epochs, batch 128."""

    epochs: int = setting(100, min=1)
    batch_size: int = setting(128, min=1)
    lr: float = setting(1e-3, above=0)
    milestones: tuple[float, float] = (0.5, 0.75)
    seed: int = setting(0, min=0)


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
            x, y = to_device(*train.get_batch(np.sort(order[start:start + config.batch_size])), device)
            with autocast(device):
                loss = train.task.task_type.loss(model(x).float(), y)
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
