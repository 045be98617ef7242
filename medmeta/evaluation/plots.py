"""The figures: what the protocol measures, drawn as paired differences with their intervals.

One module for every figure, so colours and markers mean the same everywhere: a method's
colour is its initialisation's, its marker its rule's (Okabe and Ito's colour-blind-safe
palette); a filled marker is a paired difference whose 95% interval excludes zero, a hollow
one an interval that includes it. Widths are bounded (``WIDTH_INCHES`` at ``DPI``, about 1600
px) and heights grow with the number of rows, so a figure stays readable from 1 to 30 methods
and 1 to 18 targets; layouts are constrained, so every label stays inside the canvas.

* ``forest_figure(results)``: one run (a target): each method's paired difference to the
  reference, AUROC and accuracy side by side, methods grouped by initialisation and sorted
  within groups, the absolute AUROC printed beside each row (``results.png``).
* ``sweep_figure(combined)``: a sweep: one small panel per target, each method's paired AUROC
  difference to that target's reference (``table.png``).
* ``grid_figure(rows, transitions)``: a supervised grid: accuracy per dataset for each
  architecture, size and scheme, and the resolution transitions (``grid.png``).
* ``curve_figure(curve)``: a few-shot curve: each method's AUROC against shots, and its paired
  AUROC difference to the reference against shots (``curve.png``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ..files import atomic_path
from .config import BUILTIN_METHODS

DPI = 150
WIDTH_INCHES = 10.5
"""1575 px at ``DPI``."""
PALETTE = ("#000000", "#0072B2", "#D55E00", "#E69F00", "#56B4E9", "#009E73", "#CC79A7", "#F0E442")
"""Okabe and Ito's colour-blind-safe palette."""
INIT_COLOURS = {"scratch": PALETTE[0], "mmpt": PALETTE[1], "maml": PALETTE[2], "pretrained": PALETTE[3],
                "imagenet": PALETTE[3], "checkpoint": PALETTE[4]}
"""``imagenet`` is ``pretrained`` under its earlier name: one colour."""
RULE_MARKERS = {"finetune": "o", "linear": "s", "knn": "^", "proto": "D", "lpft": "v", "inner": "P"}
OTHER_MARKERS = ("X", "*", "h", "p", "<", ">")
METRIC_LABELS = {"auroc": "AUROC", "acc": "accuracy"}


def split_method(name: str) -> tuple[str, str]:
    """A method's (initialisation, rule) by its name: ``mmpt+linear``, a built-in name (``maml`` is
    maml+inner), or a user's ``module:Class`` (its own name, no rule)."""
    if name in BUILTIN_METHODS:
        return BUILTIN_METHODS[name]
    init, plus, rule = name.partition("+")
    return (init, rule) if plus else (name, "")


def colour(init: str) -> str:
    """The colour of an initialisation: fixed for the built-ins, stable for any other name."""
    if init in INIT_COLOURS:
        return INIT_COLOURS[init]
    return PALETTE[5 + sum(map(ord, init)) % (len(PALETTE) - 5)]


def marker(rule: str) -> str:
    """The marker of an adaptation rule: fixed for the built-ins, stable for any other name."""
    return RULE_MARKERS.get(rule) or OTHER_MARKERS[sum(map(ord, rule)) % len(OTHER_MARKERS)]


def method_order(names: Sequence[str], value: Mapping[str, float]) -> list[str]:
    """Methods grouped by initialisation (built-ins first, in a fixed order) and sorted by
    ``value`` (largest first) within each group."""
    inits = list(dict.fromkeys([*INIT_COLOURS, *(split_method(n)[0] for n in names)]))
    return sorted(names, key=lambda n: (inits.index(split_method(n)[0]), -value.get(n, 0.0), n))


def _legend(fig: Figure, names: Sequence[str]) -> None:
    """Colours (initialisations) and markers (rules) of ``names``, below the panels."""
    parts = [split_method(n) for n in names]
    handles = [Line2D([], [], ls="", marker="s", ms=7, color=colour(i), label=i)
               for i in dict.fromkeys(p[0] for p in parts)]
    handles += [Line2D([], [], ls="", marker=marker(r), ms=6, color="grey", label=r)
                for r in dict.fromkeys(p[1] for p in parts) if r]
    handles += [Line2D([], [], ls="", marker="8", ms=7, color="grey", label="filled: 95% interval excludes 0"),
                Line2D([], [], ls="", marker="8", ms=7, mfc="white", color="grey", label="hollow: includes 0")]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=8, frameon=False)


def _point(ax: Any, x: float, y: float, ci: float, name: str, significant: bool, size: float = 6) -> None:
    init, rule = split_method(name)
    c = colour(init)
    ax.errorbar(x, y, xerr=ci, fmt=marker(rule), color=c, ms=size, mfc=c if significant else "white",
                mec=c, ecolor=c, elinewidth=1.2, capsize=2)


