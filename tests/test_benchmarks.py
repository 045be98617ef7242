"""The GPU benchmark script's code paths, run in its CPU smoke mode, so the first GPU run is not its first run."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu  # noqa: E402


def test_gpu_benchmark_smoke_mode_runs_every_path_on_cpu() -> None:
    report = gpu.main(["--smoke", "--device", "cpu"])
    assert report["device"] == "CPU"
    assert len(report["mmpt_images_per_s"]) == 4 and all(v > 0 for v in report["mmpt_images_per_s"].values())
    for key in ("finetune_episode_s", "finetune_batched_episode_s", "linear_episode_s", "knn_episode_s",
                "proto_episode_s", "lpft_episode_s", "inner_episode_s", "maml_first_step_s", "maml_second_step_s"):
        assert report[key] > 0, key
    assert report["projected_hours"]["MAML 20k second-order steps"] > 0
