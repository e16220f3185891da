"""Cross-entropy from logits with PyTorch's options, and its gradient in the same fused pass."""

from __future__ import annotations

import operator
from typing import Any, Literal, cast, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _core
from ._checks import (
    as_float_array,
    as_input,
    check_out,
    is_bfloat16,
    normalize_axis,
    writable_target,
)
from ._softmax import log_softmax as _log_softmax

_REDUCTIONS = ("none", "mean", "sum")
_Reduction = Literal["none", "mean", "sum"]
#: a loss: per element (reduction="none") or a NumPy scalar in the logits' dtype
_Loss = NDArray[Any] | np.floating[Any]
_FN = "cross_entropy"


def _check_labels(target: NDArray[Any], num_classes: int, ignore_index: int) -> None:
    """ValueError naming the first label outside [0, C) that is not ignore_index."""
    with np.errstate(invalid="ignore"):
        bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bad.any():
        flat = int(np.flatnonzero(bad.ravel())[0])
        position = tuple(int(i) for i in np.unravel_index(flat, target.shape))
        value = target.ravel()[flat]
        raise ValueError(
            f"{_FN}: target holds {value} at position {position} but there are "
            f"{num_classes} classes (expected 0 <= target < {num_classes} or "
            f"target == ignore_index {ignore_index})"
        )


def _scalar(value: Any, name: str, fn: str = _FN) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: {name} must be a real number (got {value!r})") from None


def check_target(
    fn: str,
    target: Any,
    logits_shape: tuple[int, ...],
    axis: int,
    ignore_index: int,
) -> bool:
    """Checks a target (NumPy or Dask array) against the logits: class indices (an integer
    dtype) of the logits' shape without ``axis``, or class probabilities (a floating dtype) of
    the logits' shape, where ``ignore_index`` must be negative (as in PyTorch).  Returns whether
    the target holds indices."""
    kind = target.dtype.kind
    elem_shape = logits_shape[:axis] + logits_shape[axis + 1 :]
    if kind in "iu":
        if target.shape != elem_shape:
            raise ValueError(
                f"{fn}: target has shape {target.shape} (expected {elem_shape}: the logits' "
                f"shape {logits_shape} without axis {axis})"
            )
        return True
    if kind == "f" or is_bfloat16(target.dtype):
        if target.shape != logits_shape:
            raise ValueError(
                f"{fn}: target has shape {target.shape} (expected the logits' shape "
                f"{logits_shape} for class probabilities)"
            )
        if ignore_index >= 0:
            raise ValueError(
                f"{fn}: ignore_index is not supported for probability targets (got "
                f"{ignore_index}, expected a negative value such as the default -100, as in "
                "PyTorch)"
            )
        return False
    raise TypeError(
        f"{fn}: target has dtype {target.dtype} (expected integer class indices or "
        "floating class probabilities)"
    )


def check_logits(fn: str, shape: tuple[int, ...], axis: int) -> int:
    """The class axis of logits of this shape, normalised (a 0-d array has none)."""
    axis = normalize_axis(axis, len(shape), fn)
    if not shape:
        raise ValueError(f"{fn}: logits must have a class axis (got a 0-d array)")
    return axis


def check_weight(fn: str, shape: tuple[int, ...], num_classes: int) -> None:
    """A class weight vector has one entry per class."""
    if shape != (num_classes,):
        raise ValueError(
            f"{fn}: weight has shape {shape} (expected ({num_classes},): one weight per class)"
        )


def check_options(
    fn: str, reduction: object, label_smoothing: object, ignore_index: object
) -> tuple[float, int]:
    """Checks the reduction, label_smoothing in [0, 1] and an int64 ignore_index; returns the
    last two as numbers."""
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"{fn}: reduction is invalid (got {reduction!r}, expected one of {_REDUCTIONS})"
        )
    smoothing = _scalar(label_smoothing, "label_smoothing", fn)
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(
            f"{fn}: label_smoothing is out of range (got {smoothing}, expected 0 <= "
            "label_smoothing <= 1)"
        )
    try:
        index = operator.index(ignore_index)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{fn}: ignore_index must be an integer (got {ignore_index!r})") from None
    if not -(2**63) <= index < 2**63:
        raise ValueError(f"{fn}: ignore_index must fit in int64 (got {index})")
    return smoothing, index


