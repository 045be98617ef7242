"""Reliability: corrupted store files are refused (and repaired by a rebuild), a full disk is one
line with nothing left behind, bad values are refused before work starts, OS errors are one
line, stale temporary files are swept, resumed training keeps its total time, threads."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from medmeta import files
from medmeta.cli import main as medmeta_main
from medmeta.data.store import Store
from medmeta.data.tasks import MedMNISTTask
from medmeta.errors import DiskFullError, StoreError
from medmeta.evaluation import run_protocol
from medmeta.learning.runtime import configure_threads

from .conftest import Synthetic, tiny_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import cdfsl  # noqa: E402


@pytest.fixture
def store(tmp_path: Path, synthetic: Synthetic) -> Store:
    store = Store(tmp_path / "root", synthetic.manifest)
    store.build("toyclass", 28, source_dir=synthetic.source_dir)
    store.build("toybinary", 28, source_dir=synthetic.source_dir)
    return store


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


def chunk_offset(path: Path, dataset: str, chunk: int = 0) -> int:
    with h5py.File(path, "r") as fh:
        info = fh[dataset].id.get_chunk_info(chunk)
        return info.byte_offset + info.size // 2


def test_corrupted_labels_are_refused_and_a_build_repairs_them(store: Store, synthetic: Synthetic, capsys) -> None:
    path = store.path("toyclass", 28)
    flip_byte(path, chunk_offset(path, "val/labels"))
    with pytest.raises(StoreError, match=r"toyclass_28\.h5 is corrupt.*labels.*medmeta prepare tclass --size 28 --force"):
        MedMNISTTask(store, "toyclass", "val")
    assert not store.is_built("toyclass", 28)
    capsys.readouterr()
    assert medmeta_main(["info", "--root", str(store.root), "--manifest", str(synthetic.manifest_path)]) == 1
    out = capsys.readouterr()
    assert "CORRUPT" in out.out and "--force" in out.err
    store.build("toyclass", 28, source_dir=synthetic.source_dir)  # not "already built": it repairs the file
    np.testing.assert_array_equal(MedMNISTTask(store, "toyclass", "val").labels,
                                  synthetic.arrays[("toyclass", 28)]["val_labels"][:, 0])


def test_a_damaged_image_chunk_is_one_line_for_every_reader(store: Store, synthetic: Synthetic, tmp_path: Path,
                                                            capsys) -> None:
    path = store.path("toyclass", 28)
    flip_byte(path, chunk_offset(path, "train/images"))
    assert store.is_built("toyclass", 28)  # labels intact: only reading the chunk can tell
    with pytest.raises(StoreError, match=r"toyclass_28\.h5 is corrupt: a read failed its checksum"):
        MedMNISTTask(store, "toyclass", "train", in_memory=True)
    lazy = MedMNISTTask(store, "toyclass", "train", in_memory=False)
    with pytest.raises(StoreError, match="is corrupt"):
        lazy[0]
    # verify reports the file and goes on to the next one.
    capsys.readouterr()
    code = medmeta_main(["verify", "--root", str(store.root), "--manifest", str(synthetic.manifest_path)])
    out = capsys.readouterr()
    assert code == 1 and "FAILED" in out.err and "train/images is unreadable" in out.err
    assert "ok: toybinary 28px" in out.out
    # The experiment script: one line naming the file.
    with pytest.raises(SystemExit) as info:
        cdfsl.main(["--target", "toyclass", "--methods", "scratch+proto", "--threads", "1", "--root", str(store.root),
                    "--manifest",
                    str(synthetic.manifest_path), "--set", "episodes.min_class_samples=null", "--set",
                    "episodes.queries=2", "--set", "episodes.count=2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "toyclass_28.h5 is corrupt" in err and len(err.strip().splitlines()) == 1


def test_full_disk_before_and_during_writes(store: Store, synthetic: Synthetic, monkeypatch, tmp_path: Path) -> None:
    before = sorted(p.name for p in store.store_dir.iterdir())
    usage = files.shutil.disk_usage(store.store_dir)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(DiskFullError, match=r"not enough disk space for .*toyordinal_28\.h5: it needs up to"):
        store.build("toyordinal", 28, source_dir=synthetic.source_dir)
    monkeypatch.undo()

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Store, "_copy_array", staticmethod(enospc))
    with pytest.raises(DiskFullError, match=r"the disk filled up while writing .*toyordinal_28\.h5"):
        store.build("toyordinal", 28, source_dir=synthetic.source_dir)
    assert sorted(p.name for p in store.store_dir.iterdir()) == before  # no temporary file left

    def torch_full(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 2048")

    monkeypatch.setattr(torch, "save", torch_full)
    with pytest.raises(DiskFullError, match=r"checkpoint\.pt; it needs up to"):
        files.torch_save_atomic({"w": torch.zeros(100)}, tmp_path / "ckpt" / "checkpoint.pt")
    assert list((tmp_path / "ckpt").iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--set", "pretrain.steps=abc"], "config key pretrain.steps: expected an integer, got 'abc'"),
    (["--set", "pretrain.steps=0"], "config key pretrain.steps: must be >= 1, got 0"),
    (["--methods", ","], "config key methods: name at least one method"),
    (["--set", "adaptation.knn.metric=manhattan"], "adaptation.knn.metric: expected one of ['euclidean', 'cosine']"),
    (["--size", "32"], "config key size: expected one of [28, 64, 128, 224]"),
])
def test_bad_values_are_refused_before_any_work(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    with pytest.raises(SystemExit):
        cdfsl.main(["--target", "retina", "--root", str(tmp_path / "root"), "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "root").exists() and not (tmp_path / "out").exists()


def test_yaml_scientific_notation_is_a_float() -> None:
    assert tiny_config(**{"pretrain.lr": "1e-4"}).pretrain.lr == 1e-4


def test_os_errors_are_one_line(tmp_path: Path, synthetic: Synthetic, capsys, monkeypatch) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = medmeta_main(["prepare", "tclass", "--root", str(blocker), "--source-dir", str(synthetic.source_dir),
                         "--manifest", str(synthetic.manifest_path)])
    err = capsys.readouterr().err
    assert code == 2 and "is a file, not a folder" in err and len(err.strip().splitlines()) == 1
    # A write refused by the OS names the path, and the cleanup never hides it.
    monkeypatch.setattr(files.os, "replace", lambda a, b: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: (_ for _ in ()).throw(OSError("cleanup")))
    with pytest.raises(StoreError, match=r"cannot write .*out\.txt \(Permission denied\)"):
        files.write_text_atomic(tmp_path / "out.txt", "x")
    monkeypatch.undo()
    # An unreadable store file: info names it and goes on.
    store = Store(tmp_path / "root", synthetic.manifest)
    store.build("toybinary", 28, source_dir=synthetic.source_dir)
    store.path("toyclass", 28).write_bytes(b"garbage, not HDF5")
    capsys.readouterr()
    code = medmeta_main(["info", "--root", str(store.root), "--manifest", str(synthetic.manifest_path)])
    out = capsys.readouterr()
    assert code == 1 and "unreadable" in out.err and "toybinary" in out.out


def test_episode_file_settings_replace_the_configs_and_say_so(store: Store, synthetic: Synthetic, tmp_path: Path,
                                                              capsys) -> None:
    base = {"episodes.min_class_samples": None, "episodes.queries": 2, "episodes.count": 2}
    first = run_protocol(tiny_config(target="toyclass", methods=["scratch+proto"], **base, **{"episodes.shots": 3}),
                         tmp_path / "a", root=store.root, manifest=synthetic.manifest)
    stored = next((tmp_path / "a").glob("episodes_*.json"))
    capsys.readouterr()
    again = run_protocol(tiny_config(target="toyclass", methods=["scratch+proto"], **{"episodes.file": str(stored)}),
                         tmp_path / "b", root=store.root, manifest=synthetic.manifest)
    out = capsys.readouterr().out
    assert "shots 3 (the config said 5)" in out and "count 2 (the config said 3)" in out
    assert again["config"]["episodes"]["shots"] == 3
    assert again["methods"]["scratch+proto"]["per_episode"] == first["methods"]["scratch+proto"]["per_episode"]


def test_stale_temporaries_are_swept_by_the_next_writer(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    host = files._host()
    dead = folder / f".checkpoint.pt.{host}-999999999-5.tmp"
    reused = folder / f".checkpoint.pt.{host}-{os.getppid()}-1.tmp"  # a live PID with another start time: PID reuse
    mine = folder / f".other.pt.{files._owner(os.getpid())}.tmp"  # a write in progress in a live process
    elsewhere = folder / ".other.pt.anotherhost-999999999-5.tmp"  # another node's write on a shared disk
    for p in (dead, reused, mine, elsewhere):
        p.write_bytes(b"x" * 1000)
    files.write_text_atomic(folder / "results.json", "{}")
    assert not dead.exists() and not reused.exists() and mine.exists() and elsewhere.exists()


def test_a_killed_checkpoint_write_leaves_no_temporary(tmp_path: Path) -> None:
    code = ("import os, torch; from medmeta import files\n"
            "def save(obj, path):\n    open(path, 'wb').write(b'x' * 100); os._exit(9)\n"
            "torch.save = save\nfiles.torch_save_atomic({}, " + repr(str(tmp_path / "checkpoint.pt")) + ")")
    subprocess.run([sys.executable, "-c", code], check=False, timeout=120)
    assert len(list(tmp_path.glob(".*.tmp"))) == 1  # the killed process left its temporary
    files.torch_save_atomic({"step": 1}, tmp_path / "checkpoint.pt")  # the next writer sweeps it
    assert list(tmp_path.glob(".*.tmp")) == [] and (tmp_path / "checkpoint.pt").is_file()


def test_resumed_training_counts_every_session(store: Store, synthetic: Synthetic, tmp_path: Path) -> None:
    from medmeta.learning.models import build_backbone
    from medmeta.learning.pretrain import MultiTaskPretrainer, PretrainConfig

    train = {"toyclass": MedMNISTTask(store, "toyclass", "train")}
    val = {"toyclass": MedMNISTTask(store, "toyclass", "val")}
    config = PretrainConfig(steps=4, batch_size=8, eval_every=2, val_max=8, bn_batches=1, checkpoint_every=2)
    ckpt = tmp_path / "ckpt.pt"

    def crash(step: int) -> None:
        if step == 3:
            raise RuntimeError("killed")

    first = MultiTaskPretrainer(build_backbone(), train, val, config, torch.device("cpu"), checkpoint=ckpt)
    with pytest.raises(RuntimeError):
        first.run(on_step=crash)
    saved = torch.load(ckpt, weights_only=False)["seconds"]
    resumed = MultiTaskPretrainer(build_backbone(), train, val, config, torch.device("cpu"), checkpoint=ckpt)
    assert resumed.seconds == saved > 0
    resumed.run()
    assert resumed.seconds > saved and 0 <= resumed.data_seconds < resumed.seconds


def test_threads_and_the_oversubscription_warning(monkeypatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 3.0, 3.0))
        monkeypatch.setattr(os, "cpu_count", lambda: 2)
        assert configure_threads(1) is None and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert "use" in configure_threads(None) and "--threads 1" in configure_threads(None)
        monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
        assert configure_threads(None) is None
    finally:
        torch.set_num_threads(before)


def test_results_record_the_total_training_time(store: Store, synthetic: Synthetic, tmp_path: Path) -> None:
    results = run_protocol(tiny_config(target="toyclass", methods=["mmpt"], sources=["toyordinal"],
                                       **{"episodes.min_class_samples": None, "episodes.queries": 2,
                                          "episodes.count": 2}),
                           tmp_path / "run", root=store.root, manifest=synthetic.manifest,
                           source_dir=str(synthetic.source_dir))
    log = next((tmp_path / "run" / "pretrained").glob("mmpt-*/training.json"))
    assert results["methods"]["mmpt"]["seconds"]["train"] == json.loads(log.read_text())["seconds"]


@pytest.mark.parametrize("silenced", [False, True])
def test_progress_bars_obey_tqdm_disable(synthetic: Synthetic, tmp_path: Path, silenced: bool) -> None:
    """Batch logs (SLURM, nohup) set tqdm's own TQDM_DISABLE=1; the rank-0 rule must not override it.
    tqdm reads the variable when it is imported, hence a fresh process."""
    store = Store(tmp_path / "root", synthetic.manifest)
    store.build("toyclass", 28, source_dir=synthetic.source_dir)
    script = f"""
import torch
from medmeta.data.manifest import load_manifest
from medmeta.data.store import Store
from medmeta.data.tasks import MedMNISTTask
from medmeta.episodes import EpisodeSampler
from medmeta.evaluation.protocol import Target, evaluate_method
from medmeta.learning.models import build_backbone
from medmeta.methods import Method, Prototypes, Scratch
store = Store({str(tmp_path / "root")!r}, load_manifest(base={str(synthetic.manifest_path)!r}))
dataset = MedMNISTTask(store, "toyclass", "test")
target = Target(dataset, EpisodeSampler(dataset, 2, 2, 2, n_episodes=2, seed=0).episode_set(), ())
evaluate_method(Method(Scratch(), Prototypes()), build_backbone("resnet18"), target, seed=0, device=torch.device("cpu"))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    if silenced:
        env["TQDM_DISABLE"] = "1"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert ("adapt scratch+proto" in done.stderr) is not silenced, done.stderr
