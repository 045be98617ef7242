"""Results: summaries with 95% intervals, JSON/CSV files, a plot and a printed table.

The last stage of the data flow; it only formats what the protocol measured.
"""
from __future__ import annotations

import csv
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

from .files import atomic_path
from .metrics import mean_ci

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


def summarise(per_episode: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean and 1.96 x SEM half-width of AUROC and accuracy over episodes."""
    auroc, auroc_ci = mean_ci([e["auroc"] for e in per_episode])
    acc, acc_ci = mean_ci([e["acc"] for e in per_episode])
    return {"auroc": auroc, "auroc_ci95": auroc_ci, "acc": acc, "acc_ci95": acc_ci, "episodes": len(per_episode)}


def write_atomic(path: Path, text: str) -> None:
    """Write text to a temporary file, then rename it into place."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_results(out: Path, results: Mapping[str, Any]) -> None:
    """``results.json`` (everything) and ``results.csv`` (one row per method and episode)."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.json", json.dumps(results, indent=2, default=str))
    rows = [{"target": results["target"], "method": name, "episode": e["episode"], "auroc": e["auroc"], "acc": e["acc"]}
            for name, m in results["methods"].items() for e in m["per_episode"]]
    with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["target", "method", "episode", "auroc", "acc"])
        writer.writeheader()
        writer.writerows(rows)


def plot_results(out: Path, results: Mapping[str, Any]) -> Path:
    """Per-method mean query AUROC with 95% intervals, as ``results.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["methods"])
    means = [results["methods"][n]["summary"]["auroc"] for n in names]
    cis = [results["methods"][n]["summary"]["auroc_ci95"] for n in names]
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(names), 3.6))
    ax.bar(names, means, yerr=cis, capsize=6, color="#4c72b0")
    ax.axhline(0.5, color="grey", lw=1, ls="--", label="chance")
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("query AUROC (mean, 95% CI)")
    shots, episodes = results["config"]["episodes"]["shots"], results["episode_set"]["count"]
    ax.set_title(f"{results['target']} {shots}-shot, {episodes} episodes", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = out / "results.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_table(results: Mapping[str, Any]) -> str:
    """A plain-text table of the methods' AUROC and accuracy with 95% intervals."""
    lines = [f"target {results['target']} ({results['config']['size']}px), sources: {', '.join(results['sources']) or '-'}",
             f"{'method':<10}{'AUROC':>16}{'ACC':>16}{'episodes':>10}{'seconds':>10}"]
    for name, m in results["methods"].items():
        s = m["summary"]
        lines.append(f"{name:<10}{s['auroc']:>9.3f} ± {s['auroc_ci95']:.3f}{s['acc']:>9.3f} ± {s['acc_ci95']:.3f}"
                     f"{s['episodes']:>10}{m['seconds']['total']:>10.0f}")
    return "\n".join(lines)
