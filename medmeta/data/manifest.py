"""Load and validate ``data_manifest.yaml``: the single source of data facts.

Every other module asks the manifest which subsets exist, what their files, checksums,
task types, labels and split counts are, and which subsets a leave-one-out target must
exclude. Nothing about MedMNIST is hard-coded elsewhere.

Bring your own dataset: a user manifest (same schema, ``--manifest FILE`` or the
``MEDMETA_MANIFEST`` environment variable, several joined with the OS path separator) is
merged with the bundled one. Its subsets become tasks, targets and sources like any MedMNIST
subset; its ``exclusion_groups`` add groups, or add members to a group of the same name. A
user subset's ``url`` may be ``null``; its npz file is looked up next to the manifest that
names it, then in ``--source-dir``.

MedIMeta's own datasets: a MedIMeta data path (a folder, where a manifest file is expected:
``--medimeta DIR``, ``--manifest DIR`` or in ``MEDMETA_MANIFEST``) is read as a manifest of one
subset per (dataset, task), named ``dataset:task`` (``medimeta_manifest``; the layout and how it
maps to subsets: ``medmeta.data.medimeta``). Each dataset is an exclusion group of its tasks (a
target's own dataset is left out whole), each pair of datasets its ``info.yaml`` says share a
domain or subjects is one too, and an exclusion group's ``medimeta`` list joins MedIMeta datasets
to it by id (the bundled manifest joins those holding a MedMNIST subset's images or domain).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import yaml

from ..errors import ConfigError, ManifestError
from ..tasktype import TaskType
from .medimeta import IMAGES_FILE, MedIMetaDataset, MedIMetaTask, read_data_path, slug

SPLITS = ("train", "val", "test")
ImageSize = Literal[28, 64, 128, 224]
"""The image sizes MedMNIST publishes (3D: 28 and 64); which exist for a subset is in its manifest entry."""
MANIFEST_ENV = "MEDMETA_MANIFEST"
DEFAULT_MANIFEST = Path(__file__).with_name("data_manifest.yaml").resolve()


@dataclass(frozen=True)
class FileInfo:
    """One official npz file of a subset at one image size."""

    size: int
    file: str
    url: str | None
    md5: str


@dataclass(frozen=True)
class SubsetInfo:
    """Everything the manifest says about one MedMNIST subset."""

    name: str
    short_name: str
    dims: int
    channels: int
    task_type: TaskType
    labels: tuple[str, ...]
    splits: Mapping[str, int]
    modality: str
    domain: str
    source_dataset: str
    license: str
    citation: str
    files: Mapping[int, FileInfo]
    home: Path | None = None
    """Folder of the user manifest that defined this subset (its npz files may lie there), or of
    its MedIMeta dataset; None for the bundled MedMNIST subsets."""
    file_stem: str | None = None
    """Name of the store file (before ``_<size>.h5``) when several subsets share one (a MedIMeta
    dataset's tasks); None: the subset's name."""
    labels_key: str = "labels"
    """The dataset under each split of the store file that holds this subset's labels."""
    medimeta: str | None = None
    """The MedIMeta dataset id this subset is a task of (its store file is built from that
    dataset's folder, ``home``); None for a subset built from npz files."""

    @property
    def stem(self) -> str:
        """Name of the subset's store files, before ``_<size>.h5``."""
        return self.file_stem or self.name

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(sorted(self.files))

    def image_shape(self, size: int) -> tuple[int, ...]:
        """Shape of one image as stored in the npz (no batch axis)."""
        if self.dims == 3:
            return (size, size, size)
        return (size, size) if self.channels == 1 else (size, size, self.channels)

    def label_width(self) -> int:
        """Columns of the npz label array: one per finding for multi-label, else one."""
        return len(self.labels) if self.task_type.multilabel else 1

    def file(self, size: int) -> FileInfo:
        if size not in self.files:
            raise ConfigError(
                f"{self.name} has no file at size {size}; available sizes: {list(self.sizes)}"
            )
        return self.files[size]


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest: subsets by name and the leave-one-out exclusion groups."""

    version: str
    subsets: Mapping[str, SubsetInfo]
    exclusion_groups: Mapping[str, tuple[str, ...]]
    path: Path
    medimeta_groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Per exclusion group, the MedIMeta dataset ids whose tasks join it (``with_medimeta_groups``)."""

    def resolve(self, name: str) -> str:
        """Map a full or short subset name (``retina``, ``nodule3d``, ``dr_regular:DR level``) to the
        full name (a MedIMeta task's name is matched as ``slug`` spells each part)."""
        key = name.strip().lower()
        for candidate in (key, ":".join(slug(part) for part in key.split(":"))):
            if candidate in self.subsets:
                return candidate
        for sub in self.subsets.values():
            if key == sub.short_name or key + "mnist" == sub.name:
                return sub.name
        shorts = ", ".join(s.short_name for s in self.subsets.values())
        raise ConfigError(f"unknown subset {name!r}; known: {shorts}")

    def __getitem__(self, name: str) -> SubsetInfo:
        return self.subsets[self.resolve(name)]

    def excluded_for(self, target: str) -> set[str]:
        """The target plus every subset sharing an exclusion group with it."""
        target = self.resolve(target)
        out = {target}
        for members in self.exclusion_groups.values():
            if target in members:
                out.update(members)
        return out

    def allowed_sources(self, target: str) -> list[str]:
        """Subsets a leave-one-out target may pretrain on: same dimensionality, not excluded."""
        target = self.resolve(target)
        dims = self.subsets[target].dims
        excluded = self.excluded_for(target)
        return [n for n, s in self.subsets.items() if s.dims == dims and n not in excluded]


def _require(entry: str, data: Mapping[str, Any], field: str, kind: type | tuple) -> Any:
    if field not in data:
        raise ManifestError(f"manifest entry {entry!r}: missing field {field!r}")
    value = data[field]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ManifestError(
            f"manifest entry {entry!r}: field {field!r} should be {getattr(kind, '__name__', kind)},"
            f" got {value!r}"
        )
    return value


def _parse_subset(name: str, raw: Any) -> SubsetInfo:
    if not isinstance(raw, dict):
        raise ManifestError(f"manifest entry {name!r}: expected a mapping of fields")
    dims = _require(name, raw, "dims", int)
    if dims not in (2, 3):
        raise ManifestError(f"manifest entry {name!r}: field 'dims' must be 2 or 3, got {dims}")
    channels = _require(name, raw, "channels", int)
    if channels not in (1, 3):
        raise ManifestError(f"manifest entry {name!r}: field 'channels' must be 1 or 3")
    task_type_text = _require(name, raw, "task_type", str)
    try:
        task_type = TaskType(task_type_text)
    except ValueError:
        raise ManifestError(f"manifest entry {name!r}: field 'task_type' must be one of "
                            f"{[t.value for t in TaskType]}, got {task_type_text!r}") from None
    labels = _require(name, raw, "labels", list)
    if len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise ManifestError(f"manifest entry {name!r}: field 'labels' needs at least two names")
    if task_type.binary and len(labels) != 2:
        raise ManifestError(f"manifest entry {name!r}: a binary task needs exactly 2 labels")
    splits = _require(name, raw, "splits", dict)
    for split in SPLITS:
        count = splits.get(split)
        if not isinstance(count, int) or count <= 0:
            raise ManifestError(
                f"manifest entry {name!r}: field 'splits.{split}' must be a positive integer"
            )
    files_raw = _require(name, raw, "files", dict)
    files: dict[int, FileInfo] = {}
    for size, f in files_raw.items():
        where = f"{name}.files.{size}"
        if not isinstance(size, int) or not isinstance(f, dict):
            raise ManifestError(f"manifest entry {where!r}: expected an integer size with a mapping")
        md5 = _require(where, f, "md5", str)
        if len(md5) != 32 or any(c not in "0123456789abcdef" for c in md5):
            raise ManifestError(f"manifest entry {where!r}: field 'md5' is not a 32-digit hex MD5")
        url = f.get("url")
        if url is not None and not isinstance(url, str):
            raise ManifestError(f"manifest entry {where!r}: field 'url' should be a URL or null, got {url!r}")
        files[size] = FileInfo(size, _require(where, f, "file", str), url, md5)
    if not files:
        raise ManifestError(f"manifest entry {name!r}: field 'files' is empty")
    return SubsetInfo(
        name=name,
        short_name=_require(name, raw, "short_name", str),
        dims=dims,
        channels=channels,
        task_type=task_type,
        labels=tuple(labels),
        splits={s: splits[s] for s in SPLITS},
        modality=_require(name, raw, "modality", str),
        domain=_require(name, raw, "domain", str),
        source_dataset=_require(name, raw, "source_dataset", str),
        license=_require(name, raw, "license", str),
        citation=_require(name, raw, "citation", str),
        files=files,
    )


def parse_manifest(raw: Any, path: Path, home: Path | None = None) -> Manifest:
    """Validate a manifest already read from YAML; raise ManifestError naming entry and field.

    ``home``: for a user manifest, the folder whose npz files its subsets may use; its
    exclusion groups may name subsets of the manifest it is merged into, so they are checked
    after the merge. A manifest without ``home`` stands alone and is checked whole.
    """
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: the manifest must be a mapping at the top level")
    subsets_raw = _require("<top level>", raw, "subsets", dict)
    subsets = {name: replace(_parse_subset(name, entry), home=home) for name, entry in subsets_raw.items()}
    shorts = [s.short_name for s in subsets.values()]
    if len(set(shorts)) != len(shorts):
        raise ManifestError(f"{path}: short_name values must be unique")
    groups_raw = raw.get("exclusion_groups") or {}
    if not isinstance(groups_raw, dict):
        raise ManifestError(f"{path}: field 'exclusion_groups' should be a mapping of groups")
    groups, medimeta = {}, {}
    for group, body in groups_raw.items():
        where = f"exclusion_groups.{group}"
        ids = (body or {}).get("medimeta", [])
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ManifestError(f"manifest entry {where!r}: field 'medimeta' should be a list of MedIMeta dataset ids")
        groups[group] = tuple(_require(where, body or {}, "members", list) if not ids or "members" in body else [])
        if ids:
            medimeta[group] = tuple(ids)
    manifest = Manifest(str(raw.get("version", "unknown")), subsets, groups, path, medimeta)
    return manifest if home is not None else _check_groups(manifest)


def with_medimeta_groups(manifest: Manifest) -> Manifest:
    """``manifest`` with the tasks of the MedIMeta datasets each group's ``medimeta`` list names
    added to the group's members (datasets not loaded add nothing)."""
    groups = dict(manifest.exclusion_groups)
    for group, ids in manifest.medimeta_groups.items():
        tasks = [name for name, sub in manifest.subsets.items() if sub.medimeta in ids]
        groups[group] = tuple(dict.fromkeys([*groups.get(group, ()), *tasks]))
    return replace(manifest, exclusion_groups=groups)


def _check_groups(manifest: Manifest) -> Manifest:
    for group, members in manifest.exclusion_groups.items():
        for member in members:
            if member not in manifest.subsets:
                raise ManifestError(f"{manifest.path}: manifest entry 'exclusion_groups.{group}': member {member!r} "
                                    "is not a subset")
    return manifest


def medimeta_manifest(path: Path) -> Manifest:
    """A MedIMeta data path as a manifest (see the module docstring and ``medmeta.data.medimeta``)."""
    datasets = read_data_path(path)
    subsets: dict[str, SubsetInfo] = {}
    groups: dict[str, tuple[str, ...]] = {}
    tasks_of: dict[str, list[str]] = {}
    for d in datasets:
        files = {size: FileInfo(size, IMAGES_FILE, None, d.digest) for size in d.sizes}
        for task in d.tasks:
            subsets[d.subset_name(task)] = _medimeta_subset(d, task, files)
        tasks_of[d.id] = [d.subset_name(t) for t in d.tasks]
        groups[f"medimeta:{d.id}"] = tuple(tasks_of[d.id])
    for d in datasets:
        for other in d.overlaps:
            if other in tasks_of:
                a, b = sorted((d.id, other))
                groups[f"medimeta:{a}~{b}"] = (*tasks_of[a], *tasks_of[b])
    return Manifest(f"medimeta:{Path(path).name}", subsets, groups, Path(path))


def _medimeta_subset(d: MedIMetaDataset, task: MedIMetaTask, files: dict[int, FileInfo]) -> SubsetInfo:
    name = d.subset_name(task)
    return SubsetInfo(name=name, short_name=name, dims=2, channels=d.channels, task_type=task.task_type,
                      labels=task.labels, splits=dict(d.splits), modality=d.domain, domain=d.domain,
                      source_dataset=f"MedIMeta {d.id} ({d.name})", license=d.license,
                      citation=d.citation, files=files, home=d.folder,
                      file_stem=d.stem, labels_key=f"labels/{task.key}", medimeta=d.id)


def merge_manifests(base: Manifest, extra: Manifest) -> Manifest:
    """``base`` plus the subsets and exclusion groups of a user manifest (see the module docstring).
    Groups are checked once every manifest is merged (``load_manifest``): a user manifest's group
    may name the tasks of a MedIMeta folder merged after it."""
    shorts = {s.short_name: s.name for s in base.subsets.values()}
    for name, sub in extra.subsets.items():
        if name in base.subsets:
            raise ManifestError(f"{extra.path}: manifest entry {name!r}: a subset of that name exists already "
                                f"(in {base.path}); rename it")
        if sub.short_name in shorts:
            raise ManifestError(f"{extra.path}: manifest entry {name!r}: short_name {sub.short_name!r} is taken by "
                                f"{shorts[sub.short_name]!r}; choose another")
    groups, medimeta = dict(base.exclusion_groups), dict(base.medimeta_groups)
    for group, members in extra.exclusion_groups.items():
        groups[group] = tuple(dict.fromkeys([*groups.get(group, ()), *members]))
    for group, ids in extra.medimeta_groups.items():
        medimeta[group] = tuple(dict.fromkeys([*medimeta.get(group, ()), *ids]))
    return Manifest(f"{base.version}+{extra.path.name}", {**base.subsets, **extra.subsets}, groups, extra.path,
                    medimeta)


@lru_cache(maxsize=16)
def _load_one(path: Path, mtime: float, user: bool) -> Manifest:
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc.strerror})") from None
    return parse_manifest(raw, path, home=path.parent if user else None)


