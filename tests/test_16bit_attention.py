"""Attention forward and backward on bfloat16 and float16 storage (float32 math; the lse and a
float mask float32; out, dq, dk, dv rounded once) against the float64 golden on the same 16-bit
inputs and against PyTorch's F.scaled_dot_product_attention (and its autograd) in the same
dtype (tests/sixteen.py), on every ISA path (run with MLMATH_NATIVE_ISA=scalar|avx2|avx512).

Tolerances: out is a convex combination of v rows, so its error is one rounding of out plus a
few u of max|v| (atol_u); the gradients are sums of products of the size of max|golden|.  The
factor against PyTorch is tests/sixteen.py's PYTORCH_FACTOR."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sixteen import HALF_NAMES, assert_16bit_close, dtype_of, random, to_torch, widen

import mlmath_native as mn
from mlmath_native import _core
from mlmath_native.reference import transformer_attention as ref

CAUSAL = [False, True, "lower_right"]


def _torch_mask(mask, dtype):
    """Our mask as SDPA's attn_mask (bool: True attends; float: added, in the query dtype)."""
    torch = pytest.importorskip("torch")
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        return torch.from_numpy(mask.copy())
    return to_torch(np.asarray(mask, np.float32).astype(dtype))


def torch_sdpa(q, k, v, mask=None, causal=False, grad_out=None, flash=False):
    """SDPA in the inputs' 16-bit dtype (upper-left causal only; GQA with enable_gqa), and with
    ``grad_out`` its autograd gradients: (out,) or (out, dq, dk, dv) as torch tensors.  With
    ``flash``, only PyTorch's CPU flash-attention kernel (None where it does not apply)."""
    torch = pytest.importorskip("torch")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    tq, tk, tv = (to_torch(a).requires_grad_(grad_out is not None) for a in (q, k, v))
    opts = {"is_causal": bool(causal)}
    if np.ndim(q) >= 3 and q.shape[-3] != k.shape[-3]:
        opts["enable_gqa"] = True
    try:
        if flash:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "no available kernel" before the error
                out = sdpa(tq, tk, tv, attn_mask=_torch_mask(mask, q.dtype), **opts)
        else:
            out = sdpa(tq, tk, tv, attn_mask=_torch_mask(mask, q.dtype), **opts)
    except (RuntimeError, ImportError):  # no flash kernel for these arguments
        return None
    if grad_out is None:
        return (out,)
    out.backward(to_torch(grad_out))
    return out, tq.grad, tk.grad, tv.grad


def torch_ok(mask, causal, dropout_p=0.0, hq=None, hkv=None, k_batch_shared=False) -> bool:
    """Whether SDPA computes the same function (no lower-right causal, no dropout, no causal with
    a mask, k and v with q's batch shape)."""
    if causal == "lower_right" or dropout_p > 0 or (causal and mask is not None):
        return False
    return not k_batch_shared


def check_forward(q, k, v, *, mask=None, causal=False, with_torch=True, **opts):
    """out and lse against the golden (and out against SDPA); returns (out, lse)."""
    dtype = q.dtype
    out, lse = mn.attention(q, k, v, mask=mask, causal=causal, return_lse=True, **opts)
    assert out.dtype == dtype and lse.dtype == np.float32
    f = [widen(a) for a in (q, k, v)]
    m64 = None if mask is None or np.asarray(mask).dtype == np.bool_ else widen(mask)
    gmask = mask if m64 is None else m64
    golden, golden_lse = ref.attention(*f, mask=gmask, causal=causal, return_lse=True, **opts)
    vmax = float(np.max(np.abs(np.where(np.isfinite(f[2]), f[2], 0)), initial=0.0))
    p = opts.get("dropout_p", 0.0)
    theirs = torch_sdpa(q, k, v, mask, causal)[0] if with_torch else None
    assert_16bit_close(
        out,
        golden,
        dtype,
        n=k.shape[-2],
        atol_u=1.0,
        scale=max(vmax / (1.0 - p), 1e-30),
        torch_result=theirs,
    )
    # lse in float32: the scores' float32 error (products of D terms) plus log's
    fin = np.isfinite(golden_lse)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(golden_lse))
    qs = float(np.max(np.abs(np.nan_to_num(f[0])), initial=0.0)) * float(
        np.max(np.abs(np.nan_to_num(f[1])), initial=0.0)
    )
    bound = 1e-6 * (4 + qs * np.sqrt(max(q.shape[-1], 1)) + np.abs(golden_lse[fin]))
    assert np.all(np.abs(lse[fin] - golden_lse[fin]) <= bound)
    return out, lse


