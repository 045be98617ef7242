"""Adaptation benchmark: time per episode of every adaptation rule, against a plain PyTorch loop
doing the same math in the same process, and the fine-tuning step against the machine's peak.

Per rule, "ours" is the rule as the protocol runs it (``medmeta.methods.rules``); "plain" is
what a user would write for the same math: ``copy.deepcopy`` of the backbone per episode,
torchvision's own ``nn.Conv2d`` layers, ``torch.optim.Adam`` with its defaults, scikit-learn
for the frozen-feature rules. Both see the same synthetic episodes (random images: the cost
does not depend on pixel values). Times are the fastest of ``--repeats`` rounds, ours and
plain alternating within each round, so both see the same machine load.

The fine-tuning step's floating-point operations are counted with
``torch.utils.flop_counter.FlopCounterMode`` (forward + backward of one step on the support
batch); its achieved GFLOP/s is printed next to the peak of a 2048x2048 float32 matrix product
measured in the same process. ``--variants`` also times channels_last, ``torch.compile`` of the
step (compile time printed separately) and bf16 autocast against our default, with the largest
logit difference of each.

    python benchmarks/adaptation.py                       # 5-way 5-shot 10-query RGB 28px, ImageNet stem
    python benchmarks/adaptation.py --stem cifar --variants
"""
from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path
import sys

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medmeta.episodes import Episode  # noqa: E402
from medmeta.episodes.sampling import QUERIES, SHOTS  # noqa: E402
from medmeta.learning.models import SmallMapConv2d, build_backbone  # noqa: E402
from medmeta.methods import KNN, LPFT, FineTune, LinearProbe, MAMLInner, Prototypes  # noqa: E402
from medmeta.tasktype import TaskType  # noqa: E402


def episodes(args: argparse.Namespace) -> list[Episode]:
    gen = torch.Generator().manual_seed(0)
    sy = torch.arange(args.ways).repeat_interleave(args.shots)
    return [Episode(torch.rand(len(sy), 3, args.size, args.size, generator=gen), sy,
                    torch.rand(args.ways * args.queries, 3, args.size, args.size, generator=gen), None,
                    TaskType.MULTI_CLASS, tuple(range(args.ways))) for _ in range(args.episodes)]


def plain_backbone(backbone: nn.Module) -> nn.Module:
    """The same backbone with torchvision's plain ``nn.Conv2d`` layers (what a user would run)."""
    plain = copy.deepcopy(backbone)
    for m in plain.modules():
        if type(m) is SmallMapConv2d:
            m.__class__ = nn.Conv2d
    return plain


def plain_finetune(backbone: nn.Module, ep: Episode, steps: int, lr: float, head: nn.Linear | None = None
                   ) -> torch.Tensor:
    net = copy.deepcopy(backbone)
    head = head or nn.Linear(512, ep.num_outputs)
    model = nn.Sequential(net, head).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(ep.support_x), ep.support_y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return model(ep.query_x)


def plain_features(backbone: nn.Module, ep: Episode) -> tuple[np.ndarray, np.ndarray]:
    net = copy.deepcopy(backbone).eval()
    with torch.no_grad():
        return net(ep.support_x).numpy(), net(ep.query_x).numpy()


def plain_inner(backbone: nn.Module, ep: Episode, steps: int, lr: float) -> torch.Tensor:
    net = copy.deepcopy(backbone).train()
    head = nn.Linear(512, ep.num_outputs)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(head(net(ep.support_x)), ep.support_y).backward()
        opt.step()
    with torch.no_grad():
        return head(net(ep.query_x))


def plain_rules(args: argparse.Namespace) -> dict[str, Callable[[nn.Module, Episode], object]]:
    def linear(b, ep):
        s, q = plain_features(b, ep)
        return LogisticRegression(C=1.0, max_iter=100).fit(s, ep.support_y.numpy()).decision_function(q)

    def knn(b, ep):
        s, q = plain_features(b, ep)
        return KNeighborsClassifier(5, weights="distance").fit(s, ep.support_y.numpy()).predict_proba(q)

    def proto(b, ep):
        s, q = plain_features(b, ep)
        y = ep.support_y.numpy()
        means = np.stack([s[y == c].mean(0) for c in range(ep.num_outputs)])
        return -((q[:, None, :] - means[None]) ** 2).sum(-1)

    def lpft(b, ep):
        s, _ = plain_features(b, ep)
        lr_model = LogisticRegression(C=1.0, max_iter=100).fit(s, ep.support_y.numpy())
        head = nn.Linear(512, ep.num_outputs)
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(lr_model.coef_))
            head.bias.copy_(torch.from_numpy(lr_model.intercept_))
        return plain_finetune(b, ep, args.steps, FineTune.lr, head)

    return {"finetune": lambda b, ep: plain_finetune(b, ep, args.steps, FineTune.lr), "linear": linear, "knn": knn,
            "proto": proto, "lpft": lpft, "inner": lambda b, ep: plain_inner(b, ep, args.inner_steps, MAMLInner.lr)}


