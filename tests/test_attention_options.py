"""The options of attention for today's models (issue 22): sliding window, softcapping, sinks and
ALiBi, each alone and combined with each other and with masks, causal alignments, grouped-query
heads, dropout and broadcast batches; forward and backward against the float64 reference
(``reference.transformer_attention``) and against PyTorch (SDPA with an explicit float mask, or
the math formula with autograd in float64); central differences for the new gradients (sinks,
softcap); lengths around the kernel's blocks (96 queries, 192 keys); fully masked rows; 16-bit
storage; threads bitwise; bad input.  Every ISA path runs these (MLMATH_NATIVE_ISA)."""

from __future__ import annotations

import numpy as np
import pytest
from sixteen import HALF_NAMES, dtype_of, widen
from test_attention import _inputs, score_error

import mlmath_native as mn
from mlmath_native import _core
from mlmath_native.reference import transformer_attention as ref

from conftest import tolerance

DTYPES = [np.float32, np.float64]


def _extra_score_error(q, k, opts) -> float:
    """A bound on what the options add to the scores' magnitude or error: the softcap's tanh
    (within 8 ulp of the cap) and ALiBi's bias (slope x distance)."""
    extra = 0.0
    if opts.get("softcap") is not None:
        extra += 8 * float(opts["softcap"])
    if opts.get("alibi_slopes") is not None:
        extra += float(np.max(np.abs(opts["alibi_slopes"]))) * (q.shape[-2] + k.shape[-2])
    return extra


def check(q, k, v, factor: float = 2.0, **opts):
    """mn.attention against the reference (out and lse), as test_attention.check, the scores'
    error including what softcap and ALiBi add; returns (out, lse)."""
    got, got_lse = mn.attention(q, k, v, return_lse=True, **opts)
    opts.pop("num_splits", None)  # how the kernel splits the keys: not in the math
    want, want_lse = ref.attention(q, k, v, return_lse=True, **opts)
    dtype = got.dtype
    assert got.shape == want.shape and got_lse.shape == want_lse.shape
    lk = k.shape[-2]
    err_s = score_error(q, k, dtype, opts.get("scale"), _extra_score_error(q, k, opts))
    drop = 1.0 / (1.0 - opts.get("dropout_p", 0.0))
    vmax = float(np.max(np.abs(v), initial=0.0))
    atol = factor * vmax * drop * (tolerance(dtype, lk) + 2 * err_s)
    np.testing.assert_allclose(got, want, rtol=0, atol=atol + float(np.finfo(dtype).tiny))
    dead = want_lse == -np.inf
    np.testing.assert_array_equal(got_lse[dead], -np.inf)
    np.testing.assert_array_equal(got[dead], 0.0)
    lse_tol = factor * (tolerance(dtype, lk) + err_s + tolerance(dtype) * np.abs(want_lse))
    live = ~dead
    np.testing.assert_array_less(np.abs(got_lse[live] - want_lse[live]), lse_tol[live] + 1e-300)
    return got, got_lse


def check_backward(q, k, v, **opts):
    """mn.attention_backward against the reference: dq, dk, dv (and dsinks with sinks), each
    within a tolerance that scales with its reduction length and its factors' magnitudes."""
    out, lse = mn.attention(q, k, v, return_lse=True, **opts)
    go = np.random.default_rng(7).standard_normal(out.shape).astype(out.dtype)
    got = mn.attention_backward(q, k, v, out, lse, go, **opts)
    want = ref.attention_backward(q, k, v, out, lse, go, **opts)
    assert len(got) == len(want) == (4 if opts.get("sinks") is not None else 3)
    dtype = out.dtype
    lq, lk = q.shape[-2], k.shape[-2]
    drop = 1.0 / (1.0 - opts.get("dropout_p", 0.0))
    mags = [float(np.max(np.abs(a), initial=0.0)) for a in (q, k, v, go)]
    scale = float(np.max(mags) ** 3) * drop + 1.0
    heads = q.shape[-3] if q.ndim >= 3 else 1
    n = max(lq, lk) * heads * max(q.shape[-1], v.shape[-1])
    names = ("dq", "dk", "dv", "dsinks")
    for name, g, w in zip(names, got, want, strict=False):
        assert g.shape == w.shape, name
        assert np.all(np.isfinite(g)), name
        batch = int(np.prod(q.shape[:-2])) if name == "dsinks" else 1  # dsinks sums rows too
        atol = 8 * tolerance(dtype, n * batch) * scale
        np.testing.assert_allclose(g, w, rtol=0, atol=atol, err_msg=name)
    return got


# --- sliding window -------------------------------------------------------------------------------

