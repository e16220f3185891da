"""Fused optimizers against the float64 reference and torch.optim: 50 steps of every option
combination, sizes across the vector tails and beyond one chunk, lists of mixed sizes, state
round trips, clipping, skipping, and the all-or-nothing validation; run once per ISA path."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

import mlmath_native as mn
from mlmath_native import _core
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


# -- mixed float32/float64 steps: all or nothing over every dtype group --------------------------

MIXED_SIZES = [(9, np.float32), (7, np.float64), (33, np.float32), (1000, np.float64)]
MIXED_OPTIMIZERS = [
    (mn.SGD, dict(lr=0.1, momentum=0.9)),
    (mn.Adam, dict(lr=0.1, amsgrad=True)),
    (mn.AdamW, dict(lr=0.1)),
]


def _mixed(cls, opts, rng):
    params = [rng.standard_normal(n).astype(dtype) for n, dtype in MIXED_SIZES]
    opt = cls(params, max_grad_norm=100.0, **opts)
    opt.step(grads_for(rng, params))
    return params, opt


def _first_state(opt):
    return next(iter(opt.state))


def _bad_grad_dtype(i):
    def make(params, grads, opt):
        grads[i] = grads[i].astype(np.float64 if grads[i].dtype == np.float32 else np.float32)

    return make


def _bad_grad_shape(i):
    def make(params, grads, opt):
        grads[i] = np.zeros(grads[i].size + 1, grads[i].dtype)

    return make


def _read_only_state(i):
    def make(params, grads, opt):
        opt.state[_first_state(opt)][i].flags.writeable = False

    return make


def _read_only_param(params, grads, opt):
    params[3].flags.writeable = False


def _state_over_param_same_group(params, grads, opt):
    opt.state[_first_state(opt)][1] = params[3][:7]  # both float64


def _state_over_param_across_groups(params, grads, opt):
    opt.state[_first_state(opt)][0] = params[3][:5].view(np.float32)[:9]  # float32 over float64


def _param_of_another_dtype(params, grads, opt):
    opt.params[3] = params[3].astype(np.float32)


def _invalid_lr(params, grads, opt):
    opt.lr = -1.0


MIXED_FAILURES = [  # name, how the step is spoiled, the error, its text
    ("grad dtype in group f32", _bad_grad_dtype(2), TypeError, r"grads\[2\] has dtype"),
    ("grad dtype in group f64", _bad_grad_dtype(3), TypeError, r"grads\[3\] has dtype"),
    ("grad shape in group f32", _bad_grad_shape(2), ValueError, r"grads\[2\] has shape"),
    ("grad shape in group f64", _bad_grad_shape(3), ValueError, r"grads\[3\] has shape"),
    ("read-only state f64", _read_only_state(3), ValueError, r"\[3\] is not writeable"),
    ("read-only param f64", _read_only_param, ValueError, r"params\[3\] is not writeable"),
    ("state over param", _state_over_param_same_group, ValueError, r"\[1\] shares memory with"),
    ("state over other group", _state_over_param_across_groups, ValueError, r"\[0\] shares"),
    ("param changed dtype", _param_of_another_dtype, TypeError, r"params\[3\] changed dtype"),
    ("invalid lr", _invalid_lr, ValueError, "lr is invalid"),
    ("grad count", lambda p, g, o: g.pop(), ValueError, "got 3 grads for 4 params"),
]


@pytest.mark.parametrize("name,spoil,exc,text", MIXED_FAILURES, ids=[f[0] for f in MIXED_FAILURES])
@pytest.mark.parametrize(
    "cls,opts", MIXED_OPTIMIZERS, ids=[o[0].__name__ for o in MIXED_OPTIMIZERS]
)
def test_mixed_dtype_step_is_all_or_nothing(cls, opts, name, spoil, exc, text, rng):
    """Every way a step over float32 and float64 params can fail, in either dtype group: the
    error names the index in params (not within a dtype group) and params, state and step_count
    stay bitwise unchanged (the float32 group was updated before the float64 group failed)."""
    params, opt = _mixed(cls, opts, rng)
    grads = grads_for(rng, params)
    spoil(params, grads, opt)
    snapshot = [p.tobytes() for p in params]
    state = {k: np.array(v, copy=True) for k, v in opt.state_dict().items()}
    with pytest.raises(exc, match=f"{cls.__name__}.step: .*{text}"):
        opt.step(grads)
    assert [p.tobytes() for p in params] == snapshot
    assert opt.step_count == 1
    after = opt.state_dict()
    assert after.keys() == state.keys()
    for k, v in state.items():
        assert np.asarray(after[k]).tobytes() == v.tobytes(), k


@pytest.mark.parametrize(
    "cls,opts", MIXED_OPTIMIZERS, ids=[o[0].__name__ for o in MIXED_OPTIMIZERS]
)
def test_float64_grad_over_a_float32_param_is_read_before_the_update(cls, opts):
    """A float64 grad viewing a float32 param's memory: the float32 group is updated first, and
    the float64 group read the updated bytes; the result must be that of a separate copy."""
    values = np.array([1.5, -2.25, 0.75, 3.0, -0.5, 1.25])  # float32 halves are finite numbers

    def run(copy):
        p32 = values.view(np.float32).copy()
        p64 = np.linspace(-1, 1, 6)
        g64 = p32.view(np.float64)
        opt = cls([p32, p64], max_grad_norm=100.0, **opts)
        for _ in range(2):
            opt.step([np.ones(12, np.float32), g64.copy() if copy else g64])
        return p32, p64

    for got, want in zip(run(copy=False), run(copy=True), strict=True):
        assert got.tobytes() == want.tobytes()


def test_mixed_dtype_regression():
    """The issue's reproducer: a state buffer of the float64 group aliasing a float64 param was
    refused by the binding after the float32 group had been updated, naming the local index."""
    p32, p64, q64 = np.zeros(4, np.float32), np.zeros(6), np.zeros(6)
    opt = mn.SGD([p32, p64, q64], lr=1.0, momentum=0.9)
    opt.state["momentum_buffer"][2] = p64
    with pytest.raises(ValueError, match=r"momentum_buffer\[2\] shares memory with params\[1\]"):
        opt.step([np.ones(4, np.float32), np.ones(6), np.ones(6)])
    assert (p32 == 0).all() and opt.step_count == 0


def test_binding_asserts_disjoint_arrays():
    """The binding's memory-safety assertion (the policy and its messages live in Python)."""
    p = np.zeros(8, np.float32)
    for params, grads in (([p[:4], p[2:6]], [np.ones(4, np.float32)] * 2), ([p], [p])):
        with pytest.raises(ValueError, match="sgd_step: an array the step writes overlaps"):
            _core.sgd_step(params, grads, None, 0.1, 0.0, 0.0, 0.0, False, False, 1.0)
    assert (p == 0).all()


