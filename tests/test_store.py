from __future__ import annotations

import functools
import http.server
import multiprocessing as mp
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medmeta.data import store as store_module
from medmeta.errors import SourceError
from medmeta.data.store import Store
from medmeta.errors import StoreError
from medmeta.data.tasks import MedMNISTTask, find_task, list_tasks

from .conftest import SYNTHETIC_SPECS, Synthetic, write_synthetic


def _as_npz_layout(x: torch.Tensor, dims: int) -> np.ndarray:
    """Undo MedMNISTTask.to_tensor: back to uint8 in the npz layout."""
    arr = (x * 255).round().to(torch.uint8)
    if dims == 3 or arr.shape[0] == 1:
        return arr[0].numpy()
    return arr.permute(1, 2, 0).numpy()


def test_real_store_matches_npz(real_store: Store, real_dir: Path) -> None:
    built = real_store.built()
    assert ("retinamnist", 28) in built and ("adrenalmnist3d", 64) in built
    rng = np.random.default_rng(0)
    for entry in real_store.info():
        info = real_store.manifest[entry.subset]
        assert entry.counts == dict(info.splits)
        assert real_store.verify(entry.subset, entry.size).counts == dict(info.splits)
        with np.load(real_dir / info.file(entry.size).file) as npz:
            for split in ("train", "test"):
                ds = MedMNISTTask(real_store, entry.subset, split, size=entry.size, in_memory=False)
                images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
                assert len(ds) == len(images) == info.splits[split]
                np.testing.assert_array_equal(ds.labels, labels[:, 0].astype(np.int64))
                for i in rng.integers(0, len(ds), 5):
                    x, y = ds[int(i)]
                    np.testing.assert_array_equal(_as_npz_layout(x, info.dims), images[i])
                    assert int(y) == int(labels[i, 0])


def test_rebuild_is_skipped_and_force_rebuilds(real_store: Store, real_dir: Path) -> None:
    path = real_store.path("breast", 28)
    stamp = path.stat().st_mtime_ns
    real_store.build("breast", 28, source_dir=real_dir)
    assert path.stat().st_mtime_ns == stamp


def test_every_task_type_and_size(tmp_path: Path, synthetic: Synthetic) -> None:
    store = Store(tmp_path / "root", synthetic.manifest)
    for name, spec in SYNTHETIC_SPECS.items():
        for size in spec[-1]:
            store.build(name, size, source_dir=synthetic.source_dir, download=False)
    tasks = {t.task_id: t for t in list_tasks(store)}
    assert {"toychest:effusion", "toychest:hernia", "toychest"} <= set(tasks)
    assert tasks["toychest"].task_type == "multi-label" and tasks["toychest"].num_outputs == 4
    assert tasks["toychest:mass"].task_type == "binary" and tasks["toychest:mass"].num_outputs == 1
    assert tasks["toyclass"].num_outputs == 4 and tasks["toyvolume"].dims == 3

    chest = MedMNISTTask(store, "toychest", "train")
    raw = synthetic.arrays[("toychest", 28)]
    x, y = chest[3]
    assert x.shape == (1, 28, 28) and y.dtype == torch.float32 and y.shape == (4,)
    np.testing.assert_array_equal(y.numpy(), raw["train_labels"][3])
    mass = MedMNISTTask(store, "toychest:mass", "train")
    np.testing.assert_array_equal(mass.labels, raw["train_labels"][:, 1])

    big = MedMNISTTask(store, "toyclass", "val", size=64, in_memory=False)
    xb, yb = big.get_batch([7, 2, 7])
    assert xb.shape == (3, 3, 64, 64)
    np.testing.assert_array_equal(_as_npz_layout(xb[1], 2), synthetic.arrays[("toyclass", 64)]["val_images"][2])
    assert torch.equal(xb[0], xb[2]) and yb.tolist() == synthetic.arrays[("toyclass", 64)]["val_labels"][[7, 2, 7], 0].tolist()
    xd, yd = big.get_batch([7, 2, 7], device="cpu")  # a device is honoured, the values are the host path's
    assert torch.equal(xd, xb) and torch.equal(yd, yb)

    vol = MedMNISTTask(store, "toyvolume", "test", transform=lambda v: v.flip(-1))
    xv, _ = vol[1]
    assert xv.shape == (1, 28, 28, 28)
    np.testing.assert_array_equal(_as_npz_layout(xv.flip(-1), 3), synthetic.arrays[("toyvolume", 28)]["test_images"][1])

    with h5py.File(store.path("toyclass", 64), "r") as fh:
        assert fh["train/images"].chunks[0] == store_module.chunk_rows((64, 64, 3))
        assert fh.attrs["source_md5"] == synthetic.manifest["toyclass"].file(64).md5
        assert fh.attrs["manifest_version"] == "test" and "built_at" in fh.attrs
    with pytest.raises(ValueError, match="unknown task 'toychest:lung'"):
        find_task("toychest:lung", manifest=synthetic.manifest)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        MedMNISTTask(store, "toychest", "dev")
    with pytest.raises(StoreError, match="not built"):
        MedMNISTTask(Store(tmp_path / "empty", synthetic.manifest), "toyordinal")