WINDOWS = [(0, 0), (5, 3), (200, 0), (None, 7), (0, None), (191, 191), (96, None), (10**6, 10**6)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True, "lower_right"])
@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_window(window, causal, dtype, rng):
    q, k, v = _inputs(rng, dtype, (2,), (2,), 4, 2, 291, 421, 16, 8)
    check(q, k, v, window=window, causal=causal)
    check_backward(q, k, v, window=window, causal=causal)


# lengths around the blocks: 96 queries per forward task, 192 keys per block (and per backward
# query block); Lq > Lk with the lower-right alignment (queries before the first key)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "lq,lk,window,causal",
    [
        (1, 513, (64, None), "lower_right"),
        (97, 193, (95, 1), False),
        (193, 385, (192, 0), True),
        (385, 192, (1, 1), False),
        (400, 130, (20, 5), "lower_right"),
        (577, 577, (191, 193), False),
        (7, 7, (0, 0), True),
    ],
    ids=str,
)
def test_window_block_tails(lq, lk, window, causal, dtype, rng):
    q, k, v = _inputs(rng, dtype, (1,), (1,), 2, 1, lq, lk, 24, 16)
    check(q, k, v, window=window, causal=causal)
    check_backward(q, k, v, window=window, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_window_equals_its_mask(dtype, rng):
    """A window is the boolean band mask, bit for bit in the forward (both select -inf)."""
    q, k, v = _inputs(rng, dtype, (2,), (2,), 2, 2, 300, 500, 32, 32)
    i = np.arange(300)[:, None] + 200  # lower right: query i at key position i + 200
    j = np.arange(500)[None, :]
    band = (j >= i - 40) & (j <= i)
    got = mn.attention(q, k, v, window=(40, 17), causal="lower_right")
    np.testing.assert_allclose(got, mn.attention(q, k, v, mask=band), rtol=0, atol=1e-12)


def test_nan_keys_outside_the_window_do_not_leak(rng):
    """NaN keys that a query's window excludes are masked by selection (values stay plain
    products, as in test_attention: a NaN row of v reaches every output its block multiplies)."""
    q, k, v = _inputs(rng, np.float64, (), (), 1, 1, 400, 400, 8, 8)
    k[..., :100, :] = np.nan  # query i >= 150 sees keys i - 50 ... i only
    out, lse = mn.attention(q, k, v, window=(50, 0), return_lse=True)
    assert np.all(np.isfinite(out[..., 150:, :])) and np.all(np.isfinite(lse[..., 150:]))
    go = np.ones_like(out)
    go[..., :150, :] = 0.0
    dq, dk, dv = mn.attention_backward(q, k, v, out, lse, go, window=(50, 0))
    # rows 0-149 saw a NaN key: their P is NaN, which the products of the key block 0-191
    # carry to its keys (0 x NaN, as the reference's matmuls carry it to every key); the
    # blocks past it are outside those rows' windows, never visited with them
    assert np.all(np.isfinite(dk[..., 192:, :])) and np.all(np.isfinite(dv[..., 192:, :]))


def test_window_against_pytorch_with_the_equivalent_mask(rng):
    torch = pytest.importorskip("torch")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v = _inputs(rng, np.float64, (2,), (2,), 4, 2, 300, 300, 32, 16)
    i, j = np.arange(300)[:, None], np.arange(300)[None, :]
    band = (j <= i) & (j >= i - 64)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    want = sdpa(tq, tk, tv, attn_mask=torch.from_numpy(band), enable_gqa=True)
    go = rng.standard_normal(want.shape)
    want.backward(torch.from_numpy(go))
    out, lse = mn.attention(q, k, v, window=(64, None), causal=True, return_lse=True)
    np.testing.assert_allclose(out, want.detach().numpy(), rtol=0, atol=1e-12)
    grads = mn.attention_backward(q, k, v, out, lse, go, window=(64, None), causal=True)
    for g, t in zip(grads, (tq, tk, tv), strict=True):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=0, atol=1e-11)


# --- softcap, ALiBi, sinks ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [0.5, 5.0, 50.0])
@pytest.mark.parametrize("causal", [False, "lower_right"])
def test_softcap(softcap, causal, dtype, rng):
    q, k, v = _inputs(rng, dtype, (2,), (2,), 4, 2, 193, 250, 32, 16)
    q = (q * 3).astype(dtype)  # scores past the cap, where tanh saturates
    check(q, k, v, softcap=softcap, causal=causal)
    check_backward(q, k, v, softcap=softcap, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True, "lower_right"])
def test_alibi(causal, dtype, rng):
    q, k, v = _inputs(rng, dtype, (2,), (2,), 4, 2, 150, 390, 16, 16)
    slopes = 2.0 ** -np.arange(1, 5)  # the ALiBi paper's geometric slopes for 4 heads
    check(q, k, v, alibi_slopes=slopes, causal=causal)
    check_backward(q, k, v, alibi_slopes=slopes, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, "lower_right"])
