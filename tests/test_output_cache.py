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


def test_sizes_no_longer_used_age_out(rng, cache_limit):
    """The cache is LRU by bytes (issue 17: blocks of a size no longer used pinned the budget,
    and every new size then missed for ever)."""
    mn.set_output_cache(0)
    mn.set_output_cache(6 << 20)
    for rows in (512, 1024):  # 2 MiB and 4 MiB of float32 results, dropped: 6 MiB pinned
        mn.softmax(np.ones((rows, 1024), np.float32))
    assert mn.output_cache_info()["cached_bytes"] == 6 << 20
    x = rng.standard_normal((768, 1024)).astype(np.float32)  # 3 MiB: a new size
    mn.softmax(x)  # a miss; its release evicts the least recently released blocks
    info = mn.output_cache_info()
    assert info["cached_bytes"] == 3 << 20 and info["cached_blocks"] == 1
    hits = info["hits"]
    for _ in range(3):
        y = mn.softmax(x)
        np.testing.assert_array_equal(y, mn.softmax(x, out=np.empty_like(x)))
        del y
    assert mn.output_cache_info()["hits"] == hits + 3


def test_most_recently_released_blocks_stay(cache_limit):
    mn.set_output_cache(0)
    mn.set_output_cache(5 << 20)
    a = mn.softmax(np.ones((512, 1024), np.float32))  # 2 MiB
    b = mn.softmax(np.ones((256, 1024), np.float32))  # 1 MiB
    c = mn.softmax(np.ones((384, 1024), np.float32))  # 1.5 MiB
    del a, b, c  # released in this order: 4.5 MiB fit
    assert mn.output_cache_info()["cached_blocks"] == 3
    d = mn.softmax(np.ones((640, 1024), np.float32))  # 2.5 MiB, a miss
    del d  # 7 MiB > 5 MiB: a (2 MiB, the oldest) goes, 5 MiB stay
    info = mn.output_cache_info()
    assert info["cached_blocks"] == 3 and info["cached_bytes"] == 5 << 20
    assert info["evictions"] >= 1
    hits = info["hits"]
    mn.softmax(np.ones((512, 1024), np.float32))  # a's size is gone: a miss
    assert mn.output_cache_info()["hits"] == hits
