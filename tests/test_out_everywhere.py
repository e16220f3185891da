"""``out=`` on every function that returns an array (issue 23), with NumPy's rules: exactly the
result's shape and dtype, writeable, any layout, overlapping the inputs allowed; NumPy's tuple
form for several results (None entries allocated as usual); a bad ``out`` raises before any
array is written.  The softmax family and matmul had ``out=`` already (tests/test_softmax.py,
tests/test_matmul.py); cross_entropy's is in tests/test_cross_entropy_conventions.py."""

from __future__ import annotations

import numpy as np
import pytest

import mlmath_native as mn

R = np.random.default_rng(7)
X = R.standard_normal((2, 3, 9, 8)).astype(np.float32)
W = R.standard_normal((3, 3, 3, 3)).astype(np.float32)
X1 = R.standard_normal((2, 3, 20)).astype(np.float32)
W1 = R.standard_normal((4, 3, 5)).astype(np.float32)
IMG = R.standard_normal((12, 11))
KER = R.standard_normal((3, 4))
Q, K, V = (R.standard_normal((2, 4, 10, 8)) for _ in range(3))
Y = mn.softmax(R.standard_normal((5, 6)))
DY = R.standard_normal((5, 6))

# name -> call(out) for the functions with one result
SINGLE = {
    "conv2d": lambda out: mn.conv2d(X, W, padding=1, out=out),
    "conv2d unbatched": lambda out: mn.conv2d(X[0], W, stride=2, out=out),
    "conv2d strided few channels": lambda out: mn.conv2d(X, W, stride=2, padding=1, out=out),
    "conv2d winograd": lambda out: mn.conv2d(X, W, padding=1, algorithm="winograd", out=out),
    "conv1d": lambda out: mn.conv1d(X1, W1, padding="same", out=out),
    "correlate2d": lambda out: mn.correlate2d(IMG, KER, "same", out=out),
    "convolve2d": lambda out: mn.convolve2d(IMG, KER, out=out),
    "correlate2d int": lambda out: mn.correlate2d(
        (IMG * 9).astype(np.int32), (KER * 9).astype(np.int32), out=out
    ),
    "attention": lambda out: mn.attention(Q, K, V, causal=True, out=out),
    "softmax_backward": lambda out: mn.softmax_backward(Y, DY, out=out),
    "log_softmax_backward": lambda out: mn.log_softmax_backward(np.log(Y), DY, out=out),
}


@pytest.mark.parametrize("name", sorted(SINGLE))
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_out_receives_the_result(name, layout):
    call = SINGLE[name]
    want = call(None)
    if layout == "contiguous":
        out = np.full(want.shape, 7, want.dtype)
    else:
        out = np.full(want.shape[::-1], 7, want.dtype).T
    got = call(out)
    assert got is out
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("name", sorted(SINGLE))
def test_bad_out_raises_and_writes_nothing(name):
    want = SINGLE[name](None)
    for out, error in (
        (np.zeros(want.shape + (1,), want.dtype), ValueError),
        (np.zeros(want.shape, np.complex64), TypeError),
    ):
        before = out.copy()
        with pytest.raises(error, match="out has"):
            SINGLE[name](out)
        np.testing.assert_array_equal(out, before)
    frozen = np.zeros(want.shape, want.dtype)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="out is not writeable"):
        SINGLE[name](frozen)


def test_out_may_be_an_input():
    x = X.copy()
    want = mn.conv2d(x, W, padding=1)  # C == K and "same" size: out=x has the result's shape
    assert mn.conv2d(x, W, padding=1, out=x) is x
    np.testing.assert_array_equal(x, want)
    dy = DY.copy()
    want = mn.softmax_backward(Y, dy)
    assert mn.softmax_backward(Y, dy, out=dy) is dy
    np.testing.assert_array_equal(dy, want)
    q = Q.copy()
    want = mn.attention(q, K, V)
    assert mn.attention(q, K, V, out=q) is q
    np.testing.assert_array_equal(q, want)
    img = IMG.copy()
    want = mn.correlate2d(img, KER, "same")
    assert mn.correlate2d(img, KER, "same", out=img) is img
    np.testing.assert_array_equal(img, want)


def test_conv2d_writes_a_torch_tensor_in_place():
    torch = pytest.importorskip("torch")
    want = mn.conv2d(X, W, padding=1)
    t = torch.zeros(want.shape)
    got = mn.conv2d(X, W, padding=1, out=t)
    np.testing.assert_array_equal(t.numpy(), want)
    assert np.shares_memory(got, t.numpy())