def test_alibi_against_pytorch_with_the_bias_as_a_float_mask(causal, dtype, rng):
    torch = pytest.importorskip("torch")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v = _inputs(rng, dtype, (2,), (2,), 4, 2, 100, 300, 32, 16)
    slopes = np.array([0.5, 0.25, 0.125, 0.0625])
    off = 200 if causal else 0
    dist = np.abs(np.arange(100)[:, None] + off - np.arange(300)[None, :])
    bias = -slopes[:, None, None] * dist
    if causal:
        bias = np.where(np.arange(300)[None, :] <= np.arange(100)[:, None] + off, bias, -np.inf)
    t = [torch.from_numpy(a) for a in (q, k, v)]
    want = sdpa(*t, attn_mask=torch.from_numpy(bias.astype(dtype)), enable_gqa=True).numpy()
    got = mn.attention(q, k, v, alibi_slopes=slopes, causal=causal)
    atol = 1e-12 if dtype == np.float64 else 3e-5
    np.testing.assert_allclose(got, want, rtol=0, atol=atol * float(np.max(np.abs(v))))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_sinks(causal, dtype, rng):
    q, k, v = _inputs(rng, dtype, (2,), (2,), 4, 2, 130, 200, 16, 8)
    sinks = np.array([0.5, -2.0, 6.0, -np.inf])  # -inf: no sink on the last head
    out, lse = check(q, k, v, sinks=sinks, causal=causal)
    np.testing.assert_array_equal(out[:, 3], mn.attention(q, k, v, causal=causal)[:, 3])
    check_backward(q, k, v, sinks=sinks, causal=causal)


def test_sinks_with_fully_masked_rows(rng):
    """A row that sees no key: out 0, lse = the sink, p_sink = 1, and zero gradients."""
    q, k, v = _inputs(rng, np.float64, (), (), 2, 2, 9, 4, 3, 3)
    sinks = np.array([0.7, -1.5])
    out, lse = check(q, k, v, sinks=sinks, causal="lower_right")  # queries 0-4 see no key
    np.testing.assert_array_equal(out[:, :5], 0.0)
    np.testing.assert_array_equal(lse[:, :5], np.broadcast_to(sinks[:, None], (2, 5)))
    go = np.ones_like(out)
    dq, dk, dv, dsinks = mn.attention_backward(
        q, k, v, out, lse, go, sinks=sinks, causal="lower_right"
    )
    np.testing.assert_array_equal(dq[:, :5], 0.0)
    assert dsinks.shape == (2,) and np.all(np.isfinite(dsinks))
    # no keys at all: every row as above, dsinks 0 (out = 0, so dO . O = 0)
    q0, k0, v0 = _inputs(rng, np.float32, (), (), 2, 2, 5, 0, 3, 3)
    out0, lse0 = mn.attention(q0, k0, v0, sinks=sinks, return_lse=True)
    np.testing.assert_array_equal(lse0, np.broadcast_to(sinks[:, None], (2, 5)).astype(np.float32))
    *_, ds0 = mn.attention_backward(q0, k0, v0, out0, lse0, np.ones_like(out0), sinks=sinks)
    np.testing.assert_array_equal(ds0, 0.0)


def _torch_math(
    torch, q, k, v, go, *, causal=False, window=None, softcap=None, sinks=None, alibi=None
):
    """The math formula in float64 with autograd: (out, lse, grads of q, k, v[, sinks])."""
    tq, tk, tv = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, k, v))
    ts = None if sinks is None else torch.tensor(sinks, dtype=torch.float64, requires_grad=True)
    g = q.shape[-3] // k.shape[-3]
    ke, ve = tk.repeat_interleave(g, dim=-3), tv.repeat_interleave(g, dim=-3)
    s = tq @ ke.transpose(-1, -2) / np.sqrt(q.shape[-1])
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    lq, lk = q.shape[-2], k.shape[-2]
    off = lk - lq if causal == "lower_right" else 0
    i = torch.arange(lq)[:, None] + off
    j = torch.arange(lk)[None, :]
    if alibi is not None:
        s = s - torch.tensor(alibi)[:, None, None] * (i - j).abs()
    allowed = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        if window[0] is not None:
            allowed &= j >= i - window[0]
        if window[1] is not None:
            allowed &= j <= i + window[1]
    s = s.masked_fill(~allowed, -np.inf)
    if ts is not None:
        s = torch.cat([s, ts[:, None, None].expand(*s.shape[:-1], 1)], dim=-1)
    p = torch.softmax(s, dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    out = p[..., :lk] @ ve
    out.backward(torch.from_numpy(go))
    grads = [tq.grad, tk.grad, tv.grad] + ([ts.grad] if ts is not None else [])
    return out.detach().numpy(), lse.detach().numpy(), [x.numpy() for x in grads]


@pytest.mark.parametrize(
    "opts",
    [
        {"softcap": 2.0},
        {"sinks": [0.3, -1.0, 2.0, 0.0]},
        {"alibi": [0.5, 0.25, 0.125, 0.0625], "causal": "lower_right"},
        {"window": (30, 4), "softcap": 1.5, "sinks": [1.0, 0.0, -1.0, 3.0], "causal": True},
    ],
    ids=str,
)
def test_against_pytorch_autograd(opts, rng):
    torch = pytest.importorskip("torch")
    q, k, v = _inputs(rng, np.float64, (2,), (2,), 4, 2, 97, 250, 16, 8)
    go = rng.standard_normal((2, 4, 97, 8))
    want_out, want_lse, want_grads = _torch_math(torch, q, k, v, go, **opts)
    ours = dict(opts)
    if "alibi" in ours:
        ours["alibi_slopes"] = ours.pop("alibi")
    out, lse = mn.attention(q, k, v, return_lse=True, **ours)
    np.testing.assert_allclose(out, want_out, rtol=0, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=0, atol=1e-12)
    grads = mn.attention_backward(q, k, v, out, lse, go, **ours)
    assert len(grads) == len(want_grads)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-10)


