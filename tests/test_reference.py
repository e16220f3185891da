"""Tests of the float64 reference oracle ``mlmath_native.reference``.

Closed-form cases first, then (where PyTorch is installed) agreement with PyTorch in
float64. The oracle is what the native kernels are compared against, so it is held
to float64 accuracy here.
"""

import ast
import itertools
import math
import pathlib
import re
import warnings

import numpy as np
import pytest

from mlmath_native.reference import adam_optimizer as ref_adam
from mlmath_native.reference import convolution as ref_conv
from mlmath_native.reference import cross_entropy as ref_ce
from mlmath_native.reference import gradient_descent as ref_gd
from mlmath_native.reference import softmax as ref_softmax
from mlmath_native.reference import transformer_attention as ref_attn

RTOL = 1e-12  # float64 vs float64
ATOL = 1e-12

AxisError = getattr(np, "exceptions", np).AxisError


def rng(seed=0):
    return np.random.default_rng(seed)


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True)


# --------------------------------------------------------------------------------------
# Package hygiene
# --------------------------------------------------------------------------------------


def test_reference_never_imports_parent_package():
    """The oracle must stay importable without the compiled core."""
    import mlmath_native.reference as ref

    for path in pathlib.Path(ref.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name}: relative import above reference/"
                assert not (node.module or "").startswith("mlmath_native"), path.name
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("mlmath_native"), path.name


# --------------------------------------------------------------------------------------
# softmax / log_softmax / logsumexp
# --------------------------------------------------------------------------------------


def test_softmax_equal_logits_uniform():
    for n in (1, 3, 8, 17):
        assert_close(ref_softmax.softmax(np.full(n, 2.5)), np.full(n, 1.0 / n))
        assert_close(ref_softmax.log_softmax(np.full(n, -7.0)), np.full(n, -np.log(n)))


@pytest.mark.parametrize("axis", [0, 1, -1, 2])
def test_softmax_rows_sum_to_one_and_shift_invariant(axis):
    x = rng(1).normal(scale=3.0, size=(4, 5, 6))
    y = ref_softmax.softmax(x, axis=axis)
    assert y.shape == x.shape and y.dtype == np.float64
    assert np.all(y > 0)
    assert_close(np.sum(y, axis=axis), np.ones(np.delete(x.shape, axis)))
    assert_close(ref_softmax.softmax(x + 123.0, axis=axis), y)
    # A per-row constant is also allowed.
    shift = rng(2).normal(size=np.delete(x.shape, axis))
    assert_close(ref_softmax.softmax(x + np.expand_dims(shift, axis), axis=axis), y)


@pytest.mark.parametrize("axis", [0, -1])
def test_log_softmax_is_log_of_softmax(axis):
    x = rng(3).normal(scale=2.0, size=(7, 9))
    assert_close(ref_softmax.log_softmax(x, axis=axis), np.log(ref_softmax.softmax(x, axis=axis)))


def test_logsumexp_matches_naive_for_moderate_values():
    x = rng(4).normal(scale=5.0, size=(6, 11))
    for axis in (0, 1, -1):
        expected = np.log(np.sum(np.exp(x), axis=axis))
        assert_close(ref_softmax.logsumexp(x, axis=axis), expected)
        kept = ref_softmax.logsumexp(x, axis=axis, keepdims=True)
        assert_close(kept, np.expand_dims(expected, axis))
    assert_close(ref_softmax.log_softmax(x), x - ref_softmax.logsumexp(x, keepdims=True))


def test_inputs_are_computed_in_float64():
    x32 = rng(5).normal(size=(3, 4)).astype(np.float32)
    assert ref_softmax.softmax(x32).dtype == np.float64
    assert_close(ref_softmax.softmax(x32), ref_softmax.softmax(x32.astype(np.float64)))
    assert ref_softmax.softmax([[1, 2, 3]]).dtype == np.float64  # ints and lists too


def test_softmax_no_overflow_for_huge_logits():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = np.array([[1e4, -1e4, 0.0], [1e4, 1e4, 1e4], [-1e4, -1e4, -1e4 + np.log(2.0)]])
        y = ref_softmax.softmax(x)
        ly = ref_softmax.log_softmax(x)
        lse = ref_softmax.logsumexp(x)
    assert_close(y[0], [1.0, 0.0, 0.0])
    assert_close(y[1], np.full(3, 1 / 3))
    assert_close(y[2], [0.25, 0.25, 0.5])
    assert_close(ly[0], [0.0, -2e4, -1e4])
    assert_close(lse, [1e4, 1e4 + np.log(3.0), -1e4 + np.log(4.0)])


