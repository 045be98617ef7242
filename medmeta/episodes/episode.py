"""``Episode``: the one type for a few-shot episode, and ``EpisodeSpec``, the indices that make one.

Samplers yield ``EpisodeSpec`` index batches (as any PyTorch sampler yields indices); the
loading functions turn them into ``Episode`` objects; adaptation rules, MAML, the protocol
and user code all take ``Episode``.

Label conventions (what heads and losses downstream rely on):

- binary: ``y`` int64 in {0, 1}, ``classes == (0, 1)``, always K negatives and K positives;
- multi-class and ordinal: ``y`` int64 in 0..N-1, episode class i is original class
  ``classes[i]``; chosen classes are kept in ascending order, so ordinal grades keep their order;
- multi-label: ``y`` float32 (n, L), one column per kept label, ``classes`` the kept label ids.

Support and query are class-major for single-label tasks (K of class 0, K of class 1, ...)
and in ascending index order for multi-label tasks.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator, Union

import numpy as np
import torch

from ..data.transforms import unit_float
from ..tasktype import TaskType

Device = Union[str, torch.device, None]


def frozen(a: np.ndarray) -> np.ndarray:
    """``a``, made read-only (indices of stored episodes must never change in place)."""
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class EpisodeSpec:
    """Which samples make an episode: enough to save, load and rebuild it.

    Iterating it gives the support indices then the query indices, so it is also a plain
    index batch for ``DataLoader(..., batch_sampler=...)``.
    """

    task_id: str
    split: str
    seed: int
    index: int
    classes: tuple[int, ...]
    support_indices: np.ndarray
    query_indices: np.ndarray

    @property
    def indices(self) -> np.ndarray:
        return np.concatenate([self.support_indices, self.query_indices])

    def __len__(self) -> int:
        return len(self.support_indices) + len(self.query_indices)

    def __getitem__(self, i: int) -> int:
        return int(self.indices[i])

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices.tolist())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EpisodeSpec):
            return NotImplemented
        return (self.task_id, self.split, self.seed, self.index, self.classes) == (
            other.task_id, other.split, other.seed, other.index, other.classes) and (
            np.array_equal(self.support_indices, other.support_indices)
            and np.array_equal(self.query_indices, other.query_indices))

    def __repr__(self) -> str:
        return (f"EpisodeSpec({self.task_id!r}, split={self.split!r}, seed={self.seed}, index={self.index}, "
                f"classes={self.classes}, support={len(self.support_indices)}, query={len(self.query_indices)})")


@dataclass(eq=False)
class Episode:
    """One few-shot episode as plain tensors: images channels first, float32 in [0, 1] (what
    models take), or uint8 pixels as stored when read with ``dtype=torch.uint8`` (a quarter of
    the bytes to pass between processes or to a GPU; ``as_float()`` converts them there).

    ``query_y`` is None in the episodes the protocol hands to adaptation rules, so a rule
    cannot see the answers. The fields after ``classes`` say where the episode came from;
    an episode built by hand (``Episode(sx, sy, qx, qy, TaskType.BINARY, (0, 1))``) may leave
    them at their defaults.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor | None
    task_type: TaskType
    classes: tuple[int, ...]
    task_id: str = ""
    split: str = ""
    support_indices: np.ndarray | None = None
    query_indices: np.ndarray | None = None
    seed: int = 0
    index: int = 0

    @property
    def num_outputs(self) -> int:
        """Logits a head needs: 1 for binary, else the episode's classes (or labels)."""
        return self.task_type.num_outputs(len(self.classes))

    @property
    def n_way(self) -> int:
        return len(self.classes)

    @property
    def label_map(self) -> dict[int, int]:
        """Original class id -> episode label (single-label tasks)."""
        return {c: i for i, c in enumerate(self.classes)}

    @property
    def spec(self) -> EpisodeSpec:
        if self.support_indices is None or self.query_indices is None:
            raise ValueError("this episode was built from tensors and has no indices")
        return EpisodeSpec(self.task_id, self.split, self.seed, self.index, self.classes,
                           self.support_indices, self.query_indices)

    def without_query_labels(self) -> Episode:
        """The same episode with ``query_y`` removed: what an adaptation rule receives."""
        return replace(self, query_y=None)

    def _map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Episode:
        return replace(self, support_x=fn(self.support_x), support_y=fn(self.support_y), query_x=fn(self.query_x),
                       query_y=None if self.query_y is None else fn(self.query_y))

    def as_float(self) -> Episode:
        """The episode with float32 images in [0, 1], converted on its device (exactly the values a
        float32 read gives); an episode whose images are already float is returned as it is."""
        if self.support_x.dtype != torch.uint8:
            return self
        return replace(self, support_x=unit_float(self.support_x), query_x=unit_float(self.query_x))

    def to(self, device: Device, non_blocking: bool = False) -> Episode:
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Episode:
        """Called by ``DataLoader(pin_memory=True)``."""
        return self._map_tensors(torch.Tensor.pin_memory)

    def __repr__(self) -> str:
        return (f"Episode({self.task_id!r}, {self.task_type}, split={self.split!r}, index={self.index}, "
                f"classes={self.classes}, support_x={tuple(self.support_x.shape)}, "
                f"query_x={tuple(self.query_x.shape)}, device={self.support_x.device})")