# -- the global grad norm: scaled, no overflow ---------------------------------------------------

NORM_SCALES = {np.float32: [1e-30, 1.0, 1e30], np.float64: [1e-200, 1e-30, 1.0, 1e30, 1e200]}


def _exact_norm(grads, scale):
    """sqrt(sum g^2) computed on g / scale in float64 (no overflow or underflow)."""
    return scale * np.sqrt(sum(np.sum((g.astype(np.float64) / scale) ** 2) for g in grads))


@pytest.mark.parametrize("sizes", [[7], [1, 70000, 9]], ids=str)
@pytest.mark.parametrize(
    "dtype,scale", [(d, s) for d, scales in NORM_SCALES.items() for s in scales], ids=str
)
def test_grad_norm_of_huge_and_tiny_grads(dtype, scale, sizes, rng):
    params = make_params(rng, sizes, dtype)
    grads = [(rng.standard_normal(n) * scale).astype(dtype) for n in sizes]
    opt = mn.SGD(params, lr=1e-3, skip_nonfinite=True)
    result = opt.step(grads)
    assert result.applied
    np.testing.assert_allclose(result.grad_norm, _exact_norm(grads, scale), rtol=1e-5)


def test_grad_norm_of_float64_1e200_regression():
    """The issue's reproducer: the sum of squares overflowed, so a finite step was skipped."""
    opt = mn.SGD(np.zeros(1000), lr=1e-300, skip_nonfinite=True)
    result = opt.step(np.full(1000, 1e200))
    assert result.applied
    np.testing.assert_allclose(result.grad_norm, 1e200 * np.sqrt(1000), rtol=1e-14)


