"""Scale-out on Dask: the softmax family, cross-entropy, fused linear + cross-entropy and
attention on ``dask.array`` inputs.

Each function builds a lazy Dask graph whose tasks call the in-memory kernels of
:mod:`mlmath_native` on one block each (``map_blocks`` / ``blockwise``); reductions are
per-block partial sums followed by an ordinary Dask ``sum``.  There is no scheduler of our own:
``.compute()`` runs on whatever Dask scheduler is active (the threaded one by default, or a
``dask.distributed`` cluster).  Every kernel releases the GIL, so Dask's threads run blocks in
parallel.

Chunking rules (the rest of the chunking is kept):

- ``softmax`` / ``log_softmax``: the ``axis`` being normalised is rechunked to one chunk (as
  Dask's own reductions along an axis do); the other axes may be chunked in any way.
- ``cross_entropy``: the class axis of the logits (and of probability targets) is rechunked to
  one chunk; the targets' chunks are aligned with the logits' other axes (Dask's usual
  ``blockwise`` alignment).
- ``linear_cross_entropy``: the rows (tokens) of ``hidden`` (..., D) keep their chunks along
  the leading axes and D is rechunked to one chunk; ``target`` (and a per-token
  ``grad_output``) is rechunked to hidden's leading chunks; ``weight``, ``bias`` and
  ``weight_classes`` are one chunk, read whole by every block.  The weight's gradients are sums
  over the blocks.
- ``attention``: the sequence axes (Lq, Lk) and feature axes (D, Dv) are rechunked to one chunk;
  batch and head axes may be chunked.  Batch chunks follow q (or the first of k, v, mask with
  the full batch size there); the others are rechunked to them, and size-1 (broadcast) batch
  axes stay as they are.  q keeps its head chunks.  With grouped-query attention (Hq = g * Hkv)
  k and v are rechunked to q's head chunks divided by g when every chunk of q's head axis is
  a multiple of g (whole groups per block); otherwise (e.g. multi-query attention with chunked
  query heads) k and v become one chunk along their head axis and every block reads the kv
  heads it needs from it.

This module needs Dask (``pip install "mlmath_native[dask]"``); ``import mlmath_native`` does
not import it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

try:
    import dask.array as da
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        'mlmath_native.dask needs Dask: install it with pip install "mlmath_native[dask]" '
        f'(or pip install "dask[array]"); the import failed with: {exc}'
    ) from exc

from . import _attention, _cross_entropy, _linear_ce
from . import attention as _attention_np
from . import cross_entropy as _cross_entropy_np
from . import linear_cross_entropy as _linear_ce_np
from . import log_softmax as _log_softmax_np
from . import softmax as _softmax_np
from ._checks import (
    FLOAT_DTYPES,
    as_float_array,
    as_input,
    check_size,
    compute_dtype,
    is_bfloat16,
    normalize_axis,
)

__all__ = ["attention", "cross_entropy", "linear_cross_entropy", "log_softmax", "softmax"]

_REDUCTIONS = ("none", "mean", "sum")
#: Note [dropout hash] (src/cpp/kernels/attention.cpp, reference.transformer_attention):
#: key = mix(seed ^ (bh * _BH_MUL)) for the flat (batch, query head) index bh.
_BH_MUL = 0x9E3779B97F4A7C15
_U64 = (1 << 64) - 1


# --- argument checks ------------------------------------------------------------------------


def _as_dask(x: Any, fn: str, name: str, *, real: bool = True) -> da.Array:
    """``x`` as a dask array of known shape; with ``real``, float32/float64/float16/bfloat16
    kept and other real dtypes (bool, integers) converted to float64, like the in-memory API
    (:func:`~mlmath_native._checks.compute_dtype`)."""
    if not isinstance(x, da.Array):
        try:
            x = da.asarray(np.asarray(x))
        except (ValueError, TypeError) as exc:
            raise TypeError(f"{fn}: {name} could not be converted to an array ({exc})") from None
    if any(math.isnan(n) for n in x.shape):
        raise ValueError(
            f"{fn}: {name} has unknown chunk sizes (shape {x.shape}); call "
            f"{name}.compute_chunk_sizes() first"
        )
    if real:
        x = x.astype(compute_dtype(fn, name, x.dtype), copy=False)
    return x


def _meta(ndim: int, dtype: Any) -> NDArray[Any]:
    return np.empty((0,) * ndim, dtype)


# --- softmax family -------------------------------------------------------------------------


def _softmax_block(block: NDArray[Any], axis: int, log: bool) -> NDArray[Any]:
    return (_log_softmax_np if log else _softmax_np)(block, axis)


def _softmax_like(x: Any, axis: int, log: bool) -> da.Array:
    fn = "dask.log_softmax" if log else "dask.softmax"
    x = _as_dask(x, fn, "x")
    axis = normalize_axis(axis, x.ndim, fn)
    if x.ndim:
        x = x.rechunk({axis: -1})
    return x.map_blocks(
        _softmax_block, axis=axis, log=log, dtype=x.dtype, meta=_meta(x.ndim, x.dtype)
    )


def softmax(x: ArrayLike | da.Array, axis: int = -1) -> da.Array:
    """Softmax along ``axis`` on a dask array, block by block with :func:`mlmath_native.softmax`.

    ``axis`` is rechunked to one chunk (each slice must be in one block); the other axes keep
    their chunks.  The result is lazy, with the input's shape and (rechunked) chunks; float32
    stays float32, float64 stays float64, other real dtypes compute in float64.  Bad dtypes and
    axes raise at once (``TypeError``, ``numpy.exceptions.AxisError``), before anything is
    computed.

    Examples
    --------
    >>> import dask.array as da, numpy as np, mlmath_native as mn
    >>> import mlmath_native.dask as mnd
    >>> x = da.from_array(np.zeros((4, 3)), chunks=(2, 1))
    >>> y = mnd.softmax(x)
    >>> y.chunks
    ((2, 2), (3,))
    >>> print(y.compute(scheduler="threads")[0])
    [0.33333333 0.33333333 0.33333333]
    """
    return _softmax_like(x, axis, log=False)


def log_softmax(x: ArrayLike | da.Array, axis: int = -1) -> da.Array:
    """Log-softmax along ``axis`` on a dask array (chunking and dtypes as :func:`softmax`).

    Examples
    --------
    >>> import dask.array as da, numpy as np, mlmath_native.dask as mnd
    >>> x = da.from_array(np.zeros((4, 2)), chunks=2)
    >>> print(mnd.log_softmax(x, axis=1).compute()[0])
    [-0.69314718 -0.69314718]
    """
    return _softmax_like(x, axis, log=True)


# --- cross-entropy --------------------------------------------------------------------------


def _ce_block(
    logits: NDArray[Any],
    target: NDArray[Any],
    weight: NDArray[Any],
    *starts: NDArray[Any],
    axis: int,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    index_target: bool,
) -> NDArray[Any]:
    """One block: per-element losses ("none"), or [loss sum, denominator] in float64 shaped
    (1, ..., 1, 2) for the partial sums of "sum"/"mean"."""
    num_classes = logits.shape[axis]
    if index_target:
        with np.errstate(invalid="ignore"):
            bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
        if bad.any():  # name the position in the whole array, not in this block
            flat = int(np.flatnonzero(bad.ravel())[0])
            local = np.unravel_index(flat, target.shape)
            position = tuple(int(i) + int(s[0]) for i, s in zip(local, starts, strict=True))
            raise ValueError(
                f"dask.cross_entropy: target holds {target.ravel()[flat]} at position "
                f"{position} but there are {num_classes} classes (expected 0 <= target < "
                f"{num_classes} or target == ignore_index {ignore_index})"
            )
    loss = _cross_entropy_np(
        logits,
        target,
        axis=axis,
        weight=weight,
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=label_smoothing,
    )
    if reduction == "none":
        return loss
    total = loss.sum(dtype=np.float64)
    if index_target:
        valid = target != ignore_index
        denominator = weight.astype(np.float64)[target[valid]].sum()
    else:
        denominator = float(loss.size)
    part = np.empty((1,) * loss.ndim + (2,), np.float64)
    part[..., 0], part[..., 1] = total, denominator
    return part


def _ce_finish(totals: NDArray[Any], mean: bool, out_dtype: np.dtype[Any]) -> NDArray[Any]:
    """[loss sum, denominator] -> the loss, as a 0-d array in the logits' dtype."""
    total, denominator = float(totals[0]), float(totals[1])
    if mean:
        total = total / denominator if denominator != 0 else math.nan
    return np.asarray(total, dtype=out_dtype)


