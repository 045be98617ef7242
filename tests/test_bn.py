"""Frozen features' BatchNorm statistics (issue 30): each ``bn`` mode uses exactly the images it
names, the default follows the kind of initialisation, and the protocol records the mode."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from medmeta.episodes import Episode
from medmeta.evaluation import run_protocol
from medmeta.learning.finetune import WorkingCopy, frozen_features, source_statistics
from medmeta.learning.models import reestimate_batchnorm
from medmeta.methods import KNN, LPFT, MMPT, LinearProbe, MAMLInit, Method, Prototypes, Scratch
from medmeta.tasktype import TaskType

from .conftest import Synthetic, tiny_config
from .test_rules import SmallBN, random_episode


def episodes() -> tuple[Episode, Episode]:
    """An episode, and the same one with its first query image changed."""
    ep = random_episode(TaskType.MULTI_CLASS, torch.Generator().manual_seed(3))
    other = Episode(ep.support_x, ep.support_y, torch.cat([ep.query_x[:1] * 5 + 2, ep.query_x[1:]]), None,
                    ep.task_type, ep.classes)
    return ep, other


def trained_net() -> nn.Module:
    """A SmallBN whose running statistics are not the defaults (as a pretrained backbone's)."""
    torch.manual_seed(0)
    net = SmallBN()
    reestimate_batchnorm(net, [torch.rand(16, 1, 8, 8) * 3 + 1])
    return net


def test_own_features_are_an_eval_forward_of_the_untouched_backbone() -> None:
    net = trained_net()
    ep, other = episodes()
    support, query = frozen_features(WorkingCopy(net).reset(), ep, "own")
    with torch.no_grad():
        torch.testing.assert_close(support, net.eval()(ep.support_x), rtol=0, atol=0)
        torch.testing.assert_close(query, net(ep.query_x), rtol=0, atol=0)
    # Inductive: a changed query image changes nothing else.
    support2, query2 = frozen_features(WorkingCopy(net).reset(), other, "own")
    torch.testing.assert_close(support2, support, rtol=0, atol=0)
    torch.testing.assert_close(query2[1:], query[1:], rtol=0, atol=0)


def test_support_and_transductive_use_exactly_the_images_they_name() -> None:
    net = trained_net()
    ep, other = episodes()
    by_hand = copy.deepcopy(net)
    reestimate_batchnorm(by_hand, [torch.cat([ep.support_x, ep.query_x])])
    support, query = frozen_features(WorkingCopy(net).reset(), ep, "transductive")
    with torch.no_grad():
        torch.testing.assert_close(support, by_hand.eval()(ep.support_x))
        torch.testing.assert_close(query, by_hand(ep.query_x))
    # Transductive statistics include the query: changing a query image moves the support's features,
    support2, _ = frozen_features(WorkingCopy(net).reset(), other, "transductive")
    assert not torch.allclose(support2, support)
    # while the support's own statistics do not see it.
    a, _ = frozen_features(WorkingCopy(net).reset(), ep, "support")
    b, _ = frozen_features(WorkingCopy(net).reset(), other, "support")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, support)  # and the three modes differ
    own, _ = frozen_features(WorkingCopy(net).reset(), ep, "own")
    assert not torch.allclose(own, a)


@pytest.mark.parametrize("bn", ["own", "support", "transductive", "sources"])
@pytest.mark.parametrize("rule", [LinearProbe, KNN, Prototypes])
def test_every_mode_leaves_the_backbone_alone(rule, bn: str) -> None:
    net = trained_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ep, _ = episodes()
    scores = rule(bn=bn).predict_many(net, [ep, ep], [0, 0])
    torch.testing.assert_close(scores[0], scores[1])
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_the_default_follows_the_initialisation() -> None:
    from medmeta.methods import Checkpoint, Initialisation, Pretrained

    shared = LinearProbe()  # one rule object serves several methods (as builtin_rules gives it)
    expected = [(Scratch(), "own"), (MMPT(), "sources"), (MAMLInit(), "support"), (Pretrained(), "own"),
                (Checkpoint(), "own")]
    for init, mode in expected:
        assert init.frozen_bn == mode
        assert Method(init, shared).rule.bn == mode
        assert Method(init, KNN()).rule.settings()["bn"] == mode
        assert Method(init, LPFT()).rule.probe.bn == mode
    assert shared.bn == "auto"  # not changed for the next method
    assert Method(MMPT(), LinearProbe(bn="transductive")).rule.bn == "transductive"  # an explicit mode stays
    assert Method(MMPT(), LinearProbe(bn="transductive")).rule.transductive
    with pytest.raises(ValueError, match="resolved by for_initialisation"):
        LinearProbe().predict(SmallBN(), episodes()[0], seed=0)

    class Broken(Scratch):
        frozen_bn = "sources"  # a random init has no sources to take statistics from

    with pytest.raises(ValueError, match="sources only for an initialisation trained on the sources"):
        Method(Broken(), LinearProbe())
    assert issubclass(Broken, Initialisation)


