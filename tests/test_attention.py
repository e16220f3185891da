"""Scaled dot-product attention against the float64 reference (``reference.transformer_attention``)
and PyTorch: lengths across the kernel's query (96) and key (192) blocks, head sizes, batch
broadcasting, grouped-query heads, bool and additive masks, every causal alignment, fully masked
rows, NaN at masked positions, dropout from the seed, threads, layouts and dtypes, hypothesis,
and the memory the blocked kernel needs (no L x L matrix); every ISA path."""

from __future__ import annotations

import resource

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlmath_native as mn
from mlmath_native._checks import compute_dtype
from mlmath_native.reference import transformer_attention as ref

from conftest import tolerance

DTYPES = [np.float32, np.float64]


def _inputs(rng, dtype, q_lead, kv_lead, hq, hkv, lq, lk, d, dv):
    """Standard normal q, k, v; a head count of None means no head axis (2-D inputs)."""

    def make(lead, h, length, f):
        shape = tuple(lead) + ((h,) if h is not None else ()) + (length, f)
        return rng.standard_normal(shape).astype(dtype)

    return make(q_lead, hq, lq, d), make(kv_lead, hkv, lk, d), make(kv_lead, hkv, lk, dv)


def _finite_max(a) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.max(np.abs(np.where(np.isfinite(a), a, 0.0)), initial=0.0))


def score_error(q, k, dtype, scale=None, bias=0.0) -> float:
    """Absolute rounding error of the scores q k^T * scale (+ a float bias of up to ``bias``):
    a few ulp of the largest score, plus the random walk of the D rounded products of the dot
    products.  (Non-finite entries, which the tests mask, count as 0.)"""
    q, k = (np.asarray(a, np.float64) for a in (q, k))
    q, k = (np.where(np.isfinite(a), a, 0.0) for a in (q, k))
    q, k = (a if a.ndim >= 3 else a[np.newaxis] for a in (q, k))
    d = q.shape[-1]
    scale = abs((1.0 / np.sqrt(d) if d else 1.0) if scale is None else scale)
    if q.size == 0 or k.size == 0:
        return 0.0
    hq, hkv = q.shape[-3], k.shape[-3]  # query head h reads kv head h // (hq // hkv)
    q = q.reshape(q.shape[:-3] + (hkv, hq // hkv) + q.shape[-2:])
    smax = scale * float(np.max(np.abs(q @ np.swapaxes(k, -1, -2)[..., np.newaxis, :, :])))
    products = scale * float(np.max(np.abs(q))) * float(np.max(np.abs(k))) * np.sqrt(d)
    eps = float(np.finfo(np.dtype(dtype)).eps)
    return eps * (2 * (smax + bias) + products)


def check(q, k, v, factor: float = 2.0, **opts):
    """mn.attention against the reference, out and lse; returns (out, lse).

    The output is a convex combination of v rows (times 1 / (1 - p) with dropout), so its error
    is absolute, relative to max|v|: the softmax's own rounding (tolerance(dtype, Lk)) plus the
    rounding of the scores (score_error), which moves each weight by up to twice that error.
    lse takes the scores' error plus the softmax sum's, plus the rounding of lse itself.
    Rows the reference finds fully masked must be exactly 0 with lse -inf.
    """
    got, got_lse = mn.attention(q, k, v, return_lse=True, **opts)
    want, want_lse = ref.attention(q, k, v, return_lse=True, **opts)
    qa, ka, va = (np.asarray(a) for a in (q, k, v))
    dtype = np.result_type(*(compute_dtype("attention", "q", a.dtype) for a in (qa, ka, va)))
    assert got.dtype == dtype and got_lse.dtype == dtype
    assert got.shape == want.shape and got_lse.shape == want_lse.shape

    lk = ka.shape[-2]
    bias = opts.get("mask")
    bias = 0.0 if bias is None or np.asarray(bias).dtype == bool else _finite_max(bias)
    err_s = score_error(qa, ka, dtype, opts.get("scale"), bias)
    drop = 1.0 / (1.0 - opts.get("dropout_p", 0.0))
    atol = factor * _finite_max(va) * drop * (tolerance(dtype, lk) + 2 * err_s)
    np.testing.assert_allclose(got, want, rtol=0, atol=atol + float(np.finfo(dtype).tiny))

    dead = want_lse == -np.inf
    np.testing.assert_array_equal(got_lse[dead], want_lse[dead])
    np.testing.assert_array_equal(got[dead], 0.0)
    live = ~dead
    lse_tol = factor * (tolerance(dtype, lk) + err_s + tolerance(dtype) * np.abs(want_lse))
    np.testing.assert_array_less(np.abs(got_lse[live] - want_lse[live]), lse_tol[live] + 1e-300)
    return got, got_lse


# -- shapes: lengths across the blocks, head sizes, batch broadcasting, grouped-query heads --------

# (q leading dims, k/v leading dims, Hq, Hkv, Lq, Lk, D, Dv); heads None: 2-D inputs
GRID = [
    ((), (), None, None, 7, 7, 16, 16),
    ((), (), None, None, 1, 513, 64, 1),
    ((), (), None, None, 513, 1, 1, 3),
    ((), (), None, None, 65, 64, 80, 80),
    ((), (), 2, 2, 64, 65, 128, 48),
    ((), (), 1, 1, 513, 513, 64, 64),
    ((2,), (2,), 4, 2, 97, 193, 128, 64),
    ((2,), (2,), 4, 1, 193, 191, 64, 32),
    ((2, 3), (2, 3), 1, 1, 65, 64, 16, 24),
    ((3,), (1,), 4, 2, 96, 192, 80, 16),  # k and v shared by the batch
    ((1,), (2,), 2, 2, 193, 385, 16, 16),  # q broadcast over the batch
    ((2, 1), (1, 3), 4, 1, 7, 385, 80, 7),  # both broadcast
    ((), (), 1, 1, 1, 1, 128, 128),
    ((2,), (), 4, 2, 7, 1, 1, 5),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GRID, ids=str)
def test_shapes_against_reference(case, dtype, rng):
    q_lead, kv_lead, hq, hkv, lq, lk, d, dv = case
    q, k, v = _inputs(rng, dtype, q_lead, kv_lead, hq, hkv, lq, lk, d, dv)
    out, lse = check(q, k, v)
    batch = np.broadcast_shapes(q_lead, kv_lead)
    heads = () if hq is None else (hq,)
    assert out.shape == batch + heads + (lq, dv) and lse.shape == batch + heads + (lq,)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.37, -1.5, 0.0, 3.0])
