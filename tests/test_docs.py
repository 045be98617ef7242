"""The documentation site builds with ``mkdocs build --strict`` (a broken link, a missing anchor or
a page outside the nav fails it), the README is its front page, and CI runs the README's test
command."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.fixture(scope="module")
def mkdocs() -> None:
    missing = [name for name in ("mkdocs", "material") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: the docs build is part of the suite; "
                    "install the docs extra: pip install -e '.[dev,docs]'")


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], capture_output=True, text=True, env=env, timeout=300)


def nav_pages(nav: list) -> list[str]:
    out = []
    for entry in nav:
        for value in (entry.values() if isinstance(entry, dict) else [entry]):
            out += nav_pages(value) if isinstance(value, list) else [value]
    return out


def test_the_site_builds_strictly(tmp_path: Path, mkdocs: None) -> None:
    done = build(REPO / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    for page in nav_pages(config["nav"]):
        html = "index.html" if page == "index.md" else f"{page[:-3]}/index.html"
        assert (tmp_path / "site" / html).is_file(), html
    # The run's files beside the pages are published with them (the pages link and embed them).
    assert (tmp_path / "site" / "results" / "table_all" / "table.png").is_file()


@pytest.mark.parametrize("page, addition, expected", [
    ("gpu.md", "\nSee [the missing page](no-such-page.md).\n", "no-such-page.md"),
    ("index.md", "\nSee [a missing section](store.md#no-such-section).\n", "#no-such-section"),
    ("results.md", "\n![a missing figure](results/no-such-figure.png)\n", "no-such-figure.png"),
    ("orphan.md", "# A page no nav lists\n", "orphan.md"),
])
def test_a_broken_reference_fails_the_strict_build(tmp_path: Path, mkdocs: None, page: str, addition: str,
                                                   expected: str) -> None:
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with open(tmp_path / "docs" / page, "a") as f:
        f.write(addition)
    done = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0, done.stderr
    assert expected in done.stderr, done.stderr


def test_every_page_is_in_the_nav_and_the_readme() -> None:
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    pages = {p.name for p in (REPO / "docs").glob("*.md")}
    assert sorted(nav_pages(config["nav"])) == sorted(pages)
    linked = {target.split("#")[0] for target in LINK.findall((REPO / "README.md").read_text())}
    assert {f"docs/{p}" for p in pages - {"index.md"}} <= linked, "the README links to every page"


def test_the_readme_links_resolve() -> None:
    """GitHub renders the README with its links relative to the repository root."""
    for target in LINK.findall((REPO / "README.md").read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        assert (REPO / target.split("#")[0]).exists(), target


def test_the_readme_is_a_front_page_mirrored_by_the_site() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250, "the README is a front page: move guides and results to docs/"
    # docs/index.md is the README with its links made relative to docs/:
    #   sed 's#](docs/#](#g' README.md > docs/index.md
    assert (REPO / "docs" / "index.md").read_text() == readme.replace("](docs/", "](")


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("Install and run the tests"):]
    command = re.search(r"```bash\n(.*?)\n```", block, flags=re.S).group(1)
    assert command == 'pip install -e ".[dev,docs]" && python -m pytest -q'
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert "set -euo pipefail" in ci
    assert [line for line in ci if line and not line.startswith(("#", "set ", "cd "))] == [command]
