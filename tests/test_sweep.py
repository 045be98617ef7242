"""The whole benchmark in one command: sweeps that resume after a kill, submitit's local
executor (real subprocesses), and torchrun with 2 CPU processes against a single process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medmeta.errors import ConfigError
from medmeta.evaluation import protocol as protocol_module
from medmeta.evaluation.sweep import Sweep
from medmeta.learning.models import build_backbone

from .conftest import Synthetic, tiny_config

REPO = Path(__file__).resolve().parents[1]


def _config(**overrides):
    return tiny_config(**{"sources": "available", "methods": ["scratch", "scratch+proto", "mmpt"],
                          "episodes.min_class_samples": None, "episodes.queries": 2, "episodes.count": 2, **overrides})


def _sweep(synthetic: Synthetic, tmp_path: Path, **kw) -> Sweep:
    return Sweep(_config(), ["toyclass", "toyordinal"], [0, 1], tmp_path / "sweep", root=str(tmp_path / "root"),
                 source_dir=str(synthetic.source_dir), manifests=(str(synthetic.manifest_path),), **kw)


class Killed(Exception):
    """Stands for the process being killed mid-sweep."""


def test_a_killed_sweep_rerun_redoes_nothing_finished(synthetic: Synthetic, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    kill = [True]
    real = protocol_module.evaluate_method

    def counting(method, *args, **kwargs):
        calls.append(method.name)
        if kill[0] and len(calls) == 5:  # the second method of the second job
            raise Killed
        return real(method, *args, **kwargs)

    monkeypatch.setattr(protocol_module, "evaluate_method", counting)
    sweep = _sweep(synthetic, tmp_path)
    with pytest.raises(Killed):
        sweep.run()
    first = sweep.jobs[0].out / "results.json"
    stamp = first.stat().st_mtime_ns
    trained = sorted((tmp_path / "sweep" / "pretrained").glob("mmpt-*/checkpoint.pt"))
    stamps = {p: p.stat().st_mtime_ns for p in trained}
    calls.clear()
    kill[0] = False
    combined = _sweep(synthetic, tmp_path).run()
    # Job 1 was finished: not rerun. Job 2 had scratch done: only its other two methods ran. Jobs 3-4 ran whole.
    assert first.stat().st_mtime_ns == stamp
    assert calls == ["scratch+proto", "mmpt"] + ["scratch", "scratch+proto", "mmpt"] * 2
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished pretraining was reused
    assert len(combined["table"]) == 2 * 3 and {r["seeds"] for r in combined["table"]} == {2}
    for name in ("table.json", "table.csv", "table.md", "table.png"):
        assert (tmp_path / "sweep" / name).stat().st_size > 100, name
    row = next(r for r in combined["table"] if r["target"] == "toyclass" and r["method"] == "mmpt")
    runs = [json.loads((j.out / "results.json").read_text())["methods"]["mmpt"]["summary"]["auroc"]
            for j in sweep.jobs if j.target == "toyclass"]
    assert row["auroc"] == pytest.approx(np.mean(runs)) and row["auroc_seed_std"] == pytest.approx(np.std(runs, ddof=1))
    # Targets with identical sources and settings share pretraining: toyclass and toyordinal have
    # different sources, so there is one mm-PT run per (target, seed).
    assert len(list((tmp_path / "sweep" / "pretrained").glob("mmpt-*"))) == 4


def test_a_method_killed_mid_episodes_resumes_from_its_last_chunk(synthetic: Synthetic, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Long 3D adaptations run for an hour a method on a CPU: a kill must not lose the episodes
    already scored, and the resumed result must equal an uninterrupted run's."""
    from medmeta.evaluation import run_protocol
    from medmeta.methods.base import Method

    config = _config(target="toyclass", methods=["scratch"], **{"episodes.count": 6, "episodes.chunk": 2})
    where = {"root": str(tmp_path / "root"), "source_dir": str(synthetic.source_dir), "manifest": synthetic.manifest}
    whole = run_protocol(config, tmp_path / "whole", **where)["methods"]["scratch"]["per_episode"]

    adapted: list[int] = []
    kill = [True]
    real = Method.predict_many

    def counting(self, backbone, episodes, seeds):
        if kill[0] and len(adapted) == 4:  # two chunks of two scored and saved, the third is killed
            raise Killed
        adapted.extend(e.index for e in episodes)
        return real(self, backbone, episodes, seeds)

    monkeypatch.setattr(Method, "predict_many", counting)
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        run_protocol(config, out, **where)
    partial = json.loads((out / "methods" / "partial" / "scratch.json").read_text())
    assert [e["episode"] for e in partial["per_episode"]] == [0, 1, 2, 3]
    adapted.clear()
    kill[0] = False
    resumed = run_protocol(config, out, **where)["methods"]["scratch"]["per_episode"]
    assert adapted == [4, 5]  # only the episodes the kill left
    assert resumed == whole
    assert not (out / "methods" / "partial" / "scratch.json").exists()
    # Results handed back as done are kept only for the episodes asked for, and not adapted again.
    from medmeta.evaluation.protocol import Protocol, evaluate_method, prepare_target

    protocol = Protocol(config, out, **where)
    _, target = prepare_target(protocol.store, protocol.config, out)
    adapted.clear()
    some = evaluate_method(protocol.methods[0], build_backbone("resnet18"), target, 0, torch.device("cpu"),
                           episodes=[1, 4], done=whole)
    assert some == [whole[1], whole[4]] and adapted == []


