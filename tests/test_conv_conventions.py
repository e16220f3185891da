"""The convolutions take the arguments PyTorch and SciPy taught their users (issue 23):
one-element sequences for conv2d's stride / padding / dilation (torch expands them), an error
for a wrong length that says what is accepted, and scipy.signal's correlate2d / convolve2d
result dtypes (integers stay integers, wrapping as SciPy's integer arithmetic does; complex
computed through the real kernels), exception types and one-element ``fillvalue`` arrays."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import mlmath_native as mn

signal = pytest.importorskip("scipy.signal")


def scipy_call(name, *args, **kw):
    """scipy.signal's function; the warnings of its fillvalue cast (it reads the value as a
    complex number, then casts it to the result dtype) are not errors here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
        warnings.filterwarnings("ignore", "invalid value encountered in cast", RuntimeWarning)
        return getattr(signal, name)(*args, **kw)


# -- conv2d / conv2d_backward: one-element sequences, as torch -----------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(stride=(2,)),
        dict(padding=(1,)),
        dict(dilation=[2]),
        dict(stride=[2], padding=[2], dilation=(2,)),
    ],
)
def test_conv2d_one_element_sequences_as_torch(kw, rng):
    x = rng.standard_normal((2, 3, 11, 12))
    w = rng.standard_normal((4, 3, 3, 3))
    got = mn.conv2d(x, w, **kw)
    as_ints = {k: v[0] for k, v in kw.items()}
    np.testing.assert_array_equal(got, mn.conv2d(x, w, **as_ints))
    grads = mn.conv2d_backward(x, w, np.ones_like(got), **kw)
    for g, h in zip(grads, mn.conv2d_backward(x, w, np.ones_like(got), **as_ints), strict=True):
        np.testing.assert_array_equal(g, h)
    torch = pytest.importorskip("torch")
    want = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), **kw)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(stride=(1, 1, 1)), r"stride has 3 values \(expected an int, or a sequence of 1 or 2"),
        (dict(dilation=()), r"dilation has 0 values \(expected an int, or a sequence of 1 or 2"),
        (dict(padding=(1, 1, 1)), r"padding has 3 values \(expected .*sequence of 1, 2 or 4"),
        (dict(padding=[]), r"padding has 0 values"),
    ],
)
def test_wrong_lengths_say_what_is_accepted(kw, match):
    with pytest.raises(ValueError, match=match):
        mn.conv2d(np.ones((1, 1, 5, 5)), np.ones((1, 1, 3, 3)), **kw)
    match_1d = match.replace("a sequence of 1 or 2", "a one-element sequence")
    with pytest.raises(ValueError, match=match_1d.replace("1, 2 or 4", "1 or 2")):
        mn.conv1d(np.ones((1, 1, 5)), np.ones((1, 1, 3)), **kw)


def test_conv1d_one_element_sequences(rng):
    x = rng.standard_normal((2, 3, 20))
    w = rng.standard_normal((4, 3, 3))
    got = mn.conv1d(x, w, stride=(2,), padding=[1], dilation=(2,))
    np.testing.assert_array_equal(got, mn.conv1d(x, w, stride=2, padding=1, dilation=2))


# -- correlate2d / convolve2d: SciPy's dtypes, exceptions and fillvalue --------------------------

DTYPE_PAIRS = [
    (np.int8, np.int8),
    (np.uint8, np.uint8),
    (np.int16, np.uint16),  # int32, as NumPy promotes
    (np.int32, np.int64),
    (np.uint64, np.uint64),
    (np.int64, np.float32),  # float64
    (np.float32, np.float32),
    (np.float32, np.float64),
    (np.complex64, np.float32),
    (np.float32, np.complex128),
    (np.complex128, np.complex64),
]


def sample(dtype, shape, rng):
    dtype = np.dtype(dtype)
    if dtype.kind == "u":
        return rng.integers(0, 60, shape).astype(dtype)
    if dtype.kind == "i":
        return rng.integers(-60, 60, shape).astype(dtype)
    values = rng.standard_normal(shape)
    if dtype.kind == "c":
        values = values + 1j * rng.standard_normal(shape)
    return values.astype(dtype)


