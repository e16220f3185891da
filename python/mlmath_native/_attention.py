"""Scaled dot-product attention: argument checks and layout, then the blocked C++ kernel
(``src/cpp/kernels/attention.cpp``).  The readable definition is
``mlmath_native.reference.transformer_attention``."""

from __future__ import annotations

import math
import operator
from collections.abc import Collection
from typing import Any, Literal, NamedTuple, cast, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _core
from ._checks import as_float_array, as_input, check_size, deliver, deliver_one, is_storage_dtype

#: False (no mask), True or "upper_left" (j <= i), "lower_right" (j <= i + Lk - Lq).  None is
#: refused, as by the reference and by PyTorch's ``is_causal``: it could mean either.
_Causal = bool | Literal["upper_left", "lower_right"]

_CAUSAL: dict[object, int] = {False: 0, True: 1, "upper_left": 1, "lower_right": 2}


def check_causal(fn: str, causal: _Causal) -> int:
    """The kernel's code for ``causal``: 0 none, 1 upper-left aligned, 2 lower-right."""
    if isinstance(causal, (bool, np.bool_)):
        return _CAUSAL[bool(causal)]
    if isinstance(causal, str) and causal in _CAUSAL:
        return _CAUSAL[causal]
    raise ValueError(
        f"{fn}: causal is invalid (got {causal!r}, expected False, True, 'upper_left' or "
        "'lower_right')"
    )


def check_shapes(fn: str, q: Any, k: Any, v: Any) -> tuple[bool, Any, Any, Any, tuple[int, ...]]:
    """Checks that q (..., Hq, Lq, D), k (..., Hkv, Lk, D) and v (..., Hkv, Lk, Dv) fit together
    (NumPy or Dask arrays: only .ndim, .shape and a[None] are used).  Returns (two_d, q4, k4,
    v4, batch): whether all three are 2-D, the arrays with a head axis (a missing one is one
    head) and the broadcast batch shape."""
    for name, arr in (("q", q), ("k", k), ("v", v)):
        if arr.ndim < 2:
            raise ValueError(
                f"{fn}: {name} has {arr.ndim} dimensions (expected (..., L, D), at least 2)"
            )
    two_d = q.ndim == k.ndim == v.ndim == 2  # else a 2-D input is one head
    q4, k4, v4 = (a if a.ndim >= 3 else a[None] for a in (q, k, v))
    hq, _, d = q4.shape[-3:]
    hkv, lk, dk = k4.shape[-3:]
    if dk != d:
        raise ValueError(f"{fn}: k has feature size {dk} (expected q's, {d})")
    if v4.shape[-2] != lk:
        raise ValueError(f"{fn}: v has {v4.shape[-2]} rows (expected k's length, {lk})")
    if v4.shape[-3] != hkv:
        raise ValueError(f"{fn}: v has {v4.shape[-3]} heads (expected k's, {hkv})")
    if (hkv == 0 and hq != 0) or (hkv != 0 and hq % hkv != 0):
        raise ValueError(
            f"{fn}: q's {hq} heads are not a multiple of k's and v's {hkv} (grouped-query "
            "attention needs Hq = g * Hkv)"
        )
    try:
        batch = np.broadcast_shapes(q4.shape[:-3], k4.shape[:-3], v4.shape[:-3])
    except ValueError:
        raise ValueError(
            f"{fn}: the leading dimensions of q {q.shape}, k {k.shape} and v {v.shape} do not "
            "broadcast"
        ) from None
    return two_d, q4, k4, v4, batch


def check_scale(fn: str, scale: object, d: int) -> float:
    """The score scale: 1/sqrt(D) by default (1 when D = 0), else a finite number."""
    if scale is None:
        return 1.0 / math.sqrt(d) if d > 0 else 1.0
    try:
        value = float(scale)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: scale must be a number (got {scale!r})") from None
    if not math.isfinite(value):
        raise ValueError(f"{fn}: scale must be finite (got {value})")
    return value


def check_dropout(fn: str, dropout_p: float, seed: int | None) -> tuple[float, int]:
    """dropout_p in [0, 1) and the seed (required when dropout_p > 0) as (p, seed)."""
    try:
        p = float(dropout_p)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: dropout_p must be a number (got {dropout_p!r})") from None
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1) (got {dropout_p!r})")
    if seed is None and p > 0.0:
        raise ValueError(
            f"{fn}: dropout_p > 0 needs an explicit seed (the dropout mask is a function of "
            "the seed, so that it is reproducible)"
        )
    if seed is None:
        return p, 0
    if isinstance(seed, (bool, np.bool_)):
        raise TypeError(f"{fn}: seed must be an integer (got {seed!r})")
    try:
        s = operator.index(seed)
    except TypeError:
        raise TypeError(f"{fn}: seed must be an integer (got {seed!r})") from None
    if not 0 <= s < 2**64:
        raise ValueError(f"{fn}: seed must be in [0, 2**64) (got {seed})")
    return p, s


def check_window(fn: str, window: object) -> tuple[int, int]:
    """``window=(left, right)`` (each a non-negative int or None, unlimited) as the kernel's
    (left, right), -1 for an unlimited side; ``None`` is (-1, -1)."""
    if window is None:
        return -1, -1
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(
            f"{fn}: window must be a pair (left, right) of non-negative ints or None (got "
            f"{window!r})"
        )
    sides = []
    for side, w in zip(("left", "right"), window, strict=True):
        if w is None:
            sides.append(-1)
            continue
        if isinstance(w, (bool, np.bool_)):
            raise TypeError(f"{fn}: window {side} must be an int or None (got {w!r})")
        try:
            value = operator.index(w)
        except TypeError:
            raise TypeError(f"{fn}: window {side} must be an int or None (got {w!r})") from None
        if value < 0:
            raise ValueError(f"{fn}: window {side} must be >= 0 or None (got {value})")
        sides.append(min(value, 2**62))  # wider than any sequence: unlimited in effect
    return sides[0], sides[1]


