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


def _unaligned(a):
    """A copy of ``a`` whose data start one byte past an aligned address (as an unpickled
    array may: dask.distributed sends arrays in byte frames)."""
    buf = np.zeros(a.nbytes + 1, np.uint8)
    out = buf[1:].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _spec_ids(specs):
    return [s.name for s in specs]


def _specs():
    from test_bad_input_matrix import SPECS

    return SPECS


@pytest.mark.parametrize("spec", _specs(), ids=_spec_ids(_specs()))
def test_unaligned_arrays(spec):
    """UBSan (the sanitizer run over the Dask LocalCluster test): int64 labels were loaded from a
    misaligned address.  Inputs that are not aligned to their item size are now read from an
    aligned copy (the same results, bit for bit); arrays updated in place (params, optimizer
    state) must be aligned, or a ValueError says so (a copy would lose the update)."""
    args = spec.make()
    want = spec.call(spec.make())
    written = {"param", "exp_avg", "exp_avg_sq", "momentum_buffer", "p0", "p1"}
    if spec.name.endswith(".step"):  # the optimizer holds its params already: only grads vary
        written = {"p0", "p1"}
        args = {k: v for k, v in args.items() if k not in written}
    bad = {k: _unaligned(v) for k, v in args.items() if isinstance(v, np.ndarray) and v.nbytes}
    if written & bad.keys():  # a param or state buffer: refused
        with pytest.raises(ValueError, match="not aligned"):
            spec.call({**args, **bad})
        bad = {k: v for k, v in bad.items() if k not in written}
    assert all(not v.flags.aligned for v in bad.values())
    got = spec.call({**args, **bad})
    if hasattr(want, "x"):  # gradient_descent's result
        want, got = want.x, got.x
    if isinstance(want, tuple):
        for a, b in zip(want, got, strict=True):
            np.testing.assert_array_equal(a, b)
    elif isinstance(want, np.ndarray) or np.isscalar(want):
        np.testing.assert_array_equal(want, got)


def test_unaligned_out_goes_through_a_temporary():
    x = np.random.default_rng(1).standard_normal((4, 9)).astype(np.float32)
    out = _unaligned(np.zeros((4, 9), np.float32))
    assert mn.softmax(x, out=out) is out
    np.testing.assert_array_equal(out, mn.softmax(x))
    c = _unaligned(np.zeros((4, 4), np.float32))
    mn.matmul(x, x.T, out=c)
    np.testing.assert_array_equal(c, mn.matmul(x, x.T))


@pytest.mark.parametrize("algorithm", ["auto", "direct", "winograd", "winograd_f2", "winograd_f4"])
@pytest.mark.parametrize("shape,k", [((0, 2, 3, 4), 2), ((0, 2, 8, 8), 2), ((3, 2, 8, 8), 0)])
def test_conv2d_with_an_empty_output_runs_no_tile(algorithm, shape, k):
    """Found by the fuzzer: Winograd with an empty batch divided by zero sizing its blocks of
    tile rows (SIGFPE); an empty output now returns before any tile."""
    x, w = np.zeros(shape), np.ones((k, 2, 3, 3))
    y = mn.conv2d(x, w, np.zeros(k), padding=2, algorithm=algorithm)
    assert y.shape == (shape[0], k, shape[2] + 2, shape[3] + 2)
    gx, gw, gb = mn.conv2d_backward(x, w, np.ones_like(y), padding=2)
    assert gx.shape == x.shape and not gw.any() and not gb.any()