@pytest.mark.parametrize("name", ["correlate2d", "convolve2d"])
@pytest.mark.parametrize("d1,d2", DTYPE_PAIRS)
def test_result_dtypes_and_values_as_scipy(name, d1, d2, rng):
    x = sample(d1, (9, 8), rng)
    k = sample(d2, (3, 4), rng)
    ours, theirs = getattr(mn, name), getattr(signal, name)
    for mode in ("full", "valid", "same"):
        for boundary in ("fill", "wrap", "symm"):
            fill = 3 if np.result_type(d1, d2).kind != "c" else 1 - 2j
            got = ours(x, k, mode, boundary, fill)
            want = theirs(x, k, mode, boundary, fill)
            assert got.dtype == want.dtype and got.shape == want.shape, (mode, boundary)
            if got.dtype.kind in "iu":
                np.testing.assert_array_equal(got, want)
            else:
                tol = 1e-5 if np.finfo(got.dtype).bits <= 64 and got.dtype.itemsize <= 8 else 1e-12
                np.testing.assert_allclose(got, want, rtol=tol, atol=tol * 30)
    if x.shape != k.shape:  # "valid" with the inputs the other way round: SciPy swaps them
        got, want = ours(k, x, "valid"), theirs(k, x, "valid")
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_integer_results_wrap_as_scipy():
    x = np.full((4, 4), 100, np.int8)
    k = np.full((2, 2), 100, np.int8)
    got = mn.correlate2d(x, k, "valid")
    np.testing.assert_array_equal(got, signal.correlate2d(x, k, "valid"))  # 40000 mod 256 = 64
    assert got.dtype == np.int8 and (got == 64).all()
    u = np.full((3, 3), 250, np.uint8)
    np.testing.assert_array_equal(
        mn.convolve2d(u, u, fillvalue=255), scipy_call("convolve2d", u, u, fillvalue=255)
    )


def test_integers_beyond_float64_precision_are_exact():
    """Past 2**52 float64 would round: those products run tap by tap in int64, as SciPy's."""
    x = np.array([[2**62, 3, -(2**61)], [5, 2**61, 7]], np.int64)
    k = np.array([[3, -1], [2**40, 1]], np.int64)
    for name in ("correlate2d", "convolve2d"):
        for mode in ("full", "same", "valid"):
            for boundary in ("fill", "wrap", "symm"):
                got = getattr(mn, name)(x, k, mode, boundary, fillvalue=2**50)
                want = getattr(signal, name)(x, k, mode, boundary, fillvalue=2**50)
                np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fillvalue", [np.array([2.0]), np.array([[2.0]]), [2.0], np.float32(2)])
def test_one_element_fillvalue_arrays(fillvalue, rng):
    x, k = rng.standard_normal((5, 6)), rng.standard_normal((2, 3))
    want = signal.correlate2d(x, k, fillvalue=fillvalue)
    np.testing.assert_allclose(mn.correlate2d(x, k, fillvalue=fillvalue), want, rtol=1e-12)


def test_fillvalue_cast_to_an_integer_result_as_scipy():
    x, k = np.arange(12).reshape(3, 4), np.array([[1, 2], [3, 4]])
    for fill in (2.5, -2.5, np.array([7]), True):
        np.testing.assert_array_equal(
            mn.correlate2d(x, k, fillvalue=fill), scipy_call("correlate2d", x, k, fillvalue=fill)
        )


def test_complex_fillvalue_with_complex_inputs(rng):
    x = rng.standard_normal((4, 5)) + 1j * rng.standard_normal((4, 5))
    k = rng.standard_normal((3, 2)).astype(np.float32)
    for boundary in ("fill", "symm"):
        got = mn.correlate2d(x, k, "same", boundary, fillvalue=2 - 1j)
        want = signal.correlate2d(x, k, "same", boundary, fillvalue=2 - 1j)
        np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize(
    "kw",
    [
        dict(mode="bad"),
        dict(boundary="bad"),
        dict(fillvalue=[1, 2]),
        dict(fillvalue=np.ones((2, 1))),
        dict(fillvalue=1 + 2j),
        dict(fillvalue="a"),
    ],
)
@pytest.mark.parametrize("name", ["correlate2d", "convolve2d"])
def test_bad_arguments_raise_scipys_exception_types(name, kw):
    x, k = np.ones((4, 4)), np.ones((2, 2))
    with pytest.raises(Exception) as theirs:
        scipy_call(name, x, k, **kw)
    with pytest.raises(type(theirs.value), match=name):
        getattr(mn, name)(x, k, **kw)


@pytest.mark.parametrize(
    "dtype,fill",
    [
        (np.uint8, -1),
        (np.uint8, 256),
        (np.uint8, 300.7),
        (np.int8, 128),
        (np.int8, -129),
        (np.int64, 2**63),
    ],
)
def test_integer_fillvalues_that_do_not_fit_raise_as_in_scipy(dtype, fill):
    x = np.ones((3, 3), dtype)
    with pytest.raises(ValueError):
        scipy_call("correlate2d", x, x, fillvalue=fill)
    with pytest.raises(ValueError, match="could not cast `fillvalue`"):
        mn.correlate2d(x, x, fillvalue=fill)


def test_none_is_not_a_fillvalue():
    """SciPy 1.17 reads None as NaN for a float result and refuses it for an integer one;
    ours refuses it always."""
    with pytest.raises(ValueError, match="could not convert `fillvalue` to a number"):
        mn.correlate2d(np.ones((3, 3)), np.ones((2, 2)), fillvalue=None)


def test_nan_fillvalue_has_no_integer_value():
    with pytest.raises(ValueError, match="has no value in the output dtype int64"):
        mn.correlate2d(np.ones((3, 3), np.int64), np.ones((2, 2), np.int64), fillvalue=np.nan)
