"""Supervised baselines (MedMNIST v2 and MedMNIST+), reproduced on whatever data is present.

A ``BaselineConfig`` is a grid: datasets x sizes x architectures x schemes x seeds, each
``Cell`` one run (a job), cached in ``out/<dataset>/<size>px/<arch>/<scheme>/seed<k>/`` and
run through ``launch`` (here, split across torchrun's ranks, or one SLURM job each through
submitit), so a killed grid redoes nothing finished. Per cell, each scheme trains on the train
split, selects on val and scores test:

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
padding after normalisation; ``bilinear``: resizing). End-to-end training checkpoints every
epoch and resumes; linear and k-NN cells of one (dataset, size, architecture, weights, seed)
read one feature cache. Each cell records its costs: wall time, images per second (training,
or feature extraction), peak memory (CUDA: allocated; CPU: the process's peak resident size)
and parameter count. The combined table (``baselines.json``, ``.csv``, ``.md``) gives mean +- std
over seeds next to the published figures of ``experiments/configs/published_baselines.yaml``,
and with several sizes, schemes or architectures the grid's analysis (``grid``).
"""
from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from torch.utils.tensorboard import SummaryWriter

from .. import distributed
from ..data.manifest import ImageSize, Manifest
from ..data.store import Store
from ..data.tasks import MedMNISTTask
from ..data.transforms import PadTo, ResizeTo
from ..episodes import Episode
from ..errors import ConfigError
from ..files import file_digest, locked, read_cache, safe_name, torch_save_atomic, write_text_atomic
from ..learning.backbones import Start, start_weights
from ..learning.models import ARCHS, Classifier, Conv3dKind, ModelConfig, build_backbone, reestimate_batchnorm
from ..learning.pixels import pixel_baseline, unfit_candidates
from ..learning.runtime import autocast, predict, resolve_device, resolved_precision, uses_bf16
from ..learning.supervised import SupervisedConfig, epoch_batches, train_supervised
from ..methods import KNN, LinearProbe
from ..settings import Settings, from_mapping, repeated, setting
from .config import SlurmConfig
from .grid import grid_markdown, write_grid
from .launch import Launcher, launch
from .protocol import stable_hash
from .results import package_versions, write_csv

Scheme = Literal["end2end", "linear", "knn", "pixels"]
COSTS = ("params", "images_per_s", "peak_memory_mb")
"""What a cell costs besides its wall time (``seconds``): see the module docstring."""
Init = Start
"""Where a supervised backbone starts: random (MedMNIST v2) or published weights (MedMNIST+)."""
Resize = Literal["pad", "bilinear"]
"""How small images reach a larger network input: zero-padding (MedMNIST+'s code) or bilinear resizing."""


@dataclass
class BaselineConfig(Settings):
    """What ``experiments/supervised.py`` runs (see the module docstring)."""

    datasets: list[str] = field(default_factory=lambda: ["breast"])
    """Subsets, or ["all"] for every subset present at one of ``sizes`` (3D subsets at 28 or 64)."""
    sizes: list[ImageSize] = field(default_factory=lambda: [28])
    """Image sizes of the official files; with several, a (dataset, size) not here is skipped."""
    archs: list[str] = field(default_factory=lambda: ["resnet18"])
    """Backbones (``models.build_backbone``'s names); ``model`` holds the rest of their settings."""
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
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """Resources of each cell's SLURM job (``--launcher slurm``)."""

    @property
    def two_d_only(self) -> bool:
        """Whether the grid cannot take 3D subsets: published weights, or a backbone other than medmeta's ResNets."""
        return self.init == "pretrained" or any(a not in ARCHS for a in self.archs)

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("seeds", "sizes", "archs", "schemes"):
            values = getattr(self, key)
            if not values:
                raise ConfigError(f"config key {key}: give at least one {key[:-1]}")
            twice = repeated(values)
            if twice is not None:  # copies of one run would pass for agreeing seeds (sd 0)
                raise ConfigError(f"config key {key}: {key} must be distinct; {twice} is given twice in {values}")
        if self.model.arch != ModelConfig.arch:
            raise ConfigError(f"config key model.arch: the supervised grid takes its backbones from archs (--arch "
                              f"{self.model.arch}); leave model.arch unset")
        for arch in self.archs:
            self.model.replace(arch=arch)  # each name checked now, before any run
        if self.model.weights and len(self.archs) > 1:
            raise ConfigError(f"config key model.weights: {self.model.weights!r} is one architecture's file, and archs "
                              f"names {len(self.archs)}: give one --arch with it")
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


