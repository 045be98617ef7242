"""The GPU benchmark script's code paths, run in its CPU smoke mode, so the first GPU run is not its first run."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu  # noqa: E402


def test_gpu_benchmark_smoke_mode_runs_every_path_on_cpu(tmp_path: Path) -> None:
    report = gpu.main(["--smoke", "--device", "cpu", "--json", str(tmp_path / "gpu.json")])
    assert report["device"] == "CPU" and report["errors"] == {}
    assert json.loads((tmp_path / "gpu.json").read_text())["projected_hours"] == report["projected_hours"]
    assert len(report["mmpt_images_per_s"]) == 4 and all(v > 0 for v in report["mmpt_images_per_s"].values())
    for key in ("finetune_episode_s", "finetune_batched_episode_s", "linear_episode_s", "knn_episode_s",
                "proto_episode_s", "lpft_episode_s", "inner_episode_s", "maml_first_step_s", "maml_second_step_s"):
        assert report[key] > 0, key
    assert report["projected_hours"]["MAML 20k second-order steps"] > 0


def test_a_failing_section_is_reported_and_the_others_still_run_with_keep_going() -> None:
    report: dict = {}
    sections = gpu.Sections(report, keep_going=True)
    ran = []
    sections.run("one", lambda: 1 / 0)
    sections.run("two", lambda: ran.append(True))
    assert ran == [True] and report["errors"] == {"one": "ZeroDivisionError: division by zero"}
    assert set(report["section_seconds"]) == {"one", "two"}
    with pytest.raises(ZeroDivisionError):
        gpu.Sections({}, keep_going=False).run("one", lambda: 1 / 0)
