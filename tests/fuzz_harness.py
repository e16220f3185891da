"""atheris fuzz harness for the public API of mlmath_native (run it through ``.ci/fuzz.sh``).

Each input picks one public function and, from the fuzzer's bytes, the shapes (dimensions 0..6,
sometimes empty), the dtypes (mostly float32/float64, sometimes int/bool/float16/complex), the
memory layout (contiguous, Fortran order, strided slices, negative strides, transposes,
broadcast zero-stride views, read-only arrays) and the option values (valid and invalid ones).

* ValueError / TypeError (numpy's AxisError is a ValueError and an IndexError) are the
  documented ways to reject an argument: fine.
* Anything else escaping the call, a crash or a sanitizer report is a finding.
* When the call succeeds, the result is compared with ``mlmath_native.reference`` (float64)
  at a tolerance scaled by the magnitudes involved (float32: ~1e-4 of a bound on the terms,
  float64: ~1e-9); a mismatch raises AssertionError, which is a finding too.

Run it directly (without sanitizers) for a quick check of the harness itself:
``python tests/fuzz_harness.py -runs=2000`` (needs ``pip install atheris``).  Replay a finding:
``python tests/fuzz_harness.py build/fuzz-artifacts/crash-...`` (``MLMATH_FUZZ_VERBOSE=1``
prints the call).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import warnings
from typing import Any

try:
    import atheris
except ImportError:  # importable without atheris (pytest --doctest-modules collects tests/)
    atheris = None

_instrument = (
    atheris.instrument_imports(include=["mlmath_native"]) if atheris else contextlib.nullcontext()
)
with _instrument:
    import numpy as np

    import mlmath_native as mn
    from mlmath_native import reference as ref
    from mlmath_native.reference import adam_optimizer as ref_adam
    from mlmath_native.reference import convolution as ref_conv
    from mlmath_native.reference import cross_entropy as ref_ce
    from mlmath_native.reference import gradient_descent as ref_gd
    from mlmath_native.reference import softmax as ref_sm
    from mlmath_native.reference import transformer_attention as ref_attn

del ref

VERBOSE = bool(os.environ.get("MLMATH_FUZZ_VERBOSE"))
#: A directory: a disagreement with the reference is saved there (the input, and a line in
#: mismatches.txt) and fuzzing goes on, instead of stopping as a finding.  Crashes, sanitizer
#: reports and unexpected exceptions still stop the run.  .ci/run sets it (fuzz.sh's
#: FUZZ_MISMATCHES=report): libFuzzer's path through the inputs is not repeatable run to run
#: here, so a numeric edge case met by chance must not fail an unrelated change.
MISMATCH_DIR = os.environ.get("MLMATH_FUZZ_MISMATCH_DIR")
EXPECTED = (ValueError, TypeError)


class Gen:
    """Values drawn from the fuzzer's bytes."""

    def __init__(self, data: bytes) -> None:
        self.fdp = atheris.FuzzedDataProvider(data)
        self.rng = np.random.default_rng(self.fdp.ConsumeIntInRange(0, 2**32 - 1))
        self.log: list[str] = []

    def int(self, lo: int, hi: int) -> int:
        return self.fdp.ConsumeIntInRange(lo, hi)

    def bool(self) -> bool:
        return self.fdp.ConsumeBool()

    def chance(self, n: int) -> bool:
        """True about once in n (False once the bytes are used up)."""
        if self.fdp.remaining_bytes() == 0:
            return False
        return self.fdp.ConsumeIntInRange(0, n - 1) == 0

    def pick(self, items: list[Any] | tuple[Any, ...]) -> Any:
        return self.fdp.PickValueInList(list(items))

    def dim(self, lo: int = 1, hi: int = 6) -> int:
        """A dimension: usually lo..hi, sometimes 0."""
        if self.chance(16):
            return 0
        return self.int(lo, hi)

    def float_dtype(self) -> np.dtype[Any]:
        return np.dtype(self.pick([np.float32, np.float64]))

    def any_dtype(self) -> np.dtype[Any]:
        """Mostly float32/float64; sometimes a dtype that is converted or rejected."""
        if self.chance(10):
            return np.dtype(self.pick([np.int32, np.int64, np.bool_, np.float16, np.complex64]))
        return self.float_dtype()

    def values(self, shape: tuple[int, ...], dtype: np.dtype[Any], scale: float = 1.0) -> Any:
        kind = self.int(0, 15)
        if dtype.kind == "b":
            a = self.rng.random(shape) < 0.5
        elif dtype.kind in "iu":
            a = self.rng.integers(-5, 6, size=shape)
        else:
            mag = scale * self.pick([1.0, 1.0, 1.0, 0.01, 10.0, 100.0])
            a = self.rng.standard_normal(shape) * mag
            if kind == 0 and a.size:  # occasional special values
                flat = a.reshape(-1)
                idx = self.rng.integers(0, flat.size)
                flat[idx] = self.pick([np.inf, -np.inf, np.nan, 1e30, -1e30, 0.0])
            if dtype.kind == "c":
                a = a + 1j * a
        return np.asarray(a).astype(dtype)

    def layout(self, a: np.ndarray, allow_readonly: bool = True) -> np.ndarray:
        """The same values in another memory layout (a view where possible)."""
        choice = self.int(0, 9)
        if choice <= 3 or a.ndim == 0:
            out = a
        elif choice == 4:
            out = np.asfortranarray(a)
        elif choice == 5:  # strided slice of a bigger buffer
            ax = self.int(0, a.ndim - 1)
            step = self.int(2, 3)
            shape = list(a.shape)
            shape[ax] = shape[ax] * step
            big = np.zeros(shape, a.dtype)
            sl = [slice(None)] * a.ndim
            sl[ax] = slice(None, None, step)
            big[tuple(sl)] = a
            out = big[tuple(sl)]
        elif choice == 6:  # negative strides
            ax = self.int(0, a.ndim - 1)
            sl = [slice(None)] * a.ndim
            sl[ax] = slice(None, None, -1)
            flipped = np.ascontiguousarray(a[tuple(sl)])
            out = flipped[tuple(sl)]
        elif choice == 7:  # a transposed buffer viewed back
            perm = self.rng.permutation(a.ndim)
            inv = np.argsort(perm)
            out = np.ascontiguousarray(a.transpose(perm)).transpose(inv)
        elif choice == 8 and a.size:  # zero-stride broadcast where a dimension is 1
            ax = self.int(0, a.ndim - 1)
            sl = [slice(None)] * a.ndim
            sl[ax] = slice(0, 1)
            a1 = a[tuple(sl)]
            out = np.broadcast_to(a1, a.shape)
            a[...] = out  # keep a == out for the reference (a is our own array)
            out = np.broadcast_to(a1.copy(), a.shape)
        else:
            out = a.copy()
            if allow_readonly:
                out.flags.writeable = False
        return out

    def array(
        self, shape: tuple[int, ...], dtype: np.dtype[Any] | None = None, scale: float = 1.0
    ) -> np.ndarray:
        dtype = self.any_dtype() if dtype is None else dtype
        return self.layout(self.values(shape, dtype, scale))


