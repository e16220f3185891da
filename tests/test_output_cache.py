"""The output cache (Note [output cache]): large results reuse blocks of dead results only."""

from __future__ import annotations

import numpy as np
import pytest

import mlmath_native as mn

LARGE = (512, 1024)  # 2 MiB of float32: above the 1 MiB threshold


@pytest.fixture
def cache_limit():
    before = mn.output_cache_info()["limit_bytes"]
    yield
    mn.set_output_cache(before)


def test_live_results_never_share_memory(rng, cache_limit):
    mn.set_output_cache(256 << 20)
    x = rng.standard_normal(LARGE).astype(np.float32)
    first = mn.softmax(x)
    keep = first.copy()
    view = mn.log_softmax(x)[3]  # only a view of the result stays alive
    view_keep = view.copy()
    results = [mn.softmax(x * k) for k in (2.0, 3.0, 4.0)]
    for r in results:
        assert not np.shares_memory(r, first) and not np.shares_memory(r, view)
    np.testing.assert_array_equal(first, keep)
    np.testing.assert_array_equal(view, view_keep)


def test_dropped_results_are_reused_and_correct(rng, cache_limit):
    mn.set_output_cache(256 << 20)
    x = rng.standard_normal(LARGE).astype(np.float32)
    want = mn.softmax(x, out=np.empty_like(x))
    mn.softmax(x)  # dropped at once: its block goes back to the cache
    hits = mn.output_cache_info()["hits"]
    y = mn.softmax(x)
    assert mn.output_cache_info()["hits"] == hits + 1
    assert y.flags.writeable and y.flags.c_contiguous and y.dtype == np.float32
    np.testing.assert_array_equal(y, want)


def test_limit_zero_empties_and_disables(rng, cache_limit):
    x = rng.standard_normal(LARGE)
    mn.softmax(x)
    mn.set_output_cache(0)
    info = mn.output_cache_info()
    assert info["cached_bytes"] == 0 and info["cached_blocks"] == 0 and info["limit_bytes"] == 0
    misses = info["misses"]
    mn.softmax(x)
    mn.softmax(x)
    assert mn.output_cache_info()["misses"] == misses + 2
    assert mn.output_cache_info()["cached_bytes"] == 0


def test_small_results_come_from_numpy():
    y = mn.softmax(np.ones((4, 5), np.float32))
    assert y.flags.owndata
