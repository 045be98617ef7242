"""Episodic samplers: support and query indices drawn reproducibly from tasks.

An episode is a pure function of (task, split, seed, episode index) and the sampler's
settings. Indices are drawn in blocks of ``BLOCK`` episodes from one generator seeded with
``[seed, crc32(task_id), crc32(split), block]``, vectorised over the block; images are then
read with one ``dataset.get_batch`` gather per group of consecutive episodes, so the
transform is applied per image and nothing depends on the process or the number of
DataLoader workers. Fixed evaluation sets are stored as JSON lists of indices
(``save_episode_set``), which also protects them from changes in numpy's random streams.

Label conventions are in ``episodes.episode``.

Multi-label episodes use greedy set sampling. Support: visit the kept labels in random
order; for each, if the samples chosen so far hold fewer than K of its positives, add the
missing number drawn uniformly from its positives not yet chosen, then do the same for its
negatives. Then a removal pass, as MedIMeta's torchcross does: visit the chosen samples in
random order and drop each one whose removal still leaves every label with at least K
positives and K negatives (on ChestX-ray14-like prevalences this takes a 5-shot support from
about 56 to about 43 images; torchcross reports 44). The query repeats both steps with n_query, drawing only from
samples outside the (pruned) support. Every random choice comes from the episode's generator,
so episodes stay reproducible.
Guarantees: every label ends with at least K positives and K negatives in the support
(n_query in the query); the support holds at most 2*K*L samples and the query at most
2*n_query*L; the two are disjoint; no sample can be removed without breaking the guarantee.
The sampler first checks that every label has at least K + n_query positives and negatives
in the split (an EpisodeError names the labels that do not). That always suffices for the
support; the query can still fall short when the support happened to take more than K of a
rare label's positives (or negatives), and then an EpisodeError names the label: an episode is
never silently short. Not guaranteed: the smallest possible set (greedy, not optimal).

``min_class_samples`` keeps the classes with at least that many samples (single-label) or
the labels with at least that many positives and as many negatives (multi-label, as
torchcross's ``filter_classes_min_samples``); the sampler's ``dropped`` names the others.
"""
from __future__ import annotations

import zlib
from typing import Any, Callable, Iterator, Literal, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..data.manifest import SPLITS
from ..data.tasks import TaskDescription
from ..errors import EpisodeError
from .episode import Device, Episode, EpisodeSpec, frozen
from .loading import EpisodeDataset, EpisodeSource, collate_episode, materialise
from .sets import EpisodeSet, labels_crc

BLOCK = 128
"""Episodes drawn per random generator. Part of the reproducibility contract: changing it
changes every episode, so it is fixed."""
_MULTI_TASK_TAG = 0x6D756C74  # separates the multi-task generator from single-task ones

NWay = Union[int, Literal["all"], None]

SHOTS, QUERIES, EVALUATION_EPISODES = 5, 10, 100
"""MedIMeta's evaluation protocol (5 labelled images and 10 queries per class, 100 fixed
episodes): the samplers' defaults and the experiment config's."""

TaskWeighting = Literal["proportional", "uniform", "tempered"]
"""How multi-task sampling draws a task: proportional to its size, uniformly, or tempered
(size ** (1 / temperature), a middle ground between the two)."""
TEMPERATURE = 2.0


def crc32_of(text: str) -> int:
    """CRC32 of a string: identical in every process, unlike ``hash()``."""
    return zlib.crc32(text.encode("utf-8"))


def _check_split(split: str) -> None:
    if split not in (*SPLITS, "all"):
        raise EpisodeError(f"unknown split {split!r}; use one of {SPLITS} or 'all'")


