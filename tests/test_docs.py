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


# -- the C++ API page (docs/cpp-api.md), kept by hand, checked against the headers ------------

INCLUDE = Path(__file__).resolve().parents[1] / "src" / "cpp" / "include" / "mlmath"
CPP_PAGE = Path(__file__).resolve().parents[1] / "docs" / "cpp-api.md"
NOT_A_FUNCTION = ("struct", "class", "template", "using", "constexpr", "namespace", "#", "//", "}")


def header_declarations() -> set[str]:
    """The names mlmath.h declares at namespace scope (its declarations start in column 0)."""
    names = set()
    for line in (INCLUDE / "mlmath.h").read_text().splitlines():
        if m := re.match(r"(?:struct|class) (\w+) \{", line):
            names.add(m.group(1))
        elif m := re.match(r"(?:using|constexpr [\w:]+) (\w+) =", line):
            names.add(m.group(1))
        elif re.match(r"\w", line) and not line.startswith(NOT_A_FUNCTION):
            if m := re.match(r"[\w:<>,&* ]*?[ &*](\w+)\(", line):
                names.add(m.group(1))
    return names


def page_table(title: str) -> list[str]:
    """The rows of the table under the page's heading `## title`, as lists of cells."""
    section = CPP_PAGE.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]  # less the head


@pytest.mark.skipif(not CPP_PAGE.exists(), reason="an installed package without the source tree")
def test_the_cpp_page_lists_every_declaration_of_the_header():
    listed = []
    for title in ("Types and constants", "Argument structs", "Functions"):
        listed += [
            re.fullmatch(r"`(\w+)(?:\(.*\))?`", row[0]).group(1) for row in page_table(title)
        ]
    assert len(listed) == len(set(listed)), "a declaration listed twice"
    assert set(listed) == header_declarations()


@pytest.mark.skipif(not CPP_PAGE.exists(), reason="an installed package without the source tree")
def test_the_cpp_page_lists_every_kernel():
    kernels = re.findall(r"^MLMATH_KERNEL\((\w+),", (INCLUDE / "kernels.inc").read_text(), re.M)
    listed = [
        name for row in page_table("The kernel table") for name in re.findall(r"`(\w+)`", row[1])
    ]
    assert len(listed) == len(set(listed)), "a kernel listed twice"
    assert sorted(listed) == sorted(kernels) and len(kernels) > 90
