"""Decoding against a long cache (issue 22, Note [decode] in kernels/attention.cpp): few queries
(Lq <= 16, at most 64 query rows per kv head) take the flash-decoding path, whose tasks each
read one chunk of one kv head's keys and values in place for all the query heads of its group,
and whose partial results are merged by their log-sum-exp in chunk order.  Tested against the
float64 reference with every option, around the chunk length (768 keys) and the row limit, with
several num_splits, for threads bitwise, with kv_len caches holding garbage, in 16-bit storage,
against PyTorch SDPA with grouped-query heads, and with bad num_splits.  Every ISA path runs
these (MLMATH_NATIVE_ISA)."""

from __future__ import annotations

import numpy as np
import pytest
from sixteen import HALF_NAMES, dtype_of, widen
from test_attention import _inputs
from test_attention_options import _cache, assert_16bit_close, check

import mlmath_native as mn
from mlmath_native import _core
from mlmath_native.reference import transformer_attention as ref

DTYPES = [np.float32, np.float64]
CHUNK = 768  # kDecodeChunkKeys


# (batch, Hq, Hkv, Lq, Lk, D, Dv): Lk around the chunk length, D and Dv off the vector width,
# one query and the most (16), group sizes 1..8, an empty and a one-key cache
SHAPES = [
    (1, 4, 1, 1, 1, 8, 8),
    (2, 8, 2, 1, CHUNK - 1, 13, 7),
    (1, 4, 4, 2, CHUNK, 32, 16),
    (2, 6, 2, 3, CHUNK + 1, 24, 40),
    (1, 8, 1, 4, 2 * CHUNK + 5, 64, 64),
    (1, 2, 1, 16, 1500, 16, 8),
    (3, 2, 2, 16, 100, 9, 3),
    (1, 2, 1, 5, 0, 8, 8),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [0, 1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_decode_against_the_reference(shape, num_splits, dtype, rng):
    b, hq, hkv, lq, lk, d, dv = shape
    q, k, v = _inputs(rng, dtype, (b,), (b,), hq, hkv, lq, lk, d, dv)
    check(q, k, v, num_splits=num_splits)
    check(q, k, v, num_splits=num_splits, causal="lower_right")


OPTIONS = [
    {"causal": "lower_right", "window": (300, None)},
    {"causal": True},  # upper left: one query sees one key
    {"window": (200, 100)},
    {"softcap": 2.0, "alibi_slopes": np.array([0.01, 0.002, 0.0, 0.03])},
    {"sinks": np.array([0.5, -1.0, 3.0, -np.inf])},
    {"dropout_p": 0.3, "seed": 11},
    {"mask": "bool"},
    {"mask": "float"},
    {
        "causal": "lower_right",
        "window": (1000, None),
        "softcap": 5.0,
        "sinks": np.zeros(4),
        "alibi_slopes": np.full(4, 0.004),
        "dropout_p": 0.1,
        "seed": 3,
    },
]


def _with_mask(opts, rng, shape):
    opts = dict(opts)
    if opts.get("mask") == "bool":
        opts["mask"] = rng.random(shape) < 0.7
    elif opts.get("mask") == "float":
        opts["mask"] = np.where(rng.random(shape) < 0.2, -np.inf, rng.standard_normal(shape))
    return opts


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_decode_options(opts, dtype, rng):
    q, k, v = _inputs(rng, dtype, (2,), (2,), 4, 2, 3, 2000, 32, 16)
    opts = _with_mask(opts, rng, (2, 4, 3, 2000))
    for num_splits in (0, 1, 5):
        check(q, k, v, num_splits=num_splits, **opts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,lq", [(4, 16), (16, 4), (13, 5), (8, 16)], ids=str)
def test_either_side_of_the_row_limit(hq, lq, dtype, rng):
    """64 query rows per kv head run the decode path, 65 or more the GEMM path: both agree with
    the reference, with every option."""
    q, k, v = _inputs(rng, dtype, (1,), (1,), hq, 1, lq, 1000, 16, 16)
    opts = {"causal": "lower_right", "softcap": 3.0, "sinks": rng.standard_normal(hq)}
    check(q, k, v, **opts)


@pytest.mark.parametrize("dtype", DTYPES)
def test_threads_do_not_change_decode_results(dtype, rng, threads):
    q, k, v = _inputs(rng, dtype, (1,), (1,), 8, 2, 2, 5000, 64, 32)
    opts = {"causal": "lower_right", "window": (4000, None), "sinks": np.ones(8)}
    results = []
    for t in (1, 2, 3):
        mn.set_num_threads(t)
        results.append(mn.attention(q, k, v, return_lse=True, **opts))
    for out, lse in results[1:]:
        np.testing.assert_array_equal(out, results[0][0])
        np.testing.assert_array_equal(lse, results[0][1])


def test_num_splits_changes_only_the_rounding(rng):
    """Every chunking merges to the same softmax: float64 results agree to rounding, and one
    chunk per key gives the reference's result too."""
    q, k, v = _inputs(rng, np.float64, (1,), (1,), 4, 1, 1, 300, 16, 16)
    want, want_lse = ref.attention(q, k, v, return_lse=True)
    for num_splits in (1, 2, 7, 300, 10**6):
        out, lse = mn.attention(q, k, v, return_lse=True, num_splits=num_splits)
        np.testing.assert_allclose(out, want, rtol=0, atol=1e-13)
        np.testing.assert_allclose(lse, want_lse, rtol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [False, True])
def test_decode_reads_only_the_valid_keys_of_a_cache(shared, dtype, rng):
    """kv_len: chunks past a batch's kv_len are empty, keys past it (NaN and inf here) never
    read; a batch with kv_len 0 gets zeros (and its sink)."""
    lens = [1800, 0, 769] if not shared else [2000, 0, 769]
    q, k, v, ck, cv = _cache(rng, dtype, 3, 4, 2, 1, 2000, 16, 8, lens, shared)
    for num_splits in (0, 4):
        opts = {"kv_len": np.array(lens), "num_splits": num_splits, "sinks": np.ones(4)}
        got, lse = mn.attention(q, k, v, return_lse=True, **opts)
        assert np.all(np.isfinite(got))
        check(q, ck, cv, **opts)
        np.testing.assert_array_equal(got[1], 0.0)
        np.testing.assert_array_equal(lse[1], 1.0)


def test_nan_keys_outside_the_window_do_not_reach_a_decode(rng):
    q, k, v = _inputs(rng, np.float32, (1,), (1,), 2, 1, 1, 3000, 16, 16)
    want = ref.attention(q, k[..., 2099:, :], v[..., 2099:, :])  # keys 2999 - 900 .. 2999
    k[..., :2099, :] = np.nan
    v[..., :2099, :] = np.inf
    got = mn.attention(q, k, v, causal="lower_right", window=(900, None), num_splits=7)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_16bit_decode_computes_in_float32(dtype_name, rng):
    dtype = dtype_of(dtype_name)
    q, k, v = _inputs(rng, np.float32, (2,), (2,), 8, 2, 1, 1700, 40, 24)
    q16, k16, v16 = (a.astype(dtype) for a in (q, k, v))
    q32, k32, v32 = (widen(a) for a in (q16, k16, v16))
    opts = {"causal": "lower_right", "softcap": 3.0, "sinks": np.zeros(8, np.float32)}
    out16, lse16 = mn.attention(q16, k16, v16, return_lse=True, **opts)
    out32, lse32 = mn.attention(q32, k32, v32, return_lse=True, **opts)
    assert_16bit_close(out16, lse16, out32, lse32, dtype_name)


@pytest.mark.parametrize("lq", [1, 4])
def test_decode_against_pytorch_sdpa_with_grouped_heads(lq, rng):
    torch = pytest.importorskip("torch")
    q, k, v = _inputs(rng, np.float32, (2,), (2,), 8, 2, lq, 2500, 64, 64)
    got = mn.attention(q, k, v, causal="lower_right")
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    i = torch.arange(lq)[:, None] + 2500 - lq
    allowed = torch.arange(2500)[None, :] <= i
    want = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=allowed, enable_gqa=True
    )
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    "value,error",
    [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError), (None, TypeError)],
    ids=str,
)
def test_bad_num_splits(value, error, rng):
    q, k, v = _inputs(rng, np.float32, (1,), (1,), 2, 1, 1, 50, 8, 8)
    with pytest.raises(error, match="^attention: num_splits must be"):
        mn.attention(q, k, v, num_splits=value)


