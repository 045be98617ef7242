"""Tasks: what a built store subset means for learning, and a torch Dataset per (task, split).

A subset becomes one task (ChestMNIST becomes one multi-label task plus 14 binary tasks,
one per finding, with ids like ``chestmnist:effusion``; a MedIMeta task is a subset named
``dataset:task``, a multi-label one split alike: ``cxr:disease_labels:Effusion``).
``MedMNISTTask`` reads images from the HDF5 store, opening the file lazily in each process so it
is safe with DataLoader workers, or holds the whole split in memory for small image sizes.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, StoreError
from ..tasktype import TaskType
from .manifest import SPLITS, Manifest, SubsetInfo, load_manifest
from .store import Store, labels_problem, open_store_file, rebuild_hint
from .transforms import check_pixel_read, unit_float

# Splits whose images fit comfortably in memory are loaded whole when in_memory is None.
AUTO_IN_MEMORY_BYTES = 512 * 2**20


@dataclass(frozen=True)
class TaskDescription:
    """A learning task: which subset, which labels, and what kind of prediction."""

    task_id: str
    subset: str
    task_type: TaskType
    class_names: tuple[str, ...]
    domain: str
    modality: str
    channels: int
    size: int
    dims: int
    label_column: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_outputs(self) -> int:
        """Logits a head needs: 1 for binary, one per label for multi-label, else one per class."""
        return self.task_type.num_outputs(self.num_classes)


def describe_subset(info: SubsetInfo, size: int) -> list[TaskDescription]:
    """The tasks a subset offers at one size (ChestMNIST: multi-label plus one binary per finding)."""
    info.file(size)
    common = dict(subset=info.name, domain=info.domain, modality=info.modality,
                  channels=info.channels, size=size, dims=info.dims)
    tasks = [TaskDescription(info.name, task_type=info.task_type, class_names=info.labels, **common)]
    if info.task_type.multilabel:
        for col, finding in enumerate(info.labels):
            tasks.append(TaskDescription(
                f"{info.name}:{finding.replace(' ', '_')}", task_type=TaskType.BINARY,
                class_names=(f"no {finding}", finding), label_column=col, **common))
    return tasks


def find_task(task_id: str, size: int = 28, manifest: Manifest | None = None) -> TaskDescription:
    """Look up a task by id; the subset part may be a short name (``retina``, ``chest:effusion``).
    An id that names a subset whole (``dr_regular:dr_level``, a MedIMeta task) is that subset's task."""
    manifest = manifest or load_manifest()
    try:
        subset_part, finding = manifest.resolve(task_id), ""
    except ConfigError:
        if ":" not in task_id:
            raise
        subset_part, _, finding = task_id.rpartition(":")
    info = manifest[subset_part]
    wanted = info.name + (f":{finding}" if finding else "")
    for task in describe_subset(info, size):
        if task.task_id == wanted:
            return task
    names = [t.task_id for t in describe_subset(info, size)]
    raise ConfigError(f"unknown task {task_id!r}; {info.name} offers: {names}")


def list_tasks(store: Store) -> list[TaskDescription]:
    """Every task available from the subsets built in a store."""
    return [t for subset, size in store.built() for t in describe_subset(store.manifest[subset], size)]


