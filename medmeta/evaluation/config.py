"""The experiment config: one typed object, defaults in one place, every value checked at start.

``ExperimentConfig`` gathers the sections every layer reads: the backbone (``ModelConfig``),
the evaluation episodes, each adaptation rule's settings, mm-PT's and MAML's training. Its
defaults are the default profile, sized for a 2-core CPU; ``experiments/configs/*.yaml``
profiles (``paper``: MedIMeta's budget for a GPU) override some of them, and ``--set
key=value`` overrides any. Unknown keys and bad values are refused by name before any work.

Methods are named on the command line and in ``methods``: a built-in method (``scratch``,
``imagenet``, ``checkpoint``, ``mmpt``, ``maml``), an ``init+rule`` combination of built-ins
(``mmpt+linear``, ``scratch+knn``), or ``package.module:ClassName`` for a user's ``Method``,
``Initialisation`` or ``AdaptationRule`` (in ``init+rule``: ``scratch+my_rules:Centroid``).
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

from ..data.manifest import ImageSize
from ..episodes.sampling import EVALUATION_EPISODES, QUERIES, SHOTS
from ..errors import ConfigError, MethodError, PluginError, one_line
from ..learning.maml import MAMLConfig
from ..learning.models import ModelConfig
from ..learning.pretrain import PretrainConfig
from ..methods import (KNN, LPFT, MMPT, AdaptationRule, Checkpoint, FineTune, ImageNet, Initialisation, LinearProbe,
                       MAMLInit, MAMLInner, Method, Pretrained, Prototypes, Scratch)
from ..settings import Settings, load_settings, setting

BUILTIN_METHODS = {"scratch": ("scratch", "finetune"), "pretrained": ("pretrained", "finetune"),
                   "imagenet": ("imagenet", "finetune"),
                   "checkpoint": ("checkpoint", "finetune"), "mmpt": ("mmpt", "finetune"), "maml": ("maml", "inner")}
"""Built-in method names and the initialisation and rule each stands for."""


@dataclass
class EpisodesConfig(Settings):
    """The target's evaluation episodes (MedIMeta: all classes with >= 50 samples, 5 shots, 10 queries)."""

    count: int = setting(EVALUATION_EPISODES, min=1)
    shots: int = setting(SHOTS, min=1)
    queries: int = setting(QUERIES, min=1)
    n_way: int | Literal["all"] = "all"
    min_class_samples: int | None = setting(50, min=1)
    """Classes (multi-label: labels, by positives and negatives) with fewer samples over the
    episode split are left out; null keeps all."""
    split: Literal["train", "val", "test", "all"] = "all"
    """The target is never seen in pretraining, so episodes come from all its splits."""
    seed: int = setting(0, min=0)
    """Seed of the episode set: fixed while ``seed`` (training, heads) varies between repeats."""
    file: str | None = None
    """A stored episode set to evaluate on; its own settings replace the ones above."""
    chunk: int = setting(10, min=1)
    """Episodes gathered and adapted at a time (bounds memory)."""


@dataclass
class AdaptationConfig(Settings):
    """Settings of the built-in adaptation rules (MAML's test-time rule is set in ``maml``)."""

    finetune: FineTune = field(default_factory=FineTune)
    linear: LinearProbe = field(default_factory=LinearProbe)
    knn: KNN = field(default_factory=KNN)
    proto: Prototypes = field(default_factory=Prototypes)
    lpft: LPFT = field(default_factory=LPFT)


@dataclass
class SlurmConfig(Settings):
    """Resources of each SLURM job of a sweep (``--launcher slurm``): one job per (target, seed),
    one process per GPU within a job."""

    partition: str | None = None
    account: str | None = None
    gpus_per_node: int = setting(1, min=0)
    cpus_per_task: int = setting(8, min=1)
    mem_gb: int = setting(64, min=1)
    timeout_min: int = setting(24 * 60, min=1)


