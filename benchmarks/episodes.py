"""Episode benchmark: episodes/s of medmeta's sampler against a naive loader, on one core.

Episodes are 5-way, 5-shot, 10 queries per class (75 images). The naive loader is written
the way a user would: a label index built by a Python loop over the labels, then per episode
``random.sample`` per class and ``torch.stack`` of ``dataset[i]`` items. Both read the same
``MedMNISTTask`` (images in memory at 28px). Ours is timed twice: float32 episodes (images in
[0, 1], the default) and uint8 episodes (``dtype=torch.uint8``: the stored pixels, converted by
``Episode.as_float()`` where they are used, e.g. on the GPU). Beside them, two floors: the uint8
gather of an episode's images alone, and with their exact float32 conversion (indices drawn in
advance).
The 224px figure reads a synthetic RGB subset from HDF5 (images not in memory) and reports
peak resident memory for that phase, measured by resetting the kernel's high-water mark
(/proc/self/clear_refs) and reading VmHWM.

Runs pinned to CPU 0 with one torch thread. Figures are the best of ``--repeats`` runs, timed in
rounds (each variant once per round), because other processes share this machine.

    python benchmarks/episodes.py --root /tmp/mmroot                  # organa (grey) and blood (RGB)
    python benchmarks/episodes.py --root /tmp/mmroot --tasks retina --episodes 5000
    python benchmarks/episodes.py --summarise docs/results/benchmarks/episodes.txt   # the README's table
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from memory import reset_peak, status_mib

from medmeta.episodes import EpisodeSampler
from medmeta.data.manifest import parse_manifest
from medmeta.data.store import Store, default_root
from medmeta.data.tasks import MedMNISTTask

N_WAY, K_SHOT, N_QUERY = 5, 5, 10


def naive_episodes(ds: MedMNISTTask, n_episodes: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
    """The loader a user writes by hand (learn2learn/easyfsl style)."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(ds.labels.tolist()):
        by_class.setdefault(label, []).append(i)
    classes = sorted(by_class)
    for _ in range(n_episodes):
        sx, sy, qx, qy = [], [], [], []
        for new, c in enumerate(rng.sample(classes, N_WAY)):
            for j, i in enumerate(rng.sample(by_class[c], K_SHOT + N_QUERY)):
                x, _ = ds[i]
                (sx if j < K_SHOT else qx).append(x)
                (sy if j < K_SHOT else qy).append(new)
        yield torch.stack(sx), torch.tensor(sy), torch.stack(qx), torch.tensor(qy)


def ours(ds: MedMNISTTask, n_episodes: int, seed: int = 0) -> Iterator[object]:
    return EpisodeSampler(ds, N_WAY, K_SHOT, N_QUERY, n_episodes=n_episodes, seed=seed).episodes()


def ours_uint8(ds: MedMNISTTask, n_episodes: int, seed: int = 0) -> Iterator[object]:
    return EpisodeSampler(ds, N_WAY, K_SHOT, N_QUERY, n_episodes=n_episodes, seed=seed).episodes(dtype=torch.uint8)


def ours_indices(ds: MedMNISTTask, n_episodes: int, seed: int = 0) -> Iterator[object]:
    return iter(EpisodeSampler(ds, N_WAY, K_SHOT, N_QUERY, n_episodes=n_episodes, seed=seed))


def rate(make: Callable[[MedMNISTTask, int, int], Iterator[object]], ds: MedMNISTTask, n: int,
         repeats: int) -> float:
    """Best episodes/s over ``repeats`` runs (sampler construction included)."""
    return max(timed(make, ds, n, r) for r in range(repeats))


def timed(make: Callable[[MedMNISTTask, int, int], Iterator[object]], ds: MedMNISTTask, n: int, seed: int) -> float:
    """Episodes/s of one run of ``n`` episodes."""
    start = time.perf_counter()
    count = sum(1 for _ in make(ds, n, seed))
    return count / (time.perf_counter() - start)


