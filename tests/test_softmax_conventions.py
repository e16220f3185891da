"""The softmax family takes the arguments SciPy and PyTorch taught their users (issue 23):
tuple and None axes (scipy.special.softmax / log_softmax / logsumexp), logsumexp's ``b``,
``return_sign``, positional ``keepdims`` and ``out=``, and ``dtype=`` on softmax / log_softmax
(torch.softmax's).  Each is checked against SciPy or PyTorch on the same inputs, and against
float64 with the family's tolerances."""

from __future__ import annotations

import math

import numpy as np
import pytest

import mlmath_native as mn

from conftest import assert_close

sp = pytest.importorskip("scipy.special")

SHAPES_AXES = [
    ((3, 4, 5), None),
    ((3, 4, 5), (0, 2)),  # not adjacent: moved last, copied
    ((3, 4, 5), (1, 2)),  # adjacent: merged in place
    ((3, 4, 5), (2, 0)),
    ((3, 4, 5), (-1, -3)),
    ((3, 4, 5), (0,)),
    ((3, 4, 5), ()),
    ((2, 1, 7, 3), (1, 3)),
    ((2, 1, 7, 3), (0, 1, 2, 3)),
    ((17,), None),
    ((0, 3, 4), (1, 2)),  # empty outside the axes
    ((3, 0, 4), (0, 1)),  # empty along them
]


def length(shape, axis):
    if axis is None:
        return math.prod(shape)
    return math.prod(shape[a] for a in axis)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
def test_tuple_and_none_axes_match_scipy(shape, axis, dtype, rng):
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    x64 = x.astype(np.float64)
    n = length(shape, axis)
    for ours, theirs in ((mn.softmax, sp.softmax), (mn.log_softmax, sp.log_softmax)):
        got = ours(x, axis=axis)
        assert got.shape == x.shape and got.dtype == dtype and got.flags.c_contiguous
        if n == 0:
            continue  # SciPy raises on an empty reduction (no maximum); ours is empty as x is
        assert_close(got, theirs(x64, axis=axis), dtype, n, atol_scale=4)
    got = mn.logsumexp(x, axis)
    kept = mn.logsumexp(x, axis, True)  # keepdims, positional as in SciPy's order
    if x.size:
        want = sp.logsumexp(x64, axis=axis)
        want_kept = sp.logsumexp(x64, axis=axis, keepdims=True)
    else:  # SciPy 1.17 raises IndexError on an empty array with a tuple axis: by definition
        want_kept = np.full(kept.shape, -np.inf if n == 0 else 0.0)  # log of an empty sum
        want = np.squeeze(want_kept, axis=axis)
    assert np.shape(got) == np.shape(want) and np.asarray(got).dtype == dtype
    assert_close(got, want, dtype, n, atol_scale=4)
    assert kept.shape == want_kept.shape


def test_non_contiguous_input_with_tuple_axes(rng):
    x = rng.standard_normal((6, 5, 4)).transpose(2, 0, 1)[:, ::2]
    for axis in ((0, 2), (1, 2), None):
        assert_close(mn.softmax(x, axis=axis), sp.softmax(x, axis=axis), np.float64, 60)
        assert_close(mn.logsumexp(x, axis), sp.logsumexp(x, axis=axis), np.float64, 60)


@pytest.mark.parametrize("shape,axis", SHAPES_AXES[:9])
def test_backward_with_tuple_axes(shape, axis, rng):
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    red = tuple(range(len(shape))) if axis is None else axis
    y = sp.softmax(x, axis=axis)
    want = y * (dy - np.sum(y * dy, axis=red, keepdims=True))
    assert_close(mn.softmax_backward(y, dy, axis), want, np.float64, 60, atol_scale=4)
    ly = sp.log_softmax(x, axis=axis)
    want = dy - np.exp(ly) * np.sum(dy, axis=red, keepdims=True)
    assert_close(mn.log_softmax_backward(ly, dy, axis), want, np.float64, 60, atol_scale=4)


def test_zero_d_inputs():
    x = np.float64(2.5)
    for axis in (None, 0, -1, (0,), ()):
        assert float(mn.softmax(x, axis=axis)) == 1.0
        assert float(mn.log_softmax(x, axis=axis)) == 0.0
        assert float(mn.logsumexp(x, axis)) == 2.5
    assert float(sp.logsumexp(x)) == 2.5


