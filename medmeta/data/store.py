"""The HDF5 multi-task store: one verified file per (subset, size) under a root folder.

Layout: ``{root}/store/{subset}_{size}.h5`` holds ``{split}/images`` and ``{split}/labels``
(uint8, the npz layout) and provenance attributes; ``{root}/downloads`` caches npz files.

Images are chunked so that one chunk holds roughly ``CHUNK_BYTES`` of whole images: a
224px RGB image is its own chunk, so a random read decompresses one image and memory stays
bounded; at 28px a chunk holds ~80 images, which keeps the chunk index small. Chunks are
LZF-compressed (fast to decode). Builds stream the npz in blocks, write a temporary file
next to the target and rename it into place, so a crash never leaves a half-written store
visible and re-running skips what is already built.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from .. import __version__
from ..errors import StoreError
from ..files import atomic_path
from .fetch import fetch, iter_npz_rows, npz_array_shape
from .manifest import SPLITS, Manifest, load_manifest

ROOT_ENV = "MEDMETA_ROOT"
FORMAT_VERSION = 1
CHUNK_BYTES = 64 * 2**10
BUILD_BLOCK_BYTES = 64 * 2**20
_TMP = re.compile(r"^\.(?P<name>.+\.h5)\.(?P<pid>\d+)\.tmp$")


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    """A folder of built subsets; build, list and verify them."""

    def __init__(self, root: str | Path | None = None, manifest: Manifest | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.manifest = manifest or load_manifest()
        self.store_dir = self.root / "store"
        self.download_dir = self.root / "downloads"

    def path(self, subset: str, size: int, must_exist: bool = False) -> Path:
        subset = self.manifest.resolve(subset)
        self.manifest[subset].file(size)
        path = self.store_dir / f"{subset}_{size}.h5"
        if must_exist and not path.is_file():
            raise StoreError(
                f"{subset} at {size}px is not built in {self.root}; run "
                f"`medmeta prepare {self.manifest[subset].short_name} --size {size} --root {self.root}`"
            )
        return path

    def built(self) -> list[tuple[str, int]]:
        """(subset, size) pairs with a finished store file, in manifest order."""
        return [(name, size) for name, info in self.manifest.subsets.items() for size in info.sizes
                if (self.store_dir / f"{name}_{size}.h5").is_file()]

    def is_built(self, subset: str, size: int) -> bool:
        """True when the file exists and was built from the official file the manifest names."""
        path = self.path(subset, size)
        if not path.is_file():
            return False
        try:
            with h5py.File(path, "r") as fh:
                return (fh.attrs.get("source_md5") == self.manifest[subset].file(size).md5
                        and int(fh.attrs.get("format_version", -1)) == FORMAT_VERSION)
        except OSError:
            return False

    def build(self, subset: str, size: int = 28, source_dir: str | Path | None = None,
              download: bool = True, force: bool = False) -> Path:
        """Fetch, verify and convert one official npz; skip when already built (unless ``force``)."""
        subset = self.manifest.resolve(subset)
        target = self.path(subset, size)
        if not force and self.is_built(subset, size):
            return target
        info = self.manifest[subset]
        npz = fetch(info, size, self.download_dir, source_dir=source_dir, download=download)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()
        with atomic_path(target) as tmp, h5py.File(tmp, "w") as fh:
            fh.attrs.update(subset=subset, size=size, source_file=info.file(size).file,
                            source_md5=info.file(size).md5, manifest_version=self.manifest.version,
                            medmeta_version=__version__, format_version=FORMAT_VERSION,
                            built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            for split in SPLITS:
                for part in ("images", "labels"):
                    self._copy_array(npz, f"{split}_{part}", fh, f"{split}/{part}",
                                     desc=f"{subset}_{size} {split} {part}")
        return target

    @staticmethod
    def _copy_array(npz: Path, key: str, fh: h5py.File, name: str, desc: str) -> None:
        """Stream one npz array into a chunked dataset, recording the MD5 of its bytes."""
        total, *row_shape = npz_array_shape(npz, key)
        rows = max(1, BUILD_BLOCK_BYTES // max(1, int(np.prod(row_shape))))
        is_images = key.endswith("images")
        dset = fh.create_dataset(
            name, shape=(total, *row_shape), dtype=np.uint8,
            chunks=(min(total, chunk_rows(row_shape)), *row_shape) if is_images else None,
            compression="lzf" if is_images else None)
        digest = hashlib.md5()
        start = 0
        with tqdm(total=total, desc=desc, unit="img", leave=False, disable=None) as bar:
            for block in iter_npz_rows(npz, key, rows_per_block=rows):
                dset[start:start + len(block)] = block
                digest.update(block.tobytes())
                start += len(block)
                bar.update(len(block))
        dset.attrs["md5"] = digest.hexdigest()

    def _remove_stale_temps(self) -> None:
        """Delete temporary files left by builds whose process died."""
        for path in self.store_dir.glob(".*.tmp"):
            match = _TMP.match(path.name)
            if match and not _pid_alive(int(match["pid"])):
                path.unlink(missing_ok=True)

    def verify(self, subset: str, size: int) -> Entry:
        """Re-read a built file: provenance, split counts and shapes against the manifest, content MD5s."""
        subset = self.manifest.resolve(subset)
        info = self.manifest[subset]
        path = self.path(subset, size, must_exist=True)
        problem = f"{path}: %s; rebuild it with `medmeta prepare {info.short_name} --size {size} --force`"
        try:
            fh = h5py.File(path, "r")
        except OSError as exc:
            raise StoreError(problem % f"not a readable HDF5 file ({exc})") from None
        with fh:
            if fh.attrs.get("source_md5") != info.file(size).md5:
                raise StoreError(problem % "built from a file other than the official one in the manifest")
            counts = {}
            for split in SPLITS:
                for part, shape in (("images", info.image_shape(size)), ("labels", (info.label_width(),))):
                    if f"{split}/{part}" not in fh:
                        raise StoreError(problem % f"missing dataset {split}/{part}")
                    dset = fh[f"{split}/{part}"]
                    if dset.shape != (info.splits[split], *shape):
                        raise StoreError(problem % f"{split}/{part} has shape {dset.shape}, expected "
                                         f"{(info.splits[split], *shape)}")
                    if _dataset_md5(dset) != dset.attrs.get("md5"):
                        raise StoreError(problem % f"{split}/{part} content does not match its recorded MD5")
                counts[split] = info.splits[split]
            return Entry(subset, size, counts, str(fh.attrs["source_md5"]), str(fh.attrs["built_at"]), path)

    def info(self) -> list[Entry]:
        """Provenance and split counts of every built file (cheap: reads metadata only)."""
        entries = []
        for subset, size in self.built():
            path = self.path(subset, size)
            with h5py.File(path, "r") as fh:
                counts = {split: int(fh[f"{split}/labels"].shape[0]) for split in SPLITS}
                entries.append(Entry(subset, size, counts, str(fh.attrs.get("source_md5")),
                                     str(fh.attrs.get("built_at")), path))
        return entries


def _dataset_md5(dset: h5py.Dataset) -> str:
    digest = hashlib.md5()
    rows = max(1, BUILD_BLOCK_BYTES // max(1, int(np.prod(dset.shape[1:]))))
    if dset.chunks:
        rows = max(dset.chunks[0], rows - rows % dset.chunks[0])
    for start in range(0, dset.shape[0], rows):
        digest.update(np.ascontiguousarray(dset[start:start + rows]).tobytes())
    return digest.hexdigest()