@overload
def cross_entropy(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    axis: int = ...,
    weight: ArrayLike | None = ...,
    ignore_index: int = ...,
    reduction: Literal["mean", "sum"] = ...,
    label_smoothing: float = ...,
    return_grad: Literal[False] = ...,
    grad_output: ArrayLike | None = ...,
    return_target_grad: Literal[False] = ...,
    out: NDArray[Any] | None = ...,
) -> np.floating[Any]: ...


@overload
def cross_entropy(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    axis: int = ...,
    weight: ArrayLike | None = ...,
    ignore_index: int = ...,
    reduction: Literal["none"],
    label_smoothing: float = ...,
    return_grad: Literal[False] = ...,
    grad_output: ArrayLike | None = ...,
    return_target_grad: Literal[False] = ...,
    out: NDArray[Any] | None = ...,
) -> NDArray[Any]: ...


@overload
def cross_entropy(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    axis: int = ...,
    weight: ArrayLike | None = ...,
    ignore_index: int = ...,
    reduction: Literal["mean", "sum"] = ...,
    label_smoothing: float = ...,
    return_grad: Literal[True],
    grad_output: ArrayLike | None = ...,
    return_target_grad: Literal[False] = ...,
    out: NDArray[Any] | None = ...,
) -> tuple[np.floating[Any], NDArray[Any]]: ...


@overload
def cross_entropy(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    axis: int = ...,
    weight: ArrayLike | None = ...,
    ignore_index: int = ...,
    reduction: Literal["none"],
    label_smoothing: float = ...,
    return_grad: Literal[True],
    grad_output: ArrayLike | None = ...,
    return_target_grad: Literal[False] = ...,
    out: NDArray[Any] | None = ...,
) -> tuple[NDArray[Any], NDArray[Any]]: ...


@overload
def cross_entropy(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    axis: int = ...,
    weight: ArrayLike | None = ...,
    ignore_index: int = ...,
    reduction: _Reduction = ...,
    label_smoothing: float = ...,
    return_grad: bool = ...,
    grad_output: ArrayLike | None = ...,
    return_target_grad: bool = ...,
    out: NDArray[Any] | None = ...,
) -> _Loss | tuple[_Loss, NDArray[Any]] | tuple[_Loss, NDArray[Any], NDArray[Any]]: ...


