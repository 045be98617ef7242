"""Episode samplers: counts, disjointness, remapping, balance, multi-label guarantee,
determinism (across processes and DataLoader workers), episode sets, errors, real data."""
from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch.utils.data import DataLoader

from medmeta.episodes import (BLOCK, Episode, EpisodeDataset, EpisodeSampler, EpisodeSpec, MultiTaskEpisodeSampler,
                              collate_episode, load_episode_set, materialise, save_episode_set)
from medmeta.episodes import loading as loading_module
from medmeta.episodes.sampling import _distinct
from medmeta.data.manifest import SPLITS, parse_manifest
from medmeta.data.store import Store
from medmeta.data.tasks import MedMNISTTask
from medmeta.data.transforms import unit_float

REPO = Path(__file__).resolve().parents[1]


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory, real_dir: Path) -> Store:
    """Retina (ordinal, 5 grades) and breast (binary) built from the official files."""
    store = Store(tmp_path_factory.mktemp("episodes_real"))
    for name in ("retina", "breast"):
        store.build(name, 28, source_dir=real_dir, download=False)
    return store


def _chest_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """Chest-like multi-label targets: prevalences from common to rare (like hernia)."""
    return (rng.random((n, 5)) < np.array([0.5, 0.2, 0.1, 0.05, 0.04])).astype(np.uint8)


def make_store(folder: Path, subsets: dict[str, tuple[str, list[str], int, dict[str, np.ndarray]]]) -> Store:
    """A store of synthetic 28px subsets: name -> (task type, label names, channels, labels per split)."""
    src = folder / "npz"
    src.mkdir(parents=True)
    raw = {}
    for i, (name, (task_type, names, channels, labels)) in enumerate(subsets.items()):
        rng = np.random.default_rng(i)
        arrays = {}
        for split in SPLITS:
            lab = np.asarray(labels[split], dtype=np.uint8)
            lab = lab[:, None] if lab.ndim == 1 else lab
            shape = (28, 28) if channels == 1 else (28, 28, 3)
            arrays[f"{split}_images"] = rng.integers(0, 256, (len(lab), *shape), dtype=np.uint8)
            arrays[f"{split}_labels"] = lab
        np.savez(src / f"{name}.npz", **arrays)
        md5 = hashlib.md5((src / f"{name}.npz").read_bytes()).hexdigest()
        raw[name] = {"short_name": name, "dims": 2, "channels": channels, "task_type": task_type,
                     "labels": names, "splits": {s: len(labels[s]) for s in SPLITS}, "modality": "synthetic",
                     "domain": name, "source_dataset": "generated", "license": "CC0", "citation": "none",
                     "files": {28: {"file": f"{name}.npz", "url": "http://127.0.0.1:9/x", "md5": md5}}}
    manifest = parse_manifest({"version": "test", "subsets": raw, "exclusion_groups": {}}, folder / "m.yaml")
    store = Store(folder / "root", manifest)
    for name in subsets:
        store.build(name, 28, source_dir=src, download=False)
    return store


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Store:
    rng = np.random.default_rng(7)
    chest = {s: _chest_labels(rng, n) for s, n in zip(SPLITS, (600, 200, 200))}
    # Label "x" has exactly 4 positives; "y" has 4 negatives, two of them x's positives 0 and 1,
    # "z" likewise with x's positives 2 and 3. With K=2, Q=2 a minimal support can hold all four
    # of x's positives (y's negatives 0, 1 and z's 2, 3), leaving none for the query (see the test).
    trap = np.zeros((40, 3), dtype=np.uint8)
    trap[:4, 0] = 1
    trap[:, 1:] = 1
    trap[[0, 1, 10, 11], 1] = 0
    trap[[2, 3, 12, 13], 2] = 0
    many = {s: np.arange(n) % 6 for s, n in zip(SPLITS, (300, 60, 60))}
    return make_store(tmp_path_factory.mktemp("episodes_synth"), {
        "chesty": ("multi-label", ["common", "mid", "low", "rare", "hernia"], 1, chest),
        "trap": ("multi-label", ["x", "y", "z"], 1, {s: trap for s in SPLITS}),
        "sixway": ("multi-class", [f"c{i}" for i in range(6)], 3, many),
    })