def test_scale(scale, dtype, rng):
    q, k, v = _inputs(rng, dtype, (2,), (2,), 4, 2, 97, 193, 64, 16)
    check(q, k, v, scale=scale)


def test_mixed_head_axes(rng):
    """A 2-D input next to 3-D ones counts as one head; the result keeps the head axis."""
    q = rng.standard_normal((3, 7, 16))
    k = rng.standard_normal((65, 16))
    v = rng.standard_normal((1, 65, 8))
    out, lse = check(q, k, v)
    assert out.shape == (3, 7, 8) and lse.shape == (3, 7)


# -- masks -----------------------------------------------------------------------------------------


def _mask(rng, kind, shape, dtype):
    """A random mask of ``shape``: bool (about 3/4 True) or float bias with some -inf."""
    allowed = rng.random(shape) < 0.75
    if kind == "bool":
        return allowed
    bias = (rng.standard_normal(shape) * 2).astype(dtype)
    return np.where(allowed, bias, -np.inf).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mshape", ["LqLk", "1Hq1Lk", "full", "B1LqLk"])
@pytest.mark.parametrize("lq,lk", [(97, 193), (7, 385), (193, 64)])
def test_masks(lq, lk, mshape, kind, dtype, rng):
    b, hq, hkv = 2, 4, 2
    q, k, v = _inputs(rng, dtype, (b,), (b,), hq, hkv, lq, lk, 64, 24)
    shape = {
        "LqLk": (lq, lk),
        "1Hq1Lk": (1, hq, 1, lk),
        "full": (b, hq, lq, lk),
        "B1LqLk": (b, 1, lq, lk),
    }[mshape]
    mask = _mask(rng, kind, shape, dtype)
    check(q, k, v, mask=mask)
    check(q, k, v, mask=mask, causal="lower_right")


@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_2d_inputs_and_int_bias(dtype, rng):
    q, k, v = _inputs(rng, dtype, (), (), None, None, 65, 193, 16, 16)
    check(q, k, v, mask=_mask(rng, "bool", (65, 193), dtype))
    check(q, k, v, mask=_mask(rng, "bool", (193,), dtype))  # one row for every query
    check(q, k, v, mask=rng.integers(-3, 4, (65, 193)))  # integers are a bias


# -- causal ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, "upper_left", "lower_right"])
@pytest.mark.parametrize(
    "lq,lk", [(97, 97), (193, 193), (7, 193), (65, 385), (193, 7), (385, 65), (1, 513), (513, 1)]
)
def test_causal(lq, lk, causal, dtype, rng):
    q, k, v = _inputs(rng, dtype, (2,), (2,), 2, 1, lq, lk, 16, 8)
    check(q, k, v, causal=causal)


