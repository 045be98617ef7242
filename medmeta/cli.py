"""The ``medmeta`` command: prepare (fetch + build), info and verify a store.

Bad input prints one line naming the file, subset or argument and exits non-zero; the
store is never changed by a failed command. ``--medimeta DIR`` adds a MedIMeta data path's
tasks (``DATASET:TASK``); ``prepare --medimeta DIR [DATASET ...]`` builds its datasets (``--in-place``:
reading each one's images.hdf5 where it is).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .data.fetch import SOURCE_DIR_ENV
from .data.manifest import MANIFEST_ENV, SPLITS, Manifest, load_manifest
from .data.medimeta import IMAGES_FILE, slug
from .data.store import ROOT_ENV, Store, rebuild_hint, reads_in_place
from .data.tasks import describe_subset
from .errors import ConfigError, MedmetaError, StoreError


def _store(args: argparse.Namespace) -> Store:
    return Store(args.root, load_manifest([*(args.manifest or []), *(args.medimeta or [])]))


def medimeta_datasets(manifest: Manifest) -> dict[str, list[str]]:
    """The MedIMeta datasets of a manifest, each with its tasks' subset names, in manifest order."""
    out: dict[str, list[str]] = {}
    for name, info in manifest.subsets.items():
        if info.medimeta is not None:
            out.setdefault(info.medimeta, []).append(name)
    return out


def _medimeta_targets(store: Store, names: list[str], sizes: list[int] | None) -> list[tuple[str, int]]:
    """(dataset, size) pairs to build: the named MedIMeta datasets (ids, or one of their tasks;
    none or 'all': every one) at the given sizes (default each one's native size), checked before any build."""
    datasets = medimeta_datasets(store.manifest)
    chosen = []
    for name in list(datasets) if names in ([], ["all"]) else names:
        found = next((d for d in datasets if name in (d, slug(d))), None)
        if found is None:
            try:
                found = store.manifest[name].medimeta
            except ConfigError:
                found = None
        if found is None:
            raise ConfigError(f"unknown MedIMeta dataset {name!r}; --medimeta holds {', '.join(datasets)}")
        chosen.append(found)
    pairs = []
    for dataset in dict.fromkeys(chosen):
        info = store.manifest[datasets[dataset][0]]
        for size in sizes or [max(info.sizes)]:
            if size not in info.sizes:
                raise ConfigError(f"MedIMeta dataset {dataset} is {max(info.sizes)}px: --size takes {list(info.sizes)} "
                                  "(its own size, or a standard size below it: area interpolation only shrinks)")
            pairs.append((dataset, size))
    return pairs


def _prepare_medimeta(store: Store, args: argparse.Namespace) -> int:
    """`medmeta prepare --medimeta DIR [DATASET ...]`: one store file per dataset and size, holding every
    task (its images read in place from images.hdf5 with ``--in-place``, at the dataset's own size)."""
    if args.available:
        raise ConfigError("--available builds MedMNIST's npz files found in --source-dir; with --medimeta, name "
                          "MedIMeta datasets, or none for all of them")
    datasets = medimeta_datasets(store.manifest)
    for dataset, size in _medimeta_targets(store, args.subsets, args.size):
        tasks = datasets[dataset]
        info = store.manifest[tasks[0]]
        skipped = not args.force and store.up_to_date(tasks[0], size, args.in_place)
        path = store.build(tasks[0], size, force=args.force, in_place=args.in_place)
        how = ""
        if reads_in_place(path):
            how = f", reading {info.home / IMAGES_FILE} in place"
        elif args.in_place:
            how = f", a resized copy (--in-place reads images.hdf5 at its own {max(info.sizes)}px)"
        verb = "already built" if skipped else "built"
        print(f"{verb}: {dataset} {size}px -> {path}{how} (tasks {', '.join(tasks)})")
    return 0


def _targets(store: Store, names: list[str], sizes: list[int] | None, source_dir: str | None,
             available: bool) -> list[tuple[str, int]]:
    """(subset, size) pairs to build: named subsets at the given sizes, or every file present locally."""
    manifest = store.manifest
    if available:
        if not source_dir:
            raise ConfigError(f"--available needs --source-dir or ${SOURCE_DIR_ENV}")
        folder = Path(source_dir)
        if not folder.is_dir():
            raise ConfigError(f"--source-dir {folder} is not a folder")
        chosen = [manifest.resolve(n) for n in names] or list(manifest.subsets)
        return [(name, size) for name in chosen for size in manifest[name].sizes
                if (sizes is None or size in sizes) and (folder / manifest[name].file(size).file).is_file()]
    if not names:
        raise ConfigError("name the subsets to prepare (e.g. `medmeta prepare retina breast`), 'all', or pass --available")
    chosen = list(manifest.subsets) if names == ["all"] else [manifest.resolve(n) for n in names]
    return [(name, size) for name in chosen for size in (sizes or [28]) if size in manifest[name].sizes]


def cmd_prepare(args: argparse.Namespace) -> int:
    """`medmeta prepare`: build the named subsets and sizes into the store (exit status 0)."""
    store = _store(args)
    if args.medimeta:
        return _prepare_medimeta(store, args)
    if args.in_place:
        raise ConfigError("--in-place reads MedIMeta datasets' images.hdf5 where they are (with --medimeta DIR); "
                          "MedMNIST's npz files are always copied into the store")
    source_dir = args.source_dir or os.environ.get(SOURCE_DIR_ENV)
    targets = _targets(store, args.subsets, args.size, source_dir, args.available)
    if not targets:
        raise ConfigError("nothing to prepare: no matching official files found")
    for subset, size in targets:
        skipped = not args.force and store.is_built(subset, size)
        path = store.build(subset, size, source_dir=source_dir, download=not args.no_download, force=args.force)
        print(f"{'already built' if skipped else 'built'}: {subset} {size}px -> {path}")
    return 0