def test_the_binding_refuses_negative_num_splits(rng):
    q, k, v = _inputs(rng, np.float32, (1,), (1,), 2, 1, 1, 50, 8, 8)
    out = np.full((1, 2, 1, 8), 7.0, np.float32)
    extras = _core.AttentionExtras(-1, -1, 0.0, None, None, None, 0, -1)
    with pytest.raises(ValueError, match="^attention: num_splits must be >= 0"):
        _core.attention_into(q, k, v, None, 0, 0.5, 0.0, 0, extras, out, None)
    np.testing.assert_array_equal(out, 7.0)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_nan_reaches_a_decode_through_the_merge(num_splits, rng):
    """A NaN query makes every score NaN (m = -inf with l = NaN in each chunk): the merge must
    not take such a chunk for one that saw no key.  A NaN value reaches its column only."""
    q, k, v = _inputs(rng, np.float32, (1,), (1,), 2, 1, 2, 900, 8, 8)
    q[0, 0, 1, 3] = np.nan
    v[0, 0, 500, 2] = np.nan
    out = mn.attention(q, k, v, num_splits=num_splits)
    assert np.all(np.isnan(out[0, 0, 1]))
    assert np.all(np.isnan(out[0, :, :, 2]))
    finite = np.delete(out[0, :, :, :], 2, axis=-1)
    assert np.all(np.isfinite(finite[1])) and np.all(np.isfinite(finite[0, 0]))