def test_causal_aliases_and_equivalent_mask(rng):
    q, k, v = _inputs(rng, np.float64, (2,), (2,), 2, 2, 193, 385, 16, 8)
    i, j = np.arange(193)[:, None], np.arange(385)[None, :]
    for causal, offset in [(True, 0), ("upper_left", 0), ("lower_right", 385 - 193)]:
        got = mn.attention(q, k, v, causal=causal)
        np.testing.assert_allclose(got, mn.attention(q, k, v, mask=j <= i + offset), atol=1e-14)
    np.testing.assert_array_equal(
        mn.attention(q, k, v, causal=True), mn.attention(q, k, v, causal="upper_left")
    )
    np.testing.assert_array_equal(mn.attention(q, k, v, causal=False), mn.attention(q, k, v))
    with pytest.raises(ValueError, match="causal is invalid"):  # None could mean either
        mn.attention(q, k, v, causal=None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_with_mask(dtype, rng):
    q, k, v = _inputs(rng, dtype, (2,), (2,), 4, 2, 193, 385, 64, 16)
    for kind in ("bool", "float"):
        for causal in (True, "lower_right"):
            check(q, k, v, mask=_mask(rng, kind, (2, 1, 193, 385), dtype), causal=causal)


# -- fully masked rows -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows_are_zero(dtype, rng):
    q, k, v = _inputs(rng, dtype, (2,), (2,), 4, 2, 193, 385, 16, 8)
    mask = rng.random((2, 4, 193, 385)) < 0.5
    dead = [(0, 0, 0), (0, 3, 96), (1, 1, 192), (1, 2, 100)]
    for idx in dead:
        mask[idx] = False
    mask[1, :, 5] = False  # the same query in every head
    out, lse = check(q, k, v, mask=mask)
    for idx in dead + [(1, h, 5) for h in range(4)]:
        assert np.all(out[idx] == 0) and lse[idx] == -np.inf
    assert np.isfinite(out).all()
    bias = np.where(mask, 0.5, -np.inf).astype(dtype)  # the same rows through a float mask
    out, lse = check(q, k, v, mask=bias)
    for idx in dead:
        assert np.all(out[idx] == 0) and lse[idx] == -np.inf


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq,lk", [(7, 3), (193, 64), (385, 192), (100, 97)])
def test_lower_right_with_more_queries_than_keys(lq, lk, dtype, rng):
    q, k, v = _inputs(rng, dtype, (2,), (2,), 2, 2, lq, lk, 16, 8)
    out, lse = check(q, k, v, causal="lower_right")
    assert np.all(out[..., : lq - lk, :] == 0) and np.all(lse[..., : lq - lk] == -np.inf)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse[..., lq - lk :]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_keys(dtype, rng):
    for q_shape, k_shape, v_shape in [
        ((5, 4), (0, 4), (0, 3)),
        ((2, 4, 97, 16), (2, 2, 0, 16), (2, 2, 0, 8)),
    ]:
        q, k, v = (rng.standard_normal(s).astype(dtype) for s in (q_shape, k_shape, v_shape))
        for causal in (False, "lower_right"):
            out, lse = mn.attention(q, k, v, causal=causal, return_lse=True)
            assert out.dtype == dtype and out.shape == q_shape[:-1] + v_shape[-1:]
            assert np.all(out == 0) and np.all(lse == -np.inf) and lse.shape == q_shape[:-1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_shapes(dtype, rng):
    for q_shape, k_shape, v_shape in [
        ((0, 4), (3, 4), (3, 2)),  # no queries
        ((2, 4, 5, 0), (2, 2, 3, 0), (2, 2, 3, 8)),  # D = 0: equal scores, the mean of v
        ((0, 4, 5, 4), (0, 2, 3, 4), (0, 2, 3, 2)),  # empty batch
        ((4, 5, 4), (2, 3, 4), (2, 3, 0)),  # Dv = 0
    ]:
        q, k, v = (rng.standard_normal(s).astype(dtype) for s in (q_shape, k_shape, v_shape))
        check(q, k, v)


# -- NaN and inf at masked positions ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_keys_at_masked_positions_do_not_leak(dtype, rng):
    lq, lk = 97, 385
    q, k, v = _inputs(rng, dtype, (2,), (2,), 4, 2, lq, lk, 16, 8)
    bad = [3, 191, 192, 250, 384]  # in every key block, at the block edges
    k[..., bad, :] = np.nan
    k[1, 0, 100, 2] = np.inf
    bad.append(100)
    allowed = np.ones((lq, lk), bool)
    allowed[:, bad] = False
    allowed[:, 200:210] &= rng.random((lq, 10)) < 0.5
    # a bool mask
    out, lse = check(q, k, v, mask=allowed)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    # a float mask: -inf forbids by selection, whatever the score is
    bias = np.where(allowed, rng.standard_normal((lq, lk)), -np.inf).astype(dtype)
    out, lse = check(q, k, v, mask=bias)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    # a float mask broadcast from (1, Hq, 1, Lk), with causal
    bias = np.where(allowed[:1], 0.25, -np.inf).astype(dtype).reshape(1, 1, 1, lk)
    out, lse = check(q, k, v, mask=np.broadcast_to(bias, (1, 4, 1, lk)), causal="lower_right")
    assert np.isfinite(out).all() and np.isfinite(lse).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_keys_beyond_the_causal_edge_do_not_leak(dtype, rng):
    lq, lk = 97, 385
    q, k, v = _inputs(rng, dtype, (), (), 2, 2, lq, lk, 16, 8)
    k[:, lq:, :] = np.nan  # upper left: query i < 97 never sees key j >= 97
    out, lse = check(q, k, v, causal=True)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    k[:, lq:, :] = 1.0
    k[:, 0, :] = np.inf  # masked by a bool mask only
    mask = np.ones((lq, lk), bool)
    mask[:, 0] = False
    out, lse = check(q, k, v, mask=mask, causal="lower_right")
    assert np.isfinite(out).all() and np.isfinite(lse).all()


def test_float_mask_inf_at_allowed_position_is_not_masked(rng):
    """+inf bias is an allowed score: the weight goes to that key (or NaN with two of them)."""
    q, k, v = _inputs(rng, np.float64, (), (), None, None, 3, 200, 8, 4)
    bias = np.zeros((3, 200))
    bias[0, 150] = np.inf
    out = mn.attention(q, k, v, mask=bias)
    want = ref.attention(q, k, v, mask=bias)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    np.testing.assert_allclose(out[1:], want[1:], atol=1e-13)


def test_nan_scores_at_allowed_positions_propagate(rng):
    q, k, v = _inputs(rng, np.float64, (), (), None, None, 4, 300, 8, 4)
    k[250] = np.nan
    # lower right: query i sees keys j <= i + 296, so every query sees key 250
    assert np.isnan(mn.attention(q, k, v, causal="lower_right")).all()
    out = mn.attention(q, k, v, causal=True)  # query i sees j <= i < 4: finite
    assert np.isfinite(out).all()


# -- dropout ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_matches_reference(p, dtype, rng):
    q, k, v = _inputs(rng, dtype, (2, 1), (1, 1), 4, 2, 193, 385, 16, 8)
    seed = 2**64 - 12345
    out, lse = check(q, k, v, dropout_p=p, seed=seed)
    again = mn.attention(q, k, v, dropout_p=p, seed=seed, return_lse=True)
    np.testing.assert_array_equal(again[0], out)
    np.testing.assert_array_equal(again[1], lse)
    # lse is that of the undropped weights
    np.testing.assert_array_equal(mn.attention(q, k, v, return_lse=True)[1], lse)
    other = mn.attention(q, k, v, dropout_p=p, seed=seed - 1)
    assert np.mean(other != out) > 0.5
    mask = _mask(rng, "bool", (4, 193, 385), dtype)
    check(q, k, v, dropout_p=p, seed=7, mask=mask, causal="lower_right")


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_2d_and_seeds(dtype, rng):
    q, k, v = _inputs(rng, dtype, (), (), None, None, 97, 193, 16, 8)
    for seed in (0, 1, 2**32, 2**63, np.uint64(2**64 - 1), np.int64(99)):
        check(q, k, v, dropout_p=0.25, seed=seed, causal=True)
    # p = 0 with a seed is no dropout
    for seed in (0, 123):
        np.testing.assert_array_equal(mn.attention(q, k, v, seed=seed), mn.attention(q, k, v))
        np.testing.assert_array_equal(
            mn.attention(q, k, v, dropout_p=0.0, seed=seed), mn.attention(q, k, v)
        )


def test_dropout_keeps_the_expected_fraction(rng):
    """With v = I every weight is visible in the output: the zeros are the dropped ones."""
    lq, lk, p = 97, 193, 0.3
    q = rng.standard_normal((2, 2, lq, 8))
    k = rng.standard_normal((2, 2, lk, 8))
    v = np.broadcast_to(np.eye(lk), (2, 2, lk, lk))
    out = mn.attention(q, k, v, dropout_p=p, seed=5)
    want_keep = ref.dropout_keep(5, np.arange(4).reshape(2, 2, 1, 1), *np.ogrid[:lq, :lk], p)
    np.testing.assert_array_equal(out != 0, want_keep)
    assert abs(np.mean(want_keep) - (1 - p)) < 0.01


# -- threads ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_threads_do_not_change_results(dtype, rng, threads):
    q, k, v = _inputs(rng, dtype, (2,), (2,), 4, 2, 300, 400, 64, 40)
    mask = _mask(rng, "float", (2, 1, 300, 400), dtype)
    calls = [
        dict(),
        dict(causal="lower_right", return_lse=True),
        dict(mask=mask, dropout_p=0.2, seed=11, return_lse=True),
    ]
    results = []
    for t in (1, 2, 3):
        mn.set_num_threads(t)
        results.append([mn.attention(q, k, v, **c) for c in calls])
    for other in results[1:]:
        for a, b in zip(other, results[0], strict=True):
            if isinstance(a, tuple):
                for x, y in zip(a, b, strict=True):
                    np.testing.assert_array_equal(x, y)
            else:
                np.testing.assert_array_equal(a, b)


# -- layouts and dtypes ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype, rng):
    qt = rng.standard_normal((2, 4, 16, 97)).astype(dtype)
    q = np.swapaxes(qt, -1, -2)  # (2, 4, 97, 16), transposed
    k = rng.standard_normal((2, 2, 400, 32)).astype(dtype)[:, :, ::2, ::2]  # (2, 2, 200, 16)
    v = rng.standard_normal((2, 4, 200, 8)).astype(dtype)[:, ::2]  # heads sliced: (2, 2, 200, 8)
    mask = np.swapaxes(rng.random((2, 4, 200, 97)) < 0.8, -1, -2)
    for args in [(q, k, v), (q[::-1], k[:, ::-1], v[:, ::-1])]:
        got = check(*args)[0]
        assert got.flags.c_contiguous
        np.testing.assert_array_equal(got, mn.attention(*(np.ascontiguousarray(a) for a in args)))
        check(*args, mask=mask, causal=True)
        bias = np.where(rng.random((2, 1, 200, 97)) < 0.8, 0.5, -np.inf).astype(dtype)
        check(*args, mask=np.swapaxes(bias, -1, -2))  # a transposed float mask


def test_integer_and_bool_inputs_compute_in_float64(rng):
    q = rng.integers(-3, 4, (2, 7, 5))
    k = rng.integers(-3, 4, (2, 9, 5)).astype(np.int32)
    v = rng.random((2, 9, 3)) < 0.5
    out, lse = check(q, k, v)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    f = [a.astype(np.float64) for a in (q, k, v)]
    np.testing.assert_array_equal(out, mn.attention(*f))
    # nested lists
    check(q.tolist(), k.tolist(), v.astype(float).tolist())


@pytest.mark.parametrize(
    "dtypes",
    [
        (np.float32, np.float32, np.float32),
        (np.float32, np.float32, np.float64),
        (np.float64, np.float32, np.float32),
        (np.float32, np.float64, np.float32),
        (np.float32, np.int8, np.float32),
        (np.float16, np.float32, np.float32),
        (np.bool_, np.float32, np.float32),
    ],
    ids=str,
)
def test_output_dtype(dtypes, rng):
    q, k, v = ((rng.standard_normal((2, 7, 6)) * 2).astype(t) for t in dtypes)
    out, lse = check(q, k, v)
    # NumPy's promotion of the dtypes the inputs compute in (float16 with float32: float32)
    want = np.result_type(*(compute_dtype("attention", "q", np.dtype(t)) for t in dtypes))
    assert out.dtype == want and lse.dtype == want
    # a float64 mask does not change the float32 result dtype
    assert mn.attention(q, k, v, mask=np.zeros((7, 7))).dtype == want


def test_inputs_are_not_modified(rng):
    q, k, v = _inputs(rng, np.float32, (2,), (2,), 4, 2, 97, 193, 16, 8)
    mask = _mask(rng, "float", (193,), np.float32)
    before = [a.copy() for a in (q, k, v, mask)]
    mn.attention(q, k, v, mask=mask, causal=True, dropout_p=0.5, seed=1, return_lse=True)
    for a, b in zip((q, k, v, mask), before, strict=True):
        np.testing.assert_array_equal(a, b)


# -- hypothesis: random shapes, heads, masks and options -------------------------------------------


@st.composite
def attention_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    hkv = draw(st.integers(1, 3))
    hq = hkv * draw(st.integers(1, 3))
    lq, lk = draw(st.integers(0, 20)), draw(st.integers(0, 20))
    d, dv = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    lead = draw(st.sampled_from([((), ()), ((2,), (2,)), ((2,), (1,)), ((1, 3), (2, 1))]))
    seed = draw(st.integers(0, 2**64 - 1))
    gen = np.random.default_rng(seed)
    q, k, v = _inputs(gen, dtype, lead[0], lead[1], hq, hkv, lq, lk, d, dv)
    if draw(st.booleans()) and q.ndim == 3:  # 2-D q, k and v
        q, k, v = q[0], k[0], v[0]
    opts = {"causal": draw(st.sampled_from([False, True, "upper_left", "lower_right"]))}
    kind = draw(st.sampled_from([None, "bool", "float"]))
    if kind is not None:
        if q.ndim == 2:
            scores = (lq, lk)
        else:
            scores = np.broadcast_shapes(q.shape[:-3], k.shape[:-3]) + (hq, lq, lk)
        mshape = scores[draw(st.integers(0, len(scores) - 2)) :]
        ones = draw(st.lists(st.booleans(), min_size=len(mshape), max_size=len(mshape)))
        mshape = tuple(1 if one else n for n, one in zip(mshape, ones, strict=True))
        opts["mask"] = _mask(gen, kind, mshape, dtype)
    if draw(st.booleans()):
        opts["scale"] = draw(st.floats(-2, 2))
    if draw(st.booleans()):
        opts["dropout_p"], opts["seed"] = draw(st.floats(0, 0.9)), seed
    return q, k, v, opts


@settings(max_examples=60, deadline=None)
@given(attention_case())
def test_hypothesis_against_reference(case):
    q, k, v, opts = case
    check(q, k, v, **opts)


# -- PyTorch ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hq,hkv,lq,lk,opts",
    [
        (4, 2, 193, 385, {"is_causal": True}),
        (4, 1, 97, 193, {"mask": "bool"}),
        (4, 4, 200, 200, {"is_causal": True, "scale": 0.3}),
        (8, 2, 7, 65, {}),
    ],
    ids=str,
)
def test_against_pytorch(hq, hkv, lq, lk, opts, rng):
    torch = pytest.importorskip("torch")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v = _inputs(rng, np.float32, (2,), (2,), hq, hkv, lq, lk, 64, 32)
    kwargs = {"enable_gqa": True, "is_causal": opts.get("is_causal", False)}
    ours = {"causal": opts.get("is_causal", False)}
    if "scale" in opts:
        kwargs["scale"] = ours["scale"] = opts["scale"]
    if opts.get("mask") == "bool":
        mask = rng.random((2, 1, lq, lk)) < 0.7
        mask[..., 0] = True  # no fully masked rows (PyTorch gives NaN there)
        kwargs["attn_mask"] = torch.from_numpy(mask)
        ours["mask"] = mask
    t = [torch.from_numpy(a) for a in (q, k, v)]
    want = sdpa(*t, **kwargs).numpy()
    got = mn.attention(q, k, v, **ours)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * float(np.max(np.abs(v))))


