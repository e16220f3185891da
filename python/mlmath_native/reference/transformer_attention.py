"""Scaled dot-product attention, as in Transformers (float64 reference).

Formula::

    Attention(Q, K, V) = softmax(Q Kᵀ / √d_k) V

    Q: (Lq, D)   K: (Lk, D)   V: (Lk, Dv)   →   output: (Lq, Dv)

Row i of Q Kᵀ holds the similarity of query i with every key; the softmax turns
it into weights P[i, j] >= 0 that sum to 1 over j, and output row i is the
weighted average Σ_j P[i, j] V[j] of the value rows. Dividing by √d_k (d_k = D,
the key dimension) keeps the scores' variance near 1 for unit-variance inputs so
the softmax does not saturate. ``scale`` replaces 1/√D if given (1.0 if D = 0).

Shapes, heads and grouped-query attention
-----------------------------------------
::

    q: (..., Hq, Lq, D)   k: (..., Hkv, Lk, D)   v: (..., Hkv, Lk, Dv)
    →  out: (..., Hq, Lq, Dv)        lse: (..., Hq, Lq)

For inputs with 3 or more dimensions the third-from-last axis is the head axis.
A 2-D input (L, D) has no head axis and counts as one head; if all of q, k and v
are 2-D the output is 2-D, (Lq, Dv). k and v have the same number of heads Hkv,
and Hq must be a multiple of Hkv (grouped-query attention; Hkv = 1 is
multi-query attention): query head h uses kv head ``h // (Hq // Hkv)``. The
leading (batch) dimensions before the head axis broadcast between q, k and v like
``np.matmul``.

Masking
-------
::

    S = Q Kᵀ · scale (+ M if the mask is a float bias)
    S[i, j] = −∞ wherever query i may not attend to key j

in that order:

1. scores ``Q Kᵀ · scale``;
2. a floating-point mask (any non-boolean numeric dtype, converted to float64)
   is added to the scores as it is (an additive bias);
3. a boolean mask (True = may attend), a ``−∞`` entry of a float mask, and
   ``causal`` forbid positions *by selection*: ``S = where(allowed, S, −∞)``.
   A forbidden score is −∞ whatever it would have been, so NaN or ±inf scores (or
   float-mask values) at forbidden positions never reach the output.

``causal`` (combined with ``mask`` if both are given):

* ``False``: no causal mask;
* ``True`` or ``"upper_left"``: query i sees keys j <= i (PyTorch's ``is_causal``);
* ``"lower_right"``: query i sees keys j <= i + Lk − Lq, the alignment of a KV
  cache where the Lq queries are the last Lq of the Lk positions. With Lq > Lk the
  first Lq − Lk queries see no key.

The mask must broadcast to the scores' shape (..., Hq, Lq, Lk) (to (Lq, Lk) for
2-D inputs) without adding dimensions.

Fully masked rows: if a query may attend to no key (its row of S is all −∞, or
Lk = 0), the softmax is undefined (0/0). Here such a row's output is 0, not NaN,
and its logsumexp is −∞, so one padded query cannot poison a whole batch; its
gradients are 0 too. NaN scores at allowed positions (from NaN inputs) still
propagate as NaN, and so do NaN or inf values in v, even in rows of v that a
query may not attend to (P = 0 there, and 0 · NaN = NaN, as in a plain matmul).

Options for today's models
--------------------------
The order on each score (query i, key j, query head h)::

    s = (q_i · k_j) · scale
    s = softcap · tanh(s / softcap)                      if softcap (Gemma 2)
    s = s − alibi_slopes[h] · |i + off − j|              if alibi_slopes (ALiBi)
    s = s + M[i, j]                                      a float mask
    s = −∞ where a boolean mask, causal or the window forbids

with ``off = Lk − Lq`` for ``causal="lower_right"`` and 0 otherwise (query i sits at key
position i + off). ``window=(left, right)`` allows ``i + off − left <= j <= i + off + right``
(None: unlimited on that side), intersected with causal. ``sinks`` (Hq,) adds one logit per
head to every row's denominator, with no value::

    lse = log(Σ_j e^{s_j} + e^{sinks[h]}),   P_ij = e^{s_ij − lse},   P_sink = e^{sinks[h] − lse}

so a row that sees no key has P = 0, lse = sinks[h] (−∞ is no sink). The backward adds
``dS_raw = dS · (1 − tanh²)`` for the softcap and returns
``dsinks[h] = −Σ_{batch, i} P_sink · rowsum(dP · P)`` (rowsum(dP · P) = dO · O).

Log-sum-exp
-----------
``return_lse=True`` also returns ``lse[..., i] = log Σ_j exp(S[..., i, j])`` over
the masked, scaled scores (before dropout): −∞ for a fully masked row. Then
``P = exp(S − lse)``, which is what a fused backward pass recomputes.

Dropout
-------
With ``0 < dropout_p < 1`` the attention weights are dropped out::

    P_drop[i, j] = P[i, j] · keep[i, j] / (1 − dropout_p),    out = P_drop V

where keep is a deterministic function of (seed, bh, i, j) that a native kernel
reproduces bit for bit (``dropout_keep``). It is a counter-based hash built from
the splitmix64 finaliser, in uint64 arithmetic that wraps modulo 2⁶⁴::

    mix(z) = z ^= z >> 30;  z *= 0xBF58476D1CE4E5B9;
             z ^= z >> 27;  z *= 0x94D049BB133111EB;
             z ^ (z >> 31)
    key  = mix(seed ^ (bh * 0x9E3779B97F4A7C15))
    bits = mix(key ^ (((i << 32) | j) * 0xD1B54A32D192ED03))
    u    = (bits >> 40) / 2²⁴              (24 random bits, exact in float64)
    keep = u >= dropout_p                  (compared in float64)

Equivalently ``keep = (bits >> 40) >= ceil(dropout_p · 2²⁴)`` in integers (the
product is exact). Here ``seed`` is an integer in [0, 2⁶⁴), i is the query index
and j the key index (both < 2³²), and ``bh`` is the flat C-order index of the
(batch..., query head) pair in the output, i.e. ``np.ravel_multi_index`` of the
output's leading index over its leading shape (..., Hq); bh = 0 for 2-D inputs.
The returned logsumexp is that of the scores without dropout.

Backward
--------
Given dO = ∂L/∂out (the same P, keep and scale as the forward pass)::

    P_drop = P · keep / (1 − p)
    dV = P_dropᵀ dO
    dP = (dO Vᵀ) · keep / (1 − p)
    dS = P · (dP − rowsum(dP · P))          (the softmax backward)
    dQ = dS K · scale        dK = dSᵀ Q · scale

Forbidden positions have P = 0, so they get no gradient (dS = 0 there); fully
masked rows give zero, finite gradients. As in the forward pass, the matmuls are
plain: NaN or inf in a row of k that a query may not attend to still reaches dQ
through dS K (0 · NaN = NaN), though not dK or dV. With grouped-query attention
dK and dV are summed over the query heads of each kv head, and over broadcast
leading dimensions back to each input's own shape.

This reference materialises the whole (…, Lq, Lk) score matrix in float64.
"""