def check_softcap(fn: str, softcap: object) -> float:
    """``softcap`` as the kernel's value: None is 0 (none), else a finite number > 0."""
    if softcap is None:
        return 0.0
    try:
        value = float(softcap)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: softcap must be a number or None (got {softcap!r})") from None
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{fn}: softcap must be finite and > 0, or None (got {softcap!r})")
    return value


def check_num_splits(fn: str, num_splits: object) -> int:
    """``num_splits``: an integer >= 0 (0: chosen from the shapes)."""
    if isinstance(num_splits, (bool, np.bool_)):
        raise TypeError(f"{fn}: num_splits must be an integer (got {num_splits!r})")
    try:
        value = operator.index(num_splits)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{fn}: num_splits must be an integer (got {num_splits!r})") from None
    if value < 0:
        raise ValueError(f"{fn}: num_splits must be >= 0 (got {value})")
    return value


def check_per_head(fn: str, name: str, x: Any, hq: int, dtype: np.dtype[Any]) -> Any:
    """``sinks`` or ``alibi_slopes``: None, or a real (Hq,) array as a contiguous one of the
    compute dtype of inputs of ``dtype`` (:func:`stat_dtype`)."""
    if x is None:
        return None
    arr = as_float_array(x, fn, name)
    if arr.shape != (hq,):
        raise ValueError(
            f"{fn}: {name} has shape {arr.shape} (expected ({hq},), one per query head)"
        )
    return np.ascontiguousarray(arr, dtype=stat_dtype(dtype))


def check_kv_len(fn: str, kv_len: Any, batch: tuple[int, ...], lk: int) -> Any:
    """``kv_len``: None, or integers of the batch shape ``batch`` (a scalar for inputs without
    one) in [0, Lk], as a flat contiguous int64 array."""
    if kv_len is None:
        return None
    arr = as_input(kv_len, fn, "kv_len")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{fn}: kv_len must hold integers (got dtype {arr.dtype})")
    if arr.shape != batch:
        raise ValueError(
            f"{fn}: kv_len has shape {arr.shape} (expected the batch shape {batch}, one length "
            "per batch)"
        )
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > lk):
        raise ValueError(
            f"{fn}: kv_len must be in [0, Lk = {lk}] (got {int(arr.min())} to {int(arr.max())})"
        )
    return np.ascontiguousarray(arr, dtype=np.int64).reshape(-1)


def _plan_sinks_dtype(fn: str, sinks: Any, dtype: np.dtype[Any]) -> np.dtype[Any]:
    """dsinks' dtype: the sinks' when they are floating (bfloat16 included), else q's (as dq)."""
    if sinks is not None:
        given = as_input(sinks, fn, "sinks").dtype
        if given.kind == "f" or is_storage_dtype(given):
            return np.dtype(given)
    return np.dtype(dtype)


class _Plan:
    """Checked arguments in the kernel's layout: q (B, Hq, Lq, D), k (B or 1, Hkv, Lk, D),
    v (B or 1, Hkv, Lk, Dv), mask None or a (B, Hq, Lq, Lk) view; ``batch`` the broadcast
    leading shape, ``two_d`` when the inputs had no head axis."""

    q: NDArray[Any]
    k: NDArray[Any]
    v: NDArray[Any]
    mask: NDArray[Any] | None
    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    v_shape: tuple[int, ...]
    q4_shape: tuple[int, ...]
    k4_shape: tuple[int, ...]
    v4_shape: tuple[int, ...]
    causal: int
    scale: float
    dropout_p: float
    seed: int
    batch: tuple[int, ...]
    b: int
    hq: int
    lq: int
    dv: int
    two_d: bool
    dtype: np.dtype[Any]
    extras: Any  # _core.AttentionExtras
    sinks: NDArray[Any] | None
    sinks_dtype: np.dtype[Any]
    # the options as plain values too (the mask gradient, Note [mask gradient], reads them)
    window: tuple[int, int]  # (left, right), -1: unlimited
    softcap: float  # 0: none
    slopes: NDArray[Any] | None
    lengths: NDArray[Any] | None
    bh_offset: int
    lk: int


def _batch_view(a: NDArray[Any], batch: tuple[int, ...], b: int) -> NDArray[Any]:
    """a (..., H, L, F) as (B, H, L, F) C-contiguous, or (1, H, L, F) when its leading
    dimensions are all 1 (shared by every batch: no copy)."""
    lead = a.shape[:-3]
    if math.prod(lead) == 1 and b != 1:
        return np.ascontiguousarray(a.reshape((1,) + a.shape[-3:]))
    a = np.broadcast_to(a, batch + a.shape[-3:])
    return np.ascontiguousarray(a).reshape((b,) + a.shape[-3:])


def check_options(
    fn: str, causal: _Causal, scale: object, d: int, dropout_p: float, seed: int | None
) -> tuple[int, float, float, int]:
    """Every option of attention and attention_backward, checked (the in-memory functions and
    mlmath_native.dask share this): (causal code, scale, dropout_p, seed)."""
    code = check_causal(fn, causal)
    value = check_scale(fn, scale, d)
    p, s = check_dropout(fn, dropout_p, seed)
    return code, value, p, s


