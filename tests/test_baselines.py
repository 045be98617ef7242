"""Supervised baselines on synthetic subsets: every scheme, the 3D convolutions, the pixel
search, MedMNIST+'s padding, resume of interrupted training, the combined table."""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from medmeta.data.store import Store
from medmeta.data.tasks import MedMNISTTask
from medmeta.data.transforms import IMAGENET_MEAN, PadTo, ResizeTo
from medmeta.errors import ConfigError
from medmeta.evaluation.baselines import BaselineConfig, Baselines, combine_folders
from medmeta.learning.models import Classifier, build_backbone
from medmeta.learning import pixels, runtime
from medmeta.learning.pixels import pixel_baseline
from medmeta.learning.supervised import SupervisedConfig, SupervisedTrainer, epoch_batches
from medmeta.settings import from_mapping

from .conftest import SYNTHETIC_SPECS, Synthetic, write_synthetic

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path: Path, synthetic: Synthetic) -> Store:
    store = Store(tmp_path / "root", synthetic.manifest)
    for name in ("toyclass", "toychest", "toyvolume"):
        store.build(name, 28, source_dir=synthetic.source_dir)
    return store


def test_every_scheme_and_convolution_and_the_table(store: Store, synthetic: Synthetic, tmp_path: Path) -> None:
    config = from_mapping(BaselineConfig, {"datasets": ["toyclass", "toyvolume"], "seeds": [0, 1], "device": "cpu",
                                           "train": {"epochs": 2, "batch_size": 16}, "bn_batches": 1})
    baselines = Baselines(config, tmp_path / "out", root=store.root, manifest=synthetic.manifest,
                          published=REPO / "experiments" / "configs" / "published_baselines.yaml")
    combined = baselines.run()
    schemes = [(r["dataset"], r["scheme"]) for r in combined["table"]]
    assert schemes == [("toyclass", s) for s in ("end2end", "linear", "knn", "pixels")] + [
        ("toyvolume", s) for s in ("end2end-2.5d", "end2end-3d", "end2end-acs", "pixels")]
    for row in combined["table"]:
        assert row["seeds"] == 2 and 0 <= row["test_auroc"] <= 1 and row["test_auroc_std"] >= 0
    runs = [r for r in combined["runs"] if r["dataset"] == "toyclass" and r["scheme"] == "end2end"]
    assert np.mean([r["test_auroc"] for r in runs]) == pytest.approx(combined["table"][0]["test_auroc"])
    assert (tmp_path / "out" / "baselines.md").read_text().startswith("| dataset | size | arch (init) | scheme | epochs (batch) |")
    assert {(r["size"], r["epochs"], r["batch_size"]) for r in combined["table"] if r["scheme"].startswith("end2end")} == {
        (28, 2, 16)}
    assert {(r["epochs"], r["batch_size"]) for r in combined["table"] if not r["scheme"].startswith("end2end")} == {
        (None, None)}
    # A second run reuses every finished run.
    stamp = (tmp_path / "out" / "tclass" / "28px" / "resnet18" / "end2end" / "seed0" / "result.json").stat().st_mtime_ns
    assert baselines.run()["table"] == combined["table"]
    assert (tmp_path / "out" / "tclass" / "28px" / "resnet18" / "end2end" / "seed0" / "result.json").stat().st_mtime_ns == stamp


