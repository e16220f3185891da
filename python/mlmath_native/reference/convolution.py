"""Convolution as used in CNNs, i.e. cross-correlation, and SciPy's 2-D correlation (float64).

Formula (the seed's, "valid" positions only)::

    O(i, j) = Σ_m Σ_n I(i + m, j + n) · K(m, n)

    0 <= m < kh,  0 <= n < kw,   0 <= i <= H − kh,  0 <= j <= W − kw

The kernel K slides over the image I; each output is the dot product of K with
the image window under it. The kernel is *not* flipped, so strictly this is
cross-correlation, which is what deep-learning libraries call "convolution"
(a true convolution would use K(kh−1−m, kw−1−n)). Output size: (H − kh + 1, W − kw + 1).
It is :func:`correlate2d_valid`, and ``correlate2d(I, K, mode="valid")``.

The CNN layer (PyTorch ``conv2d`` / ``conv1d``)
-----------------------------------------------
NCHW layout, with stride (sh, sw), dilation (dh, dw) and G groups::

    out[b, k, i, j] = bias[k]
                      + Σ_c Σ_r Σ_s x_pad[b, g·C/G + c, i·sh + r·dh, j·sw + s·dw] · w[k, c, r, s]

    g = k // (K/G)   the group of output channel k;   0 <= c < C/G,  0 <= r < R,  0 <= s < S

    x: (N, C, H, W)   w: (K, C/G, R, S)   bias: (K,)   out: (N, K, Ho, Wo)
    Ho = ⌊(H + top + bottom − dh·(R − 1) − 1) / sh⌋ + 1        (Wo likewise)

Group g sees only input channels [g·C/G, (g+1)·C/G) and produces output channels
[g·K/G, (g+1)·K/G); G = 1 is the dense layer, G = C (with K a multiple of C) the
depthwise one. Dilation spreads the taps dh rows apart, so the kernel covers
dh·(R − 1) + 1 rows. ``conv1d`` is the same with one spatial axis (x: (N, C, L),
w: (K, C/G, R)); both also take an unbatched input (no N axis).

x_pad is x with (top, bottom) rows and (left, right) columns added, filled by the
padding mode (shown for a row a b c d padded by 2 on each side, as ``np.pad`` does)::

    "zeros"       0 0 | a b c d | 0 0
    "reflect"     c b | a b c d | c b      mirrored, edge not repeated  (np.pad "reflect")
    "replicate"   a a | a b c d | d d      edge repeated                (np.pad "edge")
    "circular"    c d | a b c d | a b      periodic                     (np.pad "wrap")

Note [same padding]
~~~~~~~~~~~~~~~~~~~
``padding="same"`` makes Ho = ⌈H / sh⌉ (the TensorFlow/XLA rule), for any stride and
dilation::

    total  = max((Ho − 1)·sh + dh·(R − 1) + 1 − H, 0)
    top    = ⌊total / 2⌋,   bottom = total − top        (the odd row goes to the bottom)

and likewise for the columns (the odd column goes right). With stride 1 it is
PyTorch's ``padding="same"`` (total = dh·(R − 1)), which PyTorch allows only there.

SciPy's 2-D correlation and convolution (``scipy.signal``)
----------------------------------------------------------
For an image I of shape (H, W) and a kernel K of shape (R, S), the "full"
correlation takes every placement where K overlaps I at least partly, I being
extended beyond its edges by the boundary rule::

    full[i, j] = Σ_m Σ_n I_ext(i + m − (R − 1), j + n − (S − 1)) · K(m, n)

    0 <= i < H + R − 1,   0 <= j < W + S − 1

    "fill"  I_ext = fillvalue outside I              (np.pad "constant")
    "wrap"  I_ext(i, j) = I(i mod H, j mod W)        (np.pad "wrap")
    "symm"  mirrored, edge repeated: b a | a b c | c b   (np.pad "symmetric")

and the three modes are windows of it::

    "full"    full                                            (H + R − 1, W + S − 1)
    "valid"   full[R − 1 : H, S − 1 : W]   (the seed formula)  (H − R + 1, W − S + 1)
    "same"    full[R // 2 : R // 2 + H, S // 2 : S // 2 + W]  (H, W)

Convolution flips the kernel: ``convolve2d(I, K)`` is the correlation with
K[::-1, ::-1], but its "same" window starts at ((R − 1) // 2, (S − 1) // 2) of that
full output. The two starts differ by one for an even kernel size (SciPy centres
them so; for odd sizes both are (R − 1) / 2), so that in "same" mode both keep the
image unchanged under a delta kernel at ((R − 1) // 2, (S − 1) // 2).

In "valid" mode, if K is at least as large as I in every dimension (and I is not at
least as large as K), the two are swapped, and the correlation of the swapped pair
is flipped in both axes (SciPy's rule); if neither contains the other it is an error.

Gradients
~~~~~~~~~
For ``L = Σ grad_out · out`` (grad_out = ∂L/∂out), out being linear in each of
bias, w and x_pad::

    ∂L/∂bias[k]       = Σ_b Σ_i Σ_j grad_out[b, k, i, j]
    ∂L/∂w[k, c, r, s] = Σ_b Σ_i Σ_j grad_out[b, k, i, j] · x_pad[b, P]
    ∂L/∂x_pad[b, P]  +=  grad_out[b, k, i, j] · w[k, c, r, s]      for every k, c, r, s, i, j

    P = (g·C/G + c,  i·sh + r·dh,  j·sw + s·dw),   g = k // (K/G)

The last is a scatter-add: every (k, i, j, r, s) adds onto the position it read.
∂L/∂x is the adjoint of the padding applied to ∂L/∂x_pad: a padded position is a
copy of one input position (reflect, replicate, circular), whose gradient it adds
onto, or a zero that depends on nothing (Note [padding adjoint] at ``_pad_adjoint``)::

    row a b c d padded by 2, replicate:   a a | a b c d | d d
    ∂L/∂x_pad                             p q | t u v w | y z
    ∂L/∂x                                     p+q+t  u  v  w+y+z

Functions: :func:`correlate2d_valid` (the seed formula), :func:`conv2d`,
:func:`conv1d`, :func:`conv2d_backward`, :func:`conv1d_backward`,
:func:`correlate2d`, :func:`convolve2d`. Every one is a direct float64 sum over the
kernel taps, written for small inputs.
"""