def test_softmax_out_with_tuple_axes(rng):
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    out = np.full((5, 4, 3), 7, np.float32).T  # a non-contiguous view
    assert mn.softmax(x, axis=(0, 2), out=out) is out
    assert_close(out, sp.softmax(x.astype(np.float64), axis=(0, 2)), np.float32, 15)
    assert mn.log_softmax(x, axis=(0, 2), out=x) is x  # in place
    assert_close(x, np.log(out.astype(np.float64)), np.float32, 15, atol_scale=4)


# -- logsumexp: b, return_sign, out ---------------------------------------------------------------


@pytest.mark.parametrize("return_sign", [False, True])
@pytest.mark.parametrize(
    "b_shape,axis",
    [((3, 4, 5), -1), ((4, 1), None), ((4, 1), (0, 2)), ((5,), 1), ((2, 3, 4, 5), (1, 3))],
)
def test_logsumexp_with_factors_matches_scipy(b_shape, axis, return_sign, rng):
    x = rng.standard_normal((3, 4, 5)) * 2
    b = rng.standard_normal(b_shape)  # of both signs: some sums are negative
    got = mn.logsumexp(x, axis, b=b, return_sign=return_sign)
    want = sp.logsumexp(x, axis=axis, b=b, return_sign=return_sign)
    if not return_sign:
        got, want = (got, None), (want, None)
    res, sgn = got
    assert np.shape(res) == np.shape(want[0])
    # near a cancelling sum log|s| is ill-conditioned: compare where |s| is not tiny
    np.testing.assert_allclose(res, want[0], rtol=1e-9, atol=1e-9, equal_nan=True)
    if return_sign:
        np.testing.assert_array_equal(sgn, want[1])
    elif np.ndim(res):
        assert np.isnan(res).any()  # some sums are negative: NaN, as SciPy's


def test_logsumexp_factors_special_values():
    inf, nan = np.inf, np.nan
    cases = [
        ([inf, 1.0], [0.0, 1.0]),  # a zero factor drops inf
        ([nan, 1.0], [0.0, 1.0]),  # and NaN
        ([inf, 1.0], [-1.0, 1.0]),  # -inf sum
        ([inf, inf], [1.0, -1.0]),  # inf - inf
        ([-inf, -inf], [1.0, 1.0]),
        ([1.0, 1.0], [1.0, -1.0]),  # an exact zero sum
        ([1.0, 2.0], [0.0, 0.0]),
        ([800.0, 799.0], [1.0, -1.0]),  # large, finite
    ]
    for x, b in cases:
        for return_sign in (False, True):
            got = mn.logsumexp(np.array(x), b=np.array(b), return_sign=return_sign)
            want = sp.logsumexp(np.array(x), b=np.array(b), return_sign=return_sign)
            np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True, err_msg=f"{x} {b}")


def test_logsumexp_sign_without_factors():
    x = np.array([[0.0, 1.0], [-np.inf, -np.inf], [np.nan, 1.0], [np.inf, 0.0]])
    res, sgn = mn.logsumexp(x, -1, return_sign=True)
    want = sp.logsumexp(x, axis=-1, return_sign=True)
    np.testing.assert_allclose(res, want[0], rtol=1e-15, equal_nan=True)
    np.testing.assert_array_equal(sgn, want[1])
    assert sgn.dtype == res.dtype


def test_logsumexp_of_an_empty_sum_has_sign_zero():
    """log 0 = -inf with sign 0, also over an empty axis (SciPy gives -1 there: the sign of its
    -inf, while its all -inf slices get 0; ours is 0 for both)."""
    res, sgn = mn.logsumexp(np.zeros((2, 0)), 1, return_sign=True)
    np.testing.assert_array_equal(res, [-np.inf, -np.inf])
    np.testing.assert_array_equal(sgn, [0.0, 0.0])
    res, sgn = mn.logsumexp(np.zeros((2, 0)), 1, b=np.ones(0), return_sign=True)
    np.testing.assert_array_equal(sgn, [0.0, 0.0])


@pytest.mark.parametrize(
    "x_dtype,b_dtype", [(np.float32, np.float32), (np.float32, np.float64), (np.int64, None)]
)
def test_logsumexp_result_dtype_as_scipy(x_dtype, b_dtype):
    x = np.arange(6, dtype=x_dtype).reshape(2, 3)
    b = None if b_dtype is None else np.ones(3, b_dtype)
    assert mn.logsumexp(x, -1, b=b).dtype == sp.logsumexp(x, axis=-1, b=b).dtype


