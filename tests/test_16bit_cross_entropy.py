"""cross_entropy on bfloat16 and float16 logits: float32 loss, gradient in the logits' dtype
rounded once; against the float64 golden and PyTorch in the same dtype (tests/sixteen.py), on
every ISA path."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sixteen import (
    HALF_NAMES,
    assert_16bit_close,
    dtype_of,
    optional_torch,
    random,
    to_torch,
    widen,
)

import mlmath_native as mn
from mlmath_native.reference import cross_entropy as ref

from conftest import assert_close

CLASSES = [1, 2, 7, 8, 9, 17, 33, 100]
OPTIONS = [
    dict(reduction=r, weight=w, label_smoothing=e)
    for r, w, e in itertools.product(["none", "mean", "sum"], [None, "random"], [0.0, 0.1])
]


def make_case(rng, num_classes, layout, kind, dtype, batch=5):
    if layout == "rows":
        logits, axis, elem = random(rng, (batch, num_classes), dtype, 3.0), -1, (batch,)
    else:
        logits, axis, elem = random(rng, (batch, num_classes, 3), dtype, 3.0), 1, (batch, 3)
    if kind == "index":
        target = rng.integers(0, num_classes, elem)
    else:
        p = rng.random(logits.shape)
        target = (p / p.sum(axis=axis, keepdims=True)).astype(dtype)
    return logits, target, axis


def torch_grad(logits, target, axis, opts):
    """PyTorch's gradient of F.cross_entropy in the logits' 16-bit dtype."""
    torch = optional_torch()
    if torch is None:
        return None
    t = to_torch(logits).requires_grad_()  # (N, C) or (N, C, d): classes on axis 1
    tt = torch.from_numpy(target) if target.dtype.kind in "iu" else to_torch(target)
    w = opts.get("weight")
    loss = torch.nn.functional.cross_entropy(
        t,
        tt,
        weight=None if w is None else torch.from_numpy(np.asarray(w)).to(t.dtype),
        reduction=opts["reduction"],
        label_smoothing=opts["label_smoothing"],
    )
    g = opts.get("grad_output")
    loss.backward(torch.ones_like(loss) if g is None else torch.as_tensor(g).to(t.dtype))
    return t.grad


def check(logits, target, axis, **opts):
    dtype = logits.dtype
    loss, grad = mn.cross_entropy(logits, target, axis=axis, return_grad=True, **opts)
    ref_target = widen(target) if target.dtype.kind not in "iu" else target
    ref_opts = {k: v for k, v in opts.items() if k != "grad_output"}
    golden_loss = ref.cross_entropy(widen(logits), ref_target, axis=axis, **ref_opts)
    golden_grad = ref.cross_entropy_grad(
        widen(logits), ref_target, axis=axis, grad_output=opts.get("grad_output"), **ref_opts
    )
    c = logits.shape[axis]
    assert np.asarray(loss).dtype == np.float32
    spread = 1.0 + float(np.max(np.abs(widen(logits)), initial=0.0))
    assert_close(loss, golden_loss, np.float32, c, atol_scale=spread, cond=spread)
    g = opts.get("grad_output")
    w = opts.get("weight")
    magnitude = float(np.max(np.abs(1.0 if g is None else g))) * float(
        np.max(np.abs(1.0 if w is None else w), initial=0.0)
    )
    if opts["reduction"] == "mean":
        magnitude /= max(np.prod(np.shape(loss)) or 1, 1)
    scale = max(float(np.max(np.abs(golden_grad), initial=0.0)), magnitude)
    assert_16bit_close(
        grad,
        golden_grad,
        dtype,
        n=c,
        atol_u=1.0,
        scale=scale,
        torch_result=torch_grad(logits, target, axis, opts),
    )
    return loss, grad


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("num_classes", CLASSES)
def test_every_option(num_classes, kind, layout, dtype_name, rng):
    dtype = dtype_of(dtype_name)
    logits, target, axis = make_case(rng, num_classes, layout, kind, dtype)
    for opts in OPTIONS:
        opts = dict(opts)
        if opts["weight"] == "random":
            opts["weight"] = (rng.random(num_classes) + 0.25).astype(np.float32)
        if opts["reduction"] == "none":
            opts["grad_output"] = rng.standard_normal(
                np.shape(target)[:1] + ((3,) if layout == "cols" else ())
            ).astype(np.float32)
        check(logits, target, axis, **opts)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_large_vocabulary_and_threads(dtype_name, rng, threads):
    dtype = dtype_of(dtype_name)
    logits = random(rng, (6, 32003), dtype, 2.0)
    target = rng.integers(0, 32003, 6)
    mn.set_num_threads(2)
    loss2, grad2 = check(logits, target, -1, reduction="mean", label_smoothing=0.0)
    mn.set_num_threads(1)
    loss1, grad1 = mn.cross_entropy(logits, target, return_grad=True)
    np.testing.assert_array_equal(loss1, loss2)
    np.testing.assert_array_equal(widen(grad1), widen(grad2))


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
@pytest.mark.parametrize("layout", ["rows", "cols"])
def test_ignore_index_zero_rows(dtype_name, layout, rng):
    dtype = dtype_of(dtype_name)
    logits, target, axis = make_case(rng, 9, layout, "index", dtype)
    target[0] = -100
    loss, grad = mn.cross_entropy(logits, target, axis=axis, return_grad=True, reduction="none")
    assert not widen(grad[0]).any() and not np.asarray(loss[0]).any()
    check(logits, target, axis, reduction="sum", label_smoothing=0.1)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_non_contiguous_logits(dtype_name, rng):
    dtype = dtype_of(dtype_name)
    logits = random(rng, (8, 40), dtype, 2.0)[::2, 1::2]
    target = rng.integers(0, logits.shape[1], logits.shape[0])
    check(logits, target, -1, reduction="mean", label_smoothing=0.0)


@pytest.mark.parametrize("dtype_name", HALF_NAMES)
def test_extreme_and_nonfinite_logits(dtype_name):
    dtype = dtype_of(dtype_name)
    big = 60000.0 if dtype_name == "float16" else 3.0e38
    logits = np.array([[big, -big, 0.0], [0.0, np.nan, 1.0], [-np.inf, 0.0, 1.0]]).astype(dtype)
    target = np.array([1, 0, 2])
    loss, grad = mn.cross_entropy(logits, target, return_grad=True, reduction="none")
    golden = ref.cross_entropy(widen(logits), target, reduction="none")
    golden_grad = ref.cross_entropy_grad(widen(logits), target, reduction="none")
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(golden))
    # 2 big: finite in float32 for float16 logits, past float32's range (inf) for bfloat16
    with np.errstate(over="ignore"):
        np.testing.assert_allclose(loss[0], golden[0].astype(np.float32), rtol=1e-6)
    np.testing.assert_array_equal(np.isnan(widen(grad)), np.isnan(golden_grad))


def test_mixed_dtypes_follow_the_logits(rng):
    bf16 = dtype_of("bfloat16")
    logits = random(rng, (4, 6), bf16)
    probs = rng.random((4, 6)).astype(np.float32)
    loss, grad = mn.cross_entropy(
        logits, probs, weight=np.ones(6, np.float64), return_grad=True, grad_output=2.0
    )
    assert grad.dtype == bf16 and np.asarray(loss).dtype == np.float32
    want = mn.cross_entropy(logits, probs.astype(bf16), weight=np.ones(6, np.float32))
    np.testing.assert_array_equal(loss, want)
