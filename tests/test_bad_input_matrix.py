"""Bad input, exhaustively: every public function and optimizer method, with every array
argument replaced in turn by each kind of wrong value (None, a Python object, a string,
complex, object and string arrays, an array of the wrong number of dimensions).  Each call
raises TypeError or ValueError with a message naming the function and the argument, and every
array the call was given is bitwise unchanged afterwards.

The hand-written rows of test_bad_input.py cover the specific messages (ranges, labels,
strings, shapes); this file covers the cross product, plus the sizes that would overflow, the
arrays that alias what a call writes, and hyper-parameters that are NaN, negative or zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import mlmath_native as mn
from mlmath_native import _core

F = np.float32


def _rng():
    return np.random.default_rng(7)


class Spec:
    """A valid call: ``make()`` builds fresh named arguments, ``call(args)`` runs it.
    ``arrays`` names the array arguments to corrupt, with the number of dimensions each must
    have (None where any ndim is valid)."""

    def __init__(
        self,
        name: str,
        make: Callable[[], dict[str, Any]],
        call: Callable[[dict[str, Any]], Any],
        arrays: dict[str, int | None],
        label: str | None = None,
    ):
        self.name, self.make, self.call, self.arrays = name, make, call, arrays
        self.label = label or name  # what the error messages start with


def _x2():
    return {"x": _rng().standard_normal((3, 5)).astype(F)}


def _y_dy():
    r = _rng()
    y = mn.softmax(r.standard_normal((3, 5)).astype(F))
    return {"y": y, "dy": r.standard_normal((3, 5)).astype(F)}


def _ce():
    r = _rng()
    return {
        "logits": r.standard_normal((4, 5)).astype(F),
        "target": np.array([0, 4, 2, 1]),
        "weight": np.linspace(0.5, 1.5, 5).astype(F),
    }


def _lce():
    r = _rng()
    return {
        "hidden": r.standard_normal((4, 3)).astype(F),
        "lin_weight": r.standard_normal((5, 3)).astype(F),
        "target": np.array([0, 4, -100, 1]),
        "bias": r.standard_normal(5).astype(F),
        "weight_classes": np.linspace(0.5, 1.5, 5).astype(F),
    }


def _flat_lce(result):
    """(loss, d_hidden, d_weight, d_bias): one flat tuple, as the other specs return."""
    loss, grads = result
    return (loss, *grads)


def _mm():
    r = _rng()
    return {"a": r.standard_normal((3, 4)).astype(F), "b": r.standard_normal((4, 2)).astype(F)}


def _conv2d():
    r = _rng()
    return {
        "x": r.standard_normal((2, 3, 6, 6)).astype(F),
        "w": r.standard_normal((4, 3, 3, 3)).astype(F),
        "bias": r.standard_normal(4).astype(F),
    }


def _conv2d_bwd():
    a = _conv2d()
    a["grad_out"] = _rng().standard_normal((2, 4, 4, 4)).astype(F)
    return a


def _conv1d():
    r = _rng()
    return {
        "x": r.standard_normal((2, 3, 9)).astype(F),
        "w": r.standard_normal((4, 3, 3)).astype(F),
        "bias": r.standard_normal(4).astype(F),
    }


def _conv1d_bwd():
    a = _conv1d()
    a["grad_out"] = _rng().standard_normal((2, 4, 7)).astype(F)
    return a


def _corr():
    r = _rng()
    return {"in1": r.standard_normal((6, 7)), "in2": r.standard_normal((3, 2))}


def _attn():
    r = _rng()
    q, k, v = (r.standard_normal((2, 5, 4)).astype(F) for _ in range(3))
    return {"q": q, "k": k, "v": v, "mask": r.standard_normal((5, 5)).astype(F)}


def _attn_bwd():
    a = _attn()
    out, lse = mn.attention(a["q"], a["k"], a["v"], mask=a["mask"], return_lse=True)
    a.update(out=out, lse=lse, grad_out=_rng().standard_normal(out.shape).astype(F))
    return a


def _sgd():
    r = _rng()
    return {
        "param": r.standard_normal(7).astype(F),
        "grad": r.standard_normal(7).astype(F),
        "momentum_buffer": r.standard_normal(7).astype(F),
    }


def _adam():
    r = _rng()
    return {
        "param": r.standard_normal(7).astype(F),
        "grad": r.standard_normal(7).astype(F),
        "exp_avg": r.standard_normal(7).astype(F),
        "exp_avg_sq": np.abs(r.standard_normal(7)).astype(F),
    }


def _opt():
    r = _rng()
    return {"p0": r.standard_normal((3, 2)).astype(F), "p1": r.standard_normal(5).astype(F)}


def _opt_step(cls):
    def make():
        a = _opt()
        r = _rng()
        a["g0"] = r.standard_normal((3, 2)).astype(F)
        a["g1"] = r.standard_normal(5).astype(F)
        a["opt"] = cls([a["p0"], a["p1"]], lr=0.1)
        return a

    return make


SPECS = [
    Spec("softmax", _x2, lambda a: mn.softmax(a["x"]), {"x": None}),
    Spec("log_softmax", _x2, lambda a: mn.log_softmax(a["x"]), {"x": None}),
    Spec("logsumexp", _x2, lambda a: mn.logsumexp(a["x"]), {"x": None}),
    Spec(
        "softmax_backward", _y_dy, lambda a: mn.softmax_backward(a["y"], a["dy"]), {"y": 2, "dy": 2}
    ),
    Spec(
        "log_softmax_backward",
        _y_dy,
        lambda a: mn.log_softmax_backward(a["y"], a["dy"]),
        {"y": 2, "dy": 2},
    ),
    Spec(
        "cross_entropy",
        _ce,
        lambda a: mn.cross_entropy(a["logits"], a["target"], weight=a["weight"], return_grad=True),
        {"logits": 2, "target": 1, "weight": 1},
    ),
    Spec(
        "linear_cross_entropy",
        _lce,
        lambda a: _flat_lce(
            mn.linear_cross_entropy(
                a["hidden"],
                a["lin_weight"],
                a["target"],
                a["bias"],
                weight_classes=a["weight_classes"],
                return_grad=True,
            )
        ),
        # hidden (..., D) and target (...) may have any number of leading axes (together)
        {"hidden": None, "lin_weight": 2, "target": None, "bias": 1, "weight_classes": 1},
    ),
    # leading dimensions broadcast (matmul, attention): any ndim >= 2 is valid there
    Spec("matmul", _mm, lambda a: mn.matmul(a["a"], a["b"]), {"a": None, "b": None}),
    Spec(
        "conv2d",
        _conv2d,
        lambda a: mn.conv2d(a["x"], a["w"], a["bias"]),
        {"x": 4, "w": 4, "bias": 1},
    ),
    Spec(
        "conv1d",
        _conv1d,
        lambda a: mn.conv1d(a["x"], a["w"], a["bias"]),
        {"x": 3, "w": 3, "bias": 1},
    ),
    Spec(
        "conv2d_backward",
        _conv2d_bwd,
        lambda a: mn.conv2d_backward(a["x"], a["w"], a["grad_out"]),
        {"x": 4, "w": 4, "grad_out": 4},
    ),
    Spec(
        "conv1d_backward",
        _conv1d_bwd,
        lambda a: mn.conv1d_backward(a["x"], a["w"], a["grad_out"]),
        {"x": 3, "w": 3, "grad_out": 3},
    ),
    Spec("correlate2d", _corr, lambda a: mn.correlate2d(a["in1"], a["in2"]), {"in1": 2, "in2": 2}),
    Spec("convolve2d", _corr, lambda a: mn.convolve2d(a["in1"], a["in2"]), {"in1": 2, "in2": 2}),
    Spec(
        "attention",
        _attn,
        lambda a: mn.attention(a["q"], a["k"], a["v"], mask=a["mask"]),
        {"q": None, "k": None, "v": None, "mask": None},
    ),
    Spec(
        "attention_backward",
        _attn_bwd,
        lambda a: mn.attention_backward(
            a["q"], a["k"], a["v"], a["out"], a["lse"], a["grad_out"], mask=a["mask"]
        ),
        {"q": None, "k": None, "v": None, "out": None, "lse": None, "grad_out": None, "mask": None},
    ),
    Spec(
        "sgd_step",
        _sgd,
        lambda a: mn.sgd_step(a["param"], a["grad"], a["momentum_buffer"], lr=0.1, momentum=0.9),
        {"param": 1, "grad": 1, "momentum_buffer": 1},
    ),
    Spec(
        "adam_step",
        _adam,
        lambda a: mn.adam_step(a["param"], a["grad"], a["exp_avg"], a["exp_avg_sq"], step=1),
        {"param": 1, "grad": 1, "exp_avg": 1, "exp_avg_sq": 1},
    ),
    Spec(
        "SGD",
        _opt,
        lambda a: mn.SGD([a["p0"], a["p1"]], lr=0.1, momentum=0.9),
        {"p0": None, "p1": None},
    ),
    Spec("Adam", _opt, lambda a: mn.Adam([a["p0"], a["p1"]], lr=0.1), {"p0": None, "p1": None}),
    Spec("AdamW", _opt, lambda a: mn.AdamW([a["p0"], a["p1"]]), {"p0": None, "p1": None}),
    Spec(
        "SGD.step",
        _opt_step(mn.SGD),
        lambda a: a["opt"].step([a["g0"], a["g1"]]),
        {"g0": 2, "g1": 1},
    ),
    Spec(
        "Adam.step",
        _opt_step(mn.Adam),
        lambda a: a["opt"].step([a["g0"], a["g1"]]),
        {"g0": 2, "g1": 1},
    ),
    Spec(
        "AdamW.step",
        _opt_step(mn.AdamW),
        lambda a: a["opt"].step([a["g0"], a["g1"]]),
        {"g0": 2, "g1": 1},
    ),
    Spec(
        "gradient_descent",
        lambda: {"x0": np.ones(3)},
        lambda a: mn.gradient_descent(lambda x: 2 * x, a["x0"], lr=0.1, steps=3),
        {"x0": None},
    ),
]

# How a mutation names the argument in the message: SGD([p0, p1]) says params[0], a step
# grads[0]; everything else uses the argument's own name.
ALIASES = {
    "p0": "params[0]",
    "p1": "params[1]",
    "g0": "grads[0]",
    "g1": "grads[1]",
    "lin_weight": "weight",
}

# Arguments for which None is a valid value (no weights, no bias, no mask).
OPTIONAL = {"weight", "bias", "mask", "weight_classes"}

# Functions that take complex arrays (scipy.signal's, computed through the real kernels:
# tests/test_conv_conventions.py)
TAKES_COMPLEX = {"correlate2d", "convolve2d"}

# Wrong values: (label, build(valid_array) -> the wrong value)
WRONG_VALUES: list[tuple[str, Callable[[np.ndarray], Any]]] = [
    ("None", lambda v: None),
    ("object()", lambda v: object()),
    ("str", lambda v: "not an array"),
    ("complex", lambda v: v.astype(np.complex64)),
    ("object array", lambda v: v.astype(object)),
    ("string array", lambda v: v.astype(str)),
    ("bytes array", lambda v: v.astype(bytes)),
    ("datetime array", lambda v: np.zeros(v.shape, "datetime64[s]")),
]
try:  # an 8-bit float: a real dtype that no kernel stores (16-bit is the narrowest)
    import ml_dtypes

    WRONG_VALUES.append(("float8 array", lambda v: v.astype(ml_dtypes.float8_e4m3fn)))
except ImportError:
    pass


def _wrong_ndim(v: np.ndarray) -> np.ndarray:
    """One more dimension than required (a leading axis of 2)."""
    return np.stack([v, v])


def _cases():
    for spec in SPECS:
        for arg, ndim in spec.arrays.items():
            for label, build in WRONG_VALUES:
                if label == "None" and arg in OPTIONAL:
                    continue  # None is valid there
                if label == "complex" and spec.name in TAKES_COMPLEX:
                    continue
                yield pytest.param(spec, arg, build, id=f"{spec.name}-{arg}-{label}")
            if ndim is not None:
                yield pytest.param(spec, arg, _wrong_ndim, id=f"{spec.name}-{arg}-ndim+1")


def _snapshot(args: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in args.items() if isinstance(v, np.ndarray)}


def _unchanged(args: dict[str, Any], before: dict[str, np.ndarray], what: str) -> None:
    for key, old in before.items():
        new = args[key]
        assert new.dtype == old.dtype and new.shape == old.shape, f"{what}: {key} changed"
        assert new.tobytes() == old.tobytes(), f"{what}: {key} changed"


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_valid_call_works(spec):
    """The base calls are valid: each failure below is the mutation's doing."""
    spec.call(spec.make())


