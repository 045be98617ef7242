"""Supervised baselines (MedMNIST v2, MedMNIST+) on the subsets present, with the published figures beside ours.

    MEDMETA_SOURCE_DIR=../shared/data/medmnist python experiments/supervised.py --dataset breast
    MEDMETA_SOURCE_DIR=../shared/data/medmnist python experiments/supervised.py --dataset all --seeds 0,1,2
    python experiments/supervised.py --config medmnist_plus --launcher slurm     # MedMNIST+'s whole grid

A grid: datasets x sizes (--size 28,64) x architectures (--arch resnet18,vgg16,...) x schemes x
seeds, one job per cell, run here (split across processes with --nproc), or on SLURM through
submitit (--launcher slurm); a rerun redoes nothing finished. Schemes: end-to-end training, a
linear probe and k-NN (k=11) on frozen features (one feature cache per backbone) and a
scikit-learn model search on flattened pixels (2D); end-to-end 2.5D, 3D and ACS ResNets and the
pixel search (3D). Writes baselines.{json,csv,md} (with each cell's wall time, images/s, peak
memory and parameters), with several sizes, schemes or architectures the grid's averages,
resolution transitions, Friedman/Wilcoxon tests and figure (grid.*), and per-cell folders
(result, checkpoint, TensorBoard) under --out. Profiles: the defaults are MedMNIST v2's recipe;
--config supervised_plus is MedMNIST+'s recipe, --config medmnist_plus its whole grid (ten
architectures, four sizes, its three seeds). --init pretrained starts from published weights.
--combine joins the tables of several such runs into one:

    python experiments/supervised.py --combine runs/supervised runs/supervised_3d --out runs/supervised_all
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import get_args

from medmeta import distributed
from medmeta.data.fetch import SOURCE_DIR_ENV
from medmeta.data.manifest import MANIFEST_ENV, load_manifest
from medmeta.errors import MedmetaError
from medmeta.evaluation import launch
from medmeta.evaluation.baselines import BaselineConfig, Baselines, Init, Resize, combine_folders
from medmeta.learning.runtime import configure_threads
from medmeta.settings import comma_list, load_settings, nested, seed_list, size_list

CONFIGS = Path(__file__).resolve().parent / "configs"


def main(argv: list[str] | None = None) -> dict | None:
    """Run the supervised baselines from the command line; bad input is one line and exit status 2."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=comma_list, help="subsets (comma list, short or full names) or 'all'")
    parser.add_argument("--seeds", type=seed_list, help="comma list of distinct seeds, e.g. 0,1,2")
    parser.add_argument("--schemes", type=comma_list, help="end2end, linear, knn, pixels (default: all)")
    parser.add_argument("--convs", type=comma_list, help="3D convolutions: 2.5d, 3d, acs (default: all)")
    parser.add_argument("--size", type=size_list, help="image sizes of the official files (comma list of 28, 64, 128, "
                                                       "224); with several, a dataset's size not here is skipped")
    parser.add_argument("--input-size", type=int, help="feed images to the network at this size (MedMNIST+: 224)")
    parser.add_argument("--resize", choices=get_args(Resize), help="how: zero-padding (MedMNIST+'s code) or bilinear")
    parser.add_argument("--epochs", type=int, help="training epochs (config key train.epochs)")
    parser.add_argument("--arch", type=comma_list, help="backbones (comma list): resnet18, resnet50, alexnet or timm "
                                                        "names (config key archs)")
    parser.add_argument("--init", choices=get_args(Init), help="scratch (random; MedMNIST v2) or pretrained (the "
                                                              "architecture's published weights; MedMNIST+)")
    parser.add_argument("--weights", help="a local weights file for --init pretrained (one --arch)")
    parser.add_argument("--config", help="YAML profile: a path or a name under experiments/configs/ (supervised_plus)")
    parser.add_argument("--device", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, help="torch CPU threads of this run")
    parser.add_argument("--root", help="store folder (default $MEDMETA_ROOT or ~/.medmeta)")
    parser.add_argument("--source-dir", help=f"folder with official npz files (or ${SOURCE_DIR_ENV})")
    parser.add_argument("--manifest", action="append", help=f"a manifest of your own datasets (or ${MANIFEST_ENV})")
    parser.add_argument("--medimeta", action="append", metavar="DIR",
                        help="a MedIMeta data path (the folder holding its dataset folders): its tasks are datasets "
                             "here as DATASET:TASK (repeatable)")
    parser.add_argument("--out", help="output folder (default runs/supervised)")
    launch.add_arguments(parser, "cells (one job each; under --nproc each process runs its share)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    parser.add_argument("--combine", nargs="+", metavar="DIR",
                        help="write one table (to --out) from the baselines.json of these earlier --out folders")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if launch.relaunched(args, __file__, argv):
        return None
    overrides = nested({"datasets": args.dataset, "seeds": args.seeds, "schemes": args.schemes, "convs": args.convs,
                        "sizes": args.size, "archs": args.arch, "input_size": args.input_size, "resize": args.resize,
                        "train.epochs": args.epochs, "model.weights": args.weights, "device": args.device,
                        "init": args.init, **launch.overrides(args)})
    if args.combine:
        if args.out is None:
            parser.error("--combine needs --out, the folder of the combined table")
        if args.set or args.config or args.threads or overrides:
            parser.error("--combine only reads earlier runs' tables: give it no run settings")
        try:
            return combine_folders([Path(f) for f in args.combine], Path(args.out), CONFIGS / "published_baselines.yaml")
        except MedmetaError as exc:
            print(f"supervised: error: {exc}", file=sys.stderr)
            sys.exit(2)
    try:
        warning = configure_threads(args.threads)
        config = load_settings(BaselineConfig, args.config, CONFIGS, overrides, args.set)
        baselines = Baselines(config, Path(args.out or "runs/supervised"), root=args.root,
                              source_dir=args.source_dir or os.environ.get(SOURCE_DIR_ENV),
                              manifest=load_manifest([*(args.manifest or []), *(args.medimeta or [])]),
                              published=CONFIGS / "published_baselines.yaml")
        if warning and distributed.is_main():  # every input is valid: the work starts now
            print(warning, file=sys.stderr)
        return baselines.run(args.launcher, wait=not args.no_wait)
    except MedmetaError as exc:
        print(f"supervised: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