def cross_entropy(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    axis: int = -1,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: _Reduction = "mean",
    label_smoothing: float = 0.0,
    return_grad: bool = False,
    grad_output: ArrayLike | None = None,
    return_target_grad: bool = False,
    out: NDArray[Any] | None = None,
) -> _Loss | tuple[_Loss, NDArray[Any]] | tuple[_Loss, NDArray[Any], NDArray[Any]]:
    """Cross-entropy between logits and class targets, PyTorch's ``F.cross_entropy`` exactly.

    Per element (one position of the non-class axes), with lsm = log_softmax(logits) along the
    class axis, C classes, class weights w (ones by default) and smoothing eps:

    - class-index target t:  L = (1 - eps) w_t (-lsm_t) + (eps / C) sum_c w_c (-lsm_c),
      and L = 0 where t == ignore_index;
    - probability target y:  L = -sum_c w_c y'_c lsm_c  with  y' = (1 - eps) y + eps / C.

    ``reduction="mean"`` divides the sum by the summed weights w_t of the targets that are not
    ignored (index targets) or by the number of elements (probability targets); if every target
    is ignored (or there are no elements) the mean is NaN, as in PyTorch.

    Parameters
    ----------
    logits : array_like
        Real scores of shape (..., C) with classes on ``axis``; float32 stays float32; float16
        and bfloat16 are read as they are and computed in float32 (Note [16-bit storage]);
        other real dtypes compute in float64.
    target : array_like
        Integer class indices with the shape of ``logits`` without ``axis``, or floating class
        probabilities with the shape of ``logits`` (told apart by dtype).
    axis : int, optional
        The class axis (default last; ``axis=1`` is PyTorch's (N, C, d1, ...) layout).
    weight : array_like, optional
        Class weights, shape (C,).
    ignore_index : int, optional
        Index targets equal to it contribute neither loss nor gradient (default -100).
        With probability targets it must be negative and is not used (as in PyTorch).
    reduction : {"mean", "sum", "none"}, optional
    label_smoothing : float, optional
        eps in [0, 1].
    return_grad : bool, optional
        Also return d(loss)/d(logits), computed in the same pass over the logits (no softmax or
        log-probability array is formed).
    grad_output : array_like or float, optional
        The upstream gradient: per element for ``reduction="none"`` (the loss's shape, or a
        scalar), a scalar for "mean"/"sum". Default 1.
    return_target_grad : bool, optional
        Also return d(loss)/d(target) for probability targets (what autograd gives a target
        that requires grad): ``-(1 - eps) w_c lsm_c`` times the upstream gradient (and / N for
        "mean"), in the target's (the logits') dtype.  Computed after the fused pass, from one
        more log-softmax of the logits.
    out : ndarray, optional
        Where to write dlogits (with ``return_grad=True``): the logits' shape and dtype,
        writeable; it may be the logits themselves (computed through a temporary).

    Returns
    -------
    loss : ndarray or scalar
        Per-element losses (``"none"``) or a NumPy scalar, in the logits' compute dtype (the
        logits' dtype; float32 for float16 and bfloat16 logits).
    dlogits : ndarray
        With ``return_grad=True``: ``(loss, dlogits)``, dlogits with the logits' shape and dtype
        (16-bit logits give a 16-bit gradient, rounded once).
    dtarget : ndarray
        With ``return_target_grad=True``, last: ``(loss, dtarget)`` or
        ``(loss, dlogits, dtarget)``.

    Notes
    -----
    Mixed dtypes: the logits decide.  Probability targets are read in the logits' dtype; class
    weights and ``grad_output`` in its compute dtype (float32 for 16-bit logits).

    Raises
    ------
    ValueError
        A label outside [0, C) that is not ``ignore_index`` (naming the first position and value,
        checked before anything is computed); wrong target, weight or grad_output shapes; a bad
        axis; label_smoothing outside [0, 1]; an unknown reduction.
    TypeError
        Unsupported dtypes (complex, object, strings; bool or float class indices).

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    >>> round(float(mn.cross_entropy(logits, np.array([0, 2]))), 6)
    0.669079
    >>> loss, grad = mn.cross_entropy(logits, np.array([0, 2]), return_grad=True)
    >>> grad.shape
    (2, 3)
    """
    logits = as_float_array(logits, _FN, "logits")
    dtype = logits.dtype  # the storage dtype of logits, probabilities and the gradient
    compute = np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)
    axis = check_logits(_FN, logits.shape, axis)
    num_classes = logits.shape[axis]
    elem_shape = logits.shape[:axis] + logits.shape[axis + 1 :]
    label_smoothing, ignore_index = check_options(_FN, reduction, label_smoothing, ignore_index)

    # target: class indices (integer dtype) or probabilities (floating dtype)
    target = as_input(target, _FN, "target")
    if check_target(_FN, target, logits.shape, axis, ignore_index):
        _check_labels(target, num_classes, ignore_index)
        target = np.asarray(target, dtype=np.int64, order="C")
        valid = target != ignore_index
    else:
        target = np.asarray(target, dtype=dtype, order="C")
        valid = None

    if weight is None:
        weight = np.ones(num_classes, compute)
    else:
        weight = as_float_array(weight, _FN, "weight")
        check_weight(_FN, weight.shape, num_classes)
        weight = np.asarray(weight, dtype=compute, order="C")

    # the reduction's denominator, needed before the kernel for the gradient's scale
    count = int(np.prod(elem_shape, dtype=np.int64))
    if reduction == "mean":
        if valid is None:
            denominator = float(count)
        else:
            denominator = float(weight.astype(np.float64)[target[valid]].sum())

    if return_target_grad and valid is not None:
        raise ValueError(
            f"{_FN}: return_target_grad needs probability targets (class indices have no gradient)"
        )
    if out is not None and not return_grad:
        raise ValueError(f"{_FN}: out is the gradient's buffer: it needs return_grad=True")
    scale_array, scale_all = None, 1.0
    if return_grad or return_target_grad:
        if reduction == "none":
            if grad_output is not None:
                g = as_float_array(grad_output, _FN, "grad_output")
                if g.ndim == 0:
                    scale_all = float(g)
                elif g.shape != elem_shape:
                    raise ValueError(
                        f"{_FN}: grad_output has shape {g.shape} (expected the loss's shape "
                        f"{elem_shape} or a scalar)"
                    )
                else:
                    scale_array = np.asarray(g, dtype=compute, order="C")
        else:
            if grad_output is not None and np.ndim(grad_output) != 0:
                raise ValueError(
                    f"{_FN}: grad_output must be a scalar for reduction={reduction!r} (got "
                    f"shape {np.shape(grad_output)})"
                )
            scale_all = 1.0 if grad_output is None else _scalar(grad_output, "grad_output")
            if reduction == "mean":
                with np.errstate(divide="ignore", invalid="ignore"):
                    scale_all = float(np.float64(scale_all) / np.float64(denominator))

    logits = np.asarray(logits, order="C")
    loss = np.empty(elem_shape, compute)
    grad, copy_back = None, False
    if out is not None:
        out = check_out(out, logits.shape, dtype, _FN)
        inputs = (logits, target, weight) + (() if scale_array is None else (scale_array,))
        shares = any(np.may_share_memory(out, a) for a in inputs)
        grad, copy_back = (np.empty(out.shape, dtype), True) if shares else writable_target(out, ())
    elif return_grad:
        grad = _core.empty(logits.shape, dtype)
    dtarget = None
    if return_target_grad:  # before the kernel: out may be the logits
        dtarget = _target_grad(logits, axis, weight, label_smoothing, scale_array, scale_all)
    if num_classes == 0:
        loss.fill(0)  # every target was ignored (validated above); an empty class sum is 0
    _core.cross_entropy_into(
        logits,
        target,
        axis,
        weight,
        ignore_index,
        label_smoothing,
        loss,
        grad,
        scale_array,
        scale_all,
    )
    if reduction == "none":
        result: _Loss = loss
    else:
        total = loss.sum(dtype=np.float64)
        if reduction == "mean":
            with np.errstate(divide="ignore", invalid="ignore"):
                total = total / denominator if denominator != 0 else np.float64(np.nan)
        result = compute.type(total)
    if copy_back:
        cast("NDArray[Any]", out)[...] = grad
        grad = out
    if return_grad and return_target_grad:
        return result, cast("NDArray[Any]", grad), cast("NDArray[Any]", dtarget)
    if return_grad:
        return result, cast("NDArray[Any]", grad)
    if return_target_grad:
        return result, cast("NDArray[Any]", dtarget)
    return result


def _target_grad(
    logits: NDArray[Any],
    axis: int,
    weight: NDArray[Any],
    smoothing: float,
    scale_array: NDArray[Any] | None,
    scale_all: float,
) -> NDArray[Any]:
    """d(loss)/d(target) of probability targets: -(1 - eps) w_c lsm_c, times the upstream
    gradient of each element (scale_array, along the non-class axes) and scale_all."""
    compute = weight.dtype
    lsm = _log_softmax(logits, axis, dtype=compute)
    shape = [1] * logits.ndim
    shape[axis] = -1
    factor = weight.reshape(shape) * compute.type(-(1.0 - smoothing) * scale_all)
    with np.errstate(invalid="ignore"):  # 0 * -inf = NaN, as autograd's product gives
        grad = lsm * factor
        if scale_array is not None:
            grad *= np.expand_dims(scale_array, axis)
    result: NDArray[Any] = grad.astype(logits.dtype, copy=False)
    return result
