"""8-bit optimizer state (state_dtype="int8"; Note [8-bit optimizer state] in
mlmath_native/optim.py and src/cpp/kernels/optim.cpp): the NumPy maps, one fused step against
the float64 reference from the same dequantised state (params to float32's error, codes within
one step of the map), trajectories close to float32 state, block boundaries and tails, NaN,
clipping and skipping, thread independence, state dicts (exact round trip, conversion between
formats), memory, and bad input changing nothing; run once per ISA path."""

from __future__ import annotations

import io

import numpy as np
import pytest
from sixteen import dtype_of, unit_roundoff, widen
from test_16bit_optim import golden_step  # the float64 reference step of both files

import mlmath_native as mn
from mlmath_native import _core
from mlmath_native.optim import QUANT_BLOCK, dequantize_blockwise, quantize_blockwise

# tails of a vector, a block, blocks across a chunk boundary (2^16 elements)
SIZES = [1, 7, 17, 255, 256, 257, 1000, (1 << 16) + 300]
EPS32 = float(np.finfo(np.float32).eps)
SIGNED = ("exp_avg", "momentum_buffer")


def make(rng, sizes, dtype=np.float32, scale=1.0):
    return [(rng.standard_normal(n) * scale).astype(np.float32).astype(dtype) for n in sizes]


def decoded(opt, name, i):
    return dequantize_blockwise(opt.state[name][i], opt.state[f"{name}_absmax"][i]).astype(
        np.float64
    )


def snapshot(opt):
    return {k: np.array(v, copy=True) for k, v in opt.state_dict().items()}


