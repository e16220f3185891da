"""Softmax, log-softmax and log-sum-exp along one axis (float64 reference).

Formulas (along the chosen axis, index i over its n entries)::

    softmax(z)_i     = exp(z_i) / Σ_j exp(z_j)
                     = exp(z_i − m) / Σ_j exp(z_j − m),        m = max_j z_j
    logsumexp(z)     = log Σ_j exp(z_j) = m + log Σ_j exp(z_j − m)
    log_softmax(z)_i = z_i − logsumexp(z)

Backward (vector-Jacobian products), given the forward output y and the upstream
gradient dy = ∂L/∂y::

    y = softmax(x):      dx_i = y_i · (dy_i − Σ_j y_j dy_j)
    y = log_softmax(x):  dx_i = dy_i − exp(y_i) · Σ_j dy_j

Softmax turns a vector of raw scores (logits) into probabilities: every output is
positive and they sum to 1 along the axis. Subtracting the maximum m first does not
change the result (the factor exp(−m) cancels) but keeps every exponent ≤ 0, so
exp never overflows, even for logits like 1e4.

Special values (these are the contract the native kernels are tested against):

* ``-inf`` entries are allowed and get probability 0 (log-probability ``-inf``).
* A row (a 1-D slice along the axis) whose entries are all ``-inf``, or that holds
  a ``+inf`` or a NaN, has no meaningful distribution: softmax and log_softmax give
  NaN in every entry of that row. Other rows are unaffected.
* logsumexp of an all ``-inf`` row is ``-inf``; of a row holding ``+inf`` (and no
  NaN) it is ``+inf``; of a row holding NaN it is NaN (as in SciPy and PyTorch).
* Empty arrays give empty results of the same shape; logsumexp along an axis of
  length 0 is ``-inf`` (the log of an empty sum).
* A 0-d input is treated as a single-element row: only ``axis`` in (-1, 0) is
  accepted, softmax gives 1.0, log_softmax 0.0 and logsumexp the value itself.
* An invalid axis raises NumPy's ``AxisError`` (a ``ValueError`` and
  ``IndexError`` subclass).

Every function converts its input with ``np.asarray(x, dtype=np.float64)``, so
the computation is always in float64.
"""

import operator

import numpy as np

__all__ = [
    "softmax",
    "log_softmax",
    "logsumexp",
    "softmax_backward",
    "log_softmax_backward",
]

# np.exceptions exists from NumPy 1.25; older versions expose AxisError at top level.
AxisError = getattr(np, "exceptions", np).AxisError


def _normalize_axis(axis, ndim, name):
    """Return ``axis`` as a non-negative index into an array with ``ndim`` dims.

    A 0-d array is treated as having one axis (like NumPy reductions), so only
    -1 and 0 are accepted for it. Raises ``AxisError`` for an out-of-range axis
    and ``TypeError`` for a non-integer one.
    """
    axis = operator.index(axis)  # rejects floats, tuples, None, ...
    n = max(ndim, 1)
    if not -n <= axis < n:
        raise AxisError(axis, ndim, name)
    return axis % n


def _several_axes(axis):
    """Whether ``axis`` names several axes at once (SciPy's tuple or None)."""
    return axis is None or isinstance(axis, tuple)


def _normalize_axes(axis, ndim, name):
    """The sorted distinct axes that a tuple (or None: all) names; 0-d counts as one axis."""
    n = max(ndim, 1)
    if axis is None:
        return tuple(range(n))
    axes = tuple(_normalize_axis(a, ndim, name) for a in axis)
    if len(set(axes)) != len(axes):
        raise ValueError(f"{name}: axis {axis} names an axis twice")
    return tuple(sorted(axes))


def _on_merged_axes(f, x, axis, name, reduce=False, keepdims=False):
    """``f`` (along axis -1) over several axes at once: they are moved last and merged into
    one (the definition of a multi-axis softmax or logsumexp: one slice is every element
    they index), then the result is put back in ``x``'s layout."""
    x = np.asarray(x, dtype=np.float64)
    axes = _normalize_axes(axis, x.ndim, name)
    x1 = x.reshape(x.shape or (1,))
    rest = [i for i in range(x1.ndim) if i not in axes]
    moved = np.transpose(x1, rest + list(axes))
    lead = moved.shape[: len(rest)]
    n = int(np.prod([x1.shape[i] for i in axes], dtype=np.int64))
    y = f(moved.reshape(lead + (n,)), axis=-1)
    if reduce:
        y = np.asarray(y).reshape(lead)
        if keepdims:
            y = y.reshape(tuple(1 if i in axes else d for i, d in enumerate(x.shape)))
        return y[()]
    y = y.reshape(moved.shape).transpose(np.argsort(rest + list(axes)))
    return y.reshape(x.shape)


