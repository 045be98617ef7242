"""Where frozen features should take BatchNorm statistics: every frozen-feature rule x bn mode x initialisation.

    MEDMETA_SOURCE_DIR=../shared/data/medmnist python experiments/bn_modes.py --target retina,breast,blood,organa --sources available --out runs/bn

For each target, one leave-one-out run per ``bn`` mode (own, support, transductive, and sources
for the initialisations trained on the sources) in OUT/<target>/<mode>/, all on the same stored
episodes and sharing OUT/pretrained/ (each initialisation trains once per target). Then one
table, OUT/table.{md,csv,json}: each (target, initialisation, rule, mode)'s query AUROC and its
paired per-episode difference to ``support`` (the setting every rule used before ``bn``
existed), and per initialisation the mean paired difference of each mode over targets and
rules, with how many cells are significantly above and
below zero: the evidence each initialisation's default (``Initialisation.frozen_bn``) is chosen by.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, get_args

import numpy as np

from medmeta.data.fetch import SOURCE_DIR_ENV
from medmeta.errors import ConfigError, MedmetaError
from medmeta.evaluation import Protocol, load_experiment_config
from medmeta.evaluation.config import ExperimentConfig, build_method
from medmeta.evaluation.metrics import paired_difference
from medmeta.evaluation.results import METRICS, write_csv
from medmeta.files import write_text_atomic
from medmeta.learning.finetune import BNMode
from medmeta.learning.runtime import configure_threads
from medmeta.settings import comma_list, nested

CONFIGS = Path(__file__).resolve().parent / "configs"
RULES = ("linear", "knn", "proto")
"""The frozen-feature rules (LP-FT's probe takes the same setting; its fine-tuning costs 40x more)."""
BASELINE: BNMode = "support"
FIELDS = ("target", "init", "rule", "bn", "episodes", "auroc", "auroc_ci95", "auroc_diff", "auroc_diff_ci95",
          "acc", "acc_ci95", "acc_diff", "acc_diff_ci95")


def mode_config(base: ExperimentConfig, target: str, mode: BNMode, inits: list[str]) -> ExperimentConfig:
    """One target's run with every frozen-feature rule set to ``mode`` (sources: trained inits only)."""
    a = base.adaptation
    config = base.replace(target=target, reference=None, methods=[f"{i}+{r}" for i in inits for r in RULES],
                          adaptation=a.replace(linear=a.linear.replace(bn=mode), knn=a.knn.replace(bn=mode),
                                               proto=a.proto.replace(bn=mode)))
    if mode == "sources":
        config = config.replace(methods=[m for m in config.methods if build_method(m, config).needs_sources])
    return config


def saved_results(folder: Path) -> dict[str, Any]:
    """A finished run's results.json (for ``--collect``); one line if there is none."""
    try:
        return json.loads((folder / "results.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--collect: no readable results.json in {folder} ({exc}); run without --collect") from None


def table(runs: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (target, init, rule, mode): AUROC, accuracy and the paired difference to ``support``."""
    rows = []
    for (target, mode), results in runs.items():
        baseline = runs[target, BASELINE]
        if results["episode_set"].get("digest") != baseline["episode_set"].get("digest"):
            raise ConfigError(f"{target}: the {mode} and {BASELINE} runs were scored on different episode sets; "
                              "run them into one --out folder with the same episode settings")
        for name, m in results["methods"].items():
            init, rule = name.split("+")
            base = {e["episode"]: e for e in baseline["methods"][name]["per_episode"]}
            pairs = [(e, base[e["episode"]]) for e in m["per_episode"]]  # by episode, never by position
            row: dict[str, Any] = {"target": target, "init": init, "rule": rule, "bn": mode,
                                   "episodes": m["summary"]["episodes"]}
            for metric in METRICS:
                row[metric], row[f"{metric}_ci95"] = m["summary"][metric], m["summary"][f"{metric}_ci95"]
                d = paired_difference([e[metric] for e, _ in pairs], [b[metric] for _, b in pairs])
                row[f"{metric}_diff"], row[f"{metric}_diff_ci95"] = d["mean"], d["ci95"]
            rows.append(row)
    return rows


def verdict(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per initialisation and mode: the mean paired AUROC difference to ``support`` over targets
    and rules, and how many cells lie significantly above or below zero."""
    out = []
    for init in dict.fromkeys(r["init"] for r in rows):
        for mode in dict.fromkeys(r["bn"] for r in rows if r["bn"] != BASELINE):
            cells = [r for r in rows if r["init"] == init and r["bn"] == mode]
            if cells:
                out.append({"init": init, "bn": mode, "cells": len(cells),
                            "mean_auroc_diff": float(np.mean([r["auroc_diff"] for r in cells])),
                            "above": sum(r["auroc_diff"] - r["auroc_diff_ci95"] > 0 for r in cells),
                            "below": sum(r["auroc_diff"] + r["auroc_diff_ci95"] < 0 for r in cells)})
    return out


def markdown(rows: list[dict[str, Any]], summary: list[dict[str, Any]]) -> str:
    """Targets x (init, rule) rows, one column per mode: AUROC [paired Δ to support], then the verdict."""
    modes = list(dict.fromkeys(r["bn"] for r in rows))
    by = {(r["target"], r["init"], r["rule"], r["bn"]): r for r in rows}
    lines = [f"| target | method | {' | '.join(modes)} |", f"| --- | --- |{' --- |' * len(modes)}"]
    for target, init, rule in dict.fromkeys((r["target"], r["init"], r["rule"]) for r in rows):
        cells = []
        for mode in modes:
            r = by.get((target, init, rule, mode))
            cells.append("-" if r is None else f"{r['auroc']:.3f}" if mode == BASELINE
                         else f"{r['auroc']:.3f} [{r['auroc_diff']:+.3f} ± {r['auroc_diff_ci95']:.3f}]")
        lines.append(f"| {target} | {init}+{rule} | {' | '.join(cells)} |")
    lines += ["", f"Mean paired AUROC difference to bn={BASELINE} over targets and rules (cells above / below zero "
                  "beyond their 95% interval):", "", "| initialisation | bn | cells | mean Δ AUROC | above | below |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {s['init']} | {s['bn']} | {s['cells']} | {s['mean_auroc_diff']:+.3f} | {s['above']} | {s['below']} |"
              for s in summary]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every (target, mode) and write the table; bad input is one line and exit status 2."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=comma_list, required=True, help="comma list of targets")
    parser.add_argument("--inits", type=comma_list, default=["scratch", "mmpt", "maml"],
                        help="initialisations (default scratch,mmpt,maml)")
    parser.add_argument("--modes", type=comma_list, default=list(get_args(BNMode)),
                        help=f"bn modes (default {','.join(get_args(BNMode))}; {BASELINE} is always run)")
    parser.add_argument("--sources", help="'default', 'available' or a comma list (as cdfsl.py)")
    parser.add_argument("--episodes", type=int, help="number of evaluation episodes")
    parser.add_argument("--config", help="YAML profile under experiments/configs/ or a path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    parser.add_argument("--out", default="runs/bn", help="output folder (default runs/bn)")
    parser.add_argument("--root", help="store folder (default $MEDMETA_ROOT or ~/.medmeta)")
    parser.add_argument("--source-dir", help=f"folder with official npz files (or ${SOURCE_DIR_ENV})")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: write the table from the runs' results.json files already in --out")
    args = parser.parse_args(argv)
    try:
        bad = [m for m in args.modes if m not in get_args(BNMode)]
        if bad:
            raise MedmetaError(f"--modes: unknown bn mode {bad[0]!r}; choose from {', '.join(get_args(BNMode))}")
        modes: list[BNMode] = list(dict.fromkeys([BASELINE, *args.modes]))
        configure_threads(args.threads)
        sources = args.sources if args.sources in (None, "default", "available") else comma_list(args.sources)
        overrides = nested({"sources": sources, "episodes.count": args.episodes})
        base = load_experiment_config(args.config, CONFIGS, overrides, args.set)
        out, source_dir = Path(args.out), args.source_dir or os.environ.get(SOURCE_DIR_ENV)
        if args.collect:
            runs = {(t, mode): saved_results(out / t / mode) for t in args.target for mode in modes}
        else:
            jobs = {(t, mode): Protocol(mode_config(base, t, mode, args.inits), out / t / mode, root=args.root,
                                       source_dir=source_dir, pretrained=out / "pretrained")
                    for t in args.target for mode in modes}  # every run checked before any work
    except MedmetaError as exc:
        print(f"bn_modes: error: {exc}", file=sys.stderr)
        sys.exit(2)
    if not args.collect:
        runs = {key: job.run() for key, job in jobs.items()}
    rows = table(runs)
    summary = verdict(rows)
    doc = {"command": "python experiments/bn_modes.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "config": base.to_dict(), "modes": modes, "rows": rows, "summary": summary,
           "runs": {f"{t}/{mode}": str(out / t / mode / "results.json") for t, mode in runs}}
    write_text_atomic(out / "table.json", json.dumps(doc, indent=2))
    write_csv(out / "table.csv", rows, FIELDS)
    text = markdown(rows, summary)
    write_text_atomic(out / "table.md", text + "\n")
    print(text)
    return doc


if __name__ == "__main__":
    main()
