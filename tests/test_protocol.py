"""End-to-end protocol runs on the real MedMNIST files with tiny budgets."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medmeta.data.store import Store
from medmeta.data.tasks import MedMNISTTask
from medmeta.errors import ConfigError, MethodError
from medmeta.evaluation import run_protocol
from medmeta.learning.maml import MAMLConfig, train_maml
from medmeta.learning.models import build_backbone
from medmeta.learning.pretrain import MultiTaskPretrainer, PretrainConfig

from .conftest import tiny_config


def make_backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("resnet18", stem="imagenet")


def source_datasets(store: Store, names: list[str], split: str) -> dict[str, MedMNISTTask]:
    return {n: MedMNISTTask(store, n, split) for n in names}


def test_results_schema_cache_and_episode_set(tmp_path: Path, real_store: Store, real_dir: Path, capsys) -> None:
    cfg = tiny_config(target="breast", sources=["retina"], methods=["scratch", "mmpt"])
    out = tmp_path / "run"
    results = run_protocol(cfg, out, root=str(real_store.root), source_dir=str(real_dir))
    saved = json.loads((out / "results.json").read_text())
    assert saved["target"] == "breastmnist" and saved["sources"] == ["retinamnist"]
    assert saved["config"]["episodes"]["count"] == 3 and saved["seed"] == 0
    assert set(saved["versions"]) >= {"torch", "numpy", "medmeta", "python"}
    for method in ("scratch", "mmpt"):
        m = saved["methods"][method]
        assert set(m["summary"]) == {"auroc", "auroc_ci95", "acc", "acc_ci95", "episodes", "episodes_auroc"}
        assert m["settings"]["init"]["name"] == method
        assert [e["episode"] for e in m["per_episode"]] == [0, 1, 2]
        assert all(0.0 <= e["auroc"] <= 1.0 and 0.0 <= e["acc"] <= 1.0 for e in m["per_episode"])
        assert m["summary"]["auroc"] == pytest.approx(np.mean([e["auroc"] for e in m["per_episode"]]))
        assert m["seconds"]["total"] > 0
    assert "paired" not in saved["methods"]["scratch"] and saved["reference"] == "scratch"
    paired = saved["methods"]["mmpt"]["paired"]
    diffs = [a["auroc"] - b["auroc"] for a, b in zip(saved["methods"]["mmpt"]["per_episode"],
                                                    saved["methods"]["scratch"]["per_episode"])]
    assert paired["reference"] == "scratch" and paired["auroc"]["mean"] == pytest.approx(np.mean(diffs))
    assert (out / "results.csv").read_text().count("\n") == 1 + 6
    assert (out / "summary.csv").read_text().splitlines()[0].startswith("target,method,auroc,auroc_ci95")
    assert (out / "results.png").stat().st_size > 1000 and any((out / "tensorboard").iterdir())
    assert "scratch" in capsys.readouterr().out

    # A second run reuses the stored episodes and finished methods: identical numbers.
    again = run_protocol(cfg, out, root=str(real_store.root), source_dir=str(real_dir))
    assert again["methods"] == results["methods"]
    # Asking for a different episode set in the same folder is refused, naming the file.
    with pytest.raises(ValueError, match="episodes_breastmnist_28px_5shot.json holds 3 episodes"):
        run_protocol(tiny_config(target="breast", sources=["retina"], **{"episodes.count": 5}), out,
                     root=str(real_store.root), source_dir=str(real_dir))
    # An episode set of another target is refused.
    other = tiny_config(target="retina", methods=["scratch"],
                        **{"episodes.file": str(out / "episodes_breastmnist_28px_5shot.json")})
    with pytest.raises(ValueError, match="does not match the dataset"):
        run_protocol(other, tmp_path / "other", root=str(real_store.root), source_dir=str(real_dir))


@pytest.mark.parametrize("overrides, message", [
    ({"target": "kidney"}, "unknown subset 'kidney'"),
    ({"target": "organa", "sources": ["organc"]}, "not allowed for target organamnist"),
    ({"target": "adrenal3d", "sources": "available"}, "target adrenalmnist3d has no allowed source subsets"),
    ({"target": "adrenal3d", "methods": ["imagenet"]}, "method imagenet needs a 2D target"),
    ({"methods": ["protonet"]}, "unknown method 'protonet'"),
    ({"methods": ["mmpt+protonet"]}, "unknown adaptation rule 'protonet'"),
    ({"methods": ["no_such_module:Rule"]}, "cannot import 'no_such_module'"),
])
def test_bad_experiments_fail_clearly(tmp_path: Path, real_dir: Path, overrides: dict, message: str) -> None:
    # With an empty source folder and store, no allowed source of adrenal3d is available.
    empty = tmp_path / "empty"
    empty.mkdir()
    source_dir = str(empty) if overrides.get("sources") == "available" else str(real_dir)
    with pytest.raises((ConfigError, MethodError), match=message):
        run_protocol(tiny_config(**overrides), tmp_path / "out", root=str(tmp_path / "root"), source_dir=source_dir)


def test_mmpt_resumes_exactly_after_interruption(tmp_path: Path, real_store: Store) -> None:
    train = source_datasets(real_store, ["breastmnist", "retinamnist"], "train")
    val = source_datasets(real_store, ["breastmnist", "retinamnist"], "val")
    config = PretrainConfig(steps=8, batch_size=8, eval_every=4, checkpoint_every=2, val_max=32, patience=10,
                            bn_batches=2)

    def trainer(ckpt: Path) -> MultiTaskPretrainer:
        return MultiTaskPretrainer(make_backbone(), train, val, config, torch.device("cpu"), checkpoint=ckpt)

    straight = trainer(tmp_path / "a.pt")
    straight.run()

    def crash(step: int) -> None:
        if step == 5:
            raise KeyboardInterrupt

    interrupted = trainer(tmp_path / "b.pt")
    with pytest.raises(KeyboardInterrupt):
        interrupted.run(on_step=crash)
    resumed = trainer(tmp_path / "b.pt")
    assert resumed.step == 4
    resumed.run()
    assert resumed.history == straight.history
    assert resumed.seconds > 0
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_maml_resumes_exactly_after_interruption(tmp_path: Path, real_store: Store) -> None:
    train = source_datasets(real_store, ["breastmnist", "retinamnist"], "train")
    config = MAMLConfig(steps=4, meta_batch=2, inner_steps=1, max_shot=2, n_query=2, checkpoint_every=1,
                        first_order=True)

    straight = train_maml(make_backbone(), train, config, torch.device("cpu"), checkpoint=tmp_path / "a.pt")

    def crash(step: int) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_maml(make_backbone(), train, config, torch.device("cpu"), checkpoint=tmp_path / "b.pt",
                   on_step=crash)
    assert torch.load(tmp_path / "b.pt", weights_only=False)["step"] == 2
    resumed = train_maml(make_backbone(), train, config, torch.device("cpu"), checkpoint=tmp_path / "b.pt")
    for (name, a), b in zip(straight.backbone.state_dict().items(), resumed.backbone.state_dict().values()):
        assert torch.equal(a, b), name
    before = {k: v.clone() for k, v in make_backbone().state_dict().items()}
    assert any(not torch.equal(before[k], v) for k, v in straight.backbone.state_dict().items())


def test_imagenet_method_local_weights_and_offline_error(tmp_path: Path, real_store: Store, real_dir: Path,
                                                         monkeypatch) -> None:
    import torchvision
    from urllib.error import URLError

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    cfg = tiny_config(target="breast", methods=["imagenet"], **{"model.weights": str(weights)})
    results = run_protocol(cfg, tmp_path / "local", root=str(real_store.root), source_dir=str(real_dir))
    assert results["methods"]["imagenet"]["summary"]["episodes"] == 3

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(MethodError, match="could not be downloaded.*local weights file"):
        run_protocol(tiny_config(target="breast", methods=["imagenet"]), tmp_path / "offline",
                     root=str(real_store.root), source_dir=str(real_dir))


def test_3d_target_pretrains_on_3d_sources(tmp_path: Path, real_store: Store, real_dir: Path) -> None:
    cfg = tiny_config(target="adrenal3d", sources="available", methods=["scratch", "mmpt"],
                      **{"pretrain.batch_size": 8, "pretrain.steps": 2, "pretrain.eval_every": 2})
    results = run_protocol(cfg, tmp_path / "run", root=str(real_store.root), source_dir=str(real_dir))
    assert results["sources"] == ["vesselmnist3d"]  # organ3d is excluded (abdominal CT) and 2D files never mix
    assert results["episode_set"]["sampler"]["n_way"] == 2
    for method in ("scratch", "mmpt"):
        assert results["methods"][method]["summary"]["episodes"] == 3


def test_missing_source_offline_is_named_with_what_to_do(tmp_path: Path, real_dir: Path, monkeypatch) -> None:
    from medmeta.data import fetch
    from medmeta.errors import SourceError

    def offline(entry, cache_dir):
        raise ConnectionError("no network")

    monkeypatch.setattr(fetch, "_download", offline)
    cfg = tiny_config(target="breast", sources=["path"], methods=["mmpt"])
    with pytest.raises(SourceError, match=r"could not download pathmnist\.npz .*--source-dir"):
        run_protocol(cfg, tmp_path / "out", root=str(tmp_path / "root"), source_dir=str(real_dir))
    assert not (tmp_path / "root" / "store" / "pathmnist_28.h5").exists()


def test_available_sources_are_those_present_at_the_requested_size(tmp_path: Path, real_dir: Path) -> None:
    # vesselmnist3d is present locally at 28px only, so a 64px adrenal3d target has no available source.
    cfg = tiny_config(target="adrenal3d", sources="available", size=64)
    with pytest.raises(ValueError, match="target adrenalmnist3d has no allowed source subsets"):
        run_protocol(cfg, tmp_path / "out", root=str(tmp_path / "root"), source_dir=str(real_dir))
