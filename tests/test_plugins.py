"""The open protocol: every initialisation x rule x task type end to end, a user's method from an
import path through experiments/cdfsl.py, and a user's dataset added by a manifest file."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml

from medmeta.data.manifest import MANIFEST_ENV, load_manifest
from medmeta.errors import ConfigError
from medmeta.evaluation import run_protocol

from .conftest import Synthetic, make_arrays, tiny_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import cdfsl  # noqa: E402

INITS = ("scratch", "imagenet", "checkpoint", "mmpt", "maml")
RULES = ("finetune", "linear", "knn", "proto", "lpft", "inner")


@pytest.mark.parametrize("target", ["toybinary", "toyclass", "toyordinal", "toychest"])
def test_every_initialisation_and_rule_on_every_task_type(synthetic: Synthetic, tmp_path: Path, target: str) -> None:
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    methods = [f"{i}+{r}" for i in INITS for r in RULES]
    cfg = tiny_config(target=target, methods=methods, reference="scratch+finetune", checkpoint=str(weights),
                      **{"model.weights": str(weights), "episodes.count": 2, "episodes.shots": 2,
                         "episodes.queries": 2, "episodes.min_class_samples": None})
    results = run_protocol(cfg, tmp_path / "out", root=tmp_path / "root", source_dir=str(synthetic.source_dir),
                           manifest=synthetic.manifest)
    assert list(results["methods"]) == methods
    for name, m in results["methods"].items():
        assert m["summary"]["episodes"] == 2, name
        assert all(0.0 <= e["acc"] <= 1.0 for e in m["per_episode"]), name
    # Methods sharing an initialisation trained it once.
    assert len(list((tmp_path / "out" / "pretrained").glob("mmpt-*/checkpoint.pt"))) == 1
    assert len(list((tmp_path / "out" / "pretrained").glob("maml-*/checkpoint.pt"))) == 1


USER_MODULE = '''
import torch
from medmeta.methods import FrozenFeatureRule, Initialisation, Method, Scratch
from medmeta.methods.initialisations import random_backbone


class Centroid(FrozenFeatureRule):
    """Cosine similarity to each class's mean feature (single-label tasks)."""

    name = "centroid"

    def scores(self, support, support_y, query, episode):
        means = torch.stack([support[support_y == c].mean(0) for c in range(episode.num_outputs)])
        return torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(means, dim=1).T


class Doubled(Initialisation):
    name = "doubled"

    def backbone(self, context):
        net = random_backbone(context)
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(2)
        return net


class Mine(Method):
    def __init__(self):
        super().__init__(Scratch(), Centroid(), name="mine")
'''


def test_a_user_method_from_an_import_path_runs_through_cdfsl(synthetic: Synthetic, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "user_methods.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    methods = "scratch+user_methods:Centroid,user_methods:Mine,user_methods:Doubled+knn"
    results = cdfsl.main(["--target", "toyclass", "--methods", methods, "--config", "smoke", "--device", "cpu",
                          "--manifest", str(synthetic.manifest_path), "--source-dir", str(synthetic.source_dir),
                          "--root", str(tmp_path / "root"), "--out", str(tmp_path / "out"),
                          "--reference", "user_methods:Mine", "--set", "episodes.min_class_samples=null"])
    assert list(results["methods"]) == ["scratch+user_methods:Centroid", "user_methods:Mine",
                                        "user_methods:Doubled+knn"]
    # The same rule on the same initialisation gives the same numbers under either name.
    assert results["methods"]["scratch+user_methods:Centroid"]["paired"]["auroc"]["identical"]
    assert results["methods"]["user_methods:Doubled+knn"]["settings"]["init"]["name"] == "doubled"
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["config"]["methods"][1] == "user_methods:Mine"


def test_bad_user_methods_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    (tmp_path / "user_methods.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    for methods, message in (("user_methods:Nope", "module 'user_methods' has no 'Nope'"),
                             ("user_methods:Centroid+knn", "is a Centroid, not an Initialisation")):
        with pytest.raises(SystemExit) as exit_info:
            cdfsl.main(["--target", "breast", "--methods", methods, "--root", str(tmp_path / "root")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def write_user_datasets(folder: Path, group: bool = False) -> Path:
    """Two private 28px datasets in MedMNIST's npz layout, next to a manifest naming them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    subsets = {}
    for name, task_type, labels in (("mydata", "multi-class", ["a", "b", "c"]), ("mydata2", "binary", ["no", "yes"])):
        arrays = make_arrays(rng, 2, 1, task_type, len(labels), (60, 12, 30), 28)
        np.savez_compressed(folder / f"{name}.npz", **arrays)
        subsets[name] = {"short_name": name, "dims": 2, "channels": 1, "task_type": task_type, "labels": labels,
                         "splits": {"train": 60, "val": 12, "test": 30}, "modality": "private",
                         "domain": f"{name} domain", "source_dataset": "our lab", "license": "private",
                         "citation": "unpublished", "files": {28: {
                             "file": f"{name}.npz", "url": None,
                             "md5": hashlib.md5((folder / f"{name}.npz").read_bytes()).hexdigest()}}}
    raw = {"version": "lab-1", "subsets": subsets,
           "exclusion_groups": {"lab": {"members": ["mydata", "mydata2"]}} if group else {}}
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_a_user_dataset_is_a_target_and_a_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_user_datasets(tmp_path / "lab")
    manifest = load_manifest(path)
    assert "mydata" in manifest.allowed_sources("retina") and "retinamnist" in manifest.allowed_sources("mydata")
    cfg = tiny_config(target="mydata", methods=["scratch", "mmpt"], sources="available",
                      **{"episodes.min_class_samples": None})
    # No MedMNIST file is local, so "available" finds the other private dataset, next to its manifest.
    results = run_protocol(cfg, tmp_path / "a", root=tmp_path / "root", manifest=manifest)
    assert results["sources"] == ["mydata2"] and results["methods"]["mmpt"]["summary"]["episodes"] == 3
    # The environment variable works as --manifest does; and the dataset is a source of the other.
    monkeypatch.setenv(MANIFEST_ENV, str(path))
    results = run_protocol(tiny_config(target="mydata2", methods=["mmpt"], sources=["mydata"]), tmp_path / "b",
                           root=tmp_path / "root", manifest=load_manifest())
    assert results["sources"] == ["mydata"] and results["episode_set"]["sampler"]["n_way"] == 2


def test_a_user_exclusion_group_and_bad_entries(tmp_path: Path) -> None:
    grouped = load_manifest(write_user_datasets(tmp_path / "lab", group=True))
    assert "mydata2" not in grouped.allowed_sources("mydata")
    with pytest.raises(ConfigError, match=r"sources \['mydata2'\] are not allowed for target mydata"):
        run_protocol(tiny_config(target="mydata", methods=["mmpt"], sources=["mydata2"]), tmp_path / "out",
                     root=tmp_path / "root", manifest=grouped)
    bad = yaml.safe_load((tmp_path / "lab" / "manifest.yaml").read_text())
    bad["subsets"]["mydata"]["short_name"] = "retina"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="manifest entry 'mydata': short_name 'retina' is taken by 'retinamnist'"):
        load_manifest(tmp_path / "bad.yaml")
    bad["subsets"]["mydata"]["short_name"] = "mydata"
    del bad["subsets"]["mydata2"]["splits"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="manifest entry 'mydata2': missing field 'splits'"):
        load_manifest(tmp_path / "bad.yaml")
