"""The Python examples of the README and of the documentation site run as written.

Each page is run on its own, top to bottom in one session (a reader pastes its blocks in
order): every ```python block of the page, joined into one script run by a fresh interpreter as
``python -c`` (as in an interactive session, __main__ has no file, so the Dask cluster's
spawned workers need no ``if __name__ == "__main__"`` guard) in a temporary directory.  So each
page imports what it uses.  A page that imports an optional package (torch, dask, ml_dtypes,
...) is skipped where that package is not installed.

The README is read from the source tree, or from the installed package's metadata (its long
description) when the tests run outside the tree; the site's pages (docs/**/*.md) exist only in
the source tree."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
IMPORT = re.compile(r"^\s*(?:import|from)\s+([A-Za-z_]\w*)", re.M)
# imported by some examples, never by the package: a page using one needs it installed
OPTIONAL = {
    "torch",
    "jax",
    "dask",
    "distributed",
    "ml_dtypes",
    "scipy",
    "matplotlib",
    "sklearn",
    "threadpoolctl",
}


def readme_text() -> str:
    path = ROOT / "README.md"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    # the wheel's METADATA carries the README as its body, after the headers' blank line (read
    # as text: the parsed message's payload came back empty under pytest in a wheel's venv)
    text = metadata.distribution("mlmath_native").read_text("METADATA") or ""
    return text.split("\n\n", 1)[1] if "\n\n" in text else ""


def doc_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md")) if DOCS.is_dir() else []


def run_blocks(blocks: list[str], tmp_path: Path, name: str) -> None:
    assert blocks, f"no ```python block in {name}"
    for module in sorted({m for b in blocks for m in IMPORT.findall(b)} & OPTIONAL):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{name} imports {module}, which is not installed")
    script = "\n\n".join(f"# --- {name}, block {i}\n{block}" for i, block in enumerate(blocks, 1))
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"


def test_the_readme_has_its_example():
    blocks = BLOCK.findall(readme_text())
    assert blocks and any("mn.softmax" in b for b in blocks)


def test_readme_python_blocks_run_in_order(tmp_path):
    run_blocks(BLOCK.findall(readme_text()), tmp_path, "README.md")


@pytest.mark.skipif(not DOCS.is_dir(), reason="an installed package without the source tree")
def test_the_site_has_its_examples():
    """The pages below are found by a glob: make sure it finds the guides' examples."""
    with_code = {p.relative_to(DOCS).as_posix() for p in doc_pages() if BLOCK.search(p.read_text())}
    for page in (
        "getting-started.md",
        "guide/attention.md",
        "guide/optimizers.md",
        "guide/dask.md",
        "guide/dtypes.md",
        "guide/torch.md",
        "guide/memory.md",
    ):
        assert page in with_code


@pytest.mark.parametrize(
    "page", [p.relative_to(DOCS).as_posix() for p in doc_pages() if BLOCK.search(p.read_text())]
)
def test_doc_page_python_blocks_run_in_order(page, tmp_path):
    run_blocks(BLOCK.findall((DOCS / page).read_text(encoding="utf-8")), tmp_path, page)