def test_logsumexp_factors_in_16_bits(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = rng.standard_normal((4, 300)).astype(ml_dtypes.bfloat16)
    b = rng.uniform(0.5, 2, 300).astype(ml_dtypes.bfloat16)
    got = mn.logsumexp(x, -1, b=b)
    assert got.dtype == ml_dtypes.bfloat16
    want = sp.logsumexp(x.astype(np.float64), axis=-1, b=b.astype(np.float64))
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=2**-7)


def test_logsumexp_out(rng):
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    out = np.zeros((4,), np.float32)
    assert mn.logsumexp(x, (0, 2), out=out) is out
    assert_close(out, sp.logsumexp(x.astype(np.float64), axis=(0, 2)), np.float32, 15)
    kept = np.zeros((1, 4, 1), np.float32)
    res, sgn = mn.logsumexp(x, (0, 2), True, return_sign=True, out=kept)
    assert res is kept and sgn.shape == (1, 4, 1)
    scalar = np.zeros((), np.float32)
    assert mn.logsumexp(x, None, out=scalar) is scalar
    before = out.copy()
    with pytest.raises(ValueError, match="logsumexp: out has shape"):
        mn.logsumexp(x, (0, 1), out=out)
    with pytest.raises(TypeError, match="logsumexp: out has dtype"):
        mn.logsumexp(x, (0, 2), out=np.zeros(4))
    np.testing.assert_array_equal(out, before)


# -- dtype= on softmax / log_softmax (torch.softmax's) ------------------------------------------


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
@pytest.mark.parametrize("src,dst", [(np.float32, np.float64), (np.float64, np.float32)])
def test_dtype_matches_torch(fn, src, dst, rng):
    torch = pytest.importorskip("torch")
    x = (rng.standard_normal((8, 37)) * 4).astype(src)
    got = getattr(mn, fn)(x, 1, dtype=dst)
    want = getattr(torch, fn)(torch.from_numpy(x), 1, dtype=getattr(torch, np.dtype(dst).name))
    assert got.dtype == dst
    assert_close(got, want.double().numpy(), dst, 37, atol_scale=4)
    ref = getattr(sp, fn)(x.astype(dst).astype(np.float64), axis=1)  # cast first, then computed
    assert_close(got, ref, dst, 37, atol_scale=4)


def test_dtype_16_bit_and_out(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = rng.standard_normal((4, 64)).astype(np.float32)
    got = mn.softmax(x, dtype="float16")
    assert got.dtype == np.float16
    got = mn.softmax(x, dtype=ml_dtypes.bfloat16)
    assert got.dtype == ml_dtypes.bfloat16
    out = np.empty((4, 64), np.float64)
    assert mn.log_softmax(x, dtype=np.float64, out=out) is out
    with pytest.raises(TypeError, match="out has dtype"):
        mn.softmax(x, dtype=np.float64, out=np.empty((4, 64), np.float32))


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda x: mn.softmax(x, axis=(0, 0)), ValueError, "names an axis twice"),
        (lambda x: mn.logsumexp(x, (1, -1)), ValueError, "names an axis twice"),
        (lambda x: mn.softmax(x, axis=[0, 1]), TypeError, "tuple of integers or None"),
        (lambda x: mn.log_softmax(x, axis=(0, 3)), np.exceptions.AxisError, "out of bounds"),
        (lambda x: mn.softmax(x, dtype=np.int32), TypeError, "dtype int32 is not supported"),
        (lambda x: mn.softmax(x, dtype="no such"), TypeError, "not a NumPy dtype"),
        (lambda x: mn.logsumexp(x, b=np.ones(4)), ValueError, "does not broadcast"),
        (lambda x: mn.logsumexp(x, b=np.ones(3, complex)), TypeError, "b has unsupported"),
        (lambda x: mn.softmax_backward(x, x, axis=(1, 1)), ValueError, "twice"),
    ],
)
def test_bad_arguments_raise_and_write_nothing(call, error, match):
    x = np.arange(6.0).reshape(2, 3)
    before = x.copy()
    with pytest.raises(error, match=match):
        call(x)
    np.testing.assert_array_equal(x, before)
