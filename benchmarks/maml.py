"""Benchmark: MAML meta-training steps and few-shot adaptation, ours against straightforward code.

Two comparisons on the same model and the same synthetic episodes:

1. Meta-training step (second and/or first order): ``medmeta.learning.maml.MAML.meta_step``
   (``torch.func``) against a straightforward implementation (``copy.deepcopy`` of the model
   per episode, parameters swapped for graph-connected tensors, unrolled
   ``torch.autograd.grad(create_graph=True)``). Both back-propagate episode by episode.
2. Fine-tuning N episodes (``medmeta.learning.finetune``): vmapped (``fine_tune_many``) against
   one-by-one (``fine_tune``), with the largest logit difference between the two.

Each measurement runs in a fresh subprocess so its peak memory is its own. Peak memory is
``torch.cuda.max_memory_allocated`` minus the allocation before the work on CUDA, and on CPU
the peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) minus the RSS
before the work (model and episodes already built); tracemalloc cannot see tensor memory.
Meta steps of the two implementations alternate within one process (same machine load for
both); a time is the fastest of ``--repeats`` steps after a warm-up step, over ``--rounds``
processes. Adaptation of all N episodes is timed once per process after a one-episode
warm-up; the two modes alternate over ``--rounds`` processes each and the fastest is kept.
Taking the fastest damps interference from other work on a shared machine.

Defaults are sized for a GPU (the protocol's 100 episodes x 50 steps). On a 2-core CPU this
runs in a few minutes:

    python benchmarks/maml.py --device cpu --episodes 8 --steps 5 --ways 3 --shots 3 \\
        --queries 5 --meta-batch 2 --inner-steps 2 --repeats 2 --rounds 1
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medmeta.episodes import Episode
from medmeta.learning.finetune import WorkingCopy, fine_tune, fine_tune_many
from medmeta.episodes.sampling import QUERIES, SHOTS
from medmeta.learning.maml import MAML, MAMLConfig
from medmeta.methods import FineTune
from medmeta.tasktype import TaskType

TASK_TYPE = TaskType.MULTI_CLASS


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU blocks (32 channels), global pool: a cheap stand-in for a ResNet."""

    out_features = 32

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 1
        for stride in (1, 2, 2, 2):
            layers += [nn.Conv2d(in_ch, 32, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()]
            in_ch = 32
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def build_model(name: str, device: torch.device) -> nn.Module:
    """The benchmarked backbone, seeded so every subprocess builds the same one."""
    torch.manual_seed(0)
    if name == "small":
        return SmallCNN().to(device)
    from medmeta.learning.models import build_backbone
    return build_backbone("resnet18", stem="cifar").to(device)


def _images(count: int, args: argparse.Namespace, gen: torch.Generator) -> Tensor:
    return torch.rand(count, 1, args.size, args.size, generator=gen)


def meta_episodes(args: argparse.Namespace, device: torch.device) -> list[list[Episode]]:
    """``repeats + 1`` meta-batches of ``ways``-way ``shots``-shot episodes."""
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.repeats + 1):
        batch = []
        for _ in range(args.meta_batch):
            sy = torch.arange(args.ways).repeat_interleave(args.shots)
            qy = torch.arange(args.ways).repeat_interleave(args.queries)
            batch.append(Episode(_images(len(sy), args, gen).to(device), sy.to(device),
                                 _images(len(qy), args, gen).to(device), qy.to(device), TASK_TYPE,
                                 tuple(range(args.ways))))
        batches.append(batch)
    return batches


def adapt_episodes_data(args: argparse.Namespace, device: torch.device) -> list[Episode]:
    """``episodes`` same-shaped episodes (no query labels: adaptation never sees them)."""
    gen = torch.Generator().manual_seed(2)
    sy = torch.arange(args.ways).repeat_interleave(args.shots).to(device)
    return [Episode(_images(len(sy), args, gen).to(device), sy, _images(args.ways * args.queries, args, gen).to(device),
                    None, TASK_TYPE, tuple(range(args.ways))) for _ in range(args.episodes)]


def _clone_connected(model: nn.Module) -> nn.Module:
    """Deep copy whose parameters are graph-connected clones of the originals (learn2learn style)."""
    clone = copy.deepcopy(model)
    for orig, new in zip(model.modules(), clone.modules()):
        for name, p in orig._parameters.items():
            if p is not None:
                new._parameters[name] = p.clone()
    return clone


def _set_params(model: nn.Module, values: list[Tensor]) -> None:
    it = iter(values)
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = next(it)