def test_source_statistics_weigh_each_source_alike(synthetic: Synthetic, tmp_path: Path) -> None:
    from medmeta.data.store import Store
    from medmeta.data.tasks import MedMNISTTask

    store = Store(tmp_path / "root", synthetic.manifest)
    for name in ("toybinary", "toychest"):
        store.build(name, 28, source_dir=synthetic.source_dir)
    train = {n: MedMNISTTask(store, n, "train") for n in ("toybinary", "toychest")}
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten())
    got = source_statistics(net, train, seed=0)
    assert torch.equal(net[1].running_mean, torch.zeros(4))  # the given backbone is not changed
    # By hand: each source's images in one batch (fewer than a batch each), their statistics averaged.
    per_source = []
    for n in sorted(train):
        x = train[n].get_batch(range(len(train[n])))[0]
        layer = copy.deepcopy(net)
        reestimate_batchnorm(layer, [x])
        per_source.append(layer[1].running_mean)
    torch.testing.assert_close(got[1].running_mean, torch.stack(per_source).mean(0))
    assert not got.training


def test_the_protocol_records_the_mode_refuses_sources_for_scratch_and_marks_transduction(
        synthetic: Synthetic, tmp_path: Path, capsys) -> None:
    def run(methods: list[str], **extra) -> dict:
        cfg = tiny_config(target="toyclass", methods=methods,
                          **{"episodes.min_class_samples": None, "episodes.queries": 2, "episodes.count": 2, **extra})
        return run_protocol(cfg, tmp_path / "out", root=tmp_path / "root", source_dir=str(synthetic.source_dir),
                            manifest=synthetic.manifest)

    first = run(["scratch+proto", "mmpt+proto"])
    assert first["methods"]["scratch+proto"]["settings"]["rule"]["bn"] == "own"
    assert first["methods"]["mmpt+proto"]["settings"]["rule"]["bn"] == "sources"
    again = run(["scratch+proto", "mmpt+proto"], **{"adaptation.proto.bn": "transductive"})
    assert again["methods"]["scratch+proto"]["per_episode"] != first["methods"]["scratch+proto"]["per_episode"]
    assert again["methods"]["scratch+proto"]["transductive"] and not first["methods"]["scratch+proto"]["transductive"]
    assert "scratch+proto*" in capsys.readouterr().out
    cached = json.loads((tmp_path / "out" / "methods" / "scratch+proto.json").read_text())
    assert cached["result"]["settings"]["rule"]["bn"] == "transductive"
    own = run(["mmpt+proto"], **{"adaptation.proto.bn": "own"})
    assert own["methods"]["mmpt+proto"]["per_episode"] != first["methods"]["mmpt+proto"]["per_episode"]
    with pytest.raises(ValueError, match="bn=sources takes BatchNorm statistics from the sources"):
        run(["scratch+proto"], **{"adaptation.proto.bn": "sources"})


def test_the_bn_mode_table_runs_every_mode_and_collects_it_again(synthetic: Synthetic, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import bn_modes

    monkeypatch.setenv("MEDMETA_MANIFEST", str(synthetic.manifest_path))
    args = ["--target", "toyclass", "--inits", "scratch,mmpt", "--config", "smoke", "--episodes", "2",
            "--sources", "available", "--set", "episodes.queries=2", "--set", "episodes.min_class_samples=null", "--set", "device=cpu",
            "--root", str(tmp_path / "root"), "--source-dir", str(synthetic.source_dir), "--out", str(tmp_path / "bn")]
    doc = bn_modes.main(args)
    rows = {(r["init"], r["rule"], r["bn"]): r for r in doc["rows"]}
    assert {(i, b) for i, _, b in rows} == {("scratch", "support"), ("scratch", "own"), ("scratch", "transductive"),
                                            ("mmpt", "support"), ("mmpt", "own"), ("mmpt", "transductive"),
                                            ("mmpt", "sources")}
    assert all(r["auroc_diff"] == 0 for (i, _, b), r in rows.items() if b == "support")  # paired with itself
    assert len(list((tmp_path / "bn" / "pretrained").glob("mmpt-*"))) == 1  # trained once for every mode
    assert bn_modes.main([*args, "--collect"])["rows"] == doc["rows"]
    assert "| toyclass | mmpt+linear |" in (tmp_path / "bn" / "table.md").read_text()


def test_bn_is_keyword_only_so_rule_settings_keep_their_positions() -> None:
    from dataclasses import dataclass

    from medmeta.methods import FrozenFeatureRule

    assert LinearProbe(0.5).c == 0.5 and KNN(3).k == 3 and Prototypes("cosine").metric == "cosine"

    @dataclass
    class Mine(FrozenFeatureRule):
        temperature: float

    assert Mine(2.0).temperature == 2.0 and Mine(2.0, bn="own").bn == "own"
