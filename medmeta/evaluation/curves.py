"""Few-shot curves: one target at several shot counts, in one command (MedIMeta reports 1 to 30 shots).

``Curve`` runs the protocol once per count, each in ``out/shots<k>/`` with its own stored
episode set, results and method caches; every count shares ``out/pretrained/``, so an
initialisation that trains (mm-PT, MAML) trains once: its training depends on the sources and
settings, never on the target's episodes. Rerunning the command redoes nothing finished.

``curve.json``, ``curve.csv``, ``curve.md`` and ``curve.png`` in ``out`` hold, per method and count,
query AUROC and accuracy (mean over that count's episodes, 95% interval) and the paired
per-episode difference to the reference on the same episodes; the figure draws AUROC against
shots per method, and the paired AUROC difference against shots (``plots.curve_figure``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .. import distributed
from ..data.manifest import Manifest
from ..errors import ConfigError
from ..files import write_text_atomic
from ..settings import repeated
from .config import ExperimentConfig
from .plots import curve_figure, save
from .protocol import Protocol
from .results import METRICS, package_versions, write_csv

CURVE_FIELDS = ("target", "shots", "method", "episodes", "auroc", "auroc_ci95", "acc", "acc_ci95", "reference",
                "auroc_diff", "auroc_diff_ci95", "acc_diff", "acc_diff_ci95", "identical")


@dataclass
class Curve:
    """One target of ``config`` at each count of ``shots``, written under ``out`` (see the module docstring)."""

    config: ExperimentConfig
    shots: Sequence[int]
    out: Path
    root: str | Path | None = None
    source_dir: str | None = None
    manifest: Manifest | None = None

    def __post_init__(self) -> None:
        twice = repeated(self.shots)
        if twice is not None or not self.shots or min(self.shots) < 1:
            raise ConfigError(f"shots {list(self.shots)}: give distinct counts of at least 1"
                              + (f" ({twice} is given twice)" if twice is not None else ""))
        if self.config.episodes.file:
            raise ConfigError("a stored episode set (--episodes-file) has one shot count; leave it out to draw a set "
                              "per count of --shots")
        self.out = Path(self.out)
        for k in self.shots:  # the target, methods and sources of every count, before any work
            self.protocol(k, check_only=True)

    def protocol(self, shots: int, check_only: bool = False) -> Protocol:
        """The protocol of one count: its own folder and episodes, the curve's shared pretraining."""
        config = self.config.replace(episodes=self.config.episodes.replace(shots=shots))
        return Protocol(config, self.out / f"shots{shots}", root=self.root, source_dir=self.source_dir,
                        manifest=self.manifest, pretrained=self.out / "pretrained", check_only=check_only)

    def run(self) -> dict[str, Any] | None:
        """Run every count (finished ones are reused) and write the curve; rank 0 returns it, others None."""
        runs = {k: self.protocol(k).run() for k in self.shots}
        if not distributed.is_main():
            return None
        first = runs[self.shots[0]]
        curve = {"target": first["target"], "reference": first["reference"], "shots": list(self.shots),
                 "sources": first["sources"], "config": self.config.to_dict(), "versions": package_versions(),
                 "rows": curve_rows(runs), "runs": {str(k): str(self.out / f"shots{k}" / "results.json")
                                                    for k in self.shots}}
        write_curve(self.out, curve)
        print(format_curve(curve))
        return curve


def curve_rows(runs: Mapping[int, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (count, method): the summary over that count's episodes and the paired difference."""
    rows = []
    for shots, results in runs.items():
        for method, m in results["methods"].items():
            paired = m.get("paired", {})
            row: dict[str, Any] = {"target": results["target"], "shots": shots, "method": method,
                                   "episodes": m["summary"]["episodes"], "reference": results["reference"]}
            for metric in METRICS:
                row[metric], row[f"{metric}_ci95"] = m["summary"][metric], m["summary"][f"{metric}_ci95"]
                if metric in paired:
                    row[f"{metric}_diff"], row[f"{metric}_diff_ci95"] = paired[metric]["mean"], paired[metric]["ci95"]
            if paired:
                row["identical"] = paired["auroc"]["identical"] and paired["acc"]["identical"]
            rows.append(row)
    return rows


def _cell(row: Mapping[str, Any]) -> str:
    text = f"{row['auroc']:.3f} ± {row['auroc_ci95']:.3f}"
    if "auroc_diff" in row:
        text += " [Δ identical]" if row["identical"] else f" [Δ {row['auroc_diff']:+.3f} ± {row['auroc_diff_ci95']:.3f}]"
    return text


def format_curve(curve: Mapping[str, Any]) -> str:
    """A methods x shots markdown table of query AUROC, with the paired difference to the reference."""
    shots = curve["shots"]
    methods = list(dict.fromkeys(r["method"] for r in curve["rows"]))
    cells = {(r["method"], r["shots"]): _cell(r) for r in curve["rows"]}
    lines = [f"{curve['target']}: query AUROC by shots (mean ± 95% interval over each count's episodes; [Δ paired "
             f"difference to {curve['reference']} on the same episodes])",
             f"| method | {' | '.join(f'{k}-shot' for k in shots)} |", f"| --- |{' --- |' * len(shots)}"]
    lines += [f"| {m} | {' | '.join(cells.get((m, k), '-') for k in shots)} |" for m in methods]
    return "\n".join(lines)


def write_curve(out: Path, curve: Mapping[str, Any]) -> None:
    """``curve.json``, ``curve.csv``, ``curve.md`` and ``curve.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "curve.json", json.dumps(curve, indent=2, default=str))
    write_csv(out / "curve.csv", curve["rows"], CURVE_FIELDS)
    write_text_atomic(out / "curve.md", format_curve(curve) + "\n")
    save(curve_figure(curve), out / "curve.png")