class NaiveMAML:
    """Straightforward MAML: deepcopy per episode, unrolled autograd, per-episode backward."""

    def __init__(self, backbone: nn.Module, inner_steps: int, inner_lr: float, first_order: bool) -> None:
        self.backbone, self.inner_steps, self.inner_lr, self.first_order = backbone, inner_steps, inner_lr, first_order
        self.optimizer = torch.optim.Adam(backbone.parameters(), lr=MAMLConfig.outer_lr)

    def meta_step(self, episodes: list[Episode]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        self.backbone.train()
        total = 0.0
        for ep in episodes:
            learner = _clone_connected(self.backbone)
            width = self.backbone.out_features
            w = ep.support_x.new_zeros(ep.num_outputs, width, requires_grad=True)
            b = ep.support_x.new_zeros(ep.num_outputs, requires_grad=True)
            for _ in range(self.inner_steps):
                loss = ep.task_type.loss(F.linear(learner(ep.support_x), w, b), ep.support_y)
                params = [p for m in learner.modules() for p in m._parameters.values() if p is not None]
                grads = torch.autograd.grad(loss, params + [w, b], create_graph=not self.first_order)
                _set_params(learner, [p - self.inner_lr * g for p, g in zip(params, grads)])
                w, b = w - self.inner_lr * grads[-2], b - self.inner_lr * grads[-1]
            query = ep.task_type.loss(F.linear(learner(ep.query_x), w, b), ep.query_y) / len(episodes)
            query.backward()
            total += query.item()
        self.optimizer.step()
        return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Extra peak memory of a block: CUDA allocator peak, or peak RSS (ru_maxrss) on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = _rss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        _sync(self.device)
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.start


def _meta_learner(impl: str, order: str, args: argparse.Namespace, device: torch.device) -> MAML | NaiveMAML:
    model = build_model(args.model, device)
    cls = MAML if impl == "ours" else NaiveMAML
    return cls(model, args.inner_steps, args.inner_lr, order == "first")


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def run_job(job: str, args: argparse.Namespace, device: torch.device, out_file: str) -> dict:
    """One measurement in this (fresh) process.

    ``meta-time:ORDER``: naive and ours built side by side, meta steps alternating between them
    (so both see the same machine load), fastest of ``repeats`` each.
    ``meta-mem:IMPL:ORDER``: peak memory of a warm-up plus one meta step.
    ``adapt:MODE``: time and peak memory of adapting all episodes (after a one-episode warm-up).
    """
    kind, _, rest = job.partition(":")
    if kind == "meta-time":
        batches = meta_episodes(args, device)
        learners = {impl: _meta_learner(impl, rest, args, device) for impl in ("naive", "ours")}
        times: dict[str, list[float]] = {impl: [] for impl in learners}
        for learner in learners.values():
            learner.meta_step(batches[0])
        for r, batch in enumerate(batches[1:]):
            for impl in (["naive", "ours"] if r % 2 == 0 else ["ours", "naive"]):
                step = learners[impl].meta_step
                times[impl].append(_timed(lambda step=step, batch=batch: step(batch), device))
        return {impl: min(t) for impl, t in times.items()}
    if kind == "meta-mem":
        impl, order = rest.split(":")
        batches = meta_episodes(args, device)
        learner = _meta_learner(impl, order, args, device)
        with PeakMemory(device) as mem:
            learner.meta_step(batches[0])
            learner.meta_step(batches[1])
        return {"peak_bytes": mem.peak}
    model = build_model(args.model, device)
    episodes = adapt_episodes_data(args, device)
    kw = {"steps": args.steps, "lr": FineTune.lr}
    logits: list[Tensor] = []
    seeds = list(range(len(episodes)))
    with PeakMemory(device) as mem:
        if rest == "batched":
            fine_tune_many(model, episodes[:1], seeds=[0], **kw)
            elapsed = _timed(lambda: logits.extend(fine_tune_many(model, episodes, seeds=seeds,
                                                                  chunk_size=args.chunk_size, **kw)), device)
        else:
            work = WorkingCopy(model)
            fine_tune(work, episodes[0], seed=0, **kw)
            elapsed = _timed(lambda: logits.extend(fine_tune(work, ep, seed=i, **kw)
                                                   for i, ep in enumerate(episodes)), device)
    torch.save(torch.stack(logits).cpu(), out_file)
    return {"time_s": elapsed, "peak_bytes": mem.peak}


def measure(job: str, argv: list[str], out_file: str) -> dict:
    """Run ``job`` in a fresh interpreter and return its JSON result."""
    cmd = [sys.executable, __file__, *argv, "--job", job, "--out-file", out_file]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure_pair(jobs: tuple[str, str], argv: list[str], rounds: int, out_files: tuple[str, str]) -> dict[str, dict]:
    """Alternate the two jobs for ``rounds`` rounds (order flipped each round); min time, max peak."""
    results: dict[str, list[dict]] = {job: [] for job in jobs}
    for r in range(rounds):
        order = [0, 1] if r % 2 == 0 else [1, 0]
        for i in order:
            results[jobs[i]].append(measure(jobs[i], argv, out_files[i]))
    return {job: {"time_s": min(x["time_s"] for x in rs), "peak_bytes": max(x["peak_bytes"] for x in rs)}
            for job, rs in results.items()}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["resnet18", "small"], default="resnet18",
                   help="resnet18: medmeta.learning.models.build_backbone('resnet18', stem='cifar'); small: a 4-block CNN")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--size", type=int, default=28, help="image side in pixels (grey images)")
    p.add_argument("--episodes", type=int, default=100, help="episodes adapted in the adaptation benchmark")
    p.add_argument("--steps", type=int, default=FineTune.steps, help="Adam steps per adapted episode")
    p.add_argument("--chunk-size", type=int, default=None, help="episodes vmapped together (default: all)")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=SHOTS)
    p.add_argument("--queries", type=int, default=QUERIES, help="query images per class")
    p.add_argument("--meta-batch", type=int, default=MAMLConfig.meta_batch, help="episodes per meta step")
    p.add_argument("--inner-steps", type=int, default=MAMLConfig.inner_steps)
    p.add_argument("--inner-lr", type=float, default=MAMLConfig.inner_lr)
    p.add_argument("--orders", default="second,first", help="MAML orders to time: second, first or both")
    p.add_argument("--repeats", type=int, default=3, help="timed meta steps per implementation and process")
    p.add_argument("--rounds", type=int, default=2,
                   help="fresh processes per measurement, alternating the compared pair (min time is kept)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 is steadier on a shared machine")
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--out-file", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _mib(n: int) -> str:
    return f"{n / 2**20:10.1f}"


