"""Fixed episode sets: the same evaluation episodes on any machine, stored as JSON indices.

A set stores indices, not images, plus what identifies the data it was drawn from (task,
size, split, number of samples, a CRC of the labels), so binding it to another dataset is
refused. JSON lists of indices also protect stored sets from changes in numpy's random streams.

A set is identified by its content: ``digest`` hashes its task, split, size and every
episode's index, classes, support and query indices (``episode_digest`` one episode's), and
is written into the file. Loading a file whose episodes no longer match its digest (edited by
hand or by a script) is refused; a file written without one (by hand) is accepted and keyed by
the digest of what it holds. Caches and results name the episodes by this digest, never by the
sampler settings alone.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader

from .._version import __version__
from ..errors import EpisodeError
from ..files import atomic_path
from .episode import Device, Episode, EpisodeSpec, frozen
from .loading import EpisodeDataset, EpisodeSource, collate_episode, materialise

EPISODE_SET_FORMAT = "medmeta-episode-set"
EPISODE_SET_VERSION = 1


class HasEpisodeSet(Protocol):
    def episode_set(self) -> EpisodeSet: ...


def episode_digest(spec: EpisodeSpec, size: int) -> str:
    """A short hash of one episode's content (task, split, size, index, classes, support, query):
    two results of the same episode index are paired only when these agree."""
    content = [spec.task_id, spec.split, size, spec.index, list(spec.classes), spec.support_indices.tolist(),
               spec.query_indices.tolist()]
    return hashlib.sha256(json.dumps(content, separators=(",", ":")).encode()).hexdigest()[:16]


def labels_crc(labels: np.ndarray) -> int:
    """CRC32 of a label array: checks that a stored episode set meets the labels it was drawn from."""
    return zlib.crc32(np.ascontiguousarray(labels, dtype="<i8").tobytes())


@dataclass(frozen=True, eq=False)
class EpisodeSet:
    """A fixed list of episodes of one task and split, e.g. the 100 evaluation episodes.

    Stores indices, not images: bind it to a dataset with ``episodes(dataset)`` or
    ``loader(dataset)``, which first check the dataset is the one the set was drawn from.
    """

    task_id: str
    size: int
    split: str
    n_samples: int
    labels_crc32: int
    seed: int
    sampler: dict
    specs: tuple[EpisodeSpec, ...]

    def __len__(self) -> int:
        return len(self.specs)

    def __iter__(self) -> Iterator[EpisodeSpec]:
        return iter(self.specs)

    def __getitem__(self, i: int) -> EpisodeSpec:
        return self.specs[i]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EpisodeSet):
            return NotImplemented
        return all(getattr(self, f.name) == getattr(other, f.name) for f in fields(self))

    def episode_digests(self) -> dict[int, str]:
        """Each episode's ``episode_digest``, by episode index."""
        return {s.index: episode_digest(s, self.size) for s in self.specs}

    @property
    def digest(self) -> str:
        """A hash of the set's content (every episode's ``episode_digest``, in order): what caches and
        results key the episodes by."""
        content = [episode_digest(s, self.size) for s in self.specs]
        return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]

    def check(self, dataset: EpisodeSource) -> None:
        """Raise EpisodeError unless ``dataset`` is the task, size, split and data of this set."""
        got = {"task": dataset.task.task_id, "size": dataset.task.size, "split": dataset.split,
               "number of samples": len(dataset)}
        want = {"task": self.task_id, "size": self.size, "split": self.split, "number of samples": self.n_samples}
        wrong = [f"{k} {got[k]!r} (the set has {want[k]!r})" for k in want if got[k] != want[k]]
        if not wrong and labels_crc(dataset.labels) != self.labels_crc32:
            wrong = ["labels differing from those the set was drawn from"]
        if wrong:
            raise EpisodeError(f"episode set {self.task_id}/{self.split} at {self.size}px does not match the dataset: "
                             f"it has {', '.join(wrong)}")

    def episodes(self, dataset: EpisodeSource, device: Device = None, non_blocking: bool = False,
                 dtype: torch.dtype = torch.float32) -> Iterator[Episode]:
        """The set's episodes from ``dataset``, after checking the dataset is the one it was drawn from."""
        self.check(dataset)
        return materialise(dataset, self.specs, device=device, non_blocking=non_blocking, dtype=dtype)

    def loader(self, dataset: EpisodeSource, dtype: torch.dtype = torch.float32, **dataloader_kwargs: Any
               ) -> DataLoader:
        """A DataLoader over the set's episodes (images gathered in its workers)."""
        self.check(dataset)
        return DataLoader(EpisodeDataset(dataset, dtype), batch_sampler=list(self.specs), collate_fn=collate_episode,
                          **dataloader_kwargs)


def save_episode_set(path: str | Path, episodes: EpisodeSet | HasEpisodeSet) -> Path:
    """Write a fixed episode set (or a sampler's current epoch) as JSON (temporary file, then rename)."""
    if not isinstance(episodes, EpisodeSet):
        episodes = episodes.episode_set()
    path = Path(path)
    doc = {
        "format": EPISODE_SET_FORMAT, "version": EPISODE_SET_VERSION, "medmeta_version": __version__,
        "task_id": episodes.task_id, "size": episodes.size, "split": episodes.split,
        "n_samples": episodes.n_samples, "labels_crc32": episodes.labels_crc32, "seed": episodes.seed,
        "sampler": episodes.sampler, "digest": episodes.digest,
        "episodes": [{"index": s.index, "classes": list(s.classes), "support": s.support_indices.tolist(),
                      "query": s.query_indices.tolist()} for s in episodes.specs],
    }
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, separators=(",", ":")), encoding="utf-8")
    return path


def load_episode_set(path: str | Path) -> EpisodeSet:
    """Read a set written by ``save_episode_set``; one whose episodes do not match the digest it
    carries is refused (a set written by hand without a digest is accepted)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") != EPISODE_SET_FORMAT:
            raise ValueError("not a medmeta episode set")
        if doc.get("version") != EPISODE_SET_VERSION:
            raise ValueError(f"format version {doc.get('version')!r}, this medmeta reads {EPISODE_SET_VERSION}")
        task_id, split, seed = str(doc["task_id"]), str(doc["split"]), int(doc["seed"])
        specs = tuple(
            EpisodeSpec(task_id, split, seed, int(e["index"]), tuple(int(c) for c in e["classes"]),
                        frozen(np.asarray(e["support"], dtype=np.int64)),
                        frozen(np.asarray(e["query"], dtype=np.int64)))
            for e in doc["episodes"])
        twice = sorted({s.index for s in specs if sum(t.index == s.index for t in specs) > 1})
        if twice:  # results are keyed by episode index: two episodes under one would be paired as one
            raise ValueError(f"episode index {twice[0]} is used by more than one episode; give each its own index")
        stored = EpisodeSet(task_id, int(doc["size"]), split, int(doc["n_samples"]), int(doc["labels_crc32"]),
                            seed, dict(doc["sampler"]), specs)
        claimed = doc.get("digest")
    except OSError as exc:
        raise EpisodeError(f"{path}: cannot read episode set ({exc.strerror})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise EpisodeError(f"{path}: cannot read episode set ({exc})") from None
    if claimed is not None and claimed != stored.digest:
        raise EpisodeError(f"{path}: its episodes do not match its digest (the file was edited); regenerate it "
                           "with medmeta.episodes.save_episode_set, or delete it and the protocol draws its set again")
    return stored
