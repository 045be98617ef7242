"""Supervised baselines (MedMNIST v2 and MedMNIST+), reproduced on whatever data is present.

Per dataset and seed, each scheme trains on the train split, selects on val and scores test:

* 2D: ``end2end`` (the whole network, ``learning.supervised``), ``linear`` (a linear probe on
  frozen features: the ``linear`` adaptation rule with the training split as its support set),
  ``knn`` (the ``knn`` rule; MedMNIST+'s k = 11, Euclidean distance on unnormalised features,
  uniform votes, as their released code), ``pixels`` (``learning.pixels``, the auto-sklearn stand-in);
* 3D: ``end2end`` with each of ``convs`` (2.5D, 3D, ACS; ``learning.models.ResNet3d``) and ``pixels``.

The backbone is any of ``models.build_backbone``'s (``model.arch``: medmeta's ResNets,
torchvision's AlexNet, any timm model), started from ``init``: ``scratch`` (random; MedMNIST
v2's recipe) or ``pretrained`` (the architecture's published weights, or ``model.weights``, a
local file; MedMNIST+'s recipe). Frozen features have their BatchNorm statistics re-estimated
on training batches (a whole training split, not a 5-shot support).

``input_size`` feeds small images to a larger network input as MedMNIST+ does (``pad``: zero
padding after normalisation; ``bilinear``: resizing). Each run is cached under
``out/<dataset>/<scheme>/seed<k>/`` (end-to-end training checkpoints every epoch and resumes),
and the combined table (``baselines.json``, ``.csv``, ``.md``) gives mean +- std over seeds next
to the published figures of ``experiments/configs/published_baselines.yaml``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from torch.utils.tensorboard import SummaryWriter

from ..data.manifest import ImageSize, Manifest
from ..data.store import Store
from ..data.tasks import MedMNISTTask
from ..data.transforms import PadTo, ResizeTo
from ..episodes import Episode
from ..errors import ConfigError
from ..files import file_digest, read_cache, torch_save_atomic, write_text_atomic
from ..learning.backbones import Start, start_weights
from ..learning.models import ARCHS, Classifier, Conv3dKind, ModelConfig, build_backbone, reestimate_batchnorm
from ..learning.pixels import pixel_baseline, unfit_candidates
from ..learning.runtime import autocast, predict, resolve_device, resolved_precision, uses_bf16
from ..learning.supervised import SupervisedConfig, epoch_batches, train_supervised
from ..methods import KNN, LinearProbe
from ..settings import Settings, repeated, setting
from .grid import grid_markdown, write_grid
from .protocol import stable_hash
from .results import package_versions, write_csv

Scheme = Literal["end2end", "linear", "knn", "pixels"]
Init = Start
"""Where a supervised backbone starts: random (MedMNIST v2) or published weights (MedMNIST+)."""
Resize = Literal["pad", "bilinear"]
"""How small images reach a larger network input: zero-padding (MedMNIST+'s code) or bilinear resizing."""


@dataclass
class BaselineConfig(Settings):
    """What ``experiments/supervised.py`` runs (see the module docstring)."""

    datasets: list[str] = field(default_factory=lambda: ["breast"])
    """Subsets, or ["all"] for every subset present at ``size`` (3D subsets at 28 or 64)."""
    size: ImageSize = 28
    seeds: list[int] = field(default_factory=lambda: [0])
    schemes: list[Scheme] = field(default_factory=lambda: ["end2end", "linear", "knn", "pixels"])
    convs: list[Conv3dKind] = field(default_factory=lambda: ["2.5d", "3d", "acs"])
    """3D subsets: the convolutions of the end-to-end ResNets."""
    model: ModelConfig = field(default_factory=ModelConfig)
    init: Init = "scratch"
    """Where the backbone starts: random, or the architecture's published weights (``model.weights``: a file)."""
    input_size: int | None = setting(None, min=28)
    resize: Resize = "pad"
    train: SupervisedConfig = field(default_factory=SupervisedConfig)
    linear: LinearProbe = field(default_factory=lambda: LinearProbe(max_iter=500))
    knn: KNN = field(default_factory=lambda: KNN(k=11, weights="uniform"))
    bn_batches: int = setting(20, min=1)
    """Training batches that give frozen features their BatchNorm statistics."""
    device: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.seeds:
            raise ConfigError("config key seeds: give at least one seed, e.g. [0]")
        twice = repeated(self.seeds)
        if twice is not None:  # copies of one run would pass for agreeing seeds (sd 0)
            raise ConfigError(f"config key seeds: seeds must be distinct; {twice} is given twice in {self.seeds}")
        if self.model.weights and self.init != "pretrained":
            raise ConfigError(f"config key model.weights: {self.model.weights!r} are pretrained weights, but init is "
                              f"{self.init}: add --init pretrained, or leave the weights out")


def _published(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def runs_for(config: BaselineConfig, dims: int) -> list[tuple[str, Conv3dKind | None]]:
    """(scheme, conv) pairs for a subset of ``dims`` dimensions."""
    if dims == 2:
        return [(s, None) for s in config.schemes]
    out: list[tuple[str, Conv3dKind | None]] = [("end2end", c) for c in config.convs] if "end2end" in config.schemes else []
    return out + ([("pixels", None)] if "pixels" in config.schemes else [])


def _label(scheme: str, conv: str | None) -> str:
    return scheme if conv is None else f"{scheme}-{conv}"


class Baselines:
    """Every (dataset, seed, scheme) run of a ``BaselineConfig`` under ``out``."""

    def __init__(self, config: BaselineConfig, out: Path, root: str | None = None, source_dir: str | None = None,
                 manifest: Manifest | None = None, published: Path | None = None) -> None:
        self.config, self.out, self.source_dir = config, Path(out), source_dir
        self.store = Store(root, manifest)
        self.device = resolve_device(config.device)
        self.published = _published(published) if published else {}
        names = config.datasets
        if names == ["all"]:
            names = [n for n in self.store.manifest.subsets if self.store.present(n, config.size, source_dir)]
            if not names:
                raise ConfigError(f"--dataset all: no subset is present at {config.size}px")
        self.datasets = [self.store.manifest.resolve(n) for n in names]
        for name in self.datasets:
            self.store.manifest[name].file(config.size)
            if self.store.manifest[name].dims == 3 and (config.init == "pretrained" or config.model.arch not in ARCHS):
                raise ConfigError(f"{name} is 3D: it takes resnet18 or resnet50 from scratch (2.5D, 3D or ACS "
                                  f"convolutions), not {config.model.arch} with init {config.init}")
        if config.input_size is not None and config.input_size < config.size and config.resize == "pad":
            raise ConfigError(f"config key input_size: cannot pad {config.size}px images to {config.input_size}; "
                              "give a larger input_size or resize: bilinear")

    def transform(self) -> Any:
        """The per-image transform to the network's input size (padding or resizing), or None."""
        size = self.config.input_size
        if size is None:
            return None
        return PadTo(size) if self.config.resize == "pad" else ResizeTo(size)

    def run(self) -> dict[str, Any]:
        """Every (dataset, scheme, convolution, seed) run, from its cache where valid; writes
        baselines.{json,csv,md}."""
        c = self.config
        for name in self.datasets:
            self.store.build(name, c.size, source_dir=self.source_dir)
        rows = []
        for name in self.datasets:
            dims = self.store.manifest[name].dims
            for scheme, conv in runs_for(c, dims):
                budget = {"epochs": c.train.epochs, "batch_size": c.train.batch_size} if scheme == "end2end" else {}
                for seed in c.seeds:
                    rows.append({**self.run_one(name, scheme, conv, seed), "size": c.size, "arch": c.model.arch,
                                 "init": c.init, **budget})
        combined = {"config": c.to_dict(), "versions": package_versions(), "device": str(self.device),
                    "runs": rows, "table": combine(rows, self.published)}
        write_tables(self.out, combined)
        return combined

    def split(self, name: str, split: str, with_transform: bool = True) -> MedMNISTTask:
        """One split of a subset at the configured size, with the input transform unless told otherwise."""
        return MedMNISTTask(self.store, name, split, size=self.config.size,
                            transform=self.transform() if with_transform else None)

    def run_one(self, name: str, scheme: str, conv: str | None, seed: int) -> dict[str, Any]:
        """One run, from its cache when the settings it depends on are unchanged."""
        c = self.config
        folder = self.out / self.store.manifest[name].short_name / _label(scheme, conv) / f"seed{seed}"
        network = {"model": c.model.to_dict(), "input_size": c.input_size, "resize": c.resize,
                   **({"init": c.init, "weights": file_digest(c.model.weights) if c.model.weights else None}
                      if c.init != "scratch" else {})}
        parts = {"scheme": scheme, "conv": conv, "seed": seed, "size": c.size,
                 **(network if scheme != "pixels" else {}),  # the pixel search uses no network: one per dataset
                 **({"train": c.train.to_dict()} if scheme == "end2end" else {}),
                 **({"rule": getattr(c, scheme).to_dict(), "bn_batches": c.bn_batches,
                     **({"bf16": True} if uses_bf16(self.device, c.train.precision) else {})}
                    if scheme in ("linear", "knn") else {})}
        key = stable_hash({**parts, **resolved_precision(parts, self.device)})
        cache = folder / "result.json"
        cached = read_cache(cache, "this run is done again")
        # the pixel search's candidates that would not fit in memory: decided once, before any image is read
        unfit = self.unfit_pixel_candidates(name) if scheme == "pixels" else {}
        if isinstance(cached, dict) and cached.get("key") == key and not _fits_more_now(name, cached["result"], unfit):
            return cached["result"]
        start = time.perf_counter()
        if scheme == "pixels":
            splits = (self.split(name, s, with_transform=False) for s in ("train", "val", "test"))
            result = pixel_baseline(*splits, seed=seed, left_out=unfit)
        elif scheme == "end2end":
            result = self.end2end(name, conv, seed, folder)
        else:
            result = self.frozen(name, scheme, seed)
        result = {"dataset": name, "scheme": _label(scheme, conv), "seed": seed,
                  "seconds": time.perf_counter() - start, **result}
        write_text_atomic(cache, json.dumps({"key": key, "result": result}, default=str))
        return result

    def unfit_pixel_candidates(self, name: str) -> dict[str, str]:
        """The pixel search's candidates that would not fit in memory now for this subset (sizes
        from the manifest, which the store's build checked against the files)."""
        subset = self.store.manifest[name]
        return unfit_candidates(subset.splits, int(np.prod(subset.image_shape(self.config.size))))

    def backbone(self, dims: int, conv: str | None, seed: int) -> torch.nn.Module:
        """A freshly seeded backbone for ``dims`` (and the 3D convolution kind)."""
        torch.manual_seed(seed)
        m = self.config.model
        return build_backbone(m.arch, dims=dims, stem=m.stem, weights=start_weights(self.config.init, m.weights),
                              conv3d=conv or "3d", input=m.input)

    def end2end(self, name: str, conv: str | None, seed: int, folder: Path) -> dict[str, Any]:
        """Train end-to-end (checkpointed in ``folder``), keep the best validation epoch, score the test split."""
        train, val, test = (self.split(name, s) for s in ("train", "val", "test"))
        model = Classifier(self.backbone(train.task.dims, conv, seed), train.task.num_outputs)
        with SummaryWriter(folder / "tensorboard") as writer:
            best = train_supervised(model, train, val, self.config.train, self.device, seed=seed,
                                    checkpoint=folder / "checkpoint.pt", writer=writer,
                                    context={"model": self.config.model.to_dict(), "conv3d": conv,
                                             "input_size": self.config.input_size, "resize": self.config.resize})
        model.eval()
        logits, labels = predict(model, test, self.device, precision=self.config.train.precision)
        scores = test.task.task_type.evaluate(labels, logits)
        return {"test_auroc": scores["auroc"], "test_acc": scores["acc"], "best_epoch": best["epoch"],
                "epochs_run": len(best["history"]), "val_auroc": best["val_auroc"], "val_acc": best["val_acc"],
                "train_seconds": best["seconds"], "data_share": best["data_share"]}

    def frozen_features(self, name: str, seed: int) -> dict[str, torch.Tensor]:
        """The frozen backbone's features of every split of ``name``: computed once per backbone
        (architecture, weights, input, seed) and cached in ``out/<dataset>/features/``, so the
        linear probe and k-NN (and a grid of rules) read them instead of recomputing; features, not
        images, are held, so memory stays bounded at 224px."""
        c = self.config
        identity = {"dataset": name, "size": c.size, "model": c.model.to_dict(), "init": c.init, "seed": seed,
                    "weights": file_digest(c.model.weights) if c.init == "pretrained" and c.model.weights else None,
                    "input_size": c.input_size, "resize": c.resize, "bn_batches": c.bn_batches,
                    **({"bf16": True} if uses_bf16(self.device, c.train.precision) else {})}
        path = self.out / self.store.manifest[name].short_name / "features" / f"{stable_hash(identity)}.pt"
        if path.is_file():
            try:
                saved = torch.load(path, map_location=self.device, weights_only=True)
                if isinstance(saved, dict) and set(saved) == {"train", "val", "test"}:
                    return saved
            except (OSError, RuntimeError, ValueError, EOFError):
                pass
            print(f"{path}: not a readable feature cache; the features are computed again")
        splits = {s: self.split(name, s) for s in ("train", "val", "test")}
        backbone = self.backbone(splits["train"].task.dims, None, seed).to(self.device)
        order = np.random.default_rng(seed).permutation(len(splits["train"]))[:c.bn_batches * 256]
        with autocast(self.device, c.train.precision):
            reestimate_batchnorm(backbone, (splits["train"].get_batch(np.sort(batch), self.device)[0]
                                            for batch in epoch_batches(order, 256)))
        backbone.eval()
        if self.device.type == "cuda":
            backbone = backbone.to(memory_format=torch.channels_last)
        features = {s: self.features(backbone, ds) for s, ds in splits.items()}
        torch_save_atomic(features, path)
        return features

    @torch.inference_mode()
    def features(self, backbone: torch.nn.Module, ds: MedMNISTTask, batch: int = 256) -> torch.Tensor:
        """Backbone features of a whole split, in order, computed in batches (float32)."""
        out = []
        for start in range(0, len(ds), batch):
            x, _ = ds.get_batch(np.arange(start, min(start + batch, len(ds))), self.device)
            with autocast(self.device, self.config.train.precision):
                out.append(backbone(x).float())
        return torch.cat(out)

    def frozen(self, name: str, scheme: str, seed: int) -> dict[str, Any]:
        """A frozen-feature rule with the whole training split as its support set."""
        features = self.frozen_features(name, seed)
        train = self.split(name, "train")
        task_type = train.task.task_type
        stub = Episode(torch.empty(0), torch.empty(0), torch.empty(0), None, task_type,
                       tuple(range(train.task.num_classes if not task_type.binary else 2)))
        support = features["train"]
        support_y = train.label_tensor(np.arange(len(train))).to(self.device)
        rule: LinearProbe | KNN = getattr(self.config, scheme)
        if isinstance(rule, LinearProbe):
            head = rule.head(support, support_y, stub)  # fitted once, on the whole training split

            def score(query: torch.Tensor) -> torch.Tensor:
                return torch.nn.functional.linear(query, head["weight"], head["bias"])
        else:
            def score(query: torch.Tensor) -> torch.Tensor:  # queries in blocks: distances stay small
                return torch.cat([rule.scores(support, support_y, query[i:i + 1024], stub)
                                  for i in range(0, len(query), 1024)])
        out = {}
        for split_name in ("val", "test"):
            labels = self.split(name, split_name).labels
            result = task_type.evaluate(labels, score(features[split_name]).cpu())
            out[f"{split_name}_auroc"], out[f"{split_name}_acc"] = result["auroc"], result["acc"]
        return out


def _fits_more_now(name: str, cached: Any, unfit: dict[str, str]) -> bool:
    """Whether a cached pixel search left out a candidate that fits in memory now: a run cached
    on a smaller machine is done again, with every candidate that fits."""
    cached_without = set(cached.get("left_out", {})) if isinstance(cached, dict) else set()
    fits = sorted(cached_without - set(unfit))
    if fits:
        print(f"{name}: the cached pixel search left out {', '.join(fits)}, which fits in memory now: done again")
    return bool(fits)


def _group(run: dict[str, Any]) -> tuple:
    """A table row's identity: dataset, size, scheme, training budget, architecture and its start
    (runs written before architectures were a choice were ResNet-18 from scratch)."""
    return (run["dataset"], run["size"], run["scheme"], run.get("epochs"), run.get("batch_size"),
            run.get("arch", ModelConfig.arch), run.get("init", "scratch"))


def combine(rows: list[dict[str, Any]], published: dict[str, Any]) -> list[dict[str, Any]]:
    """Mean and sd over seeds per (dataset, size, scheme, training budget), with the published
    figures (28px end-to-end rows)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_group(r), []).append(r)
    table = []
    for (dataset, size, scheme, epochs, batch_size, arch, init), rs in groups.items():
        auc, acc = [r["test_auroc"] for r in rs], [r["test_acc"] for r in rs]
        row = {"dataset": dataset, "size": size, "scheme": scheme, "arch": arch, "init": init, "epochs": epochs,
               "batch_size": batch_size, "seeds": len(rs),
               "test_auroc": float(np.mean(auc)), "test_auroc_std": float(np.std(auc, ddof=1)) if len(rs) > 1 else 0.0,
               "test_acc": float(np.mean(acc)), "test_acc_std": float(np.std(acc, ddof=1)) if len(rs) > 1 else 0.0,
               "seconds": float(np.mean([r["seconds"] for r in rs]))}
        at_28 = scheme == "end2end" and size == 28 and arch == "resnet18"
        v2 = published.get("medmnist_v2_resnet18_28", {}).get(dataset)
        plus = published.get("medmnist_plus_resnet18_end2end", {}).get(dataset, {})
        row["v2_resnet18_28_auroc_acc"] = "/".join(f"{x:.3f}" for x in v2) if v2 and at_28 else ""
        row["plus_resnet18_28_acc_auroc"] = "/".join(f"{x:.2f}" for x in plus.get(28, [])) if at_28 else ""
        table.append(row)
    return table


def markdown(table: list[dict[str, Any]]) -> str:
    """The combined table in markdown, with the published figures beside ours."""
    lines = ["| dataset | size | arch (init) | scheme | epochs (batch) | seeds | test AUROC | test ACC | "
             "MedMNIST v2 ResNet-18 (28) AUC/ACC | MedMNIST+ ResNet-18 e2e (28) ACC/AUC x100 | s/run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in table:
        budget = f"{r['epochs']} ({r['batch_size']})" if r["epochs"] is not None else "-"
        lines.append(f"| {r['dataset']} | {r['size']} | {r['arch']} ({r['init']}) | {r['scheme']} | {budget} "
                     f"| {r['seeds']} "
                     f"| {r['test_auroc']:.3f} ± {r['test_auroc_std']:.3f} | {r['test_acc']:.3f} ± {r['test_acc_std']:.3f} "
                     f"| {r['v2_resnet18_28_auroc_acc'] or '-'} | {r['plus_resnet18_28_acc_auroc'] or '-'} "
                     f"| {r['seconds']:.0f} |")
    return "\n".join(lines)


def write_tables(out: Path, combined: dict[str, Any]) -> None:
    """baselines.json (runs, table, what produced them), baselines.csv and baselines.md under ``out``,
    and with several sizes, schemes or architectures the grid's analysis (``grid.write_grid``);
    prints the tables."""
    table = combined["table"]
    write_text_atomic(out / "baselines.json", json.dumps(combined, indent=2, default=str))
    write_csv(out / "baselines.csv", table, list(table[0]) if table else [])
    write_text_atomic(out / "baselines.md", markdown(table) + "\n")
    print(markdown(table))
    summary = write_grid(out, table)
    if summary is not None:
        print(grid_markdown(summary))


def combine_folders(folders: list[Path], out: Path, published: Path | None = None) -> dict[str, Any]:
    """One table from the baselines.json of several runs of ``experiments/supervised.py`` (each with
    its own subsets, size and budget), written to ``out``; each source's config is kept."""
    sources, rows = [], []
    for folder in folders:
        path = Path(folder) / "baselines.json"
        why = ""
        try:  # an input here, not a cache (read_cache): unreadable is one error line, no warning before it
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            data, why = None, "" if isinstance(exc, FileNotFoundError) else f" ({exc})"
        if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
            raise ConfigError(f"--combine {folder}: no readable baselines.json there{why}; run experiments/supervised.py "
                              f"with --out {folder} first")
        if any("size" not in r for r in data["runs"]):
            raise ConfigError(f"--combine {folder}: {path} predates the size and budget columns; rerun the command "
                              f"that wrote it (finished runs are reused)")
        seen = {_group(r) for r in rows}
        clash = next((g for g in map(_group, data["runs"]) if g in seen), None)
        if clash is not None:
            raise ConfigError(f"--combine {folder}: {clash[0]} {clash[2]} at {clash[1]}px with the same budget and "
                              f"architecture ({clash[5]}, {clash[6]}) is also in an earlier folder; combine folders of "
                              "different subsets, sizes, budgets or architectures")
        sources.append({"folder": str(folder), "config": data.get("config"), "device": data.get("device")})
        rows.extend(data["runs"])
    combined = {"sources": sources, "versions": package_versions(), "runs": rows,
                "table": combine(rows, _published(published) if published else {})}
    write_tables(Path(out), combined)
    return combined
