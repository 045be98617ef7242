"""What every training loop shares: devices, batches on the device (gathered by a loader thread
while the previous step runs), evaluation of a split, and checkpoints bound to the config that
wrote them."""
from __future__ import annotations

import os
import queue
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, TypeVar

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..data.tasks import MedMNISTTask
from ..errors import ConfigError
from ..settings import Settings
from .models import train_mode

NOT_TRAINING_KEYS = ("steps", "checkpoint_every", "test_steps")
"""Config keys a checkpoint may be resumed under with another value: training more steps
continues the same run exactly (evaluations fall on the ``eval_every`` cadence, whatever
``steps`` is); the checkpoint cadence and test-time settings do not change the training. A
checkpoint that trained further than ``steps`` is refused (``check_steps``)."""


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device auto or cpu")
    if device == "cuda" and distributed.launched():
        device = f"cuda:{distributed.local_rank()}"  # under torchrun, one GPU per process
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda") from None


def configure_threads(threads: int | None) -> str | None:
    """Set torch's CPU threads (None keeps torch's default); return a warning when the machine
    looks oversubscribed: runs sharing cores at full thread counts slow each other down many
    times over (two mm-PT runs on 2 cores: 0.4 steps/s each at 2 threads, 7 at 1 thread)."""
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    used = torch.get_num_threads()
    if used > max(1.0, cores - load) + 0.5:
        return (f"warning: this machine's load is {load:.1f} on {cores} cores and this run uses {used} threads; "
                "runs sharing cores slow each other down many times over: give each run --threads 1 "
                "(or cores / runs), or run fewer at once")
    return None


NO_LIMIT = 2**62
"""cgroup v1 writes "no limit" as a huge number (9223372036854771712); anything above this is none."""


