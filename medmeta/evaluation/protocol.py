"""The leave-one-out few-shot protocol (MedIMeta, reference section 2) on MedMNIST.

For a target subset: pick the sources (every subset of the same dimensionality except the
target and its exclusion groups, from the manifest), build whatever is missing, fix one set
of evaluation episodes drawn from the whole target dataset (all splits: the target is never
seen in pretraining) and store it, then for each method build its backbone (training on the
sources if the initialisation needs it) and let its adaptation rule score every episode's
query set. Every method sees the same episodes and the same per-episode seeds, so methods
are compared episode by episode (paired differences to ``config.reference``).

Nothing finished is done twice: each method's result is cached in ``out/methods/`` under a
hash of everything it depends on, and trained initialisations keep their checkpoints in
``pretrained/<init>-<hash>/`` (hash of the training settings, backbone, size, sources and seed),
so an interrupted run resumes mid-training and methods sharing an initialisation train it once.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from .. import distributed
from ..data.manifest import Manifest
from ..data.store import Store
from ..data.tasks import MedMNISTTask, find_task
from ..episodes import Episode, EpisodeSampler, EpisodeSet, load_episode_set, materialise, save_episode_set
from ..errors import ConfigError, EpisodeError, MethodError, PluginError
from ..files import file_digest, locked, read_cache, safe_name, write_text_atomic
from ..learning.finetune import source_statistics
from ..learning.models import ARCHS, ModelConfig, changed_state, has_batchnorm, state_snapshot
from ..learning.runtime import NOT_TRAINING_KEYS, deterministic_cudnn, resolve_device, resolved_precision
from ..methods import AdaptationRule, InitContext, Initialisation, Method, Sources
from ..methods.base import plugin_errors, user_module
from .config import EpisodesConfig, ExperimentConfig, build_methods, resolve_reference
from .results import METRICS, add_paired_differences, format_table, package_versions, plot_results, summarise, write_results

SEED_STRIDE = 100003
"""Episode i of a run with seed s gets seed s * SEED_STRIDE + i (e.g. for its head)."""


@dataclass
class Target:
    """What the methods are evaluated on: the target dataset and its fixed episodes."""

    dataset: MedMNISTTask
    episodes: EpisodeSet
    dropped: tuple[str, ...]
    """Classes (labels) that ``min_class_samples`` left out."""


def stable_hash(obj: Any) -> str:
    """A short hash of a JSON-able object, identical in every process."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def resolve_sources(store: Store, target: str, sources: str | list[str], source_dir: str | None,
                    size: int) -> list[str]:
    """Source subsets for a target: ``default`` (all allowed), ``available`` (allowed, and built or
    present locally at ``size``) or a list."""
    manifest = store.manifest
    allowed = manifest.allowed_sources(target)
    if sources == "default":
        chosen = allowed
    elif sources == "available":
        chosen = [n for n in allowed if store.present(n, size, source_dir)]
    else:
        chosen = [manifest.resolve(s) for s in sources]
        banned = [s for s in chosen if s not in allowed]
        if banned:
            raise ConfigError(f"sources {banned} are not allowed for target {target}: they are the target, share "
                              f"its exclusion group or have other dimensionality; allowed: {allowed}")
    if not chosen:
        raise ConfigError(f"target {target} has no allowed source subsets ({sources}): allowed are "
                          f"{allowed or 'none'}; prepare some with `medmeta prepare` or pass --source-dir")
    return chosen


def _episode_file_settings(stored: EpisodeSet) -> dict[str, Any]:
    s = stored.sampler
    return {"shots": s["k_shot"], "queries": s["n_query"], "n_way": s["n_way"],
            "min_class_samples": s["min_class_samples"], "count": len(stored), "split": stored.split,
            "seed": stored.seed}


