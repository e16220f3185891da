"""The softmax family against the float64 reference, on every ISA path (the CI runs this file
once per MLMATH_NATIVE_ISA value), with tails, strides, axes, special values and hypothesis."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mlmath_native as mn
from mlmath_native import _core
from mlmath_native.reference import softmax as ref

from conftest import assert_close, tolerance

# np.exceptions is NumPy >= 1.25; the package supports 1.23 (Debian 12 has 1.24)
AxisError = getattr(np, "exceptions", np).AxisError

DTYPES = [np.float32, np.float64]
FORWARD = ["softmax", "log_softmax"]


def check_forward(name, x, axis=-1, **kwargs):
    """mn.<name>(x) against the reference, with the tolerance of the axis length."""
    got = getattr(mn, name)(x, axis=axis, **kwargs)
    want = getattr(ref, name)(np.asarray(x, dtype=np.float64), axis=axis)
    x = np.asarray(x)
    n = x.shape[axis] if x.ndim else 1
    dtype = got.dtype
    assert got.shape == np.shape(want)
    # x - max(x) is rounded to dtype: the relative error of exp grows with the spread of x
    scale = 1.0 + 2 * np.nanmax(np.abs(np.where(np.isfinite(x), x, 0)), initial=0.0)
    if name == "softmax":
        assert_close(got, want, dtype, n, cond=scale)
    else:
        assert_close(got, want, dtype, n, atol_scale=scale)
    return got


# -- lengths across the vector-width tails, every layout ------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FORWARD + ["logsumexp"])
def test_row_lengths_1_to_67(name, dtype, rng):
    for n in range(1, 68):
        x = (rng.standard_normal((3, n)) * 4).astype(dtype)
        got = check_forward(name, x)
        assert got.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FORWARD + ["logsumexp"])
@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2, -3])
def test_every_axis_of_3d(name, dtype, axis, rng):
    # inner sizes 1, 5, 17, 33 cover column groups below, equal to and above the widths
    for shape in [(2, 7, 5), (3, 17, 33), (4, 16, 8), (1, 1, 1), (5, 2, 19)]:
        x = (rng.standard_normal(shape) * 3).astype(dtype)
        check_forward(name, x, axis=axis)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FORWARD + ["logsumexp"])
def test_column_blocks(name, dtype, rng):
    # axis not last: blocks of 1..4 vectors of columns, each with a partial last vector
    for inner in [2, 7, 8, 9, 16, 17, 31, 33, 47, 63, 64, 65, 100, 129, 200]:
        x = (rng.standard_normal((2, 11, inner)) * 3).astype(dtype)
        check_forward(name, x, axis=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True])
def test_backward_column_blocks(dtype, log, rng):
    fwd = mn.log_softmax if log else mn.softmax
    bwd = mn.log_softmax_backward if log else mn.softmax_backward
    ref_bwd = ref.log_softmax_backward if log else ref.softmax_backward
    for inner in [3, 16, 47, 65, 129]:
        x = rng.standard_normal((3, 9, inner)).astype(dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        y = fwd(x, axis=1)
        want = ref_bwd(y.astype(np.float64), dy.astype(np.float64), axis=1)
        assert_close(bwd(y, dy, axis=1), want, dtype, 9, atol_scale=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FORWARD + ["logsumexp"])
def test_non_contiguous_views(name, dtype, rng):
    base = (rng.standard_normal((12, 40, 9)) * 2).astype(dtype)
    views = [
        base[::2],
        base[:, ::-1],
        base[..., ::-3],
        base.transpose(2, 0, 1),
        base[3:9, 5:37, 2],
        np.swapaxes(base, 0, 1)[::-2],
    ]
    for v in views:
        for axis in range(-v.ndim, v.ndim):
            check_forward(name, v, axis=axis)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_rows_and_threads(dtype, rng, threads):
    """Rows long enough to be split over threads, and bitwise equal for 1, 2 and 3 threads."""
    x = (rng.standard_normal((64, 3000)) * 5).astype(dtype)
    cols = (rng.standard_normal((8, 300, 40)) * 5).astype(dtype)
    results = []
    for t in (1, 2, 3):
        mn.set_num_threads(t)
        results.append(
            [
                mn.softmax(x),
                mn.log_softmax(x),
                mn.logsumexp(x),
                mn.softmax(cols, axis=1),
                mn.logsumexp(cols, axis=1),
                mn.softmax_backward(mn.softmax(x), x),
            ]
        )
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)
    check_forward("softmax", x)
    check_forward("log_softmax", cols, axis=1)


# -- special values -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_values_do_not_overflow(dtype):
    x = np.array([[1e4, 0.0, -1e4], [-1e4, -1e4, -1e4], [1e4, 1e4, 1e4]], dtype=dtype)
    for name in FORWARD + ["logsumexp"]:
        got = check_forward(name, x)
        assert np.all(np.isfinite(got))
    big = np.finfo(dtype).max
    y = mn.softmax(np.array([big, -big, big / 2], dtype=dtype))
    np.testing.assert_array_equal(y, np.array([1, 0, 0], dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 8, 16, 19, 40])
def test_inf_and_nan_rows(dtype, n):
    rows = np.zeros((6, n), dtype=dtype)
    rows[0, 0] = -np.inf  # allowed: probability 0 (when n > 1)
    rows[1] = -np.inf  # all -inf: NaN row (logsumexp -inf)
    rows[2, n // 2] = np.inf  # +inf: NaN row (logsumexp +inf)
    rows[3, n - 1] = np.nan  # NaN: NaN row
    rows[4] = np.arange(n)  # ordinary
    rows[5, 0] = np.inf
    rows[5, n - 1] = np.nan  # +inf and NaN: NaN everywhere, logsumexp NaN
    for axis_view in (rows, np.ascontiguousarray(rows.T)):
        axis = -1 if axis_view is rows else 0
        for name in FORWARD + ["logsumexp"]:
            check_forward(name, axis_view, axis=axis)
    y = mn.softmax(rows)
    assert np.all(np.isnan(y[1:4])) and np.all(np.isnan(y[5]))
    assert np.all(np.isfinite(y[4]))
    if n > 1:
        assert y[0, 0] == 0 and np.isfinite(y[0]).all()
    lse = mn.logsumexp(rows)
    assert lse[1] == -np.inf and lse[2] == np.inf and np.isnan(lse[3]) and np.isnan(lse[5])


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_probabilities_keep_relative_accuracy(dtype):
    # exp(x - m) far below the smallest normal number: subnormal results, then exact zero
    x = np.array([0.0, -80.0, -87.0, -95.0, -103.0, -120.0, -740.0, -760.0], dtype=dtype)
    check_forward("softmax", x)
    check_forward("log_softmax", x)


# -- shapes: 0-d, empty, size 1 -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_d(dtype):
    x = np.array(3.5, dtype=dtype)
    for axis in (0, -1):
        assert mn.softmax(x, axis=axis) == 1 and mn.softmax(x, axis=axis).shape == ()
        assert mn.log_softmax(x, axis=axis) == 0
        assert mn.logsumexp(x, axis=axis) == dtype(3.5)
    with pytest.raises(AxisError):
        mn.softmax(x, axis=1)


@pytest.mark.parametrize(
    "shape,axis", [((0,), 0), ((0, 5), 1), ((5, 0), 1), ((5, 0), 0), ((2, 0, 3), 2)]
)
def test_empty(shape, axis):
    x = np.zeros(shape, np.float32)
    for name in FORWARD:
        got = getattr(mn, name)(x, axis=axis)
        assert got.shape == shape and got.dtype == np.float32
    lse = mn.logsumexp(x, axis=axis)
    want = ref.logsumexp(x.astype(np.float64), axis=axis)
    assert lse.shape == np.shape(want)
    np.testing.assert_array_equal(lse, want)


def test_logsumexp_keepdims_and_scalar(rng):
    x = rng.standard_normal((4, 6, 5))
    for axis in range(3):
        got = mn.logsumexp(x, axis=axis, keepdims=True)
        want = ref.logsumexp(x, axis=axis, keepdims=True)
        assert got.shape == want.shape
        assert_close(got, want, np.float64, x.shape[axis])
    s = mn.logsumexp(np.zeros(4, np.float32))
    assert isinstance(s, np.float32) and np.isclose(s, np.log(4))


# -- dtype policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x",
    [[1, 2, 3], np.arange(5, dtype=np.int8), np.array([True, False]), np.ones(3, np.longdouble)],
)
def test_other_real_dtypes_compute_in_float64(x):
    for name in FORWARD + ["logsumexp"]:
        got = getattr(mn, name)(x)
        assert got.dtype == np.float64
        check_forward(name, x)


# -- out= -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FORWARD)
def test_out_aliasing_the_input(name, dtype, rng):
    x = rng.standard_normal((9, 21)).astype(dtype)
    want = getattr(ref, name)(x.astype(np.float64), axis=0)
    buf = x.copy()
    res = getattr(mn, name)(buf, axis=0, out=buf)
    assert res is buf
    assert_close(buf, want, dtype, 9, atol_scale=5)
    # in place on a non-contiguous view: written through a temporary, exactly into the view
    big = rng.standard_normal((9, 42)).astype(dtype)
    view = big[:, ::2]
    expected_rest = big[:, 1::2].copy()
    want = getattr(ref, name)(view.astype(np.float64))
    assert getattr(mn, name)(view, out=view) is view
    assert_close(view, want, dtype, 21, atol_scale=5)
    np.testing.assert_array_equal(big[:, 1::2], expected_rest)


@pytest.mark.parametrize("name", FORWARD)
def test_out_partially_overlapping_the_input(name, rng):
    buf = rng.standard_normal(40)
    x = buf[:30]
    want = getattr(ref, name)(x.copy())
    out = buf[10:]
    getattr(mn, name)(x, out=out)
    assert_close(out, want, np.float64, 30, atol_scale=5)


# -- backward -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True])
def test_backward(dtype, log, rng):
    fwd = mn.log_softmax if log else mn.softmax
    bwd = mn.log_softmax_backward if log else mn.softmax_backward
    ref_bwd = ref.log_softmax_backward if log else ref.softmax_backward
    shapes = [(3, n) for n in range(1, 40)] + [(4, 9, 6), (2, 33, 17)]
    for shape in shapes:
        for axis in {-1, 0, len(shape) - 2}:
            x = (rng.standard_normal(shape) * 2).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            y = fwd(x, axis=axis)
            got = bwd(y, dy, axis=axis)
            want = ref_bwd(y.astype(np.float64), dy.astype(np.float64), axis=axis)
            assert got.dtype == dtype and got.shape == shape
            assert_close(got, want, dtype, shape[axis], atol_scale=4)


def test_backward_against_finite_differences(rng):
    x = rng.standard_normal((3, 7))
    dy = rng.standard_normal((3, 7))
    h = 1e-6
    for fwd, bwd in [(mn.softmax, mn.softmax_backward), (mn.log_softmax, mn.log_softmax_backward)]:
        analytic = bwd(fwd(x), dy)
        numeric = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            e = np.zeros_like(x)
            e[idx] = h
            numeric[idx] = np.sum(dy * (fwd(x + e) - fwd(x - e))) / (2 * h)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_backward_mixed_dtypes_promote(rng):
    y = mn.softmax(rng.standard_normal((2, 5)).astype(np.float32))
    dy = rng.standard_normal((2, 5))
    assert mn.softmax_backward(y, dy).dtype == np.float64
    assert mn.softmax_backward(y, dy.astype(np.float32)).dtype == np.float32


# -- the vector exp itself ------------------------------------------------------------------------


def test_vector_exp_float32_dense_sweep():
    """Within 2 ulp of the correctly rounded exp over the whole finite float32 range
    (including the subnormal results and the overflow edge), with every tail length."""
    x = np.linspace(-104.0, 89.0, 2_000_003, dtype=np.float32)
    x = np.concatenate([x, np.float32(np.random.default_rng(1).uniform(-110, 90, 100_000))])
    y = np.empty_like(x)
    _core.exp_into(x, y)
    want = np.exp(x.astype(np.float64))
    finite = want <= np.finfo(np.float32).max
    assert np.all(np.isposinf(y[~finite]))
    with np.errstate(over="ignore"):
        ulp = np.spacing(want[finite].astype(np.float32)).astype(np.float64)
    err = np.abs(y[finite].astype(np.float64) - want[finite]) / ulp
    assert err.max() <= 2.0, f"max error {err.max():.2f} ulp at x={x[finite][err.argmax()]}"
    for n in range(1, 40):  # tails: partial loads and stores must not touch past n
        buf = np.full(n + 8, -7.0, np.float32)
        _core.exp_into(x[:n], buf[:n])
        np.testing.assert_array_equal(buf[n:], np.float32(-7.0))


def test_vector_exp_float64_dense_sweep():
    x = np.linspace(-745.5, 709.78, 2_000_003)
    y = np.empty_like(x)
    _core.exp_into(x, y)
    want = np.exp(x)
    normal = want >= np.finfo(np.float64).tiny
    err = np.abs(y - want) / np.spacing(want)
    assert err[normal].max() <= 2.0
    assert err[~normal].max() <= 1.0  # subnormal results: within one subnormal step


@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_exp_special_values(dtype):
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0], dtype=dtype)
    y = np.empty_like(x)
    _core.exp_into(x, y)
    assert np.isnan(y[0])
    np.testing.assert_array_equal(y[1:5], np.array([np.inf, 0, 1, 1], dtype=dtype))
    assert_close(y[5:], np.exp([1.0, -1.0]), dtype)


# -- hypothesis: arbitrary shapes, axes and values ------------------------------------------------


@st.composite
def arrays_and_axis(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=24))
    elements = st.floats(-60, 60, width=32 if dtype == np.float32 else 64)
    x = draw(hnp.arrays(dtype, shape, elements=elements))
    ndim = max(len(shape), 1)
    axis = draw(st.integers(-ndim, ndim - 1))
    if draw(st.booleans()) and x.ndim >= 2:
        x = np.swapaxes(x, 0, -1)  # a non-contiguous view
    return x, axis


@settings(max_examples=150, deadline=None)
@given(arrays_and_axis(), st.sampled_from(FORWARD + ["logsumexp"]))
def test_hypothesis_shapes(x_axis, name):
    x, axis = x_axis
    check_forward(name, x, axis=axis)


@settings(max_examples=60, deadline=None)
@given(arrays_and_axis(), st.booleans())
def test_hypothesis_backward(x_axis, log):
    x, axis = x_axis
    fwd = mn.log_softmax if log else mn.softmax
    bwd = mn.log_softmax_backward if log else mn.softmax_backward
    ref_bwd = ref.log_softmax_backward if log else ref.softmax_backward
    y = fwd(x, axis=axis)
    dy = np.cos(np.arange(x.size, dtype=x.dtype)).reshape(x.shape)
    got = bwd(y, dy, axis=axis)
    want = ref_bwd(y.astype(np.float64), dy.astype(np.float64), axis=axis)
    n = x.shape[axis] if x.ndim else 1
    assert_close(got, want, x.dtype, n, atol_scale=4)


def test_tolerance_grows_with_length():
    assert tolerance(np.float32, 4096) > tolerance(np.float32, 16) > tolerance(np.float64, 16)


# -- large common offsets (issue 17: log_softmax formed x - (m + log s) and lost log s) ----------


def _offset_rows(dtype, offset, n, rows=3):
    """Rows offset + k * ulp(offset), k = 0..n-1 mixed: exact in dtype, spread of a few ulp, so
    the exact log_softmax is that of k * ulp (small numbers) whatever the offset."""
    offset = float(dtype(offset))  # representable
    ulp = float(np.spacing(np.abs(dtype(offset))))
    k = np.arange(rows * n).reshape(rows, n) % 5
    x = (np.float64(offset) + k * ulp).astype(dtype)
    assert np.array_equal(x.astype(np.float64) - np.float64(offset), k * ulp)  # exact
    return x


OFFSETS = {
    np.float32: [1e8, -1e8, 3e38, -3e38, 1e20, 4096.0],
    np.float64: [1e17, -1e17, 1e300, -1e300, 1e200],
}


@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FORWARD + ["logsumexp"])
def test_large_common_offset(name, dtype, layout):
    for offset in OFFSETS[dtype]:
        for n in [1, 2, 3, 7, 8, 9, 17, 33]:
            x = _offset_rows(dtype, offset, n)
            axis = -1
            if layout == "cols":
                x, axis = np.ascontiguousarray(x.T), 0
            got = getattr(mn, name)(x, axis=axis)
            want = getattr(ref, name)(x.astype(np.float64), axis=axis)
            # error relative to the result's own scale: the spread of the row (a few ulp of
            # the offset), not the offset itself
            spread = 1.0 + float(np.ptp(x.astype(np.float64)))
            scale = abs(offset) if name == "logsumexp" else spread
            assert_close(got, want, dtype, n, atol_scale=scale)


def test_log_softmax_issue_reproducers():
    np.testing.assert_allclose(
        mn.log_softmax(np.array([1e8, 1e8], np.float32)), [-np.log(2)] * 2, rtol=1e-6
    )
    np.testing.assert_allclose(
        mn.log_softmax(np.full(5, -3e38, np.float32)), [-np.log(5)] * 5, rtol=1e-6
    )