# -- memory: blocked, no L x L matrix --------------------------------------------------------------


def test_long_sequence_memory(rng):
    length = 16384
    q, k, v = (rng.standard_normal((1, 1, length, 64), dtype=np.float32) for _ in range(3))
    small = mn.attention(q[..., :300, :], k[..., :500, :], v[..., :500, :], causal=True)
    assert np.isfinite(small).all()  # warm-up: thread pool, workspaces
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = mn.attention(q, k, v)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 64 * 1024, f"peak RSS grew by {grown / 1024:.0f} MiB (an L x L is 1 GiB)"
    # spot-check a few rows against the reference
    rows = [0, 95, 96, 8191, 16383]
    want = ref.attention(q[0, 0, rows], k[0, 0], v[0, 0])
    err_s = score_error(q[0, 0, rows], k[0, 0], np.float32)
    atol = 2 * float(np.max(np.abs(v))) * (tolerance(np.float32, length) + 2 * err_s)
    np.testing.assert_allclose(out[0, 0, rows], want, rtol=0, atol=atol)


# --- backward ----------------------------------------------------------------------------------


def check_backward(q, k, v, **opts):
    """mn.attention_backward against the reference's, each gradient within a tolerance that
    scales with its reduction length and the magnitudes of its factors."""
    out, lse = mn.attention(q, k, v, return_lse=True, **opts)
    rng = np.random.default_rng(7)
    go = rng.standard_normal(out.shape).astype(out.dtype)
    got = mn.attention_backward(q, k, v, out, lse, go, **opts)
    want = ref.attention_backward(q, k, v, out, lse, go, **opts)
    dtype = out.dtype
    lq, lk = np.shape(q)[-2], np.shape(k)[-2]
    drop = 1.0 / (1.0 - opts.get("dropout_p", 0.0))
    mags = [float(np.max(np.abs(a), initial=0.0)) for a in (q, k, v, go)]
    scale = float(np.max(mags) ** 3) * drop + 1.0
    heads = max(np.shape(q)[-3] if np.ndim(q) >= 3 else 1, 1)
    n = max(lq, lk) * heads * max(np.shape(q)[-1], np.shape(v)[-1])
    for name, g, w, x in zip(("dq", "dk", "dv"), got, want, (q, k, v), strict=True):
        assert g.shape == np.shape(x) and g.dtype == dtype, name
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, w, rtol=0, atol=8 * tolerance(dtype, n) * scale, err_msg=name)
    return got


