"""Regression tests for findings of the atheris fuzz harness (tests/fuzz_harness.py)."""

from __future__ import annotations

import numpy as np
import pytest

import mlmath_native as mn
from mlmath_native.reference import convolution as ref_conv


def test_conv2d_empty_spatial_dimension_with_padding_is_rejected():
    """Padding used to turn an empty image into a (zero) output; PyTorch and the reference
    reject it."""
    x = np.zeros((3, 1, 0))  # (C, H, W) with W == 0
    w = np.ones((2, 3, 2, 1))
    with pytest.raises(ValueError):
        ref_conv.conv2d(x, w, padding=2)
    with pytest.raises(ValueError):
        mn.conv2d(x, w, padding=2)  # returned an array of shape (2, 4, 4)


@pytest.mark.parametrize("fn", ["attention", "attention_backward"])
def test_attention_causal_none_is_rejected_like_the_reference(fn):
    """The package took causal=None as False while the reference refused it; None could mean
    either, so both refuse it now (PyTorch's is_causal is a bool too)."""
    from mlmath_native.reference import transformer_attention as ref_att

    q = np.ones((2, 3, 4))
    out, lse = mn.attention(q, q, q, return_lse=True)
    args = (q, q, q) if fn == "attention" else (q, q, q, out, lse, np.ones_like(out))
    for module in (mn, ref_att):
        with pytest.raises(ValueError, match="causal"):
            getattr(module, fn)(*args, causal=None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_amsgrad_nan_in_the_running_max_propagates(dtype):
    """The vector max kept v where the stored max_exp_avg_sq was NaN (x86 max returns its
    second operand); torch.maximum and the reference's np.maximum give NaN."""
    from mlmath_native.reference import adam_optimizer as ref_adam

    n = 37  # a vector body and a tail
    param, grad = np.ones(n, dtype), np.full(n, 0.5, dtype)
    m, v = np.zeros(n, dtype), np.full(n, 0.01, dtype)
    vmax = np.full(n, 0.02, dtype)
    vmax[[0, 9, 36]] = np.nan
    want = ref_adam.adam_step(param, grad, m, v, step=3, lr=0.1, amsgrad=True, max_exp_avg_sq=vmax)
    mn.adam_step(param, grad, m, v, step=3, lr=0.1, max_exp_avg_sq=vmax)
    np.testing.assert_array_equal(np.isnan(param), np.isnan(want[0]))
    assert np.isnan(param[[0, 9, 36]]).all() and np.isnan(vmax[[0, 9, 36]]).all()
    np.testing.assert_allclose(param, want[0], rtol=1e-6)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attention_mask_that_went_through_pickle(kind):
    """dask.distributed pickles arrays; an unpickled mask has an equal but distinct dtype
    object, which the binding's identity check refused ("mask must be bool or q's dtype")."""
    import pickle

    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 5, 4)).astype(np.float32)
    mask = rng.random((5, 5)) > 0.3 if kind == "bool" else rng.standard_normal((5, 5))
    mask = mask.astype(np.float32) if kind == "float" else mask
    mask[:, 0] = True if kind == "bool" else 0.0
    unpickled = pickle.loads(pickle.dumps(mask))
    np.testing.assert_array_equal(
        mn.attention(q, q, q, mask=unpickled), mn.attention(q, q, q, mask=mask)
    )


@pytest.mark.parametrize("hq,hkv", [(1, 1), (4, 2)])
def test_attention_backward_with_no_features_keeps_batches_apart(hq, hkv):
    """With D = 0 (k and q without features) k's batch stride is 0 for every batch, and the
    backward took that for "k and v shared by all batches": dV summed every batch into one."""
    from mlmath_native.reference import transformer_attention as ref_att

    rng = np.random.default_rng(3)
    q, k = np.ones((2, hq, 3, 0)), np.ones((2, hkv, 4, 0))
    v, grad = rng.standard_normal((2, hkv, 4, 2)), rng.standard_normal((2, hq, 3, 2))
    out, lse = mn.attention(q, k, v, return_lse=True)
    dq, dk, dv = mn.attention_backward(q, k, v, out, lse, grad)
    want = ref_att.attention_backward(q, k, v, out, lse, grad)
    np.testing.assert_allclose(dv, want[2], rtol=1e-12, atol=1e-12)
    assert dq.shape == q.shape and dk.shape == k.shape
