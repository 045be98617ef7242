"""YAML experiment configs with command-line overrides.

A config is a YAML mapping; ``base: other.yaml`` merges it over another config in the same
folder. Overrides use dotted keys (``pretrain.steps=500``); values are parsed as YAML, so
``true``, ``3`` and ``[a, b]`` keep their types. An unknown key is an error, so a typo never
silently does nothing.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_config(name: str | Path, configs_dir: Path) -> dict[str, Any]:
    """Read a config by path or by name under ``configs_dir`` (``paper`` -> configs_dir/paper.yaml)."""
    path = Path(name)
    if not path.is_file():
        path = configs_dir / (path.name if path.suffix == ".yaml" else f"{name}.yaml")
    if not path.is_file():
        known = sorted(p.stem for p in configs_dir.glob("*.yaml"))
        raise FileNotFoundError(f"config {name!r} not found; give a YAML path or one of {known}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config {path} must be a YAML mapping")
    base = raw.pop("base", None)
    return _merge(read_config(base, path.parent), raw) if base else raw


def set_key(config: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested config; the key must already exist."""
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise KeyError(f"unknown config key {dotted!r}")
        node = node[part]
    if last not in node:
        raise KeyError(f"unknown config key {dotted!r}; known here: {sorted(node)}")
    node[last] = value


def load_config(name: str | Path, configs_dir: Path, overrides: Mapping[str, Any] | None = None,
                sets: Iterable[str] = ()) -> dict[str, Any]:
    """A config with dotted-key ``overrides`` and ``KEY=VALUE`` strings (from ``--set``) applied."""
    config = read_config(name, configs_dir)
    for key, value in (overrides or {}).items():
        set_key(config, key, value)
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        set_key(config, key.strip(), yaml.safe_load(text))
    return config
