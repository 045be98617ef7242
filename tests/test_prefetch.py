"""The loader thread (``runtime.prefetch``): the batches mm-PT and supervised training see are those
of reading each batch in its step, in the same order with the same random state; the thread is
bounded, hands its errors over with their traceback, always ends, and never reads the HDF5 files
while the main thread does."""
from __future__ import annotations

import threading
import time
import traceback
from contextlib import closing
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from medmeta.data.store import Store
from medmeta.data.tasks import MedMNISTTask
from medmeta.learning.models import Classifier
from medmeta.learning.pretrain import MultiTaskPretrainer, PretrainConfig
from medmeta.data.tasks import to_device
from medmeta.learning.runtime import prefetch
from medmeta.learning.supervised import SupervisedConfig, SupervisedTrainer, epoch_batches

from .conftest import Synthetic

CPU = torch.device("cpu")
SOURCES = ("toychest", "toyclass", "toyordinal")


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "medmeta-prefetch"]


class Tiny(nn.Module):
    """A small backbone (grey or RGB 28px images -> 8 features) with BatchNorm, fast on one core."""

    out_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 8, 5, stride=4), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x.mean(1, keepdim=True)))).mean((2, 3))


def tiny() -> Tiny:
    torch.manual_seed(0)
    return Tiny()


@pytest.fixture
def store(tmp_path: Path, synthetic: Synthetic) -> Store:
    store = Store(tmp_path / "root", synthetic.manifest)
    for name in SOURCES:
        store.build(name, 28, source_dir=synthetic.source_dir, download=False)
    return store


def tasks(store: Store, split: str) -> dict[str, MedMNISTTask]:
    """Read from the HDF5 files (not held in memory), as large subsets are."""
    return {n: MedMNISTTask(store, n, split, in_memory=False) for n in SOURCES}


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, list[int], str]]:
    """Every image read (task, split, indices, thread name); fails a test if two reads overlap."""
    log: list[tuple[str, str, list[int], str]] = []
    active, lock = [0], threading.Lock()
    raw_images = MedMNISTTask.raw_images

    def reading(self: MedMNISTTask, indices):  # type: ignore[no-untyped-def]
        with lock:
            active[0] += 1
            overlap = active[0] > 1
        try:
            assert not overlap, "two threads read the store at once"
            time.sleep(0.002)  # widen the window an overlap would need
            log.append((self.task.subset, self.split, np.asarray(indices).tolist(), threading.current_thread().name))
            return raw_images(self, indices)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(MedMNISTTask, "raw_images", reading)
    return log


def reference_draws(trainer: MultiTaskPretrainer, seed: int, count: int) -> list[tuple[str, list[int]]]:
    """mm-PT's batches as its step drew them before the loader thread: a task by the sampling
    rule, then its next indices in epochs of shuffled indices, all from one generator."""
    rng, cursors, size = np.random.default_rng(seed), {}, trainer.config.batch_size
    out = []
    for _ in range(count):
        task_id = trainer.task_ids[int(rng.choice(len(trainer.task_ids), p=trainer.probs))]
        order, pos = cursors.get(task_id, (np.empty(0, np.int64), 0))
        if pos + size > len(order):
            order, pos = rng.permutation(len(trainer.train[task_id])), 0
        cursors[task_id] = (order, pos + size)
        out.append((task_id, np.sort(order[pos:pos + size]).tolist()))
    return out


