"""The method interface: an initialisation (where the backbone starts) and an adaptation rule
(what it does with one episode's support set to score its query).

A ``Method`` pairs one of each; the protocol takes any ``Method``. Adding a method is one
small class: subclass ``AdaptationRule`` and write ``predict`` (or ``Initialisation`` and
write ``backbone``), then combine it with the built-ins, e.g. ``Method(Scratch(), MyRule())``
or ``--methods scratch+my_module:MyRule`` on the command line.

Contracts:

* ``Initialisation.backbone(context)`` returns a backbone (images in [0, 1] -> features) on
  ``context.device``. One that trains (``needs_sources = True``) uses ``context.sources`` (the
  leave-one-out sources' train and validation datasets) and keeps its checkpoints under
  ``context.folder``, which is shared by every method and target with the same sources and
  settings, so training happens once.
* ``AdaptationRule.predict(backbone, episode, seed)`` returns query scores shaped
  ``(n_query, episode.num_outputs)``, read like logits (``TaskType.evaluate``: sigmoid for
  binary and multi-label, softmax for multi-class and ordinal). The episode carries no query
  labels; ``seed`` is the episode's seed (e.g. for a head's initialisation). It must not change
  ``backbone``; ``WorkingCopy`` gives a reusable copy to change.
* ``settings()`` returns what the results depend on (dataclass fields by default): results and
  training checkpoints are cached under a hash of it.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from ..data.tasks import MedMNISTTask
from ..episodes import Episode
from ..errors import MedmetaError, PluginError, one_line
from ..learning.models import ModelConfig


@dataclass
class Sources:
    """The leave-one-out sources of a target: train and validation datasets by task id."""

    train: Mapping[str, MedMNISTTask]
    val: Mapping[str, MedMNISTTask]


@dataclass
class InitContext:
    """What an initialisation may use to build its backbone."""

    dims: int
    size: int
    model: ModelConfig
    seed: int
    device: torch.device
    folder: Path
    sources: Sources | None = None
    writer: SummaryWriter | None = None


def _settings(obj: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(obj):
        to_dict = getattr(obj, "to_dict", None)
        return to_dict() if to_dict is not None else dataclasses.asdict(obj)
    return {}


class Initialisation(ABC):
    """Where adaptation starts: a backbone, possibly trained on the leave-one-out sources."""

    name: ClassVar[str] = ""
    needs_sources: ClassVar[bool] = False
    frozen_bn: ClassVar[str] = "own"
    """The BatchNorm statistics frozen-feature rules take after this initialisation by default
    (their ``bn="auto"``; one of ``learning.finetune.BNMode``): ``own`` for weights trained as
    usual, whose running statistics fit their features. The built-ins' values come from the
    bn-mode table of docs/results.md."""
    dims: ClassVar[tuple[int, ...]] = (2, 3)
    """Image dimensionalities this initialisation supports."""

    @abstractmethod
    def backbone(self, context: InitContext) -> nn.Module:
        """The backbone adaptation starts from, on ``context.device``."""

    def weights_file(self, model: ModelConfig) -> str | None:
        """The weights file this initialisation loads (its content, not its path, is part of the
        cache keys), or None."""
        return None

    def settings(self) -> dict[str, Any]:
        return {"name": self.name or type(self).__qualname__, **_settings(self)}


class AdaptationRule(ABC):
    """What a method does with one episode: use the support set, score the query set."""

    name: ClassVar[str] = ""

    @abstractmethod
    def predict(self, backbone: nn.Module, episode: Episode, seed: int) -> torch.Tensor:
        """Query scores ``(n_query, episode.num_outputs)``, read like logits (see the module docstring)."""

    def predict_many(self, backbone: nn.Module, episodes: Sequence[Episode], seeds: Sequence[int]
                     ) -> list[torch.Tensor]:
        """Scores for several episodes; override to batch them (e.g. ``vmap`` on a GPU)."""
        return [self.predict(backbone, e, s) for e, s in zip(episodes, seeds)]

    def for_initialisation(self, init: Initialisation) -> AdaptationRule:
        """The rule as it runs after ``init`` (a frozen-feature rule resolves ``bn="auto"`` by the kind
        of initialisation); itself by default. ``Method`` calls it, so one rule object can serve
        several methods."""
        return self

    @property
    def bn_mode(self) -> str | None:
        """Where the rule's frozen features take BatchNorm statistics from (``BNMode``); None for a
        rule that reads no frozen features."""
        return None

    @property
    def transductive(self) -> bool:
        """Whether a query image's score depends on the other query images (results say so)."""
        return self.bn_mode == "transductive"

    def settings(self) -> dict[str, Any]:
        return {"name": self.name or type(self).__qualname__, **_settings(self)}


class Method:
    """An initialisation and an adaptation rule, under one name (``init+rule`` by default)."""

    def __init__(self, init: Initialisation, rule: AdaptationRule, name: str | None = None) -> None:
        self.init, self.rule = init, rule.for_initialisation(init)
        self.name = name or f"{init.settings()['name']}+{rule.settings()['name']}"

    @property
    def needs_sources(self) -> bool:
        return self.init.needs_sources

    def prepare(self, context: InitContext) -> nn.Module:
        return self.init.backbone(context)

    def predict_many(self, backbone: nn.Module, episodes: Sequence[Episode], seeds: Sequence[int]
                     ) -> list[torch.Tensor]:
        return self.rule.predict_many(backbone, episodes, seeds)

    def settings(self) -> dict[str, Any]:
        return {"init": self.init.settings(), "rule": self.rule.settings()}

    def __repr__(self) -> str:
        return f"Method({self.name!r}, init={self.init!r}, rule={self.rule!r})"


def user_module(obj: object) -> str | None:
    """The module defining ``obj``'s class when it is a user's (not medmeta's own), else None."""
    module = type(obj).__module__
    return None if module == "medmeta" or module.startswith("medmeta.") else module


@contextmanager
def plugin_errors(method: str, part: object, action: str) -> Iterator[None]:
    """Turn an exception raised by a user's ``part`` (an initialisation, rule or method imported by
    path) during ``action`` into one ``PluginError`` line naming the method and the module; the
    original stays chained. medmeta's own parts raise as they are (an internal bug keeps its
    traceback)."""
    module = user_module(part)
    try:
        yield
    except MedmetaError:
        raise
    except Exception as exc:
        if module is None:
            raise
        raise PluginError(f"method {method}: {type(part).__qualname__}.{action} (module {module}) raised "
                          f"{one_line(exc)}") from exc
