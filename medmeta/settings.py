"""Typed settings: dataclasses whose fields are checked when they are made, from YAML or from code.

Every config section in medmeta (``PretrainConfig``, ``MAMLConfig``, the adaptation rules,
``ExperimentConfig`` ...) is a dataclass deriving from ``Settings``. Its defaults are the only
defaults; its field types and ``setting(min=..., choices=...)`` bounds are checked in
``__post_init__``, so a bad value fails at start-up with one line naming the key, whether it
came from a YAML profile, ``--set key=value`` or Python. ``from_mapping`` builds a settings
tree from nested mappings and refuses unknown keys by name.

Values are coerced where the intent is unambiguous: YAML reads ``1e-4`` as a string, so a
float field accepts a string that parses as a float; an int field accepts a float with no
fractional part. Nothing else is guessed.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, TypeVar, Union, get_args, get_origin

import yaml

from .errors import ConfigError

S = TypeVar("S", bound="Settings")


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            min: float | None = None, max: float | None = None, above: float | None = None) -> Any:
    """A dataclass field with bounds: ``min``/``max`` inclusive, ``above`` exclusive."""
    meta = {k: v for k, v in (("min", min), ("max", max), ("above", above)) if v is not None}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class Settings:
    """Mixin for settings dataclasses: validates and coerces every field on construction."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = _coerce(getattr(self, f.name), hints[f.name], f.name)
            _check_bounds(value, f.metadata, f.name)
            object.__setattr__(self, f.name, value)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (enums as their values, tuples as lists): for YAML, JSON and hashing."""
        return _plain(self)

    def replace(self: S, **changes: Any) -> S:
        """A copy with some fields changed (validated like any construction)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def _name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp``; ConfigError naming ``key`` when it is not one."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in sorted(args, key=lambda a: a is str):  # try str last: it would accept anything textual
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key}: expected {_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key {key}: expected null, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"config key {key}: expected one of {list(args)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        if origin is tuple and len(args) > 1 and args[1] is not Ellipsis and len(items) != len(args):
            raise ConfigError(f"config key {key}: expected {len(args)} values, got {value!r}")
        return tuple(items) if origin is tuple else items
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"config key {key}: expected one of {[m.value for m in tp]}, got {value!r}") from None
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return from_mapping(tp, value, prefix=f"{key}.")
        raise ConfigError(f"config key {key}: expected a mapping of settings, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"config key {key}: expected {_name(tp)}, got {value!r}")


def _check_bounds(value: Any, meta: Mapping[str, float], key: str) -> None:
    if not meta or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"config key {key}: must be >= {meta['min']}, got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"config key {key}: must be <= {meta['max']}, got {value!r}")
    if "above" in meta and value <= meta["above"]:
        raise ConfigError(f"config key {key}: must be > {meta['above']}, got {value!r}")


def from_mapping(cls: type[S], data: Mapping[str, Any], prefix: str = "") -> S:
    """Build ``cls`` from a (nested) mapping; unknown keys and bad values raise ConfigError by name."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config {prefix.rstrip('.') or 'file'}: expected a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; known here: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except ConfigError as exc:
        text = str(exc)
        if text.startswith("config key ") and prefix:
            text = f"config key {prefix}{text[len('config key '):]}"
        raise ConfigError(text) from None
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"config {prefix.rstrip('.') or 'file'}: {exc}") from None


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into a deep copy of ``base`` (nested mappings merge, anything else replaces)."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_profile(name: str | Path, folder: Path) -> dict[str, Any]:
    """A YAML profile by path or by name under ``folder`` (``paper`` -> folder/paper.yaml);
    ``base: other.yaml`` merges it over another profile in the same folder."""
    path = Path(name)
    if not path.is_file():
        path = folder / (path.name if path.suffix == ".yaml" else f"{name}.yaml")
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(f"config {name!r} not found; give a YAML path or one of {known}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a YAML mapping")
    base = raw.pop("base", None)
    return merge(read_profile(base, path.parent), raw) if base else raw


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested dicts, creating the intermediate mappings (keys are checked later)."""
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key {dotted}: {part} is not a section")
        node = child
    node[last] = value


def apply_sets(data: dict[str, Any], sets: Iterable[str]) -> dict[str, Any]:
    """Apply ``KEY=VALUE`` strings (``--set``); values are read as YAML (``true``, ``3``, ``[a, b]``)."""
    out = copy.deepcopy(data)
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
        set_dotted(out, key.strip(), value)
    return out


def comma_list(text: str) -> list[str]:
    """A comma-separated command-line value as a list (empty items kept: the config refuses them)."""
    return [t.strip() for t in text.split(",")]


def repeated(values: Iterable[Any]) -> Any | None:
    """The first value that appears a second time in ``values``, or None when all are distinct."""
    seen: list[Any] = []
    for value in values:
        if value in seen:
            return value
        seen.append(value)
    return None


def _distinct_ints(text: str, what: str, kind: str, minimum: int | None, distinct: str) -> list[int]:
    """A comma list of distinct integers (at least ``minimum``) for argparse's ``type=``; anything
    else is one ``error: argument ...`` line (``what`` and ``kind`` name them in it)."""
    values = []
    for item in comma_list(text):
        try:
            value = int(item)
        except ValueError:
            value = None
        if value is None or (minimum is not None and value < minimum):
            raise argparse.ArgumentTypeError(f"{what} are {kind}, got {item!r} in {text!r}")
        values.append(value)
    twice = repeated(values)
    if twice is not None:
        raise argparse.ArgumentTypeError(f"{distinct} must be distinct; {twice} is given twice")
    return values


def shot_list(text: str) -> list[int]:
    """``--shots 1,5,10`` as a list of distinct counts of at least 1."""
    return _distinct_ints(text, "shots", "counts of at least 1", 1, "shot counts")


def seed_list(text: str) -> list[int]:
    """``--seeds 0,1,2`` as a list of distinct integers: a repeated seed would run the same thing
    twice and report its copies as agreeing runs (sd 0.000 across seeds), so it is refused."""
    return _distinct_ints(text, "seeds", "integers", None, "seeds")


def size_list(text: str) -> list[int]:
    """``--size 28,64`` as a list of distinct integers (the config checks each is an image size)."""
    return _distinct_ints(text, "sizes", "integers (28, 64, 128, 224)", 1, "sizes")


def nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys (``{"pretrain.steps": 5}``, e.g. command-line flags) as nested mappings; None values are left out."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if value is not None:
            set_dotted(out, key, value)
    return out


def load_settings(cls: type[S], profile: str | Path | None = None, folder: Path | None = None,
                  overrides: Mapping[str, Any] | None = None, sets: Iterable[str] = ()) -> S:
    """``cls``'s defaults, merged with a YAML profile (path or name in ``folder``), then ``overrides``
    (nested mapping) and ``--set KEY=VALUE`` strings; every value checked."""
    data: dict[str, Any] = read_profile(profile, folder or Path.cwd()) if profile else {}
    return from_mapping(cls, apply_sets(merge(data, overrides or {}), sets))