# --- central differences of the new gradients -----------------------------------------------------


def _loss(q, k, v, go, **opts) -> float:
    return float(np.sum(mn.attention(q, k, v, **opts) * go))


def test_central_differences_of_dsinks_and_the_softcap(rng):
    q, k, v = _inputs(rng, np.float64, (), (), 3, 1, 20, 30, 8, 4)
    q *= 2.0
    sinks = np.array([0.4, -0.3, 1.2])
    opts = {"softcap": 1.5, "sinks": sinks, "window": (12, 2)}
    out, lse = mn.attention(q, k, v, return_lse=True, **opts)
    go = rng.standard_normal(out.shape)
    dq, dk, dv, dsinks = mn.attention_backward(q, k, v, out, lse, go, **opts)
    h = 1e-6
    for head in range(3):
        up, down = sinks.copy(), sinks.copy()
        up[head] += h
        down[head] -= h
        numeric = (
            _loss(q, k, v, go, **{**opts, "sinks": up})
            - _loss(q, k, v, go, **{**opts, "sinks": down})
        ) / (2 * h)
        assert abs(dsinks[head] - numeric) < 1e-7 * (1 + abs(numeric))
    for index in [(0, 0, 0), (1, 7, 3), (2, 19, 5)]:  # q through the softcap
        up, down = q.copy(), q.copy()
        up[index] += h
        down[index] -= h
        numeric = (_loss(up, k, v, go, **opts) - _loss(down, k, v, go, **opts)) / (2 * h)
        assert abs(dq[index] - numeric) < 1e-7 * (1 + abs(numeric))
    for index in [(0, 3, 1), (0, 29, 7)]:  # k through the softcap
        up, down = k.copy(), k.copy()
        up[index] += h
        down[index] -= h
        numeric = (_loss(q, up, v, go, **opts) - _loss(q, down, v, go, **opts)) / (2 * h)
        assert abs(dk[index] - numeric) < 1e-7 * (1 + abs(numeric))


# --- everything together --------------------------------------------------------------------------