@pytest.mark.parametrize("spec,arg,build", list(_cases()))
def test_wrong_argument_is_named_and_changes_nothing(spec, arg, build):
    args = spec.make()
    args[arg] = build(args[arg])
    before = _snapshot(args)
    if "opt" in args:  # the optimizer's own params and state must not move either
        opt = args["opt"]
        before.update({f"param{i}": p.copy() for i, p in enumerate(opt.params)})
        args.update({f"param{i}": p for i, p in enumerate(opt.params)})
    with pytest.raises((TypeError, ValueError)) as info:
        spec.call(args)
    message = str(info.value)
    assert message.startswith(spec.label), f"{message!r} should start with {spec.label!r}"
    name = ALIASES.get(arg, arg)
    assert name in message, f"{message!r} should name {name!r}"
    _unchanged(args, before, info.typename)


# -- sizes that would overflow 64-bit sizes: refused before anything is allocated -----------------


def _huge(shape):
    """A read-only view of one element broadcast to ``shape`` (no memory behind it)."""
    return np.broadcast_to(np.float32(1.0), shape)


HUGE_CALLS = [
    (
        "matmul result",
        lambda: mn.matmul(_huge((2**33, 1)), _huge((1, 2**33))),
        "matmul: the result would have shape",
    ),
    (
        "matmul work",
        lambda: mn.matmul(_huge((2**20, 2**40)), _huge((2**40, 2**10))),
        "matmul: the work",
    ),
    (
        "linear_cross_entropy products",
        lambda: mn.linear_cross_entropy(
            _huge((2**40, 2**10)), _huge((2**20, 2**10)), np.broadcast_to(np.int64(0), (2**40,))
        ),
        "linear_cross_entropy: the products would have shape",
    ),
    (
        "conv2d output",
        lambda: mn.conv2d(_huge((2**20, 1, 2**20, 2**20)), np.ones((2**10, 1, 1, 1), F)),
        "conv2d: the output would have shape",
    ),
    (
        "conv2d padding",
        lambda: mn.conv2d(np.ones((1, 1, 4, 4), F), np.ones((1, 1, 3, 3), F), padding=2**62),
        "conv2d: the padded input would have shape",
    ),
    (
        "conv2d padding beyond int64",
        lambda: mn.conv2d(np.ones((1, 1, 4, 4), F), np.ones((1, 1, 3, 3), F), padding=2**70),
        "conv2d: the padded input",
    ),
    (
        "conv2d depthwise huge padding and stride",
        lambda: mn.conv2d(
            np.ones((1, 2, 4, 4), F),
            np.ones((2, 1, 3, 3), F),
            groups=2,
            padding=2**31,
            stride=2**31,
        ),
        "conv2d: the padded input",
    ),
    (
        "conv2d stride beyond int64",
        lambda: mn.conv2d(np.ones((1, 1, 4, 4), F), np.ones((1, 1, 3, 3), F), stride=2**70),
        "conv2d: stride must be <= 2**62",
    ),
    (
        "conv2d dilation beyond int64",
        lambda: mn.conv2d(np.ones((1, 1, 4, 4), F), np.ones((1, 1, 3, 3), F), dilation=2**63),
        "conv2d: dilation must be <= 2**62",
    ),
    (
        "conv2d_backward padding",
        lambda: mn.conv2d_backward(
            np.ones((1, 1, 4, 4), F),
            np.ones((1, 1, 3, 3), F),
            np.ones((1, 1, 3, 3), F),
            padding=2**40,
            stride=2**40,
        ),
        "conv2d_backward: the padded input",
    ),
    (
        "conv1d work",
        lambda: mn.conv1d(_huge((2**30, 2**10, 2**12)), _huge((2**10, 2**10, 2**10))),
        "conv1d: the work",
    ),
    (
        "attention work",
        lambda: mn.attention(_huge((1, 2**32, 8)), _huge((1, 2**32, 8)), _huge((1, 2**32, 8))),
        "attention: the work",
    ),
    (
        "attention broadcast batch",
        lambda: mn.attention(
            _huge((2**40, 1, 1, 1)), _huge((1, 1, 2**30, 1)), _huge((1, 1, 2**30, 1))
        ),
        "attention: k broadcast over the batch",
    ),
    (
        "correlate2d full",
        lambda: mn.correlate2d(_huge((2**30, 2**30)), _huge((2**30, 2**30))),
        "correlate2d: the padded in1",
    ),
    ("set_num_threads", lambda: mn.set_num_threads(2**31), "set_num_threads: n must be <= 1024"),
    (
        "set_output_cache",
        lambda: mn.set_output_cache(2**70),
        "set_output_cache: max_bytes must be >= 0 and < 2**63",
    ),
    (
        "cross_entropy ignore_index",
        lambda: mn.cross_entropy(np.ones((2, 3), F), np.array([0, 1]), ignore_index=2**70),
        "cross_entropy: ignore_index must fit in int64",
    ),
]


