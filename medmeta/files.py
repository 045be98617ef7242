"""Atomic file writes: write to a temporary file beside the target, then rename it into place.

Every file medmeta writes (store files, episode sets, checkpoints, results) goes through
``atomic_path``, so a crash never leaves a half-written file where a finished one is expected.
Temporary names are ``.{name}.{pid}.tmp``; the store removes those of dead processes.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``: renamed onto it when the block succeeds, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text to a temporary file, then rename it into place."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def torch_save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file, then rename it into place (no half-written checkpoints)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block.

    Jobs of a sweep that share a training folder take turns: the second finds the first's
    finished checkpoint instead of training the same thing at the same time.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