COMBINED = [
    # (q_lead, kv_lead, hq, hkv, lq, lk, d, dv, options)
    ((2,), (2,), 4, 2, 193, 385, 32, 16, {"window": (100, 20), "softcap": 3.0, "sinks": True}),
    (
        (2,),
        (1,),
        4,
        1,
        97,
        300,
        16,
        8,
        {"causal": "lower_right", "window": (64, None), "alibi_slopes": True, "sinks": True},
    ),
    (
        (1,),
        (1,),
        2,
        2,
        250,
        250,
        16,
        16,
        {
            "causal": True,
            "window": (50, 0),
            "softcap": 2.0,
            "alibi_slopes": True,
            "dropout_p": 0.2,
            "seed": 5,
        },
    ),
    ((3, 1), (1, 2), 2, 1, 40, 60, 8, 4, {"mask": True, "sinks": True, "softcap": 1.0}),
    ((), (), None, None, 130, 200, 16, 16, {"window": (7, 7), "sinks": True}),  # 2-D: one head
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", COMBINED, ids=str)
def test_combined(case, dtype, rng):
    q_lead, kv_lead, hq, hkv, lq, lk, d, dv, opts = case
    q, k, v = _inputs(rng, dtype, q_lead, kv_lead, hq, hkv, lq, lk, d, dv)
    heads = hq or 1
    opts = dict(opts)
    if opts.get("sinks"):
        opts["sinks"] = rng.standard_normal(heads)
    if opts.get("alibi_slopes"):
        opts["alibi_slopes"] = 2.0 ** -np.arange(1, heads + 1)
    if opts.get("mask"):
        opts["mask"] = rng.random((lq, lk)) < 0.8
    check(q, k, v, **opts)
    check_backward(q, k, v, **opts)


@pytest.mark.parametrize("dtype", DTYPES)
def test_threads_do_not_change_results(dtype, rng, threads):
    q, k, v = _inputs(rng, dtype, (2,), (2,), 4, 2, 300, 700, 32, 16)
    opts = {
        "window": (150, 10),
        "softcap": 4.0,
        "sinks": rng.standard_normal(4),
        "alibi_slopes": np.full(4, 0.01),
    }
    go = rng.standard_normal((2, 4, 300, 16)).astype(dtype)
    results = []
    for t in (1, 2, 3):
        mn.set_num_threads(t)
        out, lse = mn.attention(q, k, v, return_lse=True, **opts)
        results.append((out, lse, *mn.attention_backward(q, k, v, out, lse, go, **opts)))
    for other in results[1:]:
        for a, b in zip(other, results[0], strict=True):
            np.testing.assert_array_equal(a, b)


# --- kv_len: a preallocated cache ---------------------------------------------------------------


def _cache(rng, dtype, b, hq, hkv, lq, lk, d, dv, kv_len, shared=False):
    """q, and k, v caches of lk rows whose rows past kv_len[b] hold NaN and inf (a cache's
    leftovers), with their clean copies (zeros there) for the reference."""
    q, k, v = _inputs(rng, dtype, (b,), (1 if shared else b,), hq, hkv, lq, lk, d, dv)
    clean_k, clean_v = k.copy(), v.copy()
    for i, n in enumerate(kv_len):
        if not shared:
            k[i, :, n:], v[i, :, n:] = np.nan, np.inf
            clean_k[i, :, n:], clean_v[i, :, n:] = 0, 0
    return q, k, v, clean_k, clean_v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"causal": "lower_right"},
        {"causal": True},
        {"causal": "lower_right", "window": (100, None), "sinks": True, "softcap": 4.0},
        {"alibi_slopes": True, "causal": "lower_right"},
    ],
    ids=str,
)
def test_kv_len(opts, dtype, rng):
    kv_len = np.array([0, 333, 200, 421])
    q, k, v, ck, cv = _cache(rng, dtype, 4, 4, 2, 9, 421, 16, 8, kv_len)
    opts = dict(opts, kv_len=kv_len)
    if opts.get("sinks"):
        opts["sinks"] = rng.standard_normal(4)
    if opts.get("alibi_slopes"):
        opts["alibi_slopes"] = np.full(4, 0.05)
    out, lse = mn.attention(q, k, v, return_lse=True, **opts)
    want, want_lse = ref.attention(q, ck, cv, return_lse=True, **opts)
    assert np.all(np.isfinite(out))  # the leftovers never reach a result
    tol = 64 * tolerance(dtype, 421)
    np.testing.assert_allclose(out, want, rtol=0, atol=tol)
    live = want_lse > -np.inf
    np.testing.assert_allclose(lse[live], want_lse[live], rtol=tol, atol=tol)
    np.testing.assert_array_equal(lse[~live], -np.inf)
    go = rng.standard_normal(out.shape).astype(dtype)
    got = mn.attention_backward(q, k, v, out, lse, go, **opts)
    grads = ref.attention_backward(q, ck, cv, out, lse, go, **opts)
    assert len(got) == len(grads)
    for name, g, w in zip(("dq", "dk", "dv", "dsinks"), got, grads, strict=False):
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, w, rtol=0, atol=tol * 64, err_msg=name)
    for i, n in enumerate(kv_len):  # no gradient for keys that do not exist
        np.testing.assert_array_equal(got[1][i, :, n:], 0.0)
        np.testing.assert_array_equal(got[2][i, :, n:], 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_len_equals_the_sliced_cache_bit_for_bit(dtype, rng):
    kv_len = np.array([1, 193, 385])
    q, k, v, _, _ = _cache(rng, dtype, 3, 4, 1, 3, 500, 32, 16, kv_len)
    out, lse = mn.attention(q, k, v, kv_len=kv_len, causal="lower_right", return_lse=True)
    for i, n in enumerate(kv_len):
        one, one_lse = mn.attention(
            q[i], k[i, :, :n], v[i, :, :n], causal="lower_right", return_lse=True
        )
        np.testing.assert_array_equal(out[i], one)
        np.testing.assert_array_equal(lse[i], one_lse)


def test_kv_len_with_a_cache_shared_by_the_batch_and_2d_inputs(rng):
    kv_len = np.array([5, 300])
    q, k, v, _, _ = _cache(rng, np.float64, 2, 2, 2, 4, 300, 8, 8, kv_len, shared=True)
    check(q, k, v, kv_len=kv_len, causal="lower_right")
    check_backward(q, k, v, kv_len=kv_len, causal="lower_right")
    q2, k2, v2 = _inputs(rng, np.float64, (), (), None, None, 3, 50, 8, 8)
    check(q2, k2, v2, kv_len=20, causal="lower_right")
    check(q2, k2, v2, kv_len=np.int32(0))


# --- packed variable-length batches (cu_seqlens) ----------------------------------------------


def _packed(rng, dtype, lens_q, lens_k, hq=4, hkv=2, d=16, dv=8):
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int64)
    q = rng.standard_normal((cu_q[-1], hq, d)).astype(dtype)
    k = rng.standard_normal((cu_k[-1], hkv, d)).astype(dtype)
    v = rng.standard_normal((cu_k[-1], hkv, dv)).astype(dtype)
    return q, k, v, cu_q, cu_k


