"""MedIMeta's own datasets: a generated folder in MedIMeta's layout read as tasks, ingested into the
store, refused in one line when damaged, left out whole by the leave-one-out rule, and run end to
end through experiments/cdfsl.py.

Expected values come from this file's own reading of the layout (reference.md section 8, the
``medimeta`` package's documented behaviour): split ``s`` is the images ``splits/s.txt`` names,
in increasing index order; a label is the position of its stored value among the task's label
values in ``info.yaml``.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from medmeta.cli import main as medmeta_main
from medmeta.data.manifest import load_manifest
from medmeta.data.medimeta import area_resize
from medmeta.data.store import Store
from medmeta.data.tasks import MedMNISTTask, find_task
from medmeta.episodes import EpisodeSampler
from medmeta.errors import ConfigError, StoreError
from medmeta.evaluation.protocol import resolve_sources
from medmeta.evaluation.sweep import Sweep
from medmeta.tasktype import TaskType

from .conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import cdfsl  # noqa: E402

SPLITS = ("train", "val", "test")
SIZE = 32
"""Native image size of the generated datasets (MedIMeta's is 224; the layout takes any)."""

DATASETS = {
    # id: (name, domain, channels, images, tasks, domain_overlaps); tasks: (task_name, task_target, labels)
    "cxr": ("Chest X-ray", "Chest X-ray", 1, 90, [
        ("disease labels", "MULTILABEL_CLASSIFICATION", {0: "Atelectasis", 1: "Effusion", 2: "Mass", 3: "Hernia"}),
        ("patient sex", "BINARY_CLASSIFICATION", {0: "F", 1: "M"})], []),
    "dr_regular": ("Diabetic Retinopathy", "Retinal fundus", 3, 100, [
        ("DR level", "ORDINAL_REGRESSION", {0: "grade 0", 1: "grade 1", 2: "grade 2", 3: "grade 3", 4: "grade 4"}),
        ("Artifact", "ORDINAL_REGRESSION", {0: "none", 1: "outside", 4: "a quarter", 6: "half"}),
        ("Overall quality", "BINARY_CLASSIFICATION", {0: "not good enough", 1: "good enough"})], ["glaucoma"]),
    "pbc": ("Blood cells", "Microscopy", 3, 80, [
        ("cell class", "MULTICLASS_CLASSIFICATION", {0: "basophil", 1: "eosinophil", 2: "lymphocyte", 3: "monocyte"})],
        ["aml"]),
    "aml": ("AML cytomorphology", "Microscopy", 1, 70, [
        ("morphological class", "MULTICLASS_CLASSIFICATION", {0: "blast", 1: "myelocyte", 2: "neutrophil"})], ["pbc"]),
}
TASK_NAMES = {"cxr:disease_labels", "cxr:patient_sex", "dr_regular:dr_level", "dr_regular:artifact",
              "dr_regular:overall_quality", "pbc:cell_class", "aml:morphological_class"}


@dataclass
class Written:
    """What the generator wrote for one dataset: the arrays as stored in its files."""

    folder: Path
    images: np.ndarray
    labels: dict[str, np.ndarray]
    """Per task_name, the values written to task_labels/<task_name>.npy."""
    values: dict[str, list[int]]
    """Per task_name, info.yaml's label values in the order written."""


def write_medimeta(root: Path, datasets: dict = DATASETS, size: int = SIZE, seed: int = 0) -> dict[str, Written]:
    """A MedIMeta data path: per dataset info.yaml, images.hdf5, task_labels/*.npy and split files
    whose lines are in random order, every split holding a random share of the images."""
    rng = np.random.default_rng(seed)
    out = {}
    for dataset_id, (name, domain, channels, n, tasks, overlaps) in datasets.items():
        folder = root / dataset_id
        (folder / "task_labels").mkdir(parents=True)
        (folder / "splits").mkdir()
        shape = (n, size, size) if channels == 1 else (n, size, size, channels)
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        with h5py.File(folder / "images.hdf5", "w") as fh:
            fh.create_dataset("images", data=images)
        labels, values = {}, {}
        for task_name, target, names in tasks:
            keys = list(names)
            if target == "MULTILABEL_CLASSIFICATION":
                raw = (rng.random((n, len(keys))) < 0.4).astype(np.int64)
            else:
                raw = np.array(keys * (n // len(keys) + 1))[:n][rng.permutation(n)].astype(np.int64)
            np.save(folder / "task_labels" / f"{task_name}.npy", raw)
            labels[task_name], values[task_name] = raw, keys
        order = rng.permutation(n)
        counts = {"train": n // 2, "val": n // 5, "test": n - n // 2 - n // 5}
        start = 0
        for split in SPLITS:
            part = order[start:start + counts[split]]
            start += counts[split]
            (folder / "splits" / f"{split}.txt").write_text("\n".join(f"images/{i:06d}.tiff" for i in part))
        info = {"id": dataset_id, "name": name, "domain": domain,
                "tasks": [{"task_name": t, "task_target": target, "labels": dict(names)} for t, target, names in tasks],
                "input_size": [channels, size, size], "total_num_samples": n, "splits_num_samples": counts,
                "original_splits_num_samples": {"train": n - counts["test"], "val": 0, "test": counts["test"]},
                "domain_overlaps": overlaps, "subject_overlaps": []}
        (folder / "info.yaml").write_text(yaml.safe_dump(info, sort_keys=False))
        out[dataset_id] = Written(folder, images, labels, values)
    return out


def split_indices(folder: Path, split: str) -> np.ndarray:
    """This test's reading of a split file: the number in each line, sorted."""
    lines = (folder / "splits" / f"{split}.txt").read_text().split()
    return np.sort([int(line.split("/")[-1].split(".")[0]) for line in lines])


def expected_labels(written: Written, task_name: str, indices: np.ndarray) -> np.ndarray:
    """This test's reading of a labels file: class = position of the value among the sorted label values."""
    raw = written.labels[task_name][indices]
    if raw.ndim == 2:
        return raw
    order = sorted(written.values[task_name])
    return np.array([order.index(int(v)) for v in raw])


@pytest.fixture
def medimeta(tmp_path: Path, monkeypatch) -> tuple[Path, dict[str, Written]]:
    for env in ("MEDMETA_MANIFEST", "MEDMETA_SOURCE_DIR", "MEDMETA_ROOT"):
        monkeypatch.delenv(env, raising=False)
    folder = tmp_path / "medimeta"
    return folder, write_medimeta(folder)


def supersampled_area(images: np.ndarray, size: int) -> np.ndarray:
    """Area interpolation computed another way: repeat every pixel ``size // gcd`` times along each
    axis, so that each output pixel covers whole sub-pixels, and take their mean (rounded half up)."""
    n = images.shape[1]
    up = size // np.gcd(n, size)
    fine = np.repeat(np.repeat(images.astype(np.float64), up, axis=1), up, axis=2)
    block = fine.shape[1] // size
    shape = (len(images), size, block, size, block, *images.shape[3:])
    return np.floor(fine.reshape(shape).mean(axis=(2, 4)) + 0.5).astype(np.uint8)


def prepare(folder: Path, root: Path, *args: str) -> int:
    return medmeta_main(["prepare", "--medimeta", str(folder), "--root", str(root), *args])


# --- the layout as tasks ----------------------------------------------------------------------------


def test_the_layout_becomes_one_subset_per_dataset_and_task(medimeta) -> None:
    folder, written = medimeta
    manifest = load_manifest(folder)
    tasks = {name: info for name, info in manifest.subsets.items() if info.medimeta is not None}
    assert set(tasks) == TASK_NAMES
    assert {name: str(info.task_type) for name, info in tasks.items()} == {
        "cxr:disease_labels": "multi-label", "cxr:patient_sex": "binary", "dr_regular:dr_level": "ordinal",
        "dr_regular:artifact": "ordinal", "dr_regular:overall_quality": "binary", "pbc:cell_class": "multi-class",
        "aml:morphological_class": "multi-class"}
    assert tasks["dr_regular:artifact"].labels == ("none", "outside", "a quarter", "half")
    assert tasks["cxr:disease_labels"].labels == ("Atelectasis", "Effusion", "Mass", "Hernia")
    assert (tasks["cxr:patient_sex"].channels, tasks["pbc:cell_class"].channels) == (1, 3)
    assert tasks["pbc:cell_class"].domain == "Microscopy" and tasks["cxr:patient_sex"].dims == 2
    assert tasks["dr_regular:dr_level"].sizes == (28, SIZE)
    for name, info in tasks.items():
        dataset = name.split(":")[0]
        assert dict(info.splits) == {s: len(split_indices(written[dataset].folder, s)) for s in SPLITS}
        assert info.stem == f"medimeta-{dataset}"
    # Names as MedIMeta writes them resolve too; a task is found whole, a multi-label one by label as well.
    assert manifest.resolve("dr_regular:DR level") == "dr_regular:dr_level"
    assert find_task("cxr:Patient Sex", 28, manifest).task_type == TaskType.BINARY
    assert find_task("cxr:disease_labels:Effusion", 28, manifest).label_column == 1
    assert find_task("chest:effusion", 28, manifest).task_id == "chestmnist:effusion"


# --- ingest --------------------------------------------------------------------------------------------


def test_prepare_builds_verified_files_holding_the_layouts_splits_and_labels(medimeta, tmp_path: Path,
                                                                            capsys) -> None:
    folder, written = medimeta
    root = tmp_path / "root"
    assert prepare(folder, root) == 0
    assert prepare(folder, root, "--size", "28", "cxr", "dr_regular:dr_level", "pbc", "aml") == 0
    out = capsys.readouterr().out
    assert "built: dr_regular 32px" in out and "(tasks dr_regular:dr_level, dr_regular:artifact" in out
    store = Store(root, load_manifest(folder))
    assert sorted(p.name for p in store.store_dir.iterdir()) == sorted(
        f"medimeta-{d}_{s}.h5" for d in DATASETS for s in (28, SIZE))
    for name in TASK_NAMES:
        dataset = name.split(":")[0]
        w = written[dataset]
        task_name = next(t for t, _, _ in DATASETS[dataset][4] if name.endswith(":" + t.lower().replace(" ", "_")))
        for split in (*SPLITS, "all"):
            parts = SPLITS if split == "all" else (split,)
            indices = np.concatenate([split_indices(w.folder, s) for s in parts])
            for size in (SIZE, 28):
                task = MedMNISTTask(store, name, split, size=size)
                np.testing.assert_array_equal(task.labels, expected_labels(w, task_name, indices).squeeze())
                images = w.images[indices] if size == SIZE else supersampled_area(w.images[indices], 28)
                np.testing.assert_array_equal(task.raw_images(np.arange(len(task))), images)
    with h5py.File(store.path("cxr:patient_sex", 28), "r") as fh:
        for name in ("train/images", "test/labels/patient_sex", "val/labels/disease_labels"):
            assert fh[name].fletcher32 and fh[name].chunks is not None, name
        labels = fh["val/labels/disease_labels"]
        assert labels.attrs["md5"] == hashlib.md5(labels[()].tobytes()).hexdigest()
    assert medmeta_main(["verify", "--medimeta", str(folder), "--root", str(root)]) == 0
    # Built files are skipped; --force builds again.
    stamp = store.path("pbc:cell_class", 28).stat().st_mtime_ns
    assert prepare(folder, root, "pbc", "--size", "28") == 0
    assert "already built: pbc 28px" in capsys.readouterr().out
    assert store.path("pbc:cell_class", 28).stat().st_mtime_ns == stamp
    assert prepare(folder, root, "pbc", "--size", "28", "--force") == 0
    assert store.path("pbc:cell_class", 28).stat().st_mtime_ns != stamp
    # A labels file changed since the build: the file is not taken as built.
    aml = written["aml"]
    np.save(aml.folder / "task_labels" / "morphological class.npy", aml.labels["morphological class"][::-1])
    assert not Store(root, load_manifest(folder)).is_built("aml:morphological_class", 28)


def test_area_resize_is_the_mean_of_the_area_each_pixel_covers() -> None:
    rng = np.random.default_rng(1)
    for shape, size in (((5, 32, 32), 28), ((3, 64, 64, 3), 28), ((2, 224, 224), 128), ((2, 56, 56, 3), 28)):
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        np.testing.assert_array_equal(area_resize(images, size), supersampled_area(images, size))
    flat = np.full((1, 32, 32), 7, dtype=np.uint8)
    assert (area_resize(flat, 28) == 7).all()
    with pytest.raises(AssertionError):  # the check fails for another interpolation (every other pixel)
        np.testing.assert_array_equal(images[:, ::2, ::2], supersampled_area(images, 28))


def _damage(folder: Path, case: str) -> tuple[str, str]:
    """Damage one dataset of a generated folder; the dataset to prepare and the expected message."""
    if case == "missing images":
        (folder / "pbc" / "images.hdf5").unlink()
        return "pbc", r"pbc/images\.hdf5 is missing: dataset pbc has no images"
    if case == "missing labels":
        (folder / "dr_regular" / "task_labels" / "Artifact.npy").unlink()
        return "dr_regular", r"Artifact\.npy is missing: the labels of task 'Artifact' of dr_regular"
    if case == "missing split":
        (folder / "cxr" / "splits" / "val.txt").unlink()
        return "cxr", r"cxr/splits/val\.txt is missing"
    if case == "label count":
        path = folder / "pbc" / "task_labels" / "cell class.npy"
        np.save(path, np.load(path)[:-1])
        return "pbc", r"cell class\.npy: 79 labels for the 80 images of images\.hdf5"
    if case == "split index out of range":
        path = folder / "pbc" / "splits" / "test.txt"
        path.write_text(path.read_text() + "\nimages/000080.tiff")
        return "pbc", r"pbc/splits/test\.txt line 25: 'images/000080\.tiff' is image 80, but images\.hdf5 holds 80 images"
    if case == "dataset id":
        path = folder / "aml" / "info.yaml"
        path.write_text(path.read_text().replace("id: aml", "id: aml_v2"))
        return "aml", r"aml/info\.yaml: id 'aml_v2' does not match its folder's name 'aml'"
    if case == "label value":
        path = folder / "dr_regular" / "task_labels" / "Artifact.npy"
        labels = np.load(path)
        labels[3] = 5
        np.save(path, labels)
        return "dr_regular", r"Artifact\.npy: image 3 has label 5, which is not one of task 'Artifact''s label values"
    if case == "image twice":
        train = (folder / "cxr" / "splits" / "train.txt").read_text().split()
        path = folder / "cxr" / "splits" / "test.txt"
        path.write_text(path.read_text() + "\n" + train[0])
        return "cxr", r"cxr/splits/test\.txt line 28: image \d+ is listed twice \(also in splits/train\.txt\)"
    if case == "image shape":
        with h5py.File(folder / "aml" / "images.hdf5", "w") as fh:
            fh.create_dataset("images", data=np.zeros((70, SIZE, SIZE, 3), np.uint8))
        return "aml", r"aml/images\.hdf5: images are shaped \(32, 32, 3\), but info\.yaml's input_size \[1, 32, 32\]"
    raise AssertionError(case)


DAMAGE = ("missing images", "missing labels", "missing split", "label count", "split index out of range",
          "dataset id", "label value", "image twice", "image shape")


@pytest.mark.parametrize("in_place", [False, True], ids=["copy", "in-place"])
@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_dataset_is_one_line_and_no_store_file(medimeta, tmp_path: Path, capsys, case: str,
                                                         in_place: bool) -> None:
    folder, _ = medimeta
    dataset, message = _damage(folder, case)
    root = tmp_path / "root"
    assert prepare(folder, root, dataset, *(["--in-place"] if in_place else ["--size", "28"])) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (root / "store").exists() or list((root / "store").iterdir()) == []


def test_a_refused_rebuild_keeps_the_file_built_before(medimeta, tmp_path: Path, capsys) -> None:
    folder, _ = medimeta
    root = tmp_path / "root"
    assert prepare(folder, root, "pbc", "--size", "28") == 0
    path = root / "store" / "medimeta-pbc_28.h5"
    before = path.read_bytes()
    _damage(folder, "label count")
    assert prepare(folder, root, "pbc", "--size", "28", "--force") == 2
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == [path.name]


# --- in place ---------------------------------------------------------------------------------------------


def in_place_files(store: Store, dataset: str) -> tuple[Path, list[str]]:
    """A dataset's store file at its own size, and the images.hdf5 each split's images read (none: copied)."""
    path = store.store_dir / f"medimeta-{dataset}_{SIZE}.h5"
    with h5py.File(path, "r") as fh:
        return path, [fh[f"{s}/images"].virtual_sources()[0].file_name if fh[f"{s}/images"].is_virtual else ""
                      for s in SPLITS]


def test_in_place_gives_the_tasks_a_copy_gives_without_copying_the_images(medimeta, tmp_path: Path, capsys) -> None:
    folder, written = medimeta
    assert prepare(folder, tmp_path / "copy") == 0
    assert prepare(folder, tmp_path / "in_place", "--in-place") == 0
    out = capsys.readouterr().out
    assert f"built: pbc {SIZE}px -> {tmp_path / 'in_place' / 'store' / f'medimeta-pbc_{SIZE}.h5'}, reading " \
           f"{folder.resolve() / 'pbc' / 'images.hdf5'} in place (tasks pbc:cell_class)" in out
    manifest = load_manifest(folder)
    copy, in_place = Store(tmp_path / "copy", manifest), Store(tmp_path / "in_place", manifest)
    for dataset in DATASETS:
        path, sources = in_place_files(in_place, dataset)
        assert sources == [str(folder.resolve() / dataset / "images.hdf5")] * 3
        assert in_place_files(copy, dataset)[1] == ["", "", ""]
        copied = copy.store_dir / path.name
        assert path.stat().st_size * 4 < copied.stat().st_size, (path.stat().st_size, copied.stat().st_size)
        with h5py.File(path, "r") as a, h5py.File(copied, "r") as b:  # the same bytes, read another way
            names = [n for n in sorted(_datasets(b)) if n.endswith("images") or "/labels" in n]
            assert names and sorted(_datasets(a)) == sorted(_datasets(b))
            assert all(a[n].attrs["md5"] == b[n].attrs["md5"] for n in names)
    for name in sorted(TASK_NAMES):
        dataset = name.split(":")[0]
        for split in (*SPLITS, "all"):
            indices = np.concatenate([split_indices(written[dataset].folder, s)
                                      for s in (SPLITS if split == "all" else (split,))])
            want = MedMNISTTask(copy, name, split, size=SIZE)
            for in_memory in (True, False):
                task = MedMNISTTask(in_place, name, split, size=SIZE, in_memory=in_memory)
                assert task.in_memory == in_memory and len(task) == len(want) == len(indices)
                np.testing.assert_array_equal(task.labels, want.labels)
                rows = np.random.default_rng(0).permutation(len(task))
                np.testing.assert_array_equal(task.raw_images(rows), written[dataset].images[indices[rows]])
            worker = pickle.loads(pickle.dumps(task))  # a DataLoader worker opens the file again
            np.testing.assert_array_equal(worker.raw_images(rows[:5]), want.raw_images(rows[:5]))
    for name in ("cxr:disease_labels", "dr_regular:artifact"):
        episodes = [EpisodeSampler(MedMNISTTask(store, name, "all", size=SIZE), n_way="all", k_shot=2, n_query=3,
                                   n_episodes=3, seed=0, min_class_samples=5) for store in (copy, in_place)]
        for i in range(3):
            a, b = (sampler.episode(i) for sampler in episodes)
            assert a.classes == b.classes
            for x, y in ((a.support_x, b.support_x), (a.support_y, b.support_y), (a.query_x, b.query_x)):
                assert torch.equal(x, y)
    assert medmeta_main(["verify", "--medimeta", str(folder), "--root", str(tmp_path / "in_place")]) == 0
    # A file built in place stays so: skipped, rebuilt (--force) or built by the protocol; --in-place
    # turns a copy into one.
    path, _ = in_place_files(in_place, "pbc")
    stamp = path.stat().st_mtime_ns
    assert prepare(folder, tmp_path / "in_place", "pbc") == 0 and in_place.build("pbc:cell_class", SIZE) == path
    assert path.stat().st_mtime_ns == stamp and "already built: pbc 32px" in capsys.readouterr().out
    assert prepare(folder, tmp_path / "in_place", "pbc", "--force") == 0 and in_place_files(in_place, "pbc")[1][0]
    assert path.stat().st_mtime_ns != stamp
    assert prepare(folder, tmp_path / "copy", "pbc", "--in-place") == 0
    assert "built: pbc 32px" in capsys.readouterr().out and in_place_files(copy, "pbc")[1][0]


def _datasets(fh: h5py.File) -> list[str]:
    names: list[str] = []
    fh.visititems(lambda name, node: names.append(name) if isinstance(node, h5py.Dataset) else None)
    return names


def test_in_place_at_a_smaller_size_is_a_resized_copy_and_says_so(medimeta, tmp_path: Path, capsys) -> None:
    folder, written = medimeta
    root = tmp_path / "root"
    assert prepare(folder, root, "aml", "--in-place", "--size", "28", "--size", str(SIZE)) == 0
    out = capsys.readouterr().out
    assert "built: aml 28px" in out and ", a resized copy (--in-place reads images.hdf5 at its own 32px)" in out
    assert f"built: aml {SIZE}px" in out and "aml/images.hdf5 in place" in out
    store = Store(root, load_manifest(folder))
    with h5py.File(store.path("aml:morphological_class", 28), "r") as fh:
        assert not fh["train/images"].is_virtual
    task = MedMNISTTask(store, "aml:morphological_class", "test", size=28)
    images = written["aml"].images[split_indices(written["aml"].folder, "test")]
    np.testing.assert_array_equal(task.raw_images(np.arange(len(task))), supersampled_area(images, 28))
    assert medmeta_main(["info", "--medimeta", str(folder), "--root", str(root)]) == 0
    assert "built at 28, 32px (32px reading images.hdf5 in place)" in capsys.readouterr().out
    # MedMNIST's npz files are copied: --in-place without --medimeta is refused.
    assert medmeta_main(["prepare", "retina", "--in-place", "--root", str(root)]) == 2
    assert "--in-place reads MedIMeta datasets' images.hdf5 where they are" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="only a MedIMeta dataset's images.hdf5 is read in place"):
        store.build("retina", 28, in_place=True)


def _change_images(path: Path, case: str) -> None:
    """Change a dataset's images.hdf5 after an in-place build: replaced by another version (more
    images), one pixel written in place (same size, later time), or removed."""
    time.sleep(0.02)  # past the filesystem's timestamp granularity
    if case == "replaced":
        with h5py.File(path, "r") as fh:
            images = fh["images"][()]
        with h5py.File(path, "w") as fh:
            fh.create_dataset("images", data=np.concatenate([images, images[:1]]))
    elif case == "modified":
        size = path.stat().st_size
        with h5py.File(path, "r+") as fh:
            fh["images"][3, 0, 0] = 255 - fh["images"][3, 0, 0]
        assert path.stat().st_size == size
    else:
        path.unlink()


@pytest.mark.parametrize("case", ["replaced", "modified", "missing"])
def test_an_in_place_file_whose_images_hdf5_changed_is_refused_in_one_line(medimeta, tmp_path: Path, capsys,
                                                                             case: str) -> None:
    folder, written = medimeta
    root = tmp_path / "root"
    assert prepare(folder, root, "pbc", "--in-place") == 0
    store = Store(root, load_manifest(folder))
    source = folder.resolve() / "pbc" / "images.hdf5"
    assert len(MedMNISTTask(store, "pbc:cell_class", "train", size=SIZE)) == 40
    _change_images(source, case)
    what = "is missing" if case == "missing" else "changed since this store file was built to read it in place"
    fix = f"rebuild it with `medmeta prepare --medimeta {folder.resolve()} pbc --size {SIZE} --force`"
    for in_memory in (True, False):
        with pytest.raises(StoreError) as refused:
            MedMNISTTask(store, "pbc:cell_class", "train", size=SIZE, in_memory=in_memory)
        line = str(refused.value)
        assert "\n" not in line and f"{source} {what}" in line and fix in line, line
    assert not store.is_built("pbc:cell_class", SIZE)
    capsys.readouterr()
    assert medmeta_main(["verify", "--medimeta", str(folder), "--root", str(root)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("FAILED: ") and f"{source} {what}" in err, err
    # Building again reads the folder as it is now: refused whole, or in place again.
    expected = {"replaced": r"cell class\.npy: 80 labels for the 81 images of images\.hdf5",
                "missing": r"pbc/images\.hdf5 is missing: dataset pbc has no images"}
    if case in expected:
        assert prepare(folder, root, "pbc") == 2 and re.search(expected[case], capsys.readouterr().err)
    else:
        assert prepare(folder, root, "pbc") == 0 and "in place" in capsys.readouterr().out
        task = MedMNISTTask(store, "pbc:cell_class", "all", size=SIZE)
        row = np.flatnonzero(np.concatenate([split_indices(folder / "pbc", s) for s in SPLITS]) == 3)
        assert task.raw_images(row)[0, 0, 0, 0] == 255 - written["pbc"].images[3, 0, 0, 0]


def test_verify_reads_the_images_in_place_against_their_md5(medimeta, tmp_path: Path, capsys) -> None:
    """Opening compares the source's size and time; a change that keeps both (a copy with its time
    kept) is what ``verify`` is for: it reads every image against the MD5 the build recorded."""
    folder, _ = medimeta
    root = tmp_path / "root"
    assert prepare(folder, root, "cxr", "--in-place") == 0
    source = folder / "cxr" / "images.hdf5"
    before = source.stat()
    with h5py.File(source, "r+") as fh:
        fh["images"][7] = 255 - fh["images"][7]
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    capsys.readouterr()
    assert medmeta_main(["verify", "--medimeta", str(folder), "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "medimeta-cxr_32.h5: " in err and "images content does not match its recorded MD5" in err, err


def test_prepare_refuses_sizes_and_names_the_folder_does_not_have(medimeta, tmp_path: Path, capsys) -> None:
    folder, _ = medimeta
    assert prepare(folder, tmp_path / "root", "--size", "64") == 2
    assert "is 32px: --size takes [28, 32]" in capsys.readouterr().err
    assert prepare(folder, tmp_path / "root", "retina") == 2
    assert "unknown MedIMeta dataset 'retina'; --medimeta holds aml, cxr, dr_regular, pbc" in capsys.readouterr().err
    assert not (tmp_path / "root" / "store").exists()


def test_info_lists_datasets_and_the_names_targets_take(medimeta, tmp_path: Path, capsys) -> None:
    folder, _ = medimeta
    root = tmp_path / "root"
    assert medmeta_main(["info", "--medimeta", str(folder), "--root", str(root)]) == 0
    assert "MedIMeta cxr (Chest X-ray): Chest X-ray, grey 32px, train 45, val 18, test 27; built at no size yet" in (
        capsys.readouterr().out)
    assert prepare(folder, root, "cxr", "--size", "28") == 0
    assert prepare(folder, root, "all", "--size", "32") == 0
    assert capsys.readouterr().out.count("built: ") == 5
    assert medmeta_main(["info", "--medimeta", str(folder), "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "MedIMeta pbc (Blood cells): Microscopy, RGB 32px, train 40, val 16, test 24; built at 32px" in out
    assert "MedIMeta cxr (Chest X-ray): Chest X-ray, grey 32px, train 45, val 18, test 27; built at 28, 32px" in out
    assert re.search(r"\n  dr_regular:artifact +ordinal +4 labels: none, outside, a quarter, half\n", out)
    assert re.search(r"\ncxr:patient_sex +28 +45 +18 +27  ok ", out)


# --- the leave-one-out rule ----------------------------------------------------------------------------


def test_a_target_leaves_out_its_whole_dataset_and_the_datasets_sharing_its_domain(medimeta, tmp_path: Path) -> None:
    folder, _ = medimeta
    manifest = load_manifest(folder)
    overlapping = {"pbc": {"aml"}, "aml": {"pbc"}}  # info.yaml's domain_overlaps (dr_regular's glaucoma is absent)
    for target in TASK_NAMES:
        dataset = target.split(":")[0]
        sources = set(manifest.allowed_sources(target))
        left_out = {dataset, *overlapping.get(dataset, ())}
        assert sources & TASK_NAMES == {t for t in TASK_NAMES if t.split(":")[0] not in left_out}, target
    # The bundled manifest joins MedIMeta datasets to the MedMNIST subsets of their images or domain.
    assert {"chestmnist", "pneumoniamnist"} <= manifest.excluded_for("cxr:patient_sex")
    assert "bloodmnist" in manifest.excluded_for("aml:morphological_class")
    assert "retinamnist" in manifest.excluded_for("dr_regular:artifact")
    assert "pbc:cell_class" in manifest.excluded_for("blood") and "pathmnist" in manifest.allowed_sources("pbc:cell_class")
    assert manifest.excluded_for("retina") == {"retinamnist", *(t for t in TASK_NAMES if t.startswith("dr_regular"))}
    # A user manifest joins MedIMeta datasets to a group by id, or names their tasks; in any order.
    user = tmp_path / "lab.yaml"
    user.write_text(yaml.safe_dump({"subsets": {}, "exclusion_groups": {
        "chest-xray": {"medimeta": ["aml"]}, "lab": {"members": ["pbc:cell_class", "dr_regular:artifact"]}}}))
    joined = load_manifest([user, folder])
    assert "chestmnist" in joined.excluded_for("aml:morphological_class")
    assert "dr_regular:artifact" in joined.excluded_for("pbc:cell_class")
    assert "dr_regular:dr_level" in joined.allowed_sources("pbc:cell_class")
    with pytest.raises(ConfigError, match="sources .'dr_regular:artifact'. are not allowed for target dr_regular:dr_level"):
        resolve_sources(Store(tmp_path / "root", manifest), "dr_regular:dr_level", ["dr_regular:artifact"], None, 28)


def test_available_sources_and_all_targets_are_the_medimeta_tasks_present(medimeta, tmp_path: Path) -> None:
    folder, _ = medimeta
    store = Store(tmp_path / "root", load_manifest(folder))
    assert set(resolve_sources(store, "cxr:disease_labels", "available", None, 28)) == {
        t for t in TASK_NAMES if not t.startswith("cxr:")}
    sweep = Sweep(tiny_config(sources="available"), ["all"], [0], tmp_path / "sweep", root=str(tmp_path / "root"),
                  manifests=(str(folder),))
    assert set(sweep.targets) == TASK_NAMES
    assert {job.out.parent.name for job in sweep.jobs} == TASK_NAMES


# --- episodes, training and the protocol -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["cxr:disease_labels", "cxr:patient_sex", "dr_regular:artifact", "pbc:cell_class"])
def test_episodes_hold_the_layouts_images_and_labels(medimeta, tmp_path: Path, name: str) -> None:
    folder, written = medimeta
    store = Store(tmp_path / "root", load_manifest(folder))
    store.build(name, 28)
    dataset = name.split(":")[0]
    w = written[dataset]
    task_name = {"cxr:disease_labels": "disease labels", "cxr:patient_sex": "patient sex",
                 "dr_regular:artifact": "Artifact", "pbc:cell_class": "cell class"}[name]
    indices = np.concatenate([split_indices(w.folder, s) for s in SPLITS])  # split "all": train, val, test
    labels = expected_labels(w, task_name, indices)
    sampler = EpisodeSampler(MedMNISTTask(store, name, "all", size=28), n_way="all", k_shot=2, n_query=3,
                             n_episodes=4, seed=0, min_class_samples=5)
    for i in range(4):
        ep = sampler.episode(i)
        for x, y, rows in ((ep.support_x, ep.support_y, ep.support_indices), (ep.query_x, ep.query_y, ep.query_indices)):
            truth = labels[rows]
            if ep.task_type.multilabel:
                np.testing.assert_array_equal(y.numpy(), truth[:, list(ep.classes)])
            else:
                np.testing.assert_array_equal(np.asarray(ep.classes)[y.numpy()], truth.squeeze(1) if truth.ndim == 2
                                              else truth)
            pixels = supersampled_area(w.images[indices[rows]], 28)
            pixels = pixels[:, None] if pixels.ndim == 3 else pixels.transpose(0, 3, 1, 2)
            np.testing.assert_array_equal((x.numpy() * 255).round().astype(np.uint8), pixels)


def test_cdfsl_runs_a_medimeta_target_with_the_other_datasets_as_sources(medimeta, tmp_path: Path, capsys) -> None:
    folder, _ = medimeta
    results = cdfsl.main(["--medimeta", str(folder), "--target", "dr_regular:DR level", "--sources", "available",
                          "--config", "smoke", "--root", str(tmp_path / "root"), "--out", str(tmp_path / "out"),
                          "--device", "cpu", "--size", "28", "--shots", "2", "--set", "episodes.queries=2",
                          "--set", "episodes.min_class_samples=5"])
    assert results["target"] == results["task"] == "dr_regular:dr_level"
    assert results["sources"] == ["aml:morphological_class", "cxr:disease_labels", "cxr:patient_sex", "pbc:cell_class"]
    assert "sources: aml:morphological_class, cxr:disease_labels, cxr:patient_sex, pbc:cell_class" in capsys.readouterr().out
    assert list(results["methods"]) == ["scratch", "mmpt", "maml"]
    assert all(m["summary"]["episodes"] == 3 for m in results["methods"].values())
    assert results["episode_set"]["task"] == "dr_regular:dr_level" and results["episode_set"]["size"] == 28
    # mm-PT trained one head per source task (multi-label, binary and multi-class ones among them).
    checkpoint = next((tmp_path / "out" / "pretrained").glob("mmpt-*/checkpoint.pt"))
    heads = {k.split(".")[1] for k in torch.load(checkpoint, weights_only=False)["model"] if k.startswith("heads.")}
    assert len(heads) == 4


def test_cdfsl_runs_on_a_store_read_in_place(tmp_path: Path, monkeypatch, capsys) -> None:
    """The protocol pretrains on sources and adapts to a target whose images it reads from the
    folders' images.hdf5 (generated at 28px, a size the protocol takes), and builds nothing again."""
    for env in ("MEDMETA_MANIFEST", "MEDMETA_SOURCE_DIR", "MEDMETA_ROOT"):
        monkeypatch.delenv(env, raising=False)
    folder, root = tmp_path / "medimeta", tmp_path / "root"
    write_medimeta(folder, size=28)
    assert prepare(folder, root, "--in-place") == 0
    files = sorted((root / "store").iterdir())
    stamps = [p.stat().st_mtime_ns for p in files]
    results = cdfsl.main(["--medimeta", str(folder), "--target", "dr_regular:dr_level", "--sources", "available",
                          "--methods", "mmpt+knn", "--config", "smoke", "--root", str(root),
                          "--out", str(tmp_path / "out"),
                          "--device", "cpu", "--size", "28", "--shots", "2", "--set", "episodes.queries=2",
                          "--set", "episodes.min_class_samples=5"])
    assert results["sources"] == ["aml:morphological_class", "cxr:disease_labels", "cxr:patient_sex", "pbc:cell_class"]
    assert results["methods"]["mmpt+knn"]["summary"]["episodes"] == 3
    assert sorted((root / "store").iterdir()) == files and [p.stat().st_mtime_ns for p in files] == stamps
    for path in files:
        with h5py.File(path, "r") as fh:
            assert all(fh[f"{s}/images"].is_virtual for s in SPLITS), path


def test_supervised_baselines_train_on_medimeta_tasks(medimeta, tmp_path: Path) -> None:
    import supervised

    folder, _ = medimeta
    combined = supervised.main(["--medimeta", str(folder), "--dataset", "cxr:disease_labels,dr_regular:artifact",
                                "--schemes", "end2end,knn", "--epochs", "1", "--size", "28", "--device", "cpu",
                                "--root", str(tmp_path / "root"), "--out", str(tmp_path / "sup")])
    assert [(r["dataset"], r["scheme"]) for r in combined["table"]] == [
        ("cxr:disease_labels", "end2end"), ("cxr:disease_labels", "knn"), ("dr_regular:artifact", "end2end"),
        ("dr_regular:artifact", "knn")]
    assert all(0 <= r["test_auroc"] <= 1 for r in combined["table"])
