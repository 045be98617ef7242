"""The README's and the docs' examples run as written: the classes, the commands beside them, the
Python API; every other code block at least compiles or parses, and every command they print is
accepted by its script's argument parser.

A section is found by its heading's text wherever it lives (README.md or a page under docs/) and
at whatever level, so a section can move between pages without its test losing it.
docs/index.md mirrors the README (tests/test_docs.py checks that) and is not read twice.
"""
from __future__ import annotations

import argparse
import os
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import cdfsl  # noqa: E402

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)


def pages() -> list[Path]:
    """README.md and every docs page but docs/index.md (a mirror of the README)."""
    return [REPO / "README.md", *sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "index.md")]


def headings(text: str) -> list[tuple[int, int, str]]:
    """(offset, level, title) of the Markdown headings of ``text``, outside fenced code blocks."""
    out, offset, fenced = [], 0, False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"(#{1,6}) (.+?)\s*$", line)):
            out.append((offset, len(match.group(1)), match.group(2)))
        offset += len(line)
    return out


def section(heading: str) -> tuple[Path, str]:
    """The page holding the section headed ``heading`` (e.g. "### Adding a method": its level
    does not matter) and the section's text, up to the next heading of the same or a higher level."""
    title = heading.lstrip("#").strip()
    found = []
    for page in pages():
        text = page.read_text()
        marks = headings(text)
        for i, (start, level, name) in enumerate(marks):
            if name == title:
                end = next((s for s, lv, _ in marks[i + 1:] if lv <= level), len(text))
                found.append((page, text[start:end]))
    assert len(found) == 1, f"section {title!r} found {len(found)} times: {[str(p) for p, _ in found]}"
    return found[0]


def blocks(heading: str) -> list[tuple[str, str]]:
    """(language, code) of the fenced blocks of the section headed ``heading``."""
    return FENCE.findall(section(heading)[1])


def test_the_readme_method_example_runs_as_written(tmp_path: Path, real_dir: Path, monkeypatch, capsys) -> None:
    page = section("### Adding a method")[0]
    (lang1, module), (lang2, command), (lang3, api) = blocks("### Adding a method")
    assert (lang1, lang2, lang3) == ("python", "bash", "python")
    (tmp_path / "my_method.py").write_text(module)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDMETA_ROOT", str(tmp_path / "root"))
    words = shlex.split(command)
    env = dict(w.split("=", 1) for w in words[:words.index("python")])
    assert env == {"MEDMETA_SOURCE_DIR": "../shared/data/medmnist"}
    monkeypatch.setenv("MEDMETA_SOURCE_DIR", str(real_dir))  # the README's path, from this test's folder
    args = words[words.index("experiments/cdfsl.py") + 1:]
    results = cdfsl.main([*args, "--out", str(tmp_path / "out")])
    mine = results["methods"]["scratch+my_method:CosineCentroid"]
    assert mine["summary"]["episodes"] == 20 and "paired" in mine
    assert mine["paired"]["reference"] == "scratch+proto"
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {}
    exec(compile(api, str(page), "exec"), namespace)
    api_results = namespace["results"]
    assert set(api_results["methods"]) == {"proto", "mine"} and api_results["methods"]["mine"]["paired"]
    # The same rule on the same episodes gives the same numbers through the CLI and the API.
    assert api_results["methods"]["mine"]["per_episode"] == mine["per_episode"]
    assert os.path.isfile(tmp_path / "runs" / "mine" / "results.json")


def test_the_readme_sampling_example_runs_as_written(tmp_path: Path, real_dir: Path, monkeypatch, capsys) -> None:
    from medmeta.data.store import Store

    page = section("## Sampling episodes")[0]
    ((lang, code),) = blocks("## Sampling episodes")
    assert lang == "python" and 'root = "~/.medmeta"' in code
    Store(tmp_path / "root").build("retina", 28, source_dir=real_dir, download=False)
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('root = "~/.medmeta"', f"root = {str(tmp_path / 'root')!r}"), str(page), "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and printed[-1].split()[0] == "torch.float32", printed
    assert 0 < float(printed[-1].split()[1]) <= 1, "uint8 pixels converted to [0, 1]"
    assert (tmp_path / "retina_5shot.json").is_file()


def test_the_readme_tour_episode_example_runs_as_written(tmp_path: Path, real_dir: Path, monkeypatch,
                                                         capsys) -> None:
    from medmeta.data.store import Store

    page, _ = section("### Episodes")
    assert page.name == "README.md"
    ((lang, code),) = blocks("### Episodes")
    assert lang == "python" and 'root="~/.medmeta"' in code
    Store(tmp_path / "root").build("retina", 28, source_dir=real_dir, download=False)
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('root="~/.medmeta"', f"root={str(tmp_path / 'root')!r}"), str(page), "exec"), {})
    (printed,) = capsys.readouterr().out.splitlines()
    # Every retina grade, 5 shots and 10 queries each, RGB 28px.
    assert printed == "(0, 1, 2, 3, 4) (25, 3, 28, 28) (50, 3, 28, 28)", printed