@dataclass
class ExperimentConfig(Settings):
    """One leave-one-out experiment (see the module docstring)."""

    target: str = "retina"
    methods: list[str] = field(default_factory=lambda: ["scratch", "mmpt"])
    reference: str | None = None
    """Paired per-episode differences are reported against this method, one of the methods run
    (default: the first of them); see ``resolve_reference``."""
    sources: Literal["default", "available"] | list[str] = "default"
    """default: every allowed source; available: those built or in --source-dir; or a list."""
    size: ImageSize = 28
    seed: int = setting(0, min=0)
    device: str = "auto"
    checkpoint: str | None = None
    """A backbone state dict for the ``checkpoint`` initialisation."""
    model: ModelConfig = field(default_factory=ModelConfig)
    episodes: EpisodesConfig = field(default_factory=EpisodesConfig)
    adaptation: AdaptationConfig = field(default_factory=AdaptationConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    maml: MAMLConfig = field(default_factory=MAMLConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.methods or any(not m.strip() for m in self.methods):
            raise ConfigError(f"config key methods: name at least one method, got {self.methods!r}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"config key methods: a method is named twice in {self.methods!r}")


def resolve_reference(reference: str | None, methods: Sequence[str]) -> str:
    """The method paired differences are taken against: ``reference`` if it is one of ``methods``
    (refused in one line otherwise, before any work), the first method when it is None. Resolved
    once per run, so every job, table and printout names the method it paired with."""
    if reference is None:
        return methods[0]
    if reference not in methods:
        raise ConfigError(f"config key reference: {reference!r} is not one of the methods run {list(methods)}; "
                          "name one of them (--reference), or leave it out to pair with the first")
    return reference


def load_experiment_config(profile: str | Path | None = None, folder: Path | None = None,
                           overrides: Mapping[str, Any] | None = None, sets: Iterable[str] = ()) -> ExperimentConfig:
    """The defaults, merged with a YAML profile (path or name in ``folder``), then ``overrides``
    (nested mapping, e.g. from command-line flags) and ``--set KEY=VALUE`` strings."""
    return load_settings(ExperimentConfig, profile, folder, overrides, sets)


def _import(path: str, method: str | None = None) -> Any:
    """``package.module:Name``, imported with the working directory on the path (as a user expects);
    a class is built without arguments. Whatever goes wrong is one ``PluginError`` line naming the
    method (``method``, default ``path``) and the module (the original exception chained, for ``--debug``)."""
    where = f"method {method or path!r}" + (f" ({path})" if method and method != path else "")
    module, _, name = path.partition(":")
    if not module or not name:
        raise MethodError(f"{where}: an import path is package.module:ClassName")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
            raise PluginError(f"{where}: cannot import {exc.name!r}; is it on PYTHONPATH?") from None
        raise PluginError(f"{where}: importing module {module!r} raised {one_line(exc)}") from exc
    except Exception as exc:
        raise PluginError(f"{where}: importing module {module!r} raised {one_line(exc)}") from exc
    if not hasattr(loaded, name):
        raise PluginError(f"{where}: module {module!r} has no {name!r}")
    obj = getattr(loaded, name)
    if not isinstance(obj, type):
        return obj
    try:
        return obj()
    except Exception as exc:
        raise PluginError(f"{where}: building {name}() (module {module}) raised {one_line(exc)}; a class "
                          "named by import path is built without arguments: give its arguments defaults, or name "
                          "an instance") from exc


def builtin_initialisations(config: ExperimentConfig) -> dict[str, Initialisation]:
    """The built-in initialisations by name, with this config's settings."""
    return _by_name(Scratch(), Pretrained(), ImageNet(), Checkpoint(config.checkpoint), MMPT(config.pretrain),
                    MAMLInit(config.maml))


def builtin_rules(config: ExperimentConfig) -> dict[str, AdaptationRule]:
    """The built-in adaptation rules by name, with this config's settings."""
    a, m = config.adaptation, config.maml
    return _by_name(a.finetune, a.linear, a.knn, a.proto, a.lpft,
                    MAMLInner(steps=m.test_steps, lr=m.inner_lr, bn_train=m.bn_train))


def _by_name(*parts: Initialisation | AdaptationRule) -> dict[str, Any]:
    return {part.name: part for part in parts}


def _part(name: str, kind: type, builtins: dict[str, Any], spec: str) -> Any:
    if ":" in name:
        obj = _import(name, spec)
        if not isinstance(obj, kind):
            raise MethodError(f"method part {name!r} is a {type(obj).__name__}, not an {kind.__name__}")
        return obj
    if name not in builtins:
        what = "initialisation" if kind is Initialisation else "adaptation rule"
        raise MethodError(f"unknown {what} {name!r}; built-in: {sorted(builtins)}, or package.module:ClassName")
    return builtins[name]


def build_method(spec: str, config: ExperimentConfig) -> Method:
    """The ``Method`` a name stands for (see the module docstring)."""
    spec = spec.strip()
    parts = spec.split("+")
    inits, rules = builtin_initialisations(config), builtin_rules(config)
    if len(parts) == 2:
        return Method(_part(parts[0].strip(), Initialisation, inits, spec),
                      _part(parts[1].strip(), AdaptationRule, rules, spec), name=spec)
    if len(parts) != 1:
        raise MethodError(f"method {spec!r}: write a built-in name, init+rule or package.module:ClassName")
    if ":" in spec:
        obj = _import(spec)
        if isinstance(obj, Method):
            obj.name = spec  # results are keyed by the name the config gives
            return obj
        if isinstance(obj, AdaptationRule):
            return Method(Scratch(), obj, name=spec)
        raise MethodError(f"method {spec!r} is a {type(obj).__name__}; give a Method, an AdaptationRule "
                          "(used on scratch) or an init+rule pair")
    if spec not in BUILTIN_METHODS:
        raise MethodError(f"unknown method {spec!r}; built-in: {sorted(BUILTIN_METHODS)}, an init+rule pair "
                          f"(initialisations {sorted(inits)}, rules {sorted(rules)}) or package.module:ClassName")
    init, rule = BUILTIN_METHODS[spec]
    return Method(inits[init], rules[rule], name=spec)


def methods_help() -> str:
    """What ``--methods`` takes, listed from the registries (for ``--help``)."""
    config = ExperimentConfig()
    builtins = ", ".join(f"{name} ({init}+{rule})" for name, (init, rule) in BUILTIN_METHODS.items())
    return (f"comma-separated methods: built-in {builtins}; or init+rule with initialisations "
            f"{', '.join(builtin_initialisations(config))} and rules {', '.join(builtin_rules(config))}; or "
            "package.module:ClassName for your own Method, Initialisation or AdaptationRule")


def build_methods(config: ExperimentConfig) -> list[Method]:
    """Every method the config names, in order."""
    return [build_method(name, config) for name in config.methods]
