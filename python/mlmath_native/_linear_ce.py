"""Fused linear + cross-entropy: the loss of ``hidden @ weight.T + bias`` and its gradients
without ever holding the logits (Note [fused linear cross-entropy] in kernels/linear_ce.cpp)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _core
from ._checks import as_float_array, as_input, check_size, deliver
from ._cross_entropy import _scalar, check_options

_FN = "linear_cross_entropy"


def _positive(fn: str, value: Any, name: str) -> float:
    number = _scalar(value, name, fn)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{fn}: {name} must be finite and > 0 (got {value!r})")
    return number


def check_scalar_options(
    fn: str,
    reduction: object,
    label_smoothing: object,
    ignore_index: object,
    z_loss: object,
    temperature: object,
    softcap: object,
    chunk_size: object,
) -> tuple[float, int, float, float, float | None, int | None]:
    """The scalar options checked (shared with mlmath_native.dask): label_smoothing,
    ignore_index, z_loss, temperature, softcap (None: none) and chunk_size (None: automatic)."""
    smoothing, index = check_options(fn, reduction, label_smoothing, ignore_index)
    z_coef = _scalar(z_loss, "z_loss", fn)
    if not (math.isfinite(z_coef) and z_coef >= 0):
        raise ValueError(f"{fn}: z_loss must be finite and >= 0 (got {z_loss!r})")
    tau = _positive(fn, temperature, "temperature")
    cap = None if softcap is None else _positive(fn, softcap, "softcap")
    chunk = None
    if chunk_size is not None:
        chunk = int(_scalar(chunk_size, "chunk_size", fn))
        if chunk != chunk_size or chunk < 1:
            raise ValueError(f"{fn}: chunk_size must be a positive integer (got {chunk_size!r})")
    return smoothing, index, z_coef, tau, cap, chunk


def check_grad_output_shape(
    fn: str, reduction: str, shape: tuple[int, ...], lead_shape: tuple[int, ...]
) -> None:
    """grad_output: a scalar, or for reduction="none" also the loss's (hidden's leading) shape."""
    if reduction == "none":
        if len(shape) != 0 and shape != lead_shape:
            raise ValueError(
                f"{fn}: grad_output has shape {shape} (expected the loss's shape "
                f"{lead_shape} or a scalar)"
            )
    elif len(shape) != 0:
        raise ValueError(
            f"{fn}: grad_output must be a scalar for reduction={reduction!r} (got shape {shape})"
        )


def _matrix(x: ArrayLike, name: str, dtype: np.dtype[Any] | None) -> NDArray[Any]:
    """A 2-D operand in the common dtype, with strides the kernel takes (non-negative whole
    elements; anything else is copied)."""
    arr = as_float_array(x, _FN, name) if dtype is None else as_input(x, _FN, name)
    if dtype is not None and arr.dtype != dtype:
        arr = arr.astype(dtype)
    if any(s < 0 or s % arr.itemsize for s in arr.strides):
        arr = np.ascontiguousarray(arr)
    return arr


def _grad_scales(
    reduction: str,
    grad_output: ArrayLike | None,
    lead_shape: tuple[int, ...],
    ce_denominator: float,
    count: int,
    compute: np.dtype[Any],
) -> tuple[NDArray[Any] | None, float, float]:
    """The upstream gradient as (per-token scales or None, the cross-entropy scale of every
    token, the z-loss scale of every token): d(loss)/d(ce_n) and d(loss)/d(z_loss lse_n^2)."""
    g: Any = 1.0
    if grad_output is not None:
        g = as_float_array(grad_output, _FN, "grad_output")
        check_grad_output_shape(_FN, reduction, g.shape, lead_shape)
    if np.ndim(g) != 0:
        return np.asarray(g, dtype=compute).reshape(-1), 0.0, 0.0
    scale = float(g)
    if reduction != "mean":
        return None, scale, scale
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0: NaN, as in PyTorch
        ce = float(np.float64(scale) / np.float64(ce_denominator))
        z = float(np.float64(scale) / np.float64(count))
    return None, ce, z


def linear_cross_entropy(
    hidden: ArrayLike,
    weight: ArrayLike,
    target: ArrayLike,
    bias: ArrayLike | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    weight_classes: ArrayLike | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    return_grad: bool = False,
    return_logprobs: bool = False,
    return_entropy: bool = False,
    grad_output: ArrayLike | None = None,
    chunk_size: int | None = None,
    grads_out: tuple[Any, Any, Any] | None = None,
) -> Any:
    """Cross-entropy of the logits ``softcap(hidden @ weight.T + bias) / temperature``, fused:
    the logits are computed a chunk of tokens at a time and never held whole.

    Exactly ``F.cross_entropy(x, target, weight=weight_classes, ignore_index=...,
    reduction=..., label_smoothing=...)`` with ``x = softcap * tanh(z / softcap) / temperature``
    (no tanh when softcap is None), plus PaLM's z-loss ``z_loss * lse^2`` per token that is not
    ignored (lse = logsumexp(x); averaged over those tokens for "mean", summed for "sum").

    Parameters
    ----------
    hidden : array_like, shape (..., D)
        Hidden states; the leading axes are the tokens (flattened to N).
    weight : array_like, shape (V, D)
        The output layer's weight, as in ``torch.nn.Linear``.
    target : array_like of int, shape (...)
        Class indices in [0, V), or ``ignore_index``.
    bias : array_like, shape (V,), optional
    ignore_index, reduction, label_smoothing
        As ``F.cross_entropy``; "mean" over all-ignored tokens is NaN, as in PyTorch.
    weight_classes : array_like, shape (V,), optional
        Class weights (``F.cross_entropy``'s ``weight``).
    z_loss : float, optional
        Weight of the z-loss, finite and >= 0.
    softcap : float, optional
        Caps the logits to (-softcap, softcap) with ``softcap * tanh(z / softcap)``.
    temperature : float, optional
        Divides the (capped) logits; finite and > 0.
    return_grad : bool, optional
        Also return ``(d_hidden, d_weight, d_bias)`` (d_bias None without a bias): the
        gradients of the loss times ``grad_output``, in the inputs' dtype.
    return_logprobs : bool, optional
        Also return log p(target) per token (0 for ignored tokens).
    return_entropy : bool, optional
        Also return each token's entropy ``-sum_c p_c log p_c`` (every token; a forward value:
        the gradients are the loss's alone).
    grad_output : array_like, optional
        The upstream gradient: a scalar ("mean", "sum"), or the loss's shape ("none").
    chunk_size : int, optional
        Tokens per chunk (default: as many as fit 64 MiB of float32 logits; at least 256 while
        their logits fit 256 MiB, so for vocabularies up to 262144; at least 16).
    grads_out : (d_hidden, d_weight, d_bias), optional
        With ``return_grad=True``: arrays to write the gradients into (NumPy's tuple form of
        ``out``; each exactly its gradient's shape and dtype, or None), checked before any is
        written.

    Returns
    -------
    The loss alone (a scalar, or per token for "none"), or the tuple
    ``(loss, [grads], [logprobs], [entropy])`` with the parts asked for.  float32 for
    float32, bfloat16 and float16 inputs (16-bit inputs compute in float32 and round their
    gradients once); float64 for float64 (and integer) inputs.

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> hidden = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> weight = np.array([[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    >>> print(np.round(mn.linear_cross_entropy(hidden, weight, [0, 2], reduction="none"), 4))
    [0.2395 1.0986]
    """
    if grads_out is not None and not return_grad:
        raise ValueError(f"{_FN}: grads_out receives the gradients: it needs return_grad=True")
    smoothing, ignore_index, z_coef, tau, cap, chunk = check_scalar_options(
        _FN, reduction, label_smoothing, ignore_index, z_loss, temperature, softcap, chunk_size
    )

    h = as_float_array(hidden, _FN, "hidden")
    if h.ndim == 0:
        raise ValueError(f"{_FN}: hidden is 0-d (expected shape (..., D))")
    dtype = h.dtype
    compute = np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)
    lead_shape, d = h.shape[:-1], h.shape[-1]
    h2 = _matrix(h.reshape(-1, d), "hidden", dtype)
    n = h2.shape[0]
    w = as_input(weight, _FN, "weight")
    if w.ndim != 2 or w.shape[1] != d:
        raise ValueError(
            f"{_FN}: weight has shape {w.shape} but hidden has D = {d} (expected (V, {d}))"
        )
    as_float_array(w[:0], _FN, "weight")  # a TypeError for non-numeric weights
    w = _matrix(w, "weight", dtype)
    v = w.shape[0]
    if v == 0:
        raise ValueError(f"{_FN}: weight has no rows (expected V >= 1 classes)")
    check_size(_FN, "the products", (n, v, max(d, 1)))
    b = None
    if bias is not None:
        b = np.ascontiguousarray(as_float_array(bias, _FN, "bias"), dtype=dtype)
        if b.shape != (v,):
            raise ValueError(f"{_FN}: bias has shape {b.shape} (expected ({v},))")
    if weight_classes is None:
        cw = np.ones(v, compute)
    else:
        cw = np.ascontiguousarray(as_float_array(weight_classes, _FN, "weight_classes"), compute)
        if cw.shape != (v,):
            raise ValueError(f"{_FN}: weight_classes has shape {cw.shape} (expected ({v},))")

    t = as_input(target, _FN, "target")
    if t.dtype.kind not in "iu":
        raise TypeError(f"{_FN}: target has dtype {t.dtype} (expected integer class indices)")
    if t.shape != lead_shape:
        raise ValueError(
            f"{_FN}: target has shape {t.shape} (expected {lead_shape}, hidden's leading shape)"
        )
    t = np.ascontiguousarray(t.reshape(-1), dtype=np.int64)
    active = t != ignore_index
    bad = active & ((t < 0) | (t >= v))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{_FN}: target holds {t[i]} at flat position {i} but there are {v} classes"
        )
    count = int(active.sum())
    ce_denominator = float(cw.astype(np.float64)[t[active]].sum())
    scale_array, ce_scale, z_scale = _grad_scales(
        reduction, grad_output, lead_shape, ce_denominator, count, compute
    )

    loss = np.zeros(n, compute)
    lse = np.zeros(n, compute)
    logprobs = np.zeros(n, compute) if return_logprobs else None
    entropy = np.zeros(n, compute) if return_entropy else None
    d_hidden = d_weight = d_bias = None
    if return_grad:
        d_hidden = np.zeros((n, d), dtype)
        d_weight = np.zeros((v, d), dtype)
        d_bias = np.zeros(v, dtype) if b is not None else None
    z_array = None if scale_array is None else z_coef * scale_array
    _core.linear_cross_entropy_into(
        h2,
        w,
        b,
        t,
        cw,
        ignore_index,
        smoothing,
        0.0 if cap is None else cap,
        1.0 / tau,
        chunk or 0,
        loss,
        lse,
        logprobs,
        entropy,
        d_hidden,
        d_weight,
        d_bias,
        scale_array,
        ce_scale,
        z_array,
        z_coef * z_scale,
    )
    z_terms = np.where(active, lse.astype(np.float64) ** 2, 0.0) if z_coef else None
    if reduction == "none":
        total = loss.astype(np.float64)
        if z_terms is not None:
            total = total + z_coef * z_terms
        result: Any = total.astype(compute).reshape(lead_shape)
    else:
        value = loss.sum(dtype=np.float64)
        zl = z_coef * z_terms.sum() if z_terms is not None else 0.0
        if reduction == "mean":
            with np.errstate(divide="ignore", invalid="ignore"):
                value = value / ce_denominator if ce_denominator != 0 else np.float64(np.nan)
                if z_terms is not None:
                    zl = zl / count if count else np.float64(np.nan)
        result = compute.type(value + zl)
    if not (return_grad or return_logprobs or return_entropy):
        return result
    out: list[Any] = [result]
    if return_grad:
        assert d_hidden is not None
        grads: tuple[Any, ...] = (d_hidden.reshape(h.shape), d_weight, d_bias)
        if grads_out is not None:
            grads = deliver(_FN, grads, grads_out, "grads_out")
        out.append(grads)
    if logprobs is not None:
        out.append(logprobs.reshape(lead_shape))
    if entropy is not None:
        out.append(entropy.reshape(lead_shape))
    return tuple(out)
