"""matmul on bfloat16 and float16 storage (float32 products and accumulation, each result rounded
once) against the float64 golden and against PyTorch's matmul in the same dtype
(tests/sixteen.py), on every ISA path (run with MLMATH_NATIVE_ISA=scalar / avx2)."""

from __future__ import annotations

import numpy as np
import pytest
from sixteen import (
    HALF_NAMES,
    assert_16bit_close,
    assert_special_values_match,
    dtype_of,
    optional_torch,
    random,
    rounded_overflow,
    to_torch,
    widen,
)

import mlmath_native as mn


def torch_matmul(a, b):
    torch = optional_torch()
    if torch is None:
        return None
    return torch.matmul(to_torch(a), to_torch(b))


def check(a, b, out=None):
    got = mn.matmul(a, b, out=out)
    golden = np.matmul(widen(a), widen(b))
    k = a.shape[-1]
    assert_16bit_close(got, golden, a.dtype, n=k, torch_result=torch_matmul(a, b))
    return got


# M, K, N: tails of the micro-kernel tile (MR 4/6/8, NR 16/24/48 per ISA), K past one KC block
# (192) and past several, the dot-like shapes (M*N <= 16)
SHAPES = [
    (1, 1, 1),
    (3, 5, 7),
    (6, 16, 16),
    (7, 17, 25),
    (13, 33, 49),
    (8, 192, 24),
    (9, 193, 31),
    (20, 400, 50),
    (33, 600, 17),
    (64, 385, 64),
    (2, 1000, 3),
    (1, 20000, 1),
    (4, 9000, 4),
    (17, 1, 18),
]


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_shapes(m, k, n, dtype_name, rng):
    dtype = dtype_of(dtype_name)
    got = check(random(rng, (m, k), dtype), random(rng, (k, n), dtype))
    assert got.dtype == dtype and got.shape == (m, n)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_several_kc_blocks_round_once(dtype_name, rng):
    """K = 3 KC blocks + a tail: the partial sums of the first blocks are not rounded (a bf16
    C re-read per block would be off by several roundings)."""
    dtype = dtype_of(dtype_name)
    m, k, n = 30, 3 * 192 + 7, 70
    a, b = random(rng, (m, k), dtype), random(rng, (k, n), dtype)
    got = mn.matmul(a, b)
    exact32 = np.matmul(a.astype(np.float32), b.astype(np.float32))
    # float32 sums differ only by float32 rounding: rounding them once gives our value in
    # almost every element (ties of order eps32 aside)
    agree = np.mean(widen(got) == widen(exact32.astype(dtype)))
    assert agree > 0.98
    check(a, b)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_batched_broadcast_vectors(dtype_name, rng):
    dtype = dtype_of(dtype_name)
    a = random(rng, (3, 1, 9, 200), dtype)
    b = random(rng, (4, 200, 11), dtype)
    check(a, b)
    v = random(rng, (200,), dtype)
    check(a, v)
    check(v, b)
    check(v, v)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_non_contiguous(dtype_name, rng):
    dtype = dtype_of(dtype_name)
    big_a = random(rng, (40, 500), dtype)
    big_b = random(rng, (300, 90), dtype)
    check(big_a[::2, ::2], big_b[:250, ::3])  # strided rows and columns
    check(big_a[:21, :300].T[:, ::-1].T[::-1], big_b[:300, :37])  # transposes, negative strides
    check(big_b[:40, :20].T, big_a[:40, :33])  # A^T
    check(big_a[:8, :200], big_a[:30, :200].T)  # B^T


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_out(dtype_name, rng):
    dtype = dtype_of(dtype_name)
    a, b = random(rng, (2, 17, 300), dtype), random(rng, (2, 300, 23), dtype)
    out = np.zeros((2, 17, 23), dtype)
    got = check(a, b, out=out)
    assert got is out
    # a non-contiguous out (the product goes through a temporary)
    base = np.zeros((2, 17, 46), dtype)
    got = mn.matmul(a, b, out=base[:, :, ::2])
    np.testing.assert_array_equal(widen(base[:, :, ::2]), widen(mn.matmul(a, b)))
    assert got.base is base or np.shares_memory(got, base)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_bad_out_dtype_writes_nothing(dtype_name, rng):
    dtype = dtype_of(dtype_name)
    a, b = random(rng, (5, 6), dtype), random(rng, (6, 7), dtype)
    for wrong in (np.float32, np.float64, np.float16 if dtype_name == "bfloat16" else None):
        if wrong is None:
            continue
        out = np.full((5, 7), 3, wrong)
        with pytest.raises(TypeError):
            mn.matmul(a, b, out=out)
        assert np.all(out == 3)
    out = np.full((5, 7), 3, dtype)  # a 16-bit out for float32 inputs
    with pytest.raises(TypeError):
        mn.matmul(a.astype(np.float32), b.astype(np.float32), out=out)
    assert np.all(widen(out) == 3)