def print_medimeta(store: Store) -> None:
    """Each MedIMeta dataset of the manifest (domain, images, splits, sizes built) and its tasks:
    the names ``--target`` takes, task type and label names."""
    for dataset, tasks in medimeta_datasets(store.manifest).items():
        info = store.manifest[tasks[0]]
        built = [size for size in info.sizes if store.is_built(tasks[0], size)]
        in_place = [size for size in built if reads_in_place(store.path(tasks[0], size))]
        splits = ", ".join(f"{split} {info.splits[split]}" for split in SPLITS)
        print(f"{info.source_dataset}: {info.domain}, {'grey' if info.channels == 1 else 'RGB'} {max(info.sizes)}px, "
              f"{splits}; built at {', '.join(map(str, built)) + 'px' if built else 'no size yet'}"
              f"{f' ({in_place[0]}px reading images.hdf5 in place)' if in_place else ''}")
        width = max(len(t) for t in tasks)
        for task in tasks:
            t = store.manifest[task]
            print(f"  {task:<{width}}  {t.task_type!s:<11}  {len(t.labels)} labels: {', '.join(t.labels)}")


def cmd_info(args: argparse.Namespace) -> int:
    """`medmeta info`: the MedIMeta datasets and tasks (with --medimeta), then one line per built
    file; exit status 1 if any is corrupt."""
    store = _store(args)
    if args.medimeta:
        print_medimeta(store)
    entries = store.info()
    if not entries:
        print(f"no subsets built in {store.root}; run `medmeta prepare --help`")
        return 0
    print(f"store: {store.root}")
    width = max(16, *(len(e.subset) + 1 for e in entries))
    print(f"{'subset':<{width}}{'size':>5}{'train':>8}{'val':>7}{'test':>7}  {'manifest':<9} tasks")
    for e in entries:
        info = store.manifest[e.subset]
        ok = "CORRUPT" if e.problem else "ok" if e.counts == dict(info.splits) else "MISMATCH"
        tasks = describe_subset(info, e.size)
        task_text = tasks[0].task_type if len(tasks) == 1 else f"{tasks[0].task_type} + {len(tasks) - 1} binary"
        print(f"{e.subset:<{width}}{e.size:>5}{e.counts['train']:>8}{e.counts['val']:>7}{e.counts['test']:>7}  "
              f"{ok:<9} {task_text} ({len(info.labels)} labels, {info.domain})")
        if e.problem:
            print(f"  {e.path}: {e.problem}; {rebuild_hint(info, e.size)}", file=sys.stderr)
    return 1 if any(e.problem for e in entries) else 0


def cmd_verify(args: argparse.Namespace) -> int:
    """`medmeta verify`: re-check built files against the manifest and checksums; 1 if any fails."""
    store = _store(args)
    wanted = {store.manifest.resolve(n) for n in args.subsets}
    pairs = [(s, z) for s, z in store.built() if not wanted or s in wanted]
    if not pairs:
        raise StoreError(f"nothing to verify in {store.root}")
    by_file: dict[Path, list[tuple[str, int]]] = {}
    for subset, size in pairs:  # a MedIMeta dataset's tasks share a file: it is read once
        by_file.setdefault(store.path(subset, size), []).append((subset, size))
    failed = 0
    for shared in by_file.values():
        subset, size = shared[0]
        try:
            store.verify(subset, size)
            print(f"ok: {', '.join(s for s, _ in shared)} {size}px")
        except StoreError as exc:
            failed += 1
            print(f"FAILED: {exc}", file=sys.stderr)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    """The `medmeta` command line: prepare, info and verify, sharing --root and --manifest."""
    parser = argparse.ArgumentParser(prog="medmeta", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=None, help=f"store folder (default ${ROOT_ENV} or ~/.medmeta)")
    common.add_argument("--manifest", action="append", default=None,
                        help=f"a manifest of your own datasets, merged with the bundled one (repeatable; or ${MANIFEST_ENV})")
    common.add_argument("--medimeta", action="append", default=None, metavar="DIR",
                        help="a MedIMeta data path (the folder holding its dataset folders): each task becomes "
                             "DATASET:TASK (repeatable)")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", parents=[common], help="fetch, verify and build subsets into the store")
    prep.add_argument("subsets", nargs="*", help="subset names (full or short, e.g. retina organa nodule3d) or 'all'; "
                                                 "with --medimeta, MedIMeta dataset ids (none or 'all': every one)")
    prep.add_argument("--size", type=int, action="append",
                      help="image size (repeatable; default 28; MedIMeta: its own size, or 28, 64, 128 resized)")
    prep.add_argument("--source-dir", default=None, help=f"folder with official npz files (or ${SOURCE_DIR_ENV})")
    prep.add_argument("--available", action="store_true", help="build every official file present in --source-dir")
    prep.add_argument("--no-download", action="store_true", help="never download; use local files only")
    prep.add_argument("--force", action="store_true",
                      help="rebuild even if already built (a file built --in-place stays so: delete it to copy)")
    prep.add_argument("--in-place", action="store_true",
                      help="with --medimeta: read each dataset's images.hdf5 where it is instead of copying its images "
                           "into the store (at its own size; a smaller --size is a resized copy all the same)")
    prep.set_defaults(func=cmd_prepare)
    info = sub.add_parser("info", parents=[common], help="list built subsets, split counts and tasks")
    info.set_defaults(func=cmd_info)
    ver = sub.add_parser("verify", parents=[common], help="re-check built files against manifest and checksums")
    ver.add_argument("subsets", nargs="*")
    ver.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `medmeta` command; a medmeta error is one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MedmetaError as exc:
        print(f"medmeta {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
