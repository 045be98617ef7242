"""Backbone benchmark: images/s of feature extraction and of a training step for each backbone
(MedMNIST+'s ten by default) on 28px images padded to the model's input, ours against a plain
timm (or torchvision) loop in the same process, and the feature cache's hit against recomputing.

"Ours" is ``medmeta.learning.models.build_backbone(arch)`` (the normalisation and padding inside
``forward``); "plain" is what a user would write: ``timm.create_model(arch, num_classes=0)``
(torchvision's ``alexnet`` with its last layer replaced), the images normalised and zero-padded
by hand before the call. Both run the same random images and the same random weights (no
published weights are needed to time them); rounds alternate ours and plain, so both see the
same machine load, and the best round is kept. A training step is a linear head on the
features, cross-entropy and an AdamW step over every parameter.

The feature cache (``evaluation.baselines.Baselines.frozen_features``) keeps a split's features
on disk: its hit is a ``torch.load`` of the features, against recomputing them.

    python benchmarks/backbones.py                          # the ten, batch 8, on the CPU
    python benchmarks/backbones.py --device cuda --batch 64
    python benchmarks/backbones.py --archs efficientnet_b4,samvit_base_patch16 --canvas 224   # MedMNIST+'s input
    python benchmarks/backbones.py --archs test_vit,test_resnet --batch 4   # seconds, for a check
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medmeta.files import write_text_atomic  # noqa: E402
from medmeta.learning.models import build_backbone  # noqa: E402

MEDMNIST_PLUS = ("vgg16", "alexnet", "resnet18.a1_in1k", "densenet121", "efficientnet_b4", "vit_base_patch16_224",
                 "vit_base_patch16_clip_224", "eva02_base_patch16_clip_224", "vit_base_patch16_224.dino",
                 "samvit_base_patch16")
"""MedMNIST+'s ten backbones by their timm names (``resnet18`` alone is medmeta's own ResNet)."""


class Plain(nn.Module):
    """A plain timm or torchvision model with the normalisation and padding written by hand."""

    def __init__(self, arch: str, canvas: int | None = None) -> None:
        super().__init__()
        if arch == "alexnet":
            from torchvision.models import alexnet

            self.model = alexnet()
            self.model.classifier[6] = nn.Identity()
            mean, std, (h, w) = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (224, 224)
        else:
            import timm

            self.model = timm.create_model(arch, num_classes=0)
            cfg = self.model.pretrained_cfg
            mean, std, (h, w) = cfg["mean"], cfg["std"], cfg["input_size"][1:]
        self.size = (canvas, canvas) if canvas else (h, w)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.expand(-1, 3, -1, -1) - self.mean.to(x.device)) / self.std.to(x.device)
        (h, w), (th, tw) = x.shape[-2:], self.size
        top, left = (th - h) // 2, (tw - w) // 2
        return self.model(F.pad(x, (left, tw - w - left, top, th - h - top)))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_rate(fns: dict[str, Callable[[], None]], images: int, rounds: int, device: torch.device) -> dict[str, float]:
    """Images/s of each function, the best of ``rounds`` rounds, the functions alternating in each."""
    best = {name: 0.0 for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            best[name] = max(best[name], images / (time.perf_counter() - start))
    return best


def canvas(args: argparse.Namespace) -> dict[str, object]:
    """``build_backbone``'s input arguments for ``--canvas`` (none: the model's own input size)."""
    return {"input": "pad", "canvas": args.canvas} if args.canvas else {}


def measure(arch: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Feature extraction and training-step images/s, ours and plain, for one architecture."""
    torch.manual_seed(0)
    ours = build_backbone(arch, **canvas(args)).to(device)
    plain = Plain(arch, args.canvas).to(device)
    plain.model.load_state_dict(ours.model.state_dict() if hasattr(ours, "model")
                                else {k: v for k, v in ours.state_dict().items()})
    x = torch.rand(args.batch, 1, args.size, args.size, device=device)
    y = torch.randint(0, 2, (args.batch,), device=device)

    def extract(net: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                for _ in range(args.steps):
                    net.eval()(x)
        return run

    def trainer(net: nn.Module) -> Callable[[], None]:
        head = nn.Linear(ours.out_features, 2).to(device)
        opt = torch.optim.AdamW([*net.parameters(), *head.parameters()], lr=1e-4)

        def run() -> None:
            net.train()
            for _ in range(args.steps):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(head(net(x)), y).backward()
                opt.step()
        return run

    images = args.batch * args.steps
    features = best_rate({"ours": extract(ours), "plain": extract(plain)}, images, args.rounds, device)
    training = best_rate({"ours": trainer(ours), "plain": trainer(plain)}, images, args.rounds, device)
    return {"features_ours": features["ours"], "features_plain": features["plain"],
            "train_ours": training["ours"], "train_plain": training["plain"], "out_features": ours.out_features}


def cache_hit(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Seconds to compute a split's features with the first architecture against loading them."""
    torch.manual_seed(0)
    net = build_backbone(args.archs[0], **canvas(args)).to(device).eval()
    x = torch.rand(args.batch, 1, args.size, args.size, device=device)
    start = time.perf_counter()
    with torch.inference_mode():
        features = torch.cat([net(x) for _ in range(args.steps)])
    sync(device)
    compute = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "features.pt"
        torch.save(features, path)
        start = time.perf_counter()
        torch.load(path, map_location=device, weights_only=True)
        sync(device)
        load = time.perf_counter() - start
    return {"compute_s": compute, "load_s": load, "images": args.batch * args.steps}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print one line per architecture; ``--json`` also saves the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", type=lambda t: t.split(","), default=list(MEDMNIST_PLUS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="batches per timed round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", type=int, default=28, help="image size before padding to the model's input")
    parser.add_argument("--canvas", type=int, help="pad every model's input to this size instead of its own "
                                                   "(MedMNIST+: 224; model.canvas)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                    "threads": torch.get_num_threads(), "batch": args.batch, "size": args.size,
                    **({"canvas": args.canvas} if args.canvas else {}), "archs": {}}
    target = f"{args.canvas}px" if args.canvas else "each model's input"
    print(f"{report['device']}, {report['threads']} threads, batch {args.batch}, {args.size}px padded to {target}; "
          "images/s, best of rounds (ours / plain = ratio)")
    for arch in args.archs:
        r = measure(arch, args, device)
        report["archs"][arch] = r
        print(f"{arch:34s} features {r['features_ours']:8.1f} / {r['features_plain']:8.1f} = "
              f"{r['features_ours'] / r['features_plain']:.2f}x   train step {r['train_ours']:7.1f} / "
              f"{r['train_plain']:7.1f} = {r['train_ours'] / r['train_plain']:.2f}x")
    hit = cache_hit(args, device)
    report["feature_cache"] = hit
    print(f"feature cache ({args.archs[0]}, {hit['images']} images): computed in {hit['compute_s']:.3f} s, loaded in "
          f"{hit['load_s']:.4f} s ({hit['compute_s'] / max(hit['load_s'], 1e-9):.0f}x)")
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
