"""Large padding (Note [large padding] in _conv.py): where the padded input would dwarf the input
and output, convolution runs tap by tap on gathered patches.  The memory it saves, and the path
itself (forced through its thresholds) on the forward and backward grids of every padding mode."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from test_conv import GRID, assert_backward_close, assert_conv_close, check_grid_case

import mlmath_native as mn
from mlmath_native import _conv
from mlmath_native.reference import convolution as ref

from conftest import tolerance

# Peak resident memory of one call in a fresh interpreter (ru_maxrss is a high-water mark: in
# this process an earlier test's peak would hide it), and its result.
_PEAK_SCRIPT = """
import json, resource, sys
import numpy as np, mlmath_native as mn
rng = np.random.default_rng(0)
x, w, b = rng.standard_normal((1, 1, 8, 8)), rng.standard_normal((2, 1, 3, 3)), np.ones(2)
mn.conv2d(x, w, b, padding=1)  # warm-up: the thread team, allocator arenas
mn.conv2d_backward(x, w, np.ones((1, 2, 8, 8)), padding=1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
opts = dict(dilation=12000, padding="same", padding_mode=sys.argv[1])
y = mn.conv2d(x, w, b, **opts)
grads = mn.conv2d_backward(x, w, np.ones(y.shape), **opts)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"mib": grown / 1024, "y": y.tolist(), "grads": [g.tolist() for g in grads]}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
@pytest.mark.parametrize("mode", ["zeros", "replicate"])
def test_huge_dilation_same_padding_stays_small(mode):
    """conv2d(dilation=12000, padding="same") on an 8x8 input padded it to 24008 x 24008 (+4.4
    GiB per channel, 16 s); PyTorch needs 5 MiB.  Only the centre tap meets the input (zeros:
    the others read padding; replicate: they read the edge rows and columns)."""
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, mode], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert got["mib"] < 200, f"peak RSS grew by {got['mib']:.0f} MiB"
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((1, 1, 8, 8)), rng.standard_normal((2, 1, 3, 3)), np.ones(2)
    # the same sums on a small padded copy: every padded position a tap reads, gathered
    rows = [np.clip(np.arange(8) + (r - 1) * 12000, -1, 8) for r in range(3)]
    if mode == "zeros":
        xe = np.pad(x, [(0, 0), (0, 0), (0, 1), (0, 1)])  # index -1 and 8: the zero
        rows = [np.where((q < 0) | (q > 7), 8, q) for q in rows]
    else:
        xe, rows = x, [np.clip(q, 0, 7) for q in rows]
    want = np.zeros((1, 2, 8, 8)) + b[:, None, None]
    for r in range(3):
        for s in range(3):
            patch = xe[:, :, rows[r][:, None], rows[s][None, :]]
            want += np.einsum("nchw,kc->nkhw", patch, w[:, :, r, s])
    np.testing.assert_allclose(got["y"], want, rtol=1e-12, atol=1e-12)
    gx, gw, gb = (np.array(g) for g in got["grads"])
    assert gx.shape == x.shape and gw.shape == w.shape
    np.testing.assert_allclose(gb, [64.0, 64.0])
    if mode == "zeros":  # the centre tap only: a 1x1 convolution's gradients
        np.testing.assert_allclose(gx[0, 0], np.full((8, 8), w[:, 0, 1, 1].sum()), rtol=1e-12)
        want_gw = np.zeros_like(w)
        want_gw[:, 0, 1, 1] = x.sum()
        np.testing.assert_allclose(gw, want_gw, rtol=1e-12, atol=1e-12)


def test_large_padding_takes_the_gathered_path(monkeypatch):
    """The thresholds: the padded copy against the input and output, and a floor in bytes."""
    calls = []
    monkeypatch.setattr(_conv, "_conv_gathered", lambda p: calls.append(p) or np.zeros(1))
    x, w = np.ones((1, 1, 8, 8)), np.ones((1, 1, 3, 3))
    mn.conv2d(x, w, padding=1)
    mn.conv2d(x, w, padding=800)  # a 1608^2 padded copy (20 MiB), but as large as the output
    mn.conv2d(x, w, dilation=690, padding="same")  # 1388^2 * 8 bytes: 15 MiB, under the floor
    assert not calls
    mn.conv2d(x, w, dilation=800, padding="same")  # 20 MiB for an 8x8 output
    assert len(calls) == 1


def _force_gathered(monkeypatch):
    monkeypatch.setattr(_conv, "_PAD_COPY_RATIO", 0)
    monkeypatch.setattr(_conv, "_PAD_COPY_MIN_BYTES", 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", GRID, ids=str)
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_gathered_path_against_reference(case, mode, dtype, rng, monkeypatch):
    """The forward grid of test_conv.py, every padding mode, through the gathered path."""
    _force_gathered(monkeypatch)
    n, _, _, _, _, _, _, stride, padding, dilation, groups = case
    x, w = check_grid_case(case, mode, dtype, rng)
    if n and stride == 1 and dilation == 1 and groups == 1:  # conv1d along the rows
        opts1 = dict(padding=padding if isinstance(padding, int | str) else 1, padding_mode=mode)
        x1, w1 = x[:, :, 0], w[:, :, 0]
        want1 = ref.conv1d(x1.astype(np.float64), w1.astype(np.float64), **opts1)
        assert_conv_close(mn.conv1d(x1, w1, **opts1), want1, x1, w1, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", [c for c in GRID if c[0] > 0], ids=str)
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_gathered_backward_against_reference(case, mode, dtype, rng, monkeypatch):
    _force_gathered(monkeypatch)
    n, c, h, w_, k, r, s, stride, padding, dilation, groups = case
    x = rng.standard_normal((n, c, h, w_)).astype(dtype)
    w = rng.standard_normal((k, c // groups, r, s)).astype(dtype)
    opts = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=mode)
    go = rng.standard_normal(mn.conv2d(x, w, **opts).shape).astype(dtype)
    assert_backward_close(x, w, go, opts)
    # unbatched, needs and conv1d_backward through the same path
    gx, gw, gb = mn.conv2d_backward(x[0], w, go[0], needs=("input",), **opts)
    assert gw is None and gb is None
    want0 = ref.conv2d_backward(
        x[:1].astype(np.float64), w.astype(np.float64), go[:1].astype(np.float64), **opts
    )
    np.testing.assert_allclose(gx, want0[0][0], rtol=0, atol=tolerance(dtype, k * r * s) * 40)
    if stride == 1 and dilation == 1 and groups == 1 and isinstance(padding, int):
        x1, w1 = x[:, :, 0], w[:, :, 0]
        go1 = rng.standard_normal(mn.conv1d(x1, w1, padding=padding).shape).astype(dtype)
        got1 = mn.conv1d_backward(x1, w1, go1, padding=padding, padding_mode=mode)
        want1 = ref.conv1d_backward(
            x1.astype(np.float64),
            w1.astype(np.float64),
            go1.astype(np.float64),
            padding=padding,
            padding_mode=mode,
        )
        for g_, w_ref in zip(got1, want1, strict=True):
            scale = float(np.max(np.abs(w_ref), initial=0)) + 1
            np.testing.assert_allclose(g_, w_ref, rtol=0, atol=tolerance(dtype, 400) * scale * 4)
