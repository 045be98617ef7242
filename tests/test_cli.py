from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from medmeta.cli import main


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepare_info_verify_and_refuse_corrupt_copy(tmp_path: Path, real_dir: Path, capsys, monkeypatch) -> None:
    root = tmp_path / "root"
    monkeypatch.setenv("MEDMETA_SOURCE_DIR", str(real_dir))
    assert main(["prepare", "--available", "--root", str(root)]) == 0
    present = len(list(real_dir.glob("*.npz")))
    assert len(list((root / "store").glob("*.h5"))) == present
    capsys.readouterr()
    assert main(["info", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "retinamnist        28    1080    120    400  ok" in out
    assert "MISMATCH" not in out
    assert main(["verify", "--root", str(root)]) == 0

    bad = tmp_path / "bad"
    bad.mkdir()
    blob = (real_dir / "retinamnist.npz").read_bytes()
    (bad / "retinamnist.npz").write_bytes(blob[:-1000])
    before = _tree_digest(root)
    capsys.readouterr()
    assert main(["prepare", "retina", "--force", "--root", str(root), "--source-dir", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "retinamnist.npz" in err and "MD5" in err and len(err.strip().splitlines()) == 1
    assert _tree_digest(root) == before
    assert main(["verify", "--root", str(root), "retina"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["prepare", "kidney", "--no-download"], "unknown subset 'kidney'"),
    (["prepare"], "name the subsets to prepare"),
    (["prepare", "--available", "--source-dir", "/nonexistent/folder"], "is not a folder"),
    (["prepare", "nodule3d", "--no-download", "--source-dir", "/tmp"], "downloading is off"),
    (["verify"], "nothing to verify"),
])
def test_bad_input_is_one_line_and_nonzero(tmp_path: Path, argv: list[str], message: str, capsys, monkeypatch) -> None:
    monkeypatch.delenv("MEDMETA_SOURCE_DIR", raising=False)
    assert main([*argv, "--root", str(tmp_path / "root")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "root" / "store").exists()


@pytest.mark.parametrize("script, args, message", [
    ("cdfsl.py", ["--target", "kidney"], "cdfsl: error: unknown subset 'kidney'"),
    ("cdfsl.py", ["--target", "retina", "--set", "pretrain.stepz=3"], "unknown config key pretrain.stepz"),
    ("supervised.py", ["--dataset", "breast", "--config", "nonexistent"], "config 'nonexistent' not found"),
    ("supervised.py", ["--combine", "nowhere", "--out", "x"], "--combine nowhere: no readable baselines.json there"),
])
def test_experiment_scripts_report_bad_input_in_one_line(script: str, args: list[str], message: str,
                                                         tmp_path: Path) -> None:
    import subprocess
    import sys

    path = Path(__file__).resolve().parents[1] / "experiments" / script
    proc = subprocess.run([sys.executable, str(path), *args, "--root", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
