"""The type annotations: ``mypy --strict`` accepts a typed user program (tests/typed_usage.py),
and that program runs."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
USAGE = TESTS / "typed_usage.py"


def _mypy_config(tmp_path: Path) -> Path:
    """In the source tree, pyproject.toml's [tool.mypy] (mypy_path: the package source, checked
    strictly); elsewhere (tests copied next to an installed wheel) an empty config, so that
    mypy finds the installed package (py.typed) and no unrelated config file."""
    if (ROOT / "pyproject.toml").is_file() and (ROOT / "python/mlmath_native/py.typed").is_file():
        return ROOT / "pyproject.toml"
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\n")
    return config


def test_typed_usage_passes_mypy_strict(tmp_path):
    pytest.importorskip("mypy")
    cmd = [
        sys.executable,
        "-m",
        "mypy",
        "--strict",
        "--config-file",
        str(_mypy_config(tmp_path)),
        "--cache-dir",
        str(tmp_path / "mypy_cache"),
        str(USAGE),
    ]
    env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mypy --strict failed:\n{output}"
    assert "Success" in output, output


def test_typed_usage_runs(threads, capsys):
    runpy.run_path(str(USAGE), run_name="__main__")  # sets 2 threads; `threads` restores them
    assert capsys.readouterr().out.startswith("mlmath_native ")
