"""Running a command's jobs through existing engines: here, submitit's local executor, or SLURM.

Both grids of this library use it: the leave-one-out sweep (one job per target and seed,
``sweep``) and the supervised grid (one job per dataset, size, architecture, scheme and seed,
``baselines``). A job is a picklable call ``fn(*arguments)``; what counts as finished is the
caller's business (each grid checks its own results and caches), so a rerun submits only what
is left. Launchers:

* ``local``: one after another in this process. Under torchrun, ``shard=True`` gives each rank
  every ``world_size``-th job (the supervised grid's cells are independent); ``shard=False``
  runs every job on all ranks together (a sweep's job splits its episodes across ranks).
* ``slurm``: one SLURM job each through submitit, recorded in ``out/jobs.json`` so that a rerun
  does not submit a job still queued or running; ``wait=False`` submits and returns.
* ``submitit-local``: submitit's local executor (subprocesses here), to check a SLURM setup.

``add_arguments`` and ``overrides`` are the command-line side, shared by ``cdfsl.py`` and
``supervised.py``: the same flags, the same config keys.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from .. import distributed
from ..errors import ConfigError
from ..files import write_text_atomic
from .config import SlurmConfig

Launcher = Literal["local", "slurm", "submitit-local"]
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING")


def run_local(todo: Sequence[tuple[str, tuple]], fn: Callable[..., Any], total: int, desc: str,
              shard: bool = False) -> None:
    """Run ``fn(*arguments)`` for each ``(name, arguments)`` of ``todo`` in this process, with a
    progress bar over all ``total`` jobs (the finished ones counted); this rank's share when ``shard``."""
    mine = distributed.shard(todo) if shard else list(todo)
    start = time.perf_counter()
    bar = ({"total": len(mine), "desc": f"{desc} (rank 0's share)"} if shard and distributed.active()
           else {"total": total, "initial": total - len(todo), "desc": desc})
    with distributed.progress(**bar, unit="job") as progress:
        for i, (name, arguments) in enumerate(mine):
            progress.set_postfix_str(f"running {name}, {len(mine) - i - 1} left after it")
            fn(*arguments)
            progress.update(1)
    distributed.barrier()
    if distributed.is_main():
        print(f"{desc}: {len(todo)} job(s) run in {time.perf_counter() - start:.0f} s")


