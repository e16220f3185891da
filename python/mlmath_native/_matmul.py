"""matmul on the packed GEMM core, with np.matmul's shape rules."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _core
from ._checks import as_float_array, check_out, check_size

_FN = "matmul"

# Note [interruptible matmul]
# Ctrl-C stops a long product between blocks (Note [kernels without the GIL] in
# src/cpp/bindings/without_gil.h), its output half written.  With out=, a long product (at
# least _INTERRUPTIBLE_WORK multiply-adds, 0.1 s and up here) of depth k >= _INTERRUPTIBLE_DEPTH
# is therefore computed into a temporary (from the output cache: no page faults) and copied
# into out at the end, so that an interrupted call leaves out as it was.  The copy is one pass
# over the output, ~1/k of the arithmetic: measured on one AVX2 thread, 2.3% of a 2048 x 512 x
# 1024 product, 1.1% at k = 1024 (at k = 64 the temporary would double the time).  Other
# products with out= write it directly and are not interrupted: they end soon, or (a small k)
# are bound by writing the output anyway.
_INTERRUPTIBLE_WORK = 1 << 30
_INTERRUPTIBLE_DEPTH = 512


def _element_strides(x: NDArray[Any]) -> tuple[NDArray[Any], tuple[int, ...]]:
    """``x`` (copied if its strides are not whole elements) and its strides in elements."""
    if any(s % x.itemsize for s in x.strides):
        x = np.ascontiguousarray(x)
    return x, tuple(s // x.itemsize for s in x.strides)


def _batch_offsets(shape: tuple[int, ...], strides: tuple[int, ...]) -> NDArray[np.int64]:
    """Element offset of every batch item, C order, for a (broadcast) batch shape."""
    offsets = np.zeros(shape, np.int64)
    for axis, (n, s) in enumerate(zip(shape, strides, strict=True)):
        view = [1] * len(shape)
        view[axis] = n
        offsets += (np.arange(n, dtype=np.int64) * s).reshape(view)
    return offsets.ravel()


def matmul(a: ArrayLike, b: ArrayLike, *, out: NDArray[Any] | None = None) -> NDArray[Any]:
    """Matrix product, np.matmul rules:  C[..., i, j] = sum_k A[..., i, k] B[..., k, j].

    Parameters
    ----------
    a, b : array_like
        Real arrays with at least one dimension.  1-D ``a`` is a row vector and 1-D ``b`` a
        column vector (the added axis is removed from the result); leading (batch) dimensions
        broadcast.  Any strides.  float32, float64, float16 and bfloat16 (``ml_dtypes``, or a
        PyTorch / JAX bfloat16 array) are kept: bfloat16 @ bfloat16 and float16 @ float16 give
        that dtype, with float32 products and float32 accumulation and each result rounded once
        to nearest even (so it overflows to inf exactly where the float32 sum exceeds the
        16-bit range); mixed dtypes promote with ``np.result_type`` (bfloat16 with float16 or
        float32: float32; anything with float64: float64); integers and bool compute in
        float64.
    out : ndarray, optional
        Exactly the result's shape and dtype, writeable; may overlap the inputs.  Ctrl-C stops a
        long product from the main thread with KeyboardInterrupt and leaves ``out`` unchanged
        (Note [interruptible matmul]).

    Returns
    -------
    ndarray

    Raises
    ------
    ValueError
        0-d inputs, mismatched inner dimensions, batch shapes that do not broadcast, a bad out.
    TypeError
        Complex, object or string inputs; an out of another dtype.

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> mn.matmul(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([1.0, 1.0]))
    array([3., 7.])
    """
    a = as_float_array(a, _FN, "a")
    b = as_float_array(b, _FN, "b")
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"{_FN}: a and b must have at least one dimension (got 0-d input)")
    dtype = np.result_type(a.dtype, b.dtype)
    a = a.astype(dtype, copy=False)
    b = b.astype(dtype, copy=False)
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    m, k = a2.shape[-2:]
    k2, n = b2.shape[-2:]
    if k != k2:
        raise ValueError(
            f"{_FN}: inner dimensions differ (a has {k} columns, b has {k2} rows; shapes "
            f"{a.shape} and {b.shape})"
        )
    try:
        batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    except ValueError:
        raise ValueError(
            f"{_FN}: batch dimensions do not broadcast (shapes {a.shape} and {b.shape})"
        ) from None
    shape = batch + (m, n)
    check_size(_FN, "the result", shape, dtype.itemsize)
    check_size(_FN, "the work (multiply-adds)", shape + (k,))
    result_shape = batch + ((m,) if a.ndim > 1 else ()) + ((n,) if b.ndim > 1 else ())
    work = int(np.prod(shape, dtype=np.int64)) * k
    writes_out = False  # the kernel writes the caller's out= itself
    if out is None:
        target = _core.empty(shape, dtype)
    else:
        out = check_out(out, result_shape, dtype, _FN)
        writes_out = (
            out.flags.c_contiguous
            and out.flags.aligned
            and not (np.may_share_memory(out, a) or np.may_share_memory(out, b))
            and (work < _INTERRUPTIBLE_WORK or k < _INTERRUPTIBLE_DEPTH)
        )
        target = out.reshape(shape) if writes_out else _core.empty(shape, dtype)

    a_full = np.broadcast_to(a2, batch + (m, k))
    b_full = np.broadcast_to(b2, batch + (k, n))
    a_full, a_st = _element_strides(a_full)
    b_full, b_st = _element_strides(b_full)
    nb = len(batch)
    _core.gemm_into(
        a_full,
        b_full,
        target,
        m,
        n,
        k,
        a_st[-2],
        a_st[-1],
        b_st[-2],
        b_st[-1],
        n,
        _batch_offsets(batch, a_st[:nb]),
        _batch_offsets(batch, b_st[:nb]),
        np.arange(int(np.prod(batch, dtype=np.int64)), dtype=np.int64) * (m * n),
        False,
        not writes_out,
    )
    if out is None:
        return target.reshape(result_shape)
    if not np.shares_memory(target, out):
        out[...] = target.reshape(result_shape)
    return out
