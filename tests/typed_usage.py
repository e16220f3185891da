"""A small, fully annotated program using mlmath_native's public API.

Not a pytest module: tests/test_typing.py checks it with ``mypy --strict`` (the package ships
``py.typed`` and a stub of the compiled module, so the annotations of the public functions are
what user code sees) and runs it.  Arrays are small: it runs in well under a second.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

import mlmath_native as mn
from mlmath_native.optim import GradientDescentResult, StepResult

Array = NDArray[Any]


def setup() -> dict[str, Any]:
    """Facts about the build; two threads for the rest of the program."""
    info = mn.build_info()
    mn.set_num_threads(2)
    assert mn.get_num_threads() == 2
    return info


def softmax_family(rng: np.random.Generator) -> None:
    x: Array = rng.standard_normal((4, 6))
    p = mn.softmax(x, axis=-1)
    logp = mn.log_softmax(x, axis=1)
    lse = mn.logsumexp(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(logp, x - lse)
    np.testing.assert_allclose(p.sum(axis=-1), np.ones(4))
    total = mn.logsumexp(x.ravel())  # a NumPy scalar for a 1-D input
    assert float(total) > float(np.max(x))
    dx = mn.softmax_backward(p, np.ones_like(p))
    assert float(np.abs(dx).max()) < 1e-12


def linear_classifier(rng: np.random.Generator, steps: int = 5) -> list[float]:
    """Softmax regression trained with Adam: matmul, cross_entropy (loss and gradient in one
    pass), the weight gradient by matmul, and an optimizer step."""
    x = rng.standard_normal((16, 5)).astype(np.float32)
    labels = rng.integers(0, 3, size=16)
    w = np.zeros((5, 3), np.float32)
    b = np.zeros(3, np.float32)
    opt = mn.Adam([w, b], lr=0.05, max_grad_norm=10.0)
    losses: list[float] = []
    for _ in range(steps):
        logits = mn.matmul(x, w) + b
        loss, dlogits = mn.cross_entropy(logits, labels, label_smoothing=0.1, return_grad=True)
        result: StepResult = opt.step([mn.matmul(x.T, dlogits), dlogits.sum(axis=0)])
        assert result.applied and result.grad_norm is not None
        losses.append(float(loss))
    per_sample = mn.cross_entropy(mn.matmul(x, w), labels, reduction="none")
    assert per_sample.shape == (16,)
    assert losses[-1] < losses[0]
    return losses


def convolution(rng: np.random.Generator) -> Array:
    x = rng.standard_normal((2, 3, 8, 8))
    w = rng.standard_normal((4, 3, 3, 3))
    bias = np.zeros(4)
    y = mn.conv2d(x, w, bias, stride=1, padding="same")
    assert y.shape == (2, 4, 8, 8)
    gx, gw, gb = mn.conv2d_backward(x, w, np.ones_like(y), padding="same")
    assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == (4,)
    only_w = mn.conv2d_backward(x, w, np.ones_like(y), padding="same", needs=("weight",))[1]
    assert only_w is not None
    np.testing.assert_allclose(only_w, gw)
    opt = mn.SGD(w, lr=0.01, momentum=0.9)
    opt.step(gw)
    return w


def self_attention(rng: np.random.Generator) -> tuple[Array, Array, Array]:
    q, k, v = (rng.standard_normal((2, 4, 5, 8)) for _ in range(3))
    out, lse = mn.attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == (2, 4, 5, 8) and lse.shape == (2, 4, 5)
    plain: Array = mn.attention(q, k, v, causal=True)
    np.testing.assert_allclose(plain, out)
    return mn.attention_backward(q, k, v, out, lse, np.ones_like(out), causal=True)


def attention_with_sinks(rng: np.random.Generator) -> Array:
    """With sinks the backward's fourth result is dsinks (its own overload)."""
    q, k, v = (rng.standard_normal((4, 5, 8)) for _ in range(3))
    sinks, slopes = np.zeros(4), np.full(4, 0.1)
    out, lse = mn.attention(
        q, k, v, window=(2, None), softcap=5.0, sinks=sinks, alibi_slopes=slopes, return_lse=True
    )
    dq, dk, dv, dsinks = mn.attention_backward(
        q,
        k,
        v,
        out,
        lse,
        np.ones_like(out),
        window=(2, None),
        softcap=5.0,
        sinks=sinks,
        alibi_slopes=slopes,
    )
    assert dq.shape == q.shape and dsinks.shape == (4,)
    return dsinks


def minimise() -> GradientDescentResult:
    """argmin of |x - 3|^2 by gradient descent, stopping early from a callback."""
    target = np.full(3, 3.0)

    def grad(x: Array) -> tuple[float, Array]:
        d = x - target
        return float(d @ d), 2.0 * d

    def stop(step: int, x: Array, value: float) -> bool:
        return value < 1e-10

    res = mn.gradient_descent(grad, np.zeros(3), lr=0.1, steps=500, callback=stop)
    np.testing.assert_allclose(res.x, target, atol=1e-4)
    return res


def main() -> None:
    info = setup()
    rng = np.random.default_rng(0)
    softmax_family(rng)
    losses = linear_classifier(rng)
    convolution(rng)
    dq, dk, dv = self_attention(rng)
    attention_with_sinks(rng)
    res = minimise()
    print(
        f"mlmath_native {mn.__version__} ({info['isa']}): loss {losses[0]:.3f} -> "
        f"{losses[-1]:.3f}; |dq| {float(np.abs(dq).max()):.3f}; "
        f"gradient_descent {res.steps} steps"
    )


if __name__ == "__main__":
    main()