def cross_entropy(
    logits: ArrayLike | da.Array,
    target: ArrayLike | da.Array,
    *,
    axis: int = -1,
    weight: ArrayLike | da.Array | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> da.Array:
    """Cross-entropy on dask arrays: :func:`mlmath_native.cross_entropy` block by block, with
    the reduction taken over all blocks.

    Same definition and options as the in-memory function (``axis=1`` is PyTorch's
    (N, C, d1, ...) layout; index or probability targets; ``weight``; ``ignore_index``;
    ``label_smoothing``), without ``return_grad``.  ``reduction="mean"`` divides the sum of all
    blocks' losses by the sum over **all** blocks of the weights w_t of the targets that are not
    ignored (index targets) or by the element count (probability targets), exactly as PyTorch;
    if every target is ignored the mean is NaN.  Partial sums are float64 (one per block), added
    with Dask's ``sum``.

    The class axis is rechunked to one chunk; the targets are aligned with the logits' other
    chunks.  ``weight`` may be a NumPy or dask array.  Returns a lazy array: the per-element
    losses (``"none"``, the logits' chunks without the class axis) or a 0-d array in the
    logits' compute dtype (float32 for float16 and bfloat16 logits; ``.compute()`` gives a 0-d
    NumPy array).

    Raises
    ------
    TypeError, ValueError
        At once, naming the argument: dtypes, shapes, axis, reduction, label_smoothing,
        ignore_index (as the in-memory function).  A label outside [0, C) that is neither
        ``ignore_index`` raises ``ValueError`` (naming its position in the whole array) when
        the graph is computed, since the labels are only known then.

    Examples
    --------
    >>> import dask.array as da, numpy as np, mlmath_native.dask as mnd
    >>> logits = da.from_array(np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), chunks=(1, 2))
    >>> target = da.from_array(np.array([0, 2]), chunks=1)
    >>> loss = mnd.cross_entropy(logits, target)
    >>> round(float(loss.compute()), 6)
    0.669079
    >>> mnd.cross_entropy(logits, target, reduction="none").chunks
    ((1, 1),)
    """
    fn = "dask.cross_entropy"
    logits = _as_dask(logits, fn, "logits")
    dtype = logits.dtype  # probabilities are read in it; weights and losses in its compute dtype
    loss_dtype = np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)
    axis = _cross_entropy.check_logits(fn, logits.shape, axis)
    label_smoothing, ignore_index = _cross_entropy.check_options(
        fn, reduction, label_smoothing, ignore_index
    )

    num_classes = logits.shape[axis]
    elem_shape = logits.shape[:axis] + logits.shape[axis + 1 :]
    logits = logits.rechunk({axis: -1})
    elem_chunks = logits.chunks[:axis] + logits.chunks[axis + 1 :]
    ind = tuple(range(logits.ndim))
    elem_ind = ind[:axis] + ind[axis + 1 :]

    if not isinstance(target, da.Array):
        target = np.asarray(target)
        kind = target.dtype.kind
        chunks = elem_chunks if kind in "iu" and target.shape == elem_shape else "auto"
        if (kind == "f" or is_bfloat16(target.dtype)) and target.shape == logits.shape:
            chunks = logits.chunks
        target = da.from_array(target, chunks=chunks)
    target = _as_dask(target, fn, "target", real=False)
    index_target = _cross_entropy.check_target(fn, target, logits.shape, axis, ignore_index)
    if index_target:
        target_ind = elem_ind
    else:
        target = target.astype(dtype).rechunk({axis: -1})
        target_ind = ind

    if weight is None:
        weight = da.ones(num_classes, dtype=loss_dtype, chunks=-1)
    else:
        weight = _as_dask(weight, fn, "weight")
        _cross_entropy.check_weight(fn, weight.shape, num_classes)
        weight = weight.astype(loss_dtype).rechunk(-1)

    # the first global index of each block along each target axis (for error messages)
    starts = []
    if index_target:
        for i, n, c in zip(elem_ind, elem_shape, elem_chunks, strict=True):
            starts += [da.arange(n, chunks=(c,)), (i,)]

    options = dict(
        axis=axis,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
        index_target=index_target,
    )
    args = (logits, ind, target, target_ind, weight, (axis,), *starts)
    if reduction == "none":
        return da.blockwise(
            _ce_block,
            elem_ind,
            *args,
            concatenate=True,
            dtype=loss_dtype,
            meta=_meta(len(elem_ind), loss_dtype),
            **options,
        )
    new = logits.ndim  # an index that no input uses
    parts = da.blockwise(
        _ce_block,
        elem_ind + (new,),
        *args,
        new_axes={new: 2},
        adjust_chunks={i: 1 for i in elem_ind},
        concatenate=True,
        dtype=np.float64,
        meta=_meta(len(elem_ind) + 1, np.float64),
        **options,
    )
    totals = parts.sum(axis=tuple(range(len(elem_ind))), dtype=np.float64).rechunk(-1)
    return totals.map_blocks(
        _ce_finish,
        mean=reduction == "mean",
        out_dtype=loss_dtype,
        dtype=loss_dtype,
        drop_axis=0,
        meta=_meta(0, loss_dtype),
    )


