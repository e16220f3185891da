"""The vector layer's 16-bit conversions (Note [16-bit storage]) on every ISA path: widening
every one of the 65,536 bit patterns, and rounding float32 values to nearest even, against
NumPy's float16 and ml_dtypes's bfloat16 conversions bit for bit (quiet NaNs compared as NaN).
Lengths cover whole vectors and every partial tail."""

from __future__ import annotations

import numpy as np
import pytest
from sixteen import HALF_NAMES, dtype_of

from mlmath_native import _core


def all_patterns(dtype) -> np.ndarray:
    return np.arange(2**16, dtype=np.uint16).view(dtype)


def float32_cases(rng) -> np.ndarray:
    """Random bit patterns, and the values where rounding is hard: halfway points between
    neighbouring 16-bit values (ties to even), one float32 ulp either side of them, the
    overflow threshold, subnormals, zeros, infinities and NaNs with payloads."""
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    ties_bf16 = (np.arange(2**16, dtype=np.uint32) << 16) | 0x8000
    near = np.concatenate([ties_bf16 - 1, ties_bf16, ties_bf16 + 1])
    f16 = all_patterns(np.float16).astype(np.float32)
    with np.errstate(invalid="ignore"):
        f16_next = np.nextafter(f16, np.float32(np.inf), dtype=np.float32)
        mid = ((f16.astype(np.float64) + f16_next.astype(np.float64)) / 2).astype(np.float32)
    special = np.array(
        [
            0.0,
            -0.0,
            np.inf,
            -np.inf,
            65504.0,
            65519.996,
            65520.0,
            -65520.0,
            3.3895e38,
            3.4e38,
            2.0**-24,
            2.0**-25,
            3 * 2.0**-26,
            1e-45,
            -1e-45,
            2.0**-133,
            2.0**-134,
        ],
        dtype=np.float32,
    )
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF812345, 0x7FBFFFFF], np.uint32)
    return np.concatenate(
        [bits.view(np.float32), near.view(np.float32), mid, special, nans.view(np.float32)]
    )


def same_bits_or_both_nan(got, want) -> None:
    nan = np.isnan(want.astype(np.float32))
    np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_widening_every_pattern_is_exact(dtype_name):
    dtype = dtype_of(dtype_name)
    x = all_patterns(dtype)
    out = np.empty(x.shape, np.float32)
    _core.convert_into(x, out)
    want = x.astype(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(out), nan)
    np.testing.assert_array_equal(out[~nan].view(np.uint32), want[~nan].view(np.uint32))


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_rounding_to_nearest_even(dtype_name, rng):
    dtype = dtype_of(dtype_name)
    x = float32_cases(rng)
    out = np.empty(x.shape, dtype)
    _core.convert_into(x, out)
    with np.errstate(over="ignore", invalid="ignore"):
        same_bits_or_both_nan(out, x.astype(dtype))
    # a NaN stays NaN of the same sign
    nan = np.isnan(x)
    np.testing.assert_array_equal(np.signbit(out[nan].astype(np.float32)), np.signbit(x[nan]))


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
@pytest.mark.parametrize("n", [*range(0, 34), 63, 64, 65])
def test_tails_touch_nothing_past_n(dtype_name, n, rng):
    dtype = dtype_of(dtype_name)
    x = (rng.standard_normal(n) * 100).astype(np.float32)
    out = np.full(n + 8, 7.0, dtype)
    _core.convert_into(x, out[:n])
    np.testing.assert_array_equal(out[:n].astype(np.float32), x.astype(dtype).astype(np.float32))
    assert (out[n:].astype(np.float32) == 7.0).all()
    back = np.full(n + 8, -1.0, np.float32)
    _core.convert_into(out[:n], back[:n])
    np.testing.assert_array_equal(back[:n], x.astype(dtype).astype(np.float32))
    assert (back[n:] == -1.0).all()
