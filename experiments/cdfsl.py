"""Leave-one-out cross-domain few-shot experiment on MedMNIST.

    MEDMETA_SOURCE_DIR=../shared/data/medmnist python experiments/cdfsl.py --target retina --sources available

Pretrains on every allowed source subset (all except the target and its exclusion groups),
adapts each method to the same stored 5-shot episodes of the target, and writes
results.json, results.csv, results.png and TensorBoard logs under --out.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from medmeta.cli import USER_ERRORS
from medmeta.config import load_config
from medmeta.fetch import SOURCE_DIR_ENV
from medmeta.protocol import run_protocol

CONFIGS = Path(__file__).resolve().parent / "configs"


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="target subset, short or full name (retina, breast, nodule3d, ...)")
    parser.add_argument("--methods", type=_list, help="comma-separated: scratch, imagenet, mmpt, maml")
    parser.add_argument("--sources", help="'default' (all allowed), 'available' (allowed and local) or a comma list")
    parser.add_argument("--shots", type=int, help="support images per class")
    parser.add_argument("--episodes", type=int, help="number of evaluation episodes")
    parser.add_argument("--episodes-file", help="a stored episode set to evaluate on (must match the target)")
    parser.add_argument("--size", type=int, help="image size (28, 64, 128, 224)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--weights", help="local ImageNet weights file for the imagenet method")
    parser.add_argument("--config", default="default", help="YAML path or name under experiments/configs/ (default, paper)")
    parser.add_argument("--device", help="auto, cpu or cuda")
    parser.add_argument("--out", help="output folder (default runs/cdfsl/<target>)")
    parser.add_argument("--root", help="store folder (default $MEDMETA_ROOT or ~/.medmeta)")
    parser.add_argument("--source-dir", help=f"folder with official npz files (or ${SOURCE_DIR_ENV})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set pretrain.steps=500")
    args = parser.parse_args(argv)
    sources = args.sources if args.sources in (None, "default", "available") else _list(args.sources)
    overrides = {"target": args.target, "methods": args.methods, "sources": sources, "episodes.shots": args.shots,
                 "episodes.count": args.episodes, "episodes.file": args.episodes_file, "size": args.size,
                 "seed": args.seed, "model.weights": args.weights, "device": args.device}
    try:
        cfg = load_config(args.config, CONFIGS, {k: v for k, v in overrides.items() if v is not None}, args.set)
        out = Path(args.out or f"runs/cdfsl/{cfg['target']}")
        return run_protocol(cfg, out, root=args.root, source_dir=args.source_dir or os.environ.get(SOURCE_DIR_ENV))
    except (*USER_ERRORS, RuntimeError) as exc:  # RuntimeError: ImageNet weights unavailable
        print(f"cdfsl: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
