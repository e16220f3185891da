"""Argument checks and the dtype/layout policy shared by the public wrappers.

Every public function validates all of its arguments before it writes anything; the error
messages follow ``"<function>: <argument> <what is wrong> (got ..., expected ...)"``.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

# np.exceptions exists from NumPy 1.25; older versions expose AxisError at top level.
AxisError = getattr(np, "exceptions", np).AxisError

#: dtypes the kernels compute in; everything else that is real is converted to float64.
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def as_array(x: object, fn: str, name: str) -> NDArray[Any]:
    """``x`` as an ndarray, without a copy wherever its producer allows (Note [zero copy]).

    Note [zero copy]: an ndarray is used as it is; an object with ``__dlpack__`` (a PyTorch CPU
    tensor, a JAX CPU array, anything DLPack exports) becomes ``np.from_dlpack(x)``, a view of
    the same memory (writeable when the producer allows it, as PyTorch does, so ``out=`` and
    the optimizers update a tensor in place); the rest (the buffer protocol,
    ``__array_interface__``, nested sequences) goes through ``np.asarray``, which shares memory
    where it can.  Only afterwards may a dtype or layout the kernels need cost a copy.
    """
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "__dlpack__") and not isinstance(x, type):
        try:
            return np.from_dlpack(x)
        except (BufferError, TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{fn}: {name} could not be shared through DLPack ({exc})") from None
    try:
        return np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise TypeError(f"{fn}: {name} could not be converted to an array ({exc})") from None


def as_input(x: object, fn: str, name: str) -> NDArray[Any]:
    """``as_array(x)`` for an array the kernels only read, copied if its data are not aligned
    to its item size: an array that crossed a process boundary (unpickled, as dask.distributed
    sends them) may start at any byte, and the kernels load whole items (UBSan's finding)."""
    arr = as_array(x, fn, name)
    return arr if arr.flags.aligned else arr.copy()


def compute_dtype(fn: str, name: str, dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype an input of ``dtype`` computes in (the dtype policy, for NumPy and Dask inputs).

    float32 and float64 are kept; bool, integer and other real floating dtypes (float16,
    longdouble) compute in float64.  Complex, object, string, bytes, datetime and void dtypes
    raise TypeError.
    """
    if dtype in FLOAT_DTYPES:
        return dtype
    if dtype.kind in "biuf":
        return np.dtype(np.float64)
    raise TypeError(
        f"{fn}: {name} has unsupported dtype {dtype} (expected a real floating, integer "
        "or bool array)"
    )


def as_float_array(x: ArrayLike, fn: str, name: str) -> NDArray[Any]:
    """``x`` as an ndarray of float32 or float64 (:func:`compute_dtype`); nested sequences
    compute in float64."""
    arr = as_input(x, fn, name)
    return arr.astype(compute_dtype(fn, name, arr.dtype), copy=False)


#: The largest byte count (or element count, or multiply-add count) a call may imply: every size
#: the kernels compute from it then fits in a signed 64-bit integer with room to spare.
MAX_SIZE = 2**62


def check_size(fn: str, what: str, shape: tuple[int, ...], itemsize: int = 1) -> None:
    """ValueError when an array (or an amount of work) of ``shape`` x ``itemsize`` bytes is
    beyond ``MAX_SIZE``: an allocation or size computation that would overflow is refused with a
    message, before anything is allocated (Python ints do not overflow)."""
    total = itemsize
    for d in shape:
        total *= int(d)
    if total > MAX_SIZE:
        raise ValueError(
            f"{fn}: {what} would have shape {tuple(int(d) for d in shape)} ({total} "
            f"{'bytes' if itemsize > 1 else 'units'}, more than the 2**62 this library addresses)"
        )


def normalize_axis(axis: int, ndim: int, fn: str) -> int:
    """A valid non-negative axis; 0-d arrays accept 0 and -1 (as torch does)."""
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"{fn}: axis must be an integer (got {axis!r})") from None
    span = max(ndim, 1)
    if not -span <= axis < span:
        raise AxisError(f"{fn}: axis {axis} is out of bounds for an array of dimension {ndim}")
    return axis % span


def check_out(out: object, shape: tuple[int, ...], dtype: np.dtype[Any], fn: str) -> NDArray[Any]:
    """``out`` as an ndarray (a DLPack exporter such as a PyTorch tensor becomes a view of its
    memory, Note [zero copy]) that must be writeable, of exactly ``shape`` and ``dtype`` (no
    casting)."""
    if not isinstance(out, np.ndarray):
        if not hasattr(out, "__dlpack__"):
            raise TypeError(
                f"{fn}: out must be a numpy.ndarray or a DLPack exporter such as a PyTorch CPU "
                f"tensor (got {type(out).__name__})"
            )
        out = as_array(out, fn, "out")
    if out.dtype != dtype:
        raise TypeError(f"{fn}: out has dtype {out.dtype} (expected {dtype})")
    if out.shape != tuple(shape):
        raise ValueError(f"{fn}: out has shape {out.shape} (expected {tuple(shape)})")
    if not out.flags.writeable:
        raise ValueError(f"{fn}: out is not writeable")
    return out


def same_layout(a: NDArray[Any], b: NDArray[Any]) -> bool:
    """True when ``a`` and ``b`` are the same elements in the same order (exact aliasing)."""
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.strides == b.strides
        and a.shape == b.shape
    )


def writable_target(
    out: NDArray[Any], inputs: tuple[NDArray[Any], ...]
) -> tuple[NDArray[Any], bool]:
    """Where a kernel may write its result for ``out``.

    Returns ``(target, copy_back)``: ``out`` itself when it is C-contiguous, aligned and either
    shares no memory with the (contiguous) inputs or aliases one of them exactly; otherwise a
    fresh contiguous buffer whose contents the caller copies into ``out`` afterwards.
    """
    if out.flags.c_contiguous and out.flags.aligned:
        overlapping = [a for a in inputs if np.may_share_memory(out, a)]
        if all(same_layout(out, a) for a in overlapping):
            return out, False
    return np.empty(out.shape, out.dtype), True