def _check_single_label(ep: Episode, ds: MedMNISTTask, k: int, q: int) -> None:
    n = len(ep.classes)
    assert list(ep.classes) == sorted(ep.classes)
    assert ep.support_y.tolist() == np.repeat(np.arange(n), k).tolist()
    assert ep.query_y.tolist() == np.repeat(np.arange(n), q).tolist()
    assert ep.support_y.dtype == ep.query_y.dtype == torch.int64
    both = np.concatenate([ep.support_indices, ep.query_indices])
    assert len(np.unique(both)) == len(both), "support and query must be disjoint and without repeats"
    orig = np.asarray(ep.classes)
    np.testing.assert_array_equal(ds.labels[ep.support_indices], orig[ep.support_y.numpy()])
    np.testing.assert_array_equal(ds.labels[ep.query_indices], orig[ep.query_y.numpy()])
    assert ep.label_map == {c: i for i, c in enumerate(ep.classes)}


def _same(a: Episode, b: Episode) -> None:
    assert a.spec == b.spec
    for f in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def _digest(specs) -> int:
    crc = 0
    for s in specs:
        crc = zlib.crc32(np.asarray(s.classes, dtype="<i8").tobytes(), crc)
        crc = zlib.crc32(np.asarray(s.indices, dtype="<i8").tobytes(), crc)
    return crc


# ---- the sampling itself -------------------------------------------------------------------------


def test_distinct_is_uniform_in_value_and_position() -> None:
    rng = np.random.default_rng(0)
    rows, n, m = 20000, 7, 4
    out = _distinct(rng, np.full(rows, n), m)
    assert all(len(set(r)) == m for r in out.tolist()) and out.min() >= 0 and out.max() < n
    expected = rows / n
    for pos in range(m):
        counts = np.bincount(out[:, pos], minlength=n)
        assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), counts
    full = _distinct(rng, np.array([5, 9, 12]), 5)  # n == m: a permutation
    assert sorted(full[0].tolist()) == list(range(5))


def test_every_class_exactly_k_support_and_q_query(real: Store) -> None:
    ds = MedMNISTTask(real, "retina", "train")
    k, q = 5, 10
    sampler = EpisodeSampler(ds, n_way=3, k_shot=k, n_query=q, n_episodes=150, seed=1)
    episodes = list(sampler.episodes())
    assert len(episodes) == 150 and [e.index for e in episodes] == list(range(150))
    for ep in episodes:
        _check_single_label(ep, ds, k, q)
        assert ep.support_x.shape == (3 * k, 3, 28, 28) and ep.query_x.shape == (3 * q, 3, 28, 28)
        assert ep.num_outputs == ep.n_way == 3 and ep.task_id == "retinamnist" and ep.split == "train"
    ep = episodes[17]
    x, _ = ds.get_batch(ep.support_indices)
    assert torch.equal(ep.support_x, x)
    assert torch.equal(ep.query_x, ds.get_batch(ep.query_indices)[0])


def test_classes_and_samples_drawn_evenly(real: Store) -> None:
    ds = MedMNISTTask(real, "retina", "train")
    n = 3000
    specs = list(EpisodeSampler(ds, n_way=2, k_shot=2, n_query=3, n_episodes=n, seed=3))
    counts = np.bincount([c for s in specs for c in s.classes], minlength=5)
    expected = n * 2 / 5
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), counts
    # Within the smallest class (66 images) every image is equally likely, in support and query.
    rare = np.flatnonzero(ds.labels == 4)
    sup = np.concatenate([s.support_indices for s in specs])
    qry = np.concatenate([s.query_indices for s in specs])
    for picked, per_episode in ((sup, 2), (qry, 3)):
        hits = np.array([(picked == i).sum() for i in rare])
        mean = counts[4] * per_episode / len(rare)
        assert np.all(np.abs(hits - mean) < 5 * np.sqrt(mean)), hits