import operator
from typing import NamedTuple

import numpy as np

__all__ = [
    "correlate2d_valid",
    "conv2d",
    "conv1d",
    "conv2d_backward",
    "conv1d_backward",
    "correlate2d",
    "convolve2d",
]


def correlate2d_valid(image, kernel):
    """2-D cross-correlation over the valid positions: ``O(i,j) = Σ_m Σ_n I(i+m,j+n) K(m,n)``.

    Written as a plain loop over output positions, for small inputs. Matches
    ``scipy.signal.correlate2d(image, kernel, mode="valid")`` when the kernel is no
    larger than the image.

    Parameters
    ----------
    image : array_like, shape (H, W)
        Input I. Converted to float64.
    kernel : array_like, shape (kh, kw)
        Kernel K, with ``1 <= kh <= H`` and ``1 <= kw <= W``.

    Returns
    -------
    out : ndarray of float64, shape (H − kh + 1, W − kw + 1)

    Raises
    ------
    ValueError
        If either input is not 2-D, the kernel is empty, or it is larger than the image.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.arange(16.0).reshape(4, 4)
    >>> print(correlate2d_valid(image, [[1.0, 0.0], [0.0, -1.0]]))
    [[-5. -5. -5.]
     [-5. -5. -5.]
     [-5. -5. -5.]]
    """
    name = "correlate2d_valid"
    image = np.asarray(image, dtype=np.float64)
    kernel = np.asarray(kernel, dtype=np.float64)
    for arg, arr in (("image", image), ("kernel", kernel)):
        if arr.ndim != 2:
            raise ValueError(f"{name}: {arg} has {arr.ndim} dimensions (expected 2)")
    (h, w), (kh, kw) = image.shape, kernel.shape
    if not (1 <= kh <= h and 1 <= kw <= w):
        raise ValueError(
            f"{name}: kernel has shape {kernel.shape} (expected a non-empty kernel no larger "
            f"than the image, {image.shape})"
        )

    out = np.zeros((h - kh + 1, w - kw + 1), dtype=np.float64)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            window = image[i : i + kh, j : j + kw]  # I(i+m, j+n) for all m, n
            out[i, j] = np.sum(window * kernel)  # Σ_m Σ_n I(i+m, j+n) K(m, n)
    return out


# --------------------------------------------------------------------------------------
# Argument checks shared by the functions below
# --------------------------------------------------------------------------------------


def _real_array(name, arg, value):
    """``value`` as a float64 array; bool, integer and floating dtypes only."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise TypeError(
            f"{name}: {arg} has dtype {arr.dtype} "
            "(expected a real dtype: bool, integer or floating point)"
        )
    return arr.astype(np.float64)


def _as_int(name, arg, value, rule):
    """``value`` as a Python int (no floats, as in PyTorch)."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name}: {arg} is not an integer (got {value!r}, expected {rule})"
        ) from None


def _int_tuple(name, arg, value, nd, minimum):
    """An int, or 1 or ``nd`` ints (stride, dilation; one is repeated, as PyTorch does), as an
    ``nd``-tuple, each >= ``minimum``."""
    rule = f"an int, or 1 or {nd} ints, each >= {minimum}"
    if isinstance(value, (tuple, list)):
        if len(value) == 1:
            value = tuple(value) * nd
        if len(value) != nd:
            raise ValueError(
                f"{name}: {arg} has {len(value)} entries (got {value!r}, expected {rule})"
            )
        values = tuple(_as_int(name, arg, v, rule) for v in value)
    else:
        values = (_as_int(name, arg, value, rule),) * nd
    if min(values) < minimum:
        raise ValueError(f"{name}: {arg} is too small (got {value!r}, expected {rule})")
    return values