# --- fused linear + cross-entropy -----------------------------------------------------------

_LCE = "dask.linear_cross_entropy"
#: the positions in the tuple that every block of linear_cross_entropy returns
_LOSS, _D_HIDDEN, _D_WEIGHT, _D_BIAS, _LOGPROBS, _ENTROPY = range(6)


def _lce_whole(x: Any, name: str) -> da.Array:
    """``x`` (NumPy or Dask, dtype kept) as a dask array of one chunk: it goes whole to every
    block."""
    if isinstance(x, da.Array):
        return _as_dask(x, _LCE, name, real=False).rechunk(-1)
    return da.from_array(as_input(x, _LCE, name), chunks=-1)


def _lce_check_targets(
    target: NDArray[Any],
    starts: tuple[NDArray[Any], ...],
    num_classes: int,
    ignore_index: int,
    lead_shape: tuple[int, ...],
) -> None:
    """ValueError naming the first label of this block outside [0, V) that is not
    ``ignore_index``, by its flat position in the whole target (the in-memory message)."""
    with np.errstate(invalid="ignore"):
        bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bad.any():
        local = np.unravel_index(int(np.flatnonzero(bad.ravel())[0]), target.shape)
        index = tuple(int(i) + int(s[0]) for i, s in zip(local, starts, strict=True))
        flat = int(np.ravel_multi_index(index, lead_shape)) if lead_shape else 0
        raise ValueError(
            f"{_LCE}: target holds {target[local]} at flat position {flat} but there are "
            f"{num_classes} classes"
        )


def _lce_denominators(
    target: NDArray[Any],
    class_weights: NDArray[Any] | None,
    *starts: NDArray[Any],
    num_classes: int,
    ignore_index: int,
    lead_shape: tuple[int, ...],
) -> NDArray[Any]:
    """One block of targets: [sum of w[t], count] over its tokens that are not ignored, in
    float64, shaped (1, ..., 1, 2)."""
    _lce_check_targets(target, starts, num_classes, ignore_index, lead_shape)
    labels = target[target != ignore_index]
    part = np.empty((1,) * target.ndim + (2,), np.float64)
    part[..., 1] = labels.size
    if class_weights is None:
        part[..., 0] = labels.size
    else:
        part[..., 0] = class_weights.astype(np.float64)[labels].sum()
    return part


