"""A short, representative workload for ``valgrind --tool=memcheck`` (run by .ci/memcheck.sh).

Not a pytest module (no test_ prefix): it calls every kernel family once or twice on small
arrays, float32 and float64, with a few shapes that leave vector tails and odd strides, and
checks a handful of results against NumPy so that a silently wrong kernel is noticed too.
Under memcheck everything runs about 50x slower, so the sizes are tiny on purpose.
"""

from __future__ import annotations

import numpy as np

import mlmath_native as mn


def close(a, b, tol):
    np.testing.assert_allclose(
        np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol
    )


def softmax_family(rng, dtype, tol):
    x = rng.standard_normal((5, 37)).astype(dtype)  # 37: not a multiple of any vector width
    y = mn.softmax(x)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    close(y, e / e.sum(axis=-1, keepdims=True), tol)
    ly = mn.log_softmax(x, axis=0)
    close(np.exp(ly).sum(axis=0), np.ones(37), tol)
    close(mn.logsumexp(x, axis=-1), np.log(np.exp(x.astype(np.float64)).sum(axis=-1)), tol)
    dy = rng.standard_normal(x.shape).astype(dtype)
    g = mn.softmax_backward(y, dy)
    close(g, y * (dy - (y * dy).sum(axis=-1, keepdims=True)), tol)
    mn.log_softmax_backward(mn.log_softmax(x), dy)
    # a non-contiguous view and the out= path
    xt = x.T
    out = np.empty(xt.shape, dtype)
    mn.softmax(xt, axis=0, out=out)


def cross_entropy_family(rng, dtype, tol):
    logits = rng.standard_normal((6, 11)).astype(dtype)
    target = rng.integers(0, 11, size=6)
    target[2] = -100  # ignored
    loss, grad = mn.cross_entropy(logits, target, return_grad=True)
    assert np.isfinite(loss) and grad.shape == logits.shape
    w = rng.random(11).astype(dtype)
    mn.cross_entropy(
        logits, target, weight=w, label_smoothing=0.1, reduction="none", return_grad=True
    )
    probs = mn.softmax(rng.standard_normal((6, 11)).astype(dtype))
    mn.cross_entropy(logits, probs, reduction="sum", return_grad=True)
    # class axis 1 of a (N, C, L) array
    mn.cross_entropy(
        rng.standard_normal((2, 5, 3)).astype(dtype),
        rng.integers(0, 5, size=(2, 3)),
        axis=1,
        return_grad=True,
    )


def optimizers(rng, dtype):
    p = rng.standard_normal(67).astype(dtype)
    g = rng.standard_normal(67).astype(dtype)
    m, v = np.zeros_like(p), np.zeros_like(p)
    for step in (1, 2):
        mn.adam_step(p, g, m, v, step=step, lr=1e-2)
    vmax = np.zeros_like(p)
    mn.adam_step(
        p, g, m, v, step=3, decoupled_weight_decay=True, weight_decay=0.1, max_exp_avg_sq=vmax
    )
    buf = np.zeros_like(p)
    mn.sgd_step(p, g, buf, lr=0.1, momentum=0.9, first_step=True)
    mn.sgd_step(p, g, buf, lr=0.1, momentum=0.9, nesterov=True)
    params = [rng.standard_normal((3, 5)).astype(dtype), rng.standard_normal(7).astype(dtype)]
    opt = mn.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    opt.step([np.ones_like(q) for q in params])
    sgd = mn.optim.SGD(params, lr=1e-2, momentum=0.9)
    sgd.step([np.ones_like(q) for q in params])


def matmuls(rng, dtype, tol):
    for m, k, n in ((1, 1, 1), (7, 13, 5), (33, 17, 29), (70, 65, 66)):
        a = rng.standard_normal((m, k)).astype(dtype)
        b = rng.standard_normal((k, n)).astype(dtype)
        close(mn.matmul(a, b), a.astype(np.float64) @ b, tol * k)
    a = rng.standard_normal((3, 9, 6)).astype(dtype)
    b = rng.standard_normal((6, 10)).astype(dtype)
    close(mn.matmul(a, b), a.astype(np.float64) @ b, tol * 6)
    at = rng.standard_normal((12, 8)).astype(dtype).T  # transposed operand
    close(mn.matmul(at, at.T), at.astype(np.float64) @ at.T, tol * 12)
    out = np.empty((8, 8), dtype)
    mn.matmul(at, at.T, out=out)


