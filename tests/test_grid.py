"""The supervised grid's analysis (issue 27): MedMNIST+'s Table 2 layout, resolution transitions,
the factor tests and the figure, from baselines tables."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from medmeta.evaluation.grid import averages, cells, summarise_grid, transitions, write_grid

from .conftest import SYNTHETIC_SPECS, Synthetic, write_synthetic

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import supervised  # noqa: E402


def table(rng: np.random.Generator) -> list[dict]:
    rows = []
    for dataset in ("breast", "retina", "blood"):
        for arch in ("vgg16", "resnet18"):
            for size in (28, 64, 128):
                for scheme in ("end2end", "linear", "knn"):
                    acc = 0.5 + 0.001 * size + (0.1 if scheme == "end2end" else 0) + rng.normal(0, 0.01)
                    rows.append({"dataset": dataset, "arch": arch, "init": "scratch", "size": size, "scheme": scheme,
                                 "test_acc": acc, "test_auroc": acc + 0.1})
    return rows


def test_averages_transitions_and_tests_of_a_grid(tmp_path: Path) -> None:
    rows = table(np.random.default_rng(0))
    summary = write_grid(tmp_path, rows)
    assert summary is not None
    first = averages(cells(rows))[0]
    assert first["arch"] == "resnet18 (scratch)" and first["datasets"] == 3
    assert first["test_acc"] == pytest.approx(np.mean([r["test_acc"] for r in rows if (
        r["arch"], r["size"], r["scheme"]) == ("resnet18", first["size"], first["scheme"])]))
    moves = {(t["scheme"], t["from"], t["to"]): t for t in summary["transitions"]}
    assert set(moves) == {(s, a, b) for s in ("end2end", "knn", "linear") for a, b in ((28, 64), (64, 128))}
    assert all(t["cells"] == 6 and t["improved"] >= 5 for t in moves.values())  # accuracy grows with size here
    size_test = next(t for t in summary["tests"] if t["factor"] == "size" and t["metric"] == "test_acc")
    assert size_test["levels"] == [28, 64, 128] and size_test["friedman"]["kendall_w"] == pytest.approx(1.0)
    for name in ("grid.json", "grid.md", "grid_averages.csv", "grid_transitions.csv", "grid.png"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "grid.json").read_text())["transitions"] == summary["transitions"]
    assert summarise_grid([rows[0]]) is None  # one cell: no grid to analyse


def test_transitions_count_only_cells_present_at_both_sizes() -> None:
    rows = [{"dataset": "d", "arch": "a", "scheme": "knn", "size": 28, "test_acc": 0.5},
            {"dataset": "d", "arch": "a", "scheme": "knn", "size": 64, "test_acc": 0.6},
            {"dataset": "e", "arch": "a", "scheme": "knn", "size": 28, "test_acc": 0.7}]
    assert transitions(rows) == [{"scheme": "knn", "from": 28, "to": 64, "cells": 1, "improved": 1}]


def test_a_supervised_run_on_two_archs_writes_the_grid(synthetic: Synthetic, tmp_path: Path, capsys,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDMETA_MANIFEST", str(synthetic.manifest_path))
    supervised.main(["--dataset", "toyclass,toychest", "--arch", "test_resnet,resnet18", "--schemes", "linear,knn",
                     "--seeds", "0,1", "--device", "cpu", "--root", str(tmp_path / "root"), "--source-dir",
                     str(synthetic.source_dir), "--set", "bn_batches=1", "--out", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "grid.json").read_text())
    assert {r["arch"] for r in summary["averages"]} == {"test_resnet (scratch)", "resnet18 (scratch)"}
    assert {t["factor"] for t in summary["tests"]} == {"scheme", "arch"}
    assert "MedMNIST+'s Table 2 layout" in capsys.readouterr().out


def test_the_pixel_search_runs_once_for_several_architectures(synthetic: Synthetic, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from medmeta.evaluation import baselines

    monkeypatch.setenv("MEDMETA_MANIFEST", str(synthetic.manifest_path))
    searched = []
    original = baselines.pixel_baseline
    monkeypatch.setattr(baselines, "pixel_baseline", lambda *a, **k: searched.append(1) or original(*a, **k))
    combined = supervised.main(["--dataset", "toyclass", "--arch", "test_resnet,resnet18", "--schemes", "pixels,knn",
                                "--seeds", "0", "--device", "cpu", "--root", str(tmp_path / "root"), "--source-dir",
                                str(synthetic.source_dir), "--set", "bn_batches=1", "--out", str(tmp_path / "out")])
    assert len(searched) == 1
    assert sorted((r["arch"], r["init"], r["scheme"]) for r in combined["table"]) == [
        ("-", "-", "pixels"), ("resnet18", "scratch", "knn"), ("test_resnet", "scratch", "knn")]  # pixels: no network


def _grid(synthetic: Synthetic, tmp_path: Path, *extra: str) -> dict:
    return supervised.main(["--dataset", "toyclass,toychest", "--size", "28,64", "--arch", "test_resnet,resnet18",
                            "--schemes", "end2end,linear,knn", "--seeds", "0", "--epochs", "1", "--device", "cpu",
                            "--root", str(tmp_path / "root"), "--source-dir", str(synthetic.source_dir),
                            "--set", "bn_batches=1", "--set", "train.batch_size=32", "--out", str(tmp_path / "out"),
                            *extra])


def test_a_grid_of_sizes_is_killed_and_resumed_without_redoing_a_finished_cell(
        tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """2 datasets x 2 sizes (toychest's 64px file is not here: skipped, one line) x 2 archs x 3
    schemes; killed after 5 cells, the rerun does only the 13 left, then the table has every cell."""
    from medmeta.evaluation.baselines import Baselines

    chest = SYNTHETIC_SPECS["toychest"]
    synthetic = write_synthetic(tmp_path / "src", {**SYNTHETIC_SPECS, "toychest": (*chest[:-1], (28, 64))})
    (synthetic.source_dir / "toychest_64.npz").unlink()
    monkeypatch.setenv("MEDMETA_MANIFEST", str(synthetic.manifest_path))
    done: list[str] = []
    run_one = Baselines.run_one

    def killed_after_five(self, cell):
        if len(done) == 5:
            raise KeyboardInterrupt  # the machine went away mid-grid
        done.append(cell.name)
        return run_one(self, cell)

    monkeypatch.setattr(Baselines, "run_one", killed_after_five)
    with pytest.raises(KeyboardInterrupt):
        _grid(synthetic, tmp_path)
    printed = capsys.readouterr().out
    assert printed.count("skipped: ") == 1 and "skipped: toychest at 64px: toychest_64.npz is neither in the store" in printed
    computed: list[str] = []
    monkeypatch.setattr(Baselines, "run_one", lambda self, cell: computed.append(cell.name) or run_one(self, cell))
    combined = _grid(synthetic, tmp_path)
    assert len(computed) == 3 * 2 * 3 - 5 and not set(computed) & set(done)
    assert combined["skipped"] == ["toychest at 64px: toychest_64.npz is neither in the store nor in --source-dir "
                                   "(`medmeta prepare` it to include it)"]
    ran = {(r["dataset"], r["size"], r["arch"], r["scheme"], r["seed"]) for r in combined["runs"]}
    assert len(ran) == 18 and {(d, s) for d, s, *_ in ran} == {("toyclass", 28), ("toyclass", 64), ("toychest", 28)}
    for run in combined["runs"]:  # each cell's costs
        assert run["params"] > 1000 and run["images_per_s"] > 0 and run["peak_memory_mb"] > 0 and run["seconds"] > 0
    resnet = {r["params"] for r in combined["runs"] if r["arch"] == "resnet18" and r["scheme"] != "end2end"}
    assert resnet == {11_176_512}  # ResNet-18's backbone without its head
    md = (tmp_path / "out" / "baselines.md").read_text()
    assert "| params (M) | images/s | peak MiB |" in md and "| 11.18 |" in md
    knn_row = next(line for line in md.splitlines() if "| knn |" in line)
    assert " † |" in knn_row and "† k-NN: the AUROC of its vote shares" in md
    summary = json.loads((tmp_path / "out" / "grid.json").read_text())
    # size: one dataset has both sizes, too few blocks for a test; its transitions are counted
    assert {t["factor"] for t in summary["tests"]} == {"scheme", "arch"}
    assert summary["transitions"] and (tmp_path / "out" / "grid.png").is_file()
    computed.clear()
    assert _grid(synthetic, tmp_path)["table"] == combined["table"] and computed == []  # all finished: nothing run


def test_a_grid_runs_its_cells_in_submitits_processes(synthetic: Synthetic, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDMETA_MANIFEST", str(synthetic.manifest_path))
    combined = supervised.main(["--dataset", "toyclass", "--arch", "test_resnet", "--schemes", "linear,knn",
                                "--seeds", "0", "--device", "cpu", "--root", str(tmp_path / "root"), "--source-dir",
                                str(synthetic.source_dir), "--set", "bn_batches=1", "--out", str(tmp_path / "out"),
                                "--launcher", "submitit-local"])
    assert sorted(json.loads((tmp_path / "out" / "jobs.json").read_text())) == [
        "toyclass/28px/test_resnet/knn/seed0", "toyclass/28px/test_resnet/linear/seed0"]
    assert list((tmp_path / "out" / "submitit").glob("*_log.out")), "the cells ran in submitit subprocesses"
    assert [r["scheme"] for r in combined["table"]] == ["linear", "knn"]
    assert len(list((tmp_path / "out" / "tclass" / "features").glob("*.pt"))) == 1  # one feature cache for both


def test_the_medmnist_plus_profile_is_its_grid() -> None:
    from medmeta.evaluation.baselines import BaselineConfig
    from medmeta.settings import load_settings

    config = load_settings(BaselineConfig, "medmnist_plus", REPO / "experiments" / "configs")
    assert config.seeds == [9930641, 115149041, 252139603] and config.sizes == [28, 64, 128, 224]
    assert len(config.archs) == 10 and "vit_base_patch16_224.dino" in config.archs and "alexnet" in config.archs
    assert config.schemes == ["end2end", "linear", "knn"] and config.init == "pretrained"
    assert (config.train.optimizer, config.train.lr, config.train.batch_size) == ("adamw", 0.0001, 64)
    assert (config.model.input, config.model.canvas) == ("pad", 224)  # every backbone padded to 224, as its code does


def test_the_grid_refuses_model_arch_and_one_weights_file_for_several_archs() -> None:
    from medmeta.errors import ConfigError
    from medmeta.evaluation.baselines import BaselineConfig
    from medmeta.settings import from_mapping

    with pytest.raises(ConfigError, match=r"^config key model.arch: the supervised grid takes its backbones from archs"):
        from_mapping(BaselineConfig, {"model": {"arch": "vgg16"}})
    with pytest.raises(ConfigError, match=r"^config key model.weights: 'w.pth' is one architecture's file, and archs "
                                          r"names 2: give one --arch with it$"):
        from_mapping(BaselineConfig, {"archs": ["vgg16", "alexnet"], "init": "pretrained", "model": {"weights": "w.pth"}})
    with pytest.raises(ConfigError, match=r"^config key sizes: sizes must be distinct; 28 is given twice"):
        from_mapping(BaselineConfig, {"sizes": [28, 28]})


def test_both_commands_take_the_same_launcher_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """cdfsl.py and supervised.py declare --launcher, --no-wait, --nproc and the SLURM resources
    once (``launch.add_arguments``), and both map them to the same ``slurm.*`` keys."""
    import argparse

    import cdfsl
    import yaml

    from medmeta.evaluation import launch

    flags = ["--launcher", "slurm", "--no-wait", "--partition", "gpu", "--gpus", "2", "--time", "30", "--mem", "8"]
    parser = argparse.ArgumentParser()
    launch.add_arguments(parser, "jobs")
    wanted = {"slurm.partition": "gpu", "slurm.gpus_per_node": 2, "slurm.timeout_min": 30, "slurm.mem_gb": 8}
    assert launch.overrides(parser.parse_args(flags)) == wanted
    cdfsl.main([*flags, "--print-config"])
    slurm = yaml.safe_load(capsys.readouterr().out)["slurm"]
    assert {f"slurm.{k}": v for k, v in slurm.items() if f"slurm.{k}" in wanted} == wanted
    for script in (cdfsl, supervised):
        with pytest.raises(SystemExit):
            script.main(["--help"])
        usage = capsys.readouterr().out
        assert all(flag in usage for flag in flags if flag.startswith("--")), script.__name__


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="per-cell peak memory on a CPU is Linux's")
def test_a_cells_peak_memory_on_a_cpu_is_its_own() -> None:
    """Cells run one after another in one process each report their own peak resident size,
    not the process's peak so far (which made every row after a 17 GB cell read 17 GB)."""
    import torch

    from medmeta.evaluation.baselines import _peak_memory_mb, _reset_peak_memory

    cpu = torch.device("cpu")
    _reset_peak_memory(cpu)
    big = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
    big_peak = _peak_memory_mb(cpu)
    del big
    _reset_peak_memory(cpu)
    small_peak = _peak_memory_mb(cpu)
    assert big_peak - small_peak > 300


def test_slow_rates_keep_two_significant_digits() -> None:
    from medmeta.evaluation.baselines import _cost

    assert [_cost(v, "rate") for v in (0.0113, 1.234, 2.0, 9.96, 27.09)] == ["0.011", "1.2", "2.0", "10", "27"]
    assert _cost(None, "rate") == "-" and _cost(11.176, ".2f") == "11.18"