def test_neg_inf_entries_get_zero_probability():
    x = np.array([[-np.inf, 0.0, 0.0], [3.0, -np.inf, -np.inf]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = ref_softmax.softmax(x)
        ly = ref_softmax.log_softmax(x)
        lse = ref_softmax.logsumexp(x)
    assert_close(y, [[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
    assert_close(ly, [[-np.inf, -np.log(2.0), -np.log(2.0)], [0.0, -np.inf, -np.inf]])
    assert_close(lse, [np.log(2.0), 3.0])


def test_special_rows_are_nan_and_isolated():
    x = np.array(
        [
            [1.0, 2.0, 3.0],
            [-np.inf, -np.inf, -np.inf],  # all -inf
            [1.0, np.inf, 2.0],  # +inf
            [1.0, np.nan, 2.0],  # NaN
            [np.inf, np.nan, -np.inf],  # NaN and +inf
            [0.5, -0.5, 0.0],
        ]
    )
    good = [0, 5]
    bad = [1, 2, 3, 4]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning leaks out
        y = ref_softmax.softmax(x)
        ly = ref_softmax.log_softmax(x)
        lse = ref_softmax.logsumexp(x)
        # The same along axis 0.
        y0 = ref_softmax.softmax(x.T, axis=0)
        lse0 = ref_softmax.logsumexp(x.T, axis=0)
    for out in (y, ly):
        assert np.all(np.isnan(out[bad]))
    assert np.array_equal(y0, y.T, equal_nan=True)
    assert_close(y[good], ref_softmax.softmax(x[good]))
    assert_close(ly[good], ref_softmax.log_softmax(x[good]))
    assert_close(lse, [lse[0], -np.inf, np.inf, np.nan, np.nan, lse[5]])
    assert_close(lse0, lse)
    assert np.all(np.isfinite(lse[good]))


def test_empty_arrays():
    for f in (ref_softmax.softmax, ref_softmax.log_softmax):
        assert f(np.zeros((0, 5))).shape == (0, 5)
        assert f(np.zeros((3, 0))).shape == (3, 0)
        assert f(np.zeros((3, 0)), axis=0).shape == (3, 0)
    assert ref_softmax.logsumexp(np.zeros((0, 5))).shape == (0,)
    assert_close(ref_softmax.logsumexp(np.zeros((3, 0))), np.full(3, -np.inf))
    assert ref_softmax.logsumexp(np.zeros((3, 0)), keepdims=True).shape == (3, 1)
    assert ref_softmax.logsumexp(np.zeros(0)) == -np.inf


def test_zero_dim_input():
    for axis in (-1, 0):
        y = ref_softmax.softmax(np.float64(4.0), axis=axis)
        assert y.shape == () and y == 1.0
        assert ref_softmax.log_softmax(-3.0, axis=axis) == 0.0
        assert ref_softmax.logsumexp(2.5, axis=axis) == 2.5
    assert np.isnan(ref_softmax.softmax(np.nan))
    for axis in (1, -2):
        with pytest.raises(AxisError):
            ref_softmax.softmax(1.0, axis=axis)


@pytest.mark.parametrize(
    "f",
    [
        ref_softmax.softmax,
        ref_softmax.log_softmax,
        ref_softmax.logsumexp,
        lambda x, axis: ref_softmax.softmax_backward(x, x, axis=axis),
        lambda x, axis: ref_softmax.log_softmax_backward(x, x, axis=axis),
    ],
)
def test_invalid_axis_raises_axis_error(f):
    x = np.ones((2, 3))
    for axis in (2, -3, 10):
        with pytest.raises(AxisError):
            f(x, axis=axis)
    with pytest.raises(ValueError):  # AxisError is a ValueError (and IndexError)
        f(x, axis=5)


def test_backward_shape_mismatch():
    with pytest.raises(ValueError, match="dy"):
        ref_softmax.softmax_backward(np.ones((2, 3)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="dy"):
        ref_softmax.log_softmax_backward(np.ones(3), np.ones(4))


def _finite_difference(f, x, h=1e-6):
    """Central differences of the scalar function f at x, one coordinate at a time."""
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        grad[idx] = (f(x + e) - f(x - e)) / (2 * h)
    return grad


@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_backward_matches_finite_differences(axis):
    r = rng(6)
    x = r.normal(size=(3, 5))
    dy = r.normal(size=(3, 5))
    y = ref_softmax.softmax(x, axis=axis)
    dx = ref_softmax.softmax_backward(y, dy, axis=axis)
    fd = _finite_difference(lambda z: np.sum(dy * ref_softmax.softmax(z, axis=axis)), x)
    assert_close(dx, fd, rtol=1e-7, atol=1e-9)
    # Gradients of softmax sum to zero along the axis (the outputs always sum to 1).
    assert_close(np.sum(dx, axis=axis), np.zeros(np.delete(x.shape, axis)), atol=1e-14)


@pytest.mark.parametrize("axis", [-1, 0])
def test_log_softmax_backward_matches_finite_differences(axis):
    r = rng(7)
    x = r.normal(size=(4, 3))
    dy = r.normal(size=(4, 3))
    y = ref_softmax.log_softmax(x, axis=axis)
    dx = ref_softmax.log_softmax_backward(y, dy, axis=axis)
    fd = _finite_difference(lambda z: np.sum(dy * ref_softmax.log_softmax(z, axis=axis)), x)
    assert_close(dx, fd, rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------------------
# cross-entropy
# --------------------------------------------------------------------------------------


def test_cross_entropy_perfect_prediction_is_zero():
    onehot = np.eye(4)
    assert ref_ce.cross_entropy_from_probs(onehot, onehot) == 0.0
    assert_close(ref_ce.cross_entropy_from_probs(onehot, onehot, reduction="none"), np.zeros(4))
    logits = np.array([[1000.0, 0.0, 0.0], [0.0, -np.inf, 1000.0]])
    loss = ref_ce.cross_entropy(logits, [0, 2], reduction="none")
    assert_close(loss, [0.0, 0.0], atol=1e-300)
    assert ref_ce.cross_entropy(logits, np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])) == 0.0


def test_cross_entropy_uniform_prediction_is_log_c():
    for c in (2, 5, 10):
        logits = np.full((3, c), 0.7)
        assert_close(ref_ce.cross_entropy(logits, [0, c - 1, 1]), np.log(c))
        assert_close(ref_ce.cross_entropy_from_probs(np.full(c, 1 / c), np.eye(c)[0]), np.log(c))
        soft = rng(c).dirichlet(np.ones(c), size=3)
        assert_close(ref_ce.cross_entropy(logits, soft, reduction="none"), np.full(3, np.log(c)))


def test_cross_entropy_closed_form_and_reductions():
    r = rng(8)
    z = r.normal(scale=2.0, size=(6, 5))
    t = r.integers(0, 5, size=6)
    per = ref_ce.cross_entropy(z, t, reduction="none")
    expected = np.log(np.sum(np.exp(z), axis=1)) - z[np.arange(6), t]  # logsumexp(z) − z_t
    assert_close(per, expected)
    assert_close(ref_ce.cross_entropy(z, t, reduction="sum"), np.sum(expected))
    assert_close(ref_ce.cross_entropy(z, t), np.mean(expected))
    # Class indices == one-hot probabilities; from logits == from softmax probabilities.
    assert_close(ref_ce.cross_entropy(z, np.eye(5)[t], reduction="none"), per)
    assert_close(
        ref_ce.cross_entropy_from_probs(ref_softmax.softmax(z), np.eye(5)[t], reduction="none"),
        per,
    )


def test_cross_entropy_class_axis():
    r = rng(9)
    z = r.normal(size=(2, 4, 3))  # classes on axis 1
    t = r.integers(0, 4, size=(2, 3))
    moved = ref_ce.cross_entropy(np.moveaxis(z, 1, -1), t, reduction="none")
    assert_close(ref_ce.cross_entropy(z, t, axis=1, reduction="none"), moved)
    soft = r.dirichlet(np.ones(4), size=(2, 3))  # (2, 3, 4)
    assert_close(
        ref_ce.cross_entropy(z, np.moveaxis(soft, -1, 1), axis=1, reduction="none"),
        ref_ce.cross_entropy(np.moveaxis(z, 1, -1), soft, reduction="none"),
    )
    # Unbatched: logits (C,), target a scalar index.
    assert_close(ref_ce.cross_entropy(z[0, :, 0], t[0, 0]), moved[0, 0])


def test_cross_entropy_zero_target_terms_vanish():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probs = np.array([0.0, 0.25, 0.75])
        target = np.array([0.0, 0.0, 1.0])
        assert_close(ref_ce.cross_entropy_from_probs(probs, target), -np.log(0.75))
        # y > 0 where ŷ = 0: infinite loss, no clipping.
        assert ref_ce.cross_entropy_from_probs(probs, [1.0, 0.0, 0.0]) == np.inf
        logits = np.array([-np.inf, 0.0, 0.0])
        assert_close(ref_ce.cross_entropy(logits, [0.0, 1.0, 0.0]), np.log(2.0))
        assert ref_ce.cross_entropy(logits, 0) == np.inf


def test_cross_entropy_bad_input():
    z = np.zeros((2, 3))
    with pytest.raises(ValueError, match="target holds 3 at position"):
        ref_ce.cross_entropy(z, [0, 3])
    with pytest.raises(ValueError, match="target holds -1"):
        ref_ce.cross_entropy(z, [-1, 0])
    with pytest.raises(ValueError, match="target has shape"):
        ref_ce.cross_entropy(z, [0, 1, 2])
    with pytest.raises(ValueError, match="target has shape"):
        ref_ce.cross_entropy(z, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="reduction"):
        ref_ce.cross_entropy(z, [0, 1], reduction="avg")
    with pytest.raises(ValueError, match="0-d"):
        ref_ce.cross_entropy(1.0, 0)
    with pytest.raises(ValueError, match="target has shape"):
        ref_ce.cross_entropy_from_probs(np.ones(3) / 3, np.ones(4) / 4)
    with pytest.raises(AxisError):
        ref_ce.cross_entropy(z, [0, 1], axis=2)


def test_cross_entropy_empty_batch():
    z = np.zeros((0, 4))
    t = np.zeros(0, dtype=np.int64)
    assert ref_ce.cross_entropy(z, t, reduction="none").shape == (0,)
    assert ref_ce.cross_entropy(z, t, reduction="sum") == 0.0
    assert np.isnan(ref_ce.cross_entropy(z, t, reduction="mean"))


def test_cross_entropy_options_perfect_prediction_is_zero():
    # A confident correct prediction: zero loss and (numerically) zero gradient, whatever
    # the weights and the ignored samples (label smoothing would move the optimum).
    w = np.array([0.5, 2.0, 1.5])
    logits = np.array([[1000.0, 0.0, 0.0], [0.0, -np.inf, 1000.0], [5.0, 1.0, 2.0]])
    t = np.array([0, 2, -100])
    probs = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    for reduction in ("mean", "sum"):
        assert ref_ce.cross_entropy(logits, t, weight=w, reduction=reduction) == 0.0
        grad = ref_ce.cross_entropy_grad(logits, t, weight=w, reduction=reduction)
        assert_close(grad, np.zeros((3, 3)), atol=1e-300)
        loss = ref_ce.cross_entropy(logits[:2], probs[:2], weight=w, reduction=reduction)
        assert loss == 0.0
    loss = ref_ce.cross_entropy(logits, t, ignore_index=-100, reduction="none")
    assert np.array_equal(loss, np.zeros(3))
    assert not np.signbit(loss[2])  # an ignored sample is +0.0


@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_cross_entropy_options_uniform_prediction_is_log_c(eps):
    r = rng(40)
    for c in (1, 2, 7):
        logits = np.full((5, c), -0.3)
        t = r.integers(0, c, size=5)
        t[1] = -100
        y = r.dirichlet(np.ones(c), size=5)
        # No weight: every sample costs log C, however it is smoothed or normalised.
        assert_close(ref_ce.cross_entropy(logits, t, label_smoothing=eps), np.log(c))
        assert_close(ref_ce.cross_entropy(logits, y, label_smoothing=eps), np.log(c))
        # Weights: L_n = log C · ((1 − ε) w[t_n] + ε · mean(w)), 0 where ignored ...
        w = r.uniform(0.5, 2.0, size=c)
        per = ref_ce.cross_entropy(logits, t, weight=w, label_smoothing=eps, reduction="none")
        w_t = np.where(t == -100, 0.0, w[np.where(t == -100, 0, t)])
        expected = np.log(c) * ((1 - eps) * w_t + eps * np.mean(w))
        expected[1] = 0.0
        assert_close(per, expected)
        mean = ref_ce.cross_entropy(logits, t, weight=w, label_smoothing=eps)
        assert_close(mean, np.sum(expected) / np.sum(w_t))
        # ... and L_n = log C · Σ_c w_c y'_c for probabilities, averaged over N.
        yp = (1 - eps) * y + eps / c
        per = ref_ce.cross_entropy(logits, y, weight=w, label_smoothing=eps, reduction="none")
        assert_close(per, np.log(c) * yp @ w)
        assert_close(ref_ce.cross_entropy(logits, y, weight=w, label_smoothing=eps), np.mean(per))


def test_cross_entropy_index_and_one_hot_agree_with_options():
    # Unweighted, the two target kinds are the same loss: y = onehot(t), smoothed alike.
    r = rng(41)
    z = r.normal(scale=2.0, size=(6, 5))
    t = r.integers(0, 5, size=6)
    for eps in (0.0, 0.3):
        for reduction in ("none", "mean", "sum"):
            kw = {"label_smoothing": eps, "reduction": reduction}
            assert_close(
                ref_ce.cross_entropy(z, t, **kw), ref_ce.cross_entropy(z, np.eye(5)[t], **kw)
            )
            assert_close(
                ref_ce.cross_entropy_grad(z, t, **kw),
                ref_ce.cross_entropy_grad(z, np.eye(5)[t], **kw),
            )


def test_cross_entropy_all_ignored_and_empty():
    z = rng(42).normal(size=(3, 4))
    z[1, 0] = np.nan  # an ignored sample's logits do not matter
    t = np.full(3, 2)
    w = np.array([1.0, 2.0, 3.0, 4.0])
    for kw in ({}, {"weight": w, "label_smoothing": 0.2}):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # 0 / 0 is silent
            assert np.isnan(ref_ce.cross_entropy(z, t, ignore_index=2, **kw))
            assert ref_ce.cross_entropy(z, t, ignore_index=2, reduction="sum", **kw) == 0.0
            none = ref_ce.cross_entropy(z, t, ignore_index=2, reduction="none", **kw)
            for reduction in ("none", "mean", "sum"):
                grad = ref_ce.cross_entropy_grad(z, t, ignore_index=2, reduction=reduction, **kw)
                assert np.array_equal(grad, np.zeros((3, 4)))  # as PyTorch's autograd
        assert np.array_equal(none, np.zeros(3))
        # Unbatched: one ignored sample.
        assert np.isnan(ref_ce.cross_entropy(z[0], np.int64(-100), **kw))
    # Empty batches, both target kinds, both layouts.
    for z, t, axis in (
        (np.zeros((0, 4)), np.zeros(0, dtype=np.int64), -1),
        (np.zeros((2, 4, 0)), np.zeros((2, 0), dtype=np.int64), 1),
    ):
        y = np.zeros(z.shape)
        for target in (t, y):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert np.isnan(ref_ce.cross_entropy(z, target, axis=axis, label_smoothing=0.1))
                assert ref_ce.cross_entropy(z, target, axis=axis, reduction="sum") == 0.0
                none = ref_ce.cross_entropy(z, target, axis=axis, reduction="none")
                assert none.shape == t.shape and none.dtype == np.float64
                grad = ref_ce.cross_entropy_grad(z, target, axis=axis, weight=np.ones(4))
                assert grad.shape == z.shape and grad.dtype == np.float64


@pytest.mark.parametrize(
    "case",
    [
        # (target kind, axis, reduction, options)
        ("index", -1, "mean", {"weight": [0.5, 1.0, 2.0, 1.5, 0.7], "label_smoothing": 0.2}),
        ("index", 0, "none", {"ignore_index": 2, "label_smoothing": 0.1}),
        ("index", -1, "sum", {"weight": [0.5, 1.0, 2.0, 1.5, 0.7], "label_smoothing": 1.0}),
        ("prob", -1, "mean", {"weight": [0.5, 1.0, 2.0, 1.5, 0.7], "label_smoothing": 0.3}),
        ("prob", 0, "none", {}),
        ("prob", -1, "sum", {"label_smoothing": 0.5, "ignore_index": -7}),
    ],
)
def test_cross_entropy_grad_matches_finite_differences(case):
    kind, axis, reduction, kw = case
    r = rng(43)
    z = r.normal(size=(3, 5))  # 5 classes along `axis` (the other axis has 3 samples)
    if axis == 0:
        z = z.T.copy()
    if kind == "index":
        target = np.array([4, -100, 1]) if "ignore_index" not in kw else np.array([2, 0, 3])
    else:
        target = np.moveaxis(r.dirichlet(np.ones(5), size=3), -1, axis)
    g = r.normal(size=3) if reduction == "none" else np.float64(1.3)
    kw = dict(kw, axis=axis, reduction=reduction)

    def f(x):  # the scalar Σ_n g_n L_n whose gradient is cross_entropy_grad
        return np.sum(g * ref_ce.cross_entropy(x, target, **kw))

    grad = ref_ce.cross_entropy_grad(z, target, grad_output=g, **kw)
    assert_close(grad, _finite_difference(f, z), rtol=1e-7, atol=1e-9)
    # Each sample's gradient sums to 0 over the classes (Σ_j p_j S − q_j = S − S).
    assert_close(np.sum(grad, axis=axis), np.zeros(3), atol=1e-14)


def test_cross_entropy_options_bad_input():
    z = np.zeros((4, 10))
    t = np.array([0, 1, 2, 12])
    msg = "cross_entropy: target holds 12 at position (3,) but there are 10 classes"
    with pytest.raises(ValueError, match=re.escape(msg)):
        ref_ce.cross_entropy(z, t)
    with pytest.raises(ValueError, match=re.escape("cross_entropy_grad: target holds 12")):
        ref_ce.cross_entropy_grad(z, t)
    ref_ce.cross_entropy(z, t, ignore_index=12)  # the ignored value may lie outside [0, C)
    with pytest.raises(ValueError, match=re.escape("target holds -100 at position (0,)")):
        ref_ce.cross_entropy(z, [-100, 0, 1, 2], ignore_index=-1)
    z3 = np.zeros((2, 10, 3))  # classes on axis 1
    t3 = np.zeros((2, 3), dtype=np.int64)
    t3[1, 2] = 10
    with pytest.raises(ValueError, match=re.escape("target holds 10 at position (1, 2)")):
        ref_ce.cross_entropy(z3, t3, axis=1)
    with pytest.raises(ValueError, match=re.escape("target holds 10 at position ()")):
        ref_ce.cross_entropy(z[0], 10)
    for f in (ref_ce.cross_entropy, ref_ce.cross_entropy_grad):
        name = f.__name__
        with pytest.raises(ValueError, match=f"{name}: target has shape"):
            f(z, [0, 1, 2])
        with pytest.raises(ValueError, match=f"{name}: target has shape"):
            f(z3, t3, axis=-1)
        with pytest.raises(ValueError, match=f"{name}: target has shape"):
            f(z, np.zeros((4, 9)))
        for weight in (np.ones(9), np.ones((1, 10)), 1.0):
            with pytest.raises(ValueError, match=re.escape(f"{name}: weight has shape")):
                f(z, t[:3], weight=weight)
        for eps in (-0.1, 1.5, np.nan):
            with pytest.raises(ValueError, match=f"{name}: label_smoothing is out of range"):
                f(z, t[:3].tolist() + [0], label_smoothing=eps)
        with pytest.raises(ValueError, match=f"{name}: reduction is invalid"):
            f(z, [0, 1, 2, 3], reduction="avg")
        for bad_target in (np.zeros(4, dtype=bool), np.zeros(4, dtype=complex)):
            with pytest.raises(TypeError, match=f"{name}: target has dtype"):
                f(z, bad_target)
        with pytest.raises(TypeError):
            f(z, [0, 1, 2, 3], ignore_index=1.5)
        with pytest.raises(ValueError, match=f"{name}: ignore_index is not supported"):
            f(z, np.full(z.shape, 0.1), ignore_index=0)  # as in PyTorch
        with pytest.raises(AxisError):
            f(z, [0, 1, 2, 3], axis=2)
    grad = ref_ce.cross_entropy_grad
    with pytest.raises(ValueError, match=r"cross_entropy_grad: grad_output has shape \(3,\)"):
        grad(z, [0, 1, 2, 3], reduction="none", grad_output=np.ones(3))
    with pytest.raises(ValueError, match=r"cross_entropy_grad: grad_output has shape \(4,\)"):
        grad(z, [0, 1, 2, 3], reduction="mean", grad_output=np.ones(4))
    with pytest.raises(ValueError, match=r"grad_output has shape \(1,\)"):
        grad(z, [0, 1, 2, 3], reduction="sum", grad_output=[1.0])
    # A scalar grad_output is fine for "none" (it scales every sample).
    assert_close(
        grad(z, [0, 1, 2, 3], reduction="none", grad_output=2.0),
        2.0 * grad(z, [0, 1, 2, 3], reduction="none"),
    )


# --------------------------------------------------------------------------------------
# gradient descent
# --------------------------------------------------------------------------------------


def test_gradient_descent_single_step_matches_formula():
    r = rng(10)
    theta, grad = r.normal(size=5), r.normal(size=5)
    out = ref_gd.gradient_descent_step(theta, grad, lr=0.3)
    assert_close(out, theta - 0.3 * grad)
    assert out is not theta
    theta_copy = theta.copy()
    ref_gd.gradient_descent(lambda th: grad, theta, lr=0.1, num_steps=3)
    assert np.array_equal(theta, theta_copy)  # inputs are not modified


def test_gradient_descent_reaches_quadratic_minimum():
    r = rng(11)
    b = r.normal(size=(4, 4))
    a = b @ b.T + 4 * np.eye(4)  # symmetric positive definite
    c = r.normal(size=4)

    def grad_fn(theta):  # ∇ ½ (θ − c)ᵀ A (θ − c) = A (θ − c)
        return a @ (theta - c)

    lr = 1.0 / np.linalg.eigvalsh(a).max()
    theta = ref_gd.gradient_descent(grad_fn, np.zeros(4), lr=lr, num_steps=2000)
    assert_close(theta, c, rtol=0, atol=1e-10)


def test_gradient_descent_tol_and_history():
    c = np.array([1.0, -2.0])
    theta, hist = ref_gd.gradient_descent(
        lambda th: th - c, np.zeros(2), lr=0.5, num_steps=1000, tol=1e-8, return_history=True
    )
    k = len(hist) - 1
    assert 0 < k < 1000
    assert hist.shape == (k + 1, 2)
    assert np.array_equal(hist[0], [0.0, 0.0]) and np.array_equal(hist[-1], theta)
    assert np.linalg.norm(theta - c) <= 1e-8
    assert_close(hist[1], ref_gd.gradient_descent_step(hist[0], hist[0] - c, 0.5))
    _, hist = ref_gd.gradient_descent(lambda th: th - c, c, 0.5, 5, return_history=True)
    assert hist.shape == (6, 2)  # without tol, all steps run


def test_gradient_descent_bad_input():
    with pytest.raises(ValueError, match="lr"):
        ref_gd.gradient_descent_step([1.0], [1.0], lr=-1.0)
    with pytest.raises(ValueError, match="grad"):
        ref_gd.gradient_descent_step([1.0, 2.0], [1.0], lr=0.1)
    with pytest.raises(ValueError, match="num_steps"):
        ref_gd.gradient_descent(lambda th: th, [1.0], lr=0.1, num_steps=-1)
    with pytest.raises(ValueError, match="grad_fn"):
        ref_gd.gradient_descent(lambda th: np.ones(3), [1.0], lr=0.1, num_steps=1)


# --------------------------------------------------------------------------------------
# SGD (torch.optim.SGD's options)
# --------------------------------------------------------------------------------------


def test_sgd_plain_step_is_gradient_descent():
    r = rng(50)
    p, g = r.normal(size=7), r.normal(size=7)
    p_copy, g_copy = p.copy(), g.copy()
    new, buf = ref_gd.sgd_step(p, g, lr=0.3)
    assert buf is None
    assert_close(new, p - 0.3 * g)
    assert_close(new, ref_gd.gradient_descent_step(p, g, lr=0.3))
    new, buf = ref_gd.sgd_step(p, g, lr=0.3, maximize=True)
    assert buf is None
    assert_close(new, p + 0.3 * g)  # maximize ascends
    new, _ = ref_gd.sgd_step(p, g, lr=0.3, weight_decay=0.1)
    assert_close(new, p - 0.3 * (g + 0.1 * p))
    # Without momentum a buffer passed in is ignored, and None comes back.
    new, buf = ref_gd.sgd_step(p, g, np.ones(7), lr=0.3, dampening=0.5)
    assert buf is None and np.array_equal(new, ref_gd.sgd_step(p, g, lr=0.3)[0])
    assert np.array_equal(p, p_copy) and np.array_equal(g, g_copy)  # inputs untouched


@pytest.mark.parametrize("dampening", [0.0, 0.5])
def test_sgd_first_momentum_step_copies_gradient(dampening):
    r = rng(51)
    p, g = r.normal(size=7), r.normal(size=7)
    new, buf = ref_gd.sgd_step(p, g, lr=0.1, momentum=0.9, dampening=dampening)
    assert np.array_equal(buf, g) and buf is not g  # a copy, not damped
    assert_close(new, p - 0.1 * g)
    # With weight decay the buffer starts as the decayed gradient.
    new, buf = ref_gd.sgd_step(p, g, lr=0.1, momentum=0.9, dampening=dampening, weight_decay=0.2)
    assert_close(buf, g + 0.2 * p)
    assert_close(new, p - 0.1 * (g + 0.2 * p))
    # Second step: b = μ b + (1 − τ) g.
    g2 = r.normal(size=7)
    new2, buf2 = ref_gd.sgd_step(
        new, g2, buf, lr=0.1, momentum=0.9, dampening=dampening, weight_decay=0.2
    )
    d2 = g2 + 0.2 * new
    assert_close(buf2, 0.9 * buf + (1 - dampening) * d2)
    assert_close(new2, new - 0.1 * buf2)


def test_sgd_nesterov_closed_form():
    r = rng(52)
    p, g1, g2 = r.normal(size=(3, 7))
    p1, b1 = ref_gd.sgd_step(p, g1, lr=0.1, momentum=0.9, nesterov=True)
    assert_close(b1, g1)
    assert_close(p1, p - 0.1 * (1 + 0.9) * g1)  # d = g + μ b with b = g
    p2, b2 = ref_gd.sgd_step(p1, g2, b1, lr=0.1, momentum=0.9, nesterov=True)
    assert_close(b2, 0.9 * g1 + g2)
    assert_close(p2, p1 - 0.1 * (g2 + 0.9 * b2))


def test_sgd_bad_input():
    z = np.zeros(3)
    with pytest.raises(ValueError, match="lr"):
        ref_gd.sgd_step(z, z, lr=-0.1)
    with pytest.raises(ValueError, match="lr"):
        ref_gd.sgd_step(z, z, lr=np.nan)
    with pytest.raises(ValueError, match="momentum is invalid"):
        ref_gd.sgd_step(z, z, lr=0.1, momentum=-0.5)
    with pytest.raises(ValueError, match="weight_decay"):
        ref_gd.sgd_step(z, z, lr=0.1, weight_decay=-1e-4)
    with pytest.raises(ValueError, match="nesterov"):
        ref_gd.sgd_step(z, z, lr=0.1, nesterov=True)  # no momentum
    with pytest.raises(ValueError, match="nesterov"):
        ref_gd.sgd_step(z, z, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match="grad has shape"):
        ref_gd.sgd_step(z, np.zeros(4), lr=0.1)
    with pytest.raises(ValueError, match="momentum_buffer has shape"):
        ref_gd.sgd_step(z, z, np.zeros(2), lr=0.1, momentum=0.9)
    with pytest.raises(TypeError):
        ref_gd.sgd_step(z, z)  # lr is required, as in torch.optim.SGD


# --------------------------------------------------------------------------------------
# Adam
# --------------------------------------------------------------------------------------


def _adam(p, g, m, v, step, **kw):
    """``ref_adam.adam_step`` with the positional state, for short test lines."""
    return ref_adam.adam_step(p, g, m, v, step=step, **kw)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_adam_first_step_moves_by_lr_against_gradient(maximize, amsgrad):
    r = rng(12)
    theta = r.normal(size=6)
    grad = r.normal(size=6) * np.array([1e-3, 1e-1, 1.0, 10.0, 1e3, -5.0])
    lr = 0.01
    z = np.zeros(6)
    new, m, v, vmax = _adam(theta, grad, z, z, 1, lr=lr, maximize=maximize, amsgrad=amsgrad)
    sign = 1.0 if maximize else -1.0  # maximize moves along the gradient
    assert_close(new - theta, sign * lr * np.sign(grad), rtol=1e-4, atol=0)
    assert_close(m, -sign * 0.1 * grad)
    assert_close(v, 0.001 * grad**2)
    if amsgrad:
        assert np.array_equal(vmax, v)  # max(0, v) = v
    else:
        assert vmax is None


def test_adam_step_matches_formula():
    r = rng(13)
    theta, g, m, v, vmax = r.normal(size=(5, 7))
    v, vmax = np.abs(v), np.abs(vmax)
    inputs = [a.copy() for a in (theta, g, m, v, vmax)]
    t, lr, b1, b2, eps, wd = 3, 0.05, 0.8, 0.99, 1e-6, 0.1
    kw = dict(lr=lr, beta1=b1, beta2=b2, eps=eps)
    new, m_new, v_new, vmax_new = _adam(theta, g, m, v, t, **kw)
    m_exp = b1 * m + (1 - b1) * g
    v_exp = b2 * v + (1 - b2) * g**2
    theta_exp = theta - lr * (m_exp / (1 - b1**t)) / (np.sqrt(v_exp / (1 - b2**t)) + eps)
    assert_close(m_new, m_exp)
    assert_close(v_new, v_exp)
    assert_close(new, theta_exp)
    assert vmax_new is None

    # Adam's weight decay is an L2 penalty: the same as the gradient g + λθ.
    out = _adam(theta, g, m, v, t, weight_decay=wd, **kw)
    for a, b in zip(out[:3], _adam(theta, g + wd * theta, m, v, t, **kw)[:3], strict=True):
        assert_close(a, b)
    # AdamW's decay is decoupled: shrink θ, then the plain Adam step from there.
    out = _adam(theta, g, m, v, t, weight_decay=wd, decoupled_weight_decay=True, **kw)
    assert_close(out[0], theta * (1 - lr * wd) + (new - theta))
    assert_close(out[1], m_exp)
    assert_close(out[2], v_exp)
    # AMSGrad divides by the running maximum of v.
    out = _adam(theta, g, m, v, t, amsgrad=True, max_exp_avg_sq=vmax, **kw)
    vmax_exp = np.maximum(vmax, v_exp)
    assert_close(out[3], vmax_exp)
    assert_close(
        out[0], theta - lr * (m_exp / (1 - b1**t)) / (np.sqrt(vmax_exp / (1 - b2**t)) + eps)
    )
    for a, b in zip((theta, g, m, v, vmax), inputs, strict=True):
        assert np.array_equal(a, b)  # inputs are not modified


def test_adamw_zero_gradient_shrinks_params():
    r = rng(14)
    theta, z = r.normal(size=7), np.zeros(7)
    lr, wd = 0.1, 0.01
    for t in (1, 2, 10):
        for amsgrad in (False, True):
            new, m, v, _ = _adam(
                theta,
                z,
                z,
                z,
                t,
                lr=lr,
                weight_decay=wd,
                decoupled_weight_decay=True,
                amsgrad=amsgrad,
            )
            assert_close(new, theta * (1 - lr * wd))
            assert np.array_equal(m, z) and np.array_equal(v, z)
    # Adam's L2 decay instead feeds λθ through the moments: a step of about lr.
    new, *_ = _adam(theta, z, z, z, 1, lr=lr, weight_decay=wd)
    assert_close(new - theta, -lr * np.sign(theta), rtol=1e-4, atol=0)


def test_adam_minimize_reaches_minimum():
    c = np.array([3.0, -1.0, 0.5])
    theta, hist = ref_adam.adam_minimize(
        lambda th: th - c, np.zeros(3), num_steps=2000, lr=0.05, return_history=True
    )
    assert hist.shape == (2001, 3)
    assert_close(theta, c, rtol=0, atol=1e-6)
    theta = ref_adam.adam_minimize(lambda th: th - c, np.zeros(3), 2000, lr=0.05, amsgrad=True)
    assert_close(theta, c, rtol=0, atol=1e-6)


def test_adam_bad_input():
    z = np.zeros(3)
    with pytest.raises(ValueError, match="step is invalid"):
        _adam(z, z, z, z, 0)
    with pytest.raises(ValueError, match="step is invalid"):
        _adam(z, z, z, z, 1.5)
    with pytest.raises(ValueError, match="beta1"):
        _adam(z, z, z, z, 1, beta1=1.0)
    with pytest.raises(ValueError, match="beta2"):
        _adam(z, z, z, z, 1, beta2=-0.1)
    with pytest.raises(ValueError, match="lr"):
        _adam(z, z, z, z, 1, lr=np.nan)
    with pytest.raises(ValueError, match="lr"):
        _adam(z, z, z, z, 1, lr=-1e-3)
    with pytest.raises(ValueError, match="eps"):
        _adam(z, z, z, z, 1, eps=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        _adam(z, z, z, z, 1, weight_decay=-0.01, decoupled_weight_decay=True)
    with pytest.raises(ValueError, match="exp_avg_sq has shape"):
        _adam(z, z, z, np.zeros(2), 1)
    with pytest.raises(ValueError, match="max_exp_avg_sq has shape"):
        _adam(z, z, z, z, 2, amsgrad=True, max_exp_avg_sq=np.zeros(4))
    with pytest.raises(TypeError):
        ref_adam.adam_step(z, z, z, z, 1)  # the old positional t: step is keyword-only


# --------------------------------------------------------------------------------------
# convolution
# --------------------------------------------------------------------------------------


def test_correlate2d_delta_kernel_is_identity_on_valid_region():
    image = rng(14).normal(size=(6, 7))
    delta = np.zeros((3, 3))
    delta[1, 1] = 1.0
    assert np.array_equal(ref_conv.correlate2d_valid(image, delta), image[1:-1, 1:-1])
    corner = np.zeros((2, 4))
    corner[0, 0] = 1.0  # picks I(i, j): no flip (cross-correlation)
    assert np.array_equal(ref_conv.correlate2d_valid(image, corner), image[:5, :4])
    assert np.array_equal(ref_conv.correlate2d_valid(image, [[1.0]]), image)


def test_correlate2d_matches_explicit_sum():
    r = rng(15)
    image, kernel = r.normal(size=(5, 6)), r.normal(size=(2, 3))
    out = ref_conv.correlate2d_valid(image, kernel)
    assert out.shape == (4, 4)
    i, j = 2, 1
    expected = sum(image[i + m, j + n] * kernel[m, n] for m in range(2) for n in range(3))
    assert_close(out[i, j], expected)


def test_correlate2d_matches_scipy():
    signal = pytest.importorskip("scipy.signal")
    r = rng(16)
    for ishape, kshape in [((8, 9), (3, 3)), ((5, 12), (5, 1)), ((4, 4), (4, 4))]:
        image, kernel = r.normal(size=ishape), r.normal(size=kshape)
        assert_close(
            ref_conv.correlate2d_valid(image, kernel),
            signal.correlate2d(image, kernel, mode="valid"),
        )


def test_correlate2d_bad_input():
    with pytest.raises(ValueError, match="kernel has shape"):
        ref_conv.correlate2d_valid(np.ones((3, 3)), np.ones((4, 1)))
    with pytest.raises(ValueError, match="image has 1 dimensions"):
        ref_conv.correlate2d_valid(np.ones(3), np.ones((1, 1)))


def _naive_conv2d(x_pad, w, stride=(1, 1), dilation=(1, 1), groups=1):
    """conv2d by its definition, one output at a time, on an already padded input."""
    n, _, hp, wp = x_pad.shape
    k, c_g, r, s = w.shape
    (sh, sw), (dh, dw) = stride, dilation
    out = np.zeros((n, k, (hp - dh * (r - 1) - 1) // sh + 1, (wp - dw * (s - 1) - 1) // sw + 1))
    for b, kk, i, j in np.ndindex(out.shape):
        g = kk // (k // groups)  # the group of output channel kk
        rows = slice(i * sh, i * sh + dh * (r - 1) + 1, dh)
        cols = slice(j * sw, j * sw + dw * (s - 1) + 1, dw)
        out[b, kk, i, j] = np.sum(x_pad[b, g * c_g : (g + 1) * c_g, rows, cols] * w[kk])
    return out


def _tf_same_pads(n, r, s, d):
    """(before, after) for TensorFlow's "SAME": n_out = ceil(n / s), the odd pixel after."""
    n_out = math.ceil(n / s)
    total = max((n_out - 1) * s + (r - 1) * d + 1 - n, 0)
    return total // 2, total - total // 2


_NP_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def test_conv2d_delta_kernel_with_padding_is_identity():
    x = rng(17).normal(size=(2, 3, 5, 6))
    w = np.zeros((3, 3, 3, 3))  # output channel k copies input channel k
    for ch in range(3):
        w[ch, ch, 1, 1] = 1.0
    assert np.array_equal(ref_conv.conv2d(x, w, padding=1), x)
    w5 = np.zeros((3, 3, 5, 5))
    for ch in range(3):
        w5[ch, ch, 2, 2] = 1.0
    assert np.array_equal(ref_conv.conv2d(x, w5, padding=(2, 2)), x)
    # "same" keeps a delta at ((R − 1) // 2, (S − 1) // 2) the identity, dilated or not,
    # whatever the padding holds; depthwise (groups == C) with one tap per channel too.
    for (kr, ks), dilation in [((4, 2), 1), ((3, 2), (2, 1)), ((3, 3), 2), ((1, 5), (3, 1))]:
        delta = np.zeros((3, 1, kr, ks))
        delta[:, 0, (kr - 1) // 2, (ks - 1) // 2] = 1.0
        for mode in ("zeros", "reflect", "replicate", "circular"):
            kw = dict(padding="same", dilation=dilation, groups=3, padding_mode=mode)
            assert np.array_equal(ref_conv.conv2d(x, delta, **kw), x), (kr, ks, mode)
    # A delta at the corner picks x[i·sh, j·sw]: no flip, and stride subsamples.
    corner = np.zeros((3, 1, 2, 2))
    corner[:, 0, 0, 0] = 1.0
    assert np.array_equal(ref_conv.conv2d(x, corner, stride=(2, 3), groups=3), x[:, :, :4:2, :5:3])


def test_conv2d_ones_kernel_gives_box_sums():
    x = rng(19).normal(size=(2, 4, 6, 7))
    out = ref_conv.conv2d(x, np.ones((1, 4, 3, 2)))
    expected = np.zeros((2, 1, 4, 6))
    for i, j in np.ndindex(4, 6):
        expected[:, 0, i, j] = np.sum(x[:, :, i : i + 3, j : j + 2], axis=(1, 2, 3))
    assert_close(out, expected)
    # Dilated: the box is every dh-th row and dw-th column.
    out = ref_conv.conv2d(x, np.ones((1, 4, 2, 3)), dilation=(3, 2))
    assert out.shape == (2, 1, 3, 3)
    assert_close(out[:, 0, 1, 2], np.sum(x[:, :, 1:5:3, 2:7:2], axis=(1, 2, 3)))
    # Groups of 2 channels: each output channel sums its own group's channels only.
    out = ref_conv.conv2d(x, np.ones((2, 2, 1, 1)), groups=2)
    assert_close(out, np.stack([x[:, 0] + x[:, 1], x[:, 2] + x[:, 3]], axis=1))
    # Ones input, zero padding: each output counts the kernel taps inside the input.
    count = ref_conv.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 3, 3)), padding=1)[0, 0]
    assert np.array_equal(count, [[4, 6, 4], [6, 9, 6], [4, 6, 4]])
    # Any other padding mode repeats input values, so a ones input stays all 9.
    for mode in ("reflect", "replicate", "circular"):
        out = ref_conv.conv2d(
            np.ones((1, 1, 3, 3)), np.ones((1, 1, 3, 3)), padding=1, padding_mode=mode
        )
        assert np.array_equal(out, np.full((1, 1, 3, 3), 9.0))


def test_conv2d_matches_correlate2d_sum_over_channels():
    r = rng(18)
    x, w, b = r.normal(size=(2, 3, 7, 8)), r.normal(size=(4, 3, 3, 2)), r.normal(size=4)
    out = ref_conv.conv2d(x, w, bias=b)
    assert out.shape == (2, 4, 5, 7)
    for n in range(2):
        for k in range(4):
            expected = b[k] + sum(ref_conv.correlate2d_valid(x[n, c], w[k, c]) for c in range(3))
            assert_close(out[n, k], expected)
    # Stride keeps every sh-th row and sw-th column of the stride-1 output.
    assert_close(ref_conv.conv2d(x, w, bias=b, stride=(2, 3)), out[:, :, ::2, ::3])


def test_conv2d_groups_are_separate_convolutions():
    r = rng(20)
    x, w, b = r.normal(size=(2, 6, 5, 7)), r.normal(size=(9, 2, 3, 2)), r.normal(size=9)
    out = ref_conv.conv2d(x, w, b, stride=(1, 2), padding=1, dilation=(2, 1), groups=3)
    for g in range(3):
        cin, kout = slice(2 * g, 2 * g + 2), slice(3 * g, 3 * g + 3)
        expected = ref_conv.conv2d(x[:, cin], w[kout], b[kout], (1, 2), 1, (2, 1))
        assert_close(out[:, kout], expected)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv2d_matches_definition_on_padded_input(padding_mode):
    """Every padding form against np.pad followed by the definition, one output at a time."""
    r = rng(21)
    x, w = r.normal(size=(2, 4, 5, 7)), r.normal(size=(6, 2, 3, 2))
    kw = dict(stride=(2, 1), dilation=(1, 2), groups=2, padding_mode=padding_mode)
    for padding, pads in [
        (2, ((2, 2), (2, 2))),
        ((1, 3), ((1, 1), (3, 3))),
        ((0, 3, 4, 1), ((0, 3), (4, 1))),  # (top, bottom, left, right)
        ("valid", ((0, 0), (0, 0))),
    ]:
        x_pad = np.pad(x, ((0, 0), (0, 0), *pads), mode=_NP_PAD_MODE[padding_mode])
        expected = _naive_conv2d(x_pad, w, (2, 1), (1, 2), groups=2)
        assert_close(ref_conv.conv2d(x, w, padding=padding, **kw), expected)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv2d_same_padding_any_stride_and_dilation(padding_mode):
    """ "same": Ho = ceil(H / sh), padded by the TensorFlow rule (the odd pixel after)."""
    r = rng(22)
    for (h, wd), (kh, kw), stride, dilation in [
        ((7, 8), (3, 3), (2, 2), (1, 1)),
        ((7, 8), (4, 2), (3, 2), (1, 1)),
        ((9, 6), (3, 2), (2, 3), (2, 2)),
        ((6, 7), (2, 3), (3, 3), (1, 3)),
        ((5, 5), (1, 1), (3, 2), (1, 1)),  # a kernel smaller than the stride: no padding
        ((8, 5), (5, 4), (1, 1), (1, 1)),
        ((5, 6), (2, 2), (4, 5), (1, 1)),  # stride larger than the kernel
    ]:
        x, w = r.normal(size=(2, 3, h, wd)), r.normal(size=(2, 3, kh, kw))
        out = ref_conv.conv2d(
            x, w, stride=stride, padding="same", dilation=dilation, padding_mode=padding_mode
        )
        assert out.shape == (2, 2, math.ceil(h / stride[0]), math.ceil(wd / stride[1]))
        pads = (
            _tf_same_pads(h, kh, stride[0], dilation[0]),
            _tf_same_pads(wd, kw, stride[1], dilation[1]),
        )
        x_pad = np.pad(x, ((0, 0), (0, 0), *pads), mode=_NP_PAD_MODE[padding_mode])
        assert_close(out, _naive_conv2d(x_pad, w, stride, dilation))
    # Stride 1: total padding dh·(R − 1), the odd row at the bottom (as PyTorch's "same").
    x = r.normal(size=(1, 1, 5, 5))
    w = np.zeros((1, 1, 2, 2))
    w[0, 0, 0, 0] = 1.0  # picks x_pad[i, j] = x[i − top, j − left]: x only if top = left = 0
    assert np.array_equal(ref_conv.conv2d(x, w, padding="same"), x)


def test_conv2d_circular_padding_wraps_around_more_than_once():
    x = rng(23).normal(size=(1, 1, 2, 3))
    w = np.zeros((1, 1, 1, 1))
    w[0, 0, 0, 0] = 1.0
    out = ref_conv.conv2d(x, w, padding=(5, 4, 7, 3), padding_mode="circular")[0, 0]
    assert out.shape == (2 + 9, 3 + 10)
    for i, j in np.ndindex(out.shape):
        assert out[i, j] == x[0, 0, (i - 5) % 2, (j - 7) % 3]
    # Replicate has no limit either; reflect may reach (not repeat) the far edge.
    out = ref_conv.conv2d(x, w, padding=4, padding_mode="replicate")[0, 0]
    assert np.array_equal(out[:5, :5], np.full((5, 5), x[0, 0, 0, 0]))
    out = ref_conv.conv2d(x, w, padding=(1, 2), padding_mode="reflect")[0, 0]
    assert np.array_equal(
        out[0], [x[0, 0, 1, 2], x[0, 0, 1, 1], *x[0, 0, 1], x[0, 0, 1, 1], x[0, 0, 1, 0]]
    )


def test_conv2d_unbatched_and_empty_batch():
    r = rng(24)
    x, w, b = r.normal(size=(4, 6, 5)), r.normal(size=(6, 2, 3, 3)), r.normal(size=6)
    kw = dict(stride=2, padding=(1, 0, 2, 1), groups=2, padding_mode="reflect")
    out = ref_conv.conv2d(x, w, b, **kw)
    assert out.shape == (6, 3, 3) and out.dtype == np.float64
    assert np.array_equal(out, ref_conv.conv2d(x[None], w, b, **kw)[0])
    for mode in ("zeros", "reflect", "replicate", "circular"):
        empty = ref_conv.conv2d(np.zeros((0, 4, 6, 5)), w, b, **dict(kw, padding_mode=mode))
        assert empty.shape == (0, 6, 3, 3) and empty.dtype == np.float64
        empty = ref_conv.conv1d(np.zeros((0, 4, 6)), w[:, :, 0], b, groups=2, padding_mode=mode)
        assert empty.shape == (0, 6, 4)


def test_conv2d_integer_inputs_and_dtype():
    x = np.arange(2 * 9, dtype=np.int32).reshape(1, 2, 3, 3)
    w = np.ones((1, 2, 2, 2), dtype=np.int64)
    out = ref_conv.conv2d(x, w, bias=[1])
    assert out.dtype == np.float64
    assert np.array_equal(out[0, 0], [[1 + 8 + 44, 1 + 12 + 48], [1 + 20 + 56, 1 + 24 + 60]])
    assert np.array_equal(ref_conv.conv2d(x.astype(bool), w), ref_conv.conv2d(x != 0, w))
    xf = x.astype(np.float32)
    assert ref_conv.conv2d(xf, w).dtype == np.float64


def test_conv1d_is_conv2d_with_unit_height():
    r = rng(25)
    x, w, b = r.normal(size=(2, 6, 11)), r.normal(size=(4, 3, 3)), r.normal(size=4)
    for padding, pads2d in [(2, (0, 0, 2, 2)), ((3,), (0, 0, 3, 3)), ((1, 4), (0, 0, 1, 4))]:
        for mode in ("zeros", "reflect", "replicate", "circular"):
            kw = dict(groups=2, padding_mode=mode)
            out = ref_conv.conv1d(x, w, b, stride=2, padding=padding, dilation=3, **kw)
            expected = ref_conv.conv2d(
                x[:, :, None], w[:, :, None], b, (1, 2), pads2d, (1, 3), **kw
            )[:, :, 0]
            assert_close(out, expected)
    # "same" with stride: L_out = ceil(L / s), padded by the TensorFlow rule.
    for stride, dilation in [(1, 1), (2, 1), (3, 2), (4, 1)]:
        out = ref_conv.conv1d(x, w, stride=stride, padding="same", dilation=dilation, groups=2)
        assert out.shape == (2, 4, math.ceil(11 / stride))
        left, right = _tf_same_pads(11, 3, stride, dilation)
        expected = ref_conv.conv1d(
            np.pad(x, ((0, 0), (0, 0), (left, right))), w, None, stride, 0, dilation, 2
        )
        assert_close(out, expected)
    # Closed forms: a delta tap is the identity, a ones kernel gives running sums.
    delta = np.zeros((6, 1, 3))
    delta[:, 0, 1] = 1.0
    assert np.array_equal(ref_conv.conv1d(x, delta, padding="same", groups=6), x)
    sums = ref_conv.conv1d(x[0, :1], np.ones((1, 1, 4)))  # unbatched (C, L)
    assert_close(sums[0], [np.sum(x[0, 0, i : i + 4]) for i in range(8)])


def test_conv2d_output_shape_with_stride_and_padding():
    x = np.zeros((1, 2, 10, 9))
    w = np.zeros((5, 2, 3, 4))
    out = ref_conv.conv2d(x, w, stride=(3, 2), padding=(1, 2))
    assert out.shape == (1, 5, (10 + 2 - 3) // 3 + 1, (9 + 4 - 4) // 2 + 1)
    out = ref_conv.conv2d(x, w, stride=(3, 2), padding=(1, 0, 2, 3), dilation=(2, 3))
    assert out.shape == (1, 5, (10 + 1 - 2 * 2 - 1) // 3 + 1, (9 + 5 - 3 * 3 - 1) // 2 + 1)


_X4, _W4 = np.zeros((1, 4, 5, 5)), np.zeros((6, 2, 3, 3))  # valid with groups=2
_X1, _W1 = np.zeros((4, 5)), np.zeros((6, 2, 3))  # conv1d, unbatched, valid with groups=2

_CONV_BAD_CALLS = [
    # (function, args, kwargs, exception, message pattern)
    (
        "conv2d",
        (_X4, np.zeros((6, 3, 3, 3))),
        dict(groups=2),
        ValueError,
        "input channels per group",
    ),
    ("conv2d", (_X4, _W4), {}, ValueError, "input channels per group"),  # groups=1
    ("conv2d", (_X4, np.zeros((5, 2, 3, 3))), dict(groups=2), ValueError, "output channels"),
    ("conv2d", (_X4, _W4), dict(groups=0), ValueError, "groups is too small"),
    ("conv2d", (_X4, _W4), dict(groups=2.0), TypeError, "groups is not an integer"),
    ("conv2d", (_X4, np.zeros((6, 2, 6, 3))), dict(groups=2), ValueError, "larger than the padded"),
    ("conv2d", (_X4, _W4), dict(groups=2, dilation=3), ValueError, "larger than the padded"),
    ("conv2d", (_X4, _W4), dict(groups=2, stride=0), ValueError, "stride is too small"),
    ("conv2d", (_X4, _W4), dict(groups=2, stride=(1, 0)), ValueError, "stride is too small"),
    ("conv2d", (_X4, _W4), dict(groups=2, stride=(1, 2, 3)), ValueError, "stride has 3 entries"),
    ("conv2d", (_X4, _W4), dict(groups=2, stride=1.0), TypeError, "stride is not an integer"),
    ("conv2d", (_X4, _W4), dict(groups=2, dilation=0), ValueError, "dilation is too small"),
    ("conv2d", (_X4, _W4), dict(groups=2, dilation=(-1, 1)), ValueError, "dilation is too small"),
    ("conv2d", (_X4, _W4), dict(groups=2, padding=-1), ValueError, "padding is negative"),
    ("conv2d", (_X4, _W4), dict(groups=2, padding=(1, -1)), ValueError, "padding is negative"),
    (
        "conv2d",
        (_X4, _W4),
        dict(groups=2, padding=(1, 0, 0, -2)),
        ValueError,
        "padding is negative",
    ),
    ("conv2d", (_X4, _W4), dict(groups=2, padding=(1, 2, 3)), ValueError, "padding has 3 entries"),
    ("conv2d", (_X4, _W4), dict(groups=2, padding=()), ValueError, "padding has 0 entries"),
    ("conv2d", (_X4, _W4), dict(groups=2, padding="full"), ValueError, "padding is invalid"),
    ("conv2d", (_X4, _W4), dict(groups=2, padding="SAME"), ValueError, "padding is invalid"),
    ("conv2d", (_X4, _W4), dict(groups=2, padding=1.5), TypeError, "padding is not an integer"),
    ("conv2d", (_X4, _W4), dict(groups=2, padding=None), TypeError, "padding is not an integer"),
    (
        "conv2d",
        (_X4, _W4),
        dict(groups=2, padding_mode="constant"),
        ValueError,
        "padding_mode is invalid",
    ),
    (
        "conv2d",
        (_X4, _W4),
        dict(groups=2, padding=5, padding_mode="reflect"),
        ValueError,
        "too large for padding_mode='reflect'",
    ),
    (
        "conv2d",
        (_X4, _W4),
        dict(groups=2, padding=(0, 0, 1, 5), padding_mode="reflect"),
        ValueError,
        "reflect",
    ),
    (
        "conv2d",
        (_X4, _W4),
        dict(groups=2, padding="same", dilation=5, padding_mode="reflect"),
        ValueError,
        "reflect",
    ),
    ("conv2d", (_X4[0, 0], _W4), dict(groups=2), ValueError, "x has 2 dimensions"),
    ("conv2d", (_X4[None], _W4), dict(groups=2), ValueError, "x has 5 dimensions"),
    ("conv2d", (_X4, _W4[0]), dict(groups=2), ValueError, "w has 3 dimensions"),
    ("conv2d", (_X4, np.zeros((6, 2, 0, 3))), dict(groups=2), ValueError, "empty kernel"),
    ("conv2d", (np.zeros((1, 4, 0, 5)), _W4), dict(groups=2), ValueError, "empty spatial"),
    ("conv2d", (_X4, _W4, np.zeros(5)), dict(groups=2), ValueError, "bias has shape"),
    ("conv2d", (_X4.astype(complex), _W4), dict(groups=2), TypeError, "x has dtype complex128"),
    ("conv2d", (_X4, _W4.astype(object)), dict(groups=2), TypeError, "w has dtype object"),
    ("conv2d", (_X4, _W4, np.zeros(6, complex)), dict(groups=2), TypeError, "bias has dtype"),
    ("conv1d", (_X1, _W1), dict(groups=2, padding=(1, 2, 3)), ValueError, "padding has 3 entries"),
    (
        "conv1d",
        (_X1, _W1),
        dict(groups=2, padding=5, padding_mode="reflect"),
        ValueError,
        "reflect",
    ),
    ("conv1d", (_X1, _W1), dict(groups=2, stride=(1, 1)), ValueError, "stride has 2 entries"),
    ("conv1d", (_X4, _W1), dict(groups=2), ValueError, "x has 4 dimensions"),
    ("conv1d", (_X1, _W4), dict(groups=2), ValueError, "w has 4 dimensions"),
    ("conv1d", (_X1, _W1), dict(groups=3), ValueError, "input channels per group"),
    ("conv1d", (_X1, _W1), dict(groups=2, dilation=3), ValueError, "larger than the padded"),
    ("conv1d", (_X1.astype(str), _W1), dict(groups=2), TypeError, "x has dtype <U"),
]


@pytest.mark.parametrize(("func", "args", "kwargs", "exc", "match"), _CONV_BAD_CALLS)
def test_conv_bad_input(func, args, kwargs, exc, match):
    with pytest.raises(exc, match=f"^{func}: .*{re.escape(match)}"):
        getattr(ref_conv, func)(*args, **kwargs)


def test_conv_bad_input_is_bad_only_there():
    """The good calls next to the bad ones work (so the table tests what it says)."""
    assert ref_conv.conv2d(_X4, _W4, groups=2).shape == (1, 6, 3, 3)
    assert ref_conv.conv2d(_X4, _W4, groups=2, dilation=2, padding=1).shape == (1, 6, 3, 3)
    assert ref_conv.conv2d(_X4, _W4, groups=2, padding=4, padding_mode="reflect").shape == (
        1,
        6,
        11,
        11,
    )
    assert ref_conv.conv1d(_X1, _W1, groups=2, padding=(1, 2)).shape == (6, 6)
    assert ref_conv.conv1d(_X1, _W1, groups=2, padding=(2,)).shape == (6, 7)


# conv2d_backward / conv1d_backward


def _conv_loss(conv, x, w, b, go, **kw):
    """L = Σ grad_out · conv(x, w, b): the scalar whose gradients conv*_backward returns."""
    return np.sum(go * conv(x, w, b, **kw))


def _conv_fd_gradients(conv, x, w, b, go, **kw):
    """(∂L/∂x, ∂L/∂w, ∂L/∂b) by central differences, one coordinate at a time.

    L is linear in each of x, w and b, so a central difference is exact for any step
    (its only error is rounding): h = 1 keeps that at the level of float64 rounding.
    """
    return (
        _finite_difference(lambda z: _conv_loss(conv, z, w, b, go, **kw), x, h=1.0),
        _finite_difference(lambda z: _conv_loss(conv, x, z, b, go, **kw), w, h=1.0),
        _finite_difference(lambda z: _conv_loss(conv, x, w, z, go, **kw), b, h=1.0),
    )


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv2d_backward_matches_finite_differences(padding_mode):
    r = rng(40)
    x, w, b = r.normal(size=(2, 4, 5, 6)), r.normal(size=(6, 2, 3, 2)), r.normal(size=6)
    for padding, stride in [
        (1, (2, 1)),
        ((2, 1), (2, 1)),
        ((0, 2, 3, 1), (2, 1)),  # (top, bottom, left, right)
        ("same", 2),  # pads (1, 1) rows and (0, 1) columns
        ("valid", (2, 1)),
    ]:
        kw = dict(stride=stride, padding=padding, dilation=(1, 2), groups=2)
        kw["padding_mode"] = padding_mode
        go = r.normal(size=ref_conv.conv2d(x, w, **kw).shape)
        grads = ref_conv.conv2d_backward(x, w, go, **kw)
        for got, fd in zip(
            grads, _conv_fd_gradients(ref_conv.conv2d, x, w, b, go, **kw), strict=True
        ):
            assert got.shape == fd.shape and got.dtype == np.float64
            assert_close(got, fd, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv1d_backward_matches_finite_differences(padding_mode):
    r = rng(41)
    x, w, b = r.normal(size=(2, 4, 7)), r.normal(size=(6, 2, 3)), r.normal(size=6)
    for padding, stride in [(2, 2), ((3,), 1), ((1, 4), 2), ("same", 2), ("valid", 1)]:
        kw = dict(stride=stride, padding=padding, dilation=2, groups=2, padding_mode=padding_mode)
        for xs in (x, x[1]):  # batched and unbatched
            go = r.normal(size=ref_conv.conv1d(xs, w, **kw).shape)
            grads = ref_conv.conv1d_backward(xs, w, go, **kw)
            for got, fd in zip(
                grads, _conv_fd_gradients(ref_conv.conv1d, xs, w, b, go, **kw), strict=True
            ):
                assert got.shape == fd.shape
                assert_close(got, fd, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv2d_backward_closed_forms(padding_mode):
    r = rng(42)
    x, w = r.normal(size=(3, 6, 5, 4)), r.normal(size=(6, 1, 2, 3))  # depthwise
    kw = dict(stride=(1, 2), padding=(1, 0, 2, 1), groups=6, padding_mode=padding_mode)
    go = r.normal(size=ref_conv.conv2d(x, w, **kw).shape)
    gx, gw, gb = ref_conv.conv2d_backward(x, w, go, **kw)
    assert_close(gb, go.sum(axis=(0, 2, 3)))
    # Without bias, L = Σ grad_out · conv(x, w) is linear in x and in w (the padding
    # copies input values), so L = <∂L/∂x, x> = <∂L/∂w, w> (Euler's identity).
    loss = np.sum(go * ref_conv.conv2d(x, w, **kw))
    assert_close(np.sum(gx * x), loss, rtol=1e-12)
    assert_close(np.sum(gw * w), loss, rtol=1e-12)
    # A 1×1 kernel of ones with stride 1: ∂L/∂x is grad_out folded back by the padding.
    pads = ((0, 0), (0, 0), (1, 2), (3, 0))
    go = r.normal(size=(3, 6, 8, 7))
    gx, _, _ = ref_conv.conv2d_backward(
        x, np.ones((6, 1, 1, 1)), go, padding=(1, 2, 3, 0), groups=6, padding_mode=padding_mode
    )
    if padding_mode == "zeros":
        assert_close(gx, go[:, :, 1:-2, 3:])
    # <np.pad(x), go> = <x, ∂L/∂x> for any x: the adjoint of the padding.
    assert_close(np.sum(np.pad(x, pads, mode=_NP_PAD_MODE[padding_mode]) * go), np.sum(x * gx))


def test_pad_adjoint_is_the_transpose_of_np_pad():
    r = rng(43)
    for mode, pads in [
        ("constant", ((2, 0), (1, 3))),
        ("reflect", ((3, 1), (2, 4))),  # reaches the far edge
        ("edge", ((5, 2), (0, 7))),
        ("wrap", ((9, 4), (7, 11))),  # wraps around more than once
        ("wrap", ((0, 0), (0, 0))),
    ]:
        a = r.normal(size=(2, 4, 5))
        g = r.normal(size=(2, 4 + sum(pads[0]), 5 + sum(pads[1])))
        adj = ref_conv._pad_adjoint(g, pads, mode, a.shape)
        assert adj.shape == a.shape
        assert_close(np.sum(np.pad(a, ((0, 0), *pads), mode=mode) * g), np.sum(a * adj))
        # The transpose, column by column: column q of the padding's matrix is np.pad(e_q).
        for q in np.ndindex(a.shape[1:]):
            e = np.zeros(a.shape[1:])
            e[q] = 1.0
            assert_close(adj[:, q[0], q[1]], np.sum(np.pad(e, pads, mode=mode) * g, axis=(1, 2)))
    # The module docstring's row: replicate by 2 on a b c d.
    row = ref_conv._pad_adjoint(np.arange(1.0, 9.0), ((2, 2),), "edge", (4,))
    assert np.array_equal(row, [1 + 2 + 3, 4, 5, 6 + 7 + 8])


def test_conv_backward_needs_subsets():
    r = rng(44)
    x, w = r.normal(size=(2, 4, 5, 6)), r.normal(size=(6, 2, 3, 2))
    kw = dict(stride=2, padding=1, groups=2, padding_mode="circular")
    go = r.normal(size=ref_conv.conv2d(x, w, **kw).shape)
    full = ref_conv.conv2d_backward(x, w, go, **kw)
    assert all(g is not None for g in full)
    names = ("input", "weight", "bias")
    for size in range(4):
        for needs in itertools.combinations(names, size):
            for form in (needs, list(needs), set(needs), needs[::-1]):
                grads = ref_conv.conv2d_backward(x, w, go, needs=form, **kw)
                for name, got, expected in zip(names, grads, full, strict=True):
                    if name in needs:
                        assert np.array_equal(got, expected), (needs, name)
                    else:
                        assert got is None, (needs, name)
    # A single name as a string; repeated names count once.
    assert ref_conv.conv2d_backward(x, w, go, needs="weight", **kw)[::2] == (None, None)
    grads = ref_conv.conv2d_backward(x, w, go, needs=("bias", "bias"), **kw)
    assert grads[:2] == (None, None) and np.array_equal(grads[2], full[2])
    x1, w1 = x[0, :, 0], w[:, :, 0]  # unbatched conv1d: (C, L) and (K, C/G, R)
    go = r.normal(size=ref_conv.conv1d(x1, w1, **kw).shape)
    gx, gw, gb = ref_conv.conv1d_backward(x1, w1, go, needs=("input",), **kw)
    assert gx.shape == (4, 6) and gw is None and gb is None
    assert np.array_equal(gx, ref_conv.conv1d_backward(x1, w1, go, **kw)[0])


def test_conv_backward_empty_batch_and_integer_inputs():
    w = np.ones((6, 2, 3, 3))
    gx, gw, gb = ref_conv.conv2d_backward(
        np.zeros((0, 4, 6, 5)), w, np.zeros((0, 6, 3, 3)), stride=2, padding=1, groups=2
    )
    assert gx.shape == (0, 4, 6, 5)
    assert np.array_equal(gw, np.zeros_like(w)) and np.array_equal(gb, np.zeros(6))
    x = np.arange(18, dtype=np.int32).reshape(1, 2, 3, 3)
    gx, gw, gb = ref_conv.conv2d_backward(x, np.ones((1, 2, 2, 2), int), np.ones((1, 1, 2, 2), int))
    assert gx.dtype == gw.dtype == gb.dtype == np.float64
    assert np.array_equal(gx[0, 1], [[1, 2, 1], [2, 4, 2], [1, 2, 1]])
    assert np.array_equal(gw[0, 1], [[9 + 10 + 12 + 13, 10 + 11 + 13 + 14], [56, 60]])


_CONV_BACKWARD_BAD_CALLS = [
    # (function, args, kwargs, exception, message pattern); _X4 ⊛ _W4 with groups=2 is
    # (1, 6, 3, 3), _X1 ⊛ _W1 is (6, 3)
    (
        "conv2d_backward",
        (_X4, _W4, np.zeros((1, 6, 3, 3))),
        dict(groups=2, needs=("grad",)),
        ValueError,
        "needs holds 'grad'",
    ),
    (
        "conv2d_backward",
        (_X4, _W4, np.zeros((1, 6, 3, 3))),
        dict(groups=2, needs="inputs"),
        ValueError,
        "needs holds 'inputs'",
    ),
    (
        "conv2d_backward",
        (_X4, _W4, np.zeros((1, 6, 3, 3))),
        dict(groups=2, needs=None),
        ValueError,
        "needs is not a collection",
    ),
    (
        "conv2d_backward",
        (_X4, _W4, np.zeros((1, 6, 3, 3))),
        dict(groups=2, needs=("input", 1)),
        ValueError,
        "needs holds 1",
    ),
    (
        "conv2d_backward",
        (_X4, _W4, np.zeros((1, 6, 3, 4))),
        dict(groups=2),
        ValueError,
        "grad_out has shape (1, 6, 3, 4) (expected (1, 6, 3, 3)",
    ),
    (
        "conv2d_backward",
        (_X4, _W4, np.zeros((6, 3, 3))),
        dict(groups=2),
        ValueError,
        "grad_out has shape (6, 3, 3)",
    ),
    (
        "conv2d_backward",
        (_X4[0], _W4, np.zeros((1, 6, 3, 3))),
        dict(groups=2),
        ValueError,
        "grad_out has shape (1, 6, 3, 3) (expected (6, 3, 3)",
    ),
    (
        "conv2d_backward",
        (_X4, _W4, np.zeros((1, 6, 2, 2))),
        dict(groups=2, stride=2, padding=1),
        ValueError,
        "grad_out has shape",
    ),
    (
        "conv2d_backward",
        (_X4, _W4, np.zeros((1, 6, 3, 3), complex)),
        dict(groups=2),
        TypeError,
        "grad_out has dtype complex128",
    ),
    (
        "conv2d_backward",
        (_X4, _W4, np.zeros((1, 6, 3, 3))),
        {},
        ValueError,
        "input channels per group",
    ),
    (
        "conv2d_backward",
        (_X4, _W4, np.zeros((1, 6, 3, 3))),
        dict(groups=2, padding_mode="x"),
        ValueError,
        "padding_mode is invalid",
    ),
    (
        "conv1d_backward",
        (_X1, _W1, np.zeros((6, 4))),
        dict(groups=2),
        ValueError,
        "grad_out has shape (6, 4) (expected (6, 3)",
    ),
    (
        "conv1d_backward",
        (_X1, _W1, np.zeros((6, 3))),
        dict(groups=2, needs=("inputs",)),
        ValueError,
        "needs holds 'inputs'",
    ),
    (
        "conv1d_backward",
        (_X4, _W1, np.zeros((6, 3))),
        dict(groups=2),
        ValueError,
        "x has 4 dimensions",
    ),
]


@pytest.mark.parametrize(("func", "args", "kwargs", "exc", "match"), _CONV_BACKWARD_BAD_CALLS)
def test_conv_backward_bad_input(func, args, kwargs, exc, match):
    with pytest.raises(exc, match=f"^{func}: .*{re.escape(match)}"):
        getattr(ref_conv, func)(*args, **kwargs)


def test_conv_backward_bad_input_is_bad_only_there():
    grads = ref_conv.conv2d_backward(_X4, _W4, np.zeros((1, 6, 3, 3)), groups=2)
    assert [g.shape for g in grads] == [_X4.shape, _W4.shape, (6,)]
    grads = ref_conv.conv2d_backward(_X4[0], _W4, np.zeros((6, 3, 3)), groups=2, needs=())
    assert grads == (None, None, None)
    grads = ref_conv.conv2d_backward(_X4, _W4, np.zeros((1, 6, 2, 2)), 2, 0, 1, 2)
    assert grads[0].shape == _X4.shape
    assert ref_conv.conv1d_backward(_X1, _W1, np.zeros((6, 3)), groups=2)[0].shape == (4, 5)


# --------------------------------------------------------------------------------------
# correlate2d / convolve2d (SciPy's 2-D functions)
# --------------------------------------------------------------------------------------


def test_correlate2d_valid_is_the_seed_formula():
    r = rng(26)
    image = r.normal(size=(6, 7))
    for kshape in [(1, 1), (2, 3), (3, 3), (6, 7), (4, 2)]:
        kernel = r.normal(size=kshape)
        expected = ref_conv.correlate2d_valid(image, kernel)
        for boundary in ("fill", "wrap", "symm"):  # unused in "valid" mode
            out = ref_conv.correlate2d(image, kernel, "valid", boundary, fillvalue=9.0)
            assert_close(out, expected)


def test_correlate2d_same_centring_and_convolve_flip():
    r = rng(27)
    image = r.normal(size=(5, 6))
    for kh, kw in [(1, 1), (2, 2), (3, 3), (4, 3), (2, 5), (6, 4), (7, 8)]:
        # A delta at ((R − 1) // 2, (S − 1) // 2) is the identity for both in "same" mode.
        delta = np.zeros((kh, kw))
        delta[(kh - 1) // 2, (kw - 1) // 2] = 1.0
        for boundary in ("fill", "wrap", "symm"):
            for f in (ref_conv.correlate2d, ref_conv.convolve2d):
                assert np.array_equal(f(image, delta, "same", boundary), image)
        # Convolution is the correlation with the kernel flipped: "full" and "valid".
        kernel = r.normal(size=(kh, kw))
        for boundary in ("fill", "wrap", "symm"):
            assert_close(
                ref_conv.convolve2d(image, kernel, "full", boundary, 1.5),
                ref_conv.correlate2d(image, kernel[::-1, ::-1], "full", boundary, 1.5),
            )
        if kh <= 5 and kw <= 6:
            assert_close(
                ref_conv.convolve2d(image, kernel, "valid"),
                ref_conv.correlate2d(image, kernel[::-1, ::-1], "valid"),
            )


def test_correlate2d_boundary_closed_forms():
    r = rng(28)
    image = r.normal(size=(3, 4))
    # Wrap with a ones kernel of the image's size: every window holds each pixel once.
    out = ref_conv.correlate2d(image, np.ones((3, 4)), boundary="wrap")
    assert_close(out, np.full((5, 7), np.sum(image)))
    # Fill: a ones image extended by 1 is all ones, so a ones kernel sums to R·S ...
    out = ref_conv.correlate2d(np.ones((3, 4)), np.ones((2, 5)), boundary="fill", fillvalue=1)
    assert np.array_equal(out, np.full((4, 8), 10.0))
    # ... and with fillvalue 0 it counts the kernel taps over the image.
    out = ref_conv.correlate2d(np.ones((2, 2)), np.ones((2, 2)))
    assert np.array_equal(out, [[1, 2, 1], [2, 4, 2], [1, 2, 1]])
    # Symm mirrors with the edge repeated: a 1×1 image extends to a constant.
    assert np.array_equal(
        ref_conv.correlate2d([[2.0]], np.ones((3, 2)), boundary="symm"), np.full((3, 2), 12.0)
    )
    # Integer inputs give float64.
    out = ref_conv.convolve2d(np.arange(6).reshape(2, 3), [[1, 2]])
    assert out.dtype == np.float64 and np.array_equal(out, [[0, 1, 4, 4], [3, 10, 13, 10]])


def test_correlate2d_valid_swaps_when_the_kernel_contains_the_image():
    r = rng(29)
    small, big = r.normal(size=(2, 3)), r.normal(size=(4, 3))
    # Swapped: correlate2d flips the correlation of the swapped pair, convolve2d commutes.
    assert_close(
        ref_conv.correlate2d(small, big, "valid"),
        ref_conv.correlate2d(big, small, "valid")[::-1, ::-1],
    )
    assert_close(ref_conv.convolve2d(small, big, "valid"), ref_conv.convolve2d(big, small, "valid"))
    assert ref_conv.correlate2d(small, big, "valid").shape == (3, 1)


_CORR_BAD_CALLS = [
    ((np.ones(3), np.ones((1, 1))), {}, ValueError, "in1 has 1 dimensions"),
    ((np.ones((3, 3)), np.ones((1, 1, 1))), {}, ValueError, "in2 has 3 dimensions"),
    ((np.ones((0, 3)), np.ones((1, 1))), {}, ValueError, "in1 is empty"),
    ((np.ones((3, 3)), np.ones((2, 0))), {}, ValueError, "in2 is empty"),
    ((np.ones((3, 3)), np.ones((2, 2))), dict(mode="circular"), ValueError, "mode is invalid"),
    (
        (np.ones((3, 3)), np.ones((2, 2))),
        dict(boundary="reflect"),
        ValueError,
        "boundary is invalid",
    ),
    ((np.ones((3, 3)), np.ones((2, 2))), dict(boundary="zeros"), ValueError, "boundary is invalid"),
    ((np.ones((3, 3)), np.ones((2, 2))), dict(fillvalue=[1, 2]), ValueError, "fillvalue has shape"),
    ((np.ones((3, 3)), np.ones((2, 2))), dict(fillvalue=1j), TypeError, "fillvalue has dtype"),
    ((np.ones((3, 3)), np.ones((2, 2), complex)), {}, TypeError, "in2 has dtype complex128"),
    ((np.ones((3, 3), object), np.ones((2, 2))), {}, TypeError, "in1 has dtype object"),
    ((np.ones((2, 4)), np.ones((3, 3))), dict(mode="valid"), ValueError, "at least as large"),
    ((np.ones((4, 2)), np.ones((3, 3))), dict(mode="valid"), ValueError, "at least as large"),
]


@pytest.mark.parametrize("func", ["correlate2d", "convolve2d"])
@pytest.mark.parametrize(("args", "kwargs", "exc", "match"), _CORR_BAD_CALLS)
def test_correlate2d_bad_input_table(func, args, kwargs, exc, match):
    with pytest.raises(exc, match=f"^{func}: .*{re.escape(match)}"):
        getattr(ref_conv, func)(*args, **kwargs)
    # Shapes that SciPy accepts the other way round are fine in "full" and "same".
    if "at least as large" in match:
        for mode in ("full", "same"):
            assert getattr(ref_conv, func)(*args, mode=mode).shape[0] >= 1


_SCIPY_SHAPES = [  # (in1, in2): odd/even kernels, larger in one or both dimensions, swaps
    ((5, 6), (1, 1)),
    ((5, 6), (2, 2)),
    ((5, 6), (3, 3)),
    ((5, 6), (2, 3)),
    ((5, 6), (4, 1)),
    ((5, 6), (5, 6)),
    ((5, 6), (3, 8)),  # larger in one dimension: "valid" raises
    ((5, 6), (7, 2)),
    ((5, 6), (7, 8)),  # larger in both: "valid" swaps
    ((3, 6), (3, 8)),  # equal in one, larger in the other: "valid" swaps
    ((2, 3), (6, 9)),  # more than twice as large: wraps and mirrors more than once
    ((1, 1), (2, 3)),
]


@pytest.mark.parametrize("boundary", ["fill", "wrap", "symm"])
@pytest.mark.parametrize("mode", ["full", "valid", "same"])
def test_correlate2d_convolve2d_match_scipy(mode, boundary):
    signal = pytest.importorskip("scipy.signal")
    r = rng(30)
    for shape1, shape2 in _SCIPY_SHAPES:
        in1, in2 = r.normal(size=shape1), r.normal(size=shape2)
        for fillvalue in (0, 2.5):
            for name in ("correlate2d", "convolve2d"):
                kw = dict(mode=mode, boundary=boundary, fillvalue=fillvalue)
                where = f"{name} {shape1} {shape2} {kw}"
                try:
                    expected = getattr(signal, name)(in1, in2, **kw)
                except ValueError:
                    with pytest.raises(ValueError, match="at least as large"):
                        getattr(ref_conv, name)(in1, in2, **kw)
                    continue
                out = getattr(ref_conv, name)(in1, in2, **kw)
                assert out.dtype == np.float64 and out.shape == expected.shape, where
                np.testing.assert_allclose(out, expected, RTOL, ATOL, err_msg=where)


def test_correlate2d_boundary_aliases_match_scipy():
    signal = pytest.importorskip("scipy.signal")
    r = rng(31)
    in1, in2 = r.normal(size=(4, 5)), r.normal(size=(3, 2))
    for alias, name in (("pad", "fill"), ("circular", "wrap"), ("symmetric", "symm")):
        for f in ("correlate2d", "convolve2d"):
            expected = getattr(signal, f)(in1, in2, "same", alias, 1.5)
            assert_close(getattr(ref_conv, f)(in1, in2, "same", alias, 1.5), expected)
            assert_close(getattr(ref_conv, f)(in1, in2, "same", name, 1.5), expected)
    # Integer inputs with an integer fillvalue: the same numbers as SciPy's int result.
    a, b = np.arange(12).reshape(3, 4), np.array([[1, -2], [3, 0]])
    assert np.array_equal(
        ref_conv.correlate2d(a, b, fillvalue=3), signal.correlate2d(a, b, fillvalue=3)
    )


# --------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------


def test_attention_matches_formula():
    r = rng(19)
    q, k, v = r.normal(size=(4, 8)), r.normal(size=(6, 8)), r.normal(size=(6, 3))
    s = q @ k.T / np.sqrt(8)
    p = np.exp(s) / np.sum(np.exp(s), axis=1, keepdims=True)
    assert_close(ref_attn.attention(q, k, v), p @ v)
    s2 = q @ k.T * 0.3
    p2 = np.exp(s2) / np.sum(np.exp(s2), axis=1, keepdims=True)
    assert_close(ref_attn.attention(q, k, v, scale=0.3), p2 @ v)


def test_attention_identical_keys_average_values():
    r = rng(20)
    q = r.normal(size=(2, 5, 4))
    k = np.broadcast_to(r.normal(size=4), (2, 7, 4))
    v = r.normal(size=(2, 7, 3))
    out = ref_attn.attention(q, k, v)
    assert_close(out, np.broadcast_to(v.mean(axis=1, keepdims=True), (2, 5, 3)))


def test_attention_causal():
    r = rng(21)
    q, k, v = r.normal(size=(3, 5, 4)), r.normal(size=(3, 6, 4)), r.normal(size=(3, 6, 2))
    out = ref_attn.attention(q, k, v, causal=True)
    assert_close(out[:, 0], v[:, 0])  # the first query sees only the first key
    allowed = np.tril(np.ones((5, 6), dtype=bool))
    assert_close(out, ref_attn.attention(q, k, v, mask=allowed))
    # The last query of a square problem sees everything.
    full = ref_attn.attention(q[:, :, :], k[:, :5], v[:, :5])
    assert_close(ref_attn.attention(q, k[:, :5], v[:, :5], causal=True)[:, -1], full[:, -1])


def test_attention_masks():
    r = rng(22)
    q, k, v = r.normal(size=(4, 3)), r.normal(size=(5, 3)), r.normal(size=(5, 2))
    mask = r.random((4, 5)) < 0.6
    mask[:, 0] = True
    additive = np.where(mask, 0.0, -np.inf)
    out = ref_attn.attention(q, k, v, mask=mask)
    assert_close(ref_attn.attention(q, k, v, mask=additive), out)
    # A masked-out key does not matter: change it and nothing moves.
    i, j = np.argwhere(~mask)[0]
    v2 = v.copy()
    v2[j] += 100.0
    assert_close(ref_attn.attention(q, k, v2, mask=mask)[i], out[i])
    # A finite additive bias shifts the scores.
    bias = r.normal(size=(4, 5))
    s = q @ k.T / np.sqrt(3) + bias
    p = np.exp(s) / np.sum(np.exp(s), axis=1, keepdims=True)
    assert_close(ref_attn.attention(q, k, v, mask=bias), p @ v)


def test_attention_fully_masked_row_gives_zero():
    r = rng(23)
    q, k, v = r.normal(size=(2, 3, 4)), r.normal(size=(2, 5, 4)), r.normal(size=(2, 5, 6))
    mask = np.ones((2, 3, 5), dtype=bool)
    mask[1, 2] = False  # query 2 of batch 1 may attend to nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ref_attn.attention(q, k, v, mask=mask)
        additive = ref_attn.attention(q, k, v, mask=np.where(mask, 0.0, -np.inf))
        no_keys = ref_attn.attention(q, k[:, :0], v[:, :0])
    assert np.all(np.isfinite(out))
    assert np.array_equal(out[1, 2], np.zeros(6))
    assert_close(out[0], ref_attn.attention(q[0], k[0], v[0]))
    assert_close(out[1, :2], ref_attn.attention(q[1, :2], k[1], v[1]))
    assert_close(additive, out)
    assert no_keys.shape == (2, 3, 6) and np.array_equal(no_keys, np.zeros((2, 3, 6)))


def test_attention_nan_propagates():
    q = np.array([[np.nan, 0.0], [1.0, 0.0]])
    k = np.ones((3, 2))
    v = np.ones((3, 2))
    out = ref_attn.attention(q, k, v)
    assert np.all(np.isnan(out[0])) and np.all(np.isfinite(out[1]))


def test_attention_bad_input():
    q, k, v = np.zeros((2, 3)), np.zeros((4, 3)), np.zeros((4, 5))
    with pytest.raises(ValueError, match="feature size"):
        ref_attn.attention(q, np.zeros((4, 2)), v)
    with pytest.raises(ValueError, match="rows"):
        ref_attn.attention(q, k, np.zeros((3, 5)))
    with pytest.raises(ValueError, match="mask"):
        ref_attn.attention(q, k, v, mask=np.ones((3, 4), dtype=bool))
    with pytest.raises(ValueError, match="dimensions"):
        ref_attn.attention(np.zeros(3), k, v)


def test_attention_bad_input_heads_causal_dropout():
    q, k, v = np.zeros((2, 4, 3, 5)), np.zeros((2, 2, 6, 5)), np.zeros((2, 2, 6, 3))
    with pytest.raises(ValueError, match="q has 4 heads"):
        ref_attn.attention(q, k[:, :1].repeat(3, axis=1), v[:, :1].repeat(3, axis=1))
    with pytest.raises(ValueError, match="v has 1 heads"):
        ref_attn.attention(q, k, v[:, :1])
    with pytest.raises(ValueError, match="q has 1 heads"):  # a 2-D q is one head
        ref_attn.attention(q[0, 0], k, v)
    with pytest.raises(ValueError, match="leading"):
        ref_attn.attention(q, np.zeros((3, 2, 6, 5)), np.zeros((3, 2, 6, 3)))
    with pytest.raises(ValueError, match="mask"):  # a mask may not add dimensions
        ref_attn.attention(q[0, 0], k[0, 0], v[0, 0], mask=np.ones((2, 3, 6), dtype=bool))
    with pytest.raises(ValueError, match="mask"):
        ref_attn.attention(q, k, v, mask=np.ones((3, 3, 6), dtype=bool))
    with pytest.raises(ValueError, match="mask"):
        ref_attn.attention(q, k, v, mask=np.ones((3, 6), dtype=complex))
    for causal in ("lower-right", "upper", None, 1, "True"):
        with pytest.raises(ValueError, match="causal"):
            ref_attn.attention(q, k, v, causal=causal)
    for p in (-0.1, 1.0, 1.5, np.nan, "x"):
        with pytest.raises(ValueError, match="dropout_p"):
            ref_attn.attention(q, k, v, dropout_p=p, seed=0)
    with pytest.raises(ValueError, match="seed"):
        ref_attn.attention(q, k, v, dropout_p=0.1)
    for seed in (-1, 2**64, 1.5, "3", True):
        with pytest.raises(ValueError, match="seed"):
            ref_attn.attention(q, k, v, dropout_p=0.1, seed=seed)
    out = ref_attn.attention(q, k, v)
    with pytest.raises(ValueError, match="grad_out"):
        ref_attn.attention_backward(q, k, v, out, out[..., 0], out[..., :2])
    with pytest.raises(ValueError, match="lse"):
        ref_attn.attention_backward(q, k, v, out, out, out)
    with pytest.raises(ValueError, match="out"):
        ref_attn.attention_backward(q, k, v, out[0], out[..., 0], out)


def test_attention_grouped_query_heads():
    r = rng(24)
    q, k, v = r.normal(size=(2, 4, 3, 5)), r.normal(size=(2, 2, 6, 5)), r.normal(size=(2, 2, 6, 3))
    out, lse = ref_attn.attention(q, k, v, return_lse=True)
    assert out.shape == (2, 4, 3, 3) and lse.shape == (2, 4, 3)
    # Query head h uses kv head h // 2: the same as repeating each kv head twice.
    assert_close(out, ref_attn.attention(q, k.repeat(2, axis=1), v.repeat(2, axis=1)))
    for b, h in itertools.product(range(2), range(4)):
        assert_close(out[b, h], ref_attn.attention(q[b, h], k[b, h // 2], v[b, h // 2]))
    # Multi-query attention: one kv head, or 2-D k and v shared by every head.
    mqa = ref_attn.attention(q, k[:, :1], v[:, :1])
    assert_close(mqa, ref_attn.attention(q, k[:, :1].repeat(4, axis=1), v[:, :1].repeat(4, axis=1)))
    assert_close(ref_attn.attention(q[0], k[0, 0], v[0, 0]), mqa[0])
    # Leading dimensions broadcast like np.matmul.
    kb, vb = k[:1], v[:1]
    assert_close(
        ref_attn.attention(q, kb, vb),
        ref_attn.attention(q, np.broadcast_to(kb, k.shape), np.broadcast_to(vb, v.shape)),
    )
    # 2-D q with one-head k, v: the output keeps the head axis, as matmul would.
    assert ref_attn.attention(q[0, 0], k[:, :1], v[:, :1]).shape == (2, 1, 3, 3)


def test_attention_causal_alignments():
    r = rng(25)
    for lq, lk in [(3, 5), (5, 3), (4, 4), (0, 3), (3, 0)]:
        q, k, v = r.normal(size=(2, lq, 4)), r.normal(size=(2, lk, 4)), r.normal(size=(2, lk, 2))
        upper = np.tril(np.ones((lq, lk), dtype=bool))
        lower = np.tril(np.ones((lq, lk), dtype=bool), k=lk - lq)  # j <= i + Lk − Lq
        for causal, allowed in [(True, upper), ("upper_left", upper), ("lower_right", lower)]:
            out, lse = ref_attn.attention(q, k, v, causal=causal, return_lse=True)
            want, want_lse = ref_attn.attention(q, k, v, mask=allowed, return_lse=True)
            assert_close(out, want)
            assert_close(lse, want_lse)
        # Combined with a mask: both must allow.
        mask = r.random((lq, lk)) < 0.7
        assert_close(
            ref_attn.attention(q, k, v, mask=mask, causal="lower_right"),
            ref_attn.attention(q, k, v, mask=mask & lower),
        )
        assert_close(ref_attn.attention(q, k, v, causal=False), ref_attn.attention(q, k, v))
    # Lq > Lk, lower right: the first Lq − Lk queries see nothing; the last sees everything.
    q, k, v = r.normal(size=(5, 4)), r.normal(size=(3, 4)), r.normal(size=(3, 2))
    out, lse = ref_attn.attention(q, k, v, causal="lower_right", return_lse=True)
    assert np.array_equal(out[:2], np.zeros((2, 2))) and np.all(lse[:2] == -np.inf)
    assert_close(out[-1], ref_attn.attention(q, k, v)[-1])
    # Lq < Lk, lower right: the last query sees every key.
    q = r.normal(size=(2, 4))
    assert_close(
        ref_attn.attention(q, k, v, causal="lower_right")[-1], ref_attn.attention(q, k, v)[-1]
    )


def test_attention_mask_dtypes_and_shapes():
    r = rng(26)
    q, k, v = r.normal(size=(2, 3, 4, 5)), r.normal(size=(2, 3, 6, 5)), r.normal(size=(2, 3, 6, 2))
    ints = r.integers(-3, 3, size=(3, 4, 6))
    # Any non-boolean numeric mask is an additive bias.
    want = ref_attn.attention(q, k, v, mask=1.0 * ints)
    assert_close(ref_attn.attention(q, k, v, mask=ints), want)
    bias = r.normal(size=(4, 6)).astype(np.float32)
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(5) + bias.astype(np.float64)
    p = np.exp(s) / np.sum(np.exp(s), axis=-1, keepdims=True)
    assert_close(ref_attn.attention(q, k, v, mask=bias), p @ v)
    # A per-head boolean mask, broadcast over the batch.
    mask = r.random((3, 4, 6)) < 0.5
    mask[..., 0] = True
    out = ref_attn.attention(q, k, v, mask=mask)
    for h in range(3):
        assert_close(out[:, h], ref_attn.attention(q[:, h], k[:, h], v[:, h], mask=mask[h]))


def test_attention_masked_positions_never_leak():
    r = rng(27)
    q, k, v = r.normal(size=(2, 4, 3)), r.normal(size=(2, 5, 3)), r.normal(size=(2, 5, 2))
    mask = np.ones((4, 5), dtype=bool)
    mask[:, 3] = False  # key 3 is forbidden to every query
    bad_k = k.copy()
    bad_k[:, 3] = np.nan
    inf_k = k.copy()
    inf_k[:, 3] = [np.inf, -np.inf, np.inf]
    clean, clean_lse = ref_attn.attention(q, k, v, mask=mask, return_lse=True)
    go = r.normal(size=clean.shape)
    _, clean_dk, clean_dv = ref_attn.attention_backward(q, k, v, clean, clean_lse, go, mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kk in (bad_k, inf_k):
            for m in (mask, np.where(mask, 0.0, -np.inf)):
                out, lse = ref_attn.attention(q, kk, v, mask=m, return_lse=True)
                assert_close(out, clean)
                assert_close(lse, clean_lse)
                # dk and dv do not see the bad key either (dq = dS K does: 0 · NaN).
                _, dk, dv = ref_attn.attention_backward(q, kk, v, out, lse, go, mask=m)
                assert np.array_equal(dk[:, 3], np.zeros((2, 3)))
                assert_close(dk, clean_dk)
                assert_close(dv, clean_dv)
        # Causal: the NaN key is the last one, seen only by the last query.
        kc = k.copy()
        kc[:, 4] = np.nan
        out = ref_attn.attention(q, kc, v, causal="lower_right")
        assert np.all(np.isfinite(out[:, :3])) and np.all(np.isnan(out[:, 3]))
        # NaN or inf float-mask values at causally forbidden positions do not leak.
        bias = r.normal(size=(4, 5))
        bad_bias = np.where(np.tril(np.ones((4, 5), dtype=bool)), bias, np.nan)
        bad_bias[0, 4] = np.inf
        assert_close(
            ref_attn.attention(q, k, v, mask=bad_bias, causal=True),
            ref_attn.attention(q, k, v, mask=bias, causal=True),
        )
    # NaN at an allowed position still propagates.
    assert np.all(np.isnan(ref_attn.attention(q, bad_k, v)))


def _naive_lse(s):
    """log Σ exp(s) along the last axis, the textbook way (for moderate finite values)."""
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(s), axis=-1))


def test_attention_return_lse():
    r = rng(28)
    q, k, v = r.normal(size=(2, 4, 3, 5)), r.normal(size=(2, 2, 6, 5)), r.normal(size=(2, 2, 6, 3))
    mask = r.random((4, 3, 6)) < 0.6
    mask[1, 2] = False  # head 1, query 2: fully masked
    s = np.where(mask, q @ np.swapaxes(k.repeat(2, axis=1), -1, -2) * 0.7, -np.inf)
    out, lse = ref_attn.attention(q, k, v, mask=mask, scale=0.7, return_lse=True)
    assert lse.shape == (2, 4, 3)
    assert_close(lse, _naive_lse(s))
    assert np.all(lse[:, 1, 2] == -np.inf)
    assert np.array_equal(out[:, 1, 2], np.zeros((2, 3)))
    # A float bias goes in before the logsumexp.
    bias = r.normal(size=(3, 6))
    _, lse_b = ref_attn.attention(q, k, v, mask=bias, scale=0.7, return_lse=True)
    s_b = q @ np.swapaxes(k.repeat(2, axis=1), -1, -2) * 0.7 + bias
    assert_close(lse_b, _naive_lse(s_b))
    # Same output either way; no keys gives −∞; 2-D inputs give a 1-D lse.
    assert_close(ref_attn.attention(q, k, v, mask=mask, scale=0.7), out)
    _, lse0 = ref_attn.attention(q, k[..., :0, :], v[..., :0, :], return_lse=True)
    assert lse0.shape == (2, 4, 3) and np.all(lse0 == -np.inf)
    _, lse2 = ref_attn.attention(q[0, 0], k[0, 0], v[0, 0], return_lse=True)
    assert_close(lse2, _naive_lse(q[0, 0] @ k[0, 0].T / np.sqrt(5)))


def test_attention_fully_masked_rows_have_zero_gradients():
    r = rng(29)
    q, k, v = r.normal(size=(2, 3, 4)), r.normal(size=(2, 5, 4)), r.normal(size=(2, 5, 6))
    mask = r.random((2, 3, 5)) < 0.6
    mask[:, :, 0] = True
    mask[1, 2] = False
    go = r.normal(size=(2, 3, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = ref_attn.attention(q, k, v, mask=mask, return_lse=True)
        dq, dk, dv = ref_attn.attention_backward(q, k, v, out, lse, go, mask=mask)
        assert np.all(lse[1, 2] == -np.inf)
        assert all(np.all(np.isfinite(g)) for g in (dq, dk, dv))
        assert np.array_equal(dq[1, 2], np.zeros(4))
        # The masked row contributes nothing to dk, dv: zero its grad_out, nothing changes.
        go2 = go.copy()
        go2[1, 2] = 0.0
        _, dk2, dv2 = ref_attn.attention_backward(q, k, v, out, lse, go2, mask=mask)
        assert_close(dk, dk2)
        assert_close(dv, dv2)
        # No keys at all: zero gradients of the right shapes.
        k0, v0 = k[:, :0], v[:, :0]
        out0, lse0 = ref_attn.attention(q, k0, v0, return_lse=True)
        grads = ref_attn.attention_backward(q, k0, v0, out0, lse0, go)
        for g, x in zip(grads, (q, k0, v0), strict=True):
            assert g.shape == x.shape and np.array_equal(g, np.zeros_like(x))


def _splitmix_keep(seed, bh, i, j, p):
    """The dropout hash in pure Python integers, masked to 64 bits."""
    m64 = 2**64 - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
        return z ^ (z >> 31)

    key = mix(seed ^ ((bh * 0x9E3779B97F4A7C15) & m64))
    bits = mix(key ^ ((((i << 32) | j) * 0xD1B54A32D192ED03) & m64))
    return (bits >> 40) / 2**24 >= p


def test_dropout_keep_hand_checked_values():
    # (seed, bh, i, j) and the hash's top 24 bits, bits >> 40 (from _splitmix_keep's
    # arithmetic, evaluated separately):
    cases = [
        ((42, 5, 3, 7), 16393103),
        ((2**64 - 1, 123, 2**32 - 1, 2**32 - 1), 6122053),
        ((0, 0, 0, 1), 8522164),
    ]
    for (seed, bh, i, j), top in cases:
        for p in (0.1, 0.5, 0.9):
            assert ref_attn.dropout_keep(seed, bh, i, j, p) == _splitmix_keep(seed, bh, i, j, p)
        # keep iff top / 2**24 >= p: the threshold is exact.
        u = top / 2**24
        assert ref_attn.dropout_keep(seed, bh, i, j, u)
        assert not ref_attn.dropout_keep(seed, bh, i, j, np.nextafter(u, 1.0))
    # Vectorised: bh, i and j broadcast together.
    bh, i, j = np.arange(3)[:, None, None], np.arange(4)[:, None], np.arange(2**32 - 5, 2**32)
    keep = ref_attn.dropout_keep(7, bh, i, j, 0.3)
    assert keep.shape == (3, 4, 5) and keep.dtype == np.bool_
    for idx in np.ndindex(keep.shape):
        b, ii, jj = int(bh[idx[0], 0, 0]), int(i[idx[1], 0]), int(j[idx[2]])
        assert keep[idx] == _splitmix_keep(7, b, ii, jj, 0.3)
    assert np.all(ref_attn.dropout_keep(3, bh, i, j, 0.0))
    for bad in ({"i": 2**32}, {"j": -1}, {"bh": -1}, {"i": 1.0}, {"dropout_p": 1.0}, {"seed": -1}):
        args = {"seed": 0, "bh": 0, "i": 0, "j": 0, "dropout_p": 0.5} | bad
        with pytest.raises(ValueError, match=rf"\b{next(iter(bad))}\b"):
            ref_attn.dropout_keep(**args)


def test_attention_dropout():
    r = rng(30)
    q, k, v = r.normal(size=(2, 4, 3, 5)), r.normal(size=(2, 2, 6, 5)), r.normal(size=(2, 2, 6, 3))
    out, lse = ref_attn.attention(q, k, v, dropout_p=0.4, seed=11, return_lse=True)
    assert_close(ref_attn.attention(q, k, v, dropout_p=0.4, seed=11), out)  # deterministic
    assert not np.allclose(ref_attn.attention(q, k, v, dropout_p=0.4, seed=12), out)
    # The logsumexp is that of the undropped scores.
    base, base_lse = ref_attn.attention(q, k, v, return_lse=True)
    assert_close(lse, base_lse)
    # p = 0 is no dropout, with or without a seed.
    assert_close(ref_attn.attention(q, k, v, dropout_p=0.0, seed=5), base)
    # out = (P · keep / (1 − p)) V, with bh the flat index over (batch, query head).
    s = q @ np.swapaxes(k.repeat(2, axis=1), -1, -2) / np.sqrt(5)
    p = np.exp(s) / np.sum(np.exp(s), axis=-1, keepdims=True)
    bh = np.arange(8).reshape(2, 4, 1, 1)
    keep = ref_attn.dropout_keep(11, bh, np.arange(3)[:, None], np.arange(6), 0.4)
    assert_close(out, (p * keep / 0.6) @ v.repeat(2, axis=1))
    # Broadcast leading dimensions: bh counts over the output's (batch, head) shape.
    assert_close(
        ref_attn.attention(q, k[:1], v[:1], dropout_p=0.4, seed=11),
        ref_attn.attention(
            q,
            np.broadcast_to(k[:1], k.shape),
            np.broadcast_to(v[:1], v.shape),
            dropout_p=0.4,
            seed=11,
        ),
    )
    # 2-D inputs: bh = 0.
    keep0 = ref_attn.dropout_keep(11, 0, np.arange(3)[:, None], np.arange(6), 0.4)
    assert_close(
        ref_attn.attention(q[0, 0], k[0, 0], v[0, 0], dropout_p=0.4, seed=11),
        (p[0, 0] * keep0 / 0.6) @ v[0, 0],
    )


def test_attention_dropout_keeps_about_one_minus_p():
    # With identical keys P = 1/Lk everywhere and v = 1, each output is kept / Lk / (1 − p).
    lk, p = 512, 0.3
    q, k, v = np.zeros((4, 128, 1)), np.zeros((4, lk, 1)), np.ones((4, lk, 1))
    out = ref_attn.attention(q, k, v, dropout_p=p, seed=2024)
    kept = out * (1 - p)  # the fraction kept in each row
    assert abs(np.mean(kept) - (1 - p)) < 0.005  # 262144 draws: σ ≈ 0.0009
    assert np.std(kept) < 0.05  # rows of 512: σ ≈ 0.02
    assert abs(np.mean(out) - 1.0) < 0.01  # unbiased: E[out] = P V


def _attention_grads_fd(q, k, v, go, **kw):
    def f(qq, kk, vv):
        return np.sum(go * ref_attn.attention(qq, kk, vv, **kw))

    return (
        _finite_difference(lambda z: f(z, k, v), q),
        _finite_difference(lambda z: f(q, z, v), k),
        _finite_difference(lambda z: f(q, k, z), v),
    )


_ATTN_BACKWARD_CASES = [
    # (q shape, k shape, v shape, options)
    ((3, 2), (4, 2), (4, 3), {}),
    ((2, 3, 2), (2, 4, 2), (2, 4, 3), {"mask": "bool"}),
    ((2, 3, 2), (2, 4, 2), (2, 4, 3), {"mask": "float", "scale": 0.8}),
    ((2, 4, 2), (2, 3, 2), (2, 3, 2), {"causal": "lower_right"}),  # 1 query sees nothing
    ((2, 3, 2), (2, 5, 2), (2, 5, 2), {"causal": "lower_right", "mask": "bool"}),
    ((1, 4, 3, 2), (2, 2, 4, 2), (1, 2, 4, 3), {}),  # GQA, broadcast batch
    ((2, 4, 3, 2), (2, 2, 4, 2), (2, 2, 4, 3), {"causal": True, "dropout_p": 0.3, "seed": 9}),
    ((4, 3, 2), (4, 2), (4, 3), {"dropout_p": 0.5, "seed": 2**64 - 3}),  # MQA
]


@pytest.mark.parametrize(("qs", "ks", "vs", "kw"), _ATTN_BACKWARD_CASES)
def test_attention_backward_matches_finite_differences(qs, ks, vs, kw):
    r = rng(31)
    q, k, v = r.normal(size=qs), r.normal(size=ks), r.normal(size=vs)
    kw = dict(kw)
    out, lse = ref_attn.attention(q, k, v, return_lse=True, **{**kw, "mask": None})
    score_shape = lse.shape + (k.shape[-2],)
    if kw.get("mask") == "bool":
        kw["mask"] = r.random(score_shape[-2:]) < 0.6
    elif kw.get("mask") == "float":
        kw["mask"] = np.where(r.random(score_shape) < 0.3, -np.inf, r.normal(size=score_shape))
    out, lse = ref_attn.attention(q, k, v, return_lse=True, **kw)
    go = r.normal(size=out.shape)
    grads = ref_attn.attention_backward(q, k, v, out, lse, go, **kw)
    for g, want, x in zip(grads, _attention_grads_fd(q, k, v, go, **kw), (q, k, v), strict=True):
        assert g.shape == x.shape and g.dtype == np.float64
        assert_close(g, want, rtol=1e-7, atol=1e-8)


# --------------------------------------------------------------------------------------
# Agreement with PyTorch (float64), where installed
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_softmax_family_matches_torch(axis):
    torch = pytest.importorskip("torch")
    x = rng(30).normal(scale=4.0, size=(5, 6, 7))
    x[0, 0, :] = -np.inf
    x[1, 1, 1] = -np.inf
    xt = torch.from_numpy(x)
    assert_close(ref_softmax.softmax(x, axis=axis), torch.softmax(xt, dim=axis).numpy())
    assert_close(ref_softmax.log_softmax(x, axis=axis), torch.log_softmax(xt, dim=axis).numpy())
    assert_close(ref_softmax.logsumexp(x, axis=axis), torch.logsumexp(xt, dim=axis).numpy())


def test_softmax_special_values_match_torch():
    torch = pytest.importorskip("torch")
    x = np.array(
        [
            [1.0, 2.0, 3.0],
            [-np.inf, -np.inf, -np.inf],
            [1.0, np.inf, 2.0],
            [1.0, np.nan, 2.0],
            [1e4, -1e4, 0.0],
            [-np.inf, 0.0, 1.0],
        ]
    )
    xt = torch.from_numpy(x)
    assert_close(ref_softmax.softmax(x), torch.softmax(xt, dim=-1).numpy())
    assert_close(ref_softmax.log_softmax(x), torch.log_softmax(xt, dim=-1).numpy())
    assert_close(ref_softmax.logsumexp(x), torch.logsumexp(xt, dim=-1).numpy())


def test_softmax_backward_matches_torch():
    torch = pytest.importorskip("torch")
    r = rng(31)
    x, dy = r.normal(size=(4, 9)), r.normal(size=(4, 9))
    for axis in (0, 1):
        for fwd, bwd, tfn in (
            (ref_softmax.softmax, ref_softmax.softmax_backward, torch.softmax),
            (ref_softmax.log_softmax, ref_softmax.log_softmax_backward, torch.log_softmax),
        ):
            xt = torch.from_numpy(x.copy()).requires_grad_(True)
            tfn(xt, dim=axis).backward(torch.from_numpy(dy))
            assert_close(bwd(fwd(x, axis=axis), dy, axis=axis), xt.grad.numpy())


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy_matches_torch(reduction):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    r = rng(32)
    # (N, C) with the class axis last.
    z = r.normal(scale=3.0, size=(8, 5))
    t = r.integers(0, 5, size=8)
    soft = r.dirichlet(np.ones(5), size=8)
    zt = torch.from_numpy(z)
    expected = F.cross_entropy(zt, torch.from_numpy(t), reduction=reduction).numpy()
    assert_close(ref_ce.cross_entropy(z, t, reduction=reduction), expected)
    expected = F.cross_entropy(zt, torch.from_numpy(soft), reduction=reduction).numpy()
    assert_close(ref_ce.cross_entropy(z, soft, reduction=reduction), expected)
    # (N, C, d1, d2) with the class axis 1, as PyTorch lays it out.
    z = r.normal(size=(2, 4, 3, 2))
    t = r.integers(0, 4, size=(2, 3, 2))
    soft = np.moveaxis(r.dirichlet(np.ones(4), size=(2, 3, 2)), -1, 1)
    zt = torch.from_numpy(z)
    expected = F.cross_entropy(zt, torch.from_numpy(t), reduction=reduction).numpy()
    assert_close(ref_ce.cross_entropy(z, t, axis=1, reduction=reduction), expected)
    expected = F.cross_entropy(zt, torch.from_numpy(soft), reduction=reduction).numpy()
    assert_close(ref_ce.cross_entropy(z, soft, axis=1, reduction=reduction), expected)


def _ce_torch_case(layout, c, kind, variant, r):
    """Logits, target, axis and extra kwargs for one options-vs-torch check.

    Every layout is given to PyTorch as is: (N, C) and (C,) have the classes at the
    reference's axis -1 / 0, (N, C, d1, d2) at axis 1.
    """
    shape, axis = {"nc": ((6, c), -1), "ncdd": ((2, c, 3, 2), 1), "c": ((c,), 0)}[layout]
    z = r.normal(scale=2.0, size=shape)
    sample_shape = shape[:1] + shape[2:] if layout != "c" else ()
    kw = {}
    if kind == "index":
        ignore = -100 if variant == 0 else 2  # default, or a custom value inside [0, C)
        if variant == 1:
            kw["ignore_index"] = 2
        target = r.integers(0, c, size=sample_shape)
        if layout == "c":
            target = np.int64(ignore if r.random() < 0.3 else target)
        else:
            target[r.random(sample_shape) < 0.3] = ignore
            target.flat[0] = min(1, c - 1)  # at least one sample counts
    else:
        target = np.moveaxis(r.dirichlet(np.ones(c), size=sample_shape), -1, axis)
        if variant == 1:
            kw["ignore_index"] = -1  # no effect on probability targets
    return z, target, axis, kw


@pytest.mark.parametrize("layout", ["nc", "ncdd", "c"])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_cross_entropy_options_match_torch(kind, reduction, weighted, eps, layout):
    """Loss and gradient (autograd) against F.cross_entropy, float64, every option."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    r = rng(44)
    for c in (1, 2, 7, 1000):
        for variant in (0, 1):
            z, target, axis, kw = _ce_torch_case(layout, c, kind, variant, r)
            w = r.uniform(0.2, 3.0, size=c) if weighted else None
            kw.update(weight=w, reduction=reduction, label_smoothing=eps)
            loss = ref_ce.cross_entropy(z, target, axis=axis, **kw)
            g = r.normal(size=np.shape(loss)) if reduction == "none" else r.normal()
            grad = ref_ce.cross_entropy_grad(z, target, axis=axis, grad_output=g, **kw)

            zt = torch.from_numpy(z).requires_grad_(True)
            tkw = dict(kw, weight=None if w is None else torch.from_numpy(w))
            expected = F.cross_entropy(zt, torch.as_tensor(target), **tkw)
            expected.backward(torch.as_tensor(g, dtype=torch.float64))
            where = f"c={c} variant={variant}"
            np.testing.assert_allclose(
                loss, expected.detach().numpy(), RTOL, ATOL, equal_nan=True, err_msg=where
            )
            np.testing.assert_allclose(
                grad, zt.grad.numpy(), RTOL, ATOL, equal_nan=True, err_msg=where
            )
            assert grad.shape == z.shape and np.shape(loss) == expected.shape


def _optimizer_run(torch, make_opt, num_steps=50, size=7, seed=33):
    """Initial parameter, a fresh float64 torch parameter + optimizer, and the gradients.

    The gradients are random per step, with per-coordinate scales over six decades
    (so that Adam's per-coordinate step sizes differ).
    """
    r = rng(seed)
    p0 = r.normal(size=size)
    grads = r.normal(size=(num_steps, size)) * np.logspace(-3, 3, size)
    param = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    return p0, grads, param, make_opt([param])


_SGD_CASES = [
    (momentum, dampening, nesterov, weight_decay, maximize)
    for momentum in (0.0, 0.9)
    for dampening in (0.0, 0.5)
    for nesterov in (False, True)
    for weight_decay in (0.0, 0.01)
    for maximize in (False, True)
    if not nesterov or (momentum > 0 and dampening == 0)
]


@pytest.mark.parametrize(
    ("momentum", "dampening", "nesterov", "weight_decay", "maximize"), _SGD_CASES
)
def test_sgd_matches_torch(momentum, dampening, nesterov, weight_decay, maximize):
    torch = pytest.importorskip("torch")
    kw = dict(
        lr=0.01,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=weight_decay,
        maximize=maximize,
    )
    p, grads, param, opt = _optimizer_run(torch, lambda ps: torch.optim.SGD(ps, **kw))
    buf = None
    for k, g in enumerate(grads):
        param.grad = torch.from_numpy(g.copy())
        opt.step()
        p, buf = ref_gd.sgd_step(p, g, buf, **kw)
        where = f"step {k + 1}"
        np.testing.assert_allclose(p, param.detach().numpy(), RTOL, ATOL, err_msg=where)
        if momentum:
            expected = opt.state[param]["momentum_buffer"].numpy()
            np.testing.assert_allclose(buf, expected, RTOL, ATOL, err_msg=where)
        else:
            assert buf is None and "momentum_buffer" not in opt.state[param]


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_adam_matches_torch(decoupled, weight_decay, amsgrad, maximize):
    """50 steps of Adam (decoupled=False) or AdamW (True) against torch, float64."""
    torch = pytest.importorskip("torch")
    hyper = dict(lr=0.01, eps=1e-7, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    torch_opt = torch.optim.AdamW if decoupled else torch.optim.Adam
    p, grads, param, opt = _optimizer_run(
        torch, lambda ps: torch_opt(ps, betas=(0.85, 0.995), **hyper)
    )
    m, v, vmax = np.zeros_like(p), np.zeros_like(p), None
    for t, g in enumerate(grads, start=1):
        param.grad = torch.from_numpy(g.copy())
        opt.step()
        p, m, v, vmax = ref_adam.adam_step(
            p,
            g,
            m,
            v,
            step=t,
            beta1=0.85,
            beta2=0.995,
            decoupled_weight_decay=decoupled,
            max_exp_avg_sq=vmax,
            **hyper,
        )
        state = opt.state[param]
        where = f"step {t}"
        assert int(state["step"]) == t
        np.testing.assert_allclose(p, param.detach().numpy(), RTOL, ATOL, err_msg=where)
        np.testing.assert_allclose(m, state["exp_avg"].numpy(), RTOL, ATOL, err_msg=where)
        np.testing.assert_allclose(v, state["exp_avg_sq"].numpy(), RTOL, ATOL, err_msg=where)
        if amsgrad:
            expected = state["max_exp_avg_sq"].numpy()
            np.testing.assert_allclose(vmax, expected, RTOL, ATOL, err_msg=where)
        else:
            assert vmax is None


_TORCH_CONV2D_CASES = [  # (x shape, w shape, keyword arguments)
    ((2, 3, 9, 8), (4, 3, 3, 2), dict(stride=1, padding=0)),
    ((2, 3, 9, 8), (4, 3, 3, 2), dict(stride=2, padding=1)),
    ((2, 3, 9, 8), (4, 3, 3, 2), dict(stride=(2, 1), padding=(1, 2))),
    ((2, 3, 9, 8), (4, 3, 3, 2), dict(stride=(1, 3), padding=(0, 1))),
    ((1, 5, 7, 11), (3, 5, 5, 3), dict(padding=2)),  # odd sizes
    ((2, 2, 11, 9), (3, 2, 2, 3), dict(stride=(4, 5))),  # stride larger than the kernel
    ((2, 3, 10, 9), (2, 3, 3, 2), dict(dilation=(2, 3), padding=(1, 2))),
    ((2, 3, 10, 9), (2, 3, 3, 2), dict(dilation=2, stride=(2, 3))),
    ((2, 6, 7, 8), (9, 2, 3, 3), dict(groups=3, padding=1, stride=2)),
    ((2, 4, 7, 8), (4, 1, 3, 3), dict(groups=4, padding=1)),  # depthwise
    ((2, 4, 7, 8), (8, 1, 3, 2), dict(groups=4, padding=(1, 2), dilation=(2, 1))),  # depthwise ×2
    ((2, 3, 7, 8), (4, 3, 3, 3), dict(padding="valid", stride=2)),
    ((2, 3, 7, 8), (4, 3, 3, 3), dict(padding="same")),
    ((2, 3, 7, 8), (4, 3, 4, 2), dict(padding="same", dilation=(2, 3))),  # even kernel sizes
    ((2, 4, 7, 8), (6, 2, 2, 5), dict(padding="same", groups=2, dilation=(3, 1))),
    ((5, 5, 6), (4, 5, 3, 3), dict(padding=1)),  # unbatched (C, H, W)
    ((3, 4, 5), (6, 1, 2, 2), dict(padding="same", groups=3)),  # unbatched
    ((0, 3, 5, 6), (4, 3, 3, 3), dict(padding=1, stride=2)),  # N = 0
]


# PyTorch warns that "same" with an even kernel and odd dilation copies the input.
@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel:UserWarning")
@pytest.mark.parametrize(("xshape", "wshape", "kw"), _TORCH_CONV2D_CASES)
def test_conv2d_matches_torch(xshape, wshape, kw):
    torch = pytest.importorskip("torch")
    r = rng(34)
    x, w, b = r.normal(size=xshape), r.normal(size=wshape), r.normal(size=wshape[0])
    for bias in (b, None):
        bt = None if bias is None else torch.from_numpy(bias)
        expected = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), bt, **kw)
        out = ref_conv.conv2d(x, w, bias, **kw)
        assert out.shape == expected.shape and out.dtype == np.float64
        assert_close(out, expected.numpy())


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv2d_padding_modes_match_torch(padding_mode):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    r = rng(35)
    x, w, b = r.normal(size=(2, 4, 6, 7)), r.normal(size=(6, 2, 3, 2)), r.normal(size=6)
    xt, wt, bt = (torch.from_numpy(a) for a in (x, w, b))
    pad_mode = "constant" if padding_mode == "zeros" else padding_mode
    kw = dict(stride=(2, 1), dilation=(1, 2), groups=2)
    # F.pad then an unpadded conv; F.pad orders the sides (left, right, top, bottom).
    for padding, (top, bottom, left, right) in [
        (1, (1, 1, 1, 1)),
        ((2, 3), (2, 2, 3, 3)),
        ((0, 3, 4, 1), (0, 3, 4, 1)),  # (top, bottom, left, right)
        ((5, 1, 0, 6), (5, 1, 0, 6)),  # the largest pads PyTorch takes for reflect
    ]:
        expected = F.conv2d(F.pad(xt, (left, right, top, bottom), mode=pad_mode), wt, bt, **kw)
        out = ref_conv.conv2d(x, w, b, padding=padding, padding_mode=padding_mode, **kw)
        assert_close(out, expected.numpy())
    # torch.nn.Conv2d's own padding_mode, with symmetric and "same" (stride 1) padding.
    for padding in (2, (1, 3), "same", "valid"):
        stride = 1 if padding == "same" else (2, 1)
        conv = torch.nn.Conv2d(
            4, 6, (3, 2), stride, padding, (2, 1), 2, padding_mode=padding_mode, dtype=torch.float64
        )
        with torch.no_grad():
            conv.weight.copy_(wt)
            conv.bias.copy_(bt)
            for xs in (x, x[0], x[:0]):  # batched, unbatched, N = 0
                expected = conv(torch.from_numpy(xs)).numpy()
                out = ref_conv.conv2d(xs, w, b, stride, padding, (2, 1), 2, padding_mode)
                assert out.shape == expected.shape
                assert_close(out, expected)


_TORCH_CONV1D_CASES = [  # (x shape, w shape, keyword arguments)
    ((2, 3, 11), (4, 3, 3), dict()),
    ((2, 3, 11), (4, 3, 4), dict(stride=3, padding=2)),
    ((2, 3, 11), (4, 3, 2), dict(stride=5)),  # stride larger than the kernel
    ((2, 3, 12), (4, 3, 3), dict(dilation=3, padding=(1,))),
    ((2, 6, 9), (9, 2, 3), dict(groups=3, padding=1)),
    ((2, 4, 9), (8, 1, 3), dict(groups=4, stride=2)),  # depthwise ×2
    ((2, 3, 10), (4, 3, 4), dict(padding="same", dilation=3)),  # even kernel, odd total
    ((2, 3, 10), (4, 3, 3), dict(padding="valid")),
    ((3, 10), (4, 3, 3), dict(padding=2)),  # unbatched (C, L)
    ((0, 3, 10), (4, 3, 3), dict(padding=1)),  # N = 0
]


@pytest.mark.parametrize(("xshape", "wshape", "kw"), _TORCH_CONV1D_CASES)
def test_conv1d_matches_torch(xshape, wshape, kw):
    torch = pytest.importorskip("torch")
    r = rng(36)
    x, w, b = r.normal(size=xshape), r.normal(size=wshape), r.normal(size=wshape[0])
    for bias in (b, None):
        bt = None if bias is None else torch.from_numpy(bias)
        expected = torch.nn.functional.conv1d(torch.from_numpy(x), torch.from_numpy(w), bt, **kw)
        out = ref_conv.conv1d(x, w, bias, **kw)
        assert out.shape == expected.shape and out.dtype == np.float64
        assert_close(out, expected.numpy())


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv1d_padding_modes_match_torch(padding_mode):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    r = rng(37)
    x, w, b = r.normal(size=(2, 4, 9)), r.normal(size=(6, 2, 3)), r.normal(size=6)
    xt, wt, bt = (torch.from_numpy(a) for a in (x, w, b))
    pad_mode = "constant" if padding_mode == "zeros" else padding_mode
    for padding, (left, right) in [(2, (2, 2)), ((3,), (3, 3)), ((0, 4), (0, 4)), ((8, 1), (8, 1))]:
        expected = F.conv1d(F.pad(xt, (left, right), mode=pad_mode), wt, bt, 2, 0, 2, 2)
        out = ref_conv.conv1d(x, w, b, 2, padding, 2, 2, padding_mode)
        assert_close(out, expected.numpy())
    for padding in (3, "same"):
        stride = 1 if padding == "same" else 2
        conv = torch.nn.Conv1d(
            4, 6, 3, stride, padding, 3, 2, padding_mode=padding_mode, dtype=torch.float64
        )
        with torch.no_grad():
            conv.weight.copy_(wt)
            conv.bias.copy_(bt)
            for xs in (x, x[1]):
                expected = conv(torch.from_numpy(xs)).numpy()
                assert_close(
                    ref_conv.conv1d(xs, w, b, stride, padding, 3, 2, padding_mode), expected
                )


def _torch_conv_grads(torch, conv, x, w, b, go):
    """(∂L/∂x, ∂L/∂w, ∂L/∂b) of L = Σ go · conv(x, w, b) by PyTorch's autograd."""
    xt, wt, bt = (torch.from_numpy(a.copy()).requires_grad_(True) for a in (x, w, b))
    conv(xt, wt, bt).backward(torch.from_numpy(go))
    return tuple(t.grad.numpy() for t in (xt, wt, bt))


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel:UserWarning")
@pytest.mark.parametrize(("xshape", "wshape", "kw"), _TORCH_CONV2D_CASES)
def test_conv2d_backward_matches_torch(xshape, wshape, kw):
    torch = pytest.importorskip("torch")
    r = rng(45)
    x, w, b = r.normal(size=xshape), r.normal(size=wshape), r.normal(size=wshape[0])
    go = r.normal(size=ref_conv.conv2d(x, w, **kw).shape)
    expected = _torch_conv_grads(
        torch, lambda xt, wt, bt: torch.nn.functional.conv2d(xt, wt, bt, **kw), x, w, b, go
    )
    for got, want in zip(ref_conv.conv2d_backward(x, w, go, **kw), expected, strict=True):
        assert got.shape == want.shape
        assert_close(got, want)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv2d_backward_padding_modes_match_torch(padding_mode):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    r = rng(46)
    x, w, b = r.normal(size=(2, 4, 6, 7)), r.normal(size=(6, 2, 3, 2)), r.normal(size=6)
    pad_mode = "constant" if padding_mode == "zeros" else padding_mode
    kw = dict(stride=(2, 1), dilation=(1, 2), groups=2)
    # F.pad then an unpadded conv; F.pad orders the sides (left, right, top, bottom).
    for padding, (top, bottom, left, right) in [
        ((2, 3), (2, 2, 3, 3)),
        ((0, 3, 4, 1), (0, 3, 4, 1)),
        ((5, 1, 0, 6), (5, 1, 0, 6)),  # the largest pads PyTorch takes for reflect
    ]:

        def conv(xt, wt, bt, sides=(left, right, top, bottom)):
            return F.conv2d(F.pad(xt, sides, mode=pad_mode), wt, bt, **kw)

        go = r.normal(size=ref_conv.conv2d(x, w, padding=padding, **kw).shape)
        expected = _torch_conv_grads(torch, conv, x, w, b, go)
        grads = ref_conv.conv2d_backward(x, w, go, padding=padding, padding_mode=padding_mode, **kw)
        for got, want in zip(grads, expected, strict=True):
            assert_close(got, want)
    # torch.nn.Conv2d's own padding_mode: symmetric and "same" (stride 1) padding,
    # depthwise ×2, batched and unbatched.
    x, w = r.normal(size=(2, 3, 6, 5)), r.normal(size=(6, 1, 3, 2))
    for padding in (1, (2, 1), "same"):
        stride = 1 if padding == "same" else (1, 2)
        layer = torch.nn.Conv2d(
            3, 6, (3, 2), stride, padding, (1, 2), 3, padding_mode=padding_mode, dtype=torch.float64
        )
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(w))
            layer.bias.copy_(torch.from_numpy(b))
        for xs in (x, x[1]):
            xt = torch.from_numpy(xs.copy()).requires_grad_(True)
            go = r.normal(size=ref_conv.conv2d(xs, w, None, stride, padding, (1, 2), 3).shape)
            layer.zero_grad()
            layer(xt).backward(torch.from_numpy(go))
            gx, gw, gb = ref_conv.conv2d_backward(
                xs, w, go, stride, padding, (1, 2), 3, padding_mode
            )
            assert gx.shape == xs.shape
            assert_close(gx, xt.grad.numpy())
            assert_close(gw, layer.weight.grad.numpy())
            assert_close(gb, layer.bias.grad.numpy())


@pytest.mark.parametrize(("xshape", "wshape", "kw"), _TORCH_CONV1D_CASES)
def test_conv1d_backward_matches_torch(xshape, wshape, kw):
    torch = pytest.importorskip("torch")
    r = rng(47)
    x, w, b = r.normal(size=xshape), r.normal(size=wshape), r.normal(size=wshape[0])
    go = r.normal(size=ref_conv.conv1d(x, w, **kw).shape)
    expected = _torch_conv_grads(
        torch, lambda xt, wt, bt: torch.nn.functional.conv1d(xt, wt, bt, **kw), x, w, b, go
    )
    for got, want in zip(ref_conv.conv1d_backward(x, w, go, **kw), expected, strict=True):
        assert got.shape == want.shape
        assert_close(got, want)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv1d_backward_padding_modes_match_torch(padding_mode):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    r = rng(48)
    x, w, b = r.normal(size=(2, 4, 9)), r.normal(size=(6, 2, 3)), r.normal(size=6)
    pad_mode = "constant" if padding_mode == "zeros" else padding_mode
    for padding, sides in [(2, (2, 2)), ((0, 4), (0, 4)), ((8, 1), (8, 1))]:

        def conv(xt, wt, bt, sides=sides):
            return F.conv1d(F.pad(xt, sides, mode=pad_mode), wt, bt, 2, 0, 2, 2)

        for xs in (x, x[0]):  # batched and unbatched
            go = r.normal(size=ref_conv.conv1d(xs, w, None, 2, padding, 2, 2).shape)
            expected = _torch_conv_grads(torch, conv, xs, w, b, go)
            grads = ref_conv.conv1d_backward(xs, w, go, 2, padding, 2, 2, padding_mode)
            for got, want in zip(grads, expected, strict=True):
                assert_close(got, want)


@pytest.mark.parametrize("lq", [1, 5, 7])
def test_attention_matches_torch(lq):
    torch = pytest.importorskip("torch")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    r = rng(35 + lq)
    q = r.normal(size=(2, 3, lq, 8))
    k = r.normal(size=(2, 3, 7, 8))
    v = r.normal(size=(2, 3, 7, 5))
    qt, kt, vt = (torch.from_numpy(a) for a in (q, k, v))
    assert_close(ref_attn.attention(q, k, v), sdpa(qt, kt, vt).numpy())
    assert_close(ref_attn.attention(q, k, v, causal=True), sdpa(qt, kt, vt, is_causal=True).numpy())
    assert_close(ref_attn.attention(q, k, v, scale=0.2), sdpa(qt, kt, vt, scale=0.2).numpy())
    mask = r.random((lq, 7)) < 0.5
    mask[:, 3] = True  # no fully masked rows (PyTorch gives NaN there)
    expected = sdpa(qt, kt, vt, attn_mask=torch.from_numpy(mask)).numpy()
    assert_close(ref_attn.attention(q, k, v, mask=mask), expected)
    bias = r.normal(size=(3, lq, 7))
    expected = sdpa(qt, kt, vt, attn_mask=torch.from_numpy(bias)).numpy()
    assert_close(ref_attn.attention(q, k, v, mask=bias), expected)


def _sdpa_grads(torch, q, k, v, go, **kw):
    qt, kt, vt = (torch.from_numpy(a.copy()).requires_grad_(True) for a in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, **kw)
    out.backward(torch.from_numpy(go))
    return out.detach().numpy(), qt.grad.numpy(), kt.grad.numpy(), vt.grad.numpy()


@pytest.mark.parametrize("lq", [1, 5, 7])
def test_attention_gqa_and_backward_match_torch(lq):
    torch = pytest.importorskip("torch")
    r = rng(50 + lq)
    q, k, v = r.normal(size=(2, 6, lq, 8)), r.normal(size=(2, 2, 7, 8)), r.normal(size=(2, 2, 7, 5))
    go = r.normal(size=(2, 6, lq, 5))
    mask = r.random((6, lq, 7)) < 0.5
    mask[..., 3] = True  # no fully masked rows (PyTorch gives NaN there)
    bias = r.normal(size=(2, 1, lq, 7))
    lower = np.tril(np.ones((lq, 7), dtype=bool), k=7 - lq)
    cases = [
        ({}, {}),
        ({"causal": True}, {"is_causal": True}),
        ({"mask": mask}, {"attn_mask": torch.from_numpy(mask)}),
        ({"mask": bias, "scale": 0.3}, {"attn_mask": torch.from_numpy(bias), "scale": 0.3}),
        ({"causal": "lower_right"}, {"attn_mask": torch.from_numpy(lower)}),
    ]
    for ours, theirs in cases:
        want, dq_t, dk_t, dv_t = _sdpa_grads(torch, q, k, v, go, enable_gqa=True, **theirs)
        out, lse = ref_attn.attention(q, k, v, return_lse=True, **ours)
        assert_close(out, want)
        dq, dk, dv = ref_attn.attention_backward(q, k, v, out, lse, go, **ours)
        assert_close(dq, dq_t)
        assert_close(dk, dk_t)
        assert_close(dv, dv_t)
    # The logsumexp against torch.logsumexp of the explicitly masked scores.
    s = torch.from_numpy(q) @ torch.from_numpy(k).repeat_interleave(3, dim=1).transpose(-1, -2)
    s = s / math.sqrt(8) + torch.from_numpy(bias)
    s = s.masked_fill(~torch.from_numpy(mask), -math.inf)
    _, lse = ref_attn.attention(q, k, v, mask=bias + np.where(mask, 0.0, -np.inf), return_lse=True)
    assert_close(lse, torch.logsumexp(s, dim=-1).numpy())


def test_conv_one_element_sequences_repeat_as_in_torch():
    """reference.convolution takes (2,) for 2, as PyTorch and the package do (issue 23)."""
    x = np.random.default_rng(3).standard_normal((1, 2, 7, 6))
    w = np.random.default_rng(4).standard_normal((3, 2, 3, 3))
    got = ref_conv.conv2d(x, w, stride=(2,), padding=[1], dilation=(1,))
    np.testing.assert_array_equal(got, ref_conv.conv2d(x, w, stride=2, padding=1, dilation=1))
