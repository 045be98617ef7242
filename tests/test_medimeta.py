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
import re
import sys
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
from medmeta.errors import ConfigError, SourceError
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


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_dataset_is_one_line_and_no_store_file(medimeta, tmp_path: Path, capsys, case: str) -> None:
    folder, _ = medimeta
    dataset, message = _damage(folder, case)
    root = tmp_path / "root"
    assert prepare(folder, root, dataset, "--size", "28") == 2
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