# -- comparison ----------------------------------------------------------------------------------


def _eps(dtype: np.dtype[Any]) -> float:
    """Tolerance per dtype; float16 results are rounded once to 11 bits (Note [16-bit storage])."""
    return {np.dtype(np.float32): 1e-4, np.dtype(np.float16): 4e-3}.get(np.dtype(dtype), 1e-9)


def compute_dtype(*arrays: Any) -> np.dtype[Any]:
    """The result dtype of these inputs: float16/32/64 kept and promoted as NumPy does, other
    real dtypes as float64 (the package's policy, _checks.compute_dtype)."""
    kept = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
    dts = [np.asarray(a).dtype for a in arrays if a is not None]
    return np.result_type(*[d if d in kept else np.dtype(np.float64) for d in dts])


def check_close(name: str, got: Any, want: Any, dtype: np.dtype[Any], bound: Any = 1.0) -> None:
    """|got - want| <= eps * (1 + bound) elementwise, with NaN/Inf in the same places."""
    got = np.asarray(got)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {got.shape} != reference {want.shape}")
    if got.dtype.kind != "f":
        raise AssertionError(f"{name}: result dtype {got.dtype} is not floating")
    g = got.astype(np.float64)
    bound = np.broadcast_to(np.abs(np.asarray(bound, dtype=np.float64)), want.shape)
    finite_in = np.isfinite(bound)
    fin = np.isfinite(want) & finite_in
    # Where the reference is not finite (or the bound is, i.e. inputs had inf/nan), only
    # require the result not to be finite where the reference is NaN/Inf with finite inputs.
    bad_nf = (~np.isfinite(want)) & finite_in & ~(np.isnan(g) | (g == want))
    tol = _eps(dtype) * (1.0 + bound[fin])
    if dtype == np.float16:  # plus one rounding of the result itself (2**-11 relative)
        tol = tol + 2.0**-11 * np.abs(want[fin])
    if dtype in (np.float32, np.float16):
        # float32 / float16 results beyond their range are inf
        big = np.abs(want[fin]) > (1e37 if dtype == np.float32 else 6e4)
        tol = np.where(big, np.inf, tol)
    diff = np.abs(g[fin] - want[fin])
    bad = ~(diff <= tol)
    if bad.any() or bad_nf.any():
        i = int(np.argmax(np.where(bad, diff - tol, -np.inf))) if bad.any() else -1
        msg = f"{name}: mismatch with the reference ({int(bad.sum())} finite, "
        msg += f"{int(bad_nf.sum())} non-finite elements)"
        if i >= 0:
            msg += f"; worst got {g[fin][i]!r} want {want[fin][i]!r} tol {tol[i]!r}"
        raise AssertionError(msg)


def finite_bound(*arrays: Any) -> float:
    """max |x| over the arrays (inf if any is not finite)."""
    m = 0.0
    for a in arrays:
        if a is None:
            continue
        a = np.asarray(a, dtype=np.float64)
        if a.size:
            m = max(m, float(np.max(np.abs(a))))
    return m


