"""Fused optimizers against the float64 reference and torch.optim: 50 steps of every option
combination, sizes across the vector tails and beyond one chunk, lists of mixed sizes, state
round trips, clipping, skipping, and the all-or-nothing validation; run once per ISA path."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import mlmath_native as mn
from mlmath_native.reference import adam_optimizer as ref_adam
from mlmath_native.reference import gradient_descent as ref_gd

DTYPES = [np.float32, np.float64]
SIZES = [[1], [7], [8], [9], [1023], [1, 7, 8, 9, 1023, 70000]]
STEPS = 50

SGD_GRID = [
    dict(momentum=m, dampening=d, nesterov=n, weight_decay=w, maximize=x)
    for m, d, n, w, x in itertools.product(
        [0.0, 0.9], [0.0, 0.5], [False, True], [0.0, 0.01], [False, True]
    )
    if not n or (m > 0 and d == 0)
]
ADAM_GRID = [
    dict(weight_decay=w, amsgrad=a, maximize=x)
    for w, a, x in itertools.product([0.0, 0.01], [False, True], [False, True])
]


def rtol(dtype):
    # 50 steps of a handful of roundings each, relative to the parameter's scale
    return 2e-5 if dtype == np.float32 else 1e-12


def make_params(rng, sizes, dtype):
    return [rng.standard_normal(n).astype(dtype) for n in sizes]


def grads_for(rng, params, scale=1.0):
    return [(rng.standard_normal(p.shape) * scale).astype(p.dtype) for p in params]


def assert_params_close(got, want, dtype):
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=rtol(dtype), atol=rtol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("opts", SGD_GRID, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_sgd_against_reference(opts, sizes, dtype, rng):
    params = make_params(rng, sizes, dtype)
    want = [p.astype(np.float64) for p in params]
    bufs = [None] * len(params)
    opt = mn.SGD(params, lr=0.05, **opts)
    for _ in range(STEPS):
        grads = grads_for(rng, params)
        result = opt.step(grads)
        assert result.applied and result.grad_norm is None
        for i, g in enumerate(grads):
            want[i], bufs[i] = ref_gd.sgd_step(
                want[i], g.astype(np.float64), bufs[i], lr=0.05, **opts
            )
    assert opt.step_count == STEPS
    assert_params_close(params, want, dtype)
    if opts["momentum"]:
        assert_params_close(opt.state["momentum_buffer"], bufs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("cls", [mn.Adam, mn.AdamW])
@pytest.mark.parametrize(
    "opts", ADAM_GRID, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())
)
def test_adam_against_reference(opts, cls, sizes, dtype, rng):
    params = make_params(rng, sizes, dtype)
    want = [p.astype(np.float64) for p in params]
    m = [np.zeros_like(w) for w in want]
    v = [np.zeros_like(w) for w in want]
    vmax = [np.zeros_like(w) for w in want]
    opt = cls(params, lr=0.01, **opts)
    for t in range(1, STEPS + 1):
        grads = grads_for(rng, params)
        opt.step(grads)
        for i, g in enumerate(grads):
            want[i], m[i], v[i], mx = ref_adam.adam_step(
                want[i],
                g.astype(np.float64),
                m[i],
                v[i],
                step=t,
                lr=0.01,
                decoupled_weight_decay=cls is mn.AdamW,
                max_exp_avg_sq=vmax[i] if opts["amsgrad"] else None,
                **opts,
            )
            if opts["amsgrad"]:
                vmax[i] = mx
    assert_params_close(params, want, dtype)
    assert_params_close(opt.state["exp_avg"], m, dtype)
    np.testing.assert_allclose(
        np.concatenate(opt.state["exp_avg_sq"]), np.concatenate(v), rtol=rtol(dtype), atol=1e-12
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_against_torch_optim(dtype, rng):
    torch = pytest.importorskip("torch")
    cases = [
        (mn.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
        (mn.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3, maximize=True)),
        (mn.Adam, torch.optim.Adam, dict(lr=0.01, weight_decay=0.01, amsgrad=True)),
        (mn.AdamW, torch.optim.AdamW, dict(lr=0.01, maximize=True)),
    ]
    for ours_cls, torch_cls, opts in cases:
        params = make_params(rng, [7, 1023, 20000], dtype)
        tparams = [torch.tensor(p.copy(), requires_grad=True) for p in params]
        opt, topt = ours_cls(params, **opts), torch_cls(tparams, **opts)
        for _ in range(STEPS):
            grads = grads_for(rng, params)
            opt.step(grads)
            for tp, g in zip(tparams, grads, strict=True):
                tp.grad = torch.tensor(g)
            topt.step()
        assert_params_close(params, [tp.detach().numpy() for tp in tparams], dtype)


# -- clipping, skipping, results ----------------------------------------------------------------


def test_clip_by_global_norm(rng):
    params = make_params(rng, [5, 300], np.float64)
    start = [p.copy() for p in params]
    grads = grads_for(rng, params, scale=10.0)
    norm = np.sqrt(sum(float(np.sum(g * g)) for g in grads))
    opt = mn.SGD(params, lr=0.1, max_grad_norm=1.0)
    result = opt.step(grads)
    assert result.applied and np.isclose(result.grad_norm, norm)
    assert np.isclose(result.clip_coef, 1.0 / (norm + 1e-6))
    for p, s, g in zip(params, start, grads, strict=True):
        np.testing.assert_allclose(p, s - 0.1 * g * result.clip_coef, rtol=1e-12)
    # below the threshold nothing is scaled
    small = [g * 1e-3 for g in grads]
    assert opt.step(small).clip_coef == 1.0


def test_grad_norm_with_huge_finite_and_float32_grads():
    g = np.full(1000, 1e30, np.float32)  # squares overflow float32 but not the norm
    opt = mn.SGD(np.zeros(1000, np.float32), lr=1e-40, skip_nonfinite=True)
    result = opt.step(g)
    assert result.applied and np.isclose(result.grad_norm, 1e30 * np.sqrt(1000), rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("cls", [mn.SGD, mn.Adam, mn.AdamW])
def test_skip_nonfinite_changes_nothing(cls, bad, rng):
    params = make_params(rng, [5, 70000, 3], np.float32)
    opts = dict(lr=0.1, momentum=0.9) if cls is mn.SGD else dict(lr=0.1, amsgrad=True)
    opt = cls(params, skip_nonfinite=True, **opts)
    opt.step(grads_for(rng, params))
    before = opt.state_dict()
    snapshot = [p.copy() for p in params]
    grads = grads_for(rng, params)
    grads[1][12345] = bad
    result = opt.step(grads)
    assert not result.applied and not np.isfinite(result.grad_norm)
    for p, s in zip(params, snapshot, strict=True):
        np.testing.assert_array_equal(p, s)
    after = opt.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])


def test_hyper_parameters_change_between_steps(rng):
    p = rng.standard_normal(10)
    opt = mn.SGD(p, lr=0.1)
    start = p.copy()
    g = rng.standard_normal(10)
    opt.step(g)
    opt.lr = 0.01
    opt.step(g)
    np.testing.assert_allclose(p, start - 0.11 * g, rtol=1e-12)


# -- state ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [mn.SGD, mn.Adam, mn.AdamW])
def test_state_dict_round_trip_through_savez(cls, rng, tmp_path):
    opts = dict(lr=0.05, momentum=0.9) if cls is mn.SGD else dict(lr=0.01, amsgrad=True)
    params = make_params(rng, [4, 33], np.float32)
    opt = cls(params, **opts)
    for _ in range(3):
        opt.step(grads_for(rng, params))
    np.savez(tmp_path / "state.npz", **opt.state_dict())
    twin_params = [p.copy() for p in params]
    twin = cls(twin_params, **(opts | {"lr": 1.0}))
    with np.load(tmp_path / "state.npz") as f:
        twin.load_state_dict(dict(f))
    assert twin.step_count == 3 and twin.lr == opts["lr"]
    grads = grads_for(rng, params)
    opt.step(grads)
    twin.step(grads)
    for a, b in zip(params, twin_params, strict=True):
        np.testing.assert_array_equal(a, b)


def test_load_state_dict_checks_before_writing(rng):
    params = make_params(rng, [4, 5], np.float64)
    opt = mn.Adam(params, lr=0.01)
    opt.step(grads_for(rng, params))
    state = opt.state_dict()
    state["exp_avg.1"] = np.zeros(6)
    before = opt.state_dict()
    with pytest.raises(ValueError, match="exp_avg.1 has shape"):
        opt.load_state_dict(state)
    for k, v in before.items():
        np.testing.assert_array_equal(opt.state_dict()[k], v)


# -- all or nothing -----------------------------------------------------------------------------


BAD_THIRD = [
    ("wrong shape", lambda p: np.zeros(p.size + 1, p.dtype), ValueError, "grads[2] has shape"),
    ("wrong dtype", lambda p: np.zeros(p.shape, np.float64), TypeError, "grads[2] has dtype"),
    ("not an array", lambda p: p.tolist(), TypeError, "grads[2] must be a numpy.ndarray"),
]


@pytest.mark.parametrize("name,make,exc,text", BAD_THIRD, ids=[b[0] for b in BAD_THIRD])
@pytest.mark.parametrize("cls", [mn.SGD, mn.Adam, mn.AdamW])
def test_bad_third_of_five_changes_nothing(cls, name, make, exc, text, rng):
    params = make_params(rng, [3, 8, 9, 17, 1000], np.float32)
    opts = dict(lr=0.1, momentum=0.9) if cls is mn.SGD else dict(lr=0.1)
    opt = cls(params, max_grad_norm=1.0, **opts)
    opt.step(grads_for(rng, params))
    snapshot = [p.copy() for p in params]
    state = opt.state_dict()
    grads = grads_for(rng, params)
    grads[2] = make(params[2])
    with pytest.raises(exc, match=text.replace("[", r"\[").replace("]", r"\]")):
        opt.step(grads)
    for p, s in zip(params, snapshot, strict=True):
        np.testing.assert_array_equal(p, s)
    for k, v in state.items():
        np.testing.assert_array_equal(opt.state_dict()[k], v)


def test_read_only_third_param_changes_nothing(rng):
    params = make_params(rng, [3, 8, 9, 17, 1000], np.float32)
    opt = mn.Adam(params, lr=0.1)
    snapshot = [p.copy() for p in params]
    params[2].flags.writeable = False
    with pytest.raises(ValueError, match=r"params\[2\] is not writeable"):
        opt.step(grads_for(rng, params))
    for p, s in zip(params, snapshot, strict=True):
        np.testing.assert_array_equal(p, s)
    assert opt.step_count == 0


def test_mixed_dtypes_in_one_optimizer(rng):
    params = [rng.standard_normal(9).astype(np.float32), rng.standard_normal(9)]
    want = [p.astype(np.float64) for p in params]
    opt = mn.SGD(params, lr=0.1)
    grads = grads_for(rng, params)
    opt.step(grads)
    for p, w, g in zip(params, want, grads, strict=True):
        np.testing.assert_allclose(p, w - 0.1 * g, rtol=1e-6)


def test_threads_do_not_change_results(rng, threads):
    finals = []
    for t in (1, 2, 3):
        mn.set_num_threads(t)
        params = make_params(np.random.default_rng(5), [300000, 7, 70000], np.float32)
        opt = mn.AdamW(params, lr=0.01, amsgrad=True, max_grad_norm=10.0)
        g = np.random.default_rng(6)
        norms = [opt.step(grads_for(g, params)).grad_norm for _ in range(3)]
        finals.append((params, norms))
    for params, norms in finals[1:]:
        assert norms == finals[0][1]
        for a, b in zip(params, finals[0][0], strict=True):
            np.testing.assert_array_equal(a, b)


# -- functional kernels ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_sgd_step(dtype, rng):
    p = rng.standard_normal(1023).astype(dtype)
    buf = np.zeros_like(p)
    want, want_buf = p.astype(np.float64), None
    for step in range(5):
        g = rng.standard_normal(1023).astype(dtype)
        opts = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
        assert mn.sgd_step(p, g, buf, first_step=step == 0, **opts) is p
        want, want_buf = ref_gd.sgd_step(want, g.astype(np.float64), want_buf, **opts)
    np.testing.assert_allclose(p, want, rtol=rtol(dtype), atol=rtol(dtype))
    np.testing.assert_allclose(buf, want_buf, rtol=rtol(dtype), atol=rtol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_adam_step(dtype, rng):
    p = rng.standard_normal(77).astype(dtype)
    m, v, vmax = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    want = p.astype(np.float64)
    wm, wv, wmax = (np.zeros(77) for _ in range(3))
    for t in range(1, 6):
        g = rng.standard_normal(77).astype(dtype)
        mn.adam_step(
            p,
            g,
            m,
            v,
            step=t,
            lr=0.01,
            weight_decay=0.1,
            decoupled_weight_decay=True,
            max_exp_avg_sq=vmax,
        )
        want, wm, wv, wmax = ref_adam.adam_step(
            want,
            g.astype(np.float64),
            wm,
            wv,
            step=t,
            lr=0.01,
            weight_decay=0.1,
            decoupled_weight_decay=True,
            amsgrad=True,
            max_exp_avg_sq=wmax,
        )
    np.testing.assert_allclose(p, want, rtol=rtol(dtype), atol=rtol(dtype))
    np.testing.assert_allclose(vmax, wmax, rtol=rtol(dtype), atol=1e-12)


# -- the minimizer -------------------------------------------------------------------------------


def test_gradient_descent_reaches_quadratic_minimum(rng):
    a = np.diag([1.0, 3.0, 10.0])
    c = np.array([1.0, -2.0, 0.5])

    def grad_fn(x):
        return 0.5 * (x - c) @ a @ (x - c), a @ (x - c)

    res = mn.gradient_descent(grad_fn, np.zeros(3), lr=0.09, steps=2000, tol=1e-10)
    assert res.converged and res.steps < 2000
    np.testing.assert_allclose(res.x, c, atol=1e-9)
    assert res.history[0] > res.history[-1] >= 0
    res = mn.gradient_descent(grad_fn, np.zeros(3), lr=0.05, steps=3000, optimizer="adam", tol=1e-6)
    np.testing.assert_allclose(res.x, c, atol=1e-5)


def test_gradient_descent_logistic_regression(rng):
    x = np.hstack([rng.standard_normal((400, 3)), np.ones((400, 1))])
    true_w = np.array([2.0, -1.0, 0.5, 0.2])
    y = (x @ true_w + 1.5 * rng.standard_normal(400) > 0).astype(float)  # not separable

    def loss_and_grad(w):
        z = x @ w
        loss = np.mean(np.logaddexp(0, z) - y * z)
        return loss, x.T @ (1 / (1 + np.exp(-z)) - y) / len(y)

    res = mn.gradient_descent(
        loss_and_grad, np.zeros(4), lr=2.0, steps=5000, tol=1e-9, momentum=0.5
    )
    assert res.converged
    assert np.all(np.diff(res.history[:50]) <= 1e-12)  # the loss falls
    # the minimum, found independently by SciPy's BFGS
    optimize = pytest.importorskip("scipy.optimize")
    best = optimize.minimize(loss_and_grad, np.zeros(4), jac=True, method="BFGS", tol=1e-12).x
    np.testing.assert_allclose(res.x, best, atol=1e-6)


def test_gradient_descent_callback_and_progress(capsys):
    seen = []
    res = mn.gradient_descent(
        lambda x: 2 * x,
        np.ones(2, np.float32),
        lr=0.1,
        steps=40,
        callback=lambda t, x, v: seen.append(t) or t == 5,
        progress=True,
    )
    assert res.steps == 5 and seen == [1, 2, 3, 4, 5] and res.x.dtype == np.float32
    assert len(res.history) == 5 and not res.converged
    assert "gradient_descent: step 2/40" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_million_and_three(dtype, rng):
    """A tensor of 1_000_003 elements: many chunks, a partial last chunk and a vector tail."""
    size = 1_000_003
    p_sgd, p_adam = make_params(rng, [size, size], dtype)
    want_sgd, want_adam = p_sgd.astype(np.float64), p_adam.astype(np.float64)
    buf, m, v, vmax = None, np.zeros(size), np.zeros(size), np.zeros(size)
    sgd = mn.SGD(p_sgd, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
    adam = mn.AdamW(p_adam, lr=0.01, amsgrad=True)
    for t in range(1, STEPS + 1):
        g = rng.standard_normal(size).astype(dtype)
        sgd.step(g)
        adam.step(g)
        g64 = g.astype(np.float64)
        want_sgd, buf = ref_gd.sgd_step(
            want_sgd, g64, buf, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01
        )
        want_adam, m, v, vmax = ref_adam.adam_step(
            want_adam,
            g64,
            m,
            v,
            step=t,
            lr=0.01,
            weight_decay=1e-2,
            amsgrad=True,
            decoupled_weight_decay=True,
            max_exp_avg_sq=vmax,
        )
    assert_params_close([p_sgd, p_adam], [want_sgd, want_adam], dtype)