def _row(label: str, r: dict) -> None:
    print(f"{label:<36}{r['time_s']:>10.3f}{_mib(r['peak_bytes'])}")


def _ratio(label: str, num: dict, den: dict) -> None:
    print(f"{label:<36}{num['time_s'] / den['time_s']:>9.2f}x{num['peak_bytes'] / max(den['peak_bytes'], 1):>9.2f}x")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if args.job:
        print(json.dumps(run_job(args.job, args, device, args.out_file)))
        return
    argv = [*argv, "--device", device.type]
    mem_kind = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS (ru_maxrss) over start"
    print(f"device={device.type} model={args.model} size={args.size} threads={torch.get_num_threads()} "
          f"memory={mem_kind}; time = min over {args.rounds} processes")
    print(f"meta step: {args.meta_batch} episodes x {args.ways}-way {args.shots}-shot {args.queries}-query, "
          f"{args.inner_steps} inner steps; adaptation: {args.episodes} episodes x {args.steps} Adam steps\n")
    print(f"{'benchmark':<36}{'time (s)':>10}{'peak MiB':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        unused = os.path.join(tmp, "unused")
        for order in [o.strip() for o in args.orders.split(",") if o.strip()]:
            timings = [measure(f"meta-time:{order}", argv, unused) for _ in range(args.rounds)]
            res = {impl: {"time_s": min(t[impl] for t in timings),
                          "peak_bytes": measure(f"meta-mem:{impl}:{order}", argv, unused)["peak_bytes"]}
                   for impl in ("naive", "ours")}
            _row(f"meta step {order}-order naive", res["naive"])
            _row(f"meta step {order}-order ours", res["ours"])
            _ratio("  naive / ours", res["naive"], res["ours"])
        jobs = ("adapt:sequential", "adapt:batched")
        files = (os.path.join(tmp, "sequential.pt"), os.path.join(tmp, "batched.pt"))
        res = measure_pair(jobs, argv, args.rounds, files)
        _row(f"adapt {args.episodes} episodes one-by-one", res[jobs[0]])
        _row(f"adapt {args.episodes} episodes batched", res[jobs[1]])
        _ratio("  one-by-one / batched", res[jobs[0]], res[jobs[1]])
        seq, bat = torch.load(files[0]), torch.load(files[1])
        print(f"max |logit| {seq.abs().max().item():.3g}; max |batched - one-by-one| "
              f"{(seq - bat).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