def ref_or_none(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """The reference result, or None when the reference rejects the arguments too."""
    try:
        return fn(*args, **kwargs)
    except EXPECTED:
        return None
    except IndexError as exc:
        # Known reference limitation: cross_entropy with 0 classes and target == ignore_index
        # (the package returns nan, the reference's put_along_axis raises IndexError).
        raise ReferenceGap(str(exc)) from None


def all_finite(*arrays: Any) -> bool:
    """No NaN/Inf in any of the (numeric) arrays."""
    for a in arrays:
        if a is None:
            continue
        a = np.asarray(a)
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            return False
    return True


class ReferenceGap(Exception):
    """The reference cannot evaluate this (valid) input: nothing to compare against."""


def native_accepted_reference_rejected(name: str, args: str) -> None:
    raise AssertionError(f"{name}: the package accepted arguments the reference rejects: {args}")


# -- targets ---------------------------------------------------------------------------------


def axis_for(g: Gen, ndim: int) -> Any:
    if g.chance(16):
        return g.pick([ndim, -ndim - 1, 1.5, "0", None, np.int64(0)])
    span = max(ndim, 1)
    return g.int(-span, span - 1)


def shape_nd(g: Gen, lo_nd: int = 0, hi_nd: int = 4) -> tuple[int, ...]:
    return tuple(g.dim() for _ in range(g.int(lo_nd, hi_nd)))


def t_softmax(g: Gen) -> None:
    which = g.pick(["softmax", "log_softmax", "logsumexp"])
    shape = shape_nd(g)
    x = g.array(shape)
    axis = axis_for(g, x.ndim)
    kwargs: dict[str, Any] = {}
    out = None
    if which == "logsumexp":
        if g.bool():
            kwargs["keepdims"] = g.bool()
    elif g.chance(3):
        dt = compute_dtype(x) if g.int(0, 5) else g.pick([np.float32, np.float64, np.int32])
        oshape = shape if g.int(0, 5) else shape + (1,)
        out = g.layout(np.full(oshape, 7.0).astype(dt), allow_readonly=g.chance(4))
        if g.chance(8):
            out = x  # in place (may be read-only or a broadcast view)
        kwargs["out"] = out
    g.log.append(f"{which}(x {x.dtype}{x.shape} strides {x.strides}, axis={axis!r}, {kwargs})")
    if VERBOSE:
        print(g.log[-1])
    x_ref = np.array(x, dtype=np.complex128 if x.dtype.kind == "c" else np.float64)
    try:
        res = getattr(mn, which)(x, axis, **kwargs)
    except EXPECTED:
        return
    dt = compute_dtype(x)
    refkw = {"keepdims": kwargs["keepdims"]} if "keepdims" in kwargs else {}
    want = ref_or_none(getattr(ref_sm, which), x_ref, axis, **refkw)
    if want is None:
        native_accepted_reference_rejected(which, g.log[-1])
    if out is not None and res is not out:
        raise AssertionError(f"{which}: out= given but another array was returned")
    if which == "softmax":
        bound = 1.0
    else:
        bound = finite_bound(x_ref)
        # the max-shift loses |x| * eps of absolute precision
    if np.asarray(res).dtype != dt:
        raise AssertionError(f"{which}: result dtype {np.asarray(res).dtype}, expected {dt}")
    check_close(which, res, want, dt, bound)


def t_cross_entropy(g: Gen) -> None:
    n_lead = g.int(0, 2)
    lead = tuple(g.dim() for _ in range(n_lead))
    c = g.dim(1, 6)
    logits_shape = lead + (c,)
    axis = -1
    if n_lead and g.chance(3):  # class axis in the middle
        axis = g.int(0, n_lead)
        logits_shape = lead[:axis] + (c,) + lead[axis:]
    logits = g.array(logits_shape)
    kwargs: dict[str, Any] = {}
    if axis != -1 or g.chance(8):
        kwargs["axis"] = axis if not g.chance(8) else axis_for(g, logits.ndim)
    ignore_index = -100
    if g.bool():
        ignore_index = g.pick([-100, -1, 0, 1, c, 2**40])
        kwargs["ignore_index"] = ignore_index
    target_kind = g.int(0, 4)
    if target_kind <= 2:  # class indices
        tdt = g.pick([np.int64, np.int32, np.int64, np.uint8, np.float64, np.bool_])
        labels = g.rng.integers(0, max(c, 1), size=lead)
        if g.chance(3) and labels.size:  # ignore_index and out-of-range labels
            flat = labels.reshape(-1)
            flat[g.rng.integers(0, flat.size)] = g.pick([ignore_index, -1, c, c + 5, -100])
        target = g.layout(np.asarray(labels).astype(tdt) if tdt != np.bool_ else labels > 0)
    else:  # probabilities
        p = g.rng.random(logits_shape)
        if g.bool():
            p = p / np.maximum(p.sum(axis=axis, keepdims=True), 1e-30)
        target = g.layout(p.astype(g.float_dtype()))
        if g.chance(8):
            target = g.array(shape_nd(g, 1, 3))
    if g.bool():
        kwargs["reduction"] = g.pick(["mean", "sum", "none", "max", None])
    if g.chance(3):
        kwargs["label_smoothing"] = g.pick([0.0, 0.1, 0.5, 1.0, -0.1, 1.5, np.nan])
    if g.chance(3):
        wshape = (c,) if g.int(0, 5) else (c + 1,)
        w = g.rng.random(wshape) * 2
        if g.chance(6) and w.size:
            w[0] = g.pick([0.0, -1.0, np.inf])
        kwargs["weight"] = g.layout(w.astype(g.float_dtype()))
    return_grad = g.bool()
    if return_grad:
        kwargs["return_grad"] = True
        if g.chance(3):
            red = kwargs.get("reduction", "mean")
            gshape = lead if red == "none" else ()
            kwargs["grad_output"] = g.array(gshape, g.float_dtype())
    g.log.append(
        f"cross_entropy(logits {logits.dtype}{logits.shape} strides {logits.strides}, "
        f"target {target.dtype}{target.shape} {target!r}, {kwargs})"
    )
    if VERBOSE:
        print(g.log[-1])
    try:
        res = mn.cross_entropy(logits, target, **kwargs)
    except EXPECTED:
        return
    if logits.dtype.kind == "c":
        raise AssertionError("cross_entropy accepted complex logits")
    rkw = {k: v for k, v in kwargs.items() if k not in ("return_grad", "grad_output")}
    want = ref_or_none(ref_ce.cross_entropy, np.asarray(logits, np.float64), target, **rkw)
    if want is None:
        native_accepted_reference_rejected("cross_entropy", g.log[-1])
    dt = compute_dtype(logits)
    loss, grad = res if return_grad else (res, None)
    m = finite_bound(logits)
    wmax = finite_bound(kwargs.get("weight"))
    nsamp = max(1, int(np.prod(lead)))
    bound = (1.0 + m) * (1.0 + wmax) * (nsamp if kwargs.get("reduction") == "sum" else 1)
    if kwargs.get("reduction") == "mean" or "reduction" not in kwargs:
        bound = bound * max(1.0, wmax / max(1e-300, _min_pos(kwargs.get("weight"))))
    check_close("cross_entropy loss", loss, want, dt, bound)
    if return_grad:
        gw = ref_or_none(
            ref_ce.cross_entropy_grad,
            np.asarray(logits, np.float64),
            target,
            grad_output=kwargs.get("grad_output"),
            **rkw,
        )
        if gw is None:
            native_accepted_reference_rejected("cross_entropy grad", g.log[-1])
        gb = (1.0 + wmax) * (1.0 + finite_bound(kwargs.get("grad_output")))
        if kwargs.get("reduction") == "mean" or "reduction" not in kwargs:
            gb = gb * max(1.0, wmax / max(1e-300, _min_pos(kwargs.get("weight"))))
        check_close("cross_entropy grad", grad, gw, dt, gb)


def _min_pos(w: Any) -> float:
    if w is None:
        return 1.0
    w = np.abs(np.asarray(w, np.float64))
    w = w[w > 0]
    return float(w.min()) if w.size else 1.0


def t_matmul(g: Gen) -> None:
    m, k, n = g.dim(), g.dim(), g.dim()
    kind = g.int(0, 5)
    if kind == 0:  # 1-D operands
        a_shape: tuple[int, ...] = (k,)
        b_shape: tuple[int, ...] = (k, n) if g.bool() else (k,)
    elif kind == 1:
        a_shape, b_shape = (m, k), (k,)
    else:
        batch_a = tuple(g.pick([1, g.dim(1, 3)]) for _ in range(g.int(0, 2)))
        batch_b = batch_a[g.int(0, len(batch_a)) :] if g.bool() else batch_a
        if g.chance(6) and batch_b:
            batch_b = tuple(1 for _ in batch_b)
        a_shape, b_shape = batch_a + (m, k), batch_b + (k, n)
    if g.chance(10):  # mismatched inner dimension
        b_shape = b_shape[:-2] + (k + 1,) + b_shape[-1:] if len(b_shape) >= 2 else (k + 1,)
    a, b = g.array(a_shape), g.array(b_shape)
    out = None
    kwargs: dict[str, Any] = {}
    if g.chance(4):
        try:
            oshape = np.matmul(np.zeros(a_shape), np.zeros(b_shape)).shape
        except ValueError:
            oshape = (1,)
        dt = compute_dtype(a, b) if g.int(0, 5) else g.pick([np.float32, np.float64, np.int64])
        out = g.layout(np.full(oshape, 3.0).astype(dt), allow_readonly=g.chance(4))
        if g.chance(6) and out.shape == a.shape and out.dtype == a.dtype:
            out = a  # aliasing an input
        kwargs["out"] = out
    g.log.append(
        f"matmul(a {a.dtype}{a.shape} {a.strides}, b {b.dtype}{b.shape} {b.strides}, "
        f"out={'None' if out is None else (out.dtype, out.shape, out.strides)})"
    )
    if VERBOSE:
        print(g.log[-1])
    a64 = np.array(a, dtype=np.complex128 if a.dtype.kind == "c" else np.float64)
    b64 = np.array(b, dtype=np.complex128 if b.dtype.kind == "c" else np.float64)
    try:
        res = mn.matmul(a, b, **kwargs)
    except EXPECTED:
        return
    if not all_finite(*(a, b)):
        return  # blocked kernels spread NaN (0 * inf) differently: only no-crash is checked
    if a.dtype.kind == "c" or b.dtype.kind == "c":
        raise AssertionError("matmul accepted a complex operand")
    try:
        want = np.matmul(a64, b64)
    except ValueError:
        native_accepted_reference_rejected("matmul", g.log[-1])
    if out is not None and res is not out:
        raise AssertionError("matmul: out= given but another array was returned")
    bound = np.matmul(np.abs(a64), np.abs(b64))
    dt = compute_dtype(a, b)
    check_close("matmul", res, want, dt, bound)


def _conv_args(g: Gen) -> tuple[Any, ...]:
    batched = g.int(0, 4) != 0
    groups = g.pick([1, 1, 1, 2, 3])
    c = groups * g.int(1, 2)
    kout = groups * g.int(1, 2)
    if g.chance(12):
        c += 1  # not divisible
    kh, kw = g.int(1, 3), g.int(1, 3)
    if g.chance(3):
        kh = kw = 3  # winograd-eligible
    h, w = g.dim(1, 7), g.dim(1, 7)
    x_shape = ((g.dim(1, 2),) if batched else ()) + (c, h, w)
    w_shape = (kout, c // groups if c % groups == 0 else c, kh, kw)
    x = g.array(x_shape)
    wt = g.array(w_shape)
    kwargs: dict[str, Any] = {}
    if g.bool():
        kwargs["stride"] = g.pick([1, 2, 3, (1, 2), (2, 1), 0, -1, (1,), 1.0])
    if g.bool():
        kwargs["padding"] = g.pick(
            [0, 1, 2, (1, 0), ((1, 0), (0, 2)), "same", "valid", "full", -1, (1, 2, 3), 5]
        )
    if g.chance(3):
        kwargs["dilation"] = g.pick([1, 2, (2, 1), 0])
    if groups != 1 or g.chance(10):
        kwargs["groups"] = groups if g.int(0, 7) else g.pick([0, -1, 4, 2.0])
    if g.chance(3):
        kwargs["padding_mode"] = g.pick(["zeros", "reflect", "replicate", "circular", "bogus"])
    return x, wt, kout, kwargs


def t_conv2d(g: Gen) -> None:
    x, wt, kout, kwargs = _conv_args(g)
    bias = None
    if g.bool():
        bias = g.array((kout,) if g.int(0, 7) else (kout + 1,))
    if g.chance(3):
        kwargs["algorithm"] = g.pick(
            ["auto", "direct", "winograd", "winograd_f2", "winograd_f4", "fft"]
        )
    g.log.append(
        f"conv2d(x {x.dtype}{x.shape} {x.strides}, w {wt.dtype}{wt.shape} {wt.strides}, "
        f"bias={None if bias is None else (bias.dtype, bias.shape)}, {kwargs})"
    )
    if VERBOSE:
        print(g.log[-1])
    try:
        res = mn.conv2d(x, wt, bias, **kwargs)
    except EXPECTED:
        return
    if not all_finite(*(x, wt, bias)):
        return  # blocked kernels spread NaN (0 * inf) differently: only no-crash is checked
    rkw = {k: v for k, v in kwargs.items() if k != "algorithm"}
    f64 = [None if a is None else np.asarray(a, np.float64) for a in (x, wt, bias)]
    want = ref_or_none(ref_conv.conv2d, f64[0], f64[1], f64[2], **rkw)
    if want is None:
        native_accepted_reference_rejected("conv2d", g.log[-1])
    absb = None if f64[2] is None else np.abs(f64[2])
    bound = ref_conv.conv2d(np.abs(f64[0]), np.abs(f64[1]), absb, **rkw)
    dt = compute_dtype(x, wt, bias)
    if (
        str(kwargs.get("algorithm", "auto")).startswith("winograd")
        or kwargs.get("algorithm", "auto") == "auto"
    ):
        # winograd transforms amplify rounding (F(4,3) most), and mix a whole tile: an output's
        # error scales with the largest value of its tile, not of its own window (an outlier
        # of 1e30 leaves ~1e30 * eps in its tile's other outputs), so the bound is the
        # input's largest magnitude times the largest filter norm
        tile = float(np.max(np.abs(f64[0]), initial=0.0)) * float(
            np.max(np.abs(f64[1]).sum(axis=tuple(range(1, f64[1].ndim))), initial=0.0)
        )
        bound = np.maximum(bound, tile) * 8
    check_close("conv2d", res, want, dt, bound)


def t_conv2d_backward(g: Gen) -> None:
    x, wt, kout, kwargs = _conv_args(g)
    f64x = np.asarray(x, np.float64) if x.dtype.kind != "c" else None
    f64w = np.asarray(wt, np.float64) if wt.dtype.kind != "c" else None
    try:
        oshape = ref_conv.conv2d(
            np.zeros(x.shape), np.zeros(wt.shape), **{k: v for k, v in kwargs.items()}
        ).shape
    except EXPECTED:
        oshape = (1, 1, 1, 1)[: x.ndim]
    if g.chance(10):
        oshape = tuple(s + 1 for s in oshape)
    go = g.array(oshape)
    if g.chance(4):
        kwargs["needs"] = g.pick([("input",), ("weight",), ("bias",), (), ("input", "bogus")])
    g.log.append(
        f"conv2d_backward(x {x.dtype}{x.shape} {x.strides}, w {wt.dtype}{wt.shape}, "
        f"grad_out {go.dtype}{go.shape} {go.strides}, {kwargs})"
    )
    if VERBOSE:
        print(g.log[-1])
    try:
        res = mn.conv2d_backward(x, wt, go, **kwargs)
    except EXPECTED:
        return
    if not all_finite(*(x, wt, go)):
        return  # blocked kernels spread NaN (0 * inf) differently: only no-crash is checked
    go64 = np.asarray(go, np.float64)
    want = ref_or_none(ref_conv.conv2d_backward, f64x, f64w, go64, **kwargs)
    if want is None:
        native_accepted_reference_rejected("conv2d_backward", g.log[-1])
    dt = compute_dtype(x, wt, go)
    ax, aw, ago = np.abs(f64x), np.abs(f64w), np.abs(go64)
    ball = ref_conv.conv2d_backward(
        ax, aw, ago, **{k: v for k, v in kwargs.items() if k != "needs"}
    )
    for name, got, exp, b in zip(("grad_x", "grad_w", "grad_bias"), res, want, ball, strict=True):
        if (got is None) != (exp is None):
            raise AssertionError(f"conv2d_backward {name}: None mismatch")
        if got is not None:
            check_close(f"conv2d_backward {name}", got, exp, dt, b)


def _attn_args(g: Gen) -> tuple[Any, ...]:
    two_d = g.chance(4)
    lq, lk, d, dv = g.dim(1, 6), g.dim(1, 6), g.dim(1, 6), g.dim(1, 6)
    hkv = g.int(1, 2)
    hq = hkv * g.int(1, 2)
    if g.chance(12):
        hq = hkv + 1 if hkv > 1 else hq
    if two_d:
        qs, ks, vs = (lq, d), (lk, d), (lk, dv)
        lead: tuple[int, ...] = ()
    else:
        batch = tuple(g.dim(1, 2) for _ in range(g.int(0, 2)))
        kb = batch if g.int(0, 3) else tuple(1 for _ in batch)
        qs, ks, vs = batch + (hq, lq, d), kb + (hkv, lk, d), kb + (hkv, lk, dv)
        lead = batch + (hq,)
    if g.chance(12):
        ks = ks[:-1] + (d + 1,)
    q, k, v = g.array(qs), g.array(ks), g.array(vs)
    kwargs: dict[str, Any] = {}
    mk = g.int(0, 5)
    if mk == 1:  # boolean mask, maybe broadcast
        shape = lead + (lq, lk)
        if g.bool():
            shape = (1,) * len(lead) + (lq, lk)
        if g.chance(6):
            shape = (lk,)
        m = g.rng.random(shape) < 0.7
        kwargs["mask"] = g.layout(m)
    elif mk == 2:  # additive float mask with -inf entries
        m = g.rng.standard_normal(lead + (lq, lk))
        m[g.rng.random(m.shape) < 0.2] = -np.inf
        kwargs["mask"] = g.layout(m.astype(g.float_dtype()))
    elif mk == 3:
        kwargs["mask"] = g.array(g.pick([(lq + 1, lk), (lq, lk), (2, lq, lk)]))
    if g.bool():
        kwargs["causal"] = g.pick([False, True, "upper_left", "lower_right", None, "bogus", 1])
    if g.chance(3):
        kwargs["scale"] = g.pick([None, 0.5, 2.0, 0.0, -1.0, np.inf, "x"])
    if g.chance(3):
        kwargs["dropout_p"] = g.pick([0.0, 0.1, 0.5, 0.9, 1.0, -0.1])
        kwargs["seed"] = g.pick([None, 0, 1, 12345, 2**64 - 1, 2**64, -1, True])
    return q, k, v, kwargs, lead, lq, dv


def _attn_bound(v: Any, kwargs: dict[str, Any]) -> float:
    p = kwargs.get("dropout_p", 0.0)
    p = p if isinstance(p, float) and 0 <= p < 1 else 0.0
    return (1.0 + finite_bound(v)) / (1.0 - p)


def t_attention(g: Gen) -> None:
    q, k, v, kwargs, _, _, _ = _attn_args(g)
    return_lse = g.bool()
    if return_lse:
        kwargs["return_lse"] = True
    g.log.append(
        f"attention(q {q.dtype}{q.shape} {q.strides}, k {k.dtype}{k.shape} {k.strides}, "
        f"v {v.dtype}{v.shape} {v.strides}, {kwargs})"
    )
    if VERBOSE:
        print(g.log[-1])
    try:
        res = mn.attention(q, k, v, **kwargs)
    except EXPECTED:
        return
    if not all_finite(*(q, k, v, kwargs.get("mask"))):
        return  # blocked kernels spread NaN (0 * inf) differently: only no-crash is checked
    f = [np.asarray(a, np.float64) for a in (q, k, v)]
    want = ref_or_none(ref_attn.attention, *f, **kwargs)
    if want is None:
        native_accepted_reference_rejected("attention", g.log[-1])
    dt = compute_dtype(q, k, v)
    sc = kwargs.get("scale")
    sc = abs(sc) if isinstance(sc, float) else 1.0
    sb = (1.0 + finite_bound(q) * finite_bound(k) * q.shape[-1] * sc) * 4
    if return_lse:
        check_close("attention out", res[0], want[0], dt, _attn_bound(v, kwargs) * sb)
        check_close("attention lse", res[1], want[1], dt, sb)
    else:
        check_close("attention", res, want, dt, _attn_bound(v, kwargs) * sb)


def t_attention_backward(g: Gen) -> None:
    q, k, v, kwargs, lead, lq, dv = _attn_args(g)
    f = [np.asarray(a, np.float64) if a.dtype.kind != "c" else a for a in (q, k, v)]
    try:
        out, lse = ref_attn.attention(*f, **kwargs, return_lse=True)
    except EXPECTED:
        out = np.zeros(q.shape[:-1] + (v.shape[-1],))
        lse = np.zeros(q.shape[:-1])
    except Exception:
        raise
    if g.chance(10):
        lse = np.zeros(lse.shape + (1,))
    go = g.array(out.shape if g.int(0, 9) else out.shape[:-1] + (out.shape[-1] + 1,))
    if all(a.dtype.kind == "f" for a in (q, k, v)):  # out in the call's dtype, as attention's
        out = out.astype(np.result_type(q.dtype, k.dtype, v.dtype))
    g.log.append(
        f"attention_backward(q {q.dtype}{q.shape} {q.strides}, k {k.dtype}{k.shape}, "
        f"v {v.dtype}{v.shape}, grad_out {go.dtype}{go.shape} {go.strides}, {kwargs})"
    )
    if VERBOSE:
        print(g.log[-1])
    try:
        res = mn.attention_backward(q, k, v, out, lse, go, **kwargs)
    except EXPECTED:
        return
    if not all_finite(*(q, k, v, go, kwargs.get("mask"))):
        return  # blocked kernels spread NaN (0 * inf) differently: only no-crash is checked
    go64 = np.asarray(go, np.float64)
    want = ref_or_none(ref_attn.attention_backward, *f, out, lse, go64, **kwargs)
    if want is None:
        native_accepted_reference_rejected("attention_backward", g.log[-1])
    dt = compute_dtype(q, k, v)  # grad_out is read in the inputs' dtype, as out is
    sc = kwargs.get("scale")
    sc = abs(sc) if isinstance(sc, float) else 1.0
    mq, mk, mv, mg = (finite_bound(a) for a in (q, k, v, go))
    lk, d = k.shape[-2], q.shape[-1]
    sb = (1.0 + mq * mk * d * sc) * 4
    if sb * _eps(dt) > 1e-3:
        # scores so large that one rounding of s (or of the given lse, here the reference's)
        # moves exp(s - lse) by a factor e^(|s| eps): the weights are ill-conditioned, so
        # only no-crash is checked (1e30 in k, say)
        return
    base = (1.0 + mg) * (1.0 + mv) * _attn_bound(v, kwargs) * sb * (1 + lk + lq) * (1 + dv)
    drop = _attn_bound(np.zeros(0), kwargs)  # 1 / (1 - dropout_p): dV sums kept weights scaled so
    bounds = (
        base * (1 + mk * sc),
        base * (1 + mq * sc) * 4,
        (1.0 + mg) * 4 * (1 + lq) * 4 * drop,
    )
    for name, got, exp, b in zip(("dq", "dk", "dv"), res, want, bounds, strict=True):
        check_close(f"attention_backward {name}", got, exp, dt, b)


def t_sgd(g: Gen) -> None:
    shape = shape_nd(g, 0, 3)
    dt = g.float_dtype() if g.int(0, 9) else g.any_dtype()
    p = g.values(shape, dt)
    if g.chance(8):
        p = g.layout(p)
    grad = g.array(shape, dt if g.int(0, 9) else g.any_dtype())
    kwargs: dict[str, Any] = {"lr": g.pick([0.1, 0.01, 1.0, 0.0, -0.1, np.nan, "x"])}
    momentum = 0.0
    if g.bool():
        momentum = g.pick([0.0, 0.9, 0.5, -0.5, 1.5])
        kwargs["momentum"] = momentum
    if g.chance(3):
        kwargs["dampening"] = g.pick([0.0, 0.1, 1.0, -1.0])
    if g.chance(3):
        kwargs["nesterov"] = g.bool()
    if g.chance(3):
        kwargs["weight_decay"] = g.pick([0.0, 0.01, -1.0])
    if g.chance(3):
        kwargs["maximize"] = g.bool()
    buf = None
    first = False
    if momentum != 0.0 or g.chance(4):
        buf = g.values(shape, dt if g.int(0, 9) else g.float_dtype())
        first = g.bool()
        kwargs["first_step"] = first
    p0, g0 = (
        np.array(p, np.float64),
        np.array(grad, np.complex128 if grad.dtype.kind == "c" else np.float64),
    )
    b0 = None if buf is None else np.array(buf, np.float64)
    g.log.append(f"sgd_step(p {p.dtype}{p.shape} {p.strides}, grad {grad.dtype}, buf, {kwargs})")
    if VERBOSE:
        print(g.log[-1])
    try:
        res = mn.sgd_step(p, grad, buf, **kwargs)
    except EXPECTED:
        return
    rkw = {k: v for k, v in kwargs.items() if k != "first_step"}
    want = ref_or_none(ref_gd.sgd_step, p0, g0, None if first else b0, **rkw)
    if want is None:
        native_accepted_reference_rejected("sgd_step", g.log[-1])
    if res is not p:
        raise AssertionError("sgd_step did not return param")
    b = (1 + finite_bound(p0)) * (1 + finite_bound(g0, b0)) * (1 + abs(kwargs["lr"])) * 4
    check_close("sgd_step param", p, want[0], p.dtype, b)
    if momentum != 0.0:
        check_close("sgd_step momentum_buffer", buf, want[1], p.dtype, b)


def t_adam(g: Gen) -> None:
    shape = shape_nd(g, 0, 3)
    dt = g.float_dtype() if g.int(0, 9) else g.any_dtype()
    p = g.values(shape, dt)
    grad = g.array(shape, dt if g.int(0, 9) else g.any_dtype())
    m = g.values(shape, dt) * 0.1
    v = np.abs(g.values(shape, dt)) * 0.01 if dt.kind == "f" else g.values(shape, dt)
    if g.chance(8):
        m = g.layout(m)
    vmax = None
    kwargs: dict[str, Any] = {"step": g.pick([1, 2, 10, 1000, 0, -1, 1.5])}
    if g.bool():
        kwargs["lr"] = g.pick([1e-3, 0.1, 0.0, -1.0])
    if g.chance(3):
        kwargs["betas"] = g.pick([(0.9, 0.999), (0.0, 0.0), (0.5, 0.9), (1.0, 0.9), (0.9,)])
    if g.chance(3):
        kwargs["eps"] = g.pick([1e-8, 1e-3, 0.0, -1.0])
    if g.chance(3):
        kwargs["weight_decay"] = g.pick([0.0, 0.01, 0.5, -1.0])
    if g.chance(3):
        kwargs["decoupled_weight_decay"] = g.bool()
    if g.chance(3):
        kwargs["maximize"] = g.bool()
    if g.chance(3):
        vmax = np.abs(g.values(shape, dt)) * 0.01 if dt.kind == "f" else g.values(shape, dt)
        kwargs["max_exp_avg_sq"] = vmax
    p0, g0 = (
        np.array(p, np.float64),
        np.array(grad, np.complex128 if grad.dtype.kind == "c" else np.float64),
    )
    m0, v0 = np.array(m, np.float64), np.array(v, np.float64)
    vm0 = None if vmax is None else np.array(vmax, np.float64)
    g.log.append(f"adam_step(p {p.dtype}{p.shape}, grad {grad.dtype}{grad.strides}, {kwargs})")
    if VERBOSE:
        print(g.log[-1])
    try:
        mn.adam_step(p, grad, m, v, **kwargs)
    except EXPECTED:
        return
    rkw = {k: v for k, v in kwargs.items() if k not in ("betas", "max_exp_avg_sq")}
    betas = kwargs.get("betas", (0.9, 0.999))
    rkw["beta1"], rkw["beta2"] = betas[0], betas[1]
    if vm0 is not None:
        rkw["amsgrad"] = True
        rkw["max_exp_avg_sq"] = vm0
    want = ref_or_none(ref_adam.adam_step, p0, g0, m0, v0, **rkw)
    if want is None:
        native_accepted_reference_rejected("adam_step", g.log[-1])
    lr = abs(rkw.get("lr", 1e-3))
    eps = rkw.get("eps", 1e-8)
    # the gradient the moments see, d = g + weight_decay * p (L2 form), bounds their rounding
    # (a fuzz finding: |p| ~ 1e29 with weight decay 0.01 made d ~ 1e27 where g was small)
    d = finite_bound(g0) + abs(rkw.get("weight_decay", 0.0)) * finite_bound(p0)
    # the update m̂/(sqrt(v̂)+eps) is ill-conditioned when sqrt(v̂) ~ 0: bound it by its size
    upd = 1.0 + max(d, finite_bound(m0)) / max(eps, 1e-30)
    b = (1 + finite_bound(p0)) * (1 + lr * upd) * 4
    check_close("adam_step param", p, want[0], p.dtype, b)
    check_close("adam_step exp_avg", m, want[1], p.dtype, 1 + max(d, finite_bound(m0)))
    check_close("adam_step exp_avg_sq", v, want[2], p.dtype, 1 + max(d**2, finite_bound(v0)))


TARGETS = [
    t_softmax,
    t_cross_entropy,
    t_matmul,
    t_conv2d,
    t_conv2d_backward,
    t_attention,
    t_attention_backward,
    t_sgd,
    t_adam,
]


def TestOneInput(data: bytes) -> None:  # noqa: N802 (atheris' name)
    g = Gen(data)
    target = g.pick(TARGETS)
    try:
        target(g)
    except ReferenceGap:
        return
    except AssertionError as exc:
        print("fuzz_harness: finding in", " | ".join(g.log), file=sys.stderr)
        if MISMATCH_DIR is None:
            raise
        name = "mismatch-" + hashlib.sha1(data).hexdigest()
        with open(os.path.join(MISMATCH_DIR, name), "wb") as f:
            f.write(data)
        with open(os.path.join(MISMATCH_DIR, "mismatches.txt"), "a", encoding="utf-8") as f:
            f.write(f"{name}: {' | '.join(g.log)}: {exc}\n")
    except Exception:
        print("fuzz_harness: unexpected exception in", " | ".join(g.log), file=sys.stderr)
        raise


def main() -> None:
    expect = os.environ.get("MLMATH_FUZZ_EXPECT_CORE")
    if expect and not mn._core.__file__.startswith(expect):
        raise SystemExit(f"fuzz_harness: imported {mn._core.__file__}, not the build in {expect}")
    if atheris is None:
        raise SystemExit("fuzz_harness: needs atheris (pip install atheris)")
    warnings.simplefilter("ignore")
    np.seterr(all="ignore")
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
