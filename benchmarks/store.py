"""Store benchmark: build throughput and random single-image reads, store vs npz, and the
cost of the store's Fletcher-32 checksums.

The baseline is what a user does without medmeta: ``np.load(npz, mmap_mode="r")`` and index
the array (numpy ignores mmap_mode for npz archives, so the whole split is decompressed into
memory on first access). Both run in this process on the same synthetic subsets; peak
resident memory is measured per phase by resetting the kernel's high-water mark
(/proc/self/clear_refs) and reading VmHWM. The checksum cost compares random reads of the
store file against a copy of it without the Fletcher-32 filter (same chunks, same LZF),
alternating rounds, fastest kept.

    python benchmarks/store.py                      # 28px and 224px, default sizes
    python benchmarks/store.py --n224 4000 --reads 2000
"""
from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import yaml

from memory import reset_peak, status_mib

from medmeta.data.manifest import load_manifest
from medmeta.data.store import Store
from medmeta.data.tasks import MedMNISTTask


def smooth_images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Image-like RGB data (upsampled noise plus grain) so compression behaves as on real images."""
    cells = -(-size // 8)
    coarse = rng.integers(0, 256, (n, cells, cells, 3), dtype=np.uint8)
    big = coarse.repeat(8, axis=1).repeat(8, axis=2)[:, :size, :size]
    return (big // 2 + rng.integers(0, 32, big.shape, dtype=np.uint8)).astype(np.uint8)


def write_subset(folder: Path, size: int, n: int) -> tuple[Path, Path]:
    """One synthetic RGB multi-class subset at ``size`` with n training images; returns (npz, manifest)."""
    rng = np.random.default_rng(size)
    splits = {"train": n, "val": max(1, n // 10), "test": max(1, n // 10)}
    arrays = {}
    for split, count in splits.items():
        arrays[f"{split}_images"] = smooth_images(rng, count, size)
        arrays[f"{split}_labels"] = rng.integers(0, 4, (count, 1), dtype=np.uint8)
    npz = folder / f"bench_{size}.npz"
    np.savez_compressed(npz, **arrays)
    del arrays
    md5 = hashlib.md5(npz.read_bytes()).hexdigest()
    raw = {"version": "bench", "exclusion_groups": {}, "subsets": {"bench": {
        "short_name": "bench", "dims": 2, "channels": 3, "task_type": "multi-class",
        "labels": ["a", "b", "c", "d"], "splits": splits, "modality": "synthetic", "domain": "bench",
        "source_dataset": "generated", "license": "CC0", "citation": "none",
        "files": {size: {"file": npz.name, "url": "http://127.0.0.1:9/" + npz.name, "md5": md5}}}}}
    manifest = folder / f"manifest_{size}.yaml"
    manifest.write_text(yaml.safe_dump(raw))
    return npz, manifest


def run(size: int, n: int, reads: int, work: Path) -> dict[str, float]:
    npz, manifest_path = write_subset(work, size, n)
    store = Store(work / f"root_{size}", load_manifest(manifest_path))
    raw_mib = n * size * size * 3 / 2**20
    order = np.random.default_rng(1).integers(0, n, reads)

    base_rss = status_mib("VmRSS")
    reset_peak()
    t = time.perf_counter()
    store.build("bench", size, source_dir=work)
    build_s = time.perf_counter() - t
    build_peak = status_mib("VmHWM") - base_rss

    ds = MedMNISTTask(store, "bench", "train", size=size, in_memory=False)
    ds[0]
    base_rss = status_mib("VmRSS")
    reset_peak()
    t = time.perf_counter()
    for i in order:
        ds[int(i)]
    store_s = time.perf_counter() - t
    store_peak = status_mib("VmHWM") - base_rss
    del ds

    base_rss = status_mib("VmRSS")
    reset_peak()
    t = time.perf_counter()
    with np.load(npz, mmap_mode="r") as z:
        images = z["train_images"]
        for i in order:
            np.asarray(images[int(i)], dtype=np.float32)
    npz_s = time.perf_counter() - t
    npz_peak = status_mib("VmHWM") - base_rss
    del images
    checked, plain = checksum_cost(store, size, work, order)
    total = n + 2 * max(1, n // 10)
    return {"size": size, "n_train": n, "raw_train_mib": raw_mib, "build_img_s": total / build_s,
            "checked_reads_s": checked, "unchecked_reads_s": plain,
            "build_peak_mib": build_peak, "store_reads_s": reads / store_s, "npz_reads_s": reads / npz_s,
            "store_peak_mib": store_peak, "npz_peak_mib": npz_peak,
            "store_file_mib": store.path("bench", size).stat().st_size / 2**20,
            "npz_file_mib": npz.stat().st_size / 2**20}


def without_checksums(src: Path, dst: Path) -> None:
    """A copy of a store file whose datasets have the same chunks and compression, no Fletcher-32."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(src, "r") as fin, h5py.File(dst, "w") as fout:
        fout.attrs.update(fin.attrs)

        def copy(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                d = fout.create_dataset(name, data=obj[()], chunks=obj.chunks, compression=obj.compression)
                d.attrs.update(obj.attrs)

        fin.visititems(copy)


def checksum_cost(store: Store, size: int, work: Path, order: np.ndarray, rounds: int = 3) -> tuple[float, float]:
    """Random reads/s of the store file with and without its checksums (alternating, fastest of ``rounds``)."""
    plain_store = Store(work / f"plain_{size}", store.manifest)
    without_checksums(store.path("bench", size), plain_store.path("bench", size))
    readers = {"checked": MedMNISTTask(store, "bench", "train", size=size, in_memory=False),
               "plain": MedMNISTTask(plain_store, "bench", "train", size=size, in_memory=False)}
    best = {k: 0.0 for k in readers}
    for r in range(rounds):
        for name in (["checked", "plain"] if r % 2 == 0 else ["plain", "checked"]):
            ds = readers[name]
            ds[0]
            t = time.perf_counter()
            for i in order:
                ds[int(i)]
            best[name] = max(best[name], len(order) / (time.perf_counter() - t))
    return best["checked"], best["plain"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n28", type=int, default=50000, help="training images at 28px")
    parser.add_argument("--n224", type=int, default=3000, help="training images at 224px")
    parser.add_argument("--reads", type=int, default=2000, help="random single-image reads per reader")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(28, args.n28, args.reads, Path(tmp)), run(224, args.n224, args.reads, Path(tmp))]
    print(f"{'size':>5}{'train MiB':>10}{'build img/s':>12}{'build peak':>11}{'store rd/s':>11}{'npz rd/s':>10}"
          f"{'ratio':>7}{'store peak':>11}{'npz peak':>10}{'mem ratio':>10}")
    for r in rows:
        print(f"{r['size']:>5}{r['raw_train_mib']:>10.0f}{r['build_img_s']:>12.0f}{r['build_peak_mib']:>10.0f}M"
              f"{r['store_reads_s']:>11.0f}{r['npz_reads_s']:>10.0f}{r['store_reads_s'] / r['npz_reads_s']:>7.2f}"
              f"{r['store_peak_mib']:>10.1f}M{r['npz_peak_mib']:>9.0f}M"
              f"{r['npz_peak_mib'] / max(r['store_peak_mib'], 0.1):>10.0f}")
    print("ratio = store reads/s / npz reads/s (first access of an npz array decompresses the whole split);")
    print("peak = rise in resident memory during the phase; mem ratio = npz peak / store peak.")
    for r in rows:
        print(f"{r['size']}px files: npz {r['npz_file_mib']:.0f} MiB, store {r['store_file_mib']:.0f} MiB; "
              f"random reads with Fletcher-32 {r['checked_reads_s']:.0f}/s, without {r['unchecked_reads_s']:.0f}/s "
              f"(checksums cost {1 - r['checked_reads_s'] / r['unchecked_reads_s']:+.1%} of read speed)")


if __name__ == "__main__":
    main()