def _corrupt(kind: str, syn: Synthetic) -> None:
    """Damage toybinary.npz in one of several ways; keep the manifest MD5 honest where needed."""
    path = syn.source_dir / "toybinary.npz"
    data = dict(np.load(path))
    if kind == "bad_md5":
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        path.write_bytes(bytes(blob))
        return
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return
    if kind == "missing_key":
        data.pop("val_labels")
    elif kind == "wrong_shape":
        data["train_images"] = data["train_images"][:, :20, :20].copy()
    np.savez_compressed(path, **data)
    # Re-point the manifest at the new file so the MD5 passes and content checks must catch it.
    import hashlib

    import yaml

    raw = yaml.safe_load(syn.manifest_path.read_text())
    raw["subsets"]["toybinary"]["files"][28]["md5"] = hashlib.md5(path.read_bytes()).hexdigest()
    syn.manifest_path.write_text(yaml.safe_dump(raw))


@pytest.mark.parametrize("kind, message", [
    ("bad_md5", "does not match the official"),
    ("truncated", "does not match the official"),
    ("missing_key", "missing array 'val_labels'"),
    ("wrong_shape", r"train_images has shape \(40, 20, 20\)"),
])
def test_bad_sources_are_refused_and_store_unchanged(tmp_path: Path, kind: str, message: str) -> None:
    syn = write_synthetic(tmp_path / "syn")
    good = Store(tmp_path / "root", syn.manifest)
    good.build("toybinary", 28, source_dir=syn.source_dir)
    before = good.path("toybinary", 28).read_bytes()
    _corrupt(kind, syn)
    from medmeta.data.manifest import load_manifest

    store = Store(tmp_path / "root", load_manifest(syn.manifest_path))
    with pytest.raises(SourceError, match=message) as err:
        store.build("toybinary", 28, source_dir=syn.source_dir, download=False, force=True)
    assert "toybinary.npz" in str(err.value)
    assert good.path("toybinary", 28).read_bytes() == before
    assert [p.name for p in good.store_dir.iterdir()] == ["toybinary_28.h5"]


def test_interrupted_build_leaves_nothing_visible(tmp_path: Path, synthetic: Synthetic, monkeypatch) -> None:
    store = Store(tmp_path / "root", synthetic.manifest)
    original = Store._copy_array
    calls = []

    def crash_after_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(Store, "_copy_array", staticmethod(crash_after_two))
    with pytest.raises(KeyboardInterrupt):
        store.build("toyclass", 28, source_dir=synthetic.source_dir)
    assert store.built() == [] and list(store.store_dir.iterdir()) == []
    # A temp file left by a process that died (a kill -9) is removed by the next build.
    from medmeta.files import _host

    stale = store.store_dir / f".toyclass_28.h5.{_host()}-999999999-1.tmp"
    stale.write_bytes(b"partial")
    monkeypatch.setattr(Store, "_copy_array", staticmethod(original))
    store.build("toyclass", 28, source_dir=synthetic.source_dir)
    assert not stale.exists() and store.built() == [("toyclass", 28)]
    store.verify("toyclass", 28)