def _rowwise_max(x, axis):
    """Max along ``axis`` (keepdims); NaN if the row holds NaN; -inf for an empty row."""
    return np.max(x, axis=axis, keepdims=True, initial=-np.inf)


def softmax(x, axis=-1):
    """Softmax along one axis, in float64.

    ``y_i = exp(x_i − m) / Σ_j exp(x_j − m)`` with ``m = max_j x_j``.

    Parameters
    ----------
    x : array_like
        Logits. Converted to float64.
    axis : int, tuple of ints or None, optional
        Axis along which the entries sum to 1. Default: the last axis. A tuple (or None, all
        axes) normalises over those axes together, as SciPy's ``softmax``.

    Returns
    -------
    y : ndarray of float64, same shape as ``x``
        Probabilities. A row that is all ``-inf`` or holds ``+inf`` or NaN is all NaN.

    Raises
    ------
    AxisError
        If ``axis`` is out of range.

    Examples
    --------
    >>> import numpy as np
    >>> print(np.round(softmax([1.0, 2.0, 3.0]), 4))
    [0.09   0.2447 0.6652]
    >>> print(softmax([[0.0, 0.0], [1e4, -np.inf]]))
    [[0.5 0.5]
     [1.  0. ]]
    """
    if _several_axes(axis):
        return _on_merged_axes(softmax, x, axis, "softmax")
    x = np.asarray(x, dtype=np.float64)
    axis = _normalize_axis(axis, x.ndim, "softmax")
    if x.ndim == 0:
        # A single element is its own row: compute on shape (1,) and reshape back.
        return softmax(x.reshape(1), axis=0).reshape(())
    if x.shape[axis] == 0:
        return np.empty_like(x)

    with np.errstate(all="ignore"):  # bad rows are handled explicitly below
        m = _rowwise_max(x, axis)
        # A row is well-defined iff its max is finite: that excludes all -inf rows,
        # rows holding +inf and rows holding NaN (max propagates NaN).
        row_ok = np.isfinite(m)
        m_safe = np.where(row_ok, m, 0.0)
        e = np.exp(x - m_safe)  # every exponent <= 0 in good rows: no overflow
        s = np.sum(e, axis=axis, keepdims=True)  # >= 1 in good rows (the max gives exp(0))
        y = e / s
    return np.where(row_ok, y, np.nan)


def log_softmax(x, axis=-1):
    """Log of the softmax along one axis, in float64.

    ``log_softmax(x)_i = x_i − m − log Σ_j exp(x_j − m)`` with ``m = max_j x_j``.

    Computed directly (not as ``log(softmax(x))``) so that very negative
    log-probabilities stay accurate instead of underflowing to ``-inf``.

    Parameters
    ----------
    x : array_like
        Logits. Converted to float64.
    axis : int, optional
        Axis of the distribution. Default: the last axis.

    Returns
    -------
    y : ndarray of float64, same shape as ``x``
        Log-probabilities. ``-inf`` logits give ``-inf``; a row that is all ``-inf``
        or holds ``+inf`` or NaN is all NaN.

    Raises
    ------
    AxisError
        If ``axis`` is out of range.

    Examples
    --------
    >>> import numpy as np
    >>> print(np.round(log_softmax([1.0, 2.0, 3.0]), 4))
    [-2.4076 -1.4076 -0.4076]
    >>> print(log_softmax([0.0, -1e4]))
    [     0. -10000.]
    """
    if _several_axes(axis):
        return _on_merged_axes(log_softmax, x, axis, "log_softmax")
    x = np.asarray(x, dtype=np.float64)
    axis = _normalize_axis(axis, x.ndim, "log_softmax")
    if x.ndim == 0:
        return log_softmax(x.reshape(1), axis=0).reshape(())
    if x.shape[axis] == 0:
        return np.empty_like(x)

    with np.errstate(all="ignore"):
        m = _rowwise_max(x, axis)
        row_ok = np.isfinite(m)
        m_safe = np.where(row_ok, m, 0.0)
        shifted = x - m_safe
        log_s = np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))
        y = shifted - log_s
    return np.where(row_ok, y, np.nan)