VARLEN_OPTIONS = [
    {},
    {"causal": True},
    {"causal": "lower_right", "window": (40, None), "softcap": 3.0, "sinks": True},
    {"alibi_slopes": True, "window": (20, 20)},
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", VARLEN_OPTIONS, ids=str)
def test_varlen_equals_each_sequence_bit_for_bit(opts, dtype, rng):
    lens_q, lens_k = [5, 0, 1, 97, 193, 300], [7, 3, 0, 97, 193, 250]
    q, k, v, cu_q, cu_k = _packed(rng, dtype, lens_q, lens_k)
    opts = dict(opts)
    if opts.get("sinks"):
        opts["sinks"] = rng.standard_normal(4)
    if opts.get("alibi_slopes"):
        opts["alibi_slopes"] = np.full(4, 0.05)
    packed = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k}
    out, lse = mn.attention(q, k, v, return_lse=True, **packed, **opts)
    assert out.shape == (q.shape[0], 4, 8) and lse.shape == (4, q.shape[0])
    go = rng.standard_normal(out.shape).astype(dtype)
    grads = mn.attention_backward(q, k, v, out, lse, go, **packed, **opts)
    dsinks = 0.0
    for s in range(len(lens_q)):
        sq, sk = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        heads = [np.swapaxes(a, 0, 1) for a in (q[sq], k[sk], v[sk])]
        one, one_lse = mn.attention(*heads, return_lse=True, **opts)
        np.testing.assert_array_equal(out[sq], np.swapaxes(one, 0, 1))
        np.testing.assert_array_equal(lse[:, sq], one_lse)
        go_s = np.swapaxes(go[sq], 0, 1)
        g = mn.attention_backward(*heads, one, one_lse, go_s, **opts)
        for total, part, rows in zip(grads[:3], g[:3], (sq, sk, sk), strict=True):
            np.testing.assert_array_equal(total[rows], np.swapaxes(part, 0, 1))
        if len(g) == 4:
            dsinks = dsinks + g[3].astype(np.float64)
    if opts.get("sinks") is not None:
        np.testing.assert_array_equal(grads[3], np.asarray(dsinks).astype(grads[3].dtype))
    want, want_lse = ref.attention(q, k, v, return_lse=True, **packed, **opts)
    np.testing.assert_allclose(out, want, rtol=0, atol=64 * tolerance(dtype, 300))
    want_grads = ref.attention_backward(q, k, v, out, lse, go, **packed, **opts)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=512 * tolerance(dtype, 300 * 16))