@pytest.mark.parametrize("call,text", [c[1:] for c in HUGE_CALLS], ids=[c[0] for c in HUGE_CALLS])
def test_overflowing_sizes_are_refused(call, text):
    threads = mn.get_num_threads()
    try:
        with pytest.raises(ValueError) as info:
            call()
        assert text in str(info.value)
    finally:
        mn.set_num_threads(threads)


def test_allocation_failure_is_a_memory_error_not_a_crash():
    """Sizes that fit in 64 bits but not in memory: the kernel's scratch allocation fails
    (inside an OpenMP team here) and surfaces as MemoryError; the process goes on."""
    x = np.ones((1, 2, 1, 4), F)
    grad = np.ones((1, 2, 1, 3), F)
    grad_w = np.zeros((2, 2, 1, 3), F)
    before = (x.copy(), grad.copy())
    # the weight gradient of conv1d(padding=2**40, stride=2**40) on the zero-padded input
    # (the public call no longer pads such an input: Note [large padding], below)
    with pytest.raises(MemoryError):
        _core.conv2d_grad_weight_into(x, grad, grad_w, 1, 2**40, 0, 2**40, 1, 1, 1)
    for a, b in zip((x, grad), before, strict=True):
        assert a.tobytes() == b.tobytes()
    assert mn.conv1d(x[:, :, 0], grad_w[:, :, 0]).shape == (1, 2, 2)  # still works afterwards
    # only output 1 meets x (taps 0..2 on x[0..2]); the others read padding
    gx, gw, gb = mn.conv1d_backward(
        x[:, :, 0], np.ones((2, 2, 3), F), grad[:, :, 0], padding=2**40, stride=2**40
    )
    np.testing.assert_array_equal(gx, [[[2, 2, 2, 0]] * 2])
    np.testing.assert_array_equal(gw, np.ones((2, 2, 3), F))
    np.testing.assert_array_equal(gb, [3, 3])