def _lce_block(
    hidden: NDArray[Any],
    target: NDArray[Any],
    weight: NDArray[Any],
    bias: NDArray[Any] | None,
    class_weights: NDArray[Any] | None,
    grad: Any,
    totals: NDArray[Any] | None,
    *starts: NDArray[Any],
    num_classes: int,
    ignore_index: int,
    lead_shape: tuple[int, ...],
    reduction: str,
    z_loss: float,
    work_dtype: np.dtype[Any],
    options: dict[str, Any],
) -> tuple[Any, ...]:
    """One block of tokens: :func:`mlmath_native.linear_cross_entropy` on its rows, once.

    Returns (loss, d_hidden, d_weight, d_bias, logprobs, entropy), None where not asked for;
    the loss is per token ("none") or this block's sum as a float ("sum"; for "mean" the sum
    rescaled by the global denominators ``totals`` = [sum of w[t], count], see
    :func:`linear_cross_entropy`)."""
    _lce_check_targets(target, starts, num_classes, ignore_index, lead_shape)
    if reduction == "mean":
        assert totals is not None
        ce_denominator, count = float(totals[0]), float(totals[1])
        scale = 1.0 if grad is None else float(grad)
        with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0: NaN, as in-memory
            grad = np.float64(scale) / np.float64(ce_denominator)
        z_loss = z_loss * ce_denominator / count if count else 0.0
        if not math.isfinite(z_loss):  # non-finite class weights: the loss is NaN anyway
            z_loss = 0.0
    result = _linear_ce_np(
        hidden if hidden.dtype == work_dtype else hidden.astype(work_dtype),
        weight,
        target,
        bias,
        ignore_index=ignore_index,
        reduction="sum" if reduction == "mean" else reduction,
        weight_classes=class_weights,
        z_loss=z_loss,
        grad_output=grad,
        **options,
    )
    outputs = list(result) if isinstance(result, tuple) else [result]
    loss = outputs.pop(0)
    d_hidden = d_weight = d_bias = logprobs = entropy = None
    if options["return_grad"]:
        d_hidden, d_weight, d_bias = outputs.pop(0)
        d_hidden = d_hidden.astype(hidden.dtype, copy=False)  # 16-bit: rounded once, here
    if options["return_logprobs"]:
        logprobs = outputs.pop(0)
    if options["return_entropy"]:
        entropy = outputs.pop(0)
    if reduction != "none":
        loss = float(loss)
    return loss, d_hidden, d_weight, d_bias, logprobs, entropy


def _lce_pick(parts: tuple[Any, ...], index: int) -> Any:
    return parts[index]


def _lce_partial(parts: tuple[Any, ...], index: int, ndim: int) -> NDArray[Any]:
    """A block's term of a sum over blocks (the loss, d_weight or d_bias) with ``ndim`` leading
    axes of length 1 (one entry per block along the token axes)."""
    term = np.asarray(parts[index])
    return term.reshape((1,) * ndim + term.shape)


def _lce_finish(
    total: NDArray[Any], totals: NDArray[Any] | None, out_dtype: np.dtype[Any]
) -> NDArray[Any]:
    """The sum of the blocks' losses -> the loss ("mean": divided by the sum of w[t])."""
    value = float(total)
    if totals is not None:
        denominator = float(totals[0])
        value = value / denominator if denominator != 0 else math.nan
    return np.asarray(value, dtype=out_dtype)


