"""Convolution forward against the float64 reference (direct sums), SciPy and PyTorch: a grid of
shapes (odd sizes, stride > kernel, dilation, groups, depthwise, every padding form and mode,
unbatched, N = 0); every ISA path."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import mlmath_native as mn
from mlmath_native.reference import convolution as ref

from conftest import tolerance

DTYPES = [np.float32, np.float64]


def assert_conv_close(got, want, x, w, dtype):
    """Tolerance from the reduction length (C/groups * R * S) and the operands' magnitudes."""
    n = int(np.prod(w.shape[1:]))
    scale = float(np.max(np.abs(x), initial=0)) * float(np.max(np.abs(w), initial=0)) * n + 1
    assert got.shape == want.shape and got.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(dtype, n) * scale)


# (N, C, H, W, K, R, S, stride, padding, dilation, groups)
GRID = [
    (2, 3, 7, 9, 4, 3, 3, 1, 1, 1, 1),
    (1, 4, 10, 11, 6, 3, 2, 2, (1, 2), 2, 2),
    (2, 8, 9, 9, 8, 3, 3, 1, 1, 1, 8),  # depthwise
    (1, 4, 9, 8, 8, 3, 3, 2, 1, 1, 4),  # depthwise, channel multiplier 2
    (2, 4, 11, 37, 4, 3, 3, 1, (2, 0, 1, 3), 2, 4),  # depthwise, dilated, a row tail
    (1, 3, 8, 40, 6, 3, 5, 1, "same", 1, 3),  # depthwise 3x5, multiplier 2, wide rows
    (1, 6, 12, 12, 12, 5, 5, 3, 2, 1, 6),
    (3, 5, 6, 7, 7, 1, 1, 1, 0, 1, 1),  # 1x1: plain GEMM
    (2, 5, 6, 7, 7, 1, 1, 2, 0, 1, 1),  # 1x1 strided
    (1, 3, 20, 19, 5, 7, 7, 2, 3, 1, 1),
    (1, 2, 5, 5, 3, 2, 2, 4, 0, 1, 1),  # stride > kernel
    (1, 17, 13, 13, 33, 3, 3, 1, (0, 0, 1, 2), (2, 1), 1),  # 4-tuple padding, 2 dilations
    (2, 3, 8, 8, 4, 3, 3, 1, "same", 2, 1),
    (1, 3, 9, 10, 4, 4, 3, 3, "same", 1, 1),  # 'same' with stride: ceil(H / stride)
    (1, 3, 9, 10, 4, 3, 3, 2, "valid", 1, 1),
    (0, 3, 5, 5, 4, 3, 3, 1, 1, 1, 1),  # empty batch
]


def check_grid_case(case, mode, dtype, rng):
    """conv2d on one GRID case against the reference, batched and unbatched; returns x, w."""
    n, c, h, w_, k, r, s, stride, padding, dilation, groups = case
    x = rng.standard_normal((n, c, h, w_)).astype(dtype)
    w = rng.standard_normal((k, c // groups, r, s)).astype(dtype)
    b = rng.standard_normal(k).astype(dtype)
    opts = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=mode)
    want = ref.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), **opts)
    assert_conv_close(mn.conv2d(x, w, b, **opts), want, x, w, dtype)
    if n:  # unbatched
        want1 = ref.conv2d(x[0].astype(np.float64), w.astype(np.float64), None, **opts)
        assert_conv_close(mn.conv2d(x[0], w, **opts), want1, x, w, dtype)
    return x, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GRID, ids=str)
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv2d_grid_against_reference(case, mode, dtype, rng):
    check_grid_case(case, mode, dtype, rng)


