"""Learning actually happens: short runs on the real MedMNIST files."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from medmeta.data.store import Store
from medmeta.data.tasks import MedMNISTTask
from medmeta.episodes import EpisodeSampler, task_probabilities
from medmeta.evaluation.protocol import Target, evaluate_method
from medmeta.learning.models import Classifier, build_backbone
from medmeta.learning.pretrain import MultiTaskPretrainer, PretrainConfig
from medmeta.learning.supervised import SupervisedConfig, train_supervised
from medmeta.methods import LinearProbe, Method, Scratch


def test_supervised_training_is_far_above_chance(real_store: Store) -> None:
    # Train on BloodMNIST's 1,712 validation images for two epochs, select on and score the test split.
    train = MedMNISTTask(real_store, "blood", "val")
    test = MedMNISTTask(real_store, "blood", "test")
    torch.manual_seed(0)
    model = Classifier(build_backbone("resnet18", stem="imagenet"), train.task.num_outputs)
    best = train_supervised(model, train, test, SupervisedConfig(epochs=2, batch_size=128), torch.device("cpu"))
    assert len(best["history"]) == 2 and best["epoch"] in (1, 2)
    assert best["history"][1]["loss"] < best["history"][0]["loss"]
    assert best["val_auroc"] > 0.85, best  # chance is 0.5 for eight classes
    assert best["val_acc"] > 0.4, best  # chance is about 0.2 (largest class)


def test_task_probabilities() -> None:
    sizes = [100, 400]
    np.testing.assert_allclose(task_probabilities(sizes, "proportional"), [0.2, 0.8])
    np.testing.assert_allclose(task_probabilities(sizes, "uniform"), [0.5, 0.5])
    np.testing.assert_allclose(task_probabilities(sizes, "tempered", 2.0), [1 / 3, 2 / 3])
    with pytest.raises(ValueError, match="unknown task sampling 'random'"):
        task_probabilities(sizes, "random")


def test_adaptation_after_mmpt_beats_scratch(real_store: Store) -> None:
    """Features pretrained on OrganAMNIST's training split must adapt far better to 11-way
    5-shot OrganAMNIST test episodes than random features: if this fails, pretraining is not
    reaching the adaptation step. (The protocol itself never pretrains on its target.)"""
    train = {"organamnist": MedMNISTTask(real_store, "organa", "train")}
    val = {"organamnist": MedMNISTTask(real_store, "organa", "val")}
    config = PretrainConfig(steps=100, batch_size=64, eval_every=100, val_max=300)
    torch.manual_seed(0)
    scratch = build_backbone("resnet18", stem="imagenet")
    pretrained = MultiTaskPretrainer(copy.deepcopy(scratch), train, val, config, torch.device("cpu")).run()
    dataset = MedMNISTTask(real_store, "organa", "test")
    sampler = EpisodeSampler(dataset, n_way="all", k_shot=5, n_query=10, n_episodes=8, seed=0)
    target = Target(dataset, sampler.episode_set(), ())
    probe = Method(Scratch(), LinearProbe())
    scores = {}
    for name, backbone in (("scratch", scratch), ("mmpt", pretrained)):
        per_episode = evaluate_method(probe, backbone, target, seed=0, device=torch.device("cpu"))
        scores[name] = float(np.mean([e["auroc"] for e in per_episode]))
    assert scores["mmpt"] > scores["scratch"] + 0.08, scores
    assert scores["mmpt"] > 0.9, scores