# -- arrays that alias what a call writes -------------------------------------------------------


def test_overlapping_params_are_refused():
    w = np.ones(8, F)
    for params, text in (
        ([w, w], "params[1] shares memory with params[0]"),
        ([w[:5], w[3:]], "params[1] shares memory with params[0]"),
        ([w[4:], np.ones(3, F), w[:5]], "params[2] shares memory with params[0]"),
    ):
        for cls in (mn.SGD, mn.Adam, mn.AdamW):
            with pytest.raises(ValueError, match=text.replace("[", r"\[").replace("]", r"\]")):
                cls(params, lr=0.1)
    assert (w == 1).all()


def test_state_aliasing_a_param_is_refused():
    p = np.ones(6, F)
    g = np.full(6, 0.5, F)
    with pytest.raises(ValueError, match="adam_step: exp_avg shares memory with param "):
        mn.adam_step(p, g, p, np.zeros(6, F), step=1, lr=0.1)
    buf = np.zeros(12, F)
    with pytest.raises(ValueError, match="adam_step: exp_avg_sq shares memory with exp_avg "):
        mn.adam_step(p, g, buf[:6], buf[3:9], step=1, lr=0.1)
    with pytest.raises(ValueError, match="sgd_step: momentum_buffer shares memory with param "):
        mn.sgd_step(p, g, p, lr=0.1, momentum=0.9)
    assert (p == 1).all() and (buf == 0).all()