def _same_padding(size, ksize, stride, dilation):
    """Note [same padding]: (before, after) per axis so that n_out = ⌈n_in / stride⌉."""
    pads = []
    for n_in, r, s, d in zip(size, ksize, stride, dilation, strict=True):
        n_out = -(-n_in // s)  # ⌈n_in / s⌉
        total = max((n_out - 1) * s + d * (r - 1) + 1 - n_in, 0)
        pads.append((total // 2, total - total // 2))  # the odd pixel goes after
    return tuple(pads)


def _padding(name, padding, nd, size, ksize, stride, dilation):
    """(before, after) per spatial axis from an int, a tuple, "valid" or "same"."""
    rule = (
        f"an int, 1 or {nd} ints (one per axis), {2 * nd} ints (before and after each axis), "
        "'valid' or 'same'"
    )
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * nd
        if padding == "same":
            return _same_padding(size, ksize, stride, dilation)
        raise ValueError(f"{name}: padding is invalid (got {padding!r}, expected {rule})")
    if isinstance(padding, (tuple, list)):
        values = [_as_int(name, "padding", p, rule) for p in padding]
        if len(values) == 1:  # one for every axis, as PyTorch repeats it
            values = values * nd
        if len(values) == nd:  # symmetric: (ph, pw)
            pads = tuple((p, p) for p in values)
        elif len(values) == 2 * nd:  # (top, bottom, left, right)
            pads = tuple((values[2 * a], values[2 * a + 1]) for a in range(nd))
        else:
            raise ValueError(
                f"{name}: padding has {len(values)} entries (got {padding!r}, expected {rule})"
            )
    else:
        p = _as_int(name, "padding", padding, rule)
        pads = ((p, p),) * nd
    if min(min(pair) for pair in pads) < 0:
        raise ValueError(f"{name}: padding is negative (got {padding!r}, expected values >= 0)")
    return pads


# padding_mode (PyTorch) -> np.pad mode
_PADDING_MODES = {
    "zeros": "constant",
    "reflect": "reflect",
    "replicate": "edge",
    "circular": "wrap",
}


# --------------------------------------------------------------------------------------
# The CNN layer
# --------------------------------------------------------------------------------------


class _ConvArgs(NamedTuple):
    """The checked arguments of a convolution (x always batched)."""

    x: np.ndarray  # (N, C, *size), float64
    w: np.ndarray  # (K, C/G, *ksize), float64
    bias: np.ndarray | None  # (K,) or None
    unbatched: bool  # x came without its N axis
    stride: tuple
    pads: tuple  # (before, after) per spatial axis
    dilation: tuple
    groups: int
    np_mode: str  # the np.pad mode of padding_mode
    out_size: tuple  # (Ho, Wo) or (Lo,)


def _conv_args(name, x, w, bias, stride, padding, dilation, groups, padding_mode, nd):
    """The checks shared by conv1d/conv2d (nd = 1, 2) and their backward functions."""
    layout = "(N, C, H, W)" if nd == 2 else "(N, C, L)"
    w_layout = "(K, C/groups, R, S)" if nd == 2 else "(K, C/groups, R)"
    x = _real_array(name, "x", x)
    w = _real_array(name, "w", w)
    if x.ndim not in (nd + 1, nd + 2):
        raise ValueError(
            f"{name}: x has {x.ndim} dimensions (expected {nd + 2}: {layout}, "
            f"or {nd + 1} for an unbatched input without N)"
        )
    unbatched = x.ndim == nd + 1
    if unbatched:
        x = x[np.newaxis]  # a batch of one, dropped again at the end
    if w.ndim != nd + 2:
        raise ValueError(f"{name}: w has {w.ndim} dimensions (expected {nd + 2}: {w_layout})")
    c, size = x.shape[1], x.shape[2:]
    k, c_per_group, ksize = w.shape[0], w.shape[1], w.shape[2:]

    groups = _as_int(name, "groups", groups, "an int >= 1")
    if groups < 1:
        raise ValueError(f"{name}: groups is too small (got {groups}, expected an int >= 1)")
    if c != c_per_group * groups:
        raise ValueError(
            f"{name}: w has {c_per_group} input channels per group (got w of shape {w.shape} "
            f"and groups={groups}, expected C/groups = {c}/{groups} for x of shape {x.shape})"
        )
    if k % groups:
        raise ValueError(
            f"{name}: w has {k} output channels (got shape {w.shape}, expected a multiple "
            f"of groups={groups})"
        )
    if min(size) < 1:
        raise ValueError(
            f"{name}: x has an empty spatial dimension (got shape {x.shape}, expected "
            "every spatial size >= 1)"
        )
    if min(ksize) < 1:
        raise ValueError(
            f"{name}: w has an empty kernel (got shape {w.shape}, expected every kernel size >= 1)"
        )
    stride = _int_tuple(name, "stride", stride, nd, 1)
    dilation = _int_tuple(name, "dilation", dilation, nd, 1)
    if not isinstance(padding_mode, str) or padding_mode not in _PADDING_MODES:
        raise ValueError(
            f"{name}: padding_mode is invalid (got {padding_mode!r}, "
            f"expected one of {tuple(_PADDING_MODES)})"
        )
    pads = _padding(name, padding, nd, size, ksize, stride, dilation)
    if padding_mode == "reflect":
        for axis, (pad, n_in) in enumerate(zip(pads, size, strict=True)):
            if max(pad) >= n_in:
                raise ValueError(
                    f"{name}: padding is too large for padding_mode='reflect' (got {pad} on "
                    f"spatial axis {axis} of size {n_in}, expected each side < {n_in}, "
                    "as PyTorch requires)"
                )
    if bias is not None:
        bias = _real_array(name, "bias", bias)
        if bias.shape != (k,):
            raise ValueError(
                f"{name}: bias has shape {bias.shape} (expected ({k},): one per output channel)"
            )

    # Output size per axis: ⌊(n + before + after − d·(r − 1) − 1) / s⌋ + 1.
    out_size = tuple(
        (n_in + before + after - d * (r - 1) - 1) // s + 1
        for n_in, (before, after), r, s, d in zip(size, pads, ksize, stride, dilation, strict=True)
    )
    if min(out_size) < 1:
        padded = tuple(
            n_in + before + after for n_in, (before, after) in zip(size, pads, strict=True)
        )
        extent = tuple(d * (r - 1) + 1 for r, d in zip(ksize, dilation, strict=True))
        raise ValueError(
            f"{name}: w has a kernel larger than the padded input (got kernel size {ksize}, "
            f"spanning {extent} with dilation {dilation}, expected at most the padded input "
            f"size {padded})"
        )

    return _ConvArgs(
        x,
        w,
        bias,
        unbatched,
        stride,
        pads,
        dilation,
        groups,
        _PADDING_MODES[padding_mode],
        out_size,
    )


def _tap_window(tap, stride, dilation, out_size):
    """The x_pad positions that kernel tap (r, s) meets: rows i·sh + r·dh for i < Ho, etc.

    One strided slice per spatial axis; within a slice no position repeats.
    """
    return tuple(
        slice(t * d, t * d + s * (o - 1) + 1, s)
        for t, s, d, o in zip(tap, stride, dilation, out_size, strict=True)
    )


def _conv(name, x, w, bias, stride, padding, dilation, groups, padding_mode, nd):
    """conv1d (nd = 1) and conv2d (nd = 2): the checks, then the direct sum over taps."""
    a = _conv_args(name, x, w, bias, stride, padding, dilation, groups, padding_mode, nd)
    (n, c), (k, ksize) = a.x.shape[:2], (a.w.shape[0], a.w.shape[2:])

    # x_pad: x with the padding added on both sides of each spatial axis.
    x_pad = np.pad(a.x, ((0, 0), (0, 0), *a.pads), mode=a.np_mode)  # zeros: constant 0

    out = np.zeros((n, k, *a.out_size), dtype=np.float64)
    c_g, k_g = c // a.groups, k // a.groups  # channels per group, in and out
    for tap in np.ndindex(*ksize):  # (r, s) for conv2d, (r,) for conv1d
        # The input pixels that this tap meets at every output position:
        # x_pad[b, :, i·sh + r·dh, j·sw + s·dw] for i < Ho, j < Wo.      shape (N, C, Ho, Wo)
        window = _tap_window(tap, a.stride, a.dilation, a.out_size)
        patch = x_pad[(slice(None), slice(None), *window)]
        for g in range(a.groups):
            cin = slice(g * c_g, (g + 1) * c_g)  # the input channels of group g
            kout = slice(g * k_g, (g + 1) * k_g)  # its output channels
            # Σ_c patch[b, g·C/G + c, i, j] · w[k, c, tap]                shape (N, K/G, Ho, Wo)
            out[:, kout] += np.einsum(
                "bc...,kc->bk...", patch[:, cin], a.w[(kout, slice(None), *tap)]
            )
    if a.bias is not None:
        out += a.bias.reshape((k,) + (1,) * nd)  # bias[k] on every position of channel k
    return out[0] if a.unbatched else out


def _pad_adjoint(grad_xp, pads, mode, input_shape):
    """The adjoint of ``np.pad(x, (..., *pads), mode)``: ∂L/∂x from ∂L/∂x_pad.

    Note [padding adjoint]: every position of x_pad is a copy of one position of x
    (reflect, edge, wrap) or a constant zero that depends on nothing ("constant"),
    so ∂L/∂x[q] is the sum of ∂L/∂x_pad[p] over the positions p that copy q. np.pad
    pads axis by axis, each by a map of that axis alone, x_pad[.., p, p'] =
    x[.., src[p], src'[p']], and padding np.arange(n) itself gives src (with -1 in
    a constant padding: no source). ``pads`` is (before, after) for each of the last
    ``len(pads)`` axes; ``mode`` is the np.pad mode.
    """
    lead = (slice(None),) * (len(input_shape) - len(pads))  # N and C: not padded
    sources, kept = [], []
    for (before, after), n in zip(pads, input_shape[len(lead) :], strict=True):
        fill = {"constant_values": -1} if mode == "constant" else {}
        src = np.pad(np.arange(n), (before, after), mode=mode, **fill)  # src[p], length n_pad
        keep = np.flatnonzero(src >= 0)  # the padded positions that copy some x position
        kept.append(keep)
        sources.append(src[keep])
    grad_x = np.zeros(input_shape, dtype=np.float64)
    # grad_x[.., src[p], src'[p']] += grad_xp[.., p, p'] over the kept p, p'. np.add.at adds
    # every copy (a fancy-index += would keep only one of the repeated sources).
    np.add.at(grad_x, lead + np.ix_(*sources), grad_xp[lead + np.ix_(*kept)])
    return grad_x


_NEEDS = ("input", "weight", "bias")


def _needs(name, needs):
    """``needs`` as a set of names from _NEEDS (a single name may come as a string)."""
    rule = f"a subset of {_NEEDS}"
    if isinstance(needs, str):
        needs = (needs,)
    try:
        names = tuple(needs)
    except TypeError:
        raise ValueError(
            f"{name}: needs is not a collection of names (got {needs!r}, expected {rule})"
        ) from None
    for entry in names:
        if not (isinstance(entry, str) and entry in _NEEDS):
            raise ValueError(f"{name}: needs holds {entry!r} (got {needs!r}, expected {rule})")
    return frozenset(names)


def _conv_backward(
    name, x, w, grad_out, stride, padding, dilation, groups, padding_mode, needs, nd
):
    """conv1d_backward and conv2d_backward: the gradients of Σ grad_out · conv(x, w, bias)."""
    needs = _needs(name, needs)
    a = _conv_args(name, x, w, None, stride, padding, dilation, groups, padding_mode, nd)
    (n, c), (k, ksize) = a.x.shape[:2], (a.w.shape[0], a.w.shape[2:])
    grad_out = _real_array(name, "grad_out", grad_out)
    expected = (k, *a.out_size) if a.unbatched else (n, k, *a.out_size)
    if grad_out.shape != expected:
        raise ValueError(
            f"{name}: grad_out has shape {grad_out.shape} (expected {expected}, the shape of "
            "the forward output)"
        )
    if a.unbatched:
        grad_out = grad_out[np.newaxis]  #                                  shape (N, K, Ho, Wo)

    # ∂L/∂bias[k] = Σ_b Σ_i Σ_j grad_out[b, k, i, j]
    summed = (0, *range(2, nd + 2))  # the axes b, i, j of grad_out (and of a patch)
    grad_bias = grad_out.sum(axis=summed) if "bias" in needs else None

    x_pad = np.pad(a.x, ((0, 0), (0, 0), *a.pads), mode=a.np_mode)  # as in the forward
    grad_w = np.zeros_like(a.w) if "weight" in needs else None  # (K, C/G, R, S)
    grad_xp = np.zeros_like(x_pad) if "input" in needs else None  # (N, C, H + pads, W + pads)
    c_g, k_g = c // a.groups, k // a.groups  # channels per group, in and out
    for tap in np.ndindex(*ksize):  # (r, s) for conv2d, (r,) for conv1d
        # The x_pad positions i·sh + r·dh, j·sw + s·dw that tap (r, s) meets, i < Ho, j < Wo.
        window = _tap_window(tap, a.stride, a.dilation, a.out_size)
        for g in range(a.groups):
            cin = slice(g * c_g, (g + 1) * c_g)  # the input channels of group g
            kout = slice(g * k_g, (g + 1) * k_g)  # its output channels
            dy = grad_out[:, kout]  #                                      shape (N, K/G, Ho, Wo)
            patch = (slice(None), cin, *window)  # x_pad[b, g·C/G + c, i·sh + r·dh, j·sw + s·dw]
            w_tap = (kout, slice(None), *tap)  # w[k, c, r, s] for k in group g  (K/G, C/G)
            if grad_w is not None:
                # ∂L/∂w[k, c, r, s] = Σ_b Σ_i Σ_j grad_out[b, k, i, j] · patch[b, c, i, j]
                grad_w[w_tap] = np.tensordot(dy, x_pad[patch], axes=(summed, summed))
            if grad_xp is not None:
                # Scatter: ∂L/∂patch[b, c, i, j] += Σ_k grad_out[b, k, i, j] · w[k, c, r, s]
                # (one slice holds no position twice; the taps overlap and add up in turn)
                grad_xp[patch] += np.einsum("bk...,kc->bc...", dy, a.w[w_tap])

    grad_input = None
    if grad_xp is not None:
        grad_input = _pad_adjoint(grad_xp, a.pads, a.np_mode, a.x.shape)  # Note [padding adjoint]
        if a.unbatched:
            grad_input = grad_input[0]
    return grad_input, grad_w, grad_bias


def conv2d(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """2-D convolution layer (cross-correlation) in PyTorch NCHW semantics.

    ``out[b,k,i,j] = bias[k] + Σ_c Σ_r Σ_s x_pad[b, g·C/G+c, i·sh+r·dh, j·sw+s·dw]·w[k,c,r,s]``
    with ``g = k // (K/G)`` (see the module docstring).

    Written as a direct sum: one loop over the R·S kernel taps, each adding a
    strided slice of the padded input times that tap's (K/G, C/G) weight matrix,
    group by group. Matches ``torch.nn.functional.conv2d`` (and ``torch.nn.Conv2d``
    for the padding modes), except that ``padding="same"`` also works with strides.

    Parameters
    ----------
    x : array_like, shape (N, C, H, W) or (C, H, W)
        Input batch, or one unbatched input. Converted to float64. N may be 0.
    w : array_like, shape (K, C/groups, R, S)
        Weights: K output channels, C/groups input channels each, an R×S kernel.
    bias : array_like, shape (K,), optional
        Added to every position of output channel k.
    stride : int or (int, int), optional
        Step (sh, sw) between output positions, each >= 1. Default 1.
    padding : int, (int, int), (int, int, int, int), "valid" or "same", optional
        Rows and columns added around the input, each >= 0: an int for all four
        sides, (ph, pw) for top/bottom and left/right, or (top, bottom, left, right)
        (note: ``torch.nn.functional.pad`` orders them (left, right, top, bottom)).
        "valid" is 0. "same" pads so that Ho = ⌈H / sh⌉, Wo = ⌈W / sw⌉, the odd
        pixel at the bottom/right (Note [same padding]). Default 0.
    dilation : int or (int, int), optional
        Spacing (dh, dw) between kernel taps, each >= 1. Default 1.
    groups : int, optional
        G >= 1, dividing C and K: group g maps input channels [g·C/G, (g+1)·C/G) to
        output channels [g·K/G, (g+1)·K/G). Default 1.
    padding_mode : {"zeros", "reflect", "replicate", "circular"}, optional
        What the padding holds: zeros, the input mirrored about its edge pixel
        (each pad < the input size), the edge pixel repeated, or the input
        repeated periodically (a pad larger than the input wraps around again,
        which PyTorch refuses). Default "zeros".

    Returns
    -------
    out : ndarray of float64, shape (N, K, Ho, Wo), or (K, Ho, Wo) for an unbatched x
        ``Ho = (H + top + bottom − dh·(R − 1) − 1) // sh + 1``, Wo likewise.

    Raises
    ------
    ValueError
        For wrong dimensions, channels that do not match ``groups`` (C != w.shape[1]·G,
        or K not a multiple of G), an empty kernel or spatial size, a bias of the wrong
        shape, a stride, dilation or groups < 1, a negative or malformed padding, an
        unknown padding string or padding_mode, a reflect padding >= the input size,
        or a kernel larger than the padded input.
    TypeError
        For a non-real dtype (complex, object, string) or a non-integer stride,
        padding, dilation or groups.

    Examples
    --------
    A 3×3 delta kernel with padding 1 returns the input unchanged:

    >>> import numpy as np
    >>> x = np.arange(9.0).reshape(1, 1, 3, 3)
    >>> delta = np.zeros((1, 1, 3, 3)); delta[0, 0, 1, 1] = 1.0
    >>> print(np.array_equal(conv2d(x, delta, padding=1), x))
    True
    >>> print(conv2d(x, np.ones((1, 1, 2, 2)), bias=[0.5], stride=2, padding=1)[0, 0])
    [[ 0.5  3.5]
     [ 9.5 24.5]]

    "same" with stride 2 on an unbatched 4×4 input: a 2×2 output, the one padded
    row and column at the bottom and right:

    >>> print(conv2d(np.ones((1, 4, 4)), np.ones((1, 1, 3, 3)), stride=2, padding="same"))
    [[[9. 6.]
      [6. 4.]]]
    """
    return _conv("conv2d", x, w, bias, stride, padding, dilation, groups, padding_mode, nd=2)


def conv1d(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """1-D convolution layer (cross-correlation) in PyTorch NCL semantics.

    ``out[b, k, i] = bias[k] + Σ_c Σ_r x_pad[b, g·C/G + c, i·s + r·d] · w[k, c, r]``
    with ``g = k // (K/G)``: :func:`conv2d` with one spatial axis.

    Parameters
    ----------
    x : array_like, shape (N, C, L) or (C, L)
        Input batch, or one unbatched input. Converted to float64. N may be 0.
    w : array_like, shape (K, C/groups, R)
        Weights.
    bias : array_like, shape (K,), optional
        Added to every position of output channel k.
    stride, dilation : int or (int,), optional
        Each >= 1. Default 1.
    padding : int, (int,), (int, int), "valid" or "same", optional
        An int or (p,) for both ends, (left, right), "valid" (0) or "same"
        (Lo = ⌈L / stride⌉, the odd pixel on the right). Default 0.
    groups : int, optional
        As in :func:`conv2d`. Default 1.
    padding_mode : {"zeros", "reflect", "replicate", "circular"}, optional
        As in :func:`conv2d`. Default "zeros".

    Returns
    -------
    out : ndarray of float64, shape (N, K, Lo), or (K, Lo) for an unbatched x
        ``Lo = (L + left + right − d·(R − 1) − 1) // s + 1``.

    Raises
    ------
    ValueError, TypeError
        As :func:`conv2d`.

    Examples
    --------
    >>> x = [[1.0, 2.0, 3.0]]  # unbatched: C = 1, L = 3
    >>> print(conv1d(x, [[[1.0, 1.0]]], padding=1))
    [[1. 3. 5. 3.]]
    >>> print(conv1d(x, [[[1.0, 1.0]]], padding=1, padding_mode="reflect"))
    [[3. 3. 5. 5.]]
    >>> print(conv1d(x, [[[1.0, 1.0]]], padding=1, padding_mode="circular"))
    [[4. 3. 5. 4.]]
    """
    return _conv("conv1d", x, w, bias, stride, padding, dilation, groups, padding_mode, nd=1)


def conv2d_backward(
    x,
    w,
    grad_out,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    padding_mode="zeros",
    needs=("input", "weight", "bias"),
):
    """Gradients of :func:`conv2d`: ∂L/∂x, ∂L/∂w and ∂L/∂bias for ``L = Σ grad_out · out``.

    With ``out = conv2d(x, w, bias, ...)`` and x_pad the padded input (module docstring)::

        ∂L/∂bias[k]       = Σ_b Σ_i Σ_j grad_out[b, k, i, j]
        ∂L/∂w[k, c, r, s] = Σ_b Σ_i Σ_j grad_out[b, k, i, j] · x_pad[b, P]
        ∂L/∂x_pad[b, P]  +=  grad_out[b, k, i, j] · w[k, c, r, s]     for every k, c, r, s, i, j

        P = (g·C/G + c,  i·sh + r·dh,  j·sw + s·dw),   g = k // (K/G)

    (the scatter-add sums every term that reaches a position); ∂L/∂x is
    ∂L/∂x_pad with each padded position's gradient added onto the input position it
    copies (reflect, replicate, circular) or dropped (zeros) (Note [padding adjoint]).
    The bias does not enter any of them, so it is not an argument.

    Written as :func:`conv2d` is: one loop over the kernel taps and the groups, each
    an einsum over a strided slice (a scatter-add into ∂L/∂x_pad). Matches PyTorch's
    autograd of ``torch.nn.functional.conv2d`` (and ``torch.nn.Conv2d``).

    Parameters
    ----------
    x : array_like, shape (N, C, H, W) or (C, H, W)
        The forward input. Converted to float64.
    w : array_like, shape (K, C/groups, R, S)
        The forward weights.
    grad_out : array_like, shape (N, K, Ho, Wo), or (K, Ho, Wo) for an unbatched x
        ∂L/∂out, of the forward output's shape.
    stride, padding, dilation, groups, padding_mode
        As in :func:`conv2d`.
    needs : collection of {"input", "weight", "bias"}, optional
        The gradients to compute (a single name may be given as a string); the
        others are returned as None. Default: all three.

    Returns
    -------
    grad_input : ndarray of float64 of x's shape, or None
    grad_weight : ndarray of float64, shape (K, C/groups, R, S), or None
    grad_bias : ndarray of float64, shape (K,), or None

    Raises
    ------
    ValueError
        As :func:`conv2d`; and if grad_out's shape is not the forward output's, or
        needs holds anything but "input", "weight" and "bias".
    TypeError
        As :func:`conv2d`, grad_out included.

    Examples
    --------
    With grad_out all ones, ∂L/∂x counts the output windows over each input pixel,
    ∂L/∂w sums the input under each tap, ∂L/∂bias counts the outputs:

    >>> import numpy as np
    >>> x = np.arange(9.0).reshape(1, 1, 3, 3)
    >>> gx, gw, gb = conv2d_backward(x, np.ones((1, 1, 2, 2)), np.ones((1, 1, 2, 2)))
    >>> print(gx[0, 0])
    [[1. 2. 1.]
     [2. 4. 2.]
     [1. 2. 1.]]
    >>> print(gw[0, 0], gb)
    [[ 8. 12.]
     [20. 24.]] [4.]

    Replicate padding copies the edge, so the edge pixels collect the padding's
    gradient too (every pixel of a 1×1 kernel's padded output):

    >>> gx, _, _ = conv2d_backward(
    ...     np.ones((1, 2, 2)), np.ones((1, 1, 1, 1)), np.ones((1, 4, 4)),
    ...     padding=1, padding_mode="replicate", needs=("input",))
    >>> print(gx[0])
    [[4. 4.]
     [4. 4.]]
    """
    args = (x, w, grad_out, stride, padding, dilation, groups, padding_mode, needs)
    return _conv_backward("conv2d_backward", *args, nd=2)


def conv1d_backward(
    x,
    w,
    grad_out,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    padding_mode="zeros",
    needs=("input", "weight", "bias"),
):
    """Gradients of :func:`conv1d`: ∂L/∂x, ∂L/∂w and ∂L/∂bias for ``L = Σ grad_out · out``.

    :func:`conv2d_backward` with one spatial axis::

        ∂L/∂bias[k]    = Σ_b Σ_i grad_out[b, k, i]
        ∂L/∂w[k, c, r] = Σ_b Σ_i grad_out[b, k, i] · x_pad[b, g·C/G + c, i·s + r·d]
        ∂L/∂x_pad[b, g·C/G + c, i·s + r·d]  +=  grad_out[b, k, i] · w[k, c, r]

    and ∂L/∂x the padding's adjoint applied to ∂L/∂x_pad (Note [padding adjoint]).

    Parameters
    ----------
    x : array_like, shape (N, C, L) or (C, L)
        The forward input. Converted to float64.
    w : array_like, shape (K, C/groups, R)
        The forward weights.
    grad_out : array_like, shape (N, K, Lo), or (K, Lo) for an unbatched x
        ∂L/∂out, of the forward output's shape.
    stride, padding, dilation, groups, padding_mode
        As in :func:`conv1d`.
    needs : collection of {"input", "weight", "bias"}, optional
        As in :func:`conv2d_backward`.

    Returns
    -------
    grad_input : ndarray of float64 of x's shape, or None
    grad_weight : ndarray of float64, shape (K, C/groups, R), or None
    grad_bias : ndarray of float64, shape (K,), or None

    Raises
    ------
    ValueError, TypeError
        As :func:`conv2d_backward`.

    Examples
    --------
    Circular padding wraps around, so the gradient of the padded ends goes to the
    far end of the input:

    >>> gx, gw, gb = conv1d_backward([[1.0, 2.0, 3.0]], [[[1.0, 1.0]]], [[1.0, 0.0, 0.0, 0.0]],
    ...                              padding=1, padding_mode="circular")
    >>> print(gx, gw, gb)
    [[1. 0. 1.]] [[[3. 1.]]] [1.]
    """
    args = (x, w, grad_out, stride, padding, dilation, groups, padding_mode, needs)
    return _conv_backward("conv1d_backward", *args, nd=1)


# --------------------------------------------------------------------------------------
# SciPy's correlate2d / convolve2d
# --------------------------------------------------------------------------------------

# boundary (with SciPy's aliases) -> np.pad mode
_BOUNDARIES = {
    "fill": "constant",
    "pad": "constant",
    "wrap": "wrap",
    "circular": "wrap",
    "symm": "symmetric",
    "symmetric": "symmetric",
}
_MODES = ("full", "valid", "same")


def _check_2d(name, in1, in2, mode, boundary, fillvalue):
    """The checks shared by correlate2d and convolve2d; returns the float64 arrays."""
    in1 = _real_array(name, "in1", in1)
    in2 = _real_array(name, "in2", in2)
    for arg, arr in (("in1", in1), ("in2", in2)):
        if arr.ndim != 2:
            raise ValueError(f"{name}: {arg} has {arr.ndim} dimensions (expected 2)")
        if arr.size == 0:
            raise ValueError(
                f"{name}: {arg} is empty (got shape {arr.shape}, expected both sizes >= 1)"
            )
    if not isinstance(mode, str) or mode not in _MODES:
        raise ValueError(f"{name}: mode is invalid (got {mode!r}, expected one of {_MODES})")
    if not isinstance(boundary, str) or boundary not in _BOUNDARIES:
        raise ValueError(
            f"{name}: boundary is invalid (got {boundary!r}, expected one of {tuple(_BOUNDARIES)})"
        )
    fill = _real_array(name, "fillvalue", fillvalue)
    if fill.size != 1:
        raise ValueError(
            f"{name}: fillvalue has shape {fill.shape} (expected a scalar or one element)"
        )
    return in1, in2, float(fill.ravel()[0])


def _swap_needed(name, mode, shape1, shape2):
    """SciPy's ``_inputs_swap_needed``: in "valid" mode, swap when in2 contains in1."""
    if mode != "valid":
        return False
    in1_contains = all(a >= b for a, b in zip(shape1, shape2, strict=True))
    in2_contains = all(b >= a for a, b in zip(shape1, shape2, strict=True))
    if not (in1_contains or in2_contains):
        raise ValueError(
            f"{name}: in2 has shape {shape2} (got in1 of shape {shape1}, expected for "
            "mode='valid' one of them at least as large as the other in every dimension)"
        )
    return not in1_contains


def _correlate_full(image, kernel, boundary, fillvalue):
    """``full[i, j] = Σ_m Σ_n I_ext(i + m − (R − 1), j + n − (S − 1)) · K(m, n)``."""
    (h, w), (r, s) = image.shape, kernel.shape
    # ext[i, j] = I_ext(i − (R − 1), j − (S − 1)): R − 1 rows and S − 1 columns
    # added on each side by the boundary rule (a kernel larger than the image
    # wraps or mirrors more than once, as in SciPy).    shape (H + 2(R − 1), W + 2(S − 1))
    np_mode = _BOUNDARIES[boundary]
    extra = {"constant_values": fillvalue} if np_mode == "constant" else {}
    ext = np.pad(image, ((r - 1, r - 1), (s - 1, s - 1)), mode=np_mode, **extra)

    full = np.zeros((h + r - 1, w + s - 1), dtype=np.float64)
    for m in range(r):
        for n in range(s):
            # ext[i + m, j + n] · K(m, n) for every output position (i, j)
            full += ext[m : m + h + r - 1, n : n + w + s - 1] * kernel[m, n]
    return full


def _window(full, mode, image_shape, kernel_shape, same_start):
    """The "full", "valid" or "same" part of a full output (module docstring)."""
    (h, w), (r, s) = image_shape, kernel_shape
    if mode == "full":
        return full
    if mode == "valid":
        return full[r - 1 : h, s - 1 : w]  # (H − R + 1, W − S + 1)
    i0, j0 = same_start
    return full[i0 : i0 + h, j0 : j0 + w]  # (H, W)


def correlate2d(in1, in2, mode="full", boundary="fill", fillvalue=0):
    """2-D cross-correlation with ``scipy.signal.correlate2d``'s semantics, in float64.

    ``full[i, j] = Σ_m Σ_n I_ext(i + m − (R − 1), j + n − (S − 1)) · K(m, n)`` with
    I = in1, K = in2 and I_ext the image extended by ``boundary``; "valid" and "same"
    are windows of it (module docstring). ``correlate2d(I, K, mode="valid")`` is the
    seed formula ``O(i, j) = Σ_m Σ_n I(i + m, j + n) K(m, n)`` (:func:`correlate2d_valid`).

    Parameters
    ----------
    in1 : array_like, shape (H, W)
        The image I. Converted to float64.
    in2 : array_like, shape (R, S)
        The kernel K, of any non-empty size (larger than the image too, except as
        below for "valid").
    mode : {"full", "valid", "same"}, optional
        "full" (default): shape (H + R − 1, W + S − 1). "valid": the placements
        where K lies inside I, shape (H − R + 1, W − S + 1); if instead in2 is at
        least as large as in1 in every dimension the two are swapped and the result
        flipped in both axes (as SciPy does); neither containing the other is an
        error. "same": shape (H, W), ``full[R//2 : R//2 + H, S//2 : S//2 + W]``.
    boundary : {"fill", "wrap", "symm"}, optional
        How I is extended beyond its edges: ``fillvalue`` ("fill", default; alias
        "pad"), periodically ("wrap"; alias "circular"), or mirrored with the edge
        repeated ("symm"; alias "symmetric"). Unused in "valid" mode.
    fillvalue : real scalar, optional
        The value outside I for "fill". Default 0. (SciPy casts it to the inputs'
        dtype, truncating it for integer inputs; here everything is float64.)

    Returns
    -------
    out : ndarray of float64

    Raises
    ------
    ValueError
        If an input is not 2-D or is empty, for an unknown mode or boundary, a
        fillvalue with more than one element, or "valid" inputs where neither
        contains the other.
    TypeError
        For a non-real dtype (complex, object, string).

    Examples
    --------
    >>> import numpy as np
    >>> image = np.arange(9.0).reshape(3, 3)
    >>> print(correlate2d(image, [[1.0, 1.0]], mode="same"))  # I(i, j) + I(i, j + 1)
    [[ 1.  3.  2.]
     [ 7.  9.  5.]
     [13. 15.  8.]]
    >>> print(correlate2d(image, [[1.0, 1.0]], mode="same", boundary="wrap")[1])
    [7. 9. 8.]
    >>> print(correlate2d(image, [[1.0], [-1.0]], fillvalue=10.0))  # I(i − 1, j) − I(i, j)
    [[10.  9.  8.]
     [-3. -3. -3.]
     [-3. -3. -3.]
     [-4. -3. -2.]]
    >>> k = [[1.0, 0.0], [0.0, -1.0]]
    >>> print(np.array_equal(correlate2d(image, k, mode="valid"), correlate2d_valid(image, k)))
    True
    """
    name = "correlate2d"
    in1, in2, fillvalue = _check_2d(name, in1, in2, mode, boundary, fillvalue)
    swapped = _swap_needed(name, mode, in1.shape, in2.shape)
    if swapped:
        in1, in2 = in2, in1
    (r, s) = in2.shape
    full = _correlate_full(in1, in2, boundary, fillvalue)
    out = _window(full, mode, in1.shape, in2.shape, same_start=(r // 2, s // 2))
    if swapped:
        out = out[::-1, ::-1]  # as SciPy: the correlation of the swapped pair, flipped
    return np.ascontiguousarray(out)


def convolve2d(in1, in2, mode="full", boundary="fill", fillvalue=0):
    """2-D convolution with ``scipy.signal.convolve2d``'s semantics, in float64.

    ``full[i, j] = Σ_m Σ_n I_ext(i − m, j − n) · K(m, n)``: :func:`correlate2d` with
    the kernel flipped in both axes, K[::-1, ::-1], in "full" and "valid" mode. In
    "same" mode the window starts at ((R − 1) // 2, (S − 1) // 2) of the full
    output, one earlier than correlate2d's (R // 2, S // 2) for an even kernel
    size, as in SciPy. In "valid" mode in1 and in2 are swapped when in2 contains
    in1 (convolution is symmetric, so nothing is flipped back).

    Parameters
    ----------
    in1, in2, mode, boundary, fillvalue
        As in :func:`correlate2d`.

    Returns
    -------
    out : ndarray of float64

    Raises
    ------
    ValueError, TypeError
        As :func:`correlate2d`.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.arange(9.0).reshape(3, 3)
    >>> print(convolve2d(image, [[1.0, 1.0]], mode="same"))  # I(i, j) + I(i, j − 1)
    [[ 0.  1.  3.]
     [ 3.  7.  9.]
     [ 6. 13. 15.]]
    >>> print(convolve2d(image, [[1.0, 2.0]], mode="valid"))  # 2·I(i, j) + I(i, j + 1)
    [[ 1.  4.]
     [10. 13.]
     [19. 22.]]
    """
    name = "convolve2d"
    in1, in2, fillvalue = _check_2d(name, in1, in2, mode, boundary, fillvalue)
    if _swap_needed(name, mode, in1.shape, in2.shape):
        in1, in2 = in2, in1
    (r, s) = in2.shape
    flipped = in2[::-1, ::-1]  # K(R − 1 − m, S − 1 − n): convolution = flipped correlation
    full = _correlate_full(in1, flipped, boundary, fillvalue)
    out = _window(full, mode, in1.shape, in2.shape, same_start=((r - 1) // 2, (s - 1) // 2))
    return np.ascontiguousarray(out)