def test_the_backbone_example_runs_as_written(tmp_path: Path, real_dir: Path, monkeypatch, capsys) -> None:
    page = section("## Adding a backbone")[0]
    (lang1, module), (lang2, command) = blocks("## Adding a backbone")
    assert (lang1, lang2) == ("python", "bash")
    (tmp_path / "my_backbone.py").write_text(module)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("MEDMETA_ROOT", str(tmp_path / "root"))
    words = shlex.split(command)
    env = dict(w.split("=", 1) for w in words[:words.index("python")])
    assert env == {"MEDMETA_SOURCE_DIR": "../shared/data/medmnist"}
    monkeypatch.setenv("MEDMETA_SOURCE_DIR", str(real_dir))
    args = words[words.index("experiments/cdfsl.py") + 1:]
    results = cdfsl.main([*args, "--out", str(tmp_path / "out")])
    mine = results["methods"]["my_backbone:SmallCNNInit+proto"]
    assert mine["summary"]["episodes"] == 20
    assert mine["paired"]["reference"] == "scratch+proto"
    # The backbone is the page's network, not the configured ResNet: 128 features from grey and RGB images.
    import torch

    from medmeta.learning.models import ModelConfig
    from medmeta.methods import InitContext

    namespace: dict = {}
    exec(compile(module, str(page), "exec"), namespace)
    context = InitContext(dims=2, size=28, model=ModelConfig(), seed=0, device=torch.device("cpu"), folder=tmp_path)
    backbone = namespace["SmallCNNInit"]().backbone(context)
    for channels in (1, 3):
        assert backbone(torch.rand(4, channels, 28, 28)).shape == (4, 128)


def test_every_python_and_yaml_block_compiles() -> None:
    """Blocks no test runs whole at least compile (Python) or load (YAML)."""
    seen = {"python": 0, "yaml": 0}
    for page in pages():
        for lang, code in FENCE.findall(page.read_text()):
            assert lang, f"{page.name}: a code block without a language"
            if lang == "python":
                compile(code, str(page), "exec")
            elif lang == "yaml":
                yaml.safe_load(code)
            seen[lang] = seen.get(lang, 0) + 1
    assert seen["python"] >= 6 and seen["yaml"] >= 1, seen


def test_the_own_dataset_manifest_is_accepted(tmp_path: Path) -> None:
    from medmeta.data.manifest import load_manifest

    ((lang, text),) = blocks("## Bring your own dataset")
    assert lang == "yaml"
    (tmp_path / "lab.yaml").write_text(text)
    manifest = load_manifest(tmp_path / "lab.yaml")
    assert manifest.resolve("lung") == "lungxray"
    assert "chestmnist" in manifest.excluded_for("lungxray"), "joins MedMNIST's chest X-ray group"
    assert "lungxray" in manifest.allowed_sources("retina"), "a source of every other 2D target"


# --- every command the pages print is accepted by its script ------------------------------------

PROGRAM = re.compile(r"(?:[A-Z_]+=\S+ +)*(?:python|torchrun|medmeta|pip) ")  # a span that is a command


def printed_commands(text: str) -> list[str]:
    """Each command of the page's bash blocks (continued lines joined) and each inline code span
    that starts with a program."""
    out = []
    for lang, code in FENCE.findall(text):
        if lang in ("bash", "sh", "shell"):
            out += [line for line in code.replace("\\\n", " ").splitlines() if line.strip()]
    prose = FENCE.sub("", text)
    out += [span for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", prose) if PROGRAM.match(span)]
    return out


class Parsed(Exception):
    """Raised by the patched parse_args once a script's arguments parsed: nothing else runs."""


def check_script(script: str, args: list[str], command: str, monkeypatch, capsys) -> None:
    path = REPO / script
    assert path.is_file(), f"{command!r}: no file {script}"
    if "parse_args" not in path.read_text():
        assert not args, f"{command!r}: {script} takes no arguments"
        return
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):  # noqa: ANN001, ANN202
        raise Parsed(original(self, args, namespace))

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
        patch.setattr(sys, "argv", [str(path), *args])
        patch.setattr(sys, "path", [str(path.parent), *sys.path])  # as `python script.py` has it
        try:
            runpy.run_path(str(path), run_name="__main__")
        except Parsed:
            return
        except SystemExit as exc:
            pytest.fail(f"{command!r}: {script} refused its arguments (exit {exc.code}): {capsys.readouterr().err}")
    pytest.fail(f"{command!r}: {script} ran without parsing arguments")


def test_every_printed_command_is_accepted_by_its_script(monkeypatch, capsys) -> None:
    from medmeta.cli import build_parser

    checked = 0
    for page in pages():
        for command in printed_commands(page.read_text()):
            words = shlex.split(command, comments=True)
            if "..." in words:  # an elided command ("the same command, ...")
                continue
            parts: list[list[str]] = [[]]
            for word in words:
                if word == "&&":
                    parts.append([])
                else:
                    parts[-1].append(word)
            for part in parts:
                while part and re.match(r"[A-Z_]+=", part[0]):
                    part = part[1:]
                assert part, f"{page.name}: empty command in {command!r}"
                program, args = part[0], part[1:]
                if program == "pip" or args[:2] == ["-m", "pytest"]:
                    continue
                if program == "medmeta":
                    try:
                        build_parser().parse_args(args)
                    except SystemExit as exc:
                        pytest.fail(f"{page.name}: {command!r} refused (exit {exc.code}): {capsys.readouterr().err}")
                elif program == "python":
                    check_script(args[0], args[1:], command, monkeypatch, capsys)
                elif program == "torchrun":
                    scripts = [i for i, w in enumerate(args) if w.endswith(".py")]
                    if not scripts:  # the launcher named in prose, e.g. `torchrun --nproc_per_node 1`
                        continue
                    check_script(args[scripts[0]], args[scripts[0] + 1:], command, monkeypatch, capsys)
                else:
                    pytest.fail(f"{page.name}: {command!r}: no check for program {program!r}")
                checked += 1
    assert checked >= 30, checked
