"""MedMNIST+'s analysis of a supervised grid (architectures x sizes x schemes x datasets).

From the per-dataset table of ``baselines`` (mean over seeds per dataset, size, architecture,
initialisation, scheme and budget):

* ``averages``: the paper's Table 2 layout, test accuracy and AUROC averaged over datasets per
  architecture (and start), size and scheme, with the number of datasets averaged;
* ``transitions``: per scheme and pair of consecutive sizes, how many (dataset, architecture)
  cells improve their test accuracy from the smaller size to the larger;
* ``tests``: Friedman's test with Kendall's W and Bonferroni-corrected Wilcoxon pairs over
  sizes, schemes and architectures, datasets as blocks (``statistics.factor_tests``).

``write_grid`` writes ``grid.{json,md}``, ``grid_averages.csv``, ``grid_transitions.csv`` and
``grid.png`` whenever a factor has two or more levels.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..files import write_text_atomic
from .plots import grid_figure, save
from .results import write_csv
from .statistics import factor_tests, format_tests

FACTORS = ("size", "scheme", "arch")


def _arch(row: Mapping[str, Any]) -> str:
    """The architecture with its start, e.g. ``vgg16 (pretrained)``: a factor level of the grid."""
    return f"{row['arch']} ({row['init']})"


def cells(table: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The grid's cells: one per table row, the architecture named with its start."""
    return [{"dataset": r["dataset"], "size": r["size"], "scheme": r["scheme"], "arch": _arch(r),
             "test_acc": r["test_acc"], "test_auroc": r["test_auroc"]} for r in table]


def averages(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Table 2 of MedMNIST+: means over datasets per (architecture, size, scheme)."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["size"], r["scheme"]), []).append(r)
    return [{"arch": arch, "size": size, "scheme": scheme, "datasets": len(rs),
             "test_acc": float(np.mean([r["test_acc"] for r in rs])),
             "test_auroc": float(np.mean([r["test_auroc"] for r in rs]))}
            for (arch, size, scheme), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2]))]


def transitions(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per scheme and pair of consecutive sizes: cells (dataset, architecture) improving their accuracy."""
    by = {(r["scheme"], r["dataset"], r["arch"], r["size"]): r["test_acc"] for r in rows}
    out = []
    for scheme in sorted({r["scheme"] for r in rows}):
        sizes = sorted({r["size"] for r in rows if r["scheme"] == scheme})
        for small, large in zip(sizes, sizes[1:]):
            pairs = [(by[scheme, d, a, small], by[scheme, d, a, large]) for (s, d, a, size) in by
                     if s == scheme and size == small and (scheme, d, a, large) in by]
            if pairs:
                out.append({"scheme": scheme, "from": small, "to": large, "cells": len(pairs),
                            "improved": sum(b > a for a, b in pairs)})
    return out


def summarise_grid(table: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Averages, transitions and tests of a table, or None when no factor has two levels."""
    rows = cells(table)
    if all(len({r[f] for r in rows}) < 2 for f in FACTORS):
        return None
    return {"averages": averages(rows), "transitions": transitions(rows),
            "tests": factor_tests(rows, FACTORS, "test_acc") + factor_tests(rows, FACTORS, "test_auroc")}


def grid_markdown(summary: Mapping[str, Any]) -> str:
    """The three parts of the summary as markdown tables."""
    lines = ["Test accuracy / AUROC averaged over datasets (MedMNIST+'s Table 2 layout):", "",
             "| arch (init) | size | scheme | datasets | ACC | AUROC |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['arch']} | {r['size']} | {r['scheme']} | {r['datasets']} | {r['test_acc']:.3f} "
              f"| {r['test_auroc']:.3f} |" for r in summary["averages"]]
    lines += ["", "Resolution transitions (cells whose test accuracy improves):", "",
              "| scheme | from | to | improved | cells |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {t['scheme']} | {t['from']} | {t['to']} | {t['improved']} | {t['cells']} |"
              for t in summary["transitions"]]
    lines += ["", "Tests over datasets as blocks (* significant after Bonferroni):", "", format_tests(summary["tests"])]
    return "\n".join(lines)


def write_grid(out: Path, table: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """grid.{json,md}, its CSVs and grid.png under ``out`` when the table is a grid; else nothing."""
    summary = summarise_grid(table)
    if summary is None:
        return None
    write_text_atomic(out / "grid.json", json.dumps(summary, indent=2, default=str))
    write_text_atomic(out / "grid.md", grid_markdown(summary) + "\n")
    write_csv(out / "grid_averages.csv", summary["averages"], ["arch", "size", "scheme", "datasets", "test_acc",
                                                               "test_auroc"])
    write_csv(out / "grid_transitions.csv", summary["transitions"], ["scheme", "from", "to", "improved", "cells"])
    save(grid_figure(cells(table), summary["transitions"]), out / "grid.png")
    return summary