def recorded_inputs(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(task, images) of every training forward of a ``MultiHeadModel``."""
    seen: list[tuple[str, torch.Tensor]] = []
    model.register_forward_pre_hook(lambda m, args: seen.append((args[1], args[0].clone())) if m.training else None)
    return seen


def pretrainer(store: Store, **config) -> MultiTaskPretrainer:
    settings = dict(steps=40, batch_size=6, eval_every=10**6, checkpoint_every=10**6, val_max=8, bn_batches=1)
    return MultiTaskPretrainer(tiny(), tasks(store, "train"), tasks(store, "val"),
                               PretrainConfig(**{**settings, **config}), CPU, seed=5)


# --- the helper ---------------------------------------------------------------------------------------

def test_prefetch_yields_every_item_in_order_from_another_thread() -> None:
    producers: list[str] = []

    def items() -> Iterator[int]:
        for i in range(50):
            producers.append(threading.current_thread().name)
            yield i

    assert list(prefetch(items(), depth=1)) == list(range(50))
    assert set(producers) == {"medmeta-prefetch"} and not loader_threads()
    assert list(prefetch([], depth=2)) == []
    with pytest.raises(ValueError, match="depth must be >= 1"):
        next(prefetch([1], depth=0))


@pytest.mark.parametrize("depth", [1, 2])
def test_prefetch_runs_at_most_depth_items_ahead(depth: int) -> None:
    produced = [0]

    def items() -> Iterator[int]:
        while True:
            produced[0] += 1
            yield produced[0]

    with closing(prefetch(items(), depth)) as source:
        assert next(source) == 1
        deadline = time.monotonic() + 10
        while produced[0] < depth + 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        # one taken, ``depth`` queued and one waiting to be queued; no more
        assert produced[0] == depth + 2
    assert not loader_threads()


def test_an_error_in_the_thread_is_raised_in_the_consumer_with_its_traceback() -> None:
    def broken_loader() -> Iterator[int]:
        yield 1
        yield 2
        raise OSError("chunk 7 failed its checksum")

    source = prefetch(broken_loader())
    assert next(source) == 1 and next(source) == 2
    with pytest.raises(OSError, match="chunk 7") as caught:
        next(source)
    assert "broken_loader" in [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert not loader_threads()


def test_the_thread_ends_when_the_consumer_stops_or_fails() -> None:
    closed = []

    def endless() -> Iterator[int]:
        try:
            i = 0
            while True:
                i += 1
                yield i
        finally:
            closed.append(threading.current_thread().name)

    with closing(prefetch(endless())) as source:
        assert next(source) == 1
    assert not loader_threads() and closed == ["MainThread"]  # closed here, after the thread ended
    with pytest.raises(RuntimeError, match="the step failed"):
        with closing(prefetch(endless(), depth=1)) as source:
            for i in source:
                if i == 3:
                    raise RuntimeError("the step failed")
    assert not loader_threads() and len(closed) == 2


def test_host_batch_then_to_device_is_get_batch(store: Store) -> None:
    ds = tasks(store, "train")["toyclass"]
    idx = np.array([0, 3, 7, 8])
    for got, want in zip(to_device(ds.host_batch(idx, CPU), CPU), ds.get_batch(idx, CPU)):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_batch_then_to_device_is_get_batch_on_cuda(store: Store) -> None:
    from medmeta.data.transforms import PadTo

    cuda = torch.device("cuda")
    idx = np.array([0, 3, 7, 8])
    for transform in (None, PadTo(32)):
        ds = MedMNISTTask(store, "toyclass", "train", transform=transform, in_memory=False)
        [batch] = list(prefetch(ds.host_batch(idx, cuda) for _ in range(1)))  # pinned in the loader thread
        assert batch[0].is_pinned() and batch[0].dtype == (torch.uint8 if transform is None else torch.float32)
        for got, want in zip(to_device(batch, cuda), ds.get_batch(idx, cuda)):
            assert got.device == want.device and torch.equal(got, want)


# --- mm-PT --------------------------------------------------------------------------------------------

def test_mmpt_trains_on_the_same_batches_with_and_without_the_loader_thread(store: Store, reads: list) -> None:
    models, inputs = [], []
    for prefetched in (False, True):
        trainer = pretrainer(store)
        inputs.append(recorded_inputs(trainer.model))
        reads.clear()
        losses = [float(loss) for _, loss in trainer.train_steps(40, prefetch_batches=prefetched)]
        threads = {name for *_, name in reads}
        assert threads == ({"medmeta-prefetch"} if prefetched else {"MainThread"})
        assert [(task, idx) for task, _, idx, _ in reads] == reference_draws(trainer, 5, 40)
        models.append((trainer.model.state_dict(), trainer.rng.bit_generator.state, trainer.cursors, losses))
        assert not loader_threads()
    assert len(inputs[0]) == len(inputs[1]) == 40
    for (task_a, x_a), (task_b, x_b) in zip(*inputs):
        assert task_a == task_b and torch.equal(x_a, x_b)
    (state_a, rng_a, cursors_a, losses_a), (state_b, rng_b, cursors_b, losses_b) = models
    assert rng_a == rng_b and losses_a == losses_b
    assert all(np.array_equal(cursors_a[t][0], cursors_b[t][0]) and cursors_a[t][1] == cursors_b[t][1] for t in SOURCES)
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def test_a_step_takes_over_the_random_state_its_batch_was_drawn_with(store: Store) -> None:
    """The thread runs ahead, but after each step the pretrainer's state (what a checkpoint saves)
    is the state after that step's draw: stopping after 3 of 10 steps and going on is exact."""
    straight = pretrainer(store)
    states = []
    for _ in straight.train_steps(10, prefetch_batches=False):
        states.append(straight.rng.bit_generator.state)
    stopped = pretrainer(store)
    with closing(stopped.train_steps(10)) as steps:
        for i, _ in enumerate(steps):
            assert stopped.rng.bit_generator.state == states[i]
            if i == 2:
                break
    time.sleep(0.1)  # the thread, had it drawn from the pretrainer's own generator, would be ahead by now
    assert stopped.step == 3 and stopped.rng.bit_generator.state == states[2] and not loader_threads()
    for _ in stopped.train_steps(7):
        pass
    assert stopped.rng.bit_generator.state == states[-1]
    for a, b in zip(straight.model.state_dict().values(), stopped.model.state_dict().values()):
        assert torch.equal(a, b)


def test_mmpt_run_reads_beside_no_validation_and_trains_every_batch_in_order(store: Store, reads: list,
                                                                              tmp_path: Path) -> None:
    trainer = pretrainer(store, steps=23, eval_every=7, checkpoint_every=5)
    trainer.checkpoint = tmp_path / "mmpt.pt"
    trainer.run()
    training = [(task, idx) for task, split, idx, name in reads if name == "medmeta-prefetch"]
    assert training == reference_draws(trainer, 5, 23)
    assert {split for _, split, _, name in reads if name == "MainThread"} == {"train", "val"}  # BatchNorm, validation
    assert [h["step"] for h in trainer.history] == [7, 14, 21] and not loader_threads()


def test_a_read_error_in_the_loader_thread_stops_mmpt_with_its_traceback(store: Store,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = pretrainer(store, steps=20)
    raw_images, calls = MedMNISTTask.raw_images, [0]

    def failing(self: MedMNISTTask, indices):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == 4:
            raise OSError("a chunk failed its checksum")
        return raw_images(self, indices)

    monkeypatch.setattr(MedMNISTTask, "raw_images", failing)
    with pytest.raises(OSError, match="failed its checksum") as caught:
        trainer.run()
    assert "host_batch" in [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert trainer.step == 3 and not loader_threads()


# --- supervised training ------------------------------------------------------------------------------

def supervised(store: Store, prefetched: bool) -> SupervisedTrainer:
    data = tasks(store, "train")["toyclass"], tasks(store, "val")["toyclass"]
    model = Classifier(tiny(), 4)
    return SupervisedTrainer(model, *data, SupervisedConfig(epochs=3, batch_size=7), CPU, seed=2,
                             prefetch_batches=prefetched)


def test_supervised_training_sees_the_same_batches_with_and_without_the_loader_thread(store: Store,
                                                                                       reads: list) -> None:
    results = []
    for prefetched in (False, True):
        trainer = supervised(store, prefetched)
        seen: list[torch.Tensor] = []
        trainer.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()) if m.training else None)
        reads.clear()
        best = trainer.run()
        train_reads = [idx for _, split, idx, _ in reads if split == "train"]
        rng = np.random.default_rng(2)
        expected = [np.sort(b).tolist() for _ in range(3) for b in epoch_batches(rng.permutation(60), 7)]
        assert train_reads == expected
        assert {name for _, split, _, name in reads if split == "train"} == (
            {"medmeta-prefetch"} if prefetched else {"MainThread"})
        assert {name for _, split, _, name in reads if split == "val"} == {"MainThread"}
        results.append((seen, trainer.model.state_dict(), best["history"]))
        assert 0 <= best["data_share"] < 1 and not loader_threads()
    (seen_a, state_a, history_a), (seen_b, state_b, history_b) = results
    assert len(seen_a) == len(seen_b) == 27 and all(torch.equal(a, b) for a, b in zip(seen_a, seen_b))
    assert history_a == history_b
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
