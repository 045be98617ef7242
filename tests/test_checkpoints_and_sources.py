"""mm-PT and MAML on synthetic subsets: multi-label sources, per-task BatchNorm at validation,
checkpoints bound to their config, and a multi-label target through the whole protocol."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medmeta.data.store import Store
from medmeta.data.tasks import MedMNISTTask
from medmeta.episodes import MultiTaskEpisodeSampler
from medmeta.evaluation import run_protocol
from medmeta.learning.maml import MAMLConfig, train_maml
from medmeta.learning.models import build_backbone
from medmeta.learning.pretrain import MultiTaskPretrainer, PretrainConfig

from .conftest import Synthetic, tiny_config

CPU = torch.device("cpu")


@pytest.fixture
def store(tmp_path: Path, synthetic: Synthetic) -> Store:
    store = Store(tmp_path / "root", synthetic.manifest)
    for name in ("toybinary", "toyclass", "toyordinal", "toychest"):
        store.build(name, 28, source_dir=synthetic.source_dir, download=False)
    return store


def _sources(store: Store, split: str, names=("toychest", "toyclass")) -> dict[str, MedMNISTTask]:
    return {n: MedMNISTTask(store, n, split) for n in names}


def _backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("resnet18", stem="imagenet")


def test_mmpt_with_a_multilabel_source_validates_each_task_with_its_own_batchnorm(store: Store) -> None:
    config = PretrainConfig(steps=4, batch_size=8, eval_every=4, val_max=12, bn_batches=2, checkpoint_every=4)
    trainer = MultiTaskPretrainer(_backbone(), _sources(store, "train"), _sources(store, "val"), config, CPU)
    trainer.run()
    assert trainer.history[-1]["step"] == 4 and np.isfinite(trainer.history[-1]["toychest/auroc"])
    scores = trainer.validate()
    # Validation must not depend on the running statistics left by training (the task trained
    # last), and must leave them as they were.
    bns = [m for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.running_mean.normal_(3.0, 1.0)
        m.running_var.uniform_(0.01, 0.1)
    skewed = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.validate() == scores
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, skewed[k]), k


def test_mmpt_checkpoint_of_another_config_is_refused_and_more_steps_resume(store: Store, tmp_path: Path) -> None:
    train, val = _sources(store, "train"), _sources(store, "val")
    config = PretrainConfig(steps=2, batch_size=8, eval_every=2, val_max=12, bn_batches=1, checkpoint_every=2)
    ckpt = tmp_path / "mmpt.pt"
    MultiTaskPretrainer(_backbone(), train, val, config, CPU, checkpoint=ckpt).run()
    other = config.replace(lr=1e-4)
    with pytest.raises(ValueError, match=r"another training config \(lr: 0\.001 in the checkpoint, 0\.0001 now\)"):
        MultiTaskPretrainer(_backbone(), train, val, other, CPU, checkpoint=ckpt)
    with pytest.raises(ValueError, match="tasks: "):
        MultiTaskPretrainer(_backbone(), {"toychest": train["toychest"]}, val, config, CPU, checkpoint=ckpt)
    longer = MultiTaskPretrainer(_backbone(), train, val, config.replace(steps=4), CPU, checkpoint=ckpt)
    assert longer.step == 2


def test_maml_with_a_multilabel_source_and_checkpoint_binding(store: Store, tmp_path: Path) -> None:
    train = _sources(store, "train")
    config = MAMLConfig(steps=2, meta_batch=2, inner_steps=1, max_shot=2, n_query=2, first_order=True,
                        checkpoint_every=1)
    # min_class_samples = max_shot + n_query is passed for every source, multi-label ones included.
    maml = train_maml(_backbone(), train, config, CPU, checkpoint=tmp_path / "maml.pt")
    assert torch.load(tmp_path / "maml.pt", weights_only=False)["step"] == 2
    assert maml.backbone is not None
    with pytest.raises(ValueError, match=r"inner_lr: 0\.1 in the checkpoint, 0\.05 now"):
        train_maml(_backbone(), train, config.replace(inner_lr=0.05), CPU, checkpoint=tmp_path / "maml.pt")


def test_maml_reads_float_episodes_on_a_cpu(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """uint8 episodes only move the conversion on a CPU: there MAML reads float32, so its runs are
    those of earlier versions bit for bit (on a GPU it reads uint8 and converts there)."""
    asked = []
    read = MultiTaskEpisodeSampler.episode

    def spy(self, index, device=None, dtype=torch.float32):
        asked.append(dtype)
        return read(self, index, device, dtype)

    monkeypatch.setattr(MultiTaskEpisodeSampler, "episode", spy)
    config = MAMLConfig(steps=2, meta_batch=2, inner_steps=1, max_shot=2, n_query=2, first_order=True)
    train_maml(_backbone(), _sources(store, "train"), config, CPU)
    assert asked == [torch.float32] * 4


def _tiny(**overrides):
    return tiny_config(**{"episodes.queries": 2, "episodes.shots": 2, **overrides})


def test_multilabel_target_and_source_through_the_protocol(synthetic: Synthetic, tmp_path: Path) -> None:
    root, src = str(tmp_path / "root"), str(synthetic.source_dir)
    chest = synthetic.arrays[("toychest", 28)]
    labels = np.concatenate([chest[f"{s}_labels"] for s in ("train", "val", "test")])
    minimum = int(np.sort(np.minimum(labels.sum(0), len(labels) - labels.sum(0)))[1])
    cfg = _tiny(target="toychest", methods=["scratch", "mmpt", "maml"], sources="default",
                **{"episodes.min_class_samples": minimum})
    results = run_protocol(cfg, tmp_path / "chest", root=root, source_dir=src, manifest=synthetic.manifest)
    kept = int((np.minimum(labels.sum(0), len(labels) - labels.sum(0)) >= minimum).sum())
    assert len(results["episode_set"]["dropped"]) == 4 - kept
    for method in ("scratch", "mmpt", "maml"):
        assert results["methods"][method]["summary"]["episodes"] == 3
    # A multi-label source for mm-PT and MAML: target toyordinal pretrains on toychest too.
    cfg = _tiny(target="toyordinal", methods=["mmpt", "maml"], sources="default",
                **{"episodes.min_class_samples": None})
    results = run_protocol(cfg, tmp_path / "ordinal", root=root, source_dir=src, manifest=synthetic.manifest)
    assert "toychest" in results["sources"]
    assert all(results["methods"][m]["summary"]["episodes"] == 3 for m in ("mmpt", "maml"))


def test_a_changed_training_config_trains_afresh_in_the_same_folder(synthetic: Synthetic, tmp_path: Path) -> None:
    root, src, out = str(tmp_path / "root"), str(synthetic.source_dir), tmp_path / "run"
    cfg = _tiny(target="toyordinal", methods=["mmpt"], sources=["toychest"], **{"episodes.min_class_samples": None})
    run_protocol(cfg, out, root=root, source_dir=src, manifest=synthetic.manifest)
    changed = _tiny(target="toyordinal", methods=["mmpt"], sources=["toychest"],
                    **{"episodes.min_class_samples": None, "pretrain.lr": 1e-4})
    run_protocol(changed, out, root=root, source_dir=src, manifest=synthetic.manifest)
    runs = sorted(p.parent for p in (out / "pretrained").glob("mmpt-*/checkpoint.pt"))
    assert len(runs) == 2
    configs = [torch.load(p / "checkpoint.pt", weights_only=False)["identity"]["lr"] for p in runs]
    assert sorted(configs) == [1e-4, 1e-3]


def test_mmpt_logs_every_steps_loss_though_it_reads_them_from_the_device_in_groups(store: Store) -> None:
    class Writer:
        def __init__(self) -> None:
            self.scalars: list[tuple[str, float, int]] = []

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            self.scalars.append((tag, value, step))

    writer = Writer()
    # steps 21-30 are read only by the flush after the loop (no evaluation, no checkpoint there)
    config = PretrainConfig(steps=30, batch_size=4, eval_every=20, val_max=8, bn_batches=1, checkpoint_every=30)
    MultiTaskPretrainer(_backbone(), _sources(store, "train"), _sources(store, "val"), config, CPU,
                        writer=writer).run()  # type: ignore[arg-type]
    losses = [(tag, value, step) for tag, value, step in writer.scalars if tag.startswith("pretrain/loss/")]
    assert [step for _, _, step in losses] == list(range(1, 31))
    assert all(isinstance(v, float) and np.isfinite(v) and v > 0 for _, v, _ in losses)
    assert {tag for tag, _, _ in losses} <= {"pretrain/loss/toychest", "pretrain/loss/toyclass"}
