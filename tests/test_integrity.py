"""No silently wrong number (issue 23): edited episode sets, bad partial results, the reference,
rules that change the backbone, pairing in compare.py and errors raised by a user's method."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from medmeta.episodes import load_episode_set
from medmeta.errors import EpisodeError, MethodError, PluginError
from medmeta.evaluation import run_protocol
from medmeta.evaluation.sweep import job_config, reference_label

from .conftest import Synthetic, tiny_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import cdfsl  # noqa: E402
import compare  # noqa: E402

FAST = {"episodes.min_class_samples": None, "episodes.queries": 2, "episodes.count": 3}


def run(synthetic: Synthetic, tmp_path: Path, out: str, methods: list[str], **extra) -> dict:
    cfg = tiny_config(target="toyclass", methods=methods, **{**FAST, **extra})
    return run_protocol(cfg, tmp_path / out, root=tmp_path / "root", source_dir=str(synthetic.source_dir),
                        manifest=synthetic.manifest)


def episode_file(tmp_path: Path, out: str) -> Path:
    (path,) = (tmp_path / out).glob("episodes_*.json")
    return path


@pytest.mark.parametrize("edit", ["swap support and query", "drop a support image", "move one into the query"])
def test_an_edited_episode_set_is_refused(synthetic: Synthetic, tmp_path: Path, edit: str) -> None:
    run(synthetic, tmp_path, "out", ["scratch+proto"])
    path = episode_file(tmp_path, "out")
    doc = json.loads(path.read_text())
    e = doc["episodes"][1]
    if edit == "swap support and query":
        e["support"], e["query"] = e["query"], e["support"]
    elif edit == "drop a support image":
        e["support"] = e["support"][1:]
    else:
        e["query"].append(e["support"].pop())
    path.write_text(json.dumps(doc))
    with pytest.raises(EpisodeError, match="its episodes do not match its digest") as info:
        load_episode_set(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(EpisodeError, match="do not match its digest"):  # the protocol refuses it too
        run(synthetic, tmp_path, "out", ["scratch+proto", "scratch+knn"])


def test_a_hand_written_set_is_keyed_by_its_content(synthetic: Synthetic, tmp_path: Path) -> None:
    first = run(synthetic, tmp_path, "out", ["scratch+proto"])
    path = episode_file(tmp_path, "out")
    doc = json.loads(path.read_text())
    del doc["digest"]  # written by hand: no digest
    e = doc["episodes"][0]
    e["query"].append(e["support"].pop())
    path.write_text(json.dumps(doc))
    edited = load_episode_set(path)
    assert edited.digest != first["episode_set"]["digest"]
    again = run(synthetic, tmp_path, "out", ["scratch+proto", "scratch+knn"])
    assert again["episode_set"]["digest"] == edited.digest
    # scratch+proto was scored again on the edited episodes, not reused from the original ones:
    fresh = run(synthetic, tmp_path, "fresh", ["scratch+proto"], **{"episodes.file": str(path)})
    assert again["methods"]["scratch+proto"]["per_episode"] == fresh["methods"]["scratch+proto"]["per_episode"]
    assert again["methods"]["scratch+proto"]["per_episode"] != first["methods"]["scratch+proto"]["per_episode"]


@pytest.mark.parametrize("damage, said", [
    (lambda p: p.update(per_episode=p["per_episode"] * 3), "is listed twice"),
    (lambda p: p["per_episode"][0].pop("acc"), "has no numeric acc"),
    (lambda p: p.update(adapt_seconds="12"), "adapt_seconds is '12'"),
    (lambda p: p["per_episode"][0].update(episode=99), "episode 99 is not in the episode set"),
])
def test_a_bad_partial_result_is_warned_about_and_redone(synthetic: Synthetic, tmp_path: Path, damage, said: str
                                                         ) -> None:
    first = run(synthetic, tmp_path, "out", ["scratch+proto"])
    cache = tmp_path / "out" / "methods" / "scratch+proto.json"
    saved = json.loads(cache.read_text())
    cache.unlink()
    partial = {"key": saved["key"], "per_episode": saved["result"]["per_episode"], "adapt_seconds": 1.0}
    damage(partial)
    (tmp_path / "out" / "methods" / "partial").mkdir(exist_ok=True)
    (tmp_path / "out" / "methods" / "partial" / "scratch+proto.json").write_text(json.dumps(partial))
    with pytest.warns(UserWarning, match=said) as record:
        again = run(synthetic, tmp_path, "out", ["scratch+proto"])
    assert len(str(record[0].message).splitlines()) == 1
    assert again["methods"]["scratch+proto"]["summary"]["episodes"] == 3
    assert again["methods"]["scratch+proto"]["per_episode"] == first["methods"]["scratch+proto"]["per_episode"]


def test_the_reference_must_be_a_method_of_the_run(synthetic: Synthetic, tmp_path: Path, capsys,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDMETA_MANIFEST", str(synthetic.manifest_path))
    args = ["--target", "toyclass", "--config", "smoke", "--methods", "scratch+proto,scratch+knn",
            "--set", "episodes.min_class_samples=null", "--set", "episodes.queries=2", "--episodes", "3",
            "--root", str(tmp_path / "root"), "--source-dir", str(synthetic.source_dir)]
    with pytest.raises(SystemExit) as info:
        cdfsl.main([*args, "--reference", "scratch+prot", "--out", str(tmp_path / "typo")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "'scratch+prot' is not one of the methods run" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "typo").exists()
    # Without --reference the first method is the reference, and the table says so.
    results = cdfsl.main([*args, "--out", str(tmp_path / "out")])
    assert results["reference"] == "scratch+proto" == results["config"]["reference"]
    assert results["methods"]["scratch+knn"]["paired"]["reference"] == "scratch+proto"
    assert "difference to scratch+proto with" in capsys.readouterr().out


def test_a_sweep_names_each_rows_reference() -> None:
    cfg = tiny_config(methods=["imagenet", "scratch"], reference="imagenet")
    assert job_config(cfg, "retinamnist", 0, 2).reference == "imagenet"
    assert job_config(cfg, "adrenalmnist3d", 0, 3).reference == "scratch"  # imagenet is 2D only
    rows = [{"target": "retina", "reference": "imagenet"}, {"target": "adrenal3d", "reference": "scratch"}]
    assert reference_label(rows) == "imagenet (retina); scratch (adrenal3d)"
    assert reference_label(rows[:1]) == "imagenet"
    with pytest.raises(ValueError, match=re.escape("'scratch+prot' is not one of the methods run")):
        job_config(cfg.replace(reference="scratch+prot"), "retinamnist", 0, 2)


USER_MODULE = '''
import torch
from medmeta.methods import AdaptationRule, FrozenFeatureRule, Prototypes


class Nudge(AdaptationRule):
    """Changes the backbone it was given (a bug): every later episode and method would see it."""

    name = "nudge"

    def predict(self, backbone, episode, seed):
        with torch.no_grad():
            next(backbone.parameters()).add_(0.01)
        return torch.zeros(len(episode.query_x), episode.num_outputs)


class Raises(Prototypes):
    def scores(self, support, support_y, query, episode):
        raise RuntimeError("my bug\\non two lines")


class NotATensor(Prototypes):
    def scores(self, support, support_y, query, episode):
        return [[0.0] * episode.num_outputs] * len(query)


class NeedsArguments(Prototypes):
    def __init__(self, temperature):
        super().__init__()
'''


def test_a_rule_that_changes_the_backbone_fails_and_nothing_of_it_is_kept(synthetic: Synthetic, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "user_rules.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MethodError, match="changed the backbone it was given") as info:
        run(synthetic, tmp_path, "out", ["scratch+user_rules:Nudge", "scratch+proto"], **{"episodes.chunk": 1})
    assert "method scratch+user_rules:Nudge (module user_rules)" in str(info.value)
    methods = tmp_path / "out" / "methods"
    assert not list(methods.glob("*.json")) and not list(methods.glob("partial/*.json"))


@pytest.mark.parametrize("method, said", [
    ("scratch+user_rules:Raises", "Raises.predict (module user_rules) raised RuntimeError: my bug on two lines"),
    ("scratch+user_rules:NotATensor", "(module user_rules) returned a list for episode 0"),
    ("scratch+user_rules:NeedsArguments", "building NeedsArguments() (module user_rules) raised TypeError"),
    ("scratch+broken_import:Rule", "importing module 'broken_import' raised ValueError: no config"),
    ("scratch+broken_attribute:Rule", "importing module 'broken_attribute' raised AttributeError"),
    ("scratch+missing_dependency:Rule", "importing module 'missing_dependency' raised ModuleNotFoundError"),
])
def test_errors_in_a_users_method_are_one_line_naming_it(synthetic: Synthetic, tmp_path: Path, capsys,
                                                        monkeypatch: pytest.MonkeyPatch, method: str, said: str) -> None:
    (tmp_path / "user_rules.py").write_text(USER_MODULE)
    (tmp_path / "broken_import.py").write_text("raise ValueError('no config')\nclass Rule: pass\n")
    (tmp_path / "broken_attribute.py").write_text("import os\nPATH = os.no_such_thing\nclass Rule: pass\n")
    (tmp_path / "missing_dependency.py").write_text("import no_such_package_here\nclass Rule: pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDMETA_MANIFEST", str(synthetic.manifest_path))
    args = ["--target", "toyclass", "--config", "smoke", "--methods", f"scratch+proto,{method}", "--episodes", "2",
            "--set", "episodes.min_class_samples=null", "--set", "episodes.queries=2", "--root", str(tmp_path / "root"),
            "--source-dir", str(synthetic.source_dir), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as info:
        cdfsl.main(args)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2 and said in err and method in err, err
    with pytest.raises(PluginError) as debug:  # --debug keeps the traceback, the user's exception chained
        cdfsl.main([*args, "--debug"])
    if "returned a list" not in said:
        assert debug.value.__cause__ is not None


def test_help_lists_the_initialisations_and_rules(capsys) -> None:
    with pytest.raises(SystemExit):
        cdfsl.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "initialisations scratch, pretrained, imagenet, checkpoint, mmpt, maml" in text
    assert "rules finetune, linear, knn, proto, lpft, inner" in text


def test_compare_pairs_only_the_same_episodes(synthetic: Synthetic, tmp_path: Path, capsys) -> None:
    run(synthetic, tmp_path, "all", ["scratch+proto"])
    run(synthetic, tmp_path, "train", ["scratch+proto"], **{"episodes.split": "train"})
    run(synthetic, tmp_path, "all2", ["scratch+proto", "scratch+knn"], **{"episodes.count": 2})
    spec = {name: f"{tmp_path / name / 'results.json'}:scratch+proto" for name in ("all", "train", "all2")}
    rows = compare.main([spec["all"], spec["all2"]])  # a shorter run of the same set pairs on its episodes
    assert rows[0]["episodes"] == 2 and rows[0]["auroc_diff"]["identical"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        compare.main([spec["all"], spec["train"]])
    err = capsys.readouterr().err
    assert "different episode sets" in err and len(err.strip().splitlines()) == 1
    # Runs written before digests were recorded: refused when their split differs.
    for name in ("all", "train"):
        path = tmp_path / name / "results.json"
        saved = json.loads(path.read_text())
        for key in ("digest", "episode_digests", "size"):
            del saved["episode_set"][key]
        path.write_text(json.dumps(saved))
    with pytest.raises(SystemExit):
        compare.main([spec["all"], spec["train"]])
    assert "different episode sets" in capsys.readouterr().err


def test_repeated_seeds_are_refused_by_cdfsl_and_a_sweep(tmp_path: Path, capsys) -> None:
    from medmeta.evaluation.sweep import Sweep

    with pytest.raises(SystemExit) as info:
        cdfsl.main(["--target", "retina", "--seeds", "0,0", "--root", str(tmp_path / "root")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "seeds must be distinct; 0 is given twice" in err.strip().splitlines()[-1]
    with pytest.raises(ValueError, match="give distinct seeds"):
        Sweep(tiny_config(), ["retina"], [1, 1], tmp_path / "sweep", root=str(tmp_path / "root"))


def test_repeated_episode_indices_are_refused(synthetic: Synthetic, tmp_path: Path) -> None:
    run(synthetic, tmp_path, "out", ["scratch+proto"])
    path = episode_file(tmp_path, "out")
    doc = json.loads(path.read_text())
    del doc["digest"]
    doc["episodes"][1]["index"] = doc["episodes"][0]["index"]
    path.write_text(json.dumps(doc))
    with pytest.raises(EpisodeError, match="episode index 0 is used by more than one episode"):
        load_episode_set(path)


def test_a_weights_file_keys_only_the_methods_that_load_it(tmp_path: Path) -> None:
    import torch

    from medmeta.evaluation.protocol import model_identity
    from medmeta.learning.models import ModelConfig, build_backbone
    from medmeta.methods import MMPT, Pretrained, Scratch
    from medmeta.learning.pretrain import PretrainConfig

    weights = tmp_path / "w.pth"
    torch.save(build_backbone("resnet18").state_dict(), weights)
    plain, with_file = ModelConfig(), ModelConfig(weights=str(weights))
    for init in (Scratch(), MMPT()):  # do not load it: --weights for another method retrains nothing here
        assert model_identity(with_file, init) == model_identity(plain, init)
    for init in (Pretrained(), MMPT(PretrainConfig(init="pretrained"))):
        first = model_identity(with_file, init)
        assert "weights_sha256" in first and str(weights) not in json.dumps(first)
        moved = tmp_path / "moved.pth"
        moved.write_bytes(weights.read_bytes())
        assert model_identity(ModelConfig(weights=str(moved)), init) == first  # by content, not path


def test_a_sweep_reruns_a_job_whose_weights_file_was_replaced(synthetic: Synthetic, tmp_path: Path) -> None:
    import torch

    from medmeta.evaluation.sweep import Sweep
    from medmeta.learning.models import build_backbone

    weights = tmp_path / "w.pth"
    torch.manual_seed(0)
    torch.save(build_backbone("test_resnet").state_dict(), weights)
    cfg = tiny_config(target="toyclass", methods=["pretrained+proto"], sources="available",
                      **{**FAST, "model.arch": "test_resnet", "model.weights": str(weights)})

    def sweep() -> dict:
        return Sweep(cfg, ["toyclass"], [0], tmp_path / "sweep", root=str(tmp_path / "root"),
                     source_dir=str(synthetic.source_dir), manifests=(str(synthetic.manifest_path),)).run()

    first = sweep()
    torch.manual_seed(1)
    torch.save(build_backbone("test_resnet").state_dict(), weights)  # same path, other weights
    second = sweep()
    assert first["table"][0]["auroc"] != second["table"][0]["auroc"]


def test_a_backbone_moved_or_cast_counts_as_changed() -> None:
    from medmeta.learning.models import changed_state, state_snapshot

    net = torch_nn().double()
    snapshot = state_snapshot(net)
    assert changed_state(net, snapshot) == []
    net.float()
    assert changed_state(net, snapshot) == ["bias", "weight"]


def torch_nn():
    from torch import nn

    return nn.Linear(2, 2)


def test_a_sweep_table_marks_transductive_methods(synthetic: Synthetic, tmp_path: Path) -> None:
    from medmeta.evaluation.sweep import Sweep, format_combined

    cfg = tiny_config(target="toyclass", methods=["scratch+proto", "scratch+knn"], sources="available",
                      **{**FAST, "adaptation.knn.bn": "transductive"})
    combined = Sweep(cfg, ["toyclass"], [0], tmp_path / "sweep", root=str(tmp_path / "root"),
                     source_dir=str(synthetic.source_dir), manifests=(str(synthetic.manifest_path),)).run()
    assert {r["method"]: r["transductive"] for r in combined["table"]} == {"scratch+proto": False, "scratch+knn": True}
    text = format_combined(combined)
    assert "| scratch+knn* |" in text and "* transductive" in text