BACKWARD_GRID = [
    # (q_lead, kv_lead, hq, hkv, lq, lk, d, dv, options)
    ((), (), 1, 1, 7, 7, 16, 16, {}),
    ((2,), (2,), 4, 2, 97, 193, 16, 8, {}),  # GQA, blocks with tails
    ((1,), (1,), 2, 2, 200, 385, 64, 64, {"causal": True}),
    ((1,), (1,), 4, 1, 300, 130, 32, 16, {"causal": "lower_right"}),  # MQA, Lq > Lk
    ((2,), (1,), 2, 2, 65, 64, 80, 80, {"causal": "lower_right"}),  # k, v shared by the batch
    ((3, 1), (1, 2), 2, 1, 33, 40, 8, 4, {}),  # leading dims broadcast both ways
    ((1,), (1,), 2, 2, 130, 250, 16, 16, {"dropout_p": 0.3, "seed": 11, "causal": True}),
    ((), (), 1, 1, 1, 1, 1, 1, {}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BACKWARD_GRID, ids=str)
def test_backward_against_reference(case, dtype, rng):
    q_lead, kv_lead, hq, hkv, lq, lk, d, dv, opts = case
    q, k, v = _inputs(rng, dtype, q_lead, kv_lead, hq, hkv, lq, lk, d, dv)
    check_backward(q, k, v, **opts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_backward_masks(kind, dtype, rng):
    q, k, v = _inputs(rng, dtype, (2,), (2,), 2, 2, 97, 193, 16, 16)
    mask = rng.random((97, 193)) > 0.3
    if kind == "float":
        mask = np.where(mask, rng.standard_normal((97, 193)), -np.inf)
    mask[5] = False if kind == "bool" else -np.inf  # a query that sees no key
    dq, dk, dv = check_backward(q, k, v, mask=mask)
    np.testing.assert_array_equal(dq[..., 5, :], 0.0)


def test_backward_fully_masked_and_empty(rng):
    q, k, v = _inputs(rng, np.float64, (), (), 2, 2, 5, 4, 3, 3)
    mask = np.zeros((5, 4), dtype=bool)
    out, lse = mn.attention(q, k, v, mask=mask, return_lse=True)
    grads = mn.attention_backward(q, k, v, out, lse, np.ones_like(out), mask=mask)
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)
    q0, k0, v0 = _inputs(rng, np.float32, (), (), 2, 2, 5, 0, 3, 3)
    out, lse = mn.attention(q0, k0, v0, return_lse=True)
    dq, dk, dv = mn.attention_backward(q0, k0, v0, out, lse, np.ones_like(out))
    assert dq.shape == q0.shape and dk.shape == k0.shape and dv.shape == v0.shape
    np.testing.assert_array_equal(dq, 0.0)


def test_backward_nan_at_masked_keys_does_not_leak(rng):
    q, k, v = _inputs(rng, np.float64, (), (), 1, 1, 9, 6, 4, 4)
    k[..., 2, :] = np.nan
    mask = np.ones((9, 6), dtype=bool)
    mask[:, 2] = False
    out, lse = mn.attention(q, k, v, mask=mask, return_lse=True)
    dq, dk, dv = mn.attention_backward(q, k, v, out, lse, np.ones_like(out), mask=mask)
    # dk and dv stay finite, the masked key's are 0; dq = dS K multiplies the masked key's
    # zero weights by its NaN row (0 * NaN), as the reference's matrix product does
    assert np.all(np.isfinite(dk)) and np.all(np.isfinite(dv))
    np.testing.assert_array_equal(dv[..., 2, :], 0.0)
    np.testing.assert_array_equal(dk[..., 2, :], 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_threads_do_not_change_results(dtype, rng, threads):
    q, k, v = _inputs(rng, dtype, (2,), (2,), 4, 2, 200, 390, 16, 16)
    out, lse = mn.attention(q, k, v, causal="lower_right", return_lse=True)
    go = rng.standard_normal(out.shape).astype(dtype)
    results = []
    for t in (1, 2, 3):
        mn.set_num_threads(t)
        results.append(mn.attention_backward(q, k, v, out, lse, go, causal="lower_right"))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


def test_backward_central_differences():
    """float64 gradients of sum(out * g) against central differences."""
    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, np.float64, (), (), 2, 1, 5, 6, 3, 2)
    g = rng.standard_normal((2, 5, 2))
    opts = {"causal": "lower_right", "mask": rng.standard_normal((5, 6))}
    out, lse = mn.attention(q, k, v, return_lse=True, **opts)
    grads = mn.attention_backward(q, k, v, out, lse, g, **opts)
    h = 1e-6
    for arr, grad in zip((q, k, v), grads, strict=True):
        for idx in [tuple(rng.integers(0, s) for s in arr.shape) for _ in range(6)]:
            old = arr[idx]
            arr[idx] = old + h
            up = float(np.sum(mn.attention(q, k, v, **opts) * g))
            arr[idx] = old - h
            down = float(np.sum(mn.attention(q, k, v, **opts) * g))
            arr[idx] = old
            np.testing.assert_allclose(grad[idx], (up - down) / (2 * h), rtol=1e-5, atol=1e-7)


def test_backward_against_torch(rng):
    torch = pytest.importorskip("torch")
    q, k, v = _inputs(rng, np.float64, (2,), (2,), 4, 2, 70, 90, 16, 16)
    mask = rng.random((70, 90)) > 0.2
    out, lse = mn.attention(q, k, v, mask=mask, return_lse=True)
    go = rng.standard_normal(out.shape)
    dq, dk, dv = mn.attention_backward(q, k, v, out, lse, go, mask=mask)
    tq, tk, tv = (torch.from_numpy(a).requires_grad_() for a in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=torch.from_numpy(mask), enable_gqa=True
    )
    o.backward(torch.from_numpy(go))
    for mine, theirs in ((dq, tq), (dk, tk), (dv, tv)):
        np.testing.assert_allclose(mine, theirs.grad.numpy(), rtol=1e-9, atol=1e-11)


def test_backward_checks_its_arrays(rng):
    q, k, v = _inputs(rng, np.float32, (), (), 1, 1, 5, 6, 3, 2)
    out, lse = mn.attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="grad_out has shape"):
        mn.attention_backward(q, k, v, out, lse, np.ones((1, 5, 3)))
    with pytest.raises(ValueError, match="lse has shape"):
        mn.attention_backward(q, k, v, out, lse[..., :4], np.ones_like(out))
    with pytest.raises(ValueError, match="dropout_p > 0 needs an explicit seed"):
        mn.attention_backward(q, k, v, out, lse, np.ones_like(out), dropout_p=0.5)