def executor(out: Path, slurm: SlurmConfig, launcher: Launcher, name: str = "medmeta") -> Any:
    """A submitit executor for ``launcher`` with ``slurm``'s resources (logs in ``out/submitit``)."""
    import submitit

    executor = submitit.AutoExecutor(folder=out / "submitit", cluster="local" if launcher != "slurm" else None)
    tasks = max(1, slurm.gpus_per_node)
    params: dict[str, Any] = {"timeout_min": slurm.timeout_min, "gpus_per_node": slurm.gpus_per_node,
                              "tasks_per_node": tasks, "cpus_per_task": max(1, slurm.cpus_per_task // tasks),
                              "mem_gb": slurm.mem_gb, "name": name}
    if launcher == "slurm":
        params.update({k: v for k, v in (("slurm_partition", slurm.partition), ("slurm_account", slurm.account)) if v})
    else:  # the local executor runs one process per job, with no GPUs to share
        params.update(tasks_per_node=1, gpus_per_node=0)
    executor.update_parameters(**params)
    return executor


def submit(todo: Sequence[tuple[str, tuple]], fn: Callable[..., Any], out: Path, slurm: SlurmConfig,
           launcher: Launcher, wait: bool, total: int, desc: str) -> bool:
    """Submit the jobs of ``todo`` not already queued; wait for all when asked (a failed job's
    error is raised here). True when all are finished."""
    import submitit

    record = out / "jobs.json"
    try:
        known = json.loads(record.read_text()) if record.is_file() else {}
    except (OSError, ValueError):
        known = None
    if not isinstance(known, dict):
        raise ConfigError(f"{record} is not a readable record of submitted jobs: delete it to submit the "
                          "unfinished jobs again (cancel any of them still queued first, or they run twice)")
    runner = executor(out, slurm, launcher)
    handles = {}
    for name, arguments in todo:
        queued = known.get(name)
        if launcher == "slurm" and queued:
            handle = submitit.SlurmJob(folder=out / "submitit", job_id=queued)
            if handle.state in ACTIVE_STATES:
                handles[name] = handle
                continue
        handles[name] = runner.submit(fn, *arguments)
        known[name] = handles[name].job_id
    write_text_atomic(record, json.dumps(known, indent=2))
    print(f"{desc}: {len(handles)} job(s) submitted or queued ({launcher}); logs in {out / 'submitit'}")
    if not wait:
        print(f"{desc}: not waiting; run the same command again to collect the table")
        return False
    with distributed.progress(total=total, initial=total - len(todo), desc=desc, unit="job") as bar:
        remaining = dict(handles)
        while remaining:
            for name in [n for n, h in remaining.items() if h.done()]:
                remaining.pop(name).result()  # re-raises a failed job's error
                bar.update(1)
            states = [h.state for h in remaining.values()]
            bar.set_postfix(running=sum(s == "RUNNING" for s in states), waiting=len(states))
            if remaining:
                time.sleep(5 if launcher != "slurm" else 30)
    return True


def launch(todo: Sequence[tuple[str, tuple]], fn: Callable[..., Any], out: Path, slurm: SlurmConfig,
           launcher: Launcher, wait: bool, total: int, desc: str, shard: bool = False) -> bool:
    """Run or submit ``todo`` with ``launcher``; True when every job has finished."""
    if not todo:
        return True
    if launcher == "local":
        run_local(todo, fn, total, desc, shard=shard)
        return True
    return submit(todo, fn, out, slurm, launcher, wait, total, desc)


def add_arguments(parser: argparse.ArgumentParser, jobs: str) -> None:
    """The flags that say where a command's ``jobs`` run: ``--launcher``, ``--no-wait``, ``--nproc``
    and each SLURM job's resources (``overrides`` turns them into ``slurm.*`` config keys)."""
    parser.add_argument("--launcher", choices=get_args(Launcher), default="local",
                        help=f"run the {jobs} here, on SLURM through submitit, or in submitit's local executor "
                             "(subprocesses here)")
    parser.add_argument("--no-wait", action="store_true", help="with --launcher slurm: submit and return; the same "
                                                               "command later collects the table")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes on this machine (one per GPU, or one per core on a CPU): re-launches this "
                             "command under torchrun, the same as `torchrun --nproc_per_node N <script>`")
    parser.add_argument("--partition", help="SLURM partition (or slurm.partition)")
    parser.add_argument("--gpus", type=int, help="GPUs per SLURM job, one process each (or slurm.gpus_per_node)")
    parser.add_argument("--time", type=int, help="SLURM time limit per job in minutes (or slurm.timeout_min)")
    parser.add_argument("--mem", type=int, help="memory per SLURM job in GB (or slurm.mem_gb)")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``add_arguments``' SLURM flags as dotted config keys (None where a flag is left out)."""
    return {"slurm.partition": args.partition, "slurm.gpus_per_node": args.gpus, "slurm.timeout_min": args.time,
            "slurm.mem_gb": args.mem}


def relaunched(args: argparse.Namespace, script: str, argv: list[str]) -> bool:
    """With ``--nproc N`` (N > 1) outside torchrun: run ``script`` under torchrun and say so (the
    caller then returns); else False."""
    if args.nproc > 1 and not distributed.launched():
        relaunch_under_torchrun(args.nproc, script, argv)
        return True
    return False


def relaunch_under_torchrun(nproc: int, script: str, argv: list[str]) -> None:
    """Run ``script`` with the same arguments (less ``--nproc``) in ``nproc`` processes, with torch's own launcher."""
    from torch.distributed.run import main as torchrun

    args = [a for i, a in enumerate(argv) if a != "--nproc" and (i == 0 or argv[i - 1] != "--nproc")
            and not a.startswith("--nproc=")]
    torchrun(["--standalone", f"--nproc_per_node={nproc}", script, *args])