def convolutions(rng, dtype, tol):
    x = rng.standard_normal((2, 3, 9, 11)).astype(dtype)
    w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    bias = rng.standard_normal(4).astype(dtype)
    direct = mn.conv2d(x, w, bias, padding=1, algorithm="direct")
    for algorithm in ("winograd_f2", "winograd_f4", "winograd", "auto"):
        close(mn.conv2d(x, w, bias, padding=1, algorithm=algorithm), direct, 50 * tol)
    mn.conv2d(x, w, stride=2, dilation=(1, 2), padding="same", algorithm="direct")
    mn.conv2d(x, rng.standard_normal((3, 1, 3, 3)).astype(dtype), groups=3)  # depthwise
    mn.conv2d(x, w, padding=2, padding_mode="reflect")
    g = rng.standard_normal(direct.shape).astype(dtype)
    gx, gw, gb = mn.conv2d_backward(x, w, g, padding=1)
    assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == bias.shape
    g2 = rng.standard_normal((2, 4, 5, 6)).astype(dtype)
    mn.conv2d_backward(x, w, g2, stride=2, padding=1)
    mn.conv2d_backward(
        x, w, rng.standard_normal((2, 4, 9, 11)).astype(dtype), padding=1, padding_mode="circular"
    )
    mn.conv1d(
        rng.standard_normal((2, 3, 17)).astype(dtype),
        rng.standard_normal((4, 3, 5)).astype(dtype),
        padding=2,
    )
    mn.correlate2d(
        rng.standard_normal((8, 9)).astype(dtype),
        rng.standard_normal((3, 2)).astype(dtype),
        mode="full",
    )


def attentions(rng, dtype, tol):
    q = rng.standard_normal((2, 4, 19, 16)).astype(dtype)
    k = rng.standard_normal((2, 2, 23, 16)).astype(dtype)  # grouped-query: 4 query heads, 2 kv
    v = rng.standard_normal((2, 2, 23, 8)).astype(dtype)
    out, lse = mn.attention(q, k, v, return_lse=True)
    kk = np.repeat(k, 2, axis=1).astype(np.float64)
    vv = np.repeat(v, 2, axis=1).astype(np.float64)
    s = q.astype(np.float64) @ kk.swapaxes(-1, -2) / np.sqrt(16)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    close(out, (p / p.sum(axis=-1, keepdims=True)) @ vv, 20 * tol)
    g = rng.standard_normal(out.shape).astype(dtype)
    dq, dk, dv = mn.attention_backward(q, k, v, out, lse, g)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    out, lse = mn.attention(q, k, v, causal=True, return_lse=True)
    mn.attention_backward(q, k, v, out, lse, g, causal=True)
    mask = rng.random((19, 23)) < 0.8
    out, lse = mn.attention(q, k, v, mask=mask, dropout_p=0.1, seed=3, return_lse=True)
    mn.attention_backward(q, k, v, out, lse, g, mask=mask, dropout_p=0.1, seed=3)


def main():
    rng = np.random.default_rng(7)
    print(mn.build_info())
    for dtype, tol in ((np.float32, 1e-4), (np.float64, 1e-10)):
        softmax_family(rng, dtype, tol)
        cross_entropy_family(rng, dtype, tol)
        optimizers(rng, dtype)
        matmuls(rng, dtype, tol)
        convolutions(rng, dtype, tol)
        attentions(rng, dtype, tol)
    # a multi-threaded call and a single-threaded one
    before = mn.get_num_threads()
    mn.set_num_threads(1)
    mn.matmul(rng.standard_normal((40, 40)), rng.standard_normal((40, 40)))
    mn.set_num_threads(before)
    print("memcheck workload: ok")


if __name__ == "__main__":
    main()