# -- empty axes: the backward accepts what the forward accepts (issue 17) ------------------------

EMPTY_AXES = [
    # (q_lead, kv_lead, hq, hkv, lq, lk, d, dv): each axis empty in turn
    ((0,), (0,), 2, 1, 4, 3, 8, 8),  # B = 0
    ((1,), (1,), 0, 0, 4, 3, 8, 8),  # H = 0
    ((2,), (2,), 2, 1, 0, 3, 8, 8),  # Lq = 0
    ((2,), (2,), 2, 1, 4, 0, 8, 8),  # Lk = 0
    ((2,), (2,), 2, 1, 4, 3, 0, 8),  # D = 0: equal scores
    ((2,), (2,), 2, 1, 4, 3, 8, 0),  # Dv = 0
    ((2,), (2,), 2, 1, 4, 3, 0, 0),  # D = Dv = 0
    ((), (), 1, 1, 0, 5, 4, 4),  # 3-d inputs, Lq = 0
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, "lower_right"])
@pytest.mark.parametrize("case", EMPTY_AXES, ids=str)
def test_backward_on_empty_axes(case, causal, dtype, rng):
    q_lead, kv_lead, hq, hkv, lq, lk, d, dv = case
    q, k, v = _inputs(rng, dtype, q_lead, kv_lead, hq, hkv, lq, lk, d, dv)
    out, lse = mn.attention(q, k, v, causal=causal, return_lse=True)
    want_out, want_lse = ref.attention(q, k, v, causal=causal, return_lse=True)
    np.testing.assert_allclose(out, want_out, atol=1e-6)
    np.testing.assert_array_equal(lse.shape, np.shape(want_lse))
    go = np.ones_like(out)
    got = mn.attention_backward(q, k, v, out, lse, go, causal=causal)
    want = ref.attention_backward(q, k, v, out, lse, go, causal=causal)
    for g, w, x in zip(got, want, (q, k, v), strict=True):
        assert g.shape == np.shape(x) and g.dtype == dtype
        np.testing.assert_allclose(g, w, atol=1e-6)


def test_empty_output_runs_no_kernel(monkeypatch, rng):
    """Dv = 0 without return_lse has an empty result: no O(Lq Lk) pass over the scores."""
    from mlmath_native import _core

    def no_kernel(*args):
        raise AssertionError("the kernel ran for an empty result")

    monkeypatch.setattr(_core, "attention_into", no_kernel)
    monkeypatch.setattr(_core, "attention_backward_into", no_kernel)
    q = np.zeros((1, 1, 20000, 0), np.float32)
    assert mn.attention(q, q, q).shape == (1, 1, 20000, 0)
    out = np.zeros((1, 1, 20000, 0), np.float32)
    lse = np.zeros((1, 1, 20000), np.float32)
    for g in mn.attention_backward(q, q, q, out, lse, out):
        assert g.shape == q.shape
