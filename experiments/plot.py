"""Draw the figures of finished runs again from their saved results, without rerunning anything.

    python experiments/plot.py docs/results/loo/retina/results.json docs/results/loo/table.json

A run's ``results.json`` gives ``results.png`` beside it (each method's paired difference to the
reference, ``medmeta.evaluation.plots.forest_figure``); a sweep's ``table.json`` gives
``table.png`` beside it (one panel per target, ``sweep_figure``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medmeta.errors import ConfigError, MedmetaError
from medmeta.evaluation.plots import forest_figure, save, sweep_figure


def plot(path: Path) -> Path:
    """The figure of one saved ``results.json`` or ``table.json``, written beside it."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read saved results ({exc})") from None
    if isinstance(saved, dict) and "methods" in saved:
        return save(forest_figure(saved), path.with_name("results.png"))
    if isinstance(saved, dict) and "table" in saved:
        return save(sweep_figure(saved), path.with_name("table.png"))
    raise ConfigError(f"{path} is neither a run's results.json nor a sweep's table.json")


def main(argv: list[str] | None = None) -> list[Path]:
    """Plot every file given; bad input is one line and exit status 2."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="results.json or table.json files")
    args = parser.parse_args(argv)
    try:
        written = [plot(f) for f in args.files]
    except MedmetaError as exc:
        print(f"plot: error: {exc}", file=sys.stderr)
        sys.exit(2)
    for p in written:
        print(p)
    return written


if __name__ == "__main__":
    main()