def stat_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype attention computes in for inputs of ``dtype``: float32 for bfloat16 and
    float16 (Note [16-bit storage]: the lse and a float mask are float32), else ``dtype``."""
    return np.dtype(np.float32) if np.dtype(dtype).itemsize == 2 else np.dtype(dtype)


def check_mask(fn: str, mask: Any, dtype: np.dtype[Any], full: tuple[int, ...]) -> Any:
    """A bool mask, or a real one cast to the compute dtype of inputs of ``dtype``
    (:func:`stat_dtype`; added to the scores), whose shape broadcasts to ``full`` =
    (..., Hq, Lq, Lk); NumPy or Dask arrays."""
    if mask.dtype != np.bool_:
        if not (mask.dtype.kind in "biuf" or is_storage_dtype(mask.dtype)):
            raise TypeError(
                f"{fn}: mask has unsupported dtype {mask.dtype} (expected bool, or a real "
                "number added to the scores)"
            )
        mask = mask.astype(stat_dtype(dtype), copy=False)
    try:
        broadcasts = np.broadcast_shapes(mask.shape, full) == full
    except ValueError:
        broadcasts = False
    if not broadcasts:
        raise ValueError(
            f"{fn}: mask has shape {mask.shape} (expected a shape that broadcasts to {full})"
        )
    return mask


def _plan(
    fn: str,
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    mask: ArrayLike | None,
    causal: _Causal,
    scale: float | None,
    dropout_p: float,
    seed: int | None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    sinks: ArrayLike | None = None,
    alibi_slopes: ArrayLike | None = None,
    num_splits: int = 0,
    kv_len: ArrayLike | None = None,
    bh_offset: int = 0,
) -> _Plan:
    q = as_float_array(q, fn, "q")
    k = as_float_array(k, fn, "k")
    v = as_float_array(v, fn, "v")
    two_d, q4, k4, v4, batch = check_shapes(fn, q, k, v)
    dtype = np.result_type(q.dtype, k.dtype, v.dtype)
    hq, lq, d = q4.shape[-3:]
    lk = k4.shape[-2]
    b = math.prod(batch)
    itemsize = np.dtype(dtype).itemsize
    for name, shape in (("q", q4.shape[-3:]), ("k", k4.shape[-3:]), ("v", v4.shape[-3:])):
        check_size(fn, f"{name} broadcast over the batch", (*batch, *shape), itemsize)
    check_size(fn, "the output", (*batch, hq, lq, v4.shape[-1]), itemsize)
    check_size(fn, "the work (multiply-adds)", (*batch, hq, lq, lk, d + v4.shape[-1]))
    code, scale, p, s = check_options(fn, causal, scale, d, dropout_p, seed)
    left, right = check_window(fn, window)
    cap = check_softcap(fn, softcap)
    sink_arr = check_per_head(fn, "sinks", sinks, hq, dtype)
    sinks_dtype = _plan_sinks_dtype(fn, sinks, dtype)
    slopes = check_per_head(fn, "alibi_slopes", alibi_slopes, hq, dtype)
    lengths = check_kv_len(fn, kv_len, batch, lk)
    splits = check_num_splits(fn, num_splits)
    m4 = None
    if mask is not None:
        full = batch + (hq, lq, lk)
        mb = np.broadcast_to(check_mask(fn, as_input(mask, fn, "mask"), dtype, full), full)
        m4 = mb.view()
        try:  # one stride for the flattened batch (a view), else a copy
            m4.shape = (b, hq, lq, lk)
        except AttributeError:
            m4 = np.ascontiguousarray(mb).reshape((b, hq, lq, lk))
    plan = _Plan()
    plan.q = _batch_view(q4.astype(dtype, copy=False), batch, b)
    if plan.q.shape[0] != b:  # q itself is broadcast over the batch: a real copy
        plan.q = np.ascontiguousarray(np.broadcast_to(plan.q, (b,) + plan.q.shape[1:]))
    plan.k = _batch_view(k4.astype(dtype, copy=False), batch, b)
    plan.v = _batch_view(v4.astype(dtype, copy=False), batch, b)
    if plan.k.shape[0] != plan.v.shape[0]:  # one shared by every batch, the other not: copy
        plan.k, plan.v = (
            np.ascontiguousarray(np.broadcast_to(a, (b,) + a.shape[1:])) for a in (plan.k, plan.v)
        )
    plan.q_shape, plan.k_shape, plan.v_shape = q.shape, k.shape, v.shape
    plan.q4_shape, plan.k4_shape, plan.v4_shape = q4.shape, k4.shape, v4.shape
    plan.mask, plan.causal, plan.scale, plan.dropout_p, plan.seed = m4, code, scale, p, s
    plan.batch, plan.b, plan.hq, plan.lq, plan.dv = batch, b, hq, lq, v4.shape[-1]
    plan.two_d, plan.dtype = two_d, dtype
    plan.extras = _core.AttentionExtras(
        left, right, cap, sink_arr, slopes, lengths, bh_offset, splits
    )
    plan.sinks, plan.sinks_dtype = sink_arr, np.dtype(sinks_dtype)
    plan.window, plan.softcap, plan.slopes, plan.lengths = (left, right), cap, slopes, lengths
    plan.bh_offset, plan.lk = bh_offset, lk
    return plan


@overload
def attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    mask: ArrayLike | None = ...,
    causal: _Causal = ...,
    scale: float | None = ...,
    dropout_p: float = ...,
    seed: int | None = ...,
    window: tuple[int | None, int | None] | None = ...,
    softcap: float | None = ...,
    sinks: ArrayLike | None = ...,
    alibi_slopes: ArrayLike | None = ...,
    kv_len: ArrayLike | None = ...,
    cu_seqlens_q: ArrayLike | None = ...,
    cu_seqlens_k: ArrayLike | None = ...,
    num_splits: int = ...,
    return_lse: Literal[False] = ...,
    out: Any = ...,
) -> NDArray[Any]: ...


@overload
def attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    mask: ArrayLike | None = ...,
    causal: _Causal = ...,
    scale: float | None = ...,
    dropout_p: float = ...,
    seed: int | None = ...,
    window: tuple[int | None, int | None] | None = ...,
    softcap: float | None = ...,
    sinks: ArrayLike | None = ...,
    alibi_slopes: ArrayLike | None = ...,
    kv_len: ArrayLike | None = ...,
    cu_seqlens_q: ArrayLike | None = ...,
    cu_seqlens_k: ArrayLike | None = ...,
    num_splits: int = ...,
    return_lse: Literal[True],
    out: Any = ...,
) -> tuple[NDArray[Any], NDArray[Any]]: ...


@overload
def attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    mask: ArrayLike | None = ...,
    causal: _Causal = ...,
    scale: float | None = ...,
    dropout_p: float = ...,
    seed: int | None = ...,
    window: tuple[int | None, int | None] | None = ...,
    softcap: float | None = ...,
    sinks: ArrayLike | None = ...,
    alibi_slopes: ArrayLike | None = ...,
    kv_len: ArrayLike | None = ...,
    cu_seqlens_q: ArrayLike | None = ...,
    cu_seqlens_k: ArrayLike | None = ...,
    num_splits: int = ...,
    return_lse: bool = ...,
    out: Any = ...,
) -> NDArray[Any] | tuple[NDArray[Any], NDArray[Any]]: ...


def attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    causal: _Causal = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    sinks: ArrayLike | None = None,
    alibi_slopes: ArrayLike | None = None,
    kv_len: ArrayLike | None = None,
    cu_seqlens_q: ArrayLike | None = None,
    cu_seqlens_k: ArrayLike | None = None,
    num_splits: int = 0,
    return_lse: bool = False,
    out: Any = None,
) -> NDArray[Any] | tuple[NDArray[Any], NDArray[Any]]:
    """Scaled dot-product attention, ``softmax(q kᵀ · scale + mask) v``, blocked (no L x L
    matrix) with an online softmax.

    Parameters
    ----------
    q : array_like, (..., Hq, Lq, D)
    k : array_like, (..., Hkv, Lk, D)
    v : array_like, (..., Hkv, Lk, Dv)
        Leading (batch) dimensions broadcast like ``np.matmul``.  Hq must be a multiple of
        Hkv: query head h reads kv head h // (Hq // Hkv) (grouped-query and multi-query
        attention).  2-D inputs (L, D) are one head.
    mask : array_like, optional
        Broadcastable to (..., Hq, Lq, Lk).  Boolean: True where query i may attend to key j.
        Otherwise added to the scores (``-inf`` forbids), converted to the compute dtype
        (float32 for float32, bfloat16 and float16 inputs): a mask never changes the result's
        dtype.  Masked positions are excluded by
        selection, so NaN or inf scores there never reach the output.
    causal : {False, True, "upper_left", "lower_right"}
        True / "upper_left": query i sees keys j <= i (PyTorch's ``is_causal``);
        "lower_right": j <= i + Lk - Lq (the alignment of a KV cache).
    scale : float, optional
        Default 1 / sqrt(D).
    dropout_p : float in [0, 1)
        Dropout on the attention weights, drawn inside the blocked kernel from ``seed``
        (required when dropout_p > 0; Note [dropout hash] in the kernel, the same function as
        ``reference.transformer_attention.dropout_keep``): the same seed gives the same result.
    seed : int in [0, 2**64), optional
    window : (left, right), optional
        Sliding-window attention: query i sees keys ``i + off - left <= j <= i + off + right``,
        off = Lk - Lq for ``causal="lower_right"``, else 0; a side of None is unlimited.
        With ``causal`` the window is intersected with it (right is 0).  Key blocks wholly
        outside the window are skipped: the cost is O(Lq x window), not O(Lq x Lk).
    softcap : float > 0, optional
        Scores become ``softcap * tanh(scores / softcap)`` (Gemma 2) before ALiBi and the
        masks.
    sinks : array_like, (Hq,), optional
        One logit per query head that joins every row's softmax denominator and attends to no
        value (gpt-oss, StreamingLLM): the weights of the keys sum to ``1 - p_sink``; ``-inf``
        is no sink.  A query that sees no key gets zeros and ``lse = sinks[h]``.
    alibi_slopes : array_like, (Hq,), optional
        ALiBi: ``slope[h] * |i + off - j|`` is subtracted from the scores (after the softcap),
        with ``off`` as for ``window``; never materialised.
    kv_len : array_like of int, the batch shape, optional
        A preallocated KV cache: batch b has only its first ``kv_len[b]`` keys (0 <= kv_len[b]
        <= Lk); the others are never read into a result, whatever they hold, and the
        lower-right alignment is ``kv_len[b] - Lq``.  No copy of k or v is made.
    cu_seqlens_q, cu_seqlens_k : int32 or int64 array_like, (S + 1,), optional
        A packed variable-length batch (FlashAttention's varlen API): q (total_q, Hq, D), k
        (total_k, Hkv, D) and v (total_k, Hkv, Dv) hold S sequences, sequence s in rows
        ``cu_seqlens[s]:cu_seqlens[s + 1]``; each attends only within itself (causal, window,
        softcap, sinks and ALiBi per sequence; no mask), no padding is computed, and the
        result equals running each sequence by itself, bit for bit.  out is (total_q, Hq, Dv)
        and lse (Hq, total_q).  Dropout draws sequence s as batch s of the padded batch.
    num_splits : int >= 0
        Decoding (Lq <= 16 and at most 64 query rows, ``Hq // Hkv * Lq``, per kv head) runs
        flash-decoding: each kv head's keys are cut into chunks processed in parallel and merged
        by their log-sum-exp, in a fixed order.  ``num_splits`` sets the number of chunks (1:
        none, as FlashAttention's ``flash_attn_with_kvcache``); 0 (default) uses chunks of 768
        keys.  The result is bitwise the same for any thread count; another ``num_splits``
        changes only the rounding.  Ignored by the other shapes.
    return_lse : bool
        Also return the logsumexp of each query's scores, (..., Hq, Lq) (of the undropped
        weights), which :func:`attention_backward` uses.
    out : ndarray, or (ndarray or None, ndarray or None) with ``return_lse``, optional
        Where to write the result (NumPy's tuple form for the two results of
        ``return_lse``): each exactly its result's shape and dtype, writeable.  The result is
        computed first and then copied in, so ``out`` may be ``q`` itself.

    Returns
    -------
    out : ndarray, (..., Hq, Lq, Dv)
        Of the dtype of q, k and v: float32, float64, bfloat16 or float16 (mixed dtypes promote
        as ``np.result_type``; integers and bool compute in float64).  bfloat16 and float16
        are storage only (Note [16-bit storage]): every product, sum, the online-softmax
        statistics and the output accumulators are float32, and each output element is
        rounded once.  A query that may attend to no key gets zeros (and lse -inf).
    lse : ndarray, (..., Hq, Lq), only with ``return_lse=True``
        Of the compute dtype: float32 for bfloat16 and float16 inputs, else out's dtype.

    Raises
    ------
    ValueError
        Mismatched D, Lk or head counts, leading dimensions or a mask that do not broadcast,
        a bad ``causal``, dropout_p outside [0, 1), dropout without a seed, a non-finite scale.
    TypeError
        Complex, object or string inputs or mask.

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> q = np.array([[1.0, 0.0], [0.0, 3.0]])
    >>> k = np.ones((3, 2))
    >>> v = np.array([[1.0, 0.0], [2.0, 0.0], [6.0, 3.0]])
    >>> print(mn.attention(q, k, v))
    [[3. 1.]
     [3. 1.]]
    >>> print(mn.attention(q, k, v, causal=True))
    [[1.  0. ]
     [1.5 0. ]]
    """
    fn = "attention"
    opts = _Options(
        mask, causal, scale, dropout_p, seed, window, softcap, sinks, alibi_slopes, num_splits
    )
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        if kv_len is not None:
            raise ValueError(
                f"{fn}: kv_len and cu_seqlens exclude each other (a packed batch's "
                "sequences have their lengths in cu_seqlens_k)"
            )
        result = _varlen_forward(fn, q, k, v, cu_seqlens_q, cu_seqlens_k, opts, return_lse)
    else:
        result = _forward(fn, q, k, v, opts, kv_len, return_lse, 0)
    if out is None:
        return cast("NDArray[Any] | tuple[NDArray[Any], NDArray[Any]]", result)
    if not return_lse:
        return deliver_one(fn, result, out)
    return cast("tuple[NDArray[Any], NDArray[Any]]", deliver(fn, tuple(result), out))


class _Options(NamedTuple):
    """The options every call shares, as the user gave them (checked by _plan)."""

    mask: Any
    causal: _Causal
    scale: float | None
    dropout_p: float
    seed: int | None
    window: tuple[int | None, int | None] | None
    softcap: float | None
    sinks: Any
    alibi_slopes: Any
    num_splits: int = 0  # attention only (the backward has no decode path)


def _forward(
    fn: str, q: Any, k: Any, v: Any, o: _Options, kv_len: Any, return_lse: bool, bh_offset: int
) -> Any:
    """attention's body; ``bh_offset`` is added to b * Hq + h in the dropout hash."""
    p = _plan(fn, q, k, v, *o, kv_len, bh_offset)
    out = _core.empty((p.b, p.hq, p.lq, p.dv), p.dtype)
    lse = _core.empty((p.b, p.hq, p.lq), stat_dtype(p.dtype)) if return_lse else None
    if out.size or (lse is not None and lse.size):  # (Dv = 0 without lse: nothing to compute)
        args = (p.mask, p.causal, p.scale, p.dropout_p, p.seed, p.extras)
        _core.attention_into(p.q, p.k, p.v, *args, out, lse)
    out = out.reshape(p.batch + out.shape[1:])
    if p.two_d:  # q had no head axis: neither has the result
        out = out[..., 0, :, :]
    if not return_lse:
        return out
    lse = cast("NDArray[Any]", lse)  # not None: return_lse
    lse = lse.reshape(p.batch + lse.shape[1:])
    return out, (lse[..., 0, :] if p.two_d else lse)


def check_cu_seqlens(
    fn: str, q: Any, k: Any, v: Any, cu_q: Any, cu_k: Any, mask: Any
) -> tuple[Any, Any, Any, Any, Any]:
    """A packed batch (FlashAttention's varlen layout): q (total_q, Hq, D), k (total_k, Hkv,
    D), v (total_k, Hkv, Dv), cu_seqlens_q and cu_seqlens_k int32 or int64 (S + 1,) offsets,
    starting at 0, non-decreasing, ending at the totals.  Returns (q, k, v, cu_q, cu_k) as
    arrays (the offsets as int64)."""
    if cu_q is None or cu_k is None:
        raise ValueError(f"{fn}: cu_seqlens_q and cu_seqlens_k go together (both or neither)")
    if mask is not None:
        raise ValueError(
            f"{fn}: mask is not supported with cu_seqlens (each sequence attends within itself; "
            "causal, window, softcap, sinks and ALiBi apply per sequence)"
        )
    q, k, v = (as_float_array(a, fn, name) for a, name in ((q, "q"), (k, "k"), (v, "v")))
    for name, arr in (("q", q), ("k", k), ("v", v)):
        if arr.ndim != 3:
            raise ValueError(
                f"{fn}: with cu_seqlens, {name} must be (total_tokens, heads, features) (got "
                f"shape {arr.shape})"
            )
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"{fn}: v has {v.shape[0]} tokens (expected k's, {k.shape[0]})")
    offsets = []
    for name, cu, total in (("cu_seqlens_q", cu_q, q.shape[0]), ("cu_seqlens_k", cu_k, k.shape[0])):
        arr = as_input(cu, fn, name)
        if arr.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
            raise TypeError(f"{fn}: {name} must be int32 or int64 (got dtype {arr.dtype})")
        if arr.ndim != 1 or arr.shape[0] < 1:
            raise ValueError(f"{fn}: {name} must be a 1-D array of S + 1 offsets (got {arr.shape})")
        arr = arr.astype(np.int64)
        if arr[0] != 0 or np.any(np.diff(arr) < 0) or arr[-1] != total:
            raise ValueError(
                f"{fn}: {name} must start at 0, not decrease and end at the {total} tokens "
                f"(got {arr[0]} ... {arr[-1]})"
            )
        offsets.append(arr)
    if offsets[0].shape != offsets[1].shape:
        raise ValueError(
            f"{fn}: cu_seqlens_q and cu_seqlens_k give {offsets[0].size - 1} and "
            f"{offsets[1].size - 1} sequences"
        )
    return q, k, v, offsets[0], offsets[1]


def _varlen_forward(
    fn: str, q: Any, k: Any, v: Any, cu_q: Any, cu_k: Any, o: _Options, return_lse: bool
) -> Any:
    """attention on a packed batch: each sequence s by itself, (L_s, H, F) slices taken as
    (H, L_s, F) heads, drawn for dropout as batch s (b * Hq + h = s * Hq + h)."""
    q, k, v, cu_q, cu_k = check_cu_seqlens(fn, q, k, v, cu_q, cu_k, o.mask)
    hq, dv = q.shape[1], v.shape[2]
    dtype = np.result_type(q.dtype, k.dtype, v.dtype)
    out = np.zeros((q.shape[0], hq, dv), dtype)
    lse = np.full((hq, q.shape[0]), -np.inf, stat_dtype(dtype))
    for s in range(cu_q.size - 1):
        (q0, q1), (k0, k1) = cu_q[s : s + 2], cu_k[s : s + 2]
        qs, ks, vs = (np.swapaxes(a, 0, 1) for a in (q[q0:q1], k[k0:k1], v[k0:k1]))
        o_s, lse_s = _forward(fn, qs, ks, vs, o, None, True, s * hq)
        out[q0:q1] = np.swapaxes(o_s, 0, 1)
        lse[:, q0:q1] = lse_s
    return (out, lse) if return_lse else out


def _sum_to(g: NDArray[Any], shape: tuple[int, ...]) -> NDArray[Any]:
    """The adjoint of broadcasting ``shape`` to ``g.shape``: sums over the broadcast axes (in
    NumPy's fixed order; 16-bit gradients are summed in float32 and rounded once more)."""
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1
    )
    if not axes:
        return g.reshape(shape)
    total: NDArray[Any] = g.sum(axis=axes, keepdims=True, dtype=stat_dtype(g.dtype))
    return total.astype(g.dtype, copy=False).reshape(shape)


@overload
def attention_backward(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    out: ArrayLike,
    lse: ArrayLike,
    grad_out: ArrayLike,
    *,
    mask: ArrayLike | None = ...,
    causal: _Causal = ...,
    scale: float | None = ...,
    dropout_p: float = ...,
    seed: int | None = ...,
    window: tuple[int | None, int | None] | None = ...,
    softcap: float | None = ...,
    sinks: None = ...,
    alibi_slopes: ArrayLike | None = ...,
    kv_len: ArrayLike | None = ...,
    cu_seqlens_q: ArrayLike | None = ...,
    cu_seqlens_k: ArrayLike | None = ...,
    needs: Collection[str] = ...,
    grads_out: tuple[Any, ...] | None = ...,
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]: ...


@overload
def attention_backward(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    out: ArrayLike,
    lse: ArrayLike,
    grad_out: ArrayLike,
    *,
    mask: ArrayLike | None = ...,
    causal: _Causal = ...,
    scale: float | None = ...,
    dropout_p: float = ...,
    seed: int | None = ...,
    window: tuple[int | None, int | None] | None = ...,
    softcap: float | None = ...,
    sinks: ArrayLike,
    alibi_slopes: ArrayLike | None = ...,
    kv_len: ArrayLike | None = ...,
    cu_seqlens_q: ArrayLike | None = ...,
    cu_seqlens_k: ArrayLike | None = ...,
    needs: Collection[str] = ...,
    grads_out: tuple[Any, ...] | None = ...,
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any], NDArray[Any]]: ...