def test_same_padding_output_size_any_stride(rng):
    for h, stride, dilation, r in itertools.product([7, 8, 13], [1, 2, 3], [1, 2], [1, 2, 3]):
        x = rng.standard_normal((1, 2, h, h + 1))
        w = rng.standard_normal((3, 2, r, r))
        y = mn.conv2d(x, w, stride=stride, dilation=dilation, padding="same")
        assert y.shape == (1, 3, -(-h // stride), -(-(h + 1) // stride))
        want = ref.conv2d(x, w, stride=stride, dilation=dilation, padding="same")
        np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv1d(dtype, rng):
    for (n, c, length, k, r, stride, padding, dilation, groups), mode in itertools.product(
        [
            (2, 3, 17, 4, 3, 2, 1, 1, 1),
            (1, 4, 20, 8, 5, 1, "same", 2, 2),
            (3, 6, 9, 6, 3, 3, (2, 0), 1, 6),
            (1, 2, 8, 3, 1, 1, "valid", 1, 1),
        ],
        ["zeros", "reflect", "circular"],
    ):
        x = rng.standard_normal((n, c, length)).astype(dtype)
        w = rng.standard_normal((k, c // groups, r)).astype(dtype)
        opts = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        opts["padding_mode"] = mode
        want = ref.conv1d(x.astype(np.float64), w.astype(np.float64), **opts)
        assert_conv_close(mn.conv1d(x, w, **opts), want, x, w, dtype)
        assert_conv_close(mn.conv1d(x[0], w, **opts), want[0], x, w, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_layers_cross_block_boundaries(dtype, rng):
    # reduction lengths beyond one KC block, several MC blocks, outputs beyond one NC block
    x = rng.standard_normal((2, 40, 30, 31)).astype(dtype)
    w = rng.standard_normal((200, 40, 3, 3)).astype(dtype)
    want = ref.conv2d(x.astype(np.float64), w.astype(np.float64), padding=1)
    assert_conv_close(mn.conv2d(x, w, padding=1), want, x, w, dtype)


@pytest.mark.parametrize("flip", [False, True])
def test_correlate_convolve_against_scipy(flip, rng):
    signal = pytest.importorskip("scipy.signal")
    ours, theirs = (
        (mn.convolve2d, signal.convolve2d) if flip else (mn.correlate2d, signal.correlate2d)
    )
    image = rng.standard_normal((7, 9))
    for shape in [(1, 1), (3, 3), (4, 4), (2, 5), (7, 9), (9, 11), (8, 3), (3, 12)]:
        kernel = rng.standard_normal(shape)
        for mode, boundary in itertools.product(
            ["full", "same", "valid"], ["fill", "wrap", "symm"]
        ):
            try:
                want = theirs(image, kernel, mode, boundary, fillvalue=1.5)
            except ValueError:
                with pytest.raises(ValueError):
                    ours(image, kernel, mode, boundary, fillvalue=1.5)
                continue
            got = ours(image, kernel, mode, boundary, fillvalue=1.5)
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_seed_formula_is_valid_correlation(rng):
    image, kernel = rng.standard_normal((6, 8)), rng.standard_normal((3, 2))
    np.testing.assert_allclose(
        mn.correlate2d(image, kernel, mode="valid"),
        ref.correlate2d_valid(image, kernel),
        rtol=1e-12,
    )
    f32 = mn.correlate2d(image.astype(np.float32), kernel.astype(np.float32))
    assert f32.dtype == np.float32


@pytest.mark.parametrize(
    "case", [(2, 16, 9, 9, 24, 3, 3, 1, 1, 1, 1), (3, 8, 11, 7, 8, 3, 3, 2, 1, 1, 8)]
)
def test_against_pytorch(case, rng):
    torch = pytest.importorskip("torch")
    n, c, h, w_, k, r, s, stride, padding, dilation, groups = case
    x = rng.standard_normal((n, c, h, w_)).astype(np.float32)
    w = rng.standard_normal((k, c // groups, r, s)).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    opts = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    want = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), torch.tensor(b), **opts)
    np.testing.assert_allclose(mn.conv2d(x, w, b, **opts), want.numpy(), rtol=1e-4, atol=1e-4)


def test_threads_do_not_change_results(rng, threads):
    x = rng.standard_normal((3, 16, 20, 20)).astype(np.float32)
    w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    dw = rng.standard_normal((16, 1, 3, 3)).astype(np.float32)
    results = []
    for t in (1, 2, 3):
        mn.set_num_threads(t)
        results.append((mn.conv2d(x, w, padding=1), mn.conv2d(x, dw, padding=1, groups=16)))
    for a, b in results[1:]:
        np.testing.assert_array_equal(a, results[0][0])
        np.testing.assert_array_equal(b, results[0][1])


# the stated Winograd tolerances, in multiples of direct convolution's
WINOGRAD_FACTOR = {"winograd_f2": 4, "winograd_f4": 16}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("magnitude", [1.0, 100.0])
@pytest.mark.parametrize("algorithm", ["winograd_f2", "winograd_f4"])
def test_winograd_against_reference(dtype, magnitude, algorithm, rng):
    """Winograd F(2x2, 3x3) and F(4x4, 3x3): odd and even sizes (partial edge tiles), every zero
    padding, other padding modes, bias, unbatched; within 4x (F2) and 16x (F4) the direct
    tolerance at magnitudes 1 and 100."""
    cases = [
        (1, 1, 4, 4, 1, 0),
        (2, 3, 7, 9, 4, 1),
        (1, 5, 6, 5, 3, 0),
        (2, 16, 14, 14, 8, 1),
        (1, 3, 11, 13, 2, 2),
        (1, 40, 9, 30, 20, "same"),
        (3, 7, 33, 5, 9, (2, 0, 1, 1)),
        (2, 9, 17, 18, 33, 1),  # 33 channels: a partial MR panel of the filter transform
        (1, 2, 3, 3, 2, 1),
    ]
    for n, c, h, w_, k, padding in cases:
        x = (rng.standard_normal((n, c, h, w_)) * magnitude).astype(dtype)
        w = (rng.standard_normal((k, c, 3, 3)) * magnitude).astype(dtype)
        b = rng.standard_normal(k).astype(dtype)
        for mode in ("zeros", "reflect"):
            opts = dict(padding=padding, padding_mode=mode)
            got = mn.conv2d(x, w, b, algorithm=algorithm, **opts)
            want = ref.conv2d(
                x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), **opts
            )
            nred = c * 9
            scale = float(np.max(np.abs(x))) * float(np.max(np.abs(w))) * nred + 1
            atol = WINOGRAD_FACTOR[algorithm] * tolerance(dtype, nred) * scale
            np.testing.assert_allclose(got, want, rtol=0, atol=atol)
            assert got.dtype == dtype
    got = mn.conv2d(x[0], w, algorithm=algorithm, padding=1)  # unbatched
    assert got.shape == (k, h, w_)


@pytest.mark.parametrize("algorithm", ["winograd_f2", "winograd_f4"])
def test_winograd_tiles_are_within_the_stated_tolerance_of_each_other(algorithm, rng):
    """Random shapes: each tile against direct convolution (float32)."""
    for _ in range(20):
        n, c, k = rng.integers(1, 4), rng.integers(1, 40), rng.integers(1, 40)
        h, w_ = rng.integers(1, 30, size=2)
        x = rng.standard_normal((n, c, h, w_)).astype(np.float32)
        w = rng.standard_normal((k, c, 3, 3)).astype(np.float32)
        got = mn.conv2d(x, w, padding=1, algorithm=algorithm)
        direct = mn.conv2d(x, w, padding=1, algorithm="direct")
        scale = float(np.abs(x).max() * np.abs(w).max()) * c * 9 + 1
        atol = (WINOGRAD_FACTOR[algorithm] + 1) * tolerance(np.float32, c * 9) * scale
        np.testing.assert_allclose(got, direct, rtol=0, atol=atol)


def test_winograd_needs_its_layer():
    x, w = np.ones((1, 2, 6, 6)), np.ones((2, 2, 3, 3))
    for opts in (dict(stride=2), dict(dilation=2), dict(groups=2)):
        with pytest.raises(ValueError, match="needs a 3x3 kernel"):
            mn.conv2d(x, w[:, : 2 // opts.get("groups", 1)], algorithm="winograd", **opts)
    with pytest.raises(ValueError, match="needs a 3x3 kernel"):
        mn.conv2d(x, np.ones((2, 2, 5, 5)), algorithm="winograd")
    with pytest.raises(ValueError, match="algorithm is invalid"):
        mn.conv2d(x, w, algorithm="fft")


def test_auto_uses_winograd_only_where_it_pays(rng):
    """Note [auto algorithm]: F4 from 128 4x4 tiles, K >= 16 and C * K >= 512; F2 (fewer
    tiles) from K >= 32 and C * K >= 1024; else direct.  "winograd" picks F4 from 128 tiles."""
    x = rng.standard_normal((2, 64, 9, 9)).astype(np.float32)  # 2 * 3 * 3 = 18 tiles of 4x4
    w = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
    big = np.tile(x, (8, 1, 1, 1))  # 144 tiles
    for xs, c, k, algorithm in [
        (x, 64, 64, "winograd_f2"),
        (x, 32, 32, "winograd_f2"),
        (x, 16, 64, "winograd_f2"),
        (x, 24, 24, "direct"),
        (x, 64, 16, "direct"),
        (big, 32, 16, "winograd_f4"),
        (big, 24, 24, "winograd_f4"),
        (big, 64, 8, "direct"),
        (big, 16, 16, "direct"),
    ]:
        xs, ws = xs[:, :c], w[:k, :c]
        auto = mn.conv2d(xs, ws, padding=1)
        np.testing.assert_array_equal(auto, mn.conv2d(xs, ws, padding=1, algorithm=algorithm))
    np.testing.assert_array_equal(
        mn.conv2d(x, w, padding=1, algorithm="winograd"),
        mn.conv2d(x, w, padding=1, algorithm="winograd_f2"),
    )
    np.testing.assert_array_equal(
        mn.conv2d(big, w, padding=1, algorithm="winograd"),
        mn.conv2d(big, w, padding=1, algorithm="winograd_f4"),
    )


def test_strided_layers_with_few_channels_match_direct(rng):
    """'auto' runs them as stride-1 convolutions of the phase-split input (Note [space to
    depth]); the sums are the same as the direct strided kernel's, up to rounding."""
    for n, c, h, w_, k, r, s, stride, padding in [
        (2, 3, 31, 29, 16, 7, 7, 2, 3),
        (1, 2, 12, 13, 5, 5, 4, (2, 3), (2, 1, 0, 2)),
        (3, 4, 9, 9, 8, 3, 3, 3, 1),
    ]:
        x = rng.standard_normal((n, c, h, w_)).astype(np.float32)
        w = rng.standard_normal((k, c, r, s)).astype(np.float32)
        auto = mn.conv2d(x, w, stride=stride, padding=padding)
        direct = mn.conv2d(x, w, stride=stride, padding=padding, algorithm="direct")
        assert auto.shape == direct.shape
        np.testing.assert_allclose(auto, direct, rtol=1e-5, atol=1e-5)


def test_space_to_depth_phases_against_reference(rng):
    """The phase-split copy (Note [space to depth]) for random strides, kernels smaller and
    larger than the stride multiples, and paddings up to past the kernel (rows and columns of
    a phase wholly in the padding), against the float64 reference."""
    for _ in range(40):
        sh, sw = (int(v) for v in rng.integers(2, 4, size=2))
        r, s = int(rng.integers(sh, 8)), int(rng.integers(sw, 8))
        h, w_ = int(rng.integers(1, 14)), int(rng.integers(1, 14))
        pads = tuple(int(v) for v in rng.integers(0, 6, size=4))
        if h + pads[0] + pads[1] < r or w_ + pads[2] + pads[3] < s:
            continue
        c, k = int(rng.integers(1, 4)), int(rng.integers(1, 9))
        x = rng.standard_normal((2, c, h, w_))
        w = rng.standard_normal((k, c, r, s))
        got = mn.conv2d(x, w, stride=(sh, sw), padding=pads)
        want = ref.conv2d(x, w, stride=(sh, sw), padding=pads)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


# -- backward ------------------------------------------------------------------------------------

# torch's Conv2d has neither "same" with a stride nor 4-tuple padding: those forms are checked
# against central differences below and against the reference
BACKWARD_GRID = [
    case
    for case in GRID
    if case[0] > 0 and case[8] != "same" and not (isinstance(case[8], tuple) and len(case[8]) == 4)
]


@pytest.mark.parametrize("case", BACKWARD_GRID, ids=str)
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv2d_backward_against_pytorch(case, mode, rng):
    torch = pytest.importorskip("torch")
    n, c, h, w_, k, r, s, stride, padding, dilation, groups = case
    x = rng.standard_normal((n, c, h, w_))
    w = rng.standard_normal((k, c // groups, r, s))
    opts = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    go = rng.standard_normal(mn.conv2d(x, w, padding_mode=mode, **opts).shape)
    gx, gw, gb = mn.conv2d_backward(x, w, go, padding_mode=mode, **opts)
    m = torch.nn.Conv2d(c, k, (r, s), padding_mode=mode, **opts).double()
    m.weight.data = torch.tensor(w)
    xt = torch.tensor(x, requires_grad=True)
    (m(xt) * torch.tensor(go)).sum().backward()
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gw, m.weight.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gb, m.bias.grad.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_backward_central_differences(dtype, rng):
    """Every gradient against float64 central differences of sum(g * conv2d(...)), for 'same'
    with stride, a 4-tuple padding, groups and dilation, and each padding mode."""
    x = rng.standard_normal((2, 4, 5, 6))
    w = rng.standard_normal((6, 2, 3, 2))
    for padding, mode in [
        ("same", "zeros"),
        ((0, 2, 1, 1), "reflect"),
        (1, "circular"),
        (2, "replicate"),
    ]:
        opts = dict(stride=(2, 1), padding=padding, dilation=(1, 2), groups=2, padding_mode=mode)
        go = rng.standard_normal(mn.conv2d(x, w, **opts).shape)
        gx, gw, gb = mn.conv2d_backward(x.astype(dtype), w.astype(dtype), go.astype(dtype), **opts)
        assert gx.dtype == dtype and gw.dtype == dtype and gb.dtype == dtype

        def loss(xx, ww, bb, go=go, opts=opts):
            return float(np.sum(go * mn.conv2d(xx, ww, bb, **opts)))

        h = 1e-6
        b0 = np.zeros(6)
        for target, grad, which in [(x, gx, 0), (w, gw, 1), (b0, gb, 2)]:
            num = np.zeros_like(target)
            for idx in np.ndindex(target.shape):
                e = np.zeros_like(target)
                e[idx] = h
                args_p, args_m = [x, w, b0], [x, w, b0]
                args_p[which] = target + e
                args_m[which] = target - e
                num[idx] = (loss(*args_p) - loss(*args_m)) / (2 * h)
            rtol = 1e-4 if dtype == np.float32 else 1e-6
            np.testing.assert_allclose(grad, num, rtol=rtol, atol=rtol)


def test_conv_backward_needs_unbatched_and_1d(rng):
    x = rng.standard_normal((3, 8, 8))
    w = rng.standard_normal((4, 3, 3, 3))
    go = rng.standard_normal((4, 8, 8))
    gx, gw, gb = mn.conv2d_backward(x, w, go, padding=1, needs=("weight",))
    assert gx is None and gb is None and gw.shape == w.shape
    gx, gw, gb = mn.conv2d_backward(x, w, go, padding=1)
    assert gx.shape == x.shape
    full = mn.conv2d_backward(x[None], w, go[None], padding=1)
    np.testing.assert_allclose(gx, full[0][0], rtol=1e-12)
    x1 = rng.standard_normal((2, 4, 11))
    w1 = rng.standard_normal((6, 2, 3))
    go1 = rng.standard_normal(mn.conv1d(x1, w1, stride=2, padding=1, groups=2).shape)
    g1 = mn.conv1d_backward(x1, w1, go1, stride=2, padding=1, groups=2)
    g2 = mn.conv2d_backward(
        x1[:, :, None], w1[:, :, None], go1[:, :, None], stride=(1, 2), padding=(0, 1), groups=2
    )
    np.testing.assert_allclose(g1[0], g2[0][:, :, 0], rtol=1e-12)
    np.testing.assert_allclose(g1[1], g2[1][:, :, 0], rtol=1e-12)
    np.testing.assert_allclose(g1[2], g2[2], rtol=1e-12)


@pytest.mark.parametrize(
    "n, c, h, k, stride, groups",
    [
        (4, 16, 14, 32, 2, 1),  # copied rows
        (1, 32, 40, 32, 1, 1),  # one image cut into parts; rows read in place
        (2, 128, 6, 128, 1, 1),  # large partials: column slices
        (3, 8, 11, 12, 1, 2),  # groups
    ],
)
def test_conv_backward_threads_do_not_change_results(rng, threads, n, c, h, k, stride, groups):
    """Note [weight gradient]: every work split depends on the shapes only."""
    x = rng.standard_normal((n, c, h, h)).astype(np.float32)
    w = rng.standard_normal((k, c // groups, 3, 3)).astype(np.float32)
    ho = (h + 2 - 3) // stride + 1
    go = rng.standard_normal((n, k, ho, ho)).astype(np.float32)
    results = []
    for t in (1, 2, 3):
        mn.set_num_threads(t)
        results.append(mn.conv2d_backward(x, w, go, stride=stride, padding=1, groups=groups))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)
    want = ref.conv2d_backward(x, w, go, stride=stride, padding=1, groups=groups)
    for got, expected in zip(results[0], want, strict=True):
        length = n * ho * ho * 9  # the longest reduction (the weight gradient's)
        scale = float(np.abs(x).max() * np.abs(go).max()) * length
        np.testing.assert_allclose(
            got, expected, rtol=0, atol=tolerance(np.float32, length) * scale
        )


def assert_backward_close(x, w, go, opts):
    """conv2d_backward(x, w, go, **opts) against the reference, with tolerances of the longest
    reductions: over K*R*S taps for the input, over N*Ho*Wo positions for the weight and bias."""
    dtype, (k, _, r, s) = x.dtype, w.shape
    got = mn.conv2d_backward(x, w, go, **opts)
    want = ref.conv2d_backward(
        x.astype(np.float64), w.astype(np.float64), go.astype(np.float64), **opts
    )
    lengths = (k * r * s, int(np.prod(go.shape)) // k, int(np.prod(go.shape)) // k)
    for g_, w_ref, length in zip(got, want, lengths, strict=True):
        assert g_.dtype == dtype and g_.shape == w_ref.shape
        scale = float(np.max(np.abs(w_ref), initial=0)) + 1
        np.testing.assert_allclose(g_, w_ref, rtol=0, atol=tolerance(dtype, length) * scale * 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [c for c in GRID if c[0] > 0], ids=str)
def test_conv2d_backward_against_reference(case, dtype, rng):
    """Every form of the forward grid, 'same' with a stride and 4-tuple padding included."""
    n, c, h, w_, k, r, s, stride, padding, dilation, groups = case
    x = rng.standard_normal((n, c, h, w_)).astype(dtype)
    w = rng.standard_normal((k, c // groups, r, s)).astype(dtype)
    for mode in ("zeros", "reflect"):
        opts = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        opts["padding_mode"] = mode
        go = rng.standard_normal(mn.conv2d(x, w, **opts).shape).astype(dtype)
        assert_backward_close(x, w, go, opts)
