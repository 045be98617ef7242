"""The supervised grid's analysis (issue 27): MedMNIST+'s Table 2 layout, resolution transitions,
the factor tests and the figure, from baselines tables."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from medmeta.evaluation.grid import averages, cells, summarise_grid, transitions, write_grid

from .conftest import Synthetic

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
    assert sorted((r["arch"], r["scheme"]) for r in combined["table"]) == [
        ("resnet18", "knn"), ("test_resnet", "knn"), ("test_resnet", "pixels")]
