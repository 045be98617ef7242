"""Supervised baselines (MedMNIST v2, MedMNIST+) on the subsets present, with the published figures beside ours.

    MEDMETA_SOURCE_DIR=../shared/data/medmnist python experiments/supervised.py --dataset breast
    MEDMETA_SOURCE_DIR=../shared/data/medmnist python experiments/supervised.py --dataset all --seeds 0,1,2

Per dataset and seed: end-to-end training, a linear probe and k-NN (k=11) on frozen features and
a scikit-learn model search on flattened pixels (2D); end-to-end 2.5D, 3D and ACS ResNets and
the pixel search (3D). Writes baselines.json, baselines.csv, baselines.md and per-run folders
(result, checkpoint, TensorBoard) under --out; rerunning reuses finished runs and resumes
training. Profiles: the defaults are MedMNIST v2's recipe; --config supervised_plus is MedMNIST+'s.
--arch takes any backbone (resnet18, alexnet, timm names such as vit_base_patch16_224.dino), several
at once (one table with an arch column); --init pretrained starts from its published weights.
--combine joins the tables of several such runs (other subsets, sizes or budgets) into one:

    python experiments/supervised.py --combine runs/supervised runs/supervised_3d --out runs/supervised_all
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import get_args

from medmeta.data.fetch import SOURCE_DIR_ENV
from medmeta.data.manifest import MANIFEST_ENV, load_manifest
from medmeta.errors import ConfigError, MedmetaError
from medmeta.evaluation.baselines import BaselineConfig, Baselines, Init, Resize, combine_folders
from medmeta.learning.runtime import configure_threads
from medmeta.settings import comma_list, load_settings, nested, seed_list

CONFIGS = Path(__file__).resolve().parent / "configs"


def main(argv: list[str] | None = None) -> dict | None:
    """Run the supervised baselines from the command line; bad input is one line and exit status 2."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=comma_list, help="subsets (comma list, short or full names) or 'all'")
    parser.add_argument("--seeds", type=seed_list, help="comma list of distinct seeds, e.g. 0,1,2")
    parser.add_argument("--schemes", type=comma_list, help="end2end, linear, knn, pixels (default: all)")
    parser.add_argument("--convs", type=comma_list, help="3D convolutions: 2.5d, 3d, acs (default: all)")
    parser.add_argument("--size", type=int, help="image size of the official files (28, 64, 128, 224)")
    parser.add_argument("--input-size", type=int, help="feed images to the network at this size (MedMNIST+: 224)")
    parser.add_argument("--resize", choices=get_args(Resize), help="how: zero-padding (MedMNIST+'s code) or bilinear")
    parser.add_argument("--epochs", type=int, help="training epochs (config key train.epochs)")
    parser.add_argument("--arch", type=comma_list, help="backbones (comma list): resnet18, resnet50, alexnet or timm "
                                                        "names; several: one table with an arch column (model.arch)")
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
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    parser.add_argument("--combine", nargs="+", metavar="DIR",
                        help="write one table (to --out) from the baselines.json of these earlier --out folders")
    args = parser.parse_args(argv)
    overrides = nested({"datasets": args.dataset, "seeds": args.seeds, "schemes": args.schemes, "convs": args.convs,
                        "size": args.size, "input_size": args.input_size, "resize": args.resize,
                        "train.epochs": args.epochs, "model.weights": args.weights, "device": args.device,
                        "init": args.init})
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
        archs = args.arch or [None]
        if args.weights and len(archs) > 1:
            raise ConfigError("--weights is one architecture's file: give one --arch with it")
        out = Path(args.out or "runs/supervised")
        runs = []  # one Baselines per architecture, each checked before any runs
        for i, arch in enumerate(archs):
            sets = [*args.set, *([f"model.arch={arch}"] if arch else [])]
            config = load_settings(BaselineConfig, args.config, CONFIGS, overrides, sets)
            if i > 0:  # the pixel search uses no network: it runs once, with the first architecture
                config = config.replace(schemes=[s for s in config.schemes if s != "pixels"])
                if not config.schemes:
                    continue
            runs.append(Baselines(config, out / arch if len(archs) > 1 else out, root=args.root,
                                  source_dir=args.source_dir or os.environ.get(SOURCE_DIR_ENV),
                                  manifest=load_manifest([*(args.manifest or []), *(args.medimeta or [])]),
                                  published=CONFIGS / "published_baselines.yaml"))
        if warning:
            print(warning, file=sys.stderr)
        results = [b.run() for b in runs]
        if len(runs) == 1:
            return results[0]
        return combine_folders([b.out for b in runs], out, CONFIGS / "published_baselines.yaml")
    except MedmetaError as exc:
        print(f"supervised: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
