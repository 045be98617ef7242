"""Figures (issue 29): a forest plot per target and small multiples per sweep, readable from 1 to
30 methods and 1 to 18 targets: bounded width, every label inside the canvas, not blank."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from medmeta.evaluation.plots import DPI, colour, forest_figure, marker, method_order, save, split_method, sweep_figure

MAX_WIDTH = 1600
INITS = ("scratch", "mmpt", "maml", "imagenet", "checkpoint", "my_inits:Foundation")
RULES = ("finetune", "linear", "knn", "proto", "lpft")


def method_names(n: int) -> list[str]:
    return [f"{i}+{r}" for i, r in itertools.islice(itertools.product(INITS, RULES), n)]


def run_results(n: int, rng: np.random.Generator, target: str = "retinamnist") -> dict:
    """A results.json-shaped dict for ``n`` methods, the first the reference."""
    names = method_names(n)
    methods = {}
    for name in names:
        m = {"summary": {"auroc": float(rng.uniform(0.5, 0.9)), "auroc_ci95": 0.01, "acc": float(rng.uniform(0.3, 0.8)),
                         "acc_ci95": 0.02, "episodes": 100, "episodes_auroc": 100}}
        if name != names[0]:
            m["paired"] = {"reference": names[0], **{k: {"mean": float(rng.normal(0, 0.03)), "ci95": 0.01,
                                                         "identical": False} for k in ("auroc", "acc")}}
        methods[name] = m
    return {"target": target, "reference": names[0], "config": {"episodes": {"shots": 5}},
            "episode_set": {"count": 100}, "methods": methods}


def sweep_table(n_methods: int, n_targets: int, rng: np.random.Generator) -> dict:
    rows = []
    for t in range(n_targets):
        names = method_names(n_methods)
        for name in names:
            row = {"target": f"target{t}mnist", "method": name, "auroc": 0.7, "auroc_ci95": 0.01, "reference": names[0]}
            if name != names[0]:
                row.update(auroc_diff=float(rng.normal(0, 0.03)), auroc_diff_ci95=0.01)
            rows.append(row)
    return {"table": rows, "shots": 5, "seeds": [0, 1]}


def check_readable(fig: Figure, path: Path) -> None:
    """Saved within the width bound, every visible text inside the canvas, and not blank."""
    save(fig, path)
    with Image.open(path) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("L"))
    assert width <= MAX_WIDTH and fig.dpi == DPI
    assert pixels.std() > 10, "blank figure"
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    tight = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)  # everything drawn, labels included
    bound = fig.bbox
    assert tight.x0 >= -1 and tight.y0 >= -1 and tight.x1 <= bound.width + 1 and tight.y1 <= bound.height + 1, tight


@pytest.mark.parametrize("n", [1, 2, 16, 30])
def test_the_forest_plot_is_readable_at_any_method_count(tmp_path: Path, n: int) -> None:
    results = run_results(n, np.random.default_rng(n))
    fig = forest_figure(results)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(labels) == max(1, n - 1)  # the reference is the zero line, not a row (unless alone)
    check_readable(fig, tmp_path / "results.png")


@pytest.mark.parametrize("n_methods, n_targets", [(2, 1), (16, 6), (30, 6), (30, 18)])
def test_small_multiples_are_readable(tmp_path: Path, n_methods: int, n_targets: int) -> None:
    fig = sweep_figure(sweep_table(n_methods, n_targets, np.random.default_rng(0)))
    visible = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert len(visible) == n_targets
    check_readable(fig, tmp_path / "table.png")


def test_rows_are_grouped_by_initialisation_and_sorted_within() -> None:
    names = ["mmpt+knn", "scratch+linear", "mmpt+linear", "maml", "scratch", "mine:Rule"]
    order = method_order(names, {"mmpt+knn": 0.1, "mmpt+linear": 0.2, "scratch": -0.1, "scratch+linear": 0.0})
    assert order == ["scratch+linear", "scratch", "mmpt+linear", "mmpt+knn", "maml", "mine:Rule"]
    assert split_method("maml") == ("maml", "inner") and split_method("mine:Rule") == ("mine:Rule", "")
    assert colour("mmpt") != colour("scratch") and marker("knn") != marker("linear")
    assert colour("my:Init") == colour("my:Init") and marker("my_rule") == marker("my_rule")  # stable


def test_significant_differences_are_filled_and_others_hollow() -> None:
    results = run_results(3, np.random.default_rng(0))
    second, third = list(results["methods"])[1:]
    results["methods"][second]["paired"]["auroc"].update(mean=0.05, ci95=0.01)  # excludes 0
    results["methods"][third]["paired"]["auroc"].update(mean=0.005, ci95=0.01)  # includes 0
    fig = forest_figure(results)
    faces = {}
    for line in fig.axes[0].get_lines():
        x = line.get_xdata()
        if len(x) == 1 and line.get_marker() not in (None, "None", ""):
            faces[round(float(x[0]), 3)] = line.get_markerfacecolor()
    assert faces[0.05] != "white" and faces[0.005] == "white"


def test_the_readability_check_catches_a_label_outside_the_canvas(tmp_path: Path) -> None:
    fig = forest_figure(run_results(3, np.random.default_rng(0)))
    fig.text(1.02, 0.5, "cut off")
    with pytest.raises(AssertionError):
        check_readable(fig, tmp_path / "results.png")
