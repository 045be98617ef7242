"""experiments/compare.py: two runs paired on their common episodes."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from medmeta.evaluation import run_protocol

from .conftest import Synthetic, tiny_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import compare  # noqa: E402


def test_runs_of_different_lengths_pair_on_their_common_episodes(synthetic: Synthetic, tmp_path: Path, capsys) -> None:
    def run(out: str, count: int, **extra) -> Path:
        cfg = tiny_config(target="toyclass", methods=["scratch+proto", "scratch+knn"],
                          **{"episodes.min_class_samples": None, "episodes.queries": 2, "episodes.count": count}, **extra)
        run_protocol(cfg, tmp_path / out, root=tmp_path / "root", source_dir=str(synthetic.source_dir),
                     manifest=synthetic.manifest)
        return tmp_path / out / "results.json"

    long, short = run("long", 3), run("short", 2)
    (tmp_path / "episodes.json").write_text('{"episodes": []}')
    rows = compare.main([f"{long}:scratch+proto", f"{short}:scratch+proto", f"{long}:scratch+knn",
                         f"{short}:scratch+proto"])
    assert rows[0]["episodes"] == 2 and rows[0]["auroc_diff"]["identical"]  # same rule, same episodes
    assert rows[1]["episodes"] == 2 and not rows[1]["auroc_diff"]["identical"]
    assert "paired A - B +0.000 ± 0.000" in capsys.readouterr().out
    other = run("other", 2, **{"episodes.seed": 1})
    with pytest.raises(SystemExit):
        compare.main([f"{long}:scratch+proto", f"{other}:scratch+proto"])
    assert "different episode sets" in capsys.readouterr().err
    for bad, said in [(f"{long}", "write RESULTS.json:METHOD"), (f"{tmp_path / 'long' / 'table.md'}:x", "cannot read"),
                      (f"{tmp_path / 'episodes.json'}:scratch", "is not one run's results.json")]:
        with pytest.raises(SystemExit):
            compare.main([bad, f"{short}:scratch+proto"])
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1


def test_compare_prints_wilcoxon_and_friedman(synthetic: Synthetic, tmp_path: Path, capsys) -> None:
    from medmeta.evaluation.statistics import friedman, wilcoxon

    cfg = tiny_config(target="toyclass", methods=["scratch+proto", "scratch+knn", "scratch+linear"],
                      **{"episodes.min_class_samples": None, "episodes.queries": 2, "episodes.count": 6})
    run_protocol(cfg, tmp_path / "out", root=tmp_path / "root", source_dir=str(synthetic.source_dir),
                 manifest=synthetic.manifest)
    spec = {m: f"{tmp_path / 'out' / 'results.json'}:{m}" for m in cfg.methods}
    (row,) = compare.main([spec["scratch+proto"], spec["scratch+knn"]])
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["methods"]
    a, b = ([e["acc"] for e in saved[m]["per_episode"]] for m in ("scratch+proto", "scratch+knn"))
    assert row["acc_wilcoxon"] == wilcoxon(a, b)
    assert "Wilcoxon p" in capsys.readouterr().out
    (result,) = compare.main(["--friedman", *spec.values()])
    accs = [[e["acc"] for e in saved[m]["per_episode"]] for m in cfg.methods]
    assert result["acc"]["chi2"] == pytest.approx(friedman(list(zip(*accs)))["chi2"])
    assert "Kendall's W" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        compare.main(["--friedman", spec["scratch+proto"], spec["scratch+knn"]])
    assert "three or more methods" in capsys.readouterr().err
