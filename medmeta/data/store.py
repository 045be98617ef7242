"""The HDF5 multi-task store: one verified file per (subset, size) under a root folder.

Layout: ``{root}/store/{subset}_{size}.h5`` holds ``{split}/images`` and ``{split}/labels``
(uint8, the npz layout) and provenance attributes; ``{root}/downloads`` caches npz files. A
MedIMeta dataset's tasks share ``{root}/store/medimeta-{id}_{size}.h5``: ``{split}/images`` once
and ``{split}/labels/{task}`` per task (``SubsetInfo.file_stem`` and ``labels_key``), built from
the dataset's folder instead of an npz file (``medmeta.data.medimeta``), with the same chunks,
checksums and atomic writes; built in place, its ``{split}/images`` are virtual datasets reading the
folder's ``images.hdf5``, and the file is refused on opening once that file is missing or changed.

Images are chunked so that one chunk holds roughly ``CHUNK_BYTES`` of whole images: a
224px RGB image is its own chunk, so a random read decompresses one image and memory stays
bounded; at 28px a chunk holds ~80 images, which keeps the chunk index small. Chunks are
LZF-compressed (fast to decode). Builds stream the npz in blocks, write a temporary file
next to the target and rename it into place, so a crash never leaves a half-written store
visible and re-running skips what is already built; the free disk space is checked first.

Corruption is never read silently: every chunk carries HDF5's Fletcher-32 checksum, checked
by HDF5 on each read, and each dataset's MD5 is recorded at build time. Labels are small, so
opening a task checks their MD5 whole; a damaged image chunk fails its checksum when read.
Either way the reader stops with one line naming the file and how to rebuild it
(``medmeta prepare NAME --force``, from ``--source-dir``, the download cache or the MedIMeta
folder), and
``is_built`` treats a file with damaged labels as not built, so the next build repairs it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np
from tqdm.auto import tqdm

from .._version import __version__
from ..errors import ConfigError, StoreError
from ..files import atomic_path, ensure_folder
from .fetch import fetch, iter_npz_rows, npz_array_shape
from .manifest import SPLITS, Manifest, SubsetInfo, load_manifest
from .medimeta import (IN_PLACE_ATTRS, in_place_images, in_place_problem, iter_images, read_contents, read_dataset,
                       source_record)

ROOT_ENV = "MEDMETA_ROOT"
FORMAT_VERSION = 2
"""2: Fletcher-32 checksums on every chunk, labels chunked too."""
CHUNK_BYTES = 64 * 2**10
BUILD_BLOCK_BYTES = 64 * 2**20


def default_root() -> Path:
    """``$MEDMETA_ROOT`` or ``~/.medmeta``."""
    return Path(os.environ.get(ROOT_ENV) or Path.home() / ".medmeta")


def chunk_rows(image_shape: tuple[int, ...]) -> int:
    """Images per HDF5 chunk: as many whole images as fit in CHUNK_BYTES, at least one."""
    return max(1, CHUNK_BYTES // int(np.prod(image_shape)))


@dataclass(frozen=True)
class Entry:
    """What ``Store.info`` reports for one built file."""

    subset: str
    size: int
    counts: dict[str, int]
    source_md5: str
    built_at: str
    path: Path
    problem: str = ""
    """Empty when the file reads and its labels match their recorded MD5; else what is wrong."""


def prepare_command(info: SubsetInfo, size: int) -> str:
    """The command that builds a subset's store file at ``size``."""
    if info.medimeta is not None and info.home is not None:
        return f"medmeta prepare --medimeta {info.home.parent} {info.medimeta} --size {size}"
    return f"medmeta prepare {info.short_name} --size {size}"


def rebuild_hint(info: SubsetInfo, size: int) -> str:
    """What to tell a user whose store file is missing or corrupt."""
    origin = ("from its MedIMeta folder" if info.medimeta is not None
              else "from --source-dir or the download cache, or downloaded again")
    return f"rebuild it with `{prepare_command(info, size)} --force` ({origin})"


def label_datasets(fh: h5py.File, split: str) -> list[h5py.Dataset]:
    """Every labels dataset of a split: ``{split}/labels``, or each task's under that group."""
    node = fh[f"{split}/labels"]
    return [node] if isinstance(node, h5py.Dataset) else [node[k] for k in sorted(node)]


