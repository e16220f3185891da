"""The softmax family on bfloat16 and float16 storage (float32 math, one rounding per result)
against the float64 golden and against PyTorch in the same dtype (tests/sixteen.py), on every
ISA path."""

from __future__ import annotations

import numpy as np
import pytest
from sixteen import (
    HALF_NAMES,
    assert_16bit_close,
    dtype_of,
    optional_torch,
    random,
    to_torch,
    widen,
)

import mlmath_native as mn
from mlmath_native.reference import softmax as ref

FORWARD = ["softmax", "log_softmax", "logsumexp"]
BACKWARD = ["softmax_backward", "log_softmax_backward"]


def torch_forward(name, x, axis):
    torch = optional_torch()
    if torch is None:
        return None
    t = to_torch(x)
    if name == "logsumexp":
        return torch.logsumexp(t, dim=axis)
    return getattr(torch, name)(t, dim=axis)


def torch_backward(name, y, dy, axis):
    """PyTorch's gradient through its own 16-bit (log_)softmax, given that op's output y."""
    torch = optional_torch()
    if torch is None:
        return None
    fn = torch.ops.aten._softmax_backward_data
    if name == "log_softmax_backward":
        fn = torch.ops.aten._log_softmax_backward_data
    return fn(to_torch(dy), to_torch(y), axis % y.ndim, to_torch(y).dtype)


def check_forward(name, x, axis=-1, with_torch=True):
    got = getattr(mn, name)(x, axis=axis)
    golden = getattr(ref, name)(widen(x), axis=axis)
    n = x.shape[axis] if x.ndim else 1
    theirs = torch_forward(name, x, axis) if with_torch and x.ndim else None
    # log_softmax = (x - m) - log s: its error is relative to the terms, not to the result
    atol_u = 0.0 if name == "softmax" else 1.0
    assert_16bit_close(got, golden, x.dtype, n=n, atol_u=atol_u, torch_result=theirs)
    return got


def check_backward(name, x, dy, axis=-1):
    forward = name.replace("_backward", "")
    y = getattr(mn, forward)(x, axis=axis)
    got = getattr(mn, name)(y, dy, axis=axis)
    golden = getattr(ref, name)(widen(y), widen(dy), axis=axis)
    # dx = y (dy - sum y dy): a difference of terms of the size of dy
    scale = float(np.max(np.abs(widen(dy)), initial=0.0))
    if "log" in name:
        scale *= x.shape[axis]  # exp(y) sum dy
    assert_16bit_close(
        got,
        golden,
        x.dtype,
        n=x.shape[axis],
        atol_u=2.0,
        scale=scale,
        torch_result=torch_backward(name, y, dy, axis),
    )


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
@pytest.mark.parametrize("name", FORWARD)
def test_row_lengths_1_to_67(name, dtype_name, rng):
    dtype = dtype_of(dtype_name)
    for n in range(1, 68):
        got = check_forward(name, random(rng, (3, n), dtype, 4.0))
        assert got.dtype == dtype


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
@pytest.mark.parametrize("name", FORWARD)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_every_axis_of_3d(name, dtype_name, axis, rng):
    dtype = dtype_of(dtype_name)
    for shape in [(2, 7, 5), (3, 17, 33), (4, 16, 8), (1, 1, 1), (5, 2, 19)]:
        check_forward(name, random(rng, shape, dtype, 3.0), axis=axis)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
@pytest.mark.parametrize("name", BACKWARD)
@pytest.mark.parametrize("axis", [-1, 0])
def test_backward(name, dtype_name, axis, rng):
    dtype = dtype_of(dtype_name)
    for shape in [(3, 1), (4, 7), (2, 8), (3, 17), (5, 33), (9, 67)]:
        x = random(rng, shape, dtype, 3.0)
        check_backward(name, x, random(rng, shape, dtype), axis=axis)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
@pytest.mark.parametrize("name", FORWARD)
def test_non_contiguous_views(name, dtype_name, rng):
    dtype = dtype_of(dtype_name)
    x = random(rng, (9, 40), dtype, 2.0)
    check_forward(name, x[::2, 1::3])
    check_forward(name, x.T, axis=0)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
