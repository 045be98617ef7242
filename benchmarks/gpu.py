"""GPU benchmark: every trainer and adaptation rule on the device, timed, with the projected
wall time of the ``paper`` profile for one target. One command, under 8 minutes on one GPU:

    python benchmarks/gpu.py                  # on a GPU machine
    python benchmarks/gpu.py --smoke          # the same code paths on a CPU, tiny sizes (a test runs this)

It builds a synthetic store (random images; speed does not depend on pixel values) and prints:

1. mm-PT images/s at 28 and 224px: fp32 vs bf16 autocast, NCHW vs channels_last, with the
   data pipeline's share of each step (``MultiTaskPretrainer.data_seconds``: what the steps
   waited for their batches), with the loader thread (as training runs) and without it;
2. full fine-tuning episodes/min at 28px (25 episodes, the protocol's chunk) and 224px
   (5-way 5-shot 10-query, 50 Adam steps): vmapped (``fine_tune_many``) vs one by one, with
   the largest logit difference between the two after 1 step and after 50, and between two
   one-by-one runs (the device's own run-to-run noise, which 50 steps amplify);
3. every adaptation rule (linear, knn, proto, lpft, inner) once on the device;
4. MAML meta-step time and peak memory, first and second order (``train_maml``), how many
   shapes its meta-batches hold, and the meta-gradient of 4 same-shaped episodes at 28 and
   224px adapted together (``vmap``) vs one by one: times, their ratio, peaks, largest difference
   (float32 rounding: on a CPU the one-by-one float32 gradient of this random ResNet-18 after 4
   inner steps is as far from the float64 one as together is from one by one; tests check float64);
5. supervised training, one epoch (``SupervisedTrainer``), with and without the loader thread;
6. the projected wall time of the paper profile (50k mm-PT steps, 20k second-order MAML
   steps, 100 episodes x 4 methods) from the measured rates.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
import traceback
from contextlib import closing
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medmeta.data import MedMNISTTask, Store  # noqa: E402
from medmeta.files import write_text_atomic  # noqa: E402
from medmeta.data.manifest import parse_manifest  # noqa: E402
from medmeta.episodes import Episode, MultiTaskEpisodeSampler  # noqa: E402
from medmeta.learning.finetune import default_batched, fine_tune_episodes  # noqa: E402
from medmeta.learning.maml import MAMLConfig, maml_loss, train_maml  # noqa: E402
from medmeta.learning.models import Classifier, build_backbone  # noqa: E402
from medmeta.learning.pretrain import MultiTaskPretrainer, PretrainConfig  # noqa: E402
from medmeta.learning.runtime import deterministic_cudnn, resolve_device  # noqa: E402
from medmeta.learning.supervised import SupervisedConfig, SupervisedTrainer  # noqa: E402
from medmeta.methods import KNN, LPFT, FineTune, LinearProbe, MAMLInner, Prototypes  # noqa: E402
from medmeta.tasktype import TaskType  # noqa: E402


def synthetic_store(folder: Path, sizes: tuple[int, ...], n: int) -> Store:
    """Two RGB tasks (5 and 3 classes) of ``n`` training images at each size."""
    rng = np.random.default_rng(0)
    subsets = {}
    for name, classes in (("benchfive", 5), ("benchthree", 3)):
        files = {}
        for size in sizes:
            splits = {"train": n, "val": max(n // 4, 32), "test": 32}
            arrays = {}
            for split, count in splits.items():
                arrays[f"{split}_images"] = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
                arrays[f"{split}_labels"] = (np.arange(count) % classes).astype(np.uint8)[:, None]
            path = folder / f"{name}_{size}.npz"
            np.savez(path, **arrays)
            files[size] = {"file": path.name, "url": None, "md5": hashlib.md5(path.read_bytes()).hexdigest()}
        subsets[name] = {"short_name": name, "dims": 2, "channels": 3, "task_type": "multi-class",
                         "labels": [f"c{i}" for i in range(classes)], "splits": splits, "modality": "synthetic",
                         "domain": name, "source_dataset": "random", "license": "CC0", "citation": "none",
                         "files": files}
    manifest = parse_manifest({"version": "bench", "subsets": subsets, "exclusion_groups": {}}, folder / "m.yaml")
    store = Store(folder / "root", manifest)
    for name in subsets:
        for size in sizes:
            store.build(name, size, source_dir=folder, download=False)
    return store


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def mmpt_rate(store: Store, size: int, steps: int, batch: int, precision: str, channels_last: bool,
              device: torch.device, prefetch: bool = True) -> tuple[float, float]:
    """Images/s of mm-PT training steps and the data pipeline's share of their time, the batches
    gathered by the loader thread (``prefetch``) or in each step; two warm-up steps not timed."""
    train = {n: MedMNISTTask(store, n, "train", size=size) for n in ("benchfive", "benchthree")}
    val = {n: MedMNISTTask(store, n, "val", size=size) for n in train}
    config = PretrainConfig(steps=steps + 2, batch_size=batch, eval_every=10**6, checkpoint_every=10**6,
                            precision=precision, channels_last=channels_last)
    torch.manual_seed(0)
    trainer = MultiTaskPretrainer(build_backbone("resnet18", stem="imagenet"), train, val, config, device)
    start = time.perf_counter()
    with closing(trainer.train_steps(steps + 2, prefetch_batches=prefetch)) as training:
        for done, _ in enumerate(training, 1):
            if done == 2:
                sync(device)
                trainer.data_seconds, start = 0.0, time.perf_counter()
    sync(device)
    seconds = time.perf_counter() - start
    return steps * batch / seconds, trainer.data_seconds / seconds


def episodes(size: int, count: int, ways: int = 5, shots: int = 5, queries: int = 10) -> list[Episode]:
    gen = torch.Generator().manual_seed(1)
    sy = torch.arange(ways).repeat_interleave(shots)
    return [Episode(torch.rand(len(sy), 3, size, size, generator=gen), sy,
                    torch.rand(ways * queries, 3, size, size, generator=gen), None, TaskType.MULTI_CLASS,
                    tuple(range(ways))) for _ in range(count)]


def timed(fn, device: torch.device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def maml_together_vs_one_by_one(size: int, first_order: bool, inner_steps: int, device: torch.device, repeats: int,
                                ways: int = 5, shots: int = 5, queries: int = 10) -> dict:
    """The meta-gradient of 4 same-shaped episodes (``maml_loss`` forward and backward, ResNet-18),
    adapted together (``vmap``) and one by one, alternating in this process: the fastest of
    ``repeats`` after a warm-up each, the peak memory, and the largest gradient difference."""
    gen = torch.Generator().manual_seed(2)
    sy, qy = (torch.arange(ways).repeat_interleave(n) for n in (shots, queries))
    eps = [Episode(torch.rand(len(sy), 3, size, size, generator=gen), sy,
                   torch.rand(len(qy), 3, size, size, generator=gen), qy, TaskType.MULTI_CLASS,
                   tuple(range(ways))).to(device) for _ in range(4)]
    torch.manual_seed(0)
    net = build_backbone("resnet18", stem="imagenet").to(device)
    seconds: dict[bool, list[float]] = {False: [], True: []}
    peaks, grads = {}, {}
    for repeat in range(repeats + 1):
        for batched in (False, True):
            net.zero_grad(set_to_none=True)
            reset_peak(device)
            t, _ = timed(lambda: maml_loss(net, eps, inner_steps, MAMLConfig.inner_lr, first_order,
                                           batched=batched).backward(), device)
            peaks[batched], grads[batched] = peak_mib(device), [p.grad.clone() for p in net.parameters()]
            if repeat:
                seconds[batched].append(t)
    one, together = min(seconds[False]), min(seconds[True])
    scale = max(g.abs().max().item() for g in grads[False])
    diff = max((a - b).abs().max().item() for a, b in zip(grads[False], grads[True]))
    return {"one_by_one_s": one, "together_s": together, "speedup": one / together, "one_by_one_peak_mib": peaks[False],
            "together_peak_mib": peaks[True], "max_grad_diff": diff, "max_grad": scale}


class Sections:
    """Runs the numbered sections; with ``keep_going`` a failing one prints its traceback and the
    rest still run (one GPU lease, every figure it can give), else the error propagates."""

    def __init__(self, report: dict, keep_going: bool) -> None:
        self.report, self.keep_going = report, keep_going
        report["errors"], report["section_seconds"] = {}, {}

    def run(self, title: str, fn) -> None:
        print(f"\n{title}", flush=True)
        start = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - reported, and re-raised unless keep_going
            if not self.keep_going:
                raise
            traceback.print_exc()
            self.report["errors"][title] = f"{type(exc).__name__}: {exc}"
        self.report["section_seconds"][title] = time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the code paths in about a minute")
    parser.add_argument("--keep-going", action="store_true",
                        help="a failing section prints its traceback and the others still run")
    parser.add_argument("--json", type=Path, help="write the report here as JSON")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    smoke = args.smoke
    big = 28 if smoke else 224
    sizes = (28,) if smoke else (28, 224)
    mmpt_steps, mmpt_batch = (2, 8) if smoke else (30, 64)
    n_adapt, ft_steps = (2, 2) if smoke else (8, FineTune.steps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {device} ({name}), torch {torch.__version__}{', smoke mode' if smoke else ''}")
    report: dict = {"device": name, "torch": torch.__version__, "smoke": smoke}
    sections = Sections(report, args.keep_going)
    rates: dict = {}
    state: dict = {}

    with tempfile.TemporaryDirectory(prefix="medmeta_gpu_") as tmp:
        store = synthetic_store(Path(tmp), sizes, n=64 if smoke else 512)

        def mmpt() -> None:
            task = MedMNISTTask(store, "benchfive", "train", size=max(sizes))
            idx = np.arange(0, len(task), 3)
            x_dev, y_dev = task.get_batch(idx, device)
            x_host, y_host = task.get_batch(idx)
            assert torch.equal(x_dev.cpu(), x_host) and torch.equal(y_dev.cpu(), y_host), "get_batch on the device"
            print(f"{'':>32}{'loader thread':>26}{'in the step':>26}")
            print(f"{'size':>6}{'precision':>11}{'layout':>15}{'images/s':>14}{'data share':>12}"
                  f"{'images/s':>14}{'data share':>12}")
            for size in sizes:
                for precision in ("fp32", "bf16"):
                    for channels_last in (False, True):
                        rate, share = mmpt_rate(store, size, mmpt_steps, mmpt_batch, precision, channels_last, device)
                        rate_in_step, share_in_step = mmpt_rate(store, size, mmpt_steps, mmpt_batch, precision,
                                                                channels_last, device, prefetch=False)
                        rates[size, precision, channels_last] = rate
                        layout = "channels_last" if channels_last else "NCHW"
                        key = f"{size}px/{precision}/{'cl' if channels_last else 'nchw'}"
                        report.setdefault("mmpt_images_per_s", {})[key] = rate
                        report.setdefault("mmpt_data_share", {})[key] = share
                        report.setdefault("mmpt_images_per_s_no_prefetch", {})[key] = rate_in_step
                        report.setdefault("mmpt_data_share_no_prefetch", {})[key] = share_in_step
                        print(f"{size:>6}{precision:>11}{layout:>15}{rate:>14,.0f}{share:>12.1%}"
                              f"{rate_in_step:>14,.0f}{share_in_step:>12.1%}", flush=True)

        def finetune() -> None:
            torch.manual_seed(0)
            backbone = build_backbone("resnet18", stem="imagenet").to(device)
            for size, count in ((28, 2),) if smoke else ((28, 25), (big, n_adapt)):
                eps = [e.to(device) for e in episodes(size, count)]
                seeds = list(range(count))
                if size == big:
                    state.update(backbone=backbone, eps=eps)

                def run(steps: int, batched: bool) -> tuple[float, list]:
                    return timed(lambda: fine_tune_episodes(backbone, eps, steps, FineTune.lr, seeds, batched=batched), device)

                def gap(a: list, b: list) -> float:
                    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))

                one_step = gap(run(1, False)[1], run(1, True)[1])
                t_one, one = run(ft_steps, False)
                again = gap(one, run(ft_steps, False)[1])
                reset_peak(device)
                t_bat, bat = run(ft_steps, True)
                diff = gap(one, bat)
                print(f"{size}px, {count} episodes: one by one {60 * count / t_one:,.1f} episodes/min; vmapped "
                      f"{60 * count / t_bat:,.1f} episodes/min ({t_one / t_bat:.2f}x, peak {peak_mib(device):,.0f} MiB)")
                print(f"    max |logit diff| vmapped vs one by one: {one_step:.1e} after 1 step, {diff:.1e} after "
                      f"{ft_steps}; one by one run twice: {again:.1e}", flush=True)
                if device.type == "cuda" and size == 28:
                    with deterministic_cudnn():
                        t_det, det = run(ft_steps, False)
                        det_again = gap(det, run(ft_steps, False)[1])
                        bat_again = gap(run(ft_steps, True)[1], run(ft_steps, True)[1])
                    print(f"    vmapped with cudnn.deterministic, run twice: {bat_again:.1e}")
                    report["finetune_deterministic_28px_batched_repeat"] = bat_again
                    print(f"    with cudnn.deterministic: one by one {60 * count / t_det:,.1f} episodes/min, run twice: "
                          f"{det_again:.1e}", flush=True)
                    report["finetune_deterministic_28px"] = {"episode_s": t_det / count, "max_logit_diff_repeat": det_again}
                report.setdefault("finetune", {})[f"{size}px"] = {
                    "episode_s": t_one / count, "batched_episode_s": t_bat / count, "batched_peak_mib": peak_mib(device),
                    "max_logit_diff_1_step": one_step, "max_logit_diff": diff, "max_logit_diff_repeat": again}
            report.update(finetune_episode_s=report["finetune"][f"{big}px"]["episode_s"],
                          finetune_batched_episode_s=report["finetune"][f"{big}px"]["batched_episode_s"])
            # what the protocol does at this size on this device
            report["finetune_protocol_episode_s"] = report["finetune_batched_episode_s" if default_batched(
                device, torch.empty(1, 3, big, big)) else "finetune_episode_s"]

        def rules() -> None:
            if "backbone" not in state:
                torch.manual_seed(0)
                state.update(backbone=build_backbone("resnet18", stem="imagenet").to(device),
                             eps=[e.to(device) for e in episodes(big, n_adapt)])
            backbone, eps = state["backbone"], state["eps"]
            every = {"linear": LinearProbe(bn="support"), "knn": KNN(bn="support"), "proto": Prototypes(bn="support"),
                     "lpft": LPFT(probe=LinearProbe(bn="support"), finetune=FineTune(steps=ft_steps)),
                     "inner": MAMLInner(steps=2) if smoke else MAMLInner()}
            for rule_name, rule in every.items():
                seconds, scores = timed(lambda r=rule: r.predict_many(backbone, eps, list(range(n_adapt))), device)
                assert all(torch.isfinite(s).all() for s in scores), rule_name
                print(f"{rule_name:<8}{seconds / n_adapt:>8.3f} s/episode", flush=True)
                report[f"{rule_name}_episode_s"] = seconds / n_adapt

        def maml() -> None:
            train = {n: MedMNISTTask(store, n, "train", size=big) for n in ("benchfive", "benchthree")}
            meta_steps = 1 if smoke else 4
            for order in ("first", "second"):
                config = MAMLConfig(steps=meta_steps, max_shot=5, n_query=5 if smoke else 10,
                                    first_order=order == "first", inner_steps=1 if smoke else 4)
                torch.manual_seed(0)
                net = build_backbone("resnet18", stem="imagenet")
                reset_peak(device)
                seconds, _ = timed(lambda: train_maml(net, train, config, device), device)
                print(f"{order}-order: {seconds / meta_steps:.2f} s/meta-step, peak {peak_mib(device):,.0f} MiB",
                      flush=True)
                report[f"maml_{order}_step_s"] = seconds / meta_steps
                report[f"maml_{order}_peak_mib"] = peak_mib(device)
            sampler = MultiTaskEpisodeSampler([train[t] for t in sorted(train)], k_shot=config.max_shot,
                                              n_query=config.n_query, n_episodes=100 * config.meta_batch, variable=True,
                                              min_class_samples=config.max_shot + config.n_query)
            specs = [sampler.spec(i) for i in range(len(sampler))]
            shapes = [len({(s.task_id, len(s.classes), len(s.support_indices), len(s.query_indices))
                           for s in specs[i:i + config.meta_batch]}) for i in range(0, len(specs), config.meta_batch)]
            report["maml_shapes_per_meta_batch"] = float(np.mean(shapes))
            print(f"train_maml's meta-batches (way and shot drawn per episode): {np.mean(shapes):.2f} shapes in "
                  f"{config.meta_batch} episodes on average, so its groups to adapt together are mostly of one")
            for size in sizes:
                for order in ("first", "second"):
                    r = maml_together_vs_one_by_one(size, order == "first", 1 if smoke else 4, device,
                                                    repeats=1 if smoke else 2,
                                                    **(dict(ways=2, shots=2, queries=2) if smoke else {}))
                    report.setdefault("maml_together", {})[f"{size}px/{order}"] = r
                    print(f"{size}px {order}-order, meta-gradient of 4 same-shaped episodes: one by one "
                          f"{r['one_by_one_s']:.3f} s, together {r['together_s']:.3f} s ({r['speedup']:.2f}x), "
                          f"peak {r['one_by_one_peak_mib']:,.0f} / {r['together_peak_mib']:,.0f} MiB, max |grad diff| "
                          f"{r['max_grad_diff']:.1e} (max |grad| {r['max_grad']:.1e})", flush=True)

        def supervised() -> None:
            for prefetch, suffix in ((True, ""), (False, "_no_prefetch")):
                torch.manual_seed(0)
                trainer = SupervisedTrainer(
                    Classifier(build_backbone("resnet18", stem="imagenet"), 5),
                    MedMNISTTask(store, "benchfive", "train", size=28),
                    MedMNISTTask(store, "benchfive", "val", size=28),
                    SupervisedConfig(epochs=1, batch_size=mmpt_batch), device, prefetch_batches=prefetch)
                seconds, best = timed(trainer.run, device)
                print(f"{'loader thread' if prefetch else 'in the step':<14}{seconds:.1f} s, data share "
                      f"{best['data_share']:.1%}, validation AUROC {best['val_auroc']:.3f} (random labels: about 0.5)")
                report[f"supervised_epoch_s{suffix}"] = seconds
                report[f"supervised_data_share{suffix}"] = best["data_share"]

        sections.run(f"1. mm-PT (ResNet-18, ImageNet stem, batch {mmpt_batch})", mmpt)
        sections.run(f"2. fine-tuning at 28 and {big}px, 5-way 5-shot 10-query, {ft_steps} Adam steps, one by one "
                     "and vmapped", finetune)
        sections.run(f"3. the other adaptation rules, {n_adapt} episodes at {big}px", rules)
        sections.run(f"4. MAML meta-steps at {big}px (4 episodes of up to 5-way, up to 5-shot, 10 queries, "
                     "4 inner steps); 4 same-shaped episodes together vs one by one", maml)
        sections.run("5. supervised training, one epoch at 28px", supervised)

    def projection() -> None:
        paper = (max(sizes), "bf16", True) if device.type == "cuda" else (max(sizes), "fp32", False)
        projected = {"mm-PT 50k steps x 64": 50000 * 64 / rates[paper],
                     "MAML 20k second-order steps": 20000 * report["maml_second_step_s"],
                     "adaptation 100 episodes x 3 fine-tuned methods": 300 * report["finetune_protocol_episode_s"],
                     "adaptation 100 episodes, MAML's inner loop": 100 * report["inner_episode_s"]}
        for what, seconds in projected.items():
            print(f"{what:<48}{seconds / 3600:>8.2f} h")
        print(f"{'total':<48}{sum(projected.values()) / 3600:>8.2f} h")
        report["projected_hours"] = {k: v / 3600 for k, v in projected.items()}

    sections.run(f"6. projected paper profile for one target at {big}px (from the rates above)", projection)
    if report["errors"]:
        print(f"\nfailed sections: {', '.join(report['errors'])}")
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