def open_store_file(path: Path) -> h5py.File:
    """Open a store file for reading; one StoreError line when it cannot be read, or when it reads
    its images in place from an ``images.hdf5`` missing or changed since it was built."""
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        reason = exc.strerror or " ".join(str(exc).split())
        raise StoreError(f"{path}: cannot read this store file ({reason})") from None
    problem = in_place_problem(fh.attrs)
    if problem:
        attrs = dict(fh.attrs)
        fh.close()
        command = (f"medmeta prepare --medimeta {Path(str(attrs['source_file'])).parent} {attrs['subset']} "
                   f"--size {attrs['size']} --force")
        raise StoreError(f"{path}: {problem}; rebuild it with `{command}`")
    return fh


def reads_in_place(path: Path) -> bool:
    """Whether a store file reads its images from a MedIMeta ``images.hdf5`` (False when absent or unreadable)."""
    try:
        with h5py.File(path, "r") as fh:
            return IN_PLACE_ATTRS[0] in fh.attrs
    except OSError:
        return False


def labels_problem(fh: h5py.File) -> str:
    """Empty if every split's labels (each task's) match their recorded MD5 (cheap: labels are
    small), else what differs."""
    try:
        for split in SPLITS:
            for dset in label_datasets(fh, split):
                if _dataset_md5(dset) != dset.attrs.get("md5"):
                    return f"{dset.name.lstrip('/')} differ from their recorded MD5"
    except (OSError, KeyError) as exc:
        return f"labels unreadable ({' '.join(str(exc).split())})"
    return ""