@pytest.mark.parametrize("name", FORWARD)
def test_long_rows_and_threads(name, dtype_name, rng, threads):
    # 8192 floats of scratch per row: 9001 takes the path that recomputes exp instead
    dtype = dtype_of(dtype_name)
    for n in [8192, 9001]:
        x = random(rng, (3, n), dtype, 3.0)
        mn.set_num_threads(2)
        two = check_forward(name, x)
        mn.set_num_threads(1)
        one = getattr(mn, name)(x)
        np.testing.assert_array_equal(widen(one), widen(two))


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_inplace_softmax_rounds_once(dtype_name, rng):
    dtype = dtype_of(dtype_name)
    x = random(rng, (4, 300), dtype, 3.0)
    want = mn.softmax(x)
    mn.softmax(x, out=x)
    np.testing.assert_array_equal(widen(x), widen(want))


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_extremes_overflow_exactly_where_the_result_does(dtype_name):
    dtype = dtype_of(dtype_name)
    big = float(np.finfo(np.float16).max) if dtype_name == "float16" else 3.3e38
    x = np.array([[-big, big], [big, big], [-big, -big], [0.0, big]]).astype(dtype)
    for name in FORWARD:
        # log_softmax of [-big, big] is -2 big: past the largest finite value, so -inf
        check_forward(name, x, with_torch=False)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 16, 17, 40])
@pytest.mark.parametrize("low", [-86.0, -88.0, -100.0, -np.inf])
def test_rows_inside_and_outside_the_short_exp_range(dtype_name, n, low, rng):
    # Rows whose x - max all lie in [-87, 0] take the short exp (vmath.h, exp_normal_range_16bit);
    # one value below that range, anywhere in the row (the partial tail included), sends the row
    # down the full exp.  Both must match the golden, and a NaN must not hide a small value.
    dtype = dtype_of(dtype_name)
    base = rng.uniform(-80.0, 0.0, size=n)
    for pos in sorted({0, n // 2, n - 1}):
        x = base.copy()
        x[pos] = low
        x = np.stack([x, x + 3.0]).astype(dtype)
        for name in FORWARD:
            check_forward(name, x, with_torch=False)
        if n > 2:
            x[:, (pos + 1) % n] = np.nan  # NaN before or after the small value: the row is NaN
            got = widen(mn.softmax(x))
            assert np.isnan(got).all()


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_nan_and_inf_rows(dtype_name):
    dtype = dtype_of(dtype_name)
    x = np.array(
        [[0.0, np.nan, 1.0], [-np.inf, -np.inf, -np.inf], [np.inf, 0.0, 1.0], [-np.inf, 0.0, 1.0]]
    ).astype(dtype)
    for name in FORWARD:
        got = widen(getattr(mn, name)(x))
        golden = getattr(ref, name)(widen(x))
        np.testing.assert_array_equal(np.isnan(got), np.isnan(golden), err_msg=name)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(golden), err_msg=name)


def test_mixed_dtypes_promote_as_numpy_does(rng):
    bf16 = dtype_of("bfloat16")
    y = mn.softmax(random(rng, (3, 9), bf16))
    assert mn.softmax_backward(y, y.astype(np.float16)).dtype == np.float32
    assert mn.softmax_backward(y, y.astype(np.float32)).dtype == np.float32
    assert mn.softmax_backward(y, y.astype(np.float64)).dtype == np.float64
    assert mn.softmax_backward(y, y).dtype == bf16


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_out_must_have_the_input_dtype(dtype_name, rng):
    dtype = dtype_of(dtype_name)
    x = random(rng, (3, 9), dtype)
    out = np.zeros((3, 9), np.float32)
    with pytest.raises(TypeError, match="out has dtype float32"):
        mn.softmax(x, out=out)
    assert not out.any()
    out16 = np.zeros((3, 9), dtype)
    with pytest.raises(TypeError, match="out has dtype"):
        mn.softmax(x.astype(np.float32), out=out16)
    assert not widen(out16).any()
