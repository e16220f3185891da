"""The README's Python blocks run as written, top to bottom in one session (a newcomer pastes
them in order): every ```python block of README.md, joined into one script run by a fresh
interpreter as ``python -c`` (as in an interactive session, __main__ has no file, so the Dask
cluster's spawned workers need no ``if __name__ == "__main__"`` guard) in a temporary
directory.  The README is read from the source tree, or from the
installed package's metadata (its long description) when the tests run outside the tree."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def readme_text() -> str:
    path = Path(__file__).resolve().parent.parent / "README.md"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    # the wheel's METADATA carries the README as its body, after the headers' blank line (read
    # as text: the parsed message's payload came back empty under pytest in a wheel's venv)
    text = metadata.distribution("mlmath_native").read_text("METADATA") or ""
    return text.split("\n\n", 1)[1] if "\n\n" in text else ""


def python_blocks() -> list[str]:
    return BLOCK.findall(readme_text())


def test_the_readme_has_its_python_blocks():
    blocks = python_blocks()
    assert len(blocks) >= 7
    assert any("mn.softmax" in b for b in blocks) and any("mnd.attention" in b for b in blocks)


def test_readme_python_blocks_run_in_order(tmp_path):
    for module in ("torch", "dask", "distributed", "ml_dtypes"):  # interop, Dask and bf16 blocks
        pytest.importorskip(module)
    blocks = python_blocks()
    assert blocks, "no ```python block found in the README"
    script = "\n\n".join(f"# --- README block {i}\n{block}" for i, block in enumerate(blocks, 1))
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
