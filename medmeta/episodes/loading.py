"""Reading episodes: from ``EpisodeSpec`` indices to ``Episode`` tensors.

``materialise`` gathers the images of consecutive episodes of one task together (one
``dataset.get_batch`` call per group of up to ``CHUNK_BYTES`` of images), applies each
dataset's transform per image and remaps labels to the episode's classes. ``EpisodeDataset``
does the same inside DataLoader workers: the spec travels with the batch, so episodes are
identical with any number of workers. Both read float32 images in [0, 1] or, with
``dtype=torch.uint8``, the stored pixels (``Episode.as_float()`` converts them where they are used).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from itertools import chain
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.tasks import TaskDescription
from ..data.transforms import check_pixel_read
from ..errors import EpisodeError
from .episode import Device, Episode, EpisodeSpec

CHUNK_BYTES = 3 * 2**20
"""Bytes of images (float32, or uint8 when read as pixels) gathered at once: several 28px
episodes share one gather and one conversion (per-gather overhead was a third of an RGB
episode's cost at 2 MiB), and a piece stays well inside the last-level cache. Tuned with
benchmarks/episodes.py (2, 3, 4 MiB)."""


class EpisodeSource(Protocol):
    """What samplers and loaders need from a dataset; ``MedMNISTTask`` provides it (any split,
    or ``"all"``). ``get_batch(indices[, device][, dtype]) -> (x, y)`` is optional: without it images are
    stacked from items (float32 only)."""

    task: TaskDescription
    split: str
    labels: np.ndarray

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]: ...


def _lookup(datasets: EpisodeSource | Sequence[EpisodeSource]) -> dict[tuple[str, str], EpisodeSource]:
    if not isinstance(datasets, (list, tuple)):
        datasets = [datasets]
    return {(d.task.task_id, d.split): d for d in datasets}


def _find(table: dict[tuple[str, str], EpisodeSource], spec: EpisodeSpec) -> EpisodeSource:
    try:
        return table[spec.task_id, spec.split]
    except KeyError:
        raise EpisodeError(f"episode {spec.index} is from {spec.task_id}/{spec.split}, but the datasets given are "
                         f"{sorted('/'.join(k) for k in table)}") from None


def _check_pixels(table: dict[tuple[str, str], EpisodeSource], dtype: torch.dtype) -> None:
    """Refuse, before any work, a dtype that is not a pixel dtype, or uint8 pixels from a dataset
    that cannot give them (no ``get_batch`` taking a dtype) or whose transform needs float images."""
    for (task_id, split), d in table.items():
        get_batch = getattr(d, "get_batch", None)
        if dtype == torch.uint8 and (get_batch is None or "dtype" not in inspect.signature(get_batch).parameters):
            raise EpisodeError(f"{task_id}/{split}: {type(d).__name__} has no get_batch(indices, dtype=...), so it "
                               f"cannot give uint8 pixels; read float32 episodes")
        check_pixel_read(f"{task_id}/{split}", dtype, getattr(d, "transform", None))


@dataclass(frozen=True)
class _Output:
    """Where and how episodes are read: device, non-blocking copies, and the image dtype."""

    device: Device = None
    non_blocking: bool = False
    dtype: torch.dtype = torch.float32


def _images(dataset: EpisodeSource, indices: np.ndarray, out: _Output) -> torch.Tensor:
    """Images for ``indices`` on ``out.device``; a ``get_batch`` that takes a device gets it (``MedMNISTTask``
    then moves uint8 pixels to a GPU and converts them there)."""
    get_batch = getattr(dataset, "get_batch", None)
    pixels = {} if out.dtype == torch.float32 else {"dtype": out.dtype}
    if get_batch is None:
        x = torch.stack([dataset[int(i)][0] for i in indices])
    elif out.device is not None and "device" in inspect.signature(get_batch).parameters:
        return get_batch(indices, device=out.device, **pixels)[0]
    else:
        x = get_batch(indices, **pixels)[0]
    return x if out.device is None else x.to(out.device, non_blocking=out.non_blocking)


def _targets(task: TaskDescription, labels: np.ndarray, specs: Sequence[EpisodeSpec], rows: np.ndarray
             ) -> torch.Tensor:
    """Episode targets for the concatenated support+query rows of ``specs``."""
    if task.task_type.multilabel:
        columns = np.concatenate([np.broadcast_to(np.asarray(s.classes), (len(s), len(s.classes))) for s in specs])
        return torch.from_numpy(np.take_along_axis(labels[rows], columns, axis=1).astype(np.float32))
    # lut[e, c]: episode e's label for original class c (-1: not one of its classes), filled at once:
    # the i-th class of episode e gets label i
    ways = [len(s.classes) for s in specs]
    classes = np.fromiter(chain.from_iterable(s.classes for s in specs), np.int64, sum(ways))
    episode = np.repeat(np.arange(len(specs)), ways)
    lut = np.full((len(specs), max(task.num_classes, 1)), -1, dtype=np.int64)
    first = np.repeat(np.cumsum(ways) - ways, ways)  # where each episode's classes start in ``classes``
    lut[episode, classes] = np.arange(len(classes)) - first
    which = np.repeat(np.arange(len(specs)), [len(s.support_indices) + len(s.query_indices) for s in specs])
    original = labels[rows]
    y = lut[which, original]
    if (y < 0).any():
        bad = int(np.flatnonzero(y < 0)[0])
        raise EpisodeError(f"sample {int(rows[bad])} of {task.task_id} has label {int(original[bad])}, which is not one "
                         f"of its episode's classes: the dataset is not the one the episode was drawn from")
    return torch.from_numpy(y)


def _image_bytes(task: TaskDescription, dtype: torch.dtype) -> int:
    return dtype.itemsize * task.channels * task.size ** task.dims


def _gather(dataset: EpisodeSource, rows: np.ndarray, out: _Output) -> torch.Tensor:
    """Images for ``rows`` (transform applied per image), read in pieces of about CHUNK_BYTES
    copied into one output: temporaries stay small and in cache, and with a device the host
    holds one piece at a time, so memory stays bounded for 224px episodes."""
    step = max(1, CHUNK_BYTES // _image_bytes(dataset.task, out.dtype))
    if len(rows) <= step:
        return _images(dataset, rows, out)
    x: torch.Tensor | None = None
    for a in range(0, len(rows), step):
        piece = _images(dataset, rows[a:a + step], out)
        if x is None:
            x = torch.empty((len(rows), *piece.shape[1:]), dtype=piece.dtype, device=piece.device)
        x[a:a + len(piece)].copy_(piece, non_blocking=out.non_blocking)
    assert x is not None
    return x


def _episode_images(dataset: EpisodeSource, spec: EpisodeSpec, out: _Output) -> tuple[torch.Tensor, torch.Tensor]:
    """Support and query images of one episode: views of one gather when small (one storage
    to pass between processes), separate piecewise gathers when large (no huge temporary)."""
    if len(spec) * _image_bytes(dataset.task, out.dtype) <= CHUNK_BYTES:
        x = _gather(dataset, spec.indices, out)
        ns = len(spec.support_indices)
        return x[:ns], x[ns:]
    return _gather(dataset, spec.support_indices, out), _gather(dataset, spec.query_indices, out)


def _check_rows(dataset: EpisodeSource, rows: np.ndarray) -> None:
    if len(rows) and (rows.min() < 0 or rows.max() >= len(dataset)):
        raise EpisodeError(f"episode indices out of range for {dataset.task.task_id}/{dataset.split} "
                         f"({len(dataset)} samples): the dataset is not the one the episode was drawn from")


def _assemble(dataset: EpisodeSource, specs: Sequence[EpisodeSpec], out: _Output) -> list[Episode]:
    """Episodes for consecutive specs of one dataset: several small episodes share one gather
    and one transfer (then views); a lone one is read by ``_episode_images``."""
    rows = np.concatenate([a for s in specs for a in (s.support_indices, s.query_indices)])
    _check_rows(dataset, rows)
    y = _targets(dataset.task, np.asarray(dataset.labels), specs, rows)
    if out.device is not None:
        y = y.to(out.device, non_blocking=out.non_blocking)
    sizes = [n for s in specs for n in (len(s.support_indices), len(s.query_indices))]
    ys = torch.split(y, sizes)
    if len(specs) == 1:
        xs = _episode_images(dataset, specs[0], out)
    else:
        xs = torch.split(_gather(dataset, rows, out), sizes)
    return [Episode(xs[2 * e], ys[2 * e], xs[2 * e + 1], ys[2 * e + 1], dataset.task.task_type, s.classes,
                    s.task_id, s.split, s.support_indices, s.query_indices, s.seed, s.index)
            for e, s in enumerate(specs)]


def materialise(datasets: EpisodeSource | Sequence[EpisodeSource], specs: Iterable[EpisodeSpec],
                device: Device = None, non_blocking: bool = False, dtype: torch.dtype = torch.float32
                ) -> Iterator[Episode]:
    """Build Episodes from specs, gathering consecutive episodes of one task together
    (up to ``CHUNK_BYTES`` of images) and applying each dataset's transform per image.
    ``dtype=torch.uint8`` reads the stored pixels instead (refused here, before any work, for a
    dataset that cannot give them)."""
    table = _lookup(datasets)
    _check_pixels(table, dtype)
    return _stream(table, specs, _Output(device, non_blocking, dtype))


def _stream(table: dict[tuple[str, str], EpisodeSource], specs: Iterable[EpisodeSpec], out: _Output
            ) -> Iterator[Episode]:
    chunk: list[EpisodeSpec] = []
    used, key, image_bytes = 0, None, 0
    for spec in specs:
        if (spec.task_id, spec.split) != key:
            if chunk:
                yield from _assemble(table[key], chunk, out)  # type: ignore[index]
                chunk, used = [], 0
            image_bytes = _image_bytes(_find(table, spec).task, out.dtype)
            key = spec.task_id, spec.split
        # len(spec) written out: this loop runs once an episode on the fast path
        size = (len(spec.support_indices) + len(spec.query_indices)) * image_bytes
        if chunk and used + size > CHUNK_BYTES:
            yield from _assemble(table[key], chunk, out)
            chunk, used = [], 0
        chunk.append(spec)
        used += size
    if chunk:
        yield from _assemble(table[key], chunk, out)  # type: ignore[index]


class EpisodeDataset(Dataset):
    """A map-style dataset keyed by ``EpisodeSpec``, for ``DataLoader(batch_sampler=sampler,
    collate_fn=collate_episode)``: images are gathered and transformed in the workers, as float32
    images in [0, 1] or (``dtype=torch.uint8``) the stored pixels."""

    def __init__(self, datasets: EpisodeSource | Sequence[EpisodeSource], dtype: torch.dtype = torch.float32) -> None:
        self.table = _lookup(datasets)
        _check_pixels(self.table, dtype)
        self.output = _Output(dtype=dtype)

    def __getitems__(self, spec: EpisodeSpec) -> Episode:
        if not isinstance(spec, EpisodeSpec):
            raise TypeError(f"EpisodeDataset is indexed by EpisodeSpec (use an episode sampler as batch_sampler), "
                            f"got {type(spec).__name__}")
        return _assemble(_find(self.table, spec), [spec], self.output)[0]

    __getitem__ = __getitems__


def collate_episode(episode: Episode) -> Episode:
    """The DataLoader collate function for ``EpisodeDataset``: the episode is already whole."""
    return episode
