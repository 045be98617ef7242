"""Built-in initialisations: where a method's backbone starts.

============ =====================================================================================
name         backbone
============ =====================================================================================
scratch      random initialisation (seeded)
pretrained   the architecture's published weights: timm's (the name's weight tag, e.g.
             ``vit_base_patch16_224.dino``) or torchvision's ImageNet weights for medmeta's ResNets
             and AlexNet; ``model.weights`` (``--weights FILE``) for a local file (2D only)
imagenet     the same as ``pretrained`` (its name from when ResNets were the only backbones)
checkpoint   a state dict the user trained elsewhere (``Checkpoint(path)``, ``--checkpoint FILE``)
mmpt         multi-domain multi-task pretraining on the leave-one-out sources (``learning.pretrain``),
             from scratch or from published weights (``pretrain.init``)
maml         mm-MAML meta-training on the leave-one-out sources (``learning.maml``; ``maml.init``)
============ =====================================================================================

The trained ones keep their checkpoints in the folder the protocol gives them, named by
everything the training depends on, so a run resumes, and another method or target with the
same sources and settings reuses the finished training.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .. import distributed
from ..errors import MethodError
from ..files import torch_save_atomic, write_text_atomic
from ..learning.maml import MAMLConfig, train_maml
from ..learning.backbones import PRETRAINED, start_weights
from ..learning.models import ModelConfig, build_backbone
from ..learning.pretrain import MultiTaskPretrainer, PretrainConfig
from ..settings import Settings
from .base import Initialisation, InitContext


def random_backbone(context: InitContext, weights: str | None = None) -> nn.Module:
    """The experiment's backbone (``context.model``), seeded by ``context.seed``; ``weights``:
    None (random), ``"pretrained"`` or a file (``models.build_backbone``)."""
    torch.manual_seed(context.seed)
    model = context.model
    return build_backbone(model.arch, dims=context.dims, stem=model.stem, weights=weights,
                          conv3d=model.conv3d, input=model.input, canvas=model.canvas).to(context.device)


@dataclass
class Scratch(Settings, Initialisation):
    """Random initialisation."""

    name: ClassVar[str] = "scratch"
    frozen_bn: ClassVar[str] = "own"
    """A random backbone's running statistics are the identity (mean 0, variance 1); on the four 2D
    targets here they beat statistics re-estimated on the support (docs/results.md)."""

    def backbone(self, context: InitContext) -> nn.Module:
        return random_backbone(context)


@dataclass
class Pretrained(Settings, Initialisation):
    """The architecture's published weights (downloaded by timm or torchvision, or ``model.weights``)."""

    name: ClassVar[str] = "pretrained"
    dims: ClassVar[tuple[int, ...]] = (2,)

    def backbone(self, context: InitContext) -> nn.Module:
        return random_backbone(context, weights=context.model.weights or PRETRAINED)

    def weights_file(self, model: ModelConfig) -> str | None:
        return model.weights


@dataclass
class ImageNet(Pretrained):
    """``pretrained`` under its earlier name (ImageNet weights, when ResNets were the only backbones)."""

    name: ClassVar[str] = "imagenet"


@dataclass
class Checkpoint(Settings, Initialisation):
    """A backbone state dict from a file (torchvision keys, or a medmeta backbone's ``state_dict``)."""

    name: ClassVar[str] = "checkpoint"
    path: str | None = None

    def backbone(self, context: InitContext) -> nn.Module:
        if not self.path:
            raise MethodError("the checkpoint initialisation needs a file: pass --checkpoint FILE "
                              "(or set the config key checkpoint)")
        return random_backbone(context, weights=self.path)

    def weights_file(self, model: ModelConfig) -> str | None:
        return self.path


def save_trained(folder: Path, backbone: nn.Module, training: dict) -> None:
    """Keep a trained backbone and what its training measured (``training.json``), on the main process."""
    if distributed.is_main():
        torch_save_atomic(backbone.state_dict(), folder / "backbone.pt")
        write_text_atomic(folder / "training.json", json.dumps(training))


@dataclass
class MMPT(Settings, Initialisation):
    """Multi-domain multi-task pretraining on the sources; the backbone with the best validation AUROC."""

    name: ClassVar[str] = "mmpt"
    needs_sources: ClassVar[bool] = True
    frozen_bn: ClassVar[str] = "sources"
    """mm-PT's own running statistics follow the source task it trained last; recomputed on all
    the sources they fit its features best (docs/results.md)."""
    config: PretrainConfig = field(default_factory=PretrainConfig)

    def backbone(self, context: InitContext) -> nn.Module:
        assert context.sources is not None, "the protocol gives trained initialisations their sources"
        start = random_backbone(context, start_weights(self.config.init, context.model.weights))
        trainer = MultiTaskPretrainer(start, context.sources.train, context.sources.val,
                                      self.config, context.device, seed=context.seed,
                                      checkpoint=context.folder / "checkpoint.pt", writer=context.writer)
        backbone = trainer.run()
        save_trained(context.folder, backbone, {
            "seconds": trainer.seconds, "data_share": trainer.data_seconds / max(trainer.seconds, 1e-9),
            "step": trainer.step, "best_score": trainer.best_score, "history": trainer.history})
        return backbone

    def weights_file(self, model: ModelConfig) -> str | None:
        return model.weights if self.config.init == "pretrained" else None


@dataclass
class MAMLInit(Settings, Initialisation):
    """mm-MAML meta-training on the sources (only the backbone is meta-learned)."""

    name: ClassVar[str] = "maml"
    needs_sources: ClassVar[bool] = True
    frozen_bn: ClassVar[str] = "support"
    """MAML meta-learns with BatchNorm on each episode's batch statistics, so its features expect
    statistics of the episode (docs/results.md)."""
    config: MAMLConfig = field(default_factory=MAMLConfig)

    def backbone(self, context: InitContext) -> nn.Module:
        assert context.sources is not None, "the protocol gives trained initialisations their sources"
        maml = train_maml(random_backbone(context, start_weights(self.config.init, context.model.weights)),
                          context.sources.train, self.config, context.device,
                          seed=context.seed, checkpoint=context.folder / "checkpoint.pt", writer=context.writer)
        save_trained(context.folder, maml.backbone, {"seconds": maml.seconds})
        return maml.backbone

    def weights_file(self, model: ModelConfig) -> str | None:
        return model.weights if self.config.init == "pretrained" else None

