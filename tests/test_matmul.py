"""matmul on the packed GEMM core against NumPy (in float64): sizes across every micro-kernel
tail, transposed and strided views, np.matmul's broadcasting and 1-D rules, out=; every ISA."""

from __future__ import annotations

import numpy as np
import pytest

import mlmath_native as mn

from conftest import tolerance

DTYPES = [np.float32, np.float64]
# below, at and above the micro-kernel tiles of every ISA (MR 4/6/12, NR 4/8/16/32, KC 256)
EDGES = [
    1,
    2,
    3,
    5,
    6,
    7,
    8,
    9,
    12,
    13,
    16,
    17,
    31,
    32,
    33,
    47,
    48,
    63,
    64,
    65,
    97,
    127,
    128,
    129,
    130,
]


def check(a, b, got=None):
    want = np.matmul(a.astype(np.float64), b.astype(np.float64))
    got = mn.matmul(a, b) if got is None else got
    assert got.shape == want.shape
    k = a.shape[-1]
    scale = np.matmul(np.abs(a).astype(np.float64), np.abs(b).astype(np.float64)) + 1e-300
    err = np.abs(got.astype(np.float64) - want) / scale
    assert err.max(initial=0) <= tolerance(got.dtype, k), f"error {err.max()} for k={k}"
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["m", "n", "k"])
def test_each_dimension_over_the_tails(which, dtype, rng):
    for size in EDGES:
        m, n, k = 19, 37, 23
        m, n, k = (
            size if which == "m" else m,
            size if which == "n" else n,
            size if which == "k" else k,
        )
        a = rng.standard_normal((m, k)).astype(dtype)
        b = rng.standard_normal((k, n)).astype(dtype)
        assert check(a, b).dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_sizes_up_to_130_and_transposed_views(dtype, rng):
    for _ in range(40):
        m, n, k = rng.integers(1, 131, 3)
        a = rng.standard_normal((k, m)).astype(dtype).T  # column-major view
        b = rng.standard_normal((n, k)).astype(dtype).T
        check(a, b)
        big = rng.standard_normal((2 * m + 1, 3 * k + 2)).astype(dtype)
        check(big[::2, 1::3][:m, :k], b[::-1])  # strided and reversed


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_blocks(dtype, rng):
    # more than one KC block of K, several MC blocks and an NC block boundary
    a = rng.standard_normal((400, 600)).astype(dtype)
    b = rng.standard_normal((600, 1100)).astype(dtype)
    check(a, b)


def test_batched_broadcasting_and_vectors(rng):
    a = rng.standard_normal((3, 1, 5, 4))
    b = rng.standard_normal((2, 4, 6))
    check(a, b)
    check(a, b[0])
    check(a[0, 0], b)
    v = rng.standard_normal(4)
    for x, y in [(v, b), (a, v), (v, v), (v, rng.standard_normal((4, 7)))]:
        got = mn.matmul(x, y)
        want = np.matmul(x, y)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_dtypes_and_empty(rng):
    a32 = rng.standard_normal((3, 4)).astype(np.float32)
    assert mn.matmul(a32, a32.T).dtype == np.float32
    assert mn.matmul(a32, a32.T.astype(np.float64)).dtype == np.float64
    assert mn.matmul([[1, 2]], [[3], [4]]).tolist() == [[11.0]]
    np.testing.assert_array_equal(mn.matmul(np.ones((3, 0)), np.ones((0, 5))), np.zeros((3, 5)))
    assert mn.matmul(np.ones((0, 4)), np.ones((4, 5))).shape == (0, 5)
    assert mn.matmul(np.ones((2, 0, 4)), np.ones((4, 5))).shape == (2, 0, 5)


def test_out_including_overlap(rng):
    a = rng.standard_normal((6, 6))
    b = rng.standard_normal((6, 6))
    want = a @ b
    out = np.empty((6, 6))
    assert mn.matmul(a, b, out=out) is out
    np.testing.assert_allclose(out, want, rtol=1e-12)
    a2 = a.copy()
    mn.matmul(a2, b, out=a2)  # out is an input: computed through a temporary
    np.testing.assert_allclose(a2, want, rtol=1e-12)
    big = np.zeros((6, 12))
    mn.matmul(a, b, out=big[:, ::2])  # non-contiguous out
    np.testing.assert_allclose(big[:, ::2], want, rtol=1e-12)
    assert np.all(big[:, 1::2] == 0)


def test_threads_do_not_change_results(rng, threads):
    a = rng.standard_normal((300, 700)).astype(np.float32)
    b = rng.standard_normal((700, 500)).astype(np.float32)
    results = []
    for t in (1, 2, 3):
        mn.set_num_threads(t)
        results.append(mn.matmul(a, b))
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


# -- dot-like shapes: few outputs, long K (issue 17: two barriers per K block made a length-10^7
# inner product 12x slower on two threads than on one) -------------------------------------------

DOT_K = [1, 7, 8191, 8192, 8193, 3 * 8192 + 5]  # around the K chunk of Note [dot-like shapes]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mn_", [(1, 1), (1, 16), (16, 1), (4, 4), (3, 5), (2, 9)])
def test_dot_like_shapes(mn_, dtype, rng):
    m, n = mn_
    for k in DOT_K:
        a = rng.standard_normal((m, k)).astype(dtype)
        b = rng.standard_normal((k, n)).astype(dtype)
        check(a, b)
        check(np.asfortranarray(a), np.asfortranarray(b))  # strided rows of A, columns of B
        check(a[:, ::-1], b[::-1])  # negative strides
        check(a[None].repeat(3, 0), b)  # batched
    v = rng.standard_normal(20000).astype(dtype)
    np.testing.assert_allclose(
        mn.matmul(v, v), v.astype(np.float64) @ v, rtol=tolerance(dtype, 20000)
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_dot_like_results_do_not_depend_on_threads(dtype, rng, threads):
    a = rng.standard_normal((2, 5 * 8192 + 3)).astype(dtype)
    b = rng.standard_normal((5 * 8192 + 3, 3)).astype(dtype)
    results = []
    for t in (1, 2, 3):
        mn.set_num_threads(t)
        results.append(mn.matmul(a, b))
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_dot_like_nan_and_inf_propagate(rng):
    a = rng.standard_normal((1, 20000))
    b = rng.standard_normal((20000, 2))
    a[0, 12345] = np.inf
    b[12345, 1] = -1.0
    b[19000, 0] = np.nan
    got = mn.matmul(a, b)
    assert np.isnan(got[0, 0]) and got[0, 1] == -np.inf
