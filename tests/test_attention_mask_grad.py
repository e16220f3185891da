"""attention_backward's gradient with respect to an additive float mask (issue 23), asked for
with ``needs``, as autograd gives it for PyTorch's SDPA: against torch's autograd where SDPA
has the options, and against central differences of the float64 reference elsewhere (softcap,
ALiBi, sinks, windows, kv_len, dropout)."""

from __future__ import annotations

import numpy as np
import pytest

import mlmath_native as mn
from mlmath_native.reference import transformer_attention as ref

ALL = ("q", "k", "v", "mask")


def backward(q, k, v, mask, g, needs=ALL, **kw):
    o, lse = mn.attention(q, k, v, mask=mask, return_lse=True, **kw)
    return mn.attention_backward(
        q, k, v, o, lse, g(o) if callable(g) else g, mask=mask, needs=needs, **kw
    )


@pytest.mark.parametrize(
    "mask_shape", [(2, 4, 6, 7), (6, 7), (4, 1, 7), (2, 1, 1, 7), (1, 4, 6, 1), (7,)]
)
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_mask_grad_matches_torch_autograd(mask_shape, hkv, rng):
    torch = pytest.importorskip("torch")
    q = rng.standard_normal((2, 4, 6, 8))
    k = rng.standard_normal((2, hkv, 7, 8))
    v = rng.standard_normal((2, hkv, 7, 5))
    mask = rng.standard_normal(mask_shape)
    g = rng.standard_normal((2, 4, 6, 5))
    dq, dk, dv, dmask = backward(q, k, v, mask, g)
    tensors = [torch.tensor(a, requires_grad=True) for a in (q, k, v, mask)]
    out = torch.nn.functional.scaled_dot_product_attention(
        *tensors[:3], attn_mask=tensors[3], enable_gqa=hkv != 4
    )
    out.backward(torch.tensor(g))
    assert dmask.shape == mask.shape and dmask.dtype == mask.dtype
    for ours, t in zip((dq, dk, dv, dmask), tensors, strict=True):
        np.testing.assert_allclose(ours, t.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_causal_and_minus_inf_positions_get_no_gradient(rng):
    torch = pytest.importorskip("torch")
    q, k, v = (rng.standard_normal((1, 2, 5, 4)) for _ in range(3))
    mask = rng.standard_normal((5, 5))
    mask[0, 3] = -np.inf
    g = rng.standard_normal((1, 2, 5, 4))
    *_, dmask = backward(q, k, v, mask, g, causal=True)
    folded = np.where(np.tril(np.ones((5, 5), bool)), mask, -np.inf)  # causal as a float mask
    tm = torch.tensor(folded, requires_grad=True)
    out = torch.nn.functional.scaled_dot_product_attention(
        *(torch.tensor(a) for a in (q, k, v)), attn_mask=tm
    )
    out.backward(torch.tensor(g))
    np.testing.assert_allclose(dmask, tm.grad.numpy(), rtol=1e-10, atol=1e-12)
    assert (dmask[np.triu_indices(5, 1)] == 0).all() and dmask[0, 3] == 0


OPTIONS = [
    dict(softcap=2.0),
    dict(alibi_slopes=np.array([0.5, 0.25, 0.125])),
    dict(sinks=np.array([0.3, -1.0, 2.0])),
    dict(window=(2, 1)),
    dict(causal="lower_right", window=(1, None)),
    dict(kv_len=np.array([5, 2])),
    dict(dropout_p=0.3, seed=11),
    dict(softcap=1.5, alibi_slopes=np.array([0.5, 0.25, 0.125]), sinks=np.zeros(3), causal=True),
]


@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: "+".join(kw))
def test_mask_grad_by_central_differences(kw, rng):
    q = rng.standard_normal((2, 3, 4, 5))
    k = rng.standard_normal((2, 3, 6, 5))
    v = rng.standard_normal((2, 3, 6, 3))
    mask = rng.standard_normal((3, 4, 6))
    g = rng.standard_normal((2, 3, 4, 3))
    *_, dmask = backward(q, k, v, mask, g, **kw)

    def loss(m):
        return float(np.sum(ref.attention(q, k, v, mask=m, **kw) * g))

    h = 1e-6
    numeric = np.zeros_like(mask)
    for idx in np.ndindex(mask.shape):
        up, down = mask.copy(), mask.copy()
        up[idx] += h
        down[idx] -= h
        numeric[idx] = (loss(up) - loss(down)) / (2 * h)
    np.testing.assert_allclose(dmask, numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mask_grad_in_the_masks_dtype(dtype, rng):
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        dtype = ml_dtypes.bfloat16
    q, k, v = (rng.standard_normal((2, 16, 8)).astype(np.float32) for _ in range(3))
    mask = rng.standard_normal((16, 16)).astype(dtype)
    g = rng.standard_normal((2, 16, 8)).astype(np.float32)
    *_, dmask = backward(q, k, v, mask, g)
    assert dmask.dtype == np.dtype(dtype)
    *_, want = backward(*(a.astype(np.float64) for a in (q, k, v)), mask.astype(np.float64), g)
    tol = 1e-5 if dtype == "float32" else 2**-7
    np.testing.assert_allclose(
        dmask.astype(np.float64), want, rtol=tol, atol=tol * np.abs(want).max()
    )


def test_needs_selects_the_gradients(rng):
    q, k, v = (rng.standard_normal((3, 5, 4)) for _ in range(3))
    mask = rng.standard_normal((5, 5))
    g = rng.standard_normal((3, 5, 4))
    dq, dk, dv, dmask = backward(q, k, v, mask, g)
    only = backward(q, k, v, mask, g, needs=("mask",))
    assert only[:3] == (None, None, None)
    np.testing.assert_array_equal(only[3], dmask)
    part = backward(q, k, v, mask, g, needs=("q", "v"))
    assert len(part) == 3 and part[1] is None
    np.testing.assert_array_equal(part[0], dq)
    np.testing.assert_array_equal(part[2], dv)
    sinks = np.array([0.5, 1.0, -2.0])
    with_sinks = backward(q, k, v, mask, g, sinks=sinks)
    assert len(with_sinks) == 5 and with_sinks[3].shape == (3,) and with_sinks[4].shape == (5, 5)
    bufs = (None, None, None, np.empty((5, 5)))
    o, lse = mn.attention(q, k, v, mask=mask, return_lse=True)
    got = mn.attention_backward(q, k, v, o, lse, g, mask=mask, needs=ALL, grads_out=bufs)
    assert got[3] is bufs[3]
    np.testing.assert_array_equal(bufs[3], dmask)


@pytest.mark.parametrize(
    "mask,needs,error,match",
    [
        (None, ALL, ValueError, "needs 'mask' but no mask is given"),
        (np.ones((4, 4), bool), ALL, ValueError, "a boolean or integer mask has none"),
        (np.ones((4, 4), np.int32), ALL, ValueError, "a boolean or integer mask has none"),
        (np.zeros((4, 4)), ("q", "dmask"), ValueError, r"needs names \['dmask'\]"),
        (np.zeros((4, 4)), "mask", TypeError, "needs must be a collection"),
    ],
)
def test_bad_needs(mask, needs, error, match, rng):
    q, k, v = (rng.standard_normal((4, 3)) for _ in range(3))
    o, lse = mn.attention(q, k, v, mask=mask, return_lse=True)
    with pytest.raises(error, match=match):
        mn.attention_backward(q, k, v, o, lse, np.ones_like(o), mask=mask, needs=needs)
