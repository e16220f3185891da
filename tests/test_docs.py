"""The documentation site (docs/, Sphinx) has an API page for every public name: the
autosummary entries of docs/api.rst are exactly mlmath_native.__all__ (less __version__ and the
optim module, whose classes are listed by name).  .ci/run builds the site with warnings as
errors; this test keeps the list honest without needing Sphinx."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import mlmath_native as mn

API = Path(__file__).resolve().parents[1] / "docs" / "api.rst"


def documented() -> list[str]:
    names, in_summary = [], False
    for line in API.read_text().splitlines():
        if line.startswith(".. autosummary::"):
            in_summary = True
            continue
        if in_summary and re.fullmatch(r"   [A-Za-z_][A-Za-z0-9_.]*", line):
            names.append(line.strip())
        elif in_summary and line and not line.startswith("   "):
            in_summary = False
    return names


@pytest.mark.skipif(not API.exists(), reason="an installed package without the source tree")
def test_every_public_name_has_an_api_page():
    names = documented()
    assert len(names) == len(set(names)), "a name listed twice"
    public = set(mn.__all__) - {"__version__", "optim"}
    assert set(names) == public