def attention_backward(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    out: ArrayLike,
    lse: ArrayLike,
    grad_out: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    causal: _Causal = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    sinks: ArrayLike | None = None,
    alibi_slopes: ArrayLike | None = None,
    kv_len: ArrayLike | None = None,
    cu_seqlens_q: ArrayLike | None = None,
    cu_seqlens_k: ArrayLike | None = None,
    needs: Collection[str] = ("q", "k", "v"),
    grads_out: tuple[Any, ...] | None = None,
) -> (
    tuple[NDArray[Any], NDArray[Any], NDArray[Any]]
    | tuple[NDArray[Any], NDArray[Any], NDArray[Any], NDArray[Any]]
):
    """Gradients of :func:`attention`: ``(dq, dk, dv)``, with the shapes of q, k and v, and
    ``(dq, dk, dv, dsinks)`` when ``sinks`` is given.

    Every option is :func:`attention`'s and must be the forward's.  ``dsinks`` (Hq,) has the
    sinks' dtype (q's when they are not floating): ``-sum over batch and queries of p_sink *
    (dO . O)``, the softmax backward of a logit whose value is 0, summed in float64.  The
    softcap's derivative ``1 - tanh^2`` is applied to the scores' gradient; ALiBi slopes and
    the window are constants.

    ``out`` and ``lse`` are the forward's results (``attention(..., return_lse=True)``) for the
    same arguments; ``grad_out`` is the gradient of the loss with respect to ``out``.  The
    gradients have the dtype of q, k and v (as :func:`attention`'s out); for bfloat16 and
    float16 inputs all the arithmetic is float32 (``lse`` is read as float32) and each gradient
    element is rounded once (dk and dv are summed over the query heads of a group and every
    query block in float32; a sum over broadcast batch dimensions is one more float32 sum and
    rounding).  The
    scores are recomputed block by block (no L x L buffer).  dk and dv are summed over the
    query heads of each group (GQA) and over broadcast batch dimensions, in a fixed order:
    results do not depend on the number of threads.  Masked positions, and queries that see no
    key, get zero gradients.

    ``grads_out=(dq, dk, dv[, dsinks])`` gives arrays to write the gradients into (NumPy's
    tuple form of ``out``, under another name because ``out`` is the forward's result, as in
    PyTorch's attention backward): each exactly its gradient's shape and dtype, or None.

    Raises
    ------
    ValueError
        Everything :func:`attention` rejects, and ``out``, ``lse`` or ``grad_out`` of the wrong
        shape.

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 5, 4)) for _ in range(3))
    >>> out, lse = mn.attention(q, k, v, causal=True, return_lse=True)
    >>> dq, dk, dv = mn.attention_backward(q, k, v, out, lse, np.ones_like(out), causal=True)
    >>> dv.sum(axis=-2)  # each query's weights sum to 1: dv sums to grad_out's row sums
    array([[5., 5., 5., 5.],
           [5., 5., 5., 5.]])
    """
    fn = "attention_backward"
    wanted = _check_needs(fn, needs, mask)
    opts = _Options(mask, causal, scale, dropout_p, seed, window, softcap, sinks, alibi_slopes)
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        if kv_len is not None:
            raise ValueError(f"{fn}: kv_len and cu_seqlens exclude each other")
        grads = _varlen_backward(fn, q, k, v, out, lse, grad_out, cu_seqlens_q, cu_seqlens_k, opts)
    else:
        grads = _backward(fn, q, k, v, out, lse, grad_out, opts, kv_len, 0, wanted)
    if grads_out is not None:
        grads = deliver(fn, tuple(grads), grads_out, "grads_out")
    return cast(
        "tuple[NDArray[Any], NDArray[Any], NDArray[Any]]"
        " | tuple[NDArray[Any], NDArray[Any], NDArray[Any], NDArray[Any]]",
        grads,
    )