def _check_counts(k_shot: int, n_query: int) -> None:
    for name, value in (("k_shot", k_shot), ("n_query", n_query)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise EpisodeError(f"{name} must be an integer >= 1, got {value!r}")


def _distinct(rng: np.random.Generator, n: np.ndarray, m: int) -> np.ndarray:
    """Row r: m distinct integers from range(n[r]), uniformly, in uniformly random order.

    Floyd's algorithm vectorised over rows (m steps whatever n is, exact even when n == m),
    then a shuffle so that any prefix is itself a uniform subset. Picks are held step-major, so
    the membership test reduces across contiguous rows.
    """
    rows = len(n)
    u = rng.random((rows, m))
    out = np.empty((m, rows), dtype=np.int64)
    for s in range(m):
        j = n - (m - s)
        t = (u[:, s] * (j + 1)).astype(np.int64)
        if s:
            t = np.where((out[:s] == t).any(axis=0), j, t)
        out[s] = t
    order = np.argsort(rng.random((rows, m)), axis=1, kind="stable")
    return np.take_along_axis(out.T, order, axis=1)


class _TaskPlan:
    """Per-dataset precomputation: class pools (single-label) or label pools (multi-label)."""

    def __init__(self, dataset: EpisodeSource, need: int, min_class_samples: int | None) -> None:
        self.task: TaskDescription = dataset.task
        self.split: str = dataset.split
        _check_split(self.split)
        self.where = f"{self.task.task_id}/{self.split}"
        labels = np.asarray(dataset.labels)
        if len(labels) != len(dataset):
            raise EpisodeError(f"{self.where}: {len(labels)} labels for {len(dataset)} samples")
        self.multilabel = self.task.task_type.multilabel
        names = self.task.class_names
        if self.multilabel:
            self.y = labels.astype(bool)
            pos = self.y.sum(axis=0)
            neg = len(self.y) - pos
            keep = np.arange(self.y.shape[1]) if min_class_samples is None else np.flatnonzero(
                np.minimum(pos, neg) >= min_class_samples)
            self.dropped = tuple(names[c] for c in range(self.y.shape[1]) if c not in set(keep.tolist()))
            if len(keep) == 0:
                raise EpisodeError(f"{self.where}: no label has min_class_samples={min_class_samples} positives and "
                                 f"as many negatives; lower min_class_samples")
            short = [f"label {c} ({names[c]!r}: {pos[c]} positives, {neg[c]} negatives)"
                     for c in keep if min(pos[c], neg[c]) < need]
            if short:
                raise EpisodeError(
                    f"{self.where}: every label needs at least k_shot + n_query = {need} positives and "
                    f"{need} negatives; too few for {', '.join(short)}. Lower k_shot or n_query, or pass "
                    f"min_class_samples={need} to leave such labels out")
            self.pos = {int(c): np.flatnonzero(self.y[:, c]) for c in keep}
            self.neg = {int(c): np.flatnonzero(~self.y[:, c]) for c in keep}
            self.eligible = keep.astype(np.int64)
            self.min_class_samples = min_class_samples
            return
        if labels.ndim != 1:
            raise EpisodeError(f"{self.where}: expected one label per sample, got shape {labels.shape}")
        counts = np.bincount(labels, minlength=self.task.num_classes)
        if min_class_samples is None:
            eligible = np.arange(len(counts))
        else:
            eligible = np.flatnonzero(counts >= min_class_samples)
        short = [f"class {c} ({names[c] if c < len(names) else '?'!r}) has {counts[c]}"
                 for c in eligible if counts[c] < need]
        if short:
            raise EpisodeError(
                f"{self.where}: {'; '.join(short)} samples, fewer than k_shot + n_query = {need}. Lower k_shot "
                f"or n_query, or pass min_class_samples={need} to leave such classes out")
        self.dropped = tuple(names[c] if c < len(names) else str(c) for c in range(len(counts))
                             if c not in set(eligible.tolist()))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.pool = np.argsort(labels, kind="stable").astype(np.int64)
        self.eligible = eligible.astype(np.int64)
        self.counts = counts[eligible].astype(np.int64)
        self.starts = starts[eligible].astype(np.int64)
        self.min_class_samples = min_class_samples

    @property
    def max_way(self) -> int:
        return len(self.eligible)

    def resolve_way(self, n_way: NWay, strict: bool) -> int:
        """N for this task. ``strict`` (single-task samplers) refuses an n_way that cannot apply."""
        if n_way is not None and n_way != "all" and (
                isinstance(n_way, bool) or not isinstance(n_way, (int, np.integer))):
            raise EpisodeError(f"n_way must be an integer, 'all' or None, got {n_way!r}")
        kind = self.task.task_type
        if not kind.choose_classes:
            full = 2 if kind.binary else self.max_way
            if strict and n_way not in (None, "all") and not (kind.binary and n_way == 2):
                what = "always 2-way (K negatives, K positives)" if kind.binary else "always use every label"
                raise EpisodeError(f"{self.where} is a {kind} task: its episodes are {what}; pass n_way=None")
            if kind.binary and self.max_way < 2:
                raise EpisodeError(f"{self.where}: a binary episode needs both classes, but only {self.max_way} "
                                   f"has at least min_class_samples={self.min_class_samples} samples")
            return full
        rule = "" if self.min_class_samples is None else f" with at least {self.min_class_samples} samples"
        if n_way is None or n_way == "all":
            if self.max_way < 2:
                raise EpisodeError(f"{self.where} has {self.max_way} eligible classes{rule}; an episode needs 2")
            n_way = self.max_way
        if n_way < 2:
            raise EpisodeError(f"n_way must be at least 2, got {n_way}")
        if n_way > self.max_way:
            raise EpisodeError(f"n_way={n_way} but {self.where} has only {self.max_way} eligible classes{rule}")
        return int(n_way)

    def draw(self, rng: np.random.Generator, count: int, n_way: int, k_shot: int, n_query: int
             ) -> tuple[list[tuple[int, ...]], Sequence[np.ndarray], Sequence[np.ndarray]]:
        """``count`` episodes: their classes, support indices and query indices."""
        if self.multilabel:
            out = [self._draw_multilabel(rng, k_shot, n_query) for _ in range(count)]
            classes = tuple(self.eligible.tolist())
            return [classes] * count, [s for s, _ in out], [q for _, q in out]
        n_classes = self.max_way
        if n_way == n_classes:
            chosen = np.broadcast_to(np.arange(n_classes), (count, n_classes))
        else:
            keys = rng.random((count, n_classes))
            chosen = np.sort(np.argpartition(keys, n_way - 1, axis=1)[:, :n_way], axis=1)
        local = _distinct(rng, self.counts[chosen].reshape(-1), k_shot + n_query)
        idx = self.pool[self.starts[chosen].reshape(-1, 1) + local].reshape(count, n_way, -1)
        support = frozen(np.ascontiguousarray(idx[:, :, :k_shot]).reshape(count, -1))
        query = frozen(np.ascontiguousarray(idx[:, :, k_shot:]).reshape(count, -1))
        return list(map(tuple, self.eligible[chosen].tolist())), support, query

    def _draw_multilabel(self, rng: np.random.Generator, k_shot: int, n_query: int
                         ) -> tuple[np.ndarray, np.ndarray]:
        taken = np.zeros(len(self.y), dtype=bool)
        support = self._greedy(rng, k_shot, taken, "support")
        query = self._greedy(rng, n_query, taken, "query")
        return support, query

    def _greedy(self, rng: np.random.Generator, k: int, taken: np.ndarray, role: str) -> np.ndarray:
        """Greedy set sampling, then a removal pass (see the module docstring).

        Build: visit the kept labels in random order; for each, top up its positives, then its
        negatives, to k with samples drawn uniformly from those not yet taken. Counts only grow,
        so every label ends with at least k positives and k negatives.
        Prune (as torchcross does): visit the chosen samples in random order and drop each one
        whose removal leaves every label with at least k positives and k negatives. Dropped
        samples are free again for the query.
        """
        y = self.y[:, self.eligible]
        n_labels = y.shape[1]
        pos_count = np.zeros(n_labels, dtype=np.int64)
        neg_count = np.zeros(n_labels, dtype=np.int64)
        picked = []
        for c in rng.permutation(n_labels):
            label = int(self.eligible[c])
            for positive in (True, False):
                need = k - (pos_count[c] if positive else neg_count[c])
                if need <= 0:
                    continue
                pool = self.pos[label] if positive else self.neg[label]
                new = _draw_untaken(rng, pool, int(need), taken)
                if new is None:
                    kind = "positives" if positive else "negatives"
                    free = int((~taken[pool]).sum())
                    raise EpisodeError(
                        f"{self.where}: label {label} ({self.task.class_names[label]!r}) has only {free} {kind} left "
                        f"for the {role} after the support took its share, {need} more are needed; lower k_shot or "
                        "n_query")
                taken[new] = True
                hits = y[new].sum(axis=0)
                pos_count += hits
                neg_count += len(new) - hits
                picked.append(new)
        chosen = np.concatenate(picked)
        keep = np.ones(len(chosen), dtype=bool)
        for i in rng.permutation(len(chosen)):
            row = y[chosen[i]]
            if (pos_count - row >= k).all() and (neg_count - ~row >= k).all():
                keep[i] = False
                pos_count -= row
                neg_count -= ~row
                taken[chosen[i]] = False
        return frozen(np.sort(chosen[keep]))


def _draw_untaken(rng: np.random.Generator, pool: np.ndarray, need: int, taken: np.ndarray) -> np.ndarray | None:
    """``need`` distinct members of ``pool`` not yet taken, uniformly; None if too few remain.

    Draws with replacement and keeps first occurrences of untaken members (sequential sampling
    without replacement, cheap when the pool is large); tops up exactly when that falls short.
    """
    cand = pool[rng.integers(0, len(pool), size=2 * need + 8)]
    cand = cand[~taken[cand]]
    _, first = np.unique(cand, return_index=True)
    got = cand[np.sort(first)][:need]
    if len(got) == need:
        return got
    rest = pool[~taken[pool]]
    rest = rest[~np.isin(rest, got)]
    if len(rest) < need - len(got):
        return None
    return np.concatenate([got, rng.choice(rest, need - len(got), replace=False)])


def _specs(plan: _TaskPlan, rng: np.random.Generator, seed: int, indices: Sequence[int], n_way: int,
           k_shot: int, n_query: int) -> list[EpisodeSpec]:
    classes, support, query = plan.draw(rng, len(indices), n_way, k_shot, n_query)
    task_id, split = plan.task.task_id, plan.split
    return [EpisodeSpec(task_id, split, seed, int(i), c, s, q)
            for i, c, s, q in zip(indices, classes, support, query)]


class _BlockCache:
    """Episode specs by global index, generating one block of ``BLOCK`` at a time."""

    def __init__(self, make_block: Callable[[int], list[EpisodeSpec]]) -> None:
        self._make = make_block
        self._block = -1
        self._specs: list[EpisodeSpec] = []

    def __call__(self, index: int) -> EpisodeSpec:
        if index < 0:
            raise IndexError(f"episode index must be >= 0, got {index}")
        block, offset = divmod(index, BLOCK)
        if block != self._block:
            self._specs = self._make(block)
            self._block = block
        return self._specs[offset]


class _EpisodicSampler(Sampler[EpisodeSpec]):
    """Shared behaviour: epochs, iteration over specs, the fast path and a DataLoader."""

    n_episodes: int
    epoch: int
    _spec: _BlockCache

    def _datasets(self) -> list[EpisodeSource]:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.n_episodes

    def set_epoch(self, epoch: int) -> None:
        """Epoch e yields episodes e * n_episodes ... (e + 1) * n_episodes - 1."""
        self.epoch = int(epoch)

    def spec(self, index: int) -> EpisodeSpec:
        """The episode with this global index (any epoch), by random access."""
        return self._spec(index)

    def __iter__(self) -> Iterator[EpisodeSpec]:
        start = self.epoch * self.n_episodes
        for i in range(start, start + self.n_episodes):
            yield self._spec(i)

    def episodes(self, device: Device = None, non_blocking: bool = False, dtype: torch.dtype = torch.float32
                 ) -> Iterator[Episode]:
        """Episode objects for this epoch, gathered in the calling process (the fast path);
        ``dtype=torch.uint8`` for the stored pixels (``Episode.as_float()`` converts them)."""
        return materialise(self._datasets(), self, device=device, non_blocking=non_blocking, dtype=dtype)

    def episode(self, index: int, device: Device = None, dtype: torch.dtype = torch.float32) -> Episode:
        return next(materialise(self._datasets(), [self.spec(index)], device=device, dtype=dtype))

    def loader(self, dtype: torch.dtype = torch.float32, **dataloader_kwargs: Any) -> DataLoader:
        """A DataLoader yielding Episodes: images gathered (and transformed) in its workers;
        ``dtype=torch.uint8`` passes a quarter of the bytes between processes and to a GPU."""
        return DataLoader(EpisodeDataset(self._datasets(), dtype), batch_sampler=self, collate_fn=collate_episode,
                          **dataloader_kwargs)


class EpisodeSampler(_EpisodicSampler):
    """Episodes from one task and split: N-way (``None`` or ``"all"``: every eligible class),
    K-shot, ``n_query`` queries per class, query disjoint from support.

    Yields ``EpisodeSpec`` index batches; use ``episodes()`` for Episode objects, or
    ``loader(num_workers=..., pin_memory=...)`` for a DataLoader. Classes with fewer than
    ``min_class_samples`` samples are left out; ``None`` keeps every class, and a class with
    fewer than k_shot + n_query samples is then an error. Binary episodes are always
    K negatives + K positives; multi-label support and query sets give every label at least
    K (resp. n_query) positives and negatives (greedy set sampling, see the module docstring).
    """

    def __init__(self, dataset: EpisodeSource, n_way: NWay = None, k_shot: int = SHOTS, n_query: int = QUERIES,
                 n_episodes: int = EVALUATION_EPISODES, seed: int = 0, min_class_samples: int | None = None) -> None:
        _check_counts(k_shot, n_query)
        _check_seed_and_length(seed, n_episodes)
        self.dataset = dataset
        self.plan = _TaskPlan(dataset, k_shot + n_query, min_class_samples)
        self.n_way = self.plan.resolve_way(n_way, strict=True)
        self.k_shot, self.n_query = int(k_shot), int(n_query)
        self.min_class_samples = min_class_samples
        self.dropped: tuple[str, ...] = self.plan.dropped
        """Names of the classes (labels) left out by ``min_class_samples``."""
        self.n_episodes, self.seed, self.epoch = int(n_episodes), int(seed), 0
        self._key = (crc32_of(self.plan.task.task_id), crc32_of(self.plan.split))
        self._spec = _BlockCache(self._block)

    def _block(self, block: int) -> list[EpisodeSpec]:
        rng = np.random.default_rng([self.seed, *self._key, block])
        first = block * BLOCK
        return _specs(self.plan, rng, self.seed, range(first, first + BLOCK), self.n_way, self.k_shot, self.n_query)

    def _datasets(self) -> list[EpisodeSource]:
        return [self.dataset]

    def episode_set(self) -> EpisodeSet:
        """This epoch's episodes as a fixed set, ready for ``save_episode_set``."""
        return EpisodeSet(
            task_id=self.plan.task.task_id, size=self.plan.task.size, split=self.plan.split,
            n_samples=len(self.dataset), labels_crc32=labels_crc(self.dataset.labels), seed=self.seed,
            sampler={"n_way": self.n_way, "k_shot": self.k_shot, "n_query": self.n_query,
                     "min_class_samples": self.min_class_samples},
            specs=tuple(self))


class MultiTaskEpisodeSampler(_EpisodicSampler):
    """Meta-Dataset-style episodes over several tasks: pick a task, then an episode from it.

    ``weights``: ``"proportional"`` (to dataset size), ``"uniform"``, ``"tempered"`` (size ** 0.5),
    or one weight per task (see ``task_probabilities``).
    Fixed mode: ``n_way`` (int, or None/"all" for every eligible class) applies to multi-class
    and ordinal tasks; binary episodes are 2-way and multi-label ones use every label.
    ``variable=True``: per episode N is uniform in 2..n_way (None: all eligible classes) and
    K uniform in 1..k_shot, e.g. ``k_shot=10`` for MedIMeta's MAML training episodes.
    Episode i is a pure function of (the tasks, seed, i).
    """

    def __init__(self, datasets: Sequence[EpisodeSource], n_way: NWay = None, k_shot: int = SHOTS,
                 n_query: int = QUERIES, n_episodes: int = 1000, seed: int = 0,
                 weights: TaskWeighting | Sequence[float] = "proportional",
                 variable: bool = False, min_class_samples: int | None = None) -> None:
        _check_counts(k_shot, n_query)
        _check_seed_and_length(seed, n_episodes)
        if not datasets:
            raise EpisodeError("MultiTaskEpisodeSampler needs at least one dataset")
        self.datasets = list(datasets)
        keys = [(d.task.task_id, d.split) for d in self.datasets]
        if len(set(keys)) != len(keys):
            raise EpisodeError(f"each (task, split) may appear once; got {keys}")
        self.plans = [_TaskPlan(d, k_shot + n_query, min_class_samples) for d in self.datasets]
        self.dropped: dict[str, tuple[str, ...]] = {p.task.task_id: p.dropped for p in self.plans if p.dropped}
        """Per task id, the classes (labels) left out by ``min_class_samples``."""
        self.ways = np.array([p.resolve_way(n_way, strict=False) for p in self.plans], dtype=np.int64)
        self.p = task_probabilities([len(d) for d in self.datasets], weights)
        self.k_shot, self.n_query, self.variable = int(k_shot), int(n_query), bool(variable)
        self.n_episodes, self.seed, self.epoch = int(n_episodes), int(seed), 0
        self._spec = _BlockCache(self._block)

    def _block(self, block: int) -> list[EpisodeSpec]:
        rng = np.random.default_rng([self.seed, _MULTI_TASK_TAG, block])
        task = rng.choice(len(self.plans), size=BLOCK, p=self.p)
        if self.variable:
            way = 2 + (rng.random(BLOCK) * (self.ways[task] - 1)).astype(np.int64)
            single = np.array([not p.multilabel for p in self.plans])[task]
            way = np.where(single, way, self.ways[task])
            shot = rng.integers(1, self.k_shot + 1, size=BLOCK)
        else:
            way = self.ways[task]
            shot = np.full(BLOCK, self.k_shot)
        groups, inverse = np.unique(np.stack([task, way, shot], axis=1), axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        out: list[EpisodeSpec | None] = [None] * BLOCK
        first = block * BLOCK
        for g, (t, n, k) in enumerate(groups.tolist()):
            members = np.flatnonzero(inverse == g)
            specs = _specs(self.plans[t], rng, self.seed, (first + members).tolist(), n, k, self.n_query)
            for m, s in zip(members.tolist(), specs):
                out[m] = s
        return out  # type: ignore[return-value]

    def _datasets(self) -> list[EpisodeSource]:
        return self.datasets


def _check_seed_and_length(seed: int, n_episodes: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise EpisodeError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(n_episodes, bool) or not isinstance(n_episodes, (int, np.integer)) or n_episodes < 1:
        raise EpisodeError(f"n_episodes must be an integer >= 1, got {n_episodes!r}")


def task_probabilities(sizes: Sequence[int], weights: TaskWeighting | Sequence[float] = "proportional",
                       temperature: float = TEMPERATURE) -> np.ndarray:
    """Probability of drawing each task: ``"proportional"`` to its size, ``"uniform"``,
    ``"tempered"`` (size ** (1 / temperature)), or one given weight per task."""
    sizes_arr = np.asarray(sizes, dtype=np.float64)
    if isinstance(weights, str):
        if weights == "proportional":
            w = sizes_arr
        elif weights == "uniform":
            w = np.ones_like(sizes_arr)
        elif weights == "tempered":
            w = sizes_arr ** (1.0 / temperature)
        else:
            raise EpisodeError(f"unknown task sampling {weights!r}; choose proportional, uniform, tempered "
                             "or a list of weights")
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != sizes_arr.shape or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
            raise EpisodeError(f"weights must be {len(sizes_arr)} non-negative numbers with a positive sum, "
                             f"got {weights!r}")
    return w / w.sum()


