"""Few-shot curves (issue 26, item 4): ``--shots 1,5,10`` runs each count on its own stored episode
set in one command, pretraining shared, and writes the curve's table and figure."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from medmeta.episodes import load_episode_set
from medmeta.evaluation.plots import curve_figure

from .test_medimeta import write_medimeta
from .test_plots import check_readable, method_names

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import cdfsl  # noqa: E402


@pytest.fixture
def folder(tmp_path: Path, monkeypatch) -> Path:
    for env in ("MEDMETA_MANIFEST", "MEDMETA_SOURCE_DIR", "MEDMETA_ROOT"):
        monkeypatch.delenv(env, raising=False)
    write_medimeta(tmp_path / "medimeta")
    return tmp_path / "medimeta"


def curve_args(folder: Path, tmp_path: Path, shots: str) -> list[str]:
    return ["--medimeta", str(folder), "--target", "pbc:cell_class", "--sources", "available", "--config", "smoke",
            "--methods", "scratch,mmpt", "--root", str(tmp_path / "root"), "--out", str(tmp_path / "out"),
            "--device", "cpu", "--size", "28", "--shots", shots, "--set", "episodes.queries=2",
            "--set", "episodes.min_class_samples=5"]


def test_a_curve_runs_each_count_on_its_own_episodes_with_pretraining_shared(folder: Path, tmp_path: Path,
                                                                           capsys) -> None:
    curve = cdfsl.main(curve_args(folder, tmp_path, "1,5,10"))
    out = tmp_path / "out"
    assert curve["target"] == "pbc:cell_class" and curve["shots"] == [1, 5, 10]
    # The target's dataset and the one sharing its domain (aml) are left out.
    assert curve["sources"] == ["cxr:disease_labels", "cxr:patient_sex", "dr_regular:dr_level", "dr_regular:artifact",
                                "dr_regular:overall_quality"]
    assert [(r["shots"], r["method"]) for r in curve["rows"]] == [(k, m) for k in (1, 5, 10) for m in ("scratch", "mmpt")]
    train_seconds = set()
    for k in (1, 5, 10):
        stored = load_episode_set(out / f"shots{k}" / f"episodes_pbc:cell_class_28px_{k}shot.json")
        assert stored.sampler["k_shot"] == k and len(stored) == 3
        assert all(len(e.support_indices) == k * len(e.classes) for e in stored)
        results = json.loads((out / f"shots{k}" / "results.json").read_text())
        row = next(r for r in curve["rows"] if (r["shots"], r["method"]) == (k, "mmpt"))
        assert row["auroc"] == results["methods"]["mmpt"]["summary"]["auroc"]
        assert row["auroc_diff"] == results["methods"]["mmpt"]["paired"]["auroc"]["mean"]
        train_seconds.add(results["methods"]["mmpt"]["seconds"]["train"])
    # One training, reused by every count (its record's seconds, not a new training's).
    assert len(list((out / "pretrained").glob("mmpt-*"))) == 1 and len(train_seconds) == 1
    table = (out / "curve.md").read_text()
    assert "| method | 1-shot | 5-shot | 10-shot |" in table and "| mmpt | " in table and "[Δ " in table
    assert table in capsys.readouterr().out
    assert (out / "curve.png").stat().st_size > 10_000 and (out / "curve.csv").read_text().count("\n") == 7
    # The same command again redoes nothing.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("shots*/methods/*.json")}
    assert cdfsl.main(curve_args(folder, tmp_path, "1,5,10"))["rows"] == curve["rows"]
    assert stamps and all(p.stat().st_mtime_ns == t for p, t in stamps.items())


@pytest.mark.parametrize("shots, extra, message", [
    ("1,1", [], "shot counts must be distinct; 1 is given twice"),
    ("0,5", [], "shots are counts of at least 1, got '0'"),
    ("1,5", ["--seeds", "0,1"], "--shots with several counts runs one target and one seed"),
    ("1,5", ["--episodes-file", "set.json"], "a stored episode set (--episodes-file) has one shot count"),
])
def test_a_curve_refuses_what_it_cannot_run_in_one_line(folder: Path, tmp_path: Path, capsys, shots: str,
                                                         extra: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        cdfsl.main([*curve_args(folder, tmp_path, shots), *extra])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and all("error" not in line for line in err[:-1]), err  # argparse prints usage first
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("n", [1, 3, 16])
def test_the_curve_figure_is_readable(tmp_path: Path, n: int) -> None:
    rng = np.random.default_rng(n)
    shots = [1, 2, 3, 5, 7, 10, 15, 20, 25, 30]
    names = method_names(n)
    rows = []
    for k in shots:
        for name in names:
            row = {"shots": k, "method": name, "auroc": float(rng.uniform(0.5, 0.9)), "auroc_ci95": 0.02}
            if name != names[0]:
                row.update(auroc_diff=float(rng.normal(0, 0.03)), auroc_diff_ci95=0.01)
            rows.append(row)
    fig = curve_figure({"target": "retinamnist", "reference": names[0], "shots": shots, "rows": rows})
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [str(k) for k in shots]
    assert len(fig.axes[0].lines) >= n
    check_readable(fig, tmp_path / "curve.png")