def _backward(
    fn: str,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    grad_out: Any,
    o: _Options,
    kv_len: Any,
    bh_offset: int,
    wanted: frozenset[str] = frozenset({"q", "k", "v"}),
) -> Any:
    """attention_backward's body (``bh_offset`` as for _forward); ``wanted``: the gradients
    asked for (the others are None; the kernel runs when q, k, v or sinks need it)."""
    p = _plan(fn, q, k, v, *o, kv_len, bh_offset)
    want_out = p.batch + (p.hq, p.lq, p.dv)
    if p.two_d:
        want_out = want_out[:-3] + want_out[-2:]
    out4_shape = (p.b, p.hq, p.lq, p.dv)
    arrays = []
    for name, arr, shape, kernel_shape in (
        ("out", out, want_out, out4_shape),
        ("grad_out", grad_out, want_out, out4_shape),
        ("lse", lse, want_out[:-1], out4_shape[:-1]),
    ):
        arr = as_float_array(arr, fn, name)
        if arr.shape != shape:
            raise ValueError(f"{fn}: {name} has shape {arr.shape} (expected {shape})")
        dtype = stat_dtype(p.dtype) if name == "lse" else p.dtype
        arrays.append(np.ascontiguousarray(arr, dtype=dtype).reshape(kernel_shape))
    out4, grad4, lse3 = arrays
    dq = np.empty(p.q.shape, p.dtype)
    dk = np.empty(p.k.shape, p.dtype)
    dv = np.empty(p.v.shape, p.dtype)
    dsinks = None if p.sinks is None else np.zeros(p.hq, p.sinks.dtype)
    # Without queries, keys or value features every gradient is 0 (Dv = 0: dP = dO V^T and
    # delta = rowsum(dO * O) are empty sums), so the kernel runs only when all are present.
    kernel = bool(wanted & {"q", "k", "v"}) or dsinks is not None
    if kernel and grad4.size and p.k.shape[2]:
        args = (p.mask, p.causal, p.scale, p.dropout_p, p.seed, p.extras)
        _core.attention_backward_into(p.q, p.k, p.v, out4, lse3, grad4, *args, dq, dk, dv, dsinks)
    else:
        dq[...], dk[...], dv[...] = 0, 0, 0
    # back to the inputs' shapes: batch as broadcast, then each input's own leading shape
    kv_batch = p.batch if p.k.shape[0] == p.b else (1,) * len(p.batch)
    dq = _sum_to(dq.reshape(p.batch + dq.shape[1:]), p.q4_shape)
    dk = _sum_to(dk.reshape(kv_batch + dk.shape[1:]), p.k4_shape)
    dv = _sum_to(dv.reshape(kv_batch + dv.shape[1:]), p.v4_shape)
    grads: tuple[Any, ...] = tuple(
        g.reshape(shape) if name in wanted else None
        for name, g, shape in (("q", dq, p.q_shape), ("k", dk, p.k_shape), ("v", dv, p.v_shape))
    )
    if dsinks is not None:
        grads += (dsinks.astype(p.sinks_dtype),)
    if "mask" in wanted:
        grads += (_mask_grad(fn, p, o.mask, out4, grad4, lse3),)
    return grads


