from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from medmeta.data.fetch import md5sum
from medmeta.data.manifest import DEFAULT_MANIFEST, load_manifest, parse_manifest
from medmeta.errors import ManifestError

REFERENCE_SPLITS = {  # reference.md section 1, current release
    "pathmnist": (89996, 10004, 7180), "chestmnist": (78468, 11219, 22433), "retinamnist": (1080, 120, 400),
    "breastmnist": (546, 78, 156), "tissuemnist": (165466, 23640, 47280), "organmnist3d": (971, 161, 610),
    "synapsemnist3d": (1230, 177, 352),
}


def test_bundled_manifest_covers_every_subset_and_size() -> None:
    m = load_manifest()
    assert len(m.subsets) == 18
    two_d = [s for s in m.subsets.values() if s.dims == 2]
    three_d = [s for s in m.subsets.values() if s.dims == 3]
    assert len(two_d) == 12 and len(three_d) == 6
    assert all(s.sizes == (28, 64, 128, 224) for s in two_d)
    assert all(s.sizes == (28, 64) for s in three_d)
    for name, splits in REFERENCE_SPLITS.items():
        assert tuple(m[name].splits.values()) == splits
    assert m["chest"].task_type == "multi-label" and len(m["chest"].labels) == 14
    assert m["retina"].task_type == "ordinal" and m["path"].labels[0] == "adipose"
    assert m["derma"].license == "CC BY-NC 4.0"
    assert m["organa"].file(224).file == "organamnist_224.npz"
    with pytest.raises(ValueError, match="has no file at size 128"):
        m["nodule3d"].file(128)


def test_exclusion_groups_and_sources() -> None:
    m = load_manifest()
    assert m.excluded_for("organa") == {"organamnist", "organcmnist", "organsmnist", "organmnist3d", "adrenalmnist3d"}
    assert m.excluded_for("adrenal3d") >= {"organmnist3d", "adrenalmnist3d"}
    assert m.excluded_for("pneumonia") == {"pneumoniamnist", "chestmnist"}
    assert m.excluded_for("retina") == {"retinamnist"}
    retina_sources = m.allowed_sources("retina")
    assert "retinamnist" not in retina_sources and len(retina_sources) == 11
    assert set(m.allowed_sources("nodule3d")) == {"organmnist3d", "adrenalmnist3d", "vesselmnist3d", "synapsemnist3d"}
    with pytest.raises(ValueError, match="unknown subset 'kidney'"):
        m.resolve("kidney")


def test_real_files_match_manifest_md5(real_dir: Path) -> None:
    m = load_manifest()
    checked = 0
    for info in m.subsets.values():
        for size in info.sizes:
            path = real_dir / info.file(size).file
            if path.is_file():
                assert md5sum(path) == info.file(size).md5, path
                checked += 1
    assert checked >= 7


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["subsets"]["retinamnist"].pop("task_type"), "'retinamnist': missing field 'task_type'"),
    (lambda r: r["subsets"]["breastmnist"].update(task_type="regression"), "'breastmnist': field 'task_type'"),
    (lambda r: r["subsets"]["bloodmnist"]["files"][28].update(md5="xyz"), "'bloodmnist.files.28': field 'md5'"),
    (lambda r: r["subsets"]["bloodmnist"]["splits"].update(val=-1), "'bloodmnist': field 'splits.val'"),
    (lambda r: r["subsets"]["octmnist"].update(dims="2"), "'octmnist': field 'dims'"),
    (lambda r: r["exclusion_groups"]["chest-xray"]["members"].append("lungmnist"), "member 'lungmnist'"),
])
def test_malformed_manifest_names_entry_and_field(mutate, message: str) -> None:
    raw = yaml.safe_load(DEFAULT_MANIFEST.read_text())
    bad = copy.deepcopy(raw)
    mutate(bad)
    with pytest.raises(ManifestError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_manifest(bad, Path("m.yaml"))