def test_grad_norm_mixes_scales_and_dtypes(rng):
    grads = [
        rng.standard_normal(70005) * 1e200,
        rng.standard_normal(9),
        (rng.standard_normal(300) * 1e30).astype(np.float32),
        np.zeros(70000),
    ]
    opt = mn.SGD([np.zeros_like(g) for g in grads], lr=1e-3, skip_nonfinite=True)
    result = opt.step(grads)
    assert result.applied
    np.testing.assert_allclose(result.grad_norm, _exact_norm(grads, 1e200), rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clipping_huge_grads(dtype, rng):
    scale = 1e30 if dtype == np.float32 else 1e200
    params = make_params(rng, [5, 70000], dtype)
    start = [p.astype(np.float64) for p in params]
    grads = [(rng.standard_normal(p.size) * scale).astype(dtype) for p in params]
    opt = mn.SGD(params, lr=0.1, max_grad_norm=1.0)
    result = opt.step(grads)
    norm = _exact_norm(grads, scale)
    assert result.applied and np.isclose(result.grad_norm, norm, rtol=1e-5)
    np.testing.assert_allclose(result.clip_coef, 1.0 / norm, rtol=1e-5)
    step = np.sqrt(sum(np.sum((p - s) ** 2) for p, s in zip(params, start, strict=True)))
    assert np.isclose(step, 0.1, rtol=1e-3)  # lr times the clipped norm 1


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("where", [0, 1, 2])
def test_nonfinite_grads_beside_huge_ones_are_skipped(bad, where, rng):
    grads = [rng.standard_normal(70005) * 1e200, rng.standard_normal(9).astype(np.float32)]
    grads.append(np.full(3, 1e-300))
    grads[where][-1] = bad
    params = [np.zeros_like(g) for g in grads]
    result = mn.Adam(params, skip_nonfinite=True).step(grads)
    assert not result.applied
    assert np.isnan(result.grad_norm) if np.isnan(bad) else result.grad_norm == np.inf
    assert all((p == 0).all() for p in params)


# -- gradient_descent: exact gradient shapes, errors that name it -------------------------------


@pytest.mark.parametrize("shape", [(3, 2), (6,), (), (1, 2, 3)], ids=str)
def test_gradient_descent_refuses_a_gradient_of_another_shape(shape):
    """Regression: a (3, 2) or (6,) gradient for x0 of shape (2, 3) was silently reshaped.  Only
    x0's exact shape is accepted (no reshaping, no broadcasting of a scalar)."""
    x0 = np.ones((2, 3))
    expected = rf"gradient_descent: grad_fn returned a gradient of shape {re.escape(str(shape))}"
    with pytest.raises(ValueError, match=expected + r" \(expected x0's shape \(2, 3\)\)"):
        mn.gradient_descent(lambda x: np.ones(shape), x0, lr=0.1, steps=3)
    np.testing.assert_array_equal(x0, 1.0)


GD_ERRORS = [
    (
        "tuple of 3",
        dict(grad_fn=lambda x: (1.0, x, x)),
        ValueError,
        "grad_fn returned a tuple of 3 items",
    ),
    (
        "value not a number",
        dict(grad_fn=lambda x: ("loss", x)),
        TypeError,
        "grad_fn returned a value that is not a real number",
    ),
    ("unknown option", dict(momentun=0.9), TypeError, "options has momentun, which SGD"),
    ("invalid option", dict(momentum=-1.0), ValueError, "momentum is invalid"),
    ("invalid lr", dict(lr=-1.0), ValueError, "lr is invalid"),
    ("invalid max_grad_norm", dict(max_grad_norm=-1.0), ValueError, "max_grad_norm is invalid"),
    ("adam betas", dict(optimizer="adam", betas=(2, 0.5)), ValueError, r"betas\[0\] is invalid"),
    ("callback", dict(callback=3), TypeError, "callback must be callable"),
]


@pytest.mark.parametrize("name,kwargs,exc,text", GD_ERRORS, ids=[e[0] for e in GD_ERRORS])
def test_gradient_descent_errors_name_it(name, kwargs, exc, text):
    args = dict(grad_fn=lambda x: 2 * x, lr=0.1, steps=3) | kwargs
    with pytest.raises(exc, match=f"^gradient_descent: {text}"):
        mn.gradient_descent(args.pop("grad_fn"), np.ones(3), **args)


# -- state dicts: the optimizer's kind, every setting, checked before writing -------------------


def _trained(cls, rng, **opts):
    params = make_params(rng, [4, 9], np.float64)
    opt = cls(params, lr=0.01, **opts)
    for _ in range(2):
        opt.step(grads_for(rng, params))
    return params, opt


def _assert_unchanged(opt, state):
    after = opt.state_dict()
    assert after.keys() == state.keys()
    for k, v in state.items():
        assert np.asarray(after[k]).tobytes() == np.asarray(v).tobytes(), k


@pytest.mark.parametrize(
    "source,target",
    [(mn.SGD, mn.Adam), (mn.Adam, mn.SGD), (mn.Adam, mn.AdamW), (mn.AdamW, mn.Adam)],
    ids=lambda c: c.__name__,
)
def test_load_state_dict_refuses_another_optimizers_state(source, target, rng, tmp_path):
    _, src = _trained(source, rng, **({"momentum": 0.9} if source is mn.SGD else {}))
    np.savez(tmp_path / "s.npz", **src.state_dict())
    _, opt = _trained(target, rng)
    before = opt.state_dict()
    with np.load(tmp_path / "s.npz") as f:
        with pytest.raises(ValueError, match=f"{target.__name__}.load_state_dict: the state is"):
            opt.load_state_dict(dict(f))
    _assert_unchanged(opt, before)


def test_load_state_dict_without_the_optimizer_entry(rng):
    """Older saves have no "optimizer" entry: accepted when every entry fits, else refused."""
    _, adam = _trained(mn.Adam, rng)
    old = {k: v for k, v in adam.state_dict().items() if k != "optimizer"}
    _, twin = _trained(mn.AdamW, rng)
    twin.load_state_dict(old)  # Adam and AdamW have the same entries: cannot be told apart
    assert twin.step_count == 2
    _, sgd = _trained(mn.SGD, rng, momentum=0.9)
    old_sgd = {k: v for k, v in sgd.state_dict().items() if k != "optimizer"}
    before = adam.state_dict()
    with pytest.raises(ValueError, match="the state has entries that Adam does not have"):
        adam.load_state_dict(old_sgd)
    _assert_unchanged(adam, before)


BAD_STATE_ENTRIES = [
    ("step", "x", TypeError, "step must be an integer"),
    ("step", 1.5, TypeError, "step must be an integer"),
    ("step", np.array([1, 2]), TypeError, "step must be an integer"),
    ("step", [[1], [2, 3]], TypeError, "step could not be converted to an array"),
    ("step", -1, ValueError, "step must be >= 0"),
    ("lr", -1.0, ValueError, "lr is invalid"),
    ("lr", "fast", TypeError, "lr must be a real number"),
    ("betas", np.array([2.0, 0.5]), ValueError, r"betas\[0\] is invalid"),
    ("betas", 0.9, TypeError, "betas must be a pair"),
    ("eps", 0.0, ValueError, "eps is invalid"),
    ("amsgrad", np.int64(2), TypeError, "amsgrad must be a bool"),
    ("amsgrad", True, ValueError, r"the state lacks max_exp_avg_sq.0"),  # amsgrad needs its buffers
    ("max_grad_norm", -1.0, ValueError, "max_grad_norm is invalid"),
    ("max_grad_norm", np.inf, ValueError, "max_grad_norm is invalid"),
    ("skip_nonfinite", 3, TypeError, "skip_nonfinite must be a bool"),
    ("optimizer", 7, ValueError, "the state is another optimizer's"),
    ("exp_avg.1", np.zeros(8), ValueError, "exp_avg.1 has shape"),
    ("exp_avg.1", np.zeros(9, np.float32), TypeError, "exp_avg.1 has dtype"),
]


@pytest.mark.parametrize(
    "key,value,exc,text", BAD_STATE_ENTRIES, ids=[f"{b[0]}={b[1]!r}" for b in BAD_STATE_ENTRIES]
)
def test_load_state_dict_checks_every_entry_before_writing(key, value, exc, text, rng):
    """Invalid hyper-parameters used to be accepted and fail only at the next step; bad step
    entries were bare Python errors."""
    params, opt = _trained(mn.Adam, rng, max_grad_norm=5.0)
    state = opt.state_dict() | {key: value}
    before = opt.state_dict()
    snapshot = [p.copy() for p in params]
    with pytest.raises(exc, match=f"^Adam.load_state_dict: {text}"):
        opt.load_state_dict(state)
    _assert_unchanged(opt, before)
    assert opt.lr == 0.01 and opt.max_grad_norm == 5.0
    opt.step(grads_for(rng, params))  # still works
    assert not all((p == s).all() for p, s in zip(params, snapshot, strict=True))


@pytest.mark.parametrize("max_grad_norm", [None, 2.5])
@pytest.mark.parametrize("cls", [mn.SGD, mn.Adam, mn.AdamW])
def test_state_dict_keeps_clipping_and_skipping(cls, max_grad_norm, rng, tmp_path):
    """state_dict() used to drop max_grad_norm and skip_nonfinite.  None is saved as NaN (so that
    it survives np.savez) and restored as None."""
    _, opt = _trained(cls, rng, max_grad_norm=max_grad_norm, skip_nonfinite=True)
    np.savez(tmp_path / "s.npz", **opt.state_dict())
    _, twin = _trained(cls, rng, max_grad_norm=7.0, skip_nonfinite=False)
    with np.load(tmp_path / "s.npz") as f:
        state = dict(f)
    assert str(state["optimizer"]) == cls.__name__
    twin.load_state_dict(state)
    assert twin.max_grad_norm == max_grad_norm and twin.skip_nonfinite is True
    # an older save without them keeps the current settings
    _, old = _trained(cls, rng, max_grad_norm=7.0)
    old.load_state_dict({k: v for k, v in state.items() if k not in ("max_grad_norm", "optimizer")})
    assert old.max_grad_norm == 7.0


CONSTRUCTOR_ERRORS = [
    (dict(max_grad_norm=-1.0), ValueError, "max_grad_norm is invalid"),
    (dict(max_grad_norm=float("nan")), ValueError, "max_grad_norm is invalid"),
    (dict(max_grad_norm=0), ValueError, "max_grad_norm is invalid"),
    (dict(max_grad_norm="1"), TypeError, "max_grad_norm must be a real number"),
    (dict(skip_nonfinite="yes"), TypeError, "skip_nonfinite must be a bool"),
    (dict(maximize="no"), TypeError, "maximize must be a bool"),
]


@pytest.mark.parametrize("cls", [mn.SGD, mn.Adam, mn.AdamW])
@pytest.mark.parametrize(
    "kwargs,exc,text", CONSTRUCTOR_ERRORS, ids=[str(c[0]) for c in CONSTRUCTOR_ERRORS]
)
def test_constructor_validates_clipping_and_flags(cls, kwargs, exc, text):
    """max_grad_norm=-1 used to be accepted and fail only at the first step."""
    with pytest.raises(exc, match=f"^{cls.__name__}: {text}"):
        cls(np.zeros(3), lr=0.1, **kwargs)


def test_find_overlaps_edges():
    """The byte-range sweep behind the overlap policy: adjacent ranges do not overlap, empty
    arrays never do, a read range is found whichever written range it meets."""
    buf = np.zeros(20, np.float32)
    written = [buf[10:15], buf[0:5], buf[5:10]]  # adjacent, given out of order
    reads = [buf[15:20], buf[4:6], buf[:0], buf[14:16], np.zeros(3, np.float32), buf[9:10]]
    assert _core.find_overlaps(written, reads) == (None, [1, 3, 5])
    assert _core.find_overlaps([buf[12:16], *written], []) == ((0, 1), [])
    assert _core.find_overlaps([buf[:0], buf[:0]], [buf]) == (None, [])


def test_float32_constants_are_rounded_once_from_double_as_in_torch():
    """1 - beta2 formed from the float 0.999f is 0.00099998713, 1.3e-5 off the 0.001f that
    torch's Python-float scalar gives (found by the fuzzer as an exp_avg_sq mismatch): the
    kernels now form 1 - beta1, 1 - beta2, 1 - lr * wd and 1 - dampening in double.  rtol 2e-6
    leaves a few ulp for torch's other order of operations (6 ulp seen on the scalar path) and
    is still 6x below the old error."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    p = rng.standard_normal(4096).astype(np.float32)
    g = (rng.standard_normal(4096) * 200).astype(np.float32)
    for decoupled in (False, True):
        tp = torch.tensor(p.copy(), requires_grad=True)
        cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        opt = cls([tp], lr=0.1, weight_decay=0.3, foreach=False)
        tp.grad = torch.tensor(g)
        opt.step()
        mine, m, v = p.copy(), np.zeros_like(p), np.zeros_like(p)
        mn.adam_step(
            mine, g, m, v, step=1, lr=0.1, weight_decay=0.3, decoupled_weight_decay=decoupled
        )
        want_v = opt.state[tp]["exp_avg_sq"].numpy()
        np.testing.assert_allclose(v, want_v, rtol=2e-6)
        np.testing.assert_allclose(m, opt.state[tp]["exp_avg"].numpy(), rtol=2e-6)
        np.testing.assert_allclose(mine, tp.detach().numpy(), rtol=2e-6, atol=1e-7)
    tp = torch.tensor(p.copy(), requires_grad=True)
    opt = torch.optim.SGD([tp], lr=0.1, momentum=0.9, dampening=0.3, foreach=False)
    mine, buf = p.copy(), np.zeros_like(p)
    for step in range(2):
        tp.grad = torch.tensor(g)
        opt.step()
        mn.sgd_step(mine, g, buf, lr=0.1, momentum=0.9, dampening=0.3, first_step=step == 0)
    np.testing.assert_allclose(buf, opt.state[tp]["momentum_buffer"].numpy(), rtol=2e-6)
