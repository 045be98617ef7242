"""The whole leave-one-out benchmark: many targets and seeds, one combined table.

A sweep is one job per (target, seed), each a ``Protocol`` run in ``out/<target>/seed<k>/``
with its own leave-one-out sources; every job shares ``out/pretrained/``, so pretraining runs
with identical sources, settings and seed train once (a lock on each training folder makes
concurrent jobs take turns). Nothing finished is redone: a job whose results were written
under the same config is skipped, and inside a job finished methods and training checkpoints
are reused.

Launchers (``launch``), all through existing engines: ``local`` runs the jobs one after another
in this process (under torchrun, every rank takes part in each job); ``slurm`` submits them with
submitit (one job per (target, seed), one process per GPU within a job via submitit's
torch.distributed environment), waits for them or returns (``wait=False``), and the same command
later collects the table; ``submitit-local`` is submitit's local executor (real subprocesses on
this machine), for checking a SLURM setup.

The combined table (``table.json``, ``table.csv``, ``table.md``, ``table.png``): per target
and method, AUROC and accuracy (mean over episodes, its 95% interval), the paired
per-episode difference to the reference method with its interval, and with several seeds the
mean over seeds plus the standard deviation across seeds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import distributed
from ..data.manifest import Manifest, load_manifest
from ..data.store import Store
from ..errors import ConfigError, MethodError
from ..files import read_cache, write_text_atomic
from ..settings import from_mapping, repeated
from .config import ExperimentConfig, build_method, resolve_reference
from .launch import Launcher, launch
from .protocol import Protocol, input_files
from .plots import save, sweep_figure
from .results import METRICS, package_versions, write_csv

@dataclass(frozen=True)
class Job:
    """One (target, seed) run of a sweep."""

    target: str
    seed: int
    out: Path

    @property
    def name(self) -> str:
        return f"{self.target}/seed{self.seed}"


def present_targets(store: Store, size: int, source_dir: str | None) -> list[str]:
    """Subsets whose data is here at ``size``: built in the store, in ``source_dir`` or next to their manifest."""
    return [name for name in store.manifest.subsets if store.present(name, size, source_dir)]


def resolve_targets(targets: str | Sequence[str], manifest: Manifest, store: Store, size: int,
                    source_dir: str | None) -> list[str]:
    """``all`` (every subset present) or a list of names, as full subset names."""
    if targets == "all" or list(targets) == ["all"]:
        found = present_targets(store, size, source_dir)
        if not found:
            raise ConfigError(f"--target all: no subset is present at {size}px in the store or --source-dir; "
                              "prepare some with `medmeta prepare` or pass --source-dir")
        return found
    return [manifest.resolve(t) for t in ([targets] if isinstance(targets, str) else targets)]


def methods_for(config: ExperimentConfig, dims: int) -> list[str]:
    """The config's methods that apply to a target of ``dims`` (ImageNet weights are 2D only)."""
    return [m for m in config.methods if dims in build_method(m, config).init.dims]


def job_config(config: ExperimentConfig, target: str, seed: int, dims: int) -> ExperimentConfig:
    """The config of one (target, seed) job: the methods that apply to the target's
    dimensionality, and the reference among them (the sweep's, or the job's first method where
    the sweep's does not apply: each row of the table names the reference it was paired with)."""
    reference = resolve_reference(config.reference, config.methods)
    methods = methods_for(config, dims)
    if not methods:
        raise MethodError(f"none of the methods {config.methods} applies to {target} ({dims}D)")
    return config.replace(target=target, seed=seed, methods=methods,
                          reference=reference if reference in methods else methods[0])


def job_done(job: Job, config: ExperimentConfig) -> bool:
    """Whether the job's results were written under this very config and with these very files
    (weights, checkpoint, episode set: by content; any change reruns the job, which reuses
    whatever of it is still valid)."""
    results = read_cache(job.out / "results.json", "the job is run again (what it finished is reused)")
    if not isinstance(results, dict):
        return False
    return (results.get("config") == config.to_dict() and results.get("inputs") == input_files(config)
            and set(config.methods) <= set(results.get("methods", {})))