@pytest.mark.parametrize("kind", ["same", "partial"])
def test_gradient_overlapping_a_param_is_read_as_a_copy(kind):
    """NumPy's rule for an input that overlaps the output: the result is as if the input had
    been copied first (a grad_fn that returns x itself, e.g. for J = |x|^2 / 2)."""
    base = np.arange(10, dtype=F)
    param = base[:6]
    grad = param if kind == "same" else base[3:9]
    expected = param - 0.5 * np.array(grad)
    mn.sgd_step(param, grad, lr=0.5)
    np.testing.assert_array_equal(param, expected)
    # the optimizer classes and the momentum buffer path too
    base = np.arange(10, dtype=F)
    opt = mn.SGD([base[:6]], lr=0.5, momentum=0.9)
    g = base[2:8]
    expected = base[:6] - 0.5 * np.array(g)
    opt.step([g])
    np.testing.assert_array_equal(base[:6], expected)


def test_gradient_descent_with_grad_fn_returning_x():
    result = mn.gradient_descent(lambda x: x, np.ones(3), lr=0.5, steps=4)
    np.testing.assert_allclose(result.x, np.full(3, 0.5**4))


def test_grad_fn_returning_the_wrong_shape_or_dtype():
    with pytest.raises(ValueError, match=r"gradient_descent: grad_fn returned a gradient of shape"):
        mn.gradient_descent(lambda x: np.ones(4), np.ones(3), lr=0.1, steps=2)
    with pytest.raises(TypeError, match="gradient_descent: grad_fn returned a gradient of dtype"):
        mn.gradient_descent(lambda x: x.astype(complex), np.ones(3), lr=0.1, steps=2)


