"""The softmax family: softmax, log_softmax, logsumexp and their gradients, along any axis.

Layout policy: the kernels work on C-contiguous arrays seen as [outer][n][inner] around the
axis.  A C-contiguous input is used in place; any other input (a transposed or strided view)
is first copied to a contiguous array.  Results are new C-contiguous arrays (large ones from
the output cache, see ``set_output_cache``) unless ``out=`` is given, which is written
exactly (through a temporary when it is not contiguous or overlaps an input partially).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from . import _core
from ._checks import (
    as_float_array,
    check_out,
    deliver_one,
    is_storage_dtype,
    normalize_axis,
    writable_target,
)

#: ``axis`` of the family: one axis, a tuple of axes (SciPy's and NumPy's multi-axis form; ``()``
#: names none) or None (every axis).
Axis = int | tuple[int, ...] | None


def _axes(axis: Axis, ndim: int, fn: str) -> tuple[int, ...]:
    """The sorted, distinct, non-negative axes that ``axis`` names in an array of ``ndim``
    dimensions (at least 1: a 0-d array is handled as one of shape (1,))."""
    if axis is None:
        return tuple(range(max(ndim, 1)))
    if isinstance(axis, tuple):
        axes = tuple(normalize_axis(a, ndim, fn) for a in axis)
        if len(set(axes)) != len(axes):
            raise ValueError(f"{fn}: axis {axis} names an axis twice")
        return tuple(sorted(axes))
    if isinstance(axis, (list, np.ndarray)):
        raise TypeError(
            f"{fn}: axis must be an integer, a tuple of integers or None (got {axis!r})"
        )
    return (normalize_axis(axis, ndim, fn),)


def _adjacent(axes: tuple[int, ...]) -> bool:
    return not axes or axes[-1] - axes[0] + 1 == len(axes)


def _merged(x: NDArray[Any], axes: tuple[int, ...]) -> tuple[NDArray[Any], int]:
    """``x`` (C-contiguous) seen with ``axes`` merged into one axis, and that axis: a view when
    the axes are adjacent (None and every single axis are), else a copy with them moved last.
    No axis at all (``()``) becomes a new axis of length 1: each element is its own slice."""
    if not axes:
        return x.reshape(x.shape + (1,)), x.ndim
    if _adjacent(axes):
        a, b = axes[0], axes[-1] + 1
        return x.reshape(x.shape[:a] + (math.prod(x.shape[a:b]),) + x.shape[b:]), a
    rest = [i for i in range(x.ndim) if i not in axes]
    moved = np.ascontiguousarray(x.transpose(rest + list(axes)))
    n = math.prod(x.shape[i] for i in axes)
    return moved.reshape(moved.shape[: len(rest)] + (n,)), len(rest)


def _unmerged(y: NDArray[Any], shape: tuple[int, ...], axes: tuple[int, ...]) -> NDArray[Any]:
    """A result of :func:`_merged`'s shape back in the input's ``shape`` (C-contiguous)."""
    if _adjacent(axes):
        return y.reshape(shape)
    perm = [i for i in range(len(shape)) if i not in axes] + list(axes)
    moved = y.reshape(tuple(shape[i] for i in perm))
    return np.ascontiguousarray(moved.transpose(np.argsort(perm)))


def _reduced(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` without ``axes`` (a reduction's result)."""
    return tuple(n for i, n in enumerate(shape) if i not in axes)


