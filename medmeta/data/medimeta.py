"""MedIMeta's own datasets, read from its folders and checked before anything is built from them.

The layout (MedIMeta 1.0, as its ``medimeta`` package reads it): a data path holds one folder
per dataset, named by the dataset's id, holding

* ``info.yaml``: ``id``, ``name``, ``domain``, ``input_size`` ``[C, H, W]``, ``tasks`` (each a
  ``task_name``, a ``task_target`` in torchcross's names and ``labels``, label value -> name),
  ``splits_num_samples``, ``domain_overlaps`` and ``subject_overlaps`` (dataset ids);
* ``images.hdf5``: dataset ``images``, ``(N, H, W)`` grey or ``(N, H, W, 3)`` RGB, uint8;
* ``task_labels/<task_name>.npy``: one label per image, a value of the task's ``labels``
  (``(N, L)`` zeros and ones for a multi-label task; binary and single-label tasks flat);
* ``splits/{train,val,test}.txt``: one line per image, ``images/000123.tiff``, the number
  being the image's row in ``images.hdf5``.

``original_splits/`` and the ``images/*.tiff`` copies are not read.

Design: each (dataset, task) is a subset of the manifest like any MedMNIST subset
(``manifest.medimeta_manifest`` makes them), named ``dataset:task`` (the task name lowercased,
other characters than letters and digits made ``_``: ``dr_regular:dr_level``), so tasks, samplers,
stored episode sets, mm-PT's heads, MAML, the supervised baselines and the leave-one-out protocol
take it with no special case. The tasks of one dataset share one store file,
``medimeta-<id>_<size>.h5`` (``SubsetInfo.file_stem``): the images once per split, each task's
labels in ``{split}/labels/<task>`` (``SubsetInfo.labels_key``), so a dataset's images are copied
once however many tasks it has. The only place that tells MedIMeta from MedMNIST is
``Store.build``, which reads this folder instead of an npz file.

How the layout becomes medmeta's:

* Split ``s`` holds the images ``splits/s.txt`` lists, in increasing index order (the order the
  ``medimeta`` package gives them), at every image size: an episode's indices mean the same
  images at 28px and at 224px.
* A class label is the position of the stored value among ``labels``' values in increasing
  order: DeepDRiD's ``Artifact`` stores 0, 1, 4, 6, 8, 10, medmeta's classes 0-5. A multi-label
  task's columns are its labels in that order.
* Sizes: the native one (``input_size``) and every smaller standard size (28, 64, 128, 224),
  shrunk by area interpolation (each output pixel the mean of the input area it covers).
* A dataset's ``md5`` in the manifest is a digest of ``info.yaml``, its task label files, its
  split files and the size of ``images.hdf5``: a store file built from an earlier state of the
  folder is not taken as built. ``images.hdf5`` itself is read when building, not hashed.

Every refusal is one line naming the file (and line, task or value) and what to do, raised
before any store file is started (``read_contents``): a missing file, labels whose count is not
the image count or whose values ``info.yaml`` does not name, a split line naming no image or one
out of range or twice, images shaped otherwise than ``input_size`` says, an ``id`` other than
the folder's name.

In place (``prepare --in-place``): the store file at the native size holds the labels as a copy
does, but each ``{split}/images`` is an HDF5 virtual dataset whose row i is row ``indices[i]`` of
``images.hdf5``, named by its absolute path (``in_place_images``), so every reader of the store
(tasks, samplers, ``verify``) reads the images straight from MedIMeta's file with no special case.
The same checks run first (``read_contents``), and the build reads every image once to record each
split's MD5, as a copy's (``verify`` re-reads them). HDF5 reads a virtual dataset whose source is
missing as zeros, so the file also records the source's size and modification time
(``source_record``), and a store file whose ``images.hdf5`` is missing or changed since is refused
whenever it is opened (``in_place_problem``), not read. A resized size is a copy by nature.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Mapping

import h5py
import numpy as np
import yaml

from ..errors import ManifestError, SourceError
from ..tasktype import TaskType

SPLIT_NAMES = ("train", "val", "test")
"""MedIMeta's split files, ``splits/<name>.txt``."""
IMAGES_FILE = "images.hdf5"
STANDARD_SIZES = (28, 64, 128, 224)
STORE_PREFIX = "medimeta-"
TARGETS = {"BINARY_CLASSIFICATION": TaskType.BINARY, "MULTICLASS_CLASSIFICATION": TaskType.MULTI_CLASS,
           "MULTILABEL_CLASSIFICATION": TaskType.MULTI_LABEL, "ORDINAL_REGRESSION": TaskType.ORDINAL}