def test_load_state_dict_needs_a_mapping():
    opt = mn.Adam([np.ones(3, F)], lr=0.1)
    with pytest.raises(TypeError, match="Adam.load_state_dict: the state must be a mapping"):
        opt.load_state_dict(None)


# -- hyper-parameters: NaN, negative, zero where invalid -------------------------------------------

HYPER = [
    ("SGD", lambda p, v: mn.SGD([p], lr=v), "lr", [np.nan, -0.1, 0.0, np.inf]),
    ("SGD", lambda p, v: mn.SGD([p], lr=0.1, momentum=v), "momentum", [np.nan, -0.5]),
    ("SGD", lambda p, v: mn.SGD([p], lr=0.1, weight_decay=v), "weight_decay", [np.nan, -1.0]),
    ("Adam", lambda p, v: mn.Adam([p], lr=v), "lr", [np.nan, -0.1, 0.0]),
    ("Adam", lambda p, v: mn.Adam([p], eps=v), "eps", [np.nan, -1e-8, 0.0]),
    ("Adam", lambda p, v: mn.Adam([p], betas=(v, 0.999)), "betas[0]", [np.nan, -0.1, 1.0]),
    ("Adam", lambda p, v: mn.Adam([p], betas=(0.9, v)), "betas[1]", [np.nan, -0.1, 1.0]),
    ("AdamW", lambda p, v: mn.AdamW([p], weight_decay=v), "weight_decay", [np.nan, -0.1]),
    (
        "SGD",
        lambda p, v: mn.SGD([p], lr=0.1, max_grad_norm=v),
        "max_grad_norm",
        [np.nan, -1.0, 0.0],
    ),
    (
        "SGD.step",
        lambda p, v: _with_attribute(mn.SGD([p], lr=0.1), "max_grad_norm", v).step(
            [np.ones_like(p)]
        ),
        "max_grad_norm",
        [np.nan, -1.0, 0.0],
    ),
    (
        "gradient_descent",
        lambda p, v: mn.gradient_descent(lambda x: x, p, lr=0.1, tol=v),
        "tol",
        [np.nan, -1.0],
    ),
    (
        "gradient_descent",
        lambda p, v: mn.gradient_descent(lambda x: x, p, lr=0.1, steps=v),
        "steps",
        [-1],
    ),
    (
        "cross_entropy",
        lambda p, v: mn.cross_entropy(np.ones((2, 3)), np.array([0, 1]), label_smoothing=v),
        "label_smoothing",
        [np.nan, -0.1, 1.5],
    ),
    (
        "attention",
        lambda p, v: mn.attention(np.ones((2, 4)), np.ones((2, 4)), np.ones((2, 4)), scale=v),
        "scale",
        [np.nan, np.inf],
    ),
    (
        "attention",
        lambda p, v: mn.attention(
            np.ones((2, 4)), np.ones((2, 4)), np.ones((2, 4)), dropout_p=v, seed=1
        ),
        "dropout_p",
        [np.nan, -0.1, 1.0],
    ),
    (
        "conv2d",
        lambda p, v: mn.conv2d(np.ones((1, 1, 4, 4)), np.ones((1, 1, 3, 3)), stride=v),
        "stride",
        [0, -1],
    ),
    (
        "conv2d",
        lambda p, v: mn.conv2d(np.ones((1, 1, 4, 4)), np.ones((1, 1, 3, 3)), dilation=v),
        "dilation",
        [0, -2],
    ),
    (
        "conv2d",
        lambda p, v: mn.conv2d(np.ones((1, 1, 4, 4)), np.ones((1, 1, 3, 3)), padding=v),
        "padding",
        [-1],
    ),
    (
        "conv2d",
        lambda p, v: mn.conv2d(np.ones((1, 2, 4, 4)), np.ones((2, 1, 3, 3)), groups=v),
        "groups",
        [0, -2],
    ),
    ("set_num_threads", lambda p, v: mn.set_num_threads(v), "n", [0, -3]),
    ("set_output_cache", lambda p, v: mn.set_output_cache(v), "max_bytes", [-1]),
]


def _with_attribute(obj: Any, name: str, value: Any) -> Any:
    """obj after obj.name = value (an attribute changed between steps)."""
    setattr(obj, name, value)
    return obj


@pytest.mark.parametrize(
    "label,call,name,value",
    [(h[0], h[1], h[2], v) for h in HYPER for v in h[3]],
    ids=[f"{h[0]}-{h[2]}={v}" for h in HYPER for v in h[3]],
)
def test_invalid_hyper_parameter(label, call, name, value):
    p = np.ones(4, F)
    threads = mn.get_num_threads()
    try:
        with pytest.raises(ValueError) as info:
            call(p, value)
    finally:
        mn.set_num_threads(threads)
    message = str(info.value)
    assert message.startswith(label) and name in message, message
    assert (p == 1).all()
