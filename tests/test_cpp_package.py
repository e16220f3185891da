"""The C++ side of the package: headers that need no Python, and (in an installed package) the
CMake config that ``find_package(mlmath_native CONFIG)`` reads.  .ci/run builds and runs
examples/cpp and the ctest suite of tests/cpp against it."""

from __future__ import annotations

import os
import re

import pytest

import mlmath_native as mn


def test_headers_are_found_and_include_nothing_from_python():
    include = mn.get_include()
    header = os.path.join(include, "mlmath", "mlmath.h")
    assert os.path.isfile(header)
    for name in ("mlmath.h", "kernels.inc"):
        with open(os.path.join(include, "mlmath", name), encoding="utf-8") as f:
            includes = re.findall(r"#include\s+[<\"]([^>\"]+)", f.read())
        assert not [i for i in includes if "pybind" in i or "Python" in i], includes


def _installed() -> bool:
    return os.path.isdir(os.path.join(os.path.dirname(mn.__file__), "share"))


def test_cmake_dir_of_the_installed_package():
    if not _installed():  # a source checkout (PYTHONPATH=python) has no installed library
        with pytest.raises(FileNotFoundError, match="install the package with pip"):
            mn.get_cmake_dir()
        return
    cmake_dir = mn.get_cmake_dir()
    for name in ("mlmath_nativeConfig.cmake", "mlmath_nativeTargets.cmake"):
        assert os.path.isfile(os.path.join(cmake_dir, name))
    lib = os.path.join(os.path.dirname(mn.__file__), "lib")
    assert any(f.startswith(("libmlmath", "mlmath")) for f in os.listdir(lib))
    assert mn.get_include().startswith(os.path.dirname(mn.__file__))
