"""conv2d / conv1d forward and backward and correlate2d / convolve2d on bfloat16 and float16
storage (float32 math, each result rounded once) against the float64 golden (the reference on
the same 16-bit inputs) and against PyTorch in the same dtype (tests/sixteen.py), on every ISA
path (run with MLMATH_NATIVE_ISA=scalar / avx2)."""

from __future__ import annotations

import numpy as np
import pytest
from sixteen import (
    HALF_NAMES,
    assert_16bit_close,
    assert_special_values_match,
    dtype_of,
    random,
    to_torch,
    widen,
)

import mlmath_native as mn


def torch_conv(x, w, b, **kw):
    """PyTorch's conv2d in the inputs' 16-bit dtype (None where its CPU build lacks it)."""
    torch = pytest.importorskip("torch")
    try:
        return torch.nn.functional.conv2d(
            to_torch(x), to_torch(w), None if b is None else to_torch(b), **kw
        )
    except RuntimeError:  # pragma: no cover - an old CPU build without a 16-bit conv
        return None


def golden_conv(x, w, b, **kw):
    torch = pytest.importorskip("torch")
    f = torch.nn.functional.conv2d
    tb = None if b is None else torch.from_numpy(widen(b))
    return f(torch.from_numpy(widen(x)), torch.from_numpy(widen(w)), tb, **kw).numpy()


def check_conv(x, w, b=None, algorithm="auto", **kw):
    got = mn.conv2d(x, w, b, algorithm=algorithm, **kw)
    golden = golden_conv(x, w, b, **kw)
    n = w.shape[1] * w.shape[2] * w.shape[3]
    assert_16bit_close(got, golden, x.dtype, n=n, torch_result=torch_conv(x, w, b, **kw))
    return got


