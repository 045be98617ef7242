"""The benchmark scripts' own logic: the GPU script's code paths in its CPU smoke mode (so the first GPU
run is not its first run), and the episode benchmark's summary of saved runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import episodes  # noqa: E402
import gpu  # noqa: E402


def test_gpu_benchmark_smoke_mode_runs_every_path_on_cpu(tmp_path: Path) -> None:
    report = gpu.main(["--smoke", "--device", "cpu", "--json", str(tmp_path / "gpu.json")])
    assert report["device"] == "CPU" and report["errors"] == {}
    assert json.loads((tmp_path / "gpu.json").read_text())["projected_hours"] == report["projected_hours"]
    assert len(report["mmpt_images_per_s"]) == 4 and all(v > 0 for v in report["mmpt_images_per_s"].values())
    for shares in (report["mmpt_data_share"], report["mmpt_data_share_no_prefetch"]):  # with and without the loader thread
        assert shares.keys() == report["mmpt_images_per_s"].keys() and all(0 <= v < 1 for v in shares.values())
    assert 0 <= report["supervised_data_share"] < 1 and 0 <= report["supervised_data_share_no_prefetch"] < 1
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


def test_the_episode_benchmark_summarises_its_saved_runs(tmp_path: Path) -> None:
    def run(blood_uint8: float) -> str:
        rates = {"float32": 6000.0, "uint8": blood_uint8, "naive": 200.0, "indices": 90000.0, "gather": 40000.0,
                 "convert": 9000.0}
        return "\n".join(["# run", "one core (CPU 0), ...", episodes.line_28px("bloodmnist", "3x28x28", rates),
                          episodes.line_28px("retinamnist", "3x28x28", {**rates, "naive": 1234.0}),
                          "         bench 224px 3x224x224 HDF5 ..."])

    saved = tmp_path / "episodes.txt"
    saved.write_text(run(12_345.0) + "\n" + run(16_000.0) + "\n")
    table = episodes.summarise(saved).splitlines()
    assert table[0].startswith("| task (28px) | float32 episodes | uint8 episodes |") and len(table) == 4
    assert table[2] == "| blood (RGB) | 6.0-6.0k | 12.3-16.0k | 200-200 | 40.0-40.0k | 9.0-9.0k | 1 of 2 runs |"
    assert table[3].startswith("| retina (RGB) | 6.0-6.0k | 12.3-16.0k | 1.2-1.2k |")
    saved.write_text("no runs here\n")
    with pytest.raises(SystemExit, match="no 28px lines"):
        episodes.summarise(saved)
    with pytest.raises(SystemExit, match="cannot read it"):
        episodes.summarise(tmp_path / "missing.txt")


def test_the_docs_episode_table_is_the_summary_of_the_saved_runs() -> None:
    table = episodes.summarise(REPO / "docs" / "results" / "benchmarks" / "episodes.txt")
    assert table in (REPO / "docs" / "benchmarks.md").read_text()


def test_the_backbone_benchmark_times_ours_and_plain_on_tiny_models(tmp_path: Path) -> None:
    import backbones

    report = backbones.main(["--archs", "test_vit,test_resnet,alexnet", "--batch", "2", "--steps", "1", "--rounds", "1",
                             "--json", str(tmp_path / "backbones.json")])
    assert set(report["archs"]) == {"test_vit", "test_resnet", "alexnet"}
    for r in report["archs"].values():
        assert min(r["features_ours"], r["features_plain"], r["train_ours"], r["train_plain"]) > 0
    assert report["feature_cache"]["load_s"] > 0
    assert json.loads((tmp_path / "backbones.json").read_text())["archs"].keys() == report["archs"].keys()


def test_ours_and_plain_compute_the_same_features() -> None:
    import backbones
    import torch

    from medmeta.learning.models import build_backbone

    for arch, canvas in (("test_vit", None), ("alexnet", None), ("test_resnet", 64)):
        torch.manual_seed(0)
        ours = build_backbone(arch, **({"input": "pad", "canvas": canvas} if canvas else {})).eval()
        plain = backbones.Plain(arch, canvas).eval()
        plain.model.load_state_dict(ours.model.state_dict() if hasattr(ours, "model") else ours.state_dict())
        x = torch.rand(2, 1, 28, 28)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), plain(x))