def test_verify_detects_damaged_store(tmp_path: Path, synthetic: Synthetic) -> None:
    store = Store(tmp_path / "root", synthetic.manifest)
    store.build("toyordinal", 28, source_dir=synthetic.source_dir)
    store.verify("toyordinal", 28)
    with h5py.File(store.path("toyordinal", 28), "r+") as fh:
        fh["test/images"][4, 0, 0, 0] ^= 1
    with pytest.raises(StoreError, match="test/images content does not match"):
        store.verify("toyordinal", 28)


def _read_items(args: tuple[str, str, list[int]]) -> list[np.ndarray]:
    root, manifest_path, indices = args
    from medmeta.data.manifest import load_manifest

    ds = MedMNISTTask(Store(root, load_manifest(manifest_path)), "toyclass", "train", size=64, in_memory=False)
    return [ds[i][0].numpy() for i in indices]


def test_many_reader_processes(tmp_path: Path, synthetic: Synthetic) -> None:
    store = Store(tmp_path / "root", synthetic.manifest)
    store.build("toyclass", 64, source_dir=synthetic.source_dir)
    ds = MedMNISTTask(store, "toyclass", "train", size=64, in_memory=False)
    ds[0]  # open a handle in the parent before forking workers
    loader = DataLoader(ds, batch_size=8, num_workers=2, shuffle=False)
    xs = torch.cat([x for x, _ in loader])
    expected = torch.stack([ds[i][0] for i in range(len(ds))])
    assert torch.equal(xs, expected)
    with mp.get_context("spawn").Pool(3) as pool:
        parts = pool.map(_read_items, [(str(store.root), str(synthetic.manifest_path), [i, i + 20]) for i in range(3)])
    for i, (a, b) in enumerate(parts):
        np.testing.assert_array_equal(a, expected[i].numpy())
        np.testing.assert_array_equal(b, expected[i + 20].numpy())


def test_download_from_local_server(tmp_path: Path) -> None:
    served = tmp_path / "served"
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        syn = write_synthetic(tmp_path / "syn", url_base=f"http://127.0.0.1:{server.server_address[1]}/")
        served.mkdir()
        (served / "toyordinal.npz").write_bytes((syn.source_dir / "toyordinal.npz").read_bytes())
        store = Store(tmp_path / "root", syn.manifest)
        store.build("toyordinal", 28)
        assert (store.download_dir / "toyordinal.npz").is_file()
        store.verify("toyordinal", 28)
        # A server handing out a different file is refused and nothing enters the store.
        (served / "toybinary.npz").write_bytes((syn.source_dir / "toyclass.npz").read_bytes())
        with pytest.raises(SourceError, match="failed verification"):
            store.build("toybinary", 28)
        assert store.built() == [("toyordinal", 28)]
        with pytest.raises(SourceError, match="--source-dir"):
            store.build("toyvolume", 28)  # 404 on the server: says how to use local files
    finally:
        server.shutdown()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu.py checks it there too)")
def test_batches_converted_on_the_gpu_equal_the_host_path(tmp_path: Path, synthetic: Synthetic) -> None:
    store = Store(tmp_path / "root", synthetic.manifest)
    for name, size in (("toyclass", 64), ("toybinary", 28), ("toyvolume", 28)):
        store.build(name, size, source_dir=synthetic.source_dir, download=False)
    for task in (MedMNISTTask(store, "toyclass", "val", size=64), MedMNISTTask(store, "toybinary", "train"),
                 MedMNISTTask(store, "toyvolume", "test"),
                 MedMNISTTask(store, "toybinary", "train", transform=lambda v: v.flip(-1))):
        idx = np.arange(0, len(task), 2)
        x_gpu, y_gpu = task.get_batch(idx, "cuda")
        x, y = task.get_batch(idx)
        assert x_gpu.device.type == "cuda" and torch.equal(x_gpu.cpu(), x) and torch.equal(y_gpu.cpu(), y)