def run_job(config: dict[str, Any], out: str, pretrained: str, root: str | None, source_dir: str | None,
            manifests: list[str]) -> str:
    """One (target, seed) run; the entry point of every launcher (plain arguments: it is pickled
    for submitit). Under SLURM with several tasks, each task is one torch.distributed rank."""
    import os

    if int(os.environ.get("SUBMITIT_NTASKS", os.environ.get("SLURM_NTASKS", "1"))) > 1:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    Protocol(from_mapping(ExperimentConfig, config), Path(out), root=root, source_dir=source_dir,
             manifest=load_manifest(manifests), pretrained=Path(pretrained)).run()
    return out


@dataclass
class Sweep:
    """Targets x seeds of one experiment config, written under ``out``."""

    config: ExperimentConfig
    targets: list[str]
    seeds: list[int]
    out: Path
    root: str | None = None
    source_dir: str | None = None
    manifests: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        twice = repeated(self.seeds)
        if twice is not None or not self.seeds:
            raise ConfigError(f"seeds {self.seeds}: give distinct seeds" + (f" ({twice} is given twice)" if self.seeds else ""))
        self.manifest = load_manifest(list(self.manifests))
        self.store = Store(self.root, self.manifest)
        self.targets = resolve_targets(self.targets, self.manifest, self.store, self.config.size, self.source_dir)
        self.jobs = [Job(t, s, self.out / self.manifest[t].short_name / f"seed{s}")
                     for t in self.targets for s in self.seeds]
        self.configs = {job: job_config(self.config, job.target, job.seed, self.manifest[job.target].dims)
                        for job in self.jobs}
        for job in self.jobs[::len(self.seeds)]:  # refuse a target without sources, a bad method... before any work
            Protocol(self.configs[job], job.out, root=self.root, source_dir=self.source_dir, manifest=self.manifest,
                     check_only=True)

    def arguments(self, job: Job) -> tuple:
        """``run_job``'s arguments for ``job`` (plain values: they travel to submitit's processes)."""
        return (self.configs[job].to_dict(), str(job.out), str(self.out / "pretrained"), self.root, self.source_dir,
                list(self.manifests))

    def pending(self) -> list[Job]:
        """The jobs whose results were not yet written under their current config."""
        return [j for j in self.jobs if not job_done(j, self.configs[j])]

    def run(self, launcher: Launcher = "local", wait: bool = True) -> dict[str, Any] | None:
        """Run (or submit) every unfinished job, then collect the table; None if not waited for."""
        todo = [(job.name, self.arguments(job)) for job in self.pending()]
        if not launch(todo, run_job, self.out, self.config.slurm, launcher, wait, len(self.jobs), "sweep"):
            return None
        return self.collect()

    def collect(self) -> dict[str, Any] | None:
        """Read every job's results and write the combined table (rank 0 under torchrun; others get None)."""
        if not distributed.is_main():
            return None
        runs = {job: json.loads((job.out / "results.json").read_text()) for job in self.jobs}
        table = combine(runs)
        combined = {"targets": self.targets, "seeds": self.seeds, "reference": reference_label(table),
                    "shots": self.config.episodes.shots,
                    "config": self.config.to_dict(), "versions": package_versions(), "table": table,
                    "runs": {job.name: str(job.out / "results.json") for job in self.jobs}}
        write_table(self.out, combined)
        print(format_combined(combined))
        return combined