# -- several results: NumPy's tuple form ----------------------------------------------------------


def test_attention_with_lse():
    want_o, want_lse = mn.attention(Q, K, V, causal=True, return_lse=True)
    o, lse = np.empty_like(want_o), np.empty_like(want_lse)
    got = mn.attention(Q, K, V, causal=True, return_lse=True, out=(o, lse))
    assert got[0] is o and got[1] is lse
    np.testing.assert_array_equal(o, want_o)
    np.testing.assert_array_equal(lse, want_lse)
    got = mn.attention(Q, K, V, causal=True, return_lse=True, out=(None, lse))
    assert got[1] is lse and got[0] is not None
    with pytest.raises(TypeError, match="must be a tuple"):
        mn.attention(Q, K, V, return_lse=True, out=o)


@pytest.mark.parametrize("fn", ["conv2d_backward", "conv1d_backward"])
def test_conv_backward_out_tuple(fn):
    x, w = (X, W) if fn == "conv2d_backward" else (X1, W1)
    forward = mn.conv2d if fn == "conv2d_backward" else mn.conv1d
    g = np.ones_like(forward(x, w, stride=2))
    want = getattr(mn, fn)(x, w, g, stride=2)
    outs = tuple(np.empty_like(a) for a in want)
    got = getattr(mn, fn)(x, w, g, stride=2, out=outs)
    for a, b, c in zip(got, outs, want, strict=True):
        assert a is b
        np.testing.assert_array_equal(b, c)
    got = getattr(mn, fn)(x, w, g, stride=2, needs=("weight",), out=(None, outs[1], None))
    assert got[0] is None and got[1] is outs[1] and got[2] is None
    with pytest.raises(ValueError, match=r"out\[0\] is given for a result that is not computed"):
        getattr(mn, fn)(x, w, g, stride=2, needs=("weight",), out=outs)


def test_attention_backward_grads_out():
    sinks = R.standard_normal(4)
    o, lse = mn.attention(Q, K, V, sinks=sinks, return_lse=True)
    go = np.ones_like(o)
    want = mn.attention_backward(Q, K, V, o, lse, go, sinks=sinks)
    bufs = tuple(np.zeros_like(a) for a in want)
    got = mn.attention_backward(Q, K, V, o, lse, go, sinks=sinks, grads_out=bufs)
    for a, b, c in zip(got, bufs, want, strict=True):
        assert a is b
        np.testing.assert_array_equal(b, c)


def test_a_bad_entry_of_a_tuple_writes_no_entry():
    want = mn.conv2d_backward(X, W, np.ones_like(mn.conv2d(X, W)))
    good = np.full(want[0].shape, 3, want[0].dtype)
    bad = np.zeros(want[1].shape, np.float64)  # wrong dtype
    with pytest.raises(TypeError, match=r"out\[1\] has dtype float64"):
        mn.conv2d_backward(X, W, np.ones_like(mn.conv2d(X, W)), out=(good, bad, None))
    assert (good == 3).all() and (bad == 0).all()
    with pytest.raises(ValueError, match="out has 2 entries"):
        mn.conv2d_backward(X, W, np.ones_like(mn.conv2d(X, W)), out=(good, None))
    with pytest.raises(TypeError, match="out must be a tuple"):
        mn.conv2d_backward(X, W, np.ones_like(mn.conv2d(X, W)), out=good)


def test_linear_cross_entropy_grads_out():
    hidden = R.standard_normal((6, 8)).astype(np.float32)
    weight = R.standard_normal((11, 8)).astype(np.float32)
    bias = R.standard_normal(11).astype(np.float32)
    target = R.integers(0, 11, 6)
    loss, want = mn.linear_cross_entropy(hidden, weight, target, bias, return_grad=True)
    bufs = tuple(np.empty_like(a) for a in want)
    got_loss, got = mn.linear_cross_entropy(
        hidden, weight, target, bias, return_grad=True, grads_out=bufs
    )
    assert got_loss == loss
    for a, b, c in zip(got, bufs, want, strict=True):
        assert a is b
        np.testing.assert_array_equal(b, c)
    with pytest.raises(ValueError, match="needs return_grad=True"):
        mn.linear_cross_entropy(hidden, weight, target, grads_out=bufs)
    with pytest.raises(ValueError, match=r"grads_out\[2\] is given for a result"):
        mn.linear_cross_entropy(hidden, weight, target, return_grad=True, grads_out=bufs)
