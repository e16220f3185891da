"""NaN and +-inf through every convolution algorithm (Note [non-finite inputs] in
kernels/conv.cpp): a non-finite value in x, w or grad_out must reach exactly the outputs the
definition sends it to, with the definition's NaN/inf pattern (inf * w + finite = +-inf by w's
sign; NaN from inf - inf or 0 * inf), whichever algorithm the dispatcher picks or is told, and the
finite outputs must match the float64 reference (and PyTorch where installed)."""

from __future__ import annotations

import numpy as np
import pytest

import mlmath_native as mn
from mlmath_native import _conv
from mlmath_native.reference import convolution as ref

from conftest import tolerance

# the library's own NumPy steps must not warn about the NaN and inf they pass on
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning:mlmath_native._conv")

NONFINITE = [np.nan, np.inf, -np.inf]

# Every algorithm the forward dispatcher can run, and how a call reaches it:
# name: ((N, C, H, W, K, R, S), conv2d options); "gathered" is forced through its thresholds.
FORWARD_PATHS = {
    "implicit GEMM, strided": (
        (2, 3, 9, 9, 5, 3, 3),
        dict(stride=2, padding=1, algorithm="direct"),
    ),
    "space to depth, strided": ((2, 3, 9, 9, 5, 3, 3), dict(stride=2, padding=1)),
    "space to depth, 7x7 stride 2": ((1, 2, 13, 12, 4, 7, 7), dict(stride=2, padding=3)),
    "shifted rows, stride 1": ((2, 3, 8, 9, 5, 3, 3), dict(padding=1, algorithm="direct")),
    "shifted, stride 1, K > 64": ((1, 3, 6, 7, 72, 3, 3), dict(padding=1, algorithm="direct")),
    "pointwise GEMM": ((2, 4, 5, 6, 5, 1, 1), dict()),
    "depthwise": ((2, 4, 7, 8, 8, 3, 3), dict(padding=1, groups=4)),
    "depthwise, strided": ((2, 4, 9, 8, 4, 3, 3), dict(stride=2, padding=1, groups=4)),
    "winograd_f2": ((2, 3, 8, 9, 5, 3, 3), dict(padding=1, algorithm="winograd_f2")),
    "winograd_f4": ((2, 3, 9, 10, 5, 3, 3), dict(padding=(2, 0, 1, 1), algorithm="winograd_f4")),
    "winograd_f4, reflect": (
        (1, 3, 9, 9, 4, 3, 3),
        dict(padding=1, padding_mode="reflect", algorithm="winograd_f4"),
    ),
    "winograd, auto (F4)": ((8, 32, 16, 16, 16, 3, 3), dict(padding=1)),
    "gathered (large padding)": (
        (2, 3, 7, 6, 4, 3, 2),
        dict(stride=(1, 2), padding=4, dilation=(3, 1)),
    ),
}


def _quiet(fn, *args, **kwargs):
    """A reference call, without NumPy's warnings about the NaN and inf it computes."""
    with np.errstate(invalid="ignore", over="ignore"):
        return fn(*args, **kwargs)


def _gathered(monkeypatch):
    """Every call takes the tap-by-tap path of Note [large padding]."""
    monkeypatch.setattr(_conv, "_PAD_COPY_RATIO", 0)
    monkeypatch.setattr(_conv, "_PAD_COPY_MIN_BYTES", 0)