def _check_needs(fn: str, needs: Any, mask: Any) -> frozenset[str]:
    """The gradients asked for: a subset of q, k, v and mask (an additive float mask)."""
    if isinstance(needs, str) or not isinstance(needs, Collection):
        raise TypeError(f"{fn}: needs must be a collection of names (got {needs!r})")
    wanted = frozenset(needs)
    unknown = wanted - {"q", "k", "v", "mask"}
    if unknown:
        raise ValueError(
            f"{fn}: needs names {sorted(unknown)} (expected a subset of 'q', 'k', 'v', 'mask')"
        )
    if "mask" in wanted:
        if mask is None:
            raise ValueError(f"{fn}: needs 'mask' but no mask is given")
        dtype = as_input(mask, fn, "mask").dtype
        if not (dtype.kind == "f" or is_storage_dtype(dtype)):
            raise ValueError(
                f"{fn}: needs 'mask' asks for the gradient of a floating (additive) mask (got "
                f"dtype {dtype}: a boolean or integer mask has none)"
            )
    return wanted


def _mask_grad(
    fn: str, p: Any, mask: Any, out4: NDArray[Any], grad4: NDArray[Any], lse3: NDArray[Any]
) -> NDArray[Any]:
    """d(loss)/d(mask) of an additive float mask, as autograd gives it for SDPA (Note [mask
    gradient]): the mask is added to the scores, so its gradient is the scores' gradient
    dS = P (dP - delta) with P = exp(S - lse), dP = dO V^T (times the dropout factor) and
    delta = rowsum(dO * O), summed over the axes along which the mask was broadcast.  Zero where
    the position is forbidden (causal, window, kv_len, a -inf mask entry) and before the
    softcap's derivative (the mask is added after the softcap).  The scores are recomputed
    one (batch, head) at a time in the compute dtype, an Lq x Lk block each: this gradient is
    as large as the mask, so it is not part of the blocked kernel.

    Note [mask gradient]: NumPy on the plan's arrays, per (batch, head), with the options'
    definitions (module docstring of reference.transformer_attention); the dropout keep mask
    is the reference's dropout_keep, the function the kernel's hash implements (Note [dropout
    hash]).  Tested against torch's autograd and central differences of the reference."""
    from .reference.transformer_attention import (
        dropout_keep,
    )  # the kernel's hash (Note [dropout hash])

    m = as_input(mask, fn, "mask")
    compute = np.dtype(stat_dtype(p.dtype))
    full = p.batch + (p.hq, p.lq, p.lk)
    shape4 = (1,) * (len(full) - m.ndim) + m.shape  # the mask's shape on the scores' axes
    acc = np.zeros(shape4, np.float64)
    offset = p.lk - p.lq if p.causal == 2 else 0
    i = np.arange(p.lq)[:, None] + offset  # query i's position among the keys
    j = np.arange(p.lk)[None, :]
    allowed = np.ones((p.lq, p.lk), bool)
    if p.causal:
        allowed &= j <= i
    left, right = p.window
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    delta = np.sum(grad4.astype(compute) * out4.astype(compute), axis=-1)
    group = p.hq // p.k.shape[1]
    lead = len(p.batch)
    for b in range(p.b):
        bidx = np.unravel_index(b, p.batch) if p.batch else ()
        kb = b if p.k.shape[0] == p.b else 0
        rows = allowed if p.lengths is None else allowed & (j < p.lengths[b])
        for h in range(p.hq):
            kh = h // group
            with np.errstate(all="ignore"):
                s = (p.q[b, h].astype(compute) @ p.k[kb, kh].astype(compute).T) * compute.type(
                    p.scale
                )
                if p.softcap > 0:
                    s = p.softcap * np.tanh(s / p.softcap)
                if p.slopes is not None:
                    s = s - p.slopes[h] * np.abs(i - j)
                s = s + p.mask[b, h]
                live = rows & (s != -np.inf)  # NaN stays live: it reaches the gradient
                prob = np.where(live, np.exp(s - lse3[b, h][:, None]), 0)
                dp = grad4[b, h].astype(compute) @ p.v[kb, kh].astype(compute).T
                if p.dropout_p > 0:
                    bh = p.bh_offset + b * p.hq + h
                    rows_i = np.arange(p.lq)[:, None]
                    keep = dropout_keep(p.seed, bh, rows_i, j, p.dropout_p)  # type: ignore[no-untyped-call]
                    dp = dp * keep / (1 - p.dropout_p)
                ds = prob * (dp - delta[b, h][:, None])
            for axis in (0, 1):  # the mask's broadcast query or key axis: summed
                if shape4[-2 + axis] == 1:
                    ds = ds.sum(axis=axis, keepdims=True)
            index = tuple(0 if n == 1 else x for n, x in zip(shape4[:lead], bidx, strict=True))
            acc[index + ((0 if shape4[lead] == 1 else h),)] += ds
    return acc.reshape(m.shape).astype(m.dtype)


