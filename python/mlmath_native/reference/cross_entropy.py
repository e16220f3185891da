"""Cross-entropy loss (float64 reference).

Formula (one sample, C classes)::

    L = − Σ_{c=1}^{C} y_c log ŷ_c

* y   the target distribution (a one-hot vector for a hard class label k, which
      reduces the sum to L = − log ŷ_k),
* ŷ   the predicted probabilities.

When the model outputs logits z (unnormalised scores), ŷ = softmax(z) and the loss
is computed through log_softmax, which is exact for very confident predictions
where ``log(softmax(z))`` would underflow to ``log(0)``::

    L = − Σ_c y_c log_softmax(z)_c = logsumexp(z) − Σ_c y_c z_c     (Σ_c y_c = 1)

A perfect prediction (ŷ equal to a one-hot y) gives L = 0; a uniform prediction
over C classes gives L = log C.

Two functions:

* ``cross_entropy(logits, target)``: from logits, PyTorch ``F.cross_entropy``
  semantics for the options it has (class indices or class probabilities as
  target, reduction ``"none"``, ``"mean"`` or ``"sum"``), but with the class axis
  chosen by ``axis`` (default last, NumPy style) instead of fixed at 1.
* ``cross_entropy_from_probs(probs, target)``: the seed formula applied directly
  to predicted probabilities.

Convention for zero targets: a term with y_c = 0 contributes exactly 0, even when
ŷ_c = 0 or log_softmax(z)_c = −inf (0 · log 0 := 0, its limit). Probabilities are
not clipped: y_c > 0 with ŷ_c = 0 gives an infinite loss.
"""

import numpy as np

from .softmax import _normalize_axis, log_softmax

__all__ = ["cross_entropy", "cross_entropy_from_probs"]

_REDUCTIONS = ("none", "mean", "sum")


def _xlogy(y, log_p):
    """``y * log_p`` with the convention that a zero ``y`` gives exactly 0."""
    with np.errstate(invalid="ignore"):  # 0 * -inf in the discarded branch
        return np.where(y != 0, y * log_p, 0.0)