def _positions(shape, rng):
    """A corner, the last element, the middle and two random positions."""
    out = [(0,) * len(shape), tuple(d - 1 for d in shape), tuple(d // 2 for d in shape)]
    out += [tuple(int(rng.integers(d)) for d in shape) for _ in range(2)]
    return out


def assert_same_nonfinite(got, want, scale, dtype, length, what):
    """The NaN, +inf and -inf positions equal; the finite values within the tolerance."""
    assert got.shape == want.shape, what
    for test, kind in ((np.isnan, "NaN"), (np.isposinf, "+inf"), (np.isneginf, "-inf")):
        np.testing.assert_array_equal(test(got), test(want), err_msg=f"{what}: {kind} positions")
    finite = np.isfinite(want)
    atol = 16 * tolerance(dtype, length) * scale
    np.testing.assert_allclose(got[finite], want[finite], rtol=0, atol=atol, err_msg=what)


def _inputs(rng, shape, groups, dtype):
    n, c, h, w_, k, r, s = shape
    x = rng.standard_normal((n, c, h, w_))
    w = rng.standard_normal((k, c // groups, r, s))
    w.flat[::5] = 0.0  # exact zeros: 0 * inf = NaN where a window meets one
    b = rng.standard_normal(k)
    return x.astype(dtype), w.astype(dtype), b.astype(dtype)


def _trials(x, w, rng):
    """(x, w) pairs with one NaN/inf/-inf at each of several positions of x, then of w, and an
    inf and a -inf in one window (inf - inf)."""
    for target in ("x", "w"):
        arr = x if target == "x" else w
        for pos in _positions(arr.shape, rng):
            for value in NONFINITE:
                xx, ww = x.copy(), w.copy()
                (xx if target == "x" else ww)[pos] = value
                yield f"{target}[{pos}] = {value}", xx, ww
    xx = x.copy()
    xx[0, 0, 1, 1], xx[0, -1, 2, 2] = np.inf, -np.inf
    yield "x: inf and -inf in one window", xx, w


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("path", list(FORWARD_PATHS))
def test_nonfinite_inputs_through_every_forward_algorithm(path, dtype, rng, monkeypatch):
    """Against the float64 reference and the direct path, per algorithm and position."""
    shape, opts = FORWARD_PATHS[path]
    if path.startswith("gathered"):
        _gathered(monkeypatch)
    opts = dict(opts)
    algorithm = opts.pop("algorithm", "auto")
    groups = opts.get("groups", 1)
    x, w, b = _inputs(rng, shape, groups, dtype)
    length = int(np.prod(w.shape[1:]))
    for what, xx, ww in _trials(x, w, rng):
        got = mn.conv2d(xx, ww, b, algorithm=algorithm, **opts)
        want = _quiet(
            ref.conv2d, xx.astype(np.float64), ww.astype(np.float64), b.astype(np.float64), **opts
        )
        finite_x, finite_w = xx[np.isfinite(xx)], ww[np.isfinite(ww)]
        scale = float(np.abs(finite_x).max() * np.abs(finite_w).max()) * length + 1
        assert_same_nonfinite(got, want, scale, dtype, length, f"{path}, {what}")
        direct = mn.conv2d(xx, ww, b, algorithm="direct", **opts)
        for test in (np.isnan, np.isposinf, np.isneginf):
            np.testing.assert_array_equal(test(got), test(direct), err_msg=f"{path}, {what}")


@pytest.mark.parametrize(
    "path", [p for p, (_, o) in FORWARD_PATHS.items() if o.get("padding_mode", "zeros") == "zeros"]
)
def test_nonfinite_inputs_against_pytorch(path, rng, monkeypatch):
    torch = pytest.importorskip("torch")
    shape, opts = FORWARD_PATHS[path]
    if path.startswith("gathered"):
        _gathered(monkeypatch)
    opts = dict(opts)
    algorithm = opts.pop("algorithm", "auto")
    padding = opts.pop("padding", 0)
    if isinstance(padding, tuple):  # torch takes (ph, pw) only: pad the input instead
        top, bottom, left, right = padding
        pad_torch = lambda t: torch.nn.functional.pad(t, (left, right, top, bottom))  # noqa: E731
        padding_torch = 0
    else:
        pad_torch, padding_torch = (lambda t: t), padding
    x, w, b = _inputs(rng, shape, opts.get("groups", 1), np.float64)
    for what, xx, ww in _trials(x, w, rng):
        got = mn.conv2d(xx, ww, b, algorithm=algorithm, padding=padding, **opts)
        want = torch.nn.functional.conv2d(
            pad_torch(torch.tensor(xx)),
            torch.tensor(ww),
            torch.tensor(b),
            padding=padding_torch,
            **opts,
        ).numpy()
        assert_same_nonfinite(got, want, 100.0, np.float64, int(np.prod(w.shape[1:])), what)


# The backward's forms: (N, C, H, K, options); the stride-1 input gradient is a transposed
# convolution (Winograd where the shapes ask for it; 'full' when the padding passes the kernel),
# the strided one GEMM + col2im.
BACKWARD_PATHS = {
    "stride 1, cropped transposed conv": ((2, 3, 7, 4), dict(padding=0)),
    "stride 1, cropped, winograd (auto F4)": ((8, 16, 16, 32), dict(padding=1)),
    "stride 1, full transposed conv": ((1, 3, 6, 4), dict(padding=3)),
    "strided, col2im": ((2, 3, 9, 4), dict(stride=2, padding=1)),
    "reflect": ((1, 3, 7, 4), dict(padding=2, padding_mode="reflect")),
    "gathered (large padding)": ((2, 3, 6, 4), dict(padding=4, dilation=2, stride=(2, 1))),
}


@pytest.mark.parametrize("path", list(BACKWARD_PATHS))
def test_nonfinite_inputs_through_every_backward_form(path, rng, monkeypatch):
    (n, c, h, k), opts = BACKWARD_PATHS[path]
    if path.startswith("gathered"):
        _gathered(monkeypatch)
    x = rng.standard_normal((n, c, h, h))
    w = rng.standard_normal((k, c, 3, 3))
    w.flat[::5] = 0.0
    go = rng.standard_normal(mn.conv2d(x, w, **opts).shape)
    trials = []
    for name, arr in (("x", x), ("w", w), ("grad_out", go)):
        for pos in _positions(arr.shape, rng)[:3]:
            for value in NONFINITE:
                args = {"x": x.copy(), "w": w.copy(), "grad_out": go.copy()}
                args[name][pos] = value
                trials.append((f"{name}[{pos}] = {value}", args))
    for what, args in trials:
        got = mn.conv2d_backward(args["x"], args["w"], args["grad_out"], **opts)
        want = _quiet(ref.conv2d_backward, args["x"], args["w"], args["grad_out"], **opts)
        for g, r, which in zip(got, want, ("grad_input", "grad_weight", "grad_bias"), strict=True):
            length = max(int(np.prod(go.shape)) // k, k * 9)
            assert_same_nonfinite(g, r, 100.0, np.float64, length, f"{path}, {what}: {which}")


# -- the reports, as assertions ------------------------------------------------------------------


def test_space_to_depth_keeps_nan_in_its_windows():
    """A NaN in row 3 of a 5x5 input, 3x3 stride 2: only the outputs whose window holds row 3
    (the strided path multiplied it by its zero taps and set every output NaN)."""
    x = np.ones((1, 1, 5, 5))
    x[0, 0, 3, 1] = np.nan
    y = mn.conv2d(x, np.ones((1, 1, 3, 3)), stride=2)
    np.testing.assert_array_equal(np.isnan(y[0, 0]), [[False, False], [True, False]])
    assert (y[~np.isnan(y)] == 9).all()


@pytest.mark.parametrize("algorithm", ["winograd_f2", "winograd_f4", "winograd"])
def test_winograd_keeps_inf_in_its_windows(algorithm, rng):
    """One inf, positive weights: inf in the 3x3 outputs around it (of every channel), nothing
    else (F4 spread it to hundreds of outputs, F2 and F4 turned it into NaN)."""
    x = rng.standard_normal((1, 4, 16, 16))
    x[0, 1, 5, 7] = np.inf
    w = np.abs(rng.standard_normal((4, 4, 3, 3))) + 0.1
    y = mn.conv2d(x, w, padding=1, algorithm=algorithm)
    want = np.zeros((16, 16), bool)
    want[4:7, 6:9] = True
    assert not np.isnan(y).any()
    for k in range(4):
        np.testing.assert_array_equal(np.isposinf(y[0, k]), want)


def test_backward_inf_weight_does_not_meet_grad_out_padding():
    """The stride-1 input gradient as a transposed convolution multiplied g's zero padding by
    w[0, 0, 0, 0] = inf: NaN everywhere the definition has finite sums."""
    x, w, go = np.ones((1, 1, 4, 4)), np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2))
    w[0, 0, 0, 0] = np.inf
    gx = mn.conv2d_backward(x, w, go)[0][0, 0]
    want = np.array([[9, 9, 2, 1], [9, 9, 4, 2], [2, 4, 4, 2], [1, 2, 2, 1]], float)
    want[:2, :2] = np.inf
    np.testing.assert_array_equal(gx, want)


def test_backward_winograd_keeps_inf_in_its_windows(rng):
    """The input gradient's Winograd F4 (chosen by shape) spread one inf of grad_out as NaN."""
    x = rng.standard_normal((8, 16, 16, 16))
    w = rng.standard_normal((32, 16, 3, 3))
    go = rng.standard_normal((8, 32, 16, 16))
    go[0, 3, 5, 5] = np.inf
    gx = mn.conv2d_backward(x, w, go, padding=1, needs=("input",))[0]
    want = _quiet(ref.conv2d_backward, x, w, go, padding=1, needs=("input",))[0]
    assert not np.isnan(want).any()
    np.testing.assert_array_equal(np.isnan(gx), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(gx), np.isinf(want))


def test_all_finite_kernel():
    """The scan behind the dispatch: every position of the vector tails and block edges."""
    from mlmath_native import _core

    for dtype in (np.float32, np.float64):
        for n in (0, 1, 7, 8, 9, 17, 33, 16384, 16385):
            x = np.full(n, np.finfo(dtype).max, dtype)  # large, finite: no overflow to inf
            assert _core.all_finite(x)
            for i in sorted({0, n // 2, n - 1, min(16383, n - 1)}) if n else []:
                for value in NONFINITE:
                    y = x.copy()
                    y[i] = value
                    assert not _core.all_finite(y), (dtype, n, i, value)
    big = np.ones(2**22 + 5, np.float32)  # past 256 blocks: the threads split the scan
    assert _core.all_finite(big)
    for i in (0, 2**21 + 7, big.size - 1):
        big[i] = np.nan
        assert not _core.all_finite(big)
        big[i] = 1.0


def test_winograd_overflow_falls_back_to_direct():
    """Finite float32 inputs whose F4 transforms overflow (its factors reach 100 per value; it
    returned no finite output) while the direct sums do not: the non-finite outputs send the
    layer to direct convolution (Note [winograd non-finite])."""
    algorithm = "winograd_f4"
    x = np.full((1, 1, 8, 8), 1.5e37, np.float32)
    x[0, 0, ::2] *= -1  # alternating rows: the transforms' differences grow
    w = np.ones((1, 1, 3, 3), np.float32)
    got = mn.conv2d(x, w, padding=1, algorithm=algorithm)
    want = mn.conv2d(x, w, padding=1, algorithm="direct")
    assert np.isfinite(want).all()
    np.testing.assert_array_equal(got, want)
