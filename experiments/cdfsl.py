"""Leave-one-out cross-domain few-shot experiment on MedMNIST.

    MEDMETA_SOURCE_DIR=../shared/data/medmnist python experiments/cdfsl.py --target retina --sources available

Pretrains on every allowed source subset (all except the target and its exclusion groups),
adapts each method to the same stored 5-shot episodes of the target, and writes
results.json, results.csv, summary.csv, results.png and TensorBoard logs under --out.
Methods: built-in names (scratch, imagenet, checkpoint, mmpt, maml), init+rule pairs
(mmpt+linear, scratch+knn, ...) or package.module:ClassName for your own.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from medmeta.data.fetch import SOURCE_DIR_ENV
from medmeta.data.manifest import MANIFEST_ENV, load_manifest
from medmeta.errors import MedmetaError
from medmeta.evaluation import load_experiment_config, run_protocol
from medmeta.settings import set_dotted

CONFIGS = Path(__file__).resolve().parent / "configs"


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="target subset, short or full name (retina, breast, nodule3d, ...)")
    parser.add_argument("--methods", type=_list, help="comma-separated methods (see above)")
    parser.add_argument("--reference", help="method the paired differences are taken against (default scratch)")
    parser.add_argument("--sources", help="'default' (all allowed), 'available' (allowed and local) or a comma list")
    parser.add_argument("--shots", type=int, help="support images per class")
    parser.add_argument("--episodes", type=int, help="number of evaluation episodes")
    parser.add_argument("--episodes-file", help="a stored episode set to evaluate on (its settings are used)")
    parser.add_argument("--size", type=int, help="image size (28, 64, 128, 224)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--weights", help="local ImageNet weights file for the imagenet initialisation")
    parser.add_argument("--checkpoint", help="a backbone state dict for the checkpoint initialisation")
    parser.add_argument("--config", help="YAML profile: a path or a name under experiments/configs/ (paper, smoke)")
    parser.add_argument("--device", help="auto, cpu or cuda")
    parser.add_argument("--out", help="output folder (default runs/cdfsl/<target>)")
    parser.add_argument("--root", help="store folder (default $MEDMETA_ROOT or ~/.medmeta)")
    parser.add_argument("--source-dir", help=f"folder with official npz files (or ${SOURCE_DIR_ENV})")
    parser.add_argument("--manifest", action="append", help=f"a manifest of your own datasets (repeatable; or ${MANIFEST_ENV})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set pretrain.steps=500")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return parser.parse_args(argv)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line flags as a nested config mapping (flags left out change nothing)."""
    sources = args.sources if args.sources in (None, "default", "available") else _list(args.sources)
    flat = {"target": args.target, "methods": args.methods, "reference": args.reference, "sources": sources,
            "episodes.shots": args.shots, "episodes.count": args.episodes, "episodes.file": args.episodes_file,
            "size": args.size, "seed": args.seed, "model.imagenet_weights": args.weights,
            "checkpoint": args.checkpoint, "device": args.device}
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if value is not None:
            set_dotted(out, key, value)
    return out


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    try:
        config = load_experiment_config(args.config, CONFIGS, overrides(args), args.set)
        if args.print_config:
            print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
            return None
        manifest = load_manifest(args.manifest)
        out = Path(args.out or f"runs/cdfsl/{manifest[config.target].short_name}")
        return run_protocol(config, out, root=args.root, manifest=manifest,
                            source_dir=args.source_dir or os.environ.get(SOURCE_DIR_ENV))
    except MedmetaError as exc:
        print(f"cdfsl: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
