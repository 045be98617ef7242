"""Results: summaries with 95% intervals, JSON/CSV files, a plot and a printed table.

The last stage of the data flow; it only formats what the protocol measured.
"""
from __future__ import annotations

import csv
import json
import math
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..files import atomic_path, write_text_atomic
from .metrics import mean_ci, paired_difference
from .plots import forest_figure, save

PACKAGES = ("medmeta", "torch", "torchvision", "numpy", "h5py", "scikit-learn", "pyyaml")


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages that shape the numbers."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


METRICS = ("auroc", "acc")


def summarise(per_episode: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean and 1.96 x SEM half-width of AUROC and accuracy over episodes.

    ``episodes`` counts every episode; ``episodes_auroc`` those with a defined AUROC (an
    episode whose query holds a single class for every label has none, and is left out of
    the AUROC mean).
    """
    out: dict[str, float] = {}
    for metric in METRICS:
        out[metric], out[f"{metric}_ci95"] = mean_ci([e[metric] for e in per_episode])
    out["episodes"] = len(per_episode)
    out["episodes_auroc"] = int(sum(not math.isnan(e["auroc"]) for e in per_episode))
    return out


def add_paired_differences(methods: dict[str, Any], reference: str) -> None:
    """Give every method a ``paired`` entry: its per-episode difference to ``reference`` per metric."""
    if reference not in methods:
        return
    ref = {e["episode"]: e for e in methods[reference]["per_episode"]}
    for name, m in methods.items():
        if name == reference:
            m.pop("paired", None)
            continue
        rows = [(e, ref[e["episode"]]) for e in m["per_episode"] if e["episode"] in ref]
        m["paired"] = {"reference": reference, **{
            metric: paired_difference([e[metric] for e, _ in rows], [r[metric] for _, r in rows])
            for metric in METRICS}}


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], fieldnames: Sequence[str]) -> None:
    """Rows as CSV, written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fieldnames))
        writer.writeheader()
        writer.writerows(rows)


SUMMARY_FIELDS = ("target", "method", "auroc", "auroc_ci95", "acc", "acc_ci95", "episodes", "episodes_auroc",
                  "transductive", "reference", "auroc_diff", "auroc_diff_ci95", "acc_diff", "acc_diff_ci95", "identical",
                  "train_seconds", "adapt_seconds")


def summary_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per method: its summary and its paired difference to the reference method."""
    rows = []
    for name, m in results["methods"].items():
        paired = m.get("paired", {})
        row = {"target": results["target"], "method": name, **m["summary"],
               "reference": paired.get("reference", ""), "transductive": bool(m.get("transductive")),
               "train_seconds": m["seconds"]["train"], "adapt_seconds": m["seconds"]["adapt"]}
        for metric in METRICS:
            if metric in paired:
                row[f"{metric}_diff"] = paired[metric]["mean"]
                row[f"{metric}_diff_ci95"] = paired[metric]["ci95"]
        if paired:
            row["identical"] = paired["auroc"]["identical"] and paired["acc"]["identical"]
        rows.append(row)
    return rows


def write_results(out: Path, results: Mapping[str, Any]) -> None:
    """``results.json`` (everything), ``results.csv`` (one row per method and episode) and
    ``summary.csv`` (one row per method, with the paired difference to the reference)."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2, default=str))
    rows = [{"target": results["target"], "method": name, "episode": e["episode"], "auroc": e["auroc"], "acc": e["acc"]}
            for name, m in results["methods"].items() for e in m["per_episode"]]
    write_csv(out / "results.csv", rows, ["target", "method", "episode", "auroc", "acc"])
    write_csv(out / "summary.csv", summary_rows(results), SUMMARY_FIELDS)


def plot_results(out: Path, results: Mapping[str, Any]) -> Path:
    """Each method's paired difference to the reference with its interval (``plots.forest_figure``), as ``results.png``."""
    return save(forest_figure(results), out / "results.png")


def _difference(paired: Mapping[str, Any], metric: str) -> str:
    d = paired[metric]
    if d["identical"]:
        return "identical"
    return f"{d['mean']:+.3f} ± {d['ci95']:.3f}"


def format_table(results: Mapping[str, Any]) -> str:
    """A plain-text table: AUROC and accuracy with 95% intervals, and the paired per-episode
    difference to the reference method (``identical`` when every episode's value is equal)."""
    reference = results.get("reference", "")
    width = max([len("method"), *map(len, results["methods"])]) + 3
    lines = [f"target {results['target']} ({results['config']['size']}px), sources: {', '.join(results['sources']) or '-'}",
             f"{'method':<{width}}{'AUROC':>16}{'ACC':>16}{'ΔAUROC (paired)':>18}{'ΔACC (paired)':>18}"
             f"{'episodes':>10}{'seconds':>9}"]
    transductive = [name for name, m in results["methods"].items() if m.get("transductive")]
    for name, m in results["methods"].items():
        s, paired = m["summary"], m.get("paired")
        label = f"{name}*" if name in transductive else name
        count = str(s["episodes"]) if s["episodes_auroc"] == s["episodes"] else f"{s['episodes_auroc']}/{s['episodes']}"
        d_auroc = _difference(paired, "auroc") if paired else "reference" if name == reference else "-"
        d_acc = _difference(paired, "acc") if paired else "" if name == reference else "-"
        lines.append(f"{label:<{width}}{s['auroc']:>9.3f} ± {s['auroc_ci95']:.3f}{s['acc']:>9.3f} ± {s['acc_ci95']:.3f}"
                     f"{d_auroc:>18}{d_acc:>18}{count:>10}{m['seconds']['total']:>9.0f}")
    lines.append(f"Δ: mean per-episode difference to {reference} with its 95% interval"
                 + ("" if reference in results["methods"] else " (not run: no differences)"))
    if transductive:
        lines.append("* transductive: a query image's score depends on the other query images (BatchNorm statistics "
                     "of the query)")
    if any(m["summary"]["episodes_auroc"] != m["summary"]["episodes"] for m in results["methods"].values()):
        lines.append("episodes a/b: a of the b episodes have a defined AUROC (the others are left out of its mean)")
    return "\n".join(lines)