import math
import operator

import numpy as np

from .softmax import logsumexp, softmax

__all__ = ["attention", "attention_backward", "dropout_keep"]

# Constants of the dropout hash (uint64; products wrap modulo 2**64).
_MIX_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_MUL2 = np.uint64(0x94D049BB133111EB)
_BH_MUL = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio
_IJ_MUL = np.uint64(0xD1B54A32D192ED03)


def _mix(z):
    """splitmix64 finaliser on a uint64 array (multiplications wrap modulo 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX_MUL1
    z = (z ^ (z >> np.uint64(27))) * _MIX_MUL2
    return z ^ (z >> np.uint64(31))


def _check_dropout_p(dropout_p, name):
    """Return dropout_p as a float in [0, 1), or raise ValueError naming it."""
    try:
        p = float(dropout_p)
    except (TypeError, ValueError):
        p = math.nan
    if not 0.0 <= p < 1.0:  # also rejects NaN
        raise ValueError(f"{name}: dropout_p is {dropout_p!r} (expected 0 <= dropout_p < 1)")
    return p


def _check_seed(seed, name):
    """Return seed as a NumPy uint64, or raise ValueError naming it."""
    if seed is None:
        raise ValueError(f"{name}: seed is required when dropout_p > 0")
    try:
        s = operator.index(seed)  # Python or NumPy integer; rejects floats
    except TypeError:
        s = -1
    if isinstance(seed, (bool, np.bool_)) or not 0 <= s < 2**64:
        raise ValueError(f"{name}: seed is {seed!r} (expected an integer in [0, 2**64))")
    return np.uint64(s)


def _as_counter(x, arg, name, limit):
    """Non-negative integer array_like → uint64 ndarray (values < limit)."""
    a = np.asarray(x)
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name}: {arg} has dtype {a.dtype} (expected integers)")
    if a.size and (np.min(a) < 0 or np.max(a) >= limit):
        raise ValueError(f"{name}: {arg} is out of range (expected 0 <= {arg} < {limit})")
    return a.astype(np.uint64)


def dropout_keep(seed, bh, i, j, dropout_p):
    """Which attention weights survive dropout: the counter-based hash, vectorised.

    ``keep[bh, i, j] = (mix(key ^ (((i << 32) | j) · C_ij)) >> 40) / 2²⁴ >= dropout_p``
    with ``key = mix(seed ^ (bh · C_bh))`` (see the module docstring for ``mix``
    and the constants). All arithmetic is uint64 with wrap-around, so a native
    kernel gets the same bits.

    Parameters
    ----------
    seed : int
        In [0, 2**64).
    bh : array_like of int
        Flat index of the (batch..., query head) pair, >= 0.
    i, j : array_like of int
        Query and key indices, in [0, 2**32).
    dropout_p : float
        Probability of dropping a weight, 0 <= dropout_p < 1.

    Returns
    -------
    keep : ndarray of bool
        ``bh``, ``i`` and ``j`` broadcast together. True where the weight is kept.
        (A NumPy bool if all three are scalars.)

    Raises
    ------
    ValueError
        If seed, dropout_p, bh, i or j is out of range or not an integer.

    Examples
    --------
    >>> import numpy as np
    >>> print(dropout_keep(0, 0, 0, np.arange(8), 0.5).astype(int))
    [0 1 0 0 0 0 1 1]
    >>> bool(dropout_keep(2**64 - 1, 3, 1, 2, 0.0))  # p = 0 keeps everything
    True
    """
    name = "dropout_keep"
    seed = _check_seed(seed, name)
    dropout_p = _check_dropout_p(dropout_p, name)
    bh = _as_counter(bh, "bh", name, 2**64)
    i = _as_counter(i, "i", name, 2**32)
    j = _as_counter(j, "j", name, 2**32)
    with np.errstate(over="ignore"):  # the products wrap modulo 2**64 on purpose
        key = _mix(seed ^ (bh * _BH_MUL))  # one stream per (batch, head)
        counter = (i << np.uint64(32)) | j  # one counter per (query, key)
        bits = _mix(key ^ (counter * _IJ_MUL))
    # The top 24 bits as a uniform number in [0, 1); exact in float64.
    u = (bits >> np.uint64(40)).astype(np.float64) / 2.0**24
    return u >= dropout_p


def _sum_to_shape(g, shape):
    """Sum g over the axes that broadcasting added or stretched, to get ``shape``."""
    extra = g.ndim - len(shape)
    g = np.sum(g, axis=tuple(range(extra)))
    stretched = tuple(ax for ax, n in enumerate(shape) if n == 1 and g.shape[ax] != 1)
    return np.sum(g, axis=stretched, keepdims=True)


def _check_window(window, name):
    """``window`` as (left, right), each a non-negative int or None (unlimited)."""
    if window is None:
        return None, None
    try:
        left, right = window
    except (TypeError, ValueError):
        raise ValueError(
            f"{name}: window must be a pair (left, right) of non-negative ints or None "
            f"(got {window!r})"
        ) from None
    sides = []
    for side, w in (("left", left), ("right", right)):
        if w is not None:
            if isinstance(w, (bool, np.bool_)):
                raise TypeError(f"{name}: window {side} must be an int or None (got {w!r})")
            try:
                w = operator.index(w)
            except TypeError:
                raise TypeError(
                    f"{name}: window {side} must be an int or None (got {w!r})"
                ) from None
            if w < 0:
                raise ValueError(f"{name}: window {side} must be >= 0 (got {w})")
        sides.append(w)
    return sides[0], sides[1]


def _check_softcap(softcap, name):
    if softcap is None:
        return None
    value = float(softcap)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: softcap must be a finite number > 0 or None (got {softcap!r})")
    return value


def _per_head(x, hq, arg, name):
    """A (Hq,) float64 vector (sinks, alibi_slopes), or None."""
    if x is None:
        return None
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name}: {arg} has dtype {x.dtype} (expected a real dtype)")
    if x.shape != (hq,):
        raise ValueError(
            f"{name}: {arg} has shape {x.shape} (expected ({hq},), one per query head)"
        )
    return x.astype(np.float64)


def _setup(
    name,
    q,
    k,
    v,
    mask,
    causal,
    scale,
    dropout_p,
    seed,
    window=None,
    softcap=None,
    sinks=None,
    alibi_slopes=None,
    kv_len=None,
    bh_offset=0,
):
    """Validate the arguments and compute everything the forward and backward share.

    Returns a dict with the inputs expanded to the computation's shape
    ``batch + (Hq, L, ·)`` (kv heads repeated for their query heads), the masked
    scores S, the softmax weights P (0 in fully masked rows), the logsumexp, the
    dropout factor keep / (1 − p) (None without dropout), and the shapes needed to
    give results back in the caller's shapes.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    for arg, arr in (("q", q), ("k", k), ("v", v)):
        if arr.ndim < 2:
            raise ValueError(f"{name}: {arg} has {arr.ndim} dimensions (expected at least 2)")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{name}: k has feature size {k.shape[-1]} (expected q's, {q.shape[-1]})")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"{name}: v has {v.shape[-2]} rows (expected k's length, {k.shape[-2]})")
    lq, d = q.shape[-2], q.shape[-1]
    lk, dv = k.shape[-2], v.shape[-1]

    # Give 2-D inputs a head axis of length 1: every input becomes (..., H, L, ·).
    q4, k4, v4 = (a if a.ndim >= 3 else a[np.newaxis] for a in (q, k, v))
    hq, hkv = q4.shape[-3], k4.shape[-3]
    if v4.shape[-3] != hkv:
        raise ValueError(f"{name}: v has {v4.shape[-3]} heads (expected k's, {hkv})")
    if (hkv == 0 and hq != 0) or (hkv > 0 and hq % hkv != 0):
        raise ValueError(
            f"{name}: q has {hq} heads, not a multiple of k's and v's {hkv} "
            "(a 2-D input counts as one head)"
        )
    group = hq // hkv if hkv > 0 else 1  # query heads per kv head
    try:
        batch = np.broadcast_shapes(q4.shape[:-3], k4.shape[:-3], v4.shape[:-3])
    except ValueError:
        raise ValueError(
            f"{name}: the leading (batch) dimensions of q {q.shape[:-3]}, k {k.shape[:-3]} "
            f"and v {v.shape[:-3]} do not broadcast"
        ) from None
    has_heads = max(q.ndim, k.ndim, v.ndim) >= 3
    out_shape = batch + (hq, lq, dv) if has_heads else (lq, dv)
    score_shape = out_shape[:-1] + (lk,)  # the caller's view of S: (..., Hq, Lq, Lk)
    work = batch + (hq,)  # the computation always has a head axis

    if scale is None:
        scale = 1.0 / np.sqrt(d) if d > 0 else 1.0
    scale = float(scale)

    if isinstance(causal, (bool, np.bool_)):
        causal = "upper_left" if causal else None
    elif not (isinstance(causal, str) and causal in ("upper_left", "lower_right")):
        raise ValueError(
            f"{name}: causal is {causal!r} (expected False, True, 'upper_left' or 'lower_right')"
        )

    dropout_p = _check_dropout_p(dropout_p, name)
    if dropout_p > 0.0 or seed is not None:
        seed = _check_seed(seed, name)
    left, right = _check_window(window, name)
    softcap = _check_softcap(softcap, name)
    sinks = _per_head(sinks, hq, "sinks", name)
    alibi_slopes = _per_head(alibi_slopes, hq, "alibi_slopes", name)
    # keys per batch: all Lk, or kv_len[b] (shape batch + (1, 1, 1) to broadcast with work +
    # (Lq, Lk)): keys j >= kv_len[b] do not exist
    keys = lk
    if kv_len is not None:
        kv_len = np.asarray(kv_len)
        if kv_len.dtype.kind not in "iu" or kv_len.shape != batch:
            raise ValueError(f"{name}: kv_len must be integers of the batch shape {batch}")
        if kv_len.size and (kv_len.min() < 0 or kv_len.max() > lk):
            raise ValueError(f"{name}: kv_len must be in [0, Lk]")
        keys = kv_len.astype(np.int64).reshape(batch + (1, 1, 1))
    # the diagonal of the causal alignment in force: query i sits at key position i + offset
    offset = keys - lq if causal == "lower_right" else 0
    i_pos = np.arange(lq)[:, np.newaxis] + offset
    j_pos = np.arange(lk)[np.newaxis, :]

    # Expanded inputs: q (batch, Hq, Lq, D); k and v with kv head h // group repeated
    # for query head h: (batch, Hq, Lk, D) and (batch, Hq, Lk, Dv).
    qe = np.broadcast_to(q4, work + (lq, d))
    ke = np.repeat(np.broadcast_to(k4, batch + (hkv, lk, d)), group, axis=-3)
    ve = np.repeat(np.broadcast_to(v4, batch + (hkv, lk, dv)), group, axis=-3)

    # 1. Scores S[..., i, j] = (q_i · k_j) · scale.                 shape (batch, Hq, Lq, Lk)
    # (inf or NaN inputs may make NaN here; forbidden positions are replaced below.)
    with np.errstate(invalid="ignore"):
        raw = np.matmul(qe, np.swapaxes(ke, -1, -2)) * scale
    # 1b. Softcapping (Gemma 2): S = c · tanh(S / c), before any bias or mask.
    tanh = None if softcap is None else np.tanh(raw / softcap)
    scores = raw if softcap is None else softcap * tanh
    # 1c. ALiBi: S −= slope_h · |i + offset − j| (the distance to the query's own position).
    if alibi_slopes is not None:
        distance = np.abs(i_pos - j_pos).astype(np.float64)
        scores = scores - alibi_slopes[:, np.newaxis, np.newaxis] * distance

    # 2-3. Which positions may be attended to, and the float bias.
    allowed = np.ones(work + (lq, lk), dtype=bool)
    if mask is not None:
        mask = np.asarray(mask)
        if not (
            mask.dtype == np.bool_
            or np.issubdtype(mask.dtype, np.integer)
            or np.issubdtype(mask.dtype, np.floating)
        ):
            raise ValueError(f"{name}: mask has dtype {mask.dtype} (expected bool or real)")
        try:
            ok = np.broadcast_shapes(mask.shape, score_shape) == score_shape
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"{name}: mask has shape {mask.shape} (expected a shape that broadcasts "
                f"to {score_shape})"
            )
        mask = np.broadcast_to(mask, score_shape).reshape(work + (lq, lk))
        if mask.dtype == np.bool_:
            allowed &= mask
        else:
            bias = mask.astype(np.float64)
            allowed &= bias != -np.inf  # a −∞ bias forbids, by selection like a False
            with np.errstate(invalid="ignore"):  # inf + (−inf) at forbidden positions
                scores = scores + bias
    if kv_len is not None:
        allowed &= j_pos < keys
    if causal is not None:
        allowed &= j_pos <= i_pos  # upper left: j <= i; lower right: j <= i + Lk − Lq
    if left is not None:  # sliding window: i + offset − left <= j <= i + offset + right
        allowed &= j_pos >= i_pos - left
    if right is not None:
        allowed &= j_pos <= i_pos + right
    scores = np.where(allowed, scores, -np.inf)

    # P = softmax over the keys. A fully masked row (all −∞, or no keys) gives NaN
    # there; replace those weights by 0 so the row's output is 0. Rows that are NaN
    # for other reasons (NaN or +inf scores) keep their NaN.
    with np.errstate(invalid="ignore"):
        fully_masked = np.all(scores == -np.inf, axis=-1, keepdims=True)
    if sinks is None:
        weights = np.where(fully_masked, 0.0, softmax(scores, axis=-1))
        lse = logsumexp(scores, axis=-1)  # −∞ for fully masked rows
        sink_weights = None
    else:
        # A sink joins every row's denominator with logit sinks[h] and no value: the weights
        # of the keys sum to 1 − P_sink.  lse = log(Σ_j e^S_j + e^sink); a fully masked row
        # has lse = sink, P = 0 and P_sink = 1.
        sink = np.broadcast_to(sinks[:, np.newaxis], work + (lq,))
        with np.errstate(invalid="ignore", divide="ignore"):
            lse = np.logaddexp(logsumexp(scores, axis=-1), sink)
            weights = np.where(allowed, np.exp(scores - lse[..., np.newaxis]), 0.0)
            sink_weights = np.where(sink == -np.inf, 0.0, np.exp(sink - lse))  # −∞: no sink

    # Dropout factor keep / (1 − p), with bh the flat index over (batch..., Hq).
    drop = None
    if dropout_p > 0.0:
        bh = bh_offset + np.arange(math.prod(work)).reshape(work)
        keep = dropout_keep(
            seed,
            bh[..., np.newaxis, np.newaxis],
            np.arange(lq)[:, np.newaxis],
            np.arange(lk)[np.newaxis, :],
            dropout_p,
        )
        drop = keep / (1.0 - dropout_p)

    return {
        "q": q,
        "k": k,
        "v": v,
        "qe": qe,
        "ke": ke,
        "ve": ve,
        "scale": scale,
        "weights": weights,
        "sink_weights": sink_weights,
        "softcap": softcap,
        "tanh": tanh,  # tanh(raw / softcap), for the backward
        "lse": lse,
        "drop": drop,
        "batch": batch,
        "work": work,
        "hkv": hkv,
        "group": group,
        "out_shape": out_shape,
    }


