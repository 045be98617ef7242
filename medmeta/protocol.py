"""The leave-one-out few-shot protocol (MedIMeta, reference section 2) on MedMNIST.

For a target subset: pick the sources (every subset of the same dimensionality except the
target and its exclusion groups, from the manifest), build whatever is missing, fix one set
of evaluation episodes drawn from the whole target dataset (all splits; the target is never
seen in pretraining) and store it, then for each method get a backbone and adapt it to
every episode with a fresh head, scoring the query set. Every method sees the same
episodes; each method's result is saved as soon as it finishes, so an interrupted run
resumes where it stopped (mm-PT and MAML also resume mid-training from checkpoints).

Methods: ``scratch`` (random init), ``imagenet`` (torchvision ImageNet weights, 2D only),
``mmpt`` (multi-domain multi-task pretraining on the sources) and ``maml`` (mm-MAML).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from .adaptation import adapt_episodes
from .episodes import EpisodeSampler, EpisodeSet, load_episode_set, save_episode_set
from .metrics import evaluate
from .models import build_backbone
from .manifest import Manifest
from .results import (add_paired_differences, format_table, package_versions, plot_results, summarise, write_atomic,
                      write_results)
from .store import Store
from .tasks import MedMNISTTask, find_task
from .training import (MAMLConfig, MultiTaskPretrainer, PretrainConfig, checkpoint_identity, resolve_device,
                       save_atomic, train_maml)

METHODS = ("scratch", "imagenet", "mmpt", "maml")


def resolve_sources(store: Store, target: str, sources: str | list[str], source_dir: str | None,
                    size: int) -> list[str]:
    """Source subsets for a target: ``default`` (all allowed), ``available`` (allowed, and built or
    in ``source_dir`` at ``size``) or a list."""
    manifest = store.manifest
    allowed = manifest.allowed_sources(target)
    if sources == "default":
        chosen = allowed
    elif sources == "available":
        built = {s for s, z in store.built() if z == size}
        local = {n for n in allowed if source_dir and size in manifest[n].files
                 and (Path(source_dir) / manifest[n].file(size).file).is_file()}
        chosen = [n for n in allowed if n in built or n in local]
    else:
        chosen = [manifest.resolve(s) for s in sources]
        banned = [s for s in chosen if s not in allowed]
        if banned:
            raise ValueError(f"sources {banned} are not allowed for target {target}: they are the target, share "
                             f"its exclusion group or have other dimensionality; allowed: {allowed}")
    if not chosen:
        raise ValueError(f"target {target} has no allowed source subsets ({sources}): allowed are {allowed or 'none'}; "
                         "prepare some with `medmeta prepare` or pass --source-dir")
    return chosen


def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _config_key(cfg: dict[str, Any], *sections: str) -> str:
    """A short hash of the config parts a cached result depends on."""
    return _hash({s: cfg.get(s) for s in sections})


def target_episodes(store: Store, target: str, cfg: dict[str, Any], out: Path
                    ) -> tuple[MedMNISTTask, EpisodeSet, tuple[str, ...]]:
    """The target dataset, its fixed evaluation episodes (created once and reused) and the
    classes (labels) that ``min_class_samples`` left out."""
    ep = cfg["episodes"]
    dataset = MedMNISTTask(store, find_task(target, cfg["size"], store.manifest), split=ep["split"], size=cfg["size"])
    path = Path(ep["file"]) if ep.get("file") else out / f"episodes_{dataset.task.task_id}_{cfg['size']}px_{ep['shots']}shot.json"
    if ep.get("file") and not path.is_file():
        raise FileNotFoundError(f"episode set {path} not found (--episodes-file)")
    sampler = EpisodeSampler(dataset, n_way=ep["n_way"], k_shot=ep["shots"], n_query=ep["queries"],
                             n_episodes=ep["count"], seed=cfg["seed"], min_class_samples=ep["min_class_samples"])
    if path.is_file():
        stored = load_episode_set(path)
        stored.check(dataset)
        fresh = (sampler.episode_set().sampler, ep["count"], cfg["seed"])
        if not ep.get("file") and (stored.sampler, len(stored), stored.seed) != fresh:
            raise ValueError(f"episode set {path} holds {len(stored)} episodes drawn with {stored.sampler}, seed "
                             f"{stored.seed}; this run asks for {ep['count']} with {fresh[0]}, seed {cfg['seed']}: "
                             "use another --out folder or delete the file")
        return dataset, stored, sampler.dropped
    save_episode_set(path, sampler)
    return dataset, load_episode_set(path), sampler.dropped


def source_datasets(store: Store, sources: list[str], size: int, split: str) -> dict[str, MedMNISTTask]:
    """One dataset per source task (ChestMNIST contributes its multi-label task)."""
    return {name: MedMNISTTask(store, name, split, size=size) for name in sources}


def make_backbone(cfg: dict[str, Any], dims: int, weights: str | None = None) -> nn.Module:
    model = cfg["model"]
    torch.manual_seed(cfg["seed"])
    return build_backbone(model["arch"] if dims == 2 else "resnet18", dims=dims, stem=model["stem"], weights=weights)


def evaluate_backbone(backbone: nn.Module, dataset: MedMNISTTask, episode_set: EpisodeSet, cfg: dict[str, Any],
                      device: torch.device, desc: str,
                      adapt: Callable[..., list[torch.Tensor]] | None = None) -> list[dict[str, float]]:
    """Adapt to every episode and score its query set.

    ``adapt(task_type, [(support_x, support_y, query_x, num_outputs), ...], seeds)`` returns query
    logits per episode; by default fine-tuning with a fresh head (``adaptation`` settings).
    """
    a = cfg["adaptation"]

    def fine_tune(task_type: str, episodes: list[tuple], seeds: list[int]) -> list[torch.Tensor]:
        return adapt_episodes(backbone, task_type, episodes[0][3], [e[:3] for e in episodes], steps=a["steps"],
                              lr=a["lr"], head_only=a["head_only"], seeds=seeds,
                              batched=None if a["batched"] == "auto" else a["batched"])

    adapt = adapt or fine_tune
    backbone.to(device)
    per_episode = []
    chunk = max(1, int(a["chunk"]))
    episodes = episode_set.episodes(dataset, device=device)
    with tqdm(total=len(episode_set), desc=desc, unit="episode") as bar:
        while True:
            batch = [e for _, e in zip(range(chunk), episodes)]
            if not batch:
                break
            logits = adapt(dataset.task.task_type, [(e.support_x, e.support_y, e.query_x, e.num_outputs) for e in batch],
                           [cfg["seed"] * 100003 + e.index for e in batch])
            for e, lg in zip(batch, logits):
                scores = evaluate(dataset.task.task_type, e.query_y.cpu().numpy(), lg.float().cpu().numpy())
                per_episode.append({"episode": e.index, **scores})
            bar.update(len(batch))
            bar.set_postfix(auroc=f"{np.nanmean([p['auroc'] for p in per_episode]):.3f}")
    return per_episode


def run_protocol(cfg: dict[str, Any], out: Path, root: str | None = None, source_dir: str | None = None,
                 manifest: Manifest | None = None) -> dict[str, Any]:
    """Run the leave-one-out experiment described by ``cfg``; write results under ``out`` and return them."""
    store = Store(root, manifest)
    manifest = store.manifest
    target = manifest.resolve(cfg["target"])
    unknown = [m for m in cfg["methods"] if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    dims = manifest[target].dims
    if "imagenet" in cfg["methods"] and dims == 3:
        raise ValueError(f"method imagenet needs a 2D target; {target} is 3D (there are no ImageNet 3D weights)")
    needs_sources = any(m in ("mmpt", "maml") for m in cfg["methods"])
    sources = resolve_sources(store, target, cfg["sources"], source_dir, cfg["size"]) if needs_sources else []
    for name in [target, *sources]:
        store.build(name, cfg["size"], source_dir=source_dir)
    device = resolve_device(cfg["device"])
    out.mkdir(parents=True, exist_ok=True)
    dataset, episode_set, dropped = target_episodes(store, target, cfg, out)
    if dropped:
        print(f"{dataset.task.task_id}: left out {', '.join(dropped)} (fewer than "
              f"min_class_samples={cfg['episodes']['min_class_samples']} samples)")
    results: dict[str, Any] = {"target": target, "task": dataset.task.task_id, "sources": sources, "config": cfg,
                               "seed": cfg["seed"], "device": str(device), "versions": package_versions(),
                               "episode_set": {"task": episode_set.task_id, "split": episode_set.split,
                                               "count": len(episode_set), "sampler": episode_set.sampler,
                                               "dropped": list(dropped)},
                               "reference": cfg["reference"], "methods": {}}
    with SummaryWriter(out / "tensorboard") as writer:
        for method in cfg["methods"]:
            cache = out / f"method_{method}.json"
            trained_by = {"mmpt": ["pretrain"], "maml": ["maml"]}.get(method, [])
            key = _config_key(cfg, "size", "seed", "model", "episodes", "adaptation", *trained_by) + ",".join(sources)
            cached = json.loads(cache.read_text()) if cache.is_file() else {}
            if cached.get("key") == key:
                results["methods"][method] = cached["result"]
                continue
            start = time.perf_counter()
            backbone, adapt = _method_backbone(method, cfg, dims, store, sources, device, out, writer)
            trained = time.perf_counter()
            per_episode = evaluate_backbone(backbone, dataset, episode_set, cfg, device, f"adapt {method}", adapt)
            done = time.perf_counter()
            for e in per_episode:
                writer.add_scalar(f"adapt/{method}/auroc", e["auroc"], e["episode"])
            result = {"summary": summarise(per_episode), "per_episode": per_episode,
                      "seconds": {"train": trained - start, "adapt": done - trained, "total": done - start}}
            write_atomic(cache, json.dumps({"key": key, "result": result}))
            results["methods"][method] = result
            add_paired_differences(results["methods"], cfg["reference"])
            write_results(out, results)
    add_paired_differences(results["methods"], cfg["reference"])
    write_results(out, results)
    plot_results(out, results)
    print(format_table(results))
    return results


def _method_backbone(method: str, cfg: dict[str, Any], dims: int, store: Store, sources: list[str],
                     device: torch.device, out: Path, writer: SummaryWriter
                     ) -> tuple[nn.Module, Callable[..., list[torch.Tensor]] | None]:
    """The backbone a method starts adaptation from, and its own adaptation rule if it has one."""
    if method == "scratch":
        return make_backbone(cfg, dims), None
    if method == "imagenet":
        return make_backbone(cfg, dims, weights=cfg["model"]["weights"] or "imagenet"), None
    train = source_datasets(store, sources, cfg["size"], "train")
    val = source_datasets(store, sources, cfg["size"], "val")
    if method == "mmpt":
        p = cfg["pretrain"]
        config = PretrainConfig(**{k: p[k] for k in PretrainConfig.__dataclass_fields__ if k in p}, seed=cfg["seed"])
        folder = _training_folder(out / "mmpt", config, cfg, sources)
        trainer = MultiTaskPretrainer(make_backbone(cfg, dims), train, val, config, device,
                                      checkpoint=folder / "checkpoint.pt", writer=writer)
        backbone = trainer.run()
        save_atomic(backbone.state_dict(), folder / "backbone.pt")
        return backbone, None
    m = cfg["maml"]
    config = MAMLConfig(**{k: m[k] for k in MAMLConfig.__dataclass_fields__ if k in m}, seed=cfg["seed"])
    folder = _training_folder(out / "maml", config, cfg, sources)
    maml = train_maml(make_backbone(cfg, dims), train, config, device, checkpoint=folder / "checkpoint.pt",
                      writer=writer)

    def adapt(task_type: str, episodes: list[tuple], seeds: list[int]) -> list[torch.Tensor]:
        return [maml.adapt_and_predict(task_type, n_out, sx, sy, qx) for sx, sy, qx, n_out in episodes]

    return maml.backbone, adapt


def _training_folder(parent: Path, config: Any, cfg: dict[str, Any], sources: list[str]) -> Path:
    """One folder per training run identity (config minus ``steps``, model, size, sources), so a
    changed config trains afresh instead of resuming another config's checkpoint."""
    return parent / _hash(checkpoint_identity(config, model=cfg["model"], size=cfg["size"], sources=sources))
