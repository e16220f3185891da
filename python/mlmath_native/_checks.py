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

#: float dtypes the kernels compute in (float32, float64) and store without conversion
#: (those, and the 16-bit float16 and bfloat16; Note [16-bit storage]); every other real dtype is
#: converted to float64.
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def is_bfloat16(dtype: np.dtype[Any]) -> bool:
    """True for ``ml_dtypes.bfloat16`` (also what PyTorch's and JAX's bfloat16 become), found
    by name so that ml_dtypes is never imported here."""
    return dtype.itemsize == 2 and dtype.name == "bfloat16" and "ml_dtypes" in dtype.type.__module__


def is_storage_dtype(dtype: np.dtype[Any]) -> bool:
    """float32, float64, float16 or bfloat16: a dtype the kernels read and write as it is.

    Note [16-bit storage]: float16 and bfloat16 arrays are storage only.  The kernels widen
    each element to float32 as they load it, compute in float32 (sums, maxima, exp, GEMM
    accumulators, softmax statistics) and round each result once, to nearest even, into the
    input's own 16-bit dtype, as PyTorch does on CPU.  Statistics a function returns beside
    its result (the log-sum-exp of ``attention(..., return_lse=True)``, a cross-entropy loss)
    stay float32.
    """
    return dtype in FLOAT_DTYPES or dtype == np.float16 or is_bfloat16(dtype)


def bfloat16_dtype(fn: str) -> np.dtype[Any]:
    """``ml_dtypes.bfloat16``, imported on first use: the dtype of NumPy results for bfloat16
    tensors from PyTorch or JAX (NumPy has no bfloat16 of its own)."""
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError(
            f"{fn}: bfloat16 data needs the ml_dtypes package for its NumPy results "
            "(pip install ml_dtypes)"
        ) from None
    dtype: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
    return dtype


def _from_dlpack_bfloat16(x: Any, fn: str) -> NDArray[Any] | None:
    """A bfloat16 view of a PyTorch tensor or a JAX array, which ``np.from_dlpack`` refuses
    (NumPy has no bfloat16): None for anything else.  Zero copy: a torch tensor is shared as
    int16 through DLPack and viewed as bfloat16; a JAX array's own ``__array__`` already
    gives an ml_dtypes.bfloat16 view of its buffer."""
    if "bfloat16" not in str(getattr(x, "dtype", "")):
        return None
    bf16 = bfloat16_dtype(fn)
    if type(x).__module__.split(".")[0] == "torch":
        import sys

        torch = sys.modules["torch"]
        return np.from_dlpack(x.view(torch.int16)).view(bf16)
    arr = np.asarray(x)
    return arr if arr.dtype == bf16 else None


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
            try:
                arr = _from_dlpack_bfloat16(x, fn)
            except (BufferError, ValueError, RuntimeError):
                arr = None
            if arr is not None:
                return arr
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

    float32, float64, float16 and bfloat16 are kept (Note [16-bit storage]); bool, integer and
    other real floating dtypes (longdouble) compute in float64.  Complex, object, string,
    bytes, datetime and void dtypes (ml_dtypes's 8-bit floats among them) raise TypeError.
    """
    if is_storage_dtype(dtype):
        return dtype
    if dtype.kind in "biuf":
        return np.dtype(np.float64)
    raise TypeError(
        f"{fn}: {name} has unsupported dtype {dtype} (expected a real floating, integer "
        "or bool array)"
    )


def as_float_array(x: ArrayLike, fn: str, name: str) -> NDArray[Any]:
    """``x`` as an ndarray of float32, float64, float16 or bfloat16 (:func:`compute_dtype`);
    nested sequences compute in float64."""
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


def check_out(
    out: object, shape: tuple[int, ...], dtype: np.dtype[Any], fn: str, name: str = "out"
) -> NDArray[Any]:
    """``out`` as an ndarray (a DLPack exporter such as a PyTorch tensor becomes a view of its
    memory, Note [zero copy]) that must be writeable, of exactly ``shape`` and ``dtype`` (no
    casting)."""
    if not isinstance(out, np.ndarray):
        if not hasattr(out, "__dlpack__"):
            raise TypeError(
                f"{fn}: {name} must be a numpy.ndarray or a DLPack exporter such as a PyTorch CPU "
                f"tensor (got {type(out).__name__})"
            )
        out = as_array(out, fn, name)
    if out.dtype != dtype:
        raise TypeError(f"{fn}: {name} has dtype {out.dtype} (expected {dtype})")
    if out.shape != tuple(shape):
        raise ValueError(f"{fn}: {name} has shape {out.shape} (expected {tuple(shape)})")
    if not out.flags.writeable:
        raise ValueError(f"{fn}: {name} is not writeable")
    return out


def deliver_one(fn: str, result: NDArray[Any], out: Any) -> NDArray[Any]:
    """``result``, or ``out`` (checked: exact shape and dtype, writeable) with the result
    copied in when it is given: so ``out`` may overlap the inputs."""
    if out is None:
        return result
    checked = check_out(out, result.shape, result.dtype, fn)
    checked[...] = result
    return checked


def deliver(
    fn: str, results: tuple[NDArray[Any] | None, ...], out: Any, name: str = "out"
) -> tuple[NDArray[Any] | None, ...]:
    """Several results, written into the arrays of ``out`` (NumPy's tuple form: one entry per
    result, None to have that result returned as computed).  Every given array is checked
    (exact shape and dtype, writeable) before any is written, so a bad ``out`` changes
    nothing; results are copied in, so ``out`` may overlap the inputs."""
    if not isinstance(out, tuple):
        raise TypeError(
            f"{fn}: {name} must be a tuple of {len(results)} arrays or None, one per result"
        )
    if len(out) != len(results):
        raise ValueError(f"{fn}: {name} has {len(out)} entries (expected {len(results)})")
    checked: list[NDArray[Any] | None] = []
    for i, (o, r) in enumerate(zip(out, results, strict=True)):
        if o is None:
            checked.append(None)
        elif r is None:
            raise ValueError(f"{fn}: {name}[{i}] is given for a result that is not computed")
        else:
            checked.append(check_out(o, r.shape, r.dtype, fn, f"{name}[{i}]"))
    delivered: list[NDArray[Any] | None] = []
    for c, r in zip(checked, results, strict=True):
        if c is not None and r is not None:
            c[...] = r
        delivered.append(r if c is None else c)
    return tuple(delivered)


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
