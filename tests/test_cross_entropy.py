"""Fused cross-entropy (loss and gradient) against the float64 reference and PyTorch, over every
option, both target kinds, both layouts, the vector-width tails of C, extreme logits and both
dtypes; run once per ISA path by the CI."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlmath_native as mn
from mlmath_native.reference import cross_entropy as ref

from conftest import assert_close

DTYPES = [np.float32, np.float64]
CLASSES = [1, 2, 7, 8, 9, 17, 33, 1000]


def make_case(rng, num_classes, layout, kind, dtype, ignore_some=True, scale=3.0):
    """logits, target, axis for one test case."""
    if layout == "rows":
        shape, axis = (11, num_classes), -1
    else:  # PyTorch's (N, C, d1, d2) layout, classes on a strided axis
        shape, axis = (2, num_classes, 3, 21), 1
    logits = (rng.standard_normal(shape) * scale).astype(dtype)
    elem_shape = shape[:1] + shape[2:] if layout == "cols" else shape[:1]
    if kind == "index":
        target = rng.integers(0, num_classes, elem_shape)
        if ignore_some:
            target.flat[::5] = -100
    else:
        target = rng.random(shape)
        target /= target.sum(axis=axis, keepdims=True)
        target = target.astype(dtype)
    return logits, target, axis


def check(logits, target, axis, **opts):
    """Loss and gradient against the reference, with tolerances scaled by C and |logits|."""
    dtype = logits.dtype
    num_classes = logits.shape[axis]
    loss, grad = mn.cross_entropy(logits, target, axis=axis, return_grad=True, **opts)
    ref_opts = {k: v for k, v in opts.items() if k != "grad_output"}
    want_loss = ref.cross_entropy(
        logits.astype(np.float64), _ref_target(target), axis=axis, **ref_opts
    )
    want_grad = ref.cross_entropy_grad(
        logits.astype(np.float64),
        _ref_target(target),
        axis=axis,
        grad_output=opts.get("grad_output"),
        **ref_opts,
    )
    assert grad.shape == logits.shape and grad.dtype == dtype
    assert np.asarray(loss).dtype == dtype
    spread = 1.0 + float(np.max(np.abs(logits[np.isfinite(logits)]), initial=0.0))
    assert_close(loss, want_loss, dtype, num_classes, atol_scale=spread, cond=spread)
    # absolute error of a gradient entry: rounding of terms as large as |grad_output| * max w
    g = opts.get("grad_output")
    w = opts.get("weight")
    magnitude = float(np.max(np.abs(1.0 if g is None else g))) * float(
        np.max(np.abs(1.0 if w is None else w), initial=0.0)
    )
    gscale = max(float(np.max(np.abs(want_grad), initial=0.0)), magnitude)
    assert_close(grad, want_grad, dtype, num_classes, atol_scale=gscale, cond=spread)
    # the loss-only call gives the same loss
    loss_only = mn.cross_entropy(logits, target, axis=axis, **ref_opts)
    np.testing.assert_array_equal(loss_only, loss)
    return loss, grad


def _ref_target(target):
    return target.astype(np.float64) if target.dtype.kind == "f" else target


OPTION_GRID = [
    dict(reduction=r, weight=w, label_smoothing=e)
    for r, w, e in itertools.product(["none", "mean", "sum"], [None, "random"], [0.0, 0.1, 1.0])
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("num_classes", CLASSES)
def test_every_option_against_reference(num_classes, kind, layout, dtype, rng):
    logits, target, axis = make_case(rng, num_classes, layout, kind, dtype)
    for opts in OPTION_GRID:
        opts = dict(opts)
        if opts["weight"] == "random":
            opts["weight"] = (rng.random(num_classes) + 0.25).astype(dtype)
        if opts["reduction"] == "none":
            elem_shape = (
                logits.shape[:1] + logits.shape[2:] if layout == "cols" else logits.shape[:1]
            )
            opts["grad_output"] = rng.standard_normal(elem_shape).astype(dtype)
        else:
            opts["grad_output"] = 0.5
        check(logits, target, axis, **opts)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_vocabulary_tail(dtype, rng):
    # C = 32001: long rows that are not a multiple of any vector width
    logits = (rng.standard_normal((3, 32001)) * 4).astype(dtype)
    target = np.array([0, 32000, 17])
    check(logits, target, -1, weight=(rng.random(32001) + 0.5).astype(dtype), label_smoothing=0.1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["rows", "cols"])
def test_custom_ignore_index(dtype, layout, rng):
    logits, target, axis = make_case(rng, 9, layout, "index", dtype, ignore_some=False)
    target.flat[::3] = 2  # class 2 doubles as the ignored label
    for opts in ({}, {"label_smoothing": 0.2, "reduction": "sum"}):
        loss, grad = check(logits, target, axis, ignore_index=2, **opts)
    ignored = np.expand_dims(target == 2, axis)
    assert np.all(np.where(np.broadcast_to(ignored, grad.shape), grad, 0) == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_logits(dtype):
    logits = np.array(
        [
            [1e4, 0.0, -1e4, 5.0],
            [-1e4, -1e4, -1e4, -1e4],
            [0.0, -np.inf, -np.inf, 3.0],  # -inf in non-target classes is allowed
            [1e4, 1e4, -np.inf, 0.0],
        ],
        dtype=dtype,
    )
    target = np.array([0, 3, 3, 1])
    for opts in ({}, {"reduction": "none"}, {"weight": np.array([1.0, 2.0, 0.5, 1.0], dtype)}):
        loss, grad = check(logits, target, -1, **opts)
        assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))


def test_smoothing_puts_mass_on_minus_inf_classes_gives_inf():
    logits = np.array([[0.0, -np.inf, 1.0]])
    assert mn.cross_entropy(logits, np.array([0]), label_smoothing=0.1) == np.inf


def test_all_ignored_mean_is_nan_and_gradient_zero():
    logits = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    target = np.full(4, -100)
    loss, grad = mn.cross_entropy(logits, target, return_grad=True)
    assert np.isnan(loss)
    assert np.all(grad == 0)
    assert mn.cross_entropy(logits, target, reduction="sum") == 0


def test_empty_batch():
    logits = np.zeros((0, 5), np.float32)
    assert np.isnan(mn.cross_entropy(logits, np.zeros(0, np.int64)))
    loss, grad = mn.cross_entropy(logits, np.zeros(0, np.int64), reduction="none", return_grad=True)
    assert loss.shape == (0,) and grad.shape == (0, 5)


def test_one_dimensional_logits_one_sample(rng):
    logits = rng.standard_normal(6)
    loss = mn.cross_entropy(logits, np.array(4))
    assert np.isclose(loss, -np.log(np.exp(logits[4]) / np.exp(logits).sum()))


def test_non_contiguous_and_integer_inputs(rng):
    base = rng.standard_normal((8, 40))
    logits = base[::2, ::3]  # non-contiguous view
    target = np.array([0, 13, 5, 2], dtype=np.int8)
    check(logits, target, -1)
    ints = rng.integers(-3, 3, (4, 6))
    loss = mn.cross_entropy(ints, np.array([1, 2, 3, 4], dtype=np.uint8))
    assert np.asarray(loss).dtype == np.float64


def test_threads_do_not_change_results(rng, threads):
    logits = rng.standard_normal((256, 999)).astype(np.float32)
    target = rng.integers(0, 999, 256)
    cols = rng.standard_normal((4, 50, 300)).astype(np.float32)
    cols_target = rng.integers(0, 50, (4, 300))
    results = []
    for t in (1, 2, 3):
        mn.set_num_threads(t)
        results.append(
            [
                *mn.cross_entropy(logits, target, label_smoothing=0.1, return_grad=True),
                *mn.cross_entropy(cols, cols_target, axis=1, reduction="none", return_grad=True),
            ]
        )
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


def test_gradient_against_central_differences(rng):
    logits = rng.standard_normal((3, 5))
    cases = [
        (np.array([1, -100, 4]), dict(weight=rng.random(5) + 0.5, label_smoothing=0.3)),
        (rng.dirichlet(np.ones(5), 3), dict(weight=rng.random(5) + 0.5, label_smoothing=0.2)),
    ]
    h = 1e-6
    for target, opts in cases:
        _, grad = mn.cross_entropy(logits, target, return_grad=True, **opts)
        numeric = np.zeros_like(logits)
        for idx in np.ndindex(logits.shape):
            e = np.zeros_like(logits)
            e[idx] = h
            up = mn.cross_entropy(logits + e, target, **opts)
            down = mn.cross_entropy(logits - e, target, **opts)
            numeric[idx] = (up - down) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("layout", ["rows", "cols"])
def test_against_pytorch(kind, layout, rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    for num_classes, dtype in [(7, np.float32), (33, np.float64), (1000, np.float32)]:
        logits, target, axis = make_case(rng, num_classes, layout, kind, dtype)
        weight = (rng.random(num_classes) + 0.5).astype(dtype)
        for reduction, eps in [("mean", 0.0), ("sum", 0.1), ("none", 0.25)]:
            xt = torch.tensor(logits, requires_grad=True)
            tt = torch.tensor(target)
            lt = F.cross_entropy(
                xt, tt, weight=torch.tensor(weight), reduction=reduction, label_smoothing=eps
            )
            lt.sum().backward()
            loss, grad = mn.cross_entropy(
                logits,
                target,
                axis=axis,
                weight=weight,
                reduction=reduction,
                label_smoothing=eps,
                return_grad=True,
            )
            tol = 1e-5 if dtype == np.float32 else 1e-12
            np.testing.assert_allclose(loss, lt.detach().numpy(), rtol=tol, atol=tol)
            np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=tol, atol=tol)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(0, 9),
    st.sampled_from(["index", "prob"]),
    st.sampled_from(["rows", "cols"]),
    st.sampled_from(DTYPES),
    st.sampled_from(["none", "mean", "sum"]),
    st.floats(0, 1),
)
def test_hypothesis(num_classes, seed, kind, layout, dtype, reduction, eps):
    rng = np.random.default_rng(seed)
    logits, target, axis = make_case(rng, num_classes, layout, kind, dtype)
    check(logits, target, axis, reduction=reduction, label_smoothing=eps)


# -- issue 17 regressions -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_large_common_offset(kind, layout, dtype, rng):
    """lse - x was formed as (m + log s) - x: with logits 1e8 + small the loss was 0 (exact:
    log C); every term must be a difference of shifted logits (Note [shifted logits])."""
    offsets = [1e8, -1e8, 3e38, -3e38] if dtype == np.float32 else [1e17, 1e300, -1e300]
    for offset in offsets:
        for num_classes in [2, 7, 9, 33]:
            logits, target, axis = make_case(rng, num_classes, layout, kind, dtype)
            offset = float(dtype(offset))  # representable
            ulp = float(np.spacing(np.abs(dtype(offset))))
            k = rng.integers(0, 4, logits.shape)
            logits = (np.float64(offset) + k * ulp).astype(dtype)
            for eps in [0.0, 0.2]:
                weight = (rng.random(num_classes) + 0.5).astype(dtype)
                loss, grad = mn.cross_entropy(
                    logits,
                    target,
                    axis=axis,
                    weight=weight,
                    label_smoothing=eps,
                    reduction="none",
                    return_grad=True,
                )
                ref_opts = dict(axis=axis, weight=weight, label_smoothing=eps, reduction="none")
                x64 = logits.astype(np.float64)
                want = ref.cross_entropy(x64, _ref_target(target), **ref_opts)
                want_grad = ref.cross_entropy_grad(x64, _ref_target(target), **ref_opts)
                # x - m is exact here, so the error scales with the logits' spread (k * ulp),
                # not with their magnitude
                spread = 1.0 + 4 * ulp
                assert_close(loss, want, dtype, num_classes, atol_scale=spread)
                assert_close(grad, want_grad, dtype, num_classes, atol_scale=1.0)


def test_large_offset_reproducer():
    x = np.full((2, 3), 1e8, np.float32)
    np.testing.assert_allclose(
        mn.cross_entropy(x, np.array([0, 1]), reduction="none"), [np.log(3)] * 2, rtol=1e-6
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_nonfinite_class_weight_stays_in_its_rows(reduction, layout, bad, rng):
    """A NaN/Inf weight of class 1 made every row's gradient NaN (0 * W with W = sum of the
    weights); as in PyTorch, only rows whose target is that class may see it."""
    torch = pytest.importorskip("torch")
    num_classes = 9
    logits, target, axis = make_case(rng, num_classes, layout, "index", np.float32)
    target[target == 1] = 0
    target.flat[3] = 1  # exactly one row of class 1
    weight = (rng.random(num_classes) + 0.5).astype(np.float32)
    weight[1] = bad
    if reduction == "mean":  # PyTorch divides by the summed target weights: the bad row is out
        target.flat[3] = -100
    loss, grad = mn.cross_entropy(
        logits, target, axis=axis, weight=weight, reduction=reduction, return_grad=True
    )
    xt = torch.tensor(logits, requires_grad=True)
    lt = torch.nn.functional.cross_entropy(
        xt, torch.tensor(target), weight=torch.tensor(weight), reduction=reduction
    )
    lt.sum().backward()
    want = xt.grad.numpy()
    np.testing.assert_array_equal(np.isfinite(grad), np.isfinite(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(grad[fin], want[fin], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, lt.detach().numpy(), rtol=1e-5, atol=1e-6, equal_nan=True)
    # and only the rows of class 1 are non-finite
    bad_rows = np.moveaxis(~np.isfinite(grad), axis, -1).any(axis=-1)
    np.testing.assert_array_equal(bad_rows, target == 1)