def _kept(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` with length 1 at ``axes`` (a reduction's result with keepdims)."""
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


def _prepare(
    x: ArrayLike, fn: str, axis: Axis, name: str = "x"
) -> tuple[NDArray[Any], tuple[int, ...]]:
    """``x`` as a C-contiguous float array, and the axes that ``axis`` names.  A 0-d array has
    one element, named by axis 0, -1, None or a tuple of them (as torch does)."""
    x = np.asarray(as_float_array(x, fn, name), order="C")
    return x, _axes(axis, x.ndim, fn)


def _cast(x: NDArray[Any], dtype: DTypeLike | None, fn: str) -> NDArray[Any]:
    """``x`` in the ``dtype=`` asked for (torch.softmax's: the input is cast before the
    operation, which then computes and returns in that dtype)."""
    if dtype is None:
        return x
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{fn}: dtype {dtype!r} is not a NumPy dtype") from None
    if not is_storage_dtype(dt):
        raise TypeError(
            f"{fn}: dtype {dt} is not supported (expected float32, float64, float16 or bfloat16)"
        )
    return x.astype(dt, copy=False)


def _softmax_like(
    x: ArrayLike,
    axis: Axis,
    out: NDArray[Any] | None,
    log: bool,
    dtype: DTypeLike | None = None,
) -> NDArray[Any]:
    fn = "log_softmax" if log else "softmax"
    x, axes = _prepare(x, fn, axis)
    x = _cast(x, dtype, fn)
    if out is not None:
        out = check_out(out, x.shape, x.dtype, fn)
    if len(axes) != 1:  # several axes or none: computed along one merged axis, then put back
        merged, merged_axis = _merged(x.reshape(x.shape or (1,)), axes)
        y = _core.empty(merged.shape, x.dtype)
        if y.size:
            _core.softmax_into(merged, y, merged_axis, log)
        result = _unmerged(y, x.shape or (1,), axes).reshape(x.shape)
        if out is None:
            return result
        out[...] = result
        return out
    if out is None:
        out = _core.empty(x.shape, x.dtype)
        target, copy_back = out, False
    else:
        target, copy_back = writable_target(out, (x,))
    if x.size:
        _core.softmax_into(x, target, axes[0], log)
    if copy_back:
        out[...] = target
    return out


def softmax(
    x: ArrayLike,
    axis: Axis = -1,
    *,
    dtype: DTypeLike | None = None,
    out: NDArray[Any] | None = None,
) -> NDArray[Any]:
    """Softmax along ``axis``:  y_i = exp(x_i - m) / sum_j exp(x_j - m),  m = max_j x_j.

    Parameters
    ----------
    x : array_like
        Real input.  float32 stays float32 and float64 stays float64; other real dtypes and
        nested lists are computed in float64.
    axis : int, tuple of ints or None, optional
        The axis to normalise over (default: the last, as PyTorch and JAX's ``jax.nn``).  A
        tuple normalises over several axes together and None over all of them, as SciPy's
        ``scipy.special.softmax`` (whose default is None); ``()`` names no axis (each element
        alone gives 1).  Negative values count from the end; a 0-d input accepts 0 and -1.
    dtype : dtype, optional
        As ``torch.softmax``'s: ``x`` is cast to it first, and the result computed and returned
        in it (float32, float64, float16 or bfloat16).
    out : ndarray, optional
        Where to write the result: same shape and exactly the result dtype, writeable.  May be
        ``x`` itself for an in-place softmax.

    Returns
    -------
    ndarray
        Non-negative values that sum to 1 along ``axis``, the shape of ``x``.

    Raises
    ------
    TypeError
        ``x`` is complex, object or string; ``dtype`` is not one of the four; ``out`` is not an
        ndarray or has another dtype; ``axis`` is not an integer, tuple or None.
    ValueError
        ``axis`` out of range (``numpy.exceptions.AxisError``) or naming an axis twice; ``out``
        has the wrong shape or is read-only.  Nothing is written when an error is raised.

    Notes
    -----
    The maximum is subtracted first, so large inputs (1e4, -1e4) do not overflow.  ``-inf``
    entries get probability 0.  A slice that is all ``-inf``, or holds ``+inf`` or NaN, gives
    NaN in that slice only, as the formula does.

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> mn.softmax(np.array([1.0, 1.0, 1.0, 1.0]))
    array([0.25, 0.25, 0.25, 0.25])
    >>> mn.softmax(np.zeros((2, 2)), axis=None)
    array([[0.25, 0.25],
           [0.25, 0.25]])
    """
    return _softmax_like(x, axis, out, log=False, dtype=dtype)


def log_softmax(
    x: ArrayLike,
    axis: Axis = -1,
    *,
    dtype: DTypeLike | None = None,
    out: NDArray[Any] | None = None,
) -> NDArray[Any]:
    """Log-softmax along ``axis``:  y_i = x_i - m - log sum_j exp(x_j - m),  m = max_j x_j.

    Parameters (``axis`` as an int, a tuple or None; ``dtype``; ``out``), Returns, Raises and
    special values as for :func:`softmax` (a slice that is all
    ``-inf``, or holds ``+inf`` or NaN, gives NaN in that slice; other ``-inf`` entries give
    ``-inf``).

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> mn.log_softmax(np.array([0.0, 0.0]))
    array([-0.69314718, -0.69314718])
    """
    return _softmax_like(x, axis, out, log=True, dtype=dtype)


def logsumexp(
    x: ArrayLike,
    axis: Axis = -1,
    keepdims: bool = False,
    *,
    b: ArrayLike | None = None,
    return_sign: bool = False,
    out: NDArray[Any] | None = None,
) -> Any:
    """log(sum_i b_i exp(x_i)) along ``axis``, computed as m + log sum_i b_i exp(x_i - m).

    ``scipy.special.logsumexp``'s arguments and results, with this family's default axis.

    Parameters
    ----------
    x : array_like
        Real input (dtype policy as for :func:`softmax`).
    axis : int, tuple of ints or None, optional
        The axis or axes to reduce; None reduces all of them (SciPy's default) and ``()`` none.
        The default is the last axis, as for the rest of the family (and PyTorch).
    keepdims : bool, optional
        Keep the reduced axes with length 1.
    b : array_like, optional
        Scaling factors of ``exp(x)``, broadcast with ``x`` (the result has the broadcast
        shape, reduced); they may be negative.  An element whose factor is 0 adds nothing, even
        where ``x`` is inf or NaN (as in SciPy).  The computation then runs in NumPy, in
        ``x``'s and ``b``'s promoted dtype (float32 for the 16-bit ones).
    return_sign : bool, optional
        Also return the sign of the sum (+1, 0 or -1, NaN for NaN); the result is then
        log ``|sum|``.  Without it a negative sum gives NaN.
    out : ndarray, optional
        Where to write the result (not the sign): the result's shape and exactly its dtype.

    Returns
    -------
    res : ndarray
        The reduced shape (length 1 at the reduced axes with ``keepdims``); a NumPy scalar of
        the result dtype when that shape is () and ``out`` is not given.  A slice that is all
        ``-inf`` (or empty, or whose factors are all 0) gives ``-inf``; one holding ``+inf``
        gives ``+inf``; NaN gives NaN (as SciPy and PyTorch do).
    sgn : ndarray
        With ``return_sign`` only: the sign, of ``res``'s shape and dtype.

    Raises
    ------
    TypeError, ValueError
        As for :func:`softmax`; ``b`` not broadcastable with ``x``.

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> float(mn.logsumexp(np.array([0.0, 0.0])))
    0.6931471805599453
    >>> res, sgn = mn.logsumexp(np.array([1.0, 2.0]), b=np.array([1.0, -1.0]), return_sign=True)
    >>> round(float(res), 6), float(sgn)
    (1.541325, -1.0)
    """
    fn = "logsumexp"
    sgn: NDArray[Any] | None = None
    if b is None:
        x, axes = _prepare(x, fn, axis)
        res = _logsumexp_kernel(x, axes)
        if return_sign:
            sgn = np.ones_like(res)
            sgn[res == -np.inf] = 0
            sgn[np.isnan(res)] = np.nan
    else:
        x, axes, res, sign = _weighted_logsumexp(x, b, axis, fn)
        if return_sign:
            sgn = sign
        else:
            res[sign < 0] = np.nan
    shape = _kept(x.shape, axes) if keepdims else res.shape
    res = res.reshape(shape)
    if out is not None:
        out = check_out(out, shape, res.dtype, fn)
        out[...] = res
        res = out
    elif res.ndim == 0:
        res = res[()]
    if sgn is None:
        return res
    sgn = sgn.reshape(shape)
    return res, (sgn[()] if sgn.ndim == 0 else sgn)


def _logsumexp_kernel(x: NDArray[Any], axes: tuple[int, ...]) -> NDArray[Any]:
    """The kernel's logsumexp of ``x`` over ``axes``, in the reduced shape."""
    merged, axis = _merged(x.reshape(x.shape or (1,)), axes)
    res = np.empty(merged.shape[:axis] + merged.shape[axis + 1 :], x.dtype)
    if res.size:
        if merged.shape[axis] == 0:
            res.fill(-np.inf)
        else:
            _core.logsumexp_into(merged, res, axis)
    return res.reshape(_reduced(x.shape, axes))


def _weighted_logsumexp(
    x: ArrayLike, b: ArrayLike, axis: Axis, fn: str
) -> tuple[NDArray[Any], tuple[int, ...], NDArray[Any], NDArray[Any]]:
    """SciPy's logsumexp with factors ``b``, in NumPy: (broadcast x, axes, log|sum|, sign)."""
    x = as_float_array(x, fn, "x")
    b = as_float_array(b, fn, "b")
    dtype = np.result_type(x.dtype, b.dtype)
    try:
        x, b = np.broadcast_arrays(x, b)
    except ValueError:
        raise ValueError(
            f"{fn}: b has shape {b.shape}, which does not broadcast with x's shape {x.shape}"
        ) from None
    axes = _axes(axis, x.ndim, fn)
    work = np.float64 if dtype == np.float64 else np.float32  # the 16-bit ones compute in float32
    x1 = x.reshape(x.shape or (1,)).astype(work)
    b1 = b.reshape(x1.shape).astype(work)
    with np.errstate(all="ignore"):
        a = np.where(b1 == 0, -np.inf, x1)  # a zero factor drops its term, inf and NaN too
        m = np.max(a, axis=axes, keepdims=True, initial=-np.inf)  # -inf: an empty sum
        shift = np.where(np.isfinite(m), m, 0)  # only a finite max is subtracted (as in the kernel)
        s = np.sum(b1 * np.exp(a - shift), axis=axes, keepdims=True)
        res = np.log(np.abs(s)) + shift
    reduced = _reduced(x.shape, axes)
    return x, axes, res.astype(dtype).reshape(reduced), np.sign(s).astype(dtype).reshape(reduced)


def _backward(y: ArrayLike, dy: ArrayLike, axis: Axis, log: bool) -> NDArray[Any]:
    fn = "log_softmax_backward" if log else "softmax_backward"
    y = as_float_array(y, fn, "y")
    dy = as_float_array(dy, fn, "dy")
    if y.shape != dy.shape:
        raise ValueError(f"{fn}: dy has shape {dy.shape} (expected y's shape {y.shape})")
    dtype = np.result_type(y.dtype, dy.dtype)
    axes = _axes(axis, y.ndim, fn)
    y = np.asarray(y, dtype=dtype, order="C")
    dy = np.asarray(dy, dtype=dtype, order="C")
    if len(axes) == 1:
        dx = _core.empty(y.shape, dtype)
        if y.size:
            _core.softmax_backward_into(y, dy, dx, axes[0], log)
        return dx
    shape = y.shape or (1,)  # several axes or none: along one merged axis, then put back
    (my, merged_axis), (mdy, _) = _merged(y.reshape(shape), axes), _merged(dy.reshape(shape), axes)
    dx = _core.empty(my.shape, dtype)
    if dx.size:
        _core.softmax_backward_into(my, mdy, dx, merged_axis, log)
    return _unmerged(dx, shape, axes).reshape(y.shape)


def softmax_backward(
    y: ArrayLike, dy: ArrayLike, axis: Axis = -1, *, out: NDArray[Any] | None = None
) -> NDArray[Any]:
    """Gradient through softmax:  dx_i = y_i (dy_i - sum_j y_j dy_j),  where y = softmax(x).

    Parameters
    ----------
    y : array_like
        The softmax output (not its input).
    dy : array_like
        The upstream gradient dL/dy, the shape of ``y``.
    axis : int, tuple of ints or None, optional
        The axis (or axes, or None for all) the softmax was taken over.
    out : ndarray, optional
        Where to write dx: exactly its shape and dtype, writeable (it may be ``y`` or ``dy``).

    Returns
    -------
    ndarray
        dL/dx, the shape of ``y``; float32 only if both inputs are float32.

    Raises
    ------
    TypeError, ValueError
        Unsupported dtypes, mismatched shapes, a bad axis.

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> mn.softmax_backward(np.array([0.5, 0.5]), np.array([1.0, 0.0]))
    array([ 0.25, -0.25])
    """
    return deliver_one("softmax_backward", _backward(y, dy, axis, log=False), out)


def log_softmax_backward(
    y: ArrayLike, dy: ArrayLike, axis: Axis = -1, *, out: NDArray[Any] | None = None
) -> NDArray[Any]:
    """Gradient through log_softmax:  dx_i = dy_i - exp(y_i) sum_j dy_j,  y = log_softmax(x).

    Parameters, Returns and Raises as for :func:`softmax_backward`, with ``y`` the log_softmax
    output.

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> mn.log_softmax_backward(np.log(np.array([0.5, 0.5])), np.array([1.0, 0.0]))
    array([ 0.5, -0.5])
    """
    return deliver_one("log_softmax_backward", _backward(y, dy, axis, log=True), out)
