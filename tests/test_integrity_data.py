"""Issue 23, items 5 and 6: labels outside the manifest's classes never reach a store, and
repeated seeds are refused before any work."""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from medmeta.data.manifest import load_manifest
from medmeta.data.store import Store
from medmeta.errors import ConfigError, SourceError
from medmeta.evaluation.baselines import BaselineConfig
from medmeta import settings
from medmeta.settings import from_mapping, load_settings

from .conftest import Synthetic, write_synthetic

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import supervised  # noqa: E402


def _set_label(syn: Synthetic, name: str, key: str, index: tuple[int, ...], value: int) -> Path:
    """Write ``value`` at ``index`` of ``key`` in ``name``'s npz; the manifest gets the file's true MD5,
    so only the label check can refuse it."""
    path = syn.source_dir / f"{name}.npz"
    data = dict(np.load(path))
    data[key][index] = value
    np.savez_compressed(path, **data)
    raw = yaml.safe_load(syn.manifest_path.read_text())
    raw["subsets"][name]["files"][28]["md5"] = hashlib.md5(path.read_bytes()).hexdigest()
    syn.manifest_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("name, key, index, value, message", [
    ("toybinary", "train_labels", (5, 0), 7,
     "train_labels row 5 has label 7; toybinary is binary with classes 0..1"),
    ("toyclass", "test_labels", (11, 0), 4,
     "test_labels row 11 has label 4; toyclass is multi-class with classes 0..3"),
    ("toyordinal", "val_labels", (0, 0), 255,
     "val_labels row 0 has label 255; toyordinal is ordinal with classes 0..2"),
    ("toychest", "val_labels", (3, 2), 2,
     "val_labels row 3 column 2 (nodule) has 2; toychest is multi-label with 0 or 1 per label"),
])
def test_a_label_outside_the_manifest_is_refused_before_anything_is_written(
        tmp_path: Path, name: str, key: str, index: tuple[int, ...], value: int, message: str) -> None:
    syn = write_synthetic(tmp_path / "syn")
    path = _set_label(syn, name, key, index, value)
    store = Store(tmp_path / "root", load_manifest(base=syn.manifest_path))
    with pytest.raises(SourceError) as err:
        store.build(name, 28, source_dir=syn.source_dir, download=False)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and message in text, text
    assert "fix the manifest's labels or the file" in text and len(text.splitlines()) == 1
    # Refused before the temporary store file was made: no store file, no temporary.
    assert not store.store_dir.exists() or list(store.store_dir.iterdir()) == []
    assert store.built() == []


def test_the_first_bad_label_is_named_and_a_good_file_still_builds(tmp_path: Path) -> None:
    syn = write_synthetic(tmp_path / "syn")
    _set_label(syn, "toybinary", "test_labels", (9, 0), 3)
    _set_label(syn, "toybinary", "train_labels", (2, 0), 2)
    store = Store(tmp_path / "root", load_manifest(base=syn.manifest_path))
    with pytest.raises(SourceError, match=r"train_labels row 2 has label 2;"):
        store.build("toybinary", 28, source_dir=syn.source_dir, download=False)
    # The label check reads blocks: a bad row past the first block is found at its own row.
    syn = write_synthetic(tmp_path / "syn2")
    from medmeta.data import fetch

    info = load_manifest(base=syn.manifest_path)["toyclass"]
    fetch.check_labels(syn.source_dir / "toyclass.npz", info, rows_per_block=7)
    _set_label(syn, "toyclass", "train_labels", (50, 0), 9)
    with pytest.raises(SourceError, match=r"train_labels row 50 has label 9;"):
        fetch.check_labels(syn.source_dir / "toyclass.npz", info, rows_per_block=7)
    store = Store(tmp_path / "root2", load_manifest(base=syn.manifest_path))
    store.build("toychest", 28, source_dir=syn.source_dir, download=False)
    assert store.built() == [("toychest", 28)]


def test_repeated_seeds_are_one_argparse_line(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        supervised.main(["--dataset", "breast", "--seeds", "0,0", "--root", str(tmp_path / "root"),
                         "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    # argparse's usage, then one error line (its program name is sys.argv[0]'s, pytest's here).
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].endswith(
        ": error: argument --seeds: seeds must be distinct; 0 is given twice"), err
    assert err.strip().splitlines()[-1] == errors[0]
    assert not (tmp_path / "root").exists() and not (tmp_path / "out").exists()


def test_seed_list() -> None:
    assert settings.seed_list("0, 1,2") == [0, 1, 2] and settings.seed_list("-3") == [-3]
    with pytest.raises(argparse.ArgumentTypeError, match="^seeds must be distinct; 1 is given twice$"):
        settings.seed_list("1,2,01")
    with pytest.raises(argparse.ArgumentTypeError, match="^seeds are integers, got 'a' in '0,a'$"):
        settings.seed_list("0,a")
    with pytest.raises(argparse.ArgumentTypeError, match="^seeds are integers, got '' in '0,'$"):
        settings.seed_list("0,")


def test_baseline_config_refuses_repeated_or_no_seeds(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config key seeds: seeds must be distinct; 1 is given twice in \[1, 1\]$"):
        BaselineConfig(seeds=[1, 1])
    with pytest.raises(ConfigError, match="^config key seeds: seeds must be distinct; 1 is given twice"):
        from_mapping(BaselineConfig, {"seeds": [1, 2, 1]})
    with pytest.raises(ConfigError, match="^config key seeds: seeds must be distinct"):
        load_settings(BaselineConfig, sets=["seeds=[3, 3]"])
    profile = tmp_path / "profile.yaml"
    profile.write_text("seeds: [0, 0]\n")
    with pytest.raises(ConfigError, match="^config key seeds: seeds must be distinct"):
        load_settings(BaselineConfig, profile)
    with pytest.raises(ConfigError, match="^config key seeds: give at least one seed"):
        BaselineConfig(seeds=[])
    assert BaselineConfig(seeds=[2, 0, 1]).seeds == [2, 0, 1]
