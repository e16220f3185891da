"""2-D convolution as used in CNNs, i.e. cross-correlation (float64 reference).

Formula (the seed's, "valid" positions only)::

    O(i, j) = Σ_m Σ_n I(i + m, j + n) · K(m, n)

    0 <= m < kh,  0 <= n < kw,   0 <= i <= H − kh,  0 <= j <= W − kw

The kernel K slides over the image I; each output is the dot product of K with
the image window under it. The kernel is *not* flipped, so strictly this is
cross-correlation, which is what deep-learning libraries call "convolution"
(a true convolution would use K(kh−1−m, kw−1−n)). Output size: (H − kh + 1, W − kw + 1).

The CNN layer (PyTorch ``conv2d``, NCHW layout) adds batch, channels, stride and
zero padding::

    out[b, k, i, j] = bias[k] + Σ_c Σ_r Σ_s x_pad[b, c, i·sh + r, j·sw + s] · w[k, c, r, s]

    x: (N, C, H, W)   w: (K, C, R, S)   out: (N, K, Ho, Wo)
    Ho = ⌊(H + 2·ph − R) / sh⌋ + 1,   Wo = ⌊(W + 2·pw − S) / sw⌋ + 1

where x_pad is x with ph rows of zeros above and below and pw columns of zeros
left and right. Each output channel k sums the correlations of every input
channel c with its own kernel slice w[k, c].
"""

import operator

import numpy as np

__all__ = ["correlate2d_valid", "conv2d"]


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


def _pair(value, arg, minimum):
    """Turn an int or a pair of ints into a pair (h, w), each >= ``minimum``."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"conv2d: {arg} has {len(value)} entries (expected an int or 2 ints)")
        pair = tuple(operator.index(v) for v in value)
    else:
        pair = (operator.index(value),) * 2
    if min(pair) < minimum:
        raise ValueError(f"conv2d: {arg} is invalid (got {value!r}, expected values >= {minimum})")
    return pair


def conv2d(x, w, bias=None, stride=1, padding=0):
    """2-D convolution layer (cross-correlation) in PyTorch NCHW semantics.

    ``out[b,k,i,j] = bias[k] + Σ_c Σ_r Σ_s x_pad[b, c, i·sh + r, j·sw + s] · w[k, c, r, s]``

    Written as a direct sum: one loop over the R·S kernel taps, each adding a
    strided slice of the padded input times that tap's (K, C) weight matrix.

    Parameters
    ----------
    x : array_like, shape (N, C, H, W)
        Input batch. Converted to float64.
    w : array_like, shape (K, C, R, S)
        Weights: K output channels, C input channels, an R×S kernel.
    bias : array_like, shape (K,), optional
        Added to every position of output channel k.
    stride : int or (int, int), optional
        Step (sh, sw) between output positions, each >= 1. Default 1.
    padding : int or (int, int), optional
        Zeros (ph, pw) added on both sides of H and W, each >= 0. Default 0.

    Returns
    -------
    out : ndarray of float64, shape (N, K, Ho, Wo)
        ``Ho = (H + 2·ph − R) // sh + 1``, ``Wo = (W + 2·pw − S) // sw + 1``.

    Raises
    ------
    ValueError
        For wrong dimensions, mismatched channels or bias, an invalid stride or
        padding, or a kernel larger than the padded input.

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
    """
    name = "conv2d"
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    if x.ndim != 4:
        raise ValueError(f"{name}: x has {x.ndim} dimensions (expected 4: N, C, H, W)")
    if w.ndim != 4:
        raise ValueError(f"{name}: w has {w.ndim} dimensions (expected 4: K, C, R, S)")
    n, c, h, wd = x.shape
    k, cw, r, s = w.shape
    if cw != c:
        raise ValueError(
            f"{name}: w has {cw} input channels (got shape {w.shape}, expected {c} "
            f"to match x of shape {x.shape})"
        )
    sh, sw = _pair(stride, "stride", 1)
    ph, pw = _pair(padding, "padding", 0)
    if bias is not None:
        bias = np.asarray(bias, dtype=np.float64)
        if bias.shape != (k,):
            raise ValueError(f"{name}: bias has shape {bias.shape} (expected ({k},))")

    hp, wp = h + 2 * ph, wd + 2 * pw  # padded input size
    if r > hp or s > wp or r < 1 or s < 1:
        raise ValueError(
            f"{name}: w has kernel size {(r, s)} (expected a non-empty kernel no larger "
            f"than the padded input, {(hp, wp)})"
        )
    ho = (hp - r) // sh + 1
    wo = (wp - s) // sw + 1

    # Zero padding: x_pad[b, c, ph + i, pw + j] = x[b, c, i, j], zeros elsewhere.
    x_pad = np.zeros((n, c, hp, wp), dtype=np.float64)
    x_pad[:, :, ph : ph + h, pw : pw + wd] = x

    out = np.zeros((n, k, ho, wo), dtype=np.float64)
    for ri in range(r):
        for si in range(s):
            # The input pixels that tap (ri, si) meets at every output position:
            # x_pad[b, c, i·sh + ri, j·sw + si] for i < ho, j < wo.  shape (N, C, Ho, Wo)
            patch = x_pad[:, :, ri : ri + sh * (ho - 1) + 1 : sh, si : si + sw * (wo - 1) + 1 : sw]
            # Σ_c patch[b, c, i, j] · w[k, c, ri, si]                  shape (N, K, Ho, Wo)
            out += np.einsum("bcij,kc->bkij", patch, w[:, :, ri, si])
    if bias is not None:
        out += bias[None, :, None, None]
    return out