def test_all_way_with_min_class_samples_real_ordinal(real: Store) -> None:
    ds = MedMNISTTask(real, "retina", "test")  # grade counts 174, 46, 92, 68, 20
    sampler = EpisodeSampler(ds, n_way="all", k_shot=5, n_query=10, n_episodes=20, min_class_samples=50)
    for ep in sampler.episodes():
        assert ep.classes == (0, 2, 3)
        _check_single_label(ep, ds, 5, 10)


def test_binary_real_k_negatives_and_k_positives(real: Store) -> None:
    ds = MedMNISTTask(real, "breast", "val")
    for ep in EpisodeSampler(ds, n_way=None, k_shot=4, n_query=6, n_episodes=30, seed=2).episodes():
        assert ep.classes == (0, 1) and ep.num_outputs == 1 and ep.n_way == 2
        assert ep.support_y.tolist() == [0] * 4 + [1] * 4
        np.testing.assert_array_equal(ds.labels[ep.support_indices], ep.support_y.numpy())
        np.testing.assert_array_equal(ds.labels[ep.query_indices], ep.query_y.numpy())
    assert EpisodeSampler(ds, n_way=2, k_shot=4, n_query=6).n_way == 2
    with pytest.raises(ValueError, match="binary task.*always 2-way"):
        EpisodeSampler(ds, n_way=5)


def test_multilabel_greedy_guarantee(synth: Store) -> None:
    ds = MedMNISTTask(synth, "chesty", "train")
    k, q = 3, 4
    n_labels = ds.labels.shape[1]
    for ep in EpisodeSampler(ds, k_shot=k, n_query=q, n_episodes=200, seed=5).episodes():
        assert ep.classes == tuple(range(n_labels)) and ep.num_outputs == n_labels
        assert ep.support_y.dtype == torch.float32 and ep.support_y.shape == (len(ep.support_indices), n_labels)
        assert not np.intersect1d(ep.support_indices, ep.query_indices).size
        for y, idx, need in ((ep.support_y, ep.support_indices, k), (ep.query_y, ep.query_indices, q)):
            np.testing.assert_array_equal(y.numpy(), ds.labels[idx])
            assert len(np.unique(idx)) == len(idx) <= 2 * need * n_labels
            pos = y.sum(0)
            assert (pos >= need).all() and (len(y) - pos >= need).all()


def test_multilabel_support_and_query_are_pruned_to_a_minimal_set(synth: Store) -> None:
    ds = MedMNISTTask(synth, "chesty", "train")
    k, q = 2, 3
    for ep in EpisodeSampler(ds, k_shot=k, n_query=q, n_episodes=100, seed=2).episodes():
        for y, need in ((ep.support_y.numpy(), k), (ep.query_y.numpy(), q)):
            pos, neg = y.sum(0), (1 - y).sum(0)
            assert (pos >= need).all() and (neg >= need).all()
            # No sample can go without some label falling below the guarantee.
            for row in y:
                assert ((pos - row) < need).any() or ((neg - (1 - row)) < need).any()


class _LabelsOnly:
    """A dataset with labels only: enough for samplers to draw episode specs."""

    def __init__(self, task_type: str, labels: np.ndarray) -> None:
        from medmeta.data.tasks import TaskDescription
        from medmeta.tasktype import TaskType

        names = tuple(f"label{i}" for i in range(labels.shape[1] if labels.ndim == 2 else labels.max() + 1))
        self.task = TaskDescription("fake", "fake", TaskType(task_type), names, "d", "m", 1, 28, 2)
        self.split, self.labels = "train", labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        raise NotImplementedError


def test_multilabel_episode_sizes_match_torchcross_on_chestxray14_prevalences() -> None:
    # ChestX-ray14 label prevalences; torchcross's greedy-then-remove sampling gives 5-shot supports
    # of about 44 images and 10-query sets of about 87 (without the removal pass: about 56 and 110).
    prevalence = np.array([.103, .025, .119, .177, .052, .056, .013, .047, .042, .021, .022, .015, .030, .002])
    labels = (np.random.default_rng(0).random((20000, 14)) < prevalence).astype(np.int64)
    specs = list(EpisodeSampler(_LabelsOnly("multi-label", labels), k_shot=5, n_query=10, n_episodes=200))
    support = np.mean([len(s.support_indices) for s in specs])
    query = np.mean([len(s.query_indices) for s in specs])
    assert 38 <= support <= 48 and 78 <= query <= 92, (support, query)