def linear_cross_entropy(
    hidden: ArrayLike | da.Array,
    weight: ArrayLike | da.Array,
    target: ArrayLike | da.Array,
    bias: ArrayLike | da.Array | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    weight_classes: ArrayLike | da.Array | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    return_grad: bool = False,
    return_logprobs: bool = False,
    return_entropy: bool = False,
    grad_output: ArrayLike | da.Array | None = None,
    chunk_size: int | None = None,
) -> Any:
    """Fused linear + cross-entropy on the rows of a chunked ``hidden``:
    :func:`mlmath_native.linear_cross_entropy` on each block of tokens, with the reduction and
    the weight's gradients summed over all blocks.

    Same definition, options, return order and forms as the in-memory function (``hidden``
    (..., D), ``weight`` (V, D), ``bias`` (V,), ``target`` of hidden's leading shape;
    ``label_smoothing``, ``weight_classes``, ``z_loss``, ``softcap``, ``temperature``,
    ``ignore_index``, ``grad_output``, ``chunk_size`` per block).  ``hidden`` may be chunked
    along its token (leading) axes in any way; its last axis D is rechunked to one chunk.
    ``weight``, ``bias`` and ``weight_classes`` go whole to every block (NumPy arrays, or dask
    arrays rechunked to one chunk).  ``target`` (and a per-token ``grad_output`` for "none")
    is rechunked to hidden's leading chunks.

    Every block makes one call of the in-memory function, which gives all of its outputs:
    compute the outputs you need together (``dask.compute(loss, d_weight)``) so that the
    blocks run once.  With ``reduction="none"`` the call is per token.  With "sum" each block
    returns its sum (float64 partials, added with Dask's ``sum``).  "mean" needs the global
    denominators first: W = sum of w[t] and K = the count over the tokens that are not ignored,
    computed from ``target`` and ``weight_classes`` alone (a cheap reduction every block
    waits for).  Each block then calls the in-memory function with ``reduction="sum"``,
    ``grad_output=g / W`` and ``z_loss=z_loss * W / K``: its loss is W times its share of
    ``sum ce / W + z_loss * sum lse^2 / K`` and its gradients are exactly the mean's (the
    cross-entropy and z-loss terms scaled by 1/W and 1/K), so the mean is the sum of the
    blocks' sums divided by W (NaN when W is 0, e.g. every token ignored, as in-memory).

    Returns
    -------
    The loss alone, or the tuple ``(loss, [(d_hidden, d_weight, d_bias)], [logprobs],
    [entropy])`` with the parts asked for, all lazy dask arrays: the loss per token ("none":
    hidden's leading shape and chunks) or 0-d ("sum", "mean"); d_hidden chunked like
    ``hidden``; d_weight (V, D) and d_bias (V,) (None without a bias) of one chunk, summed over
    the blocks with Dask's tree reduction (a fixed order: the same graph gives the same bits);
    logprobs and entropy per token.  dtypes as in-memory (losses float32 for float32 and 16-bit
    inputs, float64 for float64; gradients in hidden's dtype).  16-bit inputs compute in
    float32 per block (the weight is converted once) and their d_weight and d_bias are summed
    in float32, then rounded once.

    Raises
    ------
    TypeError, ValueError
        At once, as the in-memory function (prefixed ``dask.linear_cross_entropy:``): dtypes,
        shapes (D, V, target, grad_output), options.  A label outside [0, V) that is not
        ``ignore_index`` raises ``ValueError`` naming its flat position in the whole target
        when the graph is computed.

    Examples
    --------
    >>> import dask.array as da, numpy as np, mlmath_native as mn, mlmath_native.dask as mnd
    >>> rng = np.random.default_rng(0)
    >>> hidden, weight = rng.standard_normal((6, 4)), rng.standard_normal((5, 4))
    >>> target = np.array([0, 1, -100, 3, 4, 2])
    >>> loss, (d_hidden, d_weight, _) = mnd.linear_cross_entropy(
    ...     da.from_array(hidden, chunks=(2, 4)), weight, target, return_grad=True)
    >>> d_hidden.chunks
    ((2, 2, 2), (4,))
    >>> np.allclose(loss.compute(), mn.linear_cross_entropy(hidden, weight, target))
    True
    """
    fn = _LCE
    smoothing, ignore_index, z_coef, tau, cap, chunk = _linear_ce.check_scalar_options(
        fn, reduction, label_smoothing, ignore_index, z_loss, temperature, softcap, chunk_size
    )

    h = _as_dask(hidden, fn, "hidden")
    if h.ndim == 0:
        raise ValueError(f"{fn}: hidden is 0-d (expected shape (..., D))")
    dtype = h.dtype
    loss_dtype = np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)
    work_dtype = dtype if dtype in FLOAT_DTYPES else np.dtype(np.float32)  # 16-bit: float32
    lead_shape = tuple(int(n) for n in h.shape[:-1])
    d = int(h.shape[-1])
    h = h.rechunk({h.ndim - 1: -1})
    lead_chunks = h.chunks[:-1]
    nl = len(lead_shape)

    w = _lce_whole(weight, "weight")
    if w.ndim != 2 or w.shape[1] != d:
        raise ValueError(
            f"{fn}: weight has shape {w.shape} but hidden has D = {d} (expected (V, {d}))"
        )
    w = w.astype(compute_dtype(fn, "weight", w.dtype)).astype(work_dtype)
    v = int(w.shape[0])
    if v == 0:
        raise ValueError(f"{fn}: weight has no rows (expected V >= 1 classes)")
    check_size(fn, "the products", (math.prod(lead_shape), v, max(d, 1)))
    b = None
    if bias is not None:
        b = _lce_whole(bias, "bias")
        b = b.astype(compute_dtype(fn, "bias", b.dtype))
        if b.shape != (v,):
            raise ValueError(f"{fn}: bias has shape {b.shape} (expected ({v},))")
        b = b.astype(work_dtype)
    cw = None
    if weight_classes is not None:
        cw = _lce_whole(weight_classes, "weight_classes")
        cw = cw.astype(compute_dtype(fn, "weight_classes", cw.dtype))
        if cw.shape != (v,):
            raise ValueError(f"{fn}: weight_classes has shape {cw.shape} (expected ({v},))")
        cw = cw.astype(loss_dtype)

    t: Any  # a dask array, or a NumPy one until it has been checked
    if isinstance(target, da.Array):
        t = _as_dask(target, fn, "target", real=False)
    else:
        t = as_input(target, fn, "target")
    if t.dtype.kind not in "iu":
        raise TypeError(f"{fn}: target has dtype {t.dtype} (expected integer class indices)")
    if t.shape != lead_shape:
        raise ValueError(
            f"{fn}: target has shape {t.shape} (expected {lead_shape}, hidden's leading shape)"
        )
    t = t.rechunk(lead_chunks) if isinstance(t, da.Array) else da.from_array(t, lead_chunks)

    lead_ind = tuple(range(nl))
    DI, VI, KI = nl, nl + 1, nl + 2  # noqa: N806 - the D, V and [W, K] axes
    g_arg: Any = None
    g_ind: tuple[int, ...] | None = None
    if grad_output is not None:
        g: Any
        if isinstance(grad_output, da.Array):
            g = _as_dask(grad_output, fn, "grad_output")
        else:
            g = as_float_array(grad_output, fn, "grad_output")
        _linear_ce.check_grad_output_shape(fn, reduction, g.shape, lead_shape)
        if g.ndim != 0:  # per token: chunked as the tokens
            g_ind = lead_ind
            g_arg = (
                g.rechunk(lead_chunks) if isinstance(g, da.Array) else da.from_array(g, lead_chunks)
            )
        elif isinstance(g, da.Array):
            g_arg, g_ind = g, ()
        else:
            g_arg = float(g)

    # the first global index of each block along each token axis (for error messages)
    starts: list[Any] = []
    for i, (n, c) in enumerate(zip(lead_shape, lead_chunks, strict=True)):
        starts += [da.arange(n, chunks=(c,)), (i,)]
    checks = dict(num_classes=v, ignore_index=ignore_index, lead_shape=lead_shape)
    cw_arg = (cw, (VI,)) if cw is not None else (None, None)

    totals = None
    if reduction == "mean":  # [W, K]: they depend on the targets and class weights alone
        dens = da.blockwise(
            _lce_denominators,
            lead_ind + (KI,),
            t,
            lead_ind,
            *cw_arg,
            *starts,
            new_axes={KI: 2},
            adjust_chunks={i: 1 for i in lead_ind},
            concatenate=True,
            dtype=np.float64,
            meta=_meta(nl + 1, np.float64),
            **checks,
        )
        totals = dens.sum(axis=lead_ind, dtype=np.float64).rechunk(-1) if nl else dens
    options = dict(
        label_smoothing=smoothing,
        softcap=cap,
        temperature=tau,
        chunk_size=chunk,
        return_grad=bool(return_grad),
        return_logprobs=bool(return_logprobs),
        return_entropy=bool(return_entropy),
    )
    parts = da.blockwise(  # a tuple per block: never computed itself, only picked from
        _lce_block,
        lead_ind,
        h,
        lead_ind + (DI,),
        t,
        lead_ind,
        w,
        (VI, DI),
        *((b, (VI,)) if b is not None else (None, None)),
        *cw_arg,
        g_arg,
        g_ind,
        *((totals, (KI,)) if totals is not None else (None, None)),
        *starts,
        concatenate=True,
        dtype=object,
        meta=_meta(nl, object),
        reduction=reduction,
        z_loss=z_coef,
        work_dtype=work_dtype,
        options=options,
        **checks,
    )

    def per_token(index: int, out_dtype: np.dtype[Any]) -> da.Array:
        return da.blockwise(
            _lce_pick,
            lead_ind,
            parts,
            lead_ind,
            dtype=out_dtype,
            meta=_meta(nl, out_dtype),
            index=index,
        )

    def summed(index: int, sizes: tuple[int, ...], out_dtype: np.dtype[Any]) -> da.Array:
        new = tuple(range(nl, nl + len(sizes)))
        partial = da.blockwise(
            _lce_partial,
            lead_ind + new,
            parts,
            lead_ind,
            new_axes=dict(zip(new, sizes, strict=True)),
            adjust_chunks={i: 1 for i in lead_ind},
            dtype=out_dtype,
            meta=_meta(nl + len(new), out_dtype),
            index=index,
            ndim=nl,
        )
        return partial.sum(axis=lead_ind, dtype=out_dtype) if nl else partial

    if reduction == "none":
        result: Any = per_token(_LOSS, loss_dtype)
    else:
        result = da.blockwise(
            _lce_finish,
            (),
            summed(_LOSS, (), np.dtype(np.float64)),
            (),
            *((totals, (KI,)) if totals is not None else (None, None)),
            concatenate=True,
            dtype=loss_dtype,
            meta=_meta(0, loss_dtype),
            out_dtype=loss_dtype,
        )
    if not (return_grad or return_logprobs or return_entropy):
        return result
    out: list[Any] = [result]
    if return_grad:
        d_hidden = da.blockwise(
            _lce_pick,
            lead_ind + (DI,),
            parts,
            lead_ind,
            new_axes={DI: d},
            dtype=dtype,
            meta=_meta(nl + 1, dtype),
            index=_D_HIDDEN,
        )
        d_weight = summed(_D_WEIGHT, (v, d), work_dtype).astype(dtype)
        d_bias = summed(_D_BIAS, (v,), work_dtype).astype(dtype) if b is not None else None
        out.append((d_hidden, d_weight, d_bias))
    if return_logprobs:
        out.append(per_token(_LOGPROBS, loss_dtype))
    if return_entropy:
        out.append(per_token(_ENTROPY, loss_dtype))
    return tuple(out)


