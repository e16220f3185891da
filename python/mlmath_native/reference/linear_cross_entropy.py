"""Linear layer + cross-entropy in one function, with its gradients (float64 reference).

The last layer of a language model and its loss: hidden states H (N tokens of width D)
go through a linear layer with weight W (V, D) and bias b (V,), as ``torch.nn.Linear``,
and the logits are scored against class-index targets t. This reference materialises
the (N, V) logits; the native kernel computes the same numbers chunk by chunk without
ever holding them.

Forward, per token n (w = weight_classes, all ones by default; ε = label_smoothing)::

    z   = H_n · Wᵀ + b                                    (V logits)
    u   = softcap · tanh(z / softcap)                       (u = z without softcap)
    x   = u / temperature
    lse = logsumexp(x) = m + log Σ_c exp(x_c − m),          m = max_c x_c
    lsm = x − lse,   p = softmax(x) = exp(lsm)

    ce_n = (1 − ε) · w[t_n] · (−lsm[t_n])  +  (ε / V) · Σ_c w_c · (−lsm[c])
    zl_n = lse²
    ce_n = zl_n = 0                                         where t_n == ignore_index

Reductions (``z_loss`` is the z-loss coefficient, "count" the number of tokens not
ignored)::

    "mean": loss   = Σ_n ce_n / Σ_{n not ignored} w[t_n]  +  z_loss · Σ_n zl_n / count
    "sum":  loss   = Σ_n ce_n + z_loss · Σ_n zl_n
    "none": loss_n = ce_n + z_loss · zl_n                    (hidden's leading shape)

"mean" is NaN when every token is ignored (0 / 0, as in PyTorch).

Backward. Both terms are written with the *effective target* q (the weighted, smoothed
one-hot target of ``reference.cross_entropy``)::

    q_c = (1 − ε) · w[t] · [c == t] + (ε / V) · w_c         (q = 0 for an ignored token)
    ce  = − Σ_c q_c · lsm_c          ∂ce/∂x_c = p_c · Σ_j q_j − q_c
    zl  = lse²                       ∂zl/∂x_c = 2 · lse · p_c

With g the upstream gradient (``grad_output``), the scales of the two terms are

    ============  =========================  ==================
    reduction     s_ce                       s_z
    ============  =========================  ==================
    "mean"        g / Σ_{not ignored} w[t]   g / count
    "sum"         g                          g
    "none"        g_n                        g_n
    ============  =========================  ==================

and the chain rule through temperature and softcap gives (rows of ignored tokens are 0)::

    dx_c = s_ce · (p_c · Σ_j q_j − q_c) + s_z · z_loss · 2 · lse · p_c
    du   = dx / temperature
    dz   = du · (1 − tanh(z / softcap)²)                    (dz = du without softcap)
    d_hidden = dZ · W,   d_weight = dZᵀ · H,   d_bias = Σ_n dZ_n

Extra outputs, forward values only (no gradient flows from them)::

    logprobs_n = lsm[t_n]                (0.0 for an ignored token)
    entropy_n  = − Σ_c p_c · lsm_c       (every token, ignored ones too)

Function: :func:`linear_cross_entropy`.
"""

import operator

import numpy as np

from .softmax import logsumexp

__all__ = ["linear_cross_entropy"]

_NAME = "linear_cross_entropy"
_REDUCTIONS = ("none", "mean", "sum")


def _float_array(value, arg):
    """``value`` as a float64 array; TypeError for bool, complex and non-numeric dtypes."""
    a = np.asarray(value)
    if a.dtype.kind in "bcOSUMm":
        raise TypeError(
            f"{_NAME}: {arg} has dtype {a.dtype} (expected a real floating-point array)"
        )
    return a.astype(np.float64)


def _real_scalar(value, arg):
    """A real scalar option (temperature, softcap, ...) as a Python float."""
    a = np.asarray(value)
    if a.shape != () or a.dtype.kind not in "fiu":
        raise TypeError(f"{_NAME}: {arg} must be a real number (got {value!r})")
    return float(a)