def attention(
    q,
    k,
    v,
    mask=None,
    causal=False,
    scale=None,
    dropout_p=0.0,
    seed=None,
    return_lse=False,
    window=None,
    softcap=None,
    sinks=None,
    alibi_slopes=None,
    kv_len=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    _bh_offset=0,
):
    """Scaled dot-product attention: ``softmax(Q Kᵀ · scale + M) V``.

    Parameters
    ----------
    q : array_like, shape (..., Hq, Lq, D) or (Lq, D)
        Queries. Converted to float64.
    k : array_like, shape (..., Hkv, Lk, D) or (Lk, D)
        Keys. Hq must be a multiple of Hkv; query head h uses kv head
        ``h // (Hq // Hkv)``.
    v : array_like, shape (..., Hkv, Lk, Dv) or (Lk, Dv)
        Values.
    mask : array_like, optional
        Broadcastable to the scores' shape (..., Hq, Lq, Lk). Boolean: True where
        query i may attend to key j. Any other real dtype: added to the scores
        (a ``-inf`` entry forbids the position).
    causal : {False, True, 'upper_left', 'lower_right'}, optional
        True or 'upper_left': query i attends only to keys j <= i. 'lower_right':
        to keys j <= i + Lk − Lq (KV-cache alignment). Combined with ``mask``.
    scale : float, optional
        Multiplies the scores. Default ``1 / √D`` (1.0 if D = 0).
    dropout_p : float, optional
        Dropout probability of the attention weights, 0 <= dropout_p < 1.
    seed : int, optional
        Seed of the dropout hash, in [0, 2**64); required if dropout_p > 0 (checked
        whenever given).
    return_lse : bool, optional
        Also return the logsumexp of the scores over the keys.
    window : (left, right), optional
        Sliding window: ``i + off − left <= j <= i + off + right``; None sides unlimited.
    softcap : float > 0, optional
        Scores become ``softcap · tanh(scores / softcap)``.
    sinks : array_like (Hq,), optional
        A logit per query head in every row's softmax denominator, attending to nothing.
    alibi_slopes : array_like (Hq,), optional
        ``slope[h] · |i + off − j|`` subtracted from the scores.
    kv_len : array_like of int, the batch shape, optional
        Batch b has only keys j < kv_len[b] (a preallocated cache); the lower-right alignment
        is then kv_len[b] − Lq.

    Returns
    -------
    out : ndarray of float64, shape (..., Hq, Lq, Dv) or (Lq, Dv)
        The leading dimensions are those of q, k and v broadcast together. A query
        that may attend to no key gets a row of zeros.
    lse : ndarray of float64, shape (..., Hq, Lq) or (Lq,)
        Only with ``return_lse=True``: logsumexp over the keys of the masked,
        scaled scores (without dropout); −∞ for a fully masked row.

    Raises
    ------
    ValueError
        If an input has fewer than 2 dimensions, the feature sizes of q and k
        differ, k and v differ in length or in heads, Hq is not a multiple of Hkv,
        the leading dimensions or the mask do not broadcast, ``causal`` is not one
        of the accepted values, dropout_p is outside [0, 1), or dropout_p > 0
        without a seed.

    Examples
    --------
    With identical keys every query weighs the values equally:

    >>> import numpy as np
    >>> q = np.array([[1.0, 0.0], [0.0, 3.0]])
    >>> k = np.ones((3, 2))
    >>> v = np.array([[1.0, 0.0], [2.0, 0.0], [6.0, 3.0]])
    >>> print(attention(q, k, v))
    [[3. 1.]
     [3. 1.]]
    >>> print(attention(q, k, v, causal=True))
    [[1.  0. ]
     [1.5 0. ]]
    >>> print(attention(q, k, v, mask=np.zeros((2, 3), dtype=bool)))
    [[0. 0.]
     [0. 0.]]

    Aligned at the lower right (the 2 queries are the last 2 of 3 positions):

    >>> print(attention(q, k, v, causal="lower_right"))
    [[1.5 0. ]
     [3.  1. ]]

    Grouped-query attention: 4 query heads share 2 kv heads (heads 0, 1 use kv
    head 0; heads 2, 3 use kv head 1):

    >>> out, lse = attention(np.stack([q] * 4), np.stack([k, k]), np.stack([v, 2 * v]),
    ...                      return_lse=True)
    >>> out.shape, lse.shape
    ((4, 2, 2), (4, 2))
    >>> print(out[:, 0])
    [[3. 1.]
     [3. 1.]
     [6. 2.]
     [6. 2.]]
    >>> print(np.round(lse[0], 4))  # log(3 · e^(q_i · k_j / √2))
    [1.8057 3.2199]
    """
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        options = dict(
            mask=mask,
            causal=causal,
            scale=scale,
            dropout_p=dropout_p,
            seed=seed,
            window=window,
            softcap=softcap,
            sinks=sinks,
            alibi_slopes=alibi_slopes,
        )
        return _varlen(attention, q, k, v, None, cu_seqlens_q, cu_seqlens_k, options, return_lse)
    c = _setup(
        "attention",
        q,
        k,
        v,
        mask,
        causal,
        scale,
        dropout_p,
        seed,
        window,
        softcap,
        sinks,
        alibi_slopes,
        kv_len,
        _bh_offset,
    )
    weights = c["weights"]
    if c["drop"] is not None:
        weights = weights * c["drop"]  # P_drop = P · keep / (1 − p)

    # Output row i = Σ_j P[i, j] v_j.                         shape (batch, Hq, Lq, Dv)
    with np.errstate(invalid="ignore"):  # inf in v: 0 · inf = NaN, as documented
        out = np.matmul(weights, c["ve"]).reshape(c["out_shape"])
    if return_lse:
        return out, c["lse"].reshape(c["out_shape"][:-1])
    return out