def prepare_target(store: Store, config: ExperimentConfig, out: Path) -> tuple[ExperimentConfig, Target]:
    """The target and its fixed evaluation episodes, created once in ``out`` and reused.

    With ``episodes.file`` the stored set's own settings (shots, queries, way, count, split)
    replace the config's, and the returned config says so.
    """
    ep = config.episodes
    task = find_task(config.target, config.size, store.manifest)
    if ep.file:
        path = Path(ep.file)
        if not path.is_file():
            raise EpisodeError(f"episode set {path} not found (--episodes-file)")
        stored = load_episode_set(path)
        settings = _episode_file_settings(stored)
        differing = [f"{k} {v!r} (the config said {getattr(ep, k)!r})" for k, v in settings.items()
                     if getattr(ep, k) != v]
        if differing:
            print(f"using the settings of episode set {path}: {', '.join(differing)}")
        config = config.replace(episodes=ep.replace(**settings))
        dataset = MedMNISTTask(store, task, split=stored.split, size=config.size)
        stored.check(dataset)
        sampler = EpisodeSampler(dataset, settings["n_way"], settings["shots"], settings["queries"],
                                 settings["count"], stored.seed, settings["min_class_samples"])
        return config, Target(dataset, stored, sampler.dropped)
    dataset = MedMNISTTask(store, task, split=ep.split, size=config.size)
    sampler = EpisodeSampler(dataset, n_way=ep.n_way, k_shot=ep.shots, n_query=ep.queries, n_episodes=ep.count,
                             seed=ep.seed, min_class_samples=ep.min_class_samples)
    path = out / f"episodes_{task.task_id}_{config.size}px_{ep.shots}shot.json"
    if path.is_file():
        stored = load_episode_set(path)
        stored.check(dataset)
        wanted = sampler.episode_set()
        if (stored.sampler, len(stored), stored.seed) != (wanted.sampler, len(wanted), wanted.seed):
            raise EpisodeError(f"episode set {path} holds {len(stored)} episodes drawn with {stored.sampler}, seed "
                               f"{stored.seed}; this run asks for {len(wanted)} with {wanted.sampler}, seed "
                               f"{wanted.seed}: use another --out folder or delete the file")
    else:
        save_episode_set(path, sampler)
        stored = load_episode_set(path)
    return config, Target(dataset, stored, sampler.dropped)


def _own_part(method: Method, part: Initialisation | AdaptationRule) -> object:
    """Whose code runs: a user's ``Method`` subclass, else the initialisation or rule it pairs."""
    return method if user_module(method) else part


def _rule_named(method: Method) -> str:
    """``method NAME``, with the module of its rule where that is a user's (for error lines)."""
    module = user_module(_own_part(method, method.rule))
    return f"method {method.name}" + (f" (module {module})" if module else "")


def _score(method: Method, backbone: nn.Module, batch: list[Episode], seed: int) -> list[dict[str, float]]:
    """Adapt to each episode of ``batch`` (query labels hidden) and score its query set."""
    if not batch:
        return []
    rule = _own_part(method, method.rule)
    with plugin_errors(method.name, rule, "predict"):
        scores = list(method.predict_many(backbone, [e.without_query_labels() for e in batch],
                                          [seed * SEED_STRIDE + e.index for e in batch]))
    where = _rule_named(method)
    if len(scores) != len(batch):
        raise PluginError(f"{where} returned {len(scores)} score tensors for {len(batch)} episodes")
    results = []
    for e, s in zip(batch, scores):
        if not isinstance(s, torch.Tensor):
            raise PluginError(f"{where} returned a {type(s).__name__} for episode {e.index}; return a tensor of "
                              "query scores (n_query, num_outputs)")
        want = (len(e.query_x), e.num_outputs)
        if tuple(s.shape) != want:
            raise MethodError(f"{where} returned scores shaped {tuple(s.shape)} for episode "
                              f"{e.index}; expected (n_query, num_outputs) = {want}")
        if not torch.isfinite(s).all():
            raise MethodError(f"{where} returned NaN or infinite scores for episode {e.index} "
                              "(a diverging fine-tune? try a lower learning rate)")
        assert e.query_y is not None
        results.append({"episode": e.index, **e.task_type.evaluate(e.query_y.cpu(), s.float().cpu())})
    return results


class BackboneChanged(MethodError):
    """A rule changed the backbone it was given (which other methods and episodes share)."""