# --- attention ------------------------------------------------------------------------------


def _kv_heads(
    k: NDArray[Any], v: NDArray[Any], heads: NDArray[Any], group: int
) -> tuple[NDArray[Any], NDArray[Any]]:
    """k and v holding every kv head (one chunk on the head axis): the kv heads that the query
    heads ``heads`` (global indices) read, laid out so that the in-memory GQA rule (local query
    head h reads local kv head h // (hq / hkv)) holds."""
    if heads.size == 0:
        return k[..., :0, :, :], v[..., :0, :, :]
    first, last = int(heads[0]), int(heads[-1])
    lo, hi = first // group, last // group + 1
    if hi - lo == 1 or (first % group == 0 and (last + 1) % group == 0):
        return k[..., lo:hi, :, :], v[..., lo:hi, :, :]  # views
    index = heads // group  # one kv head per query head (a copy)
    return np.take(k, index, axis=-3), np.take(v, index, axis=-3)


def _attention_block(
    q: NDArray[Any],
    k: NDArray[Any],
    v: NDArray[Any],
    mask: NDArray[Any] | None,
    *positions: NDArray[Any],
    causal: Any,
    scale: float,
    dropout_p: float,
    seed: int,
    num_heads: int,
    group: int,
    kv_whole: bool,
    batch_shape: tuple[int, ...],
    with_batch: bool,
    with_heads: bool,
    options: dict[str, Any],
) -> NDArray[Any]:
    """One block of (batch..., query heads) with whole sequences.

    ``positions`` are the blocks of ``arange`` along each batch axis (``with_batch``: with
    dropout or kv_len) and then along the query heads (``with_heads``: with dropout, sinks or
    ALiBi slopes, or when k and v hold every kv head: ``kv_whole``).  ``options``: window,
    softcap and num_splits as given, and the whole arrays of sinks and alibi_slopes (Hq,) and
    kv_len (the batch shape), of which the block takes its heads' and batches' entries.

    Without dropout: one kernel call.  With dropout, one call per (batch, head) pair with the
    seed moved to that pair's flat index in the whole array (Note [dropout hash]: key =
    mix(seed ^ (bh * C)), and a single-head call has bh = 0), so that every block draws exactly
    the weights that one in-memory call over the whole array draws.
    """
    nb = len(batch_shape)
    batch_positions = positions[:nb] if with_batch else ()
    heads = positions[len(batch_positions)] if with_heads else None
    if kv_whole:
        k, v = _kv_heads(k, v, heads, group)
    opts = {key: options[key] for key in ("window", "softcap", "num_splits")}
    for key in ("sinks", "alibi_slopes"):
        opts[key] = None if options[key] is None else options[key][heads]
    lengths = options["kv_len"]
    if lengths is not None:
        lengths = lengths[np.ix_(*batch_positions)] if nb else lengths
    if dropout_p == 0.0:
        return _attention_np(q, k, v, mask=mask, causal=causal, scale=scale, kv_len=lengths, **opts)
    block_batch = tuple(len(p) for p in batch_positions)
    hq, lq, dv = q.shape[-3], q.shape[-2], v.shape[-1]
    g = hq // k.shape[-3] if k.shape[-3] else 1
    qb = np.broadcast_to(q, block_batch + q.shape[-3:])
    kb = np.broadcast_to(k, block_batch + k.shape[-3:])
    vb = np.broadcast_to(v, block_batch + v.shape[-3:])
    mb = None if mask is None else np.broadcast_to(mask, block_batch + (hq,) + mask.shape[-2:])
    out = np.empty(block_batch + (hq, lq, dv), np.result_type(q, k, v))
    for b in np.ndindex(*block_batch):
        index = tuple(int(p[i]) for p, i in zip(positions[:nb], b, strict=True))
        b_global = int(np.ravel_multi_index(index, batch_shape)) if nb else 0
        for h in range(hq):
            bh = b_global * num_heads + int(heads[h])
            one_head = {
                key: (
                    val if key not in ("sinks", "alibi_slopes") or val is None else val[h : h + 1]
                )
                for key, val in opts.items()
            }
            out[b + (h,)] = _attention_np(
                qb[b + (h,)],
                kb[b + (h // g,)],
                vb[b + (h // g,)],
                mask=None if mb is None else mb[b + (h,)],
                causal=causal,
                scale=scale,
                dropout_p=dropout_p,
                seed=seed ^ ((bh * _BH_MUL) & _U64),
                kv_len=None if lengths is None else lengths[b],
                **one_head,
            )
    return out


def attention(
    q: ArrayLike | da.Array,
    k: ArrayLike | da.Array,
    v: ArrayLike | da.Array,
    *,
    mask: ArrayLike | da.Array | None = None,
    causal: Any = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    sinks: ArrayLike | None = None,
    alibi_slopes: ArrayLike | None = None,
    kv_len: ArrayLike | None = None,
    num_splits: int = 0,
) -> da.Array:
    """Scaled dot-product attention on dask arrays chunked along batch and head axes:
    :func:`mlmath_native.attention` on each block.

    Shapes, broadcasting, grouped-query heads, ``mask``, ``causal`` and ``scale`` as the
    in-memory function: q (..., Hq, Lq, D), k (..., Hkv, Lk, D), v (..., Hkv, Lk, Dv), Hq a
    multiple of Hkv.  Lq, Lk, D and Dv are rechunked to one chunk; batch and head chunks are
    aligned between q, k, v and the mask (see the module docstring for GQA).  ``mask`` may be
    a NumPy or dask array.

    ``dropout_p > 0`` (with ``seed``) is reproducible: every block draws the weights that one
    in-memory ``mlmath_native.attention`` call over the whole arrays draws (the same seed gives
    the same result for any chunking).  With dropout each block makes one kernel call per
    (batch, head) pair instead of one call per block.  The logsumexp (``return_lse``) is not
    offered here.

    ``window``, ``softcap``, ``sinks``, ``alibi_slopes``, ``kv_len`` and ``num_splits`` as the
    in-memory function (NumPy arrays: sinks and alibi_slopes (Hq,), kv_len of the batch shape;
    each block takes its heads' and batches' entries).  Packed variable-length batches
    (``cu_seqlens_q``/``cu_seqlens_k``) are not offered: their rows do not chunk by sequence.

    Returns
    -------
    dask.array.Array
        (..., Hq, Lq, Dv), lazy; of the dtype of q, k and v as the in-memory function
        (float32, float64, bfloat16 or float16; mixed dtypes promote as ``np.result_type``).

    Examples
    --------
    >>> import dask.array as da, numpy as np, mlmath_native as mn, mlmath_native.dask as mnd
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 4, 5, 8))   # (batch, heads, L, D)
    >>> kv = rng.standard_normal((2, 2, 5, 8))  # 2 kv heads: 2 query heads each
    >>> out = mnd.attention(da.from_array(q, chunks=(1, 2, 5, 8)), kv, kv, causal=True)
    >>> out.chunks
    ((1, 1), (2, 2), (5,), (8,))
    >>> np.allclose(out.compute(), mn.attention(q, kv, kv, causal=True))
    True
    """
    fn = "dask.attention"
    q = _as_dask(q, fn, "q")
    k = _as_dask(k, fn, "k")
    v = _as_dask(v, fn, "v")
    dtype = np.result_type(q.dtype, k.dtype, v.dtype)
    two_d, q, k, v, batch = _attention.check_shapes(fn, q, k, v)
    hq, lq, d = q.shape[-3:]
    hkv, lk = k.shape[-3:-1]
    nb = len(batch)
    _, scale, dropout_p, seed_value = _attention.check_options(
        fn, causal, scale, d, dropout_p, seed
    )
    _attention.check_window(fn, window)
    _attention.check_softcap(fn, softcap)
    options = {
        "window": window,
        "softcap": softcap,
        "num_splits": _attention.check_num_splits(fn, num_splits),
        "sinks": _attention.check_per_head(fn, "sinks", sinks, hq, dtype),
        "alibi_slopes": _attention.check_per_head(fn, "alibi_slopes", alibi_slopes, hq, dtype),
        "kv_len": None,
    }
    lengths = _attention.check_kv_len(fn, kv_len, batch, lk)
    if lengths is not None:
        options["kv_len"] = lengths.reshape(batch)

    def full_rank(a: da.Array) -> da.Array:  # prepend broadcast (size-1) batch axes
        return a[(None,) * (nb + 3 - a.ndim)] if a.ndim < nb + 3 else a

    q, k, v = (full_rank(a).astype(dtype) for a in (q, k, v))
    m = None
    if mask is not None:
        m = mask if isinstance(mask, da.Array) else da.from_array(np.asarray(mask), chunks=-1)
        full = batch + (hq, lq, lk)
        m = _attention.check_mask(fn, m, dtype, full)
        m = m[(None,) * (len(full) - m.ndim)]

    # batch axes: the chunks of the first array with the full size there; size-1 axes broadcast
    arrays = [q, k, v] + ([m] if m is not None else [])
    plans: list[dict[int, Any]] = [{} for _ in arrays]
    out_chunks: dict[int, tuple[int, ...]] = {}
    for i, n in enumerate(batch):
        owners = [a for a in arrays if a.shape[i] == n]
        chunks = owners[0].chunks[i] if n != 1 else (1,)
        out_chunks[i] = chunks
        for a, plan in zip(arrays, plans, strict=True):
            if a.shape[i] == n:
                plan[i] = chunks
    # heads: q keeps its chunks; k and v follow them when every block holds whole groups of g
    # query heads, else they are one chunk that every block reads its kv heads from
    h = nb
    g = hq // hkv if hkv else 1
    q_heads = q.chunks[h]
    kv_whole = not all(c % g == 0 for c in q_heads)
    kv_heads = (hkv,) if kv_whole else tuple(c // g for c in q_heads)
    plans[0][h], plans[1][h], plans[2][h] = q_heads, kv_heads, kv_heads
    if m is not None and m.shape[h] == hq:
        plans[3][h] = q_heads
    for plan in plans:  # whole sequences and features in every block
        plan.update({nb + 1: -1, nb + 2: -1})
    arrays = [a.rechunk(plan) for a, plan in zip(arrays, plans, strict=True)]
    q, k, v = arrays[:3]
    m = arrays[3] if m is not None else None

    b_ind = tuple(range(nb))
    H, LQ, LK, D, DV = (nb + i for i in range(5))  # noqa: N806
    positions: list[Any] = []
    with_batch = dropout_p > 0.0 or lengths is not None
    per_head = options["sinks"] is not None or options["alibi_slopes"] is not None
    with_heads = dropout_p > 0.0 or kv_whole or per_head
    if with_batch:
        for i, n in enumerate(batch):
            positions += [da.arange(n, chunks=(out_chunks[i],)), (i,)]
    if with_heads:
        positions += [da.arange(hq, chunks=(q_heads,)), (H,)]
    out = da.blockwise(
        _attention_block,
        b_ind + (H, LQ, DV),
        q,
        b_ind + (H, LQ, D),
        k,
        b_ind + (H, LK, D),
        v,
        b_ind + (H, LK, DV),
        *((m, b_ind + (H, LQ, LK)) if m is not None else (None, None)),
        *positions,
        align_arrays=False,
        concatenate=True,
        adjust_chunks={**out_chunks, H: q_heads, LQ: (lq,), DV: (v.shape[-1],)},
        dtype=dtype,
        meta=_meta(nb + 3, dtype),
        causal=causal,
        scale=scale,
        dropout_p=dropout_p,
        seed=seed_value,
        num_heads=hq,
        group=g,
        kv_whole=kv_whole,
        batch_shape=batch,
        with_batch=with_batch,
        with_heads=with_heads,
        options=options,
    )
    return out[..., 0, :, :] if two_d else out
