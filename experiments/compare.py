"""Compare two methods from two runs, paired, on the episodes both were scored on.

    python experiments/compare.py RUN_A/results.json:METHOD RUN_B/results.json:METHOD [...more pairs]

Each pair prints both methods' mean query AUROC and accuracy on the common episodes and the
paired per-episode difference (A - B) with its 95% interval. Episodes are paired by their
content: two runs on the same episode set (equal digests) pair on every common episode, and
runs on different sets (a run on the first 30 episodes of a set and one on 100) pair only when
each common episode has the same digest (task, split, size, classes, support and query
indices); anything else is refused in one line. Runs written before episode digests were
recorded pair only with the same task, split, episode seed and sampler settings, as they did.
Beside each paired difference: Wilcoxon's signed-rank test on the per-episode values (p, and the
effect size r). ``--friedman`` takes three or more methods and tests them together (Friedman's
chi-square and Kendall's W) on the episodes all were scored on:

    python experiments/compare.py --friedman RUN/results.json:scratch RUN/results.json:mmpt RUN/results.json:maml
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from medmeta.errors import ConfigError, MedmetaError
from medmeta.evaluation.metrics import mean_ci, paired_difference
from medmeta.evaluation.statistics import friedman, wilcoxon


def load(spec: str) -> tuple[dict, dict]:
    """A run's results.json and one of its methods, from ``RESULTS.json:METHOD``."""
    path, _, method = spec.rpartition(":")
    if not path or not method:
        raise ConfigError(f"{spec!r}: write RESULTS.json:METHOD, e.g. runs/cdfsl/retina/results.json:scratch")
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read a results.json ({exc})") from None
    if not isinstance(results, dict) or not {"methods", "episode_set"} <= set(results):
        raise ConfigError(f"{path} is not one run's results.json (it has no methods and episode_set); "
                          "a sweep's table.json combines runs: give a target's own results.json")
    if method not in results["methods"]:
        raise ConfigError(f"{path} has no method {method!r}; it has {sorted(results['methods'])}")
    return results, results["methods"][method]


def common_episodes(spec_a: str, ra: dict, a: dict, spec_b: str, rb: dict, b: dict) -> list[tuple[dict, dict]]:
    """The (A, B) per-episode results of the episodes both were scored on, refused (ConfigError)
    unless the two runs' episodes are the same episodes (see the module docstring)."""
    ea, eb = ra["episode_set"], rb["episode_set"]
    by_a = {e["episode"]: e for e in a["per_episode"]}
    common = [(by_a[e["episode"]], e) for e in b["per_episode"] if e["episode"] in by_a]
    if "digest" in ea and "digest" in eb:
        if ea["digest"] != eb["digest"]:
            da, db = ea["episode_digests"], eb["episode_digests"]
            differ = [x["episode"] for x, _ in common if da.get(str(x["episode"])) != db.get(str(x["episode"]))]
            if differ:
                more = f" and {len(differ) - 1} more" if len(differ) > 1 else ""
                raise ConfigError(f"{spec_a} and {spec_b} were scored on different episode sets (digests "
                                  f"{ea['digest']}, {eb['digest']}): episode {differ[0]}{more} differ; compare runs "
                                  "on the same episodes")
        return common
    same = ("task", "split", "seed", "sampler")
    if any(ea.get(k) != eb.get(k) for k in same):
        raise ConfigError(f"{spec_a} and {spec_b} were scored on different episode sets "
                          f"({ {k: ea.get(k) for k in same} } vs { {k: eb.get(k) for k in same} })")
    return common


