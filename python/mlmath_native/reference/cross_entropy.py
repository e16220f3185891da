"""Cross-entropy loss and its gradient (float64 reference).

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

PyTorch's options (``F.cross_entropy``)
---------------------------------------
With lsm = log_softmax(z) along the class axis, p = softmax(z) = exp(lsm), C classes,
class weights w (all ones by default), W = Σ_c w_c and label smoothing ε ∈ [0, 1]:

* class-index targets t_n (samples with t_n == ignore_index are skipped)::

      L_n = (1 − ε) · w[t_n] · (−lsm[n, t_n])  +  (ε / C) · Σ_c w_c · (−lsm[n, c])
      L_n = 0                                                   where t_n == ignore_index
      "mean" = Σ_n L_n / Σ_{n not ignored} w[t_n]     (NaN when that is 0 / 0)

  Both terms share the denominator of "mean", as in PyTorch's
  ``cross_entropy_loss_label_smoothing``.

* class-probability targets y (``ignore_index`` does not apply; a value ≥ 0 is an
  error, as in PyTorch)::

      y'  = (1 − ε) · y + ε / C
      L_n = − Σ_c w_c · y'[n, c] · lsm[n, c]
      "mean" = Σ_n L_n / N     (N = number of samples, not the weights; NaN if N = 0)

* "sum" = Σ_n L_n and "none" = the L_n themselves, for both kinds.

Both kinds are one formula with an *effective target* q[n, c] ≥ 0 (the weighted,
smoothed target distribution)::

      index:        q[n, c] = (1 − ε) · w[t_n] · [c == t_n] + (ε / C) · w_c   (0 if ignored)
      probability:  q[n, c] = w_c · y'[n, c]

      L_n      = − Σ_c q[n, c] · lsm[n, c]
      ∂L_n/∂z_j = p_j · Σ_c q[n, c] − q[n, j]                          (the gradient)

and the gradient of the reduced loss scales each row by g_n: the upstream gradient
itself for "none" (per sample) and "sum", or the upstream gradient divided by the
"mean" denominator.

Functions: :func:`cross_entropy`, :func:`cross_entropy_grad` (from logits, the class
axis chosen by ``axis``, default last, NumPy style, instead of fixed at 1) and
:func:`cross_entropy_from_probs` (the seed formula applied directly to predicted
probabilities).

Convention for zero targets: a term with y_c = 0 (or q[n, c] = 0) contributes exactly
0, even when ŷ_c = 0 or log_softmax(z)_c = −inf (0 · log 0 := 0, its limit). PyTorch
computes 0 · (−inf) = NaN there for probability targets (and for a zero weight
under label smoothing); for class indices without smoothing both give the same.
Probabilities are not clipped: y_c > 0 with ŷ_c = 0 gives an infinite loss.
"""

import operator

import numpy as np

from .softmax import _normalize_axis, log_softmax

__all__ = ["cross_entropy", "cross_entropy_grad", "cross_entropy_from_probs"]

_REDUCTIONS = ("none", "mean", "sum")


def _xlogy(y, log_p):
    """``y * log_p`` with the convention that a zero ``y`` gives exactly 0."""
    with np.errstate(invalid="ignore"):  # 0 * -inf in the discarded branch
        return np.where(y != 0, y * log_p, 0.0)


def _reduce(loss, reduction):
    """Apply the reduction to per-sample losses (used by cross_entropy_from_probs)."""
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


# Note [effective target]
# ~~~~~~~~~~~~~~~~~~~~~~~
# Every option of F.cross_entropy (class indices or probabilities, weight, label
# smoothing, ignore_index) only changes the coefficients q[n, c] in
#     L_n = − Σ_c q[n, c] · lsm[n, c]
# and the denominator of "mean". _prepare builds q once (materialised, shape of the
# logits) so that the loss and its gradient share it and cannot drift apart.