def test_multilabel_min_class_samples_keeps_labels_with_enough_of_both(synth: Store) -> None:
    ds = MedMNISTTask(synth, "chesty", "val")
    pos = ds.labels.sum(0)
    neg = len(ds.labels) - pos
    minimum = int(np.sort(np.minimum(pos, neg))[2])  # keeps the three best-served labels (ties aside)
    kept = np.flatnonzero(np.minimum(pos, neg) >= minimum)
    assert 0 < len(kept) < ds.labels.shape[1]
    sampler = EpisodeSampler(ds, k_shot=2, n_query=2, n_episodes=10, min_class_samples=minimum)
    assert sampler.dropped == tuple(ds.task.class_names[c] for c in range(5) if c not in kept)
    for ep in sampler.episodes():
        assert ep.classes == tuple(kept.tolist()) and ep.num_outputs == len(kept)
        np.testing.assert_array_equal(ep.support_y.numpy(), ds.labels[ep.support_indices][:, kept])
        np.testing.assert_array_equal(ep.query_y.numpy(), ds.labels[ep.query_indices][:, kept])
    with pytest.raises(ValueError, match="no label has min_class_samples=1000"):
        EpisodeSampler(ds, k_shot=1, n_query=1, min_class_samples=1000)


def test_multilabel_errors_name_the_label(synth: Store) -> None:
    ds = MedMNISTTask(synth, "chesty", "val")
    rare = int(ds.labels[:, 4].sum())
    with pytest.raises(ValueError, match=rf"label 4 \('hernia': {rare} positives"):
        EpisodeSampler(ds, k_shot=rare, n_query=1)
    with pytest.raises(ValueError, match="always use every label"):
        EpisodeSampler(ds, n_way=3, k_shot=1, n_query=1)
    # Even a minimal support may take more than K of a label (here all 4 positives of "x"): then the
    # query cannot be served, and the error says so rather than returning a short episode.
    trap = EpisodeSampler(MedMNISTTask(synth, "trap", "train"), k_shot=2, n_query=2, n_episodes=5 * BLOCK)
    with pytest.raises(ValueError, match=r"label \d \('[xyz]'\) has only \d (positives|negatives) left for the query"):
        list(trap)


# ---- reproducibility -------------------------------------------------------------------------


def test_episode_is_a_pure_function_of_its_index(real: Store) -> None:
    ds = MedMNISTTask(real, "retina", "train")
    long = EpisodeSampler(ds, 3, 2, 3, n_episodes=300, seed=9)
    short = EpisodeSampler(ds, 3, 2, 3, n_episodes=10, seed=9)
    assert list(short) == list(long)[:10]
    assert long.spec(250) == list(long)[250] and short.spec(250) == long.spec(250)
    short.set_epoch(2)
    assert [s.index for s in short] == list(range(20, 30)) and list(short)[0] == long.spec(20)
    assert list(EpisodeSampler(ds, 3, 2, 3, n_episodes=10, seed=10)) != list(long)[:10]
    _same(long.episode(123), list(long.episodes())[123])
    other_split = EpisodeSampler(MedMNISTTask(real, "retina", "test"), 3, 2, 3, n_episodes=10, seed=9)
    assert [s.support_indices.tolist() for s in other_split] != [s.support_indices.tolist() for s in short]


def test_episodes_are_those_of_earlier_versions(tmp_path: Path) -> None:
    """The draw is part of the reproducibility contract: this digest of 600 episodes on skewed
    class sizes was computed at commit e829fc3 (medmeta 0.2.0); a change to the sampling code
    that alters any episode fails here."""
    sizes = [16, 20, 35, 60, 100, 200]
    skewed = {s: np.repeat(np.arange(6), sizes)[np.random.default_rng(3).permutation(sum(sizes))] for s in SPLITS}
    store = make_store(tmp_path, {"skewed": ("multi-class", [f"c{i}" for i in range(6)], 1, skewed)})
    ds = MedMNISTTask(store, "skewed", "train")
    specs = list(EpisodeSampler(ds, 3, 5, 10, n_episodes=300, seed=4)) + list(
        MultiTaskEpisodeSampler([ds], None, 6, 10, n_episodes=300, seed=4, variable=True))
    assert _digest(specs) == 3752861233


