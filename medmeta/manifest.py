"""Load and validate ``data_manifest.yaml``: the single source of data facts.

Every other module asks the manifest which subsets exist, what their files, checksums,
task types, labels and split counts are, and which subsets a leave-one-out target must
exclude. Nothing about MedMNIST is hard-coded elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import yaml

TASK_TYPES = ("binary", "multi-class", "ordinal", "multi-label")
SPLITS = ("train", "val", "test")
_PACKAGE_COPY = Path(__file__).with_name("data_manifest.yaml")
DEFAULT_MANIFEST = _PACKAGE_COPY.resolve()


class ManifestError(ValueError):
    """The manifest is malformed; the message names the entry and field."""


@dataclass(frozen=True)
class FileInfo:
    """One official npz file of a subset at one image size."""

    size: int
    file: str
    url: str
    md5: str


@dataclass(frozen=True)
class SubsetInfo:
    """Everything the manifest says about one MedMNIST subset."""

    name: str
    short_name: str
    dims: int
    channels: int
    task_type: str
    labels: tuple[str, ...]
    splits: Mapping[str, int]
    modality: str
    domain: str
    source_dataset: str
    license: str
    citation: str
    files: Mapping[int, FileInfo]

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
        return len(self.labels) if self.task_type == "multi-label" else 1

    def file(self, size: int) -> FileInfo:
        if size not in self.files:
            raise ValueError(
                f"{self.name} has no official size {size}; available sizes: {list(self.sizes)}"
            )
        return self.files[size]


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest: subsets by name and the leave-one-out exclusion groups."""

    version: str
    subsets: Mapping[str, SubsetInfo]
    exclusion_groups: Mapping[str, tuple[str, ...]]
    path: Path

    def resolve(self, name: str) -> str:
        """Map a full or short subset name (``retina``, ``nodule3d``) to the full name."""
        key = name.strip().lower()
        if key in self.subsets:
            return key
        for sub in self.subsets.values():
            if key == sub.short_name or key + "mnist" == sub.name:
                return sub.name
        shorts = ", ".join(s.short_name for s in self.subsets.values())
        raise ValueError(f"unknown subset {name!r}; known: {shorts}")

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
    task_type = _require(name, raw, "task_type", str)
    if task_type not in TASK_TYPES:
        raise ManifestError(
            f"manifest entry {name!r}: field 'task_type' must be one of {TASK_TYPES}, got {task_type!r}"
        )
    labels = _require(name, raw, "labels", list)
    if len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise ManifestError(f"manifest entry {name!r}: field 'labels' needs at least two names")
    if task_type == "binary" and len(labels) != 2:
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
        files[size] = FileInfo(size, _require(where, f, "file", str), _require(where, f, "url", str), md5)
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


def parse_manifest(raw: Any, path: Path) -> Manifest:
    """Validate a manifest already read from YAML; raise ManifestError naming entry and field."""
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: the manifest must be a mapping at the top level")
    subsets_raw = _require("<top level>", raw, "subsets", dict)
    subsets = {name: _parse_subset(name, entry) for name, entry in subsets_raw.items()}
    shorts = [s.short_name for s in subsets.values()]
    if len(set(shorts)) != len(shorts):
        raise ManifestError(f"{path}: short_name values must be unique")
    groups_raw = _require("<top level>", raw, "exclusion_groups", dict)
    groups: dict[str, tuple[str, ...]] = {}
    for group, body in groups_raw.items():
        members = _require(f"exclusion_groups.{group}", body or {}, "members", list)
        for member in members:
            if member not in subsets:
                raise ManifestError(
                    f"manifest entry 'exclusion_groups.{group}': member {member!r} is not a subset"
                )
        groups[group] = tuple(members)
    return Manifest(str(raw.get("version", "unknown")), subsets, groups, path)


@lru_cache(maxsize=8)
def _load_cached(path: Path, mtime: float) -> Manifest:
    with open(path, encoding="utf-8") as fh:
        try:
            raw = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise ManifestError(f"{path}: not valid YAML ({exc})") from None
    return parse_manifest(raw, path)


def load_manifest(path: str | Path | None = None) -> Manifest:
    """Load (and cache) the manifest; defaults to the repository's ``data_manifest.yaml``."""
    path = Path(path) if path is not None else DEFAULT_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found")
    return _load_cached(path.resolve(), path.stat().st_mtime)