def test_an_unreadable_cache_file_is_warned_about_and_its_work_redone(synthetic: Synthetic, tmp_path: Path) -> None:
    """A cached method result, chunk of episodes or job result that is not JSON (truncated by a
    copy, edited by hand) costs its work again, with one warning naming the file, not a traceback."""
    from medmeta.evaluation import run_protocol
    from medmeta.evaluation.sweep import job_done

    config = _config(target="toyclass", methods=["mmpt"])
    where = {"root": str(tmp_path / "root"), "source_dir": str(synthetic.source_dir), "manifest": synthetic.manifest}
    first = run_protocol(config, tmp_path / "out", **where)["methods"]["mmpt"]
    cache = tmp_path / "out" / "methods" / "mmpt.json"
    cache.write_text(cache.read_text()[:100])
    with pytest.warns(UserWarning, match=r"mmpt\.json is not readable JSON.*mmpt is run again"):
        again = run_protocol(config, tmp_path / "out", **where)["methods"]["mmpt"]
    assert again["per_episode"] == first["per_episode"]  # the trained backbone was reused: same scores
    assert json.loads(cache.read_text())["result"]["per_episode"] == first["per_episode"]

    sweep = _sweep(synthetic, tmp_path)
    job = sweep.jobs[0]
    job.out.mkdir(parents=True)
    (job.out / "results.json").write_text("{")
    with pytest.warns(UserWarning, match=r"results\.json is not readable JSON.*the job is run again"):
        assert not job_done(job, _config())
    # The record of submitted jobs is not a cache: guessing could submit queued jobs twice.
    sweep.out.mkdir(parents=True, exist_ok=True)
    for text in ("{", "[]"):
        (sweep.out / "jobs.json").write_text(text)
        with pytest.raises(ConfigError, match=r"jobs\.json is not a readable record of submitted jobs: delete it"):
            sweep.run("submitit-local", wait=False)


def test_bf16_training_is_never_reused_for_an_fp32_run(synthetic: Synthetic, tmp_path: Path) -> None:
    """``precision: auto`` trains mm-PT in bf16 on CUDA and in fp32 on CPUs: a pretrained folder
    or result copied from a GPU run must not be taken for a CPU run's, while fp32 caches keep
    their names (the CPU tables' folders stay valid)."""
    from medmeta.evaluation.protocol import Protocol, init_folder, prepare_target

    def keys(**overrides) -> dict[str, tuple[str, str]]:
        config = _config(target="toyclass", methods=["mmpt"], **overrides)
        protocol = Protocol(config, tmp_path / "out", root=str(tmp_path / "root"),
                            source_dir=str(synthetic.source_dir), manifest=synthetic.manifest)
        protocol.build_store()
        _, target = prepare_target(protocol.store, protocol.config, tmp_path / "out")
        found = {}
        for device in ("cpu", "cuda"):
            protocol.device = torch.device(device)
            method = protocol.methods[0]
            found[device] = (init_folder(protocol.pretrained, method, protocol.config, protocol.dims,
                                         protocol.sources, protocol.device).name, protocol.cache_key(method, target))
        return found

    auto = keys()
    assert auto["cpu"][0] != auto["cuda"][0] and auto["cpu"][1] != auto["cuda"][1]
    for fixed in ("fp32", "bf16"):  # an explicit precision means the same on every device
        same = keys(**{"pretrain.precision": fixed})
        assert same["cpu"] == same["cuda"]
    assert keys(**{"pretrain.precision": "fp32"})["cpu"] != auto["cuda"]
    # Every trainer's checkpoint says so too (mm-PT, MAML and supervised share checkpoint_identity).
    from medmeta.learning.pretrain import PretrainConfig
    from medmeta.learning.runtime import checkpoint_identity

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert checkpoint_identity(PretrainConfig(), cpu) != checkpoint_identity(PretrainConfig(), cuda)
    fp32 = PretrainConfig(precision="fp32")
    assert checkpoint_identity(fp32, cpu) == checkpoint_identity(fp32, cuda)