def attention_backward(
    q,
    k,
    v,
    out,
    lse,
    grad_out,
    mask=None,
    causal=False,
    scale=None,
    dropout_p=0.0,
    seed=None,
    window=None,
    softcap=None,
    sinks=None,
    alibi_slopes=None,
    kv_len=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    _bh_offset=0,
):
    """Gradients of ``attention`` with respect to q, k and v.

    Everything is recomputed from q, k, v and the options (which must be those of
    the forward call); ``out`` and ``lse`` (the forward's results) are only checked
    for shape, and their values are not used.

    Parameters
    ----------
    q, k, v, mask, causal, scale, dropout_p, seed
        As for ``attention``. With dropout the same seed gives the same keep mask.
    out : array_like, shape (..., Hq, Lq, Dv) or (Lq, Dv)
        The forward output (shape checked only).
    lse : array_like, shape (..., Hq, Lq) or (Lq,)
        The forward logsumexp (shape checked only).
    grad_out : array_like, same shape as out
        ∂L/∂out. Converted to float64.

    window, softcap, sinks, alibi_slopes
        As for ``attention`` (the module's "Options for today's models").

    Returns
    -------
    dq, dk, dv : ndarrays of float64, with the shapes of q, k and v
        (and dsinks, (Hq,), when ``sinks`` is given)
        For grouped-query attention dk and dv are summed over the query heads that
        share each kv head; over broadcast leading dimensions they are summed back
        to each input's own shape. Positions that may not be attended to get no
        gradient, and fully masked rows give zero gradients.

    Raises
    ------
    ValueError
        As ``attention``, or if out, lse or grad_out has the wrong shape.

    Examples
    --------
    With identical keys, the output is the mean of the values whatever q is:

    >>> import numpy as np
    >>> q = np.array([[1.0, 0.0], [0.0, 3.0]])
    >>> k = np.ones((3, 2))
    >>> v = np.array([[1.0, 0.0], [2.0, 0.0], [6.0, 3.0]])
    >>> out, lse = attention(q, k, v, return_lse=True)
    >>> dq, dk, dv = attention_backward(q, k, v, out, lse, np.ones((2, 2)))
    >>> print(dq)
    [[0. 0.]
     [0. 0.]]
    >>> print(np.round(dv, 4))
    [[0.6667 0.6667]
     [0.6667 0.6667]
     [0.6667 0.6667]]
    """
    name = "attention_backward"
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        options = dict(
            mask=mask,
            causal=causal,
            scale=scale,
            dropout_p=dropout_p,
            seed=seed,
            window=window,
            softcap=softcap,
            sinks=sinks,
            alibi_slopes=alibi_slopes,
        )
        rows = (out, lse, grad_out)
        return _varlen(
            attention_backward, q, k, v, rows, cu_seqlens_q, cu_seqlens_k, options, False
        )
    c = _setup(
        name,
        q,
        k,
        v,
        mask,
        causal,
        scale,
        dropout_p,
        seed,
        window,
        softcap,
        sinks,
        alibi_slopes,
        kv_len,
        _bh_offset,
    )
    out_shape = c["out_shape"]
    for arg, arr, shape in (
        ("out", out, out_shape),
        ("lse", lse, out_shape[:-1]),
        ("grad_out", grad_out, out_shape),
    ):
        if np.shape(arr) != shape:
            raise ValueError(f"{name}: {arg} has shape {np.shape(arr)} (expected {shape})")
    work, hq = c["work"], c["work"][-1]
    d_out = np.asarray(grad_out, dtype=np.float64).reshape(work + out_shape[-2:])
    qe, ke, ve, scale = c["qe"], c["ke"], c["ve"], c["scale"]
    p = c["weights"]  # softmax weights P, 0 in fully masked rows   (batch, Hq, Lq, Lk)
    drop = c["drop"] if c["drop"] is not None else 1.0  # keep / (1 − p), or 1

    # dV = P_dropᵀ dO, with P_drop = P · keep / (1 − p).               (batch, Hq, Lk, Dv)
    # (Plain matmuls: inf or NaN inputs give NaN, 0 · NaN included, without a warning.)
    with np.errstate(invalid="ignore"):
        dve = np.matmul(np.swapaxes(p * drop, -1, -2), d_out)
        # dP = ∂L/∂P: through the matmul, then the dropout factor.    (batch, Hq, Lq, Lk)
        dp = np.matmul(d_out, np.swapaxes(ve, -1, -2)) * drop
        # Softmax backward along the keys: dS = P · (dP − Σ_j P_j dP_j).
        delta = np.sum(dp * p, axis=-1, keepdims=True)  # = dO · O, the sink having no value
        ds = p * (dp - delta)
        if c["tanh"] is not None:  # through S = c · tanh(raw / c): dS_raw = dS (1 − tanh²)
            ds = ds * (1.0 - c["tanh"] ** 2)
        dsinks = None
        if c["sink_weights"] is not None:  # the sink's softmax backward: −P_sink · delta
            dsinks = -np.sum(c["sink_weights"] * delta[..., 0], axis=-1)
            dsinks = np.sum(dsinks.reshape(-1, hq), axis=0)
        # S = Q Kᵀ · scale:  dQ = dS K · scale,  dK = dSᵀ Q · scale.
        dqe = np.matmul(ds, ke) * scale  # (batch, Hq, Lq, D)
        dke = np.matmul(np.swapaxes(ds, -1, -2), qe) * scale  # (batch, Hq, Lk, D)

    # Back to the inputs' shapes: sum the query heads of each kv-head group (head h
    # used kv head h // group), then the broadcast leading dimensions.
    def to_input(g, x, heads):
        lead, h = g.shape[:-3], g.shape[-3]
        g = np.sum(g.reshape(lead + (heads, h // heads if heads else 1) + g.shape[-2:]), axis=-3)
        x4_shape = x.shape if x.ndim >= 3 else (1,) + x.shape
        return _sum_to_shape(g, x4_shape).reshape(x.shape)

    dq = to_input(dqe, c["q"], hq)
    dk = to_input(dke, c["k"], c["hkv"])
    dv = to_input(dve, c["v"], c["hkv"])
    if dsinks is not None:
        return dq, dk, dv, dsinks
    return dq, dk, dv


def _varlen(fn, q, k, v, rows, cu_q, cu_k, options, return_lse):
    """``fn`` (attention, or attention_backward with rows = (out, lse, grad_out)) on a packed
    batch: q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv); sequence s is rows
    cu_q[s]:cu_q[s + 1] of q and cu_k[s]:cu_k[s + 1] of k and v, computed by itself as heads
    (H, L_s, F), its dropout drawn as batch s (bh = s · Hq + h).  out is (total_q, Hq, Dv) and
    lse (Hq, total_q); the backward returns dq, dk, dv like q, k, v (and dsinks summed)."""
    if cu_q is None or cu_k is None or options["mask"] is not None:
        raise ValueError("varlen: cu_seqlens_q and cu_seqlens_k go together, without a mask")
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    cu_q, cu_k = (np.asarray(c) for c in (cu_q, cu_k))
    for c, total in ((cu_q, q.shape[0]), (cu_k, k.shape[0])):
        if c.dtype not in (np.int32, np.int64) or c.ndim != 1 or c.size < 1:
            raise ValueError("varlen: cu_seqlens must be 1-D int32 or int64 offsets")
        if c[0] != 0 or np.any(np.diff(c) < 0) or c[-1] != total:
            raise ValueError("varlen: cu_seqlens must start at 0, not decrease, end at the total")
    if cu_q.shape != cu_k.shape:
        raise ValueError("varlen: cu_seqlens_q and cu_seqlens_k differ in length")
    hq = q.shape[1]
    results = []
    for s in range(cu_q.size - 1):
        sq, sk = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        heads = [np.swapaxes(a, 0, 1) for a in (q[sq], k[sk], v[sk])]
        if rows is None:
            results.append(fn(*heads, **options, return_lse=True, _bh_offset=s * hq))
        else:
            out, lse, grad_out = (np.asarray(a, dtype=np.float64) for a in rows)
            seq_rows = (np.swapaxes(out[sq], 0, 1), lse[:, sq], np.swapaxes(grad_out[sq], 0, 1))
            results.append(fn(*heads, *seq_rows, **options, _bh_offset=s * hq))
    if rows is None:
        out = np.zeros((q.shape[0], hq, v.shape[2]))
        lse = np.full((hq, q.shape[0]), -np.inf)
        for s, (o, lse_s) in enumerate(results):
            out[cu_q[s] : cu_q[s + 1]] = np.swapaxes(o, 0, 1)
            lse[:, cu_q[s] : cu_q[s + 1]] = lse_s
        return (out, lse) if return_lse else out
    grads = [np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)]
    for s, g in enumerate(results):
        for total, part, c in zip(grads, g[:3], (cu_q, cu_k, cu_k), strict=True):
            total[c[s] : c[s + 1]] = np.swapaxes(part, 0, 1)
    if options["sinks"] is None:
        return tuple(grads)
    dsinks = np.zeros(hq)
    for g in results:
        dsinks = dsinks + g[3]
    return (*grads, dsinks)