def our_rules(args: argparse.Namespace) -> dict[str, object]:
    # The plain versions re-estimate BatchNorm on the support: our rules do the same here.
    return {"finetune": FineTune(steps=args.steps), "linear": LinearProbe(bn="support"), "knn": KNN(bn="support"),
            "proto": Prototypes(bn="support"),
            "lpft": LPFT(probe=LinearProbe(bn="support"), finetune=FineTune(steps=args.steps)),
            "inner": MAMLInner(steps=args.inner_steps)}


def per_episode(fn: Callable[[], object], count: int) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) / count


def peak_gflops(repeats: int = 5) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = min(per_episode(lambda: a @ b, 1) for _ in range(repeats))
    return 2 * 2048 ** 3 / best / 1e9


def step_fn(backbone: nn.Module, ep: Episode, variant: str = "") -> tuple[Callable[[], None], nn.Module]:
    """One fine-tuning step of our rule's network on the support batch (optionally a variant)."""
    model = nn.Sequential(copy.deepcopy(backbone), nn.Linear(512, ep.num_outputs)).train()
    x, y = ep.support_x, ep.support_y
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=FineTune.lr, fused=True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16"):
            logits = model(x).float()
        F.cross_entropy(logits, y).backward()
        opt.step()

    return step, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stem", choices=["imagenet", "cifar"], default="imagenet")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=SHOTS)
    parser.add_argument("--queries", type=int, default=QUERIES)
    parser.add_argument("--steps", type=int, default=FineTune.steps, help="fine-tuning steps (default: the protocol's)")
    parser.add_argument("--inner-steps", type=int, default=MAMLInner.steps,
                        help="MAML test-time steps (default: the protocol's)")
    parser.add_argument("--episodes", type=int, default=2, help="episodes per timed round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the fastest is kept")
    parser.add_argument("--rules", default="finetune,linear,knn,proto,lpft,inner")
    parser.add_argument("--variants", action="store_true", help="also time channels_last, torch.compile and bf16")
    args = parser.parse_args()

    torch.manual_seed(0)
    backbone = build_backbone("resnet18", stem=args.stem)
    plain = plain_backbone(backbone)
    eps = episodes(args)
    print(f"{args.ways}-way {args.shots}-shot {args.queries}-query RGB {args.size}px, ResNet-18 {args.stem} stem, "
          f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}; fastest of {args.repeats} "
          f"rounds of {args.episodes} episodes\n")

    peak = peak_gflops()
    step, model = step_fn(backbone, eps[0])
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    step()
    step_s = min(per_episode(step, 1) for _ in range(5 * args.repeats))
    plain_step, _ = step_fn(plain, eps[0])
    plain_step()
    plain_step_s = min(per_episode(plain_step, 1) for _ in range(5 * args.repeats))
    print(f"peak: {peak:,.0f} GFLOP/s (2048x2048 float32 matmul, same process)")
    print(f"fine-tuning step ({len(eps[0].support_x)} images, forward+backward+Adam): {flops / 1e9:.2f} GFLOP; "
          f"ours {step_s * 1e3:.0f} ms = {flops / step_s / 1e9:,.1f} GFLOP/s ({flops / step_s / 1e9 / peak:.0%} of "
          f"peak); plain nn.Conv2d {plain_step_s * 1e3:.0f} ms ({plain_step_s / step_s:.2f}x ours)\n")

    ours, plains = our_rules(args), plain_rules(args)
    print(f"{'rule':<10}{'ours s/episode':>16}{'plain s/episode':>17}{'plain / ours':>14}")
    for name in [r.strip() for r in args.rules.split(",") if r.strip()]:
        rule, baseline = ours[name], plains[name]
        rule.predict_many(backbone, eps[:1], [0])
        baseline(plain, eps[0])
        times: dict[str, list[float]] = {"ours": [], "plain": []}
        for r in range(args.repeats):
            jobs = [("ours", lambda: rule.predict_many(backbone, eps, list(range(len(eps))))),
                    ("plain", lambda: [baseline(plain, ep) for ep in eps])]
            for label, job in (jobs if r % 2 == 0 else jobs[::-1]):
                times[label].append(per_episode(job, len(eps)))
        o, p = min(times["ours"]), min(times["plain"])
        print(f"{name:<10}{o:>16.3f}{p:>17.3f}{p / o:>13.2f}x")

    if args.variants:
        print(f"\n{'variant':<16}{'ms/step':>10}{'vs ours':>10}{'max |logit diff| after 3 steps':>32}")
        ref_step, ref_model = step_fn(backbone, eps[0])
        for _ in range(3):
            ref_step()
        with torch.no_grad():
            ref = ref_model.eval()(eps[0].query_x)
        for variant in ("channels_last", "compile", "bf16"):
            vstep, vmodel = step_fn(backbone, eps[0], "" if variant == "compile" else variant)
            if variant == "compile":
                start = time.perf_counter()
                vstep = torch.compile(vstep)
                vstep()
                print(f"  (torch.compile took {time.perf_counter() - start:.0f} s before its first step)")
            else:
                vstep()
            for _ in range(2):
                vstep()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16"):
                diff = (vmodel.eval()(eps[0].query_x).float() - ref).abs().max().item()
            vmodel.train()
            t = min(per_episode(vstep, 1) for _ in range(3 * args.repeats))
            print(f"{variant:<16}{t * 1e3:>10.0f}{t / step_s:>9.2f}x{diff:>32.2e}")

if __name__ == "__main__":
    main()