def _prepare(name, logits, target, axis, weight, ignore_index, reduction, label_smoothing):
    """Check the arguments and build what the loss and the gradient need.

    Returns ``(lsm, q, active, denominator, axis)``:

    * ``lsm``: log_softmax of the logits along the class axis (float64, logits' shape);
    * ``q``: the effective target of Note [effective target] (logits' shape);
    * ``active``: bool, per-sample shape; False for samples skipped by ignore_index;
    * ``denominator``: the divisor of reduction "mean" (a float, may be 0);
    * ``axis``: the class axis as a non-negative int.
    """
    _check_reduction(reduction, name)
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 0:
        raise ValueError(f"{name}: logits is 0-d (expected at least 1 dimension: the classes)")
    axis = _normalize_axis(axis, z.ndim, name)
    num_classes = z.shape[axis]
    sample_shape = z.shape[:axis] + z.shape[axis + 1 :]  # the shape of the per-sample loss
    num_samples = int(np.prod(sample_shape))  # N (not z.size / C, which fails for C = 0)

    ignore_index = operator.index(ignore_index)  # PyTorch takes an int; rejects 1.5, None
    eps = float(label_smoothing)
    if not 0.0 <= eps <= 1.0:  # also rejects NaN
        raise ValueError(
            f"{name}: label_smoothing is out of range (got {label_smoothing!r}, "
            "expected a number in [0, 1])"
        )

    # Class weights w, broadcast along the class axis: shape (1, ..., C, ..., 1).
    if weight is None:
        w = np.ones(num_classes)
    else:
        w = np.asarray(weight, dtype=np.float64)
        if w.shape != (num_classes,):
            raise ValueError(
                f"{name}: weight has shape {w.shape} "
                f"(expected ({num_classes},): one weight per class)"
            )
    bshape = [1] * z.ndim
    bshape[axis] = num_classes
    w_b = w.reshape(bshape)
    eps_over_c = eps / num_classes if num_classes else 0.0

    target = np.asarray(target)
    if target.dtype.kind in "iu":
        # Class indices: q = (1 − ε)·w[t]·onehot(t) + (ε/C)·w, zero rows where ignored.
        if target.shape != sample_shape:
            raise ValueError(
                f"{name}: target has shape {target.shape} "
                f"(expected {sample_shape}: the logits' shape without the class axis)"
            )
        active = target != ignore_index
        bad = active & ((target < 0) | (target >= num_classes))
        if np.any(bad):
            pos = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{name}: target holds {target[pos]} at position {pos} "
                f"but there are {num_classes} classes"
            )
        t = np.where(active, target, 0).astype(np.intp)  # a safe index where ignored
        t_b = np.expand_dims(t, axis)  # classes axis of length 1, for *_along_axis
        onehot = np.zeros(z.shape)
        np.put_along_axis(onehot, t_b, 1.0, axis=axis)
        w_t = np.where(active, w[t], 0.0)  # w[t_n], 0 for ignored samples
        q = (1.0 - eps) * np.expand_dims(w_t, axis) * onehot + eps_over_c * w_b
        q = q * np.expand_dims(active, axis)  # ignored samples: q = 0, so L_n = 0
        # "mean" divides by the total weight of the samples that count.
        denominator = float(np.sum(w_t))
    elif target.dtype.kind == "f":
        # Class probabilities: q = w · ((1 − ε)·y + ε/C); ignore_index plays no part
        # (it must be negative, as in PyTorch).
        y = target.astype(np.float64)
        if y.shape != z.shape:
            raise ValueError(
                f"{name}: target has shape {y.shape} (expected the shape of logits, "
                f"{z.shape}, for class probabilities)"
            )
        if ignore_index >= 0:
            # PyTorch refuses this too: a user who set it expects masking that cannot happen.
            raise ValueError(
                f"{name}: ignore_index is not supported for probability targets "
                f"(got {ignore_index}, expected a negative value such as the default -100)"
            )
        q = w_b * ((1.0 - eps) * y + eps_over_c)
        active = np.ones(sample_shape, dtype=bool)
        denominator = float(num_samples)  # "mean" divides by N, not by the weights
    else:
        raise TypeError(
            f"{name}: target has dtype {target.dtype} "
            "(expected integer class indices or floating-point class probabilities)"
        )
    lsm = log_softmax(z, axis=axis)  # log ŷ, computed stably
    return lsm, q, active, denominator, axis