_CHILD = """
import sys, zlib, numpy as np
from medmeta.data.store import Store
from medmeta.data.tasks import MedMNISTTask
from medmeta.episodes import EpisodeSampler, MultiTaskEpisodeSampler
store = Store(sys.argv[1])
retina, breast = MedMNISTTask(store, "retina", "train"), MedMNISTTask(store, "breast", "train")
crc = 0
for sampler in (EpisodeSampler(retina, 3, 5, 10, n_episodes=300, seed=4),
                MultiTaskEpisodeSampler([retina, breast], None, 10, 10, n_episodes=300, seed=4, variable=True)):
    for s in sampler:
        crc = zlib.crc32(np.asarray(s.classes, dtype="<i8").tobytes(), crc)
        crc = zlib.crc32(np.asarray(s.indices, dtype="<i8").tobytes(), crc)
print(crc)
"""


def test_identical_across_processes(real: Store) -> None:
    retina, breast = MedMNISTTask(real, "retina", "train"), MedMNISTTask(real, "breast", "train")
    here = _digest(list(EpisodeSampler(retina, 3, 5, 10, n_episodes=300, seed=4))
                   + list(MultiTaskEpisodeSampler([retina, breast], None, 10, 10, n_episodes=300, seed=4,
                                                  variable=True)))
    env = {"PYTHONPATH": str(REPO), "PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(real.root)], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == here


def test_dataloader_any_worker_count_gives_identical_episodes(real: Store) -> None:
    ds = MedMNISTTask(real, "retina", "val", transform=lambda img: img.flip(-1))
    sampler = EpisodeSampler(ds, n_way=3, k_shot=2, n_query=3, n_episodes=12, seed=6, min_class_samples=15)
    fast = list(sampler.episodes())
    x, _ = MedMNISTTask(real, "retina", "val").get_batch(fast[0].support_indices)
    assert torch.equal(fast[0].support_x, x.flip(-1)), "transform is applied per image"
    for workers in (0, 1, 2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pin_memory without an accelerator only warns
            loader = sampler.loader(num_workers=workers, pin_memory=True)
            got = list(loader)
        assert len(got) == len(loader) == 12
        for a, b in zip(got, fast, strict=True):
            _same(a, b)


def test_plain_batch_sampler_and_collate(real: Store) -> None:
    ds = MedMNISTTask(real, "retina", "train")
    sampler = EpisodeSampler(ds, 2, 3, 4, n_episodes=3, seed=0)
    for spec, (x, y) in zip(sampler, DataLoader(ds, batch_sampler=sampler), strict=True):
        assert x.shape == (14, 3, 28, 28)
        np.testing.assert_array_equal(y.numpy(), ds.labels[spec.indices])
    spec = sampler.spec(1)
    _same(collate_episode(EpisodeDataset(ds)[spec]), sampler.episode(1))
    with pytest.raises(ValueError, match="breastmnist/train"):
        EpisodeDataset(MedMNISTTask(real, "breast", "train"))[spec]


def test_hdf5_and_piecewise_reads_give_the_same_episodes(real: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    memory = MedMNISTTask(real, "retina", "train")
    disk = MedMNISTTask(real, "retina", "train", in_memory=False)
    sampler = EpisodeSampler(memory, 3, 5, 10, n_episodes=6, seed=8)
    reference = list(sampler.episodes())
    monkeypatch.setattr(loading_module, "CHUNK_BYTES", 5 * 4 * 3 * 28 * 28)  # 5 images per piece
    for got in (list(EpisodeSampler(disk, 3, 5, 10, n_episodes=6, seed=8).episodes()),
                list(sampler.episodes()), list(sampler.loader())):
        for a, b in zip(got, reference, strict=True):
            _same(a, b)
    meta = next(sampler.episodes(device="meta"))
    assert meta.query_x.device.type == "meta" and meta.query_x.shape == (30, 3, 28, 28)


def test_uint8_episodes_are_the_stored_pixels_and_convert_to_the_float_episodes(
        synth: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    rgb = MedMNISTTask(synth, "sixway", "train")
    grey = MedMNISTTask(synth, "chesty", "train", in_memory=False)
    for ds, n_way in ((rgb, 3), (grey, None)):
        sampler = EpisodeSampler(ds, n_way, 2, 3, n_episodes=40, seed=1)
        floats = list(sampler.episodes())
        for got in (list(sampler.episodes(dtype=torch.uint8)), list(sampler.loader(dtype=torch.uint8, num_workers=1)),
                    [sampler.episode(i, dtype=torch.uint8) for i in range(40)],
                    list(sampler.episode_set().episodes(ds, dtype=torch.uint8))):
            for a, b in zip(got, floats, strict=True):
                assert a.support_x.dtype == a.query_x.dtype == torch.uint8
                assert a.support_x.shape == b.support_x.shape and a.query_x.shape == b.query_x.shape
                assert torch.equal(a.query_x, ds.pixels(ds.raw_images(a.query_indices)))
                _same(a.as_float(), b)
        assert floats[0].as_float() is floats[0]
    # a piece smaller than one episode: the uint8 gather is split and joined like the float one
    monkeypatch.setattr(loading_module, "CHUNK_BYTES", 4 * 3 * 28 * 28)
    sampler = EpisodeSampler(rgb, 3, 2, 3, n_episodes=3, seed=1)
    for a, b in zip(sampler.episodes(dtype=torch.uint8), sampler.episodes(), strict=True):
        _same(a.as_float(), b)


def test_unit_float_is_the_correctly_rounded_division() -> None:
    pixels = torch.arange(256, dtype=torch.uint8)
    exact = torch.from_numpy((np.arange(256) / 255).astype(np.float32))  # float64 quotient, rounded once
    assert torch.equal(unit_float(pixels), exact)
    layout = pixels.view(4, 8, 8).permute(0, 2, 1)
    assert unit_float(layout).stride() == layout.stride(), "the memory layout is kept"
    with pytest.raises(TypeError, match="uint8"):
        unit_float(exact)


def test_uint8_episodes_refused_before_any_work(synth: Store) -> None:
    flips = torchvision.transforms.Compose([torchvision.transforms.RandomHorizontalFlip(),
                                            torchvision.transforms.RandomVerticalFlip()])  # a repr of 4 lines
    flipped = MedMNISTTask(synth, "sixway", "train", transform=flips)
    sampler = EpisodeSampler(flipped, 3, 2, 3, n_episodes=4)
    for refuse in (lambda: sampler.episodes(dtype=torch.uint8), lambda: sampler.loader(dtype=torch.uint8),
                   lambda: flipped.get_batch([0, 1], dtype=torch.uint8)):
        with pytest.raises(ValueError, match=r"sixway(/train)?: uint8 pixels are the stored images, but this dataset "
                                             r"has a transform \(Compose\), which takes float images") as error:
            refuse()
        assert "\n" not in str(error.value), "one line"
    plain = MedMNISTTask(synth, "sixway", "train")
    for bad in (torch.float64, torch.int64):
        with pytest.raises(ValueError, match=f"dtype must be torch.float32 .* or torch.uint8 .*got {bad}"):
            EpisodeSampler(plain, 3, 2, 3, n_episodes=4).episodes(dtype=bad)
        with pytest.raises(ValueError, match="dtype must be torch.float32"):
            plain.get_batch([0], dtype=bad)

    class Items(torch.utils.data.Dataset):
        """A dataset of (image, label) items only, as a user might write."""
        task, split, labels = plain.task, plain.split, plain.labels

        def __len__(self) -> int:
            return len(plain)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return plain[i]

    with pytest.raises(ValueError, match="sixway/train: Items has no get_batch.*read float32 episodes"):
        EpisodeSampler(Items(), 3, 2, 3, n_episodes=4).episodes(dtype=torch.uint8)
    _same(next(EpisodeSampler(Items(), 3, 2, 3, n_episodes=4).episodes()),
          next(EpisodeSampler(plain, 3, 2, 3, n_episodes=4).episodes()))


def test_device_and_pin(real: Store) -> None:
    ds = MedMNISTTask(real, "retina", "train")
    ep = next(EpisodeSampler(ds, 2, 1, 1, n_episodes=2).episodes(device="meta"))
    assert ep.support_x.device.type == "meta" and ep.query_y.device.type == "meta"
    cpu = next(EpisodeSampler(ds, 2, 1, 1, n_episodes=2).episodes())
    assert cpu.to("meta").support_x.device.type == "meta" and cpu.support_x.device.type == "cpu"
    if torch.cuda.is_available():
        assert cpu.pin_memory().support_x.is_pinned()


# ---- episode sets ----------------------------------------------------------------------------


def test_episode_set_roundtrip_and_mismatch(real: Store, tmp_path: Path) -> None:
    ds = MedMNISTTask(real, "retina", "test")
    sampler = EpisodeSampler(ds, None, 5, 10, n_episodes=25, seed=11, min_class_samples=50)
    path = save_episode_set(tmp_path / "sets" / "retina_test.json", sampler)
    loaded = load_episode_set(path)
    assert loaded == sampler.episode_set() and len(loaded) == 25
    assert loaded.sampler == {"n_way": 3, "k_shot": 5, "n_query": 10, "min_class_samples": 50}
    for a, b in zip(loaded.episodes(ds), sampler.episodes(), strict=True):
        _same(a, b)
    for a, b in zip(loaded.loader(ds, num_workers=1), sampler.episodes(), strict=True):
        _same(a, b)
    assert not list(tmp_path.glob("sets/.*tmp"))
    with pytest.raises(ValueError, match="split 'val'"):
        loaded.check(MedMNISTTask(real, "retina", "val"))
    with pytest.raises(ValueError, match="task 'breastmnist'"):
        list(loaded.episodes(MedMNISTTask(real, "breast", "test")))
    with pytest.raises(ValueError, match="size 28"):
        dataclasses.replace(loaded, size=224).check(ds)
    with pytest.raises(ValueError, match="labels differing"):
        dataclasses.replace(loaded, labels_crc32=loaded.labels_crc32 + 1).check(ds)
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a medmeta episode set"):
        load_episode_set(tmp_path / "bad.json")


# ---- several tasks, union of splits ----------------------------------------------------------------


def test_multi_task_weights_and_variable_episodes(real: Store, synth: Store) -> None:
    retina, breast = MedMNISTTask(real, "retina", "train"), MedMNISTTask(real, "breast", "train")
    six = MedMNISTTask(synth, "sixway", "train")
    datasets = [retina, breast, six]
    n = 2000
    for weights, p in (("proportional", np.array([1080, 546, 300]) / 1926), ("uniform", np.full(3, 1 / 3)),
                       ([0.0, 1.0, 3.0], np.array([0, 0.25, 0.75]))):
        specs = list(MultiTaskEpisodeSampler(datasets, 3, 2, 2, n_episodes=n, seed=1, weights=weights))
        freq = np.array([sum(s.task_id == d.task.task_id for s in specs) for d in datasets])
        assert np.all(np.abs(freq - n * p) <= 5 * np.sqrt(n * p * (1 - p)) + 1e-9), (weights, freq)
        assert all(len(s.classes) == (2 if s.task_id == "breastmnist" else 3) for s in specs)
    sampler = MultiTaskEpisodeSampler(datasets, None, 10, 5, n_episodes=400, seed=2, weights="uniform",
                                      variable=True)
    ways, shots = set(), set()
    episodes = list(sampler.episodes())
    for ep in episodes:
        ds = next(d for d in datasets if d.task.task_id == ep.task_id)
        k = len(ep.support_indices) // len(ep.classes)
        _check_single_label(ep, ds, k, 5)
        ways.add((ep.task_id, len(ep.classes)))
        shots.add(k)
    assert shots == set(range(1, 11))
    assert {w for t, w in ways if t == "sixway"} == {2, 3, 4, 5, 6}
    assert {w for t, w in ways if t == "breastmnist"} == {2}
    for a, b in zip(episodes[:8], sampler.loader(num_workers=2), strict=False):
        _same(a, b)
    assert list(MultiTaskEpisodeSampler(datasets, None, 10, 5, n_episodes=400, seed=2, weights="uniform",
                                        variable=True)) == list(sampler)
    with pytest.raises(ValueError, match="n_way=4 but retinamnist/train has only 2 eligible classes with at least 200"):
        MultiTaskEpisodeSampler([retina], 4, 5, 10, min_class_samples=200)
    with pytest.raises(ValueError, match="weights must be 3"):
        MultiTaskEpisodeSampler(datasets, weights=[1, 2])
    with pytest.raises(ValueError, match="appear once"):
        MultiTaskEpisodeSampler([retina, retina])


def test_split_all_draws_from_the_whole_dataset(real: Store) -> None:
    parts = [MedMNISTTask(real, "retina", s) for s in SPLITS]
    whole = MedMNISTTask(real, "retina", "all", in_memory=False)
    assert len(whole) == 1600 and whole.split == "all"
    idx = np.array([1599, 0, 1100, 1079, 1200])
    x, y = whole.get_batch(idx)
    assert torch.equal(x[0], parts[2][399][0]) and torch.equal(x[3], parts[0][1079][0])
    assert torch.equal(x[2], whole[1100][0]) and y.tolist() == whole.labels[idx].tolist()
    episodes = list(EpisodeSampler(whole, None, 5, 10, n_episodes=10, min_class_samples=50).episodes())
    assert episodes[0].classes == (0, 1, 2, 3, 4) and episodes[0].split == "all"
    for ep in episodes:
        _check_single_label(ep, whole, 5, 10)


# ---- bad input ---------------------------------------------------------------------------------


def test_clear_errors(real: Store, synth: Store) -> None:
    val = MedMNISTTask(real, "retina", "val")  # grade counts 54, 12, 28, 20, 6
    with pytest.raises(ValueError, match=r"class 1 .* has 12; class 4 .* has 6 samples, fewer than k_shot \+ "
                                         r"n_query = 15.*min_class_samples=15"):
        EpisodeSampler(val, 3, 5, 10)
    with pytest.raises(ValueError, match="n_way=6 but retinamnist/train has only 5 eligible classes"):
        EpisodeSampler(MedMNISTTask(real, "retina", "train"), 6, 5, 10)
    with pytest.raises(ValueError, match="n_way=4 but retinamnist/val has only 3 eligible classes with at least 15"):
        EpisodeSampler(val, 4, 5, 10, min_class_samples=15)
    for bad in ({"k_shot": 0}, {"n_query": 0}, {"k_shot": 2.5}, {"n_way": 1}, {"seed": -1}, {"n_episodes": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EpisodeSampler(MedMNISTTask(real, "retina", "train"), **{"n_way": 2, "k_shot": 1, "n_query": 1, **bad})
    with pytest.raises(ValueError, match="unknown task 'retina:nothing'"):
        MedMNISTTask(real, "retina:nothing", "train")
    with pytest.raises(ValueError, match="unknown subset 'nosuch'"):
        MedMNISTTask(real, "nosuch", "train")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        MedMNISTTask(real, "retina", "dev")
    renamed = MedMNISTTask(synth, "sixway", "train")
    renamed.split = "dev"
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        EpisodeSampler(renamed, 2, 1, 1)
    spec = EpisodeSampler(MedMNISTTask(real, "retina", "train"), 2, 1, 1).spec(0)
    with pytest.raises(ValueError, match="retinamnist/train, but the datasets given are"):
        list(materialise(val, [spec]))
    grade4 = np.flatnonzero(val.labels == 4)[:2]
    forged = EpisodeSpec("retinamnist", "val", 0, 0, (0, 1), np.array([0, 1]), grade4)
    with pytest.raises(ValueError, match="not one of its episode's classes"):
        list(materialise(val, [forged]))
