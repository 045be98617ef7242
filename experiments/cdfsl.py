"""Leave-one-out cross-domain few-shot experiment on MedMNIST: one target, or the whole table.

    MEDMETA_SOURCE_DIR=../shared/data/medmnist python experiments/cdfsl.py --target retina --sources available
    MEDMETA_SOURCE_DIR=../shared/data/medmnist python experiments/cdfsl.py --target all --sources available
    python experiments/cdfsl.py --medimeta DIR --target dr_regular:dr_level --sources available

Pretrains on every allowed source subset (all except the target and its exclusion groups),
adapts each method to the same stored 5-shot episodes of the target, and writes
results.json, results.csv, summary.csv, results.png and TensorBoard logs under --out. With
several targets (--target all, or a comma list) or seeds, one job per (target, seed) runs here
(--launcher local) or on SLURM (--launcher slurm) and table.{json,csv,md,png} combines them.
Methods: built-in names (scratch, pretrained, imagenet, checkpoint, mmpt, maml), init+rule pairs
(mmpt+linear, scratch+knn, ...) or package.module:ClassName for your own. With --medimeta DIR,
MedIMeta's tasks (DATASET:TASK) are targets and sources too; a target's whole dataset is left out.
--shots 1,5,10 runs a few-shot curve: each count on its own episode set, pretraining shared, and
curve.{json,csv,md,png} (AUROC against shots) in --out.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from medmeta import distributed
from medmeta.data.fetch import SOURCE_DIR_ENV
from medmeta.data.manifest import MANIFEST_ENV, load_manifest
from medmeta.errors import ConfigError, MedmetaError
from medmeta.evaluation import Protocol, launch, load_experiment_config
from medmeta.evaluation.config import methods_help
from medmeta.evaluation.curves import Curve
from medmeta.evaluation.sweep import Sweep
from medmeta.learning.runtime import configure_threads
from medmeta.settings import comma_list, nested, seed_list, shot_list

CONFIGS = Path(__file__).resolve().parent / "configs"
DEBUG_ENV = "MEDMETA_DEBUG"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (flags left out leave the config unchanged)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="target subset (retina, breast, nodule3d, ...; with --medimeta, "
                                         "DATASET:TASK), a comma list, or 'all' (every subset present)")
    parser.add_argument("--seeds", type=seed_list,
                        help="comma list of seeds (pretraining, heads): one run per seed, mean and sd across seeds")
    launch.add_arguments(parser, "jobs of a sweep (one per target and seed)")
    parser.add_argument("--methods", type=comma_list, help=methods_help())
    parser.add_argument("--reference", help="the method paired differences are taken against, one of --methods "
                                            "(default: the first; config key reference)")
    parser.add_argument("--sources", help="'default' (all allowed), 'available' (allowed and local) or a comma list")
    parser.add_argument("--shots", type=shot_list, help="support images per class; several (1,5,10): a few-shot "
                                                         "curve, each count on its own episodes, pretraining shared")
    parser.add_argument("--episodes", type=int, help="number of evaluation episodes")
    parser.add_argument("--episodes-file", help="a stored episode set to evaluate on (its settings are used)")
    parser.add_argument("--size", type=int, help="image size (28, 64, 128, 224)")
    parser.add_argument("--seed", type=int, help="seed of a single run (pretraining, heads; the episodes have their own)")
    parser.add_argument("--weights", help="a local weights file for the pretrained initialisation (any --set "
                                          "model.arch: timm or torchvision state dict, .pth or .safetensors)")
    parser.add_argument("--checkpoint", help="a backbone state dict for the checkpoint initialisation")
    parser.add_argument("--config", help="YAML profile: a path or a name under experiments/configs/ (paper, smoke)")
    parser.add_argument("--device", help="auto, cpu or cuda")
    parser.add_argument("--out", help="output folder (default runs/cdfsl/<target>)")
    parser.add_argument("--root", help="store folder (default $MEDMETA_ROOT or ~/.medmeta)")
    parser.add_argument("--source-dir", help=f"folder with official npz files (or ${SOURCE_DIR_ENV})")
    parser.add_argument("--manifest", action="append", help=f"a manifest of your own datasets (repeatable; or ${MANIFEST_ENV})")
    parser.add_argument("--medimeta", action="append", metavar="DIR",
                        help="a MedIMeta data path (the folder holding its dataset folders): its tasks are targets "
                             "and sources as DATASET:TASK (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set pretrain.steps=500")
    parser.add_argument("--threads", type=int, help="torch CPU threads of this run (default: torch's, one per core); "
                                                    "give runs sharing a machine one each")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--debug", action="store_true", default=os.environ.get(DEBUG_ENV, "") not in ("", "0"),
                        help=f"show the traceback of an error (e.g. raised in your own method) instead of one line "
                             f"(or ${DEBUG_ENV}=1)")
    return parser.parse_args(argv)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line flags as a nested config mapping (flags left out change nothing)."""
    sources = args.sources if args.sources in (None, "default", "available") else comma_list(args.sources)
    one_target = args.target if args.target and "," not in args.target and args.target != "all" else None
    return nested({"target": one_target, "methods": args.methods, "reference": args.reference, "sources": sources,
                   "episodes.shots": args.shots[0] if args.shots else None, "episodes.count": args.episodes, "episodes.file": args.episodes_file,
                   "size": args.size, "seed": args.seed, "model.weights": args.weights,
                   "checkpoint": args.checkpoint, "device": args.device, **launch.overrides(args)})


def main(argv: list[str] | None = None) -> dict | None:
    """Run one target, or a sweep over several, from the command line; bad input is one line and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if launch.relaunched(args, __file__, argv):
        return None
    try:
        warning = configure_threads(args.threads)
        config = load_experiment_config(args.config, CONFIGS, overrides(args), args.set)
        if args.print_config:
            if distributed.is_main():
                print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
            return None
        manifests = [*(args.manifest or []), *(args.medimeta or [])]
        manifest = load_manifest(manifests)
        source_dir = args.source_dir or os.environ.get(SOURCE_DIR_ENV)
        targets = comma_list(args.target) if args.target else [config.target]
        single = targets == [config.target] and not args.seeds and args.launcher == "local"
        curve = len(args.shots or []) > 1
        if curve and not single:
            raise ConfigError("--shots with several counts runs one target and one seed here (--launcher local); run "
                              "each target or seed as its own command")
        job: Protocol | Sweep | Curve
        if single:
            out = Path(args.out or f"runs/cdfsl/{manifest[config.target].short_name}")
            job = (Curve(config, args.shots, out, root=args.root, source_dir=source_dir, manifest=manifest) if curve
                   else Protocol(config, out, root=args.root, manifest=manifest, source_dir=source_dir))
        else:
            job = Sweep(config, targets, args.seeds or [config.seed], Path(args.out or "runs/cdfsl/sweep"),
                        root=args.root, source_dir=source_dir, manifests=tuple(manifests))
        if warning and distributed.is_main():  # every input is valid: the work starts now
            print(warning, file=sys.stderr)
        return job.run(args.launcher, wait=not args.no_wait) if isinstance(job, Sweep) else job.run()
    except MedmetaError as exc:
        if args.debug:
            raise
        print(f"cdfsl: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