def _read(path: Path, user: bool) -> Manifest:
    """A manifest file, or a MedIMeta data path (a folder)."""
    if path.is_dir():
        return medimeta_manifest(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} not found")
    return _load_one(path.resolve(), path.stat().st_mtime, user)


def load_manifest(extra: str | Path | Iterable[str | Path] | None = None, base: str | Path | None = None) -> Manifest:
    """The bundled manifest (or ``base``) merged with user manifests: ``extra`` (a path or several)
    and those named in ``$MEDMETA_MANIFEST`` (joined with the OS path separator); a folder among
    them is a MedIMeta data path."""
    manifest = _read(Path(base) if base is not None else DEFAULT_MANIFEST, user=base is not None)
    if extra is None:
        extras: list[str | Path] = []
    elif isinstance(extra, (str, Path)):
        extras = [extra]
    else:
        extras = list(extra)
    env = os.environ.get(MANIFEST_ENV, "")
    extras += [p for p in env.split(os.pathsep) if p]
    seen = set()
    for path in extras:
        resolved = Path(path).expanduser().resolve()
        if resolved in seen or resolved == manifest.path.resolve():
            continue
        seen.add(resolved)
        manifest = merge_manifests(manifest, _read(resolved, user=True))
    return _check_groups(with_medimeta_groups(manifest))