def check_backward(q, k, v, grad_out, *, mask=None, causal=False, with_torch=True, **opts):
    """dq, dk, dv against the golden (the reference backward on the same 16-bit inputs, our
    out and lse) and against SDPA's autograd in the same dtype; returns (dq, dk, dv)."""
    dtype = q.dtype
    out, lse = mn.attention(q, k, v, mask=mask, causal=causal, return_lse=True, **opts)
    grads = mn.attention_backward(q, k, v, out, lse, grad_out, mask=mask, causal=causal, **opts)
    m64 = None if mask is None or np.asarray(mask).dtype == np.bool_ else widen(mask)
    golden = ref.attention_backward(
        *(widen(a) for a in (q, k, v, out)),
        lse.astype(np.float64),
        widen(grad_out),
        mask=mask if m64 is None else m64,
        causal=causal,
        **opts,
    )
    # PyTorch as the second oracle: dv from its default path; dq and dk only from its flash
    # kernel, which like ours (and FlashAttention) takes D_i = dO_i . O_i from the rounded
    # out.  Where SDPA picks its math path it upcasts to float32 and sums P dP exactly, which
    # no flash-style backward can match without recomputing out (out_rounding_error).
    theirs = (None,) * 3
    if with_torch:
        default = torch_sdpa(q, k, v, mask, causal, grad_out)
        flash = torch_sdpa(q, k, v, mask, causal, grad_out, flash=True)
        theirs = (*(flash[1:3] if flash is not None else (None, None)), default[3])
    n = q.shape[-2] + k.shape[-2]
    extra = out_rounding_error(
        q, k, v, out, grad_out, mask=mask if m64 is None else m64, causal=causal, **opts
    )
    for got, gold, their, arg, ex in zip(grads, golden, theirs, (q, k, v), extra, strict=True):
        assert got.shape == arg.shape
        g64 = widen(gold)
        scale = float(np.max(np.abs(g64[np.isfinite(g64)]), initial=0.0))
        u = 2.0**-8 if dtype.name == "bfloat16" else 2.0**-11
        atol_u = 2.0 + (ex / (u * scale) if scale > 0 else 0.0)
        assert_16bit_close(got, gold, dtype, n=n, atol_u=atol_u, scale=scale, torch_result=their)
    return grads


def out_rounding_error(q, k, v, out, grad_out, *, mask, causal, scale=None, **opts):
    """What the 16-bit rounding of ``out`` moves dq and dk by (dv: nothing).

    The backward takes D_i = dO_i . O_i from the forward's rounded out (as FlashAttention and
    PyTorch do), while the golden sums P dP exactly: D_i is off by up to u sum_d |dO_id O_id|,
    dS_ij = P_ij (dP_ij - D_i) by P_ij times that, so dq_i by scale sum_j P_ij dD_i |K_j| and
    dk_j by scale sum_i P_ij dD_i |Q_i| (summed over the query heads of a group and broadcast
    batches, like dk itself)."""
    c = ref._setup("t", *(widen(a) for a in (q, k, v)), mask, causal, scale, 0.0, None)
    p = np.where(np.isfinite(c["weights"]), c["weights"], 0.0)  # (..., Hq, Lq, Lk)
    u = 2.0**-8 if q.dtype.name == "bfloat16" else 2.0**-11
    do, o = (np.nan_to_num(widen(a)).reshape(p.shape[:-1] + (-1,)) for a in (grad_out, out))
    dd = u * np.sum(np.abs(do * o), axis=-1) * max(1.0, 1.0 / (1.0 - opts.get("dropout_p", 0)))
    w = p * dd[..., None]
    sc = abs(c["scale"])
    qe, ke = (np.nan_to_num(np.abs(c[name])) for name in ("qe", "ke"))
    dq = sc * float(np.max(w @ ke, initial=0.0))
    dk_heads = sc * (np.swapaxes(w, -1, -2) @ qe)  # (..., Hq, Lk, D), summed conservatively
    dk = float(np.max(np.sum(dk_heads.reshape((-1,) + dk_heads.shape[-2:]), axis=0), initial=0.0))
    return dq, dk, 0.0