def floors(ds: MedMNISTTask, n: int) -> dict[str, Callable[[MedMNISTTask, int, int], Iterator[object]]]:
    """The bare minimum every episode costs, with the indices drawn in advance: the gather of its
    75 images alone, and the gather plus the exact float32 conversion to [0, 1] (the task's own
    ``to_tensor``). No float32 sampler can beat the second on this machine."""
    rows = np.random.default_rng(0).integers(0, len(ds), (n, N_WAY * (K_SHOT + N_QUERY)))
    return {"gather": lambda d, k, seed: (d.raw_images(r) for r in rows[:k]),
            "convert": lambda d, k, seed: (d.to_tensor(d.raw_images(r)) for r in rows[:k])}


def rates_28px(ds: MedMNISTTask, episodes: int, naive: int, repeats: int) -> dict[str, float]:
    """Best episodes/s of each variant, timed in rounds (every variant once per round), so that a
    slow spell of this shared machine hits all of them alike."""
    runs = {"float32": (ours, episodes), "uint8": (ours_uint8, episodes), "naive": (naive_episodes, naive),
            "indices": (ours_indices, 4 * episodes), **{k: (f, episodes) for k, f in floors(ds, episodes).items()}}
    best = dict.fromkeys(runs, 0.0)
    for r in range(repeats):
        for name, (make, n) in runs.items():
            best[name] = max(best[name], timed(make, ds, n, r))
    return best


def smooth_images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Image-like RGB data (upsampled noise plus grain) so compression behaves as on real images."""
    cells = -(-size // 8)
    coarse = rng.integers(0, 256, (n, cells, cells, 3), dtype=np.uint8)
    big = coarse.repeat(8, axis=1).repeat(8, axis=2)[:, :size, :size]
    return (big // 2 + rng.integers(0, 32, big.shape, dtype=np.uint8)).astype(np.uint8)


def synthetic_224(work: Path, n: int) -> Store:
    """A 224px RGB 5-class subset of n training images, built into an HDF5 store."""
    rng = np.random.default_rng(224)
    splits = {"train": n, "val": max(1, n // 10), "test": max(1, n // 10)}
    npz = work / "bench_224.npz"
    arrays = {}
    for split, count in splits.items():
        arrays[f"{split}_images"] = smooth_images(rng, count, 224)
        arrays[f"{split}_labels"] = (np.arange(count) % 5).astype(np.uint8)[rng.permutation(count), None]
    np.savez(npz, **arrays)
    del arrays
    md5 = hashlib.md5(npz.read_bytes()).hexdigest()
    raw = {"version": "bench", "exclusion_groups": {}, "subsets": {"bench": {
        "short_name": "bench", "dims": 2, "channels": 3, "task_type": "multi-class",
        "labels": ["a", "b", "c", "d", "e"], "splits": splits, "modality": "synthetic", "domain": "bench",
        "source_dataset": "generated", "license": "CC0", "citation": "none",
        "files": {224: {"file": npz.name, "url": "http://127.0.0.1:9/" + npz.name, "md5": md5}}}}}
    store = Store(work / "root", parse_manifest(raw, work / "manifest.yaml"))
    store.build("bench", 224, source_dir=work, download=False)
    npz.unlink()
    return store


def line_28px(task_id: str, shape: str, r: dict[str, float]) -> str:
    """One task's line of output (``summarise`` reads it back)."""
    return (f"{task_id:>14} 28px {shape:>8} in memory: medmeta float32 {r['float32']:7,.0f} episodes/s, "
            f"uint8 {r['uint8']:7,.0f} | naive {r['naive']:5,.0f} episodes/s | ratio {r['float32'] / r['naive']:5.1f}x "
            f"(float32) | indices only {r['indices']:8,.0f} episodes/s | floor: uint8 gather {r['gather']:8,.0f}, "
            f"+ float32 {r['convert']:7,.0f} episodes/s")


LINE_28PX = re.compile(r"(\w+)mnist 28px +(\S+) in memory: medmeta float32 +([\d,]+) episodes/s, uint8 +([\d,]+) \| "
                       r"naive +([\d,]+) .*floor: uint8 gather +([\d,]+), \+ float32 +([\d,]+)")
