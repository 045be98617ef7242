"""Supervised baseline on one MedMNIST subset with the MedMNIST v2 recipe.

    MEDMETA_SOURCE_DIR=../shared/data/medmnist python experiments/supervised.py --dataset breast

Adam lr 1e-3, lr x0.1 at 50% and 75% of the epochs, batch 128, the epoch with the best
validation AUROC is kept and scored on the test split. Writes ``results.json`` (config,
seed, history, test AUROC/ACC, versions) and TensorBoard logs under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from medmeta.data import MedMNISTTask, Store
from medmeta.errors import MedmetaError
from medmeta.evaluation.results import package_versions
from medmeta.files import write_text_atomic
from medmeta.learning.models import Classifier, build_backbone
from medmeta.learning.runtime import evaluate_split, resolve_device
from medmeta.learning.supervised import SupervisedConfig, train_supervised
from medmeta.settings import apply_sets, merge, read_profile

CONFIGS = Path(__file__).resolve().parent / "configs"


def main(argv: list[str] | None = None) -> dict:
    try:
        return run(argv)
    except MedmetaError as exc:
        print(f"supervised: error: {exc}", file=sys.stderr)
        sys.exit(2)


def run(argv: list[str] | None = None) -> dict:
    """Parse arguments, train, score the test split and write results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="subset (short or full name), e.g. breast, retina")
    parser.add_argument("--config", default="supervised", help="YAML file or name under experiments/configs/")
    parser.add_argument("--epochs", type=int, help="override the config's epochs")
    parser.add_argument("--size", type=int, help="image size (default 28)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--root", help="store folder (default $MEDMETA_ROOT or ~/.medmeta)")
    parser.add_argument("--source-dir", help="folder with official npz files (or $MEDMETA_SOURCE_DIR)")
    parser.add_argument("--out", help="output folder (default runs/supervised/<dataset>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in {"epochs": args.epochs, "size": args.size, "seed": args.seed}.items() if v is not None}
    cfg = apply_sets(merge(read_profile(args.config, CONFIGS), overrides), args.set)

    store = Store(args.root)
    subset = store.manifest.resolve(args.dataset)
    store.build(subset, cfg["size"], source_dir=args.source_dir)
    train, val, test = (MedMNISTTask(store, subset, split, size=cfg["size"]) for split in ("train", "val", "test"))
    device = resolve_device(args.device)
    out = Path(args.out or f"runs/supervised/{store.manifest[subset].short_name}")
    out.mkdir(parents=True, exist_ok=True)

    backbone = build_backbone(cfg["arch"], dims=train.task.dims, stem=cfg["stem"])
    model = Classifier(backbone, train.task.num_outputs)
    recipe = SupervisedConfig(epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"],
                              milestones=tuple(cfg["milestones"]), seed=cfg["seed"])
    start = time.perf_counter()
    with SummaryWriter(out / "tensorboard") as writer:
        best = train_supervised(model, train, val, recipe, device, writer)
    test_scores = evaluate_split(model, model, test, device)
    results = {"dataset": subset, "size": cfg["size"], "config": cfg, "recipe": asdict(recipe),
               "seed": cfg["seed"], "device": str(device), "best_epoch": best["epoch"],
               "val_auroc": best["val_auroc"], "val_acc": best["val_acc"],
               "test_auroc": test_scores["auroc"], "test_acc": test_scores["acc"],
               "seconds": time.perf_counter() - start, "history": best["history"], "versions": package_versions()}
    write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    print(f"{subset} {cfg['size']}px {cfg['arch']} ({cfg['stem']} stem), best epoch {best['epoch']}: "
          f"test AUROC {test_scores['auroc']:.3f}  ACC {test_scores['acc']:.3f}  ({results['seconds']:.0f} s) -> {out}")
    return results


if __name__ == "__main__":
    main()
