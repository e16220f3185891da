"""The softmax family: softmax, log_softmax, logsumexp and their gradients, along any axis.

Layout policy: the kernels work on C-contiguous arrays seen as [outer][n][inner] around the
axis.  A C-contiguous input is used in place; any other input (a transposed or strided view)
is first copied to a contiguous array.  Results are new C-contiguous arrays (large ones from
the output cache, see ``set_output_cache``) unless ``out=`` is given, which is written
exactly (through a temporary when it is not contiguous or overlaps an input partially).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _core
from ._checks import as_float_array, check_out, normalize_axis, writable_target


def _prepare(x: ArrayLike, fn: str, axis: int, name: str = "x") -> tuple[NDArray[Any], int]:
    x = as_float_array(x, fn, name)
    return np.asarray(x, order="C"), normalize_axis(axis, x.ndim, fn)


def _softmax_like(x: ArrayLike, axis: int, out: NDArray[Any] | None, log: bool) -> NDArray[Any]:
    fn = "log_softmax" if log else "softmax"
    x, axis = _prepare(x, fn, axis)
    if out is None:
        out = _core.empty(x.shape, x.dtype)
        target, copy_back = out, False
    else:
        out = check_out(out, x.shape, x.dtype, fn)
        target, copy_back = writable_target(out, (x,))
    if x.size:
        _core.softmax_into(x, target, axis, log)
    if copy_back:
        out[...] = target
    return out


def softmax(x: ArrayLike, axis: int = -1, *, out: NDArray[Any] | None = None) -> NDArray[Any]:
    """Softmax along ``axis``:  y_i = exp(x_i - m) / sum_j exp(x_j - m),  m = max_j x_j.

    Parameters
    ----------
    x : array_like
        Real input.  float32 stays float32 and float64 stays float64; other real dtypes and
        nested lists are computed in float64.
    axis : int, optional
        The axis to normalise over (default: the last).  Negative values count from the end;
        a 0-d input accepts 0 and -1.
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
        ``x`` is complex, object or string; ``out`` is not an ndarray or has another dtype.
    ValueError
        ``axis`` out of range (``numpy.exceptions.AxisError``); ``out`` has the wrong shape or is
        read-only.  Nothing is written when an error is raised.

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
    """
    return _softmax_like(x, axis, out, log=False)


def log_softmax(x: ArrayLike, axis: int = -1, *, out: NDArray[Any] | None = None) -> NDArray[Any]:
    """Log-softmax along ``axis``:  y_i = x_i - m - log sum_j exp(x_j - m),  m = max_j x_j.

    Parameters, Returns, Raises and special values as for :func:`softmax` (a slice that is all
    ``-inf``, or holds ``+inf`` or NaN, gives NaN in that slice; other ``-inf`` entries give
    ``-inf``).

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> mn.log_softmax(np.array([0.0, 0.0]))
    array([-0.69314718, -0.69314718])
    """
    return _softmax_like(x, axis, out, log=True)


def logsumexp(
    x: ArrayLike, axis: int = -1, *, keepdims: bool = False
) -> NDArray[Any] | np.floating[Any]:
    """log(sum_i exp(x_i)) along ``axis``, computed as m + log sum_i exp(x_i - m).

    Parameters
    ----------
    x : array_like
        Real input (dtype policy as for :func:`softmax`).
    axis : int, optional
        The axis to reduce (default: the last).
    keepdims : bool, optional
        Keep the reduced axis with length 1.

    Returns
    -------
    ndarray
        ``x``'s shape without ``axis`` (or with length 1 there); a NumPy scalar of the
        result dtype when that shape is ().
        A slice that is all ``-inf`` (or empty) gives ``-inf``; one holding ``+inf`` gives
        ``+inf``; NaN gives NaN (as SciPy and PyTorch do).

    Raises
    ------
    TypeError, ValueError
        As for :func:`softmax`.

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> float(mn.logsumexp(np.array([0.0, 0.0])))
    0.6931471805599453
    """
    fn = "logsumexp"
    x, axis = _prepare(x, fn, axis)
    reduced = x.shape[:axis] + x.shape[axis + 1 :]
    out = np.empty(reduced, x.dtype)
    if out.size:
        if x.ndim and x.shape[axis] == 0:
            out.fill(-np.inf)
        else:
            _core.logsumexp_into(x, out, axis)
    if keepdims and x.ndim:
        return np.expand_dims(out, axis)
    return out[()] if out.ndim == 0 else out


def _backward(y: ArrayLike, dy: ArrayLike, axis: int, log: bool) -> NDArray[Any]:
    fn = "log_softmax_backward" if log else "softmax_backward"
    y = as_float_array(y, fn, "y")
    dy = as_float_array(dy, fn, "dy")
    if y.shape != dy.shape:
        raise ValueError(f"{fn}: dy has shape {dy.shape} (expected y's shape {y.shape})")
    dtype = np.result_type(y.dtype, dy.dtype)
    axis = normalize_axis(axis, y.ndim, fn)
    y = np.asarray(y, dtype=dtype, order="C")
    dy = np.asarray(dy, dtype=dtype, order="C")
    dx = _core.empty(y.shape, dtype)
    if y.size:
        _core.softmax_backward_into(y, dy, dx, axis, log)
    return dx


def softmax_backward(y: ArrayLike, dy: ArrayLike, axis: int = -1) -> NDArray[Any]:
    """Gradient through softmax:  dx_i = y_i (dy_i - sum_j y_j dy_j),  where y = softmax(x).

    Parameters
    ----------
    y : array_like
        The softmax output (not its input).
    dy : array_like
        The upstream gradient dL/dy, the shape of ``y``.
    axis : int, optional
        The axis the softmax was taken over.

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
    return _backward(y, dy, axis, log=False)


def log_softmax_backward(y: ArrayLike, dy: ArrayLike, axis: int = -1) -> NDArray[Any]:
    """Gradient through log_softmax:  dx_i = dy_i - exp(y_i) sum_j dy_j,  y = log_softmax(x).

    Parameters, Returns and Raises as for :func:`softmax_backward`, with ``y`` the log_softmax
    output.

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> mn.log_softmax_backward(np.log(np.array([0.5, 0.5])), np.array([1.0, 0.0]))
    array([ 0.5, -0.5])
    """
    return _backward(y, dy, axis, log=True)
