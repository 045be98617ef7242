"""Atomic file writes: write to a temporary file beside the target, then rename it into place.

Every file medmeta writes (store files, episode sets, checkpoints, results) goes through
``atomic_path``, so a crash never leaves a half-written file where a finished one is expected:

* Temporary names are ``.{name}.{host}-{pid}-{start}.tmp``, where ``start`` is the writing
  process's start time: every writer first removes the temporary files in its folder that this
  host's processes left and that no longer run (a reused PID has another start time), so a
  killed write does not keep its disk space; other hosts' files on a shared disk are left alone.
* Given the bytes a write needs, the free space is checked first; a write that still runs out
  of space (``ENOSPC``, or torch's "enforce fail" on a full disk) becomes one ``DiskFullError``
  naming the path and the space needed, and its temporary file is removed.
* Other OS errors (a read-only folder, a path that is a file) become one ``StoreError`` line.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import DiskFullError, StoreError

_TMP = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)-(?P<start>\d+)\.tmp$")
FULL_DISK_MESSAGES = ("No space left on device", "enforce fail at inline_container", "unexpected pos")
"""How a full disk shows up in errors that carry no errno (h5py, torch.save's zip writer)."""


def _start_time(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (Linux /proc), None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def _owner(pid: int) -> str:
    start = _start_time(pid)
    return f"{_host()}-{pid}-{start if start is not None else 0}"


def _alive(pid: int, start: int) -> bool:
    if not Path("/proc").is_dir():  # no /proc: only a missing PID proves a writer is gone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return _start_time(pid) == start


def sweep_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files in ``folder`` left by this host's writers that no longer run."""
    removed, host = [], _host()
    for path in folder.glob(".*.tmp"):
        match = _TMP.match(path.name)
        if match and match["host"] == host and not _alive(int(match["pid"]), int(match["start"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def safe_name(name: str) -> str:
    """``name`` as one path component (a method, an architecture such as ``hf-hub:owner/model``)."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _is_disk_full(exc: BaseException) -> bool:
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or any(m in str(exc) for m in FULL_DISK_MESSAGES)


def ensure_folder(folder: Path) -> None:
    """Create ``folder`` (and parents), or say in one line why it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise StoreError(f"{folder} (or a folder above it) is a file, not a folder; choose another location") from None
    except OSError as exc:
        raise StoreError(f"cannot create folder {folder} ({exc.strerror}); choose another location") from None


@contextmanager
def atomic_path(path: str | Path, needs_bytes: int | None = None) -> Iterator[Path]:
    """A temporary path beside ``path``: renamed onto it when the block succeeds, removed otherwise.

    ``needs_bytes``: an upper estimate of the file's size, checked against the free space first.
    """
    path = Path(path)
    ensure_folder(path.parent)
    sweep_stale_temporaries(path.parent)
    if needs_bytes is not None:
        free = shutil.disk_usage(path.parent).free
        if free < needs_bytes:
            raise DiskFullError(f"not enough disk space for {path}: it needs up to {_mib(needs_bytes)}, "
                                f"{_mib(free)} are free in {path.parent}; free some space or choose another folder")
    tmp = path.with_name(f".{path.name}.{_owner(os.getpid())}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as exc:
        if _is_disk_full(exc):
            need = f"up to {_mib(needs_bytes)}" if needs_bytes else "more space"
            raise DiskFullError(f"the disk filled up while writing {path}; it needs {need}, "
                                f"{_mib(shutil.disk_usage(path.parent).free)} are free in {path.parent}; "
                                "free some space or choose another folder") from None
        if isinstance(exc, PermissionError):
            raise StoreError(f"cannot write {path} ({exc.strerror}); choose a folder you can write to") from None
        raise
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # never let cleanup hide the real error
            pass


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text to a temporary file, then rename it into place."""
    data = text.encode("utf-8")
    with atomic_path(path, needs_bytes=len(data)) as tmp:
        tmp.write_bytes(data)


def read_cache(path: str | Path, otherwise: str) -> Any | None:
    """A JSON file medmeta wrote to skip work next time, or None when there is none. An unreadable
    one (edited, or truncated by a copy) is one warning naming the file and ``otherwise``, what is
    done instead, never a traceback: the work it saved is simply done again."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        warnings.warn(f"{path} is not readable JSON ({exc}); {otherwise}", stacklevel=2)
        return None


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's content (read once per size and modification time in this process):
    what caches key a weights file by, so a file replaced in place, or copied elsewhere, is told
    apart by what it holds."""
    st = Path(path).stat()
    return _file_digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()


def torch_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) object: about the size ``torch.save`` writes."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(torch_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(torch_bytes(v) for v in obj)
    return 64


def torch_save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file, then rename it into place (no half-written checkpoints)."""
    import torch

    with atomic_path(path, needs_bytes=torch_bytes(obj) + 2**20) as tmp:
        torch.save(obj, tmp)


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block.

    Jobs of a sweep that share a training folder take turns: the second finds the first's
    finished checkpoint instead of training the same thing at the same time.
    """
    import fcntl

    path = Path(path)
    ensure_folder(path.parent)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