@dataclass(frozen=True)
class Cell:
    """One run of the grid (one job): a dataset at a size, a backbone (None for the pixel search,
    which uses none), a scheme (with its 3D convolution) and a seed."""

    dataset: str
    size: int
    arch: str | None
    scheme: str
    conv: str | None
    seed: int

    @property
    def label(self) -> str:
        """The scheme as the table names it (``end2end-acs`` for a 3D convolution)."""
        return self.scheme if self.conv is None else f"{self.scheme}-{self.conv}"

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.size}px/{self.arch or '-'}/{self.label}/seed{self.seed}"


def run_cell(config: dict[str, Any], cell: Cell, out: str, root: str | None, source_dir: str | None,
             manifest: Manifest | None) -> str:
    """One cell: the entry point of every launcher (plain, picklable arguments for submitit)."""
    Baselines(from_mapping(BaselineConfig, config), Path(out), root=root, source_dir=source_dir,
              manifest=manifest).run_one(cell)
    return cell.name


def _reset_peak_memory(device: torch.device) -> None:
    """Start a cell's peak memory: CUDA's peak allocated, or on Linux this process's peak resident
    size (``/proc/self/clear_refs``), so cells run one after another each report their own."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: the peak stays the process's
        pass


def _peak_memory_mb(device: torch.device) -> float:
    """CUDA: the peak allocated since the cell started; CPU: this process's peak resident size
    since the cell started (Linux's VmHWM after ``_reset_peak_memory``; elsewhere the process's peak so far)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024  # kB
    except (OSError, IndexError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return peak / (2**20 if sys.platform == "darwin" else 1024)


def feature_batch(backbone: torch.nn.Module, size: int, pixels: int = 256 * 64 * 64) -> int:
    """Images per forward pass of frozen features: about ``pixels`` input pixels, so 256 images up
    to 64px and 20 at 224px (VGG16 on 256 images padded to 224px peaked at 11 GB on a CPU). The
    side is the one the network sees (a timm model's padded input, else the image's)."""
    adapter = getattr(backbone, "adapter", None)
    side = max(size, *adapter.size) if adapter is not None and adapter.mode != "native" else size
    return max(1, min(256, pixels // (side * side)))


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Baselines:
    """Every cell of a ``BaselineConfig`` under ``out``: ``run`` runs (or submits) the unfinished
    ones and writes the tables."""

    def __init__(self, config: BaselineConfig, out: Path, root: str | None = None, source_dir: str | None = None,
                 manifest: Manifest | None = None, published: Path | None = None) -> None:
        self.config, self.out, self.source_dir, self.root = config, Path(out), source_dir, root
        self.store = Store(root, manifest)
        self.manifest = manifest
        self.device = resolve_device(config.device)
        self.published = _published(published) if published else {}
        self._unfit: dict[tuple[str, int], dict[str, str]] = {}
        m = self.store.manifest
        names, left = config.datasets, []
        if names == ["all"]:
            names = [n for n in m.subsets if any(self.store.present(n, s, source_dir) for s in config.sizes)]
            left = [n for n in names if m[n].dims == 3] if config.two_d_only else []
            names = [n for n in names if n not in left]
            if not names:
                raise ConfigError(f"--dataset all: no subset is present at {', '.join(map(str, config.sizes))}px")
        self.datasets = [m.resolve(n) for n in names]
        self.skipped = [f"{n}: 3D, it takes medmeta's ResNets from scratch" for n in left]
        self.pairs: list[tuple[str, int]] = []  # the (dataset, size)s that run
        for name in self.datasets:
            if m[name].dims == 3 and config.two_d_only:
                bad = next((a for a in config.archs if a not in ARCHS), config.archs[0])
                raise ConfigError(f"{name} is 3D: it takes resnet18 or resnet50 from scratch (2.5D, 3D or ACS "
                                  f"convolutions), not {bad} with init {config.init}")
            for size in config.sizes:
                if size not in m[name].files and len(config.sizes) > 1:
                    self.skipped.append(f"{name} at {size}px: it has no such size")
                    continue
                m[name].file(size)  # one line naming the sizes this subset has
                if len(config.sizes) > 1 and not self.store.present(name, size, source_dir):
                    self.skipped.append(f"{name} at {size}px: {m[name].file(size).file} is neither in the store nor "
                                        "in --source-dir (`medmeta prepare` it to include it)")
                    continue
                if config.input_size is not None and config.input_size < size and config.resize == "pad":
                    raise ConfigError(f"config key input_size: cannot pad {size}px images to {config.input_size}; "
                                      "give a larger input_size or resize: bilinear")
                self.pairs.append((name, size))
        if not self.pairs:
            raise ConfigError("no (dataset, size) of the grid is here: " + "; ".join(self.skipped))
        self.cells = [Cell(name, size, arch if scheme != "pixels" else None, scheme, conv, seed)
                      for name, size in self.pairs
                      for arch in config.archs
                      for scheme, conv in runs_for(config, m[name].dims)
                      if scheme != "pixels" or arch == config.archs[0]  # the pixel search uses no network
                      for seed in config.seeds]

    def model(self, arch: str | None) -> ModelConfig:
        """The model settings of one of the grid's backbones."""
        return self.config.model.replace(arch=arch or self.config.archs[0])

    def transform(self) -> Any:
        """The per-image transform to the network's input size (padding or resizing), or None."""
        size = self.config.input_size
        if size is None:
            return None
        return PadTo(size) if self.config.resize == "pad" else ResizeTo(size)

    def folder(self, cell: Cell) -> Path:
        """Where a cell keeps its result, checkpoint and TensorBoard log."""
        base = self.out / self.store.manifest[cell.dataset].short_name / f"{cell.size}px"
        return (base / safe_name(cell.arch) if cell.arch else base) / cell.label / f"seed{cell.seed}"

    def run(self, launcher: Launcher = "local", wait: bool = True) -> dict[str, Any] | None:
        """Every cell, from its cache where valid, the others run here (split across torchrun's
        ranks) or submitted; then baselines.{json,csv,md} and the grid's analysis. None when not
        waited for (the same call later collects)."""
        distributed.init(self.device.type)
        if distributed.is_main():
            for line in self.skipped:
                print(f"skipped: {line}")
            for name, size in self.pairs:
                self.store.build(name, size, source_dir=self.source_dir)
        distributed.barrier()
        cells = distributed.broadcast([c for c in self.cells if self.cached(c) is None] if distributed.is_main() else [])
        if launcher == "local":  # here: this object runs them
            fn, todo = self.run_one, [(c.name, (c,)) for c in cells]
        else:  # in submitit's processes: plain arguments
            fn, todo = run_cell, [(c.name, (self.config.to_dict(), c, str(self.out), self.root, self.source_dir,
                                            self.manifest)) for c in cells]
        if not launch(todo, fn, self.out, self.config.slurm, launcher, wait, len(self.cells), "grid", shard=True):
            return None
        return self.collect() if distributed.is_main() else None

    def collect(self) -> dict[str, Any]:
        """Every cell's result (all finished) in one table, written under ``out``."""
        c = self.config
        rows = []
        for cell in self.cells:
            result = self.cached(cell)
            if result is None:
                raise ConfigError(f"{cell.name}: no result in {self.folder(cell)}; run the grid again")
            budget = {"epochs": c.train.epochs, "batch_size": c.train.batch_size} if cell.scheme == "end2end" else {}
            rows.append({**result, "size": cell.size, "arch": cell.arch or "-", "init": c.init if cell.arch else "-",
                         **budget})
        combined = {"config": c.to_dict(), "versions": package_versions(), "device": str(self.device),
                    "skipped": self.skipped, "runs": rows, "table": combine(rows, self.published)}
        write_tables(self.out, combined)
        return combined

    def split(self, name: str, split: str, size: int, with_transform: bool = True) -> MedMNISTTask:
        """One split of a subset at ``size``, with the input transform unless told otherwise."""
        return MedMNISTTask(self.store, name, split, size=size, transform=self.transform() if with_transform else None)

    def key(self, cell: Cell) -> str:
        """A hash of everything a cell's result depends on."""
        c = self.config
        model = self.model(cell.arch)
        network = {"model": model.to_dict(), "input_size": c.input_size, "resize": c.resize,
                   **({"init": c.init, "weights": file_digest(model.weights) if model.weights else None}
                      if c.init != "scratch" else {})}
        parts = {"scheme": cell.scheme, "conv": cell.conv, "seed": cell.seed, "size": cell.size,
                 **(network if cell.scheme != "pixels" else {}),
                 **({"train": c.train.to_dict()} if cell.scheme == "end2end" else {}),
                 **({"rule": getattr(c, cell.scheme).to_dict(), "bn_batches": c.bn_batches,
                     **({"bf16": True} if uses_bf16(self.device, c.train.precision) else {})}
                    if cell.scheme in ("linear", "knn") else {})}
        return stable_hash({**parts, **resolved_precision(parts, self.device)})

    def cached(self, cell: Cell) -> dict[str, Any] | None:
        """A cell's result if it finished under its current settings (and, for the pixel search,
        left out no candidate that fits in memory now), else None."""
        saved = read_cache(self.folder(cell) / "result.json", "this run is done again")
        if not isinstance(saved, dict) or saved.get("key") != self.key(cell):
            return None
        unfit = self.unfit_pixel_candidates(cell) if cell.scheme == "pixels" else {}
        return None if _fits_more_now(cell.dataset, saved["result"], unfit) else saved["result"]

    def run_one(self, cell: Cell) -> dict[str, Any]:
        """One cell, from its cache when the settings it depends on are unchanged; with its costs."""
        cached = self.cached(cell)
        if cached is not None:
            return cached
        folder = self.folder(cell)
        _reset_peak_memory(self.device)
        start = time.perf_counter()
        if cell.scheme == "pixels":
            # the pixel search's candidates that would not fit in memory: decided before any image is read
            unfit = self.unfit_pixel_candidates(cell)
            splits = (self.split(cell.dataset, s, cell.size, with_transform=False) for s in ("train", "val", "test"))
            result = pixel_baseline(*splits, seed=cell.seed, left_out=unfit)
        elif cell.scheme == "end2end":
            result = self.end2end(cell, folder)
        else:
            result = self.frozen(cell)
        result = {"dataset": cell.dataset, "scheme": cell.label, "seed": cell.seed,
                  "seconds": time.perf_counter() - start, "peak_memory_mb": _peak_memory_mb(self.device), **result}
        write_text_atomic(folder / "result.json", json.dumps({"key": self.key(cell), "result": result}, default=str))
        return result

    def unfit_pixel_candidates(self, cell: Cell) -> dict[str, str]:
        """The pixel search's candidates that would not fit in memory for this subset (sizes from
        the manifest, which the store's build checked against the files): decided once per
        (dataset, size) by this object, before any image is read, so that the cache check and
        the search agree."""
        if (cell.dataset, cell.size) not in self._unfit:
            subset = self.store.manifest[cell.dataset]
            self._unfit[cell.dataset, cell.size] = unfit_candidates(subset.splits,
                                                                    int(np.prod(subset.image_shape(cell.size))))
        return self._unfit[cell.dataset, cell.size]

    def backbone(self, arch: str | None, dims: int, conv: str | None, seed: int) -> torch.nn.Module:
        """A freshly seeded backbone for ``dims`` (and the 3D convolution kind)."""
        torch.manual_seed(seed)
        m = self.model(arch)
        return build_backbone(m.arch, dims=dims, stem=m.stem, weights=start_weights(self.config.init, m.weights),
                              conv3d=conv or "3d", input=m.input, canvas=m.canvas)

    def end2end(self, cell: Cell, folder: Path) -> dict[str, Any]:
        """Train end-to-end (checkpointed in ``folder``), keep the best validation epoch, score the test split."""
        train, val, test = (self.split(cell.dataset, s, cell.size) for s in ("train", "val", "test"))
        model = Classifier(self.backbone(cell.arch, train.task.dims, cell.conv, cell.seed), train.task.num_outputs)
        with SummaryWriter(folder / "tensorboard") as writer:
            best = train_supervised(model, train, val, self.config.train, self.device, seed=cell.seed,
                                    checkpoint=folder / "checkpoint.pt", writer=writer,
                                    context={"model": self.model(cell.arch).to_dict(), "conv3d": cell.conv,
                                             "input_size": self.config.input_size, "resize": self.config.resize})
        model.eval()
        logits, labels = predict(model, test, self.device, precision=self.config.train.precision)
        scores = test.task.task_type.evaluate(labels, logits)
        epochs = len(best["history"])
        return {"test_auroc": scores["auroc"], "test_acc": scores["acc"], "best_epoch": best["epoch"],
                "epochs_run": epochs, "val_auroc": best["val_auroc"], "val_acc": best["val_acc"],
                "train_seconds": best["seconds"], "data_share": best["data_share"], "params": _params(model),
                "images_per_s": epochs * len(train) / best["seconds"] if best["seconds"] > 0 else None}

    def frozen_features(self, cell: Cell) -> dict[str, Any]:
        """The frozen backbone's features of every split of a cell's dataset: computed once per
        backbone (architecture, weights, input, size, seed) and cached in ``out/<dataset>/features/``
        (with the backbone's parameter count and the extraction's images/s), so the linear probe
        and k-NN (and a grid of rules) read them instead of recomputing; features, not images, are
        held, so memory stays bounded at 224px. Cells running at once take turns (a lock)."""
        c = self.config
        model = self.model(cell.arch)
        identity = {"dataset": cell.dataset, "size": cell.size, "model": model.to_dict(), "init": c.init,
                    "seed": cell.seed,
                    "weights": file_digest(model.weights) if c.init == "pretrained" and model.weights else None,
                    "input_size": c.input_size, "resize": c.resize, "bn_batches": c.bn_batches,
                    **({"bf16": True} if uses_bf16(self.device, c.train.precision) else {})}
        path = self.out / self.store.manifest[cell.dataset].short_name / "features" / f"{stable_hash(identity)}.pt"
        with locked(path.with_suffix(".lock")):
            if path.is_file():
                try:
                    saved = torch.load(path, map_location=self.device, weights_only=True)
                    if isinstance(saved, dict) and set(saved) == {"train", "val", "test", "params", "images_per_s"}:
                        return saved
                except (OSError, RuntimeError, ValueError, EOFError):
                    pass
                print(f"{path}: not a readable feature cache; the features are computed again")
            splits = {s: self.split(cell.dataset, s, cell.size) for s in ("train", "val", "test")}
            start = time.perf_counter()
            backbone = self.backbone(cell.arch, splits["train"].task.dims, None, cell.seed).to(self.device)
            batch = feature_batch(backbone, cell.size)
            order = np.random.default_rng(cell.seed).permutation(len(splits["train"]))[:c.bn_batches * 256]
            with autocast(self.device, c.train.precision):
                reestimate_batchnorm(backbone, (splits["train"].get_batch(np.sort(part), self.device)[0]
                                                for part in epoch_batches(order, batch)))
            backbone.eval()
            if self.device.type == "cuda":
                backbone = backbone.to(memory_format=torch.channels_last)
            features: dict[str, Any] = {s: self.features(backbone, ds, batch) for s, ds in splits.items()}
            images = sum(len(ds) for ds in splits.values()) + len(order)
            features.update(params=_params(backbone), images_per_s=images / (time.perf_counter() - start))
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

    def frozen(self, cell: Cell) -> dict[str, Any]:
        """A frozen-feature rule with the whole training split as its support set."""
        features = self.frozen_features(cell)
        train = self.split(cell.dataset, "train", cell.size)
        task_type = train.task.task_type
        stub = Episode(torch.empty(0), torch.empty(0), torch.empty(0), None, task_type,
                       tuple(range(train.task.num_classes if not task_type.binary else 2)))
        support = features["train"]
        support_y = train.label_tensor(np.arange(len(train))).to(self.device)
        rule: LinearProbe | KNN = getattr(self.config, cell.scheme)
        if isinstance(rule, LinearProbe):
            head = rule.head(support, support_y, stub)  # fitted once, on the whole training split

            def score(query: torch.Tensor) -> torch.Tensor:
                return torch.nn.functional.linear(query, head["weight"], head["bias"])
        else:
            def score(query: torch.Tensor) -> torch.Tensor:  # queries in blocks: distances stay small
                return torch.cat([rule.scores(support, support_y, query[i:i + 1024], stub)
                                  for i in range(0, len(query), 1024)])
        out = {"params": features["params"], "images_per_s": features["images_per_s"]}
        for split_name in ("val", "test"):
            labels = self.split(cell.dataset, split_name, cell.size).labels
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
               "seconds": float(np.mean([r["seconds"] for r in rs])),
               **{cost: _mean([r.get(cost) for r in rs]) for cost in COSTS}}
        at_28 = scheme == "end2end" and size == 28 and arch == "resnet18"
        v2 = published.get("medmnist_v2_resnet18_28", {}).get(dataset)
        plus = published.get("medmnist_plus_resnet18_end2end", {}).get(dataset, {})
        row["v2_resnet18_28_auroc_acc"] = "/".join(f"{x:.3f}" for x in v2) if v2 and at_28 else ""
        row["plus_resnet18_28_acc_auroc"] = "/".join(f"{x:.2f}" for x in plus.get(28, [])) if at_28 else ""
        table.append(row)
    return table


def _mean(values: list[Any]) -> float | None:
    """The mean of a cost over seeds; None when a run did not record it (older runs, the pixel search)."""
    return None if any(v is None for v in values) else float(np.mean(values))


def _cost(value: float | None, fmt: str) -> str:
    """A cost for the table; ``fmt`` "rate": two significant digits below 10 (1.2, 2.0 images/s), whole above."""
    if value is None:
        return "-"
    return format(value, ("#.2g" if value < 9.95 else ".0f") if fmt == "rate" else fmt)


def markdown(table: list[dict[str, Any]]) -> str:
    """The combined table in markdown, with the published figures and the costs beside ours."""
    lines = ["| dataset | size | arch (init) | scheme | epochs (batch) | seeds | test AUROC | test ACC | "
             "MedMNIST v2 ResNet-18 (28) AUC/ACC | MedMNIST+ ResNet-18 e2e (28) ACC/AUC x100 | s/run | "
             "params (M) | images/s | peak MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in table:
        budget = f"{r['epochs']} ({r['batch_size']})" if r["epochs"] is not None else "-"
        votes = " †" if r["scheme"] == "knn" else ""
        lines.append(f"| {r['dataset']} | {r['size']} | {r['arch']} ({r['init']}) | {r['scheme']} | {budget} "
                     f"| {r['seeds']} "
                     f"| {r['test_auroc']:.3f} ± {r['test_auroc_std']:.3f}{votes} "
                     f"| {r['test_acc']:.3f} ± {r['test_acc_std']:.3f} "
                     f"| {r['v2_resnet18_28_auroc_acc'] or '-'} | {r['plus_resnet18_28_acc_auroc'] or '-'} "
                     f"| {r['seconds']:.0f} | {_cost(r.get('params') and r['params'] / 1e6, '.2f')} "
                     f"| {_cost(r.get('images_per_s'), 'rate')} | {_cost(r.get('peak_memory_mb'), '.0f')} |")
    if any(r["scheme"] == "knn" for r in table):
        lines += ["", "† k-NN: the AUROC of its vote shares, not of a calibrated score."]
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