def cross_entropy(
    logits,
    target,
    axis=-1,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
):
    """Cross-entropy between logits and a target, in float64 (PyTorch semantics).

    ``L_n = − Σ_c q[n, c] · log_softmax(z)[n, c]`` per sample n, along the class axis,
    where q is the target made effective by the options (see the module docstring):

    * class indices t:   ``L_n = (1 − ε)·w[t_n]·(−lsm[n, t_n]) + (ε/C)·Σ_c w_c·(−lsm[n, c])``,
      0 where ``t_n == ignore_index``; "mean" divides by ``Σ_{n not ignored} w[t_n]``;
    * probabilities y:   ``L_n = − Σ_c w_c·((1 − ε)·y[n, c] + ε/C)·lsm[n, c]``;
      "mean" divides by the number of samples N.

    Without options and with class index k this is ``L = − log_softmax(z)_k``.

    Parameters
    ----------
    logits : array_like, shape ``(..., C, ...)``
        Unnormalised scores z, classes along ``axis``. Converted to float64.
    target : array_like
        Either integer class indices, with the shape of ``logits`` minus the class
        axis and values in ``[0, C)`` or equal to ``ignore_index``; or floating-point
        class probabilities y with the shape of ``logits`` (rows need not be
        normalised; the formula is applied as written). The kind is chosen by the
        dtype: integer dtypes are indices, floating dtypes are probabilities.
    axis : int, optional
        The class axis. Default: the last axis; ``axis=1`` is PyTorch's
        ``(N, C, d1, ...)`` layout. Logits of shape ``(C,)`` with a 0-d index target
        (or a ``(C,)`` probability target) are a single sample.
    weight : array_like, shape ``(C,)``, optional
        Per-class weights w. Default: all ones.
    ignore_index : int, optional
        Class-index targets equal to it contribute nothing, neither to the loss nor
        to the "mean" denominator. Not used for probability targets, where it must
        be negative (as in PyTorch). Default: -100.
    reduction : {"mean", "sum", "none"}, optional
        ``"none"``: per-sample losses with the shape of ``logits`` minus the class
        axis. ``"sum"``: their sum. ``"mean"`` (default): their sum divided by the
        total weight of the non-ignored targets (class indices) or by the number of
        samples (probabilities); NaN when that is 0.
    label_smoothing : float, optional
        ε in ``[0, 1]``: mixes the target with the uniform distribution,
        ``(1 − ε)·target + ε/C``. Default: 0.

    Returns
    -------
    loss : ndarray or numpy.float64
        An ndarray of float64 for ``"none"`` (0-d for a single sample), a NumPy
        float64 scalar for ``"mean"`` and ``"sum"``.

    Raises
    ------
    ValueError
        For a bad shape (target, weight), an out-of-range class index, 0-d logits,
        ``label_smoothing`` outside ``[0, 1]``, an unknown reduction, or
        ``ignore_index >= 0`` with probability targets.
    TypeError
        For a target that is neither integer nor floating point (bool included), or
        a non-integer ``ignore_index``.
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
    >>> print(np.round(cross_entropy(logits, [0, -100], reduction="none"), 4))
    [0.2395 0.    ]
    >>> print(round(float(cross_entropy(logits, [0, 2], weight=[1.0, 1.0, 3.0])), 4))
    0.8838
    """
    name = "cross_entropy"
    lsm, q, _, denominator, axis = _prepare(
        name, logits, target, axis, weight, ignore_index, reduction, label_smoothing
    )
    # L_n = Σ_c q[n, c] · (−lsm[n, c]), with 0 · inf := 0 (see the module docstring).
    # Negating lsm (not the sum) keeps an ignored sample's loss +0.0 rather than −0.0.
    loss = np.sum(_xlogy(q, -lsm), axis=axis)
    if reduction == "none":
        return np.asarray(loss)
    total = np.sum(loss)[()]
    if reduction == "sum":
        return total
    # "mean": 0 / 0 (nothing counts) is NaN, as in PyTorch; silence its warning.
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.float64(total) / np.float64(denominator)


