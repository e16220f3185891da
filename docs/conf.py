"""Sphinx configuration of the mlmath_native documentation site (``docs/``).

Build: ``pip install ".[docs]"`` then ``sphinx-build -W --keep-going -b html docs docs/_build``.
The API pages are generated from the docstrings (NumPy format, numpydoc) of the installed
package."""

from __future__ import annotations

import mlmath_native

project = "mlmath_native"
author = "The mlmath_native authors"
copyright = "2026, The mlmath_native authors"  # noqa: A001 (Sphinx's name)
release = mlmath_native.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "numpydoc",
    "myst_parser",  # the guides are Markdown (MyST)
]
myst_heading_anchors = 4  # [text](page.md#a-heading) links, checked by the build
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
autosummary_generate = True
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
autodoc_typehints = "none"  # the signatures carry them; numpydoc's Parameters say the rest

exclude_patterns = ["_build", "**/generated/*.md"]
html_theme = "pydata_sphinx_theme"
html_title = f"mlmath_native {release}"
html_theme_options = {"navigation_with_keys": False}