def test_a_bf16_trained_checkpoint_is_not_resumed_as_fp32(store: Store, synthetic: Synthetic, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``precision: auto`` trains in bf16 on CUDA, in fp32 on CPUs: a checkpoint (and result)
    from one must not be taken up by the other. Here the CPU run's checkpoint meets a run that
    resolves ``auto`` to bf16, as on a GPU."""
    from medmeta.errors import ConfigError
    from medmeta.evaluation import baselines as baselines_module
    from medmeta.learning import runtime

    config = from_mapping(BaselineConfig, {"datasets": ["toyclass"], "schemes": ["end2end"], "device": "cpu",
                                           "train": {"epochs": 1, "batch_size": 16}})
    Baselines(config, tmp_path / "out", root=store.root, manifest=synthetic.manifest).run()
    as_on_a_gpu = lambda settings, device: {"auto_precision": "bf16"}  # noqa: E731
    monkeypatch.setattr(baselines_module, "resolved_precision", as_on_a_gpu)
    monkeypatch.setattr(runtime, "resolved_precision", as_on_a_gpu)
    with pytest.raises(ConfigError, match=r"checkpoint .*checkpoint\.pt was written under another training config "
                                          r"\(auto_precision: '<missing>' in the checkpoint, 'bf16' now"):
        Baselines(config, tmp_path / "out", root=store.root, manifest=synthetic.manifest).run()


def test_pixel_baseline_on_a_learnable_multilabel_task(store: Store) -> None:
    train, val, test = (MedMNISTTask(store, "toychest", s) for s in ("train", "val", "test"))
    result = pixel_baseline(train, val, test, seed=0)
    assert result["model"] in result["val_auroc_by_model"] and len(result["val_auroc_by_model"]) == 4
    assert 0 <= result["test_auroc"] <= 1 and 0 <= result["test_acc"] <= 1


def pixel_memory(splits: list[MedMNISTTask]) -> tuple[int, int]:
    """(features of an image, bytes the pixel search needs with boosting: its estimate + float32 pixels)."""
    features = splits[0].raw_images([0]).size
    return features, pixels.hgb_bytes(len(splits[0]), features) + 4 * sum(map(len, splits)) * features


def test_pixel_search_leaves_out_boosting_that_would_not_fit(store: Store, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    splits = [MedMNISTTask(store, "toyclass", s) for s in ("train", "val", "test")]
    features, need = pixel_memory(splits)
    monkeypatch.setattr(pixels, "available_memory", lambda: need - 1)
    result = pixel_baseline(*splits, seed=0)
    assert set(result["val_auroc_by_model"]) == {"logreg-C0.01", "logreg-C1", "forest"}
    assert f"for {len(splits[0]):,} x {features:,} pixels beside" in result["left_out"]["hgb"]
    assert capsys.readouterr().out.startswith("toyclass: pixel search without hgb: gradient boosting needs about")
    monkeypatch.setattr(pixels, "available_memory", lambda: need)
    assert "hgb" in pixel_baseline(*splits, seed=0)["val_auroc_by_model"]
    monkeypatch.setattr(pixels, "available_memory", lambda: None)  # unknown: every candidate
    assert pixel_baseline(*splits, seed=0)["left_out"] == {}
    told = pixel_baseline(*splits, seed=0, left_out={"forest": "left out by the caller"})
    assert set(told["val_auroc_by_model"]) == {"logreg-C0.01", "logreg-C1", "hgb"}
    with pytest.raises(ValueError, match=r"left_out names \['svm'\], which are not pixel-search candidates"):
        pixel_baseline(*splits, seed=0, left_out={"svm": "no such candidate"})


def test_the_boosting_memory_estimate_is_above_every_measured_peak() -> None:
    saved = REPO / "docs" / "results" / "benchmarks" / "hgb_memory.txt"
    rows = [re.match(r"\s*([\d,]+)\s+([\d,]+)\s+(.+?)\s+([\d.]+)\s+[\d.]+\s+[\d.]+$", line)
            for line in saved.read_text().splitlines()[2:]]
    assert len(rows) >= 8 and all(rows), "the saved output of benchmarks/hgb_memory.py"
    for m in rows:
        samples, features, measured = int(m[1].replace(",", "")), int(m[2].replace(",", "")), float(m[4]) * 1e9
        assert pixels.hgb_bytes(samples, features) >= measured, m[0]


def test_a_pixel_search_cached_without_a_candidate_is_redone_when_it_fits(
        store: Store, synthetic: Synthetic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    _, need = pixel_memory([MedMNISTTask(store, "toyclass", s) for s in ("train", "val", "test")])
    config = from_mapping(BaselineConfig, {"datasets": ["toyclass"], "schemes": ["pixels"], "device": "cpu"})
    cache = tmp_path / "out" / "tclass" / "28px" / "pixels" / "seed0" / "result.json"

    def run(memory: int) -> dict:
        """One run on a machine with ``memory`` available at its start, and less each time it is
        asked again (the run reads splits and pixels): the cache and the search must decide alike."""
        asked = itertools.count()
        monkeypatch.setattr(pixels, "available_memory", lambda: memory - next(asked) * need)
        return Baselines(config, tmp_path / "out", root=store.root, manifest=synthetic.manifest).run()["runs"][0]

    assert set(run(need - 1)["left_out"]) == {"hgb"}
    stamp = cache.stat().st_mtime_ns
    assert set(run(need - 1)["left_out"]) == {"hgb"} and cache.stat().st_mtime_ns == stamp, "same machine: reused"
    capsys.readouterr()
    redone = run(need)
    assert redone["left_out"] == {} and "hgb" in redone["val_auroc_by_model"] and cache.stat().st_mtime_ns != stamp
    printed = capsys.readouterr().out
    assert "toyclass: the cached pixel search left out hgb, which fits in memory now: done again" in printed
    stamp = cache.stat().st_mtime_ns
    assert run(need - 1) == redone and cache.stat().st_mtime_ns == stamp, "a search with every candidate is kept"


def test_available_memory_is_the_smallest_of_the_kernel_and_the_cgroups(tmp_path: Path) -> None:
    gib = 2**30

    def machine(name: str, cgroup: str, files: dict[str, int | str]) -> tuple[Path, Path]:
        proc, groups = tmp_path / name / "proc", tmp_path / name / "cgroup"
        (proc / "self").mkdir(parents=True)
        (proc / "meminfo").write_text(f"MemTotal: {32 * gib // 1024} kB\nMemAvailable: {10 * gib // 1024} kB\n")
        (proc / "self" / "cgroup").write_text(cgroup)
        for rel, value in files.items():
            (groups / rel).parent.mkdir(parents=True, exist_ok=True)
            (groups / rel).write_text(f"{value}\n")
        return proc, groups

    # cgroup v2, a SLURM-like job capped at 4 GiB with 1 GiB used, its step uncapped
    v2 = machine("v2", "0::/job/step\n", {"job/memory.max": 4 * gib, "job/memory.current": gib,
                                           "job/step/memory.max": "max", "job/step/memory.current": gib})
    assert runtime.available_memory(*v2) == 3 * gib
    # cgroup v1: the memory controller's own hierarchy; the root's "no limit" is a huge number
    v1 = machine("v1", "5:cpu:/\n4:memory:/a\n", {"memory/a/memory.limit_in_bytes": 2 * gib,
                                                   "memory/a/memory.usage_in_bytes": gib // 2,
                                                   "memory/memory.limit_in_bytes": 9223372036854771712,
                                                   "memory/memory.usage_in_bytes": 5 * gib})
    assert runtime.available_memory(*v1) == 3 * gib // 2
    assert runtime.available_memory(*machine("free", "0::/\n", {})) == 10 * gib, "no limit: the kernel's figure"
    assert runtime.available_memory(tmp_path / "none", tmp_path / "none") is None
    here = runtime.available_memory()
    if Path("/proc/meminfo").is_file():
        assert here is not None and 2**20 < here <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_supervised_training_resumes_exactly(store: Store, tmp_path: Path) -> None:
    train, val = MedMNISTTask(store, "toyclass", "train"), MedMNISTTask(store, "toyclass", "val")
    config = SupervisedConfig(epochs=4, batch_size=16, optimizer="adamw", lr=1e-3, schedule="cosine",
                              select="val_loss", patience=10)

    def trainer(ckpt: Path) -> SupervisedTrainer:
        torch.manual_seed(0)
        return SupervisedTrainer(Classifier(build_backbone(), 4), train, val, config, torch.device("cpu"), seed=3,
                                 checkpoint=ckpt)

    straight = trainer(tmp_path / "a.pt")
    straight.run()

    def crash(epoch: int) -> None:
        if epoch == 2:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        trainer(tmp_path / "b.pt").run(on_epoch=crash)
    resumed = trainer(tmp_path / "b.pt")
    assert resumed.epoch == 2
    resumed.run()
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in straight.history]
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="lr: 0.001 in the checkpoint, 0.01 now"):
        SupervisedTrainer(Classifier(build_backbone(), 4), train, val, config.replace(lr=1e-2), torch.device("cpu"),
                          seed=3, checkpoint=tmp_path / "b.pt")


def test_medmnist_plus_padding_is_zero_after_normalisation() -> None:
    grey = torch.rand(1, 28, 28)
    padded = PadTo(224)(grey)
    assert padded.shape == (3, 224, 224)
    assert torch.equal(padded[:, 98:126, 98:126], grey.expand(3, -1, -1))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert torch.equal(padded[:, :98, :], mean.expand(3, 98, 224))
    net = build_backbone(stem="imagenet")
    normalised = (padded.unsqueeze(0) - net.adapter.mean) / net.adapter.std  # what the backbone does first
    assert normalised[0, :, :98, :].abs().max() < 1e-6
    assert ResizeTo(56)(grey).shape == (1, 56, 56)
    with pytest.raises(ValueError, match="cannot pad a 28x28 image to 14"):
        PadTo(14)(grey)


def test_padded_inputs_train_end_to_end(store: Store, synthetic: Synthetic, tmp_path: Path) -> None:
    config = from_mapping(BaselineConfig, {"datasets": ["toyclass"], "schemes": ["end2end", "knn"], "device": "cpu",
                                           "input_size": 64, "train": {"epochs": 1, "batch_size": 16},
                                           "bn_batches": 1})
    combined = Baselines(config, tmp_path / "out", root=store.root, manifest=synthetic.manifest).run()
    assert [r["scheme"] for r in combined["table"]] == ["end2end", "knn"]
    saved = json.loads((tmp_path / "out" / "baselines.json").read_text())
    assert saved["config"]["input_size"] == 64


def test_a_last_batch_of_one_sample_joins_the_batch_before(store: Store) -> None:
    """34,561 OrganA images in batches of 128 leave one: BatchNorm cannot train on a single image whose
    features are 1x1 (ImageNet stem at 28px), so it trains with the batch before it."""
    train, val = MedMNISTTask(store, "toyclass", "train"), MedMNISTTask(store, "toyclass", "val")
    assert len(train) == 60
    trainer = SupervisedTrainer(Classifier(build_backbone(), 4), train, val,
                                SupervisedConfig(epochs=2, batch_size=59, schedule="cosine"), torch.device("cpu"))
    trainer.run()
    assert trainer.sched.last_epoch == 2  # one step of 60 images per epoch
    assert len(trainer.history) == 2
    for n, sizes in ((257, [128, 129]), (256, [128, 128]), (258, [128, 128, 2]), (1, [1])):
        batches = epoch_batches(np.arange(n), 128)
        assert [len(b) for b in batches] == sizes
        assert np.array_equal(np.concatenate(batches), np.arange(n))


def test_tables_of_runs_at_other_sizes_and_budgets_combine_into_one(store: Store, synthetic: Synthetic,
                                                                    tmp_path: Path) -> None:
    """Each ``supervised.py`` command has one size and budget (e.g. 28px for 100 epochs, 64px for 1);
    ``--combine`` joins their tables, keeping each row's size and budget apart."""
    store.build("toyclass", 64, source_dir=synthetic.source_dir)
    tables = []
    for size, epochs in ((28, 2), (64, 1)):
        config = from_mapping(BaselineConfig, {"datasets": ["toyclass"], "seeds": [0, 1], "sizes": [size], "device": "cpu",
                                               "schemes": ["end2end"], "train": {"epochs": epochs, "batch_size": 16}})
        tables.append(Baselines(config, tmp_path / f"s{size}", root=store.root, manifest=synthetic.manifest).run())
    combined = combine_folders([tmp_path / "s28", tmp_path / "s64"], tmp_path / "all")
    assert [(r["size"], r["epochs"]) for r in combined["table"]] == [(28, 2), (64, 1)]
    assert combined["table"] == tables[0]["table"] + tables[1]["table"]
    assert [s["config"]["sizes"] for s in combined["sources"]] == [[28], [64]]
    assert json.loads((tmp_path / "all" / "baselines.json").read_text())["table"] == combined["table"]
    assert "| tclass |" not in (tmp_path / "all" / "baselines.md").read_text()
    assert (tmp_path / "all" / "baselines.md").read_text().count("| toyclass | ") == 2
    with pytest.raises(ConfigError, match="--combine .*s999: no readable baselines.json"):
        combine_folders([tmp_path / "s999"], tmp_path / "none")
    shutil.copytree(tmp_path / "s28", tmp_path / "s28b")  # e.g. another recipe's run: never averaged together
    with pytest.raises(ConfigError, match=r"s28b: toyclass end2end at 28px with the same budget and architecture \(resnet18, scratch\) is also"):
        combine_folders([tmp_path / "s28", tmp_path / "s28b"], tmp_path / "none")
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "baselines.json").write_text('{"runs": [')  # truncated by a copy
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one error line, no warning before it
        with pytest.raises(ConfigError, match=r"--combine .*cut: no readable baselines.json there \(Expecting"):
            combine_folders([tmp_path / "cut"], tmp_path / "none")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "baselines.json").write_text(json.dumps({"runs": [{"dataset": "toyclass", "scheme": "knn"}]}))
    with pytest.raises(ConfigError, match="predates the size and budget columns; rerun the command"):
        combine_folders([tmp_path / "s28", tmp_path / "old"], tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_frozen_features_take_batchnorm_statistics_without_a_batch_of_one(tmp_path: Path) -> None:
    """257 training images in batches of 256 leave one, on which BatchNorm cannot take statistics
    (1x1 features at 28px): it joins the batch before, as in training."""
    toy257 = (2, 1, "binary", ["no", "yes"], (257, 10, 12), (28,))
    synthetic = write_synthetic(tmp_path / "src", {**SYNTHETIC_SPECS, "toy257": toy257})
    store = Store(tmp_path / "root", synthetic.manifest)
    store.build("toy257", 28, source_dir=synthetic.source_dir)
    config = from_mapping(BaselineConfig, {"datasets": ["toy257"], "schemes": ["linear"], "device": "cpu"})
    table = Baselines(config, tmp_path / "out", root=store.root, manifest=synthetic.manifest).run()["table"]
    assert [(r["scheme"], r["seeds"]) for r in table] == [("linear", 1)]


def test_linear_and_knn_share_one_feature_cache(store: Store, synthetic: Synthetic, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    config = from_mapping(BaselineConfig, {"datasets": ["toyclass"], "schemes": ["linear", "knn"], "seeds": [0, 1],
                                           "device": "cpu", "bn_batches": 1})
    built = []
    backbone = Baselines.backbone
    monkeypatch.setattr(Baselines, "backbone", lambda self, *a: built.append(a) or backbone(self, *a))
    first = Baselines(config, tmp_path / "out", root=store.root, manifest=synthetic.manifest).run()
    assert len(built) == 2  # one backbone per seed, for both rules
    assert len(list((tmp_path / "out" / "tclass" / "features").glob("*.pt"))) == 2
    for result in (tmp_path / "out").glob("tclass/28px/resnet18/*/seed*/result.json"):
        result.unlink()  # the runs are redone ...
    again = Baselines(config, tmp_path / "out", root=store.root, manifest=synthetic.manifest).run()
    assert len(built) == 2  # ... from the cached features: no backbone is built again
    assert [r["test_auroc"] for r in again["runs"]] == [r["test_auroc"] for r in first["runs"]]
    shutil.rmtree(tmp_path / "out" / "tclass" / "features")
    fresh = Baselines(config, tmp_path / "out2", root=store.root, manifest=synthetic.manifest).run()
    assert [r["test_auroc"] for r in fresh["runs"]] == [r["test_auroc"] for r in first["runs"]]  # same features


def test_frozen_features_take_fewer_images_per_pass_at_larger_inputs() -> None:
    """256 images a pass up to 64px; a timm model padding to its input takes fewer, so that a
    pass holds about as many pixels (VGG16 on 256 images at 224px peaked at 11 GB)."""
    from medmeta.evaluation.baselines import feature_batch

    assert feature_batch(build_backbone("resnet18"), 28) == 256 and feature_batch(build_backbone("resnet18"), 64) == 256
    assert feature_batch(build_backbone("resnet18"), 224) == 256 * 64 * 64 // 224 ** 2 == 20
    side = build_backbone("test_resnet").adapter.size[0]
    assert side > 64 and feature_batch(build_backbone("test_resnet"), 28) == 256 * 64 * 64 // side ** 2
    assert feature_batch(build_backbone("test_resnet", input="native"), 28) == 256
