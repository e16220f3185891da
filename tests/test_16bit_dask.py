"""mlmath_native.dask on bfloat16 and float16 dask arrays: the blocks keep their 16-bit dtype
and give the in-memory results bit for bit; cross-entropy losses are float32."""

from __future__ import annotations

import numpy as np
import pytest
from sixteen import HALF_NAMES, dtype_of, random

import mlmath_native as mn

da = pytest.importorskip("dask.array")
mnd = pytest.importorskip("mlmath_native.dask")


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_blocks_keep_the_dtype(name, dtype_name, rng):
    x = random(rng, (64, 50), dtype_of(dtype_name), 3.0)
    y = getattr(mnd, name)(da.from_array(x, chunks=(16, 25)))
    assert y.dtype == x.dtype
    got = y.compute()
    np.testing.assert_array_equal(got.view(np.uint16), getattr(mn, name)(x).view(np.uint16))


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy_loss_is_float32(reduction, dtype_name, rng):
    x = random(rng, (64, 50), dtype_of(dtype_name), 3.0)
    t = rng.integers(0, 50, 64)
    w = rng.random(50).astype(np.float64) + 0.5
    loss = mnd.cross_entropy(
        da.from_array(x, chunks=(16, 25)),
        da.from_array(t, chunks=16),
        weight=w,
        reduction=reduction,
    )
    assert loss.dtype == np.float32
    got = loss.compute()
    want = mn.cross_entropy(x, t, weight=w, reduction=reduction)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)