class Store:
    """A folder of built subsets; build, list and verify them."""

    def __init__(self, root: str | Path | None = None, manifest: Manifest | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.manifest = manifest or load_manifest()
        self.store_dir = self.root / "store"
        self.download_dir = self.root / "downloads"

    def path(self, subset: str, size: int, must_exist: bool = False) -> Path:
        """Where a subset's store file at ``size`` lives (refused when ``must_exist`` and it is not built)."""
        info = self.manifest[subset]
        info.file(size)
        path = self.store_dir / f"{info.stem}_{size}.h5"
        if must_exist and not path.is_file():
            raise StoreError(f"{info.name} at {size}px is not built in {self.root}; run "
                             f"`{prepare_command(info, size)} --root {self.root}`")
        return path

    def built(self) -> list[tuple[str, int]]:
        """(subset, size) pairs with a finished store file, in manifest order."""
        return [(name, size) for name, info in self.manifest.subsets.items() for size in info.sizes
                if (self.store_dir / f"{info.stem}_{size}.h5").is_file()]

    def present(self, subset: str, size: int, source_dir: str | Path | None = None) -> bool:
        """Whether (subset, size) is here without a download: built, or its file in ``source_dir`` or
        next to the user manifest that names it (a MedIMeta task: in its dataset's folder)."""
        info = self.manifest[subset]
        if size not in info.files:
            return False
        if self.path(subset, size).is_file():
            return True
        return any((Path(f) / info.file(size).file).is_file() for f in (source_dir, info.home) if f)

    def is_built(self, subset: str, size: int) -> bool:
        """True when the file exists, was built from the file the manifest names in this format,
        its labels match their recorded MD5 and, read in place, its images.hdf5 is unchanged (a file
        failing this is rebuilt by ``build``)."""
        path = self.path(subset, size)
        if not path.is_file():
            return False
        try:
            with h5py.File(path, "r") as fh:
                return (fh.attrs.get("source_md5") == self.manifest[subset].file(size).md5
                        and int(fh.attrs.get("format_version", -1)) == FORMAT_VERSION and not labels_problem(fh)
                        and not in_place_problem(fh.attrs))
        except OSError:
            return False

    def _in_place(self, subset: str, size: int, in_place: bool) -> bool:
        """Whether ``build`` makes (subset, size) read in place: a file built so stays so; ``in_place``
        asks it of a MedIMeta dataset at its own size (a smaller size is a resized copy)."""
        info = self.manifest[subset]
        if in_place and info.medimeta is None:
            raise ConfigError(f"{info.name}: only a MedIMeta dataset's images.hdf5 is read in place; MedMNIST's "
                              "npz files are copied into the store")
        return reads_in_place(self.path(subset, size)) or (in_place and size == max(info.sizes))

    def up_to_date(self, subset: str, size: int, in_place: bool = False) -> bool:
        """Whether ``build`` skips (subset, size): built, and read in place when it would be built so."""
        subset = self.manifest.resolve(subset)
        wanted = self._in_place(subset, size, in_place)
        return self.is_built(subset, size) and reads_in_place(self.path(subset, size)) == wanted

    def build(self, subset: str, size: int = 28, source_dir: str | Path | None = None,
              download: bool = True, force: bool = False, in_place: bool = False) -> Path:
        """Fetch, verify and convert one official npz (or a MedIMeta dataset's folder, every task of
        it); skip when already built (unless ``force``).

        ``fetch`` (``read_contents`` for MedIMeta) refuses a file whose MD5, layout or labels (every
        one in the manifest's classes) do not match before the temporary store file is made, so a
        refused build leaves nothing. ``in_place``: a MedIMeta dataset at its own size reads its
        ``images.hdf5`` where it is instead of copying the images; a file built so stays so when
        rebuilt (delete it to build a copy)."""
        subset = self.manifest.resolve(subset)
        target = self.path(subset, size)
        if not force and self.up_to_date(subset, size, in_place):
            return target
        info = self.manifest[subset]
        if info.medimeta is not None:
            return self._build_medimeta(info, size, target, self._in_place(subset, size, in_place))
        npz = fetch(info, size, self.download_dir, source_dir=source_dir, download=download)
        ensure_folder(self.store_dir)
        needs = sum(int(np.prod(npz_array_shape(npz, f"{split}_{part}"))) for split in SPLITS
                    for part in ("images", "labels")) + 2**20
        with atomic_path(target, needs_bytes=needs) as tmp, h5py.File(tmp, "w") as fh:
            fh.attrs.update(subset=subset, size=size, source_file=info.file(size).file,
                            source_md5=info.file(size).md5, manifest_version=self.manifest.version,
                            medmeta_version=__version__, format_version=FORMAT_VERSION,
                            built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            for split in SPLITS:
                for part in ("images", "labels"):
                    self._copy_array(npz, f"{split}_{part}", fh, f"{split}/{part}",
                                     desc=f"{subset}_{size} {split} {part}")
        return target

    def _build_medimeta(self, info: SubsetInfo, size: int, target: Path, in_place: bool) -> Path:
        """One store file for every task of a MedIMeta dataset at ``size`` (see ``medmeta.data.medimeta``):
        the folder as it is now, checked whole before the temporary file is made. ``in_place`` (its
        own size only): the images stay in ``images.hdf5``, each split's read once for its MD5."""
        assert info.home is not None  # a MedIMeta subset's folder (manifest.medimeta_manifest)
        dataset = read_dataset(info.home)
        contents = read_contents(dataset)
        record = source_record(contents) if in_place else {}
        ensure_folder(self.store_dir)
        image_bytes = 8 if in_place else int(np.prod(dataset.image_shape(size)))  # in place: a row of the mapping
        needs = sum(len(i) * (image_bytes + sum(lab.shape[1] for lab in contents.labels.values()))
                    for i in contents.indices.values()) + 2**20
        with atomic_path(target, needs_bytes=needs) as tmp, h5py.File(tmp, "w") as fh:
            fh.attrs.update(subset=dataset.id, tasks=[dataset.subset_name(t) for t in dataset.tasks], size=size,
                            source_file=str(dataset.folder), source_md5=dataset.digest,
                            manifest_version=self.manifest.version, medmeta_version=__version__,
                            format_version=FORMAT_VERSION,
                            built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), **record)
            for split in SPLITS:
                indices = contents.indices[split]
                images, desc = iter_images(dataset, indices, size), f"{info.stem}_{size} {split} images"
                if in_place:
                    in_place_images(fh, f"{split}/images", dataset, indices).attrs["md5"] = \
                        _md5_rows(images, len(indices), desc)
                else:
                    self._write_array(fh, f"{split}/images", (len(indices), *dataset.image_shape(size)), images, desc)
                for key, labels in contents.labels.items():
                    self._write_array(fh, f"{split}/labels/{key}", (len(indices), labels.shape[1]), [labels[indices]])
        return target

    @staticmethod
    def _copy_array(npz: Path, key: str, fh: h5py.File, name: str, desc: str) -> None:
        """Stream one npz array into a chunked dataset (``_write_array``)."""
        total, *row_shape = npz_array_shape(npz, key)
        rows = max(1, BUILD_BLOCK_BYTES // max(1, int(np.prod(row_shape))))
        Store._write_array(fh, name, (total, *row_shape), iter_npz_rows(npz, key, rows_per_block=rows), desc)

    @staticmethod
    def _write_array(fh: h5py.File, name: str, shape: tuple[int, ...], blocks: Iterable[np.ndarray],
                     desc: str | None = None) -> None:
        """Write uint8 blocks of rows into a chunked, checksummed dataset (images: whole images a
        chunk, LZF), recording the MD5 of its bytes."""
        total, *row_shape = shape
        is_images = name.endswith("images")
        dset = fh.create_dataset(
            name, shape=shape, dtype=np.uint8,
            chunks=(min(total, chunk_rows(tuple(row_shape))), *row_shape) if is_images else True,
            compression="lzf" if is_images else None, fletcher32=True)
        dset.attrs["md5"] = _md5_rows(blocks, total, desc, into=dset)

    def verify(self, subset: str, size: int) -> Entry:
        """Re-read a built file: provenance, split counts and shapes against the manifest, every
        chunk's checksum and each dataset's content MD5."""
        subset = self.manifest.resolve(subset)
        info = self.manifest[subset]
        path = self.path(subset, size, must_exist=True)
        problem = f"{path}: %s; {rebuild_hint(info, size)}"
        try:
            fh = h5py.File(path, "r")
        except OSError as exc:
            raise StoreError(problem % f"not a readable HDF5 file ({' '.join(str(exc).split())})") from None
        with fh:
            changed = in_place_problem(fh.attrs)
            if changed:
                raise StoreError(problem % changed)
            if fh.attrs.get("source_md5") != info.file(size).md5:
                raise StoreError(problem % "built from a file other than the one the manifest names")
            counts = {}
            for split in SPLITS:
                for part, shape in (("images", info.image_shape(size)), (info.labels_key, (info.label_width(),))):
                    if f"{split}/{part}" not in fh:
                        raise StoreError(problem % f"missing dataset {split}/{part}")
                    dset = fh[f"{split}/{part}"]
                    if dset.shape != (info.splits[split], *shape):
                        raise StoreError(problem % f"{split}/{part} has shape {dset.shape}, expected "
                                         f"{(info.splits[split], *shape)}")
                for dset in [fh[f"{split}/images"], *label_datasets(fh, split)]:
                    try:
                        digest = _dataset_md5(dset)
                    except OSError as exc:  # a chunk fails its checksum or does not decompress
                        raise StoreError(problem % f"{dset.name.lstrip('/')} is unreadable "
                                         f"({' '.join(str(exc).split())})") from None
                    if digest != dset.attrs.get("md5"):
                        raise StoreError(problem % f"{dset.name.lstrip('/')} content does not match its recorded MD5")
                counts[split] = info.splits[split]
            return Entry(subset, size, counts, str(fh.attrs["source_md5"]), str(fh.attrs["built_at"]), path)

    def info(self) -> list[Entry]:
        """Provenance and split counts of every built file, and whether its labels are intact (cheap)."""
        entries = []
        for subset, size in self.built():
            path = self.path(subset, size)
            key = self.manifest[subset].labels_key
            try:
                with h5py.File(path, "r") as fh:
                    counts = {split: int(fh[f"{split}/{key}"].shape[0]) for split in SPLITS}
                    problem = labels_problem(fh) or in_place_problem(fh.attrs)
                    entries.append(Entry(subset, size, counts, str(fh.attrs.get("source_md5")),
                                         str(fh.attrs.get("built_at")), path, problem))
            except (OSError, KeyError) as exc:
                entries.append(Entry(subset, size, {s: 0 for s in SPLITS}, "", "", path,
                                     f"unreadable ({' '.join(str(exc).split())})"))
        return entries


def _md5_rows(blocks: Iterable[np.ndarray], total: int, desc: str | None, into: h5py.Dataset | None = None) -> str:
    """MD5 of uint8 blocks of rows (``total`` in all), each written to the next rows of ``into`` first
    when given; a progress bar when ``desc``."""
    digest = hashlib.md5()
    start = 0
    with tqdm(total=total, desc=desc, unit="img", leave=False, disable=None if desc else True) as bar:
        for block in blocks:
            if into is not None:
                into[start:start + len(block)] = block
            digest.update(np.ascontiguousarray(block).tobytes())
            start += len(block)
            bar.update(len(block))
    return digest.hexdigest()


def _dataset_md5(dset: h5py.Dataset) -> str:
    digest = hashlib.md5()
    rows = max(1, BUILD_BLOCK_BYTES // max(1, int(np.prod(dset.shape[1:]))))
    if dset.chunks:
        rows = max(dset.chunks[0], rows - rows % dset.chunks[0])
    for start in range(0, dset.shape[0], rows):
        digest.update(np.ascontiguousarray(dset[start:start + rows]).tobytes())
    return digest.hexdigest()