COLUMNS = ("float32 episodes", "uint8 episodes", "naive loader (float32)", "floor: gather alone",
           "floor: gather + float32")


def summarise(path: Path) -> str:
    """The README's table from saved runs of this script: per task and column, the lowest and
    highest episodes/s, and in how many runs uint8 episodes reached 16k/s."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise SystemExit(f"{path}: cannot read it ({e.strerror}); give a file of this script's saved output") from None
    runs: dict[str, list[list[int]]] = {}
    for m in map(LINE_28PX.search, lines):
        if m:
            task = f"{m[1]} ({'grey' if m[2].startswith('1x') else 'RGB'})"
            runs.setdefault(task, []).append([int(v.replace(",", "")) for v in m.groups()[2:]])
    if not runs:
        raise SystemExit(f"{path}: no 28px lines of this script's output; save its output there first")

    def span(values: list[int]) -> str:
        lo, hi = min(values), max(values)
        return f"{lo}-{hi}" if hi < 1000 else f"{lo / 1000:.1f}-{hi / 1000:.1f}k"

    rows = [f"| task (28px) | {' | '.join(COLUMNS)} | uint8 >= 16k/s |", "| --- " * (len(COLUMNS) + 2) + "|"]
    for task, values in runs.items():
        columns = list(zip(*values))
        reached = sum(v >= 16_000 for v in columns[1])
        rows.append(f"| {task} | {' | '.join(map(span, columns))} | {reached} of {len(values)} runs |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=default_root(), help="store with the 28px subsets")
    parser.add_argument("--tasks", nargs="+", default=["organa", "blood"])
    parser.add_argument("--episodes", type=int, default=3000, help="episodes per timed run (ours)")
    parser.add_argument("--naive-episodes", type=int, default=300)
    parser.add_argument("--episodes-224", type=int, default=60)
    parser.add_argument("--n224", type=int, default=1500, help="training images in the 224px subset")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--summarise", type=Path, metavar="FILE",
                        help="print the lowest-highest table of the runs saved in FILE instead of running")
    args = parser.parse_args()
    if args.summarise is not None:
        print(summarise(args.summarise))
        return

    os.sched_setaffinity(0, {0})
    torch.set_num_threads(1)
    print(f"one core (CPU 0), torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}; "
          f"{N_WAY}-way {K_SHOT}-shot {N_QUERY} queries/class, best of {args.repeats}")
    for task in args.tasks:
        ds = MedMNISTTask(args.root, task, "train", in_memory=True)
        r = rates_28px(ds, args.episodes, args.naive_episodes, args.repeats)
        shape = "x".join(map(str, ds.to_tensor(ds.raw_images([0])).shape[1:]))
        print(line_28px(ds.task.task_id, shape, r))

    with tempfile.TemporaryDirectory(prefix="medmeta_bench_") as tmp:
        store = synthetic_224(Path(tmp), args.n224)
        ds = MedMNISTTask(store, "bench", "train", size=224, in_memory=False)
        disk = store.path("bench", 224).stat().st_size / 2**20
        base = status_mib("VmRSS")
        reset_peak()
        a = rate(ours, ds, args.episodes_224, args.repeats)
        peak = status_mib("VmHWM")
        b = rate(naive_episodes, ds, max(1, args.episodes_224 // 3), args.repeats)
        print(f"{'bench':>14} 224px 3x224x224 HDF5 ({args.n224} images, {disk:,.0f} MiB on disk): medmeta {a:6,.1f} "
              f"episodes/s | naive {b:6,.1f} episodes/s | ratio {a / b:4.1f}x | peak RSS {peak:,.0f} MiB "
              f"(+{peak - base:,.0f} MiB over the {base:,.0f} MiB before; one episode is "
              f"{N_WAY * (K_SHOT + N_QUERY) * 3 * 224 * 224 * 4 / 2**20:.0f} MiB of float32)")


if __name__ == "__main__":
    main()