def qkv(rng, dtype, q_shape, kv_lead, hkv, lk, dv=None, scale=1.0):
    d = q_shape[-1]
    dv = d if dv is None else dv
    q = random(rng, q_shape, dtype, scale)
    k = random(rng, (*kv_lead, hkv, lk, d), dtype, scale)
    v = random(rng, (*kv_lead, hkv, lk, dv), dtype)
    return q, k, v


SHAPES = [  # (B, Hq, Hkv, Lq, Lk, D, Dv): tails of the vector width, the 96-query and 192-key
    (1, 1, 1, 1, 1, 1, 1),  # blocks, D and Dv apart
    (2, 2, 2, 7, 9, 3, 5),
    (1, 3, 3, 37, 53, 19, 7),
    (1, 2, 2, 97, 193, 64, 64),
    (1, 1, 1, 200, 5, 8, 9),
    (2, 1, 1, 5, 390, 33, 17),
]


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
@pytest.mark.parametrize("causal", CAUSAL, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward_shapes(shape, causal, dtype_name, rng):
    dtype = dtype_of(dtype_name)
    b, hq, hkv, lq, lk, d, dv = shape
    q, k, v = qkv(rng, dtype, (b, hq, lq, d), (b,), hkv, lk, dv, scale=1.5)
    g = random(rng, (b, hq, lq, dv), dtype)
    ok = torch_ok(None, causal)
    check_forward(q, k, v, causal=causal, with_torch=ok)
    check_backward(q, k, v, g, causal=causal, with_torch=ok)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
@pytest.mark.parametrize("hkv", [1, 2])
def test_grouped_query_heads(hkv, dtype_name, rng):
    dtype = dtype_of(dtype_name)
    q, k, v = qkv(rng, dtype, (2, 4, 41, 24), (2,), hkv, 67)
    g = random(rng, (2, 4, 41, 24), dtype)
    for causal in (False, True):
        check_forward(q, k, v, causal=causal)
        check_backward(q, k, v, g, causal=causal)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
@pytest.mark.parametrize("kv_lead", [(1,), ()], ids=str)
def test_k_and_v_shared_by_every_batch(kv_lead, dtype_name, rng):
    dtype = dtype_of(dtype_name)
    q, k, v = qkv(rng, dtype, (3, 2, 29, 16), kv_lead, 2, 45)
    g = random(rng, (3, 2, 29, 16), dtype)
    check_forward(q, k, v, with_torch=False)
    dq, dk, dv = check_backward(q, k, v, g, with_torch=False)
    assert dk.shape == k.shape and dv.shape == v.shape
    # the same as every batch's own k and v, summed
    kb, vb = (np.broadcast_to(a, (3, *a.shape[-3:])).copy() for a in (k, v))
    _, dkb, dvb = mn.attention_backward(q, kb, vb, *mn.attention(q, kb, vb, return_lse=True), g)
    for got, per_batch in ((dk, dkb), (dv, dvb)):
        want = widen(per_batch).sum(axis=0).reshape(got.shape)
        scale = float(np.max(np.abs(want)))
        np.testing.assert_allclose(widen(got), want, atol=4 * 2.0**-8 * scale)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
@pytest.mark.parametrize("mask_kind", ["bool", "float32", "float64", "same"])
def test_masks(mask_kind, dtype_name, rng):
    dtype = dtype_of(dtype_name)
    q, k, v = qkv(rng, dtype, (2, 2, 33, 16), (2,), 2, 70)
    g = random(rng, (2, 2, 33, 16), dtype)
    if mask_kind == "bool":
        mask = rng.random((2, 1, 33, 70)) < 0.7
        mask[..., 5, :] = False  # a fully masked row
    else:
        mask = rng.standard_normal((33, 70)) * 2
        mask[rng.random(mask.shape) < 0.2] = -np.inf
        mask = mask.astype(dtype if mask_kind == "same" else mask_kind)
    out, lse = check_forward(q, k, v, mask=mask)
    assert out.dtype == dtype  # a float mask never changes the result dtype
    check_backward(q, k, v, g, mask=mask)
    if mask_kind == "bool":
        assert np.all(widen(out[..., 5, :]) == 0) and np.all(np.isneginf(lse[..., 5]))
    # a float mask is added in float32: the same as the float32 mask it converts to
    m32 = np.asarray(mask).astype(np.float32) if mask_kind != "bool" else mask
    np.testing.assert_array_equal(widen(out), widen(mn.attention(q, k, v, mask=m32)))
    # with causal (no PyTorch: SDPA takes one or the other)
    check_forward(q, k, v, mask=mask, causal="lower_right", with_torch=False)
    check_backward(q, k, v, g, mask=mask, causal=True, with_torch=False)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_fully_masked_rows_have_zero_output_and_finite_gradients(dtype_name, rng):
    dtype = dtype_of(dtype_name)
    q, k, v = qkv(rng, dtype, (1, 2, 6, 8), (1,), 2, 4)
    g = random(rng, (1, 2, 6, 8), dtype)
    # lower-right with Lq > Lk: the first two queries see no key
    out, lse = mn.attention(q, k, v, causal="lower_right", return_lse=True)
    assert np.all(widen(out[..., :2, :]) == 0) and np.all(np.isneginf(lse[..., :2]))
    grads = mn.attention_backward(q, k, v, out, lse, g, causal="lower_right")
    for a in grads:
        assert a.dtype == dtype and np.all(np.isfinite(widen(a)))
    assert np.all(widen(grads[0][..., :2, :]) == 0)
    check_backward(q, k, v, g, causal="lower_right", with_torch=False)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_dropout_is_the_float32_path_on_the_same_values(dtype_name, rng):
    dtype = dtype_of(dtype_name)
    q, k, v = qkv(rng, dtype, (2, 2, 50, 16), (2,), 2, 200)
    g = random(rng, (2, 2, 50, 16), dtype)
    opts = {"dropout_p": 0.3, "seed": 7}
    out, lse = check_forward(q, k, v, causal=True, with_torch=False, **opts)
    again = mn.attention(q, k, v, causal=True, **opts)
    np.testing.assert_array_equal(out.view(np.uint16), again.view(np.uint16))
    # the float32 kernel on the widened values draws the same weights: out is its rounding
    f = [widen(a).astype(np.float32) for a in (q, k, v)]
    out32, lse32 = mn.attention(*f, causal=True, return_lse=True, **opts)
    np.testing.assert_allclose(lse, lse32, rtol=1e-6, atol=1e-6)
    u = 2.0**-8 if dtype_name == "bfloat16" else 2.0**-11
    np.testing.assert_allclose(widen(out), out32, rtol=u, atol=1e-5 * np.abs(out32).max())
    grads = check_backward(q, k, v, g, causal=True, with_torch=False, **opts)
    grads32 = mn.attention_backward(
        *f, out32, lse32, widen(g).astype(np.float32), causal=True, **opts
    )
    for got, want in zip(grads, grads32, strict=True):
        np.testing.assert_allclose(widen(got), want, rtol=4 * u, atol=4 * u * np.abs(want).max())


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_non_contiguous_inputs(dtype_name, rng):
    dtype = dtype_of(dtype_name)
    big = random(rng, (2, 3, 40, 2, 34), dtype)
    q = big[:, :, :30, 0, :32].transpose(1, 0, 2, 3)  # (3, 2, 30, 32), strided
    k = big[:, :, ::2, 1, 1:33].transpose(1, 0, 2, 3)  # (3, 2, 20, 32)
    v = random(rng, (3, 2, 20, 32), dtype)[..., ::-1]
    g = random(rng, (3, 2, 30, 64), dtype)[..., ::2]
    assert not any(a.flags.c_contiguous for a in (q, k, v, g))
    out, _ = check_forward(q, k, v)
    contiguous = mn.attention(*(np.ascontiguousarray(a) for a in (q, k, v)))
    np.testing.assert_array_equal(out.view(np.uint16), contiguous.view(np.uint16))
    check_backward(q, k, v, g)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_nan_propagates_and_masked_nan_does_not(dtype_name, rng):
    dtype = dtype_of(dtype_name)
    q, k, v = qkv(rng, dtype, (1, 1, 5, 8), (1,), 1, 6)
    q[0, 0, 1, 3] = np.nan  # query 1: every score NaN
    v[0, 0, 2, 0] = np.nan  # key 2's value: NaN in column 0 of every query that sees key 2
    out = mn.attention(q, k, v)
    assert np.all(np.isnan(widen(out[0, 0, 1])))
    assert np.all(np.isnan(widen(out[0, 0, :, 0])))
    assert np.all(np.isfinite(widen(np.delete(out[0, 0], 1, axis=0)[:, 1:])))
    # a NaN key masked away (scores are masked by selection): no NaN reaches any query
    k[0, 0, 2, 1] = np.nan
    v[0, 0, 2, 0] = 1.0
    mask = np.ones((5, 6), bool)
    mask[:, 2] = False
    out = mn.attention(q, k, v, mask=mask)
    assert np.all(np.isfinite(widen(np.delete(out[0, 0], 1, axis=0))))
    # (PyTorch adds a bool mask as -inf, and NaN + -inf is NaN: no second oracle here)
    check_forward(np.nan_to_num(q), k, v, mask=mask, with_torch=False)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_large_scores_do_not_overflow(dtype_name, rng):
    """Scores past the 16-bit range are computed in float32: the exact (finite) result."""
    dtype = dtype_of(dtype_name)
    big = 200.0 if dtype_name == "float16" else 1e19  # q.k ~ D * big^2, past f16 / bf16 max
    q, k, v = qkv(rng, dtype, (1, 2, 9, 64), (1,), 2, 13)
    q, k = (np.asarray(widen(a) * big / 2).astype(dtype) for a in (q, k))
    out, lse = check_forward(q, k, v, with_torch=False)
    assert np.all(np.isfinite(widen(out))) and np.all(np.isfinite(lse))


def test_float16_overflow_is_inf_exactly_where_the_result_overflows():
    """dropout scales v rows by 1 / (1 - p); dv sums grad_out over the queries: float16 gives
    inf exactly where the float64 golden passes 65504 + half an ulp."""
    dtype = np.dtype(np.float16)
    q = np.zeros((1, 1, 4, 4), dtype)
    k = np.zeros((1, 1, 1, 4), dtype)  # one key: every weight is 1
    v = np.array([[[[40000.0, -40000.0, 30000.0, 1.0]]]], dtype)
    opts = {"dropout_p": 0.5, "seed": 3}
    check_forward(q, k, v, with_torch=False, **opts)
    out = mn.attention(q, k, v, **opts)
    kept = np.isfinite(widen(out[..., 0])) == False  # noqa: E712 (80000: inf where kept)
    assert np.all(widen(out[..., 2])[kept] == 60000.0)
    g = np.array([[[[20000.0, -20000.0, 16000.0, 1.0]]]], dtype) * np.ones((1, 1, 4, 1), dtype)
    out, lse = mn.attention(q, k, v, return_lse=True)
    dq, dk, dv = mn.attention_backward(q, k, v, out, lse, g)
    # dv = sum over 4 queries: 80000 -> inf, -80000 -> -inf, 64000 finite, 4
    np.testing.assert_array_equal(widen(dv[0, 0, 0]), [np.inf, -np.inf, 64000.0, 4.0])
    check_backward(q, k, v, g)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_torch_tensors_zero_copy_in_and_16bit_out(dtype_name, rng):
    torch = pytest.importorskip("torch")
    dtype = dtype_of(dtype_name)
    q, k, v = qkv(rng, dtype, (2, 2, 17, 8), (2,), 2, 19)
    tq, tk, tv = (to_torch(a) for a in (q, k, v))
    out = mn.attention(tq, tk, tv, causal=True)
    assert out.dtype == dtype
    np.testing.assert_array_equal(
        out.view(np.uint16), mn.attention(q, k, v, causal=True).view(np.uint16)
    )
    ref_out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    np.testing.assert_allclose(widen(out), widen(ref_out), rtol=2 * 2.0**-8, atol=2.0**-8)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_mixed_dtypes_promote_as_numpy_does(dtype_name, rng):
    dtype = dtype_of(dtype_name)
    q, k, v = qkv(rng, dtype, (1, 1, 5, 4), (1,), 1, 6)
    other = np.float16 if dtype_name == "bfloat16" else np.float32
    out, lse = mn.attention(q, k.astype(other), v, return_lse=True)
    assert out.dtype == np.float32 and lse.dtype == np.float32  # bf16 + f16, f16 + f32: f32
    out, lse = mn.attention(q, k, v.astype(np.float64), return_lse=True)
    assert out.dtype == np.float64 and lse.dtype == np.float64


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_backward_takes_a_16bit_lse_and_the_kernel_refuses_a_wrong_one(dtype_name, rng):
    dtype = dtype_of(dtype_name)
    q, k, v = qkv(rng, dtype, (1, 1, 5, 4), (1,), 1, 6)
    g = random(rng, (1, 1, 5, 4), dtype)
    out, lse = mn.attention(q, k, v, return_lse=True)
    assert lse.dtype == np.float32
    # an lse rounded to 16 bits is read as float32 (the user's choice of precision)
    grads = mn.attention_backward(q, k, v, out, lse.astype(dtype), g)
    assert all(a.dtype == dtype for a in grads)
    # the binding: lse of the input dtype, out of another dtype: a clear error, nothing written
    opts = (None, 0, 0.5, 0.0, 0, _core.AttentionExtras(-1, -1, 0.0, None, None))
    bad_out = np.full((1, 1, 5, 4), 7.0, np.float32)
    with pytest.raises(TypeError, match="^attention: out has dtype"):
        _core.attention_into(q, k, v, *opts, bad_out, None)
    assert np.all(bad_out == 7.0)
    good_out = np.zeros((1, 1, 5, 4), dtype)
    bad_lse = np.zeros((1, 1, 5), dtype)
    with pytest.raises(TypeError, match="^attention: lse has dtype"):
        _core.attention_into(q, k, v, *opts, good_out, bad_lse)
    assert np.all(widen(good_out) == 0) and np.all(widen(bad_lse) == 0)
    dq, dk, dv = (np.zeros_like(a) for a in (q, k, v))
    with pytest.raises(TypeError, match="^attention_backward: lse has dtype"):
        _core.attention_backward_into(q, k, v, out, lse.astype(dtype), g, *opts, dq, dk, dv, None)
    with pytest.raises(TypeError, match="^attention: mask"):  # a float mask must be float32
        _core.attention_into(q, k, v, np.zeros((1, 1, 5, 6), dtype), *opts[1:], good_out, None)
    assert not any(np.any(widen(a)) for a in (dq, dk, dv, good_out))


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_results_do_not_depend_on_threads(dtype_name, rng, threads):
    dtype = dtype_of(dtype_name)
    q, k, v = qkv(rng, dtype, (2, 4, 150, 32), (2,), 2, 400)
    g = random(rng, (2, 4, 150, 32), dtype)
    results = []
    for n in (1, 2, 3):
        mn.set_num_threads(n)
        out, lse = mn.attention(q, k, v, causal=True, return_lse=True)
        results.append([out, lse, *mn.attention_backward(q, k, v, out, lse, g, causal=True)])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_dask_wrapper_keeps_the_16bit_dtype(dtype_name, rng):
    da = pytest.importorskip("dask.array")
    import mlmath_native.dask as mnd

    dtype = dtype_of(dtype_name)
    q, k, v = qkv(rng, dtype, (2, 4, 9, 8), (2,), 2, 11)
    mask = rng.standard_normal((9, 11))  # float64: added in float32, the dtype stays 16-bit
    lazy = mnd.attention(da.from_array(q, chunks=(1, 2, 9, 8)), k, v, mask=mask, causal=True)
    assert lazy.dtype == dtype
    got = lazy.compute()
    want = mn.attention(q, k, v, mask=mask, causal=True)
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
