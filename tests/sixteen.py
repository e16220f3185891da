"""Helpers for the 16-bit tests (bfloat16 and float16 storage, float32 math; Note [16-bit
storage] in mlmath_native/_checks.py).

A kernel's 16-bit result is checked twice:

1. against the float64 golden (the reference run on the same 16-bit inputs widened to float64,
   so the inputs' own rounding is not counted): each element within ``rounds`` roundings of the
   storage dtype (the unit roundoff u is 2**-8 for bfloat16 and 2**-11 for float16) of the
   golden value, plus the float32 arithmetic's own error for a reduction of length n, plus any
   absolute slack the caller names as a multiple of u times the data's scale;
2. against PyTorch running the same op in the same 16-bit dtype on the CPU: our largest error
   against the golden may not exceed ``PYTORCH_FACTOR`` times PyTorch's own largest error
   (plus u * scale / 16, so that an op PyTorch happens to get exact does not demand exactness).

NaN and inf must appear exactly where the golden result has them, overflow included: a golden
value at or past the dtype's largest finite value plus half an ulp counts as inf.
"""

from __future__ import annotations

import numpy as np
import pytest

#: how much larger than PyTorch's error (same op, same 16-bit dtype) ours may be
PYTORCH_FACTOR = 2.0

#: the 16-bit storage dtypes by name; bfloat16 needs ml_dtypes (the minimal CI venv has none)
HALF_NAMES = ["bfloat16", "float16"]


def dtype_of(name: str) -> np.dtype:
    """The NumPy dtype of a 16-bit dtype name (skips the test when ml_dtypes is missing)."""
    if name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def unit_roundoff(dtype) -> float:
    """Half an ulp at 1.0: the largest relative error of one rounding to nearest."""
    return 2.0**-8 if np.dtype(dtype).name == "bfloat16" else 2.0**-11


def smallest_step(dtype) -> float:
    """The spacing of the smallest (subnormal) numbers: absolute error allowed near zero."""
    return 2.0**-133 if np.dtype(dtype).name == "bfloat16" else 2.0**-24


def overflow_threshold(dtype) -> float:
    """The smallest magnitude that rounds to inf: the largest finite value plus half an ulp."""
    if np.dtype(dtype).name == "bfloat16":
        return (2.0 - 2.0**-8) * 2.0**127
    return 65520.0


def rounded_overflow(golden, dtype) -> np.ndarray:
    """The float64 golden with the values whose rounding to ``dtype`` overflows set to +-inf."""
    golden = np.array(golden, dtype=np.float64)
    big = np.abs(golden) >= overflow_threshold(dtype)
    golden[big] = np.copysign(np.inf, golden[big])
    return golden


def widen(a) -> np.ndarray:
    """A 16-bit array or torch tensor (or anything) as float64."""
    if type(a).__module__.startswith("torch"):
        return from_torch(a)
    return np.asarray(a).astype(np.float64)


def random(rng, shape, dtype, scale: float = 1.0) -> np.ndarray:
    """Normal samples rounded to ``dtype``."""
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype)


def optional_torch():
    """torch, or None where it is not installed: a test then checks against the float64 golden
    alone (the PyTorch comparison is the second oracle, not the first; emulated arm64 has no
    torch)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def to_torch(a):
    """A NumPy 16-bit array as a torch tensor of the same dtype and values (a copy)."""
    torch = pytest.importorskip("torch")
    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def from_torch(t) -> np.ndarray:
    """A torch 16-bit tensor as float64."""
    torch = pytest.importorskip("torch")
    return t.detach().to(torch.float64).numpy()


def assert_special_values_match(got, golden) -> None:
    got, golden = widen(got), np.asarray(golden, dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(golden), err_msg="NaN positions")
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(golden), err_msg="+inf positions")
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(golden), err_msg="-inf positions")


def assert_16bit_close(
    got,
    golden,
    dtype,
    *,
    n: int = 1,
    rounds: float = 1.0,
    atol_u: float = 0.0,
    scale: float | None = None,
    torch_result=None,
) -> None:
    """``got`` (our 16-bit result) against the float64 ``golden`` and, when given, against
    ``torch_result`` (PyTorch's result of the same op in the same dtype, any array-like).

    Elementwise: |got - golden| <= rounds * u * |golden| + (atol_u * u + eps32(n)) * scale +
    the smallest 16-bit step, with scale = max |golden| over finite values unless given and
    eps32(n) the float32 arithmetic's error for a reduction of length n.
    """
    got64, golden = widen(got), rounded_overflow(golden, dtype)
    assert np.asarray(got).dtype == np.dtype(dtype), f"dtype {np.asarray(got).dtype}"
    assert got64.shape == golden.shape
    assert_special_values_match(got64, golden)
    finite = np.isfinite(golden)
    if scale is None:
        scale = float(np.max(np.abs(golden[finite]), initial=0.0))
    u = unit_roundoff(dtype)
    eps32 = float(np.finfo(np.float32).eps) * (16 + 4 * np.sqrt(max(int(n), 1)))
    err = np.abs(got64[finite] - golden[finite])
    allowed = rounds * u * np.abs(golden[finite]) + (atol_u * u + eps32) * scale
    allowed += smallest_step(dtype)
    worst = int(np.argmax(err - allowed)) if err.size else 0
    assert np.all(err <= allowed), (
        f"error {err[worst]:.3g} > allowed {allowed[worst]:.3g} at golden value "
        f"{golden[finite][worst]:.6g} (u = {u:.3g}, scale {scale:.3g})"
    )
    if torch_result is not None:
        theirs = widen(torch_result)[finite]
        our_err = float(np.max(err, initial=0.0))
        their_err = float(np.max(np.abs(theirs - golden[finite]), initial=0.0))
        assert our_err <= PYTORCH_FACTOR * their_err + u * scale / 16, (
            f"our largest error {our_err:.3g} > {PYTORCH_FACTOR} x PyTorch's {their_err:.3g}"
        )
