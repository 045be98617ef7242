"""Shared fixtures: the real MedMNIST files (skipped when absent) and synthetic subsets."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from medmeta.data.manifest import Manifest, load_manifest
from medmeta.data.store import Store

REAL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "medmnist"


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """Folder of official npz files; tests using it skip when it is absent (a user's clone)."""
    if not REAL_DIR.is_dir() or not any(REAL_DIR.glob("*.npz")):
        pytest.skip(f"real MedMNIST files not found in {REAL_DIR}")
    return REAL_DIR


@pytest.fixture(scope="session")
def real_store(tmp_path_factory: pytest.TempPathFactory, real_dir: Path) -> Store:
    """A store built once per session from every real 2D 28px and 3D file present."""
    store = Store(tmp_path_factory.mktemp("real_store"))
    for name, info in store.manifest.subsets.items():
        for size in info.sizes:
            if (real_dir / info.file(size).file).is_file():
                store.build(name, size, source_dir=real_dir)
    return store


@dataclass
class Synthetic:
    """Synthetic subsets written as npz files plus a manifest describing them."""

    manifest: Manifest
    manifest_path: Path
    source_dir: Path
    arrays: dict[tuple[str, int], dict[str, np.ndarray]]


SYNTHETIC_SPECS = {
    # name: (dims, channels, task_type, labels, splits, sizes)
    "toybinary": (2, 1, "binary", ["negative", "positive"], (40, 10, 12), (28,)),
    "toyclass": (2, 3, "multi-class", ["a", "b", "c", "d"], (60, 12, 16), (28, 64)),
    "toyordinal": (2, 3, "ordinal", ["g0", "g1", "g2"], (45, 9, 9), (28,)),
    "toychest": (2, 1, "multi-label", ["effusion", "mass", "nodule", "hernia"], (80, 12, 20), (28,)),
    "toyvolume": (3, 1, "binary", ["benign", "malignant"], (30, 6, 8), (28,)),
}


def make_arrays(rng: np.random.Generator, dims: int, channels: int, task_type: str, n_labels: int,
                splits: tuple[int, int, int], size: int) -> dict[str, np.ndarray]:
    shape = (size,) * 3 if dims == 3 else ((size, size) if channels == 1 else (size, size, channels))
    out = {}
    for split, n in zip(("train", "val", "test"), splits):
        out[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        if task_type == "multi-label":
            out[f"{split}_labels"] = (rng.random((n, n_labels)) < 0.4).astype(np.uint8)
        else:
            out[f"{split}_labels"] = (np.arange(n) % n_labels).astype(np.uint8)[rng.permutation(n), None]
    return out


def write_synthetic(folder: Path, specs: dict = SYNTHETIC_SPECS, seed: int = 0,
                    url_base: str = "http://127.0.0.1:9/") -> Synthetic:
    """Write npz files and a manifest (with their true MD5s) into ``folder``."""
    rng = np.random.default_rng(seed)
    source = folder / "npz"
    source.mkdir(parents=True, exist_ok=True)
    subsets, arrays = {}, {}
    for i, (name, (dims, channels, task_type, labels, splits, sizes)) in enumerate(specs.items()):
        files = {}
        for size in sizes:
            data = make_arrays(rng, dims, channels, task_type, len(labels), splits, size)
            fname = f"{name}.npz" if size == 28 else f"{name}_{size}.npz"
            np.savez_compressed(source / fname, **data)
            md5 = hashlib.md5((source / fname).read_bytes()).hexdigest()
            files[size] = {"file": fname, "url": url_base + fname, "md5": md5}
            arrays[(name, size)] = data
        subsets[name] = {
            "short_name": name.replace("toy", "t"), "dims": dims, "channels": channels,
            "task_type": task_type, "labels": labels,
            "splits": dict(zip(("train", "val", "test"), splits)),
            "modality": "synthetic", "domain": f"domain{i}", "source_dataset": "generated",
            "license": "CC0", "citation": "none", "files": files,
        }
    raw = {"version": "test", "subsets": subsets,
           "exclusion_groups": {"pair": {"members": ["toybinary", "toyclass"], "reason": "test"}}}
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return Synthetic(load_manifest(base=path), path, source, arrays)


@pytest.fixture
def synthetic(tmp_path: Path) -> Synthetic:
    return write_synthetic(tmp_path)


CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"


def tiny_config(**dotted):
    """The ``smoke`` profile (tiny budgets, CPU) with dotted-key overrides: ``tiny_config(**{"pretrain.lr": 1e-4})``."""
    from medmeta.evaluation.config import load_experiment_config
    from medmeta.settings import set_dotted

    overrides: dict = {"device": "cpu"}
    for key, value in dotted.items():
        set_dotted(overrides, key, value)
    return load_experiment_config("smoke", CONFIGS, overrides)
