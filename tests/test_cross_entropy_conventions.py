"""cross_entropy's PyTorch conventions beyond the loss (issue 23): the gradient with respect to
probability targets (what autograd gives a target that requires grad) and ``out=`` for the
logits' gradient."""

from __future__ import annotations

import numpy as np
import pytest

import mlmath_native as mn

torch = pytest.importorskip("torch")
F = torch.nn.functional


def probabilities(rng, shape, axis):
    axis %= len(shape)
    p = rng.dirichlet(np.ones(shape[axis]), tuple(n for i, n in enumerate(shape) if i != axis))
    return np.moveaxis(p, -1, axis).copy()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape,axis", [((6, 7), -1), ((3, 5, 4, 2), 1), ((1, 1), 1), ((0, 4), 1)])
def test_target_grad_matches_autograd(shape, axis, reduction, smoothing, weighted, rng):
    x = rng.standard_normal(shape) * 3
    y = probabilities(rng, shape, axis) if shape[0] else np.zeros(shape)
    classes = shape[axis]
    w = rng.uniform(0.5, 2, classes) if weighted else None
    elem = tuple(n for i, n in enumerate(shape) if i != axis % len(shape))
    g = rng.standard_normal(elem) if reduction == "none" else 1.7
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.tensor(y, requires_grad=True)
    tw = None if w is None else torch.tensor(w)
    logits_t = tx if axis in (1, -len(shape) + 1) or len(shape) == 2 else tx.movedim(axis, 1)
    target_t = ty if logits_t is tx else ty.movedim(axis, 1)
    loss_t = F.cross_entropy(
        logits_t, target_t, weight=tw, reduction=reduction, label_smoothing=smoothing
    )
    loss_t.backward(torch.tensor(g, dtype=torch.float64))
    loss, dlogits, dtarget = mn.cross_entropy(
        x,
        y,
        axis=axis,
        weight=w,
        reduction=reduction,
        label_smoothing=smoothing,
        return_grad=True,
        return_target_grad=True,
        grad_output=g,
    )
    np.testing.assert_allclose(loss, loss_t.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dlogits, tx.grad.numpy(), rtol=1e-12, atol=1e-12)
    assert dtarget.shape == y.shape and dtarget.dtype == y.dtype
    np.testing.assert_allclose(dtarget, ty.grad.numpy(), rtol=1e-12, atol=1e-12)
    # alone, after the loss
    loss2, dtarget2 = mn.cross_entropy(
        x,
        y,
        axis=axis,
        weight=w,
        reduction=reduction,
        label_smoothing=smoothing,
        return_target_grad=True,
        grad_output=g,
    )
    np.testing.assert_array_equal(dtarget2, dtarget)


def test_target_grad_by_central_differences(rng):
    x = rng.standard_normal((3, 5))
    y = probabilities(rng, (3, 5), 1)
    _, dtarget = mn.cross_entropy(x, y, label_smoothing=0.1, return_target_grad=True)
    h = 1e-6
    for idx in np.ndindex(y.shape):
        up, down = y.copy(), y.copy()
        up[idx] += h
        down[idx] -= h
        numeric = (
            mn.cross_entropy(x, up, label_smoothing=0.1)
            - mn.cross_entropy(x, down, label_smoothing=0.1)
        ) / (2 * h)
        assert abs(dtarget[idx] - numeric) < 1e-7


def test_target_grad_in_float32_and_16_bits(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = rng.standard_normal((16, 33)).astype(np.float32)
    y = probabilities(rng, (16, 33), 1).astype(np.float32)
    _, dt32 = mn.cross_entropy(x, y, return_target_grad=True)
    want = -np.log(mn.softmax(x.astype(np.float64))) / 16
    assert dt32.dtype == np.float32
    np.testing.assert_allclose(dt32, want, rtol=1e-5)
    bf = ml_dtypes.bfloat16
    _, dt16 = mn.cross_entropy(x.astype(bf), y.astype(bf), return_target_grad=True)
    assert dt16.dtype == bf
    want = -np.log(mn.softmax(x.astype(bf).astype(np.float64))) / 16
    np.testing.assert_allclose(dt16.astype(np.float64), want, rtol=2**-7)


def test_target_grad_needs_probability_targets():
    with pytest.raises(ValueError, match="return_target_grad needs probability targets"):
        mn.cross_entropy(np.zeros((2, 3)), np.array([0, 1]), return_target_grad=True)


# -- out= for the gradient ------------------------------------------------------------------------


@pytest.mark.parametrize("target_kind", ["index", "prob"])
def test_out_receives_the_gradient(target_kind, rng):
    x = rng.standard_normal((5, 9)).astype(np.float32)
    y = rng.integers(0, 9, 5) if target_kind == "index" else probabilities(rng, (5, 9), 1)
    y = y if target_kind == "index" else y.astype(np.float32)
    loss, want = mn.cross_entropy(x, y, return_grad=True)
    out = np.full((5, 9), 7, np.float32)
    got_loss, got = mn.cross_entropy(x, y, return_grad=True, out=out)
    assert got is out and got_loss == loss
    np.testing.assert_array_equal(out, want)
    strided = np.zeros((9, 5), np.float32).T  # not contiguous: through a temporary
    assert mn.cross_entropy(x, y, return_grad=True, out=strided)[1] is strided
    np.testing.assert_array_equal(strided, want)
    x_copy = x.copy()
    assert mn.cross_entropy(x_copy, y, return_grad=True, out=x_copy)[1] is x_copy  # in place
    np.testing.assert_array_equal(x_copy, want)


@pytest.mark.parametrize(
    "kw,error,match",
    [
        (dict(out=np.zeros((5, 9), np.float32)), ValueError, "needs return_grad=True"),
        (dict(return_grad=True, out=np.zeros((5, 8))), ValueError, "out has shape"),
        (dict(return_grad=True, out=np.zeros((5, 9), np.float32)), TypeError, "out has dtype"),
    ],
)
def test_bad_out_raises_and_writes_nothing(kw, error, match, rng):
    x = rng.standard_normal((5, 9))
    y = rng.integers(0, 9, 5)
    out = kw["out"]
    before = out.copy()
    with pytest.raises(error, match=match):
        mn.cross_entropy(x, y, **kw)
    np.testing.assert_array_equal(out, before)