def compare(spec_a: str, spec_b: str) -> dict:
    """Both methods' means and their paired difference on the episodes both were scored on."""
    (ra, a), (rb, b) = load(spec_a), load(spec_b)
    common = common_episodes(spec_a, ra, a, spec_b, rb, b)
    if not common:
        raise ConfigError(f"{spec_a} and {spec_b} have no episode in common: nothing to pair")
    out = {"a": spec_a, "b": spec_b, "episodes": len(common)}
    for metric in ("auroc", "acc"):
        out[f"a_{metric}"] = mean_ci([x[metric] for x, _ in common])
        out[f"b_{metric}"] = mean_ci([y[metric] for _, y in common])
        out[f"{metric}_diff"] = paired_difference([x[metric] for x, _ in common], [y[metric] for _, y in common])
        defined = [(x[metric], y[metric]) for x, y in common if not (math.isnan(x[metric]) or math.isnan(y[metric]))]
        out[f"{metric}_wilcoxon"] = wilcoxon([x for x, _ in defined], [y for _, y in defined])
    return out


def friedman_across(specs: list[str]) -> dict:
    """Friedman's test across three or more methods on the episodes every one was scored on
    (each paired with the first as ``compare`` pairs them), per metric."""
    if len(specs) < 3:
        raise ConfigError("--friedman compares three or more methods: give RESULTS.json:METHOD at least three times")
    loaded = [load(spec) for spec in specs]
    (r0, m0), common = loaded[0], None
    for spec, (r, m) in zip(specs[1:], loaded[1:]):
        pairs = common_episodes(specs[0], r0, m0, spec, r, m)
        ids = {x["episode"] for x, _ in pairs}
        common = ids if common is None else common & ids
    assert common is not None
    out: dict = {"methods": specs, "episodes": len(common)}
    for metric in ("auroc", "acc"):
        by = [{e["episode"]: e[metric] for e in m["per_episode"]} for _, m in loaded]
        rows = [[b[i] for b in by] for i in sorted(common) if not any(math.isnan(b[i]) for b in by)]
        out[metric] = {"episodes": len(rows), **friedman(rows)}
    return out


def _tested(w: dict) -> str:
    return f"Wilcoxon p {w['p']:.3g} ({w['method']}), r {w['r']:.2f} ({w['effect']})"


def main(argv: list[str] | None = None) -> list[dict]:
    """Compare the pairs given on the command line; bad input is one line and exit status 2."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="+", help="RESULTS.json:METHOD, two per comparison")
    parser.add_argument("--friedman", action="store_true",
                        help="one Friedman test across all the methods given (three or more) on their common episodes")
    args = parser.parse_args(argv)
    try:
        if args.friedman:
            result = friedman_across(args.pairs)
        elif len(args.pairs) % 2:
            raise ConfigError("give the runs in pairs: A.json:METHOD B.json:METHOD ...")
        else:
            rows = [compare(a, b) for a, b in zip(args.pairs[::2], args.pairs[1::2])]
    except MedmetaError as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        sys.exit(2)
    if args.friedman:
        print(f"Friedman across {len(args.pairs)} methods on {result['episodes']} common episodes")
        for metric, label in (("auroc", "AUROC"), ("acc", "ACC")):
            f = result[metric]
            print(f"  {label:5} chi2 {f['chi2']:.2f} (dof {f['dof']}, {f['episodes']} episodes), p {f['p']:.3g}, "
                  f"Kendall's W {f['kendall_w']:.3f}")
        return [result]
    for r in rows:
        d = r["auroc_diff"]
        print(f"{r['a']}  vs  {r['b']}  ({r['episodes']} common episodes)")
        print(f"  AUROC {r['a_auroc'][0]:.3f} ± {r['a_auroc'][1]:.3f} vs {r['b_auroc'][0]:.3f} ± {r['b_auroc'][1]:.3f};"
              f" paired A - B {d['mean']:+.3f} ± {d['ci95']:.3f}; {_tested(r['auroc_wilcoxon'])}")
        d = r["acc_diff"]
        print(f"  ACC   {r['a_acc'][0]:.3f} ± {r['a_acc'][1]:.3f} vs {r['b_acc'][0]:.3f} ± {r['b_acc'][1]:.3f};"
              f" paired A - B {d['mean']:+.3f} ± {d['ci95']:.3f}; {_tested(r['acc_wilcoxon'])}")
    return rows


if __name__ == "__main__":
    main()