def to_device(batch: tuple[torch.Tensor, torch.Tensor], device: torch.device | None,
              convert: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The device half of ``MedMNISTTask.get_batch``: a ``host_batch`` copied without blocking,
    uint8 pixels converted there (``unit_float``) when ``convert``; on the CPU, as it is."""
    x, y = batch
    if device is None or device.type == "cpu":
        return x, y
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return (unit_float(x) if convert and x.dtype == torch.uint8 else x), y


class MedMNISTTask(Dataset):
    """Images and labels of one task and split, read from a built store.

    ``split="all"`` concatenates train, val and test (in that order), for few-shot targets whose
    episodes may come from the whole dataset. Items are ``(image, label)``: image a float tensor in [0, 1] shaped (C, H, W) or
    (C, D, H, W); label an int64 scalar (binary, multi-class, ordinal) or a float vector
    (multi-label). ``labels`` holds every label as a numpy array for samplers.
    """

    def __init__(
        self,
        root: str | Path | Store,
        task: str | TaskDescription,
        split: str = "train",
        size: int = 28,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        in_memory: bool | None = None,
    ) -> None:
        self.store = root if isinstance(root, Store) else Store(root)
        self.task = task if isinstance(task, TaskDescription) else find_task(task, size, self.store.manifest)
        if split not in (*SPLITS, "all"):
            raise ConfigError(f"unknown split {split!r}; choose one of {SPLITS} or 'all'")
        self.split = split
        self._parts = SPLITS if split == "all" else (split,)
        self.transform = transform
        self.path = self.store.path(self.task.subset, self.task.size, must_exist=True)
        with open_store_file(self.path) as fh, self._corruption_is_one_line():
            problem = labels_problem(fh)
            if problem:
                raise OSError(problem)  # reported as corruption below
            images = [fh[f"{part}/images"] for part in self._parts]
            key = self.store.manifest[self.task.subset].labels_key
            raw_labels = np.concatenate([fh[f"{part}/{key}"][()] for part in self._parts])
            nbytes = sum(d.size * d.dtype.itemsize for d in images)
            keep = in_memory or (in_memory is None and nbytes <= AUTO_IN_MEMORY_BYTES)
            self._images: np.ndarray | None = np.concatenate([d[()] for d in images]) if keep else None
            self._offsets = np.cumsum([0] + [len(d) for d in images])
        if self.task.label_column is not None:
            raw_labels = raw_labels[:, self.task.label_column]
        elif not self.task.task_type.multilabel:
            raw_labels = raw_labels[:, 0]
        self.labels: np.ndarray = raw_labels.astype(np.int64)
        self._handle: list[h5py.Dataset] | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return self._images is not None

    @contextmanager
    def _corruption_is_one_line(self) -> Iterator[None]:
        """Turn an HDF5 read error (a chunk failing its checksum, undecodable data) into one StoreError line."""
        try:
            yield
        except OSError as exc:
            reason = " ".join(str(exc).split())
            info = self.store.manifest[self.task.subset]
            raise StoreError(f"{self.path} is corrupt: a read failed its checksum or could not be decoded ({reason}); "
                             f"{rebuild_hint(info, self.task.size)}") from None

    def _datasets(self) -> list[h5py.Dataset]:
        """The image datasets of the split(s), opened lazily once per process (fork-safe for workers)."""
        if self._handle is None or self._pid != os.getpid():
            fh = open_store_file(self.path)
            self._handle = [fh[f"{part}/images"] for part in self._parts]
            self._pid = os.getpid()
        return self._handle

    def raw_images(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """uint8 images for many indices, in the order given.

        From HDF5, one integer read per image: an order of magnitude faster in h5py than a
        fancy-indexed read of the same rows.
        """
        idx = np.asarray(indices, dtype=np.int64)
        if self._images is not None:
            return self._images[idx]
        dsets = self._datasets()
        if len(idx) == 0:
            return np.empty((0, *dsets[0].shape[1:]), np.uint8)
        part = np.searchsorted(self._offsets, idx, side="right") - 1
        local = idx - self._offsets[part]
        with self._corruption_is_one_line():
            return np.stack([dsets[p][i] for p, i in zip(part.tolist(), local.tolist())])

    def pixels(self, raw: np.ndarray) -> torch.Tensor:
        """uint8 images (batch first, npz layout) as a uint8 tensor (N, C, ...), channels first in
        shape; a view, so RGB images stay channels-last in memory."""
        x = torch.from_numpy(raw)
        return x.permute(0, 3, 1, 2) if raw.ndim == 4 and self.task.dims == 2 else x.unsqueeze(1)

    def to_tensor(self, raw: np.ndarray) -> torch.Tensor:
        """uint8 images (batch first, npz layout) to float tensors in [0, 1], channels first
        (``unit_float`` of ``pixels``: one cast and one division, in memory order)."""
        return unit_float(self.pixels(raw))

    def label_tensor(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        y = torch.from_numpy(self.labels[np.asarray(indices, dtype=np.int64)])
        return y.to(self.task.task_type.label_dtype)

    def get_batch(self, indices: Sequence[int] | np.ndarray, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels for many indices at once, with ``transform`` applied per image, on
        ``device`` if given. ``dtype=torch.uint8`` gives the stored pixels (no transform applies).

        To a CUDA device (no transform), the uint8 pixels are pinned, copied without blocking and
        converted there: a quarter of the bytes cross the bus and the host does no float work
        (the host conversion was half of each mm-PT step at 224px on an H200). The values are
        those of the host path (``unit_float``). ``host_batch`` then ``to_device`` is the same in
        two halves, for a loader thread.
        """
        device = None if device is None else torch.device(device)
        return to_device(self.host_batch(indices, device, dtype), device, convert=dtype == torch.float32)

    def host_batch(self, indices: Sequence[int] | np.ndarray, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The host half of ``get_batch`` (a loader thread's part): images and labels gathered, and
        for CUDA pinned, still uint8 without a transform (converted there by ``to_device``)."""
        check_pixel_read(self.task.task_id, dtype, self.transform)
        device = None if device is None else torch.device(device)
        on_gpu = device is not None and device.type == "cuda"
        x = self.pixels(self.raw_images(indices))
        if dtype == torch.float32 and not (on_gpu and self.transform is None):
            x = unit_float(x)
            if self.transform is not None:
                x = torch.stack([self.transform(img) for img in x])
        y = self.label_tensor(indices)
        return (x.pin_memory(), y.pin_memory()) if on_gpu else (x, y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.to_tensor(self.raw_images([index]))[0]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.label_tensor([index])[0]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_pid"] = None
        return state

    def __repr__(self) -> str:
        where = "memory" if self.in_memory else str(self.path)
        return f"MedMNISTTask({self.task.task_id!r}, split={self.split!r}, size={self.task.size}, n={len(self)}, from={where})"