def _varlen_backward(
    fn: str,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    grad_out: Any,
    cu_q: Any,
    cu_k: Any,
    o: _Options,
) -> Any:
    """attention_backward on a packed batch, sequence by sequence as _varlen_forward."""
    q, k, v, cu_q, cu_k = check_cu_seqlens(fn, q, k, v, cu_q, cu_k, o.mask)
    hq, dv_size = q.shape[1], v.shape[2]
    dtype = np.result_type(q.dtype, k.dtype, v.dtype)
    arrays = []
    for name, arr, shape in (
        ("out", out, (q.shape[0], hq, dv_size)),
        ("grad_out", grad_out, (q.shape[0], hq, dv_size)),
        ("lse", lse, (hq, q.shape[0])),
    ):
        arr = as_float_array(arr, fn, name)
        if arr.shape != shape:
            raise ValueError(f"{fn}: {name} has shape {arr.shape} (expected {shape})")
        arrays.append(arr)
    out, grad_out, lse = arrays
    dq = np.zeros(q.shape, dtype)
    dk = np.zeros(k.shape, dtype)
    dv = np.zeros(v.shape, dtype)
    dsinks = None
    for s in range(cu_q.size - 1):
        (q0, q1), (k0, k1) = cu_q[s : s + 2], cu_k[s : s + 2]
        qs, ks, vs = (np.swapaxes(a, 0, 1) for a in (q[q0:q1], k[k0:k1], v[k0:k1]))
        o_s, go_s = (np.swapaxes(a[q0:q1], 0, 1) for a in (out, grad_out))
        grads = _backward(fn, qs, ks, vs, o_s, lse[:, q0:q1], go_s, o, None, s * hq)
        dq[q0:q1] = np.swapaxes(grads[0], 0, 1)
        dk[k0:k1] = np.swapaxes(grads[1], 0, 1)
        dv[k0:k1] = np.swapaxes(grads[2], 0, 1)
        if len(grads) == 4:  # dsinks of every sequence, added in order in float64
            dsinks = grads[3].astype(np.float64) + (0.0 if dsinks is None else dsinks)
    if o.sinks is None:
        return dq, dk, dv
    if dsinks is None:  # no sequence: a sink gets no gradient
        dsinks = np.zeros(hq)
    sinks_dtype = _plan_sinks_dtype(fn, o.sinks, dtype)
    return dq, dk, dv, dsinks.astype(sinks_dtype)