"""torchcross's task targets that medmeta has a ``TaskType`` for."""
RESIZE_BLOCK_BYTES = 64 * 2**20
"""Float64 bytes of one block of images being resized."""
IN_PLACE_ROWS = 1024
"""Rows of a split per mapping of an in-place file's virtual images. HDF5 projects each read through
its mapping's whole selection: with one mapping per split, a read of one 16px image of a 78,000-image
split took 9x the direct read; with 1024-row mappings, 1.4x."""
IN_PLACE_ATTRS = ("images_source", "images_source_size", "images_source_mtime_ns")
"""A store file's attributes naming the images.hdf5 it reads in place, its size and modification time."""


def slug(text: str) -> str:
    """A name as medmeta spells it: lowercase, every run of other characters than a-z and 0-9 one ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", text.strip().lower()).strip("_")


@dataclass(frozen=True)
class MedIMetaTask:
    """One task of a dataset, as its ``info.yaml`` describes it."""

    name: str
    """``task_name``: its labels file is ``task_labels/<name>.npy``."""
    key: str
    """``slug(name)``: the task part of the subset name."""
    task_type: TaskType
    values: tuple[int, ...]
    """The label values ``info.yaml`` names, increasing; class i is values[i]."""
    labels: tuple[str, ...]


@dataclass(frozen=True)
class MedIMetaDataset:
    """One dataset folder: what ``info.yaml`` says, and a digest of its label and split files."""

    id: str
    name: str
    folder: Path
    domain: str
    channels: int
    size: int
    """The native image size (``input_size``'s height and width)."""
    tasks: tuple[MedIMetaTask, ...]
    splits: Mapping[str, int]
    """Lines of each split file (0 when the file is missing: building refuses it)."""
    declared_splits: Mapping[str, int]
    """``splits_num_samples`` of ``info.yaml`` (empty when it gives none)."""
    overlaps: tuple[str, ...]
    """``domain_overlaps`` and ``subject_overlaps``: datasets a target of this one never pretrains on."""
    license: str
    citation: str
    digest: str

    @property
    def key(self) -> str:
        return slug(self.id)

    @property
    def stem(self) -> str:
        """Name of the dataset's store files, before ``_<size>.h5``."""
        return STORE_PREFIX + self.key

    def subset_name(self, task: MedIMetaTask) -> str:
        return f"{self.key}:{task.key}"

    @property
    def sizes(self) -> tuple[int, ...]:
        """The native size and every standard size below it."""
        return tuple(sorted({self.size, *(s for s in STANDARD_SIZES if s < self.size)}))

    def image_shape(self, size: int) -> tuple[int, ...]:
        return (size, size) if self.channels == 1 else (size, size, self.channels)


def _field(path: Path, raw: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in raw:
        raise ManifestError(f"{path}: missing field {name!r}")
    value = raw[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ManifestError(f"{path}: field {name!r} should be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _task(path: Path, raw: Any, position: int) -> MedIMetaTask:
    where = f"{path}: tasks[{position}]"
    if not isinstance(raw, dict):
        raise ManifestError(f"{where} is not a mapping of task_name, task_target and labels")
    name = _field(path, raw, "task_name", str)
    where = f"{path}: task {name!r}"
    target = raw.get("task_target")
    if target not in TARGETS:
        raise ManifestError(f"{where}: task_target {target!r} is not one medmeta takes ({', '.join(TARGETS)})")
    labels = raw.get("labels")
    if isinstance(labels, list):
        labels = dict(enumerate(labels))
    if not isinstance(labels, dict) or len(labels) < 2:
        raise ManifestError(f"{where}: labels should map at least two label values to names, got {labels!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v for v in labels):
        raise ManifestError(f"{where}: label values should be integers >= 0, got {list(labels)}")
    if len(labels) > 255:
        raise ManifestError(f"{where}: {len(labels)} labels; medmeta stores at most 255 classes")
    task_type = TARGETS[target]
    if task_type.binary and len(labels) != 2:
        raise ManifestError(f"{where}: a binary task needs exactly 2 labels, got {len(labels)}")
    values = tuple(sorted(labels))
    return MedIMetaTask(name, slug(name), task_type, values, tuple(str(labels[v]) for v in values))


def read_dataset(folder: Path) -> MedIMetaDataset:
    """A dataset folder's ``info.yaml``, checked (``ManifestError`` naming the file and field)."""
    folder = Path(folder).resolve()
    path = folder / "info.yaml"
    stats = tuple(_stat(p) for p in _watched(folder, path))
    return _read_dataset(folder, stats)


def _watched(folder: Path, info: Path) -> list[Path]:
    """The files a dataset's digest covers, as far as they can be named before reading info.yaml."""
    labels = sorted((folder / "task_labels").glob("*.npy")) if (folder / "task_labels").is_dir() else []
    return [info, folder / IMAGES_FILE, *labels, *(folder / "splits" / f"{s}.txt" for s in SPLIT_NAMES)]


def _stat(path: Path) -> tuple[str, int, int]:
    try:
        st = path.stat()
    except OSError:
        return (str(path), -1, -1)
    return (str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=256)
def _read_dataset(folder: Path, stats: tuple[tuple[str, int, int], ...]) -> MedIMetaDataset:
    """``read_dataset``, once per state of the folder's files (``stats``: their sizes and times)."""
    path = folder / "info.yaml"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read it ({exc.strerror}); a MedIMeta dataset folder holds info.yaml") from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: expected a mapping of fields (id, name, domain, input_size, tasks, ...)")
    dataset_id = str(_field(path, raw, "id", (str, int)))
    if dataset_id != folder.name:
        raise ManifestError(f"{path}: id {dataset_id!r} does not match its folder's name {folder.name!r}; MedIMeta names "
                            f"each dataset's folder by its id: rename the folder to {dataset_id!r} or fix the id")
    size = _field(path, raw, "input_size", list)
    if len(size) != 3 or not all(isinstance(v, int) and v > 0 for v in size) or size[0] not in (1, 3) \
            or size[1] != size[2]:
        raise ManifestError(f"{path}: input_size should be [C, H, W] with C 1 or 3 and H == W, got {size}")
    tasks = tuple(_task(path, t, i) for i, t in enumerate(_field(path, raw, "tasks", list)))
    if not tasks:
        raise ManifestError(f"{path}: field 'tasks' is empty")
    keys = [t.key for t in tasks]
    if len(set(keys)) != len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        raise ManifestError(f"{path}: two tasks are both named {twice!r} once lowercased; rename one")
    declared = raw.get("splits_num_samples") or {}
    if not isinstance(declared, dict) or not all(isinstance(declared.get(s, 0), int) for s in SPLIT_NAMES):
        raise ManifestError(f"{path}: splits_num_samples should map train, val and test to counts, got {declared!r}")
    overlaps = []
    for field in ("domain_overlaps", "subject_overlaps"):
        value = raw.get(field) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ManifestError(f"{path}: field {field!r} should be a list of dataset ids, got {value!r}")
        overlaps += value
    digest, counts = _digest(folder, tasks)
    return MedIMetaDataset(
        id=dataset_id, name=str(raw.get("name", dataset_id)), folder=folder, domain=str(_field(path, raw, "domain", str)),
        channels=size[0], size=size[1], tasks=tasks, splits=counts,
        declared_splits={s: declared[s] for s in SPLIT_NAMES if s in declared},
        overlaps=tuple(dict.fromkeys(o for o in overlaps if o != dataset_id)),
        license=str(raw.get("license", "")),
        citation="MedIMeta (Woerner et al.)" + (f", doi:{raw['DOI']}" if raw.get("DOI") else ""), digest=digest)


def _digest(folder: Path, tasks: tuple[MedIMetaTask, ...]) -> tuple[str, dict[str, int]]:
    """MD5 of info.yaml, the tasks' label files, the split files and images.hdf5's size; and each
    split file's number of entries (non-empty lines)."""
    digest, counts = hashlib.md5(), {}
    files = [folder / "info.yaml", *(folder / "task_labels" / f"{t.name}.npy" for t in tasks)]
    for path in files:
        digest.update(path.name.encode() + (path.read_bytes() if path.is_file() else b"<missing>"))
    for split in SPLIT_NAMES:
        path = folder / "splits" / f"{split}.txt"
        text = path.read_bytes() if path.is_file() else b"<missing>"
        digest.update(split.encode() + text)
        counts[split] = sum(1 for line in text.splitlines() if line.strip()) if path.is_file() else 0
    images = folder / IMAGES_FILE
    digest.update(str(images.stat().st_size if images.is_file() else -1).encode())
    return digest.hexdigest(), counts


def read_data_path(path: str | Path) -> list[MedIMetaDataset]:
    """Every dataset of a MedIMeta data path (its folders with an ``info.yaml``), by folder name."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ManifestError(f"MedIMeta data path {path} is not a folder")
    folders = sorted(p for p in path.iterdir() if (p / "info.yaml").is_file())
    if not folders:
        raise ManifestError(f"{path}: no MedIMeta dataset in it (a folder per dataset, each with an info.yaml); point "
                            "--medimeta at the folder that holds the dataset folders")
    return [read_dataset(folder) for folder in folders]


@dataclass(frozen=True)
class Contents:
    """A dataset's splits and labels, checked against its images: what a store file is built from."""

    dataset: MedIMetaDataset
    n_images: int
    indices: Mapping[str, np.ndarray]
    """Per split, the image indices its file lists, increasing."""
    labels: Mapping[str, np.ndarray]
    """Per task key, every image's label as medmeta stores it: (N, 1) class or (N, L) 0/1, uint8."""
    images_stat: tuple[int, int]
    """``images.hdf5``'s size and modification time (ns) as it was checked."""


def read_contents(dataset: MedIMetaDataset) -> Contents:
    """Check the images' shape, every task's labels and every split against each other; refuse
    (``SourceError``, one line naming the file and what to do) anything that does not fit."""
    n, stat = _image_count(dataset)
    labels = {t.key: _task_labels(dataset, t, n) for t in dataset.tasks}
    return Contents(dataset, n, _split_indices(dataset, n), labels, stat)


def _image_count(dataset: MedIMetaDataset) -> tuple[int, tuple[int, int]]:
    """The number of images, checked for shape and dtype; and the file's size and time before reading it."""
    path = dataset.folder / IMAGES_FILE
    if not path.is_file():
        raise SourceError(f"{path} is missing: dataset {dataset.id} has no images; copy its images.hdf5 from "
                          "MedIMeta's download into that folder")
    st = path.stat()
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise SourceError(f"{path}: not a readable HDF5 file ({' '.join(str(exc).split())}); download it again") from None
    with fh:
        if not isinstance(fh.get("images"), h5py.Dataset):
            raise SourceError(f"{path} has no dataset 'images' (it has {sorted(fh)}); download it again")
        images = fh["images"]
        want = dataset.image_shape(dataset.size)
        shape = images.shape[1:]
        if shape != want and shape != (*want, 1):
            raise SourceError(f"{path}: images are shaped {shape}, but info.yaml's input_size "
                              f"[{dataset.channels}, {dataset.size}, {dataset.size}] means {want}; fix input_size "
                              "or download the dataset again")
        if images.dtype != np.uint8:
            raise SourceError(f"{path}: images have dtype {images.dtype}, expected uint8")
        return int(images.shape[0]), (st.st_size, st.st_mtime_ns)


def _task_labels(dataset: MedIMetaDataset, task: MedIMetaTask, n: int) -> np.ndarray:
    path = dataset.folder / "task_labels" / f"{task.name}.npy"
    if not path.is_file():
        raise SourceError(f"{path} is missing: the labels of task {task.name!r} of {dataset.id}; restore it from "
                          "MedIMeta's download, or remove the task from info.yaml")
    try:
        raw = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: not a readable .npy file ({' '.join(str(exc).split())}); restore it from MedIMeta's "
                          "download") from None
    if raw.ndim == 0 or len(raw) != n:
        raise SourceError(f"{path}: {raw.size if raw.ndim == 0 else len(raw)} labels for the {n} images of "
                          f"{IMAGES_FILE}; task {task.name!r} must label every image, one row each: the two files are "
                          "from different versions, download the dataset again")
    if raw.dtype.kind not in "biu":
        raise SourceError(f"{path}: labels of dtype {raw.dtype}; expected integers (info.yaml's label values)")
    if task.task_type.multilabel:
        if raw.shape != (n, len(task.labels)):
            raise SourceError(f"{path}: labels shaped {raw.shape}; task {task.name!r} is multi-label with "
                              f"{len(task.labels)} labels in info.yaml, so ({n}, {len(task.labels)})")
        bad = np.argwhere((raw != 0) & (raw != 1))
        if len(bad):
            row, col = (int(v) for v in bad[0])
            raise SourceError(f"{path}: image {row} has {int(raw[row, col])} for label {task.labels[col]!r}; a "
                              "multi-label task holds 0 or 1 per label")
        return raw.astype(np.uint8)
    if raw.ndim == 2 and raw.shape[1] == 1:
        raw = raw[:, 0]
    if raw.ndim != 1:
        raise SourceError(f"{path}: labels shaped {raw.shape}; task {task.name!r} is {task.task_type}, one label per "
                          f"image ({n},)")
    values = np.asarray(task.values, dtype=np.int64)
    raw = raw.astype(np.int64)
    position = np.clip(np.searchsorted(values, raw), 0, len(values) - 1)
    bad = np.flatnonzero(values[position] != raw)
    if len(bad):
        row = int(bad[0])
        raise SourceError(f"{path}: image {row} has label {int(raw[row])}, which is not one of task {task.name!r}'s "
                          f"label values in info.yaml {list(task.values)}; fix the labels file or info.yaml")
    return position.astype(np.uint8)[:, None]


def _split_indices(dataset: MedIMetaDataset, n: int) -> dict[str, np.ndarray]:
    owner = np.full(n, -1, dtype=np.int64)
    out = {}
    for k, split in enumerate(SPLIT_NAMES):
        path = dataset.folder / "splits" / f"{split}.txt"
        if not path.is_file():
            raise SourceError(f"{path} is missing: dataset {dataset.id} needs its train, val and test split files; "
                              "restore it from MedIMeta's download")
        indices = []
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            entry = line.strip()
            if not entry:
                continue
            stem = entry.rsplit("/", 1)[-1].split(".")[0]
            if not stem.isdigit():
                raise SourceError(f"{path} line {line_no}: {entry!r} does not name an image (images/000123.tiff)")
            index = int(stem)
            if index >= n:
                raise SourceError(f"{path} line {line_no}: {entry!r} is image {index}, but {IMAGES_FILE} holds {n} images "
                                  f"(0 to {n - 1}); the split and the images are from different versions: download the "
                                  "dataset again")
            if owner[index] >= 0:
                raise SourceError(f"{path} line {line_no}: image {index} is listed twice (also in "
                                  f"splits/{SPLIT_NAMES[owner[index]]}.txt); an image belongs to one split")
            owner[index] = k
            indices.append(index)
        declared = dataset.declared_splits.get(split)
        if declared is not None and declared != len(indices):
            raise SourceError(f"{path} lists {len(indices)} images, but info.yaml's splits_num_samples.{split} says "
                              f"{declared}; the two are from different versions: download the dataset again")
        if not indices:
            raise SourceError(f"{path} lists no images; medmeta needs images in each of train, val and test")
        out[split] = np.sort(np.asarray(indices, dtype=np.int64))
    return out


def area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in): the share of each input pixel in each output pixel when ``n_in`` pixels shrink
    to ``n_out`` (each output pixel covers ``n_in / n_out`` input pixels; rows sum to 1)."""
    scale = n_in / n_out
    start = np.arange(n_out)[:, None] * scale
    pixel = np.arange(n_in)[None, :]
    overlap = np.minimum(start + scale, pixel + 1) - np.maximum(start, pixel)
    return np.clip(overlap, 0.0, None) / scale


def area_resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 images (B, H, W) or (B, H, W, C) shrunk to (B, size, size[, C]) by area interpolation,
    rounded half up."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    rows, cols = area_weights(images.shape[1], size), area_weights(images.shape[2], size)
    out = np.einsum("ih,bhw...,jw->bij...", rows, images.astype(np.float64), cols, optimize=True)
    return np.clip(np.floor(out + 0.5 + 1e-9), 0, 255).astype(np.uint8)


def iter_images(dataset: MedIMetaDataset, indices: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """The images at ``indices`` of ``images.hdf5``, in that order, at ``size``, in blocks of bounded
    memory. One read per image (fast on MedIMeta's unchunked files; each image is read once)."""
    native = int(np.prod(dataset.image_shape(dataset.size)))
    rows = max(1, RESIZE_BLOCK_BYTES // (8 * native))
    with h5py.File(dataset.folder / IMAGES_FILE, "r") as fh:
        images = fh["images"]
        for start in range(0, len(indices), rows):
            block = np.stack([images[int(i)] for i in indices[start:start + rows]])
            if block.ndim == 4 and dataset.channels == 1:
                block = block[..., 0]
            yield area_resize(block, size)


def in_place_images(fh: h5py.File, name: str, dataset: MedIMetaDataset, indices: np.ndarray) -> h5py.Dataset:
    """Create ``name`` in ``fh`` as a virtual dataset of the images at ``indices`` (increasing) of the
    dataset's ``images.hdf5``, at its own size: the images are read there, not copied. Grey images
    stored ``(N, H, W, 1)`` read as ``(H, W)``, as a copy holds them."""
    path = dataset.folder / IMAGES_FILE
    with h5py.File(path, "r") as src:
        shape = src["images"].shape
    layout = h5py.VirtualLayout(shape=(len(indices), *dataset.image_shape(dataset.size)), dtype=np.uint8)
    source = h5py.VirtualSource(str(path).replace("%", "%%"), "images", shape=shape)  # HDF5 reads % as a format
    for start in range(0, len(indices), IN_PLACE_ROWS):
        rows = indices[start:start + IN_PLACE_ROWS]
        layout[start:start + len(rows)] = source[rows]
    return fh.create_virtual_dataset(name, layout)


def source_record(contents: Contents) -> dict[str, Any]:
    """What an in-place store file keeps of the ``images.hdf5`` it reads (``IN_PLACE_ATTRS``): its
    path, size and time before it was checked, so a change during the build is refused later too."""
    return dict(zip(IN_PLACE_ATTRS, (str(contents.dataset.folder / IMAGES_FILE), *contents.images_stat)))


def in_place_problem(attrs: Mapping[str, Any]) -> str:
    """Empty for a store file holding its images, or reading an ``images.hdf5`` of the size and
    modification time it was built from; else what changed, naming that file. A stat, no read."""
    if IN_PLACE_ATTRS[0] not in attrs:
        return ""
    path = Path(str(attrs[IN_PLACE_ATTRS[0]]))
    size, mtime = (int(attrs[key]) for key in IN_PLACE_ATTRS[1:])
    try:
        st = path.stat()
    except OSError:
        return f"{path} is missing, and this store file reads its images from it in place"
    if st.st_size != size:
        return (f"{path} changed since this store file was built to read it in place (now {st.st_size} bytes, "
                f"was {size})")
    if st.st_mtime_ns != mtime:
        return (f"{path} changed since this store file was built to read it in place "
                f"(modified {_when(st.st_mtime_ns)}, was {_when(mtime)})")
    return ""


def _when(mtime_ns: int) -> str:
    return datetime.fromtimestamp(mtime_ns / 1e9, timezone.utc).isoformat(timespec="milliseconds")