def same(a, b):
    """Bitwise-equal arrays (NaN equal to NaN, as the state dict's max_grad_norm=None)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# -- the maps --------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 1000])
def test_maps_round_to_the_nearest_code(signed, n, rng):
    x = rng.standard_normal(n).astype(np.float32) * np.exp(rng.uniform(-8, 2, n)).astype(np.float32)
    if not signed:
        x = x * x
    codes, absmax = quantize_blockwise(x, signed)
    assert codes.dtype == (np.int8 if signed else np.uint8) and codes.shape == x.shape
    assert absmax.shape == (-(-n // QUANT_BLOCK),) and absmax.dtype == np.float32
    back = dequantize_blockwise(codes, absmax).astype(np.float64)
    top = np.repeat(absmax.astype(np.float64), QUANT_BLOCK)[:n]
    if signed:  # the code is 127 sqrt(|x| / absmax), rounded: at most half a code away
        assert np.all(np.sign(back) * np.sign(x) >= 0)
        pos = 127 * np.sqrt(np.abs(x) / top)
        assert np.all(np.abs(127 * np.sqrt(np.abs(back) / top) - pos) <= 0.5 + 1e-4)
        assert np.abs(codes.astype(int)).max(initial=0) <= 127
    else:  # 255 (x / absmax)^(1/4), rounded, but never 0 for x > 0
        pos = 255 * (x / top) ** 0.25
        got = 255 * (back / top) ** 0.25
        assert np.all((np.abs(got - pos) <= 0.5 + 1e-4) | ((codes == 1) & (pos < 1)))
        assert np.all((codes > 0) == (x > 0))
    if n:
        assert np.all(np.abs(back).reshape(-1) <= np.repeat(absmax, QUANT_BLOCK)[:n] * (1 + 1e-6))


def test_map_examples_and_small_values():
    codes, absmax = quantize_blockwise(np.array([1.0, 1e-9, 0.0], np.float32), signed=False)
    assert list(codes) == [255, 1, 0] and absmax[0] == 1.0  # 1e-9 keeps code 1, not 0
    codes, absmax = quantize_blockwise(np.array([-3.0, 3.0 / 127**2, 0.0]), signed=True)
    assert list(codes) == [-127, 1, 0] and absmax[0] == 3.0
    # a linear map would give 0 here: the square law resolves absmax * 6e-5
    assert dequantize_blockwise(codes, absmax)[1] == pytest.approx(3.0 / 127**2, rel=1e-6)


def test_maps_of_nonfinite_blocks():
    x = np.ones(2 * QUANT_BLOCK, np.float32)
    x[3] = np.nan
    codes, absmax = quantize_blockwise(x, signed=True)
    assert np.isnan(absmax[0]) and absmax[1] == 1.0
    back = dequantize_blockwise(codes, absmax)
    assert np.isnan(back[:QUANT_BLOCK]).all() and (back[QUANT_BLOCK:] == 1).all()


def test_dequantize_refuses_bad_input():
    with pytest.raises(TypeError, match="int8 or uint8"):
        dequantize_blockwise(np.zeros(3, np.int16), np.ones(1, np.float32))
    with pytest.raises(ValueError, match="expected 1"):
        dequantize_blockwise(np.zeros(3, np.int8), np.ones(2, np.float32))


# -- one step against the reference ----------------------------------------------------------


CASES = [
    (mn.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (mn.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3, maximize=True)),
    (mn.Adam, dict(lr=0.01, weight_decay=0.01, amsgrad=True)),
    (mn.AdamW, dict(lr=0.01, weight_decay=0.1)),
    (mn.AdamW, dict(lr=0.01, weight_decay=0.01, maximize=True)),
]
CASE_IDS = [f"{c.__name__}-{i}" for i, (c, _) in enumerate(CASES)]


def assert_codes_match(opt, name, i, want):
    """The stored codes are the map of the reference's new state, rounded to nearest, or one
    code off where the exact position lies within 0.15 code of a midpoint (the kernels round
    sqrt from an rsqrt estimate: Note [8-bit optimizer state])."""
    signed = name in SIGNED
    codes, absmax = quantize_blockwise(want.astype(np.float32), signed)
    # the kernels take 1 - beta2 from beta2 rounded to float32: 2^-24 / 0.001 relative in v
    np.testing.assert_allclose(opt.state[f"{name}_absmax"][i], absmax, rtol=1e-4, atol=0)
    got = opt.state[name][i].astype(int)
    diff = np.abs(got - codes.astype(int))
    assert diff.max(initial=0) <= 1, name
    top = np.repeat(absmax.astype(np.float64), QUANT_BLOCK)[: want.size]
    with np.errstate(invalid="ignore", divide="ignore"):
        pos = 127 * np.sqrt(np.abs(want) / top) if signed else 255 * (want / top) ** 0.25
    low = np.minimum(np.abs(got), np.abs(codes.astype(int)))
    off = diff == 1
    assert np.all(np.abs(pos[off] - (low[off] + 0.5)) <= 0.15), name


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("cls,opts", CASES, ids=CASE_IDS)
def test_each_step_against_the_float64_reference(cls, opts, param_dtype, rng):
    dtype = dtype_of(param_dtype)
    master = param_dtype == "float16"  # float16 params are tested with master weights
    params = make(rng, SIZES, dtype)
    opt = cls(params, state_dtype="int8", master_weights=master, **opts)
    names = [n for n in opt._state_names() if opt.state[n][0] is not None]
    for t in (1, 2, 3):
        grads = make(rng, SIZES, dtype)
        before_p = [
            widen(opt.state["master"][i]) if master else widen(p) for i, p in enumerate(params)
        ]
        before = {n: [decoded(opt, n, i) for i in range(len(params))] for n in names}
        opt.step(grads)
        for i, n in enumerate(SIZES):
            q, state = golden_step(
                cls, opts, before_p[i], widen(grads[i]), {k: v[i] for k, v in before.items()}, t
            )
            got = widen(opt.state["master"][i]) if master else widen(params[i])
            # float32 math on the same inputs; 16-bit params are rounded once more
            ulp = EPS32 if dtype == np.float32 or master else 2 * unit_roundoff(dtype)
            tol = 8 * EPS32 * (np.abs(q) + np.abs(before_p[i]) + 1) + ulp * np.abs(q)
            assert np.all(np.abs(got - q) <= tol), (t, n)
            for name, want in state.items():
                assert_codes_match(opt, name, i, want)


def test_float32_params_trajectory_follows_float32_state(rng):
    """Over 50 AdamW steps the int8 state moves each param as the float32 state does, to a
    few percent of the distance it travelled."""
    sizes = [1000, 3000]
    start = make(rng, sizes)
    a, b = [p.copy() for p in start], [p.copy() for p in start]
    opt_a = mn.AdamW(a, lr=1e-2, weight_decay=0.01)
    opt_b = mn.AdamW(b, lr=1e-2, weight_decay=0.01, state_dtype="int8")
    drift = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    for _ in range(50):
        grads = [d + 0.5 * rng.standard_normal(d.size).astype(np.float32) for d in drift]
        opt_a.step(grads)
        opt_b.step([g.copy() for g in grads])
    for p0, pa, pb in zip(start, a, b, strict=True):
        travelled = np.linalg.norm(pa - p0)
        assert np.linalg.norm(pa - pb) <= 0.03 * travelled


def test_a_tiny_second_moment_does_not_blow_up(rng):
    """A value with a tiny gradient next to a large one in its block: its v is coded 1, not 0,
    so a later zero-gradient step moves it by about lr, not m / eps."""
    p = np.zeros(QUANT_BLOCK, np.float32)
    opt = mn.Adam(p, lr=1e-3, state_dtype="int8")
    g = np.zeros_like(p)
    g[0], g[1] = 1e3, 1e-4
    opt.step(g)
    assert opt.state["exp_avg_sq"][0][1] >= 1
    before = p.copy()
    opt.step(np.zeros_like(p))
    assert np.all(np.abs(p - before) <= 1e-2)


@pytest.mark.parametrize("threads", [1, 2])
def test_results_do_not_depend_on_threads(threads, rng):
    sizes = [(1 << 16) * 2 + 5, 300]
    start, grads = make(rng, sizes), make(rng, sizes)
    old = mn.get_num_threads()
    try:
        out = []
        for t in (1, threads):
            mn.set_num_threads(t)
            params = [p.copy() for p in start]
            opt = mn.AdamW(params, state_dtype="int8", amsgrad=True)
            opt.step(grads)
            opt.step(grads)
            out.append((params, snapshot(opt)))
    finally:
        mn.set_num_threads(old)
    for x, y in zip(out[0][0], out[1][0], strict=True):
        assert np.array_equal(x, y)
    for k in out[0][1]:
        assert same(out[0][1][k], out[1][1][k]), k


def test_nan_gradient_poisons_only_its_block(rng):
    n = 3 * QUANT_BLOCK
    p = make(rng, [n])[0]
    opt = mn.Adam(p, state_dtype="int8")
    g = make(rng, [n])[0]
    g[QUANT_BLOCK + 5] = np.nan
    opt.step(g)
    absmax = opt.state["exp_avg_absmax"][0]
    assert np.isnan(absmax[1]) and np.isfinite(absmax[[0, 2]]).all()
    assert np.isnan(p[QUANT_BLOCK + 5]) and np.isfinite(np.delete(p, QUANT_BLOCK + 5)).all()
    opt.step(make(rng, [n])[0])
    assert np.isnan(p[QUANT_BLOCK : 2 * QUANT_BLOCK]).all()
    assert np.isfinite(p[:QUANT_BLOCK]).all() and np.isfinite(p[2 * QUANT_BLOCK :]).all()


def test_skip_nonfinite_changes_nothing(rng):
    params = make(rng, [300, 5])
    opt = mn.AdamW(params, state_dtype="int8", skip_nonfinite=True)
    opt.step(make(rng, [300, 5]))
    before, state = [p.copy() for p in params], snapshot(opt)
    bad = make(rng, [300, 5])
    bad[1][2] = np.inf
    assert not opt.step(bad).applied
    assert all(np.array_equal(a, b) for a, b in zip(params, before, strict=True))
    for k, v in snapshot(opt).items():
        assert same(v, state[k]), k


def test_clipping_is_the_step_on_scaled_grads(rng):
    start, grads = make(rng, [300, 40]), make(rng, [300, 40], scale=10.0)
    a, b = [p.copy() for p in start], [p.copy() for p in start]
    opt_a = mn.Adam(a, state_dtype="int8", max_grad_norm=1.0)
    res = opt_a.step(grads)
    coef = np.float32(res.clip_coef)
    assert res.clip_coef < 1
    opt_b = mn.Adam(b, state_dtype="int8")
    opt_b.step([g * coef for g in grads])
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)


def test_amsgrad_switched_on_later(rng):
    params = make(rng, [300])
    opt = mn.Adam(params, state_dtype="int8")
    opt.step(make(rng, [300]))
    assert opt.state["max_exp_avg_sq"][0] is None
    opt.amsgrad = True
    opt.step(make(rng, [300]))
    assert opt.state["max_exp_avg_sq"][0].dtype == np.uint8
    assert opt.state["max_exp_avg_sq_absmax"][0].shape == (2,)


# -- state dicts ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,opts", [CASES[0], CASES[2]], ids=["SGD", "Adam"])
def test_state_dict_round_trip_is_exact(cls, opts, rng, tmp_path):
    sizes = [300, 7]
    params = make(rng, sizes)
    opt = cls(params, state_dtype="int8", **opts)
    for _ in range(2):
        opt.step(make(rng, sizes))
    f = tmp_path / "opt.npz"
    np.savez(f, **opt.state_dict())
    copy = [p.copy() for p in params]
    other = cls(copy, state_dtype="int8", **opts)
    other.load_state_dict(dict(np.load(f)))
    grads = make(rng, sizes)
    opt.step(grads)
    other.step([g.copy() for g in grads])
    assert all(np.array_equal(x, y) for x, y in zip(params, copy, strict=True))
    a, b = snapshot(opt), snapshot(other)
    assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "source,target", [(None, "int8"), ("int8", None), ("bfloat16", "int8"), ("int8", "bfloat16")]
)
def test_state_dict_converts_between_formats(source, target, rng):
    sizes = [300, 7]
    if "bfloat16" in (source, target):
        dtype_of("bfloat16")  # skips without ml_dtypes
    params = make(rng, sizes)
    opt = mn.Adam(params, state_dtype=source, amsgrad=True)
    for _ in range(3):
        opt.step(make(rng, sizes))
    other = mn.Adam([p.copy() for p in params], state_dtype=target, amsgrad=True)
    other.load_state_dict(opt.state_dict())
    assert other.step_count == 3
    for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        for i in range(len(sizes)):
            if source == "int8":
                want = decoded(opt, name, i)
            else:
                want = widen(opt.state[name][i])
            if target == "int8":
                got = decoded(other, name, i)
                codes, _ = quantize_blockwise(want.astype(np.float32), name in SIGNED)
                assert np.array_equal(other.state[name][i], codes)
                tol = 0.05 * np.abs(want).max()  # within the map's steps
            else:
                got = widen(other.state[name][i])
                tol = 2**-8 * np.abs(want) if target == "bfloat16" else 0
            assert np.all(np.abs(got - want) <= tol + 1e-30), name


def test_state_dict_from_float32_to_int8_and_back_keeps_the_values_close(rng):
    params = make(rng, [1000])
    a = mn.AdamW(params)
    for _ in range(3):
        a.step(make(rng, [1000]))
    b = mn.AdamW([params[0].copy()], state_dtype="int8")
    b.load_state_dict(a.state_dict())
    c = mn.AdamW([params[0].copy()])
    c.load_state_dict(b.state_dict())
    m, m2 = a.state["exp_avg"][0], c.state["exp_avg"][0]
    top = np.abs(m).max()
    # square law: at most half a code, i.e. |sqrt|m2| - sqrt|m|| <= sqrt(top) / 254
    assert np.all(np.abs(np.sqrt(np.abs(m2)) - np.sqrt(np.abs(m))) <= np.sqrt(top) / 254 * 1.001)


def test_state_dict_conversion_refuses_a_bad_entry_and_changes_nothing(rng):
    params = make(rng, [300])
    src = mn.Adam(params, state_dtype="int8")
    src.step(make(rng, [300]))
    d = src.state_dict()
    del d["exp_avg_absmax.0"]
    target = mn.Adam([params[0].copy()])
    target.step(make(rng, [300]))
    before = snapshot(target)
    with pytest.raises(ValueError, match="exp_avg_absmax.0"):
        target.load_state_dict(d)
    after = snapshot(target)
    assert all(same(before[k], after[k]) for k in before)


# -- memory and bad input ---------------------------------------------------------------------


def test_state_memory_is_a_quarter_of_float32(rng):
    sizes = [1 << 20, 4096]
    fp32 = mn.AdamW(make(rng, sizes))
    int8 = mn.AdamW(make(rng, sizes), state_dtype="int8")
    fp32.step(make(rng, sizes))
    int8.step(make(rng, sizes))

    def state_bytes(opt):
        return sum(b.nbytes for bufs in opt.state.values() for b in bufs if b is not None)

    assert state_bytes(int8) <= 0.27 * state_bytes(fp32)


def test_int8_state_refuses_float64_params():
    with pytest.raises(ValueError, match="float64"):
        mn.Adam(np.zeros(3), state_dtype="int8")


def test_bindings_assert_codes_and_scales(rng):
    p, g = make(rng, [300]), make(rng, [300])
    m, v = np.zeros(300, np.int8), np.zeros(300, np.uint8)
    s1, s2 = np.zeros(2, np.float32), np.zeros(2, np.float32)
    before = p[0].copy()
    cases = [
        (dict(exp_avg_sqs=[m.copy()]), TypeError, "uint8"),  # signed codes for v
        (dict(absmaxes=[[s1], [np.zeros(3, np.float32)]]), ValueError, "expected 2"),
        (dict(absmaxes=[[s1], [np.zeros(2)]]), TypeError, "float64"),
        (dict(absmaxes=[[s1], [s1]]), ValueError, "overlaps"),
        (dict(absmaxes=None), TypeError, "block scales"),
    ]
    for change, exc, text in cases:
        args = dict(exp_avgs=[m], exp_avg_sqs=[v], absmaxes=[[s1], [s2]]) | change
        with pytest.raises(exc, match=text):
            _core.adam_step(
                p,
                g,
                max_exp_avg_sqs=None,
                step=1,
                lr=0.1,
                beta1=0.9,
                beta2=0.99,
                eps=1e-8,
                weight_decay=0.0,
                decoupled=True,
                grad_scale=1.0,
                **args,
            )
        assert np.array_equal(p[0], before)
    ro = s2.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        _core.adam_step(
            p, g, [m], [v], None, 1, 0.1, 0.9, 0.99, 1e-8, 0.0, True, 1.0, absmaxes=[[s1], [ro]]
        )


def test_a_failed_step_changes_no_code(rng):
    params = make(rng, [300, 7])
    opt = mn.AdamW(params, state_dtype="int8")
    opt.step(make(rng, [300, 7]))
    before, state = [p.copy() for p in params], snapshot(opt)
    with pytest.raises(ValueError):
        opt.step(make(rng, [300, 8]))
    assert all(np.array_equal(a, b) for a, b in zip(params, before, strict=True))
    for k, v in snapshot(opt).items():
        assert same(v, state[k]), k


def test_bfloat16_params_with_int8_state_and_stochastic_rounding_are_seeded(rng):
    dtype = dtype_of("bfloat16")
    start, grads = make(rng, [2000], dtype), make(rng, [2000], dtype)
    runs = []
    for _ in range(2):
        params = [p.copy() for p in start]
        opt = mn.AdamW(params, lr=1e-4, state_dtype="int8", stochastic_rounding=True, seed=7)
        opt.step(grads)
        runs.append(params[0].view(np.uint16).copy())
    assert np.array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], start[0].view(np.uint16))  # tiny steps still move


def test_state_dict_buffer_is_saved_in_memory(rng):
    params = make(rng, [5])
    opt = mn.SGD(params, lr=0.1, momentum=0.9, state_dtype="int8")
    assert "momentum_buffer.0" not in opt.state_dict()  # no momentum step yet
    opt.step(make(rng, [5]))
    buf = io.BytesIO()
    np.savez(buf, **opt.state_dict())
    buf.seek(0)
    d = dict(np.load(buf))
    assert d["momentum_buffer.0"].dtype == np.int8 and d["momentum_buffer_absmax.0"].shape == (1,)