def test_submit_and_collect_with_submitits_local_executor(synthetic: Synthetic, tmp_path: Path) -> None:
    sweep = Sweep(_config(), ["toyclass"], [0], tmp_path / "sweep", root=str(tmp_path / "root"),
                  source_dir=str(synthetic.source_dir), manifests=(str(synthetic.manifest_path),))
    assert sweep.run("submitit-local", wait=False) is None  # submitted, not collected
    jobs = json.loads((tmp_path / "sweep" / "jobs.json").read_text())
    assert list(jobs) == ["toyclass/seed0"]
    combined = sweep.run("submitit-local")  # resubmits the unfinished job (a local job dies with its process) and waits
    assert [r["method"] for r in combined["table"]] == ["scratch", "scratch+proto", "mmpt"]
    logs = list((tmp_path / "sweep" / "submitit").glob("*_log.out"))
    assert logs, "the jobs ran in submitit subprocesses"
    assert sweep.pending() == [] and sweep.run("submitit-local")["table"] == combined["table"]  # collected only


def _cdfsl(args: list[str], out: Path, nproc: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "experiments" / "cdfsl.py"), *args, "--out", str(out), "--nproc", str(nproc)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def test_a_failure_on_one_rank_stops_every_rank(synthetic: Synthetic, tmp_path: Path) -> None:
    """A method failing on rank 1 ends rank 0 too, at the next gather, with the error named: rank 0
    does not sit in the collective until a launcher kills it (torchrun's agent does; a SLURM step
    or a hand-made process group need not, and the timeout is 24 hours)."""
    from medmeta.data.store import Store

    store = Store(tmp_path / "root", synthetic.manifest)
    store.build("toyclass", 28, source_dir=synthetic.source_dir)
    script = tmp_path / "fail.py"
    script.write_text(f"""
import torch
from medmeta import distributed
from medmeta.data.manifest import load_manifest
from medmeta.data.store import Store
from medmeta.data.tasks import MedMNISTTask
from medmeta.episodes import EpisodeSampler
from medmeta.evaluation.protocol import Target, evaluate_method
from medmeta.learning.models import build_backbone
from medmeta.methods import Method, Prototypes, Scratch

class BreaksOnRank1(Prototypes):
    def scores(self, support, support_y, query, episode):
        if distributed.rank() == 1:
            raise RuntimeError("rank 1 broke")
        return super().scores(support, support_y, query, episode)

distributed.init("cpu")
store = Store({str(tmp_path / "root")!r}, load_manifest(base={str(synthetic.manifest_path)!r}))
dataset = MedMNISTTask(store, "toyclass", "test")
target = Target(dataset, EpisodeSampler(dataset, 2, 2, 2, n_episodes=8, seed=0).episode_set(), ())
torch.manual_seed(0)
evaluate_method(Method(Scratch(), BreaksOnRank1()), build_backbone("resnet18"), target, 0, torch.device("cpu"),
                chunk=2)
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                          env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "RuntimeError: rank 1 broke" in out  # rank 1's own error, with its traceback
    assert ("MethodError: another process failed while adapting scratch+proto: PluginError: method scratch+proto: "
            "BreaksOnRank1.predict (module __main__) raised RuntimeError: rank 1 broke") in out


def test_torchrun_two_processes_match_one(synthetic: Synthetic, tmp_path: Path) -> None:
    args = ["--target", "toyclass", "--methods", "scratch,scratch+proto,maml,mmpt", "--config", "smoke",
            "--device", "cpu", "--sources", "available", "--manifest", str(synthetic.manifest_path),
            "--source-dir", str(synthetic.source_dir), "--root", str(tmp_path / "root"),
            "--set", "episodes.min_class_samples=null", "--set", "episodes.count=5", "--set", "maml.steps=3",
            "--set", "maml.meta_batch=4"]
    one = _cdfsl(args, tmp_path / "one", 1)
    two = _cdfsl(args, tmp_path / "two", 2)
    for method in ("scratch", "scratch+proto"):  # evaluation sharded over ranks: identical episodes, identical numbers
        assert one["methods"][method]["per_episode"] == two["methods"][method]["per_episode"], method
    # MAML's meta-gradients are summed across ranks: the same training up to float rounding.
    a = [e["auroc"] for e in one["methods"]["maml"]["per_episode"]]
    b = [e["auroc"] for e in two["methods"]["maml"]["per_episode"]]
    np.testing.assert_allclose(a, b, atol=0.05)
    assert two["methods"]["mmpt"]["summary"]["episodes"] == 5  # DDP mm-PT ran (BatchNorm per rank: not equal)
    assert (one["processes"], two["processes"]) == (1, 2)  # the run says how many processes produced it