def linear_cross_entropy(
    hidden,
    weight,
    target,
    bias=None,
    *,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    weight_classes=None,
    z_loss=0.0,
    softcap=None,
    temperature=1.0,
    return_grad=False,
    return_logprobs=False,
    return_entropy=False,
    grad_output=None,
    chunk_size=None,
):
    """Cross-entropy of ``hidden @ weight.T + bias`` against class indices, in float64.

    Per token (see the module docstring for the full formulas and the gradients)::

        x    = softcap · tanh((H_n · Wᵀ + b) / softcap) / temperature
        ce_n = (1 − ε)·w[t_n]·(−log_softmax(x)[t_n]) + (ε/V)·Σ_c w_c·(−log_softmax(x)[c])
        loss_n = ce_n + z_loss · logsumexp(x)²             (0 where t_n == ignore_index)

    "mean" divides the ce part by ``Σ_{n not ignored} w[t_n]`` and the z-loss part by
    the number of tokens not ignored; "sum" adds; "none" keeps one value per token.

    Parameters
    ----------
    hidden : array_like, shape ``(..., D)``
        Hidden states, flattened to ``(N, D)``. Converted to float64.
    weight : array_like, shape ``(V, D)``
        The linear layer's weight, as in ``torch.nn.Linear``.
    target : array_like of int, shape ``(...)``
        Class indices in ``[0, V)`` or equal to ``ignore_index``, with hidden's
        leading shape.
    bias : array_like, shape ``(V,)``, optional
        The linear layer's bias. Default: none.
    ignore_index : int, optional
        Tokens whose target equals it contribute nothing to the loss, to the "mean"
        denominators or to the gradients. Default: -100.
    reduction : {"mean", "sum", "none"}, optional
        Default: "mean".
    label_smoothing : float, optional
        ε in ``[0, 1]``. Default: 0.
    weight_classes : array_like, shape ``(V,)``, optional
        Class weights w (``F.cross_entropy``'s ``weight``). Default: all ones.
    z_loss : float, optional
        Coefficient of the z-loss ``logsumexp(x)²``, finite and ≥ 0. Default: 0.
    softcap : float, optional
        Caps the logits to ``(−softcap, softcap)`` with ``softcap · tanh(z / softcap)``;
        finite and > 0. Default: no cap.
    temperature : float, optional
        Divides the (capped) logits; finite and > 0. Default: 1.
    return_grad : bool, optional
        Also return ``(d_hidden, d_weight, d_bias)``, the gradients of the loss times
        ``grad_output``; ``d_bias`` is None when ``bias`` is None.
    return_logprobs : bool, optional
        Also return ``log_softmax(x)[t_n]`` per token (0.0 for ignored tokens).
    return_entropy : bool, optional
        Also return the entropy ``−Σ_c p_c log p_c`` of every token's distribution.
    grad_output : array_like, optional
        The upstream gradient: a scalar for "mean" and "sum"; an array of the loss's
        shape, or a scalar for every token, for "none". Default: 1.
    chunk_size : int, optional
        Tokens per chunk in the native kernel; accepted and ignored here.

    Returns
    -------
    loss : numpy.float64 or ndarray
        A float64 scalar for "mean" and "sum", a float64 array of hidden's leading
        shape for "none". Returned alone when nothing else is asked for; otherwise the
        tuple ``(loss, [(d_hidden, d_weight, d_bias)], [logprobs], [entropy])`` with the
        bracketed items present when asked for, in this order. ``d_hidden`` has
        hidden's shape; logprobs and entropy have hidden's leading shape.

    Raises
    ------
    ValueError
        For mismatched shapes (hidden/weight D, bias or weight_classes V, target,
        grad_output), a target out of ``[0, V)`` that is not ``ignore_index``, an
        out-of-range option (temperature, softcap, z_loss, label_smoothing) or an
        unknown reduction.
    TypeError
        For a non-integer target or ``ignore_index``, non-numeric arrays or options.

    Examples
    --------
    >>> import numpy as np
    >>> hidden = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> weight = np.array([[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    >>> print(np.round(linear_cross_entropy(hidden, weight, [0, 2], reduction="none"), 4))
    [0.2395 1.0986]
    >>> loss, (d_hidden, d_weight, d_bias), logprobs = linear_cross_entropy(
    ...     hidden, weight, [0, -100], return_grad=True, return_logprobs=True)
    >>> print(round(float(loss), 4), d_bias, np.round(logprobs, 4))
    0.2395 None [-0.2395  0.    ]
    >>> print(np.round(d_hidden, 4))
    [[-0.426  0.   ]
     [ 0.     0.   ]]
    """
    del chunk_size  # a tuning knob of the native kernel: no effect on the result

    # ---- options ------------------------------------------------------------------
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"{_NAME}: reduction is invalid (got {reduction!r}, expected one of {_REDUCTIONS})"
        )
    ignore_index = operator.index(ignore_index)  # an int, as in PyTorch
    eps = _real_scalar(label_smoothing, "label_smoothing")
    if not 0.0 <= eps <= 1.0:  # also rejects NaN
        raise ValueError(
            f"{_NAME}: label_smoothing is out of range (got {label_smoothing!r}, "
            "expected a number in [0, 1])"
        )
    zl_coef = _real_scalar(z_loss, "z_loss")
    if not (np.isfinite(zl_coef) and zl_coef >= 0.0):
        raise ValueError(f"{_NAME}: z_loss must be finite and >= 0 (got {z_loss!r})")
    temp = _real_scalar(temperature, "temperature")
    if not (np.isfinite(temp) and temp > 0.0):
        raise ValueError(f"{_NAME}: temperature must be finite and > 0 (got {temperature!r})")
    cap = None
    if softcap is not None:
        cap = _real_scalar(softcap, "softcap")
        if not (np.isfinite(cap) and cap > 0.0):
            raise ValueError(f"{_NAME}: softcap must be None or finite and > 0 (got {softcap!r})")

    # ---- arrays and shapes ----------------------------------------------------------
    h = _float_array(hidden, "hidden")
    if h.ndim == 0:
        raise ValueError(f"{_NAME}: hidden is 0-d (expected shape (..., D))")
    lead_shape, d = h.shape[:-1], h.shape[-1]
    h2 = h.reshape(-1, d)  # (N, D)
    n = h2.shape[0]

    w_lin = _float_array(weight, "weight")
    if w_lin.ndim != 2:
        raise ValueError(f"{_NAME}: weight has shape {w_lin.shape} (expected (V, D), 2-D)")
    v = w_lin.shape[0]
    if w_lin.shape[1] != d:
        raise ValueError(
            f"{_NAME}: weight has shape {w_lin.shape} but hidden has D = {d} "
            f"(expected weight of shape (V, {d}))"
        )
    b = None
    if bias is not None:
        b = _float_array(bias, "bias")
        if b.shape != (v,):
            raise ValueError(
                f"{_NAME}: bias has shape {b.shape} (expected ({v},): one per row of weight)"
            )
    if weight_classes is None:
        wc = np.ones(v)
    else:
        wc = _float_array(weight_classes, "weight_classes")
        if wc.shape != (v,):
            raise ValueError(
                f"{_NAME}: weight_classes has shape {wc.shape} "
                f"(expected ({v},): one weight per class)"
            )

    t_arr = np.asarray(target)
    if t_arr.dtype.kind not in "iu":  # bool and floats too: class indices only
        raise TypeError(f"{_NAME}: target has dtype {t_arr.dtype} (expected integer class indices)")
    if t_arr.shape != lead_shape:
        raise ValueError(
            f"{_NAME}: target has shape {t_arr.shape} "
            f"(expected {lead_shape}: hidden's shape without its last axis)"
        )
    t_all = t_arr.reshape(n)
    active = t_all != ignore_index  # (N,) tokens that count
    bad = active & ((t_all < 0) | (t_all >= v))
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{_NAME}: target holds {t_all[i]} at flat position {i} but there are "
            f"{v} classes (expected [0, {v}) or ignore_index = {ignore_index})"
        )
    t = np.where(active, t_all, 0).astype(np.intp)  # a safe index where ignored

    # Upstream gradient, checked even when no gradient is asked for.
    if grad_output is None:
        g = np.float64(1.0)
    else:
        g = _float_array(grad_output, "grad_output")
        if reduction == "none" and g.shape not in ((), lead_shape):
            raise ValueError(
                f"{_NAME}: grad_output has shape {g.shape} (expected {lead_shape}, "
                "the loss's shape, or a scalar, for reduction='none')"
            )
        if reduction != "none" and g.shape != ():
            raise ValueError(
                f"{_NAME}: grad_output has shape {g.shape} "
                f"(expected (), a scalar, for reduction={reduction!r})"
            )

    # ---- forward --------------------------------------------------------------------
    z = h2 @ w_lin.T  # (N, V) logits
    if b is not None:
        z = z + b
    if cap is not None:
        tanh_z = np.tanh(z / cap)
        u = cap * tanh_z
    else:
        u = z
    x = u / temp
    lse = logsumexp(x, axis=-1, keepdims=True)  # (N, 1), stable: max subtracted first
    lsm = x - lse  # log_softmax
    p = np.exp(lsm)  # softmax
    lse = lse[:, 0]

    # Effective target q (N, V): (1 − ε)·w[t]·onehot(t) + (ε/V)·w, zero rows where ignored.
    w_t = np.where(active, wc[t], 0.0)  # w[t_n], 0 for ignored tokens
    onehot = np.zeros((n, v))
    onehot[np.arange(n), t] = 1.0
    eps_over_v = eps / v if v else 0.0
    q = (1.0 - eps) * w_t[:, None] * onehot + eps_over_v * wc[None, :]
    q = q * active[:, None]

    # ce_n = Σ_c q_c · (−lsm_c), a term with q_c = 0 being exactly 0.
    with np.errstate(invalid="ignore"):  # 0 · inf in the discarded branch
        ce = np.sum(np.where(q != 0.0, q * -lsm, 0.0), axis=-1)
    zl = np.where(active, lse * lse, 0.0)  # lse², 0 for ignored tokens

    ce_denominator = np.sum(w_t)  # Σ_{n not ignored} w[t_n]
    count = np.float64(np.count_nonzero(active))
    with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0 = NaN is intended
        if reduction == "none":
            loss = ce + zl_coef * zl if zl_coef else ce
            loss = loss.reshape(lead_shape)
        elif reduction == "sum":
            loss = np.sum(ce) + (zl_coef * np.sum(zl) if zl_coef else 0.0)
            loss = np.float64(loss)
        else:
            loss = np.sum(ce) / ce_denominator
            if zl_coef:
                loss = loss + zl_coef * np.sum(zl) / count
            loss = np.float64(loss)

    extras = []

    # ---- backward -------------------------------------------------------------------
    if return_grad:
        # The per-token scales s_ce and s_z, shape (N,).
        g_tok = np.broadcast_to(np.reshape(g, (-1,)) if g.ndim else g, (n,))
        with np.errstate(invalid="ignore", divide="ignore"):
            if reduction == "mean":
                s_ce = g_tok / ce_denominator
                s_z = g_tok / count
            else:
                s_ce = s_z = g_tok
            dx = s_ce[:, None] * (p * np.sum(q, axis=-1, keepdims=True) - q)
            if zl_coef:
                dx = dx + (s_z * zl_coef * 2.0 * lse)[:, None] * p
        # Ignored tokens have no gradient at all (not inf · 0 = NaN when nothing counts).
        dx = np.where(active[:, None], dx, 0.0)
        du = dx / temp
        dz = du * (1.0 - tanh_z * tanh_z) if cap is not None else du
        d_hidden = (dz @ w_lin).reshape(h.shape)
        d_weight = dz.T @ h2
        d_bias = np.sum(dz, axis=0) if b is not None else None
        extras.append((d_hidden, d_weight, d_bias))

    if return_logprobs:
        lp = np.where(active, lsm[np.arange(n), t], 0.0)
        extras.append(lp.reshape(lead_shape))

    if return_entropy:
        # −Σ_c p_c · lsm_c, with 0 · log 0 := 0.
        with np.errstate(invalid="ignore"):  # 0 · (−inf) in the discarded branch
            ent = -np.sum(np.where(p != 0.0, p * lsm, 0.0), axis=-1)
        extras.append(ent.reshape(lead_shape))

    if not extras:
        return loss
    return (loss, *extras)
