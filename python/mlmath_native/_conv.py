"""Convolution forward: conv2d / conv1d (PyTorch semantics) and SciPy's correlate2d / convolve2d.

All of them run on one compiled kernel (src/cpp/kernels/conv.cpp): implicit GEMM on the packed
core, 1x1 convolutions as plain GEMM, and a direct vectorised kernel for depthwise and
single-channel correlations.  Zero padding is applied inside the kernel; the other padding
modes (and SciPy's boundaries) pad a copy of the input first, which costs the padded input's
size, never an im2col matrix; where that copy would dwarf the input and output, the convolution
runs tap by tap instead (Note [large padding]).  Inputs holding NaN or inf run direct
convolution (Note [non-finite inputs] in conv.cpp).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Collection, Sequence, Set
from types import SimpleNamespace
from typing import Any, Literal, Protocol, cast, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _core
from ._checks import (
    MAX_SIZE,
    as_float_array,
    as_input,
    check_out,
    check_size,
    compute_dtype,
    deliver,
    deliver_one,
)

#: an int, or one int per spatial dimension (stride, dilation)
_Ints = int | tuple[int, ...] | list[int]
#: an int, one per spatial dimension, (before, after) pairs, "valid" or "same"
_Padding = int | tuple[int, ...] | list[int] | Literal["valid", "same"]
_PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]
_Algorithm = Literal["auto", "direct", "winograd", "winograd_f2", "winograd_f4"]
_Need = Literal["input", "weight", "bias"]
_Needs = Sequence[_Need] | Set[_Need]
#: (grad_input, grad_weight, grad_bias), None where not in ``needs``
_Grads = tuple[NDArray[Any] | None, NDArray[Any] | None, NDArray[Any] | None]
_AllGrads = tuple[NDArray[Any], NDArray[Any], NDArray[Any]]

# np.pad's mode per padding_mode (None: zero padding happens inside the kernel)
_MODES: dict[str, Any] = {
    "zeros": None,
    "reflect": "reflect",
    "replicate": "edge",
    "circular": "wrap",
}


def _int(fn: str, name: str, value: Any) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{fn}: {name} must be an integer (got {value!r})") from None


def _pair(fn: str, name: str, value: _Ints, dims: int) -> tuple[int, ...]:
    """An int, or a sequence of 1 or `dims` ints (one is used for every dim, as torch expands
    it), each >= 1 (stride, dilation)."""
    if isinstance(value, tuple | list):
        if len(value) not in (1, dims):
            accepted = "a one-element sequence" if dims == 1 else f"a sequence of 1 or {dims}"
            raise ValueError(
                f"{fn}: {name} has {len(value)} values (expected an int, or {accepted} ints)"
            )
        out = tuple(_int(fn, name, v) for v in value) * (dims // len(value))
    else:
        out = (_int(fn, name, value),) * dims
    if any(v < 1 for v in out):
        raise ValueError(f"{fn}: {name} must be >= 1 (got {value})")
    if any(v > MAX_SIZE for v in out):
        raise ValueError(f"{fn}: {name} must be <= 2**62 (got {value})")
    return out


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """'same' for any stride: output ceil(size / stride); the odd pixel goes after (TF/XLA)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _padding(
    fn: str,
    padding: _Padding,
    spatial: tuple[int, ...],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
) -> list[tuple[int, int]]:
    """(before, after) per spatial dim from an int, per-dim ints, before/after pairs,
    "valid" or "same"."""
    dims = len(spatial)
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0)] * dims
        if padding == "same":
            return [
                _same_padding(*args) for args in zip(spatial, kernel, stride, dilation, strict=True)
            ]
        raise ValueError(
            f"{fn}: padding is invalid (got {padding!r}, expected an int, a tuple, 'valid' or "
            "'same')"
        )
    if isinstance(padding, tuple | list):
        values = [_int(fn, "padding", p) for p in padding]
        if len(values) == 1:  # one value for every side, as torch expands it
            values = values * dims
        if len(values) == dims:
            pads = [(p, p) for p in values]
        elif len(values) == 2 * dims:
            pads = [(values[2 * i], values[2 * i + 1]) for i in range(dims)]
        else:
            counts = "1 or 2" if dims == 1 else f"1, {dims} or {2 * dims}"
            raise ValueError(
                f"{fn}: padding has {len(values)} values (expected an int, 'valid', 'same', or a "
                f"sequence of {counts} ints)"
            )
    else:
        p = _int(fn, "padding", padding)
        pads = [(p, p)] * dims
    if any(b < 0 or a < 0 for b, a in pads):
        raise ValueError(f"{fn}: padding must be >= 0 (got {padding})")
    return pads


_ALGORITHMS = ("auto", "direct", "winograd", "winograd_f2", "winograd_f4")


