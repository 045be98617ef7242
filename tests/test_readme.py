"""The README's method example runs as written: the class, the command beside it, the Python API."""
from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import cdfsl  # noqa: E402


def blocks(after: str) -> list[tuple[str, str]]:
    """(language, code) of the fenced blocks of the README section headed ``after``."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(after):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


def test_the_readme_method_example_runs_as_written(tmp_path: Path, real_dir: Path, monkeypatch, capsys) -> None:
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
    sys.path.insert(0, str(tmp_path))
    namespace: dict = {}
    exec(compile(api, "README.md", "exec"), namespace)
    api_results = namespace["results"]
    assert set(api_results["methods"]) == {"proto", "mine"} and api_results["methods"]["mine"]["paired"]
    # The same rule on the same episodes gives the same numbers through the CLI and the API.
    assert api_results["methods"]["mine"]["per_episode"] == mine["per_episode"]
    assert os.path.isfile(tmp_path / "runs" / "mine" / "results.json")


def test_the_readme_sampling_example_runs_as_written(tmp_path: Path, real_dir: Path, monkeypatch, capsys) -> None:
    from medmeta.data.store import Store

    ((lang, code),) = blocks("## Sampling episodes")
    assert lang == "python" and 'root = "~/.medmeta"' in code
    Store(tmp_path / "root").build("retina", 28, source_dir=real_dir, download=False)
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('root = "~/.medmeta"', f"root = {str(tmp_path / 'root')!r}"), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and printed[-1].split()[0] == "torch.float32", printed
    assert 0 < float(printed[-1].split()[1]) <= 1, "uint8 pixels converted to [0, 1]"
    assert (tmp_path / "retina_5shot.json").is_file()
