"""Running under ``torchrun``: process groups, ranks, sharding and gathering, on torch.distributed.

Launch any medmeta script with ``torchrun --nproc_per_node N``; ``init()`` reads the
environment torchrun sets (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) and joins the process
group (NCCL on GPUs, gloo on CPUs). Without torchrun every function here is the single-process
identity, so the same code runs either way. What runs distributed:

* mm-PT: ``DistributedDataParallel``; each rank takes its slice of the same global batch, so
  the averaged gradient is the whole batch's, except that BatchNorm normalises each rank's
  slice with its own statistics (as DDP does by default).
* MAML: the episodes of a meta-batch are split between ranks and the meta-gradients summed
  across ranks before each outer step, which is the single-process meta-gradient.
* Evaluation: episodes are sharded between ranks and the per-episode results gathered; each
  result is a pure function of the episode, the backbone and the seed, so the numbers do not
  depend on the number of processes beyond float rounding.

Only rank 0 writes files, logs to TensorBoard and shows progress bars.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

T = TypeVar("T")
TIMEOUT_HOURS = 24


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_type: str = "cpu") -> None:
    """Join the process group torchrun describes (once); a no-op in a single process."""
    if launched() and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank())
        # Ranks wait at barriers while rank 0 builds the store or waits for another job's training.
        dist.init_process_group(backend, timeout=timedelta(hours=TIMEOUT_HOURS))


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if active() else 0


def local_rank() -> int:
    """This process's rank on its machine (torchrun's LOCAL_RANK; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0)."""
    return rank() == 0


def progress(**kwargs: Any) -> tqdm:
    """A tqdm bar, shown by rank 0 only.

    Other ranks pass ``disable=True``; rank 0 passes no ``disable`` at all, because tqdm reads
    its own environment switches (``TQDM_DISABLE=1`` for batch logs) only for arguments not
    given, and an explicit ``disable=False`` would override them.
    """
    if not is_main():
        kwargs["disable"] = True
    return tqdm(**kwargs)


def barrier() -> None:
    """Wait for every rank (a no-op when not distributed)."""
    if active():
        dist.barrier()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th, starting at its rank."""
    return list(items[rank()::world_size()])


def gather(items: Iterable[T]) -> list[T]:
    """Every rank's ``items``, concatenated (on every rank), in rank order."""
    local = list(items)
    if not active():
        return local
    parts: list[list[T] | None] = [None] * world_size()
    dist.all_gather_object(parts, local)
    return [x for part in parts for x in (part or [])]


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum_(tensors: Iterable[torch.Tensor]) -> None:
    """Sum tensors across ranks, in place (one flat all-reduce)."""
    tensors = [t for t in tensors]
    if not active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def batch_slice(n: int) -> slice:
    """This rank's contiguous part of a global batch of ``n`` items (sizes differ by at most one)."""
    size, extra = divmod(n, world_size())
    r = rank()
    start = r * size + min(r, extra)
    return slice(start, start + size + (1 if r < extra else 0))


def broadcast_module_(module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers, in place."""
    if active():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)
