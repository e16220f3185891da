"""Shared test helpers: tolerances that scale with the reduction length and the dtype."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import mlmath_native as mn
from mlmath_native import _core

#: package modules whose import needs an optional extra: (file name, the module it needs)
_EXTRA_MODULES = {"dask.py": "dask", "torch.py": "torch"}


class _DoctestsOfMissingExtras:
    """Leaves out of ``--doctest-modules`` a package module whose optional extra is not installed
    (``mlmath_native.dask`` without Dask), as tests/test_dask.py skips itself: the suite runs
    without the extras.  A plugin object, not a conftest hook: conftest hooks apply only below
    tests/, and the package's doctests are collected from site-packages (``--pyargs``)."""

    def pytest_ignore_collect(self, collection_path, config):
        needs = _EXTRA_MODULES.get(collection_path.name)
        if needs is None or collection_path.parent.name != "mlmath_native":
            return None
        return True if importlib.util.find_spec(needs) is None else None


def pytest_configure(config):
    config.pluginmanager.register(_DoctestsOfMissingExtras(), "mlmath_native-missing-extras")


def tolerance(dtype, n: int = 1) -> float:
    """Relative tolerance for a float32/float64 kernel against the float64 reference.

    A few ulp for the elementwise part (the vector exp is within about 1 ulp), plus a term that
    grows with the reduction length n (a sum of n rounded terms drifts by about sqrt(n) ulp for
    random data; 4 sqrt(n) leaves room for unlucky inputs).
    """
    eps = float(np.finfo(np.dtype(dtype)).eps)
    return eps * (16 + 4 * np.sqrt(max(int(n), 1)))


def assert_close(actual, expected, dtype, n: int = 1, atol_scale: float = 0.0, cond: float = 1.0):
    """``actual`` (computed in ``dtype``) against the float64 reference ``expected``.

    rtol = tolerance(dtype, n) * cond, where cond is the condition of the function at this input
    (e.g. exp(x - m) changes by a relative |x - m| * eps when x - m is rounded to dtype);
    atol = rtol * atol_scale (for outputs that are differences of larger numbers, e.g.
    log_softmax = x - logsumexp), plus the smallest normal number so that results in the
    subnormal range compare by absolute error.
    """
    rtol = tolerance(dtype, n) * cond
    atol = rtol * atol_scale + float(np.finfo(np.dtype(dtype)).tiny)
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), expected, rtol=rtol, atol=atol, equal_nan=True
    )


@pytest.fixture
def rng():
    return np.random.default_rng(20261125)


@pytest.fixture
def seen(monkeypatch):
    """The arrays the softmax kernel receives, in order (zero-copy tests: the kernel must get
    the caller's own memory)."""
    calls: list[np.ndarray] = []
    original = _core.softmax_into

    def spy(x, out, *args):
        calls.append(x)
        return original(x, out, *args)

    monkeypatch.setattr(_core, "softmax_into", spy)
    return calls


@pytest.fixture
def threads():
    """Restores the thread count a test changed."""
    before = mn.get_num_threads()
    yield
    mn.set_num_threads(before)