def test_varlen_dropout_is_the_padded_batch_s(rng):
    """Sequence s draws its dropout as batch s of the padded batch: the same outputs as the
    padded batch with its padding masked, and the reference agrees."""
    lens = [30, 1, 64]
    q, k, v, cu_q, cu_k = _packed(rng, np.float64, lens, lens)
    opts = {"dropout_p": 0.3, "seed": 99, "causal": True}
    out = mn.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_q, **opts)
    want = ref.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_q, **opts)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-12)
    lmax = max(lens)
    pq, pk, pv = (np.zeros((3, a.shape[1], lmax, a.shape[2])) for a in (q, k, v))
    keep = np.zeros((3, 1, lmax, lmax), dtype=bool)
    for s, n in enumerate(lens):
        for padded, packed in ((pq, q), (pk, k), (pv, v)):
            padded[s, :, :n] = np.swapaxes(packed[cu_q[s] : cu_q[s + 1]], 0, 1)
        keep[s, :, :, :n] = True
    padded_out = mn.attention(pq, pk, pv, mask=keep, **opts)
    for s, n in enumerate(lens):
        np.testing.assert_allclose(
            out[cu_q[s] : cu_q[s + 1]], np.swapaxes(padded_out[s, :, :n], 0, 1), atol=1e-12
        )


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"cu_seqlens_q": None}, ValueError, "go together"),
        ({"cu_seqlens_q": np.array([0, 5, 3, 10], np.int32)}, ValueError, "not decrease"),
        ({"cu_seqlens_q": np.array([0, 5, 9], np.int32)}, ValueError, "end at the 10 tokens"),
        ({"cu_seqlens_q": np.array([1, 5, 10], np.int32)}, ValueError, "start at 0"),
        ({"cu_seqlens_q": np.array([0, 5, 10], np.int16)}, TypeError, "int32 or int64"),
        ({"cu_seqlens_q": np.array([0.0, 5, 10])}, TypeError, "int32 or int64"),
        ({"cu_seqlens_q": np.array([0, 10], np.int32)}, ValueError, "give 1 and 2 sequences"),
        ({"cu_seqlens_q": np.array([[0, 5, 10]], np.int32)}, ValueError, "1-D array"),
        ({"mask": np.ones((10, 12), bool)}, ValueError, "mask is not supported"),
        ({"kv_len": np.array([3, 4])}, ValueError, "exclude each other"),
    ],
    ids=str,
)
def test_bad_varlen(change, error, match, rng):
    q, k, v, cu_q, cu_k = _packed(rng, np.float32, [5, 5], [6, 6])
    args = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, **change}
    with pytest.raises(error, match=match):
        mn.attention(q, k, v, **args)
    out, lse = mn.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    with pytest.raises(error, match=match):
        mn.attention_backward(q, k, v, out, lse, np.ones_like(out), **args)
    with pytest.raises(ValueError, match=r"q must be \(total_tokens, heads, features\)"):
        mn.attention(q[None], k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    with pytest.raises(ValueError, match=r"lse has shape \(10, 4\)"):
        mn.attention_backward(
            q, k, v, out, lse.T, np.ones_like(out), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k
        )


# --- 16-bit storage -------------------------------------------------------------------------------


def assert_16bit_close(out16, lse16, out32, lse32, dtype_name) -> float:
    """The 16-bit call's out within one rounding of the float32 call's on the widened inputs,
    its float32 lse within float32 rounding; returns the 16-bit unit roundoff."""
    assert out16.dtype == dtype_of(dtype_name) and lse16.dtype == np.float32
    unit = float(np.finfo(np.float16).eps if dtype_name == "float16" else 2.0**-8)
    np.testing.assert_allclose(widen(out16), out32, rtol=unit, atol=1e-5)
    np.testing.assert_allclose(lse16, lse32, rtol=1e-5, atol=1e-5)
    return unit


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_16bit_storage_computes_in_float32(dtype_name, rng):
    """bfloat16/float16 q, k, v: the float32 computation on the widened inputs, each result
    rounded once (within one 16-bit rounding of the float32 call's), dsinks float32 sinks'."""
    dtype = dtype_of(dtype_name)
    q, k, v = _inputs(rng, np.float32, (2,), (2,), 4, 2, 150, 300, 32, 16)
    q16, k16, v16 = (a.astype(dtype) for a in (q, k, v))
    q32, k32, v32 = (widen(a) for a in (q16, k16, v16))
    opts = {
        "causal": "lower_right",
        "window": (100, None),
        "softcap": 3.0,
        "sinks": rng.standard_normal(4).astype(np.float32),
        "alibi_slopes": np.full(4, 0.02),
    }
    out16, lse16 = mn.attention(q16, k16, v16, return_lse=True, **opts)
    out32, lse32 = mn.attention(q32, k32, v32, return_lse=True, **opts)
    unit = assert_16bit_close(out16, lse16, out32, lse32, dtype_name)
    go16 = rng.standard_normal(out16.shape).astype(dtype)
    g16 = mn.attention_backward(q16, k16, v16, out16, lse16, go16, **opts)
    g32 = mn.attention_backward(q32, k32, v32, widen(out16), lse16, widen(go16), **opts)
    assert [g.dtype for g in g16] == [dtype, dtype, dtype, np.float32]
    for g, w in zip(g16, g32, strict=True):
        np.testing.assert_allclose(widen(g), w, rtol=unit, atol=unit * float(np.max(np.abs(w))))


# --- arguments ------------------------------------------------------------------------------------


def test_dsinks_dtype_and_2d_inputs(rng):
    q, k, v = _inputs(rng, np.float64, (), (), None, None, 5, 6, 4, 4)
    out, lse = mn.attention(q, k, v, sinks=np.array([0.5], np.float32), return_lse=True)
    go = np.ones_like(out)
    *_, ds = mn.attention_backward(q, k, v, out, lse, go, sinks=np.array([0.5], np.float32))
    assert ds.dtype == np.float32 and ds.shape == (1,)
    *_, ds = mn.attention_backward(q, k, v, out, lse, go, sinks=[0.5])
    assert ds.dtype == np.float64  # not a floating array: q's dtype
    want = ref.attention_backward(q, k, v, out, lse, go, sinks=[0.5])[3]
    np.testing.assert_allclose(ds, want, rtol=1e-12)


@pytest.mark.parametrize(
    "opts,error,match",
    [
        ({"window": (-1, 3)}, ValueError, "window left must be >= 0"),
        ({"window": (3, -2)}, ValueError, "window right must be >= 0"),
        ({"window": 5}, ValueError, "window must be a pair"),
        ({"window": (1, 2, 3)}, ValueError, "window must be a pair"),
        ({"window": (1.5, 2)}, TypeError, "window left must be an int"),
        ({"window": (True, 2)}, TypeError, "window left must be an int"),
        ({"softcap": 0.0}, ValueError, "softcap must be finite and > 0"),
        ({"softcap": -1.0}, ValueError, "softcap must be finite and > 0"),
        ({"softcap": np.nan}, ValueError, "softcap must be finite and > 0"),
        ({"softcap": np.inf}, ValueError, "softcap must be finite and > 0"),
        ({"softcap": "big"}, TypeError, "softcap must be a number"),
        ({"sinks": np.zeros(3)}, ValueError, r"sinks has shape \(3,\) \(expected \(4,\)"),
        ({"sinks": np.zeros((1, 4))}, ValueError, "sinks has shape"),
        ({"alibi_slopes": np.zeros(2)}, ValueError, "alibi_slopes has shape"),
        ({"alibi_slopes": np.zeros(4, complex)}, TypeError, "alibi_slopes"),
        ({"kv_len": [7]}, ValueError, r"kv_len must be in \[0, Lk = 6\]"),
        ({"kv_len": [-1]}, ValueError, r"kv_len must be in \[0, Lk = 6\]"),
        ({"kv_len": [1, 2]}, ValueError, r"kv_len has shape \(2,\) \(expected the batch shape"),
        ({"kv_len": 3}, ValueError, "kv_len has shape"),
        ({"kv_len": [2.0]}, TypeError, "kv_len must hold integers"),
    ],
    ids=str,
)
def test_bad_options(opts, error, match, rng):
    q, k, v = _inputs(rng, np.float32, (1,), (1,), 4, 2, 5, 6, 4, 4)
    out, lse = mn.attention(q, k, v, return_lse=True)
    with pytest.raises(error, match=match):
        mn.attention(q, k, v, **opts)
    with pytest.raises(error, match=match):
        mn.attention_backward(q, k, v, out, lse, np.ones_like(out), **opts)


def test_the_binding_checks_what_it_relies_on(rng):
    """The binding refuses extras the kernel cannot take, before writing: dsinks without sinks,
    sinks of another dtype or length, a window below -1, a negative softcap."""
    q, k, v = _inputs(rng, np.float32, (1,), (1,), 2, 2, 5, 6, 4, 4)
    out = np.full((1, 2, 5, 4), 7.0, np.float32)
    base = (None, 0, 0.5, 0.0, 0)
    bad = [
        _core.AttentionExtras(-2, -1, 0.0, None, None),
        _core.AttentionExtras(-1, -1, -1.0, None, None),
        _core.AttentionExtras(-1, -1, 0.0, np.zeros(2), None),  # float64 for float32 q
        _core.AttentionExtras(-1, -1, 0.0, np.zeros(3, np.float32), None),
        _core.AttentionExtras(-1, -1, 0.0, None, np.zeros(4, np.float32)[::2]),
    ]
    for extras in bad:
        with pytest.raises((ValueError, TypeError), match="^attention: "):
            _core.attention_into(q, k, v, *base, extras, out, None)
        assert np.all(out == 7.0)
    for kv_len in (np.array([7]), np.array([-1]), np.array([2], np.int32), np.array([1, 2])):
        extras = _core.AttentionExtras(-1, -1, 0.0, None, None, kv_len)
        with pytest.raises(ValueError, match="^attention: kv_len"):
            _core.attention_into(q, k, v, *base, extras, out, None)
        assert np.all(out == 7.0)
    good = _core.AttentionExtras(-1, -1, 0.0, None, None)
    lse = np.zeros((1, 2, 5), np.float32)
    dq, dk, dv = (np.full(a.shape, 7.0, np.float32) for a in (q, k, v))
    with pytest.raises(ValueError, match="dsinks without sinks"):
        _core.attention_backward_into(
            q, k, v, out, lse, out, *base, good, dq, dk, dv, np.zeros(2, np.float32)
        )
    assert all(np.all(a == 7.0) for a in (dq, dk, dv))
