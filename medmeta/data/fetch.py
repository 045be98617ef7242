"""Get official MedMNIST npz files, verified: from a local folder, a cache, or a download.

Every file is checked before anything reads it: MD5 against the manifest, then its keys,
shapes, dtypes and split counts against what the manifest says, then every label against the
manifest's classes. A file that fails is refused with a message naming it and what to do; it
never reaches the store.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import SourceError
from .manifest import SPLITS, FileInfo, SubsetInfo

SOURCE_DIR_ENV = "MEDMETA_SOURCE_DIR"


def md5sum(path: Path, block: int = 2**20) -> str:
    """The file's MD5 as hex, read in blocks."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_header(fh) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran flag and dtype from an open .npy stream, leaving it at the data."""
    major, _ = np.lib.format.read_magic(fh)
    reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return reader(fh)


def _npy_header(zf: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    with zf.open(f"{key}.npy") as fh:
        shape, fortran, dtype = _read_header(fh)
    return shape, dtype, fortran


def npz_array_shape(path: Path, key: str) -> tuple[int, ...]:
    """Shape of one array in an npz, read from its header without loading it."""
    with zipfile.ZipFile(path) as zf:
        return tuple(_npy_header(zf, key)[0])


def iter_npz_rows(path: Path, key: str, rows_per_block: int) -> Iterator[np.ndarray]:
    """Stream an array from an npz in blocks of rows, so a 16 GB array never sits in memory."""
    with zipfile.ZipFile(path) as zf:
        with zf.open(f"{key}.npy") as fh:
            shape, fortran, dtype = _read_header(fh)
            if fortran:
                raise SourceError(f"{path}: array {key!r} is Fortran-ordered; expected C order")
            row_shape = shape[1:]
            row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
            remaining = shape[0]
            while remaining:
                n = min(rows_per_block, remaining)
                buf = fh.read(n * row_bytes)
                if len(buf) != n * row_bytes:
                    raise SourceError(f"{path}: array {key!r} is truncated; delete the file and fetch it again")
                yield np.frombuffer(buf, dtype=dtype).reshape((n, *row_shape))
                remaining -= n


def check_labels(path: Path, info: SubsetInfo, rows_per_block: int = 2**20) -> None:
    """Refuse labels outside the manifest's classes: 0..n-1 for a single-label task with n labels,
    0 or 1 in each column of a multi-label task. Labels are small, so this streams every split's
    labels (the images are not read) and a refusal comes before any store file is written; a
    label 7 in a binary file would otherwise be built and surface much later as a strange class."""
    names = info.labels
    top = 1 if info.task_type.multilabel else len(names) - 1
    for split in SPLITS:
        key = f"{split}_labels"
        start = 0
        for block in iter_npz_rows(path, key, rows_per_block):
            bad = np.flatnonzero(block.reshape(len(block), -1).max(axis=1) > top)
            if bad.size:
                row = int(bad[0])
                if info.task_type.multilabel:
                    col = int(np.flatnonzero(block[row] > top)[0])
                    what = (f"{key} row {start + row} column {col} ({names[col]}) has {int(block[row, col])}; "
                            f"{info.name} is multi-label with 0 or 1 per label")
                else:
                    what = (f"{key} row {start + row} has label {int(block[row, 0])}; {info.name} is "
                            f"{info.task_type} with classes 0..{top} (the manifest names {len(names)} labels)")
                raise SourceError(f"{path}: {what}; fix the manifest's labels or the file")
            start += len(block)


def check_npz(path: Path, info: SubsetInfo, size: int) -> None:
    """Check keys, shapes, dtypes and split counts of an npz against the manifest (from the headers),
    then that every label is one of the manifest's classes (``check_labels``; labels are small)."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SourceError(f"{path}: not a readable npz file ({exc}); delete it and fetch it again") from None
    with zf:
        names = set(zf.namelist())
        for split in SPLITS:
            for part in ("images", "labels"):
                key = f"{split}_{part}"
                if f"{key}.npy" not in names:
                    raise SourceError(
                        f"{path}: missing array {key!r} (has {sorted(n[:-4] for n in names)}); "
                        f"this is not an official {info.name} file"
                    )
                shape, dtype, _ = _npy_header(zf, key)
                expected = info.splits[split]
                if shape[0] != expected:
                    raise SourceError(f"{path}: {key} has {shape[0]} rows, the manifest says {expected}")
                want = info.image_shape(size) if part == "images" else (info.label_width(),)
                if tuple(shape[1:]) != want:
                    raise SourceError(f"{path}: {key} has shape {shape}, expected (N, {', '.join(map(str, want))})")
                if dtype != np.uint8:
                    raise SourceError(f"{path}: {key} has dtype {dtype}, expected uint8")
    check_labels(path, info)


def verify_file(path: Path, info: SubsetInfo, size: int) -> None:
    """Refuse a file whose MD5 or contents do not match the manifest entry for (subset, size)."""
    expected = info.file(size).md5
    actual = md5sum(path)
    if actual != expected:
        raise SourceError(
            f"{path}: MD5 {actual} does not match the official {expected} for {info.name} at {size}px; "
            "the file is corrupt, truncated or from another release. Delete it and fetch it again."
        )
    check_npz(path, info, size)


def _download(entry: FileInfo, cache_dir: Path) -> Path:
    """Download with pooch: MD5 checked, written to a temporary file and renamed into place."""
    import pooch

    return Path(pooch.retrieve(entry.url, known_hash=f"md5:{entry.md5}", fname=entry.file,
                               path=cache_dir, progressbar=True))


def fetch(info: SubsetInfo, size: int, cache_dir: Path, source_dir: str | Path | None = None,
          download: bool = True) -> Path:
    """Return a verified local path to the npz of (subset, size).

    Looks in ``source_dir`` (or ``$MEDMETA_SOURCE_DIR``), next to the user manifest that
    defined the subset, then in ``cache_dir``; else downloads into ``cache_dir`` when
    ``download`` is true and the manifest gives a URL.
    """
    entry = info.file(size)
    source_dir = source_dir if source_dir is not None else os.environ.get(SOURCE_DIR_ENV)
    folders = [Path(source_dir)] if source_dir else []
    if info.home is not None:
        folders.append(info.home)
    folders.append(Path(cache_dir))
    for folder in folders:
        path = folder / entry.file
        if path.is_file():
            verify_file(path, info, size)
            return path
    where = " or ".join(str(f) for f in folders)
    if not download or entry.url is None:
        why = "downloading is off" if download is False else "the manifest gives no URL for it"
        raise SourceError(f"{entry.file} not found in {where} and {why}; put the file there or pass --source-dir / "
                          f"set {SOURCE_DIR_ENV}")
    try:
        path = _download(entry, Path(cache_dir))
    except ValueError as exc:
        raise SourceError(f"{entry.url}: downloaded file failed verification ({exc}); try again later") from None
    except Exception as exc:  # network errors come from requests, urllib or pooch
        raise SourceError(
            f"could not download {entry.file} from {entry.url} ({type(exc).__name__}: {exc}); if this machine "
            f"is offline, copy the official file into a folder and pass --source-dir DIR or set {SOURCE_DIR_ENV}"
        ) from None
    check_npz(path, info, size)
    return path
