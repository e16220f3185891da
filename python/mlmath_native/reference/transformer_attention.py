"""Scaled dot-product attention, as in Transformers (float64 reference).

Formula::

    Attention(Q, K, V) = softmax(Q Kᵀ / √d_k) V

    Q: (Lq, D)   K: (Lk, D)   V: (Lk, Dv)   →   output: (Lq, Dv)

Row i of Q Kᵀ holds the similarity of query i with every key; the softmax turns
it into weights P[i, j] >= 0 that sum to 1 over j, and output row i is the
weighted average Σ_j P[i, j] V[j] of the value rows. Dividing by √d_k (d_k = D,
the key dimension) keeps the scores' variance near 1 for unit-variance inputs so
the softmax does not saturate.

Masking restricts which keys a query may use::

    S = Q Kᵀ · scale + M,      M[i, j] = 0 (may attend) or −∞ (may not)

* a boolean mask (True = may attend) becomes M = 0 / −∞;
* a floating-point mask is added to the scores as it is (an additive bias);
* ``causal=True`` lets query i see keys j <= i only (aligned at the upper left,
  as PyTorch's ``is_causal``); it is combined with ``mask`` if both are given.

Fully masked rows: if a query may attend to no key (its row of S is all −∞, or
Lk = 0), the softmax is undefined (0/0). Here such a row's output is 0, not NaN,
so one padded query cannot poison a whole batch; gradients through it would be 0
too. NaN scores (from NaN inputs) still propagate as NaN.

Leading dimensions (batch, heads) broadcast like ``np.matmul``. This reference
materialises the whole (…, Lq, Lk) score matrix in float64.
"""

import numpy as np

from .softmax import softmax

__all__ = ["attention"]


def attention(q, k, v, mask=None, causal=False, scale=None):
    """Scaled dot-product attention: ``softmax(Q Kᵀ · scale + M) V``.

    Parameters
    ----------
    q : array_like, shape (..., Lq, D)
        Queries. Converted to float64.
    k : array_like, shape (..., Lk, D)
        Keys.
    v : array_like, shape (..., Lk, Dv)
        Values.
    mask : array_like, optional
        Broadcastable to (..., Lq, Lk). Boolean: True where query i may attend to
        key j. Floating point: added to the scores (use ``-inf`` to forbid).
    causal : bool, optional
        If True, query i attends only to keys j <= i (upper-left aligned).
    scale : float, optional
        Multiplies the scores. Default ``1 / √D``.

    Returns
    -------
    out : ndarray of float64, shape (..., Lq, Dv)
        The leading dimensions are those of q, k and v (and mask) broadcast
        together. A query that may attend to no key gets a row of zeros.

    Raises
    ------
    ValueError
        If an input has fewer than 2 dimensions, the feature sizes of q and k
        differ, k and v differ in length, or the mask does not broadcast.

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
    """
    name = "attention"
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
    lk = k.shape[-2]
    if scale is None:
        scale = 1.0 / np.sqrt(d) if d > 0 else 1.0

    # Scores S[..., i, j] = (q_i · k_j) · scale.                        shape (..., Lq, Lk)
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) * scale

    # Additive form of every mask: 0 where allowed, −∞ where not (or the user's bias).
    if mask is not None:
        mask = np.asarray(mask)
        try:
            np.broadcast_shapes(mask.shape, scores.shape[:-2] + (lq, lk))
        except ValueError:
            raise ValueError(
                f"{name}: mask has shape {mask.shape} (expected a shape that broadcasts "
                f"to (..., {lq}, {lk}))"
            ) from None
        if mask.dtype == np.bool_:
            scores = np.where(mask, scores, -np.inf)
        else:
            scores = scores + mask.astype(np.float64)
    if causal:
        # Query i may see key j iff j <= i (upper-left aligned lower triangle).
        allowed = np.tril(np.ones((lq, lk), dtype=bool))
        scores = np.where(allowed, scores, -np.inf)

    # P = softmax over the keys. A fully masked row (all −∞, or no keys) gives NaN
    # there; replace those weights by 0 so the row's output is 0. Rows that are NaN
    # for other reasons (NaN or +inf scores) keep their NaN.
    with np.errstate(invalid="ignore"):
        fully_masked = np.all(scores == -np.inf, axis=-1, keepdims=True)
    weights = np.where(fully_masked, 0.0, softmax(scores, axis=-1))

    # Output row i = Σ_j P[i, j] v_j.                                   shape (..., Lq, Dv)
    return np.matmul(weights, v)