def available_memory(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process can still take without swapping or being killed: Linux's MemAvailable,
    or less where its cgroup (a SLURM job, a container) or a parent of it caps memory lower
    (limit minus usage, cgroup v2 or v1). None where the system says nothing."""
    free: int | None = None
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
        groups = (proc / "self" / "cgroup").read_text().splitlines()
    except (OSError, ValueError):
        return free
    for line in groups:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, files = cgroups, ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            base, files = cgroups / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        folder = base / path.lstrip("/")
        for level in (folder, *folder.parents):
            try:
                limit, used = ((level / f).read_text().strip() for f in files)
                if limit != "max" and int(limit) < NO_LIMIT:
                    room = max(0, int(limit) - int(used))
                    free = room if free is None else min(free, room)
            except (OSError, ValueError):
                pass
            if level == base:
                break
    return free


@contextmanager
def deterministic_cudnn() -> Iterator[None]:
    """cuDNN's deterministic kernels inside the block (the setting is restored after it).

    Adaptation results must be a pure function of the episode and the backbone. cuDNN's fastest
    backward kernels are not deterministic, and 50 Adam steps amplify that: on an H200 two runs
    of the same 28px episodes, one by one, differed by up to 0.34 in a logit, and by 0 with
    deterministic kernels, which cost 5% of the speed (docs/results/gpu/). No effect on CPUs.
    """
    before = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic = before


T = TypeVar("T")

PREFETCH_DEPTH = 2
"""Batches a loader thread holds ready. One hides the gathering whenever a step takes longer than
a gather; the second absorbs an uneven read (a cold HDF5 chunk). With the batch in use and the
one being gathered, at most four batches are in host memory (pinned on CUDA): 9.6 MB each of
uint8 pixels at 224px and batch 64 (four times that as float32 on a CPU)."""


def prefetch(items: Iterable[T], depth: int = PREFETCH_DEPTH) -> Iterator[T]:
    """``items`` in their order, produced by a background thread up to ``depth`` ahead of the
    consumer, so gathering the next batch overlaps the step that uses this one.

    The thread is the only one iterating ``items``: whatever they read (an HDF5 file: h5py is
    not for concurrent reads of one handle) the consumer must not read while the generator is
    open. An exception in the thread is raised here with its traceback; closing the generator
    (``contextlib.closing``, or its end, or an exception in the consumer) stops the thread and
    waits for it, which takes at most the item it is producing. The thread works on the CUDA
    device current here, so pinned buffers belong to this process's GPU (torchrun).
    """
    if depth < 1:
        raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    source = iter(items)
    ready: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    cuda_device = torch.cuda.current_device() if torch.cuda.is_initialized() else None

    def put(kind: str, value: Any) -> bool:
        if stop.is_set():
            return False
        ready.put((kind, value))  # cannot block forever: after stop, the consumer empties the queue once
        return True

    def produce() -> None:
        try:
            if cuda_device is not None:
                torch.cuda.set_device(cuda_device)
            for item in source:
                if not put("item", item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put("error", exc)
            return
        put("end", None)

    thread = threading.Thread(target=produce, name="medmeta-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        try:
            while True:
                ready.get_nowait()
        except queue.Empty:
            pass
        thread.join()
        close = getattr(source, "close", None)
        if close is not None:
            close()


Precision = Literal["auto", "fp32", "bf16"]
"""Training precision: ``bf16`` autocast (mixed precision), ``fp32``, or ``auto``: bf16 on CUDA,
fp32 on CPUs (where bf16 is fast only with AVX-512 BF16 or AMX; on AVX2 it is ~35x slower)."""


def uses_bf16(device: torch.device, precision: Precision = "auto") -> bool:
    """Whether ``precision`` means bfloat16 autocast on this device."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: Precision = "auto"):
    """bfloat16 autocast when ``precision`` asks for it on this device, else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, precision))


def _asks_auto(settings: Any) -> bool:
    if isinstance(settings, dict):
        return any((k == "precision" and v == "auto") or _asks_auto(v) for k, v in settings.items())
    if isinstance(settings, (list, tuple)):
        return any(_asks_auto(v) for v in settings)
    return False


def resolved_precision(settings: Any, device: torch.device) -> dict[str, str]:
    """For cache keys: what ``precision: auto`` in ``settings`` means on ``device``, so that
    bf16-trained results (``auto`` on CUDA) are never reused for an fp32 run with the same
    settings. Empty where ``auto`` means fp32, so the fp32 caches keep the names they had."""
    return {"auto_precision": "bf16"} if _asks_auto(settings) and uses_bf16(device) else {}


@torch.no_grad()
def predict(forward: Callable[[torch.Tensor], torch.Tensor], dataset: MedMNISTTask, device: torch.device,
            batch_size: int = 256, indices: np.ndarray | None = None, precision: Precision = "auto"
            ) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels for a split (or the given indices), batch by batch."""
    idx = np.arange(len(dataset)) if indices is None else indices
    logits, labels = [], []
    for start in range(0, len(idx), batch_size):
        x, y = dataset.get_batch(idx[start:start + batch_size], device)
        with autocast(device, precision):
            logits.append(forward(x).float().cpu())
        labels.append(y.cpu())
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def evaluate_split(forward: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, dataset: MedMNISTTask,
                   device: torch.device, indices: np.ndarray | None = None, precision: Precision = "auto"
                   ) -> dict[str, float]:
    """AUROC and accuracy of ``forward`` on a dataset split, with ``module`` in eval mode."""
    with train_mode(module, False):
        logits, labels = predict(forward, dataset, device, indices=indices, precision=precision)
    return dataset.task.task_type.evaluate(labels, logits)


def checkpoint_identity(config: Settings, device: torch.device, **context: Any) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the config (minus ``NOT_TRAINING_KEYS``), what
    its ``precision: auto`` means on ``device`` (see ``resolved_precision``) and context."""
    fields = {k: v for k, v in config.to_dict().items() if k not in NOT_TRAINING_KEYS}
    return {**fields, **resolved_precision(fields, device), **context}


def check_steps(path: Path, done: int, steps: int) -> None:
    """Refuse a checkpoint that trained further than this run asks: it is another, longer run."""
    if done > steps:
        raise ConfigError(f"checkpoint {path} has trained {done} steps, this run asks for {steps}: it belongs to a "
                          "longer run; raise steps, use another --out folder or delete the checkpoint")


def check_identity(path: Path, stored: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> None:
    """Refuse to resume a checkpoint written under another config, naming the differences."""
    stored = dict(stored or {})
    diff = [f"{k}: {stored.get(k, '<missing>')!r} in the checkpoint, {wanted.get(k, '<missing>')!r} now"
            for k in sorted(set(stored) | set(wanted)) if stored.get(k, "<missing>") != wanted.get(k, "<missing>")]
    if diff:
        raise ConfigError(f"checkpoint {path} was written under another training config ({'; '.join(diff)}); "
                          "use another --out folder or delete the checkpoint")