def evaluate_method(method: Method, backbone: nn.Module, target: Target, seed: int, device: torch.device,
                    chunk: int = EpisodesConfig.chunk, episodes: Sequence[int] | None = None,
                    done: Sequence[dict[str, float]] = (),
                    on_chunk: Callable[[list[dict[str, float]]], None] | None = None) -> list[dict[str, float]]:
    """Adapt to every episode (or those at the given positions of the set) and score its query set.

    The rule sees each episode without its query labels. Episode i's seed is
    ``seed * SEED_STRIDE + i``, so a result is a pure function of the episode, the backbone and
    the seed, whatever else runs (on CUDA with deterministic cuDNN kernels, see ``deterministic_cudnn``).
    That is what makes resuming exact: ``done`` holds results already scored (by an interrupted
    run; every rank must pass the same), which are kept and not redone; ``on_chunk`` is called on
    rank 0 after every chunk with all results so far, every rank's, for saving.

    Ranks score their chunks in lockstep and gather after each; a failure on any rank (in a
    method, or in rank 0's ``on_chunk``) is raised on every rank at the next gather instead of
    leaving the others waiting.

    After every chunk the backbone must be bit for bit what it was (parameters and buffers, on
    the same device): a rule that changed it raises ``BackboneChanged`` on every rank instead of
    returning results that depend on the order episodes ran in, before that chunk is saved.
    """
    wanted = list(range(len(target.episodes)) if episodes is None else episodes)
    indices = {target.episodes[p].index for p in wanted}
    per_episode = [r for r in done if int(r["episode"]) in indices]
    finished = {int(r["episode"]) for r in per_episode}
    positions = [p for p in wanted if target.episodes[p].index not in finished]
    stream = materialise(target.dataset, [target.episodes[i] for i in distributed.shard(positions)], device=device)
    rounds = -(-len(positions) // (distributed.world_size() * chunk))
    before = state_snapshot(backbone)
    with distributed.progress(total=len(wanted), initial=len(finished), desc=f"adapt {method.name}",
                              unit="episode") as bar, deterministic_cudnn():
        for r in range(rounds + 1):  # the last round only saves the last chunk and reports failures
            mine: list[dict[str, float]] = []
            failure: BaseException | None = None
            try:
                changed = changed_state(backbone, before) if r > 0 else []
                if changed:
                    raise BackboneChanged(
                        f"{_rule_named(method)} changed the backbone it was given ({len(changed)} of its tensors, "
                        f"e.g. {changed[0]}); a rule must adapt a copy (medmeta.learning.finetune.WorkingCopy), never "
                        "the backbone other methods and episodes share")
                if r > 0 and on_chunk is not None and distributed.is_main():
                    on_chunk(sorted(per_episode, key=lambda e: e["episode"]))
                if r < rounds:
                    mine = _score(method, backbone, list(islice(stream, chunk)), seed)
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                failure = exc
            gathered = distributed.gather([(None if failure is None else f"{type(failure).__name__}: {failure}",
                                            mine)])
            if failure is not None:
                raise failure
            elsewhere = [f for f, _ in gathered if f is not None]
            if elsewhere:
                kind = BackboneChanged if elsewhere[0].startswith(f"{BackboneChanged.__name__}:") else MethodError
                raise kind(f"another process failed while adapting {method.name}: {elsewhere[0]}")
            new = [x for _, part in gathered for x in part]
            per_episode.extend(new)
            if new:
                bar.update(len(new))
                bar.set_postfix(auroc=f"{summarise(per_episode)['auroc']:.3f}")
    return sorted(per_episode, key=lambda e: e["episode"])


def _without_training_keys(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_training_keys(v) for k, v in obj.items() if k not in NOT_TRAINING_KEYS}
    return obj


def model_identity(model: ModelConfig, init: Initialisation) -> dict[str, Any]:
    """The model settings a result depends on: the weights file by its content's SHA-256 where
    the initialisation loads one (``Initialisation.weights_file``), never by its path, and not at
    all where it loads none (so ``--weights`` for one method retrains no other)."""
    identity = {k: v for k, v in model.to_dict().items() if k != "weights"}
    path = init.weights_file(model)
    if path:
        identity["weights_sha256"] = file_digest(path) if Path(path).is_file() else path
    return identity


def input_files(config: ExperimentConfig) -> dict[str, str | None]:
    """The SHA-256 of every file a run's config names (weights, checkpoint, episode set): recorded
    in results.json, so a sweep knows a finished job's files were not replaced since."""
    return {key: file_digest(path) if path and Path(path).is_file() else path
            for key, path in (("weights", config.model.weights), ("checkpoint", config.checkpoint),
                              ("episodes", config.episodes.file))}


def init_folder(pretrained: Path, method: Method, config: ExperimentConfig, dims: int, sources: list[str],
                device: torch.device) -> Path:
    """Where an initialisation keeps its training: named by everything the training depends on."""
    settings = method.init.settings()
    identity = {"init": _without_training_keys(settings), "model": model_identity(config.model, method.init),
                "size": config.size, "dims": dims, "sources": sources if method.needs_sources else [],
                "seed": config.seed, **resolved_precision(settings, device)}
    return pretrained / f"{settings['name']}-{stable_hash(identity)}"


class Protocol:
    """One leave-one-out experiment: its store, target, sources, episodes and output folders.

    ``run()`` does it all; the steps are methods so that a sweep or a distributed run can
    call them in its own order.
    """

    def __init__(self, config: ExperimentConfig, out: Path, methods: Sequence[Method] | None = None,
                 root: str | Path | None = None, source_dir: str | None = None, manifest: Manifest | None = None,
                 pretrained: Path | None = None, check_only: bool = False) -> None:
        """``check_only``: validate the target, methods and sources without touching devices (a
        sweep checks its jobs this way on a submit host that may have no GPU)."""
        self.store = Store(root, manifest)
        target = self.store.manifest.resolve(config.target)
        self.methods = list(methods) if methods is not None else build_methods(config)
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise MethodError(f"two methods share a name in {names}: give each its own (Method(..., name=...))")
        # The config records what runs: the methods' names and the one reference resolved from them.
        self.config = config.replace(target=target, methods=names, reference=resolve_reference(config.reference, names))
        self.dims = self.store.manifest[target].dims
        if self.dims == 3 and config.model.arch not in ARCHS:
            raise MethodError(f"{target} is 3D and {config.model.arch} a 2D architecture: 3D targets take resnet18 or "
                              "resnet50 (model.conv3d: 3d, 2.5d or acs)")
        for m in self.methods:
            if self.dims not in m.init.dims:
                raise MethodError(f"method {m.name} needs a {' or '.join(f'{d}D' for d in m.init.dims)} target; "
                                  f"{target} is {self.dims}D")
            if m.rule.bn_mode == "sources" and not m.needs_sources:
                raise MethodError(f"method {m.name}: bn=sources takes BatchNorm statistics from the sources an "
                                  "initialisation trained on (mmpt, maml); use own, support or transductive")
        self.out = Path(out)
        self.pretrained = Path(pretrained) if pretrained is not None else self.out / "pretrained"
        self.source_dir = source_dir
        needs_sources = any(m.needs_sources for m in self.methods)
        self.sources = (resolve_sources(self.store, target, self.config.sources, source_dir, self.config.size)
                        if needs_sources else [])
        self._backbones: dict[Path, tuple[nn.Module, float]] = {}
        if check_only:
            return
        self.device = resolve_device(self.config.device)
        distributed.init(self.device.type)

    def build_store(self) -> None:
        """Build the target and the sources (rank 0 builds, the other ranks wait)."""
        if distributed.is_main():
            for name in [self.config.target, *self.sources]:
                self.store.build(name, self.config.size, source_dir=self.source_dir)
        distributed.barrier()

    def source_data(self) -> Sources:
        """The sources' training and validation splits (mm-PT and MAML train on them)."""
        def split(name: str) -> dict[str, MedMNISTTask]:
            return {s: MedMNISTTask(self.store, s, name, size=self.config.size) for s in self.sources}

        return Sources(split("train"), split("val"))

    def cache_key(self, method: Method, target: Target) -> str:
        """A hash of everything a method's result depends on: the episodes by their content
        (``EpisodeSet.digest``) and the labels they were drawn from; the architecture (in the model
        settings) and the weights or checkpoint file the initialisation loads, by its content."""
        c, episodes = self.config, target.episodes
        key: dict[str, Any] = {
            "method": method.settings(), "model": model_identity(c.model, method.init), "size": c.size,
            "seed": c.seed, "sources": self.sources if method.needs_sources else [],
            "episodes": [episodes.digest, episodes.labels_crc32],
            **resolved_precision(method.settings(), self.device)}
        return stable_hash(key)

    def backbone(self, method: Method, writer: SummaryWriter | None) -> tuple[nn.Module, float]:
        """The method's starting backbone and its training seconds (all sessions, if it resumed);
        built once per initialisation folder in this run."""
        folder = init_folder(self.pretrained, method, self.config, self.dims, self.sources, self.device)
        if folder not in self._backbones:
            start = time.perf_counter()
            context = InitContext(self.dims, self.config.size, self.config.model, self.config.seed, self.device,
                                  folder, self.source_data() if method.needs_sources else None, writer)
            # Another job of a sweep may be training the same folder: rank 0 waits for it, then all ranks go.
            with locked(folder / ".lock") if distributed.is_main() and method.needs_sources else nullcontext():
                distributed.barrier()
                with plugin_errors(method.name, _own_part(method, method.init), "backbone"):
                    backbone = method.prepare(context)
                if not isinstance(backbone, nn.Module):
                    raise PluginError(f"method {method.name}: its initialisation returned a {type(backbone).__name__}, "
                                      "not a torch.nn.Module backbone")
                backbone = backbone.to(self.device)
                distributed.barrier()
            log = folder / "training.json"  # written by the initialisation just now (see save_trained)
            seconds = (json.loads(log.read_text())["seconds"] if log.is_file()
                       else time.perf_counter() - start)
            self._backbones[folder] = (backbone, seconds)
        if method.rule.bn_mode != "sources":
            return self._backbones[folder]
        key = folder / "sources-statistics"  # computed once per initialisation, for every rule that asks
        if key not in self._backbones:
            backbone, seconds = self._backbones[folder]
            self._backbones[key] = (source_statistics(backbone, self.source_data().train, self.config.seed), seconds)
        return self._backbones[key]

    def run(self) -> dict[str, Any]:
        """Run every method (reusing cached results) and write results.json/csv, the plot and the table."""
        self.build_store()
        main = distributed.is_main()
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            config, target = prepare_target(self.store, self.config, self.out)
        distributed.barrier()
        if not main:  # the episode set exists now: load it
            config, target = prepare_target(self.store, self.config, self.out)
        self.config = config
        if target.dropped and main:
            print(f"{target.dataset.task.task_id}: left out {', '.join(target.dropped)} (fewer than "
                  f"min_class_samples={config.episodes.min_class_samples} samples)")
        results: dict[str, Any] = {
            "target": config.target, "task": target.dataset.task.task_id, "sources": self.sources,
            "config": config.to_dict(), "seed": config.seed, "device": str(self.device),
            "processes": distributed.world_size(), "threads": torch.get_num_threads(),
            "versions": package_versions(), "reference": config.reference, "inputs": input_files(config),
            "episode_set": {"task": target.episodes.task_id, "split": target.episodes.split,
                            "count": len(target.episodes), "sampler": target.episodes.sampler,
                            "seed": target.episodes.seed, "dropped": list(target.dropped),
                            "size": target.episodes.size, "digest": target.episodes.digest,
                            "episode_digests": target.episodes.episode_digests()},
            "methods": {}}
        writer = SummaryWriter(self.out / "tensorboard") if main else None
        try:
            for method in self.methods:
                results["methods"][method.name] = self.run_method(method, target, writer)
                add_paired_differences(results["methods"], config.reference)
                if main:
                    write_results(self.out, results)
        finally:
            if writer is not None:
                writer.close()
        if main:
            plot_results(self.out, results)
            print(format_table(results))
        distributed.barrier()  # every rank returns once the files are written
        return results

    def run_method(self, method: Method, target: Target, writer: SummaryWriter | None) -> dict[str, Any]:
        """One method's result: from the cache, or trained, adapted and scored (then cached)."""
        cache = self.out / "methods" / f"{safe_name(method.name)}.json"
        key = self.cache_key(method, target)
        cached = read_cache(cache, f"{method.name} is run again") if distributed.is_main() else None
        cached = distributed.broadcast(cached if isinstance(cached, dict) and cached.get("key") == key else None)
        if cached is not None:
            return cached["result"]
        start = time.perf_counter()
        backbone, train_seconds = self.backbone(method, writer)
        if method.rule.bn_mode is not None and not has_batchnorm(backbone) and distributed.is_main():
            print(f"{method.name}: the backbone has no BatchNorm layers, so bn={method.rule.bn_mode} changes nothing")
        # Episodes scored before an interruption (same key) are kept: a killed run redoes at most a chunk.
        partial = cache.parent / "partial" / cache.name
        saved = distributed.broadcast(_read_partial(partial, key, target) if distributed.is_main() else {})
        adapt_start = time.perf_counter()
        earlier = saved.get("adapt_seconds", 0.0)

        def save(so_far: list[dict[str, float]]) -> None:
            seconds = earlier + time.perf_counter() - adapt_start
            write_text_atomic(partial, json.dumps({"key": key, "per_episode": so_far, "adapt_seconds": seconds}))

        try:
            per_episode = evaluate_method(method, backbone, target, self.config.seed, self.device,
                                          self.config.episodes.chunk, done=saved.get("per_episode", []),
                                          on_chunk=save)
        except BackboneChanged:
            if distributed.is_main():  # what it scored depends on the changes: nothing of it is kept
                partial.unlink(missing_ok=True)
            self._backbones = {k: v for k, v in self._backbones.items() if v[0] is not backbone}
            raise
        done = time.perf_counter()
        if writer is not None:
            for e in per_episode:
                writer.add_scalar(f"adapt/{safe_name(method.name)}/auroc", e["auroc"], e["episode"])
        result = {"summary": summarise(per_episode), "per_episode": per_episode, "settings": method.settings(),
                  "transductive": method.rule.transductive and has_batchnorm(backbone),
                  "seconds": {"train": train_seconds, "adapt": earlier + done - adapt_start,  # every run's
                              "total": earlier + done - start}}
        if distributed.is_main():
            write_text_atomic(cache, json.dumps({"key": key, "result": result}, default=str))
            partial.unlink(missing_ok=True)
        return result


def _read_partial(path: Path, key: str, target: Target) -> dict[str, Any]:
    """The episodes an interrupted run scored, if it ran with this key (else nothing to reuse).
    A file whose entries are not each a distinct episode of the set with every metric a number is
    warned about in one line and ignored: its episodes are adapted again."""
    saved = read_cache(path, "its episodes are adapted again")
    if not isinstance(saved, dict) or saved.get("key") != key:
        return {}
    problem = partial_problem(saved, {s.index for s in target.episodes})
    if problem:
        warnings.warn(f"{path}: {problem}; its episodes are adapted again", stacklevel=2)
        return {}
    return saved


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def partial_problem(saved: dict[str, Any], episodes: set[int]) -> str:
    """What is wrong with a partial result (``{"per_episode": [...], "adapt_seconds": s}``) for a
    set of these episode indices, or "" when nothing is."""
    entries = saved.get("per_episode")
    if not isinstance(entries, list):
        return "per_episode is not a list"
    if not _number(saved.get("adapt_seconds")) or saved["adapt_seconds"] < 0:
        return f"adapt_seconds is {saved.get('adapt_seconds')!r}, not a number of seconds"
    seen: set[int] = set()
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("episode"), int) or isinstance(e.get("episode"), bool):
            return f"an entry without an episode index: {e!r}"
        if e["episode"] not in episodes:
            return f"episode {e['episode']} is not in the episode set"
        if e["episode"] in seen:
            return f"episode {e['episode']} is listed twice"
        seen.add(e["episode"])
        bad = [m for m in METRICS if not _number(e.get(m))]
        if bad:
            return f"episode {e['episode']} has no numeric {bad[0]}"
    return ""


def run_protocol(config: ExperimentConfig, out: str | Path, methods: Sequence[Method] | None = None,
                 root: str | Path | None = None, source_dir: str | None = None, manifest: Manifest | None = None,
                 pretrained: str | Path | None = None) -> dict[str, Any]:
    """Run one leave-one-out experiment and write its results under ``out`` (see ``Protocol``).

    ``methods``: ``Method`` objects to compare (default: those ``config.methods`` names).
    """
    return Protocol(config, Path(out), methods, root, source_dir, manifest,
                    None if pretrained is None else Path(pretrained)).run()