def test_mixed_dtypes_follow_result_type(rng):
    bf16 = dtype_of("bfloat16")
    a = random(rng, (4, 9), bf16)
    b = random(rng, (9, 5), np.float16)
    assert mn.matmul(a, b).dtype == np.float32  # bf16 with f16: float32
    assert mn.matmul(a, b.astype(np.float32)).dtype == np.float32
    assert mn.matmul(a, b.astype(np.float64)).dtype == np.float64
    assert mn.matmul(b, b.T).dtype == np.float16
    got = mn.matmul(a, b)
    np.testing.assert_allclose(got, widen(a) @ widen(b), rtol=1e-5, atol=1e-5)


def test_float16_overflow_exactly_where_the_sum_overflows():
    """f16 max 65504: a product whose exact value is >= 65520 is inf, one just below is finite
    (the float32 accumulator itself does not overflow)."""
    dtype = np.float16
    k = 300
    a = np.full((4, k), 16.0, dtype)
    b = np.zeros((k, 3), dtype)
    b[:, 0] = 13.0  # 300 * 208 = 62400: finite
    b[:, 1] = 14.0  # 67200: inf
    b[:, 2] = -14.0  # -inf
    a[3] = 0.0
    got = mn.matmul(a, b)
    golden = widen(a) @ widen(b)
    assert_special_values_match(got, rounded_overflow(golden, dtype))
    assert np.isposinf(widen(got)[0, 1]) and np.isneginf(widen(got)[0, 2])
    assert widen(got)[0, 0] == 62400.0
    # a sum of large terms that cancels back into range stays finite
    a2 = np.array([[60000.0, 60000.0, -60000.0]], dtype)
    b2 = np.ones((3, 20), dtype)
    assert np.all(widen(mn.matmul(a2, b2)) == 60000.0)
    # the same for the dot-like path
    assert widen(mn.matmul(a2[0], b2[:, 0])) == 60000.0


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_nan_and_inf_propagate(dtype_name, rng):
    dtype = dtype_of(dtype_name)
    for m, k, n in [(9, 400, 30), (2, 50, 3)]:  # GEMM and dot-like
        a, b = random(rng, (m, k), dtype), random(rng, (k, n), dtype)
        a[1, 7] = np.nan
        b[3, 2] = np.inf
        a[0, 3] = 0.0
        got = mn.matmul(a, b)
        with np.errstate(invalid="ignore"):
            golden = widen(a) @ widen(b)
        assert_special_values_match(got, golden)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_empty_and_zero_depth(dtype_name):
    dtype = dtype_of(dtype_name)
    assert mn.matmul(np.zeros((0, 4), dtype), np.zeros((4, 5), dtype)).shape == (0, 5)
    got = mn.matmul(np.zeros((3, 0), dtype), np.zeros((0, 5), dtype))
    assert got.dtype == dtype and np.all(widen(got) == 0)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_thread_count_does_not_change_results(dtype_name, rng):
    dtype = dtype_of(dtype_name)
    a, b = random(rng, (150, 700), dtype), random(rng, (700, 130), dtype)
    before = mn.get_num_threads()
    try:
        mn.set_num_threads(1)
        one = mn.matmul(a, b)
        mn.set_num_threads(2)
        two = mn.matmul(a, b)
    finally:
        mn.set_num_threads(before)
    np.testing.assert_array_equal(one.view(np.uint16), two.view(np.uint16))


def test_torch_bf16_tensor_in():
    torch = pytest.importorskip("torch")
    pytest.importorskip("ml_dtypes")
    ta = torch.randn(12, 40).bfloat16()
    tb = torch.randn(40, 9).bfloat16()
    got = mn.matmul(ta, tb)
    assert got.dtype.name == "bfloat16"
    golden = ta.double().numpy() @ tb.double().numpy()
    assert_16bit_close(got, golden, got.dtype, n=40, torch_result=torch.matmul(ta, tb))