def forest_figure(results: Mapping[str, Any]) -> Figure:
    """One run's methods: paired difference to the reference per metric, point and 95% interval
    (absolute values when nothing is paired, e.g. a single method)."""
    methods = results["methods"]
    reference = results.get("reference", "")
    paired = [n for n, m in methods.items() if "paired" in m]
    names = paired or list(methods)

    def value(name: str, metric: str) -> tuple[float, float]:
        m = methods[name]
        if paired:
            return m["paired"][metric]["mean"], m["paired"][metric]["ci95"]
        return m["summary"][metric], m["summary"][f"{metric}_ci95"]

    rows = method_order(names, {n: value(n, "auroc")[0] for n in names})
    fig = Figure(figsize=(WIDTH_INCHES, 1.6 + 0.3 * len(rows)), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, metric in zip(axes, ("auroc", "acc")):
        for y, name in enumerate(rows):
            x, ci = value(name, metric)
            _point(ax, x, y, ci, name, significant=bool(paired) and (x - ci > 0 or x + ci < 0))
        if paired:
            ax.axvline(0.0, color="grey", lw=1, zorder=0)
            ax.set_xlabel(f"Δ {METRIC_LABELS[metric]} vs {reference} (paired, 95% interval)", fontsize=9)
        else:
            ax.set_xlabel(f"{METRIC_LABELS[metric]} (mean, 95% interval)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
    axes[0].set_yticks(range(len(rows)), rows)
    axes[0].set_ylim(len(rows) - 0.5, -0.5)
    right = axes[1].secondary_yaxis("right")
    right.set_yticks(range(len(rows)), [f"AUROC {methods[n]['summary']['auroc']:.3f} ± "
                                        f"{methods[n]['summary']['auroc_ci95']:.3f}" for n in rows])
    right.tick_params(labelsize=8, length=0)
    shots = results.get("config", {}).get("episodes", {}).get("shots", "")
    episodes = results.get("episode_set", {}).get("count", "")
    fig.suptitle(f"{results['target']}: {shots}-shot, {episodes} episodes"
                 + (f"; paired differences to {reference} ({methods[reference]['summary']['auroc']:.3f} AUROC)"
                    if paired and reference in methods else ""), fontsize=10)
    _legend(fig, rows)
    return fig


def sweep_figure(combined: Mapping[str, Any]) -> Figure:
    """A sweep's table: one panel per target (three per row), each method's paired AUROC difference
    to the target's reference with its 95% interval; the reference itself is a ``|`` at zero."""
    table = combined["table"]
    targets = list(dict.fromkeys(r["target"] for r in table))
    by = {(r["target"], r["method"]): r for r in table}
    names = list(dict.fromkeys(r["method"] for r in table))
    mean_diff = {n: float(sum(by[t, n].get("auroc_diff", 0.0) for t in targets if (t, n) in by)) for n in names}
    rows = method_order(names, mean_diff)
    ncols = min(3, len(targets))
    nrows = math.ceil(len(targets) / ncols)
    fig = Figure(figsize=(WIDTH_INCHES, 1.2 + nrows * (0.7 + 0.24 * len(rows))), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False)
    for ax, target in zip(axes.flat, targets):
        references = set()
        for y, name in enumerate(rows):
            r = by.get((target, name))
            if r is None:
                continue
            references.add(r["reference"])
            if name == r["reference"]:
                ax.plot(0.0, y, marker="|", ms=10, color=colour(split_method(name)[0]))
            elif "auroc_diff" in r:
                d, ci = r["auroc_diff"], r["auroc_diff_ci95"]
                _point(ax, d, y, ci, name, significant=d - ci > 0 or d + ci < 0, size=5)
        ax.axvline(0.0, color="grey", lw=1, zorder=0)
        ax.set_title(f"{target} (vs {', '.join(sorted(references))})", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    for i, ax in enumerate(axes.flat):
        if i >= len(targets):
            ax.set_visible(False)
        elif i + ncols >= len(targets):  # the lowest panel of its column
            ax.set_xlabel("Δ AUROC (paired, 95% interval)", fontsize=8)
    axes[0, 0].set_yticks(range(len(rows)), rows)
    axes[0, 0].set_ylim(len(rows) - 0.5, -0.5)
    seeds = combined.get("seeds", [])
    fig.suptitle(f"{combined.get('shots', '')}-shot leave-one-out: paired difference in query AUROC to each target's "
                 "reference" + (f", mean over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else ""),
                 fontsize=10)
    _legend(fig, rows)
    return fig


def grid_figure(rows: Sequence[Mapping[str, Any]], transitions: Sequence[Mapping[str, Any]]) -> Figure:
    """A supervised grid: per scheme, each architecture's test accuracy on every dataset (a dot per
    dataset, coloured by image size, a bar at their mean), then the resolution transitions (share
    of cells improving from each size to the next)."""
    schemes = sorted({r["scheme"] for r in rows})
    archs = sorted({r["arch"] for r in rows})
    sizes = sorted({r["size"] for r in rows})
    panels = len(schemes) + (1 if transitions else 0)
    ncols = min(3, panels)
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(WIDTH_INCHES, 1.0 + nrows * (1.6 + 0.12 * max(len(a) for a in archs))), dpi=DPI,
                 layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    size_colour = {size: PALETTE[1 + i % (len(PALETTE) - 1)] for i, size in enumerate(sizes)}
    width = 0.8 / len(sizes)
    for ax, scheme in zip(axes.flat, schemes):
        for j, size in enumerate(sizes):
            for i, arch in enumerate(archs):
                values = [r["test_acc"] for r in rows if (r["scheme"], r["arch"], r["size"]) == (scheme, arch, size)]
                if not values:
                    continue
                x = i - 0.4 + width * (j + 0.5)
                ax.plot([x] * len(values), values, "o", ms=4, alpha=0.7, color=size_colour[size])
                ax.plot([x - width / 2, x + width / 2], [float(np.mean(values))] * 2, color=size_colour[size], lw=2)
        ax.set_xticks(range(len(archs)), archs, rotation=35, ha="right", fontsize=7)
        ax.set_title(scheme, fontsize=9)
        ax.set_ylabel("test accuracy", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    if transitions:
        ax = axes.flat[len(schemes)]
        labels = [f"{t['scheme']} {t['from']}→{t['to']}" for t in transitions]
        ax.barh(range(len(transitions)), [t["improved"] / t["cells"] for t in transitions], color=PALETTE[1])
        for y, t in enumerate(transitions):  # beside the bar: readable when none improved
            ax.text(t["improved"] / t["cells"] + 0.01, y, f"{t['improved']} of {t['cells']}", va="center", fontsize=7)
        ax.set_yticks(range(len(transitions)), labels, fontsize=7)
        ax.set_xlim(0, 1)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("share of cells improving", fontsize=8)
        ax.set_title("resolution transitions", fontsize=9)
        ax.invert_yaxis()
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    fig.legend(handles=[Line2D([], [], ls="", marker="o", color=size_colour[s], label=f"{s}px") for s in sizes],
               loc="outside lower center", ncols=len(sizes), fontsize=8, frameon=False)
    fig.suptitle("Supervised grid: test accuracy per dataset (dots) and their mean (bars)", fontsize=10)
    return fig


def curve_figure(curve: Mapping[str, Any]) -> Figure:
    """A few-shot curve: per method, query AUROC (mean, 95% interval) at each shot count, and the
    paired AUROC difference to the reference on the same episodes (filled where its interval
    excludes zero). Shots on a log scale; methods side by side at each count so bars do not hide."""
    rows = curve["rows"]
    shots = list(curve["shots"])
    names = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["shots"]): r for r in rows}
    names = method_order(names, {n: float(np.mean([by[n, k]["auroc"] for k in shots if (n, k) in by])) for n in names})
    offsets = np.linspace(-0.04, 0.04, len(names)) if len(names) > 1 else np.zeros(1)
    fig = Figure(figsize=(WIDTH_INCHES, 4.2), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2)
    for offset, name in zip(offsets, names):
        init, rule = split_method(name)
        c = colour(init)
        present = [k for k in shots if (name, k) in by]
        xs = [k * 10 ** offset for k in present]
        axes[0].errorbar(xs, [by[name, k]["auroc"] for k in present], yerr=[by[name, k]["auroc_ci95"] for k in present],
                         fmt=f"-{marker(rule)}", color=c, ms=5, lw=1.2, capsize=2, label=name)
        diffs = [k for k in present if "auroc_diff" in by[name, k]]
        if name == curve["reference"]:
            axes[1].plot(xs, [0.0] * len(xs), ls="-", marker="|", ms=10, color=c)
        for k in diffs:
            d, ci = by[name, k]["auroc_diff"], by[name, k]["auroc_diff_ci95"]
            axes[1].errorbar(k * 10 ** offset, d, yerr=ci, fmt=marker(rule), color=c, ms=5, capsize=2,
                             mfc=c if d - ci > 0 or d + ci < 0 else "white", mec=c)
        if diffs:
            axes[1].plot([k * 10 ** offset for k in diffs], [by[name, k]["auroc_diff"] for k in diffs], color=c, lw=1)
    axes[1].axhline(0.0, color="grey", lw=1, zorder=0)
    for ax, label in zip(axes, ("query AUROC (mean, 95% interval)",
                                f"Δ AUROC vs {curve['reference']} (paired, 95% interval)")):
        ax.set_xscale("log")
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.minorticks_off()
        ax.set_xlabel("support images per class (shots)", fontsize=9)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"{curve['target']}: few-shot curve, each count on its own episodes", fontsize=10)
    _legend(fig, names)
    return fig


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG at ``DPI`` (temporary file, then rename). Figures are built without
    pyplot, so plotting never changes a notebook's backend and leaves no open figure."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    return path