def cross_entropy_grad(
    logits,
    target,
    axis=-1,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    grad_output=None,
):
    """Gradient of :func:`cross_entropy` with respect to the logits, in float64.

    With p = softmax(z) and the effective target q (module docstring)::

        ∂L_n/∂z[n, j] = p[n, j] · Σ_c q[n, c] − q[n, j]
        dlogits[n, j] = g_n · ∂L_n/∂z[n, j]

    that is, for class indices t (W = Σ_c w_c)::

        ∂L_n/∂z_j = (1 − ε)·w[t_n]·(p_j − [j == t_n]) + (ε/C)·(W·p_j − w_j)   (0 if ignored)

    and for probabilities, with y' = (1 − ε)·y + ε/C::

        ∂L_n/∂z_j = p_j · Σ_c w_c·y'[n, c] − w_j·y'[n, j]

    The row scale g_n is ``grad_output[n]`` for ``"none"``, ``grad_output`` for
    ``"sum"`` and ``grad_output / denominator`` for ``"mean"`` (the same denominator
    as the loss). Ignored samples get exactly 0, also when every sample is ignored
    and the "mean" loss is NaN (as PyTorch's autograd gives for finite logits).

    Parameters
    ----------
    logits, target, axis, weight, ignore_index, reduction, label_smoothing
        As in :func:`cross_entropy`.
    grad_output : array_like, optional
        The upstream gradient ∂(outer)/∂loss. For ``"none"``: an array with the
        per-sample loss shape, or a scalar applied to every sample; for ``"mean"``
        and ``"sum"``: a scalar. Default: 1.

    Returns
    -------
    dlogits : ndarray of float64, same shape as ``logits``

    Raises
    ------
    ValueError
        As :func:`cross_entropy`, and for a ``grad_output`` of the wrong shape.
    TypeError
        As :func:`cross_entropy`.
    AxisError
        If ``axis`` is out of range.

    Examples
    --------
    >>> import numpy as np
    >>> logits = np.array([[0.0, 0.0], [0.0, 0.0]])
    >>> print(cross_entropy_grad(logits, [0, 1], reduction="sum"))
    [[-0.5  0.5]
     [ 0.5 -0.5]]
    >>> print(cross_entropy_grad(logits, [0, -100], reduction="none", grad_output=[2.0, 3.0]))
    [[-1.  1.]
     [ 0.  0.]]
    """
    name = "cross_entropy_grad"
    lsm, q, active, denominator, axis = _prepare(
        name, logits, target, axis, weight, ignore_index, reduction, label_smoothing
    )
    sample_shape = active.shape

    # The per-sample scale g_n (per-sample shape).
    if grad_output is None:
        g = np.ones(sample_shape)
    else:
        g = np.asarray(grad_output, dtype=np.float64)
        if reduction == "none" and g.shape not in ((), sample_shape):
            raise ValueError(
                f"{name}: grad_output has shape {g.shape} (expected {sample_shape}, "
                "the per-sample loss shape, or a scalar, for reduction='none')"
            )
        if reduction != "none" and g.shape != ():
            raise ValueError(
                f"{name}: grad_output has shape {g.shape} "
                f"(expected (), a scalar, for reduction={reduction!r})"
            )
        g = np.broadcast_to(g, sample_shape)
    if reduction == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):  # denominator 0: NaN/inf
            g = g / denominator

    # ∂L_n/∂z_j = p_j · Σ_c q[n, c] − q[n, j]. p = exp(lsm) is 0 where lsm = −inf.
    p = np.exp(lsm)
    dloss = p * np.sum(q, axis=axis, keepdims=True) - q
    with np.errstate(invalid="ignore"):  # inf · 0 in rows that are discarded below
        dlogits = np.expand_dims(g, axis) * dloss
    # Ignored samples have no gradient at all (not inf · 0 = NaN when nothing counts).
    return np.where(np.expand_dims(active, axis), dlogits, 0.0)


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