def logsumexp(x, axis=-1, keepdims=False):
    """Log of the sum of exponentials along one axis, in float64.

    ``logsumexp(x) = m + log Σ_j exp(x_j − m)`` with ``m = max_j x_j``.

    Parameters
    ----------
    x : array_like
        Input values. Converted to float64.
    axis : int, optional
        Axis to reduce. Default: the last axis.
    keepdims : bool, optional
        Keep the reduced axis with length 1 (as in NumPy reductions).

    Returns
    -------
    out : ndarray or numpy.float64
        ``x`` reduced along ``axis``. An all ``-inf`` row gives ``-inf``, a row holding
        ``+inf`` (and no NaN) gives ``+inf``, a row holding NaN gives NaN, and an empty
        row (axis of length 0) gives ``-inf``. A 0-d result is returned as a NumPy scalar.

    Raises
    ------
    AxisError
        If ``axis`` is out of range.

    Examples
    --------
    >>> import numpy as np
    >>> print(round(float(logsumexp([1.0, 2.0, 3.0])), 4))
    3.4076
    >>> print(logsumexp([[1e4, 1e4], [-np.inf, -np.inf]]) - np.array([1e4, 0.0]))
    [0.69314718       -inf]
    """
    if _several_axes(axis):
        return _on_merged_axes(logsumexp, x, axis, "logsumexp", reduce=True, keepdims=keepdims)
    x = np.asarray(x, dtype=np.float64)
    axis = _normalize_axis(axis, x.ndim, "logsumexp")
    if x.ndim == 0:
        # The sum of a single exp(x) is exp(x): logsumexp is the value itself.
        return x.copy() if keepdims else x[()]

    with np.errstate(all="ignore"):
        m = _rowwise_max(x, axis)  # -inf for an empty or all -inf row
        # Only subtract a finite max. With m_safe = 0 the special rows come out
        # right on their own: all -inf -> log(0) = -inf; +inf -> log(inf) = +inf;
        # NaN -> NaN.
        m_safe = np.where(np.isfinite(m), m, 0.0)
        s = np.sum(np.exp(x - m_safe), axis=axis, keepdims=True)
        out = np.log(s) + m_safe
    if not keepdims:
        out = np.squeeze(out, axis=axis)
    return out[()]  # 0-d array -> NumPy scalar, like NumPy reductions


def _check_same_shape(y, dy, name):
    if y.shape != dy.shape:
        raise ValueError(f"{name}: dy has shape {dy.shape} (expected the shape of y, {y.shape})")


def softmax_backward(y, dy, axis=-1):
    """Gradient of a loss with respect to the softmax input.

    With ``y = softmax(x)`` and ``dy = ∂L/∂y``::

        dx_i = Σ_j (∂y_j/∂x_i) dy_j = y_i · (dy_i − Σ_j y_j dy_j)

    (the Jacobian is ``diag(y) − y yᵀ``).

    Parameters
    ----------
    y : array_like
        The forward output ``softmax(x, axis)``.
    dy : array_like
        Upstream gradient, same shape as ``y``.
    axis : int, optional
        The axis used in the forward pass. Default: the last axis.

    Returns
    -------
    dx : ndarray of float64, same shape as ``y``

    Raises
    ------
    ValueError
        If ``y`` and ``dy`` differ in shape.
    AxisError
        If ``axis`` is out of range.

    Examples
    --------
    >>> import numpy as np
    >>> y = softmax([0.0, 0.0])
    >>> print(softmax_backward(y, [1.0, 0.0]))
    [ 0.25 -0.25]
    """
    y = np.asarray(y, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    _check_same_shape(y, dy, "softmax_backward")
    axis = _normalize_axis(axis, y.ndim, "softmax_backward")
    if y.ndim == 0:
        return softmax_backward(y.reshape(1), dy.reshape(1), axis=0).reshape(())
    dot = np.sum(y * dy, axis=axis, keepdims=True)  # Σ_j y_j dy_j, one per row
    return y * (dy - dot)


def log_softmax_backward(y, dy, axis=-1):
    """Gradient of a loss with respect to the log-softmax input.

    With ``y = log_softmax(x)`` and ``dy = ∂L/∂y``::

        dx_i = dy_i − exp(y_i) · Σ_j dy_j

    (``exp(y)`` is the softmax; the Jacobian is ``I − 1 softmax(x)ᵀ``).

    Parameters
    ----------
    y : array_like
        The forward output ``log_softmax(x, axis)``.
    dy : array_like
        Upstream gradient, same shape as ``y``.
    axis : int, optional
        The axis used in the forward pass. Default: the last axis.

    Returns
    -------
    dx : ndarray of float64, same shape as ``y``

    Raises
    ------
    ValueError
        If ``y`` and ``dy`` differ in shape.
    AxisError
        If ``axis`` is out of range.

    Examples
    --------
    >>> import numpy as np
    >>> y = log_softmax([0.0, 0.0])
    >>> print(log_softmax_backward(y, [1.0, 0.0]))
    [ 0.5 -0.5]
    """
    y = np.asarray(y, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    _check_same_shape(y, dy, "log_softmax_backward")
    axis = _normalize_axis(axis, y.ndim, "log_softmax_backward")
    if y.ndim == 0:
        return log_softmax_backward(y.reshape(1), dy.reshape(1), axis=0).reshape(())
    total = np.sum(dy, axis=axis, keepdims=True)  # Σ_j dy_j, one per row
    return dy - np.exp(y) * total