def combine(runs: dict[Job, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (target, method): means over seeds of each seed's summary, and the spread across seeds."""
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for job, results in runs.items():
        for method, m in results["methods"].items():
            rows.setdefault((job.target, method), []).append({**m, "reference": results["reference"]})
    out = []
    for (target, method), ms in rows.items():
        row: dict[str, Any] = {"target": target, "method": method, "seeds": len(ms),
                               "episodes": ms[0]["summary"]["episodes"],
                               "train_seconds": float(np.mean([m["seconds"]["train"] for m in ms])),
                               "adapt_seconds": float(np.mean([m["seconds"]["adapt"] for m in ms]))}
        for metric in METRICS:
            values = [m["summary"][metric] for m in ms]
            row[metric] = float(np.mean(values))
            row[f"{metric}_ci95"] = float(np.mean([m["summary"][f"{metric}_ci95"] for m in ms]))
            row[f"{metric}_seed_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
            paired = [m["paired"][metric] for m in ms if "paired" in m]
            if paired:
                row[f"{metric}_diff"] = float(np.mean([p["mean"] for p in paired]))
                row[f"{metric}_diff_ci95"] = float(np.mean([p["ci95"] for p in paired]))
                row[f"{metric}_identical"] = all(p["identical"] for p in paired)
        row["reference"] = ms[0]["reference"]
        row["transductive"] = any(m.get("transductive") for m in ms)
        out.append(row)
    return out


def reference_label(table: Sequence[dict[str, Any]]) -> str:
    """The reference the rows were paired with, as the table's heading names it: one method, or
    each target's where they differ (a 2D-only reference in a sweep with 3D targets)."""
    by_reference: dict[str, list[str]] = {}
    for row in table:
        targets = by_reference.setdefault(row["reference"], [])
        if row["target"] not in targets:
            targets.append(row["target"])
    if len(by_reference) == 1:
        return next(iter(by_reference))
    return "; ".join(f"{ref} ({', '.join(targets)})" for ref, targets in by_reference.items())


TABLE_FIELDS = ("target", "method", "seeds", "episodes", "auroc", "auroc_ci95", "auroc_seed_std", "auroc_diff",
                "auroc_diff_ci95", "auroc_identical", "acc", "acc_ci95", "acc_seed_std", "acc_diff", "acc_diff_ci95",
                "acc_identical", "reference", "transductive", "train_seconds", "adapt_seconds")


def _cell(row: dict[str, Any], metric: str) -> str:
    text = f"{row[metric]:.3f} ± {row[f'{metric}_ci95']:.3f}"
    if row.get(f"{metric}_seed_std") is not None:
        text += f" (sd {row[f'{metric}_seed_std']:.3f})"
    if f"{metric}_diff" in row:
        diff = "identical" if row[f"{metric}_identical"] else f"{row[f'{metric}_diff']:+.3f} ± {row[f'{metric}_diff_ci95']:.3f}"
        text += f" [Δ {diff}]"
    return text


def markdown(combined: dict[str, Any], metric: str) -> str:
    """A targets x methods markdown table of ``metric`` (mean ± interval, paired difference, sd across seeds)."""
    rows = combined["table"]
    targets = list(dict.fromkeys(r["target"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    transductive = {r["method"] for r in rows if r.get("transductive")}
    cells = {(r["target"], r["method"]): _cell(r, metric) for r in rows}
    heads = [f"{m}*" if m in transductive else m for m in methods]
    lines = [f"| target | {' | '.join(heads)} |", f"| --- |{' --- |' * len(methods)}"]
    for t in targets:
        lines.append(f"| {t} | {' | '.join(cells.get((t, m), '-') for m in methods)} |")
    return "\n".join(lines)


def format_combined(combined: dict[str, Any]) -> str:
    """The combined AUROC and accuracy tables, with a heading saying what the numbers are."""
    seeds = combined["seeds"]
    head = (f"query {{}} (mean ± 95% interval over episodes{', sd across seeds ' + str(seeds) if len(seeds) > 1 else ''}; "
            f"[Δ paired difference to {combined['reference']}])")
    note = ("\n\n* transductive: a query image's score depends on the other query images"
            if any(r.get("transductive") for r in combined["table"]) else "")
    return "\n\n".join(f"{head.format(m.upper())}\n{markdown(combined, m)}" for m in ("auroc", "acc")) + note


def write_table(out: Path, combined: dict[str, Any]) -> None:
    """``table.json``, ``table.csv``, ``table.md`` and ``table.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "table.json", json.dumps(combined, indent=2, default=str))
    write_csv(out / "table.csv", combined["table"], TABLE_FIELDS)
    write_text_atomic(out / "table.md", format_combined(combined) + "\n")
    plot_table(out / "table.png", combined)


def plot_table(path: Path, combined: dict[str, Any]) -> Path:
    """One panel per target of each method's paired AUROC difference (``plots.sweep_figure``)."""
    return save(sweep_figure(combined), path)