def _winograd_tile(algorithm: str, c_in: int, k_out: int, n: int, out_h: int, out_w: int) -> int:
    """The Winograd tile, 2 (F(2x2, 3x3)) or 4 (F(4x4, 3x3)), or 0 for direct convolution, of an
    eligible 3x3 layer (Note [auto algorithm])."""
    if algorithm in ("winograd_f2", "winograd_f4"):
        return int(algorithm[-1])
    # Note [auto algorithm]: measured on the project machines, float32 and float64 alike.
    # F4's 36 GEMMs need a few hundred tiles to pay for its filter transform (36 K x C values,
    # read again by every block of tiles): N4 C256 7x7 K256 (16 tiles): F4 1.8 ms, F2 1.2,
    # direct 1.9.  With enough tiles it beats F2 and direct from C * K >= 512 and K >= 16:
    # N32 C32 32x32 K32: F4 2.4 ms, F2 2.8, direct 3.1; N8 C64 56x56 K16: 2.1, 3.1, 2.3;
    # N32 C16 32x32 K16: 0.93, 1.08, 0.81.  F2 wins over direct from K >= 32 and C * K >= 1024
    # (N2 C64 14x14 K64: 0.19 ms against 0.33).
    tiles4 = n * -(-out_h // 4) * -(-out_w // 4)
    forced = algorithm == "winograd"
    if tiles4 >= 128 and (forced or (k_out >= 16 and c_in * k_out >= 512)):
        return 4
    if forced or (k_out >= 32 and c_in * k_out >= 1024):
        return 2
    return 0


class _ConvPlan(Protocol):
    """The checked arguments and sizes that :func:`_plan` returns (a SimpleNamespace)."""

    x: NDArray[Any]
    w: NDArray[Any]
    bias: NDArray[Any] | None
    dtype: np.dtype[Any]
    unbatched: bool
    n: int
    c: int
    k: int
    groups: int
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: list[tuple[int, int]]
    padding_mode: str
    out_size: list[int]
    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    winograd: int
    dims: int


def _plan(
    fn: str,
    x: ArrayLike,
    w: ArrayLike,
    bias: ArrayLike | None,
    stride: _Ints,
    padding: _Padding,
    dilation: _Ints,
    groups: int,
    padding_mode: str,
    dims: int,
    algorithm: str,
) -> _ConvPlan:
    """Checks every argument of a conv1d (dims=1) / conv2d (dims=2) call and works out its
    sizes; shared by the forward and the backward.  Nothing is computed yet."""
    x = as_float_array(x, fn, "x")
    w = as_float_array(w, fn, "w")
    if x.ndim not in (dims + 1, dims + 2):
        raise ValueError(
            f"{fn}: x has {x.ndim} dimensions (expected {dims + 2}: (N, C, ...) or {dims + 1} "
            "unbatched)"
        )
    if w.ndim != dims + 2:
        raise ValueError(
            f"{fn}: w has {w.ndim} dimensions (expected {dims + 2}: (K, C/groups, ...))"
        )
    unbatched = x.ndim == dims + 1
    if unbatched:
        x = x[None]
    dtype = np.result_type(x.dtype, w.dtype)
    if bias is not None:
        bias = as_float_array(bias, fn, "bias")
        dtype = np.result_type(dtype, bias.dtype)
        if bias.shape != (w.shape[0],):
            raise ValueError(f"{fn}: bias has shape {bias.shape} (expected ({w.shape[0]},))")
    groups = _int(fn, "groups", groups)
    if groups < 1:
        raise ValueError(f"{fn}: groups must be >= 1 (got {groups})")
    n, c = x.shape[:2]
    k = w.shape[0]
    if c != w.shape[1] * groups:
        raise ValueError(
            f"{fn}: x has {c} channels but w expects {w.shape[1]} per group x {groups} groups "
            f"(w shape {w.shape})"
        )
    if k % groups:
        raise ValueError(f"{fn}: w has {k} output channels, not divisible by groups={groups}")
    stride = _pair(fn, "stride", stride, dims)
    dilation = _pair(fn, "dilation", dilation, dims)
    spatial, kernel = x.shape[2:], w.shape[2:]
    if min(spatial) < 1:  # as PyTorch: padding does not make an empty image
        raise ValueError(
            f"{fn}: x has an empty spatial dimension (got shape {x.shape}, expected every "
            "spatial size >= 1)"
        )
    if min(kernel) < 1:  # as PyTorch: no output size (and nothing to sum) without taps
        raise ValueError(
            f"{fn}: w has an empty kernel (got shape {w.shape}, expected every kernel size >= 1)"
        )
    pads = _padding(fn, padding, spatial, kernel, stride, dilation)
    if padding_mode not in _MODES:
        raise ValueError(
            f"{fn}: padding_mode is invalid (got {padding_mode!r}, expected one of {list(_MODES)})"
        )
    if algorithm not in _ALGORITHMS:
        raise ValueError(
            f"{fn}: algorithm is invalid (got {algorithm!r}, expected one of {_ALGORITHMS})"
        )
    eligible = kernel == (3, 3) and stride == (1, 1) and dilation == (1, 1) and groups == 1
    if algorithm.startswith("winograd") and not eligible:
        raise ValueError(
            f"{fn}: algorithm={algorithm!r} needs a 3x3 kernel, stride 1, dilation 1 and groups 1 "
            f"(got kernel {kernel}, stride {stride}, dilation {dilation}, groups {groups})"
        )
    out_size = []
    for size, kk, s, d, (before, after) in zip(
        spatial, kernel, stride, dilation, pads, strict=True
    ):
        span = size + before + after - d * (kk - 1) - 1
        if span < 0:
            raise ValueError(
                f"{fn}: the kernel (size {kk}, dilation {d}) is larger than the padded input "
                f"(size {size} + padding {before + after})"
            )
        out_size.append(span // s + 1)
    # sizes the kernels derive (the padded plane, the output, the work) must fit in int64
    itemsize = np.dtype(dtype).itemsize
    padded = tuple(size + b + a for size, (b, a) in zip(spatial, pads, strict=True))
    check_size(fn, "the padded input", (n, c, *padded), itemsize)
    check_size(fn, "the output", (n, k, *out_size), itemsize)
    check_size(fn, "the work (multiply-adds)", (n, k, *out_size, c // groups, *kernel))
    winograd = 0  # the tile, or 0 for direct convolution
    if eligible and algorithm != "direct":
        winograd = _winograd_tile(algorithm, c, k, n, *out_size)
    x = np.asarray(x, dtype=dtype, order="C")
    w = np.asarray(w, dtype=dtype, order="C")
    if bias is not None:
        bias = np.asarray(bias, dtype=dtype, order="C")
    if padding_mode != "zeros":
        for size, (before, after) in zip(spatial, pads, strict=True):
            if padding_mode == "reflect" and max(before, after) >= size:
                raise ValueError(
                    f"{fn}: reflect padding {max(before, after)} must be smaller than the input "
                    f"size {size}"
                )
            if padding_mode == "circular" and max(before, after) > size:
                raise ValueError(
                    f"{fn}: circular padding {max(before, after)} must not exceed the input size "
                    f"{size}"
                )
    plan = SimpleNamespace(
        x=x,
        w=w,
        bias=bias,
        dtype=dtype,
        unbatched=unbatched,
        n=n,
        c=c,
        k=k,
        groups=groups,
        stride=stride,
        dilation=dilation,
        pads=pads,
        padding_mode=padding_mode,
        out_size=out_size,
        spatial=spatial,
        kernel=kernel,
        winograd=winograd,
        dims=dims,
    )
    return cast("_ConvPlan", plan)


def _conv_nd(
    fn: str,
    x: ArrayLike,
    w: ArrayLike,
    bias: ArrayLike | None,
    stride: _Ints,
    padding: _Padding,
    dilation: _Ints,
    groups: int,
    padding_mode: str,
    dims: int,
    algorithm: str,
    out: Any = None,
) -> NDArray[Any]:
    """conv1d (dims=1) and conv2d (dims=2) on the 2-D kernel, into ``out`` when it is given
    (directly where it is contiguous and shares no memory with the inputs)."""
    p = _plan(fn, x, w, bias, stride, padding, dilation, groups, padding_mode, dims, algorithm)
    result_shape = (p.k, *p.out_size) if p.unbatched else (p.n, p.k, *p.out_size)
    if out is not None:
        out = check_out(out, result_shape, p.dtype, fn)
    if _pad_copy_too_large(p):
        y = _conv_gathered(p)
        return deliver_one(fn, y[0] if p.unbatched else y, out)
    x, w, bias, pads, stride, dilation = p.x, p.w, p.bias, p.pads, p.stride, p.dilation
    n, c, k, dtype, groups = p.n, p.c, p.k, p.dtype, p.groups
    kernel, winograd, out_size = p.kernel, p.winograd, list(p.out_size)
    space_to_depth = (
        algorithm == "auto"
        and dims == 2
        and groups == 1
        and dilation == (1, 1)
        and stride != (1, 1)
        and c * stride[0] * stride[1] <= 64
        and k <= 64
        and kernel[0] >= stride[0]
        and kernel[1] >= stride[1]
    )
    if space_to_depth and not _all_finite(x, w):
        space_to_depth = False  # Note [non-finite inputs] (kernels/conv.cpp); Winograd checks
        # its own outputs (Note [winograd non-finite])
    if p.padding_mode != "zeros" and any(b or a for b, a in pads):
        x = np.pad(x, [(0, 0), (0, 0), *pads], mode=_MODES[p.padding_mode])
        pads = [(0, 0)] * dims
    if dims == 1:  # a 1-D convolution is a 2-D one over a height of 1
        x, w = x[:, :, None, :], w[:, :, None, :]
        stride, dilation = (1, *stride), (1, *dilation)
        pads = [(0, 0), *pads]
        out_size = [1, *out_size]
    if space_to_depth:
        x, w, pads, stride = _space_to_depth(x, w, pads, stride, out_size)
    direct = (
        out is not None
        and out.flags.c_contiguous
        and out.flags.aligned
        and not any(np.may_share_memory(out, a) for a in (x, w, bias) if a is not None)
    )
    y = out.reshape((n, k, *out_size)) if direct else _core.empty((n, k, *out_size), dtype)
    _core.conv2d_into(
        x,
        w,
        bias,
        y,
        stride[0],
        stride[1],
        pads[0][0],
        pads[1][0],
        dilation[0],
        dilation[1],
        groups,
        winograd,
    )
    if direct:
        return cast("NDArray[Any]", out)
    if dims == 1:
        y = y[:, :, 0, :]
    return deliver_one(fn, y[0] if p.unbatched else y, out)


def _sum_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype in which results are added before their one rounding: float32 for the
    16-bit dtypes (the kernels then write float32 results: Note [16-bit convolution] in
    kernels/conv_stage.h), else the dtype itself."""
    return np.dtype(np.float32) if np.dtype(dtype).itemsize == 2 else np.dtype(dtype)


def _all_finite(*arrays: NDArray[Any]) -> bool:
    """No NaN or +-inf in any of the (C-contiguous float) arrays: one vectorised read each
    (Note [non-finite inputs] in kernels/conv.cpp)."""
    return all(_core.all_finite(a) for a in arrays)


# Note [large padding]
# The kernels hold a padded copy of the input (the stride-1 paths all of N*C*(H + pt + pb) *
# (W + pl + pr) values, the depthwise path one padded plane per thread, the weight gradient all
# of it), and so do np.pad for the other padding modes and the space-to-depth copy.  Where the
# padding dwarfs the input (conv2d with dilation=12000, padding="same" on an 8x8 image pads it to
# 24008 x 24008: 4.3 GiB of float64) the convolution runs tap by tap instead: for tap (r, s) the
# positions it reads for every output, x_pad[n, c, i*sh + r*dh, j*sw + s*dw], are gathered
# through the padding mode's index map (_tap_sources; zero padding reads a zero row and column
# appended to x) into an (N, C, Ho, Wo) patch, and y += w[:, :, r, s] . patch is a 1x1
# convolution (the backward: the 1x1 weight gradient, and the 1x1 input gradient added back
# onto the gathered positions).  Extra memory: x once more, one patch and one output,
# O(N*C*(H*W + Ho*W) + N*K*Ho*Wo); the price is R*S passes over the output.  Every sum has the
# definition's terms (padding zeros included), so NaN and inf land where they do there.
# Used past _PAD_COPY_RATIO times the input and output and _PAD_COPY_MIN_BYTES.
_PAD_COPY_RATIO = 4
_PAD_COPY_MIN_BYTES = 16 << 20


def _pad_copy_too_large(p: _ConvPlan) -> bool:
    """Whether the padded input would dwarf the input and output (Note [large padding])."""
    itemsize = p.dtype.itemsize
    padded = p.n * p.c * itemsize
    for size, (before, after) in zip(p.spatial, p.pads, strict=True):
        padded *= size + before + after
    output = p.n * p.k * itemsize
    for size in p.out_size:
        output *= size
    return padded > max(_PAD_COPY_MIN_BYTES, _PAD_COPY_RATIO * (p.x.nbytes + output))


def _tap_sources(
    size: int, before: int, tap: int, stride: int, dilation: int, out: int, mode: str
) -> NDArray[np.intp]:
    """The input position that kernel tap `tap` reads for each of the `out` outputs along one
    axis: padded position q = i*stride + tap*dilation - before mapped by the padding mode (for
    zero padding, `size`: the appended zero)."""
    q = np.arange(out, dtype=np.intp) * stride + (tap * dilation - before)
    if mode == "zeros":
        return np.where((q >= 0) & (q < size), q, size)
    if mode == "replicate":
        return np.clip(q, 0, size - 1)
    if mode == "circular":  # padding <= size (checked)
        return q % size
    q = np.abs(q)  # reflect: padding < size, so one reflection at each end
    return np.where(q >= size, 2 * (size - 1) - q, q)


def _as_2d(p: _ConvPlan) -> SimpleNamespace:
    """The plan's arrays and sizes with a 1-D convolution seen as a 2-D one of height 1."""
    lead = 2 - p.dims
    return SimpleNamespace(
        x=p.x.reshape(p.x.shape[:2] + (1,) * lead + p.x.shape[2:]),
        w=p.w.reshape(p.w.shape[:2] + (1,) * lead + p.w.shape[2:]),
        spatial=(1,) * lead + tuple(p.spatial),
        pads=[(0, 0)] * lead + list(p.pads),
        stride=(1,) * lead + tuple(p.stride),
        dilation=(1,) * lead + tuple(p.dilation),
        out_size=[1] * lead + list(p.out_size),
    )


def _gather_input(p: _ConvPlan, x: NDArray[Any]) -> NDArray[Any]:
    """x with a zero row and column appended for zero padding (Note [large padding])."""
    if p.padding_mode != "zeros":
        return x
    xe = np.zeros(x.shape[:2] + (x.shape[2] + 1, x.shape[3] + 1), p.dtype)
    xe[:, :, :-1, :-1] = x
    return xe


def _taps(p: _ConvPlan, q: SimpleNamespace) -> Any:
    """(r, s, rows, cols) per kernel tap: the input rows and columns it reads per output."""
    (h, wd), ((top, _), (left, _)) = q.spatial, q.pads
    (sh, sw), (dh, dw), (ho, wo) = q.stride, q.dilation, q.out_size
    for r in range(q.w.shape[2]):
        rows = _tap_sources(h, top, r, sh, dh, ho, p.padding_mode)
        for s in range(q.w.shape[3]):
            yield r, s, rows, _tap_sources(wd, left, s, sw, dw, wo, p.padding_mode)


def _conv_gathered(p: _ConvPlan) -> NDArray[Any]:
    """conv1d/conv2d tap by tap on gathered patches (Note [large padding])."""
    q = _as_2d(p)
    xe = _gather_input(p, q.x)
    # 16-bit: the taps are added in float32 and the sum rounded once
    out = np.zeros((p.n, p.k, *q.out_size), _sum_dtype(p.dtype))
    part = np.empty_like(out)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf pass on, as in the kernels
        _add_taps(p, q, xe, out, part)
        out = out.astype(p.dtype, copy=False)
    return out[:, :, 0, :] if p.dims == 1 else out


def _add_taps(
    p: _ConvPlan, q: SimpleNamespace, xe: NDArray[Any], out: NDArray[Any], part: NDArray[Any]
) -> None:
    """out += each tap's 1x1 convolution of its gathered patch (+ bias)."""
    for r, s, rows, cols in _taps(p, q):
        patch = np.ascontiguousarray(xe[:, :, rows[:, None], cols[None, :]])  # (N, C, Ho, Wo)
        tap = np.ascontiguousarray(q.w[:, :, r : r + 1, s : s + 1])
        _core.conv2d_into(patch, tap, None, part, 1, 1, 0, 0, 1, 1, p.groups)
        out += part
    if p.bias is not None:
        out += p.bias[:, None, None].astype(out.dtype)


def _conv_backward_gathered(
    p: _ConvPlan, g: NDArray[Any], needs: set[str]
) -> tuple[NDArray[Any] | None, NDArray[Any] | None]:
    """(grad_input, grad_weight) tap by tap (Note [large padding]); g is (N, K, Ho, Wo)."""
    q = _as_2d(p)
    dtype = g.dtype
    x, w = q.x.astype(dtype, copy=False), q.w.astype(dtype, copy=False)
    g = g.reshape(g.shape[:2] + tuple(q.out_size))
    xe = _gather_input(p, x).astype(dtype, copy=False)
    grad_w = np.empty(w.shape, dtype) if "weight" in needs else None
    # 16-bit: the taps' input gradients are added in float32 and rounded once
    grad_xe = np.zeros(xe.shape, _sum_dtype(dtype)) if "input" in needs else None
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf pass on, as in the kernels
        _backward_taps(p, q, g, w, xe, grad_w, grad_xe)
    grad_x = None
    if grad_xe is not None:
        h, wd = q.spatial
        with np.errstate(over="ignore"):
            grad_x = grad_xe[:, :, :h, :wd].astype(dtype)
        grad_x = grad_x.reshape(grad_x.shape[:2] + tuple(p.spatial))
    if grad_w is not None:
        grad_w = grad_w.reshape(p.w.shape)
    return grad_x, grad_w


def _backward_taps(
    p: _ConvPlan,
    q: SimpleNamespace,
    g: NDArray[Any],
    w: NDArray[Any],
    xe: NDArray[Any],
    grad_w: NDArray[Any] | None,
    grad_xe: NDArray[Any] | None,
) -> None:
    """Each tap's 1x1 weight gradient into grad_w and 1x1 input gradient onto its gathered
    positions of grad_xe."""
    dtype, kg, cg = g.dtype, p.k // p.groups, p.c // p.groups
    gw_tap = np.empty((p.k, cg, 1, 1), dtype)
    gx_tap = np.empty((p.n, p.c, *q.out_size), _sum_dtype(dtype))
    for r, s, rows, cols in _taps(p, q):
        index = (slice(None), slice(None), rows[:, None], cols[None, :])
        if grad_w is not None:
            patch = np.ascontiguousarray(xe[index])
            _core.conv2d_grad_weight_into(patch, g, gw_tap, 1, 1, 0, 0, 1, 1, p.groups)
            grad_w[:, :, r, s] = gw_tap[:, :, 0, 0]
        if grad_xe is not None:
            # the 1x1 input gradient: each group's channels transposed, (C, K/G, 1, 1)
            per_group = w[:, :, r, s].reshape(p.groups, kg, cg).transpose(0, 2, 1)
            wt = np.ascontiguousarray(per_group).reshape(p.c, kg, 1, 1)
            _core.conv2d_into(g, wt, None, gx_tap, 1, 1, 0, 0, 1, 1, p.groups)
            np.add.at(grad_xe, index, gx_tap)  # type: ignore[arg-type]


def _space_to_depth(
    x: NDArray[Any],
    w: NDArray[Any],
    pads: list[tuple[int, int]],
    stride: tuple[int, ...],
    out_size: list[int],
) -> tuple[NDArray[Any], NDArray[Any], list[tuple[int, int]], tuple[int, int]]:
    """A strided layer with few channels as a stride-1 one (Note [space to depth]).

    Note [space to depth]: with xp the zero-padded input and the phases (dy, dx) of the strides,
        x2[n, (c, dy, dx), i, j] = xp[n, c, i*sh + dy, j*sw + dx]
        w2[k, (c, dy, dx), r2, s2] = w[k, c, r2*sh + dy, s2*sw + dx]   (0 past the kernel)
    give the same sums as a stride-1 convolution of x2 with w2 (kernel ceil(R/sh) x ceil(S/sw)):
    up to sh*ceil(R/sh)*sw*ceil(S/sw) / (R*S) more multiply-adds (1.31x for 7x7 stride 2), but
    the stride-1 kernel reads its B rows in place (gemm_rows) instead of gathering them.  Costs
    one copy of the rows and columns of xp the phases use, (Ho - 1 + ceil(R/sh)) * sh by
    (Wo - 1 + ceil(S/sw)) * sw per channel, written phase by phase straight from x (and the
    kernel's copy of x2, Note [shifted rows]); "auto" uses it for C * sh * sw <= 64 and K <= 64.
    """
    (sh, sw), (ho, wo) = stride, out_size
    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    r2, s2 = -(-r // sh), -(-s // sw)
    hq, wq = ho - 1 + r2, wo - 1 + s2  # x2's rows and columns: xp's used ones / the strides
    (top, _), (left, _) = pads
    x2 = np.zeros((n, c, sh, sw, hq, wq), x.dtype)
    for dy in range(sh):
        i0, rows = _phase(top, dy, sh, h, hq)
        for dx in range(sw):
            j0, cols = _phase(left, dx, sw, wd, wq)
            if not (rows and cols):
                continue
            y0, x0 = i0 * sh + dy - top, j0 * sw + dx - left  # x's first row and column there
            x2[:, :, dy, dx, i0 : i0 + rows, j0 : j0 + cols] = x[
                :, :, y0 : y0 + (rows - 1) * sh + 1 : sh, x0 : x0 + (cols - 1) * sw + 1 : sw
            ]
    x2 = x2.reshape(n, c * sh * sw, hq, wq)
    wp = np.zeros((k, c, r2 * sh, s2 * sw), w.dtype)
    wp[:, :, :r, :s] = w
    w2 = wp.reshape(k, c, r2, sh, s2, sw).transpose(0, 1, 3, 5, 2, 4)
    w2 = np.ascontiguousarray(w2).reshape(k, c * sh * sw, r2, s2)
    return x2, w2, [(0, 0), (0, 0)], (1, 1)


def _phase(before: int, d: int, stride: int, size: int, count: int) -> tuple[int, int]:
    """Along one axis of Note [space to depth]: the first phase-d index i whose padded position
    i*stride + d lies in x (at or past `before`), and how many of the `count` do (0 if none)."""
    i0 = max(0, -(-(before - d) // stride))
    if i0 >= count or i0 * stride + d - before >= size:
        return 0, 0
    last = min(count - 1, (before + size - 1 - d) // stride)  # the last one inside x
    return i0, last - i0 + 1


def conv2d(
    x: ArrayLike,
    w: ArrayLike,
    bias: ArrayLike | None = None,
    *,
    stride: _Ints = 1,
    padding: _Padding = 0,
    dilation: _Ints = 1,
    groups: int = 1,
    padding_mode: _PaddingMode = "zeros",
    algorithm: _Algorithm = "auto",
    out: NDArray[Any] | None = None,
) -> NDArray[Any]:
    """2-D convolution (cross-correlation), PyTorch's ``conv2d``:

        y[n, k, i, j] = bias[k] + sum_{c, r, s} w[k, c, r, s] * xp[n, c', i*sh + r*dh, j*sw + s*dw]

    where xp is x padded, c' = g*C/G + c, and g = k // (K / G) is k's group.

    Parameters
    ----------
    x : array_like
        (N, C, H, W), or unbatched (C, H, W).
    w : array_like
        (K, C / groups, R, S).
    bias : array_like, optional
        (K,).
    stride, dilation : int or (int, int)
        >= 1.  A one-element sequence applies to both dims, as PyTorch expands it.
    padding : int, (p,), (ph, pw), (top, bottom, left, right), "valid" or "same"
        "same" works with any stride and dilation (unlike PyTorch): the output is
        ceil(H / stride) x ceil(W / stride) and an odd total padding puts the extra pixel at the
        bottom/right, as TensorFlow and XLA do.
    groups : int
        C and K are split into this many groups (groups == C is a depthwise convolution).
    padding_mode : {"zeros", "reflect", "replicate", "circular"}
    algorithm : {"auto", "direct", "winograd", "winograd_f2", "winograd_f4"}
        Winograd convolution serves 3x3 kernels with stride 1, dilation 1 and groups 1:
        "winograd_f2" is F(2x2, 3x3) (16 instead of 36 multiplications per 2x2 output tile;
        float32 results within 4x direct convolution's tolerance), "winograd_f4" is F(4x4, 3x3)
        (36 instead of 144 per 4x4 tile; within 16x), both tested at magnitudes 1 and 100;
        "winograd" picks the tile by shape.  "auto" picks between the three where they are
        measured faster (docs/guide/conv.md), "direct" forces direct convolution.  NaN and inf
        reach exactly the outputs whose window holds them, whatever ``algorithm`` says:
        Winograd (whose transforms would spread them over whole tiles) checks its outputs and
        computes the layer again by direct convolution if one is not finite, and the strided
        space-to-depth path is not used when x or w holds one (one read of each).  Where
        the padding dwarfs the input (the padded copy over 4x the input and output and over
        16 MiB, e.g. a large dilation with "same"), the convolution runs tap by tap on
        gathered patches instead of padding a copy.

    out : ndarray, optional
        Where to write the result: exactly its shape and dtype, writeable.  Written directly
        when it is C-contiguous and shares no memory with the inputs, else through a temporary
        (so it may be ``x`` itself).
    Returns
    -------
    ndarray
        (N, K, Ho, Wo) (or (K, Ho, Wo)).  The dtype policy: float32, float64, float16 and
        bfloat16 (``ml_dtypes``, PyTorch / JAX bfloat16) are kept; mixed dtypes promote with
        ``np.result_type`` (bfloat16 with float16 or float32: float32; anything with float64:
        float64), integers and bool give float64.  bfloat16 and float16 compute in float32
        (products, sums, Winograd's transforms) and round each output once to nearest even,
        so an output overflows to inf exactly where its float32 value exceeds the 16-bit range.

    Raises
    ------
    ValueError
        Channels that do not match groups, a kernel larger than the padded input, non-positive
        stride or dilation, bad padding strings or sizes, reflect padding not smaller than the
        input.
    TypeError
        Complex, object or string inputs; non-integer sizes.

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> mn.conv2d(x, np.ones((1, 1, 2, 2)), stride=2)
    array([[[[10., 18.],
             [42., 50.]]]])
    """
    return _conv_nd(
        "conv2d", x, w, bias, stride, padding, dilation, groups, padding_mode, 2, algorithm, out
    )


def conv1d(
    x: ArrayLike,
    w: ArrayLike,
    bias: ArrayLike | None = None,
    *,
    stride: _Ints = 1,
    padding: _Padding = 0,
    dilation: _Ints = 1,
    groups: int = 1,
    padding_mode: _PaddingMode = "zeros",
    out: NDArray[Any] | None = None,
) -> NDArray[Any]:
    """1-D convolution (cross-correlation), PyTorch's ``conv1d``, on (N, C, L) or (C, L) with
    w (K, C / groups, R); padding is an int, (left, right), "valid" or "same" (any stride).
    Otherwise (``out=`` included) as :func:`conv2d`.

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> mn.conv1d(np.array([[1.0, 2.0, 3.0, 4.0]]), np.array([[[1.0, -1.0]]]))
    array([[-1., -1., -1.]])
    """
    return _conv_nd(
        "conv1d", x, w, bias, stride, padding, dilation, groups, padding_mode, 1, "direct", out
    )


_SCIPY_MODES = ("full", "valid", "same")
_ScipyMode = Literal["full", "valid", "same"]
_Boundary = Literal["fill", "pad", "wrap", "circular", "symm", "symmetric"]
_BOUNDARIES = {
    "fill": "fill",
    "pad": "fill",
    "wrap": "wrap",
    "circular": "wrap",
    "symm": "symm",
    "symmetric": "symm",
}


def _correlate(
    fn: str,
    in1: ArrayLike,
    in2: ArrayLike,
    mode: str,
    boundary: str,
    fillvalue: Any,
    flip: bool,
) -> NDArray[Any]:
    """SciPy's correlate2d (``flip=False``) / convolve2d (``flip=True``): checks, SciPy's result
    dtype, its swap of the inputs in "valid" mode, then the real, complex or integer form."""
    in1, in2 = _scipy_input(fn, in1, "in1"), _scipy_input(fn, in2, "in2")
    if in1.ndim != 2 or in2.ndim != 2:
        raise ValueError(f"{fn}: in1 and in2 must be 2-D (got {in1.ndim}-D and {in2.ndim}-D)")
    # Note [empty correlation]: SciPy answers an empty in1 or in2 with artefacts of its loops
    # rather than a rule ("valid" with a (0, 0) kernel on a 4x5 image gives 5x6 zeros, "full"
    # 3x4; an empty image gives fillvalue * sum(in2) in "full" but zeros in "valid"; some pairs
    # fail with "negative dimensions"), so, as the reference, both must hold data
    for name, arr in (("in1", in1), ("in2", in2)):
        if arr.size == 0:
            raise ValueError(
                f"{fn}: {name} is empty (got shape {arr.shape}, expected both sizes >= 1)"
            )
    if mode not in _SCIPY_MODES:
        raise ValueError(f"{fn}: mode is invalid (got {mode!r}, expected one of {_SCIPY_MODES})")
    if boundary not in _BOUNDARIES:
        raise ValueError(
            f"{fn}: boundary is invalid (got {boundary!r}, expected 'fill', 'wrap' or 'symm')"
        )
    boundary = _BOUNDARIES[boundary]
    dtype = np.result_type(in1.dtype, in2.dtype)
    if dtype == np.bool_:
        dtype = np.dtype(np.float64)  # SciPy refuses bool; the dtype policy computes it in float64
    fill = _scipy_fillvalue(fn, fillvalue, dtype)
    swapped = False
    if mode == "valid":  # SciPy swaps when in2 contains in1
        ge = [a >= b for a, b in zip(in1.shape, in2.shape, strict=True)]
        le = [a <= b for a, b in zip(in1.shape, in2.shape, strict=True)]
        if not all(ge):
            if all(le):
                in1, in2, swapped = in2, in1, True
            else:
                raise ValueError(
                    f"{fn}: for 'valid' mode one input must be at least as large as the other in "
                    f"every dimension (got {in1.shape} and {in2.shape})"
                )
    (m, n), (p, q) = in1.shape, in2.shape
    if mode != "valid":
        check_size(fn, "the padded in1", (m + 2 * p - 2, n + 2 * q - 2), dtype.itemsize)
        check_size(fn, "the work (multiply-adds)", (m + p - 1, n + q - 1, p, q))
    kernel = in2[::-1, ::-1] if flip else in2

    def real(x: NDArray[Any], k: NDArray[Any], f: Any, dt: np.dtype[Any]) -> NDArray[Any]:
        return _real_correlate(x, k, mode, boundary, f, dt, flip, swapped)

    if dtype.kind == "c":
        # Note [complex correlation]: through the real kernel, 4 products of the parts in the
        # parts' dtype; correlate2d conjugates in2 (after the swap), as SciPy does.
        part = np.dtype(np.float32 if dtype == np.complex64 else np.float64)
        x, k = in1.astype(dtype), kernel.astype(dtype)
        k = k if flip else np.conj(k)
        xr, xi, kr, ki = x.real, x.imag, k.real, k.imag
        re = real(xr, kr, fill.real, part) - real(xi, ki, fill.imag, part)
        im = real(xr, ki, fill.real, part) + real(xi, kr, fill.imag, part)
        result: NDArray[Any] = (re + 1j * im).astype(dtype)
        return result
    if dtype.kind in "iu":
        return _integer_correlate(in1, kernel, fill, dtype, real)
    return real(in1, kernel, fill, dtype)


def _scipy_input(fn: str, x: ArrayLike, name: str) -> NDArray[Any]:
    """An input of correlate2d / convolve2d: real, integer, bool, 16-bit or complex."""
    arr = as_input(x, fn, name)
    if arr.dtype.kind == "c" and arr.dtype.itemsize <= 16:
        return arr  # complex64, complex128 (Note [complex correlation])
    if arr.dtype.kind in "iu":
        return arr  # integers keep their dtype, as in SciPy
    return arr.astype(compute_dtype(fn, name, arr.dtype), copy=False)


def _scipy_fillvalue(fn: str, fillvalue: Any, dtype: np.dtype[Any]) -> Any:
    """``fillvalue`` as SciPy takes it: a scalar or a one-element array, read as a complex
    number, then cast to the result dtype (ValueError for anything it cannot be)."""
    value = np.asarray(fillvalue)
    if value.size != 1:
        raise ValueError(f"{fn}: `fillvalue` must be scalar or an array with one element")
    try:
        c = complex(value.reshape(()).item())
    except (TypeError, ValueError):
        raise ValueError(
            f"{fn}: could not convert `fillvalue` to a number (got {fillvalue!r})"
        ) from None
    if dtype.kind == "c":
        return np.asarray(c, dtype)[()]
    if c.imag != 0:
        raise ValueError(
            f"{fn}: could not cast `fillvalue` to the real output dtype {dtype} (got {c})"
        )
    if dtype.kind in "iu":
        if not np.isfinite(c.real):
            raise ValueError(f"{fn}: `fillvalue` {c.real} has no value in the output dtype {dtype}")
        whole = int(c.real)  # truncated toward 0, and it must fit, as in SciPy
        info = np.iinfo(dtype)
        if not info.min <= whole <= info.max:
            raise ValueError(
                f"{fn}: could not cast `fillvalue` {fillvalue!r} to the output dtype {dtype}"
            )
        return dtype.type(whole)
    return c.real


_RealCorrelate = Callable[[NDArray[Any], NDArray[Any], Any, np.dtype[Any]], NDArray[Any]]


def _integer_correlate(
    in1: NDArray[Any], kernel: NDArray[Any], fill: Any, dtype: np.dtype[Any], real: _RealCorrelate
) -> NDArray[Any]:
    """Integer inputs give SciPy's integer result: the exact sum, wrapped to ``dtype`` as its
    integer arithmetic wraps.  Through the float64 kernel when every partial sum is an integer
    below 2**53 (then exact); else tap by tap in ``dtype``'s own (wrapping) arithmetic."""
    x, k = in1.astype(dtype), kernel.astype(dtype)
    x64, k64 = x.astype(np.float64), k.astype(np.float64)
    bound = max(int(np.abs(x64).max()), abs(int(fill))) * float(np.abs(k64).sum())
    if bound < 2.0**52:  # every partial sum is an integer of at most 52 bits: float64 is exact
        exact = real(x64, k64, float(fill), np.dtype(np.float64))
        wrapped: NDArray[Any] = np.rint(exact).astype(np.int64).astype(dtype)
        return wrapped
    return real(x, k, fill, dtype)  # dtype is an integer type: _real_correlate's taps


def _real_correlate(
    x: NDArray[Any],
    kernel: NDArray[Any],
    mode: str,
    boundary: str,
    fillvalue: Any,
    dtype: np.dtype[Any],
    flip: bool,
    swapped: bool,
) -> NDArray[Any]:
    """The real correlation of x with kernel (already flipped for convolve2d and swapped for
    "valid"): pad by ``boundary``, correlate on the conv2d kernel (or tap by tap for an integer
    ``dtype``), crop for "same"."""
    (m, n), (p, q) = x.shape, kernel.shape
    if mode == "valid":
        padded = x
    else:
        pads = [(p - 1, p - 1), (q - 1, q - 1)]
        if boundary == "fill":
            padded = np.pad(x, pads, mode="constant", constant_values=fillvalue)
        else:
            padded = np.pad(x, pads, mode="wrap" if boundary == "wrap" else "symmetric")
    padded = np.asarray(padded, dtype=dtype, order="C")
    rows, cols = padded.shape[0] - p + 1, padded.shape[1] - q + 1
    if dtype.kind in "iu":  # integers too large for float64's 53 bits: tap by tap, wrapping
        out = np.zeros((rows, cols), dtype)
        k = np.asarray(kernel, dtype=dtype)
        for r in range(p):
            for s in range(q):  # array * 1x1 array: NumPy's integer arithmetic wraps silently
                out += padded[r : r + rows, s : s + cols] * k[r : r + 1, s : s + 1]
    else:
        w = np.asarray(kernel, dtype=dtype, order="C")[None, None]
        full = _core.empty((1, 1, rows, cols), dtype)
        _core.conv2d_into(padded[None, None], w, None, full, 1, 1, 0, 0, 1, 1, 1)
        out = full[0, 0]
    if mode == "same":
        top, left = ((p - 1) // 2, (q - 1) // 2) if flip else (p // 2, q // 2)
        out = out[top : top + m, left : left + n]
    if swapped and not flip:
        out = out[::-1, ::-1]
    return np.ascontiguousarray(out)


def correlate2d(
    in1: ArrayLike,
    in2: ArrayLike,
    mode: _ScipyMode = "full",
    boundary: _Boundary = "fill",
    fillvalue: float = 0,
    *,
    out: NDArray[Any] | None = None,
) -> NDArray[Any]:
    """2-D cross-correlation with ``scipy.signal.correlate2d``'s semantics:

        O(i, j) = sum_m sum_n I(i + m, j + n) K(m, n)

    on I = in1 extended by ``boundary`` ("fill" with ``fillvalue``, "wrap", "symm") — the seed's
    formula is ``correlate2d(I, K, mode="valid")``.

    Parameters
    ----------
    in1, in2 : array_like
        2-D arrays: real floating, integer, bool or complex.
    mode : {"full", "valid", "same"}
        Output (M+P-1, N+Q-1), (M-P+1, N-Q+1) or in1's shape (centred as SciPy centres it).
        For "valid", if in2 is the larger in every dimension the inputs are swapped (and the
        result flipped), as SciPy does.
    boundary : {"fill", "wrap", "symm"}
        Also SciPy's aliases "pad", "circular" and "symmetric".
    fillvalue : scalar or one-element array
        Read as a complex number and cast to the result dtype, as SciPy does: an integer result
        truncates it toward 0 and needs it in range; a real result needs it real.
    out : ndarray, optional
        Where to write the result (exactly its shape and dtype; NumPy's rule, not SciPy's,
        which has no ``out``).

    Returns
    -------
    ndarray
        SciPy's result dtype, ``np.result_type(in1, in2)``:

        - float32 and float64 kept, computed in that dtype on the conv2d kernel; float16 and
          bfloat16 kept, computed in float32 and rounded once (SciPy refuses float16);
        - integers give integers: the exact sum wrapped to the result dtype, as SciPy's integer
          arithmetic wraps (through the float64 kernel while every partial sum is below 2**52,
          else tap by tap in the integer dtype); mixes that NumPy promotes to float64
          (int64 with float32, uint64 with int64) give float64;
        - complex64 and complex128 are computed through the real kernel in float32 / float64,
          four real products (correlate2d conjugates in2, as SciPy does);
        - bool computes in float64 (SciPy refuses bool).

    Raises
    ------
    TypeError
        An input of an unsupported dtype (object, string, datetime, ...).
    ValueError
        Not 2-D, empty, mismatched shapes for "valid", a bad ``mode`` or ``boundary``, a
        ``fillvalue`` with more than one element or that the result dtype cannot hold (SciPy's
        exception types).

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> mn.correlate2d(np.arange(9.0).reshape(3, 3), np.ones((2, 2)), mode="valid")
    array([[ 8., 12.],
           [20., 24.]])
    """
    result = _correlate("correlate2d", in1, in2, mode, boundary, fillvalue, flip=False)
    return deliver_one("correlate2d", result, out)


def convolve2d(
    in1: ArrayLike,
    in2: ArrayLike,
    mode: _ScipyMode = "full",
    boundary: _Boundary = "fill",
    fillvalue: float = 0,
    *,
    out: NDArray[Any] | None = None,
) -> NDArray[Any]:
    """2-D convolution with ``scipy.signal.convolve2d``'s semantics: correlation with in2 flipped
    in both axes (O(i, j) = sum_m sum_n I(i - m, j - n) K(m, n)); arguments as
    :func:`correlate2d`.

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> mn.convolve2d(np.eye(2), np.array([[1.0, 2.0]]))
    array([[1., 2., 0.],
           [0., 1., 2.]])
    """
    result = _correlate("convolve2d", in1, in2, mode, boundary, fillvalue, flip=True)
    return deliver_one("convolve2d", result, out)


# -- backward ------------------------------------------------------------------------------------

_NEEDS = ("input", "weight", "bias")


def _pad_adjoint(
    grad_padded: NDArray[Any],
    pads: list[tuple[int, int]],
    mode: str,
    spatial: tuple[int, ...],
) -> NDArray[Any]:
    """The adjoint of np.pad over the trailing axes: every padded position's gradient goes back
    to the input position it was copied from (for zero padding: a crop)."""
    out = grad_padded
    for axis, ((before, after), size) in enumerate(zip(pads, spatial, strict=True)):
        ax = out.ndim - len(spatial) + axis
        if mode == "zeros":
            index = [slice(None)] * out.ndim
            index[ax] = slice(before, before + size)
            out = out[tuple(index)]  # a view; the caller makes the result contiguous
            continue
        source = np.pad(np.arange(size), (before, after), mode=_MODES[mode])
        folded = np.zeros(out.shape[:ax] + (size,) + out.shape[ax + 1 :], out.dtype)
        # numpy's stub of ufunc.at admits integer indices only, not a tuple with slices
        with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf pass on
            np.add.at(folded, (slice(None),) * ax + (source,), out)  # type: ignore[arg-type]
        out = folded
    return out


def _conv_backward(
    fn: str,
    x: ArrayLike,
    w: ArrayLike,
    grad_out: ArrayLike,
    stride: _Ints,
    padding: _Padding,
    dilation: _Ints,
    groups: int,
    padding_mode: str,
    dims: int,
    needs: Collection[str],
) -> _Grads:
    p = _plan(fn, x, w, None, stride, padding, dilation, groups, padding_mode, dims, "direct")
    if isinstance(needs, str) or not set(needs) <= set(_NEEDS):
        raise ValueError(f"{fn}: needs is invalid (got {needs!r}, expected a subset of {_NEEDS})")
    needs = set(needs)
    g = as_float_array(grad_out, fn, "grad_out")
    want = ((p.k,) if p.unbatched else (p.n, p.k)) + tuple(p.out_size)
    if g.shape != want:
        raise ValueError(f"{fn}: grad_out has shape {g.shape} (expected the output's {want})")
    dtype = np.result_type(p.dtype, g.dtype)
    g = np.asarray(g, dtype=dtype, order="C")
    x, w = p.x.astype(dtype, copy=False), p.w.astype(dtype, copy=False)
    if p.unbatched:
        g = g[None]
    if _pad_copy_too_large(p):
        gx, gw = _conv_backward_gathered(p, g, needs)
        if gx is not None:
            gx = np.ascontiguousarray(gx[0] if p.unbatched else gx)
        gb = g.sum(axis=(0, *range(2, g.ndim)), dtype=np.float64).astype(dtype)
        return gx, gw, gb if "bias" in needs else None
    if dims == 1:  # as 2-D with a height of 1
        x, w, g = x[:, :, None, :], w[:, :, None, :], g[:, :, None, :]
        pads, stride, dilation = [(0, 0), *p.pads], (1, *p.stride), (1, *p.dilation)
        spatial = (1, *p.spatial)
    else:
        pads, stride, dilation, spatial = p.pads, p.stride, p.dilation, p.spatial
    n, c, k, groups = p.n, p.c, p.k, p.groups
    cg, kg = c // groups, k // groups
    r, s = w.shape[2:]
    (sh, sw), (dh, dw) = stride, dilation
    ho, wo = g.shape[2:]
    mode = p.padding_mode if any(b or a for b, a in pads) else "zeros"
    hp, wp = (size + before + after for size, (before, after) in zip(spatial, pads, strict=True))

    grad_input: NDArray[Any] | None
    grad_weight: NDArray[Any] | None
    grad_bias: NDArray[Any] | None
    grad_bias = grad_weight = grad_input = None
    if "bias" in needs:
        grad_bias = g.sum(axis=(0, 2, 3), dtype=np.float64).astype(dtype)
    if "weight" in needs:
        # the compiled kernel (Note [weight gradient] in conv.cpp) pads with zeros itself; the
        # other padding modes are applied here first
        (pt, _), (pl, _) = pads
        if mode == "zeros":
            src, top, left = x, pt, pl
        else:
            src, top, left = np.pad(x, [(0, 0), (0, 0), *pads], mode=_MODES[mode]), 0, 0
        grad_weight = np.empty(w.shape, dtype)
        _core.conv2d_grad_weight_into(
            np.ascontiguousarray(src), g, grad_weight, sh, sw, top, left, dh, dw, groups
        )
    if "input" in needs:
        (pt, _), (pl, _) = pads
        # Note [non-finite inputs] (kernels/conv.cpp): the stride-1 forms run a transposed
        # convolution, which multiplies g's zero padding by w (0 * inf where the definition has
        # no product); with a NaN or inf in w, col2im (the definition's products only) serves
        # stride 1 too.  (A non-finite g is exact there: Winograd checks its own outputs.)
        transposed = (sh, sw) == (1, 1) and _all_finite(w)
        direct_crop = transposed and mode == "zeros" and pt <= dh * (r - 1) and pl <= dw * (s - 1)
        if transposed:  # both stride-1 forms below use the transposed kernel
            wt = w.reshape(groups, kg, cg, r, s).transpose(0, 2, 1, 3, 4)[..., ::-1, ::-1]
            wt = np.ascontiguousarray(wt).reshape(groups * cg, kg, r, s)
        if direct_crop:
            # stride 1, zero padding: only the unpadded part of the transposed convolution is
            # needed, i.e. g correlated with the flipped, channel-transposed kernel at padding
            # (dilated kernel extent - 1 - the forward's padding), straight into x's shape
            # (Winograd where the forward would use it)
            winograd = 0
            if (r, s) == (3, 3) and (dh, dw) == (1, 1) and groups == 1:
                winograd = _winograd_tile("auto", k, c, n, *spatial)  # k channels in, c out
            grad_input = _core.empty((n, c, *spatial), dtype)
            _core.conv2d_into(
                g,
                wt,
                None,
                grad_input,
                1,
                1,
                dh * (r - 1) - pt,
                dw * (s - 1) - pl,
                dh,
                dw,
                groups,
                winograd,
            )
        else:
            # the fold of _pad_adjoint adds gradients: for 16-bit data it runs on float32
            # results, rounded once at the end (zero padding only crops)
            acc = dtype if mode == "zeros" else _sum_dtype(dtype)
            if transposed:
                grad_xp = np.zeros((n, c, hp, wp), acc)
                # the transposed convolution: g fully padded by the dilated kernel size, correlated
                # with the flipped, channel-transposed kernel (groups keep their channels)
                full_h, full_w = ho + dh * (r - 1), wo + dw * (s - 1)
                part = _core.empty((n, c, full_h, full_w), acc)
                pad_h, pad_w = dh * (r - 1), dw * (s - 1)
                _core.conv2d_into(g, wt, None, part, 1, 1, pad_h, pad_w, dh, dw, groups, 0)
                grad_xp[:, :, :full_h, :full_w] = part  # rows/cols past the last window: 0
            else:
                # strided (or non-finite): dCol = W^T g (a GEMM), each (c, r, s) row of dCol
                # added onto its strided window of grad_xp (col2im), in C++ (conv_grad_input in
                # conv.cpp)
                grad_xp = _core.empty((n, c, hp, wp), acc)  # every element written
                _core.conv2d_grad_input_into(g, w, grad_xp, sh, sw, dh, dw, groups)
            grad_input = _pad_adjoint(grad_xp, pads, mode, spatial)
            if grad_input.dtype != dtype:
                with np.errstate(over="ignore"):
                    grad_input = grad_input.astype(dtype)
        if dims == 1:
            grad_input = grad_input[:, :, 0, :]
        if p.unbatched:
            grad_input = grad_input[0]
        grad_input = np.ascontiguousarray(grad_input)
    if grad_weight is not None and dims == 1:
        grad_weight = grad_weight[:, :, 0, :]
    return grad_input, grad_weight, grad_bias


def _deliver_grads(fn: str, grads: _Grads, out: Any) -> tuple[Any, ...]:
    """``out=`` of the backward functions: a tuple, one entry per gradient."""
    return grads if out is None else deliver(fn, grads, out)


@overload
def conv2d_backward(
    x: ArrayLike,
    w: ArrayLike,
    grad_out: ArrayLike,
    *,
    stride: _Ints = ...,
    padding: _Padding = ...,
    dilation: _Ints = ...,
    groups: int = ...,
    padding_mode: _PaddingMode = ...,
    out: tuple[NDArray[Any] | None, NDArray[Any] | None, NDArray[Any] | None] | None = ...,
) -> _AllGrads: ...


@overload
def conv2d_backward(
    x: ArrayLike,
    w: ArrayLike,
    grad_out: ArrayLike,
    *,
    stride: _Ints = ...,
    padding: _Padding = ...,
    dilation: _Ints = ...,
    groups: int = ...,
    padding_mode: _PaddingMode = ...,
    needs: _Needs,
    out: tuple[NDArray[Any] | None, NDArray[Any] | None, NDArray[Any] | None] | None = ...,
) -> _Grads: ...


def conv2d_backward(
    x: ArrayLike,
    w: ArrayLike,
    grad_out: ArrayLike,
    *,
    stride: _Ints = 1,
    padding: _Padding = 0,
    dilation: _Ints = 1,
    groups: int = 1,
    padding_mode: _PaddingMode = "zeros",
    needs: _Needs = ("input", "weight", "bias"),
    out: tuple[NDArray[Any] | None, NDArray[Any] | None, NDArray[Any] | None] | None = None,
) -> _Grads:
    """Gradients of :func:`conv2d` given the upstream gradient ``grad_out``:

        grad_bias[k]        = sum_{n,i,j} g[n,k,i,j]
        grad_w[k,c,r,s]     = sum_{n,i,j} g[n,k,i,j] xp[n,c',i*sh+r*dh,j*sw+s*dw]
        grad_xp[n,c',y,x]  += g[n,k,i,j] w[k,c,r,s]   for y = i*sh+r*dh, x = j*sw+s*dw

    with xp the padded input; grad_x folds grad_xp back through the padding (zeros: a crop;
    reflect/replicate/circular: each padded copy's gradient is added to its source).

    Parameters
    ----------
    x, w, stride, padding, dilation, groups, padding_mode
        As for :func:`conv2d` (every option, "same" with any stride included).
    grad_out : array_like
        dL/dy, the shape of conv2d's output.
    needs : subset of ("input", "weight", "bias")
        Which gradients to compute; the others are returned as None.
    out : (grad_input, grad_weight, grad_bias), optional
        Arrays to write the gradients into (NumPy's tuple form of ``out``): each exactly its
        gradient's shape and dtype, or None to have that one allocated (and None for a
        gradient that ``needs`` leaves out).

    Returns
    -------
    (grad_input, grad_weight, grad_bias)
        Shaped like x, w and (K,), in the dtype of x, w and grad_out promoted as in
        :func:`conv2d` (bfloat16 and float16 stay 16-bit: float32 math, each gradient rounded
        once; grad_bias summed in float64); each gradient is computed in a fixed order, so
        results do not depend on the number of threads.

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> x, w = np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2))
    >>> gx, gw, gb = mn.conv2d_backward(x, w, np.ones((1, 1, 2, 2)))
    >>> gx[0, 0]
    array([[1., 2., 1.],
           [2., 4., 2.],
           [1., 2., 1.]])
    >>> gb
    array([4.])
    """
    grads = _conv_backward(
        "conv2d_backward",
        x,
        w,
        grad_out,
        stride,
        padding,
        dilation,
        groups,
        padding_mode,
        2,
        needs,
    )
    return cast("_Grads", _deliver_grads("conv2d_backward", grads, out))


@overload
def conv1d_backward(
    x: ArrayLike,
    w: ArrayLike,
    grad_out: ArrayLike,
    *,
    stride: _Ints = ...,
    padding: _Padding = ...,
    dilation: _Ints = ...,
    groups: int = ...,
    padding_mode: _PaddingMode = ...,
    out: tuple[NDArray[Any] | None, NDArray[Any] | None, NDArray[Any] | None] | None = ...,
) -> _AllGrads: ...


@overload
def conv1d_backward(
    x: ArrayLike,
    w: ArrayLike,
    grad_out: ArrayLike,
    *,
    stride: _Ints = ...,
    padding: _Padding = ...,
    dilation: _Ints = ...,
    groups: int = ...,
    padding_mode: _PaddingMode = ...,
    needs: _Needs,
    out: tuple[NDArray[Any] | None, NDArray[Any] | None, NDArray[Any] | None] | None = ...,
) -> _Grads: ...


def conv1d_backward(
    x: ArrayLike,
    w: ArrayLike,
    grad_out: ArrayLike,
    *,
    stride: _Ints = 1,
    padding: _Padding = 0,
    dilation: _Ints = 1,
    groups: int = 1,
    padding_mode: _PaddingMode = "zeros",
    needs: _Needs = ("input", "weight", "bias"),
    out: tuple[NDArray[Any] | None, NDArray[Any] | None, NDArray[Any] | None] | None = None,
) -> _Grads:
    """Gradients of :func:`conv1d`; arguments and returns as :func:`conv2d_backward`.

    Examples
    --------
    >>> import numpy as np, mlmath_native as mn
    >>> gx, gw, gb = mn.conv1d_backward(np.arange(4.0)[None, None], np.ones((1, 1, 2)),
    ...                                 np.ones((1, 1, 3)))
    >>> gx, gw
    (array([[[1., 2., 2., 1.]]]), array([[[3., 6.]]]))
    """
    grads = _conv_backward(
        "conv1d_backward",
        x,
        w,
        grad_out,
        stride,
        padding,
        dilation,
        groups,
        padding_mode,
        1,
        needs,
    )
    return cast("_Grads", _deliver_grads("conv1d_backward", grads, out))