def _reduce(loss, reduction):
    """Apply the reduction to per-sample losses."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return np.sum(loss)[()]
    # "mean": the average over samples. No samples gives NaN (0 / 0), as in PyTorch.
    if loss.size == 0:
        return np.float64(np.nan)
    return np.mean(loss)[()]


def _check_reduction(reduction, name):
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"{name}: reduction is invalid (got {reduction!r}, expected one of {_REDUCTIONS})"
        )


def cross_entropy(logits, target, axis=-1, reduction="mean"):
    """Cross-entropy between logits and a target, in float64.

    ``L = − Σ_c y_c log_softmax(z)_c`` per sample, along the class axis. With class
    indices k as target this is ``L = − log_softmax(z)_k``.

    Parameters
    ----------
    logits : array_like, shape ``(..., C, ...)``
        Unnormalised scores z, classes along ``axis``. Converted to float64.
    target : array_like
        Either integer class indices, with the shape of ``logits`` minus the class
        axis and values in ``[0, C)``; or floating-point class probabilities y with
        the shape of ``logits`` (rows need not be normalised; the formula is applied
        as written). The kind is chosen by the dtype: integer (or bool) dtypes are
        indices, floating dtypes are probabilities.
    axis : int, optional
        The class axis. Default: the last axis.
    reduction : {"mean", "sum", "none"}, optional
        ``"none"``: per-sample losses with the shape of ``logits`` minus the class
        axis. ``"sum"``: their sum. ``"mean"`` (default): their average over samples
        (NaN if there are none).

    Returns
    -------
    loss : ndarray or numpy.float64

    Raises
    ------
    ValueError
        For a bad shape, an out-of-range class index, 0-d logits or an unknown
        reduction.
    AxisError
        If ``axis`` is out of range.

    Examples
    --------
    >>> import numpy as np
    >>> logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    >>> print(np.round(cross_entropy(logits, [0, 2], reduction="none"), 4))
    [0.2395 1.0986]
    >>> print(round(float(cross_entropy(logits, [0, 2])), 4))
    0.6691
    >>> probs_target = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    >>> print(np.round(cross_entropy(logits, probs_target, reduction="none"), 4))
    [0.2395 1.0986]
    """
    name = "cross_entropy"
    _check_reduction(reduction, name)
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 0:
        raise ValueError(f"{name}: logits is 0-d (expected at least 1 dimension: the classes)")
    axis = _normalize_axis(axis, z.ndim, name)
    num_classes = z.shape[axis]
    log_p = log_softmax(z, axis=axis)  # log ŷ, computed stably

    target = np.asarray(target)
    if target.dtype.kind in "biu":
        # Hard labels: L = −log ŷ_k for the target class k of each sample.
        expected = z.shape[:axis] + z.shape[axis + 1 :]
        if target.shape != expected:
            raise ValueError(
                f"{name}: target has shape {target.shape} "
                f"(expected {expected}: the logits' shape without the class axis)"
            )
        bad = (target < 0) | (target >= num_classes)
        if np.any(bad):
            pos = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{name}: target holds {target[pos]} at position {pos} "
                f"but there are {num_classes} classes"
            )
        # Pick log ŷ at the target class along the class axis.
        k = np.expand_dims(target.astype(np.intp), axis)
        loss = -np.squeeze(np.take_along_axis(log_p, k, axis=axis), axis=axis)
    elif target.dtype.kind == "f":
        # Soft labels: L = −Σ_c y_c log ŷ_c (0 · log 0 = 0).
        y = target.astype(np.float64)
        if y.shape != z.shape:
            raise ValueError(
                f"{name}: target has shape {y.shape} (expected the shape of logits, "
                f"{z.shape}, for class probabilities)"
            )
        loss = -np.sum(_xlogy(y, log_p), axis=axis)
    else:
        raise ValueError(
            f"{name}: target has dtype {target.dtype} "
            "(expected integer class indices or floating-point probabilities)"
        )
    return _reduce(loss, reduction)


def cross_entropy_from_probs(probs, target, axis=-1, reduction="mean"):
    """Cross-entropy from predicted probabilities: ``L = − Σ_i y_i log ŷ_i``.

    The seed formula applied as written, with no clipping of ``ŷ``. A term with
    ``y_i = 0`` is exactly 0 (so ``ŷ_i = 0`` there is harmless); ``y_i > 0`` with
    ``ŷ_i = 0`` gives ``inf``. Prefer :func:`cross_entropy` on logits when they are
    available: it stays finite and accurate for confident predictions.

    Parameters
    ----------
    probs : array_like
        Predicted probabilities ŷ (along ``axis``). Converted to float64.
    target : array_like
        Target distribution y (one-hot or soft), same shape as ``probs``.
    axis : int, optional
        The class axis. Default: the last axis.
    reduction : {"mean", "sum", "none"}, optional
        As in :func:`cross_entropy`. For a single 1-D distribution all three give
        the same number.

    Returns
    -------
    loss : ndarray or numpy.float64

    Raises
    ------
    ValueError
        If the shapes differ, ``probs`` is 0-d or ``reduction`` is unknown.
    AxisError
        If ``axis`` is out of range.

    Examples
    --------
    >>> import numpy as np
    >>> print(round(float(cross_entropy_from_probs([0.7, 0.2, 0.1], [1.0, 0.0, 0.0])), 4))
    0.3567
    >>> print(float(cross_entropy_from_probs([1.0, 0.0], [1.0, 0.0])))
    0.0
    """
    name = "cross_entropy_from_probs"
    _check_reduction(reduction, name)
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    if p.ndim == 0:
        raise ValueError(f"{name}: probs is 0-d (expected at least 1 dimension: the classes)")
    if y.shape != p.shape:
        raise ValueError(
            f"{name}: target has shape {y.shape} (expected the shape of probs, {p.shape})"
        )
    axis = _normalize_axis(axis, p.ndim, name)
    with np.errstate(divide="ignore", invalid="ignore"):  # log(0) = -inf is intended
        log_p = np.log(p)
    loss = -np.sum(_xlogy(y, log_p), axis=axis)
    return _reduce(loss, reduction)