CASES = [
    # (n, c, h, w, k, r, s, kwargs)
    (2, 3, 9, 11, 5, 3, 3, {"padding": 1}),
    (1, 8, 17, 19, 9, 3, 3, {"padding": 1}),  # Winograd-eligible, tails
    (2, 16, 12, 12, 70, 3, 3, {"padding": 1}),  # > 64 output channels: blocked GEMM
    (2, 24, 13, 13, 8, 3, 3, {"padding": 0}),  # K = 216 > KC
    (2, 3, 23, 21, 6, 7, 7, {"stride": 2, "padding": 3}),  # strided (space to depth)
    (1, 40, 9, 9, 80, 5, 5, {"stride": 2, "padding": 2}),  # strided implicit GEMM, K = 1000
    (2, 32, 7, 9, 20, 1, 1, {}),  # pointwise
    (2, 6, 10, 10, 12, 3, 3, {"padding": 2, "dilation": 2, "groups": 3}),
    (1, 8, 15, 15, 8, 3, 3, {"padding": 1, "groups": 8}),  # depthwise
    (1, 4, 12, 13, 8, 5, 3, {"padding": (2, 1), "groups": 4}),  # depthwise x2, 5x3
    (1, 4, 12, 13, 8, 3, 3, {"stride": 2, "padding": 1, "groups": 4}),  # depthwise strided
]


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_conv2d_forward(case, dtype_name, rng):
    dtype = dtype_of(dtype_name)
    n, c, h, wd, k, r, s, kw = CASES[case]
    g = kw.get("groups", 1)
    x = random(rng, (n, c, h, wd), dtype)
    w = random(rng, (k, c // g, r, s), dtype, 1.0 / np.sqrt(c // g * r * s))
    b = random(rng, (k,), dtype)
    got = check_conv(x, w, b, **kw)
    assert got.dtype == dtype
    check_conv(x, w, None, **kw)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
@pytest.mark.parametrize("algorithm", ["direct", "winograd_f2", "winograd_f4"])
def test_conv2d_winograd(algorithm, dtype_name, rng):
    """Winograd runs in float32 on the widened data: one rounding of a float32 result."""
    dtype = dtype_of(dtype_name)
    for shape, k in [((2, 7, 13, 10), 9), ((1, 32, 16, 16), 40)]:
        x = random(rng, shape, dtype, 4.0)
        w = random(rng, (k, shape[1], 3, 3), dtype)
        check_conv(x, w, random(rng, (k,), dtype), algorithm=algorithm, padding=1)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_conv2d_non_contiguous_and_unbatched(dtype_name, rng):
    dtype = dtype_of(dtype_name)
    x = random(rng, (2, 6, 20, 22), dtype)[:, ::2, ::2, 1::2]
    w = random(rng, (10, 3, 3, 3), dtype)[::2, :, ::-1]
    check_conv(x, w, padding=1)
    got = mn.conv2d(x[0], w, padding=1)
    np.testing.assert_array_equal(
        widen(got), widen(mn.conv2d(np.ascontiguousarray(x[:1]), w, padding=1)[0])
    )


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_conv2d_padding_modes(mode, dtype_name, rng):
    torch = pytest.importorskip("torch")
    dtype = dtype_of(dtype_name)
    x = random(rng, (2, 3, 9, 8), dtype)
    w = random(rng, (4, 3, 3, 3), dtype)
    got = mn.conv2d(x, w, padding=1, padding_mode=mode)
    xp = torch.nn.functional.pad(torch.from_numpy(widen(x)), (1, 1, 1, 1), mode=mode)
    golden = torch.nn.functional.conv2d(xp, torch.from_numpy(widen(w))).numpy()
    assert_16bit_close(got, golden, dtype, n=27)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_conv2d_large_padding_gathered(dtype_name, rng):
    """The tap-by-tap path (Note [large padding]) adds its taps in float32, rounded once."""
    dtype = dtype_of(dtype_name)
    x = random(rng, (1, 2, 6, 5), dtype)
    w = random(rng, (3, 2, 3, 3), dtype)
    kw = {"padding": "same", "dilation": 1500}
    b = random(rng, (3,), dtype)
    got = mn.conv2d(x, w, b, **kw)
    assert got.dtype == dtype
    # dilation 1500 on a 6x5 image: only the centre tap lands in the image
    golden = golden_conv(x, w[:, :, 1:2, 1:2], b)
    assert_16bit_close(got, golden, dtype, n=18)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_conv1d(dtype_name, rng):
    torch = pytest.importorskip("torch")
    dtype = dtype_of(dtype_name)
    x = random(rng, (3, 5, 41), dtype)
    w = random(rng, (7, 5, 4), dtype)
    b = random(rng, (7,), dtype)
    got = mn.conv1d(x, w, b, stride=2, padding=3)
    f = torch.nn.functional.conv1d
    golden = f(*(torch.from_numpy(widen(a)) for a in (x, w, b)), stride=2, padding=3).numpy()
    theirs = f(to_torch(x), to_torch(w), to_torch(b), stride=2, padding=3)
    assert_16bit_close(got, golden, dtype, n=20, torch_result=theirs)
    gx, gw, gb = mn.conv1d_backward(x, w, widen(got).astype(dtype), stride=2, padding=3)
    assert gx.dtype == gw.dtype == gb.dtype == dtype


def torch_backward(x, w, g, dtype_is_16=True, **kw):
    """(grad_x, grad_w, grad_b) by autograd, in float64 (golden) or in the 16-bit dtype."""
    torch = pytest.importorskip("torch")
    conv = torch.nn.functional.conv2d
    if dtype_is_16:
        tx, tw, tg = to_torch(x), to_torch(w), to_torch(g)
    else:
        tx, tw, tg = (torch.from_numpy(widen(a)) for a in (x, w, g))
    tx.requires_grad_()
    tw.requires_grad_()
    tb = torch.zeros(w.shape[0], dtype=tx.dtype, requires_grad=True)
    try:
        conv(tx, tw, tb, **kw).backward(tg)
    except RuntimeError:  # pragma: no cover - no 16-bit conv backward in this torch build
        return None, None, None
    return tx.grad, tw.grad, tb.grad


BACKWARD_CASES = [
    (2, 3, 9, 11, 5, 3, 3, {"padding": 1}),
    (2, 24, 13, 13, 8, 3, 3, {"padding": 1}),  # K of the weight gradient: 338 positions
    (2, 5, 14, 13, 6, 3, 3, {"stride": 2, "padding": 1}),  # col2im input gradient
    (1, 16, 12, 12, 70, 3, 3, {"padding": 1}),  # Winograd-eligible transposed convolution
    (2, 6, 10, 10, 12, 3, 3, {"padding": 2, "dilation": 2, "groups": 3}),
    (1, 4, 12, 13, 8, 3, 3, {"padding": 1, "groups": 4}),
    (2, 8, 7, 9, 4, 1, 1, {}),
]


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
@pytest.mark.parametrize("case", range(len(BACKWARD_CASES)))
def test_conv2d_backward(case, dtype_name, rng):
    dtype = dtype_of(dtype_name)
    n, c, h, wd, k, r, s, kw = BACKWARD_CASES[case]
    gr = kw.get("groups", 1)
    x = random(rng, (n, c, h, wd), dtype)
    w = random(rng, (k, c // gr, r, s), dtype, 1.0 / np.sqrt(c // gr * r * s))
    y = mn.conv2d(x, w, **kw)
    g = random(rng, y.shape, dtype)
    gx, gw, gb = mn.conv2d_backward(x, w, g, **kw)
    assert gx.dtype == gw.dtype == gb.dtype == dtype
    gold = torch_backward(x, w, g, dtype_is_16=False, **kw)
    theirs = torch_backward(x, w, g, **kw)
    npos = n * y.shape[2] * y.shape[3]
    assert_16bit_close(gx, gold[0].numpy(), dtype, n=k * r * s, torch_result=theirs[0])
    assert_16bit_close(gw, gold[1].numpy(), dtype, n=npos, torch_result=theirs[1])
    assert_16bit_close(gb, gold[2].numpy(), dtype, n=npos)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_conv2d_backward_padding_modes_fold_in_float32(mode, dtype_name, rng):
    torch = pytest.importorskip("torch")
    dtype = dtype_of(dtype_name)
    x = random(rng, (2, 3, 9, 8), dtype)
    w = random(rng, (4, 3, 3, 3), dtype)
    for stride in (1, 2):
        y = mn.conv2d(x, w, padding=1, stride=stride, padding_mode=mode)
        g = random(rng, y.shape, dtype)
        gx, gw, _ = mn.conv2d_backward(
            x, w, g, padding=1, stride=stride, padding_mode=mode, needs=("input", "weight")
        )
        tx = torch.from_numpy(widen(x)).requires_grad_()
        tw = torch.from_numpy(widen(w)).requires_grad_()
        xp = torch.nn.functional.pad(tx, (1, 1, 1, 1), mode=mode)
        torch.nn.functional.conv2d(xp, tw, stride=stride).backward(torch.from_numpy(widen(g)))
        assert_16bit_close(gx, tx.grad.numpy(), dtype, n=36)
        assert_16bit_close(gw, tw.grad.numpy(), dtype, n=g[:, 0].size)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_conv2d_backward_large_padding_gathered(dtype_name, rng):
    dtype = dtype_of(dtype_name)
    x = random(rng, (1, 2, 6, 5), dtype)
    w = random(rng, (3, 2, 3, 3), dtype)
    kw = {"padding": "same", "dilation": 1500}
    g = random(rng, (1, 3, 6, 5), dtype)
    gx, gw, gb = mn.conv2d_backward(x, w, g, **kw)
    assert gx.dtype == gw.dtype == gb.dtype == dtype
    ref = mn.conv2d_backward(widen(x), widen(w), widen(g), **kw)
    for got, want, n in zip((gx, gw, gb), ref, (3, 30, 30), strict=True):
        assert_16bit_close(got, want, dtype, n=n)


def test_float16_overflow_exactly_where_the_sum_overflows():
    dtype = np.float16
    x = np.full((1, 4, 5, 5), 100.0, dtype)
    w = np.zeros((3, 4, 3, 3), dtype)
    w[0] = 18.0  # 36 taps x 100 x 18 = 64800: finite (< 65520)
    w[1] = 19.0  # 68400: inf
    w[2] = -19.0
    for algorithm in ("direct", "winograd_f2", "winograd_f4"):
        got = widen(mn.conv2d(x, w, algorithm=algorithm))
        assert np.all(got[0, 0] == 64800.0)
        assert np.all(np.isposinf(got[0, 1])) and np.all(np.isneginf(got[0, 2]))
    # terms that overflow on their own but cancel: the float32 sum stays in range
    x2 = np.array([[[[60000.0, 60000.0, -60000.0]]]], dtype)
    got = mn.conv2d(x2, np.ones((1, 1, 1, 3), dtype))
    assert widen(got)[0, 0, 0, 0] == 60000.0


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
@pytest.mark.parametrize("algorithm", ["direct", "winograd_f2", "winograd_f4"])
def test_nan_and_inf_reach_exactly_their_windows(algorithm, dtype_name, rng):
    dtype = dtype_of(dtype_name)
    x = random(rng, (1, 4, 12, 12), dtype)
    w = random(rng, (5, 4, 3, 3), dtype)
    x[0, 1, 3, 4] = np.nan
    x[0, 2, 9, 9] = np.inf
    got = mn.conv2d(x, w, padding=1, algorithm=algorithm)
    with np.errstate(invalid="ignore"):
        golden = golden_conv(x, w, None, padding=1)
    assert_special_values_match(got, golden)
    # strided with few channels (space to depth asks all_finite first)
    x3 = random(rng, (1, 3, 15, 15), dtype)
    x3[0, 0, 7, 7] = np.nan
    w3 = random(rng, (4, 3, 7, 7), dtype)
    got = mn.conv2d(x3, w3, stride=2, padding=3)
    with np.errstate(invalid="ignore"):
        assert_special_values_match(got, golden_conv(x3, w3, None, stride=2, padding=3))


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_backward_nan_propagates(dtype_name, rng):
    dtype = dtype_of(dtype_name)
    x = random(rng, (1, 3, 8, 8), dtype)
    w = random(rng, (4, 3, 3, 3), dtype)
    g = random(rng, (1, 4, 8, 8), dtype)
    g[0, 1, 2, 2] = np.nan
    gx, gw, gb = mn.conv2d_backward(x, w, g, padding=1)
    gold = torch_backward(x, w, g, dtype_is_16=False, padding=1)
    for got, want in zip((gx, gw, gb), gold, strict=True):
        assert_special_values_match(got, want.detach().numpy())


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
@pytest.mark.parametrize("fn", ["correlate2d", "convolve2d"])
@pytest.mark.parametrize("mode", ["full", "valid", "same"])
def test_correlate_convolve(fn, mode, dtype_name, rng):
    signal = pytest.importorskip("scipy.signal")
    dtype = dtype_of(dtype_name)
    a = random(rng, (13, 17), dtype)
    k = random(rng, (4, 5), dtype)
    got = getattr(mn, fn)(a, k, mode=mode)
    golden = getattr(signal, fn)(widen(a), widen(k), mode=mode)
    assert_16bit_close(got, golden, dtype, n=20)
    got = getattr(mn, fn)(a, k, mode=mode, boundary="wrap")
    golden = getattr(signal, fn)(widen(a), widen(k), mode=mode, boundary="wrap")
    assert_16bit_close(got, golden, dtype, n=20)


def test_all_finite_16bit(rng):
    from mlmath_native import _core

    for dtype in (dtype_of("bfloat16"), np.dtype(np.float16)):
        for n in (1, 7, 8, 9, 100, 20000):
            a = random(rng, (n,), dtype)
            assert _core.all_finite(a)
            for bad in (np.nan, np.inf, -np.inf):
                b = a.copy()
                b[n - 1] = bad
                assert not _core.all_finite(b)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_thread_count_does_not_change_results(dtype_name, rng):
    dtype = dtype_of(dtype_name)
    x = random(rng, (4, 16, 20, 20), dtype)
    w = random(rng, (24, 16, 3, 3), dtype)
    g = random(rng, (4, 24, 20, 20), dtype)
    before = mn.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            mn.set_num_threads(t)
            results.append([mn.conv2d(x, w, padding=1), *mn.conv2d_backward(x, w, g, padding=1)])
    finally:
        mn.set_num_threads(before)
    for one, two in zip(*results, strict=True):
        np.testing.assert_array_equal(one.view(np.uint16), two.view(np.uint16))


def test_bad_dtypes_write_nothing(rng):
    from mlmath_native import _core

    bf16 = dtype_of("bfloat16")
    x = random(rng, (1, 2, 5, 5), bf16)
    w = random(rng, (3, 2, 3, 3), bf16)
    out = np.full((1, 3, 3, 3), 7, np.float16)  # float16 out for bfloat16 inputs
    with pytest.raises(TypeError):
        _core.conv2d_into(x, w, None, out, 1, 1, 0, 0, 1, 1, 1)
    assert np.all(out == 7)
    out64 = np.full((1, 3, 3, 3), 7, np.float64)
    with pytest.raises(TypeError):
        _core.conv2d_into(x, w, None, out64, 1, 1, 0, 0, 1, 1, 1)
    assert np.all(out64 == 7)
    out16 = np.full((1, 3, 3, 3), 7, bf16)  # a bfloat16 out for float32 inputs
    with pytest.raises(TypeError):
        _core.conv2d_into(
            x.astype(np.float32), w.astype(np.float32), None, out16, 1, 1, 0, 0, 1, 1, 1
        )
    assert np.all(widen(out16) == 7)
    with pytest.raises(TypeError):  # w of another 16-bit dtype
        _core.conv2d_into(
            x, w.astype(np.float16), None, np.empty((1, 3, 3, 3), bf16), 1, 1, 0, 0, 1, 1, 1
        )


def test_mixed_dtypes_follow_result_type(rng):
    bf16 = dtype_of("bfloat16")
    x = random(rng, (1, 2, 6, 6), bf16)
    w = random(rng, (3, 2, 3, 3), np.float16)
    assert mn.conv2d(x, w).dtype == np.float32
    assert mn.conv2d(x, w.astype(bf16)).dtype == bf16
    assert mn.conv2d(x, w.astype(bf16), np.zeros(3, np.float32)).dtype == np.float32
    assert mn.conv2d(x.astype(np.float16), w).dtype == np.float16
    assert mn.conv2d(x, w.astype(np.float64)).dtype == np.float64
